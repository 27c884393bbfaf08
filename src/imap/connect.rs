//! Connecting a watcher: the host's addresses ([`super::resolve`]), TCP, implicit TLS or
//! STARTTLS over tokio-rustls, the greeting, then the [`Authenticator`](super::Authenticator).
//! The first step of every session (see [`super`]).
//!
//! Every watcher that trusts the webpki roots shares one rustls [`ClientConfig`] (the roots, the
//! verifier and the session-resumption cache), built once per process.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};

use async_imap::imap_proto::{Response, Status};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tokio_util::sync::CancellationToken;

use super::auth::{AuthError, Authenticator};
use super::command::{SessionError, bounded, imap_error, io_error};
use super::resolve::SYSTEM as RESOLVER;
use super::{MailboxWatcher, MessageSink};
use crate::config::TlsMode;

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

/// A TLS client config, or why it could not be built; cheap to clone, shared between watchers.
pub(super) type TlsConfig = Result<Arc<ClientConfig>, rustls::Error>;

/// A client config trusting `roots`, with ring as its one explicit crypto provider (no
/// dependence on a process-wide default) and rustls' safe default protocol versions.
pub(super) fn client_config(roots: RootCertStore) -> TlsConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The config trusting the webpki (Mozilla) roots: built on first use, then the same `Arc` for
/// every watcher of the process.
pub(super) fn webpki_client_config() -> TlsConfig {
    static CONFIG: LazyLock<TlsConfig> = LazyLock::new(|| {
        client_config(RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        })
    });
    CONFIG.clone()
}

impl<S: MessageSink, A: Authenticator> MailboxWatcher<S, A> {
    /// The host's addresses, TCP, TLS or STARTTLS, the greeting, then authentication.
    pub(super) async fn open(
        &self,
        cancel: &CancellationToken,
    ) -> Result<ImapSession, SessionError> {
        let settings = &self.settings;
        let timeouts = settings.timeouts;
        let addresses = bounded(
            cancel,
            timeouts.connect,
            "resolve",
            RESOLVER.resolve(&settings.host, settings.port),
        )
        .await?
        .map_err(|error| SessionError::failed("resolve", error))?;
        // Each address in turn, as the resolver ordered them; the last error if none answers.
        let tcp = bounded(
            cancel,
            timeouts.connect,
            "connect",
            TcpStream::connect(&addresses[..]),
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

    pub(super) async fn tls_handshake(
        &self,
        tcp: TcpStream,
        cancel: &CancellationToken,
    ) -> Result<Transport, SessionError> {
        let config = self
            .tls
            .clone()
            .map_err(|error| SessionError::failed("TLS handshake", error))?;
        let name = ServerName::try_from(self.settings.host.clone())
            .map_err(|error| SessionError::failed("TLS handshake", error))?;
        let stream = bounded(
            cancel,
            self.settings.timeouts.connect,
            "TLS handshake",
            TlsConnector::from(config).connect(name, tcp),
        )
        .await?
        .map_err(|error| SessionError::failed("TLS handshake", error))?;
        Ok(Transport::Tls(Box::new(stream)))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use secrecy::SecretString;
    use tokio_rustls::rustls::RootCertStore;

    use super::super::check::NoSink;
    use super::super::{ImapTimeouts, MailboxSettings, MailboxWatcher};
    use crate::config::TlsMode;
    use crate::metrics::Metrics;

    fn watcher(address: &str) -> MailboxWatcher<NoSink> {
        let settings = MailboxSettings {
            address: address.to_owned(),
            host: "imap.example.com".to_owned(),
            port: 993,
            tls: TlsMode::Implicit,
            login: address.to_owned(),
            credentials: super::super::Credentials::Password(SecretString::from("secret")),
            folder: "INBOX".to_owned(),
            idle_renew_secs: 540,
            seed_last_uid: None,
            timeouts: ImapTimeouts::default(),
            poll_secs: 60,
        };
        MailboxWatcher::new(settings, Arc::new(NoSink), Arc::new(Metrics::new())).0
    }

    #[test]
    fn every_watcher_shares_one_tls_config() {
        let first = watcher("a@example.com");
        let second = watcher("b@example.com");
        let (Ok(first), Ok(second)) = (&first.tls, &second.tls) else {
            panic!("the webpki config builds");
        };
        assert!(Arc::ptr_eq(first, second));
    }

    #[test]
    fn private_roots_get_a_config_of_their_own() {
        let shared = watcher("a@example.com");
        let private = watcher("b@example.com").with_tls_roots(RootCertStore::empty());
        let (Ok(shared), Ok(private)) = (&shared.tls, &private.tls) else {
            panic!("both configs build");
        };
        assert!(!Arc::ptr_eq(shared, private));
    }
}
