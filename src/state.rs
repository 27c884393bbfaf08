//! The durable state: checkpoints, messages, the outbox, file bytes and their Telegram
//! `file_id`s, the last good directory snapshot, and chat statuses; on SQLite (`state.path`, the
//! embedded default) or PostgreSQL (`state.url`, shared by replicas).
//!
//! [`State`] is the one interface the relay uses; each method runs on whichever backend was
//! opened, with the same guarantees on both. The watcher acknowledges a message with one
//! transaction ([`State::acknowledge`]) that writes the message, its files, one outbox row per
//! (recipient, send) and the new checkpoint. From then on the message cannot be lost: the
//! delivery worker drains the outbox and marks each row done in its own commit the moment
//! Telegram accepts it, so after a crash only a send in flight can repeat.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

pub use crate::imap::Checkpoint;
use crate::report::render::ItemKind;

mod delivery_log;
mod files;
mod outbox;
mod postgres;
mod sqlite;

pub use self::files::StoredFile;
pub use self::outbox::{
    AckResult, Acknowledgement, AlertChange, HttpIngest, INGEST_DEDUPE_WINDOW, MessageStatus,
    OutboxItem, OutboxRow, OutboxSend, RaisedAlert, RecentSend, SendCounts, SendOptions,
    SendResult, SendStatus, Source,
};
pub use self::postgres::{
    CHAT_STATUS_CHANNEL, LEASES_CHANNEL, LeaseLost, OUTBOX_CHANNEL, Postgres,
};
pub use self::sqlite::Sqlite;

/// A refresh token stored for an OAuth2 account ([`State::refresh_token`]).
#[derive(Debug, Clone)]
pub struct StoredRefreshToken {
    /// The OAuth client it was issued to: a token of another client is not used.
    pub client_id: String,
    /// The refresh token. Never printed.
    pub refresh_token: SecretString,
}

/// A handle on the state database; cheap to clone.
#[derive(Clone, Debug)]
pub struct State {
    backend: Backend,
    /// The lease the writes that need one are fenced with (see [`State::fenced`]).
    fence: Option<Fence>,
}

/// A lease as a fenced write names it: the write commits only while `owner` still holds `name`
/// with this `epoch` (PostgreSQL; SQLite's file lock already keeps a second process out).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    /// The lease's name: `mailbox:<address>`, `delivery` or `updates`.
    pub name: String,
    /// The replica holding it (`state.replica_id`).
    pub owner: String,
    /// The epoch it was taken with.
    pub epoch: i64,
}

#[derive(Clone, Debug)]
enum Backend {
    Sqlite(Sqlite),
    Postgres(Postgres),
}

/// Runs the same call on whichever backend this state is.
macro_rules! on_backend {
    ($self:ident . $method:ident ( $($arg:expr),* $(,)? )) => {
        match &$self.backend {
            Backend::Sqlite(db) => db.$method($($arg),*).await,
            Backend::Postgres(db) => db.$method($($arg),*).await,
        }
    };
}

/// What happened to an acknowledged message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageOutcome {
    /// Parsed and planned; its sends are in the outbox.
    Queued,
    /// Deliberately not relayed (e.g. an error notification, or no recipients).
    Skipped,
    /// From a sender outside the mailbox's `allowed_senders`.
    Filtered,
    /// Could not be parsed.
    Failed,
}

impl MessageOutcome {
    /// The outcome named `text` in the database; anything unknown reads as `failed`.
    pub fn from_column(text: &str) -> Self {
        match text {
            "queued" => Self::Queued,
            "skipped" => Self::Skipped,
            "filtered" => Self::Filtered,
            _ => Self::Failed,
        }
    }

    /// The lowercase name used in the database and the metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Skipped => "skipped",
            Self::Filtered => "filtered",
            Self::Failed => "failed",
        }
    }
}

/// Milliseconds since the Unix epoch, the unit of every time column.
pub(crate) fn millis(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub(crate) fn from_millis(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
}

/// The `kv` key of the persisted directory snapshot.
const SNAPSHOT_KEY: &str = "directory_snapshot";

impl State {
    /// Opens (creating if needed) the SQLite database at `path`, with its parent directory.
    ///
    /// # Errors
    /// The directory or database cannot be created, opened or locked (another process uses
    /// it), or the schema cannot be applied.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            backend: Backend::Sqlite(Sqlite::open(path)?),
            fence: None,
        })
    }

    /// Connects to the PostgreSQL database at `url` (`postgres://user:password@host:port/db`,
    /// with libpq's `sslmode` honoured over rustls) and applies the pending migrations.
    ///
    /// # Errors
    /// The URL is malformed, the server cannot be reached within 30 s, the login fails, or a
    /// migration fails. The messages never contain the URL's password.
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        Ok(Self {
            backend: Backend::Postgres(Postgres::connect(url).await?),
            fence: None,
        })
    }

    /// Opens the backend `config` names: `state.url` (PostgreSQL) when set, else `state.path`.
    ///
    /// # Errors
    /// As [`State::open`] or [`State::connect`].
    pub async fn from_config(config: &crate::config::StateConfig) -> anyhow::Result<Self> {
        use secrecy::ExposeSecret;
        match &config.url {
            Some(url) => Self::connect(url.expose_secret()).await,
            None => Self::open(&config.sqlite_path()),
        }
    }

    /// The state of `config` for a tool beside a relay that may be running (`oauth login`,
    /// `check`): SQLite without the relay's process lock ([`Sqlite::open_beside`]), or
    /// PostgreSQL as usual.
    ///
    /// # Errors
    /// As [`State::from_config`], except that a running relay is no error.
    pub async fn beside_relay(config: &crate::config::StateConfig) -> anyhow::Result<Self> {
        match &config.url {
            Some(url) => Self::connect(url.expose_secret()).await,
            None => Ok(Self {
                backend: Backend::Sqlite(Sqlite::open_beside(&config.sqlite_path())?),
                fence: None,
            }),
        }
    }

    /// A throwaway SQLite state in memory (`check` without OAuth2 accounts, tests).
    ///
    /// # Errors
    /// The schema cannot be applied.
    pub fn in_memory() -> anyhow::Result<Self> {
        Ok(Self {
            backend: Backend::Sqlite(Sqlite::in_memory()?),
            fence: None,
        })
    }

    /// This state with its lease-dependent writes (advancing a checkpoint in
    /// [`State::acknowledge`] or [`State::set_checkpoint`], claiming rows in
    /// [`State::due_sends`]) fenced by `fence`: on PostgreSQL they fail with [`LeaseLost`], and
    /// write nothing, once another replica took the lease over or it expired.
    pub fn fenced(&self, fence: Fence) -> Self {
        Self {
            backend: self.backend.clone(),
            fence: Some(fence),
        }
    }

    /// The PostgreSQL backend, when this state is one (leases and `LISTEN/NOTIFY` exist only
    /// there).
    pub fn postgres(&self) -> Option<&Postgres> {
        match &self.backend {
            Backend::Postgres(db) => Some(db),
            Backend::Sqlite(_) => None,
        }
    }

    /// The backend's name for logs and `/readyz`: `"sqlite"` or `"postgres"`.
    pub fn kind(&self) -> &'static str {
        match &self.backend {
            Backend::Sqlite(_) => "sqlite",
            Backend::Postgres(_) => "postgres",
        }
    }

    /// The stored checkpoint of `mailbox`.
    ///
    /// # Errors
    /// A database error.
    pub async fn checkpoint(&self, mailbox: &str) -> anyhow::Result<Option<Checkpoint>> {
        on_backend!(self.checkpoint(mailbox))
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
        match &self.backend {
            Backend::Sqlite(db) => db.set_checkpoint(mailbox, checkpoint).await,
            Backend::Postgres(db) => {
                db.set_checkpoint(mailbox, checkpoint, self.fence.as_ref())
                    .await
            }
        }
    }

    /// Persists the last good directory snapshot (JSON).
    ///
    /// # Errors
    /// A database error.
    pub async fn save_snapshot(&self, json: String) -> anyhow::Result<()> {
        on_backend!(self.save_snapshot(json))
    }

    /// The persisted directory snapshot (JSON), if any.
    ///
    /// # Errors
    /// A database error.
    pub async fn load_snapshot(&self) -> anyhow::Result<Option<String>> {
        on_backend!(self.load_snapshot())
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
        on_backend!(self.set_chat_status(chat_id, status))
    }

    /// Every chat that blocked or removed the bot, with its status.
    ///
    /// # Errors
    /// A database error.
    pub async fn chat_statuses(&self) -> anyhow::Result<Vec<(i64, String)>> {
        on_backend!(self.chat_statuses())
    }

    /// Pauses `mailbox` (an address, matched case-insensitively) for `chat_id`: the bot's
    /// `/mute`. Returns whether it was not muted before.
    ///
    /// # Errors
    /// A database error.
    pub async fn mute(&self, chat_id: i64, mailbox: &str) -> anyhow::Result<bool> {
        let changed =
            on_backend!(self.set_mute(chat_id, Some(mailbox.to_ascii_lowercase()), true))?;
        Ok(changed > 0)
    }

    /// Resumes `mailbox` for `chat_id`, or every mailbox it muted (`None`): the bot's
    /// `/unmute`. Returns how many mailboxes were muted.
    ///
    /// # Errors
    /// A database error.
    pub async fn unmute(&self, chat_id: i64, mailbox: Option<&str>) -> anyhow::Result<u64> {
        on_backend!(self.set_mute(chat_id, mailbox.map(str::to_ascii_lowercase), false))
    }

    /// The mailboxes `chat_id` muted (addresses in lower case), sorted.
    ///
    /// # Errors
    /// A database error.
    pub async fn mutes_of(&self, chat_id: i64) -> anyhow::Result<Vec<String>> {
        on_backend!(self.mutes_of(chat_id))
    }

    /// The chats that muted `mailbox`: the relay leaves them out of its reports.
    ///
    /// # Errors
    /// A database error.
    pub async fn muted_chats(
        &self,
        mailbox: &str,
    ) -> anyhow::Result<std::collections::HashSet<i64>> {
        let chats = on_backend!(self.muted_chats(mailbox.to_ascii_lowercase()))?;
        Ok(chats.into_iter().collect())
    }

    /// The admin alerts raised and not yet cleared ([`crate::alerts`]), oldest first.
    ///
    /// # Errors
    /// A database error.
    pub async fn raised_alerts(&self) -> anyhow::Result<Vec<RaisedAlert>> {
        on_backend!(self.raised_alerts())
    }

    /// The refresh token stored for the OAuth2 account `account` (its name in
    /// `imap.accounts`, lower case), if any: the latest one the token endpoint issued.
    ///
    /// # Errors
    /// A database error.
    pub async fn refresh_token(&self, account: &str) -> anyhow::Result<Option<StoredRefreshToken>> {
        on_backend!(self.refresh_token(&account.to_ascii_lowercase()))
    }

    /// Stores `refresh_token`, issued to `client_id`, for the OAuth2 account `account`,
    /// replacing the one before. Durable when it returns: a rotated refresh token is stored
    /// before the access token that came with it is used.
    ///
    /// # Errors
    /// A database error.
    pub async fn store_refresh_token(
        &self,
        account: &str,
        client_id: &str,
        refresh_token: &SecretString,
    ) -> anyhow::Result<()> {
        on_backend!(self.store_refresh_token(
            &account.to_ascii_lowercase(),
            client_id,
            refresh_token.expose_secret()
        ))
    }

    /// The stored bytes of a file.
    ///
    /// # Errors
    /// A database error, or no such file.
    pub async fn file_bytes(&self, sha256: &str) -> anyhow::Result<bytes::Bytes> {
        on_backend!(self.file_bytes(sha256))
    }

    /// The Telegram `file_id` of an uploaded file, per kind (a photo's id cannot send a
    /// document and vice versa).
    ///
    /// # Errors
    /// A database error.
    pub async fn file_id(&self, sha256: &str, kind: ItemKind) -> anyhow::Result<Option<String>> {
        on_backend!(self.file_id(sha256, kind))
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
        on_backend!(self.store_file_id(sha256, kind, file_id))
    }

    /// Forgets a `file_id` Telegram no longer accepts.
    ///
    /// # Errors
    /// A database error.
    pub async fn forget_file_id(&self, sha256: &str, kind: ItemKind) -> anyhow::Result<()> {
        on_backend!(self.forget_file_id(sha256, kind))
    }

    /// Stores a message, its files, its outbox rows and the checkpoint in one transaction.
    ///
    /// # Errors
    /// A database error, or [`LeaseLost`] for a fenced state; then nothing was written.
    pub async fn acknowledge(&self, ack: Acknowledgement) -> anyhow::Result<AckResult> {
        match &self.backend {
            Backend::Sqlite(db) => db.acknowledge(ack).await,
            Backend::Postgres(db) => db.acknowledge(ack, self.fence.as_ref()).await,
        }
    }

    /// The first pending send of each chat that is due at `now`, oldest first, skipping the
    /// chats in `busy` and the rows in `in_flight`, and keeping those `admit` takes: at most
    /// `limit` rows. `admit` sees each candidate in order and may reserve something for it
    /// (the pacer's cells); a row it refuses stays pending and blocks its chat's later rows.
    ///
    /// A row whose JSON cannot be read (written by a newer version, or damaged) is marked
    /// failed with the parse error and logged, so it never blocks the rows after it.
    ///
    /// # Errors
    /// A database error.
    pub async fn due_sends<F>(
        &self,
        now: SystemTime,
        busy: Vec<i64>,
        in_flight: Vec<i64>,
        limit: usize,
        admit: F,
    ) -> anyhow::Result<Vec<OutboxRow>>
    where
        F: FnMut(&OutboxRow) -> bool + std::marker::Send + 'static,
    {
        match &self.backend {
            Backend::Sqlite(db) => db.due_sends(now, busy, in_flight, limit, admit).await,
            Backend::Postgres(db) => {
                db.due_sends(now, busy, in_flight, limit, admit, self.fence.as_ref())
                    .await
            }
        }
    }

    /// When the next pending send that is not due yet becomes due, if any.
    ///
    /// # Errors
    /// A database error.
    pub async fn next_due_at(&self) -> anyhow::Result<Option<SystemTime>> {
        on_backend!(self.next_due_at())
    }

    /// Marks a send finished: done, or failed for good, in its own commit.
    ///
    /// # Errors
    /// A database error.
    pub async fn finish_send(&self, id: i64, result: SendResult) -> anyhow::Result<()> {
        on_backend!(self.finish_send(id, result))
    }

    /// Fails every other pending send of the same message to the same chat (the recipient
    /// refused the first one permanently). Returns how many were failed.
    ///
    /// # Errors
    /// A database error.
    pub async fn fail_rest_of_message(
        &self,
        message_id: i64,
        chat_id: i64,
        error: String,
    ) -> anyhow::Result<usize> {
        on_backend!(self.fail_rest_of_message(message_id, chat_id, error))
    }

    /// Puts a send back with a delay after a transient failure; `count_attempt` adds one to
    /// its attempts (a 429 does not).
    ///
    /// # Errors
    /// A database error.
    pub async fn retry_send(
        &self,
        id: i64,
        not_before: SystemTime,
        count_attempt: bool,
        error: String,
    ) -> anyhow::Result<()> {
        on_backend!(self.retry_send(id, not_before, count_attempt, error))
    }

    /// Moves every pending send of `old` to `new` (a group upgraded to a supergroup).
    ///
    /// # Errors
    /// A database error.
    pub async fn migrate_chat(&self, old: i64, new: i64) -> anyhow::Result<usize> {
        on_backend!(self.migrate_chat(old, new))
    }

    /// The sends marked done at or after `since`, oldest first: a delivery worker that starts
    /// (after a restart, or on the replica that just took the `delivery` lease) counts them in
    /// its pacer, because Telegram's windows still hold them.
    ///
    /// # Errors
    /// A database error.
    pub async fn recent_sends(&self, since: SystemTime) -> anyhow::Result<Vec<RecentSend>> {
        on_backend!(self.recent_sends(since))
    }

    /// Whether `fence`'s lease is still held by its owner with its epoch and not expired, for a
    /// write outside the state that depends on it (`last_uid` in SeaTable). Always true on
    /// SQLite, where one process holds everything.
    ///
    /// # Errors
    /// A database error.
    pub async fn lease_held(&self, fence: &Fence) -> anyhow::Result<bool> {
        match &self.backend {
            Backend::Sqlite(_) => Ok(true),
            Backend::Postgres(db) => db.lease_held(fence).await,
        }
    }

    /// Sends waiting in the outbox.
    ///
    /// # Errors
    /// A database error.
    pub async fn pending_count(&self) -> anyhow::Result<i64> {
        on_backend!(self.pending_count())
    }

    /// Deletes what is no longer needed: finished outbox rows finished before `cutoff`, messages
    /// acknowledged before it that have no outbox row left, and file bytes last queued before it
    /// that no pending send needs. Checkpoints, `file_id`s, the ledger of relayed content and
    /// the replays (what makes an old mail a duplicate), the snapshot and chat statuses stay.
    /// Returns the number of rows deleted.
    ///
    /// # Errors
    /// A database error; then nothing was deleted.
    pub async fn prune(&self, cutoff: SystemTime) -> anyhow::Result<usize> {
        on_backend!(self.prune(cutoff))
    }

    /// The message acknowledged under an HTTP ingest's dedupe key within `window` (see
    /// [`HttpIngest`]), if any: the first answer to a retried request.
    ///
    /// # Errors
    /// A database error.
    pub async fn ingest_key_message(
        &self,
        key: &str,
        window: Duration,
    ) -> anyhow::Result<Option<i64>> {
        let since = SystemTime::now().checked_sub(window).unwrap_or(UNIX_EPOCH);
        on_backend!(self.ingest_key_message(key.to_owned(), since))
    }

    /// A stored message with its outbox rows, for `GET /api/v1/messages/{id}`; `None` when
    /// there is no such message (or it was pruned).
    ///
    /// # Errors
    /// A database error.
    pub async fn message_status(&self, id: i64) -> anyhow::Result<Option<MessageStatus>> {
        on_backend!(self.message_status(id))
    }

    /// The messages received at or after `since` (of `mailbox` only, matched
    /// case-insensitively, when given), oldest first, each with its outbox rows: what
    /// `report-relay history` prints. Finished sends are pruned after 30 days.
    ///
    /// # Errors
    /// A database error.
    pub async fn messages_since(
        &self,
        since: SystemTime,
        mailbox: Option<&str>,
    ) -> anyhow::Result<Vec<MessageStatus>> {
        on_backend!(self.messages_since(since, mailbox.map(str::to_owned)))
    }

    /// How the sends of these messages stand (for `replay --mailbox`, which waits for its own
    /// sends only).
    ///
    /// # Errors
    /// A database error.
    pub async fn send_counts(&self, message_ids: Vec<i64>) -> anyhow::Result<SendCounts> {
        on_backend!(self.send_counts(message_ids))
    }

    /// Up to `limit` reports whose sends have all finished and that are not yet in SeaTable's
    /// delivery log ([`State::mark_logged`]), oldest first, each with its outbox rows.
    ///
    /// # Errors
    /// A database error.
    pub async fn unlogged_reports(&self, limit: usize) -> anyhow::Result<Vec<MessageStatus>> {
        on_backend!(self.unlogged_reports(limit))
    }

    /// Marks these messages as in SeaTable's delivery log (called once SeaTable accepted
    /// them); marking one twice is harmless.
    ///
    /// # Errors
    /// A database error.
    pub async fn mark_logged(&self, message_ids: Vec<i64>) -> anyhow::Result<()> {
        on_backend!(self.mark_logged(message_ids))
    }
}
