//! Start-up failures of `report-relay run` that must stop the service with a clear message
//! and a non-zero exit, not leave it running half-configured.

#[path = "support/dovecot.rs"]
mod dovecot;
#[path = "support/seatable.rs"]
mod seatable;
#[path = "support/stack.rs"]
mod stack;
#[path = "support/telegram.rs"]
mod telegram;

use std::process::{Command, Stdio};
use std::time::Duration;

use stack::{Stack, Tuning};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_listen_address_in_use_fails_the_start() {
    let stack = Stack::new().await;
    let taken = std::net::TcpListener::bind(("127.0.0.1", stack.http_port)).unwrap();
    let config = stack.write_config(&Tuning::default());
    let mut child = Command::new(env!("CARGO_BIN_EXE_report-relay"))
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("the relay kept running without its HTTP listener");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!status.success(), "exit status {status}");
    let address = format!("127.0.0.1:{}", stack.http_port);
    assert!(
        stderr.contains(&address) && stderr.contains("http.listen"),
        "{stderr}"
    );
    drop(taken);
}
