//! OAuth2 logins: SASL `XOAUTH2` (Google's and Microsoft's, developers.google.com/gmail/imap/xoauth2-protocol)
//! and `OAUTHBEARER` (RFC 7628) through `AUTHENTICATE` (RFC 3501 §6.2.2), with a bearer token
//! from the account's [`TokenSource`]. The second [`Authenticator`] behind the watcher's seam
//! (`super::auth`); the token handling is `crate::oauth2`, the framing is here.

use std::sync::Arc;

use secrecy::{ExposeSecret, SecretString};

use super::auth::{AuthError, Authenticator, PasswordLogin, server_text};
use super::connect::{ImapClient, ImapSession};
use crate::config::SaslMechanism;
use crate::oauth2::TokenSource;

/// The initial client response of `mechanism` for `user` with `token`, before base64
/// (async-imap encodes it).
///
/// - XOAUTH2: `user=` U `^Aauth=Bearer ` TOKEN `^A^A`.
/// - OAUTHBEARER (RFC 7628 §3.1): the GS2 header `n,a=` U `,` (U as a saslname, RFC 5801 §4:
///   `=` → `=3D`, `,` → `=2C`), then `^Ahost=` H `^Aport=` P `^Aauth=Bearer ` TOKEN `^A^A`.
pub fn initial_response(
    mechanism: SaslMechanism,
    user: &str,
    host: &str,
    port: u16,
    token: &str,
) -> String {
    match mechanism {
        SaslMechanism::XOAuth2 => format!("user={user}\x01auth=Bearer {token}\x01\x01"),
        SaslMechanism::OAuthBearer => {
            let saslname = user.replace('=', "=3D").replace(',', "=2C");
            format!("n,a={saslname},\x01host={host}\x01port={port}\x01auth=Bearer {token}\x01\x01")
        }
    }
}

/// The SASL exchange of one `AUTHENTICATE`: the initial response at the first continuation;
/// at a second one (the server's error challenge, base64 JSON with `status`), the answer that
/// makes it finish with the tagged `NO`: an empty line for XOAUTH2 (Google's protocol doc), a
/// lone `^A` for OAUTHBEARER (RFC 7628 §3.2.3).
struct Exchange {
    mechanism: SaslMechanism,
    response: Option<String>,
}

impl async_imap::Authenticator for Exchange {
    type Response = String;

    fn process(&mut self, _challenge: &[u8]) -> String {
        match (self.response.take(), self.mechanism) {
            (Some(response), _) => response,
            (None, SaslMechanism::XOAuth2) => String::new(),
            (None, SaslMechanism::OAuthBearer) => "\x01".to_owned(),
        }
    }
}

/// Logs in with an OAuth2 bearer token. When the server refuses a token that was still
/// cached (revoked, or expired early), it fetches a new one and tries once more on the same
/// connection (a refused `AUTHENTICATE` leaves it unauthenticated, RFC 3501 §6.2.2).
#[derive(Debug, Clone)]
pub struct OAuth2Login {
    /// The SASL user: the mailbox's login.
    user: String,
    host: String,
    port: u16,
    mechanism: SaslMechanism,
    tokens: Arc<TokenSource>,
}

impl OAuth2Login {
    /// Logs in as `user` on `host`:`port` with tokens from `tokens`, by `mechanism`.
    pub fn new(
        user: String,
        host: String,
        port: u16,
        mechanism: SaslMechanism,
        tokens: Arc<TokenSource>,
    ) -> Self {
        Self {
            user,
            host,
            port,
            mechanism,
            tokens,
        }
    }

    async fn token(&self) -> Result<SecretString, AuthError> {
        self.tokens
            .access_token(&self.user)
            .await
            .map_err(|error| AuthError::Credentials(error.into()))
    }

    fn exchange(&self, token: &SecretString) -> Exchange {
        Exchange {
            mechanism: self.mechanism,
            response: Some(initial_response(
                self.mechanism,
                &self.user,
                &self.host,
                self.port,
                token.expose_secret(),
            )),
        }
    }
}

impl Authenticator for OAuth2Login {
    fn mechanism(&self) -> &'static str {
        self.mechanism.name()
    }

    async fn authenticate(&self, client: ImapClient) -> Result<ImapSession, AuthError> {
        let token = self.token().await?;
        let client = match client
            .authenticate(self.mechanism.name(), self.exchange(&token))
            .await
        {
            Ok(session) => return Ok(session),
            // `[UNAVAILABLE]` (RFC 5530 §3): the server could not check the token (its
            // introspection endpoint is down); a new token would not help.
            Err((async_imap::error::Error::No(message), client))
                if !message.contains("[UNAVAILABLE]") =>
            {
                client
            }
            Err((error, _)) => return Err(self.error(error)),
        };
        // Refused: the token may have been revoked or expired early. Once more with a new one.
        self.tokens.invalidate(&self.user, &token).await;
        let token = self.token().await?;
        client
            .authenticate(self.mechanism.name(), self.exchange(&token))
            .await
            .map_err(|(error, _)| self.error(error))
    }
}

impl OAuth2Login {
    fn error(&self, error: async_imap::error::Error) -> AuthError {
        match error {
            async_imap::error::Error::No(message) => AuthError::Rejected(server_text(&message)),
            async_imap::error::Error::Bad(message) => AuthError::Refused {
                mechanism: self.mechanism.name(),
                message: server_text(&message),
            },
            other => AuthError::Connection(other),
        }
    }
}

/// How a mailbox logs in: a password (LOGIN) or OAuth2 (SASL). The watcher's default
/// [`Authenticator`].
#[derive(Debug, Clone)]
pub enum MailboxLogin {
    /// IMAP `LOGIN`.
    Password(PasswordLogin),
    /// SASL `XOAUTH2` or `OAUTHBEARER`.
    OAuth2(OAuth2Login),
}

impl Authenticator for MailboxLogin {
    fn mechanism(&self) -> &'static str {
        match self {
            Self::Password(login) => login.mechanism(),
            Self::OAuth2(login) => login.mechanism(),
        }
    }

    async fn authenticate(&self, client: ImapClient) -> Result<ImapSession, AuthError> {
        match self {
            Self::Password(login) => login.authenticate(client).await,
            Self::OAuth2(login) => login.authenticate(client).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xoauth2_matches_googles_example() {
        // developers.google.com/gmail/imap/xoauth2-protocol, "SASL XOAUTH2 initial client
        // response": user=someuser@example.com^Aauth=Bearer ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg^A^A
        let response = initial_response(
            SaslMechanism::XOAuth2,
            "someuser@example.com",
            "imap.gmail.com",
            993,
            "ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg",
        );
        use base64::Engine;
        assert_eq!(
            base64::engine::general_purpose::STANDARD.encode(response),
            "dXNlcj1zb21ldXNlckBleGFtcGxlLmNvbQFhdXRoPUJlYXJlciB5YTI5LnZGOWRmdDRxbVRjMk52YjNSbGNrQmhkSFJoZG1semRHRXVZMjl0Q2cBAQ=="
        );
    }

    #[test]
    fn oauthbearer_matches_rfc_7628() {
        // RFC 7628 §4.1: n,a=user@example.com,^Ahost=server.example.com^Aport=143^Aauth=Bearer vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==^A^A
        let response = initial_response(
            SaslMechanism::OAuthBearer,
            "user@example.com",
            "server.example.com",
            143,
            "vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==",
        );
        assert_eq!(
            response,
            "n,a=user@example.com,\x01host=server.example.com\x01port=143\x01auth=Bearer vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==\x01\x01"
        );
        let odd = initial_response(SaslMechanism::OAuthBearer, "a=b,c", "h", 1, "t");
        assert!(odd.starts_with("n,a=a=3Db=2Cc,\x01"), "{odd}");
    }

    #[test]
    fn an_error_challenge_gets_the_answer_that_ends_the_exchange() {
        use async_imap::Authenticator as _;
        let mut xoauth2 = Exchange {
            mechanism: SaslMechanism::XOAuth2,
            response: Some("first".into()),
        };
        assert_eq!(xoauth2.process(b""), "first");
        assert_eq!(xoauth2.process(br#"{"status":"400"}"#), "");
        let mut bearer = Exchange {
            mechanism: SaslMechanism::OAuthBearer,
            response: Some("first".into()),
        };
        assert_eq!(bearer.process(b""), "first");
        assert_eq!(bearer.process(br#"{"status":"invalid_token"}"#), "\x01");
    }
}
