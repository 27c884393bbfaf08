//! `reports.require_authentication`: only mail whose topmost `Authentication-Results` header,
//! from the configured server, says the From domain passed DKIM or SPF is relayed.

mod support;

use support::stack;

use std::time::Duration;

use stack::{Stack, Tuning, fixture};
use tokio_util::sync::CancellationToken;

const ANN: i64 = 111_222_333;

/// Fixture 01 (From: superset@analytics.example.com) with these headers on top.
fn mail_with(headers: &str) -> Vec<u8> {
    let mut raw = headers.replace('\n', "\r\n").into_bytes();
    raw.extend(fixture("01_chart_png_report.eml"));
    raw
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_mail_the_receiving_server_authenticated_is_relayed() {
    let stack = Stack::new().await;
    let mailbox = stack.mailbox_row.clone();
    stack.add_user("Ann", Some(ANN), &[&mailbox]);
    let path = stack.write_config(&Tuning::default());
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str("reports:\n  require_authentication:\n    authserv_id: mx.test.local\n");
    std::fs::write(&path, text).unwrap();
    let config = report_relay::config::Config::load(&path).unwrap();
    let stop = CancellationToken::new();
    let signal = stop.clone();
    let relay = tokio::spawn(report_relay::app::run(config, async move {
        signal.cancelled().await
    }));
    stack.wait_ready(1).await;

    // Refused: no header; a forged pass below a fail; a pass from another server; a pass for
    // another domain.
    stack.deliver(&fixture("01_chart_png_report.eml")).await;
    stack
        .deliver(&mail_with(
            "Authentication-Results: mx.test.local; dkim=fail header.d=analytics.example.com\n\
             Authentication-Results: mx.test.local; dkim=pass header.d=analytics.example.com\n",
        ))
        .await;
    stack
        .deliver(&mail_with(
            "Authentication-Results: relay.evil.example; spf=pass smtp.mailfrom=analytics.example.com\n",
        ))
        .await;
    stack
        .deliver(&mail_with(
            "Authentication-Results: mx.test.local; dkim=pass header.d=evil.example\n",
        ))
        .await;
    // Relayed: SPF passed for the From domain, folded over two lines.
    stack
        .deliver(&mail_with(
            "Authentication-Results: mx.test.local;\n\tspf=pass smtp.mailfrom=superset@analytics.example.com\n",
        ))
        .await;
    stack
        .wait_for_sends(&[ANN], 1, Duration::from_secs(30))
        .await;
    // All five acknowledged (four filtered) and the outbox drained: exactly one send.
    let url = format!("http://127.0.0.1:{}/metrics", stack.http_port);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let metrics = reqwest::get(&url).await.unwrap().text().await.unwrap();
        if metrics.contains(r#"outcome="filtered",source="imap"} 4"#)
            && metrics.contains(r#"outcome="queued",source="imap"} 1"#)
            && metrics.contains("report_relay_outbox_depth 0")
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(stack.ok_sends_to(ANN).len(), 1);
    stop.cancel();
    relay.await.unwrap().unwrap();
}
