//! Benchmarks of the live relay against a real Dovecot and the fake SeaTable and Telegram
//! servers (the same ones the tests use). Prints:
//!
//! 1. Dovecot's own notification delay: APPEND → the IDLE wake of a plain async-imap client;
//! 2. append-to-send latency through the whole relay: APPEND → Telegram receiving the send;
//! 3. the fan-out of one report to 123 recipients (120 users, 3 supergroups) against the fake
//!    Telegram enforcing Telegram's limits over every sliding window: the first-to-last span,
//!    the minimum those windows allow, their ratio and the number of 429s, side by side.
//!
//! Run with `cargo bench --bench relay` (needs Dovecot: `scripts/test-deps.sh`).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Duration;

use support::stack::{ADDRESS, PASSWORD, Stack, Tuning, fixture};
use support::telegram::RateLimits;
use tokio::time::Instant;

const SAMPLES: usize = 40;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn summary(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{name}: n={} p50={:.0} ms p99={:.0} ms min={:.0} ms max={:.0} ms",
        samples.len(),
        ms(percentile(&samples, 50.0)),
        ms(percentile(&samples, 99.0)),
        ms(samples[0]),
        ms(*samples.last().unwrap()),
    );
}

/// APPEND → `* n EXISTS` in an IDLE session of a plain client.
async fn dovecot_notification_delay(stack: &Stack) -> Vec<Duration> {
    let tcp = tokio::net::TcpStream::connect(stack.dovecot.addr())
        .await
        .unwrap();
    let client = async_imap::Client::new(tcp);
    let mut session = client
        .login(ADDRESS, PASSWORD)
        .await
        .map_err(|e| e.0)
        .unwrap();
    session.select("INBOX").await.unwrap();
    let raw = fixture("01_chart_png_report.eml");
    let mut samples = Vec::new();
    for _ in 0..SAMPLES {
        let mut idle = session.idle();
        idle.init().await.unwrap();
        let (wait, _stop) = idle.wait_with_timeout(Duration::from_secs(10));
        let started = Instant::now();
        let (woke, appended) = tokio::join!(wait, stack.dovecot.append(ADDRESS, "INBOX", &raw));
        appended.unwrap();
        woke.unwrap();
        samples.push(started.elapsed());
        session = idle.done().await.unwrap();
        // Drain what the wake left unread.
        session.noop().await.unwrap();
    }
    let _ = session.logout().await;
    samples
}

/// APPEND → the fake Telegram receiving the sendPhoto, one report at a time.
async fn append_to_send(stack: &Stack) -> Vec<Duration> {
    let raw = fixture("01_chart_png_report.eml");
    let mut samples = Vec::new();
    for i in 0..SAMPLES {
        let started = Instant::now();
        stack.deliver(&raw).await;
        let calls = stack
            .wait_for_sends(&[111_222_333], i + 1, Duration::from_secs(60))
            .await;
        let sent = calls
            .iter()
            .filter(|c| c.is_send() && c.is_ok())
            .nth(i)
            .unwrap()
            .received_at;
        samples.push(sent - started);
    }
    samples
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        // 1 and 2: one recipient; limits raised so the per-chat spacing (1 message per second)
        // does not add to the pipeline's latency when reports come back to back.
        let stack = Stack::new().await;
        let mailbox = stack.mailbox_row.clone();
        stack.add_user("Ann", Some(111_222_333), &[&mailbox]);
        summary(
            "dovecot APPEND -> IDLE wake (Dovecot's own notification delay)",
            dovecot_notification_delay(&stack).await,
        );
        let relay = stack.start(&Tuning {
            chat_per_second: 100,
            global_per_second: 100,
            ..Tuning::default()
        });
        stack.wait_ready(1).await;
        summary(
            "relay APPEND -> Telegram send (append-to-send latency)",
            append_to_send(&stack).await,
        );
        relay.stop().await;

        // 3: fan-out of one PDF report to 120 users and 3 supergroups, against the fake in
        // strict-limits mode: Telegram's limits over every sliding window.
        let stack = Stack::new().await;
        let limits = RateLimits::telegram();
        stack.telegram.set_rate_limits(Some(limits.clone()));
        let chats = stack.add_fan_out(120, 3);
        let tuning = Tuning::default();
        let relay = stack.start(&tuning);
        stack.wait_ready(1).await;
        let started = Instant::now();
        stack.deliver(&fixture("03_dashboard_pdf_report.eml")).await;
        let calls = stack
            .wait_for_sends(&chats, 1, Duration::from_secs(120))
            .await;
        let sends: Vec<_> = calls.iter().filter(|c| c.is_send() && c.is_ok()).collect();
        let last = sends.iter().map(|c| c.received_at).max().unwrap();
        let uploads = sends
            .iter()
            .flat_map(|c| &c.files)
            .filter(|f| f.is_upload())
            .count();
        let span = stack.telegram.ok_send_span(&chats);
        let minimum = limits.min_span(chats.len() as u32);
        println!(
            "fan-out of one PDF to {} chats (120 users, 3 supergroups; relay limits global {}/s, \
             chat {}/s, group {}/min; fake: 30 in any 1 s, 1 request per chat in any 1 s, \
             20 per group in any 60 s): first-to-last send {:.3} s, minimum the sliding windows \
             allow {:.3} s, ratio {:.3}, 429s {}; append-to-last {:.2} s; uploads {}, file_id \
             sends {}",
            chats.len(),
            tuning.global_per_second,
            tuning.chat_per_second,
            tuning.group_per_minute,
            span.as_secs_f64(),
            minimum.as_secs_f64(),
            span.as_secs_f64() / minimum.as_secs_f64(),
            stack.telegram.rate_violations().len(),
            (last - started).as_secs_f64(),
            uploads,
            sends.len() - uploads,
        );
        relay.stop().await;
    });
}
