//! File bytes and `file_id`s on SQLite.

use anyhow::Context;
use rusqlite::{OptionalExtension, params};

use super::Sqlite;
use crate::report::render::ItemKind;
use crate::state::files::kind_name;

impl Sqlite {
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
}
