//! The outbox's types, shared by both backends: an acknowledged message with its files, one row per (recipient `chat_id`, send) and
//! the checkpoint in one transaction; then due sends handed out per chat in order, finished,
//! retried, moved on a migration, and pruned once done.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::report::Report;
use crate::report::render::{ItemKind, Method, Send};

use super::MessageOutcome;
use super::files::StoredFile;
use crate::imap::Checkpoint;

/// One file of a send, as stored in an outbox row. The bytes live once per sha256 in `files`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxItem {
    /// Photo or document.
    pub kind: ItemKind,
    /// SHA-256 of the bytes, lowercase hex.
    pub sha256: String,
    /// The file name shown in Telegram.
    pub file_name: String,
    /// The caption (HTML) on this item, if any.
    pub caption: Option<String>,
}

/// One Bot API call for one chat, as stored in an outbox row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxSend {
    /// The method.
    pub method: Method,
    /// The files; empty for `sendMessage`.
    pub items: Vec<OutboxItem>,
    /// The HTML text of a `sendMessage`.
    pub text: Option<String>,
    /// The recipient's and the mailbox's options for this call; absent in rows written before
    /// they existed (then all off).
    #[serde(default, skip_serializing_if = "SendOptions::is_default")]
    pub options: SendOptions,
}

/// Per-recipient and per-mailbox parameters of one Bot API call (issue 12).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendOptions {
    /// `message_thread_id`: the forum topic of the group (`t_chats.topic`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_thread_id: Option<i32>,
    /// `disable_notification`: delivered without a sound (`mailboxes.silent`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disable_notification: bool,
    /// `protect_content`: cannot be forwarded or saved (`mailboxes.protect_content`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub protect_content: bool,
}

impl SendOptions {
    /// Whether every option is off (then the row's JSON does not mention them).
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

impl OutboxSend {
    /// The outbox row of one planned call of `report` (options off; see [`Self::with`]).
    pub fn planned(send: &Send, report: &Report) -> Self {
        Self {
            method: send.method,
            options: SendOptions::default(),
            text: send.text.clone(),
            items: send
                .items_with_files(report)
                .map(|(item, file)| OutboxItem {
                    kind: item.kind,
                    sha256: file.sha256.clone(),
                    file_name: file.name.clone(),
                    caption: item.caption.clone(),
                })
                .collect(),
        }
    }

    /// This send with `options`.
    pub fn with(mut self, options: SendOptions) -> Self {
        self.options = options;
        self
    }
}

/// Everything [`State::acknowledge`] writes in one transaction.
#[derive(Debug, Clone)]
pub struct Acknowledgement {
    /// The mailbox address.
    pub mailbox: String,
    /// The message's UIDVALIDITY and UID for a message from IMAP; `None` for
    /// `replay --mailbox`.
    pub uid: Option<Checkpoint>,
    /// SHA-256 of the raw message, lowercase hex (the ledger key for replays).
    pub raw_sha256: String,
    /// The report title (or a short description for a failed message).
    pub title: String,
    /// What happened.
    pub outcome: MessageOutcome,
    /// The reason for a skip, filter or failure.
    pub detail: Option<String>,
    /// When the message arrived in the mailbox (IMAP INTERNALDATE), if known.
    pub received_at: Option<SystemTime>,
    /// The files the sends refer to.
    pub files: Vec<StoredFile>,
    /// One entry per (recipient chat_id, send), in send order per chat.
    pub sends: Vec<(i64, OutboxSend)>,
    /// The new checkpoint of the mailbox, written in the same transaction.
    pub checkpoint: Option<Checkpoint>,
    /// Set for a report that came over HTTP (the Superset webhook, the send API): then the
    /// message is keyed by [`HttpIngest::dedupe_key`] for [`HttpIngest::window`] instead of the
    /// replay ledger, and `uid` and `checkpoint` are `None`.
    pub http: Option<HttpIngest>,
    /// Set for an admin alert ([`crate::alerts`]): the change to the `alerts` table made in the
    /// same transaction. When it changes nothing (the condition was raised, or cleared, before,
    /// maybe by another replica), nothing is written and the result is
    /// [`AckResult::Duplicate`]. `uid`, `checkpoint` and `http` are then `None`.
    pub alert: Option<AlertChange>,
}

impl Acknowledgement {
    /// The path the message came in on, as stored in its `source` column.
    pub fn source(&self) -> Source {
        match (&self.alert, &self.http) {
            (Some(_), _) => Source::Alert,
            (None, Some(http)) => http.source,
            (None, None) => Source::Imap,
        }
    }
}

/// What an admin alert changes in the `alerts` table ([`Acknowledgement::alert`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AlertChange {
    /// Records that the condition `key` was raised, with the alert's `text`; a duplicate when
    /// `key` is raised already.
    Raise {
        /// The condition's key, e.g. `mailbox:reports@example.com`.
        key: String,
        /// The alert as sent (HTML).
        text: String,
    },
    /// Forgets the condition `key`; a duplicate when it is not raised.
    Clear {
        /// The condition's key.
        key: String,
    },
}

/// A condition the admin chats were told about and not yet told is cleared
/// ([`State::raised_alerts`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaisedAlert {
    /// The condition's key, e.g. `mailbox:reports@example.com`.
    pub key: String,
    /// When it was raised.
    pub raised_at: SystemTime,
    /// The alert as sent (HTML).
    pub text: String,
}

/// The default [`HttpIngest::window`] (`http.dedupe_window_secs`): 24 hours.
pub const INGEST_DEDUPE_WINDOW: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// What [`Acknowledgement::http`] says about a report that came over HTTP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpIngest {
    /// Which path it came in on (stored with the message, a label of
    /// `ingest_to_send_seconds`).
    pub source: Source,
    /// SHA-256 (hex) naming the request for deduplication, or `None` (a send API call without
    /// an `Idempotency-Key`: every call is a new message).
    pub dedupe_key: Option<String>,
    /// How long the key makes the same request a duplicate: a retry within it is acknowledged
    /// again and sends nothing; after it, the same request is a new report.
    pub window: std::time::Duration,
}

/// The path a report came in on: the `source` label of the metrics and the logs, and the
/// `source` column of the messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// An e-mail from a watched mailbox (or `replay --mailbox`).
    Imap,
    /// `POST /ingest/superset/{token}`: Superset's webhook notification.
    SupersetWebhook,
    /// `POST /api/v1/messages`: the send API.
    Api,
    /// An admin alert to `telegram.admin_chats` ([`crate::alerts`]), not a report: left out of
    /// `history` and the delivery log.
    Alert,
}

impl Source {
    /// The lowercase name in the database, the metrics and the logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Imap => "imap",
            Self::SupersetWebhook => "superset_webhook",
            Self::Api => "api",
            Self::Alert => "alert",
        }
    }

    /// The source named `text` in the database; anything unknown (a newer version's) reads as
    /// `imap`.
    pub fn from_column(text: &str) -> Self {
        match text {
            "superset_webhook" => Self::SupersetWebhook,
            "api" => Self::Api,
            "alert" => Self::Alert,
            _ => Self::Imap,
        }
    }
}

/// One outbox row of a message, for [`State::message_status`] and [`State::messages_since`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendStatus {
    /// The recipient `chat_id`.
    pub chat_id: i64,
    /// `pending`, `done` or `failed`.
    pub status: String,
    /// Why it failed, or the last transient error of a pending send.
    pub error: Option<String>,
    /// When Telegram accepted it, or it failed for good.
    pub finished_at: Option<SystemTime>,
}

impl SendStatus {
    /// An outbox row's `chat_id`, `status`, `error` and `finished_at` (Unix milliseconds).
    pub(in crate::state) fn from_columns(
        chat_id: i64,
        status: String,
        error: Option<String>,
        finished_at: Option<i64>,
    ) -> Self {
        Self {
            chat_id,
            status,
            error,
            finished_at: finished_at.map(crate::state::from_millis),
        }
    }
}

/// A stored message with its outbox rows ([`State::message_status`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageStatus {
    /// The message's row id.
    pub id: i64,
    /// The mailbox it was relayed for.
    pub mailbox: String,
    /// The path it came in on.
    pub source: Source,
    /// The title.
    pub title: String,
    /// What the relay did with it.
    pub outcome: MessageOutcome,
    /// The reason for a skip, filter or failure.
    pub detail: Option<String>,
    /// When it arrived.
    pub received_at: SystemTime,
    /// Its outbox rows in send order.
    pub sends: Vec<SendStatus>,
}

/// The result of [`State::acknowledge`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckResult {
    /// Stored; the message's row id.
    Stored(i64),
    /// The message was stored before (same UID, or same content for a replay); nothing new
    /// was queued. The checkpoint was still written.
    Duplicate,
}

/// How the outbox rows of some messages stand.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SendCounts {
    /// Still to be sent (or retried).
    pub pending: usize,
    /// Accepted by Telegram.
    pub done: usize,
    /// Failed for good.
    pub failed: usize,
}

/// An outbox row due for sending.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    /// Row id; the order of sends within a chat.
    pub id: i64,
    /// The message's row id.
    pub message_id: i64,
    /// The recipient `chat_id`.
    pub chat_id: i64,
    /// The call.
    pub send: OutboxSend,
    /// How many attempts failed so far.
    pub attempts: u32,
    /// When the row was queued.
    pub created_at: SystemTime,
    /// When the first transient failure of this send happened, if any.
    pub first_failed_at: Option<SystemTime>,
    /// When the message arrived in the mailbox (or was queued, or its HTTP request arrived).
    pub received_at: SystemTime,
    /// The path the message came in on.
    pub source: Source,
}

/// A send Telegram accepted recently ([`State::recent_sends`]): what a new delivery worker's
/// pacer counts as already in Telegram's windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecentSend {
    /// The recipient `chat_id`.
    pub chat_id: i64,
    /// Messages it put in the chat: the items of an album, 1 for anything else.
    pub messages: usize,
    /// When it was marked done (the writing replica's clock).
    pub finished_at: SystemTime,
}

impl RecentSend {
    /// The row's recipient, its `send` column (JSON; an unreadable one counts as 1 message) and
    /// its `finished_at` (Unix milliseconds).
    pub(in crate::state) fn from_row(chat_id: i64, send: &str, finished_at: i64) -> Self {
        let messages = serde_json::from_str::<OutboxSend>(send)
            .map(|send| send.items.len())
            .unwrap_or(1)
            .max(1);
        Self {
            chat_id,
            messages,
            finished_at: crate::state::from_millis(finished_at),
        }
    }
}

/// How a finished send ended, for [`State::finish_send`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendResult {
    /// Telegram accepted it.
    Done,
    /// It will not be retried; the reason is logged and stored.
    Failed(String),
}

/// Puts each `(message_id, send)` into its message's `sends`, in order; both lists are sorted
/// by message id.
pub(in crate::state) fn attach_sends(
    mut messages: Vec<MessageStatus>,
    sends: Vec<(i64, SendStatus)>,
) -> Vec<MessageStatus> {
    let mut index = 0;
    for (message_id, send) in sends {
        while index < messages.len() && messages[index].id < message_id {
            index += 1;
        }
        if let Some(message) = messages.get_mut(index).filter(|m| m.id == message_id) {
            message.sends.push(send);
        }
    }
    messages
}
