//! The composition root: builds the clients, spawns the tasks, shuts down gracefully.
//!
//! `report-relay run` is [`run`]; `schema apply`, `oauth login` and `replay --mailbox` are here
//! too, because they wire the same pieces; `check` is in `app/check.rs`.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use backon::{BackoffBuilder, ExponentialBuilder};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::alerts::Alerts;
use crate::config::Config;
use crate::delivery::{DeliverySettings, DeliveryWorker, sending_bot};
use crate::directory::{
    ChatStatuses, Directory, DirectoryBackend, LastUidWriter, Migrations, SeaTableBackend,
    SnapshotSource,
};
use crate::metrics::Metrics;
use crate::oauth2::TokenSources;
use crate::relay::{Handles, Incoming, Relay, RelaySettings};
use crate::replica::{DELIVERY, Replica, UPDATES, default_replica_id, run_while_held};
use crate::schema::Schema;
use crate::seatable::SeaTableClient;
use crate::state::{CHAT_STATUS_CHANNEL, OUTBOX_CHANNEL, State};
use crate::supervisor::{Supervisor, Watchers};

/// How long `last_uid` write-backs are coalesced, per mailbox.
const LAST_UID_WRITE_INTERVAL: Duration = Duration::from_secs(10);
/// How long shutdown waits for watchers and in-flight work after SIGTERM.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// The HTTP client for SeaTable: every request times out.
fn seatable_http() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(60))
        .build()?)
}

pub(crate) fn seatable_client(
    config: &Config,
    metrics: Arc<Metrics>,
) -> anyhow::Result<SeaTableClient> {
    Ok(SeaTableClient::new(
        &config.seatable.server_url,
        config.seatable.api_token.clone(),
        seatable_http()?,
        metrics,
    )?)
}

mod check;

pub use self::check::{CheckLine, check};

/// The pieces shared by `run` and `replay --mailbox`.
struct Core {
    handles: Handles,
    backend: Arc<SeaTableBackend>,
    migrations: Arc<Migrations>,
}

async fn core(config: &Config) -> anyhow::Result<Core> {
    let state = State::from_config(&config.state).await?;
    let metrics = Arc::new(Metrics::new());
    let client = seatable_client(config, metrics.clone())?;
    let backend = Arc::new(SeaTableBackend::new(client, config.seatable.tables.clone()));
    let directory = Arc::new(Directory::new(
        backend.clone(),
        state.clone(),
        Duration::from_secs(config.seatable.cache_ttl_secs),
    ));
    let statuses = ChatStatuses::load(state.clone()).await?;
    let migrations = Migrations::new(directory.clone(), state.clone(), statuses.clone());
    Ok(Core {
        handles: Handles {
            state,
            directory,
            statuses,
            metrics,
        },
        backend,
        migrations,
    })
}

/// The delivery worker of `config`, and the handle that wakes it.
fn delivery_worker(
    config: &Config,
    state: &State,
    metrics: &Arc<Metrics>,
    migrations: &Arc<Migrations>,
) -> anyhow::Result<(DeliveryWorker, Arc<tokio::sync::Notify>)> {
    let bot = sending_bot(
        &config.telegram.bot_token,
        &config.telegram.api_url,
        config.telegram.max_upload_bytes,
    )?;
    Ok(DeliveryWorker::new(
        bot,
        state.clone(),
        &DeliverySettings {
            concurrency: config.delivery.concurrency,
            give_up_after: Duration::from_secs(config.delivery.give_up_after_secs),
            limits: config.telegram.limits,
        },
        metrics.clone(),
        migrations.clone(),
    ))
}

/// `report-relay run`: the service, until `shutdown` resolves, with the config it was given.
///
/// # Errors
/// A fatal start-up error: the state cannot be opened, the HTTP address cannot be bound, or
/// SeaTable answers but lacks a required table or column.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    run_reloading(config, None, shutdown).await
}

/// [`run`], re-reading `config_path` on every SIGHUP: the `imap` section applies at once
/// (watchers whose connection settings changed restart); a change elsewhere is logged as
/// needing a restart; a config that does not load keeps the running one, with an ERROR.
///
/// # Errors
/// As [`run`].
pub async fn run_reloading(
    config: Config,
    config_path: Option<PathBuf>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let (config_updates, config_changes) = tokio::sync::watch::channel(config.clone());
    let Core {
        handles,
        backend,
        migrations,
    } = core(&config).await?;
    let Handles {
        state,
        directory,
        statuses,
        metrics,
    } = handles.clone();
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();

    let watchers = Watchers::new(directory.clone(), config.imap.idle_renew_secs);
    let listener = crate::http::bind(config.http.listen).await?;
    let tls = match &config.http.tls {
        Some(files) => Some(crate::http::tls::ReloadingCert::load(files)?),
        None => None,
    };
    // The ingest endpoints answer 503 until the relay exists (the directory has loaded).
    let ingest = crate::ingest::Ingest::new(
        &config.http,
        directory.clone(),
        state.clone(),
        metrics.clone(),
    );
    let http = tokio::spawn(crate::http::serve(
        listener,
        crate::http::router(watchers.clone(), metrics.clone()).merge(ingest.router()),
        tls,
        cancel.clone(),
    ));

    // Load the directory: SeaTable, else the persisted snapshot, else keep retrying.
    // The same backon policy as the other retry loops: 1 s doubling to 60 s, without an end.
    let mut delays = ExponentialBuilder::default()
        .with_min_delay(Duration::from_secs(1))
        .with_max_delay(Duration::from_secs(60))
        .with_factor(2.0)
        .without_max_times()
        .build();
    tokio::pin!(shutdown);
    loop {
        match directory.load().await {
            Ok(SnapshotSource::SeaTable) => {
                // SeaTable answers: it must have every column the relay writes, because it
                // silently ignores unknown column names on writes.
                if let Err(error) = backend.verify_schema().await {
                    cancel.cancel();
                    let _ = http.await;
                    return Err(error);
                }
                break;
            }
            Ok(SnapshotSource::Persisted) => {
                warn!(
                    "Started from the persisted directory; the SeaTable schema is checked once it answers."
                );
                break;
            }
            Err(error) => {
                let delay = delays.next().unwrap_or(Duration::from_secs(60));
                error!(
                    error = format!("{error:#}"),
                    retry_in_secs = delay.as_secs(),
                    "Cannot load the directory; retrying."
                );
                tokio::select! {
                    () = &mut shutdown => { cancel.cancel(); let _ = http.await; return Ok(()); }
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }

    let replica = match state.postgres() {
        Some(postgres) => Replica::shared(
            postgres.clone(),
            config
                .state
                .replica_id
                .clone()
                .unwrap_or_else(default_replica_id),
            Duration::from_secs(config.state.lease_secs),
        ),
        None => Replica::solo(),
    };
    watchers.set_replica(replica.clone());
    if let Some(postgres) = state.postgres() {
        // The bot (on the replica holding `updates`) and the delivery worker change statuses;
        // every replica's watchers plan with them.
        let changed = Arc::new(tokio::sync::Notify::new());
        tracker.spawn(postgres.clone().listen(
            CHAT_STATUS_CHANNEL,
            changed.clone(),
            cancel.clone(),
        ));
        tracker.spawn(statuses.clone().follow(changed, cancel.clone()));
    }
    // The leases outlive the work they cover: released only once it stopped.
    let leasing = CancellationToken::new();
    let lease_task = tokio::spawn(replica.clone().run(directory.clone(), leasing.clone()));

    let wake = Arc::new(tokio::sync::Notify::new());
    let alerts = Alerts::new(
        &config.telegram,
        state.clone(),
        wake.clone(),
        directory.clone(),
    );
    if let Some(alerts) = &alerts {
        tracker.spawn(
            alerts
                .clone()
                .monitor(watchers.clone(), replica.clone(), cancel.clone()),
        );
    }
    tracker.spawn(run_while_held(replica.clone(), DELIVERY, cancel.clone(), {
        let (config, state, metrics, migrations) = (
            config.clone(),
            state.clone(),
            metrics.clone(),
            migrations.clone(),
        );
        let (wake, replica, alerts) = (wake.clone(), replica.clone(), alerts.clone());
        move |fence, held| {
            let worker = delivery_worker(&config, &state.fenced(fence), &metrics, &migrations);
            let (wake, replica, postgres, alerts) = (
                wake.clone(),
                replica.clone(),
                state.postgres().cloned(),
                alerts.clone(),
            );
            async move {
                let worker = match worker {
                    Ok((worker, _)) => worker,
                    Err(error) => {
                        error!(
                            error = format!("{error:#}"),
                            "Cannot build the delivery worker."
                        );
                        return;
                    }
                };
                if let Some(postgres) = postgres {
                    // Watchers on every replica announce their acknowledgements.
                    tokio::spawn(postgres.listen(OUTBOX_CHANNEL, wake.clone(), held.clone()));
                }
                let may_send = Arc::new(move || replica.holds(DELIVERY));
                worker
                    .with_wake(wake)
                    .sending_while(may_send)
                    .alerting(alerts)
                    .run(held)
                    .await;
            }
        }
    }));

    if config.seatable.delivery_log {
        // On the replica that delivers, so that one replica writes the log.
        let work = crate::delivery_log::lease_work(
            backend.client().clone(),
            state.clone(),
            directory.clone(),
            config.seatable.tables.clone(),
        );
        tracker.spawn(run_while_held(
            replica.clone(),
            DELIVERY,
            cancel.clone(),
            work,
        ));
    }

    let last_uid = Arc::new(LastUidWriter::new(
        backend.clone(),
        state.clone(),
        LAST_UID_WRITE_INTERVAL,
    ));
    tracker.spawn(last_uid.clone().run(cancel.clone()));

    let relay = Arc::new(
        Relay::new(handles, RelaySettings::new(&config), wake, Some(last_uid))
            .leased(replica.clone())
            .alerting(alerts),
    );
    ingest.set_relay(relay.clone());
    let registrar = crate::bot::Registrar::new(
        directory.clone(),
        state.clone(),
        statuses.clone(),
        migrations.clone(),
        config.telegram.default_country_code.clone(),
    );
    let polling = crate::bot::polling_bot(&config.telegram.bot_token, &config.telegram.api_url)?;
    tracker.spawn(run_while_held(
        replica.clone(),
        UPDATES,
        cancel.clone(),
        move |_, held| crate::bot::run(polling.clone(), registrar.clone(), held),
    ));

    let tokens = Arc::new(TokenSources::new(
        state.clone(),
        crate::oauth2::http_client().context("Cannot set up the OAuth2 HTTP client")?,
    ));
    let supervisor = Supervisor::new(
        config.clone(),
        directory.clone(),
        relay,
        metrics.clone(),
        watchers,
        tokens,
    )
    .reloading(config_changes)
    .leased(replica.clone());
    tracker.spawn(supervisor.run(cancel.clone(), SHUTDOWN_GRACE / 2));
    if let Some(path) = config_path {
        tracker.spawn(reload_on_sighup(path, config_updates, cancel.clone()));
    }
    tracker.close();
    info!("report-relay is running.");

    shutdown.await;
    info!("Shutting down.");
    cancel.cancel();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        warn!("Some tasks did not stop within the shutdown deadline.");
    }
    leasing.cancel();
    let _ = lease_task.await;
    replica.release_all().await;
    let _ = http.await;
    info!("Stopped.");
    Ok(())
}

/// Re-reads the config file at every SIGHUP until `cancel` fires and publishes it when it loads.
async fn reload_on_sighup(
    path: PathBuf,
    updates: tokio::sync::watch::Sender<Arc<Config>>,
    cancel: CancellationToken,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(hangups) => hangups,
        Err(error) => {
            warn!(%error, "Cannot listen for SIGHUP; the config is not reloaded.");
            return;
        }
    };
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            received = hangups.recv() => if received.is_none() { return },
        }
        match Config::load(&path) {
            Ok(new) => {
                let old = updates.borrow().clone();
                let restart_only = restart_only_changes(&old, &new);
                if !restart_only.is_empty() {
                    warn!(
                        sections = restart_only.join(", "),
                        "The config changed where a reload cannot apply it; restart the relay for that."
                    );
                }
                info!(config = %path.display(), "Reloaded the config on SIGHUP; the imap settings apply now.");
                updates.send_replace(Arc::new(new));
            }
            Err(error) => error!(
                config = %path.display(),
                error = format!("{error:#}"),
                "Cannot reload the config on SIGHUP; keeping the running one."
            ),
        }
    }
}

/// The sections of the config outside `imap` that differ (they take effect after a restart).
/// Compared by their `Debug` text, in which secrets are redacted: a changed token alone is not
/// noticed.
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let differs =
        |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") != format!("{b:?}");
    [
        ("telegram", differs(&old.telegram, &new.telegram)),
        ("seatable", differs(&old.seatable, &new.seatable)),
        ("reports", differs(&old.reports, &new.reports)),
        ("delivery", differs(&old.delivery, &new.delivery)),
        ("state", differs(&old.state, &new.state)),
        ("http", differs(&old.http, &new.http)),
    ]
    .into_iter()
    .filter_map(|(name, changed)| changed.then_some(name))
    .collect()
}

/// Resolves at the first SIGTERM or SIGINT; a second signal exits the process at once.
pub async fn shutdown_signal() {
    wait_for_signal().await;
    info!("Received a shutdown signal; a second one exits at once.");
    tokio::spawn(async {
        wait_for_signal().await;
        eprintln!("report-relay: second signal, exiting now");
        std::process::exit(130);
    });
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// `report-relay replay EML... --mailbox ADDRESS [--timeout SECS]`: relays the files for real
/// as if they had arrived in that mailbox, keyed by content hash (running it twice, or on a
/// mail IMAP already relayed, sends nothing twice). Waits for the sends of these files only,
/// at most `timeout`; what is still pending then stays in the outbox for `run`. Returns whether
/// every recipient got every file within the timeout.
///
/// # Errors
/// The state, SeaTable or Telegram could not be used at all.
pub async fn replay_to_mailbox(
    config: Config,
    files: Vec<PathBuf>,
    mailbox: String,
    timeout: Duration,
) -> anyhow::Result<bool> {
    let Core {
        handles,
        migrations,
        ..
    } = core(&config).await?;
    let Handles {
        state,
        directory,
        metrics,
        ..
    } = handles.clone();
    directory
        .load()
        .await
        .context("Cannot load the directory")?;
    let snapshot = directory.last_good().context("The directory is empty")?;
    if snapshot.mailbox(&mailbox).is_none() {
        anyhow::bail!("no mailbox row has the address {mailbox}");
    }
    let (worker, wake) = delivery_worker(&config, &state, &metrics, &migrations)?;
    let relay = Relay::new(handles, RelaySettings::new(&config), wake, None);
    let mut all_ok = true;
    let mut message_ids = Vec::new();
    for path in &files {
        let raw = match std::fs::read(path) {
            Ok(raw) => raw,
            Err(error) => {
                error!(file = %path.display(), %error, "Cannot read the file.");
                all_ok = false;
                continue;
            }
        };
        let relayed = relay
            .relay(Incoming {
                mailbox: mailbox.clone(),
                uid: None,
                raw,
                internal_date: None,
                fetch_error: None,
            })
            .await?;
        println!(
            "{}: {}{}",
            path.display(),
            relayed.outcome.as_str(),
            if relayed.duplicate {
                " (already relayed before; nothing sent)".to_owned()
            } else {
                format!(", {} sends to {} chats", relayed.sends, relayed.recipients)
            }
        );
        if relayed.outcome == crate::state::MessageOutcome::Failed {
            all_ok = false;
        }
        message_ids.extend(relayed.message_id);
    }
    // Deliver these files' sends (the worker takes the whole outbox in order), then stop. On a
    // shared PostgreSQL state the replica holding the `delivery` lease sends them (the
    // acknowledgement's NOTIFY woke it): a second worker would double the Telegram budget.
    let cancel = CancellationToken::new();
    let worker = match state.postgres() {
        None => Some(tokio::spawn(worker.run(cancel.clone()))),
        Some(postgres) => {
            let holders = postgres.lease_holders().await?;
            match holders.iter().find(|(name, _)| name == DELIVERY) {
                Some((_, owner)) => info!(
                    replica = owner.as_str(),
                    "Queued in the shared state; the replica holding the delivery lease sends them."
                ),
                None => warn!(
                    "Queued in the shared state, but no replica holds the delivery lease: \
                     nothing is sent until a replica runs (`report-relay run`)."
                ),
            }
            None
        }
    };
    let deadline = tokio::time::Instant::now() + timeout;
    let counts = loop {
        let counts = state.send_counts(message_ids.clone()).await?;
        if counts.pending == 0 {
            break counts;
        }
        if tokio::time::Instant::now() >= deadline {
            warn!(
                pending = counts.pending,
                timeout_secs = timeout.as_secs(),
                "Sends of the replayed files are still pending after --timeout; they stay in the outbox and go out with `run`."
            );
            all_ok = false;
            break counts;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    cancel.cancel();
    if let Some(worker) = worker {
        let _ = worker.await;
    }
    if counts.failed > 0 {
        warn!(
            failed = counts.failed,
            "Some sends of the replayed files failed."
        );
        all_ok = false;
    }
    Ok(all_ok)
}

/// `report-relay oauth login --mailbox ADDRESS`: signs the mailbox's OAuth2 account in and
/// stores its refresh token in the state ([`crate::oauth2::login`]). The account is the
/// `imap.accounts` entry named like the address, else the one the mailbox row's `imap_account`
/// names (read from SeaTable). Prompts go to `out`.
///
/// # Errors
/// No OAuth2 account for the mailbox, SeaTable unreachable when it must be asked, or what
/// [`crate::oauth2::login::login`] returns.
pub async fn oauth_login(
    config: &Config,
    mailbox: &str,
    out: &mut (dyn std::io::Write + Send),
) -> anyhow::Result<crate::oauth2::login::LoggedIn> {
    let name = match config.imap.account(mailbox) {
        Some((name, _)) => name.to_owned(),
        None => {
            let client = seatable_client(config, Arc::new(Metrics::new()))?;
            let backend = SeaTableBackend::new(client, config.seatable.tables.clone());
            let snapshot = backend
                .fetch()
                .await
                .context("Cannot read the mailboxes from SeaTable")?;
            let row = snapshot.mailbox(mailbox).with_context(|| {
                format!("imap.accounts has no entry {mailbox} and no mailbox row has that address")
            })?;
            row.imap_account.clone().with_context(|| {
                format!("imap.accounts has no entry {mailbox} and its row names no imap_account")
            })?
        }
    };
    let (name, account) = config
        .imap
        .account(&name)
        .with_context(|| format!("imap.accounts has no entry {name}"))?;
    let oauth2 = account
        .oauth2
        .as_ref()
        .with_context(|| format!("imap.accounts.{name} has a password, not an oauth2 section"))?;
    let state = State::beside_relay(&config.state).await?;
    crate::oauth2::login::login(&name.to_ascii_lowercase(), mailbox, oauth2, &state, out).await
}

/// `report-relay schema apply`: creates the tables and columns the base lacks. Returns what
/// was created.
///
/// # Errors
/// SeaTable refused or could not be reached.
pub async fn schema_apply(config: &Config) -> anyhow::Result<Vec<String>> {
    let client = seatable_client(config, Arc::new(Metrics::new()))?;
    let schema = Schema::bundled().with_table_names(&config.seatable.tables);
    let mut created = crate::schema::apply(&client, &schema).await?;
    if config.seatable.delivery_log {
        let tables = &config.seatable.tables;
        created.extend(
            crate::delivery_log::table::apply(&client, &tables.deliveries, &tables.mailboxes)
                .await?,
        );
    }
    Ok(created)
}
