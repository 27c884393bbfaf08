//! The outbox on PostgreSQL: the same statements as on SQLite, and a `NOTIFY` on
//! [`OUTBOX_CHANNEL`] in the acknowledging transaction (delivered on commit), which wakes the
//! delivery worker on whichever replica holds the `delivery` lease.

use std::time::SystemTime;

use sqlx::Row;

use super::{Postgres, begin_fenced, timed, write_checkpoint};
use crate::imap::Checkpoint;
use crate::state::{
    AckResult, Acknowledgement, AlertChange, Fence, MessageOutcome, MessageStatus, OutboxRow,
    RecentSend, SendCounts, SendResult, SendStatus, Source, from_millis, millis,
};

/// A dedupe window in milliseconds.
fn window_millis(window: std::time::Duration) -> i64 {
    i64::try_from(window.as_millis()).unwrap_or(i64::MAX)
}

/// An outbox row as `messages_since` reads it: `message_id`, `chat_id`, `status`, `error`,
/// `finished_at`.
type SendRow = (i64, i64, String, Option<String>, Option<i64>);

/// The `LISTEN/NOTIFY` channel on which an acknowledgement with sends announces them.
pub const OUTBOX_CHANNEL: &str = "report_relay_outbox";

impl Postgres {
    pub(in crate::state) async fn acknowledge(
        &self,
        ack: Acknowledgement,
        fence: Option<&Fence>,
    ) -> anyhow::Result<AckResult> {
        timed("Failed to acknowledge a message", async {
            // Fenced only when it moves the checkpoint: a replay's rows need no lease.
            let fence = fence.filter(|_| ack.checkpoint.is_some());
            let mut tx = begin_fenced(&self.pool, fence).await?;
            let now = millis(SystemTime::now());
            let duplicate = match (&ack.alert, &ack.http, ack.uid) {
                // An admin alert: a condition raised (or cleared) before, maybe by another
                // replica (the key's row lock orders concurrent ones).
                (Some(AlertChange::Raise { key, text }), _, _) => {
                    sqlx::query(
                        "INSERT INTO alerts (key, raised_at, text) VALUES ($1, $2, $3)
                         ON CONFLICT (key) DO NOTHING",
                    )
                    .bind(key)
                    .bind(now)
                    .bind(text)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected()
                        == 0
                }
                (Some(AlertChange::Clear { key }), _, _) => {
                    sqlx::query("DELETE FROM alerts WHERE key = $1")
                        .bind(key)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected()
                        == 0
                }
                // An HTTP request: the same dedupe key within the window. The key's row is
                // claimed here (a concurrent identical request waits for this transaction,
                // then finds it taken) and gets its message id below.
                (None, Some(http), _) => match &http.dedupe_key {
                    Some(key) => sqlx::query(
                        "INSERT INTO ingest_keys (key, message_id, created_at) VALUES ($1, NULL, $2)
                         ON CONFLICT (key) DO UPDATE SET message_id = NULL, created_at = $2
                           WHERE ingest_keys.created_at < $3
                         RETURNING 1",
                    )
                    .bind(key)
                    .bind(now)
                    .bind(now - window_millis(http.window))
                    .fetch_optional(&mut *tx)
                    .await?
                    .is_none(),
                    None => false,
                },
                (None, None, Some(Checkpoint {
                    uid_validity,
                    last_uid: uid,
                })) => sqlx::query(
                    "SELECT 1 FROM messages WHERE mailbox = $1 AND uid_validity = $2 AND uid = $3
                       AND raw_sha256 = $4
                     UNION ALL
                     SELECT 1 FROM replays WHERE mailbox = $1 AND raw_sha256 = $4",
                )
                .bind(&ack.mailbox)
                .bind(i64::from(uid_validity))
                .bind(i64::from(uid))
                .bind(&ack.raw_sha256)
                .fetch_optional(&mut *tx)
                .await?
                .is_some(),
                (None, None, None) => sqlx::query("SELECT 1 FROM ledger WHERE mailbox = $1 AND raw_sha256 = $2")
                    .bind(&ack.mailbox)
                    .bind(&ack.raw_sha256)
                    .fetch_optional(&mut *tx)
                    .await?
                    .is_some(),
            };
            let result = if duplicate {
                AckResult::Duplicate
            } else {
                let message_id: i64 = sqlx::query_scalar(
                    "INSERT INTO messages (mailbox, uid_validity, uid, raw_sha256, title, outcome,
                                           detail, received_at, acknowledged_at, source)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING id",
                )
                .bind(&ack.mailbox)
                .bind(ack.uid.map(|u| i64::from(u.uid_validity)))
                .bind(ack.uid.map(|u| i64::from(u.last_uid)))
                .bind(&ack.raw_sha256)
                .bind(&ack.title)
                .bind(ack.outcome.as_str())
                .bind(&ack.detail)
                .bind(ack.received_at.map_or(now, millis))
                .bind(now)
                .bind(ack.source().as_str())
                .fetch_one(&mut *tx)
                .await?;
                if let Some(http) = &ack.http {
                    // Not in the ledger: the same content a day later is a new report.
                    if let Some(key) = &http.dedupe_key {
                        sqlx::query("UPDATE ingest_keys SET message_id = $2 WHERE key = $1")
                            .bind(key)
                            .bind(message_id)
                            .execute(&mut *tx)
                            .await?;
                    }
                } else if ack.alert.is_none() {
                    sqlx::query(
                        "INSERT INTO ledger (mailbox, raw_sha256) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    )
                    .bind(&ack.mailbox)
                    .bind(&ack.raw_sha256)
                    .execute(&mut *tx)
                    .await?;
                }
                if ack.uid.is_none() && ack.http.is_none() && ack.alert.is_none() {
                    sqlx::query(
                        "INSERT INTO replays (mailbox, raw_sha256, message_id) VALUES ($1, $2, $3)",
                    )
                    .bind(&ack.mailbox)
                    .bind(&ack.raw_sha256)
                    .bind(message_id)
                    .execute(&mut *tx)
                    .await?;
                }
                for file in &ack.files {
                    sqlx::query(
                        "INSERT INTO files (sha256, bytes, last_used_at) VALUES ($1, $2, $3)
                         ON CONFLICT (sha256) DO UPDATE SET last_used_at = EXCLUDED.last_used_at",
                    )
                    .bind(&file.sha256)
                    .bind(file.bytes.as_ref())
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                }
                for (chat_id, send) in &ack.sends {
                    let send = serde_json::to_string(send)?;
                    sqlx::query(
                        "INSERT INTO outbox (message_id, chat_id, send, created_at)
                         VALUES ($1, $2, $3, $4)",
                    )
                    .bind(message_id)
                    .bind(chat_id)
                    .bind(send)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                }
                if !ack.sends.is_empty() {
                    sqlx::query("SELECT pg_notify($1, '')")
                        .bind(OUTBOX_CHANNEL)
                        .execute(&mut *tx)
                        .await?;
                }
                AckResult::Stored(message_id)
            };
            if let Some(checkpoint) = ack.checkpoint {
                write_checkpoint(&mut *tx, &ack.mailbox, checkpoint).await?;
            }
            tx.commit().await?;
            Ok::<_, anyhow::Error>(result)
        })
        .await
    }

    pub(in crate::state) async fn due_sends<F>(
        &self,
        now: SystemTime,
        busy: Vec<i64>,
        in_flight: Vec<i64>,
        limit: usize,
        mut admit: F,
        fence: Option<&Fence>,
    ) -> anyhow::Result<Vec<OutboxRow>>
    where
        F: FnMut(&OutboxRow) -> bool + std::marker::Send + 'static,
    {
        // Claimed only while the `delivery` lease is held with the same epoch.
        let rows = timed("Failed to read the due sends", async {
            let mut tx = begin_fenced(&self.pool, fence).await?;
            let rows = sqlx::query(
                "SELECT o.id, o.message_id, o.chat_id, o.send, o.attempts, o.not_before,
                        o.created_at, m.received_at, o.first_failed_at, m.source
                 FROM outbox o JOIN messages m ON m.id = o.message_id
                 WHERE o.status = 'pending'
                   AND o.id = (SELECT MIN(i.id) FROM outbox i
                               WHERE i.status = 'pending' AND i.chat_id = o.chat_id)
                 ORDER BY o.id",
            )
            .fetch_all(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok::<_, anyhow::Error>(rows)
        })
        .await?;
        let now = millis(now);
        let mut unreadable = Vec::new();
        let mut due = Vec::new();
        for row in rows {
            let id: i64 = row.try_get(0)?;
            let chat_id: i64 = row.try_get(2)?;
            let not_before: i64 = row.try_get(5)?;
            // A row in flight blocks its chat even after a migration moved it to a new id.
            if not_before > now || busy.contains(&chat_id) || in_flight.contains(&id) {
                continue;
            }
            let send: String = row.try_get(3)?;
            let send = match serde_json::from_str(&send) {
                Ok(send) => send,
                Err(error) => {
                    unreadable.push((id, chat_id, format!("unreadable outbox row: {error}")));
                    continue;
                }
            };
            let attempts: i32 = row.try_get(4)?;
            let candidate = OutboxRow {
                id,
                message_id: row.try_get(1)?,
                chat_id,
                send,
                attempts: u32::try_from(attempts).unwrap_or(0),
                created_at: from_millis(row.try_get(6)?),
                first_failed_at: row.try_get::<Option<i64>, _>(8)?.map(from_millis),
                received_at: from_millis(row.try_get(7)?),
                source: Source::from_column(row.try_get(9)?),
            };
            if admit(&candidate) {
                due.push(candidate);
                if due.len() >= limit {
                    break;
                }
            }
        }
        for (id, chat_id, error) in unreadable {
            tracing::error!(
                outbox_row = id,
                chat_id,
                %error,
                "An outbox row cannot be read; it is marked failed and delivery goes on."
            );
            self.finish_send(id, SendResult::Failed(error)).await?;
        }
        Ok(due)
    }

    pub(in crate::state) async fn next_due_at(&self) -> anyhow::Result<Option<SystemTime>> {
        let next: Option<i64> = timed(
            "Failed to read the next due time",
            sqlx::query_scalar(
                "SELECT MIN(not_before) FROM outbox WHERE status = 'pending' AND not_before > $1",
            )
            .bind(millis(SystemTime::now()))
            .fetch_one(&self.pool),
        )
        .await?;
        Ok(next.map(from_millis))
    }

    pub(in crate::state) async fn finish_send(
        &self,
        id: i64,
        result: SendResult,
    ) -> anyhow::Result<()> {
        let now = millis(SystemTime::now());
        let query = match result {
            SendResult::Done => sqlx::query(
                "UPDATE outbox SET status = 'done', finished_at = $2, error = NULL WHERE id = $1",
            )
            .bind(id)
            .bind(now),
            SendResult::Failed(error) => sqlx::query(
                "UPDATE outbox SET status = 'failed', finished_at = $2, error = $3 WHERE id = $1",
            )
            .bind(id)
            .bind(now)
            .bind(error),
        };
        timed("Failed to finish a send", query.execute(&self.pool)).await?;
        Ok(())
    }

    pub(in crate::state) async fn fail_rest_of_message(
        &self,
        message_id: i64,
        chat_id: i64,
        error: String,
    ) -> anyhow::Result<usize> {
        let done = timed(
            "Failed to fail the rest of a message",
            sqlx::query(
                "UPDATE outbox SET status = 'failed', finished_at = $3, error = $4
                 WHERE message_id = $1 AND chat_id = $2 AND status = 'pending'",
            )
            .bind(message_id)
            .bind(chat_id)
            .bind(millis(SystemTime::now()))
            .bind(error)
            .execute(&self.pool),
        )
        .await?;
        Ok(rows(done.rows_affected()))
    }

    pub(in crate::state) async fn retry_send(
        &self,
        id: i64,
        not_before: SystemTime,
        count_attempt: bool,
        error: String,
    ) -> anyhow::Result<()> {
        timed(
            "Failed to put a send back",
            sqlx::query(
                "UPDATE outbox SET not_before = $2, attempts = attempts + $3, error = $4,
                        first_failed_at = CASE WHEN $3 = 1 THEN COALESCE(first_failed_at, $5)
                                               ELSE first_failed_at END
                 WHERE id = $1",
            )
            .bind(id)
            .bind(millis(not_before))
            .bind(i32::from(count_attempt))
            .bind(error)
            .bind(millis(SystemTime::now()))
            .execute(&self.pool),
        )
        .await?;
        Ok(())
    }

    pub(in crate::state) async fn migrate_chat(&self, old: i64, new: i64) -> anyhow::Result<usize> {
        let done = timed(
            "Failed to move the sends of a migrated chat",
            sqlx::query("UPDATE outbox SET chat_id = $2 WHERE chat_id = $1 AND status = 'pending'")
                .bind(old)
                .bind(new)
                .execute(&self.pool),
        )
        .await?;
        Ok(rows(done.rows_affected()))
    }

    pub(in crate::state) async fn recent_sends(
        &self,
        since: SystemTime,
    ) -> anyhow::Result<Vec<RecentSend>> {
        let rows: Vec<(i64, String, i64)> = timed(
            "Failed to read the recent sends",
            sqlx::query_as(
                "SELECT chat_id, send, finished_at FROM outbox
                 WHERE status = 'done' AND finished_at >= $1 ORDER BY finished_at",
            )
            .bind(millis(since))
            .fetch_all(&self.pool),
        )
        .await?;
        Ok(rows
            .iter()
            .map(|(chat_id, send, finished_at)| RecentSend::from_row(*chat_id, send, *finished_at))
            .collect())
    }

    pub(in crate::state) async fn pending_count(&self) -> anyhow::Result<i64> {
        timed(
            "Failed to count the pending sends",
            sqlx::query_scalar("SELECT COUNT(*) FROM outbox WHERE status = 'pending'")
                .fetch_one(&self.pool),
        )
        .await
    }

    pub(in crate::state) async fn prune(&self, cutoff: SystemTime) -> anyhow::Result<usize> {
        let cutoff = millis(cutoff);
        timed("Failed to prune the state", async {
            let mut tx = self.pool.begin().await?;
            let mut deleted = sqlx::query(
                "DELETE FROM outbox WHERE status != 'pending' AND finished_at < $1",
            )
            .bind(cutoff)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            deleted += sqlx::query("DELETE FROM ingest_keys WHERE created_at < $1")
                .bind(cutoff)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            // The ledger and the replays stay: they are what makes an old mail a duplicate.
            deleted += sqlx::query(
                "DELETE FROM messages WHERE acknowledged_at < $1
                   AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.message_id = messages.id)",
            )
            .bind(cutoff)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            sqlx::query(
                "DELETE FROM delivery_log
                  WHERE NOT EXISTS (SELECT 1 FROM messages m WHERE m.id = delivery_log.message_id)",
            )
            .execute(&mut *tx)
            .await?;
            deleted += sqlx::query(
                "DELETE FROM files WHERE last_used_at < $1
                   AND NOT EXISTS (SELECT 1 FROM outbox o
                                   WHERE o.status = 'pending' AND strpos(o.send, files.sha256) > 0)",
            )
            .bind(cutoff)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            tx.commit().await?;
            Ok::<_, anyhow::Error>(rows(deleted))
        })
        .await
    }

    pub(in crate::state) async fn ingest_key_message(
        &self,
        key: String,
        since: SystemTime,
    ) -> anyhow::Result<Option<i64>> {
        let id: Option<Option<i64>> = timed(
            "Failed to read an ingest key",
            sqlx::query_scalar(
                "SELECT message_id FROM ingest_keys WHERE key = $1 AND created_at >= $2",
            )
            .bind(key)
            .bind(millis(since))
            .fetch_optional(&self.pool),
        )
        .await?;
        Ok(id.flatten())
    }

    pub(in crate::state) async fn message_status(
        &self,
        id: i64,
    ) -> anyhow::Result<Option<MessageStatus>> {
        timed("Failed to read a message's status", async {
            let Some(row) = sqlx::query(
                "SELECT mailbox, source, title, outcome, detail, received_at
                 FROM messages WHERE id = $1",
            )
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            else {
                return Ok(None);
            };
            let mut message = MessageStatus {
                id,
                mailbox: row.try_get(0)?,
                source: Source::from_column(row.try_get(1)?),
                title: row.try_get(2)?,
                outcome: MessageOutcome::from_column(row.try_get(3)?),
                detail: row.try_get(4)?,
                received_at: from_millis(row.try_get(5)?),
                sends: Vec::new(),
            };
            let sends: Vec<(i64, String, Option<String>, Option<i64>)> = sqlx::query_as(
                "SELECT chat_id, status, error, finished_at FROM outbox WHERE message_id = $1
                 ORDER BY id",
            )
            .bind(id)
            .fetch_all(&self.pool)
            .await?;
            message.sends = sends
                .into_iter()
                .map(|(chat_id, status, error, finished_at)| {
                    SendStatus::from_columns(chat_id, status, error, finished_at)
                })
                .collect();
            Ok::<_, anyhow::Error>(Some(message))
        })
        .await
    }

    pub(in crate::state) async fn messages_since(
        &self,
        since: SystemTime,
        mailbox: Option<String>,
    ) -> anyhow::Result<Vec<MessageStatus>> {
        timed("Failed to read the messages", async {
            let rows = sqlx::query(
                "SELECT id, mailbox, source, title, outcome, detail, received_at FROM messages
                 WHERE received_at >= $1 AND ($2::text IS NULL OR lower(mailbox) = lower($2))
                 ORDER BY id",
            )
            .bind(millis(since))
            .bind(&mailbox)
            .fetch_all(&self.pool)
            .await?;
            let mut messages = Vec::with_capacity(rows.len());
            for row in rows {
                messages.push(MessageStatus {
                    id: row.try_get(0)?,
                    mailbox: row.try_get(1)?,
                    source: Source::from_column(row.try_get(2)?),
                    title: row.try_get(3)?,
                    outcome: MessageOutcome::from_column(row.try_get(4)?),
                    detail: row.try_get(5)?,
                    received_at: from_millis(row.try_get(6)?),
                    sends: Vec::new(),
                });
            }
            let sends: Vec<SendRow> = sqlx::query_as(
                "SELECT o.message_id, o.chat_id, o.status, o.error, o.finished_at
                 FROM outbox o JOIN messages m ON m.id = o.message_id
                 WHERE m.received_at >= $1 AND ($2::text IS NULL OR lower(m.mailbox) = lower($2))
                 ORDER BY o.message_id, o.id",
            )
            .bind(millis(since))
            .bind(&mailbox)
            .fetch_all(&self.pool)
            .await?;
            let sends = sends
                .into_iter()
                .map(|(message_id, chat_id, status, error, finished_at)| {
                    (
                        message_id,
                        SendStatus::from_columns(chat_id, status, error, finished_at),
                    )
                })
                .collect();
            Ok::<_, anyhow::Error>(crate::state::outbox::attach_sends(messages, sends))
        })
        .await
    }

    pub(in crate::state) async fn send_counts(
        &self,
        message_ids: Vec<i64>,
    ) -> anyhow::Result<SendCounts> {
        let rows: Vec<(String, i64)> = timed(
            "Failed to count the sends of messages",
            sqlx::query_as(
                "SELECT status, COUNT(*) FROM outbox WHERE message_id = ANY($1) GROUP BY status",
            )
            .bind(message_ids)
            .fetch_all(&self.pool),
        )
        .await?;
        let mut counts = SendCounts::default();
        for (status, count) in rows {
            let count = usize::try_from(count).unwrap_or(0);
            match status.as_str() {
                "pending" => counts.pending += count,
                "failed" => counts.failed += count,
                _ => counts.done += count,
            }
        }
        Ok(counts)
    }
}

fn rows(affected: u64) -> usize {
    usize::try_from(affected).unwrap_or(usize::MAX)
}
