//! The local durable state (SQLite, `state.path`): checkpoints, messages, the outbox, file
//! bytes and their Telegram `file_id`s, the last good directory snapshot, and chat statuses.
//!
//! The watcher acknowledges a message with one transaction ([`State::acknowledge`]) that writes
//! the message, its files, one outbox row per (recipient, send) and the new checkpoint. From then
//! on the message cannot be lost: the delivery worker drains the outbox and marks each row done
//! the moment Telegram accepts it, so after a crash only a send in flight can repeat.
//!
//! The database runs in WAL mode with `synchronous = FULL`. Calls run on the blocking pool.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::report::render::{ItemKind, Method};

pub use crate::imap::Checkpoint;

/// A handle on the state database; cheap to clone.
#[derive(Clone)]
pub struct State {
    conn: Arc<Mutex<Connection>>,
    /// An exclusive lock on `<state.path>.lock`, held while any clone lives: two relay
    /// processes draining one outbox would send everything twice.
    _lock: Arc<std::fs::File>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("State")
    }
}

/// What happened to an acknowledged message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageOutcome {
    /// Parsed and planned; its sends are in the outbox.
    Queued,
    /// Deliberately not relayed (e.g. an error notification, or no recipients).
    Skipped,
    /// From a sender outside the mailbox's `allowed_senders`.
    Filtered,
    /// Could not be parsed.
    Failed,
}

impl MessageOutcome {
    /// The lowercase name used in the database and the metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Skipped => "skipped",
            Self::Filtered => "filtered",
            Self::Failed => "failed",
        }
    }
}

/// One file of a send, as stored in an outbox row. The bytes live once per sha256 in `files`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxItem {
    /// Photo or document.
    pub kind: ItemKind,
    /// SHA-256 of the bytes, lowercase hex.
    pub sha256: String,
    /// The file name shown in Telegram.
    pub file_name: String,
    /// The caption (HTML) on this item, if any.
    pub caption: Option<String>,
}

/// One Bot API call for one chat, as stored in an outbox row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxSend {
    /// The method.
    pub method: Method,
    /// The files; empty for `sendMessage`.
    pub items: Vec<OutboxItem>,
    /// The HTML text of a `sendMessage`.
    pub text: Option<String>,
}

/// A file to store with a message.
#[derive(Debug, Clone)]
pub struct StoredFile {
    /// SHA-256 of `bytes`, lowercase hex.
    pub sha256: String,
    /// The bytes.
    pub bytes: bytes::Bytes,
}

/// Everything [`State::acknowledge`] writes in one transaction.
#[derive(Debug, Clone)]
pub struct Acknowledgement {
    /// The mailbox address.
    pub mailbox: String,
    /// `(UIDVALIDITY, UID)` for a message from IMAP; `None` for `replay --mailbox`.
    pub uid: Option<(u32, u32)>,
    /// SHA-256 of the raw message, lowercase hex (the ledger key for replays).
    pub raw_sha256: String,
    /// The report title (or a short description for a failed message).
    pub title: String,
    /// What happened.
    pub outcome: MessageOutcome,
    /// The reason for a skip, filter or failure.
    pub detail: Option<String>,
    /// When the message arrived in the mailbox (IMAP INTERNALDATE), if known.
    pub received_at: Option<SystemTime>,
    /// The files the sends refer to.
    pub files: Vec<StoredFile>,
    /// One entry per (recipient chat_id, send), in send order per chat.
    pub sends: Vec<(i64, OutboxSend)>,
    /// The new checkpoint of the mailbox, written in the same transaction.
    pub checkpoint: Option<Checkpoint>,
}

/// The result of [`State::acknowledge`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckResult {
    /// Stored; the message's row id.
    Stored(i64),
    /// The message was stored before (same UID, or same content for a replay); nothing new
    /// was queued. The checkpoint was still written.
    Duplicate,
}

/// An outbox row due for sending.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    /// Row id; the order of sends within a chat.
    pub id: i64,
    /// The message's row id.
    pub message_id: i64,
    /// The recipient `chat_id`.
    pub chat_id: i64,
    /// The call.
    pub send: OutboxSend,
    /// How many attempts failed so far.
    pub attempts: u32,
    /// When the row was queued.
    pub created_at: SystemTime,
    /// When the first transient failure of this send happened, if any.
    pub first_failed_at: Option<SystemTime>,
    /// When the message arrived in the mailbox (or was queued).
    pub received_at: SystemTime,
}

/// How a finished send ended, for [`State::finish_send`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendResult {
    /// Telegram accepted it.
    Done,
    /// It will not be retried; the reason is logged and stored.
    Failed(String),
}

fn millis(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn from_millis(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS checkpoints (
    mailbox      TEXT PRIMARY KEY,
    uid_validity INTEGER NOT NULL,
    last_uid     INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id              INTEGER PRIMARY KEY,
    mailbox         TEXT NOT NULL,
    uid_validity    INTEGER,
    uid             INTEGER,
    raw_sha256      TEXT NOT NULL,
    title           TEXT NOT NULL,
    outcome         TEXT NOT NULL,
    detail          TEXT,
    received_at     INTEGER NOT NULL,
    acknowledged_at INTEGER NOT NULL,
    UNIQUE (mailbox, uid_validity, uid, raw_sha256)
);
CREATE TABLE IF NOT EXISTS replays (
    mailbox    TEXT NOT NULL,
    raw_sha256 TEXT NOT NULL,
    message_id INTEGER NOT NULL,
    PRIMARY KEY (mailbox, raw_sha256)
);
CREATE TABLE IF NOT EXISTS files (
    sha256       TEXT PRIMARY KEY,
    bytes        BLOB NOT NULL,
    last_used_at INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS file_ids (
    sha256  TEXT NOT NULL,
    kind    TEXT NOT NULL,
    file_id TEXT NOT NULL,
    PRIMARY KEY (sha256, kind)
);
CREATE TABLE IF NOT EXISTS outbox (
    id          INTEGER PRIMARY KEY,
    message_id  INTEGER NOT NULL REFERENCES messages (id),
    chat_id     INTEGER NOT NULL,
    send        TEXT NOT NULL,
    status      TEXT NOT NULL DEFAULT 'pending',
    attempts    INTEGER NOT NULL DEFAULT 0,
    first_failed_at INTEGER,
    not_before  INTEGER NOT NULL DEFAULT 0,
    created_at  INTEGER NOT NULL,
    finished_at INTEGER,
    error       TEXT
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (status, chat_id, id);
CREATE TABLE IF NOT EXISTS kv (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS chat_status (
    chat_id    INTEGER PRIMARY KEY,
    status     TEXT NOT NULL,
    updated_at INTEGER NOT NULL
);
";

const SNAPSHOT_KEY: &str = "directory_snapshot";

impl State {
    /// Opens (creating if needed) the database at `path`, with its parent directory.
    ///
    /// # Errors
    /// The directory or database cannot be created or opened, or the schema cannot be applied.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("Failed to create {}", parent.display()))?;
        }
        let lock_path = path.with_extension("db.lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("Failed to open {}", lock_path.display()))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
                "the state database {} is in use by another report-relay process; stop it first \
                 (two processes would send every report twice)",
                path.display()
            ),
            Err(std::fs::TryLockError::Error(error)) => {
                return Err(error)
                    .with_context(|| format!("Failed to lock {}", lock_path.display()));
            }
        }
        let conn = Connection::open(path)
            .with_context(|| format!("Failed to open the state database {}", path.display()))?;
        // The persisted directory snapshot can hold mailbox passwords from SeaTable rows: keep
        // the file private to the service user (SQLite gives its WAL the same mode).
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("Failed to make {} private", path.display()))?;
        }
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.execute_batch(SCHEMA)
            .context("Failed to create the state schema")?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            _lock: Arc::new(lock),
        })
    }

    /// Runs `f` on the connection on the blocking pool.
    async fn with<T, F>(&self, f: F) -> anyhow::Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> anyhow::Result<T> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = conn
                .lock()
                .map_err(|_| anyhow::anyhow!("The state database lock is poisoned"))?;
            f(&mut guard)
        })
        .await
        .context("The state database task failed")?
    }

    /// The stored checkpoint of `mailbox`.
    ///
    /// # Errors
    /// A database error.
    pub async fn checkpoint(&self, mailbox: &str) -> anyhow::Result<Option<Checkpoint>> {
        let mailbox = mailbox.to_owned();
        self.with(move |conn| {
            Ok(conn
                .query_row(
                    "SELECT uid_validity, last_uid FROM checkpoints WHERE mailbox = ?1",
                    [&mailbox],
                    |row| {
                        Ok(Checkpoint {
                            uid_validity: row.get(0)?,
                            last_uid: row.get(1)?,
                        })
                    },
                )
                .optional()?)
        })
        .await
    }

    /// Writes the checkpoint of `mailbox` on its own (first start, new UIDVALIDITY).
    ///
    /// # Errors
    /// A database error.
    pub async fn set_checkpoint(
        &self,
        mailbox: &str,
        checkpoint: Checkpoint,
    ) -> anyhow::Result<()> {
        let mailbox = mailbox.to_owned();
        self.with(move |conn| {
            write_checkpoint(conn, &mailbox, checkpoint)?;
            Ok(())
        })
        .await
    }

    /// Stores a message, its files, its outbox rows and the checkpoint in one transaction.
    ///
    /// # Errors
    /// A database error; then nothing was written.
    pub async fn acknowledge(&self, ack: Acknowledgement) -> anyhow::Result<AckResult> {
        self.with(move |conn| {
            let tx = conn.transaction()?;
            let now = millis(SystemTime::now());
            let duplicate = match ack.uid {
                Some((uid_validity, uid)) => tx
                    .query_row(
                        // The content hash too: after a server restore reuses UIDs under the
                        // same UIDVALIDITY, a new message at an old UID is not a duplicate.
                        "SELECT 1 FROM messages WHERE mailbox = ?1 AND uid_validity = ?2 AND uid = ?3
                           AND raw_sha256 = ?4",
                        params![ack.mailbox, uid_validity, uid, ack.raw_sha256],
                        |_| Ok(()),
                    )
                    .optional()?
                    .is_some(),
                None => tx
                    .query_row(
                        "SELECT 1 FROM replays WHERE mailbox = ?1 AND raw_sha256 = ?2",
                        params![ack.mailbox, ack.raw_sha256],
                        |_| Ok(()),
                    )
                    .optional()?
                    .is_some(),
            };
            let result = if duplicate {
                AckResult::Duplicate
            } else {
                tx.execute(
                    "INSERT INTO messages (mailbox, uid_validity, uid, raw_sha256, title, outcome,
                                           detail, received_at, acknowledged_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                    params![
                        ack.mailbox,
                        ack.uid.map(|u| u.0),
                        ack.uid.map(|u| u.1),
                        ack.raw_sha256,
                        ack.title,
                        ack.outcome.as_str(),
                        ack.detail,
                        ack.received_at.map_or(now, millis),
                        now,
                    ],
                )?;
                let message_id = tx.last_insert_rowid();
                if ack.uid.is_none() {
                    tx.execute(
                        "INSERT INTO replays (mailbox, raw_sha256, message_id) VALUES (?1, ?2, ?3)",
                        params![ack.mailbox, ack.raw_sha256, message_id],
                    )?;
                }
                for file in &ack.files {
                    tx.execute(
                        "INSERT INTO files (sha256, bytes, last_used_at) VALUES (?1, ?2, ?3)
                         ON CONFLICT (sha256) DO UPDATE SET last_used_at = ?3",
                        params![file.sha256, file.bytes.as_ref(), now],
                    )?;
                }
                for (chat_id, send) in &ack.sends {
                    tx.execute(
                        "INSERT INTO outbox (message_id, chat_id, send, created_at)
                         VALUES (?1, ?2, ?3, ?4)",
                        params![message_id, chat_id, serde_json::to_string(send)?, now],
                    )?;
                }
                AckResult::Stored(message_id)
            };
            if let Some(checkpoint) = ack.checkpoint {
                write_checkpoint(&tx, &ack.mailbox, checkpoint)?;
            }
            tx.commit()?;
            Ok(result)
        })
        .await
    }

    /// The first pending send of each chat that is due at `now`, oldest first, skipping the
    /// chats in `busy`; at most `limit` rows.
    ///
    /// # Errors
    /// A database error, or a row whose JSON cannot be read.
    pub async fn due_sends(
        &self,
        now: SystemTime,
        busy: Vec<i64>,
        in_flight: Vec<i64>,
        limit: usize,
    ) -> anyhow::Result<Vec<OutboxRow>> {
        self.with(move |conn| {
            let mut statement = conn.prepare_cached(
                "SELECT o.id, o.message_id, o.chat_id, o.send, o.attempts, o.not_before,
                        o.created_at, m.received_at, o.first_failed_at
                 FROM outbox o JOIN messages m ON m.id = o.message_id
                 WHERE o.status = 'pending'
                   AND o.id = (SELECT MIN(i.id) FROM outbox i
                               WHERE i.status = 'pending' AND i.chat_id = o.chat_id)
                 ORDER BY o.id",
            )?;
            let now = millis(now);
            let mut rows = statement.query([])?;
            let mut due = Vec::new();
            while let Some(row) = rows.next()? {
                let chat_id: i64 = row.get(2)?;
                let not_before: i64 = row.get(5)?;
                let id: i64 = row.get(0)?;
                // A row in flight blocks its chat even after a migration moved it to a new id.
                if not_before > now || busy.contains(&chat_id) || in_flight.contains(&id) {
                    continue;
                }
                let send: String = row.get(3)?;
                due.push(OutboxRow {
                    id: row.get(0)?,
                    message_id: row.get(1)?,
                    chat_id,
                    send: serde_json::from_str(&send)
                        .with_context(|| format!("Outbox row has unreadable JSON: {send}"))?,
                    attempts: row.get(4)?,
                    created_at: from_millis(row.get(6)?),
                    first_failed_at: row.get::<_, Option<i64>>(8)?.map(from_millis),
                    received_at: from_millis(row.get(7)?),
                });
                if due.len() >= limit {
                    break;
                }
            }
            Ok(due)
        })
        .await
    }

    /// When the next pending send that is not due yet becomes due, if any.
    ///
    /// # Errors
    /// A database error.
    pub async fn next_due_at(&self) -> anyhow::Result<Option<SystemTime>> {
        let now = millis(SystemTime::now());
        self.with(move |conn| {
            let next: Option<i64> = conn.query_row(
                "SELECT MIN(not_before) FROM outbox WHERE status = 'pending' AND not_before > ?1",
                [now],
                |row| row.get(0),
            )?;
            Ok(next.map(from_millis))
        })
        .await
    }

    /// Marks a send finished: done, or failed for good.
    ///
    /// # Errors
    /// A database error.
    pub async fn finish_send(&self, id: i64, result: SendResult) -> anyhow::Result<()> {
        self.with(move |conn| {
            let now = millis(SystemTime::now());
            match result {
                SendResult::Done => conn.execute(
                    "UPDATE outbox SET status = 'done', finished_at = ?2, error = NULL WHERE id = ?1",
                    params![id, now],
                )?,
                SendResult::Failed(error) => conn.execute(
                    "UPDATE outbox SET status = 'failed', finished_at = ?2, error = ?3 WHERE id = ?1",
                    params![id, now, error],
                )?,
            };
            Ok(())
        })
        .await
    }

    /// Fails every other pending send of the same message to the same chat (the recipient
    /// refused the first one permanently). Returns how many were failed.
    ///
    /// # Errors
    /// A database error.
    pub async fn fail_rest_of_message(
        &self,
        message_id: i64,
        chat_id: i64,
        error: String,
    ) -> anyhow::Result<usize> {
        self.with(move |conn| {
            let now = millis(SystemTime::now());
            Ok(conn.execute(
                "UPDATE outbox SET status = 'failed', finished_at = ?3, error = ?4
                 WHERE message_id = ?1 AND chat_id = ?2 AND status = 'pending'",
                params![message_id, chat_id, now, error],
            )?)
        })
        .await
    }

    /// Puts a send back with a delay after a transient failure.
    ///
    /// # Errors
    /// A database error.
    pub async fn retry_send(
        &self,
        id: i64,
        not_before: SystemTime,
        count_attempt: bool,
        error: String,
    ) -> anyhow::Result<()> {
        self.with(move |conn| {
            conn.execute(
                "UPDATE outbox SET not_before = ?2, attempts = attempts + ?3, error = ?4,
                        first_failed_at = CASE WHEN ?3 = 1 THEN COALESCE(first_failed_at, ?5)
                                               ELSE first_failed_at END
                 WHERE id = ?1",
                params![
                    id,
                    millis(not_before),
                    i64::from(count_attempt),
                    error,
                    millis(SystemTime::now())
                ],
            )?;
            Ok(())
        })
        .await
    }

    /// Moves every pending send of `old` to `new` (a group upgraded to a supergroup).
    ///
    /// # Errors
    /// A database error.
    pub async fn migrate_chat(&self, old: i64, new: i64) -> anyhow::Result<usize> {
        self.with(move |conn| {
            Ok(conn.execute(
                "UPDATE outbox SET chat_id = ?2 WHERE chat_id = ?1 AND status = 'pending'",
                params![old, new],
            )?)
        })
        .await
    }

    /// Sends waiting in the outbox.
    ///
    /// # Errors
    /// A database error.
    pub async fn pending_count(&self) -> anyhow::Result<i64> {
        self.with(|conn| {
            Ok(conn.query_row(
                "SELECT COUNT(*) FROM outbox WHERE status = 'pending'",
                [],
                |row| row.get(0),
            )?)
        })
        .await
    }

    /// Deletes what is no longer needed: finished outbox rows finished before `cutoff`, messages
    /// acknowledged before it that have no outbox row left, and file bytes last queued before it
    /// that no pending send needs. Checkpoints, `file_id`s, the snapshot and chat statuses stay.
    /// Returns the number of rows deleted.
    ///
    /// # Errors
    /// A database error; then nothing was deleted.
    pub async fn prune(&self, cutoff: SystemTime) -> anyhow::Result<usize> {
        self.with(move |conn| {
            let cutoff = millis(cutoff);
            let tx = conn.transaction()?;
            let mut deleted = tx.execute(
                "DELETE FROM outbox WHERE status != 'pending' AND finished_at < ?1",
                [cutoff],
            )?;
            deleted += tx.execute(
                "DELETE FROM replays WHERE message_id IN (
                     SELECT id FROM messages WHERE acknowledged_at < ?1
                       AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.message_id = messages.id))",
                [cutoff],
            )?;
            deleted += tx.execute(
                "DELETE FROM messages WHERE acknowledged_at < ?1
                   AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.message_id = messages.id)",
                [cutoff],
            )?;
            deleted += tx.execute(
                "DELETE FROM files WHERE last_used_at < ?1
                   AND NOT EXISTS (SELECT 1 FROM outbox o
                                   WHERE o.status = 'pending' AND instr(o.send, files.sha256) > 0)",
                [cutoff],
            )?;
            tx.commit()?;
            Ok(deleted)
        })
        .await
    }

    /// Sends that were marked failed at or after `since`.
    ///
    /// # Errors
    /// A database error.
    pub async fn failed_sends_since(&self, since: SystemTime) -> anyhow::Result<i64> {
        self.with(move |conn| {
            Ok(conn.query_row(
                "SELECT COUNT(*) FROM outbox WHERE status = 'failed' AND finished_at >= ?1",
                [millis(since)],
                |row| row.get(0),
            )?)
        })
        .await
    }

    /// The stored bytes of a file.
    ///
    /// # Errors
    /// A database error, or no such file.
    pub async fn file_bytes(&self, sha256: &str) -> anyhow::Result<bytes::Bytes> {
        let sha256 = sha256.to_owned();
        self.with(move |conn| {
            let bytes: Vec<u8> = conn
                .query_row(
                    "SELECT bytes FROM files WHERE sha256 = ?1",
                    [&sha256],
                    |row| row.get(0),
                )
                .with_context(|| format!("File {sha256} is not in the state"))?;
            Ok(bytes::Bytes::from(bytes))
        })
        .await
    }

    /// The Telegram `file_id` of an uploaded file, per kind (a photo's id cannot send a
    /// document and vice versa).
    ///
    /// # Errors
    /// A database error.
    pub async fn file_id(&self, sha256: &str, kind: ItemKind) -> anyhow::Result<Option<String>> {
        let sha256 = sha256.to_owned();
        self.with(move |conn| {
            Ok(conn
                .query_row(
                    "SELECT file_id FROM file_ids WHERE sha256 = ?1 AND kind = ?2",
                    params![sha256, kind_name(kind)],
                    |row| row.get(0),
                )
                .optional()?)
        })
        .await
    }

    /// Remembers the `file_id` Telegram returned for an upload.
    ///
    /// # Errors
    /// A database error.
    pub async fn store_file_id(
        &self,
        sha256: &str,
        kind: ItemKind,
        file_id: &str,
    ) -> anyhow::Result<()> {
        let (sha256, file_id) = (sha256.to_owned(), file_id.to_owned());
        self.with(move |conn| {
            conn.execute(
                "INSERT OR REPLACE INTO file_ids (sha256, kind, file_id) VALUES (?1, ?2, ?3)",
                params![sha256, kind_name(kind), file_id],
            )?;
            Ok(())
        })
        .await
    }

    /// Forgets a `file_id` Telegram no longer accepts.
    ///
    /// # Errors
    /// A database error.
    pub async fn forget_file_id(&self, sha256: &str, kind: ItemKind) -> anyhow::Result<()> {
        let sha256 = sha256.to_owned();
        self.with(move |conn| {
            conn.execute(
                "DELETE FROM file_ids WHERE sha256 = ?1 AND kind = ?2",
                params![sha256, kind_name(kind)],
            )?;
            Ok(())
        })
        .await
    }

    /// Persists the last good directory snapshot (JSON).
    ///
    /// # Errors
    /// A database error.
    pub async fn save_snapshot(&self, json: String) -> anyhow::Result<()> {
        self.with(move |conn| {
            conn.execute(
                "INSERT OR REPLACE INTO kv (key, value) VALUES (?1, ?2)",
                params![SNAPSHOT_KEY, json],
            )?;
            Ok(())
        })
        .await
    }

    /// The persisted directory snapshot (JSON), if any.
    ///
    /// # Errors
    /// A database error.
    pub async fn load_snapshot(&self) -> anyhow::Result<Option<String>> {
        self.with(|conn| {
            Ok(conn
                .query_row(
                    "SELECT value FROM kv WHERE key = ?1",
                    [SNAPSHOT_KEY],
                    |row| row.get(0),
                )
                .optional()?)
        })
        .await
    }

    /// Records that a chat blocked or removed the bot (`Some(status)`), or clears it (`None`).
    ///
    /// # Errors
    /// A database error.
    pub async fn set_chat_status(
        &self,
        chat_id: i64,
        status: Option<String>,
    ) -> anyhow::Result<()> {
        self.with(move |conn| {
            match status {
                Some(status) => conn.execute(
                    "INSERT OR REPLACE INTO chat_status (chat_id, status, updated_at) VALUES (?1, ?2, ?3)",
                    params![chat_id, status, millis(SystemTime::now())],
                )?,
                None => conn.execute("DELETE FROM chat_status WHERE chat_id = ?1", [chat_id])?,
            };
            Ok(())
        })
        .await
    }

    /// Every chat that blocked or removed the bot, with its status.
    ///
    /// # Errors
    /// A database error.
    pub async fn chat_statuses(&self) -> anyhow::Result<Vec<(i64, String)>> {
        self.with(|conn| {
            let mut statement = conn.prepare("SELECT chat_id, status FROM chat_status")?;
            let rows = statement
                .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
        .await
    }
}

fn kind_name(kind: ItemKind) -> &'static str {
    match kind {
        ItemKind::Photo => "photo",
        ItemKind::Document => "document",
    }
}

fn write_checkpoint(
    conn: &Connection,
    mailbox: &str,
    checkpoint: Checkpoint,
) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO checkpoints (mailbox, uid_validity, last_uid, updated_at)
         VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (mailbox) DO UPDATE SET uid_validity = ?2, last_uid = ?3, updated_at = ?4",
        params![
            mailbox,
            checkpoint.uid_validity,
            checkpoint.last_uid,
            millis(SystemTime::now())
        ],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send(text: &str) -> OutboxSend {
        OutboxSend {
            method: Method::SendMessage,
            items: Vec::new(),
            text: Some(text.into()),
        }
    }

    /// A state in a fresh temp dir (kept alive by the returned guard).
    fn fresh_state() -> (tempfile::TempDir, State) {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(&dir.path().join("state.db")).unwrap();
        (dir, state)
    }

    fn ack(uid: u32, sends: Vec<(i64, OutboxSend)>) -> Acknowledgement {
        Acknowledgement {
            mailbox: "reports@example.com".into(),
            uid: Some((7, uid)),
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
        }
    }

    #[tokio::test]
    async fn acknowledge_writes_message_outbox_and_checkpoint_together() {
        let (_dir, state) = fresh_state();
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
            .due_sends(SystemTime::now(), vec![], vec![], 10)
            .await
            .unwrap();
        let heads: Vec<_> = due
            .iter()
            .map(|r| (r.chat_id, r.send.text.clone()))
            .collect();
        assert_eq!(heads, [(1, Some("a".into())), (2, Some("c".into()))]);
        let due = state
            .due_sends(SystemTime::now(), vec![1], vec![], 10)
            .await
            .unwrap();
        assert_eq!(due.len(), 1);
        // Finishing the head exposes the next one of that chat.
        let first = state
            .due_sends(SystemTime::now(), vec![], vec![], 10)
            .await
            .unwrap()[0]
            .id;
        state.finish_send(first, SendResult::Done).await.unwrap();
        let due = state
            .due_sends(SystemTime::now(), vec![], vec![], 10)
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

    #[tokio::test]
    async fn retries_wait_and_migrations_move_pending_rows() {
        let (_dir, state) = fresh_state();
        state
            .acknowledge(ack(1, vec![(-100, send("a")), (-100, send("b"))]))
            .await
            .unwrap();
        let row = state
            .due_sends(SystemTime::now(), vec![], vec![], 10)
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
                .due_sends(SystemTime::now(), vec![], vec![], 10)
                .await
                .unwrap()
                .is_empty()
        );
        // The next wake-up is when the delayed send is due, not "now".
        let next = state.next_due_at().await.unwrap().unwrap();
        assert!(next > SystemTime::now() && next <= later);
        let due = state.due_sends(later, vec![], vec![], 10).await.unwrap();
        assert_eq!(due[0].attempts, 1);
        assert_eq!(state.migrate_chat(-100, -1001987654321).await.unwrap(), 2);
        let due = state.due_sends(later, vec![], vec![], 10).await.unwrap();
        assert_eq!(due[0].chat_id, -1001987654321);
        let failed = state
            .fail_rest_of_message(due[0].message_id, -1001987654321, "kicked".into())
            .await
            .unwrap();
        assert_eq!(failed, 2);
        assert_eq!(state.pending_count().await.unwrap(), 0);
    }

    #[tokio::test]
    async fn file_ids_snapshot_and_chat_status_persist_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/state.db");
        {
            let state = State::open(&path).unwrap();
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
        let state = State::open(&path).unwrap();
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

    #[tokio::test]
    async fn prune_keeps_pending_work_and_drops_old_finished_work() {
        let (_dir, state) = fresh_state();
        let mut with_file = ack(1, vec![(1, send("done")), (2, send("pending"))]);
        with_file.sends[1].1.items.push(OutboxItem {
            kind: ItemKind::Photo,
            sha256: "f1".into(),
            file_name: "a.png".into(),
            caption: None,
        });
        state.acknowledge(with_file).await.unwrap();
        let due = state
            .due_sends(SystemTime::now(), vec![], vec![], 10)
            .await
            .unwrap();
        let done = due.iter().find(|r| r.chat_id == 1).unwrap().id;
        state.finish_send(done, SendResult::Done).await.unwrap();
        let later = SystemTime::now() + Duration::from_secs(3600);
        // The pending send keeps its message and its file.
        assert_eq!(state.prune(later).await.unwrap(), 1);
        assert_eq!(state.pending_count().await.unwrap(), 1);
        assert!(state.file_bytes("f1").await.is_ok());
        let pending = state.due_sends(later, vec![], vec![], 10).await.unwrap()[0].id;
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

    #[test]
    fn a_second_process_cannot_open_the_same_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let first = State::open(&path).unwrap();
        let error = State::open(&path).unwrap_err().to_string();
        assert!(
            error.contains("in use by another report-relay process"),
            "{error}"
        );
        drop(first);
        State::open(&path).unwrap();
    }

    #[tokio::test]
    async fn a_reused_uid_with_new_content_is_not_a_duplicate() {
        let (_dir, state) = fresh_state();
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

    #[tokio::test]
    async fn a_row_in_flight_is_not_handed_out_again_after_a_migration() {
        let (_dir, state) = fresh_state();
        state
            .acknowledge(ack(1, vec![(-100, send("a")), (-100, send("b"))]))
            .await
            .unwrap();
        let first = state
            .due_sends(SystemTime::now(), vec![], vec![], 10)
            .await
            .unwrap()[0]
            .id;
        state.migrate_chat(-100, -1001).await.unwrap();
        // The first row is still in flight under the old chat id: nothing is due for the new one.
        let due = state
            .due_sends(SystemTime::now(), vec![-100], vec![first], 10)
            .await
            .unwrap();
        assert!(due.is_empty(), "{due:?}");
    }

    #[tokio::test]
    async fn replays_are_keyed_by_content_hash() {
        let (_dir, state) = fresh_state();
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
}
