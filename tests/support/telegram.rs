//! A faithful in-process fake of the Telegram Bot API HTTP server, for integration tests.
//!
//! It follows `docs/reference/telegram-bot-api.md` (sections 1–5 and 8) and, where the reference is
//! silent, the open-source server (`tdlib/telegram-bot-api`, TDLib's `parse_html`). It is meant to
//! be driven by a real `teloxide::Bot` pointed at [`FakeTelegram::api_url`] with `set_api_url`.
//!
//! # What it models
//!
//! - Routing: any HTTP method on `/bot{token}/{method}`, the method matched case-insensitively
//!   (teloxide sends `SendDocument`). A wrong token answers 401 `Unauthorized`, any other path
//!   404 `Not Found`, an unknown method 404 `Not Found: method not found`. Parameters come from
//!   the query string, `application/x-www-form-urlencoded`, `application/json` and
//!   `multipart/form-data`; a multipart part with a `filename` is a file, any other part a
//!   parameter. Files are resolved like `Client::get_input_file`: `attach://name` → the part
//!   `name`; an empty value → the part named like the parameter; anything else → a file_id.
//! - The envelope: `application/json`, HTTP status = `error_code`, keys in the order `ok,
//!   error_code, description, parameters` (`parameters` only when non-empty), a `Retry-After`
//!   header on 429.
//! - Methods: `getMe`, `logOut`, `close`, `getWebhookInfo`, `setWebhook`, `deleteWebhook`,
//!   `getUpdates` (long polling, sticky `allowed_updates`, 409 for a second concurrent poller),
//!   `sendMessage`, `sendPhoto`, `sendDocument`, `sendMediaGroup`, `sendChatAction`, `getChat`,
//!   `setMyCommands`, `getMyCommands`, `deleteMyCommands`. Every other method name answers 404
//!   `Not Found: method not found` (the real server knows more methods; this fake does not).
//! - Validation, in the order the real server applies it: what the Bot API server itself parses
//!   (file present, HTML entities, reply markup, album JSON), then the chat (`chat_id is empty`,
//!   `chat not found`, migrated, kicked, not a member), then what TDLib checks (file_id known and
//!   of the right type, caption ≤ 1024 and text ≤ 4096 UTF-16 code units of visible text, photo
//!   upload ≤ 10 MiB, album composition, rights), then what Telegram's servers refuse (blocked
//!   user, photo geometry, flood control).
//! - Files: every upload gets a fresh `file_id`; `file_unique_id` is derived from the bytes (and
//!   the kind and photo size), so the same bytes always get the same `file_unique_id`. Every
//!   issued id is accepted back; a photo id is refused for `sendDocument` and a document id for
//!   `sendPhoto` with TDLib's `Bad Request: can't use file of type Photo as Document` (resp.
//!   `Document as Photo`). Unknown ids answer `Bad Request: wrong file identifier/HTTP URL
//!   specified` (teloxide: `ApiError::WrongFileIdOrUrl`). URLs are never downloaded: an `http…`
//!   value is just an unknown file_id.
//! - Recording: every call ([`Call`]) with its parameters, files, outcome and arrival time, and
//!   an async [`FakeTelegram::wait_for`] that awaits a condition instead of sleeping.
//! - Failure injection ([`FaultRule`], [`Fault`]) and persistent chat states ([`ChatState`]).
//! - Optional strict flood control ([`RateLimits`], [`FloodControl`]): Telegram's per-chat,
//!   per-group and global limits over every sliding window, each violation recorded.
//! - An optional answer delay ([`FakeConfig::answer_delay`], [`Fault::Delay`]) after a send is
//!   processed and recorded.
//! - Update builders ([`FakeTelegram::push_start`], [`FakeTelegram::push_contact`],
//!   [`FakeTelegram::push_bot_promoted`], [`FakeTelegram::push_migration`], …) producing JSON
//!   that teloxide 0.17 parses (no `UpdateKind::Error`).
//!
//! # Deliberate deviations (documented choices)
//!
//! - HTML: by default ([`FakeConfig::strict_html`]) a `&` in text that does not start one of the
//!   entities the documentation allows (`&lt; &gt; &amp; &quot;`, numeric) is refused with
//!   `can't parse entities: Character "&" at byte offset N must be escaped as "&amp;" (strict
//!   mode of the fake server)`. TDLib itself keeps such an `&` literally (the documentation asks
//!   for escaping, the server is lenient); set `strict_html = false` for TDLib's exact behaviour.
//!   An unescaped `>` is accepted, as TDLib does. Everything else mirrors TDLib's `parse_html`,
//!   including its error texts and byte offsets.
//! - `parse_mode` `Markdown`/`MarkdownV2` is accepted but not parsed (length = raw text).
//! - Albums: the documentation says 2–10 items; the real server sends a single item as one
//!   message outside any album, and so does the fake (the result is an array of one Message
//!   without `media_group_id`). `[]` answers `there are no messages to send`, more than 10
//!   `too many messages to send as an album`, documents mixed with photos `document can't be
//!   mixed with other media types` (TDLib's check, which runs before Telegram's
//!   `MEDIA_GROUPED_INVALID` could). Only `photo` and `document` items are supported.
//! - Photo uploads above [`FakeConfig::max_photo_bytes`] (TDLib: 10 MiB) answer TDLib's `file
//!   of size N bytes is too big for a photo; the maximum size is M bytes`; dimensions are read
//!   from PNG (IHDR), JPEG (SOF) and GIF headers; anything else is `IMAGE_PROCESS_FAILED`.
//! - The 413 `Request Entity Too Large` of `api.telegram.org` is a limit on the whole request:
//!   the fake compares the sum of the uploaded parts with [`FakeConfig::max_upload_bytes`].
//! - A multipart part that carries a `filename` (even an empty one) is a file.
//! - Photos get the sizes Telegram typically generates (90, 320, 800, 1280 px on the long side,
//!   plus the original when ≤ 1280 px), largest last; the bytes are never recompressed.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Request, State as AxumState};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

// ---------------------------------------------------------------------------------------------
// Constants: realistic ids and the exact descriptions the real server answers
// ---------------------------------------------------------------------------------------------

/// A realistic bot token (numeric bot id, `:`, 35 characters), long enough for teloxide to
/// redact it from network errors.
pub const TOKEN: &str = "7012345678:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsawQ";
/// A private user (and their private chat) used by the update builders' examples.
pub const USER_ID: i64 = 111_222_333;
/// A second user, e.g. the owner of a forwarded contact card.
pub const OTHER_USER_ID: i64 = 444_555_666;
/// A basic group id.
pub const BASIC_GROUP_ID: i64 = -987_654_321;
/// A supergroup id (`-100…`).
pub const SUPERGROUP_ID: i64 = -1_001_987_654_321;
/// The user id of `@GroupAnonymousBot`, the sender of service messages in supergroups.
pub const GROUP_ANONYMOUS_BOT_ID: i64 = 1_087_968_824;

/// Maximum caption length (visible UTF-16 code units after entity parsing).
pub const MAX_CAPTION_LEN: usize = 1024;
/// Maximum text length of `sendMessage` (visible UTF-16 code units after entity parsing).
pub const MAX_TEXT_LEN: usize = 4096;
/// Default [`FakeConfig::max_upload_bytes`]: 50 MB, read as 50,000,000 bytes.
pub const DEFAULT_MAX_UPLOAD_BYTES: usize = 50_000_000;
/// Default [`FakeConfig::max_photo_bytes`]: TDLib's `10 << 20`.
pub const DEFAULT_MAX_PHOTO_BYTES: usize = 10 << 20;

/// Exact `description` texts the fake answers with (they are the real server's texts).
pub mod desc {
    /// 404 for a path that is not `/bot<token>/<method>`.
    pub const NOT_FOUND: &str = "Not Found";
    /// 404 for an unknown method.
    pub const METHOD_NOT_FOUND: &str = "Not Found: method not found";
    /// 401 for a wrong token.
    pub const UNAUTHORIZED: &str = "Unauthorized";
    /// 403: a private user blocked the bot (teloxide: `ApiError::BotBlocked`).
    pub const BOT_BLOCKED: &str = "Forbidden: bot was blocked by the user";
    /// 403: kicked from a basic group (teloxide: `ApiError::Unknown`).
    pub const KICKED_FROM_GROUP: &str = "Forbidden: bot was kicked from the group chat";
    /// 403: kicked from a supergroup (teloxide: `ApiError::BotKickedFromSupergroup`).
    pub const KICKED_FROM_SUPERGROUP: &str = "Forbidden: bot was kicked from the supergroup chat";
    /// 403: kicked from a channel (teloxide: `ApiError::BotKickedFromChannel`).
    pub const KICKED_FROM_CHANNEL: &str = "Forbidden: bot was kicked from the channel chat";
    /// 403: not a member of a basic group.
    pub const NOT_MEMBER_GROUP: &str = "Forbidden: bot is not a member of the group chat";
    /// 403: not a member of a supergroup.
    pub const NOT_MEMBER_SUPERGROUP: &str = "Forbidden: bot is not a member of the supergroup chat";
    /// 403: not a member of a channel.
    pub const NOT_MEMBER_CHANNEL: &str = "Forbidden: bot is not a member of the channel chat";
    /// 403: the user never started the bot.
    pub const CANT_INITIATE: &str = "Forbidden: bot can't initiate conversation with a user";
    /// 403: deleted account (teloxide: `ApiError::UserDeactivated`).
    pub const USER_DEACTIVATED: &str = "Forbidden: user is deactivated";
    /// 403: the basic group was deleted.
    pub const GROUP_DELETED: &str = "Forbidden: the group chat was deleted";
    /// 400: unknown chat (teloxide: `ApiError::ChatNotFound`).
    pub const CHAT_NOT_FOUND: &str = "Bad Request: chat not found";
    /// 400: `message_thread_id` names no topic of the chat, or a deleted one
    /// (tdlib/telegram-bot-api#854: a deleted topic in a group; #472: a wrong thread id).
    pub const THREAD_NOT_FOUND: &str = "Bad Request: message thread not found";
    /// 400: the topic is closed (Telegram's `TOPIC_CLOSED`, passed through by the Bot API).
    pub const TOPIC_CLOSED: &str = "Bad Request: TOPIC_CLOSED";
    /// 400 + `parameters.migrate_to_chat_id` (teloxide: `RequestError::MigrateToChatId`).
    pub const MIGRATED: &str = "Bad Request: group chat was upgraded to a supergroup chat";
    /// 400: no `chat_id`.
    pub const CHAT_ID_EMPTY: &str = "Bad Request: chat_id is empty";
    /// 400: caption longer than 1024 visible characters.
    pub const CAPTION_TOO_LONG: &str = "Bad Request: message caption is too long";
    /// 400: text longer than 4096 visible characters (teloxide: `ApiError::MessageIsTooLong`).
    pub const MESSAGE_TOO_LONG: &str = "Bad Request: message is too long";
    /// 400: empty text.
    pub const TEXT_EMPTY: &str = "Bad Request: message text is empty";
    /// Prefix of HTML errors (teloxide: `ApiError::CantParseEntities`).
    pub const CANT_PARSE_ENTITIES: &str = "Bad Request: can't parse entities: ";
    /// 400: unknown parse_mode.
    pub const UNSUPPORTED_PARSE_MODE: &str = "Bad Request: unsupported parse_mode";
    /// 400: photo geometry refused by Telegram's servers.
    pub const PHOTO_INVALID_DIMENSIONS: &str = "Bad Request: PHOTO_INVALID_DIMENSIONS";
    /// 400: not a readable image (teloxide: `ApiError::ImageProcessFailed`).
    pub const IMAGE_PROCESS_FAILED: &str = "Bad Request: IMAGE_PROCESS_FAILED";
    /// 400: unknown file_id (teloxide: `ApiError::WrongFileIdOrUrl`).
    pub const WRONG_FILE_ID: &str = "Bad Request: wrong file identifier/HTTP URL specified";
    /// 400: `sendDocument` without a document.
    pub const NO_DOCUMENT: &str = "Bad Request: there is no document in the request";
    /// 400: `sendPhoto` without a photo.
    pub const NO_PHOTO: &str = "Bad Request: there is no photo in the request";
    /// 400: an empty upload.
    pub const FILE_EMPTY: &str = "Bad Request: file must be non-empty";
    /// 413 (teloxide: `ApiError::RequestEntityTooLarge`).
    pub const ENTITY_TOO_LARGE: &str = "Request Entity Too Large";
    /// 400: `sendMediaGroup` mixing documents with photos.
    pub const ALBUM_DOCUMENT_MIXED: &str =
        "Bad Request: document can't be mixed with other media types";
    /// 400: more than 10 album items.
    pub const ALBUM_TOO_MANY: &str = "Bad Request: too many messages to send as an album";
    /// 400: an empty album.
    pub const ALBUM_EMPTY: &str = "Bad Request: there are no messages to send";
    /// 400: an album item whose file part is missing.
    pub const MEDIA_NOT_FOUND: &str = "Bad Request: can't parse InputMedia: media not found";
    /// 400: `media` is not JSON.
    pub const MEDIA_JSON: &str = "Bad Request: can't parse media JSON object";
    /// 400: `media` is not an array.
    pub const MEDIA_NOT_ARRAY: &str = "Bad Request: expected an Array of InputMedia";
    /// 400: `reply_markup` is not a JSON object.
    pub const REPLY_MARKUP_JSON: &str =
        "Bad Request: can't parse reply keyboard markup JSON object";
    /// 400: no rights to send documents.
    pub const NO_RIGHTS_DOCUMENTS: &str =
        "Bad Request: not enough rights to send documents to the chat";
    /// 400: no rights to send photos.
    pub const NO_RIGHTS_PHOTOS: &str = "Bad Request: not enough rights to send photos to the chat";
    /// 400: no rights to send text messages.
    pub const NO_RIGHTS_TEXT: &str =
        "Bad Request: not enough rights to send text messages to the chat";
    /// 400: unknown chat action.
    pub const WRONG_ACTION: &str = "Bad Request: wrong parameter action in request";
    /// 409: another getUpdates request took over (teloxide: `TerminatedByOtherGetUpdates`).
    pub const CONFLICT_GET_UPDATES: &str = "Conflict: terminated by other getUpdates request; make sure that only one bot instance is running";
    /// 409: getUpdates while a webhook is set.
    pub const CONFLICT_WEBHOOK: &str = "Conflict: can't use getUpdates method while webhook is active; use deleteWebhook to delete the webhook first";
    /// 500 JSON description used by [`super::Fault::InternalServerError`].
    pub const INTERNAL: &str = "Internal Server Error";
}

/// The nginx page Telegram's front end answers with on a 502.
pub const NGINX_502: &str = "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx/1.18.0</center>\r\n</body>\r\n</html>\r\n";

/// The methods the fake implements, in their canonical camelCase spelling.
pub const METHODS: &[&str] = &[
    "getMe",
    "logOut",
    "close",
    "getUpdates",
    "getWebhookInfo",
    "setWebhook",
    "deleteWebhook",
    "sendMessage",
    "sendPhoto",
    "sendDocument",
    "sendMediaGroup",
    "sendChatAction",
    "getChat",
    "setMyCommands",
    "getMyCommands",
    "deleteMyCommands",
];

/// Update kinds left out when `allowed_updates` is absent or empty.
const NOT_DEFAULT_UPDATES: &[&str] = &["chat_member", "message_reaction", "message_reaction_count"];

const CHAT_ACTIONS: &[&str] = &[
    "typing",
    "upload_photo",
    "record_video",
    "upload_video",
    "record_voice",
    "upload_voice",
    "upload_document",
    "choose_sticker",
    "find_location",
    "record_video_note",
    "upload_video_note",
];

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// The bot's own profile, as `getMe` reports it.
#[derive(Clone, Debug)]
pub struct BotProfile {
    /// `first_name` of the bot.
    pub first_name: String,
    /// `username` of the bot (teloxide's `Me::username` requires one).
    pub username: String,
    /// `can_join_groups`.
    pub can_join_groups: bool,
    /// `can_read_all_group_messages` (privacy mode off).
    pub can_read_all_group_messages: bool,
}

impl Default for BotProfile {
    fn default() -> Self {
        Self {
            first_name: "Report Relay".to_owned(),
            username: "report_relay_bot".to_owned(),
            can_join_groups: true,
            can_read_all_group_messages: false,
        }
    }
}

/// Settings of a [`FakeTelegram`]; `FakeConfig::default()` behaves like the cloud server.
#[derive(Clone, Debug)]
pub struct FakeConfig {
    /// What `getMe` returns (the id is the numeric prefix of the token).
    pub bot: BotProfile,
    /// Largest multipart request (sum of the uploaded parts) before 413 `Request Entity Too
    /// Large`. Default 50,000,000; lower it so tests don't need 50 MB bodies.
    pub max_upload_bytes: usize,
    /// Largest photo upload; default 10 MiB (TDLib).
    pub max_photo_bytes: usize,
    /// Refuse an `&` that starts no documented entity (see the module docs). Default `true`.
    pub strict_html: bool,
    /// Answer `chat not found` for chats the fake has never seen (pushed in an update or added
    /// with [`FakeTelegram::add_chat`]). Default `false`: any non-zero id is a chat.
    pub strict_chats: bool,
    /// Strict flood control; `None` (default) disables it.
    pub rate_limits: Option<RateLimits>,
    /// Answer every message-producing call (`sendMessage`, `sendPhoto`, `sendDocument`,
    /// `sendMediaGroup`) this long after the fake has processed and recorded it, like the
    /// round trip to Telegram's data centre. What was delivered stays delivered when the client
    /// gives up or dies before the answer. A matching [`Fault::Delay`] replaces it. Default zero.
    pub answer_delay: Duration,
}

impl Default for FakeConfig {
    fn default() -> Self {
        Self {
            bot: BotProfile::default(),
            max_upload_bytes: DEFAULT_MAX_UPLOAD_BYTES,
            max_photo_bytes: DEFAULT_MAX_PHOTO_BYTES,
            strict_html: true,
            strict_chats: false,
            rate_limits: None,
            answer_delay: Duration::ZERO,
        }
    }
}

/// Flood-control limits of the "strict limits" mode: a message-producing call that would exceed
/// one of them answers 429 `Too Many Requests: retry after N` (with `parameters.retry_after` and
/// a `Retry-After` header, the server's envelope) and is recorded as a [`RateViolation`]; a
/// refused call delivers nothing and reserves nothing.
///
/// Every limit holds over **any** sliding window, as Telegram's do, measured at the moment the
/// fake receives the request (its [`Call::received_at`], when the request head arrives), not
/// against a schedule of the sender's own: "at most 30 in any 1 s" refuses a burst of 30 followed
/// by one more 0.5 s later, and a token bucket's "30 at once, then one every 33 ms" with it.
///
/// Sources (`docs/reference/telegram-bot-api.md` §2, the Bots FAQ "My bot is hitting limits"):
/// - Global: "at most about 30 messages per second" over all chats. An album of N items counts N
///   ("An album of N items counts as N messages towards the limits", teloxide #515).
/// - Group: "a bot cannot send more than 20 messages per minute" in one group (negative chat id;
///   @BotSupport via the python-telegram-bot wiki: channels too). An album of N counts N.
/// - Chat: "avoid sending more than 1 message per second" in a single chat. This one counts
///   **requests**: an album is one request that Telegram accepts whole (2–10 items, §3), which a
///   per-message 1/s limit would refuse for good, and the FAQ's advice is about spacing what a
///   bot sends into one conversation. So one send (a message or a whole album) per chat in any
///   1-s window; the album's items still count N towards the global and group windows.
#[derive(Clone, Debug)]
pub struct RateLimits {
    /// Requests (an album is one) to one chat, private or group, per
    /// [`RateLimits::per_chat_window`]. Telegram: 1.
    pub per_chat: u32,
    /// Sliding window of the per-chat limit. Telegram: 1 s.
    pub per_chat_window: Duration,
    /// Messages per [`RateLimits::group_window`] in one group (negative chat id), an album of N
    /// counting N. Telegram: 20.
    pub group_max: u32,
    /// Sliding window of the group limit. Telegram: 60 s.
    pub group_window: Duration,
    /// Messages per [`RateLimits::global_window`] over all chats, an album of N counting N.
    /// Telegram: 30.
    pub global_max: u32,
    /// Sliding window of the global limit. Telegram: 1 s.
    pub global_window: Duration,
    /// How much shorter than each window two stamps may be and still count as a window apart
    /// (not scaled). Default 1 ms. Telegram gives none; this covers only the clocks: the fake
    /// stamps with `tokio::time::Instant` (the monotonic clock, to the nanosecond) while a
    /// sender's governor reads quanta's TSC-calibrated clock, and tokio's timers fire on 1-ms
    /// ticks. It is not room for network jitter: a sender pacing exactly at a limit with no margin
    /// sees 429s here, as it would from Telegram, whose jitter is far larger.
    pub tolerance: Duration,
}

impl Default for RateLimits {
    fn default() -> Self {
        Self::telegram()
    }
}

impl RateLimits {
    /// Telegram's limits: 1 request per 1 s per chat, 20 messages per 60 s per group, 30
    /// messages per 1 s overall.
    pub fn telegram() -> Self {
        Self {
            per_chat: 1,
            per_chat_window: Duration::from_secs(1),
            group_max: 20,
            group_window: Duration::from_secs(60),
            global_max: 30,
            global_window: Duration::from_secs(1),
            tolerance: Duration::from_millis(1),
        }
    }

    /// The same limits with every window multiplied by `factor` (e.g. `0.05` → one request per
    /// 50 ms per chat, 20 per 3 s per group, 30 per 50 ms overall), so tests run fast. The counts
    /// and the tolerance stay; `retry_after` stays in whole seconds (at least 1), as on the wire.
    pub fn scaled(&self, factor: f64) -> Self {
        Self {
            per_chat_window: self.per_chat_window.mul_f64(factor),
            group_window: self.group_window.mul_f64(factor),
            global_window: self.global_window.mul_f64(factor),
            ..self.clone()
        }
    }

    /// The shortest first-to-last span these limits allow for `messages` single messages to
    /// distinct chats (none over the per-chat or group limits): message `i` and message
    /// `i + global_max` can never share a global window, so the span is at least
    /// `floor((messages - 1) / global_max)` windows, and bursts of `global_max` one window apart
    /// reach it. 123 messages at 30/s: 4 s.
    pub fn min_span(&self, messages: u32) -> Duration {
        self.global_window * (messages.saturating_sub(1) / self.global_max.max(1))
    }
}

// ---------------------------------------------------------------------------------------------
// Recorded calls
// ---------------------------------------------------------------------------------------------

/// Kind of a file as the Bot API (and TDLib) types it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FileKind {
    /// `sendPhoto` / `InputMediaPhoto`.
    Photo,
    /// `sendDocument` / `InputMediaDocument`.
    Document,
}

impl FileKind {
    fn tdlib_name(self) -> &'static str {
        match self {
            FileKind::Photo => "Photo",
            FileKind::Document => "Document",
        }
    }
}

/// Where a sent file came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileSource {
    /// Uploaded in the multipart part with this name.
    Upload {
        /// The multipart part name (teloxide: a 32-hex uuid, referenced as `attach://<uuid>`).
        part: String,
    },
    /// Sent as a string: a file_id (or URL) the client already had.
    FileId(String),
}

/// One file of a recorded call.
#[derive(Clone, Debug)]
pub struct SentFile {
    /// The parameter: `document`, `photo`, or `media[k]` for album item k (0-based).
    pub field: String,
    /// The kind requested by the method / InputMedia type.
    pub kind: FileKind,
    /// Upload or file_id.
    pub source: FileSource,
    /// Upload filename, or the original upload's name for a known file_id.
    pub file_name: Option<String>,
    /// The bytes (for a known file_id: those of the original upload; `None` if unknown).
    pub bytes: Option<Bytes>,
    /// Hex SHA-256 of [`SentFile::bytes`].
    pub sha256: Option<String>,
    /// Caption sent with this file (album items carry their own).
    pub caption: Option<String>,
    /// parse_mode sent with this file.
    pub parse_mode: Option<String>,
    /// The file_id in the answer (set only when the call succeeded; for photos, the largest).
    pub file_id: Option<String>,
    /// The file_unique_id in the answer (set only when the call succeeded).
    pub file_unique_id: Option<String>,
}

impl SentFile {
    /// `true` for a multipart upload.
    pub fn is_upload(&self) -> bool {
        matches!(self.source, FileSource::Upload { .. })
    }
}

/// How a call was answered.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Still being processed (a long poll).
    Pending,
    /// `{"ok":true,"result":…}`; the value is `result`.
    Ok(Value),
    /// `{"ok":false,…}` with this HTTP status / error_code.
    Error {
        /// `error_code` (= HTTP status).
        code: u16,
        /// `description`.
        description: String,
        /// `parameters`, when present.
        parameters: Option<Value>,
    },
    /// A non-JSON page (the nginx 502).
    Html {
        /// HTTP status.
        status: u16,
    },
    /// The connection was closed without a response.
    ConnectionClosed,
}

/// One recorded request.
#[derive(Clone, Debug)]
pub struct Call {
    /// 1-based arrival order (unique, also across [`FakeTelegram::clear_calls`]).
    pub seq: u64,
    /// Canonical method name, e.g. `sendDocument`.
    pub method: String,
    /// The method as it appeared in the path, e.g. `SendDocument`.
    pub path_method: String,
    /// `GET`, `POST`, …
    pub http_method: String,
    /// Media type of the body, e.g. `multipart/form-data` or `application/json`.
    pub content_type: Option<String>,
    /// Every text parameter (query, form, JSON — non-string JSON values as JSON text).
    pub params: BTreeMap<String, String>,
    /// `chat_id`, when numeric.
    pub chat_id: Option<i64>,
    /// `text` (sendMessage), raw as sent.
    pub text: Option<String>,
    /// `caption`, raw as sent.
    pub caption: Option<String>,
    /// `parse_mode`.
    pub parse_mode: Option<String>,
    /// `reply_markup`, parsed.
    pub reply_markup: Option<Value>,
    /// The files of the call (best effort also for failed calls).
    pub files: Vec<SentFile>,
    /// When the request arrived (its head, before the body was read); strict limits count it
    /// at this instant.
    pub received_at: Instant,
    /// How it was answered.
    pub outcome: Outcome,
    /// The injected fault that answered (or delayed) it.
    pub fault: Option<Fault>,
}

impl Call {
    /// Whether boolean parameter `name` (`disable_notification`, `protect_content`) was sent
    /// as true.
    pub fn flag(&self, name: &str) -> bool {
        self.params.get(name).is_some_and(|v| param_true(v))
    }

    /// The `message_thread_id` sent, when numeric.
    pub fn message_thread_id(&self) -> Option<i64> {
        self.params
            .get("message_thread_id")
            .and_then(|v| v.trim().parse().ok())
    }

    /// `true` when answered `ok:true`.
    pub fn is_ok(&self) -> bool {
        matches!(self.outcome, Outcome::Ok(_))
    }

    /// The `result`, if ok.
    pub fn result(&self) -> Option<&Value> {
        match &self.outcome {
            Outcome::Ok(v) => Some(v),
            _ => None,
        }
    }

    /// The error `description`, if answered with a JSON error.
    pub fn error_description(&self) -> Option<&str> {
        match &self.outcome {
            Outcome::Error { description, .. } => Some(description),
            _ => None,
        }
    }

    /// The error code / HTTP status of a failed call.
    pub fn error_code(&self) -> Option<u16> {
        match &self.outcome {
            Outcome::Error { code, .. } => Some(*code),
            Outcome::Html { status } => Some(*status),
            _ => None,
        }
    }

    /// `true` for a message-producing method (`sendMessage`, `sendPhoto`, `sendDocument`,
    /// `sendMediaGroup`).
    pub fn is_send(&self) -> bool {
        is_send_method(&self.method)
    }

    /// Messages this call delivered (0 unless ok; N for an album of N).
    pub fn delivered_messages(&self) -> usize {
        match self.result() {
            Some(Value::Array(a)) => a.len(),
            Some(Value::Object(o)) if o.contains_key("message_id") => 1,
            _ => 0,
        }
    }

    /// `message_id`s of the delivered messages.
    pub fn message_ids(&self) -> Vec<i64> {
        match self.result() {
            Some(Value::Array(a)) => a.iter().filter_map(|m| m["message_id"].as_i64()).collect(),
            Some(m) => m["message_id"].as_i64().into_iter().collect(),
            None => Vec::new(),
        }
    }
}

/// Which flood limit was exceeded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateScope {
    /// Per-chat window (requests).
    Chat,
    /// Per-group window.
    Group,
    /// Global window.
    Global,
}

/// A flood-control violation seen in strict-limits mode (answered with 429).
#[derive(Clone, Debug)]
pub struct RateViolation {
    /// When it happened.
    pub at: Instant,
    /// The method.
    pub method: String,
    /// The chat.
    pub chat_id: i64,
    /// Messages the call would have produced.
    pub messages: u32,
    /// The exceeded limit.
    pub scope: RateScope,
    /// The `retry_after` answered.
    pub retry_after: u32,
}

/// Counters over all recorded calls.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Recorded calls.
    pub calls: usize,
    /// Calls answered ok.
    pub ok_calls: usize,
    /// Calls answered otherwise.
    pub failed_calls: usize,
    /// Files uploaded in successful calls.
    pub uploads: usize,
    /// Files sent by file_id in successful calls.
    pub file_id_sends: usize,
    /// Messages delivered (an album of N counts N).
    pub messages_delivered: usize,
    /// Flood-control violations.
    pub rate_violations: usize,
}

/// [`FakeTelegram::wait_for`] gave up; the message lists the calls seen so far.
#[derive(Clone, Debug)]
pub struct WaitTimeout {
    /// How long it waited.
    pub waited: Duration,
    /// One line per recorded call.
    pub calls: Vec<String>,
}

impl fmt::Display for WaitTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "condition not met within {:?}; {} calls recorded:",
            self.waited,
            self.calls.len()
        )?;
        for line in &self.calls {
            writeln!(f, "  {line}")?;
        }
        Ok(())
    }
}

impl std::error::Error for WaitTimeout {}

// ---------------------------------------------------------------------------------------------
// Failure injection and chat states
// ---------------------------------------------------------------------------------------------

/// An injected answer. All JSON errors use the real server's envelope and texts.
#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// 429 `Too Many Requests: retry after N`, `parameters.retry_after = N`, `Retry-After: N`.
    RetryAfter(u32),
    /// 400 `Bad Request: group chat was upgraded to a supergroup chat` with
    /// `parameters.migrate_to_chat_id` (never together with `retry_after`).
    MigrateTo(i64),
    /// 403 `Forbidden: bot was blocked by the user`.
    BotBlocked,
    /// 403 `Forbidden: bot was kicked from the group chat`.
    KickedFromGroup,
    /// 403 `Forbidden: bot was kicked from the supergroup chat`.
    KickedFromSupergroup,
    /// 403 `Forbidden: bot is not a member of the supergroup chat`.
    NotMemberOfSupergroup,
    /// 400 `Bad Request: chat not found`.
    ChatNotFound,
    /// 400 `Bad Request: not enough rights to send documents to the chat`.
    NotEnoughRightsDocuments,
    /// Any other JSON error.
    Api {
        /// HTTP status and `error_code`.
        code: u16,
        /// `description`.
        description: String,
    },
    /// 500 `{"ok":false,"error_code":500,"description":"Internal Server Error"}`.
    /// teloxide sleeps 10 s on any 5xx.
    InternalServerError,
    /// 502 with nginx's HTML page (teloxide: `InvalidJson` after its 10 s 5xx sleep).
    BadGatewayHtml,
    /// Close the connection without answering (teloxide: `RequestError::Network`).
    CloseConnection,
    /// Process the call normally (a send is delivered and recorded) but answer only after this
    /// delay — a client timeout then loses a delivered message's answer.
    Delay(Duration),
}

/// When a [`FaultRule`] fires, counted over the calls it matches after it was installed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// Only the nth matching call (1-based).
    Nth(u32),
    /// The next N matching calls.
    Next(u32),
    /// Every matching call.
    Always,
}

/// A scripted failure: which calls (method, chat) and when (nth / next N / always).
#[derive(Clone, Debug)]
pub struct FaultRule {
    fault: Fault,
    method: Option<String>,
    chat_id: Option<i64>,
    trigger: Trigger,
    seen: u32,
    fired: u32,
}

impl FaultRule {
    /// A rule answering the next matching call with `fault`. Without [`FaultRule::method`] it
    /// matches every method except `getUpdates`; without [`FaultRule::chat`], every chat (and
    /// calls without `chat_id`).
    pub fn new(fault: Fault) -> Self {
        Self {
            fault,
            method: None,
            chat_id: None,
            trigger: Trigger::Next(1),
            seen: 0,
            fired: 0,
        }
    }

    /// Only calls of this method (case-insensitive, e.g. `"sendDocument"`).
    pub fn method(mut self, method: &str) -> Self {
        self.method = Some(method.to_ascii_lowercase());
        self
    }

    /// Only calls whose `chat_id` is this id.
    pub fn chat(mut self, chat_id: i64) -> Self {
        self.chat_id = Some(chat_id);
        self
    }

    /// Fire on the nth matching call only (1-based).
    pub fn nth(mut self, n: u32) -> Self {
        self.trigger = Trigger::Nth(n.max(1));
        self
    }

    /// Fire on the next `n` matching calls.
    pub fn times(mut self, n: u32) -> Self {
        self.trigger = Trigger::Next(n);
        self
    }

    /// Fire on every matching call.
    pub fn always(mut self) -> Self {
        self.trigger = Trigger::Always;
        self
    }

    fn matches(&self, method_lc: &str, chat_id: Option<i64>) -> bool {
        // Without a method, a rule leaves getUpdates alone: background polling would otherwise
        // consume faults meant for sends.
        self.method
            .as_deref()
            .map_or(method_lc != "getupdates", |m| m == method_lc)
            && self.chat_id.is_none_or(|c| Some(c) == chat_id)
    }

    fn exhausted(&self) -> bool {
        match self.trigger {
            Trigger::Nth(n) => self.seen >= n,
            Trigger::Next(n) => self.fired >= n,
            Trigger::Always => false,
        }
    }
}

/// A forum topic's state (see [`FakeTelegram::set_topic`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopicState {
    /// Sends into it are delivered.
    Open,
    /// 400 `Bad Request: TOPIC_CLOSED`.
    Closed,
    /// 400 `Bad Request: message thread not found`.
    Deleted,
}

/// A persistent state of a chat, applied to every call carrying its `chat_id` until cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChatState {
    /// The user blocked the bot: 403 `Forbidden: bot was blocked by the user` on sends and
    /// chat actions.
    Blocked,
    /// Deleted account: 403 `Forbidden: user is deactivated`.
    Deactivated,
    /// The user never started the bot: 403 `Forbidden: bot can't initiate conversation with a
    /// user`.
    CantInitiate,
    /// The bot was kicked: 403 `Forbidden: bot was kicked from the {group|supergroup|channel}
    /// chat` (by the chat's type).
    Kicked,
    /// The bot is not a member: 403 `Forbidden: bot is not a member of the … chat`.
    NotMember,
    /// 403 `Forbidden: the group chat was deleted`.
    GroupDeleted,
    /// 400 `Bad Request: chat not found`.
    NotFound,
    /// The basic group was upgraded: 400 migrate error with `migrate_to_chat_id`.
    MigratedTo(i64),
    /// 400 `Bad Request: not enough rights to send {documents|photos|text messages} to the
    /// chat`.
    NoRights,
}

// ---------------------------------------------------------------------------------------------
// Users, chats, member statuses, contact cards (for update builders and answers)
// ---------------------------------------------------------------------------------------------

/// A Telegram user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TgUser {
    /// User id.
    pub id: i64,
    /// `is_bot`.
    pub is_bot: bool,
    /// `first_name`.
    pub first_name: String,
    /// `last_name`.
    pub last_name: Option<String>,
    /// `username`.
    pub username: Option<String>,
    /// `language_code`.
    pub language_code: Option<String>,
}

impl TgUser {
    /// A human user with this id and first name.
    pub fn new(id: i64, first_name: &str) -> Self {
        Self {
            id,
            is_bot: false,
            first_name: first_name.to_owned(),
            last_name: None,
            username: None,
            language_code: Some("en".to_owned()),
        }
    }

    /// Set `username`.
    pub fn with_username(mut self, username: &str) -> Self {
        self.username = Some(username.to_owned());
        self
    }

    /// Set `last_name`.
    pub fn with_last_name(mut self, last_name: &str) -> Self {
        self.last_name = Some(last_name.to_owned());
        self
    }

    /// `@GroupAnonymousBot`, the sender of service messages in supergroups.
    pub fn group_anonymous_bot() -> Self {
        Self {
            id: GROUP_ANONYMOUS_BOT_ID,
            is_bot: true,
            first_name: "Group".to_owned(),
            last_name: None,
            username: Some("GroupAnonymousBot".to_owned()),
            language_code: None,
        }
    }

    /// The Bot API `User` object.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("id".into(), json!(self.id));
        m.insert("is_bot".into(), json!(self.is_bot));
        m.insert("first_name".into(), json!(self.first_name));
        if let Some(v) = &self.last_name {
            m.insert("last_name".into(), json!(v));
        }
        if let Some(v) = &self.username {
            m.insert("username".into(), json!(v));
        }
        if let Some(v) = &self.language_code {
            m.insert("language_code".into(), json!(v));
        }
        Value::Object(m)
    }
}

/// `Chat.type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChatType {
    /// `private`.
    Private,
    /// `group` (basic group).
    Group,
    /// `supergroup`.
    Supergroup,
    /// `channel`.
    Channel,
}

/// A chat as it appears in messages and updates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TgChat {
    /// Chat id.
    pub id: i64,
    /// Type.
    pub kind: ChatType,
    /// `title` (groups, supergroups, channels).
    pub title: Option<String>,
    /// `first_name` (private chats).
    pub first_name: Option<String>,
    /// `last_name` (private chats).
    pub last_name: Option<String>,
    /// `username`.
    pub username: Option<String>,
}

impl TgChat {
    /// The private chat with `user` (same id).
    pub fn private(user: &TgUser) -> Self {
        Self {
            id: user.id,
            kind: ChatType::Private,
            title: None,
            first_name: Some(user.first_name.clone()),
            last_name: user.last_name.clone(),
            username: user.username.clone(),
        }
    }

    /// A basic group (`id` like `-987654321`).
    pub fn group(id: i64, title: &str) -> Self {
        Self::public(id, ChatType::Group, title)
    }

    /// A supergroup (`id` like `-1001987654321`).
    pub fn supergroup(id: i64, title: &str) -> Self {
        Self::public(id, ChatType::Supergroup, title)
    }

    /// A channel (`-100…`).
    pub fn channel(id: i64, title: &str) -> Self {
        Self::public(id, ChatType::Channel, title)
    }

    fn public(id: i64, kind: ChatType, title: &str) -> Self {
        Self {
            id,
            kind,
            title: Some(title.to_owned()),
            first_name: None,
            last_name: None,
            username: None,
        }
    }

    /// What the fake assumes for an id it has not seen: positive → private, `-100…` (below
    /// -1,000,000,000,000) → supergroup, other negative → basic group.
    pub fn derived(id: i64) -> Self {
        if id > 0 {
            Self {
                id,
                kind: ChatType::Private,
                title: None,
                first_name: Some("User".to_owned()),
                last_name: None,
                username: None,
            }
        } else if id <= -1_000_000_000_000 {
            Self::supergroup(id, &format!("Supergroup {}", -id))
        } else {
            Self::group(id, &format!("Group {}", -id))
        }
    }

    /// The Bot API `Chat` object.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("id".into(), json!(self.id));
        let t = match self.kind {
            ChatType::Private => "private",
            ChatType::Group => "group",
            ChatType::Supergroup => "supergroup",
            ChatType::Channel => "channel",
        };
        m.insert("type".into(), json!(t));
        if let Some(v) = &self.title {
            m.insert("title".into(), json!(v));
        }
        if let Some(v) = &self.username {
            m.insert("username".into(), json!(v));
        }
        if let Some(v) = &self.first_name {
            m.insert("first_name".into(), json!(v));
        }
        if let Some(v) = &self.last_name {
            m.insert("last_name".into(), json!(v));
        }
        Value::Object(m)
    }
}

/// Administrator rights of a `ChatMemberAdministrator` (every field the Bot API marks
/// required is always written, so teloxide 0.17 parses it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminRights {
    /// `can_be_edited`.
    pub can_be_edited: bool,
    /// `is_anonymous`.
    pub is_anonymous: bool,
    /// `can_manage_chat`.
    pub can_manage_chat: bool,
    /// `can_delete_messages`.
    pub can_delete_messages: bool,
    /// `can_manage_video_chats`.
    pub can_manage_video_chats: bool,
    /// `can_restrict_members`.
    pub can_restrict_members: bool,
    /// `can_promote_members`.
    pub can_promote_members: bool,
    /// `can_change_info`.
    pub can_change_info: bool,
    /// `can_invite_users`.
    pub can_invite_users: bool,
    /// `can_post_stories`.
    pub can_post_stories: bool,
    /// `can_edit_stories`.
    pub can_edit_stories: bool,
    /// `can_delete_stories`.
    pub can_delete_stories: bool,
    /// `can_pin_messages` (optional in the API; always written).
    pub can_pin_messages: bool,
    /// `can_manage_topics` (optional in the API; always written).
    pub can_manage_topics: bool,
    /// `custom_title`.
    pub custom_title: Option<String>,
}

impl Default for AdminRights {
    /// What a bot typically gets when a group owner promotes it with the default switches.
    fn default() -> Self {
        Self {
            can_be_edited: false,
            is_anonymous: false,
            can_manage_chat: true,
            can_delete_messages: true,
            can_manage_video_chats: true,
            can_restrict_members: true,
            can_promote_members: false,
            can_change_info: true,
            can_invite_users: true,
            can_post_stories: true,
            can_edit_stories: true,
            can_delete_stories: true,
            can_pin_messages: true,
            can_manage_topics: false,
            custom_title: None,
        }
    }
}

/// A `ChatMember` status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemberStatus {
    /// `creator`.
    Creator,
    /// `administrator` with these rights.
    Administrator(AdminRights),
    /// `member`.
    Member,
    /// `left`.
    Left,
    /// `kicked` (`until_date` 0 = forever; in private chats: the user blocked the bot).
    Kicked,
}

impl MemberStatus {
    /// The Bot API `ChatMember` object for `user` with this status.
    pub fn to_json(&self, user: &TgUser) -> Value {
        match self {
            MemberStatus::Creator => {
                json!({"user": user.to_json(), "status": "creator", "is_anonymous": false})
            }
            MemberStatus::Administrator(r) => {
                let mut v = json!({
                    "user": user.to_json(),
                    "status": "administrator",
                    "can_be_edited": r.can_be_edited,
                    "is_anonymous": r.is_anonymous,
                    "can_manage_chat": r.can_manage_chat,
                    "can_delete_messages": r.can_delete_messages,
                    "can_manage_video_chats": r.can_manage_video_chats,
                    "can_restrict_members": r.can_restrict_members,
                    "can_promote_members": r.can_promote_members,
                    "can_change_info": r.can_change_info,
                    "can_invite_users": r.can_invite_users,
                    "can_post_stories": r.can_post_stories,
                    "can_edit_stories": r.can_edit_stories,
                    "can_delete_stories": r.can_delete_stories,
                    "can_pin_messages": r.can_pin_messages,
                    "can_manage_topics": r.can_manage_topics,
                });
                if let Some(t) = &r.custom_title {
                    v["custom_title"] = json!(t);
                }
                v
            }
            MemberStatus::Member => json!({"user": user.to_json(), "status": "member"}),
            MemberStatus::Left => json!({"user": user.to_json(), "status": "left"}),
            MemberStatus::Kicked => {
                json!({"user": user.to_json(), "status": "kicked", "until_date": 0})
            }
        }
    }
}

/// A shared contact card (`Message.contact`), possibly forwarded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContactCard {
    /// `phone_number` (Telegram usually sends digits without `+`).
    pub phone_number: String,
    /// `first_name`.
    pub first_name: String,
    /// `last_name`.
    pub last_name: Option<String>,
    /// `user_id` of the card's owner, if a Telegram user.
    pub user_id: Option<i64>,
    /// `vcard`.
    pub vcard: Option<String>,
    /// When set, the message carries `forward_origin` of type `user` with this sender.
    pub forwarded_from: Option<TgUser>,
}

impl ContactCard {
    /// The user's own card, as the "share phone" button sends it.
    pub fn own(user: &TgUser, phone_number: &str) -> Self {
        Self {
            phone_number: phone_number.to_owned(),
            first_name: user.first_name.clone(),
            last_name: user.last_name.clone(),
            user_id: Some(user.id),
            vcard: None,
            forwarded_from: None,
        }
    }

    /// Somebody else's card (any user can share any contact).
    pub fn other(phone_number: &str, first_name: &str, user_id: Option<i64>) -> Self {
        Self {
            phone_number: phone_number.to_owned(),
            first_name: first_name.to_owned(),
            last_name: None,
            user_id,
            vcard: None,
            forwarded_from: None,
        }
    }

    /// Mark the message as forwarded from `sender`.
    pub fn forwarded_from(mut self, sender: &TgUser) -> Self {
        self.forwarded_from = Some(sender.clone());
        self
    }
}

// ---------------------------------------------------------------------------------------------
// The fake server handle
// ---------------------------------------------------------------------------------------------

/// A running fake Bot API server on `127.0.0.1:<random port>`. Dropping it (or
/// [`FakeTelegram::shutdown`]) stops it.
pub struct FakeTelegram {
    inner: Arc<Inner>,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
}

struct Inner {
    token: String,
    state: Mutex<State>,
    changes: watch::Sender<u64>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn notify(&self) {
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
    }
}

impl FakeTelegram {
    /// Start with [`FakeConfig::default`] for the bot `token`.
    pub async fn start(token: &str) -> Self {
        Self::start_with(token, FakeConfig::default()).await
    }

    /// Start with an explicit configuration.
    pub async fn start_with(token: &str, config: FakeConfig) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake Telegram server");
        let addr = listener.local_addr().expect("local address");
        let (changes, _) = watch::channel(0u64);
        let inner = Arc::new(Inner {
            token: token.to_owned(),
            state: Mutex::new(State::new(token, config)),
            changes,
        });
        let app = Router::new()
            .fallback(entry)
            .layer(DefaultBodyLimit::disable())
            .with_state(inner.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
        });
        Self {
            inner,
            addr,
            stop: Some(stop),
            server: Some(server),
        }
    }

    /// Base URL for teloxide: `Bot::new(token).set_api_url(fake.api_url())`; teloxide appends
    /// `bot<token>/<Method>`.
    pub fn api_url(&self) -> reqwest::Url {
        reqwest::Url::parse(&format!("http://{}/", self.addr)).expect("valid URL")
    }

    /// The full URL of `method` for raw HTTP tests (e.g. with reqwest).
    pub fn method_url(&self, method: &str) -> String {
        format!("http://{}/bot{}/{}", self.addr, self.inner.token, method)
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The token the fake accepts.
    pub fn token(&self) -> &str {
        &self.inner.token
    }

    /// A `teloxide::Bot` for this fake's token pointed at this fake.
    pub fn bot(&self) -> teloxide::Bot {
        teloxide::Bot::new(self.inner.token.clone()).set_api_url(self.api_url())
    }

    /// The bot's own user (as `getMe` reports it).
    pub fn bot_user(&self) -> TgUser {
        self.inner.lock().bot.clone()
    }

    /// Stop the server: wakes pending long polls, stops accepting, waits (≤ 5 s) for it to
    /// finish.
    pub async fn shutdown(mut self) {
        self.begin_shutdown();
        if let Some(server) = self.server.take() {
            let abort = server.abort_handle();
            if tokio::time::timeout(Duration::from_secs(5), server)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }

    fn begin_shutdown(&mut self) {
        self.inner.lock().shutdown = true;
        self.inner.notify();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    // ----- configuration at run time --------------------------------------------------------

    /// Replace the strict flood-control limits (`None` disables them).
    pub fn set_rate_limits(&self, limits: Option<RateLimits>) {
        let mut st = self.inner.lock();
        st.rate = limits.clone().map(FloodControl::new);
        st.config.rate_limits = limits;
    }

    /// Change [`FakeConfig::answer_delay`].
    pub fn set_answer_delay(&self, delay: Duration) {
        self.inner.lock().config.answer_delay = delay;
    }

    /// Change [`FakeConfig::max_upload_bytes`].
    pub fn set_max_upload_bytes(&self, bytes: usize) {
        self.inner.lock().config.max_upload_bytes = bytes;
    }

    /// Change [`FakeConfig::strict_html`].
    pub fn set_strict_html(&self, strict: bool) {
        self.inner.lock().config.strict_html = strict;
    }

    /// Pretend a webhook is set (getUpdates then answers 409 until `deleteWebhook`).
    pub fn set_webhook_url(&self, url: &str) {
        self.inner.lock().webhook_url = url.to_owned();
    }

    /// The webhook URL currently set ("" when none).
    pub fn webhook_url(&self) -> String {
        self.inner.lock().webhook_url.clone()
    }

    /// Register a chat (its type and title are then used in answers; needed with
    /// [`FakeConfig::strict_chats`]).
    pub fn add_chat(&self, chat: TgChat) {
        self.inner.lock().chats.insert(chat.id, chat);
    }

    // ----- failure injection and chat states --------------------------------------------------

    /// Install a scripted failure.
    pub fn inject(&self, rule: FaultRule) {
        self.inner.lock().faults.push(rule);
    }

    /// Shorthand: answer the next call of `method` with `fault`.
    pub fn fail_next(&self, method: &str, fault: Fault) {
        self.inject(FaultRule::new(fault).method(method));
    }

    /// Remove every scripted failure.
    pub fn clear_faults(&self) {
        self.inner.lock().faults.clear();
    }

    /// Scripted failures that can still fire.
    pub fn pending_faults(&self) -> usize {
        self.inner.lock().faults.len()
    }

    /// Create (or reopen) forum topic `message_thread_id` in `chat_id`: sends carrying it are
    /// delivered into it (`message_thread_id` and `is_topic_message` in the returned message).
    pub fn add_topic(&self, chat_id: i64, message_thread_id: i64) {
        self.set_topic(chat_id, message_thread_id, TopicState::Open);
    }

    /// Set a forum topic's state: closed topics answer `Bad Request: TOPIC_CLOSED`, deleted
    /// ones `Bad Request: message thread not found` (as does a thread id never added).
    pub fn set_topic(&self, chat_id: i64, message_thread_id: i64, state: TopicState) {
        self.inner
            .lock()
            .topics
            .insert((chat_id, message_thread_id), state);
    }

    /// Put a chat in a persistent state.
    pub fn set_chat_state(&self, chat_id: i64, state: ChatState) {
        self.inner.lock().chat_states.insert(chat_id, state);
    }

    /// Clear a chat's persistent state.
    pub fn clear_chat_state(&self, chat_id: i64) {
        self.inner.lock().chat_states.remove(&chat_id);
    }

    /// A chat's persistent state.
    pub fn chat_state(&self, chat_id: i64) -> Option<ChatState> {
        self.inner.lock().chat_states.get(&chat_id).copied()
    }

    /// Mark a private chat as "user blocked the bot".
    pub fn block_chat(&self, chat_id: i64) {
        self.set_chat_state(chat_id, ChatState::Blocked);
    }

    /// Mark a basic group as upgraded to `to` (every call to it answers the migrate error).
    pub fn migrate_chat(&self, from: i64, to: i64) {
        self.set_chat_state(from, ChatState::MigratedTo(to));
    }

    // ----- recorded calls ---------------------------------------------------------------------

    /// Every recorded call, in arrival order.
    pub fn calls(&self) -> Vec<Call> {
        self.inner.lock().calls.clone()
    }

    /// Forget the recorded calls (files, chat states, faults and updates are kept).
    pub fn clear_calls(&self) {
        self.inner.lock().calls.clear();
    }

    /// Recorded calls of one method (canonical name, case-insensitive).
    pub fn calls_of(&self, method: &str) -> Vec<Call> {
        self.inner
            .lock()
            .calls
            .iter()
            .filter(|c| c.method.eq_ignore_ascii_case(method))
            .cloned()
            .collect()
    }

    /// Successful message-producing calls to `chat_id`.
    pub fn sends_to(&self, chat_id: i64) -> Vec<Call> {
        self.inner
            .lock()
            .calls
            .iter()
            .filter(|c| c.is_send() && c.is_ok() && c.chat_id == Some(chat_id))
            .cloned()
            .collect()
    }

    /// From the first to the last arrival ([`Call::received_at`]) of the successful sends to
    /// `chats`; zero with fewer than two.
    pub fn ok_send_span(&self, chats: &[i64]) -> Duration {
        let st = self.inner.lock();
        let times: Vec<Instant> = st
            .calls
            .iter()
            .filter(|c| c.is_send() && c.is_ok() && c.chat_id.is_some_and(|id| chats.contains(&id)))
            .map(|c| c.received_at)
            .collect();
        match (times.iter().min(), times.iter().max()) {
            (Some(first), Some(last)) => *last - *first,
            _ => Duration::ZERO,
        }
    }

    /// Successful `sendMessage` calls to `chat_id` (the bot's replies, with `reply_markup`).
    pub fn replies_to(&self, chat_id: i64) -> Vec<Call> {
        self.sends_to(chat_id)
            .into_iter()
            .filter(|c| c.method == "sendMessage")
            .collect()
    }

    /// Every Message the fake delivered (the `result` objects), in order.
    pub fn delivered_messages(&self) -> Vec<Value> {
        self.inner.lock().delivered.clone()
    }

    /// Counters over the recorded calls.
    pub fn stats(&self) -> Stats {
        let st = self.inner.lock();
        let mut s = Stats {
            calls: st.calls.len(),
            rate_violations: st.violations.len(),
            ..Stats::default()
        };
        for c in &st.calls {
            if c.is_ok() {
                s.ok_calls += 1;
                s.messages_delivered += c.delivered_messages();
                for f in &c.files {
                    if f.is_upload() {
                        s.uploads += 1;
                    } else {
                        s.file_id_sends += 1;
                    }
                }
            } else if c.outcome != Outcome::Pending {
                s.failed_calls += 1;
            }
        }
        s
    }

    /// Flood-control violations seen in strict-limits mode.
    pub fn rate_violations(&self) -> Vec<RateViolation> {
        self.inner.lock().violations.clone()
    }

    /// Commands last stored by `setMyCommands` for the default scope and no language.
    pub fn commands(&self) -> Value {
        self.inner
            .lock()
            .commands
            .get(&(String::new(), String::new()))
            .cloned()
            .unwrap_or_else(|| json!([]))
    }

    /// Wait until `pred(calls)` holds (re-checked on every recorded call, update and poll), or
    /// fail after `timeout`. Returns the calls at that moment. Never sleeps blindly.
    pub async fn wait_for<F>(
        &self,
        mut pred: F,
        timeout: Duration,
    ) -> Result<Vec<Call>, WaitTimeout>
    where
        F: FnMut(&[Call]) -> bool,
    {
        self.wait_state(|st| pred(&st.calls), timeout).await
    }

    /// Wait until `pred` holds for the server state (evaluated under the state lock).
    async fn wait_state<F>(&self, mut pred: F, timeout: Duration) -> Result<Vec<Call>, WaitTimeout>
    where
        F: FnMut(&State) -> bool,
    {
        let deadline = Instant::now() + timeout;
        let mut rx = self.inner.changes.subscribe();
        loop {
            rx.borrow_and_update();
            {
                let st = self.inner.lock();
                if pred(&st) {
                    return Ok(st.calls.clone());
                }
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                let st = self.inner.lock();
                if pred(&st) {
                    return Ok(st.calls.clone());
                }
                return Err(WaitTimeout {
                    waited: timeout,
                    calls: st.calls.iter().map(summarize_call).collect(),
                });
            }
        }
    }

    /// Wait until at least `n` calls of `method` have been answered (any outcome).
    pub async fn wait_for_calls(
        &self,
        method: &str,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<Call>, WaitTimeout> {
        let calls = self
            .wait_for(
                |calls| {
                    calls
                        .iter()
                        .filter(|c| {
                            c.method.eq_ignore_ascii_case(method) && c.outcome != Outcome::Pending
                        })
                        .count()
                        >= n
                },
                timeout,
            )
            .await?;
        Ok(calls
            .into_iter()
            .filter(|c| c.method.eq_ignore_ascii_case(method))
            .collect())
    }

    /// Wait until a getUpdates call with timeout > 0 is waiting (a long poll is parked).
    pub async fn wait_for_long_poll(&self, timeout: Duration) -> Result<(), WaitTimeout> {
        self.wait_for(
            |calls| {
                calls.iter().any(|c| {
                    c.method == "getUpdates"
                        && c.outcome == Outcome::Pending
                        && c.params
                            .get("timeout")
                            .and_then(|t| t.parse::<i64>().ok())
                            .is_some_and(|t| t > 0)
                })
            },
            timeout,
        )
        .await
        .map(|_| ())
    }

    /// Wait until the bot has confirmed `update_id` (a getUpdates with a higher offset).
    pub async fn wait_update_confirmed(
        &self,
        update_id: i64,
        timeout: Duration,
    ) -> Result<(), WaitTimeout> {
        self.wait_state(|st| st.confirmed_offset > update_id, timeout)
            .await
            .map(|_| ())
    }

    // ----- updates ----------------------------------------------------------------------------

    /// Queue a raw update; `update_id` is assigned when missing. Returns the update_id. An
    /// update whose kind is excluded by the current (sticky) `allowed_updates` is dropped, as
    /// the real server does at arrival (see [`FakeTelegram::dropped_updates`]).
    pub fn push_update(&self, update: Value) -> i64 {
        let id = self.inner.lock().push_update(update);
        self.inner.notify();
        id
    }

    /// Updates dropped by the `allowed_updates` filter.
    pub fn dropped_updates(&self) -> Vec<Value> {
        self.inner.lock().dropped_updates.clone()
    }

    /// Updates not yet confirmed by the bot.
    pub fn pending_updates(&self) -> Vec<Value> {
        self.inner.lock().updates.iter().cloned().collect()
    }

    /// The sticky `allowed_updates` (`None` = the default set).
    pub fn allowed_updates(&self) -> Option<Vec<String>> {
        self.inner.lock().allowed_updates.clone()
    }

    /// Push a `message` update in `chat` from `from` with extra message fields (an object
    /// merged into the message: `text`, `contact`, …). `message_id` and `date` are filled in.
    pub fn push_message(&self, chat: &TgChat, from: Option<&TgUser>, fields: Value) -> i64 {
        let id = {
            let mut st = self.inner.lock();
            let message = st.incoming_message(chat, from, fields);
            st.push_update(json!({ "message": message }))
        };
        self.inner.notify();
        id
    }

    /// A text message in `chat` from `from`.
    pub fn push_text(&self, chat: &TgChat, from: &TgUser, text: &str) -> i64 {
        self.push_message(chat, Some(from), json!({ "text": text }))
    }

    /// A command message (`/start`, `/help@bot`, …) with its `bot_command` entity.
    pub fn push_command(&self, chat: &TgChat, from: &TgUser, command: &str) -> i64 {
        let cmd_len = command.split_whitespace().next().unwrap_or("");
        let len = utf16_len(cmd_len);
        self.push_message(
            chat,
            Some(from),
            json!({
                "text": command,
                "entities": [{"offset": 0, "length": len, "type": "bot_command"}],
            }),
        )
    }

    /// `/start` in the private chat with `user`.
    pub fn push_start(&self, user: &TgUser) -> i64 {
        self.push_command(&TgChat::private(user), user, "/start")
    }

    /// A contact message in the private chat with `from` (the "share phone" button, or a
    /// shared/forwarded card).
    pub fn push_contact(&self, from: &TgUser, card: ContactCard) -> i64 {
        let mut contact = Map::new();
        contact.insert("phone_number".into(), json!(card.phone_number));
        contact.insert("first_name".into(), json!(card.first_name));
        if let Some(v) = &card.last_name {
            contact.insert("last_name".into(), json!(v));
        }
        if let Some(v) = card.user_id {
            contact.insert("user_id".into(), json!(v));
        }
        if let Some(v) = &card.vcard {
            contact.insert("vcard".into(), json!(v));
        }
        let mut fields = json!({ "contact": Value::Object(contact) });
        if let Some(sender) = &card.forwarded_from {
            fields["forward_origin"] = json!({
                "type": "user",
                "sender_user": sender.to_json(),
                "date": unix_now() - 3600,
            });
        }
        self.push_message(&TgChat::private(from), Some(from), fields)
    }

    /// A `my_chat_member` update: the bot's status in `chat` changed from `old` to `new`,
    /// done by `from`.
    pub fn push_my_chat_member(
        &self,
        chat: &TgChat,
        from: &TgUser,
        old: MemberStatus,
        new: MemberStatus,
    ) -> i64 {
        let id = {
            let mut st = self.inner.lock();
            st.chats.entry(chat.id).or_insert_with(|| chat.clone());
            let bot = st.bot.clone();
            let update = json!({
                "my_chat_member": {
                    "chat": chat.to_json(),
                    "from": from.to_json(),
                    "date": unix_now(),
                    "old_chat_member": old.to_json(&bot),
                    "new_chat_member": new.to_json(&bot),
                }
            });
            st.push_update(update)
        };
        self.inner.notify();
        id
    }

    /// The user blocked the bot (private `my_chat_member`: member → kicked).
    pub fn push_bot_blocked(&self, user: &TgUser) -> i64 {
        self.push_my_chat_member(
            &TgChat::private(user),
            user,
            MemberStatus::Member,
            MemberStatus::Kicked,
        )
    }

    /// The user unblocked the bot (private `my_chat_member`: kicked → member).
    pub fn push_bot_unblocked(&self, user: &TgUser) -> i64 {
        self.push_my_chat_member(
            &TgChat::private(user),
            user,
            MemberStatus::Kicked,
            MemberStatus::Member,
        )
    }

    /// The bot was added to a group as a plain member (left → member).
    pub fn push_bot_added(&self, chat: &TgChat, by: &TgUser) -> i64 {
        self.push_my_chat_member(chat, by, MemberStatus::Left, MemberStatus::Member)
    }

    /// The bot was promoted to administrator (member → administrator, default rights).
    pub fn push_bot_promoted(&self, chat: &TgChat, by: &TgUser) -> i64 {
        self.push_my_chat_member(
            chat,
            by,
            MemberStatus::Member,
            MemberStatus::Administrator(AdminRights::default()),
        )
    }

    /// The bot was added directly as administrator (left → administrator).
    pub fn push_bot_added_as_admin(&self, chat: &TgChat, by: &TgUser) -> i64 {
        self.push_my_chat_member(
            chat,
            by,
            MemberStatus::Left,
            MemberStatus::Administrator(AdminRights::default()),
        )
    }

    /// The bot left / was removed (member → left).
    pub fn push_bot_left(&self, chat: &TgChat, by: &TgUser) -> i64 {
        self.push_my_chat_member(chat, by, MemberStatus::Member, MemberStatus::Left)
    }

    /// The bot was banned from a group (member → kicked).
    pub fn push_bot_kicked(&self, chat: &TgChat, by: &TgUser) -> i64 {
        self.push_my_chat_member(chat, by, MemberStatus::Member, MemberStatus::Kicked)
    }

    /// A `new_chat_members` service message in `chat`.
    pub fn push_new_chat_members(&self, chat: &TgChat, by: &TgUser, members: &[TgUser]) -> i64 {
        let members: Vec<Value> = members.iter().map(TgUser::to_json).collect();
        self.push_message(chat, Some(by), json!({ "new_chat_members": members }))
    }

    /// A basic group → supergroup migration, as the bot sees it: a service message with
    /// `migrate_to_chat_id` in the old group (from `by`), then one with `migrate_from_chat_id`
    /// in the new supergroup (from `@GroupAnonymousBot`, `sender_chat` = the supergroup). The
    /// old id is marked [`ChatState::MigratedTo`] and the supergroup registered. Returns both
    /// update ids.
    pub fn push_migration(&self, old_group: &TgChat, new_id: i64, by: &TgUser) -> (i64, i64) {
        let title = old_group.title.clone().unwrap_or_default();
        let supergroup = TgChat::supergroup(new_id, &title);
        let first = self.push_message(old_group, Some(by), json!({ "migrate_to_chat_id": new_id }));
        let second = self.push_message(
            &supergroup,
            Some(&TgUser::group_anonymous_bot()),
            json!({ "migrate_from_chat_id": old_group.id, "sender_chat": supergroup.to_json() }),
        );
        self.add_chat(supergroup);
        self.migrate_chat(old_group.id, new_id);
        (first, second)
    }
}

impl Drop for FakeTelegram {
    fn drop(&mut self) {
        self.begin_shutdown();
    }
}

fn summarize_call(c: &Call) -> String {
    let outcome = match &c.outcome {
        Outcome::Pending => "pending".to_owned(),
        Outcome::Ok(_) => "ok".to_owned(),
        Outcome::Error {
            code, description, ..
        } => format!("{code} {description}"),
        Outcome::Html { status } => format!("{status} html"),
        Outcome::ConnectionClosed => "connection closed".to_owned(),
    };
    format!(
        "#{} {} chat={:?} files={} -> {}",
        c.seq,
        c.method,
        c.chat_id,
        c.files.len(),
        outcome
    )
}

// ---------------------------------------------------------------------------------------------
// Server state
// ---------------------------------------------------------------------------------------------

struct StoredFile {
    kind: FileKind,
    bytes: Bytes,
    sha256: String,
    file_name: Option<String>,
    /// The `document` object, or the `photo` array.
    media: Value,
    /// The document id, or the largest photo size's id.
    primary_id: String,
    primary_unique_id: String,
}

struct State {
    config: FakeConfig,
    bot: TgUser,
    calls: Vec<Call>,
    next_seq: u64,
    faults: Vec<FaultRule>,
    chat_states: HashMap<i64, ChatState>,
    topics: HashMap<(i64, i64), TopicState>,
    chats: HashMap<i64, TgChat>,
    files: HashMap<String, Arc<StoredFile>>,
    next_message_id: HashMap<i64, i64>,
    media_group_seq: u64,
    updates: VecDeque<Value>,
    next_update_id: i64,
    confirmed_offset: i64,
    dropped_updates: Vec<Value>,
    allowed_updates: Option<Vec<String>>,
    poll_generation: u64,
    webhook_url: String,
    commands: HashMap<(String, String), Value>,
    rate: Option<FloodControl>,
    violations: Vec<RateViolation>,
    delivered: Vec<Value>,
    shutdown: bool,
}

impl State {
    fn new(token: &str, config: FakeConfig) -> Self {
        let bot_id = token
            .split(':')
            .next()
            .and_then(|p| p.parse::<i64>().ok())
            .unwrap_or(7_012_345_678);
        let bot = TgUser {
            id: bot_id,
            is_bot: true,
            first_name: config.bot.first_name.clone(),
            last_name: None,
            username: Some(config.bot.username.clone()),
            language_code: None,
        };
        let rate = config.rate_limits.clone().map(FloodControl::new);
        Self {
            config,
            bot,
            calls: Vec::new(),
            next_seq: 0,
            faults: Vec::new(),
            chat_states: HashMap::new(),
            topics: HashMap::new(),
            chats: HashMap::new(),
            files: HashMap::new(),
            next_message_id: HashMap::new(),
            media_group_seq: 0,
            updates: VecDeque::new(),
            next_update_id: 845_000_001,
            confirmed_offset: 0,
            dropped_updates: Vec::new(),
            allowed_updates: None,
            poll_generation: 0,
            webhook_url: String::new(),
            commands: HashMap::new(),
            rate,
            violations: Vec::new(),
            delivered: Vec::new(),
            shutdown: false,
        }
    }

    /// Store a call; returns its `seq`.
    fn record(&mut self, mut call: Call) -> u64 {
        self.next_seq += 1;
        call.seq = self.next_seq;
        self.calls.push(call);
        self.next_seq
    }

    fn take_fault(&mut self, method_lc: &str, chat_id: Option<i64>) -> Option<Fault> {
        let mut chosen = None;
        for rule in self.faults.iter_mut() {
            if !rule.matches(method_lc, chat_id) {
                continue;
            }
            rule.seen += 1;
            let fires = match rule.trigger {
                Trigger::Nth(n) => rule.seen == n,
                Trigger::Next(n) => rule.fired < n,
                Trigger::Always => true,
            };
            if fires && chosen.is_none() {
                rule.fired += 1;
                chosen = Some(rule.fault.clone());
            }
        }
        self.faults.retain(|r| !r.exhausted());
        chosen
    }

    fn alloc_message_id(&mut self, chat_id: i64) -> i64 {
        let next = self.next_message_id.entry(chat_id).or_insert(101);
        let id = *next;
        *next += 1;
        id
    }

    fn incoming_message(&mut self, chat: &TgChat, from: Option<&TgUser>, fields: Value) -> Value {
        self.chats.entry(chat.id).or_insert_with(|| chat.clone());
        let mut m = Map::new();
        m.insert("message_id".into(), json!(self.alloc_message_id(chat.id)));
        if let Some(u) = from {
            m.insert("from".into(), u.to_json());
        }
        m.insert("chat".into(), chat.to_json());
        m.insert("date".into(), json!(unix_now()));
        if let Value::Object(extra) = fields {
            for (k, v) in extra {
                m.insert(k, v);
            }
        }
        Value::Object(m)
    }

    fn push_update(&mut self, update: Value) -> i64 {
        let mut update = match update {
            Value::Object(m) => m,
            other => {
                let mut m = Map::new();
                m.insert("invalid".into(), other);
                m
            }
        };
        let id = match update.get("update_id").and_then(Value::as_i64) {
            Some(id) => {
                self.next_update_id = self.next_update_id.max(id + 1);
                id
            }
            None => {
                let id = self.next_update_id;
                self.next_update_id += 1;
                update.insert("update_id".into(), json!(id));
                id
            }
        };
        let kind = update
            .keys()
            .find(|k| k.as_str() != "update_id")
            .cloned()
            .unwrap_or_default();
        let update = Value::Object(update);
        if self.update_allowed(&kind) {
            self.updates.push_back(update);
        } else {
            self.dropped_updates.push(update);
        }
        id
    }

    fn update_allowed(&self, kind: &str) -> bool {
        match &self.allowed_updates {
            Some(list) => list.iter().any(|k| k == kind),
            None => !NOT_DEFAULT_UPDATES.contains(&kind),
        }
    }

    fn bot_json(&self) -> Value {
        self.bot.to_json()
    }

    fn new_message(&mut self, chat: &TgChat) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("message_id".into(), json!(self.alloc_message_id(chat.id)));
        if chat.kind == ChatType::Channel {
            m.insert("sender_chat".into(), chat.to_json());
        } else {
            m.insert("from".into(), self.bot_json());
        }
        m.insert("chat".into(), chat.to_json());
        m.insert("date".into(), json!(unix_now()));
        m
    }

    fn deliver(&mut self, message: Map<String, Value>) -> Value {
        let v = Value::Object(message);
        self.delivered.push(v.clone());
        v
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP entry point
// ---------------------------------------------------------------------------------------------

struct Upload {
    file_name: String,
    bytes: Bytes,
}

struct Ctx {
    method: &'static str,
    path_method: String,
    http_method: String,
    content_type: Option<String>,
    params: BTreeMap<String, String>,
    files: HashMap<String, Upload>,
    received_at: Instant,
}

impl Ctx {
    fn param(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }

    fn chat_id(&self) -> Option<i64> {
        self.param("chat_id").and_then(|c| c.trim().parse().ok())
    }

    fn method_lc(&self) -> String {
        self.method.to_ascii_lowercase()
    }

    fn new_call(&self) -> Call {
        Call {
            seq: 0,
            method: self.method.to_owned(),
            path_method: self.path_method.clone(),
            http_method: self.http_method.clone(),
            content_type: self.content_type.clone(),
            params: self.params.clone(),
            chat_id: self.chat_id(),
            text: self.param("text").map(str::to_owned),
            caption: self.param("caption").map(str::to_owned),
            parse_mode: self.param("parse_mode").map(str::to_owned),
            reply_markup: self
                .param("reply_markup")
                .and_then(|m| serde_json::from_str(m).ok()),
            files: Vec::new(),
            received_at: self.received_at,
            outcome: Outcome::Pending,
            fault: None,
        }
    }
}

/// A JSON error as the server words it.
#[derive(Clone, Debug)]
struct ApiErr {
    code: u16,
    description: String,
    parameters: Option<Value>,
}

impl ApiErr {
    fn new(code: u16, description: impl Into<String>) -> Self {
        Self {
            code,
            description: description.into(),
            parameters: None,
        }
    }

    fn bad(description: impl Into<String>) -> Self {
        Self::new(400, description)
    }

    fn retry_after(seconds: u32) -> Self {
        Self {
            code: 429,
            description: format!("Too Many Requests: retry after {seconds}"),
            parameters: Some(json!({ "retry_after": seconds })),
        }
    }

    fn migrate(to: i64) -> Self {
        Self {
            code: 400,
            description: desc::MIGRATED.to_owned(),
            parameters: Some(json!({ "migrate_to_chat_id": to })),
        }
    }
}

enum Answer {
    Ok {
        result: Value,
        description: Option<String>,
    },
    Err(ApiErr),
    Html {
        status: u16,
        body: &'static str,
    },
    Close,
}

impl Answer {
    fn ok(result: Value) -> Self {
        Answer::Ok {
            result,
            description: None,
        }
    }

    fn outcome(&self) -> Outcome {
        match self {
            Answer::Ok { result, .. } => Outcome::Ok(result.clone()),
            Answer::Err(e) => Outcome::Error {
                code: e.code,
                description: e.description.clone(),
                parameters: e.parameters.clone(),
            },
            Answer::Html { status, .. } => Outcome::Html { status: *status },
            Answer::Close => Outcome::ConnectionClosed,
        }
    }

    fn into_response(self) -> Response {
        match self {
            Answer::Ok {
                result,
                description,
            } => {
                let mut body = format!(r#"{{"ok":true,"result":{result}"#);
                if let Some(d) = description {
                    body.push_str(r#","description":"#);
                    body.push_str(&Value::String(d).to_string());
                }
                body.push('}');
                json_response(200, body)
            }
            Answer::Err(e) => error_response(&e),
            Answer::Html { status, body } => {
                let mut resp = Response::new(Body::from(body));
                *resp.status_mut() =
                    StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
                resp.headers_mut()
                    .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
                resp
            }
            Answer::Close => {
                // Abort this connection's task without running the panic hook: hyper drops the
                // socket and the client sees the connection closed without a response.
                std::panic::resume_unwind(Box::new("fake Telegram: connection closed"))
            }
        }
    }
}

fn json_response(status: u16, body: String) -> Response {
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// `{"ok":false,"error_code":…,"description":…[,"parameters":…]}` in the server's key order.
fn error_response(e: &ApiErr) -> Response {
    let mut body = format!(
        r#"{{"ok":false,"error_code":{},"description":{}"#,
        e.code,
        Value::String(e.description.clone())
    );
    if let Some(p) = &e.parameters {
        body.push_str(r#","parameters":"#);
        body.push_str(&p.to_string());
    }
    body.push('}');
    let mut resp = json_response(e.code, body);
    if let Some(seconds) = e
        .parameters
        .as_ref()
        .and_then(|p| p.get("retry_after"))
        .and_then(Value::as_u64)
    {
        resp.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from_str(&seconds.to_string()).expect("digits"),
        );
    }
    resp
}

async fn entry(AxumState(inner): AxumState<Arc<Inner>>, req: Request) -> Response {
    let received_at = Instant::now();
    let path = percent_decode(req.uri().path());
    let Some(rest) = path.strip_prefix("/bot") else {
        return error_response(&ApiErr::new(404, desc::NOT_FOUND));
    };
    let Some((token, method)) = rest.split_once('/') else {
        return error_response(&ApiErr::new(404, desc::NOT_FOUND));
    };
    if token != inner.token {
        return error_response(&ApiErr::new(401, desc::UNAUTHORIZED));
    }
    if method.is_empty() || method.contains('/') {
        return error_response(&ApiErr::new(404, desc::NOT_FOUND));
    }
    let Some(canonical) = METHODS
        .iter()
        .copied()
        .find(|m| m.eq_ignore_ascii_case(method))
    else {
        return error_response(&ApiErr::new(404, desc::METHOD_NOT_FOUND));
    };
    let path_method = method.to_owned();
    let http_method = req.method().as_str().to_owned();
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
    let (params, files) = match read_params(req, content_type.as_deref()).await {
        Ok(x) => x,
        Err(e) => return error_response(&ApiErr::bad(format!("Bad Request: {e}"))),
    };
    let ctx = Ctx {
        method: canonical,
        path_method,
        http_method,
        content_type,
        params,
        files,
        received_at,
    };
    let answer = dispatch(&inner, ctx).await;
    answer.into_response()
}

async fn dispatch(inner: &Arc<Inner>, ctx: Ctx) -> Answer {
    let method_lc = ctx.method_lc();
    let (fault, answer_delay) = {
        let mut st = inner.lock();
        let delay = if is_send_method(ctx.method) {
            st.config.answer_delay
        } else {
            Duration::ZERO
        };
        (st.take_fault(&method_lc, ctx.chat_id()), delay)
    };
    let delay = match fault {
        Some(Fault::Delay(d)) => Some(d),
        Some(fault) => {
            let answer = fault_answer(&fault);
            {
                let mut st = inner.lock();
                let mut call = ctx.new_call();
                call.files = st.collect_files(&ctx);
                call.outcome = answer.outcome();
                call.fault = Some(fault);
                st.record(call);
            }
            inner.notify();
            pause(answer_delay).await;
            return answer;
        }
        None => None,
    };
    let answer = if ctx.method == "getUpdates" {
        get_updates(inner, &ctx, delay).await
    } else {
        let answer = {
            let mut st = inner.lock();
            let mut call = ctx.new_call();
            call.files = st.collect_files(&ctx);
            call.fault = delay.map(Fault::Delay);
            let answer = st.process(&ctx, &mut call);
            call.outcome = answer.outcome();
            st.record(call);
            answer
        };
        inner.notify();
        answer
    };
    // Recorded first: a client that stops waiting (or dies) does not undo the delivery.
    pause(delay.unwrap_or(answer_delay)).await;
    answer
}

/// Sleeps `d`; zero returns at once (a zero `tokio::time::sleep` waits for the next timer tick).
async fn pause(d: Duration) {
    if !d.is_zero() {
        tokio::time::sleep(d).await;
    }
}

fn fault_answer(fault: &Fault) -> Answer {
    let err = |code: u16, d: &str| Answer::Err(ApiErr::new(code, d));
    match fault {
        Fault::RetryAfter(n) => Answer::Err(ApiErr::retry_after(*n)),
        Fault::MigrateTo(id) => Answer::Err(ApiErr::migrate(*id)),
        Fault::BotBlocked => err(403, desc::BOT_BLOCKED),
        Fault::KickedFromGroup => err(403, desc::KICKED_FROM_GROUP),
        Fault::KickedFromSupergroup => err(403, desc::KICKED_FROM_SUPERGROUP),
        Fault::NotMemberOfSupergroup => err(403, desc::NOT_MEMBER_SUPERGROUP),
        Fault::ChatNotFound => err(400, desc::CHAT_NOT_FOUND),
        Fault::NotEnoughRightsDocuments => err(400, desc::NO_RIGHTS_DOCUMENTS),
        Fault::Api { code, description } => err(*code, description),
        Fault::InternalServerError => err(500, desc::INTERNAL),
        Fault::BadGatewayHtml => Answer::Html {
            status: 502,
            body: NGINX_502,
        },
        Fault::CloseConnection => Answer::Close,
        Fault::Delay(_) => Answer::ok(Value::Bool(true)),
    }
}

async fn read_params(
    req: Request,
    content_type: Option<&str>,
) -> Result<(BTreeMap<String, String>, HashMap<String, Upload>), String> {
    let mut params = BTreeMap::new();
    let mut files = HashMap::new();
    if let Some(q) = req.uri().query() {
        for (k, v) in url::form_urlencoded::parse(q.as_bytes()) {
            params.insert(k.into_owned(), v.into_owned());
        }
    }
    match content_type {
        Some("multipart/form-data") => {
            let mut mp = Multipart::from_request(req, &())
                .await
                .map_err(|e| e.body_text())?;
            while let Some(field) = mp.next_field().await.map_err(|e| e.body_text())? {
                let name = field.name().unwrap_or("").to_owned();
                let file_name = field.file_name().map(str::to_owned);
                let data = field.bytes().await.map_err(|e| e.body_text())?;
                match file_name {
                    Some(file_name) => {
                        files.insert(
                            name,
                            Upload {
                                file_name,
                                bytes: data,
                            },
                        );
                    }
                    None => {
                        params.insert(name, String::from_utf8_lossy(&data).into_owned());
                    }
                }
            }
        }
        Some("application/json") => {
            let body = axum::body::to_bytes(req.into_body(), usize::MAX)
                .await
                .map_err(|e| e.to_string())?;
            if !body.is_empty() {
                let v: Value = serde_json::from_slice(&body)
                    .map_err(|_| "can't parse JSON encoded request".to_owned())?;
                if let Value::Object(m) = v {
                    for (k, v) in m {
                        match v {
                            Value::Null => {}
                            Value::String(s) => {
                                params.insert(k, s);
                            }
                            other => {
                                params.insert(k, other.to_string());
                            }
                        }
                    }
                }
            }
        }
        Some("application/x-www-form-urlencoded") => {
            let body = axum::body::to_bytes(req.into_body(), usize::MAX)
                .await
                .map_err(|e| e.to_string())?;
            for (k, v) in url::form_urlencoded::parse(&body) {
                params.insert(k.into_owned(), v.into_owned());
            }
        }
        _ => {}
    }
    Ok((params, files))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
            if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

// ---------------------------------------------------------------------------------------------
// getUpdates (long polling)
// ---------------------------------------------------------------------------------------------

async fn get_updates(inner: &Arc<Inner>, ctx: &Ctx, fault_delay: Option<Duration>) -> Answer {
    let mut rx = inner.changes.subscribe();
    let (seq, generation, limit, deadline) = {
        let mut st = inner.lock();
        let mut call = ctx.new_call();
        call.fault = fault_delay.map(Fault::Delay);
        if !st.webhook_url.is_empty() {
            let answer = Answer::Err(ApiErr::new(409, desc::CONFLICT_WEBHOOK));
            call.outcome = answer.outcome();
            st.record(call);
            drop(st);
            inner.notify();
            return answer;
        }
        if let Some(raw) = ctx.param("allowed_updates")
            && let Ok(Value::Array(list)) = serde_json::from_str::<Value>(raw)
        {
            let list: Vec<String> = list
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect();
            st.allowed_updates = if list.is_empty() { None } else { Some(list) };
        }
        let offset = ctx
            .param("offset")
            .and_then(|v| v.trim().parse::<i64>().ok())
            .unwrap_or(0);
        if offset > 0 {
            st.updates
                .retain(|u| u["update_id"].as_i64().unwrap_or(0) >= offset);
            st.confirmed_offset = st.confirmed_offset.max(offset);
        } else if offset < 0 {
            let keep = offset.unsigned_abs() as usize;
            while st.updates.len() > keep {
                let dropped = st.updates.pop_front();
                if let Some(id) = dropped.and_then(|u| u["update_id"].as_i64()) {
                    st.confirmed_offset = st.confirmed_offset.max(id + 1);
                }
            }
        }
        let limit = ctx
            .param("limit")
            .and_then(|v| v.trim().parse::<i64>().ok())
            .filter(|l| (1..=100).contains(l))
            .unwrap_or(100) as usize;
        let timeout = ctx
            .param("timeout")
            .and_then(|v| v.trim().parse::<i64>().ok())
            .unwrap_or(0)
            .clamp(0, 50) as u64;
        st.poll_generation += 1;
        let generation = st.poll_generation;
        let seq = st.record(call);
        (
            seq,
            generation,
            limit,
            ctx.received_at + Duration::from_secs(timeout),
        )
    };
    inner.notify();
    loop {
        rx.borrow_and_update();
        {
            let mut st = inner.lock();
            let answer = if st.poll_generation != generation {
                Some(Answer::Err(ApiErr::new(409, desc::CONFLICT_GET_UPDATES)))
            } else if !st.updates.is_empty() || st.shutdown || Instant::now() >= deadline {
                let batch: Vec<Value> = st.updates.iter().take(limit).cloned().collect();
                Some(Answer::ok(Value::Array(batch)))
            } else {
                None
            };
            if let Some(answer) = answer {
                if let Some(call) = st.calls.iter_mut().rev().find(|c| c.seq == seq) {
                    call.outcome = answer.outcome();
                }
                drop(st);
                inner.notify();
                return answer;
            }
        }
        let _ = tokio::time::timeout_at(deadline, rx.changed()).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Method processing (synchronous, under the state lock)
// ---------------------------------------------------------------------------------------------

/// What a send is about, for rights errors.
#[derive(Clone, Copy)]
enum Content {
    Text,
    Photos,
    Documents,
    Action,
}

/// A file of a send, after the Bot API server parsed the request.
struct Item {
    field: String,
    kind: FileKind,
    source: ItemSource,
    caption: Option<String>,
    parse_mode: Option<String>,
    formatted: Option<ParsedHtml>,
}

enum ItemSource {
    Upload { part: String },
    FileId(String),
}

/// A file after TDLib resolved it.
struct Loaded {
    existing: Option<Arc<StoredFile>>,
    bytes: Bytes,
    file_name: Option<String>,
    dims: Option<(u32, u32)>,
}

impl State {
    fn process(&mut self, ctx: &Ctx, call: &mut Call) -> Answer {
        let r = match ctx.method {
            "getMe" => Ok(self.get_me()),
            "logOut" | "close" => Ok(Value::Bool(true)),
            "getWebhookInfo" => Ok(json!({
                "url": self.webhook_url,
                "has_custom_certificate": false,
                "pending_update_count": self.updates.len(),
            })),
            "setWebhook" => return self.set_webhook(ctx),
            "deleteWebhook" => return self.delete_webhook(ctx),
            "sendMessage" => self.send_message(ctx, call),
            "sendPhoto" => self.send_single(ctx, call, FileKind::Photo),
            "sendDocument" => self.send_single(ctx, call, FileKind::Document),
            "sendMediaGroup" => self.send_media_group(ctx, call),
            "sendChatAction" => self.send_chat_action(ctx),
            "getChat" => self.get_chat(ctx),
            "setMyCommands" => self.set_my_commands(ctx),
            "getMyCommands" => Ok(self
                .commands
                .get(&commands_key(ctx))
                .cloned()
                .unwrap_or_else(|| json!([]))),
            "deleteMyCommands" => {
                self.commands.remove(&commands_key(ctx));
                Ok(Value::Bool(true))
            }
            _ => Err(ApiErr::new(404, desc::METHOD_NOT_FOUND)),
        };
        match r {
            Ok(v) => Answer::ok(v),
            Err(e) => Answer::Err(e),
        }
    }

    fn get_me(&self) -> Value {
        json!({
            "id": self.bot.id,
            "is_bot": true,
            "first_name": self.bot.first_name,
            "username": self.bot.username,
            "can_join_groups": self.config.bot.can_join_groups,
            "can_read_all_group_messages": self.config.bot.can_read_all_group_messages,
            "supports_inline_queries": false,
            "can_connect_to_business": false,
            "has_main_web_app": false,
        })
    }

    fn set_webhook(&mut self, ctx: &Ctx) -> Answer {
        let url = ctx.param("url").unwrap_or("").trim().to_owned();
        if url.is_empty() {
            return self.delete_webhook(ctx);
        }
        if !url.starts_with("https://") {
            return Answer::Err(ApiErr::bad(
                "Bad Request: bad webhook: An HTTPS URL must be provided for webhook",
            ));
        }
        let description = if self.webhook_url == url {
            "Webhook is already set"
        } else {
            "Webhook was set"
        };
        self.webhook_url = url;
        Answer::Ok {
            result: Value::Bool(true),
            description: Some(description.to_owned()),
        }
    }

    fn delete_webhook(&mut self, ctx: &Ctx) -> Answer {
        if ctx.param("drop_pending_updates").is_some_and(param_true) {
            if let Some(last) = self.updates.back().and_then(|u| u["update_id"].as_i64()) {
                self.confirmed_offset = self.confirmed_offset.max(last + 1);
            }
            self.updates.clear();
        }
        let description = if self.webhook_url.is_empty() {
            "Webhook is already deleted"
        } else {
            "Webhook was deleted"
        };
        self.webhook_url.clear();
        Answer::Ok {
            result: Value::Bool(true),
            description: Some(description.to_owned()),
        }
    }

    /// Resolve `chat_id` and apply the access checks the Bot API server does before sending.
    fn check_chat(&self, ctx: &Ctx) -> Result<TgChat, ApiErr> {
        let raw = ctx.param("chat_id").unwrap_or("").trim();
        if raw.is_empty() {
            return Err(ApiErr::bad(desc::CHAT_ID_EMPTY));
        }
        let chat = self.resolve_chat(raw)?;
        let text = |group: &str, supergroup: &str, channel: &str| match chat.kind {
            ChatType::Group => group.to_owned(),
            ChatType::Supergroup => supergroup.to_owned(),
            ChatType::Channel => channel.to_owned(),
            ChatType::Private => desc::CANT_INITIATE.to_owned(),
        };
        match self.chat_states.get(&chat.id) {
            Some(ChatState::NotFound) => Err(ApiErr::bad(desc::CHAT_NOT_FOUND)),
            Some(ChatState::MigratedTo(to)) => Err(ApiErr::migrate(*to)),
            Some(ChatState::Kicked) if chat.kind == ChatType::Private => {
                Err(ApiErr::new(403, desc::BOT_BLOCKED))
            }
            Some(ChatState::Kicked) => Err(ApiErr::new(
                403,
                text(
                    desc::KICKED_FROM_GROUP,
                    desc::KICKED_FROM_SUPERGROUP,
                    desc::KICKED_FROM_CHANNEL,
                ),
            )),
            Some(ChatState::NotMember) => Err(ApiErr::new(
                403,
                text(
                    desc::NOT_MEMBER_GROUP,
                    desc::NOT_MEMBER_SUPERGROUP,
                    desc::NOT_MEMBER_CHANNEL,
                ),
            )),
            Some(ChatState::GroupDeleted) => Err(ApiErr::new(403, desc::GROUP_DELETED)),
            _ => Ok(chat),
        }
    }

    fn resolve_chat(&self, raw: &str) -> Result<TgChat, ApiErr> {
        if let Ok(id) = raw.parse::<i64>() {
            if id == 0 {
                return Err(ApiErr::bad(desc::CHAT_NOT_FOUND));
            }
            if let Some(chat) = self.chats.get(&id) {
                return Ok(chat.clone());
            }
            if self.config.strict_chats {
                return Err(ApiErr::bad(desc::CHAT_NOT_FOUND));
            }
            return Ok(TgChat::derived(id));
        }
        if let Some(name) = raw.strip_prefix('@') {
            let found = self.chats.values().find(|c| {
                c.username
                    .as_deref()
                    .is_some_and(|u| u.eq_ignore_ascii_case(name))
            });
            if let Some(chat) = found {
                return Ok(chat.clone());
            }
        }
        Err(ApiErr::bad(desc::CHAT_NOT_FOUND))
    }

    /// Checks at send time (TDLib rights, then Telegram's servers: blocked, deactivated…).
    fn check_send(&self, chat: &TgChat, content: Content) -> Result<(), ApiErr> {
        match self.chat_states.get(&chat.id) {
            Some(ChatState::NoRights) => match content {
                Content::Text => Err(ApiErr::bad(desc::NO_RIGHTS_TEXT)),
                Content::Photos => Err(ApiErr::bad(desc::NO_RIGHTS_PHOTOS)),
                Content::Documents => Err(ApiErr::bad(desc::NO_RIGHTS_DOCUMENTS)),
                Content::Action => Ok(()),
            },
            Some(ChatState::Blocked) => Err(ApiErr::new(403, desc::BOT_BLOCKED)),
            Some(ChatState::Deactivated) => Err(ApiErr::new(403, desc::USER_DEACTIVATED)),
            Some(ChatState::CantInitiate) => Err(ApiErr::new(403, desc::CANT_INITIATE)),
            _ => Ok(()),
        }
    }

    /// `message_thread_id`, when the call has one: the open topic it names, or the error
    /// Telegram answers for a closed, deleted or unknown topic.
    fn check_thread(&self, ctx: &Ctx, chat: &TgChat) -> Result<Option<i64>, ApiErr> {
        let Some(raw) = ctx
            .param("message_thread_id")
            .map(str::trim)
            .filter(|t| !t.is_empty())
        else {
            return Ok(None);
        };
        let thread = raw.parse::<i64>().ok();
        match thread.and_then(|t| self.topics.get(&(chat.id, t))) {
            Some(TopicState::Open) => Ok(thread),
            Some(TopicState::Closed) => Err(ApiErr::bad(desc::TOPIC_CLOSED)),
            Some(TopicState::Deleted) | None => Err(ApiErr::bad(desc::THREAD_NOT_FOUND)),
        }
    }

    /// Strict flood control: count `messages` (one request) at the moment the request arrived,
    /// or answer 429.
    fn check_rate(&mut self, ctx: &Ctx, chat_id: i64, messages: u32) -> Result<(), ApiErr> {
        let Some(rate) = self.rate.as_mut() else {
            return Ok(());
        };
        let at = ctx.received_at;
        match rate.check(chat_id, messages, at) {
            Ok(()) => Ok(()),
            Err((scope, wait)) => {
                let retry_after = (wait.as_secs_f64().ceil() as u32).max(1);
                self.violations.push(RateViolation {
                    at,
                    method: ctx.method.to_owned(),
                    chat_id,
                    messages,
                    scope,
                    retry_after,
                });
                Err(ApiErr::retry_after(retry_after))
            }
        }
    }

    fn format(&self, text: &str, parse_mode: Option<&str>) -> Result<ParsedHtml, ApiErr> {
        match parse_mode.map(str::to_ascii_lowercase).as_deref() {
            None | Some("") | Some("markdown") | Some("markdownv2") => Ok(ParsedHtml {
                text: text.to_owned(),
                entities: Vec::new(),
            }),
            Some("html") => parse_html(text, self.config.strict_html)
                .map_err(|d| ApiErr::bad(format!("{}{d}", desc::CANT_PARSE_ENTITIES))),
            Some(_) => Err(ApiErr::bad(desc::UNSUPPORTED_PARSE_MODE)),
        }
    }

    fn check_upload_size(&self, ctx: &Ctx) -> Result<(), ApiErr> {
        let total: usize = ctx.files.values().map(|u| u.bytes.len()).sum();
        if total > self.config.max_upload_bytes {
            return Err(ApiErr::new(413, desc::ENTITY_TOO_LARGE));
        }
        Ok(())
    }

    fn send_message(&mut self, ctx: &Ctx, _call: &mut Call) -> Result<Value, ApiErr> {
        let text = ctx.param("text").unwrap_or("");
        let formatted = self.format(text, ctx.param("parse_mode"))?;
        if formatted.text.trim().is_empty() {
            return Err(ApiErr::bad(desc::TEXT_EMPTY));
        }
        let markup = parse_reply_markup(ctx)?;
        let chat = self.check_chat(ctx)?;
        if utf16_len(&formatted.text) > MAX_TEXT_LEN {
            return Err(ApiErr::bad(desc::MESSAGE_TOO_LONG));
        }
        self.check_send(&chat, Content::Text)?;
        let thread = self.check_thread(ctx, &chat)?;
        self.check_rate(ctx, chat.id, 1)?;
        let mut msg = self.new_message(&chat);
        mark_options(&mut msg, ctx, thread);
        msg.insert("text".into(), json!(formatted.text));
        if !formatted.entities.is_empty() {
            msg.insert("entities".into(), Value::Array(formatted.entities));
        }
        if let Some(m) = markup.filter(|m| m.get("inline_keyboard").is_some()) {
            msg.insert("reply_markup".into(), m);
        }
        Ok(self.deliver(msg))
    }

    fn send_chat_action(&mut self, ctx: &Ctx) -> Result<Value, ApiErr> {
        let action = ctx.param("action").unwrap_or("");
        let chat = self.check_chat(ctx)?;
        if !CHAT_ACTIONS.contains(&action) {
            return Err(ApiErr::bad(desc::WRONG_ACTION));
        }
        self.check_send(&chat, Content::Action)?;
        Ok(Value::Bool(true))
    }

    fn get_chat(&mut self, ctx: &Ctx) -> Result<Value, ApiErr> {
        let chat = self.check_chat(ctx)?;
        let mut v = chat.to_json();
        v["accent_color_id"] = json!(chat.id.rem_euclid(7));
        v["max_reaction_count"] = json!(11);
        v["accepted_gift_types"] = json!({
            "unlimited_gifts": false,
            "limited_gifts": false,
            "unique_gifts": false,
            "premium_subscription": false,
        });
        Ok(v)
    }

    fn set_my_commands(&mut self, ctx: &Ctx) -> Result<Value, ApiErr> {
        let raw = ctx
            .param("commands")
            .ok_or_else(|| ApiErr::bad("Bad Request: parameter \"commands\" is required"))?;
        let Ok(Value::Array(list)) = serde_json::from_str::<Value>(raw) else {
            return Err(ApiErr::bad("Bad Request: can't parse commands JSON object"));
        };
        for c in &list {
            let command = c["command"].as_str().unwrap_or("");
            let description = c["description"].as_str().unwrap_or("");
            let command = command.strip_prefix('/').unwrap_or(command);
            let valid = !command.is_empty()
                && command.len() <= 32
                && command
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            if !valid {
                return Err(ApiErr::bad("Bad Request: BOT_COMMAND_INVALID"));
            }
            if description.trim().is_empty() || description.chars().count() > 256 {
                return Err(ApiErr::bad("Bad Request: BOT_COMMAND_DESCRIPTION_INVALID"));
            }
        }
        self.commands.insert(commands_key(ctx), Value::Array(list));
        Ok(Value::Bool(true))
    }

    /// The files of a call, resolved without validation (for the record).
    fn collect_files(&self, ctx: &Ctx) -> Vec<SentFile> {
        let mut out = Vec::new();
        let mut push = |field: String, kind, value: Option<&str>, caption, parse_mode| {
            let (source, upload) = match value.filter(|v| !v.is_empty()) {
                Some(v) => match v.strip_prefix("attach://") {
                    Some(part) => (
                        FileSource::Upload {
                            part: part.to_owned(),
                        },
                        ctx.files.get(part),
                    ),
                    None => (FileSource::FileId(v.to_owned()), None),
                },
                None => (
                    FileSource::Upload {
                        part: field.clone(),
                    },
                    ctx.files.get(&field),
                ),
            };
            let (bytes, file_name) = match (&source, upload) {
                (_, Some(u)) => (Some(u.bytes.clone()), Some(u.file_name.clone())),
                (FileSource::FileId(id), None) => match self.files.get(id) {
                    Some(f) => (Some(f.bytes.clone()), f.file_name.clone()),
                    None => (None, None),
                },
                _ => (None, None),
            };
            if matches!(source, FileSource::Upload { .. }) && bytes.is_none() {
                return;
            }
            out.push(SentFile {
                field,
                kind,
                source,
                file_name,
                sha256: bytes.as_ref().map(|b| sha256_hex(b)),
                bytes,
                caption,
                parse_mode,
                file_id: None,
                file_unique_id: None,
            });
        };
        let caption = ctx.param("caption").map(str::to_owned);
        let parse_mode = ctx.param("parse_mode").map(str::to_owned);
        match ctx.method {
            "sendDocument" => push(
                "document".into(),
                FileKind::Document,
                ctx.param("document"),
                caption,
                parse_mode,
            ),
            "sendPhoto" => push(
                "photo".into(),
                FileKind::Photo,
                ctx.param("photo"),
                caption,
                parse_mode,
            ),
            "sendMediaGroup" => {
                if let Some(Ok(Value::Array(items))) =
                    ctx.param("media").map(serde_json::from_str::<Value>)
                {
                    for (k, item) in items.iter().enumerate() {
                        let kind = match item["type"].as_str() {
                            Some("photo") => FileKind::Photo,
                            _ => FileKind::Document,
                        };
                        let media = item["media"].as_str().unwrap_or("");
                        push(
                            format!("media[{k}]"),
                            kind,
                            Some(media).filter(|m| !m.is_empty()),
                            item["caption"].as_str().map(str::to_owned),
                            item["parse_mode"].as_str().map(str::to_owned),
                        );
                    }
                }
            }
            _ => {}
        }
        out
    }

    /// The Bot API server's own parsing of a file parameter.
    /// `fallback_part`: the part used when the value is empty (the parameter's own name for
    /// `sendDocument`/`sendPhoto`; none for album items).
    fn parse_item(
        &self,
        ctx: &Ctx,
        fallback_part: Option<&str>,
        value: Option<&str>,
        missing: &str,
    ) -> Result<ItemSource, ApiErr> {
        match value.filter(|v| !v.is_empty()) {
            Some(v) => match v.strip_prefix("attach://") {
                Some(part) if ctx.files.contains_key(part) => Ok(ItemSource::Upload {
                    part: part.to_owned(),
                }),
                Some(_) => Err(ApiErr::bad(missing)),
                None => Ok(ItemSource::FileId(v.to_owned())),
            },
            None => match fallback_part.filter(|p| ctx.files.contains_key(*p)) {
                Some(part) => Ok(ItemSource::Upload {
                    part: part.to_owned(),
                }),
                None => Err(ApiErr::bad(missing)),
            },
        }
    }

    /// TDLib's resolution of a file: known file_id of the right type, non-empty upload, photo
    /// size limit.
    fn load(&self, ctx: &Ctx, item: &Item) -> Result<Loaded, ApiErr> {
        match &item.source {
            ItemSource::FileId(id) => {
                let stored = self
                    .files
                    .get(id)
                    .cloned()
                    .ok_or_else(|| ApiErr::bad(desc::WRONG_FILE_ID))?;
                if stored.kind != item.kind {
                    return Err(ApiErr::bad(format!(
                        "Bad Request: can't use file of type {} as {}",
                        stored.kind.tdlib_name(),
                        item.kind.tdlib_name()
                    )));
                }
                Ok(Loaded {
                    bytes: stored.bytes.clone(),
                    file_name: stored.file_name.clone(),
                    existing: Some(stored),
                    dims: None,
                })
            }
            ItemSource::Upload { part } => {
                let upload = &ctx.files[part];
                if upload.bytes.is_empty() {
                    return Err(ApiErr::bad(desc::FILE_EMPTY));
                }
                if item.kind == FileKind::Photo && upload.bytes.len() > self.config.max_photo_bytes
                {
                    return Err(ApiErr::bad(format!(
                        "Bad Request: file of size {} bytes is too big for a photo; the maximum size is {} bytes",
                        upload.bytes.len(),
                        self.config.max_photo_bytes
                    )));
                }
                Ok(Loaded {
                    existing: None,
                    bytes: upload.bytes.clone(),
                    file_name: Some(upload.file_name.clone()),
                    dims: None,
                })
            }
        }
    }

    /// What Telegram's servers check on a new photo: a readable image with valid geometry.
    /// Returns the TDLib error code (`PHOTO_INVALID_DIMENSIONS`, `IMAGE_PROCESS_FAILED`).
    fn check_photo(loaded: &mut Loaded) -> Result<(), &'static str> {
        if loaded.existing.is_some() {
            return Ok(());
        }
        let (w, h) = image_dimensions(&loaded.bytes).ok_or("IMAGE_PROCESS_FAILED")?;
        let (long, short) = (w.max(h) as u64, w.min(h) as u64);
        if short == 0 || w as u64 + h as u64 > 10_000 || long > 20 * short {
            return Err("PHOTO_INVALID_DIMENSIONS");
        }
        loaded.dims = Some((w, h));
        Ok(())
    }

    /// Store a delivered file (or reuse the known one); returns it.
    fn materialize(&mut self, kind: FileKind, loaded: Loaded) -> Arc<StoredFile> {
        if let Some(existing) = loaded.existing {
            return existing;
        }
        let sha = sha256_hex(&loaded.bytes);
        let size = loaded.bytes.len();
        let stored = match kind {
            FileKind::Document => {
                let id = new_file_id(FileKind::Document);
                let unique = unique_id("AgAD", &format!("document:{sha}"));
                let mut doc = Map::new();
                doc.insert("file_id".into(), json!(id));
                doc.insert("file_unique_id".into(), json!(unique));
                if let Some(name) = loaded.file_name.as_ref().filter(|n| !n.is_empty()) {
                    doc.insert("file_name".into(), json!(name));
                }
                doc.insert(
                    "mime_type".into(),
                    json!(mime_for(loaded.file_name.as_deref().unwrap_or(""))),
                );
                doc.insert("file_size".into(), json!(size));
                StoredFile {
                    kind,
                    bytes: loaded.bytes,
                    sha256: sha,
                    file_name: loaded.file_name,
                    media: Value::Object(doc),
                    primary_id: id,
                    primary_unique_id: unique,
                }
            }
            FileKind::Photo => {
                let (w, h) = loaded.dims.unwrap_or((1, 1));
                let sizes: Vec<Value> = photo_sizes(w, h, size)
                    .into_iter()
                    .map(|(sw, sh, bytes)| {
                        json!({
                            "file_id": new_file_id(FileKind::Photo),
                            "file_unique_id": unique_id("AQAD", &format!("photo:{sw}x{sh}:{sha}")),
                            "file_size": bytes,
                            "width": sw,
                            "height": sh,
                        })
                    })
                    .collect();
                let last = sizes.last().cloned().unwrap_or(Value::Null);
                StoredFile {
                    kind,
                    bytes: loaded.bytes,
                    sha256: sha,
                    file_name: loaded.file_name,
                    primary_id: last["file_id"].as_str().unwrap_or_default().to_owned(),
                    primary_unique_id: last["file_unique_id"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                    media: Value::Array(sizes),
                }
            }
        };
        let stored = Arc::new(stored);
        match &stored.media {
            Value::Array(sizes) => {
                for s in sizes {
                    if let Some(id) = s["file_id"].as_str() {
                        self.files.insert(id.to_owned(), stored.clone());
                    }
                }
            }
            _ => {
                self.files.insert(stored.primary_id.clone(), stored.clone());
            }
        }
        stored
    }

    /// A parsed file of a send, its caption parsed as `parse_mode` says (the Bot API server does
    /// that before looking at the chat).
    fn item(
        &self,
        field: String,
        kind: FileKind,
        source: ItemSource,
        caption: Option<&str>,
        parse_mode: Option<&str>,
    ) -> Result<Item, ApiErr> {
        let formatted = caption.map(|c| self.format(c, parse_mode)).transpose()?;
        Ok(Item {
            field,
            kind,
            source,
            caption: caption.map(str::to_owned),
            parse_mode: parse_mode.map(str::to_owned),
            formatted,
        })
    }

    fn send_single(&mut self, ctx: &Ctx, call: &mut Call, kind: FileKind) -> Result<Value, ApiErr> {
        self.check_upload_size(ctx)?;
        let (field, missing, content) = match kind {
            FileKind::Document => ("document", desc::NO_DOCUMENT, Content::Documents),
            FileKind::Photo => ("photo", desc::NO_PHOTO, Content::Photos),
        };
        // 1. What the Bot API server parses itself.
        let source = self.parse_item(ctx, Some(field), ctx.param(field), missing)?;
        let item = self.item(
            field.to_owned(),
            kind,
            source,
            ctx.param("caption"),
            ctx.param("parse_mode"),
        )?;
        let markup = parse_reply_markup(ctx)?;
        // 2. The chat.
        let chat = self.check_chat(ctx)?;
        // 3. TDLib.
        let mut loaded = self.load(ctx, &item)?;
        check_caption_len(&item)?;
        self.check_send(&chat, content)?;
        let thread = self.check_thread(ctx, &chat)?;
        // 4. Telegram's servers.
        if kind == FileKind::Photo {
            Self::check_photo(&mut loaded)
                .map_err(|code| ApiErr::bad(format!("Bad Request: {code}")))?;
        }
        self.check_rate(ctx, chat.id, 1)?;
        // 5. Deliver.
        let stored = self.materialize(kind, loaded);
        let mut msg = self.new_message(&chat);
        mark_options(&mut msg, ctx, thread);
        insert_media(&mut msg, &stored, &item);
        if let Some(m) = markup.filter(|m| m.get("inline_keyboard").is_some()) {
            msg.insert("reply_markup".into(), m);
        }
        set_file_ids(call, 0, &stored);
        Ok(self.deliver(msg))
    }

    fn send_media_group(&mut self, ctx: &Ctx, call: &mut Call) -> Result<Value, ApiErr> {
        self.check_upload_size(ctx)?;
        // 1. What the Bot API server parses itself.
        let raw = ctx
            .param("media")
            .ok_or_else(|| ApiErr::bad("Bad Request: parameter \"media\" is required"))?;
        let parsed: Value = serde_json::from_str(raw).map_err(|_| ApiErr::bad(desc::MEDIA_JSON))?;
        let list = match parsed {
            Value::Null => Vec::new(),
            Value::Array(a) => a,
            _ => return Err(ApiErr::bad(desc::MEDIA_NOT_ARRAY)),
        };
        if list.is_empty() {
            return Err(ApiErr::bad(desc::ALBUM_EMPTY));
        }
        if list.len() > 10 {
            return Err(ApiErr::bad(desc::ALBUM_TOO_MANY));
        }
        let mut items = Vec::with_capacity(list.len());
        for (k, media) in list.iter().enumerate() {
            let Some(obj) = media.as_object() else {
                return Err(ApiErr::bad(
                    "Bad Request: can't parse InputMedia: expected an Object",
                ));
            };
            let typ = obj.get("type").and_then(Value::as_str).unwrap_or("");
            let kind = match typ {
                "photo" => FileKind::Photo,
                "document" => FileKind::Document,
                "animation" => {
                    return Err(ApiErr::bad(
                        "Bad Request: can't parse InputMedia: type \"animation\" can't be used in sendMediaGroup",
                    ));
                }
                "video" | "audio" => {
                    return Err(ApiErr::bad(format!(
                        "Bad Request: can't parse InputMedia: type \"{typ}\" is not supported by the fake server"
                    )));
                }
                other => {
                    return Err(ApiErr::bad(format!(
                        "Bad Request: can't parse InputMedia: type \"{other}\" is unsupported"
                    )));
                }
            };
            let field = format!("media[{k}]");
            let source = self.parse_item(
                ctx,
                None,
                obj.get("media").and_then(Value::as_str),
                desc::MEDIA_NOT_FOUND,
            )?;
            let text = |key: &str| obj.get(key).and_then(Value::as_str);
            items.push(self.item(field, kind, source, text("caption"), text("parse_mode"))?);
        }
        // 2. The chat.
        let chat = self.check_chat(ctx)?;
        // 3. TDLib: every item's file first, then captions, then the album's composition.
        let mut loaded = Vec::with_capacity(items.len());
        for item in &items {
            loaded.push(self.load(ctx, item)?);
        }
        for item in &items {
            check_caption_len(item)?;
        }
        let has_documents = items.iter().any(|i| i.kind == FileKind::Document);
        if has_documents && items.iter().any(|i| i.kind != FileKind::Document) {
            return Err(ApiErr::bad(desc::ALBUM_DOCUMENT_MIXED));
        }
        let content = if has_documents {
            Content::Documents
        } else {
            Content::Photos
        };
        self.check_send(&chat, content)?;
        let thread = self.check_thread(ctx, &chat)?;
        // 4. Telegram's servers: per item, reported with the item's 1-based position.
        for (k, (item, l)) in items.iter().zip(loaded.iter_mut()).enumerate() {
            if item.kind == FileKind::Photo
                && let Err(code) = Self::check_photo(l)
            {
                return Err(ApiErr::bad(format!(
                    "Bad Request: failed to send message #{} with the error message \"{code}\"",
                    k + 1
                )));
            }
        }
        self.check_rate(ctx, chat.id, items.len() as u32)?;
        // 5. Deliver.
        let group_id = (items.len() > 1).then(|| {
            self.media_group_seq += 1;
            (13_900_000_000_000_000u64 + self.media_group_seq * 7919).to_string()
        });
        let mut messages = Vec::with_capacity(items.len());
        for (k, (item, l)) in items.iter().zip(loaded).enumerate() {
            let stored = self.materialize(item.kind, l);
            let mut msg = self.new_message(&chat);
            mark_options(&mut msg, ctx, thread);
            if let Some(g) = &group_id {
                msg.insert("media_group_id".into(), json!(g));
            }
            insert_media(&mut msg, &stored, item);
            set_file_ids(call, k, &stored);
            messages.push(self.deliver(msg));
        }
        Ok(Value::Array(messages))
    }
}

fn commands_key(ctx: &Ctx) -> (String, String) {
    let scope = ctx
        .param("scope")
        .and_then(|s| serde_json::from_str::<Value>(s).ok())
        .filter(|s| s["type"] != "default")
        .map(|s| s.to_string())
        .unwrap_or_default();
    (scope, ctx.param("language_code").unwrap_or("").to_owned())
}

/// The fields a sent message carries for its send's options: `message_thread_id` and
/// `is_topic_message` in a topic, `has_protected_content` for `protect_content`.
fn mark_options(msg: &mut Map<String, Value>, ctx: &Ctx, thread: Option<i64>) {
    if let Some(thread) = thread {
        msg.insert("message_thread_id".into(), json!(thread));
        msg.insert("is_topic_message".into(), json!(true));
    }
    if ctx.param("protect_content").is_some_and(param_true) {
        msg.insert("has_protected_content".into(), json!(true));
    }
}

fn param_true(v: &str) -> bool {
    matches!(v.trim().to_ascii_lowercase().as_str(), "true" | "1")
}

fn parse_reply_markup(ctx: &Ctx) -> Result<Option<Value>, ApiErr> {
    match ctx.param("reply_markup").filter(|m| !m.trim().is_empty()) {
        None => Ok(None),
        Some(raw) => match serde_json::from_str::<Value>(raw) {
            Ok(v @ Value::Object(_)) => Ok(Some(v)),
            _ => Err(ApiErr::bad(desc::REPLY_MARKUP_JSON)),
        },
    }
}

fn check_caption_len(item: &Item) -> Result<(), ApiErr> {
    if let Some(f) = &item.formatted
        && utf16_len(&f.text) > MAX_CAPTION_LEN
    {
        return Err(ApiErr::bad(desc::CAPTION_TOO_LONG));
    }
    Ok(())
}

fn insert_media(msg: &mut Map<String, Value>, stored: &StoredFile, item: &Item) {
    let key = match stored.kind {
        FileKind::Photo => "photo",
        FileKind::Document => "document",
    };
    msg.insert(key.into(), stored.media.clone());
    if let Some(f) = item.formatted.as_ref().filter(|f| !f.text.is_empty()) {
        msg.insert("caption".into(), json!(f.text));
        if !f.entities.is_empty() {
            msg.insert("caption_entities".into(), Value::Array(f.entities.clone()));
        }
    }
}

fn set_file_ids(call: &mut Call, index: usize, stored: &StoredFile) {
    if let Some(f) = call.files.get_mut(index) {
        f.file_id = Some(stored.primary_id.clone());
        f.file_unique_id = Some(stored.primary_unique_id.clone());
    }
}

fn is_send_method(method: &str) -> bool {
    matches!(
        method,
        "sendMessage" | "sendPhoto" | "sendDocument" | "sendMediaGroup"
    )
}

// ---------------------------------------------------------------------------------------------
// Flood control
// ---------------------------------------------------------------------------------------------

/// The strict-limits mode's bookkeeping: the accepted sends, `(received_at, messages)`, per
/// chat, per group and overall, checked against [`RateLimits`] over every sliding window. The
/// fake runs one per server; it is public so that tests can check the windows with chosen
/// instants.
pub struct FloodControl {
    limits: RateLimits,
    chats: HashMap<i64, Window>,
    groups: HashMap<i64, Window>,
    global: Window,
}

impl FloodControl {
    /// Nothing sent yet.
    pub fn new(limits: RateLimits) -> Self {
        Self {
            limits,
            chats: HashMap::new(),
            groups: HashMap::new(),
            global: Window::default(),
        }
    }

    /// One request of `n` messages (an album of N: N) to `chat_id`, received `at`: accepted and
    /// counted in every window it falls in, or refused (and not counted) with the first limit it
    /// would exceed (chat, group, global) and how long after `at` the same request would fit.
    pub fn check(
        &mut self,
        chat_id: i64,
        n: u32,
        at: Instant,
    ) -> Result<(), (RateScope, Duration)> {
        let limits = &self.limits;
        let tolerance = limits.tolerance;
        let chat = Limit::new(limits.per_chat, limits.per_chat_window, tolerance);
        let group = Limit::new(limits.group_max, limits.group_window, tolerance);
        let global = Limit::new(limits.global_max, limits.global_window, tolerance);
        let is_group = chat_id < 0;
        if let Some(wait) = self.chats.entry(chat_id).or_default().refusal(chat, 1, at) {
            return Err((RateScope::Chat, wait));
        }
        if is_group
            && let Some(wait) = self
                .groups
                .entry(chat_id)
                .or_default()
                .refusal(group, n, at)
        {
            return Err((RateScope::Group, wait));
        }
        if let Some(wait) = self.global.refusal(global, n, at) {
            return Err((RateScope::Global, wait));
        }
        self.chats.entry(chat_id).or_default().add(chat, 1, at);
        if is_group {
            self.groups.entry(chat_id).or_default().add(group, n, at);
        }
        self.global.add(global, n, at);
        Ok(())
    }
}

/// At most `max` per `window`, where two stamps closer than `window - tolerance` share one.
#[derive(Clone, Copy)]
struct Limit {
    max: u32,
    span: Duration,
}

impl Limit {
    fn new(max: u32, window: Duration, tolerance: Duration) -> Self {
        Self {
            max,
            span: window.saturating_sub(tolerance),
        }
    }
}

/// The accepted sends of one limit, sorted by their receive time (a slow upload's head can arrive
/// before a quick send that is processed first, so they are inserted in place).
#[derive(Default)]
struct Window(Vec<(Instant, u32)>);

/// How long an entry is kept after it left every window containing the newest stamp: room for a
/// request whose body took that long to arrive.
const WINDOW_KEEP: Duration = Duration::from_secs(120);

impl Window {
    /// `None` if `n` more at `at` keep every sliding window within `limit.max`, else how long
    /// after `at` the same `n` would fit.
    fn refusal(&self, limit: Limit, n: u32, at: Instant) -> Option<Duration> {
        if self.fits(limit, n, at) {
            return None;
        }
        // An entry at `t` stops sharing a window with `t + span`: the candidates in time order.
        let mut wait = self
            .0
            .iter()
            .map(|&(t, _)| (t + limit.span).saturating_duration_since(at))
            .filter(|d| !d.is_zero())
            .collect::<Vec<_>>();
        wait.sort();
        let fits_later = wait.into_iter().find(|d| self.fits(limit, n, at + *d));
        Some(fits_later.unwrap_or(limit.span))
    }

    /// Whether every window `[s, s + span)` containing `at` holds at most `limit.max` with `n`
    /// more at `at`. The fullest such window starts at `at` or at an entry in `(at - span, at]`,
    /// so those are the only starts to check. `n` over `max` fits only alone.
    fn fits(&self, limit: Limit, n: u32, at: Instant) -> bool {
        let mut starts = self
            .0
            .iter()
            .map(|&(t, _)| t)
            .filter(|&t| t <= at && at < t + limit.span)
            .chain([at]);
        starts.all(|start| {
            let count: u32 = self
                .0
                .iter()
                .filter(|&&(t, _)| start <= t && t < start + limit.span)
                .map(|&(_, c)| c)
                .sum();
            count == 0 || count + n <= limit.max
        })
    }

    fn add(&mut self, limit: Limit, n: u32, at: Instant) {
        let newest = self.0.last().map_or(at, |&(t, _)| t.max(at));
        self.0
            .retain(|&(t, _)| t + limit.span + WINDOW_KEEP > newest);
        let pos = self.0.partition_point(|&(t, _)| t <= at);
        self.0.insert(pos, (at, n));
    }
}

// ---------------------------------------------------------------------------------------------
// Files: ids, mime types, image headers, photo sizes, a PNG generator
// ---------------------------------------------------------------------------------------------

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn new_file_id(kind: FileKind) -> String {
    let prefix = match kind {
        FileKind::Document => "BQACAgIAAxkDAAI",
        FileKind::Photo => "AgACAgIAAxkDAAI",
    };
    let random: [u8; 24] = rand::random();
    format!("{prefix}{}", URL_SAFE_NO_PAD.encode(random))
}

fn unique_id(prefix: &str, seed: &str) -> String {
    let digest = Sha256::digest(seed.as_bytes());
    format!("{prefix}{}", URL_SAFE_NO_PAD.encode(&digest[..12]))
}

fn mime_for(file_name: &str) -> &'static str {
    let ext = file_name
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "pdf" => "application/pdf",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "csv" => "text/csv",
        "txt" => "text/plain",
        "html" | "htm" => "text/html",
        "json" => "application/json",
        "zip" => "application/zip",
        "xlsx" => "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        "xls" => "application/vnd.ms-excel",
        _ => "application/octet-stream",
    }
}

/// Width and height from a PNG (IHDR), JPEG (SOFn) or GIF header; `None` for anything else.
pub fn image_dimensions(bytes: &[u8]) -> Option<(u32, u32)> {
    const PNG: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
    if bytes.len() >= 24 && bytes[..8] == PNG && &bytes[12..16] == b"IHDR" {
        let w = u32::from_be_bytes(bytes[16..20].try_into().ok()?);
        let h = u32::from_be_bytes(bytes[20..24].try_into().ok()?);
        return Some((w, h));
    }
    if bytes.len() >= 10 && (bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a")) {
        let w = u16::from_le_bytes([bytes[6], bytes[7]]) as u32;
        let h = u16::from_le_bytes([bytes[8], bytes[9]]) as u32;
        return Some((w, h));
    }
    if bytes.starts_with(&[0xFF, 0xD8]) {
        let mut i = 2;
        while i + 9 < bytes.len() {
            if bytes[i] != 0xFF {
                return None;
            }
            let marker = bytes[i + 1];
            if marker == 0xFF {
                i += 1;
                continue;
            }
            if marker == 0x01 || (0xD0..=0xD8).contains(&marker) {
                i += 2;
                continue;
            }
            let len = u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]) as usize;
            if (0xC0..=0xCF).contains(&marker) && !matches!(marker, 0xC4 | 0xC8 | 0xCC) {
                let h = u16::from_be_bytes([bytes[i + 5], bytes[i + 6]]) as u32;
                let w = u16::from_be_bytes([bytes[i + 7], bytes[i + 8]]) as u32;
                return Some((w, h));
            }
            i += 2 + len;
        }
    }
    None
}

/// The sizes Telegram generates for a photo: long side 90, 320, 800, 1280 (each only when the
/// original is larger), plus the original when its long side is ≤ 1280; ascending, with an
/// estimated `file_size`.
fn photo_sizes(w: u32, h: u32, total_bytes: usize) -> Vec<(u32, u32, usize)> {
    let long = w.max(h).max(1) as f64;
    let area = (w as f64 * h as f64).max(1.0);
    let mut out = Vec::new();
    for target in [90u32, 320, 800, 1280] {
        if (target as f64) < long {
            let scale = target as f64 / long;
            let sw = ((w as f64 * scale).round() as u32).max(1);
            let sh = ((h as f64 * scale).round() as u32).max(1);
            let bytes = ((total_bytes as f64) * (sw as f64 * sh as f64) / area).ceil() as usize;
            out.push((sw, sh, bytes.max(1)));
        }
    }
    if long <= 1280.0 {
        out.push((w, h, total_bytes));
    }
    out
}

/// A valid, decodable 8-bit grayscale PNG of the given size (all black; stored, uncompressed
/// deflate blocks, so about `(width + 1) * height` bytes).
pub fn make_png(width: u32, height: u32) -> Vec<u8> {
    fn crc32(data: &[u8]) -> u32 {
        let mut crc = 0xFFFF_FFFFu32;
        for &b in data {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut c = kind.to_vec();
        c.extend_from_slice(data);
        out.extend_from_slice(&c);
        out.extend_from_slice(&crc32(&c).to_be_bytes());
    }
    let mut out = vec![0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 0, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    let raw = vec![0u8; (width as usize + 1) * height as usize];
    let mut z = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = raw.chunks(65_535).collect();
    if blocks.is_empty() {
        z.extend_from_slice(&[1, 0, 0, 0xFF, 0xFF]);
    }
    for (i, block) in blocks.iter().enumerate() {
        z.push(u8::from(i + 1 == blocks.len()));
        let len = block.len() as u16;
        z.extend_from_slice(&len.to_le_bytes());
        z.extend_from_slice(&(!len).to_le_bytes());
        z.extend_from_slice(block);
    }
    let (mut a, mut b) = (1u32, 0u32);
    for &byte in &raw {
        a = (a + byte as u32) % 65_521;
        b = (b + a) % 65_521;
    }
    z.extend_from_slice(&((b << 16) | a).to_be_bytes());
    chunk(&mut out, b"IDAT", &z);
    chunk(&mut out, b"IEND", &[]);
    out
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Telegram HTML (a port of TDLib's `parse_html`)
// ---------------------------------------------------------------------------------------------

/// Visible text and entities of a Telegram-HTML string.
#[derive(Clone, Debug, PartialEq)]
pub struct ParsedHtml {
    /// The text as recipients see it (tags removed, entities decoded).
    pub text: String,
    /// `MessageEntity` objects in Bot API JSON form (only kinds teloxide 0.17 knows).
    pub entities: Vec<Value>,
}

/// Length as Telegram counts it: UTF-16 code units.
pub fn utf16_len(s: &str) -> usize {
    s.encode_utf16().count()
}

/// The visible text of `html` under the fake server's default (strict) rules, or the error
/// detail that would follow `Bad Request: can't parse entities: `.
pub fn visible_text(html: &str) -> Result<String, String> {
    parse_html(html, true).map(|p| p.text)
}

/// Like [`visible_text`] but exactly as lenient as TDLib (an `&` that starts no entity is
/// kept literally).
pub fn visible_text_lenient(html: &str) -> Result<String, String> {
    parse_html(html, false).map(|p| p.text)
}

/// Parse Telegram HTML as TDLib's `parse_html` does (same errors, byte offsets and entities).
/// With `strict_ampersand`, an `&` that does not start a supported entity is an error (the
/// Bot API documentation requires escaping it; TDLib keeps it literally).
pub fn parse_html(html: &str, strict_ampersand: bool) -> Result<ParsedHtml, String> {
    struct Open {
        tag: String,
        arg: String,
        offset: usize,
        begin: usize,
    }
    struct Ent {
        kind: &'static str,
        offset: usize,
        length: usize,
        url: Option<String>,
        language: Option<String>,
        emoji: Option<String>,
        /// The language of a `<code class="language-…">`, claimed by an enclosing `<pre>`.
        code_language: String,
    }
    const TAGS: &[&str] = &[
        "a",
        "b",
        "strong",
        "i",
        "em",
        "s",
        "strike",
        "del",
        "u",
        "ins",
        "tg-spoiler",
        "tg-emoji",
        "tg-time",
        "span",
        "pre",
        "code",
        "blockquote",
    ];
    let b = html.as_bytes();
    let n = b.len();
    let at = |i: usize| -> u8 { if i < n { b[i] } else { 0 } };
    let is_space = |c: u8| matches!(c, b' ' | b'\t' | b'\r' | b'\n' | 0 | 0x0B);
    let lossy = |s: &[u8]| String::from_utf8_lossy(s).into_owned();

    let mut out: Vec<u8> = Vec::with_capacity(n);
    let mut utf16 = 0usize;
    let mut surrogate = false;
    let mut stack: Vec<Open> = Vec::new();
    let mut ents: Vec<Ent> = Vec::new();
    let mut i = 0usize;
    while i < n {
        let c = b[i];
        if c == b'&' {
            if let Some((code, end)) = decode_html_entity(b, i) {
                utf16 += if code > 0xFFFF { 2 } else { 1 };
                match char::from_u32(code) {
                    Some(ch) => {
                        let mut buf = [0u8; 4];
                        out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                    }
                    None => surrogate = true,
                }
                i = end;
                continue;
            }
            if strict_ampersand {
                return Err(format!(
                    "Character \"&\" at byte offset {i} must be escaped as \"&amp;\" (strict mode of the fake server)"
                ));
            }
        }
        if c != b'<' {
            if c & 0xC0 != 0x80 {
                utf16 += if c >= 0xF0 { 2 } else { 1 };
            }
            out.push(c);
            i += 1;
            continue;
        }
        let begin = i;
        i += 1;
        if at(i) != b'/' {
            // A start tag.
            while !is_space(at(i)) && at(i) != b'>' {
                i += 1;
            }
            if at(i) == 0 {
                return Err(format!("Unclosed start tag at byte offset {begin}"));
            }
            let tag = lossy(&b[begin + 1..i]).to_ascii_lowercase();
            if !TAGS.contains(&tag.as_str()) {
                return Err(format!(
                    "Unsupported start tag \"{tag}\" at byte offset {begin}"
                ));
            }
            let mut arg = String::new();
            while at(i) != b'>' {
                while at(i) != 0 && is_space(at(i)) {
                    i += 1;
                }
                if at(i) == b'>' {
                    break;
                }
                let name_begin = i;
                while !(is_space(at(i)) || matches!(at(i), b'=' | b'>' | b'/' | b'"' | b'\'')) {
                    i += 1;
                }
                let name = lossy(&b[name_begin..i]);
                if name.is_empty() {
                    return Err(format!(
                        "Empty attribute name in the tag \"{tag}\" at byte offset {begin}"
                    ));
                }
                while at(i) != 0 && is_space(at(i)) {
                    i += 1;
                }
                if at(i) != b'=' {
                    if at(i) == 0 {
                        return Err(format!(
                            "Unclosed start tag \"{tag}\" at byte offset {begin}"
                        ));
                    }
                    if tag == "blockquote" && name == "expandable" {
                        arg = "1".to_owned();
                    }
                    continue;
                }
                i += 1;
                while at(i) != 0 && is_space(at(i)) {
                    i += 1;
                }
                if at(i) == 0 {
                    return Err(format!(
                        "Unclosed start tag \"{tag}\" at byte offset {begin}"
                    ));
                }
                let value = if at(i) != b'\'' && at(i) != b'"' {
                    let token_begin = i;
                    while at(i).is_ascii_alphanumeric() || at(i) == b'.' || at(i) == b'-' {
                        i += 1;
                    }
                    let v = lossy(&b[token_begin..i]).to_ascii_lowercase();
                    if !is_space(at(i)) && at(i) != b'>' {
                        return Err(format!(
                            "Unexpected end of name token at byte offset {token_begin}"
                        ));
                    }
                    v
                } else {
                    let quote = at(i);
                    i += 1;
                    let mut v: Vec<u8> = Vec::new();
                    while at(i) != quote && at(i) != 0 {
                        if at(i) == b'&'
                            && let Some((code, end)) = decode_html_entity(b, i)
                        {
                            if let Some(ch) = char::from_u32(code) {
                                let mut buf = [0u8; 4];
                                v.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                            }
                            i = end;
                            continue;
                        }
                        v.push(at(i));
                        i += 1;
                    }
                    if at(i) == quote {
                        i += 1;
                    }
                    lossy(&v)
                };
                if at(i) == 0 {
                    return Err(format!("Unclosed start tag at byte offset {begin}"));
                }
                match (tag.as_str(), name.as_str()) {
                    ("a", "href") | ("tg-emoji", "emoji-id") | ("tg-time", "format") => arg = value,
                    ("code", "class") if value.starts_with("language-") => {
                        arg = value["language-".len()..].to_owned()
                    }
                    ("span", "class") if value.starts_with("tg-") => arg = value[3..].to_owned(),
                    ("blockquote", "expandable") => arg = "1".to_owned(),
                    _ => {}
                }
            }
            if tag == "span" && arg != "spoiler" {
                return Err(format!(
                    "Tag \"span\" must have class \"tg-spoiler\" at byte offset {begin}"
                ));
            }
            stack.push(Open {
                tag,
                arg,
                offset: utf16,
                begin: out.len(),
            });
        } else {
            // An end tag.
            if stack.is_empty() {
                return Err(format!("Unexpected end tag at byte offset {begin}"));
            }
            while !is_space(at(i)) && at(i) != b'>' {
                i += 1;
            }
            let end_name = lossy(&b[begin + 2..i]).to_ascii_lowercase();
            while is_space(at(i)) && at(i) != 0 {
                i += 1;
            }
            if at(i) != b'>' {
                return Err(format!("Unclosed end tag at byte offset {begin}"));
            }
            let open = stack.pop().expect("checked non-empty");
            if !end_name.is_empty() && end_name != open.tag {
                return Err(format!(
                    "Unmatched end tag at byte offset {begin}, expected \"</{}>\", found \"</{end_name}>\"",
                    open.tag
                ));
            }
            if utf16 > open.offset {
                let (offset, length) = (open.offset, utf16 - open.offset);
                let plain = |kind| Ent {
                    kind,
                    offset,
                    length,
                    url: None,
                    language: None,
                    emoji: None,
                    code_language: String::new(),
                };
                let same_span = ents
                    .last()
                    .is_some_and(|e| e.offset == offset && e.length == length);
                match open.tag.as_str() {
                    "i" | "em" => ents.push(plain("italic")),
                    "b" | "strong" => ents.push(plain("bold")),
                    "s" | "strike" | "del" => ents.push(plain("strikethrough")),
                    "u" | "ins" => ents.push(plain("underline")),
                    "tg-spoiler" | "span" => ents.push(plain("spoiler")),
                    "tg-emoji" => {
                        let valid = !open.arg.is_empty()
                            && open.arg.bytes().all(|d| d.is_ascii_digit())
                            && open.arg.parse::<i64>().is_ok_and(|v| v != 0);
                        if !valid {
                            return Err("Invalid custom emoji identifier specified".to_owned());
                        }
                        let mut e = plain("custom_emoji");
                        e.emoji = Some(open.arg.clone());
                        ents.push(e);
                    }
                    // Bot API "date_time" entities are unknown to teloxide 0.17: none is made.
                    "tg-time" => {}
                    "a" => {
                        let url = if open.arg.is_empty() {
                            lossy(&out[open.begin..])
                        } else {
                            open.arg.clone()
                        };
                        if let Some(url) = checked_link(&url) {
                            let mut e = plain("text_link");
                            e.url = Some(url);
                            ents.push(e);
                        }
                    }
                    "pre" => {
                        let last = ents.last_mut();
                        match last {
                            Some(e)
                                if same_span && e.kind == "code" && !e.code_language.is_empty() =>
                            {
                                e.kind = "pre";
                                e.language = Some(std::mem::take(&mut e.code_language));
                            }
                            _ => ents.push(plain("pre")),
                        }
                    }
                    "code" => {
                        let last = ents.last_mut();
                        match last {
                            Some(e)
                                if same_span
                                    && e.kind == "pre"
                                    && e.language.is_none()
                                    && !open.arg.is_empty() =>
                            {
                                e.language = Some(open.arg.clone());
                            }
                            _ => {
                                let mut e = plain("code");
                                e.code_language = open.arg.clone();
                                ents.push(e);
                            }
                        }
                    }
                    "blockquote" => ents.push(plain(if open.arg.is_empty() {
                        "blockquote"
                    } else {
                        "expandable_blockquote"
                    })),
                    _ => {}
                }
            }
        }
        i += 1;
    }
    if let Some(open) = stack.last() {
        return Err(format!(
            "Can't find end tag corresponding to start tag \"{}\"",
            open.tag
        ));
    }
    if surrogate {
        return Err("Text contains invalid Unicode characters after decoding HTML entities, check for unmatched surrogate code units".to_owned());
    }
    ents.sort_by(|a, b| a.offset.cmp(&b.offset).then(b.length.cmp(&a.length)));
    let entities = ents
        .into_iter()
        .map(|e| {
            let mut v = json!({"type": e.kind, "offset": e.offset, "length": e.length});
            if let Some(u) = e.url {
                v["url"] = json!(u);
            }
            if let Some(l) = e.language {
                v["language"] = json!(l);
            }
            if let Some(id) = e.emoji {
                v["custom_emoji_id"] = json!(id);
            }
            v
        })
        .collect();
    let text = String::from_utf8(out).map_err(|_| {
        "Text contains invalid Unicode characters after decoding HTML entities".to_owned()
    })?;
    Ok(ParsedHtml { text, entities })
}

/// TDLib's `decode_html_entity`: `&lt; &gt; &amp; &quot;` and numeric references, the `;`
/// optional. Returns the code point and the position after the reference.
fn decode_html_entity(b: &[u8], pos: usize) -> Option<(u32, usize)> {
    let at = |i: usize| -> u8 { if i < b.len() { b[i] } else { 0 } };
    let mut end = pos + 1;
    let code: u64;
    if at(pos + 1) == b'#' {
        end += 1;
        let mut res: u64 = 0;
        if at(pos + 2) == b'x' {
            end += 1;
            while at(end).is_ascii_hexdigit() {
                let d = (at(end) as char).to_digit(16).unwrap_or(0) as u64;
                res = res.saturating_mul(16).saturating_add(d);
                end += 1;
            }
        } else {
            while at(end).is_ascii_digit() {
                res = res
                    .saturating_mul(10)
                    .saturating_add((at(end) - b'0') as u64);
                end += 1;
            }
        }
        if res == 0 || res >= 0x10FFFF || end - pos >= 10 {
            return None;
        }
        code = res;
    } else {
        while at(end).is_ascii_alphabetic() {
            end += 1;
        }
        code = match &b[pos + 1..end] {
            b"lt" => '<' as u64,
            b"gt" => '>' as u64,
            b"amp" => '&' as u64,
            b"quot" => '"' as u64,
            _ => return None,
        };
    }
    let next = if at(end) == b';' { end + 1 } else { end };
    Some((code as u32, next))
}

/// TDLib's `get_checked_link`, simplified: http(s)/tg/ton URLs, `http://` added when the
/// scheme is missing; `None` (no entity) when it is not a valid absolute URL.
fn checked_link(raw: &str) -> Option<String> {
    let raw = raw.trim();
    if raw.is_empty() {
        return None;
    }
    let candidate = if raw.contains("://") {
        raw.to_owned()
    } else {
        format!("http://{raw}")
    };
    let url = url::Url::parse(&candidate).ok()?;
    match url.scheme() {
        "http" | "https" | "ton" => Some(url.to_string()),
        // tg://user?id= links become text_mention entities that need a full User; skip them.
        _ => None,
    }
}
