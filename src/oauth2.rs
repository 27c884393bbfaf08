//! OAuth2 access tokens for IMAP mailboxes (`imap.accounts.<name>.oauth2`): where the watcher's
//! SASL login (`crate::imap::sasl`) gets a bearer token before each `AUTHENTICATE`.
//!
//! One [`TokenSource`] per account, shared by every mailbox that uses it ([`TokenSources`]):
//! it caches the access token until shortly before `expires_in` runs out, and refreshes one at
//! a time (a mutex held across the request), so mailboxes sharing an account never race each
//! other's refresh. How a token is obtained is the account's `grant`:
//!
//! - `refresh_token` (RFC 6749 §6): the refresh token comes from the state when one is stored
//!   for the same client (`report-relay oauth login`, or rotated by the provider), else from the
//!   config. A new refresh token in the answer (Microsoft rotates them) is stored in the state,
//!   durably, before the access token that came with it is used. `invalid_grant` is remembered
//!   for that refresh token, so mailboxes backing off do not hammer the endpoint with a token it
//!   already refused; a new one in the state (a login while the relay runs) is tried at once.
//! - `client_credentials` (RFC 6749 §4.4, Microsoft's app-only IMAP access).
//! - `service_account` (RFC 7523 §2.1, Google Workspace domain-wide delegation): a JWT signed
//!   with the key file's RS256 key ([`jwt`]), one token per mailbox (`sub`).
//!
//! No token, refresh token or client secret ever reaches a log line, an error message,
//! `/readyz` or `/metrics`: they are [`SecretString`]s, and errors are built from the endpoint's
//! `error` code and description only.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use oauth2::basic::{BasicErrorResponse, BasicErrorResponseType, BasicTokenResponse};
use oauth2::{
    AuthType, ClientId, ClientSecret, HttpClientError, RefreshToken, RequestTokenError, Scope,
    TokenResponse, TokenUrl,
};
use secrecy::{ExposeSecret, SecretString};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::config::{Config, Endpoints, Grant, OAuth2Account};
use crate::state::State;

pub mod jwt;
pub mod login;

/// How long before `expires_in` runs out a cached access token is refreshed (at most half its
/// lifetime), so a login never starts with a token about to expire.
pub const REFRESH_MARGIN: Duration = Duration::from_secs(60);
/// The lifetime assumed when the token endpoint leaves `expires_in` out (RFC 6749 §5.1 only
/// recommends it): Google's and Microsoft's access tokens last an hour.
pub const DEFAULT_EXPIRES_IN: Duration = Duration::from_secs(3600);
/// How long a refresh token the endpoint answered `invalid_grant` to is not sent again. The
/// watchers keep backing off meanwhile; a new refresh token in the state is tried at once.
pub const INVALID_GRANT_HOLD: Duration = Duration::from_secs(300);
/// The deadline of one request to a token endpoint, connection included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Why no access token could be had. The messages never contain a token or a secret.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    /// The token endpoint refused the refresh token or assertion (RFC 6749 §5.2
    /// `invalid_grant`): revoked, expired, the password changed, or consent withdrawn.
    #[error(
        "the token endpoint answered invalid_grant{}: the refresh token was revoked or expired \
         (or the password changed); run `report-relay oauth login --config FILE --mailbox {mailbox}`",
        .description.as_deref().map(|d| format!(" ({d})")).unwrap_or_default()
    )]
    InvalidGrant {
        /// The endpoint's `error_description`.
        description: Option<String>,
        /// A mailbox of the account, for the command to run.
        mailbox: String,
    },
    /// The account has no refresh token yet, neither in the config nor in the state.
    #[error(
        "account {account} has no refresh token: run `report-relay oauth login --config FILE --mailbox {mailbox}`"
    )]
    NoRefreshToken {
        /// The account's name in `imap.accounts`.
        account: String,
        /// A mailbox of the account.
        mailbox: String,
    },
    /// The token endpoint answered another RFC 6749 §5.2 error (`invalid_client`,
    /// `unauthorized_client`, `invalid_scope`, …).
    #[error("the token endpoint answered {error}{}", .description.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    Refused {
        /// The `error` code.
        error: String,
        /// The `error_description`.
        description: Option<String>,
    },
    /// The token endpoint could not be reached, timed out, or answered something that is not
    /// a token response.
    #[error("the token endpoint {url} failed: {reason}")]
    Endpoint {
        /// The token endpoint (holds no secret).
        url: String,
        /// What went wrong, in words.
        reason: String,
    },
    /// A rotated refresh token could not be stored in the state: the access token that came
    /// with it is not used until it is (it is kept in memory and stored on the next try).
    #[error("cannot store the new refresh token in the state: {0}")]
    State(String),
    /// The service account key file could not be read or used.
    #[error("the service account key file: {0}")]
    KeyFile(String),
}

impl TokenError {
    /// Whether the endpoint refused the grant itself: the refresh token or the assertion is
    /// dead, and only a new login helps.
    pub fn is_invalid_grant(&self) -> bool {
        matches!(self, Self::InvalidGrant { .. })
    }
}

/// An access token and when it should be refreshed.
#[derive(Clone)]
struct Cached {
    token: SecretString,
    refresh_at: Instant,
}

/// A refresh token the endpoint refused, and when.
struct Refused {
    refresh_token: SecretString,
    at: Instant,
    error: TokenError,
}

#[derive(Default)]
struct Inner {
    /// Access tokens by subject (the mailbox for service accounts, "" otherwise).
    cached: HashMap<String, Cached>,
    /// A rotated refresh token not yet stored in the state.
    unsaved: Option<SecretString>,
    refused: Option<Refused>,
}

/// What a token endpoint answered: the access token, its lifetime and, when it issued one, a
/// refresh token.
pub struct Issued {
    /// The access token.
    pub access_token: SecretString,
    /// `expires_in`, or [`DEFAULT_EXPIRES_IN`].
    pub expires_in: Duration,
    /// A refresh token, when the endpoint issued one.
    pub refresh_token: Option<SecretString>,
}

/// The access tokens of one OAuth2 account. See the module docs.
pub struct TokenSource {
    /// The account's name in `imap.accounts`: the key of its refresh token in the state.
    account: String,
    /// A mailbox of the account, for messages that say what to run.
    mailbox: String,
    config: OAuth2Account,
    endpoints: Endpoints,
    http: reqwest::Client,
    state: State,
    inner: tokio::sync::Mutex<Inner>,
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSource")
            .field("account", &self.account)
            .finish_non_exhaustive()
    }
}

/// The HTTP client for token endpoints: rustls, a timeout, and no redirects (the oauth2
/// crate's advice: a redirect could send the credentials elsewhere).
///
/// # Errors
/// reqwest could not build its TLS setup.
pub fn http_client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(REQUEST_TIMEOUT)
        .user_agent(concat!("report-relay/", env!("CARGO_PKG_VERSION")))
        .build()?)
}

impl TokenSource {
    /// The token source of account `account` (configured as `config`), of which `mailbox` is
    /// one mailbox; refresh tokens are read from and stored in `state`.
    pub fn new(
        account: &str,
        mailbox: &str,
        config: OAuth2Account,
        state: State,
        http: reqwest::Client,
    ) -> Self {
        Self {
            account: account.to_owned(),
            mailbox: mailbox.to_owned(),
            endpoints: config.endpoints(),
            config,
            http,
            state,
            inner: tokio::sync::Mutex::new(Inner::default()),
        }
    }

    /// The account's name in `imap.accounts`.
    pub fn account(&self) -> &str {
        &self.account
    }

    /// The account's configuration.
    pub fn config(&self) -> &OAuth2Account {
        &self.config
    }

    /// The account's endpoints and scope, presets filled in.
    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    /// An access token for `subject` (the mailbox's login; only a service account's tokens
    /// differ per subject): the cached one while it has more than [`REFRESH_MARGIN`] left,
    /// else a new one. One request at a time per account.
    ///
    /// # Errors
    /// [`TokenError`]; see its variants.
    pub async fn access_token(&self, subject: &str) -> Result<SecretString, TokenError> {
        let key = self.cache_key(subject);
        let mut inner = self.inner.lock().await;
        if let Some(cached) = inner.cached.get(key)
            && Instant::now() < cached.refresh_at
        {
            return Ok(cached.token.clone());
        }
        let issued = match self.config.grant {
            Grant::RefreshToken => self.refresh(&mut inner).await?,
            Grant::ClientCredentials => self.client_credentials().await?,
            Grant::ServiceAccount => self.service_account(subject).await?,
        };
        let lifetime = issued.expires_in;
        let refresh_at = Instant::now() + lifetime - REFRESH_MARGIN.min(lifetime / 2);
        inner.cached.insert(
            key.to_owned(),
            Cached {
                token: issued.access_token.clone(),
                refresh_at,
            },
        );
        Ok(issued.access_token)
    }

    /// The server refused `token` for `subject` (expired early, revoked): the next
    /// [`TokenSource::access_token`] fetches a new one, unless another caller already did.
    pub async fn invalidate(&self, subject: &str, token: &SecretString) {
        let key = self.cache_key(subject);
        let mut inner = self.inner.lock().await;
        if inner
            .cached
            .get(key)
            .is_some_and(|cached| cached.token.expose_secret() == token.expose_secret())
        {
            inner.cached.remove(key);
        }
    }

    fn cache_key<'a>(&self, subject: &'a str) -> &'a str {
        if self.config.grant == Grant::ServiceAccount {
            subject
        } else {
            ""
        }
    }

    /// The refresh token to use: one rotated but not yet stored, else the state's (if it is
    /// the same client's), else the config's.
    async fn current_refresh_token(
        &self,
        inner: &mut Inner,
    ) -> Result<Option<SecretString>, TokenError> {
        if let Some(unsaved) = inner.unsaved.clone() {
            self.store(&unsaved).await?;
            inner.unsaved = None;
            return Ok(Some(unsaved));
        }
        match self.state.refresh_token(&self.account).await {
            Ok(Some(stored)) if stored.client_id == self.config.client_id => {
                return Ok(Some(stored.refresh_token));
            }
            Ok(_) => {}
            Err(error) => warn!(
                account = self.account,
                error = format!("{error:#}"),
                "Cannot read the stored refresh token; using the config's."
            ),
        }
        Ok(self.config.refresh_token.clone())
    }

    async fn store(&self, refresh_token: &SecretString) -> Result<(), TokenError> {
        self.state
            .store_refresh_token(&self.account, &self.config.client_id, refresh_token)
            .await
            .map_err(|error| TokenError::State(format!("{error:#}")))
    }

    /// The refresh token grant (RFC 6749 §6), storing a rotated refresh token first. When the
    /// endpoint refuses the token and the state meanwhile holds another one (another replica
    /// rotated it, or `oauth login` ran), that one is tried once more.
    async fn refresh(&self, inner: &mut Inner) -> Result<Issued, TokenError> {
        // Whether a refresh token was refused already in this call: then the loop ends at the
        // `refused` check (the same token) or after one more request (a newer one).
        let mut retried = false;
        loop {
            let Some(refresh_token) = self.current_refresh_token(inner).await? else {
                return Err(TokenError::NoRefreshToken {
                    account: self.account.clone(),
                    mailbox: self.mailbox.clone(),
                });
            };
            if let Some(refused) = &inner.refused
                && refused.refresh_token.expose_secret() == refresh_token.expose_secret()
                && refused.at.elapsed() < INVALID_GRANT_HOLD
            {
                return Err(refused.error.clone());
            }
            let answer = self
                .client()?
                .exchange_refresh_token(&RefreshToken::new(
                    refresh_token.expose_secret().to_owned(),
                ))
                .add_scopes(self.scopes())
                .request_async(&self.http)
                .await;
            let issued = match self.issued(answer) {
                Ok(issued) => issued,
                Err(error) if error.is_invalid_grant() && !retried => {
                    inner.refused = Some(Refused {
                        refresh_token,
                        at: Instant::now(),
                        error,
                    });
                    retried = true;
                    continue;
                }
                Err(error) => {
                    if error.is_invalid_grant() {
                        inner.refused = Some(Refused {
                            refresh_token,
                            at: Instant::now(),
                            error: error.clone(),
                        });
                    }
                    return Err(error);
                }
            };
            inner.refused = None;
            if let Some(new) = &issued.refresh_token
                && new.expose_secret() != refresh_token.expose_secret()
            {
                if let Err(error) = self.store(new).await {
                    inner.unsaved = Some(new.clone());
                    return Err(error);
                }
                info!(
                    account = self.account,
                    "The token endpoint rotated the refresh token; the new one is stored."
                );
            }
            return Ok(issued);
        }
    }

    /// The client credentials grant (RFC 6749 §4.4).
    async fn client_credentials(&self) -> Result<Issued, TokenError> {
        let answer = self
            .client()?
            .exchange_client_credentials()
            .add_scopes(self.scopes())
            .request_async(&self.http)
            .await;
        self.issued(answer)
    }

    /// The JWT bearer grant (RFC 7523 §2.1) with a fresh assertion for `subject`.
    async fn service_account(&self, subject: &str) -> Result<Issued, TokenError> {
        let path = self
            .config
            .key_file
            .as_deref()
            .ok_or_else(|| TokenError::KeyFile("oauth2.key_file is not set".into()))?;
        let key = jwt::ServiceAccountKey::read(path)?;
        let token_url = self
            .config
            .token_url
            .clone()
            .or_else(|| key.token_uri.clone())
            .unwrap_or_else(|| self.endpoints.token_url.clone());
        let assertion = key.assertion(&self.endpoints.scope, &token_url, subject)?;
        let form = [
            ("grant_type", jwt::JWT_BEARER_GRANT_TYPE),
            ("assertion", assertion.expose_secret()),
        ];
        let answer = self.http.post(&token_url).form(&form).send().await;
        let response = answer.map_err(|error| TokenError::Endpoint {
            url: token_url.clone(),
            reason: error.without_url().to_string(),
        })?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|error| TokenError::Endpoint {
                url: token_url.clone(),
                reason: error.without_url().to_string(),
            })?;
        if status.is_success() {
            let token: BasicTokenResponse =
                serde_json::from_slice(&body).map_err(|_| TokenError::Endpoint {
                    url: token_url.clone(),
                    reason: format!("HTTP {status} without a token response"),
                })?;
            Ok(issued_from(&token))
        } else {
            match serde_json::from_slice::<BasicErrorResponse>(&body) {
                Ok(error) => Err(self.refused(&error)),
                Err(_) => Err(TokenError::Endpoint {
                    url: token_url,
                    reason: format!("HTTP {status} without an OAuth2 error"),
                }),
            }
        }
    }

    /// The oauth2 client for the token endpoint, with client authentication in the request
    /// body (RFC 6749 §2.3.1), which Google and Microsoft both accept, also for public clients.
    fn client(&self) -> Result<TokenClient, TokenError> {
        let token_url =
            TokenUrl::new(self.endpoints.token_url.clone()).map_err(|_| TokenError::Endpoint {
                url: self.endpoints.token_url.clone(),
                reason: "not a URL".into(),
            })?;
        let mut client =
            oauth2::basic::BasicClient::new(ClientId::new(self.config.client_id.clone()))
                .set_token_uri(token_url)
                .set_auth_type(AuthType::RequestBody);
        if let Some(secret) = &self.config.client_secret {
            client = client.set_client_secret(ClientSecret::new(secret.expose_secret().to_owned()));
        }
        Ok(client)
    }

    fn scopes(&self) -> Vec<Scope> {
        self.endpoints
            .scope
            .split_whitespace()
            .map(|scope| Scope::new(scope.to_owned()))
            .collect()
    }

    /// A token response, or the error in words without any secret.
    fn issued(
        &self,
        answer: Result<
            BasicTokenResponse,
            RequestTokenError<HttpClientError<reqwest::Error>, BasicErrorResponse>,
        >,
    ) -> Result<Issued, TokenError> {
        let url = self.endpoints.token_url.clone();
        match answer {
            Ok(token) => Ok(issued_from(&token)),
            Err(RequestTokenError::ServerResponse(error)) => Err(self.refused(&error)),
            Err(RequestTokenError::Request(error)) => Err(TokenError::Endpoint {
                url,
                reason: http_error(&error),
            }),
            // The body of an unparsable answer may hold a token: never show it.
            Err(RequestTokenError::Parse(..)) => Err(TokenError::Endpoint {
                url,
                reason: "the answer is not a token response".into(),
            }),
            Err(RequestTokenError::Other(reason)) => Err(TokenError::Endpoint { url, reason }),
        }
    }

    fn refused(&self, error: &BasicErrorResponse) -> TokenError {
        let description = error.error_description().cloned();
        match error.error() {
            BasicErrorResponseType::InvalidGrant => TokenError::InvalidGrant {
                description,
                mailbox: self.mailbox.clone(),
            },
            other => TokenError::Refused {
                error: other.as_ref().to_owned(),
                description,
            },
        }
    }
}

/// The oauth2 client type with its token endpoint set.
type TokenClient = oauth2::basic::BasicClient<
    oauth2::EndpointNotSet,
    oauth2::EndpointNotSet,
    oauth2::EndpointNotSet,
    oauth2::EndpointNotSet,
    oauth2::EndpointSet,
>;

/// An [`Issued`] from a token response.
pub fn issued_from(token: &BasicTokenResponse) -> Issued {
    Issued {
        access_token: token.access_token().secret().clone().into(),
        expires_in: token
            .expires_in()
            .filter(|lifetime| !lifetime.is_zero())
            .unwrap_or(DEFAULT_EXPIRES_IN),
        refresh_token: token
            .refresh_token()
            .map(|token| token.secret().clone().into()),
    }
}

/// A transport error in words, without the URL that reqwest's own message names, and its
/// causes (hyper's and the socket's, which name no URL).
pub fn http_error(error: &HttpClientError<reqwest::Error>) -> String {
    match error {
        HttpClientError::Reqwest(error) => {
            let mut text = if error.is_timeout() {
                format!("timed out after {} s", REQUEST_TIMEOUT.as_secs())
            } else if error.is_connect() {
                "cannot connect".to_owned()
            } else if error.is_body() || error.is_decode() {
                "the answer could not be read".to_owned()
            } else {
                "the request failed".to_owned()
            };
            let mut source = std::error::Error::source(error.as_ref());
            while let Some(cause) = source {
                text.push_str(": ");
                text.push_str(&cause.to_string());
                source = cause.source();
            }
            text
        }
        HttpClientError::Http(error) => error.to_string(),
        HttpClientError::Io(error) => error.to_string(),
        HttpClientError::Other(reason) => reason.clone(),
        _ => "the request failed".to_owned(),
    }
}

/// The token sources of every OAuth2 account in the config, by account name (lower case), so
/// mailboxes that share an account share its tokens and its one refresh at a time.
#[derive(Debug)]
pub struct TokenSources {
    sources: std::sync::Mutex<HashMap<String, Arc<TokenSource>>>,
    state: State,
    http: reqwest::Client,
}

impl TokenSources {
    /// An empty registry whose sources keep refresh tokens in `state` and use `http`.
    pub fn new(state: State, http: reqwest::Client) -> Self {
        Self {
            sources: std::sync::Mutex::new(HashMap::new()),
            state,
            http,
        }
    }

    /// The token source of `account` (its name in `imap.accounts`) as configured in `config`:
    /// the existing one while its configuration is unchanged, else a new one. `mailbox` is
    /// a mailbox of the account, for messages. `None` when the account has no `oauth2`.
    pub fn get(&self, config: &Config, account: &str, mailbox: &str) -> Option<Arc<TokenSource>> {
        let (name, settings) = config.imap.account(account)?;
        let oauth2 = settings.oauth2.clone()?;
        let key = name.to_ascii_lowercase();
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(source) = sources.get(&key)
            && same_account(source.config(), &oauth2)
        {
            return Some(source.clone());
        }
        let source = Arc::new(TokenSource::new(
            &key,
            mailbox,
            oauth2,
            self.state.clone(),
            self.http.clone(),
        ));
        sources.insert(key, source.clone());
        Some(source)
    }
}

/// Whether two configurations of an account would get the same tokens.
pub fn same_account(a: &OAuth2Account, b: &OAuth2Account) -> bool {
    let secret = |s: &Option<SecretString>| s.as_ref().map(|s| s.expose_secret().to_owned());
    a.provider == b.provider
        && a.client_id == b.client_id
        && secret(&a.client_secret) == secret(&b.client_secret)
        && secret(&a.refresh_token) == secret(&b.refresh_token)
        && a.tenant == b.tenant
        && a.endpoints() == b.endpoints()
        && a.mechanism == b.mechanism
        && a.grant == b.grant
        && a.key_file == b.key_file
}
