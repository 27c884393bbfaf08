//! An in-process fake OAuth 2.0 authorization server for integration tests: the token endpoints
//! of Google (`https://oauth2.googleapis.com/token`, device endpoint
//! `https://oauth2.googleapis.com/device/code`) and of the Microsoft identity platform
//! (`https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token` and `/devicecode`), plus an
//! RFC 7662 introspection endpoint that a real Dovecot (`passdb oauth2`, see
//! [`super::dovecot::DovecotOptions::oauth2_introspection_url`]) validates bearer tokens against.
//!
//! ```ignore
//! let idp = FakeOAuth2::start().await;
//! idp.add_client("relay", Some("relay-secret"));
//! let refresh = idp.issue_refresh_token("relay", "reports@test.local");
//! // point the relay at idp.token_url(), Dovecot at idp.introspection_url()
//! ```
//!
//! # What it serves (all on `127.0.0.1:<free port>`, plain HTTP)
//!
//! * `POST /token` ([`FakeOAuth2::token_url`]), RFC 6749 §3.2: `application/x-www-form-urlencoded`
//!   only (anything else: 400 `invalid_request`); a parameter sent twice is 400 `invalid_request`
//!   and one sent with an empty value counts as absent (§3.2). Client authentication (§2.3.1) by
//!   `client_id` + `client_secret` in the body or by HTTP Basic (both halves form-urlencoded
//!   before base64, as §2.3.1 demands); using both methods at once is 400 `invalid_request`
//!   (§2.3). A public client ([`FakeOAuth2::add_client`] with `None`) sends only `client_id`;
//!   one that sends a secret anyway is refused with 401 `invalid_client`, as Microsoft does
//!   (AADSTS700025). Unknown client, missing or wrong secret: 401 `invalid_client`, with
//!   `WWW-Authenticate: Basic realm="fake-oauth2"` when the client tried Basic (§5.2 MUST).
//!   No `client_id` at all: 400 `invalid_request` (Google's "Could not determine client ID from
//!   request."). Grants:
//!   - `refresh_token` (§6): unknown, revoked, rotated-away or foreign refresh token: 400
//!     `invalid_grant`; a `scope` wider than the original grant: 400 `invalid_scope`. The answer
//!     carries a `refresh_token` only when rotation is on ([`FakeOAuth2::set_rotation`]); the used
//!     token is then revoked. That revocation is stricter than Microsoft, whose old refresh
//!     tokens stay usable for a while: a client must store every rotated token at once.
//!   - `urn:ietf:params:oauth:grant-type:device_code` (RFC 8628 §3.4, §3.5), see below.
//!   - `authorization_code` (§4.1.3 + RFC 7636 §4.5/§4.6): the code is single-use (a second use is
//!     `invalid_grant` and revokes the tokens the first use issued, §4.1.2), bound to the client
//!     and the exact `redirect_uri` of `/authorize`, lives 10 minutes, and needs the
//!     `code_verifier` whose S256 transform is the `code_challenge` (missing: `invalid_request`,
//!     wrong: `invalid_grant`).
//!   - `client_credentials` (§4.4): only for an app registered with [`FakeOAuth2::add_app`]
//!     (others: 400 `unauthorized_client`); app-only token for that app's mailbox, no
//!     `refresh_token`, no `scope` in the answer (Microsoft's shape).
//!   - `urn:ietf:params:oauth:grant-type:jwt-bearer` (RFC 7523 §2.1, Google's service accounts):
//!     `assertion` is a compact RS256 JWT signed with the key of a service account added with
//!     [`FakeOAuth2::add_service_account`]; checked: three base64url (unpadded) parts, `alg` =
//!     `RS256`, `iss` = a known `client_email` ("Invalid grant: account not found"), the
//!     signature ("Invalid JWT Signature."), `aud` = [`FakeOAuth2::token_url`] exactly, `iat` and
//!     `exp` integers with `iat` ≤ now + 60 s, `exp` > now and `exp − iat` ≤ 3600 s (Google's
//!     "Token must be a short-lived token (60 minutes) and in a reasonable timeframe"), all
//!     400 `invalid_grant`; a missing `scope` claim is 400 `invalid_scope`. The token is for
//!     `sub` (the mailbox; domain-wide delegation is assumed granted for every mailbox), or for
//!     `iss` itself without `sub`. No client authentication is needed (RFC 7523 §3.1); no
//!     `refresh_token` and no `scope` in the answer. `kid` is not checked.
//!
//!   Unknown `grant_type`: 400 `unsupported_grant_type`; missing `grant_type` or any other
//!   required parameter: 400 `invalid_request`. The grant type is checked before the client
//!   (so an unknown grant of an unknown client is `unsupported_grant_type`).
//!
//!   Success (§5.1): 200 `{"access_token","token_type":"Bearer","expires_in","scope",
//!   "refresh_token"}` (`refresh_token` for the device and authorization-code grants, and on a
//!   refresh only with rotation). Every answer, errors too, carries `Content-Type:
//!   application/json; charset=utf-8` (the charset parameter as Google and Microsoft send it),
//!   `Cache-Control: no-store` and `Pragma: no-cache` (§5.1). Errors are §5.2's
//!   `{"error","error_description"}`; the descriptions are informative (several are Google's
//!   texts), only `error` and the status code are contract.
//!
//!   Access and refresh tokens are random opaque strings of the base64url alphabet (`-` and `_`
//!   included); access tokens are [`DEFAULT_ACCESS_TOKEN_LEN`] characters unless
//!   [`FakeOAuth2::set_access_token_len`] says otherwise (Microsoft's JWT access tokens run to
//!   2,000–2,500 characters; a SASL client must cope).
//! * `POST /devicecode` ([`FakeOAuth2::device_authorization_url`], RFC 8628 §3.1/§3.2): form
//!   `client_id` and `scope` (both required, 400 `invalid_request`), client authentication as on
//!   `/token`. 200 `{"device_code","user_code","verification_uri","expires_in":900,"interval":5,
//!   "message"}` in Microsoft's shape, or with [`FakeOAuth2::set_google_device_response`]
//!   Google's `{"device_code","user_code","verification_url","expires_in","interval"}`: each
//!   provider sends only its own name of the page, and a client must accept either. `interval`
//!   is [`FakeOAuth2::set_device_interval`].
//! * Polling `/token` with `grant_type=urn:ietf:params:oauth:grant-type:device_code` (RFC 8628
//!   §3.4/§3.5), each answer 400 unless it succeeds: a poll sooner than `interval` seconds after
//!   the previous poll of that device code, **or after the device authorization response for the
//!   first poll** (§3.5 "before each new request"), answers `slow_down` and adds 5 s to that
//!   device code's interval for every later poll; then `authorization_pending` for the scripted
//!   number of polls ([`FakeOAuth2::script_device_flow`]; polls that
//!   [`FakeOAuth2::script_slow_down`] answers `slow_down` although they kept the interval come
//!   first and do not count); then the outcome: tokens (with a
//!   `refresh_token`) for the approving user, `access_denied` or `expired_token`. Once
//!   `expires_in` has passed, `expired_token`. After a final answer (tokens, denial, expiry) the
//!   device code is used up: `invalid_grant`. An unknown device code is `invalid_grant`
//!   (Microsoft says `bad_verification_code`). A device code polled by another client:
//!   `invalid_grant`. Without a script a device code stays pending until it expires.
//! * `GET /authorize` ([`FakeOAuth2::authorization_url`], RFC 6749 §4.1.1, RFC 7636 §4.3, RFC 8252
//!   §7.3): approves at once (nobody clicks in a test) as the user of
//!   [`FakeOAuth2::set_authorize_username`] and answers 302 to `redirect_uri?code=…&state=…`.
//!   A missing or unknown `client_id`, or a `redirect_uri` that is missing, not `http://` on a
//!   loopback host (`127.0.0.1`, `[::1]`, `localhost`; any port and path), or has a fragment, is
//!   400 with a text page and no redirect (§4.1.2.1: never redirect to an unverified URI). Other
//!   errors are redirected as `?error=…&error_description=…&state=…` (§4.1.2.1, RFC 7636 §4.4.1):
//!   `response_type` ≠ `code` → `unsupported_response_type`; no `code_challenge`, a
//!   `code_challenge_method` other than `S256` (PKCE is required, `plain` refused) or a challenge
//!   that is not 43–128 unreserved characters → `invalid_request`; no `scope` →
//!   `invalid_request`; no user set → `access_denied` (the user declined). **Deviation:** the
//!   brief asked for a 400 on missing PKCE; RFC 7636 §4.4.1 reports it through the redirect, as
//!   here.
//! * `POST /introspect` ([`FakeOAuth2::introspection_url`], RFC 7662 §2.1/§2.2), as Dovecot 2.3's
//!   `passdb oauth2` with `introspection_mode = post` calls it: form
//!   `token=<T>&client_id=<id>&client_secret=<secret>` (the last two empty unless configured in
//!   `dovecot-oauth2.conf.ext`; see `src/lib-oauth2/oauth2-request.c` of Dovecot 2.3.19).
//!   Introspection is not authenticated here (RFC 7662 §2.1 wants it; Dovecot is the only
//!   caller). 200 `{"active":true,"username","email","sub","scope","client_id","token_type":
//!   "Bearer","exp","iat"}` (`exp`/`iat` in Unix seconds) for a live access token, `{"active":
//!   false}` for an unknown, expired or revoked one. No `token`: 400 `invalid_request`.
//!
//! Every call to `/token`, `/devicecode` and `/authorize` is recorded ([`TokenRequest`], secrets
//! included, but its `Debug` prints only a summary); introspections separately
//! ([`Introspection`]). [`FakeOAuth2::wait_for`] awaits a condition on the record instead of
//! sleeping.
//!
//! # Not modelled
//!
//! Scopes are free strings (no `invalid_scope` for unknown ones); `offline_access` /
//! `access_type=offline` only matter with [`FakeOAuth2::set_require_offline_access`]; no ID
//! tokens, no `ext_expires_in`, no token revocation endpoint, no OpenID discovery. Google's
//! device-flow polls may use other 4xx status codes than 400 (this fake answers RFC 8628's 400
//! for every poll error, as Microsoft does): a client should read the JSON `error` of any 4xx.

// Every test crate compiles this file (`tests/support/mod.rs`); none of them uses every helper.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rand::Rng as _;
use serde_json::{Map, Value, json};
use sha2::{Digest as _, Sha256};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

/// `expires_in` of new access tokens unless [`FakeOAuth2::set_access_token_lifetime`] changes
/// it, in seconds (what Google and Microsoft answer).
pub const DEFAULT_ACCESS_TOKEN_LIFETIME_SECS: u64 = 3599;
/// Length of new access tokens in characters unless [`FakeOAuth2::set_access_token_len`]
/// changes it (about the size of Google's `ya29.` tokens).
pub const DEFAULT_ACCESS_TOKEN_LEN: usize = 220;
/// `interval` of new device codes unless [`FakeOAuth2::set_device_interval`] changes it, in
/// seconds (RFC 8628 §3.2's default; Google and Microsoft answer 5).
pub const DEFAULT_DEVICE_INTERVAL_SECS: u64 = 5;
/// `expires_in` of device codes unless [`FakeOAuth2::set_device_code_lifetime`] changes it, in
/// seconds (Microsoft's 15 minutes).
pub const DEFAULT_DEVICE_CODE_LIFETIME_SECS: u64 = 900;
/// What a `slow_down` adds to a device code's interval, in seconds (RFC 8628 §3.5).
pub const SLOW_DOWN_STEP_SECS: u64 = 5;
/// Lifetime of an authorization code, in seconds (RFC 6749 §4.1.2: at most 10 minutes).
pub const AUTH_CODE_LIFETIME_SECS: u64 = 600;
/// Longest `exp − iat` of a JWT bearer assertion, in seconds (Google: 60 minutes).
pub const JWT_MAX_LIFETIME_SECS: i64 = 3600;
/// How far in the future an assertion's `iat` may be, in seconds (clock skew the fake allows).
pub const JWT_CLOCK_SKEW_SECS: i64 = 60;
/// Scope of refresh tokens made by [`FakeOAuth2::issue_refresh_token`].
pub const DEFAULT_SCOPE: &str = "https://mail.google.com/";
/// `grant_type` of the device flow (RFC 8628 §3.4).
pub const DEVICE_CODE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";
/// `grant_type` of a JWT bearer assertion (RFC 7523 §2.1).
pub const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// The realm of the `WWW-Authenticate` challenge on a failed HTTP Basic client authentication.
pub const BASIC_REALM: &str = "fake-oauth2";

/// The Google service-account key file of the tests (`type`, `project_id`, `private_key_id`,
/// `private_key` as PKCS#8 PEM, `client_email`, `client_id`, `token_uri` = Google's, …), made
/// with `openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048` (see
/// `tests/fixtures/oauth2/README.md`). [`service_account_key_json`] gives it with another
/// `token_uri`.
pub const SERVICE_ACCOUNT_KEY_FILE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/oauth2/service-account.json"
);
/// The public key of [`SERVICE_ACCOUNT_KEY_FILE`] as PKCS#1 `RSAPublicKey` DER, what
/// [`FakeOAuth2::add_service_account`] takes.
pub const SERVICE_ACCOUNT_PUBLIC_KEY_DER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/oauth2/service-account.pub.der"
);

/// The JSON of [`SERVICE_ACCOUNT_KEY_FILE`] with `token_uri` replaced (e.g. by
/// [`FakeOAuth2::token_url`]), to write where the client under test reads its key file.
pub fn service_account_key_json(token_uri: &str) -> String {
    let text = std::fs::read_to_string(SERVICE_ACCOUNT_KEY_FILE).expect("read the key fixture");
    let mut json: Value = serde_json::from_str(&text).expect("key fixture is JSON");
    json["token_uri"] = Value::String(token_uri.to_owned());
    serde_json::to_string_pretty(&json).expect("serialize")
}

// ---------------------------------------------------------------------------------------------
// Public types
// ---------------------------------------------------------------------------------------------

/// How a scripted device flow ends after its `authorization_pending` polls
/// ([`FakeOAuth2::script_device_flow`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceOutcome {
    /// The user approves: the next poll gets tokens for `username`, with a `refresh_token`
    /// (see [`FakeOAuth2::set_require_offline_access`]).
    Approve {
        /// The mailbox the tokens are for (`username`/`email` in introspection).
        username: String,
    },
    /// The user declines: `access_denied`.
    Deny,
    /// The user never finishes: `expired_token`.
    Expire,
}

/// Which endpoint a [`TokenRequest`] went to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /token`.
    Token,
    /// `POST /devicecode`.
    DeviceAuthorization,
    /// `GET /authorize`.
    Authorize,
}

/// How the client authenticated on `/token` or `/devicecode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// No client credentials at all.
    None,
    /// `client_id` (and `client_secret`, for a confidential client) in the form body.
    Body,
    /// `Authorization: Basic`.
    Basic,
}

/// One recorded call to `/token`, `/devicecode` or `/authorize`.
///
/// `Debug` prints a one-line summary without secrets; the secrets are in [`TokenRequest::params`].
#[derive(Clone)]
pub struct TokenRequest {
    /// 1, 2, … in arrival order (shared by all three endpoints).
    pub seq: u64,
    /// Which endpoint.
    pub endpoint: Endpoint,
    /// `grant_type` as sent (`/token` only).
    pub grant_type: Option<String>,
    /// The client: from HTTP Basic or the `client_id` parameter.
    pub client_id: Option<String>,
    /// How the client authenticated.
    pub client_auth: ClientAuth,
    /// `scope` as sent.
    pub scope: Option<String>,
    /// On success of a token-issuing call: the mailbox the tokens are for.
    pub username: Option<String>,
    /// The `refresh_token` parameter of a refresh grant.
    pub refresh_token_used: Option<String>,
    /// The `refresh_token` of a successful answer, if any.
    pub refresh_token_issued: Option<String>,
    /// The `access_token` of a successful answer, if any.
    pub access_token_issued: Option<String>,
    /// When the fake received the request (tokio clock).
    pub received_at: Instant,
    /// HTTP status of the answer.
    pub status: u16,
    /// `"ok"` or the OAuth error code answered (`"invalid_grant"`, `"slow_down"`, …).
    pub outcome: String,
    /// Every form (or query) parameter as received, secrets included.
    pub params: BTreeMap<String, String>,
}

impl TokenRequest {
    /// Whether the call succeeded.
    pub fn is_ok(&self) -> bool {
        self.outcome == "ok"
    }

    /// A parameter as received.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }
}

impl fmt::Debug for TokenRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "#{} {:?} grant={} client={} auth={:?} -> {} {}",
            self.seq,
            self.endpoint,
            self.grant_type.as_deref().unwrap_or("-"),
            self.client_id.as_deref().unwrap_or("-"),
            self.client_auth,
            self.status,
            self.outcome
        )
    }
}

/// One recorded call to `/introspect`.
#[derive(Clone)]
pub struct Introspection {
    /// The `token` parameter (`None` if missing).
    pub token: Option<String>,
    /// What the fake answered for `active`.
    pub active: bool,
    /// The token's mailbox when active.
    pub username: Option<String>,
    /// HTTP status of the answer.
    pub status: u16,
    /// When the fake received the request (tokio clock).
    pub received_at: Instant,
    /// Every non-empty form parameter as received (Dovecot also sends `client_id` and
    /// `client_secret`, empty unless configured, so absent here).
    pub params: BTreeMap<String, String>,
}

impl fmt::Debug for Introspection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "introspect {} -> {} active={} user={}",
            self.token
                .as_deref()
                .map(|t| format!("{}…", t.chars().take(8).collect::<String>()))
                .unwrap_or_else(|| "-".into()),
            self.status,
            self.active,
            self.username.as_deref().unwrap_or("-")
        )
    }
}

// ---------------------------------------------------------------------------------------------
// The handle
// ---------------------------------------------------------------------------------------------

/// A running fake authorization server. Cheap to clone; the server stops when the last clone is
/// dropped.
#[derive(Clone)]
pub struct FakeOAuth2 {
    handle: Arc<Handle>,
}

struct Handle {
    inner: Arc<Inner>,
    addr: SocketAddr,
    stop: Mutex<Option<oneshot::Sender<()>>>,
    server: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = stop.send(());
        }
    }
}

struct Inner {
    base_url: String,
    state: Mutex<ServerState>,
    changes: watch::Sender<u64>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, ServerState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn notify(&self) {
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn token_url(&self) -> String {
        format!("{}/token", self.base_url)
    }
}

impl fmt::Debug for FakeOAuth2 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FakeOAuth2({})", self.url())
    }
}

impl FakeOAuth2 {
    /// Binds `127.0.0.1:0` and serves until the last clone is dropped.
    pub async fn start() -> FakeOAuth2 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake OAuth2 server");
        let addr = listener.local_addr().expect("local address");
        let (changes, _) = watch::channel(0u64);
        let inner = Arc::new(Inner {
            base_url: format!("http://{addr}"),
            state: Mutex::new(ServerState::new()),
            changes,
        });
        let app = Router::new()
            .route("/token", post(token_endpoint))
            .route("/devicecode", post(device_endpoint))
            .route("/authorize", get(authorize_endpoint))
            .route("/introspect", post(introspect_endpoint))
            .with_state(inner.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
        });
        FakeOAuth2 {
            handle: Arc::new(Handle {
                inner,
                addr,
                stop: Mutex::new(Some(stop)),
                server: Mutex::new(Some(server)),
            }),
        }
    }

    /// Stops the server for every clone (like dropping the last one) and waits (≤ 5 s) until
    /// it no longer listens: later connections are refused.
    pub async fn shutdown(self) {
        let stop = self.handle.stop.lock().unwrap().take();
        if let Some(stop) = stop {
            let _ = stop.send(());
        }
        let server = self.handle.server.lock().unwrap().take();
        if let Some(server) = server {
            let abort = server.abort_handle();
            if tokio::time::timeout(Duration::from_secs(5), server)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }

    fn inner(&self) -> &Inner {
        &self.handle.inner
    }

    fn edit<T>(&self, change: impl FnOnce(&mut ServerState) -> T) -> T {
        let out = change(&mut self.inner().lock());
        self.inner().notify();
        out
    }

    // ----- addresses --------------------------------------------------------------------------

    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub fn url(&self) -> String {
        self.inner().base_url.clone()
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.handle.addr
    }

    /// `{url}/token`: the token endpoint, and the `aud` a JWT bearer assertion must carry.
    pub fn token_url(&self) -> String {
        self.inner().token_url()
    }

    /// `{url}/devicecode`: the device authorization endpoint (RFC 8628 §3.1).
    pub fn device_authorization_url(&self) -> String {
        format!("{}/devicecode", self.url())
    }

    /// `{url}/authorize`: the authorization endpoint (authorization code + PKCE, loopback
    /// redirect).
    pub fn authorization_url(&self) -> String {
        format!("{}/authorize", self.url())
    }

    /// `{url}/introspect`: the RFC 7662 endpoint for Dovecot's `passdb oauth2`.
    pub fn introspection_url(&self) -> String {
        format!("{}/introspect", self.url())
    }

    /// `{url}/device`: the `verification_uri` shown to the user (nothing is served there).
    pub fn verification_uri(&self) -> String {
        format!("{}/device", self.url())
    }

    // ----- registrations ----------------------------------------------------------------------

    /// Registers a client: confidential with `Some(secret)`, public (sends only `client_id`)
    /// with `None`. Registering an id again replaces it (and drops an app registration).
    pub fn add_client(&self, client_id: &str, client_secret: Option<&str>) {
        self.edit(|st| {
            st.clients.insert(
                client_id.to_owned(),
                Client {
                    secret: client_secret.map(str::to_owned),
                    app_mailbox: None,
                },
            );
        });
    }

    /// Registers a confidential app for the `client_credentials` grant: its app-only tokens are
    /// valid for `username`'s mailbox (Microsoft's `IMAP.AccessAsApp` with the app granted that
    /// mailbox). The answer has no `refresh_token`.
    pub fn add_app(&self, client_id: &str, client_secret: &str, username: &str) {
        self.edit(|st| {
            st.clients.insert(
                client_id.to_owned(),
                Client {
                    secret: Some(client_secret.to_owned()),
                    app_mailbox: Some(username.to_owned()),
                },
            );
        });
    }

    /// Registers a Google service account for the JWT bearer grant: `client_email` is the
    /// assertion's `iss`, `public_key_der` its RSA public key as PKCS#1 `RSAPublicKey` DER
    /// (`openssl rsa -RSAPublicKey_out -outform DER`; `tests/fixtures/oauth2/service-account.pub.der`).
    pub fn add_service_account(&self, client_email: &str, public_key_der: &[u8]) {
        self.edit(|st| {
            st.service_accounts
                .insert(client_email.to_owned(), public_key_der.to_vec());
        });
    }

    /// Registers the service account of [`SERVICE_ACCOUNT_KEY_FILE`] and returns its
    /// `client_email`.
    pub fn add_fixture_service_account(&self) -> String {
        let text = std::fs::read_to_string(SERVICE_ACCOUNT_KEY_FILE).expect("read the key fixture");
        let json: Value = serde_json::from_str(&text).expect("key fixture is JSON");
        let email = json["client_email"]
            .as_str()
            .expect("client_email")
            .to_owned();
        let der = std::fs::read(SERVICE_ACCOUNT_PUBLIC_KEY_DER).expect("read the public key");
        self.add_service_account(&email, &der);
        email
    }

    // ----- tokens -----------------------------------------------------------------------------

    /// A fresh valid refresh token of `client_id` for `username` with [`DEFAULT_SCOPE`]
    /// (as if a consent had happened). Panics on an unknown client (a bug in the test).
    pub fn issue_refresh_token(&self, client_id: &str, username: &str) -> String {
        self.issue_refresh_token_with_scope(client_id, username, DEFAULT_SCOPE)
    }

    /// [`FakeOAuth2::issue_refresh_token`] with an explicit `scope` (space-separated).
    pub fn issue_refresh_token_with_scope(
        &self,
        client_id: &str,
        username: &str,
        scope: &str,
    ) -> String {
        self.edit(|st| {
            assert!(
                st.clients.contains_key(client_id),
                "issue_refresh_token: unknown client {client_id:?}; add_client first"
            );
            st.new_refresh_token(client_id, username, scope)
        })
    }

    /// A fresh live access token of `client_id` for `username` (lifetime as set), without going
    /// through `/token`: for tests of the IMAP side alone. Panics on an unknown client.
    pub fn issue_access_token(&self, client_id: &str, username: &str) -> String {
        self.edit(|st| {
            assert!(
                st.clients.contains_key(client_id),
                "issue_access_token: unknown client {client_id:?}; add_client first"
            );
            let (token, _) = st.new_access_token(client_id, username, DEFAULT_SCOPE);
            token
        })
    }

    /// Revokes one refresh token: its next use is `invalid_grant`.
    pub fn revoke_refresh_token(&self, refresh_token: &str) {
        self.edit(|st| {
            if let Some(rt) = st.refresh_tokens.get_mut(refresh_token) {
                rt.revoked = true;
            }
        });
    }

    /// Revokes every access token issued so far for `username`: introspection says
    /// `{"active":false}` for them. Tokens issued later are live.
    pub fn revoke_access_tokens(&self, username: &str) {
        self.edit(|st| {
            for at in st.access_tokens.values_mut() {
                if at.username == username {
                    at.revoked = true;
                }
            }
        });
    }

    /// Revokes one access token.
    pub fn revoke_access_token(&self, access_token: &str) {
        self.edit(|st| {
            if let Some(at) = st.access_tokens.get_mut(access_token) {
                at.revoked = true;
            }
        });
    }

    /// Whether introspection would answer `active: true` for `access_token` now.
    pub fn is_access_token_active(&self, access_token: &str) -> bool {
        let now = Instant::now();
        self.inner()
            .lock()
            .access_tokens
            .get(access_token)
            .is_some_and(|at| at.is_active(now))
    }

    /// Whether `refresh_token` would be accepted now (known, not revoked or rotated away).
    pub fn is_refresh_token_valid(&self, refresh_token: &str) -> bool {
        self.inner()
            .lock()
            .refresh_tokens
            .get(refresh_token)
            .is_some_and(|rt| !rt.revoked)
    }

    // ----- behaviour --------------------------------------------------------------------------

    /// `expires_in` of access tokens issued from now on, in seconds (default
    /// [`DEFAULT_ACCESS_TOKEN_LIFETIME_SECS`]); such a token is inactive once that many seconds
    /// have passed since it was issued. `0` makes tokens that are expired at once.
    pub fn set_access_token_lifetime(&self, secs: u64) {
        self.edit(|st| st.access_token_lifetime = secs);
    }

    /// Length in characters of access tokens issued from now on (default
    /// [`DEFAULT_ACCESS_TOKEN_LEN`], at least 16).
    pub fn set_access_token_len(&self, chars: usize) {
        self.edit(|st| st.access_token_len = chars.max(16));
    }

    /// Refresh-token rotation (default off, Google's behaviour): when on, every refresh grant
    /// answers a new `refresh_token` and revokes the one it used (Microsoft answers a new one
    /// each time; see the module docs for the revocation).
    pub fn set_rotation(&self, on: bool) {
        self.edit(|st| st.rotation = on);
    }

    /// When on, the device and authorization-code grants answer a `refresh_token` only if the
    /// scope contains `offline_access` (Microsoft) or `/authorize` had `access_type=offline`
    /// (Google). Default off: they always do.
    pub fn set_require_offline_access(&self, on: bool) {
        self.edit(|st| st.require_offline_access = on);
    }

    /// `interval` of device codes issued from now on, in seconds (default
    /// [`DEFAULT_DEVICE_INTERVAL_SECS`]; `1` for fast tests, `0` turns the `slow_down` check off).
    pub fn set_device_interval(&self, secs: u64) {
        self.edit(|st| st.device_interval = secs);
    }

    /// Device authorization answers in Google's shape (`verification_url`, no `message`)
    /// instead of Microsoft's (`verification_uri` and `message`, the default).
    pub fn set_google_device_response(&self, on: bool) {
        self.edit(|st| st.google_device_response = on);
    }

    /// `expires_in` of device codes issued from now on, in seconds (default
    /// [`DEFAULT_DEVICE_CODE_LIFETIME_SECS`]).
    pub fn set_device_code_lifetime(&self, secs: u64) {
        self.edit(|st| st.device_code_lifetime = secs);
    }

    /// Scripts every device code issued from now on: `pending_polls` polls (that keep the
    /// interval) answer `authorization_pending`, the next one gets `outcome`. Polls answered
    /// `slow_down` do not count.
    pub fn script_device_flow(&self, pending_polls: u32, outcome: DeviceOutcome) {
        self.edit(|st| st.device_script = Some((pending_polls, outcome)));
    }

    /// Makes every device code issued from now on answer `slow_down` to its first `n` polls
    /// even when they kept the interval (a server under load; RFC 8628 §3.5 lets it say so at
    /// any time), each adding 5 s to that code's interval like any `slow_down`. These polls
    /// do not count as [`FakeOAuth2::script_device_flow`]'s pending ones. Default 0.
    pub fn script_slow_down(&self, n: u32) {
        self.edit(|st| st.device_slow_downs = n);
    }

    /// The user that `/authorize` approves as; `None` (the default) makes it answer
    /// `error=access_denied`, as when the user declines consent.
    pub fn set_authorize_username(&self, username: Option<&str>) {
        self.edit(|st| st.authorize_username = username.map(str::to_owned));
    }

    /// The next `n` calls to `/token` answer 503 `{"error":"temporarily_unavailable"}` (what
    /// Microsoft answers when busy) without looking at the request; they are recorded.
    pub fn fail_next_token_requests(&self, n: u32) {
        self.edit(|st| st.fail_token_requests = n);
    }

    /// While on, `/introspect` answers 503 with a text body: Dovecot then fails the login as a
    /// temporary failure (`NO [UNAVAILABLE]`) instead of a rejected token.
    pub fn fail_introspection(&self, on: bool) {
        self.edit(|st| st.fail_introspection = on);
    }

    // ----- observation ------------------------------------------------------------------------

    /// Every `/token`, `/devicecode` and `/authorize` call so far, in arrival order.
    pub fn requests(&self) -> Vec<TokenRequest> {
        self.inner().lock().requests.clone()
    }

    /// How many introspection calls arrived so far.
    pub fn introspections(&self) -> usize {
        self.inner().lock().introspections.len()
    }

    /// Every introspection call so far.
    pub fn introspection_log(&self) -> Vec<Introspection> {
        self.inner().lock().introspections.clone()
    }

    /// Awaits `check(requests)` (re-checked after every recorded call and every change through
    /// this handle); `Err` with a summary of the requests after `timeout`.
    pub async fn wait_for(
        &self,
        check: impl Fn(&[TokenRequest]) -> bool,
        timeout: Duration,
    ) -> Result<(), String> {
        self.wait_state(|st| check(&st.requests), timeout).await
    }

    /// Awaits at least `n` introspection calls.
    pub async fn wait_for_introspections(&self, n: usize, timeout: Duration) -> Result<(), String> {
        self.wait_state(|st| st.introspections.len() >= n, timeout)
            .await
    }

    async fn wait_state(
        &self,
        check: impl Fn(&ServerState) -> bool,
        timeout: Duration,
    ) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let mut rx = self.inner().changes.subscribe();
        loop {
            rx.borrow_and_update();
            if check(&self.inner().lock()) {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                let st = self.inner().lock();
                if check(&st) {
                    return Ok(());
                }
                return Err(format!(
                    "condition not met within {timeout:?}; requests: {:#?}; introspections: {:#?}",
                    st.requests, st.introspections
                ));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Server state
// ---------------------------------------------------------------------------------------------

struct Client {
    /// `None`: a public client.
    secret: Option<String>,
    /// Registered with `add_app`: the mailbox of its client-credentials tokens.
    app_mailbox: Option<String>,
}

struct RefreshToken {
    client_id: String,
    username: String,
    scope: String,
    revoked: bool,
}

struct AccessToken {
    client_id: String,
    username: String,
    scope: String,
    issued_at: Instant,
    issued_unix: u64,
    lifetime_secs: u64,
    revoked: bool,
}

impl AccessToken {
    fn is_active(&self, now: Instant) -> bool {
        !self.revoked && now < self.issued_at + Duration::from_secs(self.lifetime_secs)
    }
}

struct DeviceGrant {
    client_id: String,
    scope: String,
    issued_at: Instant,
    expires_at: Instant,
    /// Current interval in seconds (grows by 5 on every `slow_down`).
    interval: u64,
    last_poll: Option<Instant>,
    /// Polls that keep the interval and still get `slow_down` ([`FakeOAuth2::script_slow_down`]).
    forced_slow_downs: u32,
    pending_left: u32,
    /// `None`: never decided (pending until expiry).
    outcome: Option<DeviceOutcome>,
    finished: bool,
}

struct AuthCode {
    client_id: String,
    redirect_uri: String,
    code_challenge: String,
    username: String,
    scope: String,
    offline: bool,
    expires_at: Instant,
    used: bool,
    /// Tokens issued by its first use: revoked on a second use (RFC 6749 §4.1.2).
    issued_access: Option<String>,
    issued_refresh: Option<String>,
}

struct ServerState {
    clients: HashMap<String, Client>,
    service_accounts: HashMap<String, Vec<u8>>,
    refresh_tokens: HashMap<String, RefreshToken>,
    access_tokens: HashMap<String, AccessToken>,
    device_codes: HashMap<String, DeviceGrant>,
    auth_codes: HashMap<String, AuthCode>,
    access_token_lifetime: u64,
    access_token_len: usize,
    rotation: bool,
    require_offline_access: bool,
    device_interval: u64,
    google_device_response: bool,
    device_code_lifetime: u64,
    device_script: Option<(u32, DeviceOutcome)>,
    device_slow_downs: u32,
    authorize_username: Option<String>,
    fail_token_requests: u32,
    fail_introspection: bool,
    requests: Vec<TokenRequest>,
    introspections: Vec<Introspection>,
}

impl ServerState {
    fn new() -> Self {
        ServerState {
            clients: HashMap::new(),
            service_accounts: HashMap::new(),
            refresh_tokens: HashMap::new(),
            access_tokens: HashMap::new(),
            device_codes: HashMap::new(),
            auth_codes: HashMap::new(),
            access_token_lifetime: DEFAULT_ACCESS_TOKEN_LIFETIME_SECS,
            access_token_len: DEFAULT_ACCESS_TOKEN_LEN,
            rotation: false,
            require_offline_access: false,
            device_interval: DEFAULT_DEVICE_INTERVAL_SECS,
            google_device_response: false,
            device_code_lifetime: DEFAULT_DEVICE_CODE_LIFETIME_SECS,
            device_script: None,
            device_slow_downs: 0,
            authorize_username: None,
            fail_token_requests: 0,
            fail_introspection: false,
            requests: Vec::new(),
            introspections: Vec::new(),
        }
    }

    fn new_refresh_token(&mut self, client_id: &str, username: &str, scope: &str) -> String {
        let token = random_string("1//", 100);
        self.refresh_tokens.insert(
            token.clone(),
            RefreshToken {
                client_id: client_id.to_owned(),
                username: username.to_owned(),
                scope: scope.to_owned(),
                revoked: false,
            },
        );
        token
    }

    /// A new access token and its `expires_in`.
    fn new_access_token(&mut self, client_id: &str, username: &str, scope: &str) -> (String, u64) {
        let token = random_string("at.", self.access_token_len);
        let lifetime = self.access_token_lifetime;
        self.access_tokens.insert(
            token.clone(),
            AccessToken {
                client_id: client_id.to_owned(),
                username: username.to_owned(),
                scope: scope.to_owned(),
                issued_at: Instant::now(),
                issued_unix: unix_now(),
                lifetime_secs: lifetime,
                revoked: false,
            },
        );
        (token, lifetime)
    }

    fn record(&mut self, mut request: TokenRequest) {
        request.seq = self.requests.len() as u64 + 1;
        self.requests.push(request);
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP plumbing
// ---------------------------------------------------------------------------------------------

/// An RFC 6749 §5.2 error answer.
struct OAuthError {
    status: StatusCode,
    code: &'static str,
    description: String,
    /// Add `WWW-Authenticate: Basic` (a failed HTTP Basic client authentication).
    basic_challenge: bool,
}

fn err(status: StatusCode, code: &'static str, description: impl Into<String>) -> OAuthError {
    OAuthError {
        status,
        code,
        description: description.into(),
        basic_challenge: false,
    }
}

fn invalid_request(description: impl Into<String>) -> OAuthError {
    err(StatusCode::BAD_REQUEST, "invalid_request", description)
}

fn invalid_grant(description: impl Into<String>) -> OAuthError {
    err(StatusCode::BAD_REQUEST, "invalid_grant", description)
}

fn invalid_client(description: impl Into<String>, auth: ClientAuth) -> OAuthError {
    OAuthError {
        basic_challenge: auth == ClientAuth::Basic,
        ..err(StatusCode::UNAUTHORIZED, "invalid_client", description)
    }
}

/// JSON with the headers of RFC 6749 §5.1.
fn json_response(status: StatusCode, body: &Value) -> Response {
    let mut resp = (status, body.to_string()).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    resp
}

fn error_response(e: &OAuthError) -> Response {
    let mut resp = json_response(
        e.status,
        &json!({"error": e.code, "error_description": e.description}),
    );
    if e.basic_challenge {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_str(&format!("Basic realm=\"{BASIC_REALM}\"")).unwrap(),
        );
    }
    resp
}

/// Parses an `application/x-www-form-urlencoded` body or query (RFC 6749 §3.2): empty values
/// count as absent, a repeated parameter is `invalid_request`. Returns every parameter seen
/// even on error, for the record.
fn parse_form(data: &[u8]) -> (BTreeMap<String, String>, Result<(), OAuthError>) {
    let mut params = BTreeMap::new();
    let mut result = Ok(());
    for (k, v) in url::form_urlencoded::parse(data) {
        if v.is_empty() {
            continue;
        }
        if params.insert(k.to_string(), v.to_string()).is_some() && result.is_ok() {
            result = Err(invalid_request(format!(
                "Parameter {k} was included more than once."
            )));
        }
    }
    (params, result)
}

fn check_form_content_type(headers: &HeaderMap) -> Result<(), OAuthError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = ct.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        Ok(())
    } else {
        Err(invalid_request(format!(
            "Content-Type must be application/x-www-form-urlencoded, got {ct:?}."
        )))
    }
}

/// Form-urlencoding decode of one half of HTTP Basic credentials (RFC 6749 §2.3.1).
fn form_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

/// The result of client authentication.
struct Authenticated {
    client_id: String,
}

/// RFC 6749 §2.3.1: Basic or body credentials. Fills `rec.client_id`/`rec.client_auth`.
/// `required = false` (JWT bearer grant) accepts a request without any client credentials.
fn authenticate_client(
    st: &ServerState,
    headers: &HeaderMap,
    params: &BTreeMap<String, String>,
    rec: &mut TokenRequest,
    required: bool,
) -> Result<Option<Authenticated>, OAuthError> {
    let basic = match headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        Some(value) if value.len() > 6 && value[..6].eq_ignore_ascii_case("basic ") => {
            rec.client_auth = ClientAuth::Basic;
            let decoded = STANDARD
                .decode(value[6..].trim())
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| {
                    invalid_client("Malformed HTTP Basic credentials.", ClientAuth::Basic)
                })?;
            let (id, secret) = decoded.split_once(':').ok_or_else(|| {
                invalid_client("Malformed HTTP Basic credentials.", ClientAuth::Basic)
            })?;
            Some((form_decode(id), form_decode(secret)))
        }
        _ => None,
    };
    let (client_id, secret) = match basic {
        Some((id, secret)) => {
            rec.client_id = Some(id.clone());
            if params.contains_key("client_secret") {
                return Err(invalid_request(
                    "The client used more than one authentication method (HTTP Basic and \
                     client_secret in the body).",
                ));
            }
            if let Some(body_id) = params.get("client_id")
                && *body_id != id
            {
                return Err(invalid_request(
                    "client_id in the body differs from the HTTP Basic user.",
                ));
            }
            (id, (!secret.is_empty()).then_some(secret))
        }
        None => {
            let Some(id) = params.get("client_id").cloned() else {
                if required {
                    return Err(invalid_request(
                        "Could not determine client ID from request.",
                    ));
                }
                return Ok(None);
            };
            rec.client_id = Some(id.clone());
            rec.client_auth = ClientAuth::Body;
            (id, params.get("client_secret").cloned())
        }
    };
    let auth = rec.client_auth;
    let Some(client) = st.clients.get(&client_id) else {
        return Err(invalid_client("The OAuth client was not found.", auth));
    };
    match (&client.secret, secret) {
        (Some(_), None) => Err(invalid_client("client_secret is missing.", auth)),
        (Some(expected), Some(given)) if *expected != given => {
            Err(invalid_client("Unauthorized", auth))
        }
        (None, Some(_)) => Err(invalid_client(
            "Client is public so neither 'client_assertion' nor 'client_secret' should be \
             presented.",
            auth,
        )),
        _ => Ok(Some(Authenticated { client_id })),
    }
}

fn new_record(endpoint: Endpoint) -> TokenRequest {
    TokenRequest {
        seq: 0,
        endpoint,
        grant_type: None,
        client_id: None,
        client_auth: ClientAuth::None,
        scope: None,
        username: None,
        refresh_token_used: None,
        refresh_token_issued: None,
        access_token_issued: None,
        received_at: Instant::now(),
        status: 0,
        outcome: String::new(),
        params: BTreeMap::new(),
    }
}

/// Records `rec` with the outcome of `result` and renders it.
fn finish(
    inner: &Inner,
    st: &mut ServerState,
    mut rec: TokenRequest,
    result: Result<Value, OAuthError>,
) -> Response {
    let resp = match &result {
        Ok(body) => {
            rec.status = 200;
            rec.outcome = "ok".into();
            rec.access_token_issued = body["access_token"].as_str().map(str::to_owned);
            rec.refresh_token_issued = body["refresh_token"].as_str().map(str::to_owned);
            json_response(StatusCode::OK, body)
        }
        Err(e) => {
            rec.status = e.status.as_u16();
            rec.outcome = e.code.to_owned();
            rec.username = None;
            error_response(e)
        }
    };
    st.record(rec);
    inner.notify();
    resp
}

// ---------------------------------------------------------------------------------------------
// /token
// ---------------------------------------------------------------------------------------------

async fn token_endpoint(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut rec = new_record(Endpoint::Token);
    let (params, form_ok) = parse_form(&body);
    rec.params = params.clone();
    rec.grant_type = params.get("grant_type").cloned();
    rec.scope = params.get("scope").cloned();
    let mut st = inner.lock();
    if st.fail_token_requests > 0 {
        st.fail_token_requests -= 1;
        let e = err(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            "The server is temporarily too busy to handle the request.",
        );
        return finish(&inner, &mut st, rec, Err(e));
    }
    let token_url = inner.token_url();
    let result = (|| -> Result<Value, OAuthError> {
        check_form_content_type(&headers)?;
        form_ok?;
        let grant = params
            .get("grant_type")
            .ok_or_else(|| invalid_request("Missing required parameter: grant_type"))?
            .clone();
        let known = [
            "refresh_token",
            DEVICE_CODE_GRANT,
            "authorization_code",
            "client_credentials",
            JWT_BEARER_GRANT,
        ];
        if !known.contains(&grant.as_str()) {
            return Err(err(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                format!("Invalid grant_type: {grant}"),
            ));
        }
        let client =
            authenticate_client(&st, &headers, &params, &mut rec, grant != JWT_BEARER_GRANT)?;
        match grant.as_str() {
            "refresh_token" => refresh_grant(&mut st, client.unwrap(), &params, &mut rec),
            DEVICE_CODE_GRANT => device_grant(&mut st, client.unwrap(), &params, &mut rec),
            "authorization_code" => auth_code_grant(&mut st, client.unwrap(), &params, &mut rec),
            "client_credentials" => {
                client_credentials_grant(&mut st, client.unwrap(), &params, &mut rec)
            }
            _ => jwt_bearer_grant(&mut st, client, &params, &mut rec, &token_url),
        }
    })();
    finish(&inner, &mut st, rec, result)
}

fn required<'a>(params: &'a BTreeMap<String, String>, name: &str) -> Result<&'a str, OAuthError> {
    params
        .get(name)
        .map(String::as_str)
        .ok_or_else(|| invalid_request(format!("Missing required parameter: {name}")))
}

fn scopes(s: &str) -> Vec<&str> {
    s.split(' ').filter(|p| !p.is_empty()).collect()
}

/// The §5.1 success body.
fn token_body(
    access_token: String,
    expires_in: u64,
    scope: Option<&str>,
    refresh_token: Option<String>,
) -> Value {
    let mut m = Map::new();
    m.insert("access_token".into(), Value::String(access_token));
    m.insert("token_type".into(), Value::String("Bearer".into()));
    m.insert("expires_in".into(), Value::from(expires_in));
    if let Some(scope) = scope {
        m.insert("scope".into(), Value::String(scope.to_owned()));
    }
    if let Some(rt) = refresh_token {
        m.insert("refresh_token".into(), Value::String(rt));
    }
    Value::Object(m)
}

fn refresh_grant(
    st: &mut ServerState,
    client: Authenticated,
    params: &BTreeMap<String, String>,
    rec: &mut TokenRequest,
) -> Result<Value, OAuthError> {
    let token = required(params, "refresh_token")?;
    rec.refresh_token_used = Some(token.to_owned());
    let (username, scope) = match st.refresh_tokens.get(token) {
        Some(rt) if !rt.revoked && rt.client_id == client.client_id => {
            (rt.username.clone(), rt.scope.clone())
        }
        _ => return Err(invalid_grant("Token has been expired or revoked.")),
    };
    // RFC 6749 §6: a narrower scope may be asked for, never a wider one.
    let granted = match params.get("scope") {
        Some(asked) => {
            let have = scopes(&scope);
            if let Some(extra) = scopes(asked).into_iter().find(|s| !have.contains(s)) {
                return Err(err(
                    StatusCode::BAD_REQUEST,
                    "invalid_scope",
                    format!("The scope {extra} was not granted to this refresh token."),
                ));
            }
            asked.clone()
        }
        None => scope.clone(),
    };
    rec.username = Some(username.clone());
    let (at, expires_in) = st.new_access_token(&client.client_id, &username, &granted);
    let new_rt = if st.rotation {
        st.refresh_tokens.get_mut(token).unwrap().revoked = true;
        Some(st.new_refresh_token(&client.client_id, &username, &scope))
    } else {
        None
    };
    Ok(token_body(at, expires_in, Some(&granted), new_rt))
}

fn wants_refresh_token(st: &ServerState, scope: &str, access_type_offline: bool) -> bool {
    !st.require_offline_access || access_type_offline || scopes(scope).contains(&"offline_access")
}

fn device_grant(
    st: &mut ServerState,
    client: Authenticated,
    params: &BTreeMap<String, String>,
    rec: &mut TokenRequest,
) -> Result<Value, OAuthError> {
    let code = required(params, "device_code")?;
    let now = Instant::now();
    let Some(grant) = st.device_codes.get_mut(code) else {
        return Err(invalid_grant("The device code is not known."));
    };
    if grant.client_id != client.client_id {
        return Err(invalid_grant(
            "The device code was issued to another client.",
        ));
    }
    if grant.finished {
        return Err(invalid_grant("The device code has already been used."));
    }
    let since = grant.last_poll.unwrap_or(grant.issued_at);
    grant.last_poll = Some(now);
    if now >= grant.expires_at {
        grant.finished = true;
        return Err(err(
            StatusCode::BAD_REQUEST,
            "expired_token",
            "The device code has expired.",
        ));
    }
    // RFC 8628 §3.5: too soon (or a scripted busy server) -> slow_down, and the interval
    // grows by 5 s for good.
    let too_soon = now.duration_since(since) < Duration::from_secs(grant.interval);
    if too_soon || grant.forced_slow_downs > 0 {
        if !too_soon {
            grant.forced_slow_downs -= 1;
        }
        grant.interval += SLOW_DOWN_STEP_SECS;
        return Err(err(
            StatusCode::BAD_REQUEST,
            "slow_down",
            format!(
                "Polling too frequently; wait at least {} s between polls.",
                grant.interval
            ),
        ));
    }
    if grant.pending_left > 0 || grant.outcome.is_none() {
        grant.pending_left = grant.pending_left.saturating_sub(1);
        return Err(err(
            StatusCode::BAD_REQUEST,
            "authorization_pending",
            "The user has not yet completed authorization.",
        ));
    }
    grant.finished = true;
    let scope = grant.scope.clone();
    match grant.outcome.clone().unwrap() {
        DeviceOutcome::Approve { username } => {
            rec.username = Some(username.clone());
            let (at, expires_in) = st.new_access_token(&client.client_id, &username, &scope);
            let rt = wants_refresh_token(st, &scope, false)
                .then(|| st.new_refresh_token(&client.client_id, &username, &scope));
            Ok(token_body(at, expires_in, Some(&scope), rt))
        }
        DeviceOutcome::Deny => Err(err(
            StatusCode::BAD_REQUEST,
            "access_denied",
            "The user declined the authorization request.",
        )),
        DeviceOutcome::Expire => Err(err(
            StatusCode::BAD_REQUEST,
            "expired_token",
            "The device code has expired.",
        )),
    }
}

fn auth_code_grant(
    st: &mut ServerState,
    client: Authenticated,
    params: &BTreeMap<String, String>,
    rec: &mut TokenRequest,
) -> Result<Value, OAuthError> {
    let code = required(params, "code")?;
    let redirect_uri = required(params, "redirect_uri")?;
    let verifier = required(params, "code_verifier")?;
    let now = Instant::now();
    let Some(ac) = st.auth_codes.get_mut(code) else {
        return Err(invalid_grant("Malformed auth code."));
    };
    if ac.used {
        // RFC 6749 §4.1.2: a code used twice revokes what its first use issued.
        let (at, rt) = (ac.issued_access.take(), ac.issued_refresh.take());
        if let Some(at) = at.and_then(|t| st.access_tokens.get_mut(&t)) {
            at.revoked = true;
        }
        if let Some(rt) = rt.and_then(|t| st.refresh_tokens.get_mut(&t)) {
            rt.revoked = true;
        }
        return Err(invalid_grant(
            "The authorization code has already been used.",
        ));
    }
    if ac.client_id != client.client_id {
        return Err(invalid_grant(
            "The authorization code was issued to another client.",
        ));
    }
    if now >= ac.expires_at {
        return Err(invalid_grant("The authorization code has expired."));
    }
    if ac.redirect_uri != redirect_uri {
        return Err(invalid_grant(
            "redirect_uri does not match the authorization request.",
        ));
    }
    // RFC 7636 §4.6: BASE64URL(SHA256(ASCII(code_verifier))) == code_challenge.
    if !valid_pkce_string(verifier)
        || URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes())) != ac.code_challenge
    {
        return Err(invalid_grant("Invalid code verifier."));
    }
    ac.used = true;
    let (username, scope, offline) = (ac.username.clone(), ac.scope.clone(), ac.offline);
    rec.username = Some(username.clone());
    let (at, expires_in) = st.new_access_token(&client.client_id, &username, &scope);
    let rt = wants_refresh_token(st, &scope, offline)
        .then(|| st.new_refresh_token(&client.client_id, &username, &scope));
    let ac = st.auth_codes.get_mut(code).unwrap();
    ac.issued_access = Some(at.clone());
    ac.issued_refresh = rt.clone();
    Ok(token_body(at, expires_in, Some(&scope), rt))
}

fn client_credentials_grant(
    st: &mut ServerState,
    client: Authenticated,
    params: &BTreeMap<String, String>,
    rec: &mut TokenRequest,
) -> Result<Value, OAuthError> {
    let Some(mailbox) = st.clients[&client.client_id].app_mailbox.clone() else {
        return Err(err(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            "The client is not authorized to use the client_credentials grant.",
        ));
    };
    let scope = params.get("scope").cloned().unwrap_or_default();
    rec.username = Some(mailbox.clone());
    let (at, expires_in) = st.new_access_token(&client.client_id, &mailbox, &scope);
    Ok(token_body(at, expires_in, None, None))
}

fn jwt_bearer_grant(
    st: &mut ServerState,
    client: Option<Authenticated>,
    params: &BTreeMap<String, String>,
    rec: &mut TokenRequest,
    token_url: &str,
) -> Result<Value, OAuthError> {
    let assertion = required(params, "assertion")?;
    let claims = verify_assertion(st, assertion, token_url, unix_now() as i64)?;
    rec.username = Some(claims.subject.clone());
    let client_id = client.map(|c| c.client_id).unwrap_or(claims.issuer);
    let (at, expires_in) = st.new_access_token(&client_id, &claims.subject, &claims.scope);
    Ok(token_body(at, expires_in, None, None))
}

struct AssertionClaims {
    issuer: String,
    subject: String,
    scope: String,
}

/// RFC 7523 §3 checks of an RS256 assertion, with Google's error texts.
fn verify_assertion(
    st: &ServerState,
    assertion: &str,
    token_url: &str,
    now: i64,
) -> Result<AssertionClaims, OAuthError> {
    let parts: Vec<&str> = assertion.split('.').collect();
    let [h, p, s] = parts[..] else {
        return Err(invalid_grant("Invalid JWT: not three base64url parts."));
    };
    let decode_json = |part: &str| -> Option<Map<String, Value>> {
        let bytes = URL_SAFE_NO_PAD.decode(part).ok()?;
        match serde_json::from_slice(&bytes).ok()? {
            Value::Object(m) => Some(m),
            _ => None,
        }
    };
    let header = decode_json(h).ok_or_else(|| invalid_grant("Invalid JWT: bad header."))?;
    let claims = decode_json(p).ok_or_else(|| invalid_grant("Invalid JWT: bad claim set."))?;
    let signature = URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| invalid_grant("Invalid JWT Signature."))?;
    if header.get("alg").and_then(Value::as_str) != Some("RS256") {
        return Err(invalid_grant("Invalid JWT: alg must be RS256."));
    }
    let issuer = claims
        .get("iss")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid_grant("Invalid JWT: no iss claim."))?;
    let key = st
        .service_accounts
        .get(issuer)
        .ok_or_else(|| invalid_grant("Invalid grant: account not found"))?;
    let signing_input = format!("{h}.{p}");
    ring::signature::UnparsedPublicKey::new(&ring::signature::RSA_PKCS1_2048_8192_SHA256, key)
        .verify(signing_input.as_bytes(), &signature)
        .map_err(|_| invalid_grant("Invalid JWT Signature."))?;
    if claims.get("aud").and_then(Value::as_str) != Some(token_url) {
        return Err(invalid_grant(format!(
            "Invalid JWT: Failed audience check. The right audience is {token_url}"
        )));
    }
    let time = |name: &str| claims.get(name).and_then(Value::as_i64);
    let short_lived = "Invalid JWT: Token must be a short-lived token (60 minutes) and in a \
                       reasonable timeframe. Check your iat and exp values in the JWT claim.";
    let (Some(iat), Some(exp)) = (time("iat"), time("exp")) else {
        return Err(invalid_grant(short_lived));
    };
    if exp <= now
        || iat > now + JWT_CLOCK_SKEW_SECS
        || exp <= iat
        || exp - iat > JWT_MAX_LIFETIME_SECS
    {
        return Err(invalid_grant(short_lived));
    }
    let scope = claims
        .get("scope")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            err(
                StatusCode::BAD_REQUEST,
                "invalid_scope",
                "Invalid OAuth scope or ID token audience provided.",
            )
        })?;
    let subject = claims
        .get("sub")
        .and_then(Value::as_str)
        .unwrap_or(issuer)
        .to_owned();
    Ok(AssertionClaims {
        issuer: issuer.to_owned(),
        subject,
        scope: scope.to_owned(),
    })
}

// ---------------------------------------------------------------------------------------------
// /devicecode
// ---------------------------------------------------------------------------------------------

async fn device_endpoint(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut rec = new_record(Endpoint::DeviceAuthorization);
    let (params, form_ok) = parse_form(&body);
    rec.params = params.clone();
    rec.scope = params.get("scope").cloned();
    let verification_uri = format!("{}/device", inner.base_url);
    let mut st = inner.lock();
    let result = (|| -> Result<Value, OAuthError> {
        check_form_content_type(&headers)?;
        form_ok?;
        let client = authenticate_client(&st, &headers, &params, &mut rec, true)?.unwrap();
        let scope = required(&params, "scope")?.to_owned();
        let device_code = random_string("dc.", 64);
        let user_code = user_code();
        let now = Instant::now();
        let (pending_left, outcome) = match &st.device_script {
            Some((n, outcome)) => (*n, Some(outcome.clone())),
            None => (0, None),
        };
        let (interval, lifetime) = (st.device_interval, st.device_code_lifetime);
        let forced_slow_downs = st.device_slow_downs;
        st.device_codes.insert(
            device_code.clone(),
            DeviceGrant {
                client_id: client.client_id,
                scope,
                issued_at: now,
                expires_at: now + Duration::from_secs(lifetime),
                interval,
                last_poll: None,
                forced_slow_downs,
                pending_left,
                outcome,
                finished: false,
            },
        );
        // Each provider names the page its own way, and never both (a client that reads one
        // must accept the other): Microsoft `verification_uri` and a `message`, Google
        // `verification_url`.
        Ok(match st.google_device_response {
            false => json!({
                "device_code": device_code,
                "user_code": user_code,
                "verification_uri": verification_uri,
                "expires_in": lifetime,
                "interval": interval,
                "message": format!(
                    "To sign in, use a web browser to open the page {verification_uri} and enter \
                     the code {user_code} to authenticate."
                ),
            }),
            true => json!({
                "device_code": device_code,
                "user_code": user_code,
                "verification_url": verification_uri,
                "expires_in": lifetime,
                "interval": interval,
            }),
        })
    })();
    finish(&inner, &mut st, rec, result)
}

// ---------------------------------------------------------------------------------------------
// /authorize
// ---------------------------------------------------------------------------------------------

/// RFC 7636 §4.1: 43–128 characters of `[A-Za-z0-9-._~]`.
fn valid_pkce_string(s: &str) -> bool {
    (43..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
}

/// RFC 8252 §7.3 (plus `localhost`, which Google and Microsoft accept): `http`, a loopback host,
/// no fragment.
fn loopback_redirect(uri: &str) -> Option<url::Url> {
    let url = url::Url::parse(uri).ok()?;
    let loopback = match url.host()? {
        url::Host::Ipv4(ip) => ip.is_loopback(),
        url::Host::Ipv6(ip) => ip.is_loopback(),
        url::Host::Domain(d) => d.eq_ignore_ascii_case("localhost"),
    };
    (url.scheme() == "http" && loopback && url.fragment().is_none()).then_some(url)
}

fn error_page(status: StatusCode, code: &str, description: &str) -> Response {
    let mut resp = (
        status,
        format!("Error {}: {code}\n{description}\n", status.as_u16()),
    )
        .into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

async fn authorize_endpoint(
    State(inner): State<Arc<Inner>>,
    RawQuery(query): RawQuery,
) -> Response {
    let mut rec = new_record(Endpoint::Authorize);
    let (params, form_ok) = parse_form(query.unwrap_or_default().as_bytes());
    rec.params = params.clone();
    rec.scope = params.get("scope").cloned();
    rec.client_id = params.get("client_id").cloned();
    let mut st = inner.lock();
    let record = |st: &mut ServerState, status: u16, outcome: &str, username: Option<String>| {
        let mut rec = rec.clone();
        rec.status = status;
        rec.outcome = outcome.to_owned();
        rec.username = username;
        st.record(rec);
        inner.notify();
    };
    // Errors shown to the user, never redirected (RFC 6749 §4.1.2.1).
    let page_error = match (
        &form_ok,
        params.get("client_id"),
        params.get("redirect_uri"),
    ) {
        (Err(e), _, _) => Some(("invalid_request", e.description.clone())),
        (_, None, _) => Some((
            "invalid_request",
            "Missing required parameter: client_id".into(),
        )),
        (_, Some(id), _) if !st.clients.contains_key(id) => {
            Some(("invalid_client", "The OAuth client was not found.".into()))
        }
        (_, _, None) => Some((
            "invalid_request",
            "Missing required parameter: redirect_uri".into(),
        )),
        (_, _, Some(uri)) if loopback_redirect(uri).is_none() => Some((
            "redirect_uri_mismatch",
            format!("redirect_uri {uri} is not an http:// loopback URI without a fragment."),
        )),
        _ => None,
    };
    if let Some((code, description)) = page_error {
        record(&mut st, 400, code, None);
        return error_page(StatusCode::BAD_REQUEST, code, &description);
    }
    let redirect_uri = params["redirect_uri"].clone();
    let mut target = loopback_redirect(&redirect_uri).unwrap();
    let get = |k: &str| params.get(k).map(String::as_str);
    let redirect_error: Option<(&str, &str)> = if get("response_type") != Some("code") {
        Some((
            "unsupported_response_type",
            "Only response_type=code is supported.",
        ))
    } else if get("code_challenge").is_none() {
        Some(("invalid_request", "code challenge required"))
    } else if get("code_challenge_method") != Some("S256") {
        Some(("invalid_request", "transform algorithm not supported"))
    } else if !valid_pkce_string(get("code_challenge").unwrap()) {
        Some((
            "invalid_request",
            "code_challenge is not 43-128 unreserved characters",
        ))
    } else if get("scope").is_none() {
        Some(("invalid_request", "Missing required parameter: scope"))
    } else if st.authorize_username.is_none() {
        Some((
            "access_denied",
            "The user declined the authorization request.",
        ))
    } else {
        None
    };
    {
        let mut q = target.query_pairs_mut();
        match redirect_error {
            Some((code, description)) => {
                q.append_pair("error", code);
                q.append_pair("error_description", description);
            }
            None => {
                let code = random_string("4/", 60);
                let username = st.authorize_username.clone().unwrap();
                st.auth_codes.insert(
                    code.clone(),
                    AuthCode {
                        client_id: params["client_id"].clone(),
                        redirect_uri: redirect_uri.clone(),
                        code_challenge: params["code_challenge"].clone(),
                        username,
                        scope: params["scope"].clone(),
                        offline: get("access_type") == Some("offline"),
                        expires_at: Instant::now() + Duration::from_secs(AUTH_CODE_LIFETIME_SECS),
                        used: false,
                        issued_access: None,
                        issued_refresh: None,
                    },
                );
                q.append_pair("code", &code);
            }
        }
        if let Some(state) = get("state") {
            q.append_pair("state", state);
        }
    }
    let username = redirect_error
        .is_none()
        .then(|| st.authorize_username.clone())
        .flatten();
    record(
        &mut st,
        302,
        redirect_error.map_or("ok", |(code, _)| code),
        username,
    );
    let mut resp = StatusCode::FOUND.into_response();
    resp.headers_mut().insert(
        header::LOCATION,
        HeaderValue::from_str(target.as_str()).expect("a URL is a valid header value"),
    );
    resp
}

// ---------------------------------------------------------------------------------------------
// /introspect
// ---------------------------------------------------------------------------------------------

async fn introspect_endpoint(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (params, form_ok) = parse_form(&body);
    let mut st = inner.lock();
    let mut entry = Introspection {
        token: params.get("token").cloned(),
        active: false,
        username: None,
        status: 200,
        received_at: Instant::now(),
        params: params.clone(),
    };
    let resp = if st.fail_introspection {
        entry.status = 503;
        let mut resp = (StatusCode::SERVICE_UNAVAILABLE, "Service Unavailable\n").into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        resp
    } else {
        match check_form_content_type(&headers)
            .and(form_ok)
            .and_then(|()| required(&params, "token").map(str::to_owned))
        {
            Err(e) => {
                entry.status = e.status.as_u16();
                error_response(&e)
            }
            Ok(token) => {
                let now = Instant::now();
                let body = match st.access_tokens.get(&token) {
                    Some(at) if at.is_active(now) => {
                        entry.active = true;
                        entry.username = Some(at.username.clone());
                        json!({
                            "active": true,
                            "username": at.username,
                            "email": at.username,
                            "sub": at.username,
                            "scope": at.scope,
                            "client_id": at.client_id,
                            "token_type": "Bearer",
                            "exp": at.issued_unix + at.lifetime_secs,
                            "iat": at.issued_unix,
                        })
                    }
                    _ => json!({"active": false}),
                };
                json_response(StatusCode::OK, &body)
            }
        }
    };
    st.introspections.push(entry);
    inner.notify();
    resp
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `prefix` + random base64url characters, `len` characters in all.
fn random_string(prefix: &str, len: usize) -> String {
    let mut bytes = vec![0u8; len * 3 / 4 + 3];
    rand::rng().fill(&mut bytes[..]);
    let mut s = prefix.to_owned();
    s.push_str(&URL_SAFE_NO_PAD.encode(&bytes));
    s.truncate(len.max(prefix.len() + 8));
    s
}

/// `XXXX-XXXX` of consonants (RFC 8628 §6.1's base-20 alphabet).
fn user_code() -> String {
    const ALPHABET: &[u8] = b"BCDFGHJKLMNPQRSTVWXZ";
    let mut rng = rand::rng();
    let mut code = String::with_capacity(9);
    for i in 0..8 {
        if i == 4 {
            code.push('-');
        }
        code.push(ALPHABET[rng.random_range(0..ALPHABET.len())] as char);
    }
    code
}
