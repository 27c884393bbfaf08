//! Start-up failures of `report-relay run` that must stop the service with a clear message
//! and a non-zero exit, not leave it running half-configured.

mod support;

use support::{seatable, stack, telegram};

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

/// `report-relay replay FILE --config C --mailbox ADDRESS --timeout SECS`: exit code, output,
/// and how long it ran.
async fn replay(stack: &Stack, file: &str, timeout_secs: u64) -> (i32, String, Duration) {
    let config = stack.write_config(&Tuning::default());
    let eml = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/superset")
        .join(file);
    let args = [
        "replay".to_owned(),
        eml.display().to_string(),
        "--config".to_owned(),
        config.display().to_string(),
        "--mailbox".to_owned(),
        stack::ADDRESS.to_owned(),
        "--timeout".to_owned(),
        timeout_secs.to_string(),
    ];
    let started = std::time::Instant::now();
    let (code, out) = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        stack::run_cli_logging(&args, "warn")
    })
    .await
    .unwrap();
    (code, out, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_waits_for_its_own_sends_at_most_its_timeout() {
    let stack = Stack::new().await;
    let mailbox = stack.mailbox_row.clone();
    let (ann, bob) = (111_222_333, 444_555_666);
    let row = stack.add_user("Ann", Some(ann), &[&mailbox]);
    // Ann's sends fail with a transient error for good: replay must give up at --timeout,
    // not after delivery.give_up_after_secs (600 s in the stack's config).
    stack.telegram.inject(
        telegram::FaultRule::new(telegram::Fault::Api {
            code: 500,
            description: "Internal Server Error".into(),
        })
        .chat(ann),
    );
    let (code, out, took) = replay(&stack, "01_chart_png_report.eml", 2).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("still pending after --timeout"), "{out}");
    assert!(took < Duration::from_secs(30), "{took:?}");

    // Ann's send is still pending in the outbox; a replay for Bob alone waits only for its
    // own send and succeeds.
    stack.seatable.update_row(
        "users",
        &row,
        serde_json::json!({"id_telegram": bob.to_string()}),
    );
    let (code, out, _) = replay(&stack, "03_dashboard_pdf_report.eml", 60).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(stack.ok_sends_to(bob).len(), 1, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_start_from_the_persisted_snapshot_no_write_goes_before_the_schema_check() {
    let stack = Stack::new().await;
    let mailbox = stack.mailbox_row.clone();
    let ann = 111_222_333;
    stack.add_user("Ann", Some(ann), &[&mailbox]);
    let tuning = Tuning {
        cache_ttl_secs: 1,
        ..Tuning::default()
    };
    let relay = stack.start(&tuning);
    stack.wait_ready(1).await;
    relay.stop().await;

    // SeaTable is down at the start, and comes back without the column the relay writes.
    stack
        .seatable
        .go_down(seatable::Outage::ConnectionRefused)
        .await;
    stack.seatable.remove_column("mailboxes", "last_uid");
    let relay = stack.start(&tuning);
    stack.wait_ready(1).await;
    stack.seatable.come_back().await;
    let writes_before = stack.seatable.requests(seatable::Endpoint::UpdateRows);
    stack
        .deliver(&stack::fixture("01_chart_png_report.eml"))
        .await;
    // The report still goes out, from the snapshot...
    stack
        .wait_for_sends(&[ann], 1, Duration::from_secs(30))
        .await;
    // ...but once SeaTable answers, /readyz names what is missing and nothing is written.
    let body = stack
        .wait_readyz("the missing column in /readyz", |status, body| {
            status == 503
                && body["schema_problem"]
                    .as_str()
                    .is_some_and(|p| p.contains("last_uid"))
        })
        .await;
    assert_eq!(body["ready"], false);
    relay.stop().await;
    assert_eq!(
        stack.seatable.requests(seatable::Endpoint::UpdateRows),
        writes_before,
        "no last_uid write went to a base without the column"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_config_and_a_broken_one_is_refused() {
    let stack = Stack::new().await;
    let path = stack.write_config(&Tuning::default());
    let good = std::fs::read_to_string(&path).unwrap();
    let wrong = good.replace(
        &format!("password: \"{}\"", stack::PASSWORD),
        "password: \"not-the-password\"",
    );
    assert_ne!(good, wrong);
    std::fs::write(&path, &wrong).unwrap();
    let mut child = stack.spawn_with_config(&path);
    let hangup = |pid: u32| {
        let status = Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    };
    stack
        .wait_readyz("a login failure", |_, body| {
            body["mailboxes"][0]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("authentication failed"))
        })
        .await;

    // A config that does not load is refused; the relay runs on.
    std::fs::write(&path, "telegram: [this is not a config").unwrap();
    hangup(child.id());
    // The password is fixed: SIGHUP alone makes the watcher log in.
    std::fs::write(&path, &good).unwrap();
    hangup(child.id());
    stack.wait_ready(1).await;
    assert!(child.try_wait().unwrap().is_none(), "still running");
    child.kill().unwrap();
    child.wait().unwrap();
}
