//! The PostgreSQL backend of the state (`state.url`), shared by every replica.
//!
//! sqlx's pool over rustls; the schema is created and upgraded by versioned migrations
//! (`state/postgres/NNNN_*.sql`, recorded in `_sqlx_migrations`) when the relay connects, under
//! sqlx's advisory lock so two replicas starting together migrate once. Every call has a
//! client-side deadline ([`CALL_TIMEOUT`]) on top of the server's `statement_timeout`, so a
//! partition never hangs a watcher. Times are Unix milliseconds, as on SQLite; the leases use
//! the server's clock (`now()`), so replicas' clocks do not matter.

use std::borrow::Cow;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use sqlx::Row;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use super::SNAPSHOT_KEY;
use crate::imap::Checkpoint;
use crate::report::render::ItemKind;
use crate::state::files::kind_name;
use crate::state::{Fence, StoredRefreshToken, millis};

mod delivery_log;
mod lease;
mod notify;
mod outbox;

pub use self::lease::{LEASES_CHANNEL, LeaseLost};
pub use self::notify::CHAT_STATUS_CHANNEL;
pub use self::outbox::OUTBOX_CHANNEL;

/// The deadline of one call to PostgreSQL, connection included.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How many connections one replica opens at most.
const MAX_CONNECTIONS: u32 = 8;

/// The migrations, in order. A released migration is never edited (sqlx checks its checksum);
/// a schema change is a new file.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "state", include_str!("postgres/0001_state.sql")),
    (2, "oauth", include_str!("postgres/0002_oauth.sql")),
    (3, "ingest", include_str!("postgres/0003_ingest.sql")),
    // Applied databases keep the description they were migrated with; sqlx compares checksums.
    (
        5,
        "delivery_log",
        include_str!("postgres/0005_delivery_log.sql"),
    ),
    (6, "mutes", include_str!("postgres/0006_mutes.sql")),
    (
        7,
        "admin_alerts",
        include_str!("postgres/0007_admin_alerts.sql"),
    ),
];

/// A handle on the PostgreSQL state; cheap to clone.
#[derive(Clone)]
pub struct Postgres {
    pool: PgPool,
}

impl std::fmt::Debug for Postgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Postgres")
    }
}

/// A sqlx error in words without the connection URL (sqlx's errors never carry the password,
/// but a config error would quote the text it was given).
fn database_error(error: sqlx::Error) -> anyhow::Error {
    match error {
        sqlx::Error::Configuration(_) => {
            anyhow::anyhow!("state.url is not a valid PostgreSQL URL")
        }
        other => anyhow::Error::new(other),
    }
}

/// Starts a transaction that holds `fence`'s lease row until it commits (see
/// [`lease::hold_fence`]); without a fence, a plain transaction.
async fn begin_fenced(
    pool: &PgPool,
    fence: Option<&Fence>,
) -> anyhow::Result<sqlx::Transaction<'static, sqlx::Postgres>> {
    let mut tx = pool.begin().await?;
    if let Some(fence) = fence {
        lease::hold_fence(&mut tx, fence).await?;
    }
    Ok(tx)
}

/// Runs one database call with [`CALL_TIMEOUT`].
async fn timed<T, E: Into<anyhow::Error>>(
    what: &'static str,
    call: impl std::future::Future<Output = Result<T, E>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(result) => result.map_err(Into::into).context(what),
        Err(_) => anyhow::bail!(
            "{what}: PostgreSQL did not answer within {} s",
            CALL_TIMEOUT.as_secs()
        ),
    }
}

impl Postgres {
    /// Connects to `url` and applies the pending migrations.
    ///
    /// # Errors
    /// A malformed URL, an unreachable server, a refused login, or a failed migration; the
    /// messages never contain the URL.
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|_| anyhow::anyhow!("state.url is not a valid PostgreSQL URL"))?
            .application_name("report-relay")
            .options([("statement_timeout", "30s")]);
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(CALL_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(database_error)
            .context("Failed to connect to PostgreSQL (state.url)")?;
        let migrator = Migrator {
            migrations: Cow::Owned(
                MIGRATIONS
                    .iter()
                    .map(|(version, description, sql)| {
                        Migration::new(
                            *version,
                            Cow::Borrowed(*description),
                            MigrationType::Simple,
                            sqlx::SqlStr::from_static(sql),
                            false,
                        )
                    })
                    .collect(),
            ),
            ..Migrator::DEFAULT
        };
        tokio::time::timeout(Duration::from_secs(120), migrator.run(&pool))
            .await
            .map_err(|_| anyhow::anyhow!("The state migrations did not finish within 120 s"))?
            .context("Failed to migrate the PostgreSQL state schema")?;
        Ok(Self { pool })
    }

    /// The connection pool, for the leases and `LISTEN/NOTIFY`.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub(super) async fn checkpoint(&self, mailbox: &str) -> anyhow::Result<Option<Checkpoint>> {
        let row = timed(
            "Failed to read a checkpoint",
            sqlx::query("SELECT uid_validity, last_uid FROM checkpoints WHERE mailbox = $1")
                .bind(mailbox)
                .fetch_optional(&self.pool),
        )
        .await?;
        row.map(|row| checkpoint_of(&row)).transpose()
    }

    pub(super) async fn set_checkpoint(
        &self,
        mailbox: &str,
        checkpoint: Checkpoint,
        fence: Option<&Fence>,
    ) -> anyhow::Result<()> {
        timed("Failed to write a checkpoint", async {
            let mut tx = begin_fenced(&self.pool, fence).await?;
            write_checkpoint(&mut *tx, mailbox, checkpoint).await?;
            tx.commit().await?;
            Ok::<_, anyhow::Error>(())
        })
        .await
    }

    pub(super) async fn save_snapshot(&self, json: String) -> anyhow::Result<()> {
        timed(
            "Failed to save the directory snapshot",
            sqlx::query(
                "INSERT INTO kv (key, value) VALUES ($1, $2)
                 ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            )
            .bind(SNAPSHOT_KEY)
            .bind(json)
            .execute(&self.pool),
        )
        .await?;
        Ok(())
    }

    pub(super) async fn load_snapshot(&self) -> anyhow::Result<Option<String>> {
        timed(
            "Failed to load the directory snapshot",
            sqlx::query_scalar("SELECT value FROM kv WHERE key = $1")
                .bind(SNAPSHOT_KEY)
                .fetch_optional(&self.pool),
        )
        .await
    }

    pub(super) async fn set_chat_status(
        &self,
        chat_id: i64,
        status: Option<String>,
    ) -> anyhow::Result<()> {
        let query = match status {
            Some(status) => sqlx::query(
                "INSERT INTO chat_status (chat_id, status, updated_at) VALUES ($1, $2, $3)
                 ON CONFLICT (chat_id) DO UPDATE SET status = EXCLUDED.status,
                                                     updated_at = EXCLUDED.updated_at",
            )
            .bind(chat_id)
            .bind(status)
            .bind(millis(SystemTime::now())),
            None => sqlx::query("DELETE FROM chat_status WHERE chat_id = $1").bind(chat_id),
        };
        timed("Failed to write a chat status", async {
            let mut tx = self.pool.begin().await?;
            query.execute(&mut *tx).await?;
            // Delivered on commit: the other replicas reload their statuses.
            sqlx::query("SELECT pg_notify($1, '')")
                .bind(CHAT_STATUS_CHANNEL)
                .execute(&mut *tx)
                .await?;
            tx.commit().await
        })
        .await?;
        Ok(())
    }

    pub(super) async fn chat_statuses(&self) -> anyhow::Result<Vec<(i64, String)>> {
        timed(
            "Failed to read the chat statuses",
            sqlx::query_as("SELECT chat_id, status FROM chat_status").fetch_all(&self.pool),
        )
        .await
    }

    pub(super) async fn set_mute(
        &self,
        chat_id: i64,
        mailbox: Option<String>,
        muted: bool,
    ) -> anyhow::Result<u64> {
        let query = match (muted, mailbox) {
            (true, Some(mailbox)) => sqlx::query(
                "INSERT INTO mutes (chat_id, mailbox, muted_at) VALUES ($1, $2, $3)
                 ON CONFLICT (chat_id, mailbox) DO NOTHING",
            )
            .bind(chat_id)
            .bind(mailbox)
            .bind(millis(SystemTime::now())),
            (false, Some(mailbox)) => {
                sqlx::query("DELETE FROM mutes WHERE chat_id = $1 AND mailbox = $2")
                    .bind(chat_id)
                    .bind(mailbox)
            }
            (_, None) => sqlx::query("DELETE FROM mutes WHERE chat_id = $1").bind(chat_id),
        };
        let done = timed("Failed to write a mute", query.execute(&self.pool)).await?;
        Ok(done.rows_affected())
    }

    pub(super) async fn mutes_of(&self, chat_id: i64) -> anyhow::Result<Vec<String>> {
        timed(
            "Failed to read the mutes",
            sqlx::query_scalar("SELECT mailbox FROM mutes WHERE chat_id = $1 ORDER BY mailbox")
                .bind(chat_id)
                .fetch_all(&self.pool),
        )
        .await
    }

    pub(super) async fn raised_alerts(&self) -> anyhow::Result<Vec<crate::state::RaisedAlert>> {
        let rows: Vec<(String, i64, String)> = timed(
            "Failed to read the raised alerts",
            sqlx::query_as("SELECT key, raised_at, text FROM alerts ORDER BY raised_at, key")
                .fetch_all(&self.pool),
        )
        .await?;
        Ok(rows
            .into_iter()
            .map(|(key, raised_at, text)| crate::state::RaisedAlert {
                key,
                raised_at: crate::state::from_millis(raised_at),
                text,
            })
            .collect())
    }

    pub(super) async fn muted_chats(&self, mailbox: String) -> anyhow::Result<Vec<i64>> {
        timed(
            "Failed to read the mutes",
            sqlx::query_scalar("SELECT chat_id FROM mutes WHERE mailbox = $1")
                .bind(mailbox)
                .fetch_all(&self.pool),
        )
        .await
    }

    pub(super) async fn refresh_token(
        &self,
        account: &str,
    ) -> anyhow::Result<Option<StoredRefreshToken>> {
        let row: Option<(String, String)> = timed(
            "Failed to read a refresh token",
            sqlx::query_as(
                "SELECT client_id, refresh_token FROM oauth_refresh_tokens WHERE account = $1",
            )
            .bind(account)
            .fetch_optional(&self.pool),
        )
        .await?;
        Ok(row.map(|(client_id, token)| StoredRefreshToken {
            client_id,
            refresh_token: token.into(),
        }))
    }

    pub(super) async fn store_refresh_token(
        &self,
        account: &str,
        client_id: &str,
        refresh_token: &str,
    ) -> anyhow::Result<()> {
        timed(
            "Failed to store a refresh token",
            sqlx::query(
                "INSERT INTO oauth_refresh_tokens (account, client_id, refresh_token, updated_at)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (account) DO UPDATE SET client_id = EXCLUDED.client_id,
                     refresh_token = EXCLUDED.refresh_token, updated_at = EXCLUDED.updated_at",
            )
            .bind(account)
            .bind(client_id)
            .bind(refresh_token)
            .bind(millis(SystemTime::now()))
            .execute(&self.pool),
        )
        .await?;
        Ok(())
    }

    pub(super) async fn file_bytes(&self, sha256: &str) -> anyhow::Result<bytes::Bytes> {
        let bytes: Option<Vec<u8>> = timed(
            "Failed to read a file",
            sqlx::query_scalar("SELECT bytes FROM files WHERE sha256 = $1")
                .bind(sha256)
                .fetch_optional(&self.pool),
        )
        .await?;
        let bytes = bytes.with_context(|| format!("File {sha256} is not in the state"))?;
        Ok(bytes::Bytes::from(bytes))
    }

    pub(super) async fn file_id(
        &self,
        sha256: &str,
        kind: ItemKind,
    ) -> anyhow::Result<Option<String>> {
        timed(
            "Failed to read a file_id",
            sqlx::query_scalar("SELECT file_id FROM file_ids WHERE sha256 = $1 AND kind = $2")
                .bind(sha256)
                .bind(kind_name(kind))
                .fetch_optional(&self.pool),
        )
        .await
    }

    pub(super) async fn store_file_id(
        &self,
        sha256: &str,
        kind: ItemKind,
        file_id: &str,
    ) -> anyhow::Result<()> {
        timed(
            "Failed to store a file_id",
            sqlx::query(
                "INSERT INTO file_ids (sha256, kind, file_id) VALUES ($1, $2, $3)
                 ON CONFLICT (sha256, kind) DO UPDATE SET file_id = EXCLUDED.file_id",
            )
            .bind(sha256)
            .bind(kind_name(kind))
            .bind(file_id)
            .execute(&self.pool),
        )
        .await?;
        Ok(())
    }

    pub(super) async fn forget_file_id(&self, sha256: &str, kind: ItemKind) -> anyhow::Result<()> {
        timed(
            "Failed to forget a file_id",
            sqlx::query("DELETE FROM file_ids WHERE sha256 = $1 AND kind = $2")
                .bind(sha256)
                .bind(kind_name(kind))
                .execute(&self.pool),
        )
        .await?;
        Ok(())
    }
}

/// A checkpoint row (`uid_validity`, `last_uid`, stored as BIGINT) as the IMAP type.
fn checkpoint_of(row: &sqlx::postgres::PgRow) -> anyhow::Result<Checkpoint> {
    let uid_validity: i64 = row.try_get(0)?;
    let last_uid: i64 = row.try_get(1)?;
    Ok(Checkpoint {
        uid_validity: u32::try_from(uid_validity)
            .context("a stored UIDVALIDITY is out of range")?,
        last_uid: u32::try_from(last_uid).context("a stored UID is out of range")?,
    })
}

async fn write_checkpoint<'e, E>(
    executor: E,
    mailbox: &str,
    checkpoint: Checkpoint,
) -> Result<(), sqlx::Error>
where
    E: sqlx::PgExecutor<'e>,
{
    sqlx::query(
        "INSERT INTO checkpoints (mailbox, uid_validity, last_uid, updated_at)
         VALUES ($1, $2, $3, $4)
         ON CONFLICT (mailbox) DO UPDATE SET uid_validity = EXCLUDED.uid_validity,
                                             last_uid = EXCLUDED.last_uid,
                                             updated_at = EXCLUDED.updated_at",
    )
    .bind(mailbox)
    .bind(i64::from(checkpoint.uid_validity))
    .bind(i64::from(checkpoint.last_uid))
    .bind(millis(SystemTime::now()))
    .execute(executor)
    .await?;
    Ok(())
}
