//! SeaTable's delivery log against the fake SeaTable: `schema apply`'s table, one row per
//! finished report with its counts, failures, times and mailbox link, written once even when
//! the state forgot it was written, and retried after SeaTable refused a batch.

mod support;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use report_relay::config::TableNames;
use report_relay::delivery_log::{self, DeliveryLog};
use report_relay::directory::{Directory, SeaTableBackend};
use report_relay::metrics::Metrics;
use report_relay::report::render::Method;
use report_relay::seatable::{ClientOptions, SeaTableClient};
use report_relay::state::{Acknowledgement, MessageOutcome, OutboxSend, SendResult, State};
use secrecy::SecretString;
use serde_json::json;
use support::seatable::{Endpoint, FakeSeaTable};
use support::stack::{SEATABLE_TOKEN, Stack, Tuning, fixture};

const API_TOKEN: &str = "4f2b9c0d8e7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c";
const MAILBOX: &str = "reports@example.com";

fn client(fake: &FakeSeaTable) -> SeaTableClient {
    client_with(fake, API_TOKEN)
}

fn client_with(fake: &FakeSeaTable, token: &str) -> SeaTableClient {
    SeaTableClient::with_options(
        &fake.server_url(),
        SecretString::from(token.to_owned()),
        reqwest::Client::new(),
        Arc::new(Metrics::new()),
        ClientOptions {
            request_timeout: Duration::from_secs(5),
            retries: 3,
            min_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(20),
            max_retry_after: Duration::from_secs(2),
        },
    )
    .expect("valid client")
}

/// A base with the relay's tables, the delivery log created by `apply`, and one mailbox row.
async fn base() -> (FakeSeaTable, String) {
    let fake = FakeSeaTable::start(API_TOKEN).await;
    fake.create_default_schema();
    let created = delivery_log::table::apply(&client(&fake), "deliveries", "mailboxes")
        .await
        .unwrap();
    assert_eq!(
        created,
        vec![
            "created table deliveries with columns title, time, source, recipients, delivered, \
             failed, first_send_secs, last_send_secs, report",
            "added link column deliveries.mailbox → mailboxes",
        ]
    );
    let mailbox = fake.add_row("mailboxes", json!({"Name": "BI", "email": MAILBOX}));
    (fake, mailbox)
}

async fn writer(fake: &FakeSeaTable, state: &State) -> DeliveryLog {
    let client = client(fake);
    let backend = Arc::new(SeaTableBackend::new(client.clone(), TableNames::default()));
    let directory = Arc::new(Directory::new(
        backend,
        state.clone(),
        Duration::from_secs(60),
    ));
    directory.load().await.unwrap();
    DeliveryLog::new(
        client,
        state.clone(),
        directory,
        TableNames::default(),
        Duration::from_millis(50),
    )
}

fn text(text: &str) -> OutboxSend {
    OutboxSend {
        method: Method::SendMessage,
        items: Vec::new(),
        text: Some(text.into()),
        options: Default::default(),
    }
}

/// Acknowledges a report for chats 10 and 20 that arrived at a fixed time, delivers it to 10
/// after 2.5 s and fails 20 for good.
async fn finished_report(state: &State) -> SystemTime {
    let arrived = UNIX_EPOCH + Duration::from_secs(1_780_000_000);
    state
        .acknowledge(Acknowledgement {
            mailbox: MAILBOX.into(),
            uid: None,
            raw_sha256: "raw".into(),
            title: "Sales daily".into(),
            outcome: MessageOutcome::Queued,
            detail: None,
            received_at: Some(arrived),
            files: Vec::new(),
            sends: vec![(10, text("a")), (20, text("a"))],
            checkpoint: None,
            http: None,
            alert: None,
        })
        .await
        .unwrap();
    let rows = state
        .due_sends(SystemTime::now(), vec![], vec![], 10, |_| true)
        .await
        .unwrap();
    for row in rows {
        let result = if row.chat_id == 10 {
            SendResult::Done
        } else {
            SendResult::Failed("Forbidden: bot was blocked by the user".into())
        };
        state.finish_send(row.id, result).await.unwrap();
    }
    arrived
}

fn assert_logged_once(fake: &FakeSeaTable, mailbox: &str) {
    let rows = fake.rows("deliveries");
    assert_eq!(rows.len(), 1, "{rows:?}");
    let row = &rows[0];
    assert_eq!(row["title"], json!("Sales daily"));
    assert_eq!(row["source"], json!("imap"));
    assert_eq!(row["recipients"].as_f64(), Some(2.0), "{row:?}");
    assert_eq!(row["delivered"].as_f64(), Some(1.0), "{row:?}");
    assert_eq!(
        row["failed"],
        json!("20: Forbidden: bot was blocked by the user")
    );
    assert!(
        row["time"].as_str().unwrap().starts_with("2026-05-28"),
        "{row:?}"
    );
    assert!(row["first_send_secs"].as_f64().is_some(), "{row:?}");
    let links: Vec<&str> = row["mailbox"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|link| link["row_id"].as_str())
        .collect();
    assert_eq!(links, vec![mailbox]);
}

#[tokio::test]
async fn a_finished_report_is_logged_once_with_its_counts_and_mailbox() {
    let (fake, mailbox) = base().await;
    let state = State::in_memory().unwrap();
    let log = writer(&fake, &state).await;
    assert!(log.problems().await.unwrap().is_empty());
    finished_report(&state).await;
    assert_eq!(log.flush().await.unwrap(), 1);
    assert_logged_once(&fake, &mailbox);
    // Marked in the state: the next pass writes nothing.
    assert_eq!(log.flush().await.unwrap(), 0);
    assert_logged_once(&fake, &mailbox);
}

#[tokio::test]
async fn a_batch_whose_answer_was_lost_is_not_appended_again() {
    let (fake, mailbox) = base().await;
    let first = State::in_memory().unwrap();
    finished_report(&first).await;
    writer(&fake, &first).await.flush().await.unwrap();
    // A state that does not know the row was written (SeaTable stored the append, the answer
    // never came): the writer finds the report's key and only marks it.
    let second = State::in_memory().unwrap();
    finished_report(&second).await;
    let log = writer(&fake, &second).await;
    assert_eq!(log.flush().await.unwrap(), 1);
    assert_eq!(log.flush().await.unwrap(), 0);
    assert_logged_once(&fake, &mailbox);
}

#[tokio::test]
async fn a_refused_batch_stays_unlogged_and_is_written_by_the_next_pass() {
    let (fake, mailbox) = base().await;
    let state = State::in_memory().unwrap();
    let log = writer(&fake, &state).await;
    finished_report(&state).await;
    fake.fail_next(Endpoint::AppendRows, 500, 1);
    assert!(log.flush().await.is_err());
    assert!(fake.rows("deliveries").is_empty());
    assert_eq!(log.flush().await.unwrap(), 1);
    assert_logged_once(&fake, &mailbox);
}

#[tokio::test]
async fn a_base_without_the_table_names_what_it_lacks_and_apply_is_idempotent() {
    let fake = FakeSeaTable::start(API_TOKEN).await;
    fake.create_default_schema();
    let state = State::in_memory().unwrap();
    let log = writer(&fake, &state).await;
    assert_eq!(
        log.problems().await.unwrap(),
        vec!["table deliveries is missing"]
    );
    let client = client(&fake);
    assert!(
        !delivery_log::table::apply(&client, "deliveries", "mailboxes")
            .await
            .unwrap()
            .is_empty()
    );
    assert!(log.problems().await.unwrap().is_empty());
    assert!(
        delivery_log::table::apply(&client, "deliveries", "mailboxes")
            .await
            .unwrap()
            .is_empty()
    );
    // A column of the wrong type is named.
    let other = FakeSeaTable::start(API_TOKEN).await;
    other.create_default_schema();
    other.create_table(
        "deliveries",
        &[("title", support::seatable::ColumnType::Text)],
    );
    let log = writer(&other, &state).await;
    let problems = log.problems().await.unwrap();
    assert!(
        problems.contains(&"table deliveries has no column failed".to_owned()),
        "{problems:?}"
    );
    assert!(
        problems.contains(&"table deliveries has no column mailbox".to_owned()),
        "{problems:?}"
    );
}

/// The whole relay: a report to a user and to a user who blocked the bot is logged once its
/// sends finished, with the blocked one named, and linked to the stack's mailbox row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_logs_a_report_once_its_sends_finished() {
    const ANN: i64 = 111_222_333;
    const BLOCKED: i64 = 555_666_777;
    let stack = Stack::new().await;
    delivery_log::table::apply(
        &client_with(&stack.seatable, SEATABLE_TOKEN),
        "deliveries",
        "mailboxes",
    )
    .await
    .unwrap();
    stack.add_user("Ann", Some(ANN), &[&stack.mailbox_row]);
    stack.add_user("Blocker", Some(BLOCKED), &[&stack.mailbox_row]);
    stack.telegram.block_chat(BLOCKED);
    let relay = stack.start(&Tuning {
        seatable_extra: "  delivery_log: true".into(),
        ..Tuning::default()
    });
    stack.wait_ready(1).await;
    stack.deliver(&fixture("01_chart_png_report.eml")).await;
    stack
        .wait_for_sends(&[ANN], 1, Duration::from_secs(30))
        .await;
    // The writer's passes are 10 s apart.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    let rows = loop {
        let rows = stack.seatable.rows("deliveries");
        if !rows.is_empty() || tokio::time::Instant::now() > deadline {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(rows.len(), 1, "{rows:?}");
    let row = &rows[0];
    assert_eq!(row["source"], json!("imap"));
    assert_eq!(row["recipients"].as_f64(), Some(2.0), "{row:?}");
    assert_eq!(row["delivered"].as_f64(), Some(1.0), "{row:?}");
    let failed = row["failed"].as_str().unwrap_or_default();
    assert!(
        failed.starts_with(&format!("{BLOCKED}: ")) && failed.contains("blocked by the user"),
        "{failed}"
    );
    assert!(row["first_send_secs"].as_f64().is_some(), "{row:?}");
    assert_eq!(
        row["mailbox"][0]["row_id"].as_str(),
        Some(stack.mailbox_row.as_str())
    );
    relay.stop().await;
    assert_eq!(stack.seatable.rows("deliveries").len(), 1);
}
