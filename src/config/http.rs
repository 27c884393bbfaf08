//! `http:`: the listener of `/healthz`, `/readyz`, `/metrics` and the HTTP ingest (the Superset
//! webhook, the send API), its TLS certificate, the request size limit and the send API's
//! tokens.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;
use serde_with::{DisplayFromStr, serde_as};

/// `http:`.
#[serde_as]
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of the listener (`/healthz`, `/readyz`, `/metrics`, `/ingest/…`, `/api/v1/…`).
    #[serde_as(as = "DisplayFromStr")]
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Serve HTTPS with this certificate and key instead of plain HTTP (Superset sends webhooks
    /// to `https://` URLs only); re-read on SIGHUP and when the files change.
    #[serde(default)]
    pub tls: Option<TlsFiles>,
    /// The largest request body the ingest endpoints accept, in bytes (a larger one is answered
    /// 413); default 50000000, Telegram's own upload limit (`telegram.max_upload_bytes`).
    #[serde_as(as = "DisplayFromStr")]
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: u64,
    /// How long a Superset webhook request (and a send API `Idempotency-Key`) is remembered, in
    /// seconds: the same request again within it is acknowledged and not sent twice. Default
    /// 86400. Superset retries within about four minutes; an alert that fires more often than
    /// this with exactly the same content is relayed once per window.
    #[serde_as(as = "DisplayFromStr")]
    #[serde(default = "default_dedupe_window_secs")]
    pub dedupe_window_secs: u64,
    /// The send API's tokens (`POST /api/v1/messages`); none: the API answers 401 to everyone.
    #[serde(default)]
    pub api_tokens: Vec<ApiToken>,
}

/// `http.tls`: PEM files, as a web server's.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The certificate chain, leaf first (PEM `CERTIFICATE` blocks).
    pub cert_file: PathBuf,
    /// The private key of the leaf (PEM: PKCS#8, PKCS#1 RSA or SEC1 EC).
    pub key_file: PathBuf,
}

/// One entry of `http.api_tokens`: a client of the send API.
#[serde_as]
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiToken {
    /// Who the token belongs to, for the logs and `Idempotency-Key` scoping (never the token).
    pub name: String,
    /// SHA-256 of the token, 64 hex digits (`printf %s "$TOKEN" | sha256sum`): the config
    /// never holds the token itself.
    pub sha256: String,
    /// The mailbox addresses (`mailboxes.email`) this token may send to.
    pub mailboxes: Vec<String>,
    /// Requests per minute this token may make (GCRA, bursts up to the same number); more are
    /// answered 429 with `Retry-After`. Default 60.
    #[serde_as(as = "DisplayFromStr")]
    #[serde(default = "default_requests_per_minute")]
    pub requests_per_minute: u32,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            tls: None,
            max_body_bytes: default_max_body_bytes(),
            dedupe_window_secs: default_dedupe_window_secs(),
            api_tokens: Vec::new(),
        }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9464))
}
fn default_max_body_bytes() -> u64 {
    50_000_000
}
fn default_dedupe_window_secs() -> u64 {
    86_400
}
fn default_requests_per_minute() -> u32 {
    60
}

impl HttpConfig {
    /// Checks the send API's tokens and the size limit.
    ///
    /// # Errors
    /// The dotted key (`http.api_tokens[1].sha256`) and what is wrong with it.
    pub(super) fn validate(&self) -> Result<(), (String, String)> {
        if self.max_body_bytes == 0 {
            return Err(("http.max_body_bytes".into(), "must be at least 1".into()));
        }
        let mut names = std::collections::BTreeSet::new();
        for (index, token) in self.api_tokens.iter().enumerate() {
            let key = |field: &str| format!("http.api_tokens[{index}].{field}");
            if token.name.trim().is_empty() {
                return Err((key("name"), "must not be empty".into()));
            }
            if !names.insert(token.name.as_str()) {
                return Err((key("name"), format!("{:?} is used twice", token.name)));
            }
            if token.sha256.len() != 64 || !token.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err((
                    key("sha256"),
                    "expected the token's SHA-256 as 64 hex digits (printf %s \"$TOKEN\" | sha256sum)"
                        .into(),
                ));
            }
            if token.mailboxes.is_empty() {
                return Err((key("mailboxes"), "must name at least one mailbox".into()));
            }
            if token.requests_per_minute == 0 {
                return Err((key("requests_per_minute"), "must be at least 1".into()));
            }
        }
        Ok(())
    }
}
