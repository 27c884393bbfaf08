//! PostgreSQL: the reports not yet in SeaTable's delivery log, and marking them logged.

use sqlx::Row;

use super::{Postgres, timed};
use crate::state::delivery_log::{ReportColumns, group, unlogged_sql};
use crate::state::{MessageStatus, SendStatus, millis};

impl Postgres {
    pub(in crate::state) async fn unlogged_reports(
        &self,
        limit: usize,
    ) -> anyhow::Result<Vec<MessageStatus>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = timed(
            "Failed to read the reports not yet in the delivery log",
            sqlx::query(unlogged_sql!("$1"))
                .bind(limit)
                .fetch_all(&self.pool),
        )
        .await?;
        let mut grouped = Vec::with_capacity(rows.len());
        for row in rows {
            let status: String = row.try_get(6)?;
            let finished_at: Option<i64> = row.try_get(8)?;
            grouped.push((
                ReportColumns {
                    message_id: row.try_get(0)?,
                    mailbox: row.try_get(1)?,
                    title: row.try_get(2)?,
                    source: row.try_get(3)?,
                    received_at: row.try_get(4)?,
                },
                SendStatus::from_columns(row.try_get(5)?, status, row.try_get(7)?, finished_at),
            ));
        }
        Ok(group(grouped))
    }

    pub(in crate::state) async fn mark_logged(&self, message_ids: Vec<i64>) -> anyhow::Result<()> {
        let now = millis(std::time::SystemTime::now());
        timed(
            "Failed to mark reports as in the delivery log",
            sqlx::query(
                "INSERT INTO delivery_log (message_id, logged_at)
                 SELECT id, $2::BIGINT FROM UNNEST($1::BIGINT[]) AS id
                 ON CONFLICT (message_id) DO NOTHING",
            )
            .bind(message_ids)
            .bind(now)
            .execute(&self.pool),
        )
        .await?;
        Ok(())
    }
}
