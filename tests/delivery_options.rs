//! Per-recipient delivery options end to end (issue 12, items 1–3): forum topics, silent and
//! protected reports, title filters. The whole relay in process against a real Dovecot and the
//! fake SeaTable and Telegram servers, fed over Superset's webhook (the same plan and
//! recipients as an e-mail). Runs on both state backends (`RELAY_TEST_STATE=postgres`).

mod support;

use std::time::Duration;

use serde_json::json;
use support::stack::{Stack, Tuning, run_cli};
use support::superset_webhook::{self as superset, Notification};
use support::telegram::{TopicState, desc};

const WAIT: Duration = Duration::from_secs(60);
const ANN: i64 = 111_222_333;
const BOB: i64 = 222_333_444;
const EVE: i64 = 333_444_555;
/// A forum group whose `topic` is a link to its topic 42.
const FORUM: i64 = -1_001_987_654_321;
/// A forum group whose topic 7 was deleted.
const DELETED: i64 = -1_001_000_000_002;
/// A forum group whose topic 9 is closed.
const CLOSED: i64 = -1_001_000_000_003;
/// A group whose `topic` links to another group's topic.
const MISMATCHED: i64 = -1_001_000_000_004;
/// The mailbox row's webhook token.
const TOKEN: &str = "wh-0123456789abcdef0123456789abcdef";

fn webhook_url(stack: &Stack) -> String {
    format!("{}/ingest/superset/{TOKEN}", stack.http_url())
}

/// Sends a TEXT report titled `title` over the webhook; returns how many chats it was queued
/// for.
async fn send(stack: &Stack, title: &str) -> u64 {
    let mut report = Notification::report(title);
    report.format = "TEXT";
    let (status, body) = superset::send(&superset::client(), &webhook_url(stack), &report).await;
    assert_eq!(status, 200, "{body}");
    body["recipients"].as_u64().unwrap()
}

/// Waits until Telegram answered a send to `chat` with `description`.
async fn wait_refused(stack: &Stack, chat: i64, description: &'static str, n: usize) {
    stack
        .telegram
        .wait_for(
            move |calls| {
                calls
                    .iter()
                    .filter(|c| {
                        c.chat_id == Some(chat) && c.error_description() == Some(description)
                    })
                    .count()
                    >= n
            },
            WAIT,
        )
        .await
        .unwrap_or_else(|e| panic!("no refusal {description:?} for {chat}: {e:?}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_silent_protected_and_title_filters_reach_telegram() {
    let stack = Stack::new().await;
    stack.set_webhook_token(TOKEN);
    let mailbox = stack.mailbox_row.clone();
    stack.seatable.update_row(
        "mailboxes",
        &mailbox,
        json!({"silent": true, "protect_content": true}),
    );
    stack.add_user("Ann", Some(ANN), &[&mailbox]);
    let bob = stack.add_user("Bob", Some(BOB), &[&mailbox]);
    stack
        .seatable
        .update_row("users", &bob, json!({"reports_filter": "Weekly, KPI"}));
    let eve = stack.add_user("Eve", Some(EVE), &[&mailbox]);
    stack
        .seatable
        .update_row("users", &eve, json!({"reports_filter": "/(weekly/"}));
    for (name, chat, topic) in [
        ("Forum", FORUM, "https://t.me/c/1987654321/42"),
        ("Deleted", DELETED, "7"),
        ("Closed", CLOSED, "9"),
        ("Mismatched", MISMATCHED, "https://t.me/c/1987654321/42"),
    ] {
        let row = stack.add_group(name, Some(chat), &[&mailbox]);
        stack
            .seatable
            .update_row("t_chats", &row, json!({"topic": topic}));
    }
    stack.telegram.add_topic(FORUM, 42);
    stack.telegram.add_topic(DELETED, 7);
    stack.telegram.set_topic(DELETED, 7, TopicState::Deleted);
    stack.telegram.add_topic(CLOSED, 9);
    stack.telegram.set_topic(CLOSED, 9, TopicState::Closed);
    let relay = stack.start(&Tuning::default());
    stack.wait_ready(1).await;

    // Ann (no filter) and the three groups with a usable topic; not Bob (his words do not
    // match), not Eve (an invalid regex: nothing, never everything), not the group whose topic
    // link names another chat.
    assert_eq!(send(&stack, "Daily sales").await, 4);
    stack.wait_for_sends(&[ANN, FORUM], 1, WAIT).await;
    for chat in [ANN, FORUM] {
        let call = &stack.ok_sends_to(chat)[0];
        assert!(call.flag("disable_notification"), "{chat}: {call:?}");
        assert!(call.flag("protect_content"), "{chat}: {call:?}");
    }
    assert_eq!(stack.ok_sends_to(ANN)[0].message_thread_id(), None);
    assert_eq!(stack.ok_sends_to(FORUM)[0].message_thread_id(), Some(42));
    // A deleted or closed topic is refused, and the send is not retried into General.
    wait_refused(&stack, DELETED, desc::THREAD_NOT_FOUND, 1).await;
    wait_refused(&stack, CLOSED, desc::TOPIC_CLOSED, 1).await;

    // A title Bob's words match: Bob too.
    assert_eq!(send(&stack, "Weekly KPI review").await, 5);
    stack.wait_for_sends(&[BOB], 1, WAIT).await;
    stack.wait_for_sends(&[ANN, FORUM], 2, WAIT).await;
    let bob_got: Vec<String> = stack
        .ok_sends_to(BOB)
        .iter()
        .map(|c| c.text.clone().unwrap_or_default())
        .collect();
    assert_eq!(bob_got.len(), 1, "{bob_got:?}");
    assert!(bob_got[0].contains("Weekly KPI review"), "{bob_got:?}");
    wait_refused(&stack, DELETED, desc::THREAD_NOT_FOUND, 2).await;
    wait_refused(&stack, CLOSED, desc::TOPIC_CLOSED, 2).await;

    // Each refused topic send was tried once per report: a permanent failure, no retries,
    // never a send without the topic.
    let calls = stack.telegram.calls();
    for chat in [DELETED, CLOSED] {
        let to_chat: Vec<_> = calls
            .iter()
            .filter(|c| c.is_send() && c.chat_id == Some(chat))
            .collect();
        assert_eq!(to_chat.len(), 2, "{chat}: {to_chat:?}");
        assert!(
            to_chat
                .iter()
                .all(|c| c.message_thread_id().is_some() && !c.is_ok())
        );
    }
    for chat in [EVE, MISMATCHED] {
        assert!(
            !calls.iter().any(|c| c.chat_id == Some(chat)),
            "{chat} got a call"
        );
    }
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_unusable_rows_and_the_features_an_old_base_lacks() {
    let stack = Stack::new().await;
    let mailbox = stack.mailbox_row.clone();
    let eve = stack.add_user("Eve", Some(EVE), &[&mailbox]);
    stack
        .seatable
        .update_row("users", &eve, json!({"reports_filter": "/(weekly/"}));
    let group = stack.add_group("Mismatched", Some(MISMATCHED), &[&mailbox]);
    stack.seatable.update_row(
        "t_chats",
        &group,
        json!({"topic": "https://t.me/c/1987654321/42"}),
    );
    // A base from before these columns existed: no silent, protect_content.
    stack.seatable.remove_column("mailboxes", "silent");
    stack.seatable.remove_column("mailboxes", "protect_content");
    let config = stack.write_config(&Tuning::default());
    let config = config.to_str().unwrap().to_owned();
    let (code, out) = tokio::task::spawn_blocking(move || run_cli(&["check", "--config", &config]))
        .await
        .unwrap();
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("seatable: every table and column the relay needs exists"),
        "{out}"
    );
    assert!(
        out.contains("seatable: warning: the SeaTable base lacks optional columns, so these features are off: table mailboxes has no column silent: silent reports are off; table mailboxes has no column protect_content: protected reports are off"),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "FAIL seatable: users row {eve} (Eve): reports_filter: invalid regex: regex parse error: (weekly ^ error: unclosed group; it gets no reports"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "FAIL seatable: t_chats row {group} (Mismatched): topic: the link \"https://t.me/c/1987654321/42\" is for chat -1001987654321, but this group's id_telegram_chat is {MISMATCHED}; it gets no reports"
        )),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_start_up_an_old_base_and_an_unusable_filter_are_named_in_warnings() {
    let stack = Stack::new().await;
    let mailbox = stack.mailbox_row.clone();
    let eve = stack.add_user("Eve", Some(EVE), &[&mailbox]);
    stack
        .seatable
        .update_row("users", &eve, json!({"reports_filter": "/(weekly/"}));
    stack.seatable.remove_column("t_chats", "topic");
    let log = stack.dir.path().join("relay.log");
    let mut child = stack.spawn_binary_logging(&Tuning::default(), &log, "warn");
    stack.wait_ready(1).await;
    child.kill().unwrap();
    child.wait().unwrap();
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("table t_chats has no column topic: forum topics are off"),
        "{logged}"
    );
    assert!(
        logged.contains("An unusable reports_filter") && logged.contains(&eve),
        "{logged}"
    );
}
