//! The HTTP ingest end to end: the whole relay (in process, or the binary for the crash and
//! logging tests) against a real Dovecot and the fake SeaTable and Telegram servers, fed with
//! Superset's own webhook requests (`support::superset_webhook`, built as `webhook.py` builds
//! them) and send API calls. Runs on both state backends (`RELAY_TEST_STATE=postgres`).

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use support::seatable::Outage;
use support::stack::{ADDRESS, Stack, Tuning};
use support::superset_webhook::{self as superset, Notification};
use support::telegram::make_png;

const WAIT: Duration = Duration::from_secs(60);
const ANN: i64 = 111_222_333;
const BOB: i64 = 222_333_444;
const GROUP: i64 = -1_001_987_654_321;
/// The mailbox row's webhook token.
const TOKEN: &str = "wh-0123456789abcdef0123456789abcdef";
/// A send API token and its scope.
const API_TOKEN: &str = "api-token-for-the-tracker-0123456789";
const OTHER_API_TOKEN: &str = "api-token-of-another-system-987654321";

fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// `http:` keys: the tracker may address the stack's mailbox (3 requests a minute for the
/// limiter test is another token); `max_body_bytes` when given.
fn api_tokens(max_body_bytes: Option<u64>) -> String {
    let mut text = format!(
        "  api_tokens:\n    - name: tracker\n      sha256: \"{}\"\n      mailboxes: [\"{ADDRESS}\"]\n    - name: other\n      sha256: \"{}\"\n      mailboxes: [\"other@test.local\"]\n      requests_per_minute: 3\n",
        sha256_hex(API_TOKEN),
        sha256_hex(OTHER_API_TOKEN)
    );
    if let Some(limit) = max_body_bytes {
        text.push_str(&format!("  max_body_bytes: {limit}\n"));
    }
    text
}

/// A stack whose mailbox has a webhook token, Ann, Bob and a group as recipients.
async fn stack() -> Stack {
    let stack = Stack::new().await;
    stack.set_webhook_token(TOKEN);
    let mailbox = stack.mailbox_row.clone();
    stack.add_user("Ann", Some(ANN), &[&mailbox]);
    stack.add_user("Bob", Some(BOB), &[&mailbox]);
    stack.add_group("Sales", Some(GROUP), &[&mailbox]);
    stack
}

fn webhook_url(stack: &Stack, token: &str) -> String {
    format!("{}/ingest/superset/{token}", stack.http_url())
}

fn methods(stack: &Stack, chat: i64) -> Vec<String> {
    stack
        .ok_sends_to(chat)
        .iter()
        .map(|c| c.method.clone())
        .collect()
}

/// A minimal PDF that ends with `%%EOF`.
fn pdf() -> Vec<u8> {
    b"%PDF-1.4\n1 0 obj << >> endobj\ntrailer << >>\n%%EOF\n".to_vec()
}

/// Waits until /metrics contains `line`.
async fn wait_metric(stack: &Stack, line: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let text = reqwest::get(format!("{}/metrics", stack.http_url()))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if text.contains(line) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{line} not in:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dashboard_with_screenshots_and_a_pdf_is_planned_like_its_email() {
    let stack = stack().await;
    let relay = stack.start(&Tuning::default());
    stack.wait_ready(1).await;
    let mut notification = Notification::report("Daily KPIs");
    notification.format = "PDF";
    notification.pdf = Some(pdf());
    notification.screenshots = vec![make_png(40, 30), make_png(50, 30), make_png(60, 30)];
    let (status, body) = superset::send(
        &superset::client(),
        &webhook_url(&stack, TOKEN),
        &notification,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "queued");
    assert_eq!(body["duplicate"], false);
    assert_eq!(body["recipients"], 3);

    stack.wait_for_sends(&[ANN, BOB, GROUP], 2, WAIT).await;
    for chat in [ANN, BOB, GROUP] {
        assert_eq!(methods(&stack, chat), ["sendMediaGroup", "sendDocument"]);
    }
    let sends = stack.ok_sends_to(ANN);
    let names: Vec<_> = sends
        .iter()
        .flat_map(|c| c.files.iter().map(|f| f.file_name.clone().unwrap()))
        .collect();
    assert_eq!(
        names,
        [
            "Daily KPIs (1).png",
            "Daily KPIs (2).png",
            "Daily KPIs (3).png",
            "Daily KPIs.pdf"
        ]
    );
    let caption = sends[0].files[0].caption.clone().unwrap();
    assert_eq!(
        caption,
        "<b>Daily KPIs</b>\n\nNumbers for the ops team\n\n\
         <a href=\"https://superset.example.com/superset/dashboard/7/\">Explore in Superset</a>"
    );
    wait_metric(
        &stack,
        "report_relay_reports_acknowledged_total{mailbox=\"reports@test.local\",outcome=\"queued\",source=\"superset_webhook\"} 1",
    )
    .await;
    wait_metric(
        &stack,
        "report_relay_ingest_to_send_seconds_count{source=\"superset_webhook\"} 6",
    )
    .await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_report_is_one_message_and_a_csv_is_named_after_the_report() {
    let stack = stack().await;
    let relay = stack.start(&Tuning::default());
    stack.wait_ready(1).await;
    let client = superset::client();
    // JSON, as Superset sends a notification without files; the name arrives \u-escaped.
    let mut text = Notification::report("Продажи за день");
    text.format = "TEXT";
    let (status, body) = superset::send(&client, &webhook_url(&stack, TOKEN), &text).await;
    assert_eq!(status, 200, "{body}");
    stack.wait_for_sends(&[ANN], 1, WAIT).await;
    let message = &stack.ok_sends_to(ANN)[0];
    assert_eq!(message.method, "sendMessage");
    assert!(
        message
            .text
            .as_deref()
            .unwrap()
            .starts_with("<b>Продажи за день</b>\n\nNumbers for the ops team"),
        "{:?}",
        message.text
    );

    let mut csv = Notification::report("Orders");
    csv.format = "CSV";
    csv.source = "chart";
    csv.chart_id = Some(12);
    csv.dashboard_id = None;
    csv.description = None;
    csv.csv = Some(b"id,amount\n1,10\n".to_vec());
    let (status, body) = superset::send(&client, &webhook_url(&stack, TOKEN), &csv).await;
    assert_eq!(status, 200, "{body}");
    stack.wait_for_sends(&[ANN], 2, WAIT).await;
    let document = &stack.ok_sends_to(ANN)[1];
    assert_eq!(document.method, "sendDocument");
    assert_eq!(document.files[0].file_name.as_deref(), Some("Orders.csv"));

    // An error notification is skipped (reports.forward_errors is false), and acknowledged.
    let mut error = Notification::report("Error occurred for Report: Orders");
    error.text = Some("Contact the report owner for error details.".into());
    let (status, body) = superset::send(&client, &webhook_url(&stack, TOKEN), &error).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("skipped")));
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_a_dropped_connection_is_acknowledged_and_not_sent_twice() {
    use tokio::io::AsyncWriteExt;
    let stack = stack().await;
    let relay = stack.start(&Tuning::default());
    stack.wait_ready(1).await;
    let mut notification = Notification::report("Weekly");
    notification.screenshots = vec![make_png(40, 30)];

    // The first attempt: the relay stores it, but its answer is never read: the connection
    // drops (Superset's timeout).
    let (content_type, body) = notification.request();
    let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", stack.http_port))
        .await
        .unwrap();
    let head = format!(
        "POST /ingest/superset/{TOKEN} HTTP/1.1\r\nHost: relay\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    socket.write_all(&body).await.unwrap();
    wait_metric(
        &stack,
        "report_relay_reports_acknowledged_total{mailbox=\"reports@test.local\",outcome=\"queued\",source=\"superset_webhook\"} 1",
    )
    .await;
    drop(socket);

    // Superset retries, with a new multipart boundary; and once more.
    let client = superset::client();
    let url = webhook_url(&stack, TOKEN);
    let (status, first) = superset::send(&client, &url, &notification).await;
    assert_eq!(status, 200, "{first}");
    let (status, second) = superset::send(&client, &url, &notification).await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(second["duplicate"], true);
    assert_eq!(second["message_id"], first["message_id"]);

    stack.wait_for_sends(&[ANN, BOB, GROUP], 1, WAIT).await;
    wait_metric(&stack, "report_relay_outbox_depth 0").await;
    assert_eq!(stack.repeated(&[ANN, BOB, GROUP]), Vec::<i64>::new());
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_token_is_404_and_no_token_is_ever_logged() {
    let stack = stack().await;
    let log = stack.dir.path().join("relay.log");
    let tuning = Tuning {
        http_extra: api_tokens(None),
        ..Tuning::default()
    };
    let mut child = stack.spawn_binary_logging(&tuning, &log, "debug");
    stack.wait_ready(1).await;
    let client = superset::client();
    let notification = Notification::report("Weekly");
    let wrong = "wh-0123456789abcdef0123456789abcdeX";
    let (status, body) = superset::send(&client, &webhook_url(&stack, wrong), &notification).await;
    assert_eq!(status, 404);
    assert_eq!(body, json!({"error": "unknown webhook token"}));
    let (status, _) = superset::send(&client, &webhook_url(&stack, TOKEN), &notification).await;
    assert_eq!(status, 200);
    let response = reqwest::Client::new()
        .post(format!("{}/api/v1/messages", stack.http_url()))
        .bearer_auth(API_TOKEN)
        .json(&json!({"mailbox": ADDRESS, "text": "hello"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    stack.wait_for_sends(&[ANN], 2, WAIT).await;
    child.kill().unwrap();
    child.wait().unwrap();
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("unknown token"), "the 404 is logged");
    for secret in [
        TOKEN,
        wrong,
        API_TOKEN,
        &TOKEN[3..20],
        support::telegram::TOKEN,
    ] {
        assert!(!logged.contains(secret), "the log holds a secret: {secret}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_webhooks_each_keep_their_report() {
    let stack = stack().await;
    let tuning = Tuning {
        global_per_second: 1000,
        chat_per_second: 1000,
        group_per_minute: 1000,
        ..Tuning::default()
    };
    let relay = stack.start(&tuning);
    stack.wait_ready(1).await;
    let client = superset::client();
    let url = webhook_url(&stack, TOKEN);
    let answers = futures::future::join_all((0..100).map(|i| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let mut notification = Notification::report(&format!("Report {i}"));
            if i % 2 == 0 {
                notification.screenshots = vec![make_png(20 + i, 10)];
            }
            superset::send(&client, &url, &notification).await
        }
    }))
    .await;
    let mut ids: Vec<i64> = answers
        .iter()
        .map(|(status, body)| {
            assert_eq!(*status, 200, "{body}");
            body["message_id"].as_i64().unwrap()
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 100, "every report is its own message");
    stack
        .wait_for_sends(&[ANN, BOB, GROUP], 100, WAIT * 2)
        .await;
    let mut titles: Vec<String> = stack
        .ok_sends_to(ANN)
        .iter()
        .map(|c| {
            let text = c
                .text
                .clone()
                .or_else(|| c.caption.clone())
                .unwrap_or_default();
            text.split("</b>").next().unwrap_or("").to_owned()
        })
        .collect();
    titles.sort();
    titles.dedup();
    assert_eq!(titles.len(), 100, "each report reached Ann once");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_right_after_a_200_loses_nothing() {
    let stack = Stack::new().await;
    stack.set_webhook_token(TOKEN);
    let chats = stack.add_subscribers(30, 400_000_000);
    let tuning = Tuning {
        global_per_second: 10,
        concurrency: 1,
        ..Tuning::default()
    };
    let mut child = stack.spawn_binary(&tuning);
    stack.wait_ready(1).await;
    let mut notification = Notification::report("Crash test");
    notification.pdf = Some(pdf());
    let (status, body) = superset::send(
        &superset::client(),
        &webhook_url(&stack, TOKEN),
        &notification,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    child.kill().unwrap();
    child.wait().unwrap();
    let sent_before = stack
        .telegram
        .calls()
        .iter()
        .filter(|c| c.is_send() && c.is_ok())
        .count();
    assert!(
        sent_before < chats.len(),
        "the kill came too late to test anything"
    );

    let mut child = stack.spawn_binary(&tuning);
    stack.wait_for_sends(&chats, 1, WAIT).await;
    assert!(stack.repeated(&chats).len() <= 1);
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_get_503_until_the_directory_first_loads() {
    let stack = stack().await;
    stack.seatable.go_down(Outage::ServiceUnavailable).await;
    let relay = stack.start(&Tuning::default());
    let client = superset::client();
    let url = webhook_url(&stack, TOKEN);
    let notification = Notification::report("Early");
    // Until the relay listens, nothing answers; then 503 while SeaTable has never answered.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Ok(response) = client
            .post(&url)
            .header("content-type", "application/json")
            .body(notification.request().1)
            .send()
            .await
        {
            assert_eq!(response.status(), 503);
            assert!(response.headers().contains_key("retry-after"));
            let body: Value = response.json().await.unwrap();
            assert!(body["error"].as_str().unwrap().contains("directory"));
            break;
        }
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stack.seatable.come_back().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, _) = superset::send(&client, &url, &notification).await;
        if status == 200 {
            break;
        }
        assert_eq!(status, 503);
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stack.wait_for_sends(&[ANN], 1, WAIT).await;
    relay.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The send API
// ---------------------------------------------------------------------------------------------

fn api(stack: &Stack, path: &str) -> String {
    format!("{}/api/v1{path}", stack.http_url())
}

async fn post_json(stack: &Stack, token: Option<&str>, body: Value) -> reqwest::Response {
    let mut request = reqwest::Client::new()
        .post(api(stack, "/messages"))
        .json(&body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap()
}

async fn error_of(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    (
        status,
        body["error"].as_str().unwrap_or_default().to_owned(),
    )
}

/// GET /api/v1`path` with `token`.
async fn get_as(stack: &Stack, path: &str, token: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(api(stack, path))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

/// GET /api/v1/messages/{id} until `done(body)`.
async fn wait_status(stack: &Stack, id: i64, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let body: Value = get_as(stack, &format!("/messages/{id}"), API_TOKEN)
            .await
            .json()
            .await
            .unwrap();
        if done(&body) {
            return body;
        }
        assert!(tokio::time::Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_send_api_authenticates_scopes_dedupes_and_reports_each_recipient() {
    let stack = stack().await;
    stack.telegram.block_chat(BOB);
    let relay = stack.start(&Tuning {
        http_extra: api_tokens(Some(20_000)),
        ..Tuning::default()
    });
    stack.wait_ready(1).await;
    let message = json!({"mailbox": ADDRESS, "text": "Disk <full> on db1"});

    // Authentication and scope.
    let (status, error) = error_of(post_json(&stack, None, message.clone()).await).await;
    assert_eq!((status, error.contains("Bearer")), (401, true));
    let (status, _) = error_of(post_json(&stack, Some("nope"), message.clone()).await).await;
    assert_eq!(status, 401);
    let (status, error) =
        error_of(post_json(&stack, Some(OTHER_API_TOKEN), message.clone()).await).await;
    assert_eq!(
        (status, error.as_str()),
        (
            403,
            "the token \"other\" may not send to reports@test.local"
        )
    );
    let (status, _) = error_of(
        post_json(
            &stack,
            Some(OTHER_API_TOKEN),
            json!({"mailbox": "other@test.local", "text": "x"}),
        )
        .await,
    )
    .await;
    assert_eq!(status, 404, "in scope, but no such mailbox row");

    // Malformed, unsupported and oversized bodies.
    let client = reqwest::Client::new();
    let (status, error) = error_of(
        client
            .post(api(&stack, "/messages"))
            .bearer_auth(API_TOKEN)
            .header("content-type", "application/json")
            .body("{\"mailbox\": ")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, error.starts_with("invalid JSON body")),
        (400, true)
    );
    let (status, error) = error_of(
        post_json(
            &stack,
            Some(API_TOKEN),
            json!({"mailbox": ADDRESS, "txt": "x"}),
        )
        .await,
    )
    .await;
    assert_eq!(
        (status, error.contains("unknown field `txt`")),
        (400, true),
        "{error}"
    );
    let (status, _) = error_of(
        client
            .post(api(&stack, "/messages"))
            .bearer_auth(API_TOKEN)
            .header("content-type", "text/plain")
            .body("hello")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 415);
    let (status, error) = error_of(
        post_json(
            &stack,
            Some(API_TOKEN),
            json!({"mailbox": ADDRESS, "text": "x".repeat(30_000)}),
        )
        .await,
    )
    .await;
    assert_eq!((status, error.contains("http.max_body_bytes")), (413, true));
    let form = reqwest::multipart::Form::new()
        .text("mailbox", ADDRESS)
        .part(
            "files",
            reqwest::multipart::Part::bytes(b"plain".to_vec())
                .file_name("notes.txt")
                .mime_str("text/plain")
                .unwrap(),
        );
    let (status, error) = error_of(
        client
            .post(api(&stack, "/messages"))
            .bearer_auth(API_TOKEN)
            .multipart(form)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, error.as_str()),
        (400, "file 0 (notes.txt) is not a PNG, PDF, CSV or XLSX")
    );

    // A text, with an Idempotency-Key, sent twice: one message.
    let send = || {
        client
            .post(api(&stack, "/messages"))
            .bearer_auth(API_TOKEN)
            .header("idempotency-key", "ticket-42")
            .json(&message)
            .send()
    };
    let first = send().await.unwrap();
    assert_eq!(first.status(), 202);
    assert!(!first.headers().contains_key("idempotent-replayed"));
    let first: Value = first.json().await.unwrap();
    let again = send().await.unwrap();
    assert_eq!(again.status(), 202);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.json::<Value>().await.unwrap(), first);
    let id = first["id"].as_i64().unwrap();
    assert_eq!(first["status_url"], format!("/api/v1/messages/{id}"));

    stack.wait_for_sends(&[ANN, GROUP], 1, WAIT).await;
    let text = stack.ok_sends_to(ANN)[0].text.clone().unwrap();
    assert_eq!(text, "Disk &lt;full&gt; on db1");
    let status = wait_status(&stack, id, |b| b["status"] != "pending").await;
    assert_eq!(status["status"], "partially_sent", "{status}");
    assert_eq!(status["outcome"], "queued");
    let recipients = status["recipients"].as_array().unwrap();
    let find = |chat: i64| {
        recipients
            .iter()
            .find(|r| r["chat_id"] == chat)
            .unwrap()
            .clone()
    };
    assert_eq!(find(ANN)["status"], "sent");
    assert_eq!(find(ANN)["name"], "Ann");
    assert_eq!(find(GROUP)["name"], "Sales");
    assert_eq!(find(BOB)["status"], "failed");
    assert!(
        find(BOB)["reason"].as_str().unwrap().contains("blocked"),
        "{status}"
    );
    assert_eq!(
        stack.ok_sends_to(ANN).len(),
        1,
        "the retried request sent nothing"
    );

    // Files with a caption: documents with their own names.
    let form = reqwest::multipart::Form::new()
        .text("mailbox", ADDRESS)
        .text("caption", "Nightly export")
        .part(
            "files",
            reqwest::multipart::Part::bytes(b"a,b\n1,2\n".to_vec())
                .file_name("export.csv")
                .mime_str("text/csv")
                .unwrap(),
        );
    let response = client
        .post(api(&stack, "/messages"))
        .bearer_auth(API_TOKEN)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    stack.wait_for_sends(&[ANN], 2, WAIT).await;
    let document = &stack.ok_sends_to(ANN)[1];
    assert_eq!(document.method, "sendDocument");
    assert_eq!(document.files[0].file_name.as_deref(), Some("export.csv"));
    assert_eq!(document.files[0].caption.as_deref(), Some("Nightly export"));

    // Another token cannot read it; an unknown id is 404.
    let other = get_as(&stack, &format!("/messages/{id}"), OTHER_API_TOKEN).await;
    assert_eq!(other.status(), 404);
    let unknown = get_as(&stack, "/messages/999999", API_TOKEN).await;
    assert_eq!(unknown.status(), 404);

    // The other token's limit: 3 a minute (it made 3 requests above).
    let limited = get_as(&stack, "/messages/1", OTHER_API_TOKEN).await;
    assert_eq!(limited.status(), 429);
    let retry_after: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");

    // The description of it all.
    let openapi: Value = client
        .get(api(&stack, "/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(openapi["paths"]["/api/v1/messages"]["post"].is_object());
    wait_metric(
        &stack,
        "report_relay_ingest_to_send_seconds_count{source=\"api\"}",
    )
    .await;
    relay.stop().await;
}

// ---------------------------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------------------------

/// A self-signed certificate for `localhost`: its PEM and its key's PEM.
fn certificate() -> (String, String) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    (certified.cert.pem(), certified.signing_key.serialize_pem())
}

/// Whether a TLS handshake with the relay succeeds trusting only `cert_pem`.
async fn handshake_trusting(port: u16, cert_pem: &str) -> bool {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let Ok(tcp) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await.is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_arrive_over_tls_and_a_new_certificate_is_picked_up() {
    let stack = stack().await;
    let (cert, key) = certificate();
    let cert_file = stack.dir.path().join("cert.pem");
    let key_file = stack.dir.path().join("key.pem");
    std::fs::write(&cert_file, &cert).unwrap();
    std::fs::write(&key_file, &key).unwrap();
    let relay = stack.start(&Tuning {
        http_extra: format!(
            "  tls:\n    cert_file: \"{}\"\n    key_file: \"{}\"\n",
            cert_file.display(),
            key_file.display()
        ),
        ..Tuning::default()
    });
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(cert.as_bytes()).unwrap())
        .resolve("localhost", ([127, 0, 0, 1], stack.http_port).into())
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let base = format!("https://localhost:{}", stack.http_port);
    // /readyz over TLS.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Ok(response) = client.get(format!("{base}/readyz")).send().await
            && response.status() == 200
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "not ready over TLS");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut notification = Notification::report("Over TLS");
    notification.screenshots = vec![make_png(40, 30)];
    let url = format!("{base}/ingest/superset/{TOKEN}");
    let (status, body) = superset::send(&client, &url, &notification).await;
    assert_eq!(status, 200, "{body}");
    stack.wait_for_sends(&[ANN], 1, WAIT).await;
    // Plain HTTP gets no answer from a TLS listener.
    assert!(
        reqwest::get(format!("{}/healthz", stack.http_url()))
            .await
            .is_err()
    );

    // A renewed certificate replaces the old one without a restart.
    let (new_cert, new_key) = certificate();
    assert!(!handshake_trusting(stack.http_port, &new_cert).await);
    std::fs::write(&key_file, &new_key).unwrap();
    std::fs::write(&cert_file, &new_cert).unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !handshake_trusting(stack.http_port, &new_cert).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new certificate was not loaded"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    relay.stop().await;
}
