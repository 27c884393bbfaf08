//! The outbox on SQLite: an acknowledged message with its files, one row per (recipient
//! `chat_id`, send) and the checkpoint in one transaction; then due sends handed out per chat in
//! order, finished, retried, moved on a migration, and pruned once done.

use std::time::SystemTime;

use rusqlite::{OptionalExtension, params};

use super::{Sqlite, write_checkpoint};
use crate::imap::Checkpoint;
use crate::state::{
    AckResult, Acknowledgement, AlertChange, MessageOutcome, MessageStatus, OutboxRow, RecentSend,
    SendCounts, SendResult, SendStatus, Source, from_millis, millis,
};

/// A dedupe window in milliseconds.
fn window_millis(window: std::time::Duration) -> i64 {
    i64::try_from(window.as_millis()).unwrap_or(i64::MAX)
}

impl Sqlite {
    /// Stores a message, its files, its outbox rows and the checkpoint in one transaction.
    ///
    /// # Errors
    /// A database error; then nothing was written.
    pub async fn acknowledge(&self, ack: Acknowledgement) -> anyhow::Result<AckResult> {
        self.with(move |conn| {
            let tx = conn.transaction()?;
            let now = millis(SystemTime::now());
            let duplicate = match (&ack.alert, &ack.http, ack.uid) {
                // An admin alert: a condition raised (or cleared) before.
                (Some(AlertChange::Raise { key, text }), _, _) => {
                    tx.execute(
                        "INSERT INTO alerts (key, raised_at, text) VALUES (?1, ?2, ?3)
                         ON CONFLICT (key) DO NOTHING",
                        params![key, now, text],
                    )? == 0
                }
                (Some(AlertChange::Clear { key }), _, _) => {
                    tx.execute("DELETE FROM alerts WHERE key = ?1", [key])? == 0
                }
                // An HTTP request: the same dedupe key within the window.
                (None, Some(http), _) => match &http.dedupe_key {
                    Some(key) => tx
                        .query_row(
                            "SELECT 1 FROM ingest_keys WHERE key = ?1 AND created_at >= ?2",
                            params![key, now - window_millis(http.window)],
                            |_| Ok(()),
                        )
                        .optional()?
                        .is_some(),
                    None => false,
                },
                (None, None, Some(Checkpoint {
                    uid_validity,
                    last_uid: uid,
                })) => tx
                    .query_row(
                        // The content hash too: after a server restore reuses UIDs under the
                        // same UIDVALIDITY, a new message at an old UID is not a duplicate. A
                        // mail already relayed by `replay` is one.
                        "SELECT 1 FROM messages WHERE mailbox = ?1 AND uid_validity = ?2 AND uid = ?3
                           AND raw_sha256 = ?4
                         UNION ALL
                         SELECT 1 FROM replays WHERE mailbox = ?1 AND raw_sha256 = ?4",
                        params![ack.mailbox, uid_validity, uid, ack.raw_sha256],
                        |_| Ok(()),
                    )
                    .optional()?
                    .is_some(),
                // A replay is a duplicate of anything relayed before, from IMAP or a replay.
                (None, None, None) => tx
                    .query_row(
                        "SELECT 1 FROM ledger WHERE mailbox = ?1 AND raw_sha256 = ?2",
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
                                           detail, received_at, acknowledged_at, source)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                    params![
                        ack.mailbox,
                        ack.uid.map(|u| u.uid_validity),
                        ack.uid.map(|u| u.last_uid),
                        ack.raw_sha256,
                        ack.title,
                        ack.outcome.as_str(),
                        ack.detail,
                        ack.received_at.map_or(now, millis),
                        now,
                        ack.source().as_str(),
                    ],
                )?;
                let message_id = tx.last_insert_rowid();
                if let Some(http) = &ack.http {
                    // Not in the ledger: the same content a day later is a new report.
                    if let Some(key) = &http.dedupe_key {
                        tx.execute(
                            "INSERT INTO ingest_keys (key, message_id, created_at) VALUES (?1, ?2, ?3)
                             ON CONFLICT (key) DO UPDATE SET message_id = ?2, created_at = ?3",
                            params![key, message_id, now],
                        )?;
                    }
                } else if ack.alert.is_none() {
                    tx.execute(
                        "INSERT OR IGNORE INTO ledger (mailbox, raw_sha256) VALUES (?1, ?2)",
                        params![ack.mailbox, ack.raw_sha256],
                    )?;
                }
                if ack.uid.is_none() && ack.http.is_none() && ack.alert.is_none() {
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
    /// chats in `busy` and the rows in `in_flight`, and keeping those `admit` takes: at most
    /// `limit` rows. `admit` sees each candidate in order and may reserve something for it
    /// (the pacer's cells); a row it refuses stays pending and blocks its chat's later rows.
    ///
    /// A row whose JSON cannot be read (written by a newer version, or damaged) is marked
    /// failed with the parse error and logged, so it never blocks the rows after it.
    ///
    /// # Errors
    /// A database error.
    pub async fn due_sends<F>(
        &self,
        now: SystemTime,
        busy: Vec<i64>,
        in_flight: Vec<i64>,
        limit: usize,
        mut admit: F,
    ) -> anyhow::Result<Vec<OutboxRow>>
    where
        F: FnMut(&OutboxRow) -> bool + std::marker::Send + 'static,
    {
        self.with(move |conn| {
            let mut unreadable = Vec::new();
            let mut due = Vec::new();
            {
                let mut statement = conn.prepare_cached(
                    "SELECT o.id, o.message_id, o.chat_id, o.send, o.attempts, o.not_before,
                            o.created_at, m.received_at, o.first_failed_at, m.source
                     FROM outbox o JOIN messages m ON m.id = o.message_id
                     WHERE o.status = 'pending'
                       AND o.id = (SELECT MIN(i.id) FROM outbox i
                                   WHERE i.status = 'pending' AND i.chat_id = o.chat_id)
                     ORDER BY o.id",
                )?;
                let now = millis(now);
                let mut rows = statement.query([])?;
                while let Some(row) = rows.next()? {
                    let chat_id: i64 = row.get(2)?;
                    let not_before: i64 = row.get(5)?;
                    let id: i64 = row.get(0)?;
                    // A row in flight blocks its chat even after a migration moved it to a new
                    // id.
                    if not_before > now || busy.contains(&chat_id) || in_flight.contains(&id) {
                        continue;
                    }
                    let send: String = row.get(3)?;
                    let send = match serde_json::from_str(&send) {
                        Ok(send) => send,
                        Err(error) => {
                            unreadable.push((id, chat_id, format!("unreadable outbox row: {error}")));
                            continue;
                        }
                    };
                    let candidate = OutboxRow {
                        id,
                        message_id: row.get(1)?,
                        chat_id,
                        send,
                        attempts: row.get(4)?,
                        created_at: from_millis(row.get(6)?),
                        first_failed_at: row.get::<_, Option<i64>>(8)?.map(from_millis),
                        received_at: from_millis(row.get(7)?),
                        source: Source::from_column(&row.get::<_, String>(9)?),
                    };
                    if admit(&candidate) {
                        due.push(candidate);
                        if due.len() >= limit {
                            break;
                        }
                    }
                }
            }
            let finished = millis(SystemTime::now());
            for (id, chat_id, error) in unreadable {
                tracing::error!(
                    outbox_row = id,
                    chat_id,
                    %error,
                    "An outbox row cannot be read; it is marked failed and delivery goes on."
                );
                conn.execute(
                    "UPDATE outbox SET status = 'failed', finished_at = ?2, error = ?3 WHERE id = ?1",
                    params![id, finished, error],
                )?;
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

    /// The sends marked done at or after `since`, oldest first.
    ///
    /// # Errors
    /// A database error.
    pub async fn recent_sends(&self, since: SystemTime) -> anyhow::Result<Vec<RecentSend>> {
        self.with(move |conn| {
            let mut statement = conn.prepare(
                "SELECT chat_id, send, finished_at FROM outbox
                 WHERE status = 'done' AND finished_at >= ?1 ORDER BY finished_at",
            )?;
            let rows = statement.query_map([millis(since)], |row| {
                Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?, row.get(2)?))
            })?;
            let mut sends = Vec::new();
            for row in rows {
                let (chat_id, send, finished_at) = row?;
                sends.push(RecentSend::from_row(chat_id, &send, finished_at));
            }
            Ok(sends)
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
    /// that no pending send needs. Checkpoints, `file_id`s, the ledger of relayed content and
    /// the replays (what makes an old mail a duplicate), the snapshot and chat statuses stay.
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
            deleted += tx.execute("DELETE FROM ingest_keys WHERE created_at < ?1", [cutoff])?;
            // The ledger and the replays stay: they are what makes an old mail a duplicate.
            deleted += tx.execute(
                "DELETE FROM messages WHERE acknowledged_at < ?1
                   AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.message_id = messages.id)",
                [cutoff],
            )?;
            tx.execute(
                "DELETE FROM delivery_log
                  WHERE NOT EXISTS (SELECT 1 FROM messages m WHERE m.id = delivery_log.message_id)",
                [],
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

    /// The message acknowledged under the HTTP ingest key `key` at or after `since`.
    ///
    /// # Errors
    /// A database error.
    pub async fn ingest_key_message(
        &self,
        key: String,
        since: SystemTime,
    ) -> anyhow::Result<Option<i64>> {
        self.with(move |conn| {
            Ok(conn
                .query_row(
                    "SELECT message_id FROM ingest_keys WHERE key = ?1 AND created_at >= ?2",
                    params![key, millis(since)],
                    |row| row.get::<_, Option<i64>>(0),
                )
                .optional()?
                .flatten())
        })
        .await
    }

    /// A stored message with its outbox rows in send order.
    ///
    /// # Errors
    /// A database error.
    pub async fn message_status(&self, id: i64) -> anyhow::Result<Option<MessageStatus>> {
        self.with(move |conn| {
            let message = conn
                .query_row(
                    "SELECT mailbox, source, title, outcome, detail, received_at
                     FROM messages WHERE id = ?1",
                    [id],
                    |row| {
                        Ok(MessageStatus {
                            id,
                            mailbox: row.get(0)?,
                            source: Source::from_column(&row.get::<_, String>(1)?),
                            title: row.get(2)?,
                            outcome: MessageOutcome::from_column(&row.get::<_, String>(3)?),
                            detail: row.get(4)?,
                            received_at: from_millis(row.get(5)?),
                            sends: Vec::new(),
                        })
                    },
                )
                .optional()?;
            let Some(mut message) = message else {
                return Ok(None);
            };
            let mut statement = conn.prepare_cached(
                "SELECT chat_id, status, error, finished_at FROM outbox WHERE message_id = ?1
                 ORDER BY id",
            )?;
            let rows = statement.query_map([id], |row| {
                Ok(SendStatus::from_columns(
                    row.get(0)?,
                    row.get(1)?,
                    row.get(2)?,
                    row.get(3)?,
                ))
            })?;
            for row in rows {
                message.sends.push(row?);
            }
            Ok(Some(message))
        })
        .await
    }

    /// The messages received at or after `since` (of `mailbox` only, case-insensitively, when
    /// given), oldest first, each with its outbox rows.
    ///
    /// # Errors
    /// A database error.
    pub async fn messages_since(
        &self,
        since: SystemTime,
        mailbox: Option<String>,
    ) -> anyhow::Result<Vec<MessageStatus>> {
        self.with(move |conn| {
            let mut statement = conn.prepare_cached(
                "SELECT id, mailbox, source, title, outcome, detail, received_at FROM messages
                 WHERE received_at >= ?1 AND (?2 IS NULL OR lower(mailbox) = lower(?2))
                 ORDER BY id",
            )?;
            let rows = statement.query_map(params![millis(since), mailbox], |row| {
                Ok(MessageStatus {
                    id: row.get(0)?,
                    mailbox: row.get(1)?,
                    source: Source::from_column(&row.get::<_, String>(2)?),
                    title: row.get(3)?,
                    outcome: MessageOutcome::from_column(&row.get::<_, String>(4)?),
                    detail: row.get(5)?,
                    received_at: from_millis(row.get(6)?),
                    sends: Vec::new(),
                })
            })?;
            let mut messages = Vec::new();
            for row in rows {
                messages.push(row?);
            }
            let mut statement = conn.prepare_cached(
                "SELECT o.message_id, o.chat_id, o.status, o.error, o.finished_at
                 FROM outbox o JOIN messages m ON m.id = o.message_id
                 WHERE m.received_at >= ?1 AND (?2 IS NULL OR lower(m.mailbox) = lower(?2))
                 ORDER BY o.message_id, o.id",
            )?;
            let rows = statement.query_map(params![millis(since), mailbox], |row| {
                Ok((
                    row.get::<_, i64>(0)?,
                    SendStatus::from_columns(row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?),
                ))
            })?;
            let mut sends = Vec::new();
            for row in rows {
                sends.push(row?);
            }
            Ok(crate::state::outbox::attach_sends(messages, sends))
        })
        .await
    }

    /// How the sends of these messages stand (for `replay --mailbox`, which waits for its own
    /// sends only).
    ///
    /// # Errors
    /// A database error.
    pub async fn send_counts(&self, message_ids: Vec<i64>) -> anyhow::Result<SendCounts> {
        self.with(move |conn| {
            let mut counts = SendCounts::default();
            let mut statement = conn.prepare_cached(
                "SELECT status, COUNT(*) FROM outbox WHERE message_id = ?1 GROUP BY status",
            )?;
            for id in message_ids {
                let mut rows = statement.query([id])?;
                while let Some(row) = rows.next()? {
                    let count: i64 = row.get(1)?;
                    let count = usize::try_from(count).unwrap_or(0);
                    match row.get::<_, String>(0)?.as_str() {
                        "pending" => counts.pending += count,
                        "failed" => counts.failed += count,
                        _ => counts.done += count,
                    }
                }
            }
            Ok(counts)
        })
        .await
    }
}
