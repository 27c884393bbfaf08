//! The directory's SeaTable backend: reads the three tables and writes the few cells the relay
//! owns (`last_uid`, `id_telegram`, a group's `id_telegram_chat` claim and migration).

use futures::future::BoxFuture;
use serde_json::{Map, json};

use tracing::{debug, error, info, warn};

use crate::config::TableNames;
use crate::seatable::SeaTableClient;

use super::{DirectoryBackend, Snapshot, column};

/// The directory backed by SeaTable.
///
/// SeaTable silently ignores unknown column names on writes (seatable-api.md §3.1), so the
/// backend writes only once the base's schema has been checked and has every column the relay
/// writes: checked at start-up, or, after a start from the persisted snapshot, on the first read
/// that succeeds. Until then, and while columns are missing, every write is refused with the
/// reason (and `/readyz` says so).
pub struct SeaTableBackend {
    client: SeaTableClient,
    tables: TableNames,
    schema: std::sync::Mutex<SchemaGate>,
}

/// What is known of the base's schema.
#[derive(Debug, Clone, PartialEq, Eq)]
enum SchemaGate {
    /// Not checked yet (SeaTable has not answered since the start).
    Unchecked,
    /// Every table and column the relay writes exists.
    Passed,
    /// The base lacks these (one line).
    Lacks(String),
}

impl std::fmt::Debug for SeaTableBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SeaTableBackend")
    }
}

impl SeaTableBackend {
    /// A backend reading and writing the configured tables through `client`.
    pub fn new(client: SeaTableClient, tables: TableNames) -> Self {
        Self {
            client,
            tables,
            schema: std::sync::Mutex::new(SchemaGate::Unchecked),
        }
    }

    /// Checks the base's schema (`GET /metadata/`) and opens writes when nothing is missing.
    ///
    /// # Errors
    /// The base lacks a table or column (one line naming each; logged at ERROR when it is
    /// first found), or SeaTable could not be reached (then what was known stays).
    pub async fn verify_schema(&self) -> anyhow::Result<()> {
        let crate::schema::Inspection {
            missing,
            features_off,
        } = crate::schema::inspect(&self.client, &self.tables).await?;
        if missing.is_empty() {
            if self.set_schema(SchemaGate::Passed) {
                info!("The SeaTable schema has every column the relay writes; writes are on.");
                if !features_off.is_empty() {
                    warn!("{}", crate::schema::features_off_warning(&features_off));
                }
            }
            return Ok(());
        }
        let problem = format!(
            "the SeaTable base lacks what the relay needs ({}); run `report-relay schema apply`",
            missing.join("; ")
        );
        if self.set_schema(SchemaGate::Lacks(problem.clone())) {
            error!(%problem, "Not writing to SeaTable until its schema is fixed.");
        }
        anyhow::bail!(problem)
    }

    /// Sets the gate; returns whether it changed.
    fn set_schema(&self, gate: SchemaGate) -> bool {
        let mut current = self
            .schema
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let changed = *current != gate;
        *current = gate;
        changed
    }

    fn schema_gate(&self) -> SchemaGate {
        self.schema
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// `Ok` when the schema check passed; else why a write must not go.
    fn ensure_writable(&self) -> anyhow::Result<()> {
        match self.schema_gate() {
            SchemaGate::Passed => Ok(()),
            SchemaGate::Lacks(problem) => anyhow::bail!("not writing to SeaTable: {problem}"),
            SchemaGate::Unchecked => anyhow::bail!(
                "not writing to SeaTable before its schema is checked (it has not answered since the start)"
            ),
        }
    }

    /// The SeaTable client.
    pub fn client(&self) -> &SeaTableClient {
        &self.client
    }

    /// Writes one text cell of one row (`PUT` rows).
    fn write_text(
        &self,
        table: &str,
        row_id: &str,
        column: &str,
        value: String,
    ) -> impl std::future::Future<Output = anyhow::Result<()>> + Send + '_ {
        let (table, row_id) = (table.to_owned(), row_id.to_owned());
        let mut row = Map::new();
        row.insert(column.to_owned(), json!(value));
        async move {
            self.ensure_writable()?;
            self.client.update_rows(&table, &[(row_id, row)]).await?;
            Ok(())
        }
    }
}

/// Quotes a table or column name for SeaTable SQL.
pub fn quote(identifier: &str) -> String {
    format!("`{}`", identifier.replace('`', ""))
}

impl DirectoryBackend for SeaTableBackend {
    fn schema_problem(&self) -> Option<String> {
        match self.schema_gate() {
            SchemaGate::Lacks(problem) => Some(problem),
            SchemaGate::Passed | SchemaGate::Unchecked => None,
        }
    }

    fn fetch(&self) -> BoxFuture<'_, anyhow::Result<Snapshot>> {
        Box::pin(async move {
            let (users, mailboxes, groups) = tokio::try_join!(
                self.client.list_rows(&self.tables.users),
                self.client.list_rows(&self.tables.mailboxes),
                self.client.list_rows(&self.tables.groups),
            )?;
            // SeaTable answers: check the schema once (and again while it lacks something),
            // but serve the rows whatever it says; only writes wait for it.
            if self.schema_gate() != SchemaGate::Passed
                && let Err(error) = self.verify_schema().await
            {
                debug!(
                    error = format!("{error:#}"),
                    "The SeaTable schema check did not pass."
                );
            }
            Ok(Snapshot::from_rows(&users, &mailboxes, &groups))
        })
    }

    fn write_last_uid(
        &self,
        mailbox_row_id: &str,
        last_uid: u32,
    ) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(self.write_text(
            &self.tables.mailboxes,
            mailbox_row_id,
            column::LAST_UID,
            last_uid.to_string(),
        ))
    }

    fn write_user_telegram_id(
        &self,
        user_row_id: &str,
        telegram_id: i64,
    ) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(self.write_text(
            &self.tables.users,
            user_row_id,
            column::ID_TELEGRAM,
            telegram_id.to_string(),
        ))
    }

    fn claim_group(&self, group_row_id: &str, chat_id: i64) -> BoxFuture<'_, anyhow::Result<bool>> {
        let row_id = group_row_id.to_owned();
        Box::pin(async move {
            self.ensure_writable()?;
            // SeaTable has no compare-and-set and SQL UPDATE reports no affected count: claim
            // with a conditional UPDATE, then read the row back (seatable-api.md §6).
            let sql = format!(
                "UPDATE {table} SET `{chat}` = ?, `{locked}` = true \
                 WHERE `{row_id}` = ? AND `{chat}` IS NULL",
                table = quote(&self.tables.groups),
                chat = column::ID_TELEGRAM_CHAT,
                locked = column::IS_LOCKED,
                row_id = column::ROW_ID,
            );
            self.client
                .sql(&sql, &[json!(chat_id.to_string()), json!(row_id)])
                .await?;
            let row = self.client.get_row(&self.tables.groups, &row_id).await?;
            Ok(row.text(column::ID_TELEGRAM_CHAT).map(str::trim)
                == Some(chat_id.to_string().as_str()))
        })
    }

    fn rewrite_group_chat_id(&self, old: i64, new: i64) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async move {
            self.ensure_writable()?;
            let sql = format!(
                "UPDATE {table} SET `{chat}` = ? WHERE `{chat}` = ?",
                table = quote(&self.tables.groups),
                chat = column::ID_TELEGRAM_CHAT,
            );
            self.client
                .sql(&sql, &[json!(new.to_string()), json!(old.to_string())])
                .await?;
            Ok(())
        })
    }
}
