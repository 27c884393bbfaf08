//! `report-relay oauth login`: obtains an account's refresh token with a person signing in
//! once, without a browser on the server, and stores it in the state, where the running
//! relay's token source finds it at its next refresh (`super::TokenSource`).
//!
//! - The device authorization grant (RFC 8628) where the provider allows it for IMAP
//!   (Microsoft): it prints the verification URI and the user code, then polls the token
//!   endpoint every `interval` seconds (the oauth2 crate keeps polling on
//!   `authorization_pending` and adds 5 s on `slow_down`, §3.5) until the person signed in, or
//!   stops on `access_denied` or `expired_token`.
//! - The loopback redirect flow (RFC 8252 §7.3, with PKCE, RFC 7636) for Google, which does
//!   not allow the Gmail scope in the device flow: it prints the authorization URL and takes
//!   the redirect either on a port of 127.0.0.1 (the browser runs on the same machine, or the
//!   port is forwarded) or pasted on standard input (the address the browser ended on).

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use oauth2::DeviceCodeErrorResponseType;
use oauth2::basic::BasicClient;
use oauth2::{
    AuthUrl, AuthorizationCode, ClientId, ClientSecret, CsrfToken, DeviceAuthorizationUrl,
    PkceCodeChallenge, RedirectUrl, RequestTokenError, Scope, StandardDeviceAuthorizationResponse,
    TokenUrl,
};
use secrecy::SecretString;
use tokio::io::AsyncBufReadExt;

use super::{http_client, http_error, issued_from};
use crate::config::{Grant, OAuth2Account, Provider};
use crate::state::State;

/// How long `oauth login` waits for the person to sign in with the loopback redirect flow.
pub const LOOPBACK_TIMEOUT: Duration = Duration::from_secs(600);

/// What `oauth login` did, for its last line.
#[derive(Debug)]
pub struct LoggedIn {
    /// The account whose refresh token was stored.
    pub account: String,
}

/// Signs `account` (configured as `config`; `mailbox` is the address to sign in as) in and
/// stores its refresh token in `state`. Prompts go to `out`.
///
/// # Errors
/// The account's grant needs no login; the endpoints refused (with the RFC error code named,
/// e.g. `access_denied`, `expired_token`); the answer carried no refresh token; or the state
/// could not store it.
pub async fn login(
    account: &str,
    mailbox: &str,
    config: &OAuth2Account,
    state: &State,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<LoggedIn> {
    match config.grant {
        Grant::RefreshToken => {}
        other => anyhow::bail!(
            "account {account} uses grant {other}, which gets its tokens without a person \
             signing in: nothing to log in; `report-relay check` tests it"
        ),
    }
    let endpoints = config.endpoints();
    let http = http_client()?;
    let mut client = BasicClient::new(ClientId::new(config.client_id.clone()))
        .set_token_uri(TokenUrl::new(endpoints.token_url.clone()).context("token_url")?)
        .set_auth_type(oauth2::AuthType::RequestBody);
    if let Some(secret) = &config.client_secret {
        use secrecy::ExposeSecret;
        client = client.set_client_secret(ClientSecret::new(secret.expose_secret().to_owned()));
    }
    let scopes: Vec<Scope> = endpoints
        .scope
        .split_whitespace()
        .map(|scope| Scope::new(scope.to_owned()))
        .collect();
    let device = endpoints.device_authorization_url.clone().filter(|_| {
        config.provider != Provider::Google || config.device_authorization_url.is_some()
    });
    let refresh_token = match (device, &endpoints.authorization_url) {
        (Some(device_url), _) => {
            let client = client.set_device_authorization_url(
                DeviceAuthorizationUrl::new(device_url).context("device_authorization_url")?,
            );
            let details: StandardDeviceAuthorizationResponse = client
                .exchange_device_code()
                .add_scopes(scopes)
                .request_async(&http)
                .await
                .map_err(|error| describe("the device authorization endpoint", error))?;
            writeln!(
                out,
                "To sign in {mailbox}, open {} and enter the code {}",
                details.verification_uri().as_str(),
                details.user_code().secret()
            )?;
            writeln!(
                out,
                "Waiting for the sign-in (the code expires in {} minutes; polling every {} s)…",
                details.expires_in().as_secs() / 60,
                details.interval().as_secs()
            )?;
            out.flush()?;
            // RFC 8628 §3.5: wait the interval before each request, the first one too (the
            // oauth2 crate polls at once, then waits).
            tokio::time::sleep(details.interval()).await;
            let token = client
                .exchange_device_access_token(&details)
                .request_async(&http, tokio::time::sleep, None)
                .await
                .map_err(|error| match &error {
                    RequestTokenError::ServerResponse(response) => match response.error() {
                        DeviceCodeErrorResponseType::AccessDenied => anyhow::anyhow!(
                            "the sign-in was declined (access_denied); nothing was stored"
                        ),
                        DeviceCodeErrorResponseType::ExpiredToken => anyhow::anyhow!(
                            "the code expired before the sign-in completed (expired_token); run \
                             `report-relay oauth login` again"
                        ),
                        _ => describe("the token endpoint", error),
                    },
                    _ => describe("the token endpoint", error),
                })?;
            issued_from(&token).refresh_token
        }
        (None, Some(authorization_url)) => {
            let client = client.set_auth_uri(
                AuthUrl::new(authorization_url.clone()).context("authorization_url")?,
            );
            loopback(client, scopes, config.provider, mailbox, &http, out).await?
        }
        (None, None) => anyhow::bail!(
            "account {account} has neither a device_authorization_url nor an authorization_url \
             to sign in with"
        ),
    };
    let Some(refresh_token) = refresh_token else {
        anyhow::bail!(
            "the token endpoint issued no refresh token (for Microsoft, the scope needs \
             offline_access; for Google, consent must be given again)"
        );
    };
    state
        .store_refresh_token(account, &config.client_id, &refresh_token)
        .await
        .context("Cannot store the refresh token in the state")?;
    Ok(LoggedIn {
        account: account.to_owned(),
    })
}

/// An endpoint's refusal or failure in words, without any secret.
fn describe<T: oauth2::ErrorResponse + 'static>(
    what: &str,
    error: RequestTokenError<oauth2::HttpClientError<reqwest::Error>, T>,
) -> anyhow::Error {
    match error {
        RequestTokenError::ServerResponse(response) => {
            anyhow::anyhow!("{what} answered: {response}")
        }
        RequestTokenError::Request(error) => {
            anyhow::anyhow!("{what} failed: {}", http_error(&error))
        }
        RequestTokenError::Parse(..) => anyhow::anyhow!("{what} answered something unreadable"),
        RequestTokenError::Other(reason) => anyhow::anyhow!("{what} failed: {reason}"),
    }
}

/// The loopback redirect flow: prints the authorization URL, takes the redirect on 127.0.0.1
/// or from standard input, and exchanges the code (with its PKCE verifier).
async fn loopback(
    client: oauth2::basic::BasicClient<
        oauth2::EndpointSet,
        oauth2::EndpointNotSet,
        oauth2::EndpointNotSet,
        oauth2::EndpointNotSet,
        oauth2::EndpointSet,
    >,
    scopes: Vec<Scope>,
    provider: Provider,
    mailbox: &str,
    http: &reqwest::Client,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<Option<SecretString>> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .context("Cannot listen on 127.0.0.1 for the redirect")?;
    let redirect = format!("http://127.0.0.1:{}/", listener.local_addr()?.port());
    let client = client.set_redirect_uri(RedirectUrl::new(redirect.clone())?);
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let mut request = client
        .authorize_url(CsrfToken::new_random)
        .add_scopes(scopes)
        .set_pkce_challenge(challenge)
        .add_extra_param("login_hint", mailbox);
    if provider == Provider::Google {
        // Google issues a refresh token only for offline access, and again only with consent.
        request = request
            .add_extra_param("access_type", "offline")
            .add_extra_param("prompt", "consent");
    }
    let (url, csrf) = request.url();
    writeln!(out, "To sign in {mailbox}, open this address in a browser:")?;
    writeln!(out, "{url}")?;
    writeln!(
        out,
        "The browser is sent back to {redirect} when done. If that is not this machine, paste \
         the address the browser ended on here and press Enter:"
    )?;
    out.flush()?;
    let redirected = tokio::time::timeout(LOOPBACK_TIMEOUT, async {
        tokio::select! {
            result = accept_redirect(&listener) => result,
            Some(line) = pasted_line() => Ok(line),
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("nobody signed in within {} s", LOOPBACK_TIMEOUT.as_secs()))??;
    let redirected = url::Url::parse(&redirected)
        .or_else(|_| url::Url::parse(&redirect)?.join(&redirected))
        .context("not the address the browser ended on")?;
    let param = |name: &str| {
        redirected
            .query_pairs()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.into_owned())
    };
    if let Some(error) = param("error") {
        anyhow::bail!("the authorization server answered {error}; nothing was stored");
    }
    if param("state").as_deref() != Some(csrf.secret().as_str()) {
        anyhow::bail!("the redirect's state does not match this login (another login's address?)");
    }
    let code = param("code").context("the redirect has no code")?;
    let token = client
        .exchange_code(AuthorizationCode::new(code))
        .set_pkce_verifier(verifier)
        .request_async(http)
        .await
        .map_err(|error| describe("the token endpoint", error))?;
    Ok(issued_from(&token).refresh_token)
}

/// Accepts connections on `listener` until one is a `GET` of the redirect (with `code` or
/// `error` in its query), answers it with a short page, and returns its URL (path and query).
async fn accept_redirect(listener: &tokio::net::TcpListener) -> anyhow::Result<String> {
    use tokio::io::AsyncWriteExt;
    loop {
        let (mut stream, _) = listener.accept().await?;
        let mut reader = tokio::io::BufReader::new(&mut stream);
        let mut request_line = String::new();
        let read =
            tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut request_line))
                .await;
        if !matches!(read, Ok(Ok(n)) if n > 0) {
            continue;
        }
        let target = request_line
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_owned();
        let is_redirect = target.contains("code=") || target.contains("error=");
        let body = if is_redirect {
            "report-relay: signed in. You can close this tab."
        } else {
            "report-relay: waiting for the sign-in redirect."
        };
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = stream.write_all(answer.as_bytes()).await;
        let _ = stream.shutdown().await;
        if is_redirect {
            return Ok(target);
        }
    }
}

/// The first non-empty line on standard input; `None` at its end (no terminal, as under CI),
/// after which only the redirect counts.
async fn pasted_line() -> Option<String> {
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let line = line.trim();
        if !line.is_empty() {
            return Some(line.to_owned());
        }
    }
    None
}
