//! The state's behaviour, the same on both backends: every test runs on SQLite and on a real
//! PostgreSQL (its own cluster, `support::postgres`).

mod support;

use std::time::{Duration, SystemTime};

use report_relay::report::render::{ItemKind, Method};
use report_relay::state::{
    AckResult, Acknowledgement, AlertChange, Checkpoint, Fence, HttpIngest, INGEST_DEDUPE_WINDOW,
    LeaseLost, MessageOutcome, OutboxItem, OutboxSend, SendOptions, SendResult, Source, State,
    StoredFile,
};

/// Where a test's state lives: a SQLite file in a temp dir, or its own PostgreSQL server.
enum Db {
    Sqlite(tempfile::TempDir),
    Postgres(support::postgres::Postgres),
}

impl Db {
    async fn sqlite() -> Self {
        Self::Sqlite(tempfile::tempdir().unwrap())
    }

    async fn postgres() -> Self {
        Self::Postgres(support::postgres::Postgres::start().await.unwrap())
    }

    /// Opens the state (again: a reopen sees what an earlier handle wrote).
    async fn open(&self) -> State {
        match self {
            Self::Sqlite(dir) => State::open(&dir.path().join("sub/state.db")).unwrap(),
            Self::Postgres(server) => State::connect(&server.url()).await.unwrap(),
        }
    }

    /// Opens the state as a tool beside a running relay does (`oauth login`, `check`):
    /// SQLite without the relay's process lock.
    async fn open_beside(&self) -> State {
        let config = report_relay::config::StateConfig {
            path: match self {
                Self::Sqlite(dir) => Some(dir.path().join("sub/state.db")),
                Self::Postgres(_) => None,
            },
            url: match self {
                Self::Sqlite(_) => None,
                Self::Postgres(server) => Some(server.url().into()),
            },
            lease_secs: 15,
            replica_id: None,
        };
        State::beside_relay(&config).await.unwrap()
    }

    /// Replaces the send of `chat_id`'s first outbox row with JSON no version can read.
    async fn damage_first_row_of(&self, state: &State, chat_id: i64) {
        const SQL: &str = "UPDATE outbox SET send = '{\"method\": \"sendCarrierPigeon\"}' \
                           WHERE id = (SELECT MIN(id) FROM outbox WHERE chat_id = $1)";
        match self {
            Self::Sqlite(dir) => {
                let conn = rusqlite::Connection::open(dir.path().join("sub/state.db")).unwrap();
                conn.execute(&SQL.replace("$1", "?1"), [chat_id]).unwrap();
            }
            Self::Postgres(_) => {
                let pool = state.postgres().unwrap().pool();
                sqlx::query(SQL).bind(chat_id).execute(pool).await.unwrap();
            }
        }
    }

    /// The error stored with the (only) failed outbox row.
    async fn failed_error(&self, state: &State) -> String {
        const SQL: &str = "SELECT error FROM outbox WHERE status = 'failed'";
        match self {
            Self::Sqlite(dir) => {
                let conn = rusqlite::Connection::open(dir.path().join("sub/state.db")).unwrap();
                conn.query_row(SQL, [], |row| row.get(0)).unwrap()
            }
            Self::Postgres(_) => sqlx::query_scalar(SQL)
                .fetch_one(state.postgres().unwrap().pool())
                .await
                .unwrap(),
        }
    }
}

/// One `#[tokio::test]` per backend for each named test body.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test] async fn $name() { super::$name(super::Db::sqlite().await).await })*
        }
        mod postgres {
            $(#[tokio::test] async fn $name() { super::$name(super::Db::postgres().await).await })*
        }
    };
}

fn send(text: &str) -> OutboxSend {
    OutboxSend {
        method: Method::SendMessage,
        items: Vec::new(),
        text: Some(text.into()),
        options: Default::default(),
    }
}

fn ack(uid: u32, sends: Vec<(i64, OutboxSend)>) -> Acknowledgement {
    Acknowledgement {
        mailbox: "reports@example.com".into(),
        uid: Some(Checkpoint {
            uid_validity: 7,
            last_uid: uid,
        }),
        raw_sha256: format!("sha-{uid}"),
        title: "T".into(),
        outcome: MessageOutcome::Queued,
        detail: None,
        received_at: None,
        files: vec![StoredFile {
            sha256: "f1".into(),
            bytes: bytes::Bytes::from_static(b"png"),
        }],
        sends,
        checkpoint: Some(Checkpoint {
            uid_validity: 7,
            last_uid: uid,
        }),
        http: None,
        alert: None,
    }
}

/// A report that came over HTTP from `source`, keyed by `key` for `window`.
fn http_ack(
    source: Source,
    key: Option<&str>,
    window: Duration,
    sends: Vec<(i64, OutboxSend)>,
) -> Acknowledgement {
    Acknowledgement {
        uid: None,
        checkpoint: None,
        raw_sha256: "content".into(),
        http: Some(HttpIngest {
            source,
            dedupe_key: key.map(str::to_owned),
            window,
        }),
        alert: None,
        ..ack(0, sends)
    }
}

on_both_backends!(
    acknowledge_writes_message_outbox_and_checkpoint_together,
    retries_wait_and_migrations_move_pending_rows,
    file_ids_snapshot_and_chat_status_persist_across_reopen,
    prune_keeps_pending_work_and_drops_old_finished_work,
    a_reused_uid_with_new_content_is_not_a_duplicate,
    a_row_in_flight_is_not_handed_out_again_after_a_migration,
    replays_are_keyed_by_content_hash,
    admit_refusing_a_head_keeps_its_chat_blocked,
    a_replay_and_imap_dedupe_against_each_other_even_after_pruning,
    an_unreadable_outbox_row_is_failed_and_the_rows_after_it_go,
    recent_sends_are_the_done_rows_with_their_message_counts,
    a_refresh_token_is_stored_per_account_and_replaced,
    http_reports_dedupe_by_key_within_their_window_and_keep_their_source,
    mutes_are_per_person_and_mailbox,
    messages_since_lists_reports_with_their_sends,
    finished_reports_are_listed_for_the_delivery_log_until_marked,
    send_options_are_kept_per_row_and_rows_without_them_read_as_off,
    an_alert_is_queued_once_per_raise_and_once_per_clear,
);

/// An admin alert for `key` to chats 1 and 2.
fn alert_ack(change: AlertChange) -> Acknowledgement {
    Acknowledgement {
        mailbox: "(admin alert)".into(),
        uid: None,
        checkpoint: None,
        raw_sha256: format!("{change:?}"),
        files: Vec::new(),
        alert: Some(change),
        ..ack(0, vec![(1, send("alert")), (2, send("alert"))])
    }
}

/// Whether acknowledging `ack` stored something (not a duplicate).
async fn queued(state: &State, ack: Acknowledgement) -> bool {
    matches!(state.acknowledge(ack).await.unwrap(), AckResult::Stored(_))
}

/// Raising a raised condition, or clearing a cleared one, writes nothing (another replica, or
/// an earlier run, told it); alerts are in the outbox as `alert` messages and never in the
/// delivery log.
async fn an_alert_is_queued_once_per_raise_and_once_per_clear(db: Db) {
    let state = db.open().await;
    let raise = |key: &str| {
        alert_ack(AlertChange::Raise {
            key: key.into(),
            text: format!("raised {key}"),
        })
    };
    let clear = |key: &str| alert_ack(AlertChange::Clear { key: key.into() });
    assert!(queued(&state, raise("directory")).await);
    assert!(!queued(&state, raise("directory")).await);
    // A second handle (a replica) sees it raised.
    let other = db.open_beside().await;
    assert!(!queued(&other, raise("directory")).await);
    assert!(queued(&other, raise("recipient:5")).await);
    let raised = state.raised_alerts().await.unwrap();
    let keys: Vec<&str> = raised.iter().map(|a| a.key.as_str()).collect();
    assert_eq!(keys, vec!["directory", "recipient:5"]);
    assert_eq!(raised[0].text, "raised directory");

    assert!(
        !queued(&state, clear("schema")).await,
        "a condition never raised does not clear"
    );
    assert!(queued(&state, clear("directory")).await);
    assert!(!queued(&other, clear("directory")).await);
    // Raised again after it cleared: told again.
    assert!(queued(&state, raise("directory")).await);

    // Four alerts were queued, each to both chats, as `alert` messages.
    let messages = state
        .messages_since(SystemTime::UNIX_EPOCH, None)
        .await
        .unwrap();
    assert_eq!(messages.len(), 4, "{messages:?}");
    assert!(
        messages
            .iter()
            .all(|m| m.source == Source::Alert && m.sends.len() == 2)
    );
    let rows = state
        .due_sends(SystemTime::now(), vec![], vec![], 10, |_| true)
        .await
        .unwrap();
    assert_eq!(rows.len(), 2, "the head row of chats 1 and 2");
    assert!(rows.iter().all(|r| r.source == Source::Alert));
    for row in rows {
        state.finish_send(row.id, SendResult::Done).await.unwrap();
    }
    // Sent alerts are not reports: the delivery log leaves them out.
    loop {
        let rows = state
            .due_sends(SystemTime::now(), vec![], vec![], 10, |_| true)
            .await
            .unwrap();
        if rows.is_empty() {
            break;
        }
        for row in rows {
            state.finish_send(row.id, SendResult::Done).await.unwrap();
        }
    }
    assert_eq!(
        state
            .send_counts(messages.iter().map(|m| m.id).collect())
            .await
            .unwrap()
            .done,
        8
    );
    assert!(state.unlogged_reports(10).await.unwrap().is_empty());
}

/// A group's topic and a mailbox's `silent`/`protect_content` travel with each outbox row; a row
/// written before they existed (no `options` in its JSON) reads as all off.
async fn send_options_are_kept_per_row_and_rows_without_them_read_as_off(db: Db) {
    let state = db.open().await;
    let options = SendOptions {
        message_thread_id: Some(42),
        disable_notification: true,
        protect_content: true,
    };
    state
        .acknowledge(ack(
            1,
            vec![
                (-1_001_987_654_321, send("to the topic").with(options)),
                (7, send("plain")),
            ],
        ))
        .await
        .unwrap();
    let due = state
        .due_sends(SystemTime::now(), vec![], vec![], 10, |_| true)
        .await
        .unwrap();
    let topic = due
        .iter()
        .find(|r| r.chat_id == -1_001_987_654_321)
        .unwrap();
    assert_eq!(topic.send.options, options);
    assert_eq!(topic.send.text.as_deref(), Some("to the topic"));
    let plain = due.iter().find(|r| r.chat_id == 7).unwrap();
    assert_eq!(plain.send.options, SendOptions::default());

    // The JSON of a row without options is what older versions wrote, and reads back.
    let old = serde_json::to_value(send("plain")).unwrap();
    assert!(old.get("options").is_none(), "{old}");
    let back: OutboxSend = serde_json::from_value(old).unwrap();
    assert_eq!(back.options, SendOptions::default());
    let new = serde_json::to_value(send("x").with(options)).unwrap();
    assert_eq!(
        new["options"],
        serde_json::json!({"message_thread_id": 42, "disable_notification": true, "protect_content": true})
    );
}

async fn finished_reports_are_listed_for_the_delivery_log_until_marked(db: Db) {
    let state = db.open().await;
    // Report 1: two recipients, one of them with two sends. Report 2: one recipient.
    state
        .acknowledge(ack(
            1,
            vec![(10, send("a")), (20, send("b")), (20, send("c"))],
        ))
        .await
        .unwrap();
    state
        .acknowledge(ack(2, vec![(30, send("d"))]))
        .await
        .unwrap();
    // Nothing is finished yet.
    assert!(state.unlogged_reports(10).await.unwrap().is_empty());

    let rows = state
        .due_sends(SystemTime::now(), vec![], vec![], 10, |_| true)
        .await
        .unwrap();
    assert_eq!(rows.len(), 3, "the head row of chats 10, 20 and 30");
    // Finish every row of report 1: chat 10 done, chat 20 fails for good (rest failed too).
    let first = rows.iter().find(|r| r.chat_id == 10).unwrap();
    state.finish_send(first.id, SendResult::Done).await.unwrap();
    let twenty = rows.iter().find(|r| r.chat_id == 20).unwrap();
    state
        .finish_send(
            twenty.id,
            SendResult::Failed("Forbidden: bot was blocked by the user".into()),
        )
        .await
        .unwrap();
    state
        .fail_rest_of_message(
            twenty.message_id,
            20,
            "Forbidden: bot was blocked by the user".into(),
        )
        .await
        .unwrap();

    // Report 1 is finished; report 2 still has a pending send, so it is not listed.
    let unlogged = state.unlogged_reports(10).await.unwrap();
    assert_eq!(unlogged.len(), 1, "{unlogged:?}");
    let report = &unlogged[0];
    assert_eq!(report.id, first.message_id);
    assert_eq!(report.mailbox, "reports@example.com");
    assert_eq!(report.title, "T");
    assert_eq!(report.source, Source::Imap);
    let outcomes: Vec<(i64, &str, Option<&str>)> = report
        .sends
        .iter()
        .map(|s| (s.chat_id, s.status.as_str(), s.error.as_deref()))
        .collect();
    assert_eq!(
        outcomes,
        vec![
            (10, "done", None),
            (20, "failed", Some("Forbidden: bot was blocked by the user")),
            (20, "failed", Some("Forbidden: bot was blocked by the user")),
        ]
    );
    assert!(report.sends[0].finished_at.is_some());

    // Marked (twice is harmless), it is never listed again, also after a reopen.
    state.mark_logged(vec![report.id]).await.unwrap();
    state.mark_logged(vec![report.id]).await.unwrap();
    assert!(state.unlogged_reports(10).await.unwrap().is_empty());
    drop(state);
    let state = db.open().await;
    assert!(state.unlogged_reports(10).await.unwrap().is_empty());

    // Report 2 finishes and is listed; the limit counts reports, not rows.
    let thirty = rows.iter().find(|r| r.chat_id == 30).unwrap();
    state
        .finish_send(thirty.id, SendResult::Done)
        .await
        .unwrap();
    let unlogged = state.unlogged_reports(1).await.unwrap();
    assert_eq!(unlogged.len(), 1);
    assert_eq!(unlogged[0].sends.len(), 1);
    assert_eq!(unlogged[0].sends[0].chat_id, 30);
}

async fn mutes_are_per_person_and_mailbox(db: Db) {
    let state = db.open().await;
    assert!(state.mute(1, "Reports@Example.com").await.unwrap());
    assert!(!state.mute(1, "reports@example.com").await.unwrap(), "once");
    assert!(state.mute(1, "ops@example.com").await.unwrap());
    assert!(state.mute(2, "reports@example.com").await.unwrap());
    assert_eq!(
        state.mutes_of(1).await.unwrap(),
        ["ops@example.com", "reports@example.com"]
    );
    let muted = state.muted_chats("REPORTS@example.com").await.unwrap();
    assert_eq!(muted, [1, 2].into_iter().collect());
    assert_eq!(
        state.unmute(1, Some("reports@example.com")).await.unwrap(),
        1
    );
    assert_eq!(
        state.unmute(1, Some("reports@example.com")).await.unwrap(),
        0
    );
    assert_eq!(state.unmute(2, None).await.unwrap(), 1);
    assert_eq!(
        state.muted_chats("reports@example.com").await.unwrap(),
        Default::default()
    );
    assert_eq!(state.mutes_of(1).await.unwrap(), ["ops@example.com"]);
}

async fn messages_since_lists_reports_with_their_sends(db: Db) {
    let state = db.open().await;
    let before = SystemTime::now() - Duration::from_secs(1);
    state
        .acknowledge(ack(3, vec![(1, send("a")), (2, send("a")), (1, send("b"))]))
        .await
        .unwrap();
    let due = state
        .due_sends(SystemTime::now(), vec![], vec![], 10, |_| true)
        .await
        .unwrap();
    let first = due.iter().find(|r| r.chat_id == 1).unwrap().id;
    state.finish_send(first, SendResult::Done).await.unwrap();
    let two = due.iter().find(|r| r.chat_id == 2).unwrap().id;
    state
        .finish_send(
            two,
            SendResult::Failed("Forbidden: bot was blocked by the user".into()),
        )
        .await
        .unwrap();
    let messages = state.messages_since(before, None).await.unwrap();
    assert_eq!(messages.len(), 1);
    let message = &messages[0];
    assert_eq!(message.mailbox, "reports@example.com");
    let sends: Vec<(i64, &str)> = message
        .sends
        .iter()
        .map(|s| (s.chat_id, s.status.as_str()))
        .collect();
    assert_eq!(sends, [(1, "done"), (2, "failed"), (1, "pending")]);
    assert!(message.sends[0].finished_at.is_some());
    assert!(message.sends[2].finished_at.is_none());
    assert_eq!(
        message.sends[1].error.as_deref(),
        Some("Forbidden: bot was blocked by the user")
    );
    let by_mailbox = state
        .messages_since(before, Some("REPORTS@example.com"))
        .await
        .unwrap();
    assert_eq!(by_mailbox.len(), 1);
    assert!(
        state
            .messages_since(before, Some("other@example.com"))
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        state
            .messages_since(SystemTime::now() + Duration::from_secs(5), None)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn a_refresh_token_is_stored_per_account_and_replaced(db: Db) {
    use secrecy::{ExposeSecret, SecretString};
    let state = db.open().await;
    assert!(
        state
            .refresh_token("bi@company.com")
            .await
            .unwrap()
            .is_none()
    );
    // Stored, then replaced by rotation, for the same or another client; names match
    // case-insensitively.
    let mut stored = None;
    for (name, client, token) in [
        ("BI@company.com", "app-1", "1.refresh-first"),
        ("bi@company.com", "app-2", "1.refresh-second"),
    ] {
        state
            .store_refresh_token(name, client, &SecretString::from(token))
            .await
            .unwrap();
        let read = state
            .refresh_token("Bi@Company.com")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(read.client_id, client);
        assert_eq!(read.refresh_token.expose_secret(), token);
        stored = Some(read);
    }
    let stored = stored.unwrap();
    assert!(
        state
            .refresh_token("other@company.com")
            .await
            .unwrap()
            .is_none()
    );
    assert!(!format!("{stored:?}").contains("refresh-second"));
    // `oauth login` beside the running relay (which holds SQLite's process lock) stores a new
    // one, and the relay's handle reads it at its next refresh.
    let beside = db.open_beside().await;
    let third = SecretString::from("1.refresh-third");
    beside
        .store_refresh_token("bi@company.com", "app-2", &third)
        .await
        .unwrap();
    let stored = state
        .refresh_token("bi@company.com")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.refresh_token.expose_secret(), "1.refresh-third");
}

async fn http_reports_dedupe_by_key_within_their_window_and_keep_their_source(db: Db) {
    let state = db.open().await;
    let day = INGEST_DEDUPE_WINDOW;
    let webhook = |key| {
        http_ack(
            Source::SupersetWebhook,
            key,
            day,
            vec![(1, send("a")), (2, send("a"))],
        )
    };
    let AckResult::Stored(first) = state.acknowledge(webhook(Some("k1"))).await.unwrap() else {
        panic!("the first request is stored");
    };
    // A retry: acknowledged again, nothing new queued, the first message named.
    assert_eq!(
        state.acknowledge(webhook(Some("k1"))).await.unwrap(),
        AckResult::Duplicate
    );
    assert_eq!(
        state.ingest_key_message("k1", day).await.unwrap(),
        Some(first)
    );
    assert_eq!(state.ingest_key_message("k2", day).await.unwrap(), None);
    assert_eq!(state.pending_count().await.unwrap(), 2);
    // The same content is not in the replay ledger: a replay of it is no duplicate, nor is an
    // API call without an Idempotency-Key, twice.
    let api = || http_ack(Source::Api, None, day, vec![(3, send("b"))]);
    assert!(matches!(
        state.acknowledge(api()).await.unwrap(),
        AckResult::Stored(_)
    ));
    assert!(matches!(
        state.acknowledge(api()).await.unwrap(),
        AckResult::Stored(_)
    ));
    let replay = Acknowledgement {
        uid: None,
        checkpoint: None,
        raw_sha256: "content".into(),
        ..ack(0, vec![])
    };
    assert!(matches!(
        state.acknowledge(replay).await.unwrap(),
        AckResult::Stored(_)
    ));
    // Past the window the same key is a new report.
    let moment = Duration::from_millis(5);
    tokio::time::sleep(moment * 2).await;
    let late = http_ack(
        Source::SupersetWebhook,
        Some("k1"),
        moment,
        vec![(1, send("c"))],
    );
    let AckResult::Stored(second) = state.acknowledge(late).await.unwrap() else {
        panic!("a request past its window is a new report");
    };
    assert_eq!(
        state.ingest_key_message("k1", day).await.unwrap(),
        Some(second)
    );

    let status = state.message_status(first).await.unwrap().unwrap();
    assert_eq!(status.source, Source::SupersetWebhook);
    assert_eq!(status.mailbox, "reports@example.com");
    assert_eq!(status.outcome, MessageOutcome::Queued);
    let chats: Vec<_> = status
        .sends
        .iter()
        .map(|s| (s.chat_id, s.status.as_str()))
        .collect();
    assert_eq!(chats, [(1, "pending"), (2, "pending")]);
    assert!(state.message_status(first + 1000).await.unwrap().is_none());

    let due = state
        .due_sends(SystemTime::now(), vec![], vec![], 10, |_| true)
        .await
        .unwrap();
    let row = due.iter().find(|r| r.chat_id == 2).unwrap();
    assert_eq!(row.source, Source::SupersetWebhook);
    state
        .finish_send(
            row.id,
            SendResult::Failed("Forbidden: bot was blocked by the user".into()),
        )
        .await
        .unwrap();
    let status = state.message_status(first).await.unwrap().unwrap();
    assert_eq!(status.sends[1].status, "failed");
    assert_eq!(
        status.sends[1].error.as_deref(),
        Some("Forbidden: bot was blocked by the user")
    );
    assert_eq!(
        due.iter().find(|r| r.chat_id == 3).unwrap().source,
        Source::Api
    );
}

#[tokio::test]
async fn an_older_sqlite_state_gets_the_source_column_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    drop(State::open(&path).unwrap());
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch("ALTER TABLE messages DROP COLUMN source; DROP TABLE ingest_keys;")
            .unwrap();
    }
    let state = State::open(&path).unwrap();
    let ack = http_ack(
        Source::Api,
        Some("k"),
        INGEST_DEDUPE_WINDOW,
        vec![(1, send("x"))],
    );
    let AckResult::Stored(id) = state.acknowledge(ack).await.unwrap() else {
        panic!("stored");
    };
    assert_eq!(
        state.message_status(id).await.unwrap().unwrap().source,
        Source::Api
    );
}

async fn recent_sends_are_the_done_rows_with_their_message_counts(db: Db) {
    let state = db.open().await;
    let item = |sha: &str| OutboxItem {
        kind: ItemKind::Photo,
        sha256: sha.into(),
        file_name: format!("{sha}.png"),
        caption: None,
    };
    let album = OutboxSend {
        method: Method::SendMediaGroup,
        items: vec![item("a"), item("b"), item("c")],
        text: None,
        options: Default::default(),
    };
    let before = SystemTime::now() - Duration::from_secs(1);
    state
        .acknowledge(ack(
            3,
            vec![
                (-100, album),
                (1, send("done")),
                (2, send("failed")),
                (3, send("pending")),
            ],
        ))
        .await
        .unwrap();
    let due = state
        .due_sends(SystemTime::now(), vec![], vec![], 10, |_| true)
        .await
        .unwrap();
    for row in &due {
        match row.chat_id {
            -100 | 1 => state.finish_send(row.id, SendResult::Done).await.unwrap(),
            2 => state
                .finish_send(row.id, SendResult::Failed("403".into()))
                .await
                .unwrap(),
            _ => {}
        }
    }
    let recent = state.recent_sends(before).await.unwrap();
    let mut sent: Vec<(i64, usize)> = recent.iter().map(|s| (s.chat_id, s.messages)).collect();
    sent.sort_unstable();
    assert_eq!(sent, [(-100, 3), (1, 1)], "only what Telegram accepted");
    assert!(recent.iter().all(|s| s.finished_at >= before));
    let later = SystemTime::now() + Duration::from_secs(5);
    assert!(state.recent_sends(later).await.unwrap().is_empty());
}

/// PostgreSQL only: a fence holds while its lease does, and a write fenced with an epoch that
/// another replica took over fails with `LeaseLost` and changes nothing.
#[tokio::test]
async fn a_fence_holds_only_while_its_lease_is_held_with_its_epoch() {
    let db = Db::postgres().await;
    let state = db.open().await;
    let pg = state.postgres().unwrap().clone();
    let name = "mailbox:reports@example.com";
    let lease = Duration::from_secs(60);
    let epoch = pg.acquire_lease(name, "r1", lease).await.unwrap().unwrap();
    assert_eq!(pg.acquire_lease(name, "r2", lease).await.unwrap(), None);
    let fence = Fence {
        name: name.into(),
        owner: "r1".into(),
        epoch,
    };
    let fenced = state.fenced(fence.clone());
    assert!(state.lease_held(&fence).await.unwrap());
    let checkpoint = |last_uid| Checkpoint {
        uid_validity: 7,
        last_uid,
    };
    fenced
        .set_checkpoint("reports@example.com", checkpoint(5))
        .await
        .unwrap();

    pg.release_lease(name, "r1").await.unwrap();
    let taken = pg.acquire_lease(name, "r2", lease).await.unwrap().unwrap();
    assert!(taken > epoch, "a new holder, a new epoch");
    assert!(!state.lease_held(&fence).await.unwrap());
    let error = fenced
        .set_checkpoint("reports@example.com", checkpoint(9))
        .await
        .unwrap_err();
    assert!(error.downcast_ref::<LeaseLost>().is_some(), "{error:#}");
    assert_eq!(
        state.checkpoint("reports@example.com").await.unwrap(),
        Some(checkpoint(5))
    );
    // Taking it back is a third epoch: the first holder's old fence stays dead.
    pg.release_lease(name, "r2").await.unwrap();
    let again = pg.acquire_lease(name, "r1", lease).await.unwrap().unwrap();
    assert!(again > taken);
    assert!(!state.lease_held(&fence).await.unwrap());
}

async fn acknowledge_writes_message_outbox_and_checkpoint_together(db: Db) {
    let state = db.open().await;
    let result = state
        .acknowledge(ack(5, vec![(1, send("a")), (1, send("b")), (2, send("c"))]))
        .await
        .unwrap();
    assert!(matches!(result, AckResult::Stored(_)));
    assert_eq!(
        state.checkpoint("reports@example.com").await.unwrap(),
        Some(Checkpoint {
            uid_validity: 7,
            last_uid: 5
        })
    );
    assert_eq!(state.pending_count().await.unwrap(), 3);
    // Heads of each chat, in order; a busy chat is skipped.
    let due = state
        .due_sends(SystemTime::now(), vec![], vec![], 10, |_| true)
        .await
        .unwrap();
    let heads: Vec<_> = due
        .iter()
        .map(|r| (r.chat_id, r.send.text.clone()))
        .collect();
    assert_eq!(heads, [(1, Some("a".into())), (2, Some("c".into()))]);
    let due = state
        .due_sends(SystemTime::now(), vec![1], vec![], 10, |_| true)
        .await
        .unwrap();
    assert_eq!(due.len(), 1);
    // Finishing the head exposes the next one of that chat.
    let first = state
        .due_sends(SystemTime::now(), vec![], vec![], 10, |_| true)
        .await
        .unwrap()[0]
        .id;
    state.finish_send(first, SendResult::Done).await.unwrap();
    let due = state
        .due_sends(SystemTime::now(), vec![], vec![], 10, |_| true)
        .await
        .unwrap();
    assert_eq!(due[0].send.text.as_deref(), Some("b"));
    // The same UID again queues nothing.
    let again = state
        .acknowledge(ack(5, vec![(1, send("a"))]))
        .await
        .unwrap();
    assert_eq!(again, AckResult::Duplicate);
    assert_eq!(state.pending_count().await.unwrap(), 2);
    assert_eq!(state.file_bytes("f1").await.unwrap().as_ref(), b"png");
}

async fn retries_wait_and_migrations_move_pending_rows(db: Db) {
    let state = db.open().await;
    state
        .acknowledge(ack(1, vec![(-100, send("a")), (-100, send("b"))]))
        .await
        .unwrap();
    let row = state
        .due_sends(SystemTime::now(), vec![], vec![], 10, |_| true)
        .await
        .unwrap()[0]
        .clone();
    let later = SystemTime::now() + Duration::from_secs(60);
    state
        .retry_send(row.id, later, true, "429".into())
        .await
        .unwrap();
    assert!(
        state
            .due_sends(SystemTime::now(), vec![], vec![], 10, |_| true)
            .await
            .unwrap()
            .is_empty()
    );
    // The next wake-up is when the delayed send is due, not "now".
    let next = state.next_due_at().await.unwrap().unwrap();
    assert!(next > SystemTime::now() && next <= later);
    let due = state
        .due_sends(later, vec![], vec![], 10, |_| true)
        .await
        .unwrap();
    assert_eq!(due[0].attempts, 1);
    assert_eq!(state.migrate_chat(-100, -1001987654321).await.unwrap(), 2);
    let due = state
        .due_sends(later, vec![], vec![], 10, |_| true)
        .await
        .unwrap();
    assert_eq!(due[0].chat_id, -1001987654321);
    let failed = state
        .fail_rest_of_message(due[0].message_id, -1001987654321, "kicked".into())
        .await
        .unwrap();
    assert_eq!(failed, 2);
    assert_eq!(state.pending_count().await.unwrap(), 0);
}

async fn file_ids_snapshot_and_chat_status_persist_across_reopen(db: Db) {
    {
        let state = db.open().await;
        state
            .store_file_id("abc", ItemKind::Photo, "AgAC1")
            .await
            .unwrap();
        state.save_snapshot("{\"v\":1}".into()).await.unwrap();
        state
            .set_chat_status(111222333, Some("blocked".into()))
            .await
            .unwrap();
    }
    let state = db.open().await;
    assert_eq!(
        state
            .file_id("abc", ItemKind::Photo)
            .await
            .unwrap()
            .as_deref(),
        Some("AgAC1")
    );
    assert_eq!(
        state.file_id("abc", ItemKind::Document).await.unwrap(),
        None
    );
    assert_eq!(
        state.load_snapshot().await.unwrap().as_deref(),
        Some("{\"v\":1}")
    );
    assert_eq!(
        state.chat_statuses().await.unwrap(),
        [(111222333, "blocked".to_owned())]
    );
    state.set_chat_status(111222333, None).await.unwrap();
    assert!(state.chat_statuses().await.unwrap().is_empty());
}

async fn prune_keeps_pending_work_and_drops_old_finished_work(db: Db) {
    let state = db.open().await;
    let mut with_file = ack(1, vec![(1, send("done")), (2, send("pending"))]);
    with_file.sends[1].1.items.push(OutboxItem {
        kind: ItemKind::Photo,
        sha256: "f1".into(),
        file_name: "a.png".into(),
        caption: None,
    });
    state.acknowledge(with_file).await.unwrap();
    let due = state
        .due_sends(SystemTime::now(), vec![], vec![], 10, |_| true)
        .await
        .unwrap();
    let done = due.iter().find(|r| r.chat_id == 1).unwrap().id;
    state.finish_send(done, SendResult::Done).await.unwrap();
    let later = SystemTime::now() + Duration::from_secs(3600);
    // The pending send keeps its message and its file.
    assert_eq!(state.prune(later).await.unwrap(), 1);
    assert_eq!(state.pending_count().await.unwrap(), 1);
    assert!(state.file_bytes("f1").await.is_ok());
    let pending = state
        .due_sends(later, vec![], vec![], 10, |_| true)
        .await
        .unwrap()[0]
        .id;
    state.finish_send(pending, SendResult::Done).await.unwrap();
    assert_eq!(state.prune(later).await.unwrap(), 3);
    assert!(state.file_bytes("f1").await.is_err());
    assert!(
        state
            .checkpoint("reports@example.com")
            .await
            .unwrap()
            .is_some()
    );
}

async fn a_reused_uid_with_new_content_is_not_a_duplicate(db: Db) {
    let state = db.open().await;
    state
        .acknowledge(ack(5, vec![(1, send("a"))]))
        .await
        .unwrap();
    let mut restored = ack(5, vec![(1, send("b"))]);
    restored.raw_sha256 = "other content".into();
    assert!(matches!(
        state.acknowledge(restored).await.unwrap(),
        AckResult::Stored(_)
    ));
    assert_eq!(state.pending_count().await.unwrap(), 2);
}

async fn a_row_in_flight_is_not_handed_out_again_after_a_migration(db: Db) {
    let state = db.open().await;
    state
        .acknowledge(ack(1, vec![(-100, send("a")), (-100, send("b"))]))
        .await
        .unwrap();
    let first = state
        .due_sends(SystemTime::now(), vec![], vec![], 10, |_| true)
        .await
        .unwrap()[0]
        .id;
    state.migrate_chat(-100, -1001).await.unwrap();
    // The first row is still in flight under the old chat id: nothing is due for the new one.
    let due = state
        .due_sends(SystemTime::now(), vec![-100], vec![first], 10, |_| true)
        .await
        .unwrap();
    assert!(due.is_empty(), "{due:?}");
}

async fn replays_are_keyed_by_content_hash(db: Db) {
    let state = db.open().await;
    let mut replay = ack(0, vec![(1, send("a"))]);
    replay.uid = None;
    replay.checkpoint = None;
    assert!(matches!(
        state.acknowledge(replay.clone()).await.unwrap(),
        AckResult::Stored(_)
    ));
    assert_eq!(
        state.acknowledge(replay).await.unwrap(),
        AckResult::Duplicate
    );
    assert_eq!(state.pending_count().await.unwrap(), 1);
}

async fn admit_refusing_a_head_keeps_its_chat_blocked(db: Db) {
    let state = db.open().await;
    state
        .acknowledge(ack(5, vec![(1, send("a")), (1, send("b")), (2, send("c"))]))
        .await
        .unwrap();
    let due = state
        .due_sends(SystemTime::now(), vec![], vec![], 10, |row| {
            row.chat_id != 1
        })
        .await
        .unwrap();
    let heads: Vec<_> = due.iter().map(|r| r.send.text.clone()).collect();
    assert_eq!(heads, [Some("c".into())]);
}

/// Finishes every due send, then prunes with a cutoff an hour ahead (everything is old).
async fn finish_all_and_prune(state: &State) {
    let later = SystemTime::now() + Duration::from_secs(3600);
    loop {
        let due = state
            .due_sends(later, vec![], vec![], 10, |_| true)
            .await
            .unwrap();
        if due.is_empty() {
            break;
        }
        for row in due {
            state.finish_send(row.id, SendResult::Done).await.unwrap();
        }
    }
    assert!(state.prune(later).await.unwrap() > 0);
}

async fn a_replay_and_imap_dedupe_against_each_other_even_after_pruning(db: Db) {
    let state = db.open().await;
    // IMAP relayed it; a month later someone replays the same file.
    state
        .acknowledge(ack(5, vec![(1, send("a"))]))
        .await
        .unwrap();
    finish_all_and_prune(&state).await;
    let mut replay = ack(5, vec![(1, send("a"))]);
    replay.uid = None;
    replay.checkpoint = None;
    assert_eq!(
        state.acknowledge(replay).await.unwrap(),
        AckResult::Duplicate
    );
    // A replayed mail that IMAP catches up on later (a new UID, the same bytes).
    let mut replay = ack(6, vec![(1, send("b"))]);
    replay.uid = None;
    replay.checkpoint = None;
    assert!(matches!(
        state.acknowledge(replay.clone()).await.unwrap(),
        AckResult::Stored(_)
    ));
    finish_all_and_prune(&state).await;
    assert_eq!(
        state.acknowledge(replay).await.unwrap(),
        AckResult::Duplicate,
        "the replay ledger outlives the pruning"
    );
    let imap = ack(6, vec![(1, send("b"))]);
    assert_eq!(state.acknowledge(imap).await.unwrap(), AckResult::Duplicate);
    assert_eq!(state.pending_count().await.unwrap(), 0);
    assert_eq!(
        state.checkpoint("reports@example.com").await.unwrap(),
        Some(Checkpoint {
            uid_validity: 7,
            last_uid: 6
        }),
        "a duplicate still moves the checkpoint"
    );
}

async fn an_unreadable_outbox_row_is_failed_and_the_rows_after_it_go(db: Db) {
    let state = db.open().await;
    state
        .acknowledge(ack(5, vec![(1, send("a")), (1, send("b")), (2, send("c"))]))
        .await
        .unwrap();
    db.damage_first_row_of(&state, 1).await;
    let due = state
        .due_sends(SystemTime::now(), vec![], vec![], 10, |_| true)
        .await
        .unwrap();
    let heads: Vec<_> = due.iter().map(|r| r.send.text.clone()).collect();
    assert_eq!(heads, [Some("c".into())], "chat 1's head was unreadable");
    let due = state
        .due_sends(SystemTime::now(), vec![], vec![], 10, |_| true)
        .await
        .unwrap();
    let heads: Vec<_> = due.iter().map(|r| r.send.text.clone()).collect();
    assert_eq!(heads, [Some("b".into()), Some("c".into())]);
    let failed = db.failed_error(&state).await;
    assert!(failed.starts_with("unreadable outbox row: "), "{failed}");
}

/// PostgreSQL only: a chat status one replica changes (its bot was blocked, or the user came
/// back) reaches another replica's statuses through `NOTIFY`, without a restart.
#[tokio::test]
async fn a_chat_status_changed_on_one_replica_reaches_the_others() {
    use report_relay::directory::ChatStatuses;
    use report_relay::state::CHAT_STATUS_CHANNEL;
    use std::sync::Arc;
    use tokio_util::sync::CancellationToken;

    let db = Db::postgres().await;
    let (here, there) = (db.open().await, db.open().await);
    let changing = ChatStatuses::load(here).await.unwrap();
    let following = ChatStatuses::load(there.clone()).await.unwrap();
    let cancel = CancellationToken::new();
    let changed = Arc::new(tokio::sync::Notify::new());
    let listening = there.postgres().unwrap().clone();
    tokio::spawn(listening.listen(CHAT_STATUS_CHANNEL, changed.clone(), cancel.clone()));
    tokio::spawn(following.clone().follow(changed, cancel.clone()));

    let wait_for = |want: Option<&'static str>| {
        let following = following.clone();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while following.status(42).as_deref() != want {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "status {:?}, expected {want:?}",
                    following.status(42)
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    // Set before the listener may have subscribed: its first wake (on connect) reads it too.
    changing.set(42, Some("blocked")).await.unwrap();
    wait_for(Some("blocked")).await;
    changing.set(42, None).await.unwrap();
    wait_for(None).await;
    cancel.cancel();
}
