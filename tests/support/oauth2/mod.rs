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

// Every test crate compiles this module and its parts (`tests/support/mod.rs`); none of them
// uses every helper. The attribute covers the parts too.
#![allow(dead_code)]

mod authorize;
mod device;
mod http;
mod introspect;
mod state;
mod token;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use serde_json::Value;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use authorize::authorize_endpoint;
use device::device_endpoint;
use introspect::introspect_endpoint;
use state::{Client, Inner, ServerState};
use token::token_endpoint;

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
