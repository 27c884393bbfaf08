//! Ingest-to-send latency of the HTTP paths next to the IMAP path, in one run, against a real
//! Dovecot and the fake SeaTable and Telegram servers (the same ones the tests use). Prints:
//!
//! 1. IMAP append-to-send: APPEND of a one-chart Superset mail → Telegram receiving the
//!    sendPhoto (the reference: Dovecot's IDLE notification delay is most of it);
//! 2. webhook ingest-to-send: Superset's webhook request with the same screenshot (multipart,
//!    as `webhook.py` sends it) → Telegram receiving the sendPhoto; and the request's own
//!    round trip (the 200 comes once the report and its outbox rows are committed);
//! 3. send API ingest-to-send: `POST /api/v1/messages` with a text → the sendMessage.
//!
//! Run with `cargo bench --bench ingest` (needs Dovecot: `scripts/test-deps.sh`);
//! `RELAY_TEST_STATE=postgres` puts the state on PostgreSQL.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Duration;

use sha2::{Digest, Sha256};
use support::stack::{ADDRESS, Stack, Tuning, fixture};
use support::superset_webhook::{self as superset, Notification};
use tokio::time::Instant;

const SAMPLES: usize = 40;
const ANN: i64 = 111_222_333;
const TOKEN: &str = "wh-bench-0123456789abcdef0123456789";
const API_TOKEN: &str = "api-bench-token-0123456789abcdef";

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Prints the line and returns (p50, p99).
fn summary(name: &str, mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let (p50, p99) = (percentile(&samples, 50.0), percentile(&samples, 99.0));
    println!(
        "{name}: n={} p50={:.1} ms p99={:.1} ms min={:.1} ms max={:.1} ms",
        samples.len(),
        ms(p50),
        ms(p99),
        ms(samples[0]),
        ms(*samples.last().unwrap()),
    );
    (p50, p99)
}

/// When the `n`-th (0-based) successful send to Ann arrived, awaiting it.
async fn nth_send(stack: &Stack, n: usize) -> Instant {
    let calls = stack
        .wait_for_sends(&[ANN], n + 1, Duration::from_secs(60))
        .await;
    calls
        .iter()
        .filter(|c| c.is_send() && c.is_ok() && c.chat_id == Some(ANN))
        .nth(n)
        .unwrap()
        .received_at
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let stack = Stack::new().await;
        stack.set_webhook_token(TOKEN);
        let mailbox = stack.mailbox_row.clone();
        stack.add_user("Ann", Some(ANN), &[&mailbox]);
        // Limits raised so the per-chat spacing does not add to back-to-back reports.
        let relay = stack.start(&Tuning {
            chat_per_second: 100,
            global_per_second: 100,
            http_extra: format!(
                "  api_tokens:\n    - name: bench\n      sha256: \"{}\"\n      mailboxes: [\"{ADDRESS}\"]\n      requests_per_minute: 1000\n",
                hex::encode(Sha256::digest(API_TOKEN.as_bytes()))
            ),
            ..Tuning::default()
        });
        stack.wait_ready(1).await;
        let mut sent = 0;

        let raw = fixture("01_chart_png_report.eml");
        let mut imap = Vec::new();
        for _ in 0..SAMPLES {
            let started = Instant::now();
            stack.deliver(&raw).await;
            imap.push(nth_send(&stack, sent).await - started);
            sent += 1;
        }

        // The same screenshot, as Superset's webhook sends it; a new name each time (the same
        // content again within a day is a retry, acknowledged and not sent).
        let screenshot = report_relay::report::Report::parse(&raw, &[])
            .unwrap()
            .files[0]
            .bytes
            .to_vec();
        let client = superset::client();
        let url = format!("{}/ingest/superset/{TOKEN}", stack.http_url());
        let mut webhook = Vec::new();
        let mut answered = Vec::new();
        for i in 0..SAMPLES {
            let mut notification = Notification::report(&format!("Weekly Sales {i}"));
            notification.screenshots = vec![screenshot.clone()];
            let started = Instant::now();
            let (status, body) = superset::send(&client, &url, &notification).await;
            assert_eq!(status, 200, "{body}");
            answered.push(started.elapsed());
            webhook.push(nth_send(&stack, sent).await - started);
            sent += 1;
        }

        let api_client = reqwest::Client::new();
        let mut api = Vec::new();
        for i in 0..SAMPLES {
            let started = Instant::now();
            let response = api_client
                .post(format!("{}/api/v1/messages", stack.http_url()))
                .bearer_auth(API_TOKEN)
                .json(&serde_json::json!({"mailbox": ADDRESS, "text": format!("Disk full ({i})")}))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 202);
            api.push(nth_send(&stack, sent).await - started);
            sent += 1;
        }
        relay.stop().await;

        println!("state: {}", std::env::var("RELAY_TEST_STATE").unwrap_or_else(|_| "sqlite".into()));
        let (imap50, imap99) = summary("imap APPEND -> Telegram sendPhoto (append-to-send, the reference)", imap);
        let (hook50, hook99) = summary("superset webhook POST -> Telegram sendPhoto (ingest-to-send)", webhook);
        summary("superset webhook POST -> 200 (stored durably)", answered);
        summary("send API POST -> Telegram sendMessage (ingest-to-send)", api);
        println!(
            "webhook ingest-to-send vs IMAP append-to-send: p50 {:.1} ms vs {:.1} ms, p99 {:.1} ms vs {:.1} ms",
            hook50.as_secs_f64() * 1000.0,
            imap50.as_secs_f64() * 1000.0,
            hook99.as_secs_f64() * 1000.0,
            imap99.as_secs_f64() * 1000.0,
        );
    });
}
