//! `config.yaml`: a typed mirror of the file that `interface.md` specifies.
//!
//! Loading goes in three steps:
//! 1. the YAML is parsed into a tree;
//! 2. every scalar becomes text, and `${NAME}` / `${NAME:-default}` in it is replaced by the
//!    environment variable (so a password containing `#` or `: ` is safe);
//! 3. the tree is deserialised into [`Config`], each scalar converted to its field's type with
//!    `FromStr` (so `port: ${IMAP_PORT:-993}` works), unknown keys rejected.
//!
//! Then `Config::validate` checks ranges and formats. Every error names the file and the key.
//! Secrets (bot token, SeaTable API token, IMAP passwords) are [`SecretString`]s, whose `Debug`
//! prints `[REDACTED]`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use secrecy::SecretString;
use serde::Deserialize;
use serde_norway::Value;
use serde_with::{DisplayFromStr, serde_as};

mod env;
mod http;
mod oauth2;

pub use self::env::expand_vars;
pub use self::http::{ApiToken, HttpConfig, TlsFiles};
pub use self::oauth2::{
    Endpoints, GOOGLE_SCOPE, Grant, MICROSOFT_APP_SCOPE, MICROSOFT_SCOPE, OAuth2Account, Provider,
    SaslMechanism,
};

use self::env::expand_tree;

/// Why a configuration could not be loaded. Every variant names the file; key errors also name
/// the dotted key path (`telegram.limits.chat_per_second`).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: cannot read the config file: {source}", .file.display())]
    Read {
        /// The config file.
        file: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid YAML.
    #[error("{}: not valid YAML: {message}", .file.display())]
    Yaml {
        /// The config file.
        file: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// One key is missing, unknown, of the wrong type or out of range.
    #[error("{}: {key}: {message}", .file.display())]
    Key {
        /// The config file.
        file: PathBuf,
        /// Dotted path of the key, e.g. `imap.accounts.reports@example.com.password`.
        key: String,
        /// What is wrong with it.
        message: String,
    },
}

/// The whole configuration. See `config.yaml.example` for every key with its default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Bot API access and sending limits.
    pub telegram: TelegramConfig,
    /// Where the directory (users, mailboxes, groups) lives.
    pub seatable: SeaTableConfig,
    /// Defaults for every mailbox; rows may override host, port, login and password.
    #[serde(default)]
    pub imap: ImapConfig,
    /// How a Superset e-mail becomes a report.
    #[serde(default)]
    pub reports: ReportsConfig,
    /// The outbox worker.
    #[serde(default)]
    pub delivery: DeliveryConfig,
    /// The local durable state.
    #[serde(default)]
    pub state: StateConfig,
    /// The HTTP listener for `/healthz`, `/readyz` and `/metrics`.
    #[serde(default)]
    pub http: HttpConfig,
}

/// `telegram:`: the Bot API.
#[serde_as]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelegramConfig {
    /// The bot token from @BotFather (required). Never printed.
    pub bot_token: SecretString,
    /// Base URL of the Bot API: the cloud server, a local Bot API server, or a test fake.
    #[serde(default = "default_api_url")]
    pub api_url: String,
    /// Proactive send limits; Telegram's documented limits are the defaults.
    #[serde(default)]
    pub limits: TelegramLimits,
    /// Whether PNGs go as photos (when Telegram accepts them as photos) or as documents.
    #[serde_as(as = "DisplayFromStr")]
    #[serde(default)]
    pub png_as: PngAs,
    /// Largest file sent, in bytes. 50,000,000 on the cloud Bot API (sendDocument); a local Bot
    /// API server allows 2,000,000,000.
    #[serde_as(as = "DisplayFromStr")]
    #[serde(default = "default_max_upload_bytes")]
    pub max_upload_bytes: u64,
    /// Country calling code for phone numbers written without one (`8XXXXXXXXXX`, `XXXXXXXXXX`).
    #[serde(default = "default_country_code")]
    pub default_country_code: String,
    /// The chats (`chat_id`s: a sysadmin's user id, or a group's id) told in plain words when
    /// something needs a person: a mailbox failing, SeaTable unreachable, a recipient that
    /// failed for good, a report that cannot be parsed, a schema problem ([`crate::alerts`]).
    /// Empty (the default): no alerts.
    #[serde_as(as = "Vec<DisplayFromStr>")]
    #[serde(default)]
    pub admin_chats: Vec<i64>,
    /// How long a mailbox may fail to connect, or the directory go without a refresh from
    /// SeaTable, before the admin chats are told, in seconds (default 600).
    #[serde_as(as = "DisplayFromStr")]
    #[serde(default = "default_admin_alert_after_secs")]
    pub admin_alert_after_secs: u64,
}

/// `telegram.limits:`, from the Bots FAQ ("My bot is hitting limits").
#[serde_as]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelegramLimits {
    /// Messages per second across all chats (FAQ: about 30).
    #[serde_as(as = "DisplayFromStr")]
    #[serde(default = "default_global_per_second")]
    pub global_per_second: u32,
    /// Messages per second into one chat (FAQ: 1).
    #[serde_as(as = "DisplayFromStr")]
    #[serde(default = "default_chat_per_second")]
    pub chat_per_second: u32,
    /// Messages per minute into one group (FAQ: 20).
    #[serde_as(as = "DisplayFromStr")]
    #[serde(default = "default_group_per_minute")]
    pub group_per_minute: u32,
}

impl Default for TelegramLimits {
    fn default() -> Self {
        Self {
            global_per_second: default_global_per_second(),
            chat_per_second: default_chat_per_second(),
            group_per_minute: default_group_per_minute(),
        }
    }
}

/// `telegram.png_as`: how PNG screenshots are sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PngAs {
    /// `sendPhoto` / photo albums for every PNG Telegram accepts as a photo; the rest as documents.
    #[default]
    Photo,
    /// Every PNG as a document (no recompression by Telegram).
    Document,
}

impl std::str::FromStr for PngAs {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "photo" => Ok(Self::Photo),
            "document" => Ok(Self::Document),
            other => Err(format!("expected photo or document, got {other:?}")),
        }
    }
}

impl fmt::Display for PngAs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Photo => "photo",
            Self::Document => "document",
        })
    }
}

/// `seatable:`: the base that holds users, mailboxes and groups.
#[serde_as]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeaTableConfig {
    /// The SeaTable server, e.g. `https://cloud.seatable.io` (required).
    pub server_url: String,
    /// A read-write base API token (required). Never printed.
    pub api_token: SecretString,
    /// How long a directory snapshot is used before it is re-read, in seconds.
    #[serde_as(as = "DisplayFromStr")]
    #[serde(default = "default_sixty")]
    pub cache_ttl_secs: u64,
    /// How often the mailbox list is re-read for new or removed rows, in seconds.
    #[serde_as(as = "DisplayFromStr")]
    #[serde(default = "default_sixty")]
    pub reload_secs: u64,
    /// Table names; the defaults match `seatable-schema/`.
    #[serde(default)]
    pub tables: TableNames,
    /// Whether to write one row per delivered report to the `deliveries` table
    /// (`seatable.tables.deliveries`), in the background after its sends finished. Off by
    /// default; a base without the table leaves it off, with a warning.
    #[serde_as(as = "DisplayFromStr")]
    #[serde(default)]
    pub delivery_log: bool,
}

/// `seatable.tables:`: the names of the three tables.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableNames {
    /// People: `Name`, `phone`, `mailboxes`, `id_telegram`.
    #[serde(default = "default_users_table")]
    pub users: String,
    /// Mailboxes: `Name`, `email`, bindings, `last_uid`, overrides.
    #[serde(default = "default_mailboxes_table")]
    pub mailboxes: String,
    /// Telegram groups: `Name`, `id_telegram_chat`, `is_locked`, `mailboxes`.
    #[serde(default = "default_groups_table")]
    pub groups: String,
    /// The delivery log (`seatable.delivery_log`): one row per report.
    #[serde(default = "default_deliveries_table")]
    pub deliveries: String,
}

impl Default for TableNames {
    fn default() -> Self {
        Self {
            users: default_users_table(),
            mailboxes: default_mailboxes_table(),
            groups: default_groups_table(),
            deliveries: default_deliveries_table(),
        }
    }
}

/// `imap:`: defaults for every mailbox.
#[serde_as]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImapConfig {
    /// IMAP server host; required unless every mailbox row has `imap_host`.
    #[serde(default)]
    pub host: Option<String>,
    /// IMAP server port.
    #[serde_as(as = "DisplayFromStr")]
    #[serde(default = "default_imap_port")]
    pub port: u16,
    /// Transport security.
    #[serde_as(as = "DisplayFromStr")]
    #[serde(default)]
    pub tls: TlsMode,
    /// The folder to watch.
    #[serde(default = "default_folder")]
    pub folder: String,
    /// IDLE is re-issued at least this often, in seconds (RFC 2177 §3: servers may log a client
    /// out after 30 minutes of inactivity, so at most 1740).
    #[serde_as(as = "DisplayFromStr")]
    #[serde(default = "default_idle_renew_secs")]
    pub idle_renew_secs: u64,
    /// How the relay authenticates.
    #[serde_as(as = "DisplayFromStr")]
    #[serde(default)]
    pub auth: AuthMethod,
    /// Passwords by mailbox address, for rows that carry none.
    #[serde(default)]
    pub accounts: BTreeMap<String, ImapAccount>,
}

impl Default for ImapConfig {
    fn default() -> Self {
        Self {
            host: None,
            port: default_imap_port(),
            tls: TlsMode::default(),
            folder: default_folder(),
            idle_renew_secs: default_idle_renew_secs(),
            auth: AuthMethod::default(),
            accounts: BTreeMap::new(),
        }
    }
}

impl ImapConfig {
    /// The configured password of a mailbox address, matched case-insensitively.
    pub fn password_for(&self, address: &str) -> Option<&SecretString> {
        self.account(address)
            .and_then(|(_, account)| account.password.as_ref())
    }

    /// The account named `name` (a mailbox address or a row's `imap_account`), matched
    /// case-insensitively, with its name as written in the config.
    pub fn account(&self, name: &str) -> Option<(&str, &ImapAccount)> {
        self.accounts
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(key, account)| (key.as_str(), account))
    }
}

/// `imap.accounts.<name>:` (the name is the mailbox address, or what a mailbox row's
/// `imap_account` cell names): exactly one of `password` and `oauth2`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImapAccount {
    /// The mailbox password, for IMAP LOGIN. Never printed.
    #[serde(default)]
    pub password: Option<SecretString>,
    /// OAuth2 (SASL XOAUTH2 or OAUTHBEARER) instead of a password.
    #[serde(default)]
    pub oauth2: Option<OAuth2Account>,
}

/// `imap.tls`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TlsMode {
    /// TLS from the first byte (port 993).
    #[default]
    Implicit,
    /// Plain connection upgraded with STARTTLS (RFC 3501 §6.2.1), usually port 143.
    StartTls,
    /// No TLS: only for loopback tests.
    None,
}

impl std::str::FromStr for TlsMode {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "implicit" => Ok(Self::Implicit),
            "starttls" => Ok(Self::StartTls),
            "none" => Ok(Self::None),
            other => Err(format!(
                "expected implicit, starttls or none, got {other:?}"
            )),
        }
    }
}

impl fmt::Display for TlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Implicit => "implicit",
            Self::StartTls => "starttls",
            Self::None => "none",
        })
    }
}

/// `imap.auth`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AuthMethod {
    /// IMAP LOGIN with a password (RFC 3501 §6.2.3).
    #[default]
    Password,
    /// Reserved: OAuth2 is configured per account (`imap.accounts.<address>.oauth2`); this
    /// value is refused with a message saying so.
    XOAuth2,
}

impl std::str::FromStr for AuthMethod {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "password" => Ok(Self::Password),
            "xoauth2" => Ok(Self::XOAuth2),
            other => Err(format!("expected password or xoauth2, got {other:?}")),
        }
    }
}

impl fmt::Display for AuthMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Password => "password",
            Self::XOAuth2 => "xoauth2",
        })
    }
}

/// `reports:`.
#[serde_as]
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportsConfig {
    /// Stripped from the subject to make the title; the first that matches wins.
    #[serde(default = "default_subject_prefixes")]
    pub subject_prefixes: Vec<String>,
    /// Relay Superset error notifications too (as a text message)?
    #[serde_as(as = "DisplayFromStr")]
    #[serde(default)]
    pub forward_errors: bool,
    /// Relay only mail the receiving MTA authenticated (`Authentication-Results`, RFC 8601);
    /// off when absent.
    #[serde(default)]
    pub require_authentication: Option<RequireAuthentication>,
}

/// `reports.require_authentication`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequireAuthentication {
    /// The authserv-id of the MTA that receives the reports (the first word of the
    /// `Authentication-Results` headers it adds, e.g. `mx.example.com`). Only the topmost
    /// header, and only with this id, is trusted.
    pub authserv_id: String,
}

impl Default for ReportsConfig {
    fn default() -> Self {
        Self {
            subject_prefixes: default_subject_prefixes(),
            forward_errors: false,
            require_authentication: None,
        }
    }
}

/// `delivery:`.
#[serde_as]
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryConfig {
    /// Sends in flight across different chats (always in order within a chat).
    #[serde_as(as = "DisplayFromStr")]
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// A send still failing transiently after this many seconds is marked failed.
    #[serde_as(as = "DisplayFromStr")]
    #[serde(default = "default_give_up_after_secs")]
    pub give_up_after_secs: u64,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            concurrency: default_concurrency(),
            give_up_after_secs: default_give_up_after_secs(),
        }
    }
}

/// `state:`: SQLite (`path`, the embedded default) or PostgreSQL (`url`, shared by replicas);
/// never both.
#[serde_as]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// The SQLite database with checkpoints, outbox, ledger, file_ids and the directory
    /// snapshot; `/var/lib/report-relay/state.db` when neither this nor `url` is set.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// A PostgreSQL URL, `postgres://user:password@host:5432/db`, with libpq's `sslmode`
    /// (`disable`, `prefer`, `require`, `verify-ca`, `verify-full`) and `sslrootcert` query
    /// parameters honoured over rustls. A secret: it holds the password.
    #[serde(default)]
    pub url: Option<SecretString>,
    /// How long a lease lasts without renewal, in seconds (PostgreSQL only); renewed every
    /// third of it. Default 15.
    #[serde_as(as = "DisplayFromStr")]
    #[serde(default = "default_lease_secs")]
    pub lease_secs: u64,
    /// This replica's name in the leases (PostgreSQL only); default `<hostname>-<pid>`.
    #[serde(default)]
    pub replica_id: Option<String>,
}

impl StateConfig {
    /// The SQLite file: `path`, or the default.
    pub fn sqlite_path(&self) -> PathBuf {
        self.path.clone().unwrap_or_else(default_state_path)
    }
}

impl PartialEq for StateConfig {
    fn eq(&self, other: &Self) -> bool {
        use secrecy::ExposeSecret;
        self.path == other.path
            && self.url.as_ref().map(ExposeSecret::expose_secret)
                == other.url.as_ref().map(ExposeSecret::expose_secret)
            && self.lease_secs == other.lease_secs
            && self.replica_id == other.replica_id
    }
}

impl Eq for StateConfig {}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            path: None,
            url: None,
            lease_secs: default_lease_secs(),
            replica_id: None,
        }
    }
}

fn default_api_url() -> String {
    "https://api.telegram.org".to_owned()
}
fn default_max_upload_bytes() -> u64 {
    50_000_000
}
fn default_admin_alert_after_secs() -> u64 {
    600
}

fn default_country_code() -> String {
    "7".to_owned()
}
fn default_global_per_second() -> u32 {
    30
}
fn default_chat_per_second() -> u32 {
    1
}
fn default_group_per_minute() -> u32 {
    20
}
fn default_sixty() -> u64 {
    60
}
fn default_users_table() -> String {
    "users".to_owned()
}
fn default_mailboxes_table() -> String {
    "mailboxes".to_owned()
}
fn default_groups_table() -> String {
    "t_chats".to_owned()
}
fn default_deliveries_table() -> String {
    "deliveries".to_owned()
}
fn default_imap_port() -> u16 {
    993
}
fn default_folder() -> String {
    "INBOX".to_owned()
}
fn default_idle_renew_secs() -> u64 {
    540
}
fn default_subject_prefixes() -> Vec<String> {
    vec!["[Report]".to_owned(), "[Alert]".to_owned()]
}
fn default_concurrency() -> usize {
    16
}
fn default_give_up_after_secs() -> u64 {
    86_400
}
fn default_lease_secs() -> u64 {
    15
}
fn default_state_path() -> PathBuf {
    PathBuf::from("/var/lib/report-relay/state.db")
}

impl Config {
    /// Reads and validates `file`, expanding `${VAR}` from the process environment.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file, and the key where one is at fault.
    pub fn load(file: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
            file: file.to_owned(),
            source,
        })?;
        Self::from_yaml(&text, file, &|name| std::env::var(name).ok())
    }

    /// Parses and validates YAML `text` as if read from `file`, looking variables up with `env`.
    ///
    /// # Errors
    /// [`ConfigError`] naming `file`, and the key where one is at fault.
    pub fn from_yaml(
        text: &str,
        file: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let mut tree: Value = serde_norway::from_str(text).map_err(|error| ConfigError::Yaml {
            file: file.to_owned(),
            message: error.to_string(),
        })?;
        if tree.is_null() {
            tree = Value::Mapping(Default::default());
        }
        expand_tree(&mut tree, &mut Vec::new(), env).map_err(|(key, message)| {
            ConfigError::Key {
                file: file.to_owned(),
                key,
                message,
            }
        })?;
        let config: Self = serde_path_to_error::deserialize(tree).map_err(|error| {
            let key = error.path().to_string();
            let message = error.into_inner().to_string();
            // serde reports a missing field at the parent; name the field itself.
            match missing_field(&message) {
                Some(field) if key == "." => ConfigError::Key {
                    file: file.to_owned(),
                    key: field.to_owned(),
                    message: "required key is missing".to_owned(),
                },
                Some(field) => ConfigError::Key {
                    file: file.to_owned(),
                    key: format!("{key}.{field}"),
                    message: "required key is missing".to_owned(),
                },
                None => ConfigError::Key {
                    file: file.to_owned(),
                    key,
                    message,
                },
            }
        })?;
        config
            .validate()
            .map_err(|(key, message)| (key.to_owned(), message))
            .and_then(|()| config.validate_accounts())
            .and_then(|()| config.http.validate())
            .map_err(|(key, message)| ConfigError::Key {
                file: file.to_owned(),
                key,
                message,
            })?;
        Ok(config)
    }

    /// Checks each `imap.accounts` entry: exactly one of `password` and `oauth2`, and the
    /// OAuth2 settings.
    ///
    /// # Errors
    /// The dotted key (`imap.accounts.<name>.oauth2.token_url`) and what is wrong with it.
    fn validate_accounts(&self) -> Result<(), (String, String)> {
        for (name, account) in &self.imap.accounts {
            let key = format!("imap.accounts.{name}");
            match (&account.password, &account.oauth2) {
                (Some(_), Some(_)) => {
                    return Err((key, "set either password or oauth2, not both".into()));
                }
                (None, None) => {
                    return Err((key, "needs a password or an oauth2 section".into()));
                }
                (Some(_), None) => {}
                (None, Some(oauth2)) => oauth2
                    .validate()
                    .map_err(|(field, message)| (format!("{key}.oauth2.{field}"), message))?,
            }
        }
        Ok(())
    }

    /// Checks ranges and formats that the types alone do not.
    ///
    /// # Errors
    /// The dotted key and what is wrong with it.
    fn validate(&self) -> Result<(), (&'static str, String)> {
        use secrecy::ExposeSecret;
        let t = &self.telegram;
        if t.bot_token.expose_secret().trim().is_empty() {
            return Err(("telegram.bot_token", "must not be empty".into()));
        }
        check_http_url(&t.api_url).map_err(|m| ("telegram.api_url", m))?;
        for (key, value) in [
            (
                "telegram.limits.global_per_second",
                t.limits.global_per_second,
            ),
            ("telegram.limits.chat_per_second", t.limits.chat_per_second),
            (
                "telegram.limits.group_per_minute",
                t.limits.group_per_minute,
            ),
        ] {
            if value == 0 {
                return Err((key, "must be at least 1".into()));
            }
        }
        if t.max_upload_bytes == 0 {
            return Err(("telegram.max_upload_bytes", "must be at least 1".into()));
        }
        let code = &t.default_country_code;
        if code.is_empty() || code.len() > 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
            return Err((
                "telegram.default_country_code",
                format!("expected 1 to 3 digits without '+', got {code:?}"),
            ));
        }
        if t.admin_alert_after_secs == 0 {
            return Err((
                "telegram.admin_alert_after_secs",
                "must be at least 1".into(),
            ));
        }
        if let Some(zero) = t.admin_chats.iter().find(|id| **id == 0) {
            return Err(("telegram.admin_chats", format!("{zero} is not a chat id")));
        }
        let s = &self.seatable;
        check_http_url(&s.server_url).map_err(|m| ("seatable.server_url", m))?;
        if s.api_token.expose_secret().trim().is_empty() {
            return Err(("seatable.api_token", "must not be empty".into()));
        }
        if s.cache_ttl_secs == 0 {
            return Err(("seatable.cache_ttl_secs", "must be at least 1".into()));
        }
        if s.reload_secs == 0 {
            return Err(("seatable.reload_secs", "must be at least 1".into()));
        }
        if !t.admin_chats.is_empty() && t.admin_alert_after_secs <= s.cache_ttl_secs {
            return Err((
                "telegram.admin_alert_after_secs",
                format!(
                    "must be more than seatable.cache_ttl_secs ({}): the directory is that old \
                     between its refreshes, and would be reported as not refreshed",
                    s.cache_ttl_secs
                ),
            ));
        }
        for (key, name) in [
            ("seatable.tables.users", &s.tables.users),
            ("seatable.tables.mailboxes", &s.tables.mailboxes),
            ("seatable.tables.groups", &s.tables.groups),
        ] {
            if name.trim().is_empty() {
                return Err((key, "must not be empty".into()));
            }
        }
        let i = &self.imap;
        if i.host.as_deref().is_some_and(|h| h.trim().is_empty()) {
            return Err(("imap.host", "must not be empty when given".into()));
        }
        if i.port == 0 {
            return Err(("imap.port", "must be 1 to 65535".into()));
        }
        if i.folder.is_empty() {
            return Err(("imap.folder", "must not be empty".into()));
        }
        if !(1..=1740).contains(&i.idle_renew_secs) {
            return Err((
                "imap.idle_renew_secs",
                format!(
                    "must be 1 to 1740 (RFC 2177: re-issue IDLE within 29 minutes), got {}",
                    i.idle_renew_secs
                ),
            ));
        }
        if i.auth == AuthMethod::XOAuth2 {
            return Err((
                "imap.auth",
                "OAuth2 is set per account: imap.accounts.<address>.oauth2 (see config.yaml.example); \
                 leave imap.auth at password"
                    .into(),
            ));
        }
        if let Some(required) = &self.reports.require_authentication
            && (required.authserv_id.trim().is_empty()
                || required.authserv_id.contains(char::is_whitespace))
        {
            return Err((
                "reports.require_authentication.authserv_id",
                "must be the MTA's authserv-id, one word such as mx.example.com".into(),
            ));
        }
        if self.reports.subject_prefixes.iter().any(|p| p.is_empty()) {
            return Err((
                "reports.subject_prefixes",
                "entries must not be empty".into(),
            ));
        }
        if self.delivery.concurrency == 0 {
            return Err(("delivery.concurrency", "must be at least 1".into()));
        }
        if self.delivery.give_up_after_secs == 0 {
            return Err(("delivery.give_up_after_secs", "must be at least 1".into()));
        }
        if self.state.path.is_some() && self.state.url.is_some() {
            return Err((
                "state",
                "set either path (SQLite) or url (PostgreSQL), not both".into(),
            ));
        }
        if self
            .state
            .path
            .as_ref()
            .is_some_and(|path| path.as_os_str().is_empty())
        {
            return Err(("state.path", "must not be empty".into()));
        }
        if let Some(url) = &self.state.url {
            use secrecy::ExposeSecret;
            let url = url.expose_secret();
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return Err((
                    "state.url",
                    "must be a postgres:// or postgresql:// URL".into(),
                ));
            }
        }
        if self.state.lease_secs < 3 {
            return Err(("state.lease_secs", "must be at least 3".into()));
        }
        if self
            .state
            .replica_id
            .as_ref()
            .is_some_and(|id| id.trim().is_empty())
        {
            return Err(("state.replica_id", "must not be empty".into()));
        }
        Ok(())
    }
}

/// The field named in serde's "missing field `x`" message.
fn missing_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("missing field `")?;
    rest.split('`').next()
}

fn check_http_url(text: &str) -> Result<(), String> {
    match url::Url::parse(text) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => Ok(()),
        Ok(_) => Err(format!("expected an http(s) URL, got {text:?}")),
        Err(error) => Err(format!("not a URL ({error}): {text:?}")),
    }
}

#[cfg(test)]
mod tests;
