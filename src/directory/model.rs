//! The directory's model: users, mailboxes and groups as the relay needs them, read leniently
//! from SeaTable rows (a typo in one cell drops that row with a warning, never the table).

use std::collections::BTreeSet;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::warn;

use crate::seatable::Row;

/// One row of the users table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// Row `_id`.
    pub row_id: String,
    /// `Name`.
    pub name: String,
    /// `phone`, as the sysadmin typed it.
    pub phone: String,
    /// Row `_id`s of the linked mailboxes (`mailboxes` link cell).
    pub mailbox_ids: Vec<String>,
    /// `id_telegram` parsed as a Telegram user id, when set.
    pub telegram_id: Option<i64>,
}

/// One row of the mailboxes table.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mailbox {
    /// Row `_id`.
    pub row_id: String,
    /// `Name`, a short name such as `sales`.
    pub name: String,
    /// `email`: the address Superset sends to and the default IMAP login.
    pub email: String,
    /// `description`, shown to users in `/start`.
    pub description: String,
    /// `last_uid`, the last relayed UID as the relay (or the bot it replaces) wrote it.
    pub last_uid: Option<u32>,
    /// `imap_host` override.
    pub imap_host: Option<String>,
    /// `imap_port` override.
    pub imap_port: Option<u16>,
    /// `imap_login` override.
    pub imap_login: Option<String>,
    /// `imap_password` override. Never printed.
    pub imap_password: Option<String>,
    /// `imap_account`: the `imap.accounts` entry with the credentials (default: the one named
    /// like `email`).
    pub imap_account: Option<String>,
    /// `folder` override.
    pub folder: Option<String>,
    /// `allowed_senders`: lowercase addresses and `@domain`s; empty means anyone.
    pub allowed_senders: Vec<String>,
    /// `disabled`: a ticked row is not watched (over IMAP; its webhook still works).
    pub disabled: bool,
    /// `webhook_token`: the secret in the URL of the row's Superset webhook route
    /// (`/ingest/superset/<token>`), at least [`WEBHOOK_TOKEN_MIN_LEN`] characters; `None`: the
    /// row has no webhook. Never printed.
    #[serde(default)]
    pub webhook_token: Option<String>,
}

/// The shortest `webhook_token` that makes a route (a shorter one is ignored with a warning):
/// 32 characters, e.g. `openssl rand -hex 16` gives 128 bits.
pub const WEBHOOK_TOKEN_MIN_LEN: usize = 32;

impl std::fmt::Debug for Mailbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mailbox")
            .field("row_id", &self.row_id)
            .field("name", &self.name)
            .field("email", &self.email)
            .field("last_uid", &self.last_uid)
            .field("imap_host", &self.imap_host)
            .field("imap_port", &self.imap_port)
            .field("imap_login", &self.imap_login)
            .field(
                "imap_password",
                &self.imap_password.as_ref().map(|_| "[REDACTED]"),
            )
            .field("imap_account", &self.imap_account)
            .field("folder", &self.folder)
            .field("allowed_senders", &self.allowed_senders)
            .field("disabled", &self.disabled)
            .field(
                "webhook_token",
                &self.webhook_token.as_ref().map(|_| "[REDACTED]"),
            )
            .finish()
    }
}

impl Mailbox {
    /// Whether mail from `from` may be relayed (`allowed_senders`, matched case-insensitively;
    /// `@example.com` matches exactly that domain).
    pub fn allows_sender(&self, from: Option<&str>) -> bool {
        if self.allowed_senders.is_empty() {
            return true;
        }
        let Some(from) = from.map(|f| f.trim().to_ascii_lowercase()) else {
            return false;
        };
        let domain = from.rsplit_once('@').map(|(_, d)| d);
        self.allowed_senders
            .iter()
            .any(|allowed| match allowed.strip_prefix('@') {
                Some(allowed_domain) => domain == Some(allowed_domain),
                None => *allowed == from,
            })
    }
}

/// One row of the groups table (`t_chats`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    /// Row `_id`.
    pub row_id: String,
    /// `Name`: must equal the Telegram group's title.
    pub name: String,
    /// `id_telegram_chat` parsed as a chat id (negative), when set.
    pub chat_id: Option<i64>,
    /// `is_locked`.
    pub is_locked: bool,
    /// Row `_id`s of the linked mailboxes.
    pub mailbox_ids: Vec<String>,
}

/// Who receives a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Recipient {
    /// The Telegram `chat_id`: a user id, or a negative group id.
    pub chat_id: i64,
}

/// The three tables at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Users.
    pub users: Vec<User>,
    /// Mailboxes.
    pub mailboxes: Vec<Mailbox>,
    /// Groups.
    pub groups: Vec<Group>,
    /// When it was read from SeaTable.
    pub fetched_at: SystemTime,
}

impl Snapshot {
    /// Builds a snapshot from the rows of the three tables as the gateway returns them
    /// (`convert_keys=true`). Cells of the wrong shape are treated as empty, with a warning; a
    /// row without `_id` is dropped.
    pub fn from_rows(users: &[Row], mailboxes: &[Row], groups: &[Row]) -> Self {
        Self {
            users: users.iter().filter_map(parse_user).collect(),
            mailboxes: mailboxes.iter().filter_map(parse_mailbox).collect(),
            groups: groups.iter().filter_map(parse_group).collect(),
            fetched_at: SystemTime::now(),
        }
    }

    /// The mailbox row with this address (case-insensitive): the first enabled one, as
    /// [`Self::enabled_mailboxes`] picks it, else the first disabled one.
    pub fn mailbox(&self, address: &str) -> Option<&Mailbox> {
        let matching = |m: &&Mailbox| m.email.eq_ignore_ascii_case(address.trim());
        self.mailboxes
            .iter()
            .filter(matching)
            .find(|m| !m.disabled)
            .or_else(|| self.mailboxes.iter().find(matching))
    }

    /// Mailbox rows that should be watched: not disabled, with an address. The first row wins
    /// when two rows have the same address.
    pub fn enabled_mailboxes(&self) -> Vec<&Mailbox> {
        let mut seen = BTreeSet::new();
        self.mailboxes
            .iter()
            .filter(|m| !m.disabled && !m.email.is_empty())
            .filter(|m| seen.insert(m.email.to_ascii_lowercase()))
            .collect()
    }

    /// Every registered user and group bound to the mailbox, each chat once, users first.
    pub fn recipients(&self, mailbox: &Mailbox) -> Vec<Recipient> {
        let mut seen = BTreeSet::new();
        let users = self
            .users
            .iter()
            .filter(|u| u.mailbox_ids.contains(&mailbox.row_id))
            .filter_map(|u| u.telegram_id);
        let groups = self
            .groups
            .iter()
            .filter(|g| g.mailbox_ids.contains(&mailbox.row_id))
            .filter_map(|g| g.chat_id);
        users
            .chain(groups)
            .filter(|id| seen.insert(*id))
            .map(|chat_id| Recipient { chat_id })
            .collect()
    }
}

/// The column names the directory reads and writes, the same whatever the tables are called
/// (`seatable-schema/schema.json`).
pub mod column {
    /// The row id, a system field (seatable-api.md §2.6).
    pub const ROW_ID: &str = "_id";
    /// The first column of each table: a person's, mailbox's or group's name.
    pub const NAME: &str = "Name";
    /// users: the phone number as the sysadmin typed it.
    pub const PHONE: &str = "phone";
    /// users, t_chats: the link to the mailboxes table.
    pub const MAILBOXES: &str = "mailboxes";
    /// users: the Telegram user id, written by the bot.
    pub const ID_TELEGRAM: &str = "id_telegram";
    /// mailboxes: the address and default IMAP login.
    pub const EMAIL: &str = "email";
    /// mailboxes: shown to users in `/start`.
    pub const DESCRIPTION: &str = "description";
    /// mailboxes: the last relayed UID, written by the relay.
    pub const LAST_UID: &str = "last_uid";
    /// mailboxes: IMAP host override.
    pub const IMAP_HOST: &str = "imap_host";
    /// mailboxes: IMAP port override.
    pub const IMAP_PORT: &str = "imap_port";
    /// mailboxes: IMAP login override.
    pub const IMAP_LOGIN: &str = "imap_login";
    /// mailboxes: IMAP password override (a secret).
    pub const IMAP_PASSWORD: &str = "imap_password";
    /// mailboxes: the config's `imap.accounts` entry with the credentials.
    pub const IMAP_ACCOUNT: &str = "imap_account";
    /// mailboxes: folder override.
    pub const FOLDER: &str = "folder";
    /// mailboxes: addresses and `@domain`s allowed to send reports.
    pub const ALLOWED_SENDERS: &str = "allowed_senders";
    /// mailboxes: a ticked row is not watched.
    pub const DISABLED: &str = "disabled";
    /// mailboxes: the secret of the row's Superset webhook URL (a secret).
    pub const WEBHOOK_TOKEN: &str = "webhook_token";
    /// t_chats: the Telegram chat id, written once by the bot.
    pub const ID_TELEGRAM_CHAT: &str = "id_telegram_chat";
    /// t_chats: the write-once lock.
    pub const IS_LOCKED: &str = "is_locked";
}

/// A cell the directory reads as text: a non-blank text cell trimmed, or a number cell in
/// decimal (sysadmins type ids and ports into either kind of column).
fn text(row: &Row, column: &str) -> Option<String> {
    match row.get(column)? {
        Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_owned()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn link_ids(row: &Row, column: &str) -> Vec<String> {
    row.link_ids(column)
        .into_iter()
        .map(str::to_owned)
        .collect()
}

fn id_column(row: &Row, table: &str, column: &str) -> Option<i64> {
    let value = text(row, column)?;
    match value.parse::<i64>() {
        Ok(id) => Some(id),
        Err(_) => {
            warn!(
                table,
                column, value, "Ignoring a Telegram id that is not a decimal number."
            );
            None
        }
    }
}

fn parse_user(row: &Row) -> Option<User> {
    Some(User {
        row_id: text(row, column::ROW_ID)?,
        name: text(row, column::NAME).unwrap_or_default(),
        phone: text(row, column::PHONE).unwrap_or_default(),
        mailbox_ids: link_ids(row, column::MAILBOXES),
        telegram_id: id_column(row, "users", column::ID_TELEGRAM),
    })
}

fn parse_mailbox(row: &Row) -> Option<Mailbox> {
    let email = text(row, column::EMAIL).unwrap_or_default();
    let last_uid = text(row, column::LAST_UID).and_then(|v| match v.parse::<u32>() {
        Ok(uid) => Some(uid),
        Err(_) => {
            warn!(
                mailbox = email,
                value = v,
                "Ignoring a last_uid that is not a decimal UID."
            );
            None
        }
    });
    let imap_port = text(row, column::IMAP_PORT).and_then(|v| {
        // A number column may come back as 993 or 993.0.
        let port = v
            .parse::<f64>()
            .ok()
            .filter(|p| p.fract() == 0.0 && *p > 0.0 && *p < 65536.0);
        if port.is_none() {
            warn!(
                mailbox = email,
                value = v,
                "Ignoring an imap_port that is not a port number."
            );
        }
        port.map(|p| p as u16)
    });
    let allowed_senders = text(row, column::ALLOWED_SENDERS)
        .map(|v| {
            v.split([',', ';', ' ', '\n'])
                .map(|s| s.trim().to_ascii_lowercase())
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default();
    let webhook_token = text(row, column::WEBHOOK_TOKEN).and_then(|token| {
        if token.chars().count() < WEBHOOK_TOKEN_MIN_LEN {
            warn!(
                mailbox = email,
                min_len = WEBHOOK_TOKEN_MIN_LEN,
                "Ignoring a webhook_token shorter than the minimum; the row has no webhook."
            );
            None
        } else {
            Some(token)
        }
    });
    Some(Mailbox {
        row_id: text(row, column::ROW_ID)?,
        name: text(row, column::NAME).unwrap_or_default(),
        description: text(row, column::DESCRIPTION).unwrap_or_default(),
        last_uid,
        imap_host: text(row, column::IMAP_HOST),
        imap_port,
        imap_login: text(row, column::IMAP_LOGIN),
        imap_password: text(row, column::IMAP_PASSWORD),
        imap_account: text(row, column::IMAP_ACCOUNT),
        folder: text(row, column::FOLDER),
        allowed_senders,
        disabled: row.bool(column::DISABLED),
        webhook_token,
        email,
    })
}

fn parse_group(row: &Row) -> Option<Group> {
    Some(Group {
        row_id: text(row, column::ROW_ID)?,
        name: text(row, column::NAME).unwrap_or_default(),
        chat_id: id_column(row, "t_chats", column::ID_TELEGRAM_CHAT),
        is_locked: row.bool(column::IS_LOCKED),
        mailbox_ids: link_ids(row, column::MAILBOXES),
    })
}
