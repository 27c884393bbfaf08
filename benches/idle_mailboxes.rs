//! Memory, threads and start-up of the relay binary with N idle mailboxes.
//!
//! Starts a private Dovecot configured for N concurrent clients (`DovecotOptions::scale_clients`)
//! with N users, the fake SeaTable with N mailbox rows and the fake Telegram, then runs the
//! release binary (`report-relay run`) as a child process, the way users run it, and reads its
//! `/proc/<pid>` files:
//!
//! - time from the spawn to every mailbox idling (`/readyz` lists each one as `idle`);
//! - VmRSS (anonymous and file-backed), VmHWM and Threads at the start of the idle window and
//!   at its end (the window includes the relay's periodic SeaTable reloads), and the most
//!   threads seen while starting;
//! - idle CPU: utime + stime over the idle window, as a share of one core;
//! - reconnects: Dovecot's logins beyond one per mailbox, and the relay's warnings.
//!
//! Every figure is printed next to its limit, where it has one. Mailboxes are reached as
//! `localhost`, so the relay resolves a host name as it does in production (plain IMAP: the
//! binary trusts only the public web PKI roots).
//!
//! ```sh
//! cargo bench --bench idle_mailboxes            # N = 1000, a 60 s idle window
//! cargo bench --bench idle_mailboxes -- 200     # N = 200
//! IDLE_WINDOW_SECS=300 cargo bench --bench idle_mailboxes
//! ```
//!
//! Needs Dovecot (`scripts/test-deps.sh`) and a file-descriptor limit above N for both
//! processes.

#[path = "../tests/support/dovecot.rs"]
mod dovecot;
#[path = "../tests/support/seatable.rs"]
mod seatable;
#[path = "../tests/support/telegram.rs"]
mod telegram;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use dovecot::{Dovecot, DovecotOptions};
use seatable::FakeSeaTable;
use serde_json::{Value, json};
use telegram::FakeTelegram;
use tokio::time::Instant;

/// Mailboxes when no count is given on the command line.
const DEFAULT_MAILBOXES: u32 = 1000;
/// The idle window when `IDLE_WINDOW_SECS` is not set, in seconds.
const DEFAULT_IDLE_WINDOW_SECS: u64 = 60;
/// Limits from the issue "Flood-safe delivery", item 4.
const LIMIT_RSS_KB: u64 = 50 * 1024;
const LIMIT_HWM_KB: u64 = 50 * 1024;
const LIMIT_THREADS: u64 = 32;
const LIMIT_ALL_IDLE: Duration = Duration::from_secs(10);
/// How long the benchmark waits for every mailbox to idle before giving up.
const GIVE_UP_AFTER: Duration = Duration::from_secs(180);
const SEATABLE_TOKEN: &str = "st-api-token-0123456789";
const PASSWORD: &str = "mailbox-secret";

/// The fields of `/proc/<pid>/status` this benchmark reports.
#[derive(Debug, Clone, Copy)]
struct ProcStatus {
    /// Resident set size, in KiB.
    rss_kb: u64,
    /// Its anonymous part (heap, stacks), in KiB.
    rss_anon_kb: u64,
    /// Its file-backed part (mostly the binary's code), in KiB.
    rss_file_kb: u64,
    /// Peak resident set size, in KiB.
    hwm_kb: u64,
    /// Threads of the process.
    threads: u64,
}

fn proc_status(pid: u32) -> ProcStatus {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/pid/status");
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    ProcStatus {
        rss_kb: field("VmRSS:"),
        rss_anon_kb: field("RssAnon:"),
        rss_file_kb: field("RssFile:"),
        hwm_kb: field("VmHWM:"),
        threads: field("Threads:"),
    }
}

/// utime + stime of the process, in clock ticks (`/proc/<pid>/stat` fields 14 and 15).
fn cpu_ticks(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/pid/stat");
    // The command name (field 2) may contain spaces: count from the closing parenthesis.
    let rest = &text[text.rfind(')').expect("a stat line") + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state), so field n is fields[n - 3].
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux).
fn clock_ticks_per_second() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(100)
}

fn free_port() -> u16 {
    dovecot::free_port().unwrap()
}

fn address(i: u32) -> String {
    format!("mailbox-{i:05}@test.local")
}

fn write_config(
    dir: &Path,
    dovecot: &Dovecot,
    seatable: &FakeSeaTable,
    telegram: &FakeTelegram,
    http_port: u16,
) -> std::path::PathBuf {
    let path = dir.join("config.yaml");
    // Everything else at its default, as in production (idle_renew_secs 540, TLS aside).
    let text = format!(
        r#"
telegram:
  bot_token: "{token}"
  api_url: "{api_url}"
seatable:
  server_url: "{seatable}"
  api_token: "{SEATABLE_TOKEN}"
imap:
  host: localhost
  port: {imap_port}
  tls: none
state:
  path: "{state}"
http:
  listen: "127.0.0.1:{http_port}"
"#,
        token = telegram::TOKEN,
        api_url = telegram.api_url(),
        seatable = seatable.server_url(),
        imap_port = dovecot.port(),
        state = dir.join("state.db").display(),
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// Each mailbox's `state` from `/readyz`, or `None` while nothing answers.
async fn states(client: &reqwest::Client, http_port: u16) -> Option<Vec<String>> {
    let body: Value = client
        .get(format!("http://127.0.0.1:{http_port}/readyz"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    Some(
        body["mailboxes"]
            .as_array()?
            .iter()
            .map(|m| m["state"].as_str().unwrap_or_default().to_owned())
            .collect(),
    )
}

fn count_idle(states: &[String]) -> usize {
    states.iter().filter(|s| *s == "idle").count()
}

/// Dovecot's successful logins of the benchmark's mailboxes so far.
fn dovecot_logins(dovecot: &Dovecot) -> usize {
    dovecot
        .read_log()
        .lines()
        .filter(|line| line.contains("Login: user=<mailbox-"))
        .count()
}

/// The relay's WARN and ERROR lines so far.
fn relay_warnings(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|line| line.contains(" WARN ") || line.contains(" ERROR "))
        .map(str::to_owned)
        .collect()
}

fn mib(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

fn verdict(ok: bool) -> &'static str {
    if ok { "ok" } else { "OVER" }
}

fn stop(child: &mut Child) {
    let _ = Command::new("/bin/sh")
        .arg("-c")
        .arg("kill -TERM \"$1\"")
        .arg("sh")
        .arg(child.id().to_string())
        .status();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("the relay did not stop within 30 s of SIGTERM; killing it");
    let _ = child.kill();
    let _ = child.wait();
}

fn main() {
    let mailboxes: u32 = std::env::args()
        .skip(1)
        .find(|arg| !arg.starts_with('-'))
        .map(|arg| arg.parse().expect("the mailbox count is a number"))
        .unwrap_or(DEFAULT_MAILBOXES);
    let window = Duration::from_secs(
        std::env::var("IDLE_WINDOW_SECS")
            .ok()
            .map(|v| v.parse().expect("IDLE_WINDOW_SECS is a number of seconds"))
            .unwrap_or(DEFAULT_IDLE_WINDOW_SECS),
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(mailboxes, window));
}

async fn run(mailboxes: u32, window: Duration) {
    let n = mailboxes as usize;
    let dovecot = Dovecot::start_with(DovecotOptions {
        scale_clients: Some(mailboxes),
        ..DovecotOptions::default()
    })
    .await
    .expect("Dovecot starts");
    for i in 0..mailboxes {
        dovecot.add_user(&address(i), PASSWORD).unwrap();
    }
    let seatable = FakeSeaTable::start_with_default_schema(SEATABLE_TOKEN).await;
    seatable.set_rate_limit_per_minute(None);
    seatable.add_rows(
        "mailboxes",
        (0..mailboxes).map(|i| {
            json!({"Name": format!("mailbox {i}"), "email": address(i), "imap_password": PASSWORD})
        }),
    );
    let telegram = FakeTelegram::start(telegram::TOKEN).await;
    let dir = tempfile::tempdir().unwrap();
    let http_port = free_port();
    let config = write_config(dir.path(), &dovecot, &seatable, &telegram, http_port);
    let log = dir.path().join("relay.log");

    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_report-relay"))
        .args(["run", "--config"])
        .arg(&config)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let pid = child.id();

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut peak_threads = 0;
    let mut last_idle = 0;
    let all_idle = loop {
        peak_threads = peak_threads.max(proc_status(pid).threads);
        if let Some(states) = states(&http, http_port).await {
            last_idle = count_idle(&states);
            if states.len() == n && last_idle == n {
                break started.elapsed();
            }
        }
        if started.elapsed() > GIVE_UP_AFTER || matches!(child.try_wait(), Ok(Some(_))) {
            stop(&mut child);
            panic!(
                "only {last_idle} of {n} mailboxes idled within {GIVE_UP_AFTER:?}; relay log tail:\n{}",
                relay_warnings(&log)
                    .iter()
                    .rev()
                    .take(20)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let at_idle = proc_status(pid);
    peak_threads = peak_threads.max(at_idle.threads);
    let logins_at_idle = dovecot_logins(&dovecot);

    // The idle window: nothing polls the relay, so the CPU is its own.
    let ticks_before = cpu_ticks(pid);
    let window_started = std::time::Instant::now();
    tokio::time::sleep(window).await;
    let ticks = cpu_ticks(pid) - ticks_before;
    let elapsed = window_started.elapsed();
    let at_end = proc_status(pid);
    let idle_cpu = ticks as f64 / clock_ticks_per_second() as f64 / elapsed.as_secs_f64() * 100.0;
    let still_idle = states(&http, http_port)
        .await
        .map(|s| count_idle(&s))
        .unwrap_or(0);
    let logins = dovecot_logins(&dovecot);
    let warnings = relay_warnings(&log);
    stop(&mut child);

    println!(
        "idle mailboxes: N = {n}, release binary (pid {pid}), Dovecot on localhost, idle window {:.0} s",
        elapsed.as_secs_f64()
    );
    println!(
        "  {:<30}{:>12}{:>16}{:>10}",
        "", "at idle", "end of window", "limit"
    );
    // `ok` is None for figures without a limit.
    let row = |name: &str, at_idle: String, at_end: String, limit: String, ok: Option<bool>| {
        println!(
            "  {name:<30}{at_idle:>12}{at_end:>16}{limit:>10}  {}",
            ok.map_or("", verdict)
        );
    };
    let mib_text = |kb: u64| format!("{:.1} MiB", mib(kb));
    row(
        "time to all idle",
        format!("{:.2} s", all_idle.as_secs_f64()),
        String::new(),
        format!("{:.0} s", LIMIT_ALL_IDLE.as_secs_f64()),
        Some(all_idle <= LIMIT_ALL_IDLE),
    );
    row(
        "VmRSS",
        mib_text(at_idle.rss_kb),
        mib_text(at_end.rss_kb),
        mib_text(LIMIT_RSS_KB),
        Some(at_idle.rss_kb.max(at_end.rss_kb) <= LIMIT_RSS_KB),
    );
    row(
        "  of which anonymous",
        mib_text(at_idle.rss_anon_kb),
        mib_text(at_end.rss_anon_kb),
        String::new(),
        None,
    );
    row(
        "  of which file-backed",
        mib_text(at_idle.rss_file_kb),
        mib_text(at_end.rss_file_kb),
        String::new(),
        None,
    );
    row(
        "VmHWM",
        mib_text(at_idle.hwm_kb),
        mib_text(at_end.hwm_kb),
        mib_text(LIMIT_HWM_KB),
        Some(at_idle.hwm_kb.max(at_end.hwm_kb) <= LIMIT_HWM_KB),
    );
    row(
        "threads",
        at_idle.threads.to_string(),
        at_end.threads.to_string(),
        LIMIT_THREADS.to_string(),
        Some(at_idle.threads.max(at_end.threads) <= LIMIT_THREADS),
    );
    row(
        "threads, most while starting",
        peak_threads.to_string(),
        String::new(),
        LIMIT_THREADS.to_string(),
        Some(peak_threads <= LIMIT_THREADS),
    );
    row(
        "idle CPU, share of one core",
        String::new(),
        format!("{idle_cpu:.2} %"),
        String::new(),
        None,
    );
    row(
        "mailboxes idle",
        n.to_string(),
        still_idle.to_string(),
        n.to_string(),
        Some(still_idle == n),
    );
    row(
        "reconnects (logins beyond N)",
        logins_at_idle.saturating_sub(n).to_string(),
        logins.saturating_sub(n).to_string(),
        "0".to_owned(),
        Some(logins == n),
    );
    row(
        "relay warnings and errors",
        String::new(),
        warnings.len().to_string(),
        "0".to_owned(),
        Some(warnings.is_empty()),
    );
    for line in warnings.iter().take(10) {
        println!("    {line}");
    }
    println!("  (idle CPU: {ticks} clock ticks of utime + stime over the window)");
}
