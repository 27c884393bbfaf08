//! SeaTable's delivery log (`seatable.delivery_log: true`): one row per report in the
//! `deliveries` table, written after delivery, off the delivery path.
//!
//! Where it sits: the [`crate::delivery`] worker finishes a report's outbox rows; this writer,
//! on the replica holding the `delivery` lease, polls the state for reports with no pending
//! send left ([`State::unlogged_reports`]), appends them to SeaTable in batches (`POST rows/`,
//! then `POST links/` for the `mailbox` link, which rows cannot carry), and marks them logged
//! ([`State::mark_logged`]) only once SeaTable accepted the batch. A slow or failing SeaTable
//! only delays the log, never a send.
//!
//! **No duplicates:** an append whose answer is lost may have been stored, so before each
//! append the writer asks SeaTable (SQL) which of the batch's `report` keys
//! ([`table::REPORT`]) are already there, and appends only the others.
//!
//! The table and its columns are in [`table`]; a base that lacks them leaves the log off, with a
//! warning naming what is missing (`report-relay schema apply` creates them).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use futures::FutureExt;
use futures::future::BoxFuture;
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::app::CheckLine;
use crate::config::TableNames;
use crate::directory::{Directory, quote};
use crate::history::Outcome;
use crate::seatable::SeaTableClient;
use crate::state::{Fence, MessageStatus, State};

pub mod table;

/// How many reports one pass appends with one call (SeaTable takes up to 1000 rows per call,
/// §4; this keeps the SQL look-up's `IN` list short).
pub const BATCH: usize = 100;
/// How long the writer waits between passes, and after a failed one, by default.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);

/// Writes finished reports to the `deliveries` table. Build with [`DeliveryLog::new`], run with
/// [`DeliveryLog::run`].
pub struct DeliveryLog {
    client: SeaTableClient,
    state: State,
    directory: Arc<Directory>,
    tables: TableNames,
    interval: Duration,
}

impl DeliveryLog {
    /// A writer to `tables.deliveries` through `client`, reading the state `state` and the
    /// mailbox rows of `directory`, one pass every `interval`.
    pub fn new(
        client: SeaTableClient,
        state: State,
        directory: Arc<Directory>,
        tables: TableNames,
        interval: Duration,
    ) -> Self {
        Self {
            client,
            state,
            directory,
            tables,
            interval,
        }
    }

    /// Checks the table until SeaTable answers; when it lacks something, warns once naming it
    /// and returns (the log stays off). Then writes a pass every interval until `cancel`.
    pub async fn run(self, cancel: CancellationToken) {
        loop {
            match self.problems().await {
                Ok(problems) if problems.is_empty() => break,
                Ok(problems) => {
                    warn!(
                        missing = problems.join("; "),
                        "seatable.delivery_log is on, but the base lacks the delivery log table; \
                         the log stays off. Run `report-relay schema apply` and restart."
                    );
                    return;
                }
                Err(error) => debug!(
                    error = format!("{error:#}"),
                    "Cannot check the delivery log table yet."
                ),
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(self.interval) => {}
            }
        }
        info!(table = %self.tables.deliveries, "Writing the delivery log to SeaTable.");
        loop {
            match self.flush().await {
                Ok(0) => {}
                Ok(logged) => debug!(logged, "Wrote reports to the delivery log."),
                Err(error) => warn!(
                    error = format!("{error:#}"),
                    "Cannot write the delivery log to SeaTable; retrying later."
                ),
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(self.interval) => {}
            }
        }
    }

    /// What the base lacks for the log (empty when it can be written).
    ///
    /// # Errors
    /// SeaTable could not be reached.
    pub async fn problems(&self) -> anyhow::Result<Vec<String>> {
        let metadata = self.client.metadata().await?;
        Ok(table::missing(
            &metadata,
            &self.tables.deliveries,
            &self.tables.mailboxes,
        ))
    }

    /// Writes every finished report not yet logged, [`BATCH`] at a time, and returns how many
    /// it logged.
    ///
    /// # Errors
    /// The state or SeaTable failed; the reports of the failed batch stay unlogged and are
    /// written by a later pass.
    pub async fn flush(&self) -> anyhow::Result<usize> {
        let mut logged = 0;
        loop {
            let reports = self.state.unlogged_reports(BATCH).await?;
            if reports.is_empty() {
                return Ok(logged);
            }
            self.write(&reports).await?;
            let ids: Vec<i64> = reports.iter().map(|report| report.id).collect();
            self.state.mark_logged(ids).await?;
            logged += reports.len();
            if reports.len() < BATCH {
                return Ok(logged);
            }
        }
    }

    /// Appends the reports SeaTable does not have yet, and links every one to its mailbox row.
    async fn write(&self, reports: &[MessageStatus]) -> anyhow::Result<()> {
        let table = &self.tables.deliveries;
        let keys: Vec<String> = reports.iter().map(key).collect();
        let placeholders = vec!["?"; keys.len()].join(", ");
        let sql = format!(
            "SELECT {report} FROM {table} WHERE {report} IN ({placeholders}) LIMIT 10000",
            report = quote(table::REPORT),
            table = quote(table),
        );
        let params: Vec<Value> = keys.iter().map(|k| json!(k)).collect();
        let existing = self
            .client
            .sql(&sql, &params)
            .await
            .context("Cannot look up the delivery log's rows")?;
        let mut row_ids: std::collections::HashMap<String, String> = existing
            .iter()
            .filter_map(|row| Some((row.text(table::REPORT)?.to_owned(), row.id()?.to_owned())))
            .collect();
        let new: Vec<(&MessageStatus, &String)> = reports
            .iter()
            .zip(&keys)
            .filter(|(_, key)| !row_ids.contains_key(*key))
            .collect();
        if !new.is_empty() {
            let rows: Vec<Map<String, Value>> =
                new.iter().map(|(report, key)| cells(report, key)).collect();
            let ids = self
                .client
                .append_rows(table, &rows)
                .await
                .context("Cannot append to the delivery log")?;
            for ((_, key), id) in new.iter().zip(ids) {
                row_ids.insert((*key).clone(), id);
            }
        }
        self.link(reports, &keys, &row_ids).await
    }

    /// Links each report's row to its mailbox row (by `email`, from the directory). A mailbox
    /// that is no longer in the directory leaves the link empty; the title and counts stay.
    async fn link(
        &self,
        reports: &[MessageStatus],
        keys: &[String],
        row_ids: &std::collections::HashMap<String, String>,
    ) -> anyhow::Result<()> {
        let Some(snapshot) = self.directory.snapshot().await else {
            return Ok(());
        };
        let mut links = Vec::new();
        for (report, key) in reports.iter().zip(keys) {
            let mailbox = snapshot
                .mailboxes
                .iter()
                .find(|m| m.email.eq_ignore_ascii_case(report.mailbox.trim()));
            if let (Some(mailbox), Some(row_id)) = (mailbox, row_ids.get(key)) {
                links.push((row_id.clone(), vec![mailbox.row_id.clone()]));
            }
        }
        if links.is_empty() {
            return Ok(());
        }
        let metadata = self.client.metadata().await?;
        let link_id = metadata
            .table(&self.tables.deliveries)
            .and_then(|t| t.column(table::MAILBOX))
            .and_then(|c| c.link_id())
            .with_context(|| {
                format!(
                    "table {} has no link column {}",
                    self.tables.deliveries,
                    table::MAILBOX
                )
            })?;
        self.client
            .add_links(
                link_id,
                &self.tables.deliveries,
                &self.tables.mailboxes,
                &links,
            )
            .await
            .context("Cannot link the delivery log's rows to their mailboxes")?;
        Ok(())
    }
}

/// The relay's key of a report in the log: `<message id>@<arrival in Unix ms>` (the arrival
/// keeps a reused id of a reset state apart).
pub fn key(report: &MessageStatus) -> String {
    format!("{}@{}", report.id, crate::state::millis(report.received_at))
}

/// The cells of a report's row, keyed by column name: its recipients folded as `history`
/// folds them ([`crate::history::recipients`]).
pub fn cells(report: &MessageStatus, key: &str) -> Map<String, Value> {
    let recipients = crate::history::recipients(&report.sends);
    let failed_text = recipients
        .iter()
        .filter_map(|r| match &r.outcome {
            Outcome::Failed(reason) => Some(format!("{}: {reason}", r.chat_id)),
            Outcome::Sent | Outcome::Pending(_) => None,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let delivered = recipients
        .iter()
        .filter(|r| r.outcome == Outcome::Sent)
        .count();
    let since_arrival = |at: SystemTime| {
        round(
            at.duration_since(report.received_at)
                .unwrap_or_default()
                .as_secs_f64(),
        )
    };
    let first = recipients.iter().filter_map(|r| r.first_sent_at).min();
    let last = recipients.iter().filter_map(|r| r.last_sent_at).max();
    let time = chrono::DateTime::<chrono::Utc>::from(report.received_at)
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, false);
    let mut row = Map::new();
    row.insert("title".to_owned(), json!(report.title));
    row.insert("time".to_owned(), json!(time));
    row.insert("source".to_owned(), json!(report.source.as_str()));
    row.insert("recipients".to_owned(), json!(recipients.len()));
    row.insert("delivered".to_owned(), json!(delivered));
    row.insert("failed".to_owned(), json!(failed_text));
    row.insert(
        "first_send_secs".to_owned(),
        json!(first.map(since_arrival)),
    );
    row.insert("last_send_secs".to_owned(), json!(last.map(since_arrival)));
    row.insert(table::REPORT.to_owned(), json!(key));
    row
}

/// Seconds to one decimal.
fn round(secs: f64) -> f64 {
    (secs * 10.0).round() / 10.0
}

/// `check`'s line on the delivery log (`seatable.delivery_log: true`): the table is there, or
/// what it lacks (the relay then leaves the log off).
pub async fn check_line(client: &SeaTableClient, tables: &TableNames) -> CheckLine {
    match client.metadata().await {
        Ok(metadata) => {
            let missing = table::missing(&metadata, &tables.deliveries, &tables.mailboxes);
            if missing.is_empty() {
                CheckLine {
                    ok: true,
                    text: format!(
                        "seatable: the delivery log table {} is ready",
                        tables.deliveries
                    ),
                }
            } else {
                CheckLine {
                    ok: false,
                    text: format!(
                        "seatable: seatable.delivery_log is on, but {}; the log stays off until \
                         `report-relay schema apply`",
                        missing.join("; ")
                    ),
                }
            }
        }
        Err(error) => CheckLine {
            ok: false,
            text: format!("seatable: cannot read the metadata: {error}"),
        },
    }
}

/// The work [`crate::replica::run_while_held`] runs while this replica holds the `delivery`
/// lease: a [`DeliveryLog`] writing every [`DEFAULT_INTERVAL`] until the lease is lost.
pub fn lease_work(
    client: SeaTableClient,
    state: State,
    directory: Arc<Directory>,
    tables: TableNames,
) -> impl FnMut(Fence, CancellationToken) -> BoxFuture<'static, ()> {
    move |_, held| {
        DeliveryLog::new(
            client.clone(),
            state.clone(),
            directory.clone(),
            tables.clone(),
            DEFAULT_INTERVAL,
        )
        .run(held)
        .boxed()
    }
}

#[cfg(test)]
mod tests;
