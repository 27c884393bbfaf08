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

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use async_imap::extensions::idle::IdleResponse;
use async_imap::imap_proto::{
    AttributeValue, Capability, MailboxDatum, Response, ResponseCode, Status, StatusAttribute,
};
use async_imap::types::UnsolicitedResponse;
use backon::{BackoffBuilder, ExponentialBuilder};
use secrecy::{ExposeSecret, SecretString};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, warn};

use crate::config::TlsMode;
use crate::metrics::Metrics;

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
    /// One `UID FETCH` response, i.e. one whole message literal: large PDFs on slow links.
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
    /// The login name sent to the server.
    pub login: String,
    /// The password. Never logged.
    pub password: SecretString,
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

/// How many times one UID may fail to fetch (a `NO`, a timeout, no body) before it is handed
/// to the sink as failed.
pub const MAX_FETCH_ATTEMPTS: u32 = 5;

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
}

/// The byte stream under one IMAP connection: plain TCP, or TLS over TCP.
pub enum Transport {
    /// `tls: none`, or before STARTTLS.
    Plain(TcpStream),
    /// Implicit TLS, or after STARTTLS.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl fmt::Debug for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Plain(_) => "Transport::Plain",
            Self::Tls(_) => "Transport::Tls",
        })
    }
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            Self::Tls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            Self::Tls(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(stream) => Pin::new(stream).poll_flush(cx),
            Self::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            Self::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }
}

/// An unauthenticated connection, after the greeting (and STARTTLS).
pub type ImapClient = async_imap::Client<Transport>;
/// An authenticated connection.
pub type ImapSession = async_imap::Session<Transport>;

/// Why authentication failed. The watcher logs [`AuthError::Rejected`] and
/// [`AuthError::Refused`] as authentication failures and keeps retrying with backoff (the
/// password may be fixed in SeaTable meanwhile); [`AuthError::Connection`] is a network failure.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The server answered `NO`: wrong login or password, or the account may not log in
    /// (RFC 3501 §6.2.3; `[AUTHENTICATIONFAILED]`, RFC 5530 §3).
    #[error("the server rejected the credentials: {0}")]
    Rejected(String),
    /// The server answered `BAD`: it does not accept this command or mechanism here (e.g.
    /// `LOGINDISABLED` without TLS, RFC 3501 §6.2.3).
    #[error("the server refused the {mechanism} command: {message}")]
    Refused {
        /// `LOGIN` or the SASL mechanism.
        mechanism: &'static str,
        /// The server's text.
        message: String,
    },
    /// The credentials could not be obtained or sent (a token provider failed, or the password
    /// holds a character LOGIN cannot carry). The message never contains the secret.
    #[error("the credentials could not be used")]
    Credentials(#[source] anyhow::Error),
    /// The connection failed during authentication.
    #[error("the connection failed during authentication")]
    Connection(#[source] async_imap::error::Error),
}

/// The auth seam: how a connection becomes a session. LOGIN now ([`PasswordLogin`]), XOAUTH2
/// later (fetch a fresh token per call, then `client.authenticate("XOAUTH2", ..)`) without
/// touching the watcher loop. Called once per connection attempt.
pub trait Authenticator: Send + Sync + 'static {
    /// The command or SASL mechanism, for logs (`LOGIN`, `XOAUTH2`).
    fn mechanism(&self) -> &'static str;

    /// Authenticates `client`. The watcher bounds this with [`ImapTimeouts::login`].
    ///
    /// # Errors
    ///
    /// [`AuthError`]; see its variants.
    fn authenticate(
        &self,
        client: ImapClient,
    ) -> impl Future<Output = Result<ImapSession, AuthError>> + Send;
}

/// IMAP `LOGIN` with a password (RFC 3501 §6.2.3).
#[derive(Debug, Clone)]
pub struct PasswordLogin {
    login: String,
    password: SecretString,
}

impl PasswordLogin {
    /// A LOGIN authenticator for `login` / `password`.
    pub fn new(login: String, password: SecretString) -> Self {
        Self { login, password }
    }
}

impl Authenticator for PasswordLogin {
    fn mechanism(&self) -> &'static str {
        "LOGIN"
    }

    async fn authenticate(&self, client: ImapClient) -> Result<ImapSession, AuthError> {
        client
            .login(&self.login, self.password.expose_secret())
            .await
            .map_err(|(error, _client)| match error {
                async_imap::error::Error::No(message) => AuthError::Rejected(message),
                async_imap::error::Error::Bad(message) => AuthError::Refused {
                    mechanism: "LOGIN",
                    message,
                },
                // Names the offending character class only, never the password.
                async_imap::error::Error::Validate(invalid) => AuthError::Credentials(
                    anyhow::anyhow!("the login or password cannot be sent with LOGIN: {invalid}"),
                ),
                other => AuthError::Connection(other),
            })
    }
}

/// Watches one mailbox folder and hands every new message to the sink. See the module docs.
pub struct MailboxWatcher<S: MessageSink, A: Authenticator = PasswordLogin> {
    settings: MailboxSettings,
    sink: Arc<S>,
    metrics: Arc<Metrics>,
    auth: A,
    roots: Arc<RootCertStore>,
    status: watch::Sender<WatcherStatus>,
    /// Failed fetch attempts per UID, across reconnects.
    fetch_failures: std::sync::Mutex<std::collections::HashMap<u32, u32>>,
}

impl<S: MessageSink> MailboxWatcher<S> {
    /// A watcher that logs in with `settings.login` / `settings.password` and trusts the
    /// webpki (Mozilla) roots. The receiver sees every [`WatcherStatus`] change.
    pub fn new(
        settings: MailboxSettings,
        sink: Arc<S>,
        metrics: Arc<Metrics>,
    ) -> (Self, watch::Receiver<WatcherStatus>) {
        let auth = PasswordLogin::new(settings.login.clone(), settings.password.clone());
        let (status, receiver) = watch::channel(WatcherStatus {
            state: WatcherState::Connecting,
            last_catch_up: None,
        });
        let roots = RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        let watcher = Self {
            settings,
            sink,
            metrics,
            auth,
            roots: Arc::new(roots),
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
            roots: self.roots,
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

    /// The same watcher trusting `roots` instead of the webpki roots: for servers with a private
    /// CA, and for tests.
    pub fn with_tls_roots(mut self, roots: RootCertStore) -> Self {
        self.roots = Arc::new(roots);
        self
    }

    /// Runs until `cancel` fires; reconnects forever; returns only when cancelled, after
    /// logging out (when idle or polling) or dropping the connection (mid-command). On return
    /// every `watcher_state` gauge of this mailbox is 0.
    pub async fn run(self, cancel: CancellationToken) {
        let span = tracing::info_span!("imap", mailbox = %self.settings.address);
        self.supervise(cancel).instrument(span).await;
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
            SessionError::Auth { mechanism, .. } => error!(
                reason = "auth",
                mechanism,
                login = %self.settings.login,
                error = %chain,
                retry_in_secs,
                "Authentication failed; check the mailbox login and password. Retrying later."
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
    async fn session(
        &self,
        cancel: &CancellationToken,
        healthy: &mut bool,
    ) -> Result<Infallible, SessionError> {
        let timeouts = self.settings.timeouts;
        let mut session = self.open(cancel).await?;
        let mut notes = Notes::default();
        drain(&mut notes, &mut || {
            session.unsolicited_responses.try_recv().ok()
        });

        let mut idle_supported = false;
        command(
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
        )
        .await?;
        if !idle_supported {
            warn!(
                poll_secs = self.settings.poll_secs,
                "The server does not support IDLE; polling instead."
            );
        }

        let mut last_uid = self.select(&mut session, cancel, &mut notes).await?;
        let uid_validity = notes.uid_validity.unwrap_or_default();
        loop {
            last_uid = self
                .catch_up(&mut session, cancel, &mut notes, uid_validity, last_uid)
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
                self.set_state(WatcherState::Polling);
                // At least 1 s: 0 would be a busy loop.
                let poll = Duration::from_secs(self.settings.poll_secs.max(1));
                tokio::select! {
                    biased;
                    () = cancel.cancelled() => {
                        logout(&mut session, timeouts.logout, &mut notes).await;
                        return Err(SessionError::Cancelled);
                    }
                    () = tokio::time::sleep(poll) => {}
                }
                command(
                    &mut session,
                    cancel,
                    timeouts.command,
                    "NOOP",
                    "NOOP",
                    &mut notes,
                    |_| {},
                )
                .await?;
            }
        }
    }

    /// TCP, TLS or STARTTLS, the greeting, then authentication.
    async fn open(&self, cancel: &CancellationToken) -> Result<ImapSession, SessionError> {
        let settings = &self.settings;
        let timeouts = settings.timeouts;
        let tcp = bounded(
            cancel,
            timeouts.connect,
            "connect",
            TcpStream::connect((settings.host.as_str(), settings.port)),
        )
        .await?
        .map_err(|error| SessionError::failed("connect", error))?;
        // Commands are small and latency matters more than packet count.
        let _ = tcp.set_nodelay(true);

        let transport = match settings.tls {
            TlsMode::Implicit => self.tls_handshake(tcp, cancel).await?,
            TlsMode::StartTls | TlsMode::None => Transport::Plain(tcp),
        };
        let mut client = async_imap::Client::new(transport);
        let greeting = bounded(cancel, timeouts.connect, "greeting", client.read_response())
            .await?
            .map_err(|error| io_error("greeting", error))?;
        match greeting.as_ref().map(|greeting| greeting.parsed()) {
            None => return Err(SessionError::Eof { step: "greeting" }),
            Some(Response::Data {
                status: Status::Bye,
                outcome,
            }) => {
                return Err(SessionError::Bye {
                    step: "greeting",
                    text: outcome
                        .information
                        .as_deref()
                        .unwrap_or_default()
                        .to_owned(),
                });
            }
            Some(_) => {}
        }

        if settings.tls == TlsMode::StartTls {
            // RFC 3501 §6.2.1; no second greeting after the handshake.
            bounded(
                cancel,
                timeouts.command,
                "STARTTLS",
                client.run_command_and_check_ok("STARTTLS", None),
            )
            .await?
            .map_err(|error| imap_error("STARTTLS", error, None))?;
            let Transport::Plain(tcp) = client.into_inner() else {
                return Err(SessionError::failed(
                    "STARTTLS",
                    anyhow::anyhow!("the connection is already encrypted"),
                ));
            };
            client = async_imap::Client::new(self.tls_handshake(tcp, cancel).await?);
        }

        let mechanism = self.auth.mechanism();
        bounded(
            cancel,
            timeouts.login,
            "authenticate",
            self.auth.authenticate(client),
        )
        .await?
        .map_err(|error| match error {
            AuthError::Connection(error) => imap_error("authenticate", error, None),
            source => SessionError::Auth { mechanism, source },
        })
    }

    async fn tls_handshake(
        &self,
        tcp: TcpStream,
        cancel: &CancellationToken,
    ) -> Result<Transport, SessionError> {
        // One explicit provider: no dependence on a process-wide default.
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|error| SessionError::failed("TLS handshake", error))?
            .with_root_certificates(Arc::clone(&self.roots))
            .with_no_client_auth();
        let name = ServerName::try_from(self.settings.host.clone())
            .map_err(|error| SessionError::failed("TLS handshake", error))?;
        let stream = bounded(
            cancel,
            self.settings.timeouts.connect,
            "TLS handshake",
            TlsConnector::from(Arc::new(config)).connect(name, tcp),
        )
        .await?
        .map_err(|error| SessionError::failed("TLS handshake", error))?;
        Ok(Transport::Tls(Box::new(stream)))
    }

    /// SELECTs the folder and reconciles the checkpoint; returns the UID to catch up from.
    async fn select(
        &self,
        session: &mut ImapSession,
        cancel: &CancellationToken,
        notes: &mut Notes,
    ) -> Result<u32, SessionError> {
        let timeouts = self.settings.timeouts;
        let folder = quote(&encode_mailbox_name(&self.settings.folder))
            .map_err(|error| SessionError::failed("SELECT", error))?;
        let mut uid_next = None;
        command(
            session,
            cancel,
            timeouts.command,
            "SELECT",
            &format!("SELECT {folder}"),
            notes,
            |response| {
                if let Response::Data {
                    status: Status::Ok,
                    outcome,
                } = response
                    && let Some(ResponseCode::UidNext(next)) = outcome.code
                {
                    uid_next = Some(next);
                }
            },
        )
        .await?;
        // SELECT starts a new view: its EXISTS is the baseline, not news.
        notes.new_mail = false;
        let Some(uid_validity) = notes.uid_validity else {
            return Err(SessionError::failed(
                "SELECT",
                anyhow::anyhow!("the server did not report UIDVALIDITY (RFC 3501 §6.3.1)"),
            ));
        };

        // UIDNEXT is optional in SELECT (RFC 3501 §6.3.1); some servers omit it (reference §B3).
        let mut server_last = uid_next.map(|next| ServerLast {
            last_uid: next.saturating_sub(1),
            exact: true,
        });
        if server_last.is_none() {
            let mut status_next = None;
            command(
                session,
                cancel,
                timeouts.command,
                "STATUS",
                &format!("STATUS {folder} (UIDNEXT)"),
                notes,
                |response| {
                    if let Response::MailboxData(MailboxDatum::Status { status, .. }) = response {
                        for attribute in status {
                            if let StatusAttribute::UidNext(next) = attribute {
                                status_next = Some(*next);
                            }
                        }
                    }
                },
            )
            .await?;
            server_last = status_next.map(|next| ServerLast {
                last_uid: next.saturating_sub(1),
                exact: true,
            });
        }
        let server_last = match server_last {
            Some(server_last) => server_last,
            None => {
                let highest = self.highest_uid(session, cancel, notes).await?;
                debug!(
                    highest_uid = highest,
                    "The server reported no UIDNEXT; using the highest UID."
                );
                ServerLast {
                    last_uid: highest,
                    exact: false,
                }
            }
        };

        let address = self.settings.address.as_str();
        let stored = cancellable(cancel, self.sink.checkpoint(address))
            .await?
            .map_err(|source| SessionError::Sink {
                step: "checkpoint",
                source,
            })?;
        let plan = plan_checkpoint(
            stored,
            uid_validity,
            server_last,
            self.settings.seed_last_uid,
        );
        let checkpoint = match plan {
            Plan::Resume(last_uid) => {
                debug!(
                    uid_validity,
                    last_uid, "Resuming from the stored checkpoint."
                );
                return Ok(last_uid);
            }
            Plan::Reset { checkpoint, reason } => {
                match reason {
                    ResetReason::FirstStart => info!(
                        uid_validity,
                        last_uid = checkpoint.last_uid,
                        "First start: existing mail is skipped; relaying mail from now on."
                    ),
                    ResetReason::Seeded => info!(
                        uid_validity,
                        last_uid = checkpoint.last_uid,
                        "First start: continuing from the row's last_uid."
                    ),
                    ResetReason::SeedAhead { seed } => warn!(
                        seed,
                        server_last_uid = checkpoint.last_uid,
                        "The row's last_uid is above the folder's highest UID; starting from the folder's."
                    ),
                    ResetReason::UidValidityChanged { stored } => error!(
                        stored_uid_validity = stored.uid_validity,
                        stored_last_uid = stored.last_uid,
                        uid_validity,
                        last_uid = checkpoint.last_uid,
                        "UIDVALIDITY changed: the folder was recreated. Mail already in it is not \
                         relayed (no history replay); relaying new mail from now on."
                    ),
                    ResetReason::Ahead { stored } => warn!(
                        stored_last_uid = stored.last_uid,
                        server_last_uid = checkpoint.last_uid,
                        "The checkpoint is above the server's UIDNEXT with the same UIDVALIDITY; \
                         moving it back so new mail is not skipped."
                    ),
                }
                checkpoint
            }
        };
        cancellable(cancel, self.sink.reset_checkpoint(address, checkpoint))
            .await?
            .map_err(|source| SessionError::Sink {
                step: "reset_checkpoint",
                source,
            })?;
        Ok(checkpoint.last_uid)
    }

    /// The highest UID in the folder (0 when empty): the UIDNEXT fallback.
    async fn highest_uid(
        &self,
        session: &mut ImapSession,
        cancel: &CancellationToken,
        notes: &mut Notes,
    ) -> Result<u32, SessionError> {
        // Some servers reject `UID SEARCH UID *` on an empty folder (reference §B6, Mail.ru).
        if notes.exists == Some(0) {
            return Ok(0);
        }
        let mut highest = 0;
        command(
            session,
            cancel,
            self.settings.timeouts.command,
            "UID SEARCH",
            "UID SEARCH UID *",
            notes,
            |response| {
                if let Response::MailboxData(MailboxDatum::Search(uids)) = response {
                    highest = uids.iter().copied().fold(highest, u32::max);
                }
            },
        )
        .await?;
        Ok(highest)
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
                Err(error @ (SessionError::Refused { .. } | SessionError::Timeout { .. })) => {
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
                .get_or_create(&vec![("mailbox", self.settings.address.clone())])
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

    /// `UID FETCH uid (UID INTERNALDATE BODY.PEEK[])`. `None` when the message is gone
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
        let mut message = None;
        command(
            session,
            cancel,
            self.settings.timeouts.fetch,
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

    /// One IDLE round (RFC 2177): ends on any server data, after `idle_keepalive` of silence,
    /// or at the `idle_renew_secs` cap, and gives the session back after `DONE`.
    async fn idle_round(
        &self,
        session: ImapSession,
        cancel: &CancellationToken,
        notes: &mut Notes,
    ) -> Result<ImapSession, SessionError> {
        let timeouts = self.settings.timeouts;
        let unsolicited = session.unsolicited_responses.clone();
        let mut next_unsolicited = || unsolicited.try_recv().ok();
        drain(notes, &mut next_unsolicited);
        notes.check_bye("IDLE")?;
        if notes.new_mail {
            return Ok(session);
        }

        let mut handle = session.idle();
        bounded(cancel, timeouts.command, "IDLE", handle.init())
            .await?
            .map_err(|error| idle_init_error(error, take_bye(&mut next_unsolicited)))?;
        self.set_state(WatcherState::Idle);

        // `init` puts anything that arrives before the `+` continuation into the unsolicited
        // channel, not into `wait` (reference §B3): an EXISTS there must end the round now.
        drain(notes, &mut next_unsolicited);
        notes.check_bye("IDLE")?;
        if notes.new_mail {
            debug!("New mail was announced before IDLE started; catching up.");
        } else {
            let renew = Duration::from_secs(self.settings.idle_renew_secs.max(1));
            let outcome = {
                let (wait, _stop) = handle.wait_with_timeout(timeouts.idle_keepalive);
                tokio::select! {
                    biased;
                    () = cancel.cancelled() => None,
                    outcome = tokio::time::timeout(renew, wait) => Some(outcome),
                }
            };
            let Some(outcome) = outcome else {
                // Cancelled while idling: end IDLE and log out, within the logout budget.
                let _ = tokio::time::timeout(timeouts.logout, async {
                    if let Ok(mut session) = handle.done().await {
                        logout(&mut session, timeouts.logout, notes).await;
                    }
                })
                .await;
                return Err(SessionError::Cancelled);
            };
            match outcome {
                Err(_elapsed) => {
                    debug!(renew_secs = self.settings.idle_renew_secs, "Renewing IDLE.")
                }
                Ok(Ok(IdleResponse::Timeout)) => debug!(
                    quiet_secs = timeouts.idle_keepalive.as_secs_f64(),
                    "No data from the server while idling; checking the connection."
                ),
                Ok(Ok(IdleResponse::NewData(data))) => {
                    notes.absorb(data.parsed());
                    notes.check_bye("IDLE")?;
                    debug!("Woken up by the server.");
                }
                // async-imap reports EOF during IDLE as ManualInterrupt; we never interrupt.
                Ok(Ok(IdleResponse::ManualInterrupt)) => {
                    return Err(match take_bye(&mut next_unsolicited) {
                        Some(text) => SessionError::Bye { step: "IDLE", text },
                        None => SessionError::Eof { step: "IDLE" },
                    });
                }
                Ok(Err(error)) => {
                    return Err(imap_error("IDLE", error, take_bye(&mut next_unsolicited)));
                }
            }
        }

        let session = bounded(cancel, timeouts.done, "DONE", handle.done())
            .await?
            .map_err(|error| imap_error("DONE", error, take_bye(&mut next_unsolicited)))?;
        drain(notes, &mut next_unsolicited);
        notes.check_bye("DONE")?;
        // IDLE is a hint: the caller searches again whatever woke us.
        Ok(session)
    }

    fn set_state(&self, state: WatcherState) {
        let name = state.name();
        let changed = self.status.send_if_modified(|status| {
            if status.state == state {
                false
            } else {
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

/// Why a session ended. Internal: the loop only logs it and backs off.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("cancelled")]
    Cancelled,
    #[error("{step} timed out after {} s", .limit.as_secs_f64())]
    Timeout { step: &'static str, limit: Duration },
    #[error("authentication failed ({mechanism})")]
    Auth {
        mechanism: &'static str,
        #[source]
        source: AuthError,
    },
    #[error("the server ended the session with BYE during {step}: {text}")]
    Bye { step: &'static str, text: String },
    #[error("the server closed the connection (EOF) during {step}")]
    Eof { step: &'static str },
    #[error("the server refused {step}: {message}")]
    Refused { step: &'static str, message: String },
    #[error("{step} failed")]
    Failed {
        step: &'static str,
        #[source]
        source: anyhow::Error,
    },
    #[error("the message sink failed ({step})")]
    Sink {
        step: &'static str,
        #[source]
        source: anyhow::Error,
    },
}

impl SessionError {
    fn failed(step: &'static str, source: impl Into<anyhow::Error>) -> Self {
        Self::Failed {
            step,
            source: source.into(),
        }
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

/// `error: cause: cause`, like anyhow's `{:#}`.
fn error_chain(error: &(dyn StdError + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Maps an async-imap error to a session error, telling BYE and EOF apart.
fn imap_error(
    step: &'static str,
    error: async_imap::error::Error,
    bye: Option<String>,
) -> SessionError {
    use async_imap::error::Error;
    if let Some(text) = bye {
        return SessionError::Bye { step, text };
    }
    match error {
        Error::ConnectionLost => SessionError::Eof { step },
        Error::Io(error) => io_error(step, error),
        Error::No(message) | Error::Bad(message) => SessionError::Refused { step, message },
        other => SessionError::failed(step, other),
    }
}

/// `Handle::init` reports EOF before the `+` continuation as an empty `ConnectionRefused`.
fn idle_init_error(error: async_imap::error::Error, bye: Option<String>) -> SessionError {
    match error {
        async_imap::error::Error::Io(io_error)
            if bye.is_none()
                && io_error.kind() == io::ErrorKind::ConnectionRefused
                && io_error.to_string().is_empty() =>
        {
            SessionError::Eof { step: "IDLE" }
        }
        other => imap_error("IDLE", other, bye),
    }
}

fn io_error(step: &'static str, error: io::Error) -> SessionError {
    match error.kind() {
        io::ErrorKind::UnexpectedEof => SessionError::Eof { step },
        // async-imap turns an untagged BYE inside SELECT/EXAMINE into this.
        io::ErrorKind::Other if error.to_string().starts_with("status: Bye") => SessionError::Bye {
            step,
            text: error.to_string(),
        },
        _ => SessionError::failed(step, error),
    }
}

/// Races `future` against `cancel` and `limit`.
async fn bounded<F: Future>(
    cancel: &CancellationToken,
    limit: Duration,
    step: &'static str,
    future: F,
) -> Result<F::Output, SessionError> {
    tokio::select! {
        biased;
        () = cancel.cancelled() => Err(SessionError::Cancelled),
        output = tokio::time::timeout(limit, future) => {
            output.map_err(|_elapsed| SessionError::Timeout { step, limit })
        }
    }
}

/// Races a local (non-network) future against `cancel`.
async fn cancellable<F: Future>(
    cancel: &CancellationToken,
    future: F,
) -> Result<F::Output, SessionError> {
    tokio::select! {
        biased;
        () = cancel.cancelled() => Err(SessionError::Cancelled),
        output = future => Ok(output),
    }
}

/// What the untagged responses said while commands ran.
#[derive(Debug, Default)]
struct Notes {
    /// The message count (EXISTS, decremented by EXPUNGE); `None` until the server says.
    exists: Option<u32>,
    /// UIDVALIDITY from the last SELECT.
    uid_validity: Option<u32>,
    /// An EXISTS raised the count (or came while the count was unknown): search again.
    new_mail: bool,
    /// The text of an untagged BYE (RFC 3501 §7.1.5): the server is closing the connection.
    bye: Option<String>,
}

impl Notes {
    fn absorb(&mut self, response: &Response<'_>) {
        match response {
            Response::MailboxData(MailboxDatum::Exists(count)) => self.exists_now(*count),
            Response::Expunge(_) => self.exists = self.exists.map(|n| n.saturating_sub(1)),
            Response::Data {
                status: Status::Bye,
                outcome,
            } => {
                let text = outcome.information.as_deref().unwrap_or_default();
                self.bye = Some(text.to_owned());
            }
            Response::Data {
                status: Status::Ok,
                outcome,
            } => {
                if let Some(ResponseCode::UidValidity(value)) = outcome.code {
                    self.uid_validity = Some(value);
                }
            }
            _ => {}
        }
    }

    fn absorb_unsolicited(&mut self, response: UnsolicitedResponse) {
        match response {
            UnsolicitedResponse::Exists(count) => self.exists_now(count),
            UnsolicitedResponse::Expunge(_) => {
                self.exists = self.exists.map(|n| n.saturating_sub(1));
            }
            UnsolicitedResponse::Other(data) => self.absorb(data.parsed()),
            _ => {}
        }
    }

    fn exists_now(&mut self, count: u32) {
        if self.exists.is_none_or(|old| count > old) {
            self.new_mail = true;
        }
        self.exists = Some(count);
    }

    fn check_bye(&mut self, step: &'static str) -> Result<(), SessionError> {
        match self.bye.take() {
            Some(text) => Err(SessionError::Bye { step, text }),
            None => Ok(()),
        }
    }
}

/// Moves everything async-imap parked in its unsolicited channel into `notes`.
fn drain(notes: &mut Notes, next: &mut dyn FnMut() -> Option<UnsolicitedResponse>) {
    while let Some(response) = next() {
        notes.absorb_unsolicited(response);
    }
}

/// A BYE parked in the unsolicited channel, if any (it explains a following EOF).
fn take_bye(next: &mut dyn FnMut() -> Option<UnsolicitedResponse>) -> Option<String> {
    let mut notes = Notes::default();
    drain(&mut notes, next);
    notes.bye
}

/// Sends `command` and reads every response up to its tagged completion, each read bounded by
/// `limit`. Untagged EXISTS, EXPUNGE, BYE and UIDVALIDITY go to `notes`, everything else to
/// `on_data`.
///
/// # Errors
///
/// `Refused` on a tagged `NO`/`BAD`, `Eof`/`Bye` when the connection ends first, `Timeout`,
/// `Cancelled`.
async fn command(
    session: &mut ImapSession,
    cancel: &CancellationToken,
    limit: Duration,
    step: &'static str,
    command: &str,
    notes: &mut Notes,
    mut on_data: impl FnMut(&Response<'_>),
) -> Result<(), SessionError> {
    drain(notes, &mut || session.unsolicited_responses.try_recv().ok());
    let tag = bounded(cancel, limit, step, session.run_command(command))
        .await?
        .map_err(|error| imap_error(step, error, notes.bye.take()))?;
    loop {
        let response = bounded(cancel, limit, step, session.read_response())
            .await?
            .map_err(|error| match notes.bye.take() {
                Some(text) => SessionError::Bye { step, text },
                None => io_error(step, error),
            })?;
        let Some(response) = response else {
            return Err(match notes.bye.take() {
                Some(text) => SessionError::Bye { step, text },
                None => SessionError::Eof { step },
            });
        };
        match response.parsed() {
            Response::Done {
                tag: done,
                status,
                outcome,
            } if *done == tag => {
                let text = outcome.information.as_deref().unwrap_or_default();
                return match status {
                    Status::Ok => Ok(()),
                    _ => Err(SessionError::Refused {
                        step,
                        message: format!("{status:?} {text}"),
                    }),
                };
            }
            other => {
                notes.absorb(other);
                on_data(other);
            }
        }
    }
}

/// `LOGOUT` (RFC 3501 §6.1.3), best effort within `limit`.
async fn logout(session: &mut ImapSession, limit: Duration, notes: &mut Notes) {
    let never = CancellationToken::new();
    match command(session, &never, limit, "LOGOUT", "LOGOUT", notes, |_| {}).await {
        Ok(()) => debug!("Logged out."),
        Err(error) => {
            debug!(error = %error_chain(&error), "LOGOUT failed; dropping the connection.")
        }
    }
}

/// The server's view of the highest UID in the folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ServerLast {
    /// UIDNEXT - 1, or the highest UID present when the server gave no UIDNEXT.
    last_uid: u32,
    /// From UIDNEXT (SELECT or STATUS) rather than estimated from the messages present.
    exact: bool,
}

/// What to do with the stored checkpoint after SELECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    /// Keep the stored checkpoint; catch up from this UID.
    Resume(u32),
    /// Store this checkpoint first (`reset_checkpoint`).
    Reset {
        checkpoint: Checkpoint,
        reason: ResetReason,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ResetReason {
    /// No checkpoint and no seed: start at UIDNEXT-1, never replay history.
    FirstStart,
    /// No checkpoint; the row's `last_uid` seeds it.
    Seeded,
    /// No checkpoint; the seed is above UIDNEXT-1, so UIDNEXT-1 is used.
    SeedAhead { seed: u32 },
    /// The folder was recreated (RFC 3501 §2.3.1.1): start at UIDNEXT-1.
    UidValidityChanged { stored: Checkpoint },
    /// Same UIDVALIDITY but the checkpoint is at or above UIDNEXT: the server went back.
    Ahead { stored: Checkpoint },
}

/// Reconciles the stored checkpoint with the selected folder. Never replays history: every
/// reset lands on the server's UIDNEXT-1 (or the seed, when that is lower).
fn plan_checkpoint(
    stored: Option<Checkpoint>,
    uid_validity: u32,
    server: ServerLast,
    seed: Option<u32>,
) -> Plan {
    let reset = |last_uid, reason| Plan::Reset {
        checkpoint: Checkpoint {
            uid_validity,
            last_uid,
        },
        reason,
    };
    match stored {
        None => match seed {
            None => reset(server.last_uid, ResetReason::FirstStart),
            Some(seed) if server.exact && seed > server.last_uid => {
                reset(server.last_uid, ResetReason::SeedAhead { seed })
            }
            Some(seed) => reset(seed, ResetReason::Seeded),
        },
        Some(stored) if stored.uid_validity != uid_validity => {
            reset(server.last_uid, ResetReason::UidValidityChanged { stored })
        }
        Some(stored) if server.exact && stored.last_uid > server.last_uid => {
            reset(server.last_uid, ResetReason::Ahead { stored })
        }
        Some(stored) => Plan::Resume(stored.last_uid),
    }
}

/// The UIDs strictly above `last_uid`, ascending and without duplicates. `UID SEARCH UID n:*`
/// always matches the highest UID even when it is below `n` (RFC 3501 §6.4.8, `*` is the
/// largest UID in use), so that one is dropped here.
fn uids_above(found: impl IntoIterator<Item = u32>, last_uid: u32) -> Vec<u32> {
    found
        .into_iter()
        .filter(|&uid| uid > last_uid)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// A [`FetchedMessage`] from one FETCH response, if it carries a UID and the whole body.
fn fetched_message(attributes: &[AttributeValue<'_>], uid_validity: u32) -> Option<FetchedMessage> {
    let mut uid = None;
    let mut raw = None;
    let mut internal_date = None;
    for attribute in attributes {
        match attribute {
            AttributeValue::Uid(value) => uid = Some(*value),
            AttributeValue::InternalDate(text) => internal_date = parse_internal_date(text),
            AttributeValue::BodySection {
                section: None,
                index: None,
                data,
            } => raw = Some(data.as_deref().unwrap_or_default().to_vec()),
            _ => {}
        }
    }
    Some(FetchedMessage {
        uid_validity,
        uid: uid?,
        raw: raw?,
        internal_date,
        fetch_error: None,
    })
}

/// Parses an IMAP `date-time` (RFC 3501 §9): `dd-Mon-yyyy hh:mm:ss +zzzz`, the day possibly
/// space-padded.
fn parse_internal_date(text: &str) -> Option<SystemTime> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let mut parts = text.split_whitespace();
    let (date, time, zone) = (parts.next()?, parts.next()?, parts.next()?);
    let mut date = date.split('-');
    let day: i64 = date.next()?.parse().ok()?;
    let month_name = date.next()?;
    let month = MONTHS
        .iter()
        .position(|name| name.eq_ignore_ascii_case(month_name))?;
    let year: i64 = date.next()?.parse().ok()?;
    let mut time = time.split(':');
    let hour: i64 = time.next()?.parse().ok()?;
    let minute: i64 = time.next()?.parse().ok()?;
    let second: i64 = time.next()?.parse().ok()?;
    let (sign, digits) = match zone.as_bytes().first()? {
        b'+' => (1, zone.get(1..)?),
        b'-' => (-1, zone.get(1..)?),
        _ => return None,
    };
    if digits.len() != 4 || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let zone_minutes: i64 =
        digits.get(..2)?.parse::<i64>().ok()? * 60 + digits.get(2..)?.parse::<i64>().ok()?;
    let month = i64::try_from(month).ok()? + 1;
    let days = days_from_civil(year, month, day);
    let seconds = days * 86_400 + hour * 3_600 + minute * 60 + second - sign * zone_minutes * 60;
    let seconds = u64::try_from(seconds).ok()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(seconds))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_index = (month + 9) % 12;
    let day_of_year = (153 * month_index + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// A mailbox name in modified UTF-7 (RFC 3501 §5.1.3): printable ASCII as is (`&` as `&-`),
/// anything else as `&` + modified BASE64 of UTF-16BE + `-`.
fn encode_mailbox_name(name: &str) -> String {
    use base64::Engine as _;
    let mut out = String::with_capacity(name.len());
    let mut pending: Vec<u16> = Vec::new();
    let flush = |out: &mut String, pending: &mut Vec<u16>| {
        if pending.is_empty() {
            return;
        }
        let bytes: Vec<u8> = pending.iter().flat_map(|unit| unit.to_be_bytes()).collect();
        let encoded = base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes);
        out.push('&');
        out.push_str(&encoded.replace('/', ","));
        out.push('-');
        pending.clear();
    };
    for character in name.chars() {
        if (' '..='~').contains(&character) {
            flush(&mut out, &mut pending);
            if character == '&' {
                out.push_str("&-");
            } else {
                out.push(character);
            }
        } else {
            let mut units = [0_u16; 2];
            pending.extend_from_slice(character.encode_utf16(&mut units));
        }
    }
    flush(&mut out, &mut pending);
    out
}

/// An IMAP quoted string (RFC 3501 §4.3).
fn quote(text: &str) -> anyhow::Result<String> {
    if text.contains(['\r', '\n', '\0']) {
        anyhow::bail!("the folder name contains a line break or NUL");
    }
    Ok(format!(
        "\"{}\"",
        text.replace('\\', "\\\\").replace('"', "\\\"")
    ))
}

/// A sink for [`check_login`], which never fetches.
struct NoSink;

impl MessageSink for NoSink {
    async fn checkpoint(&self, _mailbox: &str) -> anyhow::Result<Option<Checkpoint>> {
        Ok(None)
    }
    async fn reset_checkpoint(
        &self,
        _mailbox: &str,
        _checkpoint: Checkpoint,
    ) -> anyhow::Result<()> {
        Ok(())
    }
    async fn acknowledge(&self, _mailbox: &str, _message: FetchedMessage) -> anyhow::Result<()> {
        Ok(())
    }
}

/// `report-relay check`: connects (TLS as configured), authenticates, EXAMINEs the folder
/// read-only (RFC 3501 §6.3.2) and logs out. Returns a one-line summary.
///
/// # Errors
/// The step that failed: connect, TLS, greeting, authentication or EXAMINE, each within its
/// timeout.
pub async fn check_login(settings: &MailboxSettings) -> anyhow::Result<String> {
    let (watcher, _status) =
        MailboxWatcher::new(settings.clone(), Arc::new(NoSink), Arc::new(Metrics::new()));
    let cancel = CancellationToken::new();
    let mut session = watcher
        .open(&cancel)
        .await
        .map_err(|error| anyhow::anyhow!("{error:#}"))?;
    let mut notes = Notes::default();
    let folder = quote(&encode_mailbox_name(&settings.folder))?;
    let examined = command(
        &mut session,
        &cancel,
        settings.timeouts.command,
        "EXAMINE",
        &format!("EXAMINE {folder}"),
        &mut notes,
        |_| {},
    )
    .await;
    logout(&mut session, settings.timeouts.logout, &mut notes).await;
    examined.map_err(|error| anyhow::anyhow!("{error:#}"))?;
    Ok(format!(
        "logged in as {} at {}:{} ({}), folder {} has {} messages",
        settings.login,
        settings.host,
        settings.port,
        settings.tls,
        settings.folder,
        notes
            .exists
            .map_or_else(|| "?".to_owned(), |n| n.to_string())
    ))
}

#[cfg(test)]
mod tests {
    //! Pure helpers, plus the watcher against a scripted loopback IMAP server for the edge cases
    //! a real Dovecot cannot be made to produce on demand (`tests/imap_watcher.rs` covers the
    //! rest against Dovecot).

    use std::net::SocketAddr;
    use std::sync::Mutex;

    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpListener;
    use tokio::sync::{Notify, mpsc};
    use tokio::task::JoinHandle;

    use super::*;

    const WAIT: Duration = Duration::from_secs(10);

    // ---- pure helpers ------------------------------------------------------------------------

    fn exact(last_uid: u32) -> ServerLast {
        ServerLast {
            last_uid,
            exact: true,
        }
    }

    fn checkpoint(uid_validity: u32, last_uid: u32) -> Checkpoint {
        Checkpoint {
            uid_validity,
            last_uid,
        }
    }

    #[test]
    fn first_start_skips_history_or_honours_the_seed() {
        assert_eq!(
            plan_checkpoint(None, 7, exact(41), None),
            Plan::Reset {
                checkpoint: checkpoint(7, 41),
                reason: ResetReason::FirstStart
            }
        );
        assert_eq!(
            plan_checkpoint(None, 7, exact(41), Some(30)),
            Plan::Reset {
                checkpoint: checkpoint(7, 30),
                reason: ResetReason::Seeded
            }
        );
        assert_eq!(
            plan_checkpoint(None, 7, exact(41), Some(99)),
            Plan::Reset {
                checkpoint: checkpoint(7, 41),
                reason: ResetReason::SeedAhead { seed: 99 }
            }
        );
        // Without UIDNEXT the highest UID is only a lower bound: the seed wins.
        let estimate = ServerLast {
            last_uid: 41,
            exact: false,
        };
        assert_eq!(
            plan_checkpoint(None, 7, estimate, Some(99)),
            Plan::Reset {
                checkpoint: checkpoint(7, 99),
                reason: ResetReason::Seeded
            }
        );
    }

    #[test]
    fn stored_checkpoint_is_resumed_or_reset_without_replay() {
        let stored = checkpoint(7, 30);
        assert_eq!(
            plan_checkpoint(Some(stored), 7, exact(41), Some(1)),
            Plan::Resume(30)
        );
        assert_eq!(
            plan_checkpoint(Some(stored), 8, exact(3), None),
            Plan::Reset {
                checkpoint: checkpoint(8, 3),
                reason: ResetReason::UidValidityChanged { stored }
            }
        );
        assert_eq!(
            plan_checkpoint(Some(stored), 7, exact(12), None),
            Plan::Reset {
                checkpoint: checkpoint(7, 12),
                reason: ResetReason::Ahead { stored }
            }
        );
        let estimate = ServerLast {
            last_uid: 12,
            exact: false,
        };
        assert_eq!(
            plan_checkpoint(Some(stored), 7, estimate, None),
            Plan::Resume(30)
        );
    }

    #[test]
    fn the_star_quirk_and_duplicates_are_filtered() {
        // `UID SEARCH UID 6:*` in a folder whose highest UID is 5 answers 5.
        assert!(uids_above([5], 5).is_empty());
        assert_eq!(uids_above([9, 6, 5, 7, 9], 5), [6, 7, 9]);
        assert!(uids_above([u32::MAX], u32::MAX).is_empty());
    }

    #[test]
    fn internal_dates_parse_with_zone_and_padding() {
        let at = |secs| Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs));
        assert_eq!(parse_internal_date("01-Jan-1970 00:00:00 +0000"), at(0));
        assert_eq!(
            parse_internal_date(" 2-Mar-2024 10:11:12 +0300"),
            at(1_709_363_472)
        );
        assert_eq!(
            parse_internal_date("29-Feb-2024 23:59:59 -0130"),
            at(1_709_256_599)
        );
        assert_eq!(parse_internal_date("31-Foo-2024 00:00:00 +0000"), None);
        assert_eq!(parse_internal_date("garbage"), None);
        assert_eq!(parse_internal_date("01-Jan-1960 00:00:00 +0000"), None);
    }

    #[test]
    fn mailbox_names_use_modified_utf7() {
        // RFC 3501 §5.1.3's example.
        assert_eq!(
            encode_mailbox_name("~peter/mail/台北/日本語"),
            "~peter/mail/&U,BTFw-/&ZeVnLIqe-"
        );
        assert_eq!(encode_mailbox_name("INBOX"), "INBOX");
        assert_eq!(encode_mailbox_name("A&B"), "A&-B");
        assert_eq!(encode_mailbox_name("Отчёты"), "&BB4EQgRHBFEEQgRL-");
        assert_eq!(quote("a\"b\\c").unwrap(), r#""a\"b\\c""#);
        assert!(quote("a\r\nb").is_err());
    }

    #[test]
    fn backoff_grows_with_jitter_and_never_ends() {
        let timeouts = ImapTimeouts {
            reconnect_min_delay: Duration::from_millis(100),
            reconnect_max_delay: Duration::from_millis(400),
            ..ImapTimeouts::default()
        };
        let delays: Vec<_> = reconnect_delays(&timeouts).take(50).collect();
        assert_eq!(delays.len(), 50);
        let first = delays[0];
        assert!(first >= Duration::from_millis(100) && first <= Duration::from_millis(200));
        assert!(
            delays
                .iter()
                .all(|delay| *delay <= Duration::from_millis(800))
        );
        assert!(delays[10] >= Duration::from_millis(400));
    }

    #[test]
    fn settings_debug_hides_the_password() {
        let debug = format!("{:?}", settings(1));
        assert!(!debug.contains("s3cret"), "{debug}");
        assert!(debug.contains("REDACTED"), "{debug}");
    }

    #[test]
    fn error_chains_read_like_anyhow() {
        let error = SessionError::Auth {
            mechanism: "LOGIN",
            source: AuthError::Rejected("[AUTHENTICATIONFAILED] nope".into()),
        };
        assert_eq!(
            error_chain(&error),
            "authentication failed (LOGIN): the server rejected the credentials: \
             [AUTHENTICATIONFAILED] nope"
        );
    }

    // ---- an in-memory sink -------------------------------------------------------------------

    #[derive(Debug, Default)]
    struct SinkState {
        checkpoint: Option<Checkpoint>,
        acked: Vec<FetchedMessage>,
        resets: Vec<Checkpoint>,
        fail_acks: u32,
        failed_acks: u32,
    }

    struct MemorySink {
        state: Mutex<SinkState>,
        version: watch::Sender<u64>,
    }

    impl MemorySink {
        fn new(checkpoint: Option<Checkpoint>) -> Arc<Self> {
            Arc::new(Self {
                state: Mutex::new(SinkState {
                    checkpoint,
                    ..SinkState::default()
                }),
                version: watch::channel(0).0,
            })
        }

        fn update<T>(&self, change: impl FnOnce(&mut SinkState) -> T) -> T {
            let out = change(&mut self.state.lock().unwrap());
            self.version.send_modify(|version| *version += 1);
            out
        }

        fn acked_uids(&self) -> Vec<u32> {
            let state = self.state.lock().unwrap();
            state.acked.iter().map(|message| message.uid).collect()
        }

        async fn wait(&self, what: &str, condition: impl Fn(&SinkState) -> bool) {
            let mut version = self.version.subscribe();
            let waited = tokio::time::timeout(
                WAIT,
                version.wait_for(|_| condition(&self.state.lock().unwrap())),
            )
            .await;
            assert!(
                waited.is_ok(),
                "timed out waiting for {what}: {:?}",
                self.state.lock().unwrap()
            );
        }
    }

    impl MessageSink for MemorySink {
        async fn checkpoint(&self, _mailbox: &str) -> anyhow::Result<Option<Checkpoint>> {
            Ok(self.state.lock().unwrap().checkpoint)
        }

        async fn reset_checkpoint(
            &self,
            _mailbox: &str,
            checkpoint: Checkpoint,
        ) -> anyhow::Result<()> {
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
                    state.failed_acks += 1;
                    anyhow::bail!("disk full");
                }
                state.checkpoint = Some(Checkpoint {
                    uid_validity: message.uid_validity,
                    last_uid: message.uid,
                });
                state.acked.push(message);
                Ok(())
            })
        }
    }

    // ---- a scripted IMAP server --------------------------------------------------------------

    #[derive(Debug)]
    struct FakeState {
        uid_validity: u32,
        next_uid: u32,
        messages: Vec<(u32, Vec<u8>)>,
        idle: bool,
        uidnext_in_select: bool,
        uidnext_in_status: bool,
        password: String,
        /// Appended when the next IDLE arrives; the EXISTS goes out before `+ idling`.
        append_at_idle: Vec<Vec<u8>>,
        /// So many `UID FETCH` get a tagged NO.
        fail_fetches: u32,
        /// Never answer DONE (a link that died mid-IDLE).
        ignore_done: bool,
        commands: Vec<String>,
        connections: u32,
    }

    impl Default for FakeState {
        fn default() -> Self {
            Self {
                uid_validity: 1000,
                next_uid: 1,
                messages: Vec::new(),
                idle: true,
                uidnext_in_select: true,
                uidnext_in_status: true,
                password: "s3cret".into(),
                append_at_idle: Vec::new(),
                fail_fetches: 0,
                ignore_done: false,
                commands: Vec::new(),
                connections: 0,
            }
        }
    }

    impl FakeState {
        fn append(&mut self, raw: &[u8]) -> u32 {
            let uid = self.next_uid;
            self.next_uid += 1;
            self.messages.push((uid, raw.to_vec()));
            uid
        }
    }

    struct Shared {
        state: Mutex<FakeState>,
        changed: Notify,
    }

    struct Fake {
        addr: SocketAddr,
        shared: Arc<Shared>,
    }

    impl Fake {
        async fn start(setup: impl FnOnce(&mut FakeState)) -> Self {
            let mut state = FakeState::default();
            setup(&mut state);
            let shared = Arc::new(Shared {
                state: Mutex::new(state),
                changed: Notify::new(),
            });
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let accepting = Arc::clone(&shared);
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    accepting.state.lock().unwrap().connections += 1;
                    tokio::spawn(serve(stream, Arc::clone(&accepting)));
                }
            });
            Self { addr, shared }
        }

        fn with<T>(&self, change: impl FnOnce(&mut FakeState) -> T) -> T {
            let out = change(&mut self.shared.state.lock().unwrap());
            self.shared.changed.notify_waiters();
            out
        }

        fn append(&self, raw: &[u8]) -> u32 {
            self.with(|state| state.append(raw))
        }

        fn commands(&self) -> Vec<String> {
            self.with(|state| state.commands.clone())
        }
    }

    async fn serve(stream: TcpStream, shared: Arc<Shared>) -> io::Result<()> {
        let (read, mut write) = stream.into_split();
        let (lines_tx, mut lines) = mpsc::unbounded_channel::<String>();
        tokio::spawn(async move {
            let mut read = BufReader::new(read);
            loop {
                let mut line = String::new();
                match read.read_line(&mut line).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        if lines_tx.send(line.trim_end().to_owned()).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        write.write_all(b"* OK fake IMAP ready\r\n").await?;
        let mut told = 0_usize;
        let mut selected = false;
        while let Some(line) = lines.recv().await {
            let (tag, rest) = line.split_once(' ').unwrap_or((line.as_str(), ""));
            let upper = rest.to_ascii_uppercase();
            let word = upper.split(' ').next().unwrap_or_default().to_owned();
            let recorded = if word == "LOGIN" { "LOGIN" } else { rest };
            shared
                .state
                .lock()
                .unwrap()
                .commands
                .push(recorded.to_owned());
            let mut out: Vec<u8> = Vec::new();
            let mut done = format!("{tag} OK done\r\n");
            match word.as_str() {
                "CAPABILITY" => {
                    let idle = shared.state.lock().unwrap().idle;
                    let extra = if idle { " IDLE" } else { "" };
                    out.extend(format!("* CAPABILITY IMAP4rev1{extra}\r\n").bytes());
                }
                "LOGIN" => {
                    let password = rest.split('"').nth(3).unwrap_or_default();
                    if password != shared.state.lock().unwrap().password {
                        done =
                            format!("{tag} NO [AUTHENTICATIONFAILED] Authentication failed.\r\n");
                    }
                }
                "SELECT" => {
                    let state = shared.state.lock().unwrap();
                    selected = true;
                    told = state.messages.len();
                    out.extend(format!("* {told} EXISTS\r\n* 0 RECENT\r\n").bytes());
                    out.extend(
                        format!("* OK [UIDVALIDITY {}] UIDs valid\r\n", state.uid_validity).bytes(),
                    );
                    if state.uidnext_in_select {
                        out.extend(
                            format!("* OK [UIDNEXT {}] Predicted\r\n", state.next_uid).bytes(),
                        );
                    }
                }
                "STATUS" => {
                    let state = shared.state.lock().unwrap();
                    let items = if state.uidnext_in_status {
                        format!("UIDNEXT {}", state.next_uid)
                    } else {
                        format!("MESSAGES {}", state.messages.len())
                    };
                    out.extend(format!("* STATUS \"INBOX\" ({items})\r\n").bytes());
                }
                "UID" if upper.starts_with("UID SEARCH UID ") => {
                    let state = shared.state.lock().unwrap();
                    let range = &upper["UID SEARCH UID ".len()..];
                    let max = state.messages.iter().map(|(uid, _)| *uid).max();
                    let mut found: Vec<u32> = match range.split_once(':') {
                        Some((from, _)) => {
                            let from: u32 = from.parse().unwrap();
                            state
                                .messages
                                .iter()
                                .map(|(uid, _)| *uid)
                                .filter(|uid| *uid >= from)
                                .collect()
                        }
                        None => Vec::new(),
                    };
                    // `n:*` and `*` always match the highest UID (RFC 3501 §6.4.8).
                    if found.is_empty() {
                        found.extend(max);
                    }
                    let list: Vec<String> = found.iter().map(u32::to_string).collect();
                    out.extend(
                        format!("* SEARCH {}\r\n", list.join(" "))
                            .trim_end()
                            .bytes(),
                    );
                    out.extend(b"\r\n");
                }
                "UID" if upper.starts_with("UID FETCH ") => {
                    let mut state = shared.state.lock().unwrap();
                    assert!(upper.contains("BODY.PEEK[]"), "{line}");
                    let uid: u32 = upper.split(' ').nth(2).unwrap().parse().unwrap();
                    if state.fail_fetches > 0 {
                        state.fail_fetches -= 1;
                        done = format!("{tag} NO Some messages could not be FETCHed\r\n");
                    } else if let Some(position) =
                        state.messages.iter().position(|(u, _)| *u == uid)
                    {
                        let raw = &state.messages[position].1;
                        out.extend(
                            format!(
                                "* {} FETCH (UID {uid} INTERNALDATE \" 2-Mar-2024 10:11:12 +0300\" BODY[] {{{}}}\r\n",
                                position + 1,
                                raw.len()
                            )
                            .bytes(),
                        );
                        out.extend_from_slice(raw);
                        out.extend(b")\r\n");
                    }
                }
                "IDLE" => {
                    {
                        let mut state = shared.state.lock().unwrap();
                        for raw in std::mem::take(&mut state.append_at_idle) {
                            state.append(&raw);
                        }
                    }
                    let mut head = Vec::new();
                    tell_exists(&shared, &mut told, &mut head);
                    head.extend(b"+ idling\r\n");
                    write.write_all(&head).await?;
                    loop {
                        let changed = shared.changed.notified();
                        let mut news = Vec::new();
                        tell_exists(&shared, &mut told, &mut news);
                        write.write_all(&news).await?;
                        tokio::select! {
                            line = lines.recv() => match line {
                                Some(line) if line.eq_ignore_ascii_case("DONE") => break,
                                Some(_) => {}
                                None => return Ok(()),
                            },
                            () = changed => {}
                        }
                    }
                    shared.state.lock().unwrap().commands.push("DONE".into());
                    if shared.state.lock().unwrap().ignore_done {
                        // A dead link: swallow everything, answer nothing.
                        while lines.recv().await.is_some() {}
                        return Ok(());
                    }
                    done = format!("{tag} OK Idle completed.\r\n");
                }
                "NOOP" => {}
                "LOGOUT" => {
                    write
                        .write_all(
                            format!("* BYE Logging out\r\n{tag} OK Logout completed.\r\n")
                                .as_bytes(),
                        )
                        .await?;
                    return Ok(());
                }
                _ => done = format!("{tag} BAD Unknown command\r\n"),
            }
            if selected {
                tell_exists(&shared, &mut told, &mut out);
            }
            out.extend(done.bytes());
            write.write_all(&out).await?;
        }
        Ok(())
    }

    fn tell_exists(shared: &Shared, told: &mut usize, out: &mut Vec<u8>) {
        let count = shared.state.lock().unwrap().messages.len();
        if count > *told {
            *told = count;
            out.extend(format!("* {count} EXISTS\r\n* 1 RECENT\r\n").bytes());
        }
    }

    // ---- the watcher against the fake --------------------------------------------------------

    fn settings(port: u16) -> MailboxSettings {
        MailboxSettings {
            address: "reports@test.local".into(),
            host: "127.0.0.1".into(),
            port,
            tls: TlsMode::None,
            login: "reports@test.local".into(),
            password: SecretString::from("s3cret"),
            folder: "INBOX".into(),
            idle_renew_secs: 60,
            seed_last_uid: None,
            timeouts: ImapTimeouts {
                connect: Duration::from_secs(2),
                login: Duration::from_secs(2),
                command: Duration::from_secs(2),
                fetch: Duration::from_secs(2),
                idle_keepalive: Duration::from_secs(60),
                done: Duration::from_millis(300),
                logout: Duration::from_secs(1),
                reconnect_min_delay: Duration::from_millis(20),
                reconnect_max_delay: Duration::from_millis(100),
            },
            poll_secs: 1,
        }
    }

    struct Running {
        task: JoinHandle<()>,
        cancel: CancellationToken,
        status: watch::Receiver<WatcherStatus>,
        metrics: Arc<Metrics>,
    }

    impl Running {
        fn start(settings: MailboxSettings, sink: &Arc<MemorySink>) -> Self {
            let metrics = Arc::new(Metrics::new());
            let (watcher, status) =
                MailboxWatcher::new(settings, Arc::clone(sink), Arc::clone(&metrics));
            let cancel = CancellationToken::new();
            let task = tokio::spawn(watcher.run(cancel.clone()));
            Self {
                task,
                cancel,
                status,
                metrics,
            }
        }

        async fn wait_state(&mut self, what: &str, condition: impl Fn(&WatcherStatus) -> bool) {
            let waited = tokio::time::timeout(WAIT, self.status.wait_for(|s| condition(s)))
                .await
                .is_ok_and(|result| result.is_ok());
            assert!(
                waited,
                "timed out waiting for {what}: {:?}",
                *self.status.borrow()
            );
        }

        async fn stop(self) {
            self.cancel.cancel();
            tokio::time::timeout(Duration::from_secs(3), self.task)
                .await
                .expect("the watcher stops promptly")
                .unwrap();
        }
    }

    fn is_idle(status: &WatcherStatus) -> bool {
        status.state == WatcherState::Idle
    }

    #[tokio::test]
    async fn exists_before_the_idle_continuation_is_not_missed() {
        let fake = Fake::start(|state| {
            state.append(b"Subject: old\r\n\r\nold");
            state
                .append_at_idle
                .push(b"Subject: racing\r\n\r\nnew".to_vec());
        })
        .await;
        let sink = MemorySink::new(None);
        // The keepalive timeout is a minute: only the drain after `init` can find this mail.
        let running = Running::start(settings(fake.addr.port()), &sink);
        sink.wait("the racing message", |state| state.acked.len() == 1)
            .await;
        assert_eq!(sink.acked_uids(), [2]);
        let message = sink.state.lock().unwrap().acked[0].clone();
        assert_eq!(message.raw, b"Subject: racing\r\n\r\nnew");
        assert_eq!(message.uid_validity, 1000);
        assert_eq!(
            message.internal_date,
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_709_363_472))
        );
        assert_eq!(sink.state.lock().unwrap().resets, [checkpoint(1000, 1)]);
        running.stop().await;
    }

    #[tokio::test]
    async fn a_tagged_no_on_fetch_is_retried_not_skipped() {
        let fake = Fake::start(|state| {
            state.append(b"one");
            state.append(b"two");
            state.fail_fetches = 1;
        })
        .await;
        let sink = MemorySink::new(Some(checkpoint(1000, 0)));
        let running = Running::start(settings(fake.addr.port()), &sink);
        sink.wait("both messages", |state| state.acked.len() == 2)
            .await;
        assert_eq!(sink.acked_uids(), [1, 2]);
        assert_eq!(fake.with(|state| state.connections), 2);
        running.stop().await;
    }

    #[tokio::test]
    async fn a_message_the_server_never_delivers_is_handed_over_as_failed() {
        let fake = Fake::start(|state| {
            state.append(b"one");
            state.append(b"two");
            state.fail_fetches = MAX_FETCH_ATTEMPTS;
        })
        .await;
        let sink = MemorySink::new(Some(checkpoint(1000, 0)));
        let running = Running::start(settings(fake.addr.port()), &sink);
        sink.wait("both messages", |state| state.acked.len() == 2)
            .await;
        let acked = sink.state.lock().unwrap().acked.clone();
        assert_eq!(acked[0].uid, 1);
        assert!(acked[0].raw.is_empty());
        assert!(
            acked[0]
                .fetch_error
                .as_deref()
                .is_some_and(|e| e.contains("5 attempts")),
            "{:?}",
            acked[0].fetch_error
        );
        // The mailbox moved on: the next message arrives normally.
        assert_eq!(acked[1].uid, 2);
        assert_eq!(acked[1].raw, b"two");
        assert_eq!(acked[1].fetch_error, None);
        running.stop().await;
    }

    #[tokio::test]
    async fn a_failing_sink_keeps_the_message_for_the_next_session() {
        let fake = Fake::start(|state| {
            state.append(b"one");
        })
        .await;
        let sink = MemorySink::new(Some(checkpoint(1000, 0)));
        sink.update(|state| state.fail_acks = 2);
        let mut running = Running::start(settings(fake.addr.port()), &sink);
        running
            .wait_state("a backoff after the sink failed", |status| {
                matches!(&status.state, WatcherState::Backoff { last_error } if last_error.contains("disk full"))
            })
            .await;
        sink.wait("the message", |state| state.acked.len() == 1)
            .await;
        assert_eq!(sink.acked_uids(), [1]);
        assert_eq!(sink.state.lock().unwrap().failed_acks, 2);
        let metrics = running.metrics.render();
        // Fetched three times, acknowledged once.
        assert!(
            metrics
                .contains(r#"report_relay_reports_received_total{mailbox="reports@test.local"} 3"#),
            "{metrics}"
        );
        running.stop().await;
    }

    #[tokio::test]
    async fn missing_uidnext_falls_back_to_status_then_to_the_highest_uid() {
        let fake = Fake::start(|state| {
            state.append(b"one");
            state.append(b"two");
            state.next_uid = 10;
            state.uidnext_in_select = false;
        })
        .await;
        let sink = MemorySink::new(None);
        let mut running = Running::start(settings(fake.addr.port()), &sink);
        running.wait_state("idle", is_idle).await;
        assert_eq!(sink.state.lock().unwrap().resets, [checkpoint(1000, 9)]);
        running.stop().await;

        let fake = Fake::start(|state| {
            state.append(b"one");
            state.append(b"two");
            state.next_uid = 10;
            state.uidnext_in_select = false;
            state.uidnext_in_status = false;
        })
        .await;
        let sink = MemorySink::new(None);
        let mut running = Running::start(settings(fake.addr.port()), &sink);
        running.wait_state("idle", is_idle).await;
        assert_eq!(sink.state.lock().unwrap().resets, [checkpoint(1000, 2)]);
        assert!(fake.commands().iter().any(|c| c == "UID SEARCH UID *"));
        running.stop().await;
    }

    #[tokio::test]
    async fn servers_without_idle_are_polled() {
        let fake = Fake::start(|state| state.idle = false).await;
        let sink = MemorySink::new(None);
        let mut running = Running::start(settings(fake.addr.port()), &sink);
        running
            .wait_state("polling", |status| status.state == WatcherState::Polling)
            .await;
        fake.append(b"polled");
        sink.wait("the polled message", |state| state.acked.len() == 1)
            .await;
        assert!(!fake.commands().iter().any(|c| c == "IDLE"));
        running.stop().await;
        assert_eq!(fake.commands().last().map(String::as_str), Some("LOGOUT"));
    }

    #[tokio::test]
    async fn cancellation_while_idle_sends_done_and_logout() {
        let fake = Fake::start(|_| {}).await;
        let sink = MemorySink::new(None);
        let mut running = Running::start(settings(fake.addr.port()), &sink);
        running.wait_state("idle", is_idle).await;
        let metrics = Arc::clone(&running.metrics);
        assert!(metrics.render().contains(
            r#"report_relay_watcher_state{mailbox="reports@test.local",state="idle"} 1"#
        ));
        running.stop().await;
        let commands = fake.commands();
        assert_eq!(commands[commands.len() - 2..], ["DONE", "LOGOUT"]);
        let rendered = metrics.render();
        assert!(
            rendered.contains(
                r#"report_relay_watcher_state{mailbox="reports@test.local",state="idle"} 0"#
            ),
            "{rendered}"
        );
    }

    #[tokio::test]
    async fn a_dead_link_in_idle_is_detected_by_the_keepalive_and_done_timeouts() {
        let fake = Fake::start(|state| state.ignore_done = true).await;
        let sink = MemorySink::new(None);
        let mut settings = settings(fake.addr.port());
        settings.timeouts.idle_keepalive = Duration::from_millis(200);
        let mut running = Running::start(settings, &sink);
        running
            .wait_state("a DONE timeout", |status| {
                matches!(&status.state, WatcherState::Backoff { last_error } if last_error == "DONE timed out after 0.3 s")
            })
            .await;
        running.wait_state("idle again", is_idle).await;
        assert!(fake.with(|state| state.connections) >= 2);
        running.stop().await;
    }

    #[tokio::test]
    async fn a_silent_server_times_out_at_the_greeting() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let _hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let sink = MemorySink::new(None);
        let mut settings = settings(port);
        settings.timeouts.connect = Duration::from_millis(100);
        let mut running = Running::start(settings, &sink);
        running
            .wait_state("a greeting timeout", |status| {
                matches!(&status.state, WatcherState::Backoff { last_error } if last_error == "greeting timed out after 0.1 s")
            })
            .await;
        running.stop().await;
    }

    #[tokio::test]
    async fn a_wrong_password_is_an_authentication_failure() {
        let fake = Fake::start(|state| state.password = "other".into()).await;
        let sink = MemorySink::new(None);
        let mut running = Running::start(settings(fake.addr.port()), &sink);
        running
            .wait_state("an auth failure", |status| {
                matches!(&status.state, WatcherState::Backoff { last_error } if last_error.starts_with("authentication failed (LOGIN): the server rejected the credentials"))
            })
            .await;
        running.stop().await;
        assert!(sink.state.lock().unwrap().resets.is_empty());
    }
}
