//! The directory's model: users, mailboxes and groups as the relay needs them, read leniently
//! from SeaTable rows (a typo in one cell drops that row with a warning, never the table).

use std::collections::BTreeSet;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::warn;

use super::filter::TitleFilter;
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
    /// `reports_filter`: only reports whose title matches (see [`TitleFilter`]); `None`: every
    /// report of the linked mailboxes.
    #[serde(default)]
    pub reports_filter: Option<TitleFilter>,
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
    /// `silent`: every send of this mailbox goes with `disable_notification` (recipients get
    /// it without a sound).
    #[serde(default)]
    pub silent: bool,
    /// `protect_content`: every send of this mailbox goes with `protect_content` (recipients
    /// cannot forward or save it).
    #[serde(default)]
    pub protect_content: bool,
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
            .field("silent", &self.silent)
            .field("protect_content", &self.protect_content)
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
    /// `topic`: the forum topic every send to this group goes to, or why the cell cannot be
    /// used (then the group gets nothing, never the General topic).
    #[serde(default)]
    pub topic: Option<Result<i32, String>>,
    /// `reports_filter`: only reports whose title matches (see [`TitleFilter`]).
    #[serde(default)]
    pub reports_filter: Option<TitleFilter>,
}

/// Who receives a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Recipient {
    /// The Telegram `chat_id`: a user id, or a negative group id.
    pub chat_id: i64,
    /// The forum topic's `message_thread_id` every send carries (`t_chats.topic`); `None`: the
    /// chat itself (a group's General topic).
    pub message_thread_id: Option<i32>,
}

/// A recipient bound to a mailbox that does not get one report, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Withheld {
    /// The chat that does not get it.
    pub chat_id: i64,
    /// The table and row `_id`, e.g. `t_chats row Xb2…`.
    pub row: String,
    /// Why: the title does not pass `reports_filter`, or a cell is unusable.
    pub reason: String,
    /// `true` when the row's own configuration is broken (an invalid filter or topic): the
    /// relay logs it as a warning rather than as an ordinary filtered report.
    pub misconfigured: bool,
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

    /// Every registered user and group bound to the mailbox, each chat once, users first
    /// (with each group's topic; no title filter applied).
    pub fn recipients(&self, mailbox: &Mailbox) -> Vec<Recipient> {
        self.bound(mailbox)
            .into_iter()
            .map(|(recipient, _)| recipient)
            .collect()
    }

    /// Who gets a report titled `title` of `mailbox`: [`Self::recipients`] less those whose
    /// `reports_filter` the title does not pass, or whose filter or topic cell is unusable
    /// (those get nothing, never everything, and are returned as [`Withheld`]).
    pub fn deliveries(&self, mailbox: &Mailbox, title: &str) -> (Vec<Recipient>, Vec<Withheld>) {
        let mut recipients = Vec::new();
        let mut withheld = Vec::new();
        for (recipient, bound) in self.bound(mailbox) {
            let (row, filter, topic) = match bound {
                Bound::User(user) => (
                    format!("users row {}", user.row_id),
                    user.reports_filter.as_ref(),
                    None,
                ),
                Bound::Group(group) => (
                    format!("t_chats row {}", group.row_id),
                    group.reports_filter.as_ref(),
                    group.topic.as_ref(),
                ),
            };
            let chat_id = recipient.chat_id;
            if let Some(Err(problem)) = topic {
                withheld.push(Withheld {
                    chat_id,
                    row,
                    reason: format!("topic: {problem}"),
                    misconfigured: true,
                });
                continue;
            }
            match filter {
                Some(filter) if filter.error().is_some() => withheld.push(Withheld {
                    chat_id,
                    row,
                    reason: format!(
                        "reports_filter {:?}: {}",
                        filter.as_str(),
                        filter.error().unwrap_or_default()
                    ),
                    misconfigured: true,
                }),
                Some(filter) if !filter.matches(title) => withheld.push(Withheld {
                    chat_id,
                    row,
                    reason: format!(
                        "the title does not match reports_filter {:?}",
                        filter.as_str()
                    ),
                    misconfigured: false,
                }),
                _ => recipients.push(recipient),
            }
        }
        (recipients, withheld)
    }

    /// One line per row whose `reports_filter` or `topic` cannot be used (naming the table and
    /// row `_id`), for `report-relay check`; empty when all are usable.
    pub fn option_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for user in &self.users {
            if let Some(error) = user.reports_filter.as_ref().and_then(TitleFilter::error) {
                problems.push(format!(
                    "users row {} ({}): reports_filter: {error}; it gets no reports",
                    user.row_id, user.name
                ));
            }
        }
        for group in &self.groups {
            if let Some(error) = group.reports_filter.as_ref().and_then(TitleFilter::error) {
                problems.push(format!(
                    "t_chats row {} ({}): reports_filter: {error}; it gets no reports",
                    group.row_id, group.name
                ));
            }
            if let Some(Err(error)) = &group.topic {
                problems.push(format!(
                    "t_chats row {} ({}): topic: {error}; it gets no reports",
                    group.row_id, group.name
                ));
            }
        }
        problems
    }

    /// The users and groups bound to the mailbox with their rows, each chat once, users first.
    fn bound(&self, mailbox: &Mailbox) -> Vec<(Recipient, Bound<'_>)> {
        let mut seen = BTreeSet::new();
        let users = self
            .users
            .iter()
            .filter(|u| u.mailbox_ids.contains(&mailbox.row_id))
            .filter_map(|u| {
                let chat_id = u.telegram_id?;
                Some((
                    Recipient {
                        chat_id,
                        message_thread_id: None,
                    },
                    Bound::User(u),
                ))
            });
        let groups = self
            .groups
            .iter()
            .filter(|g| g.mailbox_ids.contains(&mailbox.row_id))
            .filter_map(|g| {
                let chat_id = g.chat_id?;
                Some((
                    Recipient {
                        chat_id,
                        message_thread_id: g.topic.clone().and_then(Result::ok),
                    },
                    Bound::Group(g),
                ))
            });
        users
            .chain(groups)
            .filter(|(recipient, _)| seen.insert(recipient.chat_id))
            .collect()
    }
}

/// The row a bound recipient comes from.
enum Bound<'a> {
    User(&'a User),
    Group(&'a Group),
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
    /// mailboxes: a ticked row's reports go with `disable_notification`.
    pub const SILENT: &str = "silent";
    /// mailboxes: a ticked row's reports go with `protect_content`.
    pub const PROTECT_CONTENT: &str = "protect_content";
    /// users, t_chats: the title filter (comma-separated words or `/regex/`).
    pub const REPORTS_FILTER: &str = "reports_filter";
    /// t_chats: the forum topic (`message_thread_id` or a `https://t.me/c/<id>/<thread>` link).
    pub const TOPIC: &str = "topic";
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
        reports_filter: reports_filter(row, "users"),
    })
}

/// The row's `reports_filter`, warning (naming the row) when it cannot be used.
fn reports_filter(row: &Row, table: &str) -> Option<TitleFilter> {
    let filter = TitleFilter::parse(&text(row, column::REPORTS_FILTER)?);
    if let Some(error) = filter.error() {
        warn!(
            table,
            row_id = text(row, column::ROW_ID).unwrap_or_default(),
            value = filter.as_str(),
            error,
            "An unusable reports_filter; this row gets no reports until it is fixed."
        );
    }
    Some(filter)
}

/// Reads a `topic` cell: a `message_thread_id` (a positive number) or a topic link
/// `https://t.me/c/<id>/<thread>` (also with a message id after the thread, as Telegram's
/// "Copy link" gives it for a message in the topic). The link's `<id>` is the group's chat id
/// without `-100`; when `chat_id` is known it must match.
///
/// # Errors
/// Why the cell cannot be used, in words for the sysadmin.
pub fn parse_topic(value: &str, chat_id: Option<i64>) -> Result<i32, String> {
    let value = value.trim();
    let thread = |text: &str| -> Result<i32, String> {
        // A number column may come back as 42.0.
        let text = text.strip_suffix(".0").unwrap_or(text);
        match text.parse::<i32>() {
            Ok(id) if id > 0 => Ok(id),
            _ => Err(format!(
                "{value:?} is neither a message_thread_id (a positive number) nor a topic link https://t.me/c/<id>/<thread>"
            )),
        }
    };
    let link = value
        .strip_prefix("https://")
        .or_else(|| value.strip_prefix("http://"))
        .unwrap_or(value);
    let Some(path) = link
        .strip_prefix("t.me/c/")
        .or_else(|| link.strip_prefix("telegram.me/c/"))
    else {
        return thread(value);
    };
    let path = path.split(['?', '#']).next().unwrap_or_default();
    let mut parts = path.split('/');
    let (Some(id), Some(thread_part)) = (parts.next(), parts.next()) else {
        return thread("");
    };
    let link_chat = id
        .parse::<i64>()
        .ok()
        .filter(|id| *id > 0)
        .and_then(|id| format!("-100{id}").parse::<i64>().ok())
        .ok_or_else(|| format!("{value:?}: {id:?} is not a chat id"))?;
    let thread_id = thread(thread_part)?;
    match chat_id {
        Some(chat_id) if chat_id != link_chat => Err(format!(
            "the link {value:?} is for chat {link_chat}, but this group's id_telegram_chat is {chat_id}"
        )),
        _ => Ok(thread_id),
    }
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
        silent: row.bool(column::SILENT),
        protect_content: row.bool(column::PROTECT_CONTENT),
        email,
    })
}

fn parse_group(row: &Row) -> Option<Group> {
    let row_id = text(row, column::ROW_ID)?;
    let chat_id = id_column(row, "t_chats", column::ID_TELEGRAM_CHAT);
    let topic = text(row, column::TOPIC).map(|value| {
        let topic = parse_topic(&value, chat_id);
        if let Err(error) = &topic {
            warn!(
                table = "t_chats",
                row_id,
                error,
                "An unusable topic; this group gets no reports until it is fixed (never the General topic)."
            );
        }
        topic
    });
    Some(Group {
        name: text(row, column::NAME).unwrap_or_default(),
        chat_id,
        is_locked: row.bool(column::IS_LOCKED),
        mailbox_ids: link_ids(row, column::MAILBOXES),
        topic,
        reports_filter: reports_filter(row, "t_chats"),
        row_id,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    /// Rows as the gateway returns them (a `Row` deserializes from its JSON object).
    fn rows(value: Value) -> Vec<Row> {
        serde_json::from_value(value).unwrap()
    }

    fn link(id: &str) -> Value {
        json!([{"row_id": id, "display_value": id}])
    }

    fn snapshot(users: Value, mailboxes: Value, groups: Value) -> Snapshot {
        Snapshot::from_rows(&rows(users), &rows(mailboxes), &rows(groups))
    }

    #[test]
    fn topics_are_read_from_numbers_and_links() {
        let group = -1_001_987_654_321;
        assert_eq!(parse_topic("42", Some(group)), Ok(42));
        assert_eq!(parse_topic("42.0", None), Ok(42));
        assert_eq!(
            parse_topic("https://t.me/c/1987654321/42", Some(group)),
            Ok(42)
        );
        assert_eq!(
            parse_topic(" t.me/c/1987654321/42/1234?single ", Some(group)),
            Ok(42)
        );
        assert_eq!(parse_topic("https://t.me/c/1987654321/7", None), Ok(7));
        let mismatch = parse_topic("https://t.me/c/1111111111/42", Some(group)).unwrap_err();
        assert!(mismatch.contains("-1001111111111"), "{mismatch}");
        assert!(mismatch.contains("-1001987654321"), "{mismatch}");
        for bad in [
            "0",
            "-5",
            "General",
            "https://t.me/c/1987654321",
            "https://t.me/c/abc/42",
            "https://t.me/c/1987654321/x",
            "99999999999",
        ] {
            assert!(parse_topic(bad, Some(group)).is_err(), "{bad}");
        }
    }

    #[test]
    fn new_cells_are_read_and_absent_columns_mean_off() {
        let s = snapshot(
            json!([{"_id": "u1", "mailboxes": link("m1"), "id_telegram": "111", "reports_filter": "sales"}]),
            json!([
                {"_id": "m1", "email": "a@example.com", "silent": true, "protect_content": true},
                {"_id": "m2", "email": "b@example.com"},
            ]),
            json!([{"_id": "g1", "id_telegram_chat": "-1001987654321", "mailboxes": link("m1"),
                    "topic": "https://t.me/c/1987654321/42", "reports_filter": "/^daily/"}]),
        );
        let m1 = s.mailbox("a@example.com").unwrap();
        assert!(m1.silent && m1.protect_content);
        let m2 = s.mailbox("b@example.com").unwrap();
        assert!(!m2.silent && !m2.protect_content);
        assert_eq!(s.groups[0].topic, Some(Ok(42)));
        assert_eq!(
            s.recipients(m1),
            [
                Recipient {
                    chat_id: 111,
                    message_thread_id: None
                },
                Recipient {
                    chat_id: -1_001_987_654_321,
                    message_thread_id: Some(42)
                },
            ]
        );
        // The snapshot is persisted as JSON: it reads back the same.
        let back: Snapshot = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
        assert_eq!(
            back.groups[0].reports_filter.as_ref().unwrap().as_str(),
            "/^daily/"
        );
    }

    #[test]
    fn title_filters_pick_recipients_and_broken_rows_get_nothing() {
        let s = snapshot(
            json!([
                {"_id": "u1", "mailboxes": link("m1"), "id_telegram": "111"},
                {"_id": "u2", "mailboxes": link("m1"), "id_telegram": "222", "reports_filter": "Sales, KPI"},
                {"_id": "u3", "mailboxes": link("m1"), "id_telegram": "333", "reports_filter": "/(unclosed/"},
            ]),
            json!([{"_id": "m1", "email": "a@example.com"}]),
            json!([
                {"_id": "g1", "id_telegram_chat": "-1001987654321", "mailboxes": link("m1"), "reports_filter": "/^weekly/"},
                {"_id": "g2", "id_telegram_chat": "-1001000000002", "mailboxes": link("m1"), "topic": "https://t.me/c/1987654321/4"},
            ]),
        );
        let m1 = s.mailbox("a@example.com").unwrap();
        let chats = |title: &str| -> (Vec<i64>, Vec<(i64, bool)>) {
            let (recipients, withheld) = s.deliveries(m1, title);
            (
                recipients.iter().map(|r| r.chat_id).collect(),
                withheld
                    .iter()
                    .map(|w| (w.chat_id, w.misconfigured))
                    .collect(),
            )
        };
        let (to, withheld) = chats("Daily sales");
        assert_eq!(to, [111, 222]);
        assert_eq!(
            withheld,
            [
                (333, true),
                (-1_001_987_654_321, false),
                (-1_001_000_000_002, true)
            ]
        );
        let (to, _) = chats("Weekly KPI");
        assert_eq!(to, [111, 222, -1_001_987_654_321]);
        let (to, _) = chats("Inventory");
        assert_eq!(to, [111]);
        let (_, withheld) = s.deliveries(m1, "Inventory");
        assert!(withheld[1].row.contains("users row u3"), "{withheld:?}");
        assert!(withheld[1].reason.contains("invalid regex"), "{withheld:?}");
        let problems = s.option_problems();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].starts_with("users row u3"), "{problems:?}");
        assert!(problems[0].contains("reports_filter: invalid regex"));
        assert!(problems[1].starts_with("t_chats row g2"), "{problems:?}");
        assert!(problems[1].contains("topic:"));
    }
}
