//! Flood-safe delivery, end to end: a real Dovecot, the fake SeaTable and the fake Telegram in
//! strict-limits mode (Telegram's limits over every sliding window, `RateLimits`), and the relay.
//!
//! - A fan-out to 123 recipients gets no 429 and takes no longer than the windows require.
//! - A `kill -9` in the middle of a fan-out repeats at most the sends that were in flight: at
//!   30 per second and 150 ms from delivery to answer, 5.
//! - A report during a SeaTable outage goes out from the last snapshot, without waiting for
//!   SeaTable's retries.

mod support;

use support::{seatable, stack, telegram};

use std::time::Duration;

use stack::{Stack, Tuning, fixture};
use telegram::{Call, RateLimits, RateScope};
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(90);

fn ok_sends(calls: &[Call]) -> impl Iterator<Item = &Call> {
    calls.iter().filter(|c| c.is_send() && c.is_ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_to_123_recipients_gets_no_429() {
    let stack = Stack::new().await;
    let limits = RateLimits::telegram();
    stack.telegram.set_rate_limits(Some(limits.clone()));
    let chats = stack.add_fan_out(120, 3);
    let relay = stack.start(&Tuning::default());
    stack.wait_ready(1).await;

    stack.deliver(&fixture("03_dashboard_pdf_report.eml")).await;
    stack.wait_for_sends(&chats, 1, WAIT).await;
    relay.stop().await;

    let span = stack.telegram.ok_send_span(&chats);
    let minimum = limits.min_span(chats.len() as u32);
    let violations = stack.telegram.rate_violations();
    let repeated: Vec<i64> = chats
        .iter()
        .copied()
        .filter(|chat| stack.ok_sends_to(*chat).len() != 1)
        .collect();
    let figures = format!(
        "{} chats: first-to-last {:.3} s, minimum the windows allow {:.3} s, ratio {:.3}, 429s {} \
         (chat {}, group {}, global {})",
        chats.len(),
        span.as_secs_f64(),
        minimum.as_secs_f64(),
        span.as_secs_f64() / minimum.as_secs_f64(),
        violations.len(),
        violations
            .iter()
            .filter(|v| v.scope == RateScope::Chat)
            .count(),
        violations
            .iter()
            .filter(|v| v.scope == RateScope::Group)
            .count(),
        violations
            .iter()
            .filter(|v| v.scope == RateScope::Global)
            .count(),
    );
    eprintln!("fan-out to {figures}");
    assert!(
        repeated.is_empty(),
        "not exactly once: {repeated:?}; {figures}"
    );
    assert!(violations.is_empty(), "{figures}");
    // Behaviour, not speed: the pacer spaces sends at the limits, it does not wait rounds out.
    // A loaded 2-core CI machine stretches the span a little; the figure itself (1.037 of the
    // minimum, bound 1.05) is `cargo bench --bench relay`'s to report.
    assert!(span <= minimum.mul_f64(1.25), "{figures}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_fan_out_repeats_at_most_what_was_in_flight() {
    const ANSWER_DELAY: Duration = Duration::from_millis(150);
    let stack = Stack::new().await;
    let chats = stack.add_subscribers(80, 600_000_000);
    // Every send is delivered at once and answered 150 ms later: a kill in between leaves it
    // delivered but not known to be.
    stack.telegram.set_answer_delay(ANSWER_DELAY);
    let tuning = Tuning {
        concurrency: 16,
        ..Tuning::default()
    };
    let mut child = stack.spawn_binary(&tuning);
    stack.wait_ready(1).await;
    // A TEXT report (sendMessage, no file), so that what goes out is the pacer's doing alone:
    // with a file, the first sends queue behind its single upload.
    stack.deliver(&fixture("05_chart_text_table.eml")).await;
    stack
        .telegram
        .wait_for(|calls| ok_sends(calls).count() >= 25, WAIT)
        .await
        .unwrap();
    // SIGKILL: no chance to clean up.
    child.kill().unwrap();
    let killed = Instant::now();
    child.wait().unwrap();
    let calls = stack.telegram.calls();
    let before = ok_sends(&calls).count();
    // Delivered, but their answers were still on the way.
    let unanswered = ok_sends(&calls)
        .filter(|c| c.received_at + ANSWER_DELAY > killed)
        .count();
    assert!(
        before < chats.len(),
        "the kill came too late to test anything"
    );

    let mut child = stack.spawn_binary(&tuning);
    stack.wait_for_sends(&chats, 1, WAIT).await;
    // Repeats still in flight after the last chat got its first copy.
    tokio::time::sleep(Duration::from_secs(2)).await;
    child.kill().unwrap();
    child.wait().unwrap();
    let duplicates = stack.repeated(&chats);
    eprintln!(
        "kill -9 after {before} delivered sends ({unanswered} of them unanswered): {} repeated after the restart",
        duplicates.len()
    );
    for chat in &chats {
        assert!(stack.ok_sends_to(*chat).len() <= 2, "chat {chat}");
    }
    // 30 sends per second, each answered 150 ms after delivery: 4.5 in flight, so 5 at most
    // with the pacer's spacing (one more allowed for a loaded machine bunching two sends; a
    // burst of `delivery.concurrency` puts 16 in flight).
    assert!(
        unanswered <= 6,
        "{unanswered} sends were delivered but unanswered at the kill"
    );
    // Only what Telegram processed without the answer arriving may repeat (the Bot API has no
    // idempotency key): that is the floor, and the relay adds nothing to it.
    assert!(
        duplicates.len() <= unanswered.max(5),
        "{} repeated sends (the kill found {unanswered} delivered but unanswered): {duplicates:?}",
        duplicates.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_during_a_seatable_outage_is_delivered_from_the_last_snapshot() {
    const RECIPIENTS: [i64; 3] = [111_222_333, 222_333_444, 333_444_555];
    let stack = Stack::new().await;
    let mailbox = stack.mailbox_row.clone();
    for (k, chat) in RECIPIENTS.iter().enumerate() {
        stack.add_user(&format!("User {k}"), Some(*chat), &[&mailbox]);
    }
    let tuning = Tuning {
        cache_ttl_secs: 1,
        ..Tuning::default()
    };
    let relay = stack.start(&tuning);
    stack.wait_ready(1).await;

    // nginx's maintenance page for everything, the token exchange included; then let the
    // cached snapshot expire.
    stack
        .seatable
        .go_down(seatable::Outage::ServiceUnavailable)
        .await;
    tokio::time::sleep(Duration::from_millis(tuning.cache_ttl_secs * 1000 + 500)).await;

    let appended = Instant::now();
    stack.deliver(&fixture("01_chart_png_report.eml")).await;
    let calls = stack.wait_for_sends(&RECIPIENTS, 1, WAIT).await;
    let last = ok_sends(&calls)
        .filter(|c| c.chat_id.is_some_and(|id| RECIPIENTS.contains(&id)))
        .map(|c| c.received_at)
        .max()
        .unwrap();
    let took = last - appended;
    eprintln!(
        "APPEND -> the last of 3 sends during the outage: {:.3} s",
        took.as_secs_f64()
    );
    relay.stop().await;
    for chat in RECIPIENTS {
        assert_eq!(stack.ok_sends_to(chat).len(), 1, "chat {chat}");
    }
    // Dovecot's own notification takes about 0.5 s; the snapshot is in memory.
    assert!(
        took <= Duration::from_secs(3),
        "the report waited {took:?} for SeaTable instead of using the last snapshot"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_first_upload_leaves_the_slots_to_other_reports() {
    const SLOW: Duration = Duration::from_secs(5);
    let stack = Stack::new().await;
    // One PDF report to ten users, with four slots; its first upload is answered 5 s late.
    let chats = stack.add_subscribers(10, 700_000_000);
    stack.telegram.inject(
        telegram::FaultRule::new(telegram::Fault::Delay(SLOW))
            .method("sendDocument")
            .times(1),
    );
    // Another mailbox with its own reader.
    const SECOND: &str = "ops@test.local";
    const BOB: i64 = 444_555_666;
    stack.dovecot.add_user(SECOND, "ops-secret").unwrap();
    let second = stack.seatable.add_row(
        "mailboxes",
        serde_json::json!({"Name": "ops", "email": SECOND, "imap_password": "ops-secret"}),
    );
    stack.add_user("Bob", Some(BOB), &[&second]);
    let relay = stack.start(&Tuning {
        concurrency: 4,
        ..Tuning::default()
    });
    stack.wait_ready(2).await;

    stack.deliver(&fixture("03_dashboard_pdf_report.eml")).await;
    stack
        .telegram
        .wait_for(
            |calls| calls.iter().any(|c| c.method == "sendDocument"),
            WAIT,
        )
        .await
        .unwrap();
    let upload_started = Instant::now();
    stack
        .dovecot
        .append(SECOND, "INBOX", &fixture("05_chart_text_table.eml"))
        .await
        .unwrap();
    // Bob's report does not wait for the upload: no slot is held by a send waiting for it.
    stack.wait_for_sends(&[BOB], 1, WAIT).await;
    assert!(
        upload_started.elapsed() < SLOW,
        "Bob's report waited {:?} for another report's upload",
        upload_started.elapsed()
    );
    // And the PDF still reaches everyone, uploaded once.
    let calls = stack.wait_for_sends(&chats, 1, WAIT).await;
    let uploads = ok_sends(&calls)
        .flat_map(|c| &c.files)
        .filter(|f| f.is_upload())
        .count();
    assert_eq!(uploads, 1);
    relay.stop().await;
}
