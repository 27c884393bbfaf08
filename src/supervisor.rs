//! The supervisor: exactly one [`MailboxWatcher`] per enabled mailbox row.
//!
//! Every `seatable.reload_secs` it re-reads the mailboxes table, starts watchers for new rows,
//! stops those whose row was removed or disabled (closing their connections), and restarts those
//! whose connection settings changed. A watcher that panics is restarted after a short pause.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use secrecy::SecretString;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{Config, ImapAccount};
use crate::directory::{Directory, Mailbox};
use crate::http::{HealthSource, MailboxHealth, ReplicaHealth};
use crate::imap::{
    Credentials, ImapTimeouts, MailboxSettings, MailboxWatcher, MessageSink, WatcherState,
    WatcherStatus,
};
use crate::metrics::Metrics;
use crate::oauth2::TokenSources;
use crate::replica::{Replica, mailbox_lease};

/// Poll interval for servers without IDLE, in seconds.
pub const POLL_SECS: u64 = 60;

/// Builds a watcher's settings from its row, falling back to the `imap` config section. The
/// credentials: the row's `imap_password`, else the `imap.accounts` entry the row's
/// `imap_account` names (default: the one named like its `email`), with a password or an
/// `oauth2` section whose token source comes from `tokens`.
///
/// # Errors
/// A message naming what is missing: a host (row `imap_host` or `imap.host`) or credentials.
pub fn mailbox_settings(
    row: &Mailbox,
    config: &Config,
    tokens: &TokenSources,
) -> Result<MailboxSettings, String> {
    let imap = &config.imap;
    let host = row
        .imap_host
        .clone()
        .or_else(|| imap.host.clone())
        .ok_or_else(|| {
            format!(
                "mailbox {} has no imap_host and imap.host is not set in the config",
                row.email
            )
        })?;
    let account = row.imap_account.as_deref().unwrap_or(&row.email);
    let credentials = match &row.imap_password {
        Some(password) => Credentials::Password(SecretString::from(password.clone())),
        None => match imap.account(account) {
            Some((
                _,
                ImapAccount {
                    password: Some(password),
                    ..
                },
            )) => Credentials::Password(password.clone()),
            Some((
                name,
                ImapAccount {
                    oauth2: Some(_), ..
                },
            )) => Credentials::OAuth2(
                tokens
                    .get(config, name, &row.email)
                    .ok_or_else(|| format!("imap.accounts.{name} has no oauth2 section"))?,
            ),
            _ if row.imap_account.is_some() => {
                return Err(format!(
                    "mailbox {} names imap_account {account:?}, which imap.accounts lacks",
                    row.email
                ));
            }
            _ => {
                return Err(format!(
                    "mailbox {} has no imap_password and imap.accounts has no entry for it",
                    row.email
                ));
            }
        },
    };
    Ok(MailboxSettings {
        address: row.email.clone(),
        host,
        port: row.imap_port.unwrap_or(imap.port),
        tls: imap.tls,
        login: row.imap_login.clone().unwrap_or_else(|| row.email.clone()),
        credentials,
        folder: row.folder.clone().unwrap_or_else(|| imap.folder.clone()),
        idle_renew_secs: imap.idle_renew_secs,
        seed_last_uid: row.last_uid,
        timeouts: ImapTimeouts::default(),
        poll_secs: POLL_SECS,
    })
}

/// Whether two settings need different connections (the seed UID does not matter once running).
fn same_connection(a: &MailboxSettings, b: &MailboxSettings) -> bool {
    a.host == b.host
        && a.port == b.port
        && a.tls == b.tls
        && a.login == b.login
        && a.credentials.same_as(&b.credentials)
        && a.folder == b.folder
        && a.idle_renew_secs == b.idle_renew_secs
}

struct Running {
    settings: MailboxSettings,
    cancel: CancellationToken,
    task: tokio::task::Id,
}

/// The watchers' statuses, shared with `/readyz`.
pub struct Watchers {
    directory: Arc<Directory>,
    stale_after: Duration,
    statuses: Mutex<BTreeMap<String, (watch::Receiver<WatcherStatus>, SystemTime)>>,
    replica: Mutex<Option<Arc<Replica>>>,
}

impl std::fmt::Debug for Watchers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Watchers")
    }
}

impl Watchers {
    /// An empty registry. A mailbox counts as stale for `/readyz` after 10 minutes without a
    /// catch-up, or `idle_renew_secs` + 60 s when IDLE rounds are longer than that.
    pub fn new(directory: Arc<Directory>, idle_renew_secs: u64) -> Arc<Self> {
        Arc::new(Self {
            directory,
            stale_after: crate::http::CATCH_UP_STALE_AFTER
                .max(Duration::from_secs(idle_renew_secs + 60)),
            statuses: Mutex::new(BTreeMap::new()),
            replica: Mutex::new(None),
        })
    }

    /// The replica whose id and leases `/readyz` shows.
    pub fn set_replica(&self, replica: Arc<Replica>) {
        if let Ok(mut slot) = self.replica.lock() {
            *slot = Some(replica);
        }
    }

    fn replica(&self) -> Option<Arc<Replica>> {
        self.replica.lock().ok().and_then(|slot| slot.clone())
    }

    fn insert(&self, address: &str, status: watch::Receiver<WatcherStatus>) {
        if let Ok(mut map) = self.statuses.lock() {
            map.insert(address.to_owned(), (status, SystemTime::now()));
        }
    }

    fn remove(&self, address: &str) {
        if let Ok(mut map) = self.statuses.lock() {
            map.remove(address);
        }
    }

    /// The current status of every watched mailbox.
    pub fn statuses(&self) -> Vec<(String, WatcherStatus)> {
        self.statuses
            .lock()
            .map(|map| {
                map.iter()
                    .map(|(address, (rx, _))| (address.clone(), rx.borrow().clone()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl HealthSource for Watchers {
    fn directory_loaded(&self) -> bool {
        self.directory.is_loaded()
    }

    fn directory_age(&self) -> Option<Duration> {
        self.directory.age()
    }

    fn schema_problem(&self) -> Option<String> {
        self.directory.backend().schema_problem()
    }

    fn replica(&self) -> Option<ReplicaHealth> {
        Watchers::replica(self).map(|replica| ReplicaHealth {
            id: replica.id().to_owned(),
            leases: replica.held_names(),
            state_reachable: replica.state_reachable(),
        })
    }

    fn mailboxes(&self) -> Vec<MailboxHealth> {
        let Ok(map) = self.statuses.lock() else {
            return Vec::new();
        };
        map.iter()
            .map(|(address, (rx, started_at))| {
                let status = rx.borrow().clone();
                let last_error = match &status.state {
                    WatcherState::Backoff { last_error } => Some(last_error.clone()),
                    _ => None,
                };
                MailboxHealth {
                    mailbox: address.clone(),
                    state: status.state.name().to_owned(),
                    last_error,
                    last_catch_up: status.last_catch_up,
                    started_at: *started_at,
                    stale_after: self.stale_after,
                }
            })
            .collect()
    }
}

/// Keeps one watcher per enabled mailbox row.
pub struct Supervisor<S: MessageSink> {
    config: watch::Receiver<Arc<Config>>,
    directory: Arc<Directory>,
    sink: Arc<S>,
    metrics: Arc<Metrics>,
    watchers: Arc<Watchers>,
    reload: Duration,
    replica: Arc<Replica>,
    tokens: Arc<TokenSources>,
}

impl<S: MessageSink> Supervisor<S> {
    /// A supervisor reading mailboxes from `directory` every `seatable.reload_secs`.
    pub fn new(
        config: Arc<Config>,
        directory: Arc<Directory>,
        sink: Arc<S>,
        metrics: Arc<Metrics>,
        watchers: Arc<Watchers>,
        tokens: Arc<TokenSources>,
    ) -> Self {
        let reload = Duration::from_secs(config.seatable.reload_secs);
        Self {
            // Never changes unless `reloading` gives a channel that does.
            config: watch::channel(config).1,
            directory,
            sink,
            metrics,
            watchers,
            reload,
            replica: Replica::solo(),
            tokens,
        }
    }

    /// The same supervisor taking each config published on `updates` (a SIGHUP reload):
    /// watchers whose connection settings changed restart at once.
    pub fn reloading(mut self, updates: watch::Receiver<Arc<Config>>) -> Self {
        self.config = updates;
        self
    }

    /// This supervisor watching only the mailboxes whose `mailbox:<address>` lease `replica`
    /// holds, reconciling whenever its leases change; the default, [`Replica::solo`], holds all.
    pub fn leased(mut self, replica: Arc<Replica>) -> Self {
        self.replica = replica;
        self
    }

    /// Runs until `cancel` fires, then stops every watcher and waits up to `grace` for them to
    /// close their connections before aborting the rest.
    pub async fn run(mut self, cancel: CancellationToken, grace: Duration) {
        let mut leases = self.replica.subscribe();
        let mut tasks: JoinSet<()> = JoinSet::new();
        let mut running: HashMap<String, Running> = HashMap::new();
        let mut by_task: HashMap<tokio::task::Id, String> = HashMap::new();
        // The first pass uses the snapshot loaded at start (maybe the persisted one) without
        // waiting for SeaTable; later passes re-read the mailboxes table.
        if let Some(snapshot) = self.directory.last_good() {
            self.reconcile_with(&snapshot, &mut tasks, &mut running, &mut by_task);
        }
        let mut next_reload = tokio::time::Instant::now() + self.reload;
        loop {
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                Some(done) = tasks.join_next_with_id() => {
                    let (id, panicked) = match done {
                        Ok((id, ())) => (id, None),
                        Err(error) => (error.id(), error.is_panic().then(|| error.to_string())),
                    };
                    let Some(address) = by_task.remove(&id) else { continue };
                    let still_wanted = running.get(&address).is_some_and(|r| r.task == id);
                    if !still_wanted {
                        continue;
                    }
                    let entry = running.remove(&address);
                    if let (Some(reason), Some(entry)) = (panicked, entry) {
                        error!(mailbox = %address, reason, "A mailbox watcher panicked; restarting it.");
                        tokio::select! {
                            () = cancel.cancelled() => break,
                            () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                        self.start(&mut tasks, &mut running, &mut by_task, entry.settings);
                    }
                }
                Ok(()) = leases.changed() => {
                    if let Some(snapshot) = self.directory.last_good() {
                        self.reconcile_with(&snapshot, &mut tasks, &mut running, &mut by_task);
                    }
                }
                Ok(()) = self.config.changed() => {
                    if let Some(snapshot) = self.directory.last_good() {
                        self.reconcile_with(&snapshot, &mut tasks, &mut running, &mut by_task);
                    }
                }
                () = tokio::time::sleep_until(next_reload) => {
                    // A slow SeaTable must not hold up shutdown.
                    tokio::select! {
                        biased;
                        () = cancel.cancelled() => break,
                        () = self.reconcile(&mut tasks, &mut running, &mut by_task) => {}
                    }
                    next_reload = tokio::time::Instant::now() + self.reload;
                }
            }
        }
        for entry in running.values() {
            entry.cancel.cancel();
        }
        if tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} })
            .await
            .is_err()
        {
            warn!("Some mailbox watchers did not stop in time; aborting them.");
            tasks.shutdown().await;
        }
        info!("All mailbox watchers stopped.");
    }

    async fn reconcile(
        &self,
        tasks: &mut JoinSet<()>,
        running: &mut HashMap<String, Running>,
        by_task: &mut HashMap<tokio::task::Id, String>,
    ) {
        let snapshot = match self.directory.refresh().await {
            Ok(snapshot) => snapshot,
            Err(error) => match self.directory.last_good() {
                Some(snapshot) => {
                    warn!(
                        error = format!("{error:#}"),
                        "Cannot re-read the mailboxes from SeaTable; keeping the current watchers."
                    );
                    snapshot
                }
                None => return,
            },
        };
        self.reconcile_with(&snapshot, tasks, running, by_task);
    }

    fn reconcile_with(
        &self,
        snapshot: &crate::directory::Snapshot,
        tasks: &mut JoinSet<()>,
        running: &mut HashMap<String, Running>,
        by_task: &mut HashMap<tokio::task::Id, String>,
    ) {
        let config = self.config.borrow().clone();
        let mut wanted: HashMap<String, MailboxSettings> = HashMap::new();
        for row in snapshot.enabled_mailboxes() {
            if !self.replica.holds(&mailbox_lease(&row.email)) {
                continue;
            }
            match mailbox_settings(row, &config, &self.tokens) {
                Ok(settings) => {
                    wanted.insert(row.email.to_ascii_lowercase(), settings);
                }
                Err(message) => warn!(mailbox = %row.email, "{message}; not watching it."),
            }
        }
        let stale: Vec<String> = running
            .iter()
            .filter(|(key, entry)| {
                wanted
                    .get(*key)
                    .is_none_or(|w| !same_connection(w, &entry.settings))
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in stale {
            if let Some(entry) = running.remove(&key) {
                info!(mailbox = %entry.settings.address, "Stopping the watcher: its row was removed, disabled or changed.");
                entry.cancel.cancel();
                self.watchers.remove(&entry.settings.address);
            }
        }
        for (key, settings) in wanted {
            if !running.contains_key(&key) {
                self.start(tasks, running, by_task, settings);
            }
        }
    }

    fn start(
        &self,
        tasks: &mut JoinSet<()>,
        running: &mut HashMap<String, Running>,
        by_task: &mut HashMap<tokio::task::Id, String>,
        settings: MailboxSettings,
    ) {
        let key = settings.address.to_ascii_lowercase();
        info!(mailbox = %settings.address, host = %settings.host, port = settings.port, folder = %settings.folder, "Starting a mailbox watcher.");
        let (watcher, status) =
            MailboxWatcher::new(settings.clone(), self.sink.clone(), self.metrics.clone());
        self.watchers.insert(&settings.address, status);
        let cancel = CancellationToken::new();
        let child = cancel.clone();
        let task = tasks.spawn(watcher.run(child)).id();
        by_task.insert(task, key.clone());
        running.insert(
            key,
            Running {
                settings,
                cancel,
                task,
            },
        );
    }
}
