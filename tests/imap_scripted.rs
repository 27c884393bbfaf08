//! `MailboxWatcher` against the scripted loopback IMAP server (`tests/support/imap_script.rs`),
//! for the edge cases a real Dovecot cannot be made to produce on demand
//! (`tests/imap_watcher.rs` covers the rest against Dovecot). The pure helpers are unit tests in
//! `src/imap/tests.rs`.

mod support;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use report_relay::imap::{FetchedMessage, MAX_FETCH_ATTEMPTS, MailboxSettings, WatcherState};
use support::imap_script::{Fake, PASSWORD, UID_VALIDITY, checkpoint, settings};
use support::watcher::{MemorySink, Running, SINK_ERROR};
use tokio::net::TcpListener;

/// The scripted server answers at once: a watcher that takes longer to stop is stuck.
const STOP: Duration = Duration::from_secs(3);

/// Starts the watcher; its `stop` fails unless it ends within [`STOP`].
fn watch(settings: MailboxSettings, sink: &Arc<MemorySink>) -> Running {
    Running::start(settings, sink).stopping_within(STOP)
}

#[test]
fn settings_debug_hides_the_password() {
    let debug = format!("{:?}", settings(1));
    assert!(!debug.contains(PASSWORD), "{debug}");
    assert!(debug.contains("REDACTED"), "{debug}");
}

#[tokio::test]
async fn exists_before_the_idle_continuation_is_not_missed() {
    let fake = Fake::start(|state| {
        state.append(b"Subject: old\r\n\r\nold");
        state
            .append_at_idle
            .push(b"Subject: racing\r\n\r\nnew".to_vec());
    })
    .await;
    let sink = MemorySink::new();
    // The keepalive timeout is a minute: only the drain after `init` can find this mail.
    let running = watch(settings(fake.addr.port()), &sink);
    sink.wait("the racing message", |state| state.acked.len() == 1)
        .await;
    assert_eq!(sink.acked_uids(), [2]);
    let message = sink.read(|state| state.acked[0].0.clone());
    assert_eq!(message.raw, b"Subject: racing\r\n\r\nnew");
    assert_eq!(message.uid_validity, UID_VALIDITY);
    assert_eq!(
        message.internal_date,
        Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_709_363_472))
    );
    assert_eq!(sink.read(|state| state.resets.clone()), [checkpoint(1)]);
    running.stop().await;
}

#[tokio::test]
async fn a_tagged_no_on_fetch_is_retried_not_skipped() {
    let fake = Fake::start(|state| {
        state.append(b"one");
        state.append(b"two");
        state.fail_fetches = 1;
    })
    .await;
    let sink = MemorySink::resuming(checkpoint(0));
    let running = watch(settings(fake.addr.port()), &sink);
    sink.wait("both messages", |state| state.acked.len() == 2)
        .await;
    assert_eq!(sink.acked_uids(), [1, 2]);
    assert_eq!(fake.with(|state| state.connections), 2);
    running.stop().await;
}

#[tokio::test]
async fn a_message_the_server_never_delivers_is_handed_over_as_failed() {
    let fake = Fake::start(|state| {
        state.append(b"one");
        state.append(b"two");
        state.fail_fetches = MAX_FETCH_ATTEMPTS;
    })
    .await;
    let sink = MemorySink::resuming(checkpoint(0));
    let running = watch(settings(fake.addr.port()), &sink);
    sink.wait("both messages", |state| state.acked.len() == 2)
        .await;
    let acked: Vec<FetchedMessage> =
        sink.read(|state| state.acked.iter().map(|(m, _)| m.clone()).collect());
    assert_eq!(acked[0].uid, 1);
    assert!(acked[0].raw.is_empty());
    assert!(
        acked[0]
            .fetch_error
            .as_deref()
            .is_some_and(|e| e.contains("5 attempts")),
        "{:?}",
        acked[0].fetch_error
    );
    // The mailbox moved on: the next message arrives normally.
    assert_eq!(acked[1].uid, 2);
    assert_eq!(acked[1].raw, b"two");
    assert_eq!(acked[1].fetch_error, None);
    running.stop().await;
}

#[tokio::test]
async fn fetch_timeouts_are_the_links_fault_and_never_fail_the_message() {
    let fake = Fake::start(|state| {
        state.append(b"one");
        // More timeouts than MAX_FETCH_ATTEMPTS: still not "the server will not deliver it".
        state.stall_fetches = MAX_FETCH_ATTEMPTS + 1;
    })
    .await;
    let sink = MemorySink::resuming(checkpoint(0));
    let mut quick = settings(fake.addr.port());
    quick.timeouts.fetch = Duration::from_millis(200);
    let running = watch(quick, &sink);
    sink.wait("the message", |state| state.acked.len() == 1)
        .await;
    let message = sink.read(|state| state.acked[0].0.clone());
    assert_eq!(message.raw, b"one");
    assert_eq!(message.fetch_error, None);
    assert!(fake.with(|state| state.connections) > MAX_FETCH_ATTEMPTS);
    assert!(
        fake.with(|state| state.commands.iter().any(|c| c.ends_with("(RFC822.SIZE)"))),
        "the size is asked for before the body"
    );
    running.stop().await;
}

#[test]
fn the_fetch_timeout_grows_with_the_message_size() {
    let base = Duration::from_secs(300);
    assert_eq!(report_relay::imap::fetch_timeout(base, None), base);
    assert_eq!(
        report_relay::imap::fetch_timeout(base, Some(48_000_000)),
        base + Duration::from_secs(1500)
    );
}

#[tokio::test]
async fn a_failing_sink_keeps_the_message_for_the_next_session() {
    let fake = Fake::start(|state| {
        state.append(b"one");
    })
    .await;
    let sink = MemorySink::resuming(checkpoint(0));
    sink.update(|state| state.fail_acks = 2);
    let mut running = watch(settings(fake.addr.port()), &sink);
    running
        .wait_state("a backoff after the sink failed", |status| {
            matches!(&status.state, WatcherState::Backoff { last_error } if last_error.contains(SINK_ERROR))
        })
        .await;
    sink.wait("the message", |state| state.acked.len() == 1)
        .await;
    assert_eq!(sink.acked_uids(), [1]);
    assert_eq!(sink.read(|state| state.failed.len()), 2);
    let metrics = running.metrics.render();
    // Fetched three times, acknowledged once.
    assert!(
        metrics.contains(
            r#"report_relay_reports_received_total{mailbox="reports@test.local",source="imap"} 3"#
        ),
        "{metrics}"
    );
    running.stop().await;
}

#[tokio::test]
async fn missing_uidnext_falls_back_to_status_then_to_the_highest_uid() {
    let fake = Fake::start(|state| {
        state.append(b"one");
        state.append(b"two");
        state.next_uid = 10;
        state.uidnext_in_select = false;
    })
    .await;
    let sink = MemorySink::new();
    let mut running = watch(settings(fake.addr.port()), &sink);
    running.wait_idle().await;
    assert_eq!(sink.read(|state| state.resets.clone()), [checkpoint(9)]);
    running.stop().await;

    let fake = Fake::start(|state| {
        state.append(b"one");
        state.append(b"two");
        state.next_uid = 10;
        state.uidnext_in_select = false;
        state.uidnext_in_status = false;
    })
    .await;
    let sink = MemorySink::new();
    let mut running = watch(settings(fake.addr.port()), &sink);
    running.wait_idle().await;
    assert_eq!(sink.read(|state| state.resets.clone()), [checkpoint(2)]);
    assert!(fake.commands().iter().any(|c| c == "UID SEARCH UID *"));
    running.stop().await;
}

#[tokio::test]
async fn servers_without_idle_are_polled() {
    let fake = Fake::start(|state| state.idle = false).await;
    let sink = MemorySink::new();
    let mut running = watch(settings(fake.addr.port()), &sink);
    running
        .wait_state("polling", |status| status.state == WatcherState::Polling)
        .await;
    fake.append(b"polled");
    sink.wait("the polled message", |state| state.acked.len() == 1)
        .await;
    assert!(!fake.commands().iter().any(|c| c == "IDLE"));
    running.stop().await;
    assert_eq!(fake.commands().last().map(String::as_str), Some("LOGOUT"));
}

#[tokio::test]
async fn cancellation_while_idle_sends_done_and_logout() {
    let fake = Fake::start(|_| {}).await;
    let sink = MemorySink::new();
    let mut running = watch(settings(fake.addr.port()), &sink);
    running.wait_idle().await;
    let metrics = Arc::clone(&running.metrics);
    assert!(
        metrics
            .render()
            .contains(r#"report_relay_watcher_state{mailbox="reports@test.local",state="idle"} 1"#)
    );
    running.stop().await;
    let commands = fake.commands();
    assert_eq!(commands[commands.len() - 2..], ["DONE", "LOGOUT"]);
    let rendered = metrics.render();
    assert!(
        rendered
            .contains(r#"report_relay_watcher_state{mailbox="reports@test.local",state="idle"} 0"#),
        "{rendered}"
    );
}

#[tokio::test]
async fn a_dead_link_in_idle_is_detected_by_the_keepalive_and_done_timeouts() {
    let fake = Fake::start(|state| state.ignore_done = true).await;
    let sink = MemorySink::new();
    let mut settings = settings(fake.addr.port());
    settings.timeouts.idle_keepalive = Duration::from_millis(200);
    let mut running = watch(settings, &sink);
    running
        .wait_state("a DONE timeout", |status| {
            matches!(&status.state, WatcherState::Backoff { last_error } if last_error == "DONE timed out after 0.3 s")
        })
        .await;
    running.wait_idle().await;
    assert!(fake.with(|state| state.connections) >= 2);
    running.stop().await;
}

#[tokio::test]
async fn a_silent_server_times_out_at_the_greeting() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let _hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let sink = MemorySink::new();
    let mut settings = settings(port);
    settings.timeouts.connect = Duration::from_millis(100);
    let mut running = watch(settings, &sink);
    running
        .wait_state("a greeting timeout", |status| {
            matches!(&status.state, WatcherState::Backoff { last_error } if last_error == "greeting timed out after 0.1 s")
        })
        .await;
    running.stop().await;
}

#[tokio::test]
async fn a_wrong_password_is_an_authentication_failure() {
    let fake = Fake::start(|state| state.password = "other".into()).await;
    let sink = MemorySink::new();
    let mut running = watch(settings(fake.addr.port()), &sink);
    running
        .wait_state("an auth failure", |status| {
            matches!(&status.state, WatcherState::Backoff { last_error } if last_error.starts_with("authentication failed (LOGIN): the server rejected the credentials"))
        })
        .await;
    running.stop().await;
    assert!(sink.read(|state| state.resets.is_empty()));
}
