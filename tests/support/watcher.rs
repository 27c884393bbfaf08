//! A `MailboxWatcher` running inside the test: an in-memory [`MemorySink`], the watch channel
//! of its status and its captured log, each awaited with a deadline instead of sleeping.
//!
//! Used against a real Dovecot (`tests/imap_watcher.rs`) and against the scripted IMAP server
//! of [`super::imap_script`] (`tests/imap_scripted.rs`).

#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use report_relay::config::TlsMode;
use report_relay::imap::{
    Checkpoint, Credentials, FetchedMessage, ImapTimeouts, MailboxSettings, MailboxWatcher,
    MessageSink, WatcherState, WatcherStatus,
};
use report_relay::metrics::Metrics;
use secrecy::SecretString;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::instrument::WithSubscriber;

use super::dovecot::{PASS, USER};

/// Deadline of every awaited condition.
pub const WAIT: Duration = Duration::from_secs(15);

/// What a refused [`MessageSink::acknowledge`] answers.
pub const SINK_ERROR: &str = "database is locked";

/// [`USER`] on `host:port` in plaintext, with small timeouts and backoff so faults are handled
/// within a second or two.
pub fn settings(host: &str, port: u16) -> MailboxSettings {
    MailboxSettings {
        address: USER.into(),
        host: host.into(),
        port,
        tls: TlsMode::None,
        login: USER.into(),
        credentials: Credentials::Password(SecretString::from(PASS)),
        folder: "INBOX".into(),
        idle_renew_secs: 60,
        seed_last_uid: None,
        timeouts: ImapTimeouts {
            connect: Duration::from_secs(5),
            login: Duration::from_secs(5),
            command: Duration::from_secs(5),
            fetch: Duration::from_secs(5),
            idle_keepalive: Duration::from_secs(60),
            done: Duration::from_secs(2),
            logout: Duration::from_secs(2),
            reconnect_min_delay: Duration::from_millis(50),
            reconnect_max_delay: Duration::from_millis(250),
        },
        poll_secs: 1,
    }
}

// ---- an in-memory sink -------------------------------------------------------------------------

#[derive(Debug, Default)]
pub struct SinkState {
    pub checkpoint: Option<Checkpoint>,
    /// Each acknowledged message with the moment it arrived.
    pub acked: Vec<(FetchedMessage, Instant)>,
    pub resets: Vec<Checkpoint>,
    /// So many `acknowledge` calls fail with [`SINK_ERROR`] before the next succeeds.
    pub fail_acks: u32,
    /// The UIDs of the refused acknowledgements.
    pub failed: Vec<u32>,
}

/// The checkpoint and the acknowledged messages in memory; `wait` awaits a condition. It
/// checks what every watcher owes it: the mailbox is [`USER`], a checkpoint comes before any
/// message, and messages come in UID order within their UIDVALIDITY.
pub struct MemorySink {
    state: Mutex<SinkState>,
    version: watch::Sender<u64>,
}

impl MemorySink {
    /// A sink with no checkpoint yet (the mailbox's first start).
    pub fn new() -> Arc<Self> {
        Self::with(SinkState::default())
    }

    /// A sink whose stored checkpoint is `checkpoint`.
    pub fn resuming(checkpoint: Checkpoint) -> Arc<Self> {
        Self::with(SinkState {
            checkpoint: Some(checkpoint),
            ..SinkState::default()
        })
    }

    fn with(state: SinkState) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(state),
            version: watch::channel(0).0,
        })
    }

    pub fn update<T>(&self, change: impl FnOnce(&mut SinkState) -> T) -> T {
        let out = change(&mut self.state.lock().unwrap());
        self.version.send_modify(|version| *version += 1);
        out
    }

    pub fn read<T>(&self, look: impl FnOnce(&SinkState) -> T) -> T {
        look(&self.state.lock().unwrap())
    }

    pub fn acked_uids(&self) -> Vec<u32> {
        self.read(|state| state.acked.iter().map(|(m, _)| m.uid).collect())
    }

    pub async fn wait(&self, what: &str, condition: impl Fn(&SinkState) -> bool) {
        let mut version = self.version.subscribe();
        let waited = tokio::time::timeout(
            WAIT,
            version.wait_for(|_| condition(&self.state.lock().unwrap())),
        )
        .await
        .is_ok_and(|result| result.is_ok());
        assert!(
            waited,
            "timed out waiting for {what}: {:?}",
            self.state.lock().unwrap()
        );
    }

    pub async fn wait_acked(&self, count: usize) {
        self.wait(&format!("{count} acknowledged messages"), |state| {
            state.acked.len() >= count
        })
        .await;
    }
}

impl MessageSink for MemorySink {
    async fn checkpoint(&self, mailbox: &str) -> anyhow::Result<Option<Checkpoint>> {
        assert_eq!(mailbox, USER);
        Ok(self.read(|state| state.checkpoint))
    }

    async fn reset_checkpoint(&self, _mailbox: &str, checkpoint: Checkpoint) -> anyhow::Result<()> {
        self.update(|state| {
            state.checkpoint = Some(checkpoint);
            state.resets.push(checkpoint);
        });
        Ok(())
    }

    async fn acknowledge(&self, _mailbox: &str, message: FetchedMessage) -> anyhow::Result<()> {
        self.update(|state| {
            if state.fail_acks > 0 {
                state.fail_acks -= 1;
                state.failed.push(message.uid);
                anyhow::bail!(SINK_ERROR);
            }
            let checkpoint = state.checkpoint.expect("a checkpoint before any message");
            assert_eq!(checkpoint.uid_validity, message.uid_validity);
            assert!(message.uid > checkpoint.last_uid, "UID order: {message:?}");
            state.checkpoint = Some(Checkpoint {
                uid_validity: message.uid_validity,
                last_uid: message.uid,
            });
            state.acked.push((message, Instant::now()));
            Ok(())
        })
    }
}

// ---- a running watcher with its log --------------------------------------------------------------

/// The watcher's tracing output (TRACE level, no ANSI).
#[derive(Clone, Default)]
pub struct LogCapture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogCapture {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// A watcher task with its status channel, metrics and log.
pub struct Running {
    task: JoinHandle<()>,
    cancel: CancellationToken,
    pub status: watch::Receiver<WatcherStatus>,
    pub metrics: Arc<Metrics>,
    pub log: LogCapture,
    stop_within: Duration,
}

impl Running {
    pub fn start(settings: MailboxSettings, sink: &Arc<MemorySink>) -> Self {
        Self::start_with(settings, sink, |watcher| watcher)
    }

    /// Starts the watcher after `adjust` (e.g. `with_tls_roots`).
    pub fn start_with(
        settings: MailboxSettings,
        sink: &Arc<MemorySink>,
        adjust: impl FnOnce(MailboxWatcher<MemorySink>) -> MailboxWatcher<MemorySink>,
    ) -> Self {
        let metrics = Arc::new(Metrics::new());
        let (watcher, status) =
            MailboxWatcher::new(settings, Arc::clone(sink), Arc::clone(&metrics));
        let log = LogCapture::default();
        let writer = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::TRACE)
            .finish();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(
            adjust(watcher)
                .run(cancel.clone())
                .with_subscriber(subscriber),
        );
        Self {
            task,
            cancel,
            status,
            metrics,
            log,
            stop_within: WAIT,
        }
    }

    /// Makes [`Self::stop`] fail unless the watcher ends within `limit` of the cancellation
    /// (default [`WAIT`]).
    pub fn stopping_within(mut self, limit: Duration) -> Self {
        self.stop_within = limit;
        self
    }

    pub async fn wait_state(&mut self, what: &str, condition: impl Fn(&WatcherStatus) -> bool) {
        let waited = tokio::time::timeout(WAIT, self.status.wait_for(|status| condition(status)))
            .await
            .is_ok_and(|result| result.is_ok());
        assert!(
            waited,
            "timed out waiting for {what}: {:?}\n{}",
            *self.status.borrow(),
            self.log.text()
        );
    }

    pub async fn wait_idle(&mut self) {
        self.wait_state("IDLE", |status| status.state == WatcherState::Idle)
            .await;
    }

    /// Awaits a line in the watcher's log.
    pub async fn wait_log(&self, what: &str, needle: &str) {
        eventually(what, || self.log.text().contains(needle)).await;
    }

    /// Cancels and awaits the task; returns how long it took.
    pub async fn stop(self) -> Duration {
        let started = Instant::now();
        self.cancel.cancel();
        tokio::time::timeout(self.stop_within, self.task)
            .await
            .unwrap_or_else(|_| panic!("the watcher stops within {:?}", self.stop_within))
            .expect("the watcher does not panic");
        started.elapsed()
    }
}

/// Polls `condition` every 20 ms until it holds (for state outside our process: logs, Dovecot).
pub async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
