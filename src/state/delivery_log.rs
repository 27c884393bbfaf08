//! The state's side of SeaTable's delivery log (`seatable.delivery_log`): which finished
//! reports are not yet in the `deliveries` table, with what happened to each recipient, and
//! the mark that they are. The writer in [`crate::delivery_log`] reads them after delivery,
//! appends them to SeaTable, and marks them only once SeaTable accepted the batch.

use super::{MessageOutcome, MessageStatus, SendStatus, Source};

/// Groups `(message columns, send)` rows, ordered by message id then outbox id, into the
/// reports [`crate::state::State::unlogged_reports`] returns: queued messages whose sends have
/// all finished, each with its outbox rows in order.
pub(super) fn group(rows: Vec<(ReportColumns, SendStatus)>) -> Vec<MessageStatus> {
    let mut reports: Vec<MessageStatus> = Vec::new();
    for (columns, send) in rows {
        match reports.last_mut() {
            Some(last) if last.id == columns.message_id => last.sends.push(send),
            _ => reports.push(MessageStatus {
                id: columns.message_id,
                mailbox: columns.mailbox,
                source: Source::from_column(&columns.source),
                title: columns.title,
                outcome: MessageOutcome::Queued,
                detail: None,
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
