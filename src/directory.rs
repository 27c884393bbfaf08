//! The directory: who receives which mailbox, read from SeaTable.
//!
//! A [`Snapshot`] holds the three tables (users, mailboxes, groups) as the relay needs them. It
//! is cached with moka for `seatable.cache_ttl_secs`, so a report costs no SeaTable call while
//! the snapshot is fresh. The last good snapshot is also kept outside the cache and persisted in
//! the state, and it is served **stale-while-refresh**: once it is older than the TTL, a report
//! gets it at once while one background refresh at a time re-reads SeaTable. A report never
//! waits for SeaTable unless nothing was ever loaded. A failed refresh keeps the last good
//! snapshot and warns once per outage; a start with SeaTable down starts from the persisted
//! copy.
//!
//! Recipients are resolved from the "many" side of each link (users whose `mailboxes` cell
//! contains the mailbox, groups whose `mailboxes` cell contains it), because SeaTable returns at
//! most 50 links per cell: the mailbox row's own `users` cell cannot be trusted for a mailbox
//! with 500 subscribers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use tracing::{debug, info, warn};

use crate::state::State;

mod chats;
mod filter;
mod last_uid;
mod model;
mod seatable;

pub use self::chats::{ChatStatuses, Migrations};
pub use self::filter::TitleFilter;
pub use self::last_uid::LastUidWriter;
pub use self::model::{Group, Mailbox, Recipient, Snapshot, User, Withheld, column, parse_topic};
pub use self::seatable::{SeaTableBackend, quote};

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
    /// Why writes are refused because the base lacks a table or column the relay writes
    /// (`None`: no such problem is known).
    fn schema_problem(&self) -> Option<String> {
        None
    }
}

/// The cached directory. See the module docs.
pub struct Directory {
    backend: Arc<dyn DirectoryBackend>,
    state: State,
    /// The fresh snapshot: present for `ttl` after each successful read.
    cache: moka::future::Cache<(), Arc<Snapshot>>,
    last_good: RwLock<Option<Arc<Snapshot>>>,
    /// A background refresh is running (at most one at a time).
    refreshing: AtomicBool,
    /// The last refresh failed (its warning was logged; the next failures log at debug).
    outage: AtomicBool,
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
            refreshing: AtomicBool::new(false),
            outage: AtomicBool::new(false),
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
                // Kept as the last good snapshot but not as a fresh one: the first report
                // gets it at once and starts a background refresh.
                self.keep(Arc::new(snapshot));
                self.outage.store(true, Ordering::Release);
                Ok(SnapshotSource::Persisted)
            }
        }
    }

    /// Whether a snapshot is loaded (from SeaTable or the state).
    pub fn is_loaded(&self) -> bool {
        self.last_good.read().map(|g| g.is_some()).unwrap_or(false)
    }

    /// The current snapshot, without waiting for SeaTable while there is one: the cached
    /// snapshot while fresh; once it is older than the TTL, the last good snapshot at once, and
    /// one background refresh starts. Only a directory that was never loaded waits for
    /// SeaTable (and for one read, however many reports ask). `None` only while nothing was
    /// ever loaded and SeaTable fails.
    pub async fn snapshot(self: &Arc<Self>) -> Option<Arc<Snapshot>> {
        if let Some(fresh) = self.cache.get(&()).await {
            return Some(fresh);
        }
        if let Some(stale) = self.last_good() {
            self.refresh_in_background();
            return Some(stale);
        }
        match self
            .cache
            .try_get_with((), async { self.fetch_and_keep().await })
            .await
        {
            Ok(snapshot) => Some(snapshot),
            Err(error) => {
                warn!(
                    error = format!("{error:#}"),
                    "Cannot read the directory from SeaTable."
                );
                None
            }
        }
    }

    /// How old the last good snapshot is (since it was read from SeaTable), if there is one.
    pub fn age(&self) -> Option<Duration> {
        self.last_good().map(|snapshot| {
            SystemTime::now()
                .duration_since(snapshot.fetched_at)
                .unwrap_or_default()
        })
    }

    /// Starts a refresh unless one is running. A failure keeps the last good snapshot and is
    /// logged once per outage.
    fn refresh_in_background(self: &Arc<Self>) {
        if self.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let directory = self.clone();
        tokio::spawn(async move {
            // (The SeaTable client bounds each request with its timeout and retries.)
            if let Err(error) = directory.refresh().await {
                debug!(
                    error = format!("{error:#}"),
                    "Background refresh of the directory failed."
                );
            }
            directory.refreshing.store(false, Ordering::Release);
        });
    }

    /// Re-reads SeaTable now (after a registration, or a reload tick).
    ///
    /// # Errors
    /// SeaTable failed; the last good snapshot stays in use.
    pub async fn refresh(&self) -> anyhow::Result<Arc<Snapshot>> {
        match self.fetch_and_keep().await {
            Ok(snapshot) => {
                self.cache.insert((), snapshot.clone()).await;
                Ok(snapshot)
            }
            Err(error) => {
                if !self.outage.swap(true, Ordering::AcqRel) {
                    warn!(
                        error = format!("{error:#}"),
                        age_secs = self.age().map(|age| age.as_secs()),
                        "Cannot refresh the directory from SeaTable; serving the last good snapshot until it answers."
                    );
                }
                Err(error)
            }
        }
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
        if self.outage.swap(false, Ordering::AcqRel) {
            info!("SeaTable answers again; the directory is fresh.");
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seatable::Row;
    use serde_json::{Value, json};

    /// Rows as the gateway returns them (a `Row` deserializes from its JSON object).
    fn rows(value: Value) -> Vec<Row> {
        serde_json::from_value(value).unwrap()
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

    #[test]
    fn cells_are_read_as_sysadmins_type_them() {
        // Ids and ports typed into number columns, names with stray spaces, a blank cell, link
        // cells in the gateway's object form and the legacy plain-id form, a row without _id.
        let s = Snapshot::from_rows(
            &rows(json!([
                {"_id": "u1", "Name": "  Ann  ", "phone": " ", "id_telegram": 111222333,
                 "mailboxes": [{"row_id": "m1", "display_value": "sales"}]},
                {"_id": "u2", "Name": "Bob", "id_telegram": " 444 ", "mailboxes": ["m1"]},
                {"Name": "no id", "id_telegram": "555"},
            ])),
            &rows(json!([
                {"_id": "m1", "Name": "sales", "email": " sales@example.com ", "last_uid": 7,
                 "imap_port": "993", "disabled": "yes"},
            ])),
            &rows(json!([
                {"_id": "g1", "Name": "Team", "id_telegram_chat": -100123, "is_locked": "true",
                 "mailboxes": "m1"},
            ])),
        );
        let ann = &s.users[0];
        assert_eq!(
            (ann.name.as_str(), ann.phone.as_str(), ann.telegram_id),
            ("Ann", "", Some(111222333))
        );
        assert_eq!(ann.mailbox_ids, ["m1"]);
        assert_eq!(s.users[1].telegram_id, Some(444));
        assert_eq!(s.users[1].mailbox_ids, ["m1"]);
        assert_eq!(s.users.len(), 2, "a row without _id is dropped");
        let m1 = &s.mailboxes[0];
        assert_eq!(m1.email, "sales@example.com");
        assert_eq!((m1.last_uid, m1.imap_port), (Some(7), Some(993)));
        assert!(!m1.disabled, "only a JSON true ticks a checkbox");
        let g1 = &s.groups[0];
        assert_eq!(g1.chat_id, Some(-100123));
        assert!(!g1.is_locked);
        assert!(g1.mailbox_ids.is_empty(), "a text cell is not a link");
    }
}
