//! Benchmarks of the live relay against a real Dovecot and the fake SeaTable and Telegram
//! servers (the same ones the tests use). Prints:
//!
//! 1. Dovecot's own notification delay: APPEND → the IDLE wake of a plain async-imap client;
//! 2. append-to-send latency through the whole relay: APPEND → Telegram receiving the send;
//! 3. the fan-out time of one report to 100 recipients with Telegram's default limits, against
//!    the minimum those limits allow.
//!
//! Run with `cargo bench --bench relay` (needs Dovecot: `scripts/test-deps.sh`).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Duration;

use support::stack::{ADDRESS, PASSWORD, Stack, Tuning, fixture};
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

        // 3: fan-out of one PDF report to 100 recipients with Telegram's documented limits.
        let stack = Stack::new().await;
        let chats = stack.add_subscribers(100, 500_000_000);
        let tuning = Tuning::default();
        let relay = stack.start(&tuning);
        stack.wait_ready(1).await;
        let started = Instant::now();
        stack.deliver(&fixture("03_dashboard_pdf_report.eml")).await;
        let calls = stack
            .wait_for_sends(&chats, 1, Duration::from_secs(120))
            .await;
        let sends: Vec<_> = calls.iter().filter(|c| c.is_send() && c.is_ok()).collect();
        let first = sends.iter().map(|c| c.received_at).min().unwrap();
        let last = sends.iter().map(|c| c.received_at).max().unwrap();
        let uploads = sends
            .iter()
            .flat_map(|c| &c.files)
            .filter(|f| f.is_upload())
            .count();
        // governor's quota of N per second allows a burst of N, then one every 1/N s.
        let rate = f64::from(tuning.global_per_second);
        let minimum = (chats.len() as f64 - rate).max(0.0) / rate;
        println!(
            "fan-out of one PDF to {} recipients (global {}/s, chat {}/s): \
             first-to-last send {:.2} s, append-to-last {:.2} s; \
             minimum the limits allow {:.2} s (burst of {} then 1 every {:.0} ms), {:.2} s at a strict {}/s; \
             uploads {}, file_id sends {}",
            chats.len(),
            tuning.global_per_second,
            tuning.chat_per_second,
            (last - first).as_secs_f64(),
            (last - started).as_secs_f64(),
            minimum,
            tuning.global_per_second,
            1000.0 / rate,
            (chats.len() as f64 - 1.0) / rate,
            tuning.global_per_second,
            uploads,
            sends.len() - uploads,
        );
        relay.stop().await;
    });
}
