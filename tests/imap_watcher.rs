//! `MailboxWatcher` against a real Dovecot (`tests/support/dovecot.rs`), one server per test.
//!
//! Needs Dovecot: `scripts/test-deps.sh`. Each test waits on conditions (the sink, the watch
//! channel, the captured log) with a deadline instead of sleeping. The append → acknowledge
//! latency is printed by `append_while_idle_is_relayed_promptly`:
//! `cargo test --test imap_watcher -- --nocapture promptly`.

mod support;

use std::io::Write as _;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use report_relay::config::TlsMode;
use report_relay::imap::{Checkpoint, Credentials, MailboxSettings, WatcherState};
use secrecy::SecretString;
use support::dovecot::{Dovecot, DovecotOptions, PASS, USER, message};
use support::watcher::{self, MemorySink, Running, SINK_ERROR, eventually};
use tokio_rustls::rustls::RootCertStore;
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_rustls::rustls::pki_types::pem::PemObject;

async fn dovecot() -> Dovecot {
    dovecot_with(DovecotOptions::default()).await
}

async fn dovecot_with(mut options: DovecotOptions) -> Dovecot {
    // A wrong password is answered at once instead of after Dovecot's default 2 s.
    options.extra_config.push_str("auth_failure_delay = 0\n");
    let server = Dovecot::start_with(options).await.expect("Dovecot starts");
    server.add_user(USER, PASS).unwrap();
    server
}

/// [`watcher::settings`] for the Dovecot `server`.
fn settings(server: &Dovecot) -> MailboxSettings {
    watcher::settings(server.host(), server.port())
}

async fn append(server: &Dovecot, subject: &str) -> u32 {
    server
        .append(USER, "INBOX", &message(subject))
        .await
        .expect("APPEND")
}

// ---- tests ---------------------------------------------------------------------------------------

#[tokio::test]
async fn first_start_sets_the_checkpoint_without_replaying_old_mail() {
    let server = dovecot().await;
    for n in 0..3 {
        append(&server, &format!("old {n}")).await;
    }
    let status = server.mailbox_status(USER, "INBOX").await.unwrap();
    let sink = MemorySink::new();
    let mut running = Running::start(settings(&server), &sink);
    running.wait_idle().await;
    assert_eq!(
        sink.read(|state| state.resets.clone()),
        [Checkpoint {
            uid_validity: status.uid_validity,
            last_uid: status.uid_next - 1
        }]
    );
    assert!(sink.acked_uids().is_empty());
    assert!(running.status.borrow().last_catch_up.is_some());

    let uid = append(&server, "new").await;
    sink.wait_acked(1).await;
    assert_eq!(sink.acked_uids(), [uid]);
    let (fetched, _) = sink.read(|state| state.acked[0].clone());
    assert_eq!(fetched.raw, message("new"));
    assert!(fetched.internal_date.is_some());
    // BODY.PEEK[]: the relay never marks mail as read.
    assert!(
        !server
            .flags(USER, "INBOX", uid)
            .await
            .unwrap()
            .iter()
            .any(|flag| flag == "\\Seen")
    );
    let metrics = running.metrics.render();
    assert!(
        metrics.contains(&format!(
            "report_relay_reports_received_total{{mailbox=\"{USER}\",source=\"imap\"}} 1"
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "report_relay_watcher_state{{mailbox=\"{USER}\",state=\"idle\"}} 1"
        )),
        "{metrics}"
    );
    running.stop().await;
}

#[tokio::test]
async fn a_seeded_last_uid_is_honoured() {
    let server = dovecot().await;
    let mut uids = Vec::new();
    for n in 0..4 {
        uids.push(append(&server, &format!("mail {n}")).await);
    }
    let sink = MemorySink::new();
    let mut settings = settings(&server);
    settings.seed_last_uid = Some(uids[1]);
    let mut running = Running::start(settings, &sink);
    sink.wait_acked(2).await;
    running.wait_idle().await;
    assert_eq!(sink.acked_uids(), uids[2..]);
    assert_eq!(sink.read(|state| state.resets[0].last_uid), uids[1]);
    running.stop().await;
}

#[tokio::test]
async fn append_while_idle_is_relayed_promptly() {
    let server = dovecot().await;
    let sink = MemorySink::new();
    let mut running = Running::start(settings(&server), &sink);
    running.wait_idle().await;
    let mut latencies = Vec::new();
    for n in 0..5 {
        running.wait_idle().await;
        let appended = Instant::now();
        append(&server, &format!("prompt {n}")).await;
        sink.wait_acked(n + 1).await;
        let acked = sink.read(|state| state.acked[n].1);
        latencies.push(acked - appended);
    }
    latencies.sort();
    eprintln!(
        "append -> acknowledge latency over {} appends: min {:?}, median {:?}, max {:?}",
        latencies.len(),
        latencies[0],
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1]
    );
    // Dovecot batches change notifications (~0.5 s); anything near the keepalive timeout
    // (60 s here) would mean the EXISTS was missed.
    assert!(
        latencies
            .iter()
            .all(|latency| *latency < Duration::from_secs(3))
    );
    running.stop().await;
}

#[tokio::test]
async fn a_burst_of_appends_arrives_complete_and_in_uid_order() {
    let server = dovecot().await;
    let sink = MemorySink::new();
    let mut running = Running::start(settings(&server), &sink);
    running.wait_idle().await;
    let mut uids = Vec::new();
    for n in 0..12 {
        uids.push(
            server
                .save(USER, "INBOX", &message(&format!("burst {n}")))
                .await
                .unwrap(),
        );
    }
    sink.wait_acked(uids.len()).await;
    assert_eq!(sink.acked_uids(), uids);
    let subjects: Vec<bool> = sink.read(|state| {
        state
            .acked
            .iter()
            .enumerate()
            .map(|(n, (m, _))| m.raw == message(&format!("burst {n}")))
            .collect()
    });
    assert!(subjects.iter().all(|same| *same));
    running.stop().await;
}

#[tokio::test]
async fn mail_appended_while_stopped_is_caught_up_on_start() {
    let server = dovecot().await;
    let sink = MemorySink::new();
    let mut running = Running::start(settings(&server), &sink);
    running.wait_idle().await;
    running.stop().await;

    let mut uids = Vec::new();
    for n in 0..3 {
        uids.push(append(&server, &format!("while stopped {n}")).await);
    }
    let mut running = Running::start(settings(&server), &sink);
    sink.wait_acked(3).await;
    running.wait_idle().await;
    assert_eq!(sink.acked_uids(), uids);
    // The second start resumed; only the first start set a checkpoint.
    assert_eq!(sink.read(|state| state.resets.len()), 1);
    running.stop().await;
}

#[tokio::test]
async fn kick_and_restart_reconnect_and_later_mail_still_arrives() {
    let server = dovecot().await;
    let sink = MemorySink::new();
    let mut running = Running::start(settings(&server), &sink);
    running.wait_idle().await;

    assert!(server.kick(USER).await.unwrap(), "a session to kick");
    running
        .wait_log("the BYE of the kick", r#"reason="bye""#)
        .await;
    let first = append(&server, "after kick").await;
    sink.wait_acked(1).await;

    server.restart().await.unwrap();
    let second = append(&server, "after restart").await;
    sink.wait_acked(2).await;
    assert_eq!(sink.acked_uids(), [first, second]);

    let log = running.log.text();
    assert!(
        log.contains("The server ended the session with BYE; reconnecting."),
        "{log}"
    );
    assert!(log.contains("Server shutting down."), "{log}");
    running.wait_idle().await;
    running.stop().await;
}

#[tokio::test]
async fn a_uidvalidity_change_is_an_error_and_history_is_not_replayed() {
    let server = dovecot().await;
    let sink = MemorySink::new();
    let mut running = Running::start(settings(&server), &sink);
    running.wait_idle().await;
    let first = append(&server, "before").await;
    sink.wait_acked(1).await;

    // Same messages, same UIDs, new UIDVALIDITY: a naive client would replay all of them.
    append(&server, "history").await;
    let uid_validity = server.reset_uidvalidity(USER, "INBOX").await.unwrap();
    server.kick(USER).await.unwrap();
    running
        .wait_log("the UIDVALIDITY error", "UIDVALIDITY changed")
        .await;
    running.wait_idle().await;
    let status = server.mailbox_status(USER, "INBOX").await.unwrap();
    assert_eq!(
        sink.read(|state| state.checkpoint),
        Some(Checkpoint {
            uid_validity,
            last_uid: status.uid_next - 1
        })
    );
    assert_eq!(sink.acked_uids(), [first]);
    let log = running.log.text();
    let line = log
        .lines()
        .find(|line| line.contains("UIDVALIDITY changed"))
        .unwrap();
    assert!(line.contains("ERROR"), "{line}");

    let after = append(&server, "after").await;
    sink.wait_acked(2).await;
    assert_eq!(sink.acked_uids(), [first, after]);
    assert_eq!(
        sink.read(|state| state.acked[1].0.uid_validity),
        uid_validity
    );
    running.stop().await;
}

#[tokio::test]
async fn a_recreated_non_ascii_folder_starts_over_without_replay() {
    let server = dovecot().await;
    let folder = "Отчёты & Продажи";
    server.create_folder(USER, folder).await.unwrap();
    let sink = MemorySink::new();
    let mut settings = settings(&server);
    settings.folder = folder.into();
    let mut running = Running::start(settings, &sink);
    running.wait_idle().await;
    let first = server.save(USER, folder, &message("first")).await.unwrap();
    sink.wait_acked(1).await;

    let uid_validity = server.recreate_folder(USER, folder).await.unwrap();
    server.save(USER, folder, &message("old")).await.unwrap();
    // Deleting a selected folder may or may not end the session; make sure it reconnects.
    server.kick(USER).await.unwrap();
    running
        .wait_log("the UIDVALIDITY error", "UIDVALIDITY changed")
        .await;
    let new = server.save(USER, folder, &message("new")).await.unwrap();
    sink.wait_acked(2).await;
    assert_eq!(sink.acked_uids(), [first, new]);
    assert_eq!(
        sink.read(|state| state.acked[1].0.uid_validity),
        uid_validity
    );
    running.stop().await;
}

#[tokio::test]
async fn a_failing_acknowledge_does_not_lose_the_message() {
    let server = dovecot().await;
    let sink = MemorySink::new();
    let mut running = Running::start(settings(&server), &sink);
    running.wait_idle().await;
    sink.update(|state| state.fail_acks = 2);
    let first = append(&server, "refused twice").await;
    let second = append(&server, "behind it").await;
    sink.wait_acked(2).await;
    assert_eq!(sink.read(|state| state.failed.clone()), [first, first]);
    assert_eq!(sink.acked_uids(), [first, second]);
    let log = running.log.text();
    assert!(log.contains(r#"reason="sink""#), "{log}");
    assert!(log.contains(SINK_ERROR), "{log}");
    running.wait_idle().await;
    running.stop().await;
}

#[tokio::test]
async fn cancellation_stops_promptly_and_logs_out() {
    let server = dovecot().await;
    let sink = MemorySink::new();
    let mut running = Running::start(settings(&server), &sink);
    running.wait_idle().await;
    let metrics = Arc::clone(&running.metrics);
    let took = running.stop().await;
    assert!(took < Duration::from_secs(1), "stopping took {took:?}");
    // Dovecot logs "Logged out" for LOGOUT and "Disconnected" for a dropped connection.
    eventually("Dovecot logging the LOGOUT", || {
        server.read_log().contains("Logged out")
    })
    .await;
    assert!(!server.kick(USER).await.unwrap(), "no session left open");
    let rendered = metrics.render();
    assert!(
        rendered.contains(&format!(
            "report_relay_watcher_state{{mailbox=\"{USER}\",state=\"idle\"}} 0"
        )),
        "{rendered}"
    );
}

#[tokio::test]
async fn cancellation_during_backoff_is_prompt() {
    let server = dovecot().await;
    let sink = MemorySink::new();
    let mut settings = settings(&server);
    settings.timeouts.reconnect_min_delay = Duration::from_secs(60);
    settings.timeouts.reconnect_max_delay = Duration::from_secs(60);
    server.stop().await.unwrap();
    let mut running = Running::start(settings, &sink);
    running
        .wait_state("backoff", |status| {
            matches!(status.state, WatcherState::Backoff { .. })
        })
        .await;
    let took = running.stop().await;
    assert!(took < Duration::from_secs(1), "stopping took {took:?}");
}

#[tokio::test]
async fn a_wrong_password_backs_off_with_an_authentication_error() {
    let server = dovecot().await;
    let sink = MemorySink::new();
    let mut settings = settings(&server);
    settings.credentials = Credentials::Password(SecretString::from("wrong password"));
    let mut running = Running::start(settings, &sink);
    running
        .wait_state("an authentication failure", |status| {
            matches!(&status.state, WatcherState::Backoff { last_error }
                if last_error.starts_with("authentication failed (LOGIN): the server rejected the credentials"))
        })
        .await;
    // It keeps trying (Dovecot's auth penalty delays the second answer by seconds, so the
    // test only awaits the next attempt).
    running
        .wait_state("the next attempt", |status| {
            status.state == WatcherState::Connecting
        })
        .await;
    let log = running.log.text();
    let auth_line = log
        .lines()
        .find(|line| line.contains(r#"reason="auth""#))
        .unwrap();
    assert!(auth_line.contains("ERROR"), "{auth_line}");
    assert!(
        auth_line
            .contains("Authentication failed; check the mailbox login and its password or OAuth2"),
        "{auth_line}"
    );
    assert!(
        !log.contains("wrong password"),
        "the password leaked: {log}"
    );
    assert!(sink.read(|state| state.resets.is_empty()));
    running.stop().await;
}

#[tokio::test]
async fn the_password_never_reaches_the_log() {
    let server = dovecot().await;
    let sink = MemorySink::new();
    let mut running = Running::start(settings(&server), &sink);
    running.wait_idle().await;
    append(&server, "one").await;
    sink.wait_acked(1).await;
    server.kick(USER).await.unwrap();
    running.wait_log("the reconnect", r#"reason="bye""#).await;
    running.wait_idle().await;
    let log = running.log.text();
    running.stop().await;
    assert!(log.contains("Message received and acknowledged."), "{log}");
    assert!(!log.contains("s3cret"), "the password leaked: {log}");
}

#[tokio::test]
async fn short_idle_rounds_and_keepalive_timeouts_lose_no_mail() {
    // Dovecot says `* OK Still here` every second.
    let server = dovecot_with(DovecotOptions {
        idle_notify_interval: Some(Duration::from_secs(1)),
        ..DovecotOptions::default()
    })
    .await;
    let sink = MemorySink::new();
    let mut uids = Vec::new();
    // Keepalives keep the inactivity timer from firing: only the hard cap ends the rounds.
    // Then an inactivity timeout shorter than the keepalive interval ends them instead.
    for (renew_secs, quiet, expected) in [
        (1, Duration::from_secs(5), "Renewing IDLE."),
        (
            60,
            Duration::from_millis(400),
            "No data from the server while idling; checking the connection.",
        ),
    ] {
        let mut settings = settings(&server);
        settings.idle_renew_secs = renew_secs;
        settings.timeouts.idle_keepalive = quiet;
        let mut running = Running::start(settings, &sink);
        running.wait_idle().await;
        running.wait_log(expected, expected).await;
        eventually("three rounds", || {
            running.log.text().matches(expected).count() >= 3
        })
        .await;
        uids.push(append(&server, &format!("round {renew_secs}")).await);
        sink.wait_acked(uids.len()).await;
        running.stop().await;
    }
    assert_eq!(sink.acked_uids(), uids);
}

// ---- TLS -----------------------------------------------------------------------------------------

/// A throw-away CA and a server certificate for 127.0.0.1 (openssl ships with dovecot-core).
fn make_certificates(dir: &Path) -> RootCertStore {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl runs");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=Test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    let mut ext = std::fs::File::create(dir.join("server.ext")).unwrap();
    writeln!(
        ext,
        "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth"
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "server.ext",
        "-out",
        "server.pem",
    ]);
    // Dovecot's unprivileged processes read the key.
    for file in ["server.pem", "server.key"] {
        std::fs::set_permissions(
            dir.join(file),
            std::os::unix::fs::PermissionsExt::from_mode(0o644),
        )
        .unwrap();
    }
    let mut roots = RootCertStore::empty();
    let ca = CertificateDer::from_pem_file(dir.join("ca.pem")).unwrap();
    roots.add(ca).unwrap();
    roots
}

#[tokio::test]
async fn starttls_and_implicit_tls_with_a_private_ca() {
    let certs = tempfile::Builder::new()
        .prefix("rr-tls-")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(
        certs.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let roots = make_certificates(certs.path());
    let imaps_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = certs.path().display();
    let server = dovecot_with(DovecotOptions {
        extra_config: format!(
            "ssl = yes\nssl_cert = <{dir}/server.pem\nssl_key = <{dir}/server.key\n\
             service imap-login {{\n  inet_listener imaps {{\n    address = 127.0.0.1\n    \
             port = {imaps_port}\n    ssl = yes\n  }}\n}}\n"
        ),
        ..DovecotOptions::default()
    })
    .await;

    for (tls, port) in [
        (TlsMode::StartTls, server.port()),
        (TlsMode::Implicit, imaps_port),
    ] {
        let sink = MemorySink::new();
        let mut settings = settings(&server);
        settings.tls = tls;
        settings.port = port;
        let roots = roots.clone();
        let mut running =
            Running::start_with(settings, &sink, |watcher| watcher.with_tls_roots(roots));
        running.wait_idle().await;
        let uid = append(&server, &format!("over {tls}")).await;
        sink.wait_acked(1).await;
        assert_eq!(sink.acked_uids(), [uid]);
        running.stop().await;
    }

    // The public roots do not trust the private CA: a clear TLS failure, then backoff.
    let sink = MemorySink::new();
    let mut settings = settings(&server);
    settings.tls = TlsMode::Implicit;
    settings.port = imaps_port;
    let mut running = Running::start(settings, &sink);
    running
        .wait_state("a TLS failure", |status| {
            matches!(&status.state, WatcherState::Backoff { last_error }
                if last_error.starts_with("TLS handshake failed"))
        })
        .await;
    running.stop().await;
}
