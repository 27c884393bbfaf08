//! IMAP side of the relay: one [`MailboxWatcher`] task per mailbox.
//!
//! A watcher connects (TLS by default), authenticates through the [`Authenticator`] seam,
//! SELECTs the folder, reconciles the stored [`Checkpoint`] with the server's UIDVALIDITY and
//! UIDNEXT, and catches up: every message above the checkpoint is fetched with `BODY.PEEK[]` and
//! handed to the [`MessageSink`] in UID order, which stores it durably and moves the checkpoint
//! (acknowledge only once the next stage holds the message). Then it IDLEs (RFC 2177) for at most
//! `idle_renew_secs`; any wake-up, a quiet period or the cap ends the round and it catches up
//! again, because IDLE is a hint and the UID search is the truth. Servers without IDLE are polled.
//! On any error the connection is dropped and the watcher reconnects with jittered exponential
//! backoff, forever, until its [`CancellationToken`] fires.
//!
//! ```text
//! connect ─► greeting ─► [STARTTLS] ─► authenticate ─► CAPABILITY ─► SELECT ─► reconcile
//!                                                                                  │
//!          ┌──────────────────────────────────────────────────────────────────────┘
//!          ▼
//!   catch up: UID SEARCH UID last+1:* ─► UID FETCH uid (BODY.PEEK[]) ─► sink.acknowledge
//!          ▲                                                                 │
//!          └──── IDLE round (wake / quiet / renew cap)  or  poll + NOOP ◄────┘
//! ```
//!
//! # Why the watcher reads responses itself
//!
//! async-imap 0.12's stream helpers (`uid_fetch`, `uid_search`, `noop`) stop at the tagged
//! completion *without looking at its status* and end quietly when the server closes the socket,
//! so a `NO` to `UID FETCH` or an EOF in the middle of a search looks like "no messages". A
//! watcher that then acknowledged the next UID would lose mail. All commands except LOGIN and
//! IDLE therefore go through one helper that reads every response, fails on `NO`/`BAD`, reports
//! EOF as EOF and records `BYE` and `EXISTS` as they pass. See `docs/reference/imap-and-peers.md`
//! §B3 for the other async-imap specifics this module designs around (IDLE's `ManualInterrupt`
//! on EOF, keepalives resetting the inactivity timer, EXISTS before the `+` continuation).

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_imap::imap_proto::{AttributeValue, Capability, MailboxDatum, Response};
use backon::{BackoffBuilder, ExponentialBuilder};
use secrecy::SecretString;
use tokio::sync::watch;
use tokio_rustls::rustls::RootCertStore;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, warn};

use crate::config::TlsMode;
use crate::metrics::Metrics;

mod auth;
mod check;
mod command;
mod connect;
mod idle;
mod resolve;
mod sasl;
mod select;
mod wire;

pub use self::auth::{AuthError, Authenticator, PasswordLogin};
pub use self::check::check_login;
pub use self::connect::{ImapClient, ImapSession, Transport};
pub use self::sasl::{MailboxLogin, OAuth2Login, initial_response};

use self::command::{Notes, SessionError, cancellable, command, drain, error_chain, logout};
use self::connect::{TlsConfig, client_config, webpki_client_config};
use self::select::uids_above;
use self::wire::fetched_message;

/// Where a mailbox stands: the UIDVALIDITY of the folder and the highest UID fully handled.
///
/// RFC 3501 §2.3.1.1: the pair (UIDVALIDITY, UID) names one immutable message forever; a new
/// UIDVALIDITY means every stored UID is meaningless.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    /// The folder's UIDVALIDITY when `last_uid` was recorded.
    pub uid_validity: u32,
    /// The highest UID handed to the sink (or skipped on purpose); catch-up starts above it.
    pub last_uid: u32,
}

/// Timeouts and reconnect delays of one watcher. Every network wait has one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImapTimeouts {
    /// TCP connect, TLS handshake (also after STARTTLS) and the server greeting, each.
    pub connect: Duration,
    /// The whole authentication exchange. Generous: Exchange can take about 30 s on
    /// `AUTHENTICATE XOAUTH2` (reference §B6).
    pub login: Duration,
    /// Any other command, counted per server response (SELECT, SEARCH, NOOP, IDLE, ...).
    pub command: Duration,
    /// One `UID FETCH` response, i.e. one whole message literal, plus one second per
    /// [`FETCH_MIN_BYTES_PER_SEC`] bytes of its `RFC822.SIZE`: large PDFs on slow links.
    pub fetch: Duration,
    /// Inactivity timeout inside IDLE: with no data at all from the server for this long, the
    /// round ends and `DONE` proves the connection alive (RFC 2177 keepalive; Delta Chat uses
    /// 5 min). Any server data, including Dovecot's `* OK Still here`, restarts it.
    pub idle_keepalive: Duration,
    /// The reply to `DONE`; a dead link is detected here (reference §B2: about 15 s).
    pub done: Duration,
    /// `DONE` plus `LOGOUT` when the watcher is cancelled; after that the socket is dropped.
    pub logout: Duration,
    /// First reconnect delay after a failure (jitter adds up to 100 %).
    pub reconnect_min_delay: Duration,
    /// Longest reconnect delay (before jitter).
    pub reconnect_max_delay: Duration,
}

impl Default for ImapTimeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(30),
            login: Duration::from_secs(60),
            command: Duration::from_secs(60),
            fetch: Duration::from_secs(300),
            idle_keepalive: Duration::from_secs(300),
            done: Duration::from_secs(15),
            logout: Duration::from_secs(5),
            reconnect_min_delay: Duration::from_secs(2),
            reconnect_max_delay: Duration::from_secs(120),
        }
    }
}

/// Everything one watcher needs, built by the supervisor from the SeaTable row and the config.
///
/// `Debug` never prints the password ([`SecretString`]).
#[derive(Debug, Clone)]
pub struct MailboxSettings {
    /// The mailbox e-mail address: the key for logs, metrics and the checkpoint.
    pub address: String,
    /// IMAP server host name (also the TLS server name).
    pub host: String,
    /// IMAP server port.
    pub port: u16,
    /// Transport security.
    pub tls: TlsMode,
    /// The login name sent to the server (the SASL user for OAuth2).
    pub login: String,
    /// How the mailbox authenticates. Never logged.
    pub credentials: Credentials,
    /// The folder to watch, in UTF-8 (sent as modified UTF-7, RFC 3501 §5.1.3).
    pub folder: String,
    /// Hard cap of one IDLE round, in seconds (RFC 2177 §3: re-issue at least every 29 min).
    /// 0 counts as 1.
    pub idle_renew_secs: u64,
    /// The row's `last_uid`: used only when the sink has no checkpoint yet.
    pub seed_last_uid: Option<u32>,
    /// Timeouts and reconnect delays.
    pub timeouts: ImapTimeouts,
    /// Poll interval in seconds when the server lacks IDLE. 0 counts as 1.
    pub poll_secs: u64,
}

/// How a mailbox authenticates: a password for `LOGIN`, or the OAuth2 account whose tokens
/// it sends with SASL (`XOAUTH2` or `OAUTHBEARER`, `imap.accounts.<name>.oauth2`).
#[derive(Debug, Clone)]
pub enum Credentials {
    /// IMAP `LOGIN` (RFC 3501 §6.2.3). Never printed.
    Password(SecretString),
    /// SASL with a bearer token from this source (shared by the account's mailboxes).
    OAuth2(Arc<crate::oauth2::TokenSource>),
}

impl Credentials {
    /// Whether two credentials log in the same way with the same secrets (a changed password
    /// or OAuth2 setting restarts the watcher).
    pub fn same_as(&self, other: &Self) -> bool {
        use secrecy::ExposeSecret;
        match (self, other) {
            (Self::Password(a), Self::Password(b)) => a.expose_secret() == b.expose_secret(),
            (Self::OAuth2(a), Self::OAuth2(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

/// One message fetched from the folder.
#[derive(Clone, PartialEq, Eq)]
pub struct FetchedMessage {
    /// The folder's UIDVALIDITY.
    pub uid_validity: u32,
    /// The message UID.
    pub uid: u32,
    /// The raw RFC 5322 bytes (`BODY.PEEK[]`, so `\Seen` is not set).
    pub raw: Vec<u8>,
    /// INTERNALDATE (RFC 3501 §2.3.3): when the server received it, if the server said.
    pub internal_date: Option<SystemTime>,
    /// Set when the server would not deliver the message after [`MAX_FETCH_ATTEMPTS`]
    /// attempts: `raw` is empty and the sink records the message as failed, so one bad message
    /// cannot block its mailbox forever.
    pub fetch_error: Option<String>,
}

/// How many times the server may refuse one UID (a tagged `NO`, or no body) before it is handed
/// to the sink as failed. A timeout never counts: it says the link is slow, not that the server
/// will not deliver the message, so the watcher reconnects and tries again, forever.
pub const MAX_FETCH_ATTEMPTS: u32 = 5;

/// The slowest link a `UID FETCH` is given time for, in bytes per second (256 kbit/s): the body
/// fetch of a message of `RFC822.SIZE` n bytes may take `timeouts.fetch + n / this`.
pub const FETCH_MIN_BYTES_PER_SEC: u64 = 32_000;

/// The time one body fetch of `size` bytes (`RFC822.SIZE`, RFC 3501 §6.4.5) may take.
pub fn fetch_timeout(base: Duration, size: Option<u32>) -> Duration {
    base + Duration::from_secs(u64::from(size.unwrap_or(0)) / FETCH_MIN_BYTES_PER_SEC)
}

impl fmt::Debug for FetchedMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FetchedMessage")
            .field("uid_validity", &self.uid_validity)
            .field("uid", &self.uid)
            .field("raw_bytes", &self.raw.len())
            .field("internal_date", &self.internal_date)
            .field("fetch_error", &self.fetch_error)
            .finish()
    }
}

/// Where fetched messages go. The real implementation parses, plans, writes the outbox and the
/// checkpoint in one SQLite transaction (Vector-style acknowledgement).
///
/// # Cancel safety
///
/// The watcher drops these futures when it is cancelled, so each call must be all-or-nothing
/// (one transaction).
pub trait MessageSink: Send + Sync + 'static {
    /// The stored checkpoint of `mailbox`, if any.
    fn checkpoint(
        &self,
        mailbox: &str,
    ) -> impl Future<Output = anyhow::Result<Option<Checkpoint>>> + Send;
    /// Sets the checkpoint without a message: first start, or a new UIDVALIDITY.
    fn reset_checkpoint(
        &self,
        mailbox: &str,
        checkpoint: Checkpoint,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// Stores one message durably and moves the checkpoint to `uid`. Called in UID order.
    ///
    /// # Errors
    ///
    /// On error the watcher does not skip the message: it drops the connection and fetches it
    /// again after reconnecting.
    fn acknowledge(
        &self,
        mailbox: &str,
        message: FetchedMessage,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// What a watcher is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatcherState {
    /// Connecting, authenticating, selecting or catching up after a (re)connect.
    Connecting,
    /// Caught up and waiting in IDLE.
    Idle,
    /// Caught up and waiting for the next poll (the server lacks IDLE).
    Polling,
    /// The last session failed; waiting before reconnecting.
    Backoff {
        /// Why the session failed, with its cause chain. Authentication failures start with
        /// `authentication failed`.
        last_error: String,
    },
}

impl WatcherState {
    /// The `state` label of `report_relay_watcher_state`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Connecting => "connecting",
            Self::Idle => "idle",
            Self::Polling => "polling",
            Self::Backoff { .. } => "backoff",
        }
    }
}

/// Every `state` label a watcher sets (1 for the current one, 0 for the others).
const STATE_NAMES: [&str; 4] = ["connecting", "idle", "polling", "backoff"];

/// What a watcher publishes on its watch channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatcherStatus {
    /// The current state.
    pub state: WatcherState,
    /// When the last catch-up finished (every message above the checkpoint acknowledged).
    pub last_catch_up: Option<SystemTime>,
    /// Since when the watcher has been failing: set when it first enters `Backoff`, kept
    /// through the reconnects that fail again, cleared once it is caught up (`Idle` or
    /// `Polling`). What the admin alert for a failing mailbox is timed by.
    pub failing_since: Option<SystemTime>,
    /// The error of the last failed session while it is failing (kept through the reconnect
    /// attempts in `Connecting`), cleared with `failing_since`.
    pub last_error: Option<String>,
}

/// Watches one mailbox folder and hands every new message to the sink. See the module docs.
pub struct MailboxWatcher<S: MessageSink, A: Authenticator = MailboxLogin> {
    settings: MailboxSettings,
    sink: Arc<S>,
    metrics: Arc<Metrics>,
    auth: A,
    /// Shared with every other watcher trusting the same roots.
    tls: TlsConfig,
    status: watch::Sender<WatcherStatus>,
    /// Failed fetch attempts per UID, across reconnects.
    fetch_failures: std::sync::Mutex<std::collections::HashMap<u32, u32>>,
}

impl<S: MessageSink> MailboxWatcher<S> {
    /// A watcher that logs in as `settings.login` with `settings.credentials` and trusts the
    /// webpki (Mozilla) roots, through the one TLS client config of the process. The receiver
    /// sees every [`WatcherStatus`] change.
    pub fn new(
        settings: MailboxSettings,
        sink: Arc<S>,
        metrics: Arc<Metrics>,
    ) -> (Self, watch::Receiver<WatcherStatus>) {
        let auth = match &settings.credentials {
            Credentials::Password(password) => {
                MailboxLogin::Password(PasswordLogin::new(settings.login.clone(), password.clone()))
            }
            Credentials::OAuth2(tokens) => MailboxLogin::OAuth2(OAuth2Login::new(
                settings.login.clone(),
                settings.host.clone(),
                settings.port,
                tokens.config().mechanism,
                tokens.clone(),
            )),
        };
        let (status, receiver) = watch::channel(WatcherStatus {
            state: WatcherState::Connecting,
            last_catch_up: None,
            failing_since: None,
            last_error: None,
        });
        let watcher = Self {
            settings,
            sink,
            metrics,
            auth,
            tls: webpki_client_config(),
            status,
            fetch_failures: Default::default(),
        };
        (watcher, receiver)
    }
}

impl<S: MessageSink, A: Authenticator> MailboxWatcher<S, A> {
    /// The same watcher with another authentication method (e.g. XOAUTH2).
    pub fn with_authenticator<B: Authenticator>(self, auth: B) -> MailboxWatcher<S, B> {
        MailboxWatcher {
            settings: self.settings,
            sink: self.sink,
            metrics: self.metrics,
            auth,
            tls: self.tls,
            status: self.status,
            fetch_failures: self.fetch_failures,
        }
    }

    /// Counts one failed fetch of `uid`; returns the attempts so far.
    fn count_fetch_failure(&self, uid: u32) -> u32 {
        let mut failures = self
            .fetch_failures
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let attempts = failures.entry(uid).or_insert(0);
        *attempts += 1;
        *attempts
    }

    fn forget_fetch_failures(&self, uid: u32) {
        self.fetch_failures
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&uid);
    }

    /// The same watcher trusting `roots` instead of the webpki roots, through a TLS client config
    /// of its own: for servers with a private CA, and for tests.
    pub fn with_tls_roots(mut self, roots: RootCertStore) -> Self {
        self.tls = client_config(roots);
        self
    }

    /// Runs until `cancel` fires; reconnects forever; returns only when cancelled, after
    /// logging out (when idle or polling) or dropping the connection (mid-command). On return
    /// every `watcher_state` gauge of this mailbox is 0.
    ///
    /// Not an `async fn`: the returned future is the loop itself, without a wrapper holding a
    /// second copy of the watcher (each idle mailbox's task is this future).
    pub fn run(self, cancel: CancellationToken) -> impl Future<Output = ()> + Send {
        let span = tracing::info_span!("imap", mailbox = %self.settings.address);
        self.supervise(cancel).instrument(span)
    }

    async fn supervise(self, cancel: CancellationToken) {
        info!(
            host = %self.settings.host,
            port = self.settings.port,
            tls = %self.settings.tls,
            folder = %self.settings.folder,
            "Mailbox watcher started."
        );
        let mut delays = reconnect_delays(&self.settings.timeouts);
        loop {
            self.set_state(WatcherState::Connecting);
            let mut healthy = false;
            let Err(error) = self.session(&cancel, &mut healthy).await;
            if matches!(error, SessionError::Cancelled) {
                break;
            }
            if healthy {
                delays = reconnect_delays(&self.settings.timeouts);
            }
            let delay = delays
                .next()
                .unwrap_or(self.settings.timeouts.reconnect_max_delay);
            let last_error = error_chain(&error);
            self.log_failure(&error, &last_error, delay);
            self.set_state(WatcherState::Backoff { last_error });
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                () = tokio::time::sleep(delay) => {}
            }
        }
        for name in STATE_NAMES {
            self.set_gauge(name, 0);
        }
        info!("Mailbox watcher stopped.");
    }

    fn log_failure(&self, error: &SessionError, chain: &str, delay: Duration) {
        let retry_in_secs = delay.as_secs_f64();
        match error {
            SessionError::Auth {
                mechanism,
                source: AuthError::Credentials(_),
            } => error!(
                reason = "credentials",
                mechanism,
                login = %self.settings.login,
                error = %chain,
                retry_in_secs,
                "No credentials to log in with (for OAuth2: the token endpoint); retrying later."
            ),
            SessionError::Auth { mechanism, .. } => error!(
                reason = "auth",
                mechanism,
                login = %self.settings.login,
                error = %chain,
                retry_in_secs,
                "Authentication failed; check the mailbox login and its password or OAuth2 \
                 account. Retrying later."
            ),
            SessionError::Bye { step, text } => warn!(
                reason = "bye",
                step,
                server_text = %text,
                retry_in_secs,
                "The server ended the session with BYE; reconnecting."
            ),
            SessionError::Eof { step } => warn!(
                reason = "eof",
                step, retry_in_secs, "The server closed the connection without BYE; reconnecting."
            ),
            SessionError::Timeout { step, limit } => warn!(
                reason = "timeout",
                step,
                limit_secs = limit.as_secs_f64(),
                retry_in_secs,
                "The server did not answer in time; reconnecting."
            ),
            SessionError::Sink { .. } => error!(
                reason = "sink",
                error = %chain,
                retry_in_secs,
                "Could not store a message or checkpoint; it will be fetched again after reconnecting."
            ),
            SessionError::Refused { .. } | SessionError::Failed { .. } => warn!(
                reason = "error",
                error = %chain,
                retry_in_secs,
                "The IMAP session failed; reconnecting."
            ),
            SessionError::Cancelled => {}
        }
    }

    /// One connection from connect to failure (or cancellation). Returns only errors.
    ///
    /// This future is what every watcher task holds while it idles, so it is kept small: the
    /// steps that are large and short-lived (connecting, SELECT, catching up with the sink's
    /// transaction, polling) run boxed, allocated only while they run.
    async fn session(
        &self,
        cancel: &CancellationToken,
        healthy: &mut bool,
    ) -> Result<Infallible, SessionError> {
        let timeouts = self.settings.timeouts;
        let mut session = Box::pin(self.open(cancel)).await?;
        let mut notes = Notes::default();
        drain(&mut notes, &mut || {
            session.unsolicited_responses.try_recv().ok()
        });

        let mut idle_supported = false;
        Box::pin(command(
            &mut session,
            cancel,
            timeouts.command,
            "CAPABILITY",
            "CAPABILITY",
            &mut notes,
            |response| {
                if let Response::Capabilities(capabilities) = response {
                    idle_supported |= capabilities.iter().any(
                        |capability| matches!(capability, Capability::Atom(atom) if atom.eq_ignore_ascii_case("IDLE")),
                    );
                }
            },
        ))
        .await?;
        if !idle_supported {
            warn!(
                poll_secs = self.settings.poll_secs,
                "The server does not support IDLE; polling instead."
            );
        }

        let mut last_uid = Box::pin(self.select(&mut session, cancel, &mut notes)).await?;
        let uid_validity = notes.uid_validity.unwrap_or_default();
        loop {
            last_uid =
                Box::pin(self.catch_up(&mut session, cancel, &mut notes, uid_validity, last_uid))
                    .await?;
            *healthy = true;
            self.status
                .send_modify(|status| status.last_catch_up = Some(SystemTime::now()));
            if notes.new_mail {
                debug!("New mail arrived during the catch-up; catching up again.");
                continue;
            }
            if idle_supported {
                session = self.idle_round(session, cancel, &mut notes).await?;
            } else {
                Box::pin(self.poll_round(&mut session, cancel, &mut notes)).await?;
            }
        }
    }

    /// For a server without IDLE: wait `poll_secs`, then `NOOP` so the server reports changes.
    async fn poll_round(
        &self,
        session: &mut ImapSession,
        cancel: &CancellationToken,
        notes: &mut Notes,
    ) -> Result<(), SessionError> {
        let timeouts = self.settings.timeouts;
        self.set_state(WatcherState::Polling);
        // At least 1 s: 0 would be a busy loop.
        let poll = Duration::from_secs(self.settings.poll_secs.max(1));
        tokio::select! {
            biased;
            () = cancel.cancelled() => {
                logout(session, timeouts.logout, notes).await;
                return Err(SessionError::Cancelled);
            }
            () = tokio::time::sleep(poll) => {}
        }
        command(
            session,
            cancel,
            timeouts.command,
            "NOOP",
            "NOOP",
            notes,
            |_| {},
        )
        .await
    }

    /// Fetches and acknowledges every message above `last_uid`, in UID order; returns the new
    /// `last_uid`. A message the sink refuses is not skipped: the error drops the connection.
    async fn catch_up(
        &self,
        session: &mut ImapSession,
        cancel: &CancellationToken,
        notes: &mut Notes,
        uid_validity: u32,
        mut last_uid: u32,
    ) -> Result<u32, SessionError> {
        let timeouts = self.settings.timeouts;
        drain(notes, &mut || session.unsolicited_responses.try_recv().ok());
        notes.check_bye("catch-up")?;
        // Cleared before the search: an EXISTS seen from here on means "search again".
        notes.new_mail = false;
        if notes.exists == Some(0) {
            return Ok(last_uid);
        }
        let mut found = Vec::new();
        command(
            session,
            cancel,
            timeouts.command,
            "UID SEARCH",
            &format!("UID SEARCH UID {}:*", last_uid.saturating_add(1)),
            notes,
            |response| {
                if let Response::MailboxData(MailboxDatum::Search(uids)) = response {
                    found.extend_from_slice(uids);
                }
            },
        )
        .await?;
        let uids = uids_above(found, last_uid);
        if !uids.is_empty() {
            debug!(count = uids.len(), after_uid = last_uid, "Catching up.");
        }
        for uid in uids {
            let fetched = match self.fetch(session, cancel, notes, uid_validity, uid).await {
                Ok(fetched) => {
                    self.forget_fetch_failures(uid);
                    fetched
                }
                Err(error @ SessionError::Refused { .. }) => {
                    let attempts = self.count_fetch_failure(uid);
                    if attempts < MAX_FETCH_ATTEMPTS {
                        return Err(error);
                    }
                    error!(uid, attempts, error = %error, "The server will not deliver this message; recording it as failed and moving on.");
                    self.forget_fetch_failures(uid);
                    Some(FetchedMessage {
                        uid_validity,
                        uid,
                        raw: Vec::new(),
                        internal_date: None,
                        fetch_error: Some(format!("{error} ({attempts} attempts)")),
                    })
                }
                Err(error) => return Err(error),
            };
            let Some(message) = fetched else {
                continue;
            };
            let bytes = message.raw.len();
            self.metrics
                .reports_received
                .get_or_create(&vec![
                    ("mailbox", self.settings.address.clone()),
                    ("source", "imap".to_owned()),
                ])
                .inc();
            cancellable(
                cancel,
                self.sink.acknowledge(&self.settings.address, message),
            )
            .await?
            .map_err(|source| SessionError::Sink {
                step: "acknowledge",
                source,
            })?;
            info!(uid, bytes, "Message received and acknowledged.");
            last_uid = uid;
        }
        Ok(last_uid)
    }

    /// `UID FETCH uid (RFC822.SIZE)`, then `UID FETCH uid (UID INTERNALDATE BODY.PEEK[])` with
    /// a timeout scaled to that size ([`fetch_timeout`]). `None` when the message is gone
    /// (expunged since the search); any failure, including a tagged `NO`, is an error so the
    /// message is retried rather than skipped.
    async fn fetch(
        &self,
        session: &mut ImapSession,
        cancel: &CancellationToken,
        notes: &mut Notes,
        uid_validity: u32,
        uid: u32,
    ) -> Result<Option<FetchedMessage>, SessionError> {
        let mut size = None;
        command(
            session,
            cancel,
            self.settings.timeouts.command,
            "UID FETCH",
            &format!("UID FETCH {uid} (RFC822.SIZE)"),
            notes,
            |response| {
                if let Response::Fetch(_, attributes) = response {
                    for attribute in attributes {
                        if let AttributeValue::Rfc822Size(bytes) = attribute {
                            size = Some(*bytes);
                        }
                    }
                }
            },
        )
        .await?;
        let mut message = None;
        command(
            session,
            cancel,
            fetch_timeout(self.settings.timeouts.fetch, size),
            "UID FETCH",
            &format!("UID FETCH {uid} (UID INTERNALDATE BODY.PEEK[])"),
            notes,
            |response| {
                if let Response::Fetch(_, attributes) = response
                    && let Some(fetched) = fetched_message(attributes, uid_validity)
                    && fetched.uid == uid
                {
                    message = Some(fetched);
                }
            },
        )
        .await?;
        if message.is_none() {
            // No FETCH with this UID and a body: skip it only if it is really gone.
            let mut still_there = false;
            command(
                session,
                cancel,
                self.settings.timeouts.command,
                "UID SEARCH",
                &format!("UID SEARCH UID {uid}"),
                notes,
                |response| {
                    if let Response::MailboxData(MailboxDatum::Search(uids)) = response {
                        still_there |= uids.contains(&uid);
                    }
                },
            )
            .await?;
            if still_there {
                return Err(SessionError::Refused {
                    step: "UID FETCH",
                    message: format!("the server returned no body for UID {uid}"),
                });
            }
            warn!(
                uid,
                "The message disappeared before it could be fetched (expunged); skipping it."
            );
        }
        Ok(message)
    }

    fn set_state(&self, state: WatcherState) {
        let name = state.name();
        let changed = self.status.send_if_modified(|status| {
            if status.state == state {
                false
            } else {
                match &state {
                    WatcherState::Backoff { last_error } => {
                        status.failing_since.get_or_insert_with(SystemTime::now);
                        status.last_error = Some(last_error.clone());
                    }
                    WatcherState::Idle | WatcherState::Polling => {
                        status.failing_since = None;
                        status.last_error = None;
                    }
                    WatcherState::Connecting => {}
                }
                status.state = state;
                true
            }
        });
        if changed {
            debug!(state = name, "Watcher state changed.");
        }
        for other in STATE_NAMES {
            self.set_gauge(other, i64::from(other == name));
        }
    }

    fn set_gauge(&self, state: &'static str, value: i64) {
        self.metrics
            .watcher_state
            .get_or_create(&vec![
                ("mailbox", self.settings.address.clone()),
                ("state", state.to_owned()),
            ])
            .set(value);
    }
}

/// Jittered exponential reconnect delays without an end (backon used as an iterator): each is
/// twice the previous one, capped at `reconnect_max_delay`, plus up to 100 % jitter.
fn reconnect_delays(timeouts: &ImapTimeouts) -> impl Iterator<Item = Duration> + use<> {
    ExponentialBuilder::default()
        .with_min_delay(timeouts.reconnect_min_delay)
        .with_max_delay(timeouts.reconnect_max_delay)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

#[cfg(test)]
mod tests;
