//! `imap.accounts.<address>.oauth2`: how a mailbox logs in with OAuth2 instead of a password
//! (Microsoft 365 has no basic authentication for IMAP any more; Google Workspace admins often
//! forbid app passwords). The token handling itself is `crate::oauth2`; this is the config's
//! shape, the providers' presets and the checks that need more than the types.

use std::fmt;
use std::path::PathBuf;

use secrecy::SecretString;
use serde::Deserialize;
use serde_with::{DisplayFromStr, serde_as};

/// `imap.accounts.<address>.oauth2:`. See `config.yaml.example`.
#[serde_as]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuth2Account {
    /// Whose endpoints and scope are the defaults.
    #[serde_as(as = "DisplayFromStr")]
    pub provider: Provider,
    /// The OAuth client (application) id.
    pub client_id: String,
    /// The client secret; public clients (a device-flow app registration) have none. Never
    /// printed.
    #[serde(default)]
    pub client_secret: Option<SecretString>,
    /// A refresh token to start from. A refresh token in the state (from `oauth login`, or
    /// rotated by the provider) is preferred on every start. Never printed.
    #[serde(default)]
    pub refresh_token: Option<SecretString>,
    /// Microsoft only: the tenant in the endpoints' path (`common`, `organizations`, a domain
    /// or a tenant id). Default `common`; the client-credentials grant needs a real tenant.
    #[serde(default)]
    pub tenant: Option<String>,
    /// Space-separated scopes; the provider's default when omitted.
    #[serde(default)]
    pub scope: Option<String>,
    /// The token endpoint (RFC 6749 §3.2); required for `custom`, overrides the preset.
    #[serde(default)]
    pub token_url: Option<String>,
    /// The device authorization endpoint (RFC 8628 §3.1) for `oauth login`.
    #[serde(default)]
    pub device_authorization_url: Option<String>,
    /// The authorization endpoint (RFC 6749 §3.1) for `oauth login`'s loopback redirect flow
    /// (RFC 8252 §7.3), which Google needs: it does not allow the Gmail scope in the device flow.
    #[serde(default)]
    pub authorization_url: Option<String>,
    /// The SASL mechanism.
    #[serde_as(as = "DisplayFromStr")]
    #[serde(default)]
    pub mechanism: SaslMechanism,
    /// How access tokens are obtained.
    #[serde_as(as = "DisplayFromStr")]
    #[serde(default)]
    pub grant: Grant,
    /// `grant: service_account`: the service account's JSON key file (Google Cloud console,
    /// "Keys"), with `client_email`, `private_key` (PKCS#8 PEM) and `token_uri`.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

/// `oauth2.provider`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    /// Google: `https://oauth2.googleapis.com/token`, scope `https://mail.google.com/`
    /// (developers.google.com/gmail/imap/xoauth2-protocol).
    Google,
    /// Microsoft identity platform v2.0: `https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token`,
    /// scope `https://outlook.office.com/IMAP.AccessAsUser.All offline_access` (learn.microsoft.com,
    /// "Authenticate an IMAP, POP or SMTP connection using OAuth").
    Microsoft,
    /// Any other RFC 6749 server: `token_url` is required.
    Custom,
}

impl std::str::FromStr for Provider {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "google" => Ok(Self::Google),
            "microsoft" => Ok(Self::Microsoft),
            "custom" => Ok(Self::Custom),
            other => Err(format!(
                "expected google, microsoft or custom, got {other:?}"
            )),
        }
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Google => "google",
            Self::Microsoft => "microsoft",
            Self::Custom => "custom",
        })
    }
}

/// `oauth2.mechanism`: the SASL mechanism sent in `AUTHENTICATE`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SaslMechanism {
    /// Google's and Microsoft's `XOAUTH2` (developers.google.com/gmail/imap/xoauth2-protocol).
    #[default]
    XOAuth2,
    /// `OAUTHBEARER`, RFC 7628.
    OAuthBearer,
}

impl SaslMechanism {
    /// The mechanism's name in `AUTHENTICATE` and `CAPABILITY` (`AUTH=`).
    pub fn name(self) -> &'static str {
        match self {
            Self::XOAuth2 => "XOAUTH2",
            Self::OAuthBearer => "OAUTHBEARER",
        }
    }
}

impl std::str::FromStr for SaslMechanism {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "xoauth2" => Ok(Self::XOAuth2),
            "oauthbearer" => Ok(Self::OAuthBearer),
            other => Err(format!("expected xoauth2 or oauthbearer, got {other:?}")),
        }
    }
}

impl fmt::Display for SaslMechanism {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::XOAuth2 => "xoauth2",
            Self::OAuthBearer => "oauthbearer",
        })
    }
}

/// `oauth2.grant`: how the relay obtains access tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Grant {
    /// A refresh token (RFC 6749 §6) from the config or from `oauth login`.
    #[default]
    RefreshToken,
    /// Microsoft's client credentials grant (RFC 6749 §4.4): app-only access to the mailbox,
    /// scope `https://outlook.office365.com/.default`, no refresh token at all.
    ClientCredentials,
    /// A Google Workspace service account with domain-wide delegation: the JWT bearer grant
    /// (RFC 7523 §2.1) signed with the key file's RS256 key, `sub` = the mailbox.
    ServiceAccount,
}

impl std::str::FromStr for Grant {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "refresh_token" => Ok(Self::RefreshToken),
            "client_credentials" => Ok(Self::ClientCredentials),
            "service_account" => Ok(Self::ServiceAccount),
            other => Err(format!(
                "expected refresh_token, client_credentials or service_account, got {other:?}"
            )),
        }
    }
}

impl fmt::Display for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::RefreshToken => "refresh_token",
            Self::ClientCredentials => "client_credentials",
            Self::ServiceAccount => "service_account",
        })
    }
}

/// Google's token endpoint (developers.google.com/identity/protocols/oauth2/native-app).
pub const GOOGLE_TOKEN_URL: &str = "https://oauth2.googleapis.com/token";
/// Google's authorization endpoint, for the loopback redirect flow.
pub const GOOGLE_AUTHORIZATION_URL: &str = "https://accounts.google.com/o/oauth2/v2/auth";
/// Google's device authorization endpoint (developers.google.com/identity/protocols/oauth2/limited-input-device).
/// Google does not allow the Gmail scope there, so `oauth login` uses it only when
/// `device_authorization_url` is configured, and the loopback redirect flow otherwise.
pub const GOOGLE_DEVICE_AUTHORIZATION_URL: &str = "https://oauth2.googleapis.com/device/code";
/// The scope of full IMAP access to a Gmail mailbox.
pub const GOOGLE_SCOPE: &str = "https://mail.google.com/";
/// Microsoft's delegated IMAP scope, with `offline_access` for a refresh token.
pub const MICROSOFT_SCOPE: &str = "https://outlook.office.com/IMAP.AccessAsUser.All offline_access";
/// Microsoft's scope for the client credentials grant (application permission
/// `IMAP.AccessAsApp`).
pub const MICROSOFT_APP_SCOPE: &str = "https://outlook.office365.com/.default";

/// An account's endpoints and scope, the presets filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    /// The token endpoint.
    pub token_url: String,
    /// The device authorization endpoint.
    pub device_authorization_url: Option<String>,
    /// The authorization endpoint, for the loopback redirect flow.
    pub authorization_url: Option<String>,
    /// Space-separated scopes.
    pub scope: String,
}

impl OAuth2Account {
    /// The endpoints and scope: the configured ones, else the provider's preset. `None` for the
    /// token URL of a `custom` provider without one (refused by validation).
    pub fn endpoints(&self) -> Endpoints {
        let tenant = self.tenant.as_deref().unwrap_or("common");
        let microsoft =
            |path: &str| format!("https://login.microsoftonline.com/{tenant}/oauth2/v2.0/{path}");
        let (token_url, device, authorization, scope) = match self.provider {
            Provider::Google => (
                GOOGLE_TOKEN_URL.to_owned(),
                Some(GOOGLE_DEVICE_AUTHORIZATION_URL.to_owned()),
                Some(GOOGLE_AUTHORIZATION_URL.to_owned()),
                GOOGLE_SCOPE,
            ),
            Provider::Microsoft => (
                microsoft("token"),
                Some(microsoft("devicecode")),
                Some(microsoft("authorize")),
                if self.grant == Grant::ClientCredentials {
                    MICROSOFT_APP_SCOPE
                } else {
                    MICROSOFT_SCOPE
                },
            ),
            Provider::Custom => (String::new(), None, None, ""),
        };
        Endpoints {
            token_url: self.token_url.clone().unwrap_or(token_url),
            device_authorization_url: self.device_authorization_url.clone().or(device),
            authorization_url: self.authorization_url.clone().or(authorization),
            scope: self.scope.clone().unwrap_or_else(|| scope.to_owned()),
        }
    }

    /// Checks what the types alone do not. Returns the key below `oauth2.` and the message.
    pub(super) fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.client_id.trim().is_empty() {
            return Err(("client_id", "must not be empty".into()));
        }
        if self.provider == Provider::Custom && self.token_url.is_none() {
            return Err(("token_url", "is required with provider custom".into()));
        }
        if self.provider == Provider::Custom && self.scope.is_none() {
            return Err(("scope", "is required with provider custom".into()));
        }
        if self.scope.as_deref().is_some_and(|s| s.trim().is_empty()) {
            return Err(("scope", "must not be empty".into()));
        }
        if self.tenant.is_some() && self.provider != Provider::Microsoft {
            return Err(("tenant", "applies to provider microsoft only".into()));
        }
        for (key, url) in [
            ("token_url", &self.token_url),
            ("device_authorization_url", &self.device_authorization_url),
            ("authorization_url", &self.authorization_url),
        ] {
            if let Some(url) = url {
                super::check_http_url(url).map_err(|message| (key, message))?;
            }
        }
        match self.grant {
            Grant::RefreshToken if self.key_file.is_some() => {
                Err(("key_file", "applies to grant service_account only".into()))
            }
            Grant::RefreshToken => Ok(()),
            Grant::ClientCredentials if self.provider == Provider::Google => Err((
                "grant",
                "Google has no client credentials grant for Gmail; use service_account".into(),
            )),
            Grant::ClientCredentials if self.client_secret.is_none() => Err((
                "client_secret",
                "is required with grant client_credentials".into(),
            )),
            Grant::ClientCredentials => Ok(()),
            Grant::ServiceAccount if self.provider == Provider::Microsoft => Err((
                "grant",
                "service_account is Google's; Microsoft uses client_credentials".into(),
            )),
            Grant::ServiceAccount if self.key_file.is_none() => {
                Err(("key_file", "is required with grant service_account".into()))
            }
            Grant::ServiceAccount => Ok(()),
        }
    }
}
