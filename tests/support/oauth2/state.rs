//! Server state: what the fake knows behind its lock (clients, service accounts, issued
//! tokens, device and authorization codes, the behaviour settings, the record), and the
//! small helpers that mint tokens and read the clock.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::Rng as _;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{
    DEFAULT_ACCESS_TOKEN_LEN, DEFAULT_ACCESS_TOKEN_LIFETIME_SECS,
    DEFAULT_DEVICE_CODE_LIFETIME_SECS, DEFAULT_DEVICE_INTERVAL_SECS, DeviceOutcome, Introspection,
    TokenRequest,
};

pub(super) struct Client {
    /// `None`: a public client.
    pub(super) secret: Option<String>,
    /// Registered with `add_app`: the mailbox of its client-credentials tokens.
    pub(super) app_mailbox: Option<String>,
}

pub(super) struct RefreshToken {
    pub(super) client_id: String,
    pub(super) username: String,
    pub(super) scope: String,
    pub(super) revoked: bool,
}

pub(super) struct AccessToken {
    pub(super) client_id: String,
    pub(super) username: String,
    pub(super) scope: String,
    pub(super) issued_at: Instant,
    pub(super) issued_unix: u64,
    pub(super) lifetime_secs: u64,
    pub(super) revoked: bool,
}

impl AccessToken {
    pub(super) fn is_active(&self, now: Instant) -> bool {
        !self.revoked && now < self.issued_at + Duration::from_secs(self.lifetime_secs)
    }
}

pub(super) struct DeviceGrant {
    pub(super) client_id: String,
    pub(super) scope: String,
    pub(super) issued_at: Instant,
    pub(super) expires_at: Instant,
    /// Current interval in seconds (grows by 5 on every `slow_down`).
    pub(super) interval: u64,
    pub(super) last_poll: Option<Instant>,
    /// Polls that keep the interval and still get `slow_down` ([`FakeOAuth2::script_slow_down`]).
    pub(super) forced_slow_downs: u32,
    pub(super) pending_left: u32,
    /// `None`: never decided (pending until expiry).
    pub(super) outcome: Option<DeviceOutcome>,
    pub(super) finished: bool,
}

pub(super) struct AuthCode {
    pub(super) client_id: String,
    pub(super) redirect_uri: String,
    pub(super) code_challenge: String,
    pub(super) username: String,
    pub(super) scope: String,
    pub(super) offline: bool,
    pub(super) expires_at: Instant,
    pub(super) used: bool,
    /// Tokens issued by its first use: revoked on a second use (RFC 6749 §4.1.2).
    pub(super) issued_access: Option<String>,
    pub(super) issued_refresh: Option<String>,
}

pub(super) struct ServerState {
    pub(super) clients: HashMap<String, Client>,
    pub(super) service_accounts: HashMap<String, Vec<u8>>,
    pub(super) refresh_tokens: HashMap<String, RefreshToken>,
    pub(super) access_tokens: HashMap<String, AccessToken>,
    pub(super) device_codes: HashMap<String, DeviceGrant>,
    pub(super) auth_codes: HashMap<String, AuthCode>,
    pub(super) access_token_lifetime: u64,
    pub(super) access_token_len: usize,
    pub(super) rotation: bool,
    pub(super) require_offline_access: bool,
    pub(super) device_interval: u64,
    pub(super) google_device_response: bool,
    pub(super) device_code_lifetime: u64,
    pub(super) device_script: Option<(u32, DeviceOutcome)>,
    pub(super) device_slow_downs: u32,
    pub(super) authorize_username: Option<String>,
    pub(super) fail_token_requests: u32,
    pub(super) fail_introspection: bool,
    pub(super) requests: Vec<TokenRequest>,
    pub(super) introspections: Vec<Introspection>,
}

impl ServerState {
    pub(super) fn new() -> Self {
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

    pub(super) fn new_refresh_token(
        &mut self,
        client_id: &str,
        username: &str,
        scope: &str,
    ) -> String {
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
    pub(super) fn new_access_token(
        &mut self,
        client_id: &str,
        username: &str,
        scope: &str,
    ) -> (String, u64) {
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

    pub(super) fn record(&mut self, mut request: TokenRequest) {
        request.seq = self.requests.len() as u64 + 1;
        self.requests.push(request);
    }
}

/// What the handle and the endpoints share: the base URL, the state behind its lock, and a
/// counter bumped on every change, which [`super::FakeOAuth2::wait_for`] watches.
pub(super) struct Inner {
    pub(super) base_url: String,
    pub(super) state: Mutex<ServerState>,
    pub(super) changes: watch::Sender<u64>,
}

impl Inner {
    pub(super) fn lock(&self) -> MutexGuard<'_, ServerState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn notify(&self) {
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
    }

    pub(super) fn token_url(&self) -> String {
        format!("{}/token", self.base_url)
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

pub(super) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `prefix` + random base64url characters, `len` characters in all.
pub(super) fn random_string(prefix: &str, len: usize) -> String {
    let mut bytes = vec![0u8; len * 3 / 4 + 3];
    rand::rng().fill(&mut bytes[..]);
    let mut s = prefix.to_owned();
    s.push_str(&URL_SAFE_NO_PAD.encode(&bytes));
    s.truncate(len.max(prefix.len() + 8));
    s
}
