//! TLS on the HTTP listener (`http.tls`): Superset sends webhooks to `https://` URLs only.
//!
//! Sits between [`super::bind`]'s TCP listener and axum: a [`TlsListener`] accepts TCP
//! connections, runs each rustls handshake in its own task (bounded by [`HANDSHAKE_TIMEOUT`], so
//! a slow client holds up nobody), and hands axum the finished streams. The certificate is
//! resolved per handshake from a [`ReloadingCert`], which re-reads the PEM files on SIGHUP and
//! when their modification time changes (checked every [`POLL_INTERVAL`]); a file that does not
//! load keeps the certificate in use, with an ERROR.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::TlsFiles;

/// How long a client has to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the certificate and key files' modification times are checked.
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);
/// Handshaken connections waiting for axum to take them.
const ACCEPTED_QUEUE: usize = 64;

/// The certificate in use, replaced whole when the files change.
#[derive(Debug)]
pub struct ReloadingCert {
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
    /// The files' modification times when they were last loaded.
    loaded_stamp: RwLock<Option<(SystemTime, SystemTime)>>,
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|key| key.clone())
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn stamp(files: &TlsFiles) -> Option<(SystemTime, SystemTime)> {
    Some((modified(&files.cert_file)?, modified(&files.key_file)?))
}

/// Reads the certificate chain and key of `files` and checks that they belong together.
///
/// # Errors
/// A file cannot be read, holds no PEM certificate or key, or the key is not the
/// certificate's; the message names the file.
fn load(files: &TlsFiles, provider: &CryptoProvider) -> anyhow::Result<CertifiedKey> {
    let cert = &files.cert_file;
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| {
            format!(
                "Cannot read the certificate {} (http.tls.cert_file)",
                cert.display()
            )
        })?;
    if chain.is_empty() {
        anyhow::bail!(
            "{} (http.tls.cert_file) holds no PEM CERTIFICATE block",
            cert.display()
        );
    }
    let key_file = &files.key_file;
    let key = PrivateKeyDer::from_pem_file(key_file).with_context(|| {
        format!(
            "Cannot read the private key {} (http.tls.key_file)",
            key_file.display()
        )
    })?;
    CertifiedKey::from_der(chain, key, provider).with_context(|| {
        format!(
            "The key {} does not fit the certificate {} (http.tls)",
            key_file.display(),
            cert.display()
        )
    })
}

impl ReloadingCert {
    /// Loads `files` (start-up: an error here stops the relay).
    ///
    /// # Errors
    /// As the files cannot be used, naming them.
    pub fn load(files: &TlsFiles) -> anyhow::Result<Arc<Self>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let stamp = stamp(files);
        let key = load(files, &provider)?;
        Ok(Arc::new(Self {
            files: files.clone(),
            provider,
            current: RwLock::new(Arc::new(key)),
            loaded_stamp: RwLock::new(stamp),
        }))
    }

    /// Loads the files again; on failure the certificate in use stays, with an ERROR.
    /// Returns whether a new certificate is in use.
    pub fn reload(&self, why: &str) -> bool {
        let stamp = stamp(&self.files);
        match load(&self.files, &self.provider) {
            Ok(key) => {
                if let Ok(mut current) = self.current.write() {
                    *current = Arc::new(key);
                }
                if let Ok(mut loaded) = self.loaded_stamp.write() {
                    *loaded = stamp;
                }
                info!(
                    cert_file = %self.files.cert_file.display(),
                    why, "Loaded the TLS certificate."
                );
                true
            }
            Err(error) => {
                // Not again until the files change once more.
                if let Ok(mut loaded) = self.loaded_stamp.write() {
                    *loaded = stamp;
                }
                error!(
                    error = format!("{error:#}"),
                    why, "Cannot reload the TLS certificate; the one in use stays."
                );
                false
            }
        }
    }

    /// The rustls server config that resolves through this certificate (HTTP/1.1 over ALPN).
    ///
    /// # Errors
    /// The provider supports no safe protocol version (never with ring).
    pub fn server_config(self: &Arc<Self>) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        let mut config = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// Reloads on SIGHUP and when the files' modification times change, until `cancel`.
    pub async fn watch(self: Arc<Self>, cancel: CancellationToken) {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangups = match signal(SignalKind::hangup()) {
            Ok(hangups) => Some(hangups),
            Err(error) => {
                warn!(%error, "Cannot listen for SIGHUP; the TLS certificate reloads when its files change.");
                None
            }
        };
        loop {
            let hangup = async {
                match hangups.as_mut() {
                    Some(hangups) => hangups.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = hangup => { self.reload("SIGHUP"); }
                () = tokio::time::sleep(POLL_INTERVAL) => {
                    let now = stamp(&self.files);
                    let loaded = self.loaded_stamp.read().ok().and_then(|s| *s);
                    if now.is_some() && now != loaded {
                        self.reload("the files changed");
                    }
                }
            }
        }
    }
}

/// A TCP listener that hands axum TLS streams, handshaking each connection in its own task.
pub struct TlsListener {
    accepted: tokio::sync::mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local_addr: SocketAddr,
}

impl TlsListener {
    /// Serves TLS with `config` on `listener` until `cancel` fires.
    ///
    /// # Errors
    /// The listener has no local address.
    pub fn new(
        listener: TcpListener,
        config: Arc<rustls::ServerConfig>,
        cancel: CancellationToken,
    ) -> std::io::Result<Self> {
        let local_addr = listener.local_addr()?;
        let (sender, accepted) = tokio::sync::mpsc::channel(ACCEPTED_QUEUE);
        let acceptor = TlsAcceptor::from(config);
        tokio::spawn(async move {
            loop {
                let (stream, peer) = tokio::select! {
                    () = cancel.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(error) => {
                            // Out of file descriptors and the like: wait a moment, as axum does.
                            debug!(%error, "Cannot accept a connection.");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                };
                let (acceptor, sender) = (acceptor.clone(), sender.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = sender.send((tls, peer)).await;
                        }
                        Ok(Err(error)) => debug!(%peer, %error, "A TLS handshake failed."),
                        Err(_) => debug!(%peer, "A TLS handshake timed out."),
                    }
                });
            }
        });
        Ok(Self {
            accepted,
            local_addr,
        })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.accepted.recv().await {
            Some(accepted) => accepted,
            // The accept loop ended (shutdown): nothing more will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local_addr)
    }
}
