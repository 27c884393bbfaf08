//! How a connection becomes a session: the [`Authenticator`] seam and IMAP `LOGIN`
//! ([`PasswordLogin`]). Called by [`super::connect`] once per connection attempt.

use std::future::Future;

use secrecy::{ExposeSecret, SecretString};

use super::connect::{ImapClient, ImapSession};

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
                async_imap::error::Error::No(message) => AuthError::Rejected(server_text(&message)),
                async_imap::error::Error::Bad(message) => AuthError::Refused {
                    mechanism: "LOGIN",
                    message: server_text(&message),
                },
                // Names the offending character class only, never the password.
                async_imap::error::Error::Validate(invalid) => AuthError::Credentials(
                    anyhow::anyhow!("the login or password cannot be sent with LOGIN: {invalid}"),
                ),
                other => AuthError::Connection(other),
            })
    }
}

/// The server's own words from an async-imap `NO`/`BAD` message, which it writes as the
/// response's fields (`code: None, info: Some("[AUTHENTICATIONFAILED] Authentication failed.")`):
/// the `info` text, else the message as it is.
pub(super) fn server_text(message: &str) -> String {
    message
        .split_once("info: Some(\"")
        .and_then(|(_, rest)| rest.rsplit_once("\")"))
        .map(|(info, _)| info.replace("\\\"", "\"").replace("\\\\", "\\"))
        .unwrap_or_else(|| message.to_owned())
}

#[cfg(test)]
mod tests {
    use super::server_text;

    #[test]
    fn the_servers_words_are_taken_from_async_imaps_message() {
        assert_eq!(
            server_text(
                r#"code: None, info: Some("[AUTHENTICATIONFAILED] Authentication failed.")"#
            ),
            "[AUTHENTICATIONFAILED] Authentication failed."
        );
        assert_eq!(
            server_text(r#"code: Some(Alert), info: Some("say \"hi\"")"#),
            "say \"hi\""
        );
        assert_eq!(
            server_text("[UNAVAILABLE] try later"),
            "[UNAVAILABLE] try later"
        );
    }
}
