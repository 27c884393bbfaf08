//! The directory's SeaTable backend: reads the three tables and writes the few cells the relay
//! owns (`last_uid`, `id_telegram`, a group's `id_telegram_chat` claim and migration).

use futures::future::BoxFuture;
use serde_json::{Map, json};

use crate::config::TableNames;
use crate::seatable::SeaTableClient;

use super::{DirectoryBackend, Snapshot, column};

/// The directory backed by SeaTable.
pub struct SeaTableBackend {
    client: SeaTableClient,
    tables: TableNames,
}

impl std::fmt::Debug for SeaTableBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SeaTableBackend")
    }
}

impl SeaTableBackend {
    /// A backend reading and writing the configured tables through `client`.
    pub fn new(client: SeaTableClient, tables: TableNames) -> Self {
        Self { client, tables }
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
    fn fetch(&self) -> BoxFuture<'_, anyhow::Result<Snapshot>> {
        Box::pin(async move {
            let (users, mailboxes, groups) = tokio::try_join!(
                self.client.list_rows(&self.tables.users),
                self.client.list_rows(&self.tables.mailboxes),
                self.client.list_rows(&self.tables.groups),
            )?;
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
