//! The state's side of SeaTable's delivery log (`seatable.delivery_log`): which finished
//! reports are not yet in the `deliveries` table, with what happened to each recipient, and
//! the mark that they are. The writer in [`crate::delivery_log`] reads them after delivery,
//! appends them to SeaTable, and marks them only once SeaTable accepted the batch.

use std::time::SystemTime;

use super::Source;

/// A report whose sends have all finished (none pending) and that is not yet in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinishedReport {
    /// The message's id in the state.
    pub message_id: i64,
    /// The mailbox address.
    pub mailbox: String,
    /// The report title.
    pub title: String,
    /// How it came in.
    pub source: Source,
    /// When it arrived (IMAP INTERNALDATE, or when the HTTP request was accepted).
    pub received_at: SystemTime,
    /// Its outbox rows, in outbox order.
    pub sends: Vec<FinishedSend>,
}

/// One finished outbox row of a [`FinishedReport`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinishedSend {
    /// The recipient's `chat_id`.
    pub chat_id: i64,
    /// Telegram accepted it (`done`); otherwise it failed with `error`.
    pub done: bool,
    /// Why it failed, for a failed send.
    pub error: Option<String>,
    /// When it finished, if recorded.
    pub finished_at: Option<SystemTime>,
}

/// Groups `(message columns, send)` rows, ordered by message id then outbox id, into reports.
pub(super) fn group(rows: Vec<(ReportColumns, FinishedSend)>) -> Vec<FinishedReport> {
    let mut reports: Vec<FinishedReport> = Vec::new();
    for (columns, send) in rows {
        match reports.last_mut() {
            Some(last) if last.message_id == columns.message_id => last.sends.push(send),
            _ => reports.push(FinishedReport {
                message_id: columns.message_id,
                mailbox: columns.mailbox,
                title: columns.title,
                source: Source::from_column(&columns.source),
                received_at: super::from_millis(columns.received_at),
                sends: vec![send],
            }),
        }
    }
    reports
}

/// A message's columns as both backends read them.
pub(super) struct ReportColumns {
    pub(super) message_id: i64,
    pub(super) mailbox: String,
    pub(super) title: String,
    pub(super) source: String,
    pub(super) received_at: i64,
}

/// The query both backends run, with the placeholder for the limit on messages (`?1` or `$1`):
/// the queued messages with outbox rows, none of them pending, not in `delivery_log`, oldest
/// first, with their rows.
macro_rules! unlogged_sql {
    ($limit:literal) => {
        concat!(
            "SELECT m.id, m.mailbox, m.title, m.source, m.received_at,
                    o.chat_id, o.status, o.error, o.finished_at
               FROM messages m JOIN outbox o ON o.message_id = m.id
              WHERE m.id IN (
                     SELECT mm.id FROM messages mm
                      WHERE mm.outcome = 'queued' AND mm.source != 'alert'
                        AND NOT EXISTS (SELECT 1 FROM delivery_log l WHERE l.message_id = mm.id)
                        AND EXISTS (SELECT 1 FROM outbox a WHERE a.message_id = mm.id)
                        AND NOT EXISTS (SELECT 1 FROM outbox p
                                         WHERE p.message_id = mm.id AND p.status = 'pending')
                      ORDER BY mm.id LIMIT ",
            $limit,
            ")
              ORDER BY m.id, o.id"
        )
    };
}
pub(super) use unlogged_sql;
