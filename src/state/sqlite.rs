//! The embedded SQLite backend of the state (`state.path`).
//!
//! The database runs in WAL mode with `synchronous = FULL`. Calls take turns on one connection:
//! each waits for it asynchronously, then runs on the blocking pool, so SQLite occupies at most
//! one blocking thread however many watchers read their checkpoints at once. An exclusive lock
//! on `<state.path>.lock` keeps a second process off the same file.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use rusqlite::{Connection, OptionalExtension, params};

use super::SNAPSHOT_KEY;
use crate::imap::Checkpoint;
use crate::state::{StoredRefreshToken, millis};

mod delivery_log;
mod files;
mod outbox;

/// The SQLite schema, applied on every open (`CREATE … IF NOT EXISTS`).
const SCHEMA: &str = include_str!("sqlite/schema.sql");

/// Applies [`SCHEMA`], then adds the columns that a database made by an older version lacks
/// (`CREATE TABLE IF NOT EXISTS` leaves an existing table as it is).
fn apply_schema(conn: &Connection) -> anyhow::Result<()> {
    conn.execute_batch(SCHEMA)
        .context("Failed to create the state schema")?;
    let has_source: bool = conn.query_row(
        "SELECT COUNT(*) > 0 FROM pragma_table_info('messages') WHERE name = 'source'",
        [],
        |row| row.get(0),
    )?;
    if !has_source {
        conn.execute_batch("ALTER TABLE messages ADD COLUMN source TEXT NOT NULL DEFAULT 'imap'")
            .context("Failed to add messages.source to the state schema")?;
    }
    Ok(())
}

/// A handle on the SQLite state database; cheap to clone.
#[derive(Clone)]
pub struct Sqlite {
    /// An async mutex: a caller waiting for its turn holds no thread.
    conn: Arc<tokio::sync::Mutex<Connection>>,
    /// An exclusive lock on `<state.path>.lock`, held while any clone lives: two relay
    /// processes draining one outbox would send everything twice. `None` for a tool beside
    /// the relay ([`Sqlite::open_beside`]).
    _lock: Option<Arc<std::fs::File>>,
}

impl std::fmt::Debug for Sqlite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sqlite")
    }
}

impl Sqlite {
    /// Opens (creating if needed) the database at `path`, with its parent directory.
    ///
    /// # Errors
    /// The directory or database cannot be created or opened, or the schema cannot be applied.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("Failed to create {}", parent.display()))?;
        }
        let lock = Self::lock(path)?;
        Self::open_with(path, Some(lock))
    }

    /// Opens the database at `path` beside a relay that may be running, without its process
    /// lock: for `oauth login` and `check`, which read and write only their own rows (refresh
    /// tokens). SQLite's own locking (WAL, a 10 s busy timeout) keeps both writers safe.
    ///
    /// # Errors
    /// As [`Sqlite::open`], except that a running relay is no error.
    pub fn open_beside(path: &Path) -> anyhow::Result<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("Failed to create {}", parent.display()))?;
        }
        Self::open_with(path, None)
    }

    /// A database in memory, gone when the last clone is dropped.
    ///
    /// # Errors
    /// The schema cannot be applied.
    pub fn in_memory() -> anyhow::Result<Self> {
        let conn = Connection::open_in_memory()?;
        apply_schema(&conn)?;
        Ok(Self {
            conn: Arc::new(tokio::sync::Mutex::new(conn)),
            _lock: None,
        })
    }

    fn lock(path: &Path) -> anyhow::Result<std::fs::File> {
        let lock_path = path.with_extension("db.lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("Failed to open {}", lock_path.display()))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
                "the state database {} is in use by another report-relay process; stop it first \
                 (two processes would send every report twice)",
                path.display()
            ),
            Err(std::fs::TryLockError::Error(error)) => {
                return Err(error)
                    .with_context(|| format!("Failed to lock {}", lock_path.display()));
            }
        }
        Ok(lock)
    }

    fn open_with(path: &Path, lock: Option<std::fs::File>) -> anyhow::Result<Self> {
        let conn = Connection::open(path)
            .with_context(|| format!("Failed to open the state database {}", path.display()))?;
        // The persisted directory snapshot can hold mailbox passwords from SeaTable rows: keep
        // the file private to the service user (SQLite gives its WAL the same mode).
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("Failed to make {} private", path.display()))?;
        }
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        apply_schema(&conn)?;
        Ok(Self {
            conn: Arc::new(tokio::sync::Mutex::new(conn)),
            _lock: lock.map(Arc::new),
        })
    }

    /// Runs `f` on the connection on the blocking pool, once it is this caller's turn (first
    /// come, first served). The turn is taken before the blocking pool is involved, so a queue
    /// of callers costs no threads; the guard moves into the blocking task and is released when
    /// `f` returns, even if this future was dropped meanwhile.
    pub(super) async fn with<T, F>(&self, f: F) -> anyhow::Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> anyhow::Result<T> + Send + 'static,
    {
        let mut guard = self.conn.clone().lock_owned().await;
        tokio::task::spawn_blocking(move || f(&mut guard))
            .await
            .context("The state database task failed")?
    }

    /// The stored checkpoint of `mailbox`.
    ///
    /// # Errors
    /// A database error.
    pub async fn checkpoint(&self, mailbox: &str) -> anyhow::Result<Option<Checkpoint>> {
        let mailbox = mailbox.to_owned();
        self.with(move |conn| {
            Ok(conn
                .query_row(
                    "SELECT uid_validity, last_uid FROM checkpoints WHERE mailbox = ?1",
                    [&mailbox],
                    |row| {
                        Ok(Checkpoint {
                            uid_validity: row.get(0)?,
                            last_uid: row.get(1)?,
                        })
                    },
                )
                .optional()?)
        })
        .await
    }

    /// Writes the checkpoint of `mailbox` on its own (first start, new UIDVALIDITY).
    ///
    /// # Errors
    /// A database error.
    pub async fn set_checkpoint(
        &self,
        mailbox: &str,
        checkpoint: Checkpoint,
    ) -> anyhow::Result<()> {
        let mailbox = mailbox.to_owned();
        self.with(move |conn| {
            write_checkpoint(conn, &mailbox, checkpoint)?;
            Ok(())
        })
        .await
    }

    /// Persists the last good directory snapshot (JSON).
    ///
    /// # Errors
    /// A database error.
    pub async fn save_snapshot(&self, json: String) -> anyhow::Result<()> {
        self.with(move |conn| {
            conn.execute(
                "INSERT OR REPLACE INTO kv (key, value) VALUES (?1, ?2)",
                params![SNAPSHOT_KEY, json],
            )?;
            Ok(())
        })
        .await
    }

    /// The persisted directory snapshot (JSON), if any.
    ///
    /// # Errors
    /// A database error.
    pub async fn load_snapshot(&self) -> anyhow::Result<Option<String>> {
        self.with(|conn| {
            Ok(conn
                .query_row(
                    "SELECT value FROM kv WHERE key = ?1",
                    [SNAPSHOT_KEY],
                    |row| row.get(0),
                )
                .optional()?)
        })
        .await
    }

    /// Records that a chat blocked or removed the bot (`Some(status)`), or clears it (`None`).
    ///
    /// # Errors
    /// A database error.
    pub async fn set_chat_status(
        &self,
        chat_id: i64,
        status: Option<String>,
    ) -> anyhow::Result<()> {
        self.with(move |conn| {
            match status {
                Some(status) => conn.execute(
                    "INSERT OR REPLACE INTO chat_status (chat_id, status, updated_at) VALUES (?1, ?2, ?3)",
                    params![chat_id, status, millis(SystemTime::now())],
                )?,
                None => conn.execute("DELETE FROM chat_status WHERE chat_id = ?1", [chat_id])?,
            };
            Ok(())
        })
        .await
    }

    /// Every chat that blocked or removed the bot, with its status.
    ///
    /// # Errors
    /// A database error.
    pub async fn chat_statuses(&self) -> anyhow::Result<Vec<(i64, String)>> {
        self.with(|conn| {
            let mut statement = conn.prepare("SELECT chat_id, status FROM chat_status")?;
            let rows = statement
                .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
        .await
    }
}

impl Sqlite {
    /// Mutes (`muted`) or unmutes `mailbox` (lower case) for `chat_id`; `None` unmutes every
    /// mailbox. Returns how many rows changed.
    ///
    /// # Errors
    /// A database error.
    pub async fn set_mute(
        &self,
        chat_id: i64,
        mailbox: Option<String>,
        muted: bool,
    ) -> anyhow::Result<u64> {
        self.with(move |conn| {
            let changed = match (muted, mailbox) {
                (true, Some(mailbox)) => conn.execute(
                    "INSERT OR IGNORE INTO mutes (chat_id, mailbox, muted_at) VALUES (?1, ?2, ?3)",
                    params![chat_id, mailbox, millis(SystemTime::now())],
                )?,
                (false, Some(mailbox)) => conn.execute(
                    "DELETE FROM mutes WHERE chat_id = ?1 AND mailbox = ?2",
                    params![chat_id, mailbox],
                )?,
                (_, None) => conn.execute("DELETE FROM mutes WHERE chat_id = ?1", [chat_id])?,
            };
            Ok(changed as u64)
        })
        .await
    }

    /// The mailboxes `chat_id` muted, sorted.
    ///
    /// # Errors
    /// A database error.
    pub async fn mutes_of(&self, chat_id: i64) -> anyhow::Result<Vec<String>> {
        self.with(move |conn| {
            let mut statement = conn
                .prepare_cached("SELECT mailbox FROM mutes WHERE chat_id = ?1 ORDER BY mailbox")?;
            let rows = statement.query_map([chat_id], |row| row.get(0))?;
            Ok(rows.collect::<Result<Vec<String>, _>>()?)
        })
        .await
    }

    /// The raised admin alerts, oldest first.
    ///
    /// # Errors
    /// A database error.
    pub async fn raised_alerts(&self) -> anyhow::Result<Vec<crate::state::RaisedAlert>> {
        self.with(move |conn| {
            let mut statement = conn.prepare_cached(
                "SELECT key, raised_at, text FROM alerts ORDER BY raised_at, key",
            )?;
            let rows = statement.query_map([], |row| {
                Ok(crate::state::RaisedAlert {
                    key: row.get(0)?,
                    raised_at: crate::state::from_millis(row.get(1)?),
                    text: row.get(2)?,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// The chats that muted `mailbox` (lower case).
    ///
    /// # Errors
    /// A database error.
    pub async fn muted_chats(&self, mailbox: String) -> anyhow::Result<Vec<i64>> {
        self.with(move |conn| {
            let mut statement =
                conn.prepare_cached("SELECT chat_id FROM mutes WHERE mailbox = ?1")?;
            let rows = statement.query_map([mailbox], |row| row.get(0))?;
            Ok(rows.collect::<Result<Vec<i64>, _>>()?)
        })
        .await
    }

    /// The refresh token stored for `account`, if any.
    ///
    /// # Errors
    /// A database error.
    pub async fn refresh_token(&self, account: &str) -> anyhow::Result<Option<StoredRefreshToken>> {
        let account = account.to_owned();
        self.with(move |conn| {
            let row: Option<(String, String)> = conn
                .query_row(
                    "SELECT client_id, refresh_token FROM oauth_refresh_tokens WHERE account = ?1",
                    [account],
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )
                .optional()?;
            Ok(row.map(|(client_id, token)| StoredRefreshToken {
                client_id,
                refresh_token: token.into(),
            }))
        })
        .await
    }

    /// Stores `refresh_token` of `client_id` for `account`, replacing the one before; durable
    /// when it returns (synchronous FULL).
    ///
    /// # Errors
    /// A database error.
    pub async fn store_refresh_token(
        &self,
        account: &str,
        client_id: &str,
        refresh_token: &str,
    ) -> anyhow::Result<()> {
        let (account, client_id, token) = (
            account.to_owned(),
            client_id.to_owned(),
            refresh_token.to_owned(),
        );
        self.with(move |conn| {
            conn.execute(
                "INSERT INTO oauth_refresh_tokens (account, client_id, refresh_token, updated_at)
                 VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (account) DO UPDATE SET client_id = ?2, refresh_token = ?3,
                     updated_at = ?4",
                params![account, client_id, token, millis(SystemTime::now())],
            )?;
            Ok(())
        })
        .await
    }
}

pub(super) fn write_checkpoint(
    conn: &Connection,
    mailbox: &str,
    checkpoint: Checkpoint,
) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO checkpoints (mailbox, uid_validity, last_uid, updated_at)
         VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (mailbox) DO UPDATE SET uid_validity = ?2, last_uid = ?3, updated_at = ?4",
        params![
            mailbox,
            checkpoint.uid_validity,
            checkpoint.last_uid,
            millis(SystemTime::now())
        ],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests;
