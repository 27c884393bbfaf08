//! SQLite: the reports not yet in SeaTable's delivery log, and marking them logged.

use rusqlite::params;

use super::Sqlite;
use crate::state::delivery_log::{ReportColumns, group, unlogged_sql};
use crate::state::{MessageStatus, SendStatus, millis};

impl Sqlite {
    pub(in crate::state) async fn unlogged_reports(
        &self,
        limit: usize,
    ) -> anyhow::Result<Vec<MessageStatus>> {
        self.with(move |conn| {
            let mut statement = conn.prepare_cached(unlogged_sql!("?1"))?;
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let rows = statement
                .query_map([limit], |row| {
                    let status: String = row.get(6)?;
                    let finished_at: Option<i64> = row.get(8)?;
                    Ok((
                        ReportColumns {
                            message_id: row.get(0)?,
                            mailbox: row.get(1)?,
                            title: row.get(2)?,
                            source: row.get(3)?,
                            received_at: row.get(4)?,
                        },
                        SendStatus::from_columns(row.get(5)?, status, row.get(7)?, finished_at),
                    ))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(group(rows))
        })
        .await
    }

    pub(in crate::state) async fn mark_logged(&self, message_ids: Vec<i64>) -> anyhow::Result<()> {
        self.with(move |conn| {
            let now = millis(std::time::SystemTime::now());
            let tx = conn.transaction()?;
            {
                let mut statement = tx.prepare_cached(
                    "INSERT OR IGNORE INTO delivery_log (message_id, logged_at) VALUES (?1, ?2)",
                )?;
                for id in message_ids {
                    statement.execute(params![id, now])?;
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }
}
