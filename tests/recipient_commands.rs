//! What recipients and operators see of their reports: the bot's `/reports`, `/mute` and
//! `/unmute` (a person pauses a mailbox for themselves; the relay then leaves them out, and
//! SeaTable is not touched), and `report-relay history` (per report and per recipient, from
//! the state). Against a real Dovecot and the fake SeaTable and Telegram.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::dovecot::message;
use support::stack::{ADDRESS, Stack, Tuning, run_cli};
use support::telegram::{TgChat, TgUser};

const ANN: i64 = 111_222_333;
const BOB: i64 = 222_333_444;
const BLOCKER: i64 = 333_444_555;
const GROUP: i64 = -1_001_234_567_890;
/// The sysadmin's chat (`telegram.admin_chats`).
const ADMIN: i64 = 900_000_001;
const WAIT: Duration = Duration::from_secs(30);

/// Sends `command` from Ann's private chat and waits for the bot's reply to it.
async fn ask(stack: &Stack, command: &str) -> String {
    let ann = TgUser::new(ANN, "Ann");
    let before = stack
        .telegram
        .calls_of("sendMessage")
        .iter()
        .filter(|c| c.chat_id == Some(ANN))
        .count();
    stack
        .telegram
        .push_command(&TgChat::private(&ann), &ann, command);
    stack
        .telegram
        .wait_for(
            move |calls| {
                calls
                    .iter()
                    .filter(|c| c.method == "sendMessage" && c.chat_id == Some(ANN))
                    .count()
                    > before
            },
            WAIT,
        )
        .await
        .unwrap();
    stack
        .telegram
        .calls_of("sendMessage")
        .into_iter()
        .rfind(|c| c.chat_id == Some(ANN))
        .and_then(|c| c.text)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_pauses_and_resumes_a_mailbox_without_touching_seatable() {
    let stack = Stack::new().await;
    let mailbox = stack.mailbox_row.clone();
    stack.add_user("Ann", Some(ANN), &[&mailbox]);
    stack.add_user("Bob", Some(BOB), &[&mailbox]);
    let relay = stack.start(&Tuning::default());
    stack.wait_ready(1).await;

    let listed = ask(&stack, "/reports").await;
    assert!(
        listed.contains(&format!("• Sales reports ({ADDRESS})")),
        "{listed}"
    );
    assert!(!listed.contains("(paused)"), "{listed}");

    let unknown = ask(&stack, "/mute nobody@example.com").await;
    assert!(
        unknown.contains("You do not receive “nobody@example.com”"),
        "{unknown}"
    );
    let rows_before = stack.seatable.rows("users");
    let muted = ask(&stack, &format!("/mute {}", ADDRESS.to_uppercase())).await;
    assert!(muted.contains("Paused “Sales reports” for you"), "{muted}");
    assert!(ask(&stack, "/reports").await.contains("(paused)"));
    assert_eq!(
        stack.seatable.rows("users"),
        rows_before,
        "SeaTable is not touched"
    );

    // Bob gets the report; Ann, who paused the mailbox, does not.
    stack.deliver(&message("While paused")).await;
    stack.wait_for_sends(&[BOB], 1, WAIT).await;
    // Reports go out in HTML parse mode; the bot's replies are plain text.
    let reports_to_ann = |stack: &Stack| {
        stack
            .ok_sends_to(ANN)
            .into_iter()
            .filter(|c| c.parse_mode.as_deref() == Some("HTML"))
            .count()
    };
    assert_eq!(reports_to_ann(&stack), 0);

    let resumed = ask(&stack, "/unmute").await;
    assert!(resumed.contains("Resumed the paused mailbox"), "{resumed}");
    stack.deliver(&message("After")).await;
    stack.wait_for_sends(&[BOB], 2, WAIT).await;
    stack
        .telegram
        .wait_for(
            |calls| {
                calls.iter().any(|c| {
                    c.is_ok() && c.chat_id == Some(ANN) && c.parse_mode.as_deref() == Some("HTML")
                })
            },
            WAIT,
        )
        .await
        .unwrap();
    assert_eq!(reports_to_ann(&stack), 1, "only the report after /unmute");
    assert!(ask(&stack, "/unmute").await.contains("Nothing was paused"));
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_lists_its_reports_but_cannot_mute() {
    let stack = Stack::new().await;
    let mailbox = stack.mailbox_row.clone();
    let ops = stack.add_group("Ops", Some(GROUP), &[&mailbox]);
    stack.seatable.update_row(
        "t_chats",
        &ops,
        serde_json::json!({"reports_filter": "sales, weekly"}),
    );
    let relay = stack.start(&Tuning::default());
    stack.wait_ready(1).await;
    let admin = TgUser::new(ANN, "Ann");
    let group = TgChat::supergroup(GROUP, "Ops");
    for (command, expected) in [
        ("/reports", format!("• Sales reports ({ADDRESS})")),
        (
            "/reports",
            "Only reports whose title matches: sales, weekly".to_owned(),
        ),
        (
            "/mute reports",
            "Only a person can pause reports".to_owned(),
        ),
    ] {
        let before = stack.telegram.sends_to(GROUP).len();
        stack.telegram.push_command(&group, &admin, command);
        stack
            .telegram
            .wait_for(
                move |calls| {
                    calls
                        .iter()
                        .filter(|c| c.is_send() && c.chat_id == Some(GROUP))
                        .count()
                        > before
                },
                WAIT,
            )
            .await
            .unwrap();
        let reply = stack.telegram.sends_to(GROUP).pop().unwrap().text.unwrap();
        assert!(reply.contains(&expected), "{command}: {reply}");
    }
    relay.stop().await;
}

/// `history` prints each report with each recipient's outcome, as text and as JSON Lines,
/// beside the running relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_shows_each_report_and_each_recipients_outcome() {
    let stack = Stack::new().await;
    let mailbox = stack.mailbox_row.clone();
    stack.add_user("Ann", Some(ANN), &[&mailbox]);
    stack.add_user("Blocker", Some(BLOCKER), &[&mailbox]);
    stack.telegram.block_chat(BLOCKER);
    // With an admin chat, which is told about the blocked recipient: the alert is in the
    // outbox too, but history shows reports only.
    let tuning = Tuning {
        telegram_extra: format!("  admin_chats: [{ADMIN}]"),
        ..Tuning::default()
    };
    let relay = stack.start(&tuning);
    stack.wait_ready(1).await;
    stack.deliver(&message("Weekly numbers")).await;
    stack.wait_for_sends(&[ANN, ADMIN], 1, WAIT).await;
    let config = stack.write_config(&tuning);
    let history = |args: Vec<String>| async move {
        tokio::task::spawn_blocking(move || {
            run_cli(&args.iter().map(String::as_str).collect::<Vec<_>>())
        })
        .await
        .unwrap()
    };
    let base = vec![
        "history".to_owned(),
        "--config".to_owned(),
        config.to_str().unwrap().to_owned(),
    ];
    // Until the blocked send is recorded as failed.
    let deadline = tokio::time::Instant::now() + WAIT;
    let text = loop {
        let (code, out) = history(base.clone()).await;
        assert_eq!(code, 0, "{out}");
        if out.contains("failed   Blocker") {
            break out;
        }
        assert!(tokio::time::Instant::now() < deadline, "{out}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("history printed:\n{text}");
    assert!(
        text.contains(&format!(
            "{ADDRESS}  imap  \"Weekly numbers\"  queued: 2 recipients, 1 sent, 1 failed, 0 pending"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("    sent     Ann ({ANN})")),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "    failed   Blocker ({BLOCKER}): Forbidden: bot was blocked by the user"
        )),
        "{text}"
    );

    assert_eq!(
        text.matches("queued:").count(),
        1,
        "one report, no alert: {text}"
    );
    assert!(!text.contains("admin alert"), "{text}");

    let mut json_args = base.clone();
    json_args.extend(["--json", "--since", "1h", "--mailbox"].map(str::to_owned));
    json_args.push(ADDRESS.to_uppercase());
    let (code, out) = history(json_args).await;
    assert_eq!(code, 0, "{out}");
    let reports: Vec<Value> = out
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(reports.len(), 1, "{out}");
    let report = &reports[0];
    assert_eq!(report["title"], "Weekly numbers");
    assert_eq!(report["source"], "imap");
    let recipients = report["recipients"].as_array().unwrap();
    assert_eq!(recipients.len(), 2);
    let ann = recipients.iter().find(|r| r["chat_id"] == ANN).unwrap();
    assert_eq!(ann["outcome"], "sent");
    assert_eq!(ann["name"], "Ann");
    assert!(ann["first_send_secs"].as_f64().unwrap() > 0.0);

    let mut other = base.clone();
    other.extend(["--mailbox", "other@example.com"].map(str::to_owned));
    let (code, out) = history(other).await;
    assert_eq!(code, 0);
    assert!(out.starts_with("No reports since "), "{out}");
    let mut bad = base;
    bad.extend(["--since", "yesterday"].map(str::to_owned));
    let (code, out) = history(bad).await;
    assert_ne!(code, 0);
    assert!(out.contains("expected a duration such as 24h"), "{out}");
    relay.stop().await;
}
