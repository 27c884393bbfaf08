//! Who does what when several replicas share one PostgreSQL state: the leases.
//!
//! Sits beside the supervisor and the delivery worker: [`Replica::run`] renews this replica's
//! heartbeat and leases every `state.lease_secs / 3` and publishes what it holds; the
//! supervisor watches only the mailboxes whose `mailbox:<address>` lease it holds, and the
//! delivery worker and the getUpdates poller run only while it holds `delivery` and `updates`
//! ([`run_while_held`]). Writes that need a lease are fenced with its epoch
//! ([`crate::state::State::fenced`]), and a lease counts as held locally only until
//! `lease_secs` after the start of the statement that last renewed it (the server's expiry is
//! later), so a replica paused past its lease neither sends nor advances anything when it
//! resumes.
//!
//! Mailboxes are spread by a fair share: at most `ceil(mailboxes / live replicas)` each, live
//! meaning a heartbeat within one lease period. A replica above its share gives the extra
//! leases up (its watchers stop first, the release follows on the next round), one below takes
//! free or expired ones. On SQLite there is one process (the file lock) and [`Replica::solo`]
//! holds everything for ever.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::directory::Directory;
use crate::state::{Fence, LEASES_CHANNEL, Postgres};

/// How long the work of a lost lease may take to stop before it is aborted.
const WORK_STOP_GRACE: Duration = Duration::from_secs(5);

/// The lease of the one delivery worker (the Telegram budget is per bot token).
pub const DELIVERY: &str = "delivery";
/// The lease of the one getUpdates poller (two get 409 Conflict from Telegram).
pub const UPDATES: &str = "updates";

/// The lease name of a mailbox: `mailbox:<address>`, the address in lower case.
pub fn mailbox_lease(address: &str) -> String {
    format!("mailbox:{}", address.to_ascii_lowercase())
}

/// One held lease: its epoch and, on PostgreSQL, until when it counts as held locally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Grant {
    epoch: i64,
    valid_until: Option<Instant>,
}

/// The leases this replica holds, as published to the supervisor and the workers.
pub type Held = Arc<BTreeMap<String, GrantView>>;

/// A held lease as the rest of the relay sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrantView(Grant);

/// This replica's identity and leases.
pub struct Replica {
    id: String,
    postgres: Option<Postgres>,
    lease: Duration,
    held: watch::Sender<Held>,
    /// Mailbox leases dropped locally (their watchers are stopping), released on the next round.
    releasing: Mutex<BTreeSet<String>>,
    /// Whether the last round reached PostgreSQL.
    state_reachable: AtomicBool,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica").field("id", &self.id).finish()
    }
}

impl Replica {
    /// The single process of a SQLite state: holds every lease, for ever.
    pub fn solo() -> Arc<Self> {
        Arc::new(Self {
            id: default_replica_id(),
            postgres: None,
            lease: Duration::MAX,
            held: watch::channel(Held::default()).0,
            releasing: Mutex::new(BTreeSet::new()),
            state_reachable: AtomicBool::new(true),
        })
    }

    /// A replica named `id` sharing `postgres`, with leases of `lease` (`state.lease_secs`).
    /// It holds nothing until [`Replica::run`] takes its leases.
    pub fn shared(postgres: Postgres, id: String, lease: Duration) -> Arc<Self> {
        Arc::new(Self {
            id,
            postgres: Some(postgres),
            lease,
            held: watch::channel(Held::default()).0,
            releasing: Mutex::new(BTreeSet::new()),
            state_reachable: AtomicBool::new(true),
        })
    }

    /// `state.replica_id`.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Whether leases matter (a PostgreSQL state shared by replicas).
    pub fn is_shared(&self) -> bool {
        self.postgres.is_some()
    }

    /// Whether the last lease round reached PostgreSQL (always true on SQLite).
    pub fn state_reachable(&self) -> bool {
        self.state_reachable.load(Ordering::Relaxed)
    }

    /// Whether this replica holds the lease `name` now (locally valid).
    pub fn holds(&self, name: &str) -> bool {
        self.fence(name).is_some()
    }

    /// The fence for a write that needs the lease `name`, if this replica holds it now.
    pub fn fence(&self, name: &str) -> Option<Fence> {
        if !self.is_shared() {
            return Some(Fence {
                name: name.to_owned(),
                owner: self.id.clone(),
                epoch: 0,
            });
        }
        let held = self.held.borrow();
        let grant = held.get(name)?.0;
        grant
            .valid_until
            .is_none_or(|until| Instant::now() < until)
            .then(|| Fence {
                name: name.to_owned(),
                owner: self.id.clone(),
                epoch: grant.epoch,
            })
    }

    /// The names of the leases held now, sorted (`/readyz`). On SQLite: `delivery` and
    /// `updates` (the mailboxes are all watched).
    pub fn held_names(&self) -> Vec<String> {
        if !self.is_shared() {
            return vec![DELIVERY.to_owned(), UPDATES.to_owned()];
        }
        let held = self.held.borrow().clone();
        held.keys()
            .filter(|name| self.holds(name))
            .cloned()
            .collect()
    }

    /// Changes whenever a lease round ends (every `lease_secs / 3`) and when leases change.
    pub fn subscribe(&self) -> watch::Receiver<Held> {
        self.held.subscribe()
    }

    /// Renews the heartbeat and the leases every `lease_secs / 3` until `cancel` fires; the
    /// mailboxes are the enabled rows of `directory`'s last good snapshot. Returns at once on
    /// SQLite. Call [`Replica::release_all`] once the leased work has stopped.
    pub async fn run(self: Arc<Self>, directory: Arc<Directory>, cancel: CancellationToken) {
        let Some(postgres) = self.postgres.clone() else {
            return;
        };
        let period = self.lease / 3;
        // A replica that gives leases up announces it, so the others take them at once.
        let released = Arc::new(tokio::sync::Notify::new());
        tokio::spawn(
            postgres
                .clone()
                .listen(LEASES_CHANNEL, released.clone(), cancel.clone()),
        );
        loop {
            let started = Instant::now();
            match self.round(&postgres, &directory, started).await {
                Ok(()) => {
                    if !self.state_reachable.swap(true, Ordering::Relaxed) {
                        info!("PostgreSQL answers again; the leases are renewed.");
                    }
                }
                Err(error) => {
                    if self.state_reachable.swap(false, Ordering::Relaxed) {
                        warn!(
                            error = format!("{error:#}"),
                            "Cannot renew the leases; the work they cover stops when they expire."
                        );
                    }
                    // Still publish, so every holder looks at the expiry again.
                    self.held.send_modify(|_| {});
                }
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep_until(started + period) => {}
                () = released.notified() => {}
            }
        }
    }

    /// One round: the heartbeat, `delivery` and `updates`, then the fair share of mailboxes.
    async fn round(
        &self,
        postgres: &Postgres,
        directory: &Directory,
        started: Instant,
    ) -> anyhow::Result<()> {
        let releasing: Vec<String> = self
            .releasing
            .lock()
            .map(|mut set| std::mem::take(&mut *set).into_iter().collect())
            .unwrap_or_default();
        for name in &releasing {
            postgres.release_lease(name, &self.id).await?;
        }
        let live = postgres.heartbeat(&self.id, self.lease).await?;
        let valid_until = Some(started + self.lease);
        let previous = self.held.borrow().clone();
        let mut next = BTreeMap::new();
        for name in [DELIVERY, UPDATES] {
            if let Some(epoch) = postgres.acquire_lease(name, &self.id, self.lease).await? {
                if !previous.contains_key(name) {
                    info!(lease = name, epoch, "Took the lease.");
                }
                next.insert(name.to_owned(), GrantView(Grant { epoch, valid_until }));
            }
        }
        let wanted: BTreeSet<String> = directory
            .last_good()
            .map(|snapshot| {
                snapshot
                    .enabled_mailboxes()
                    .into_iter()
                    .map(|row| mailbox_lease(&row.email))
                    .collect()
            })
            .unwrap_or_default();
        let share = wanted.len().div_ceil(live);
        let mut mine: Vec<&String> = previous
            .keys()
            .filter(|name| name.starts_with("mailbox:"))
            .collect();
        mine.sort_by_key(|name| (!wanted.contains(*name), rank(&self.id, name)));
        let mut count = 0;
        for name in mine {
            if count < share && wanted.contains(name) {
                if let Some(epoch) = postgres.acquire_lease(name, &self.id, self.lease).await? {
                    next.insert(name.to_owned(), GrantView(Grant { epoch, valid_until }));
                    count += 1;
                } else {
                    warn!(lease = %name, "Lost a mailbox lease to another replica.");
                }
            } else {
                info!(lease = %name, share, "Giving a mailbox lease up (over the fair share, or no longer enabled).");
                if let Ok(mut set) = self.releasing.lock() {
                    set.insert(name.clone());
                }
            }
        }
        if count < share {
            let mut free: Vec<&String> = wanted
                .iter()
                .filter(|name| !next.contains_key(*name) && !releasing.contains(name))
                .collect();
            free.sort_by_key(|name| rank(&self.id, name));
            for name in free {
                if count >= share {
                    break;
                }
                if let Some(epoch) = postgres.acquire_lease(name, &self.id, self.lease).await? {
                    info!(lease = %name, epoch, "Took a mailbox lease.");
                    next.insert(name.to_owned(), GrantView(Grant { epoch, valid_until }));
                    count += 1;
                }
            }
        }
        self.held.send_replace(Arc::new(next));
        Ok(())
    }

    /// Gives every lease up and removes the heartbeat (SIGTERM, once the leased work stopped),
    /// so another replica takes over at once rather than after `lease_secs`.
    pub async fn release_all(&self) {
        let Some(postgres) = &self.postgres else {
            return;
        };
        let held = self.held.send_replace(Held::default());
        let releasing: Vec<String> = self
            .releasing
            .lock()
            .map(|mut set| std::mem::take(&mut *set).into_iter().collect())
            .unwrap_or_default();
        for name in held.keys().chain(releasing.iter()) {
            if let Err(error) = postgres.release_lease(name, &self.id).await {
                warn!(lease = %name, error = format!("{error:#}"), "Cannot release a lease; it expires on its own.");
            }
        }
        if let Err(error) = postgres.remove_heartbeat(&self.id).await {
            warn!(error = format!("{error:#}"), "Cannot remove the heartbeat.");
        }
        if let Err(error) = postgres.announce_release().await {
            warn!(
                error = format!("{error:#}"),
                "Cannot announce the released leases."
            );
        }
        info!("Released the leases.");
    }
}

/// A per-replica order of the mailboxes, so replicas starting together reach for different
/// ones first.
fn rank(replica: &str, name: &str) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (replica, name).hash(&mut hasher);
    hasher.finish()
}

/// `<hostname>-<pid>`, the default `state.replica_id`.
pub fn default_replica_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "report-relay".to_owned());
    format!("{host}-{}", std::process::id())
}

/// Runs `work` whenever this replica holds the lease `name`, with a token cancelled when the
/// lease is lost (or `cancel` fires), and waits for it to stop before taking the lease up again.
/// On SQLite, `work` runs once until `cancel`.
pub async fn run_while_held<W, F>(
    replica: Arc<Replica>,
    name: &'static str,
    cancel: CancellationToken,
    mut work: W,
) where
    W: FnMut(Fence, CancellationToken) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let mut changes = replica.subscribe();
    loop {
        let fence = loop {
            if let Some(fence) = replica.fence(name) {
                break fence;
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                changed = changes.changed() => if changed.is_err() { return },
            }
        };
        info!(
            lease = name,
            epoch = fence.epoch,
            "Starting the work of the lease."
        );
        let held = cancel.child_token();
        let task = tokio::spawn(work(fence.clone(), held.clone()));
        loop {
            let expires = replica
                .held
                .borrow()
                .get(name)
                .and_then(|grant| grant.0.valid_until);
            tokio::select! {
                () = cancel.cancelled() => break,
                changed = changes.changed() => if changed.is_err() { break },
                () = sleep_until_some(expires) => {}
            }
            if replica.fence(name).map(|now| now.epoch) != Some(fence.epoch) {
                warn!(lease = name, "The lease is lost; stopping its work.");
                break;
            }
        }
        held.cancel();
        let abort = task.abort_handle();
        if tokio::time::timeout(WORK_STOP_GRACE, task).await.is_err() {
            warn!(
                lease = name,
                "The work of a lost lease did not stop in time; aborting it."
            );
            abort.abort();
        }
        if cancel.is_cancelled() {
            return;
        }
    }
}

async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
