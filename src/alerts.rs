//! Admin alerts: tells `telegram.admin_chats`, in plain words, when something needs a person.
//!
//! Beside the pipeline: the relay (a report that failed to parse) and the delivery worker (a
//! recipient that failed for good) raise their conditions when they happen; [`Alerts::monitor`]
//! looks every few seconds at what only shows over time: a mailbox failing to connect, the
//! directory not refreshed from SeaTable, a schema problem, a misconfigured row, and whether
//! raised conditions cleared.
//!
//! - **Once per condition.** Each condition has a key ([`Condition::key`]). Raising it writes
//!   the key to the state's `alerts` table and queues the alert in one transaction
//!   ([`crate::state::AlertChange`]); a key already there makes the raise a no-op, so a
//!   condition is told once until it clears, across restarts and replicas. Clearing deletes the
//!   key and queues the all-clear the same way, so that is told once too.
//! - **Same road as reports.** An alert is a `sendMessage` per admin chat in the outbox
//!   ([`Source::Alert`]): the delivery worker sends it within Telegram's limits, retries it,
//!   and survives a restart with it. Alerts are left out of `history` and the delivery log.
//! - **Replicas.** Each replica's monitor judges the mailboxes it watches; the replica holding
//!   the `delivery` lease judges the rest (directory, schema, rows, recipients, parse
//!   failures), so one replica speaks for the shared things.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::directory::Directory;
use crate::imap::WatcherState;
use crate::replica::{DELIVERY, Replica};
use crate::report::render::{Method, escape_html};
use crate::state::{
    Acknowledgement, AlertChange, MessageOutcome, OutboxSend, RaisedAlert, SendOptions, Source,
    State,
};
use crate::supervisor::Watchers;

/// The `mailbox` column of an alert's message in the state (alerts belong to no mailbox).
pub const ALERT_MAILBOX: &str = "(admin alert)";

/// Something the admin chats are told about, once until it clears.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Condition {
    /// A mailbox (its address, in lower case: build with [`Condition::mailbox`]) failing to connect, log in or catch up for longer than
    /// `telegram.admin_alert_after_secs`.
    Mailbox(String),
    /// The directory not refreshed from SeaTable for longer than
    /// `telegram.admin_alert_after_secs`.
    Directory,
    /// SeaTable refuses the relay's writes: the base lacks a table or column it writes.
    Schema,
    /// A users or `t_chats` row the relay cannot use (its `reports_filter` or `topic`); the
    /// text is [`crate::directory::Snapshot::option_problems`]'s line.
    Row(String),
    /// A recipient (`chat_id`) that Telegram refused for good (blocked, kicked, topic deleted)
    /// or that the worker gave up on; clears once a send to it goes through.
    Recipient(i64),
    /// A message in the mailbox (its address, in lower case: [`Condition::parse`]) that could not be parsed; clears once a later
    /// message of that mailbox parses.
    Parse(String),
}

impl Condition {
    /// [`Condition::Mailbox`] of `address`, in lower case.
    pub fn mailbox(address: &str) -> Self {
        Self::Mailbox(address.trim().to_ascii_lowercase())
    }

    /// [`Condition::Parse`] of `address`, in lower case.
    pub fn parse(address: &str) -> Self {
        Self::Parse(address.trim().to_ascii_lowercase())
    }

    /// The key in the `alerts` table: `mailbox:<address>`, `directory`, `schema`,
    /// `row:<problem>`, `recipient:<chat_id>` or `parse:<address>` (addresses in lower case).
    pub fn key(&self) -> String {
        match self {
            Self::Mailbox(address) => format!("mailbox:{address}"),
            Self::Directory => "directory".into(),
            Self::Schema => "schema".into(),
            Self::Row(problem) => format!("row:{problem}"),
            Self::Recipient(chat_id) => format!("recipient:{chat_id}"),
            Self::Parse(address) => format!("parse:{address}"),
        }
    }

    /// The condition a key names; `None` for a key this version does not know.
    pub fn from_key(key: &str) -> Option<Self> {
        let (kind, rest) = key.split_once(':').unwrap_or((key, ""));
        Some(match (kind, rest) {
            ("mailbox", address) if !address.is_empty() => Self::Mailbox(address.into()),
            ("directory", "") => Self::Directory,
            ("schema", "") => Self::Schema,
            ("row", problem) if !problem.is_empty() => Self::Row(problem.into()),
            ("recipient", chat_id) => Self::Recipient(chat_id.parse().ok()?),
            ("parse", address) if !address.is_empty() => Self::Parse(address.into()),
            _ => return None,
        })
    }
}

/// Tells the admin chats. Build with [`Alerts::new`]; cheap to share in an [`Arc`].
pub struct Alerts {
    state: State,
    admin_chats: Vec<i64>,
    after: Duration,
    /// Wakes this process's delivery worker (another replica's is woken by the `NOTIFY`).
    wake: Arc<Notify>,
    /// What the monitor judges (its age, schema, rows, mailboxes) and where the alerts take
    /// recipients' names from (users' and groups' `Name`).
    directory: Arc<Directory>,
}

impl std::fmt::Debug for Alerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Alerts")
            .field("admin_chats", &self.admin_chats)
            .field("after", &self.after)
            .finish_non_exhaustive()
    }
}

impl Alerts {
    /// Alerts to `telegram.admin_chats`, timed by `telegram.admin_alert_after_secs`, queued in
    /// `state`, announced on `wake`, about (and naming recipients from) `directory`; `None`
    /// when `admin_chats` is empty (alerts are off).
    pub fn new(
        telegram: &crate::config::TelegramConfig,
        state: State,
        wake: Arc<Notify>,
        directory: Arc<Directory>,
    ) -> Option<Arc<Self>> {
        if telegram.admin_chats.is_empty() {
            return None;
        }
        Some(Arc::new(Self {
            state,
            admin_chats: telegram.admin_chats.clone(),
            after: Duration::from_secs(telegram.admin_alert_after_secs),
            wake,
            directory,
        }))
    }

    /// Tells the admin chats that `condition` holds, with `text` (HTML), unless it was told
    /// before and has not cleared. Returns whether it was queued now; a state error is logged
    /// (the monitor, or the next failure, tries again).
    pub async fn raise(&self, condition: &Condition, text: &str) -> bool {
        let key = condition.key();
        let message = format!("⚠️ {text}");
        let told = self
            .queue(
                AlertChange::Raise {
                    key: key.clone(),
                    text: message.clone(),
                },
                &message,
            )
            .await;
        if told {
            warn!(condition = %key, admin_chats = self.admin_chats.len(), "Telling the admin chats: {}", plain(text));
        }
        told
    }

    /// Tells the admin chats that `condition` cleared, with `text` (HTML), if it was raised.
    /// Returns whether it was queued now.
    pub async fn clear(&self, condition: &Condition, text: &str) -> bool {
        let key = condition.key();
        let told = self
            .queue(
                AlertChange::Clear { key: key.clone() },
                &format!("✅ {text}"),
            )
            .await;
        if told {
            info!(condition = %key, "Telling the admin chats it cleared: {}", plain(text));
        }
        told
    }

    /// Queues `text` to every admin chat with `change`, in one transaction.
    async fn queue(&self, change: AlertChange, text: &str) -> bool {
        let now = SystemTime::now();
        let key = match &change {
            AlertChange::Raise { key, .. } | AlertChange::Clear { key } => key.clone(),
        };
        let nonce = format!("{key}\n{:?}\n{text}", now);
        let send = OutboxSend {
            method: Method::SendMessage,
            items: Vec::new(),
            text: Some(text.to_owned()),
            options: SendOptions::default(),
        };
        let ack = Acknowledgement {
            mailbox: ALERT_MAILBOX.into(),
            uid: None,
            raw_sha256: hex::encode(Sha256::digest(nonce.as_bytes())),
            title: first_line(&plain(text)),
            outcome: MessageOutcome::Queued,
            detail: Some(key.clone()),
            received_at: Some(now),
            files: Vec::new(),
            sends: self
                .admin_chats
                .iter()
                .map(|chat_id| (*chat_id, send.clone()))
                .collect(),
            checkpoint: None,
            http: None,
            alert: Some(change),
        };
        match self.state.acknowledge(ack).await {
            Ok(crate::state::AckResult::Stored(_)) => {
                self.wake.notify_one();
                true
            }
            Ok(crate::state::AckResult::Duplicate) => false,
            Err(error) => {
                error!(condition = %key, error = format!("{error:#}"), "Cannot queue an admin alert.");
                false
            }
        }
    }

    /// The delivery worker's report of a recipient Telegram refused for good (`reason`, its
    /// error description), or that it gave up on; `topic_gone` when the group's forum topic
    /// was deleted or closed.
    pub async fn recipient_failed(&self, chat_id: i64, reason: &str, topic_gone: bool) {
        let who = self.who(chat_id);
        let lower = reason.to_ascii_lowercase();
        let advice = if topic_gone {
            "The group's forum topic (t_chats.topic) was deleted or closed: set another topic in \
             SeaTable, or empty the cell for the General topic."
        } else if lower.contains("blocked") {
            "The person blocked the bot; they get reports again once they open the bot and press \
             /start."
        } else if lower.contains("kicked") || lower.contains("not a member") {
            "The bot is no longer in the group; add it back and make it an administrator."
        } else if lower.contains("deactivated") || lower.contains("chat not found") {
            "The chat no longer exists; remove or correct its row in SeaTable."
        } else if lower.contains("rights") {
            "The bot may not post there; give it the right to post messages."
        } else {
            "Later reports are still tried."
        };
        let text = format!(
            "{who} did not get a report: Telegram refused it for good (“{}”). {advice}",
            escape_html(&clip(reason))
        );
        self.raise(&Condition::Recipient(chat_id), &text).await;
    }

    /// The relay's report of a message in `mailbox` that could not be parsed (`error`).
    pub async fn parse_failed(&self, mailbox: &str, uid: Option<u32>, error: &str) {
        let at = uid.map(|uid| format!(" (UID {uid})")).unwrap_or_default();
        let text = format!(
            "A message in mailbox <b>{}</b>{at} could not be read as a report, so nobody got \
             it: {}. It stays on the mail server; later messages are still relayed.",
            escape_html(mailbox),
            escape_html(&clip(error))
        );
        self.raise(&Condition::parse(mailbox), &text).await;
    }

    /// `Name (chat_id)` of a chat, from the directory, in bold; the bare id when unknown.
    fn who(&self, chat_id: i64) -> String {
        let names = crate::history::chat_names(self.directory.last_good().as_deref());
        match names.get(&chat_id) {
            Some(name) => format!("<b>{} ({chat_id})</b>", escape_html(name)),
            None => format!("<b>chat {chat_id}</b>"),
        }
    }

    /// Looks at the conditions that show over time every few seconds (a quarter of
    /// `admin_alert_after_secs`, between 0.25 and 30 s) until `cancel` fires: the mailboxes in
    /// `watchers` (this replica's), and, while `replica` holds `delivery`, the directory's age,
    /// the schema, the rows, and whether raised recipients and parse failures cleared.
    pub async fn monitor(
        self: Arc<Self>,
        watchers: Arc<Watchers>,
        replica: Arc<Replica>,
        cancel: CancellationToken,
    ) {
        let tick = (self.after / 4).clamp(Duration::from_millis(250), Duration::from_secs(30));
        // When the sends were last looked at while holding `delivery`: the next look starts
        // there (less a margin), not at the oldest raised alert, so a recipient alert that
        // stays raised does not make every look read its whole history.
        let mut sends_looked_at: Option<SystemTime> = None;
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(tick) => {}
            }
            let raised = match self.state.raised_alerts().await {
                Ok(raised) => raised,
                Err(error) => {
                    warn!(
                        error = format!("{error:#}"),
                        "Cannot read the raised admin alerts; looking again later."
                    );
                    continue;
                }
            };
            let raised: HashMap<Condition, RaisedAlert> = raised
                .into_iter()
                .filter_map(|alert| Some((Condition::from_key(&alert.key)?, alert)))
                .collect();
            self.look_at_mailboxes(&watchers, &raised).await;
            if replica.holds(DELIVERY) {
                self.look_at_directory(&raised).await;
                let now = SystemTime::now();
                self.look_at_raised(&raised, sends_looked_at).await;
                sends_looked_at = Some(now);
            } else {
                sends_looked_at = None;
            }
        }
    }

    /// This replica's watchers: failing for longer than `after` raises; caught up clears.
    async fn look_at_mailboxes(
        &self,
        watchers: &Watchers,
        raised: &HashMap<Condition, RaisedAlert>,
    ) {
        let now = SystemTime::now();
        for (address, status) in watchers.statuses() {
            let condition = Condition::mailbox(&address);
            let is_raised = raised.contains_key(&condition);
            match (&status.state, &status.failing_since, &status.last_error) {
                // Failing: waiting to reconnect, or reconnecting after a failure.
                (
                    WatcherState::Backoff { .. } | WatcherState::Connecting,
                    Some(since),
                    Some(error),
                ) if !is_raised => {
                    let failing = now.duration_since(*since).unwrap_or_default();
                    if failing >= self.after {
                        let text = format!(
                            "Mailbox <b>{}</b> has failed to connect for {}: {}. Its reports wait \
                             on the mail server; the relay keeps trying.",
                            escape_html(&address),
                            spoken(failing),
                            escape_html(&clip(error))
                        );
                        self.raise(&condition, &text).await;
                    }
                }
                (WatcherState::Idle | WatcherState::Polling, _, _) if is_raised => {
                    let text = format!(
                        "Mailbox <b>{}</b> is connected again; its waiting reports are relayed now.",
                        escape_html(&address)
                    );
                    self.clear(&condition, &text).await;
                }
                _ => {}
            }
        }
    }

    /// The directory's age, SeaTable's refusals for lack of a column, and unusable rows.
    async fn look_at_directory(&self, raised: &HashMap<Condition, RaisedAlert>) {
        let directory = &self.directory;
        // Reading it starts a refresh when it is stale.
        let snapshot = directory.snapshot().await;
        let age = directory.age().unwrap_or_default();
        let condition = Condition::Directory;
        if age >= self.after && !raised.contains_key(&condition) {
            let text = format!(
                "The relay has not been able to read the SeaTable base for {}. It keeps \
                 delivering to the users and groups it read last; changes made in SeaTable since \
                 then do not apply yet.",
                spoken(age)
            );
            self.raise(&condition, &text).await;
        } else if age < self.after && raised.contains_key(&condition) {
            self.clear(&condition, "The relay reads the SeaTable base again.")
                .await;
        }
        let condition = Condition::Schema;
        match directory.backend().schema_problem() {
            Some(problem) if !raised.contains_key(&condition) => {
                let text = format!(
                    "The relay holds back its writes to SeaTable (Telegram ids, last_uid): {}.",
                    escape_html(&clip(&problem))
                );
                self.raise(&condition, &text).await;
            }
            None if raised.contains_key(&condition) => {
                self.clear(&condition, "The SeaTable schema problem is fixed.")
                    .await;
            }
            _ => {}
        }
        let Some(snapshot) = snapshot else { return };
        let problems: HashSet<String> = snapshot.option_problems().into_iter().collect();
        for problem in &problems {
            let condition = Condition::Row(problem.clone());
            if !raised.contains_key(&condition) {
                let text = format!(
                    "A SeaTable row cannot be used: {}.",
                    escape_html(&clip(problem))
                );
                self.raise(&condition, &text).await;
            }
        }
        for condition in raised.keys() {
            if let Condition::Row(problem) = condition
                && !problems.contains(problem)
            {
                let text = format!("Fixed in SeaTable: {}.", escape_html(&clip(problem)));
                self.clear(condition, &text).await;
            }
        }
    }

    /// Clears raised recipients that got a send since (read from `looked_at`, the previous
    /// look, less a minute; from the oldest raised alert on the first look), parse failures
    /// followed by a message that parsed, and mailboxes no longer in the directory.
    async fn look_at_raised(
        &self,
        raised: &HashMap<Condition, RaisedAlert>,
        looked_at: Option<SystemTime>,
    ) {
        let recipients: Vec<(i64, SystemTime)> = raised
            .iter()
            .filter_map(|(condition, alert)| match condition {
                Condition::Recipient(chat_id) => Some((*chat_id, alert.raised_at)),
                _ => None,
            })
            .collect();
        if let Some(oldest) = recipients.iter().map(|(_, at)| *at).min() {
            let margin = Duration::from_secs(60);
            let since = looked_at
                .and_then(|at| at.checked_sub(margin))
                .map_or(oldest, |at| at.max(oldest));
            match self.state.recent_sends(since).await {
                Ok(sent) => {
                    for (chat_id, raised_at) in &recipients {
                        if sent
                            .iter()
                            .any(|s| s.chat_id == *chat_id && s.finished_at >= *raised_at)
                        {
                            let text = format!("{} receives reports again.", self.who(*chat_id));
                            self.clear(&Condition::Recipient(*chat_id), &text).await;
                        }
                    }
                }
                Err(error) => warn!(
                    error = format!("{error:#}"),
                    "Cannot read the recent sends for the admin alerts."
                ),
            }
        }
        for (condition, alert) in raised {
            let Condition::Parse(address) = condition else {
                continue;
            };
            // Arrival times come from the mail server's clock (INTERNALDATE): look back a
            // while, and compare message ids, which follow acknowledgement order.
            let since = alert
                .raised_at
                .checked_sub(Duration::from_secs(3600))
                .unwrap_or(SystemTime::UNIX_EPOCH);
            match self.state.messages_since(since, Some(address)).await {
                Ok(messages) => {
                    let last_failed = messages
                        .iter()
                        .filter(|m| m.outcome == MessageOutcome::Failed)
                        .map(|m| m.id)
                        .max()
                        .unwrap_or(0);
                    if messages.iter().any(|m| {
                        m.id > last_failed
                            && m.outcome != MessageOutcome::Failed
                            && m.source != Source::Alert
                    }) {
                        let text = format!(
                            "Mailbox <b>{}</b> receives readable reports again.",
                            escape_html(address)
                        );
                        self.clear(condition, &text).await;
                    }
                }
                Err(error) => warn!(
                    error = format!("{error:#}"),
                    "Cannot read the recent messages for the admin alerts."
                ),
            }
        }
        let Some(snapshot) = self.directory.last_good() else {
            return;
        };
        for condition in raised.keys() {
            if let Condition::Mailbox(address) = condition
                && snapshot.mailbox(address).is_none_or(|row| row.disabled)
            {
                let text = format!(
                    "Mailbox <b>{}</b> is no longer watched: its row was removed or disabled.",
                    escape_html(address)
                );
                self.clear(condition, &text).await;
            }
        }
    }
}

/// A duration as people say it: `45 seconds`, `12 minutes`, `3 hours`.
fn spoken(duration: Duration) -> String {
    let secs = duration.as_secs();
    match secs {
        0..120 => format!("{secs} seconds"),
        120..7200 => format!("{} minutes", secs / 60),
        _ => format!("{} hours", secs / 3600),
    }
}

/// An error text cut to 500 characters (an alert is read on a phone, and a message holds at
/// most 4096, Bot API `sendMessage`), without a closing full stop: the alert adds its own.
fn clip(error: &str) -> String {
    let error = error.trim().trim_end_matches('.');
    let mut line: String = error.chars().take(500).collect();
    if line.len() < error.len() {
        line.push('…');
    }
    line
}

/// `html` without its tags and entities, for the log and the message's title.
fn plain(html: &str) -> String {
    let mut text = String::with_capacity(html.len());
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => in_tag = true,
            '>' if in_tag => in_tag = false,
            c if !in_tag => text.push(c),
            _ => {}
        }
    }
    text.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&amp;", "&")
}

/// The first line of `text`, at most 200 characters.
fn first_line(text: &str) -> String {
    text.lines()
        .next()
        .unwrap_or("")
        .chars()
        .take(200)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_their_condition_and_read_back() {
        for condition in [
            Condition::Mailbox("reports@example.com".into()),
            Condition::Directory,
            Condition::Schema,
            Condition::Row("t_chats row r1 (Ops): topic: not a number; it gets no reports".into()),
            Condition::Recipient(-1001234567890),
            Condition::Parse("reports@example.com".into()),
        ] {
            assert_eq!(Condition::from_key(&condition.key()), Some(condition));
        }
        assert_eq!(
            Condition::mailbox("Reports@Example.com").key(),
            "mailbox:reports@example.com"
        );
        assert_eq!(Condition::from_key("recipient:abc"), None);
        assert_eq!(Condition::from_key("something-newer"), None);
    }

    #[test]
    fn durations_are_spoken() {
        assert_eq!(spoken(Duration::from_secs(3)), "3 seconds");
        assert_eq!(spoken(Duration::from_secs(725)), "12 minutes");
        assert_eq!(spoken(Duration::from_secs(3 * 3600 + 5)), "3 hours");
    }

    #[test]
    fn errors_are_clipped_without_their_full_stop() {
        assert_eq!(clip("Authentication failed."), "Authentication failed");
        let long = "x".repeat(600);
        assert_eq!(clip(&long).chars().count(), 501);
    }

    #[test]
    fn plain_text_drops_tags_and_entities() {
        assert_eq!(
            plain("Mailbox <b>a&amp;b@x</b> says &lt;no&gt;"),
            "Mailbox a&b@x says <no>"
        );
    }
}
