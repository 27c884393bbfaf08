//! Admin alerts end to end (issue 12, item 5): the whole relay in process against a real
//! Dovecot and the fake SeaTable and Telegram servers, with `telegram.admin_chats` set and a
//! threshold of a few seconds instead of 10 minutes. Each condition is told once, in plain
//! words, and once more when it clears; the alerts go through the outbox to the admin chat.
//! Runs on both state backends (`RELAY_TEST_STATE=postgres`).

mod support;

use std::time::Duration;

use serde_json::json;
use support::seatable::{Endpoint, Outage};
use support::stack::{ADDRESS, PASSWORD, Stack, Tuning, fixture};
use support::telegram::{Call, TopicState};

const WAIT: Duration = Duration::from_secs(60);
/// The sysadmin's chat.
const ADMIN: i64 = 900_000_001;
const ANN: i64 = 111_222_333;
/// A forum group whose reports go to one topic.
const FORUM: i64 = -1_001_987_654_321;

/// The stack's tuning with alerts to [`ADMIN`] after `after_secs`, the directory fresh for a
/// second and the mailboxes re-read every second.
fn alerting(after_secs: u64) -> Tuning {
    Tuning {
        cache_ttl_secs: 1,
        reload_secs: 1,
        telegram_extra: format!("  admin_chats: [{ADMIN}]\n  admin_alert_after_secs: {after_secs}"),
        ..Tuning::default()
    }
}

/// The texts the admin chat got, in order.
fn alerts(stack: &Stack) -> Vec<String> {
    stack
        .ok_sends_to(ADMIN)
        .into_iter()
        .map(|call| call.text.unwrap_or_default())
        .collect()
}

/// Waits until the admin chat got `n` messages, the last containing every one of `words`;
/// returns the texts.
async fn wait_alerts(stack: &Stack, n: usize, words: &[&str]) -> Vec<String> {
    let words: Vec<String> = words.iter().map(|w| (*w).to_owned()).collect();
    let wanted = words.clone();
    let found = stack
        .telegram
        .wait_for(
            move |calls: &[Call]| {
                let texts: Vec<&str> = calls
                    .iter()
                    .filter(|c| c.is_send() && c.is_ok() && c.chat_id == Some(ADMIN))
                    .filter_map(|c| c.text.as_deref())
                    .collect();
                texts.len() >= n && wanted.iter().all(|w| texts[n - 1].contains(w.as_str()))
            },
            WAIT,
        )
        .await;
    assert!(
        found.is_ok(),
        "alert {n} with {words:?} did not arrive; the admin chat got {:#?}",
        alerts(stack)
    );
    alerts(stack)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_mailbox_is_told_once_and_again_when_it_connects() {
    let stack = Stack::new().await;
    stack.add_user("Ann", Some(ANN), &[&stack.mailbox_row.clone()]);
    // The row's password overrides the config's: a sysadmin's typo.
    stack.seatable.update_row(
        "mailboxes",
        &stack.mailbox_row,
        json!({"imap_password": "not-the-password"}),
    );
    let relay = stack.start(&alerting(4));
    let texts = wait_alerts(
        &stack,
        1,
        &["⚠️", ADDRESS, "failed to connect", "authentication failed"],
    )
    .await;
    assert!(texts[0].contains("keeps trying"), "{texts:?}");

    // The watcher goes on failing (Dovecot logs each refused login): still one alert.
    let refused = |stack: &Stack| stack.dovecot.read_log().matches("auth failed").count();
    let before = refused(&stack);
    let deadline = tokio::time::Instant::now() + WAIT;
    while refused(&stack) < before + 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no more refused logins"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(alerts(&stack).len(), 1, "{:#?}", alerts(&stack));

    // The sysadmin fixes the row: the watcher restarts, connects, and the all-clear follows.
    stack.seatable.update_row(
        "mailboxes",
        &stack.mailbox_row,
        json!({"imap_password": PASSWORD}),
    );
    let texts = wait_alerts(&stack, 2, &["✅", ADDRESS, "connected again"]).await;
    assert_eq!(texts.len(), 2, "{texts:#?}");
    // Alerts are messages to the admin chat only, in HTML.
    let call = &stack.ok_sends_to(ADMIN)[0];
    assert_eq!(call.method, "sendMessage");
    assert_eq!(call.parse_mode.as_deref(), Some("HTML"));
    assert!(stack.ok_sends_to(ANN).is_empty());
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unparseable_report_is_told_and_the_next_good_one_clears_it() {
    let stack = Stack::new().await;
    stack.add_user("Ann", Some(ANN), &[&stack.mailbox_row.clone()]);
    let relay = stack.start(&alerting(4));
    stack.wait_ready(1).await;

    // A report cut short in transit, twice: one alert.
    let full = fixture("03_dashboard_pdf_report.eml");
    let cut = &full[..full.len() / 2];
    let uid = stack.deliver(cut).await;
    let texts = wait_alerts(
        &stack,
        1,
        &[
            "⚠️",
            ADDRESS,
            &format!("UID {uid}"),
            "could not be read as a report",
            "truncated",
        ],
    )
    .await;
    assert_eq!(texts.len(), 1);
    stack.deliver(cut).await;

    // The next report parses: it goes out, and the admin hears that it cleared.
    stack.deliver(&full).await;
    stack.wait_for_sends(&[ANN], 1, WAIT).await;
    let texts = wait_alerts(&stack, 2, &["✅", ADDRESS, "readable reports again"]).await;
    assert_eq!(
        texts.len(),
        2,
        "the second cut report was not told again: {texts:#?}"
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_topic_is_told_once_and_cleared_when_the_group_gets_reports_again() {
    let stack = Stack::new().await;
    let group = stack.add_group("Sales forum", Some(FORUM), &[&stack.mailbox_row.clone()]);
    stack
        .seatable
        .update_row("t_chats", &group, json!({"topic": "7"}));
    stack.telegram.add_topic(FORUM, 7);
    stack.telegram.set_topic(FORUM, 7, TopicState::Deleted);
    stack.telegram.add_topic(FORUM, 8);
    let relay = stack.start(&alerting(4));
    stack.wait_ready(1).await;

    let report = fixture("01_chart_png_report.eml");
    stack.deliver(&report).await;
    let texts = wait_alerts(
        &stack,
        1,
        &[
            "⚠️",
            "Sales forum",
            &FORUM.to_string(),
            "message thread not found",
            "t_chats.topic",
        ],
    )
    .await;
    assert_eq!(texts.len(), 1);
    // The next report fails there too, and is not told again.
    stack.deliver(&fixture("03_dashboard_pdf_report.eml")).await;
    stack
        .telegram
        .wait_for(
            |calls: &[Call]| {
                calls
                    .iter()
                    .filter(|c| c.chat_id == Some(FORUM) && !c.is_ok())
                    .count()
                    >= 2
            },
            WAIT,
        )
        .await
        .expect("the second report is refused too");

    // The sysadmin points the group at another topic: the next report reaches it.
    stack
        .seatable
        .update_row("t_chats", &group, json!({"topic": "8"}));
    // Two whole reads of the three tables after the change: the directory has it.
    let reads = stack.seatable.requests(Endpoint::ListRows);
    tokio::time::timeout(
        WAIT,
        stack
            .seatable
            .wait_for_requests(Endpoint::ListRows, reads + 6),
    )
    .await
    .expect("the directory is read again");
    stack.deliver(&fixture("04_chart_csv_report.eml")).await;
    let texts = wait_alerts(&stack, 2, &["✅", "Sales forum", "receives reports again"]).await;
    assert_eq!(texts.len(), 2, "{texts:#?}");
    assert!(
        stack
            .ok_sends_to(FORUM)
            .iter()
            .all(|c| c.message_thread_id() == Some(8))
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_seatable_and_a_missing_column_are_told_and_cleared() {
    let stack = Stack::new().await;
    stack.add_user("Ann", Some(ANN), &[&stack.mailbox_row.clone()]);
    let tuning = alerting(5);
    let relay = stack.start(&tuning);
    stack.wait_ready(1).await;
    relay.stop().await;

    // SeaTable is down at the start, and comes back without a column the relay writes.
    stack.seatable.go_down(Outage::ConnectionRefused).await;
    stack.seatable.remove_column("mailboxes", "last_uid");
    let relay = stack.start(&tuning);
    wait_alerts(
        &stack,
        1,
        &[
            "⚠️",
            "has not been able to read the SeaTable base",
            "users and groups it read last",
        ],
    )
    .await;
    // Reports still go out, from the last directory read.
    stack.deliver(&fixture("01_chart_png_report.eml")).await;
    stack.wait_for_sends(&[ANN], 1, WAIT).await;

    stack.seatable.come_back().await;
    let texts = wait_alerts(&stack, 3, &[]).await;
    let (schema, cleared): (Vec<&String>, Vec<&String>) = texts[1..]
        .iter()
        .partition(|text| text.contains("holds back its writes to SeaTable"));
    assert_eq!(schema.len(), 1, "{texts:#?}");
    assert!(
        schema[0].contains("last_uid") && schema[0].contains("schema apply"),
        "{texts:#?}"
    );
    assert!(
        cleared[0].contains("reads the SeaTable base again"),
        "{texts:#?}"
    );

    // The sysadmin runs `schema apply` (here: adds the column back).
    stack
        .seatable
        .add_column("mailboxes", "last_uid", support::seatable::ColumnType::Text);
    let texts = wait_alerts(&stack, 4, &["✅", "schema problem is fixed"]).await;
    assert_eq!(texts.len(), 4, "{texts:#?}");
    relay.stop().await;
}
