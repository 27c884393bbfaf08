//! The directory: who receives which mailbox, read from SeaTable.
//!
//! A [`Snapshot`] holds the three tables (users, mailboxes, groups) as the relay needs them. It
//! is cached with moka for `seatable.cache_ttl_secs`, so a report costs no SeaTable call while
//! the snapshot is fresh. The last good snapshot is also kept outside the cache and persisted in
//! the state: a failed refresh keeps serving it (with a warning), and a start with SeaTable down
//! starts from the persisted copy.
//!
//! Recipients are resolved from the "many" side of each link (users whose `mailboxes` cell
//! contains the mailbox, groups whose `mailboxes` cell contains it), because SeaTable returns at
//! most 50 links per cell: the mailbox row's own `users` cell cannot be trusted for a mailbox
//! with 500 subscribers.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::state::State;

/// A SeaTable row keyed by column name (`convert_keys=true`).
pub type RowMap = Map<String, Value>;

/// One row of the users table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// Row `_id`.
    pub row_id: String,
    /// `Name`.
    pub name: String,
    /// `phone`, as the sysadmin typed it.
    pub phone: String,
    /// Row `_id`s of the linked mailboxes (`mailboxes` link cell).
    pub mailbox_ids: Vec<String>,
    /// `id_telegram` parsed as a Telegram user id, when set.
    pub telegram_id: Option<i64>,
}

/// One row of the mailboxes table.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mailbox {
    /// Row `_id`.
    pub row_id: String,
    /// `Name`, a short name such as `sales`.
    pub name: String,
    /// `email`: the address Superset sends to and the default IMAP login.
    pub email: String,
    /// `description`, shown to users in `/start`.
    pub description: String,
    /// `last_uid`, the last relayed UID as the relay (or the bot it replaces) wrote it.
    pub last_uid: Option<u32>,
    /// `imap_host` override.
    pub imap_host: Option<String>,
    /// `imap_port` override.
    pub imap_port: Option<u16>,
    /// `imap_login` override.
    pub imap_login: Option<String>,
    /// `imap_password` override. Never printed.
    pub imap_password: Option<String>,
    /// `folder` override.
    pub folder: Option<String>,
    /// `allowed_senders`: lowercase addresses and `@domain`s; empty means anyone.
    pub allowed_senders: Vec<String>,
    /// `disabled`: a ticked row is not watched.
    pub disabled: bool,
}

impl std::fmt::Debug for Mailbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mailbox")
            .field("row_id", &self.row_id)
            .field("name", &self.name)
            .field("email", &self.email)
            .field("last_uid", &self.last_uid)
            .field("imap_host", &self.imap_host)
            .field("imap_port", &self.imap_port)
            .field("imap_login", &self.imap_login)
            .field(
                "imap_password",
                &self.imap_password.as_ref().map(|_| "[REDACTED]"),
            )
            .field("folder", &self.folder)
            .field("allowed_senders", &self.allowed_senders)
            .field("disabled", &self.disabled)
            .finish()
    }
}

impl Mailbox {
    /// Whether mail from `from` may be relayed (`allowed_senders`, matched case-insensitively;
    /// `@example.com` matches exactly that domain).
    pub fn allows_sender(&self, from: Option<&str>) -> bool {
        if self.allowed_senders.is_empty() {
            return true;
        }
        let Some(from) = from.map(|f| f.trim().to_ascii_lowercase()) else {
            return false;
        };
        let domain = from.rsplit_once('@').map(|(_, d)| d);
        self.allowed_senders
            .iter()
            .any(|allowed| match allowed.strip_prefix('@') {
                Some(allowed_domain) => domain == Some(allowed_domain),
                None => *allowed == from,
            })
    }
}

/// One row of the groups table (`t_chats`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    /// Row `_id`.
    pub row_id: String,
    /// `Name`: must equal the Telegram group's title.
    pub name: String,
    /// `id_telegram_chat` parsed as a chat id (negative), when set.
    pub chat_id: Option<i64>,
    /// `is_locked`.
    pub is_locked: bool,
    /// Row `_id`s of the linked mailboxes.
    pub mailbox_ids: Vec<String>,
}

/// Who receives a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Recipient {
    /// The Telegram `chat_id`: a user id, or a negative group id.
    pub chat_id: i64,
}

/// The three tables at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Users.
    pub users: Vec<User>,
    /// Mailboxes.
    pub mailboxes: Vec<Mailbox>,
    /// Groups.
    pub groups: Vec<Group>,
    /// When it was read from SeaTable.
    pub fetched_at: SystemTime,
}

impl Snapshot {
    /// Builds a snapshot from name-keyed rows of the three tables. Cells of the wrong shape are
    /// treated as empty, with a warning.
    pub fn from_rows(users: &[RowMap], mailboxes: &[RowMap], groups: &[RowMap]) -> Self {
        Self {
            users: users.iter().filter_map(parse_user).collect(),
            mailboxes: mailboxes.iter().filter_map(parse_mailbox).collect(),
            groups: groups.iter().filter_map(parse_group).collect(),
            fetched_at: SystemTime::now(),
        }
    }

    /// The mailbox row with this address (case-insensitive): the first enabled one, as
    /// [`Self::enabled_mailboxes`] picks it, else the first disabled one.
    pub fn mailbox(&self, address: &str) -> Option<&Mailbox> {
        let matching = |m: &&Mailbox| m.email.eq_ignore_ascii_case(address.trim());
        self.mailboxes
            .iter()
            .filter(matching)
            .find(|m| !m.disabled)
            .or_else(|| self.mailboxes.iter().find(matching))
    }

    /// Mailbox rows that should be watched: not disabled, with an address. The first row wins
    /// when two rows have the same address.
    pub fn enabled_mailboxes(&self) -> Vec<&Mailbox> {
        let mut seen = BTreeSet::new();
        self.mailboxes
            .iter()
            .filter(|m| !m.disabled && !m.email.is_empty())
            .filter(|m| seen.insert(m.email.to_ascii_lowercase()))
            .collect()
    }

    /// Every registered user and group bound to the mailbox, each chat once, users first.
    pub fn recipients(&self, mailbox: &Mailbox) -> Vec<Recipient> {
        let mut seen = BTreeSet::new();
        let users = self
            .users
            .iter()
            .filter(|u| u.mailbox_ids.contains(&mailbox.row_id))
            .filter_map(|u| u.telegram_id);
        let groups = self
            .groups
            .iter()
            .filter(|g| g.mailbox_ids.contains(&mailbox.row_id))
            .filter_map(|g| g.chat_id);
        users
            .chain(groups)
            .filter(|id| seen.insert(*id))
            .map(|chat_id| Recipient { chat_id })
            .collect()
    }
}

fn text(row: &RowMap, column: &str) -> Option<String> {
    match row.get(column)? {
        Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_owned()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn link_ids(row: &RowMap, column: &str) -> Vec<String> {
    match row.get(column) {
        Some(Value::Array(links)) => links
            .iter()
            .filter_map(|l| l.get("row_id").and_then(Value::as_str).map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    }
}

fn id_column(row: &RowMap, table: &str, column: &str) -> Option<i64> {
    let value = text(row, column)?;
    match value.parse::<i64>() {
        Ok(id) => Some(id),
        Err(_) => {
            warn!(
                table,
                column, value, "Ignoring a Telegram id that is not a decimal number."
            );
            None
        }
    }
}

fn parse_user(row: &RowMap) -> Option<User> {
    Some(User {
        row_id: text(row, "_id")?,
        name: text(row, "Name").unwrap_or_default(),
        phone: text(row, "phone").unwrap_or_default(),
        mailbox_ids: link_ids(row, "mailboxes"),
        telegram_id: id_column(row, "users", "id_telegram"),
    })
}

fn parse_mailbox(row: &RowMap) -> Option<Mailbox> {
    let email = text(row, "email").unwrap_or_default();
    let last_uid = text(row, "last_uid").and_then(|v| match v.parse::<u32>() {
        Ok(uid) => Some(uid),
        Err(_) => {
            warn!(
                mailbox = email,
                value = v,
                "Ignoring a last_uid that is not a decimal UID."
            );
            None
        }
    });
    let imap_port = text(row, "imap_port").and_then(|v| {
        // A number column may come back as 993 or 993.0.
        let port = v
            .parse::<f64>()
            .ok()
            .filter(|p| p.fract() == 0.0 && *p > 0.0 && *p < 65536.0);
        if port.is_none() {
            warn!(
                mailbox = email,
                value = v,
                "Ignoring an imap_port that is not a port number."
            );
        }
        port.map(|p| p as u16)
    });
    let allowed_senders = text(row, "allowed_senders")
        .map(|v| {
            v.split([',', ';', ' ', '\n'])
                .map(|s| s.trim().to_ascii_lowercase())
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default();
    Some(Mailbox {
        row_id: text(row, "_id")?,
        name: text(row, "Name").unwrap_or_default(),
        description: text(row, "description").unwrap_or_default(),
        last_uid,
        imap_host: text(row, "imap_host"),
        imap_port,
        imap_login: text(row, "imap_login"),
        imap_password: text(row, "imap_password"),
        folder: text(row, "folder"),
        allowed_senders,
        disabled: row
            .get("disabled")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        email,
    })
}

fn parse_group(row: &RowMap) -> Option<Group> {
    Some(Group {
        row_id: text(row, "_id")?,
        name: text(row, "Name").unwrap_or_default(),
        chat_id: id_column(row, "t_chats", "id_telegram_chat"),
        is_locked: row
            .get("is_locked")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        mailbox_ids: link_ids(row, "mailboxes"),
    })
}

/// Where the directory reads and writes: SeaTable in production, an in-memory table in tests.
pub trait DirectoryBackend: Send + Sync + 'static {
    /// Reads all three tables.
    fn fetch(&self) -> BoxFuture<'_, anyhow::Result<Snapshot>>;
    /// Writes a mailbox row's `last_uid` as decimal text.
    fn write_last_uid(
        &self,
        mailbox_row_id: &str,
        last_uid: u32,
    ) -> BoxFuture<'_, anyhow::Result<()>>;
    /// Rewrites the group row whose `id_telegram_chat` is `old` to `new`, keeping its lock
    /// (a basic group upgraded to a supergroup: the only rewrite of a locked row).
    fn rewrite_group_chat_id(&self, old: i64, new: i64) -> BoxFuture<'_, anyhow::Result<()>>;
    /// Writes a users row's `id_telegram` as decimal text (registration).
    fn write_user_telegram_id(
        &self,
        user_row_id: &str,
        telegram_id: i64,
    ) -> BoxFuture<'_, anyhow::Result<()>>;
    /// Claims a free group row for `chat_id` with one conditional statement (`… WHERE _id = ?
    /// AND id_telegram_chat IS NULL`, which also locks it), then reads the row back. Returns
    /// whether the row now holds this chat's id, i.e. whether the claim was won.
    fn claim_group(&self, group_row_id: &str, chat_id: i64) -> BoxFuture<'_, anyhow::Result<bool>>;
}

/// Chats that blocked or removed the bot, kept in the state (not in SeaTable) and skipped in
/// deliveries until they come back (`/start`, or the bot re-added).
pub struct ChatStatuses {
    state: State,
    map: RwLock<HashMap<i64, String>>,
}

impl std::fmt::Debug for ChatStatuses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChatStatuses")
    }
}

impl ChatStatuses {
    /// Loads the statuses persisted in `state`.
    ///
    /// # Errors
    /// A database error.
    pub async fn load(state: State) -> anyhow::Result<Arc<Self>> {
        let map = state.chat_statuses().await?.into_iter().collect();
        Ok(Arc::new(Self {
            state,
            map: RwLock::new(map),
        }))
    }

    /// Why `chat_id` is skipped (`blocked`, `left`, `kicked`), or `None` when it is reachable.
    pub fn status(&self, chat_id: i64) -> Option<String> {
        self.map.read().ok().and_then(|m| m.get(&chat_id).cloned())
    }

    /// Records (`Some`) or clears (`None`) a chat's status, in memory and in the state.
    ///
    /// # Errors
    /// A database error; the in-memory status is changed anyway.
    pub async fn set(&self, chat_id: i64, status: Option<&str>) -> anyhow::Result<()> {
        if let Ok(mut map) = self.map.write() {
            match status {
                Some(status) => map.insert(chat_id, status.to_owned()),
                None => map.remove(&chat_id),
            };
        }
        self.state
            .set_chat_status(chat_id, status.map(str::to_owned))
            .await
    }

    /// Moves a status to a group's new id (a migration).
    ///
    /// # Errors
    /// A database error.
    pub async fn migrate(&self, old: i64, new: i64) -> anyhow::Result<()> {
        if let Some(status) = self.status(old) {
            self.set(old, None).await?;
            self.set(new, Some(&status)).await?;
        }
        Ok(())
    }
}

/// What to do when a basic group becomes a supergroup (Bot API `migrate_to_chat_id`), shared by
/// the delivery worker (a send answered with the migrate error) and the registration bot (the
/// service message): move pending sends and chat status to the new id, and rewrite the group's
/// `id_telegram_chat` in SeaTable, keeping its lock. Also remembers recent migrations so a
/// promotion that races its migration message can be recognised.
pub struct Migrations {
    directory: Arc<Directory>,
    state: State,
    statuses: Arc<ChatStatuses>,
    recent: Mutex<HashMap<i64, i64>>,
    changed: Notify,
}

impl std::fmt::Debug for Migrations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Migrations")
    }
}

impl Migrations {
    /// A handler writing through `directory` and `state`.
    pub fn new(directory: Arc<Directory>, state: State, statuses: Arc<ChatStatuses>) -> Arc<Self> {
        Arc::new(Self {
            directory,
            state,
            statuses,
            recent: Mutex::new(HashMap::new()),
            changed: Notify::new(),
        })
    }

    /// `old` is now `new`. Idempotent.
    ///
    /// # Errors
    /// The state or SeaTable could not be written.
    pub async fn migrated(&self, old: i64, new: i64) -> anyhow::Result<()> {
        if let Ok(mut recent) = self.recent.lock() {
            recent.insert(new, old);
        }
        self.changed.notify_waiters();
        let moved = self.state.migrate_chat(old, new).await?;
        if moved > 0 {
            info!(
                old,
                new, moved, "Moved pending sends to the supergroup's new id."
            );
        }
        self.statuses.migrate(old, new).await?;
        let bound = self
            .directory
            .last_good()
            .is_some_and(|s| s.groups.iter().any(|g| g.chat_id == Some(old)));
        if bound {
            self.directory.migrate_group(old, new).await?;
        }
        Ok(())
    }

    /// The basic group `new` was migrated from, if that migration was seen (waiting up to
    /// `wait` for it to arrive).
    pub async fn migrated_from(&self, new: i64, wait: Duration) -> Option<i64> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.changed.notified();
            if let Some(old) = self.recent.lock().ok().and_then(|r| r.get(&new).copied()) {
                return Some(old);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }
}

impl crate::delivery::ChatEvents for Migrations {
    fn chat_migrated(&self, old: i64, new: i64) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(self.migrated(old, new))
    }
}

/// The cached directory. See the module docs.
pub struct Directory {
    backend: Arc<dyn DirectoryBackend>,
    state: State,
    cache: moka::future::Cache<(), Arc<Snapshot>>,
    last_good: RwLock<Option<Arc<Snapshot>>>,
}

impl std::fmt::Debug for Directory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Directory")
    }
}

impl Directory {
    /// A directory over `backend`, caching snapshots for `ttl`.
    pub fn new(backend: Arc<dyn DirectoryBackend>, state: State, ttl: Duration) -> Self {
        Self {
            backend,
            state,
            cache: moka::future::Cache::builder()
                .max_capacity(1)
                .time_to_live(ttl)
                .build(),
            last_good: RwLock::new(None),
        }
    }

    /// Loads the directory at start-up: from SeaTable, or else from the snapshot persisted in
    /// the state. Returns where it came from.
    ///
    /// # Errors
    /// SeaTable failed and there is no persisted snapshot (the caller retries).
    pub async fn load(&self) -> anyhow::Result<SnapshotSource> {
        match self.fetch_and_keep().await {
            Ok(snapshot) => {
                self.cache.insert((), snapshot).await;
                Ok(SnapshotSource::SeaTable)
            }
            Err(error) => {
                let persisted = self.state.load_snapshot().await?;
                let Some(json) = persisted else {
                    return Err(
                        error.context("SeaTable is unreachable and no snapshot is persisted")
                    );
                };
                let snapshot: Snapshot = serde_json::from_str(&json)?;
                warn!(
                    error = format!("{error:#}"),
                    users = snapshot.users.len(),
                    mailboxes = snapshot.mailboxes.len(),
                    "SeaTable is unreachable; starting from the persisted directory snapshot."
                );
                let snapshot = Arc::new(snapshot);
                self.keep(snapshot.clone());
                // Serve it for a TTL before trying SeaTable again from the report path.
                self.cache.insert((), snapshot).await;
                Ok(SnapshotSource::Persisted)
            }
        }
    }

    /// Whether a snapshot is loaded (from SeaTable or the state).
    pub fn is_loaded(&self) -> bool {
        self.last_good.read().map(|g| g.is_some()).unwrap_or(false)
    }

    /// The current snapshot: cached while fresh, else re-read from SeaTable; when that fails,
    /// the last good snapshot (with a warning). `None` only before anything was ever loaded.
    pub async fn snapshot(&self) -> Option<Arc<Snapshot>> {
        let result = self
            .cache
            .try_get_with((), async { self.fetch_and_keep().await })
            .await;
        match result {
            Ok(snapshot) => Some(snapshot),
            Err(error) => {
                let last = self.last_good();
                match &last {
                    Some(snapshot) => {
                        warn!(
                            error = format!("{error:#}"),
                            "Cannot refresh the directory from SeaTable; using the last good snapshot."
                        );
                        // Serve the last good copy until the TTL passes, instead of calling a
                        // failing SeaTable for every report.
                        self.cache.insert((), snapshot.clone()).await;
                    }
                    None => warn!(
                        error = format!("{error:#}"),
                        "Cannot read the directory from SeaTable."
                    ),
                }
                last
            }
        }
    }

    /// Re-reads SeaTable now (after a registration, or a reload tick).
    ///
    /// # Errors
    /// SeaTable failed; the last good snapshot stays in use.
    pub async fn refresh(&self) -> anyhow::Result<Arc<Snapshot>> {
        let snapshot = self.fetch_and_keep().await?;
        self.cache.insert((), snapshot.clone()).await;
        Ok(snapshot)
    }

    /// The last good snapshot, without any I/O.
    pub fn last_good(&self) -> Option<Arc<Snapshot>> {
        self.last_good.read().ok().and_then(|g| g.clone())
    }

    /// A group was upgraded to a supergroup: rewrite its id in SeaTable and refresh.
    ///
    /// # Errors
    /// The SeaTable write failed.
    pub async fn migrate_group(&self, old: i64, new: i64) -> anyhow::Result<()> {
        self.backend.rewrite_group_chat_id(old, new).await?;
        info!(
            old,
            new, "Recorded a group's new supergroup id in SeaTable."
        );
        if let Err(error) = self.refresh().await {
            warn!(
                error = format!("{error:#}"),
                "Cannot refresh the directory after a migration."
            );
        }
        Ok(())
    }

    /// The backend, for writes the directory does not wrap.
    pub fn backend(&self) -> &Arc<dyn DirectoryBackend> {
        &self.backend
    }

    async fn fetch_and_keep(&self) -> anyhow::Result<Arc<Snapshot>> {
        // (The SeaTable client retries transient failures itself before giving up.)
        let snapshot = Arc::new(self.backend.fetch().await?);
        debug!(
            users = snapshot.users.len(),
            mailboxes = snapshot.mailboxes.len(),
            groups = snapshot.groups.len(),
            "Read the directory from SeaTable."
        );
        self.keep(snapshot.clone());
        match serde_json::to_string(&*snapshot) {
            Ok(json) => {
                if let Err(error) = self.state.save_snapshot(json).await {
                    warn!(
                        error = format!("{error:#}"),
                        "Cannot persist the directory snapshot."
                    );
                }
            }
            Err(error) => warn!(%error, "Cannot serialise the directory snapshot."),
        }
        Ok(snapshot)
    }

    fn keep(&self, snapshot: Arc<Snapshot>) {
        if let Ok(mut guard) = self.last_good.write() {
            *guard = Some(snapshot);
        }
    }
}

/// Where [`Directory::load`] found the directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotSource {
    /// Read from SeaTable.
    SeaTable,
    /// SeaTable was down; the snapshot persisted in the state was used.
    Persisted,
}

/// Writes mailboxes' `last_uid` back to SeaTable, coalesced: at most one write per mailbox per
/// `interval`, always the latest value, retried on failure.
pub struct LastUidWriter {
    backend: Arc<dyn DirectoryBackend>,
    pending: Mutex<HashMap<String, u32>>,
    wake: Notify,
    interval: Duration,
}

impl std::fmt::Debug for LastUidWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LastUidWriter")
    }
}

impl LastUidWriter {
    /// A writer flushing at most every `interval`.
    pub fn new(backend: Arc<dyn DirectoryBackend>, interval: Duration) -> Self {
        Self {
            backend,
            pending: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            interval,
        }
    }

    /// Queues `last_uid` for the mailbox row; only the highest queued value is written.
    pub fn set(&self, mailbox_row_id: &str, last_uid: u32) {
        if let Ok(mut pending) = self.pending.lock() {
            let entry = pending.entry(mailbox_row_id.to_owned()).or_insert(last_uid);
            *entry = (*entry).max(last_uid);
        }
        self.wake.notify_one();
    }

    /// Flushes until `cancel` fires, then flushes once more.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                () = self.wake.notified() => {}
            }
            self.flush().await;
            tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep(self.interval) => {}
            }
        }
        self.flush().await;
    }

    async fn flush(&self) {
        let batch: Vec<(String, u32)> = match self.pending.lock() {
            Ok(mut pending) => pending.drain().collect(),
            Err(_) => return,
        };
        for (row_id, uid) in batch {
            let write = tokio::time::timeout(
                Duration::from_secs(60),
                self.backend.write_last_uid(&row_id, uid),
            )
            .await;
            let failed = match write {
                Ok(Ok(())) => None,
                Ok(Err(error)) => Some(format!("{error:#}")),
                Err(_) => Some("timed out".to_owned()),
            };
            if let Some(error) = failed {
                warn!(
                    row_id,
                    last_uid = uid,
                    error,
                    "Cannot write last_uid to SeaTable; will retry."
                );
                if let Ok(mut pending) = self.pending.lock() {
                    let entry = pending.entry(row_id).or_insert(uid);
                    *entry = (*entry).max(uid);
                }
                self.wake.notify_one();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rows(value: Value) -> Vec<RowMap> {
        value
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_object().unwrap().clone())
            .collect()
    }

    fn snapshot() -> Snapshot {
        let links = |ids: &[&str]| -> Value {
            ids.iter()
                .map(|id| json!({"row_id": id, "display_value": id}))
                .collect()
        };
        Snapshot::from_rows(
            &rows(json!([
                {"_id": "u1", "Name": "Ann", "phone": "+7 999", "mailboxes": links(&["m1"]), "id_telegram": "111222333"},
                {"_id": "u2", "Name": "Bob", "phone": "8999", "mailboxes": links(&["m1", "m2"]), "id_telegram": null},
                {"_id": "u3", "Name": "Eve", "phone": "1", "mailboxes": links(&["m2"]), "id_telegram": "not a number"},
                {"_id": "u4", "Name": "Dup", "phone": "2", "mailboxes": links(&["m1"]), "id_telegram": "111222333"},
            ])),
            &rows(json!([
                {"_id": "m1", "Name": "sales", "email": "Sales@Example.com", "last_uid": "42",
                 "imap_port": 993.0, "allowed_senders": "superset@example.com, @bi.example.com", "disabled": null},
                {"_id": "m2", "Name": "ops", "email": "ops@example.com", "disabled": true, "imap_password": "secret"},
            ])),
            &rows(json!([
                {"_id": "g1", "Name": "Sales team", "id_telegram_chat": "-1001987654321", "is_locked": true, "mailboxes": links(&["m1"])},
                {"_id": "g2", "Name": "Free", "id_telegram_chat": null, "is_locked": false, "mailboxes": links(&["m1"])},
            ])),
        )
    }

    #[test]
    fn recipients_come_from_the_many_side_and_need_a_telegram_id() {
        let s = snapshot();
        let m1 = s.mailbox("sales@example.com").unwrap();
        assert_eq!(m1.last_uid, Some(42));
        assert_eq!(m1.imap_port, Some(993));
        let ids: Vec<i64> = s.recipients(m1).iter().map(|r| r.chat_id).collect();
        assert_eq!(ids, [111222333, -1001987654321]);
        let m2 = s.mailbox("ops@example.com").unwrap();
        assert!(s.recipients(m2).is_empty());
    }

    #[test]
    fn a_disabled_duplicate_row_does_not_shadow_the_enabled_one() {
        let mut s = snapshot();
        let mut old = s.mailboxes[0].clone();
        old.row_id = "m0".into();
        old.disabled = true;
        s.mailboxes.insert(0, old);
        assert_eq!(s.mailbox("sales@example.com").unwrap().row_id, "m1");
        assert_eq!(s.enabled_mailboxes()[0].row_id, "m1");
    }

    #[test]
    fn disabled_rows_are_not_watched() {
        let s = snapshot();
        let enabled: Vec<&str> = s
            .enabled_mailboxes()
            .iter()
            .map(|m| m.name.as_str())
            .collect();
        assert_eq!(enabled, ["sales"]);
    }

    #[test]
    fn allowed_senders_match_addresses_and_exact_domains() {
        let s = snapshot();
        let m1 = s.mailbox("sales@example.com").unwrap();
        assert!(m1.allows_sender(Some("Superset@Example.com")));
        assert!(m1.allows_sender(Some("bi@bi.example.com")));
        assert!(!m1.allows_sender(Some("bi@sub.bi.example.com")));
        assert!(!m1.allows_sender(Some("mallory@example.com")));
        assert!(!m1.allows_sender(None));
        let m2 = s.mailbox("ops@example.com").unwrap();
        assert!(m2.allows_sender(Some("anyone@anywhere.org")));
    }

    #[test]
    fn passwords_are_not_in_debug_output() {
        let s = snapshot();
        let debug = format!("{s:?}");
        assert!(!debug.contains("secret"), "{debug}");
    }
}
