//! Why a SeaTable call failed ([`SeaTableError`]) and how an HTTP answer becomes one: status codes,
//! the three error-body formats (`error_message`, `error_msg`, `detail`), transport errors.

use std::time::Duration;

use reqwest::StatusCode;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Error bodies that are not one of the three JSON formats are quoted up to this many chars.
pub(super) const ERROR_BODY_QUOTE_CHARS: usize = 300;

/// Why a SeaTable call failed. Callers branch on the variant: [`Self::is_transient`] says
/// whether trying again later may help.
///
/// `message` fields start with the request (`GET rows/`) followed by the server's message, read
/// from `error_message`, `error_msg` or `detail` (the three formats of §4), or else the raw body
/// (truncated). They never contain tokens or row contents.
#[derive(Debug, thiserror::Error)]
pub enum SeaTableError {
    /// The client was built with an unusable server URL or API token (nothing was sent).
    #[error("SeaTable client configuration: {message}")]
    Config {
        /// What is wrong.
        message: String,
    },
    /// The API token was refused at the token exchange, or the gateway refused the Base-Token
    /// even after one refresh (401 or 403: revoked token, read-only token on a write, …).
    #[error("SeaTable refused access (HTTP {status}): {message}")]
    Unauthorized {
        /// 401 or 403.
        status: u16,
        /// The request and the server's message.
        message: String,
    },
    /// 404: unknown table, row or base (§2.2: `row _id not exits`).
    #[error("SeaTable: not found: {message}")]
    NotFound {
        /// The request and the server's message.
        message: String,
    },
    /// 429 after the configured retries, or with a `Retry-After` longer than
    /// [`ClientOptions::max_retry_after`] (§4: 200 requests/min per base on Cloud).
    #[error("SeaTable rate limit hit{}", .retry_after.map(|d| format!("; retry after {}s", d.as_secs())).unwrap_or_default())]
    RateLimited {
        /// From the last 429's `Retry-After` (seconds), when present.
        retry_after: Option<Duration>,
    },
    /// 5xx after the retries an idempotent call gets (or at once for other calls).
    #[error("SeaTable server error (HTTP {status}): {message}")]
    Server {
        /// The HTTP status, 500–599.
        status: u16,
        /// The request and the server's message.
        message: String,
    },
    /// Any other non-success answer, mostly 400 (`no such table: X`, `no such column: X`,
    /// `column_already_exists`), and a 200 SQL reply with `success: false`.
    #[error("SeaTable rejected the request (HTTP {status}): {message}")]
    Api {
        /// The HTTP status.
        status: u16,
        /// The body's `error_type` when present, e.g. `column_already_exists` (§3.5).
        error_type: Option<String>,
        /// The request and the server's message.
        message: String,
    },
    /// Connecting, sending or reading failed. The error's URL holds no token (tokens travel
    /// in headers only).
    #[error("cannot reach SeaTable: {0}")]
    Network(#[source] reqwest::Error),
    /// No complete answer within [`ClientOptions::request_timeout`].
    #[error("SeaTable did not answer in time")]
    Timeout,
    /// A success answer that is not the expected JSON.
    #[error("unexpected answer from SeaTable: {message}")]
    Decode {
        /// The request and what did not match.
        message: String,
    },
}

impl SeaTableError {
    /// Whether the same call may succeed later unchanged: rate limits, 5xx, network errors and
    /// timeouts.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::RateLimited { .. } | Self::Server { .. } | Self::Network(_) | Self::Timeout
        )
    }
}

pub(super) fn transport_error(error: reqwest::Error) -> SeaTableError {
    if error.is_timeout() {
        SeaTableError::Timeout
    } else {
        SeaTableError::Network(error)
    }
}

pub(super) fn decode<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, SeaTableError> {
    serde_json::from_slice(bytes).map_err(|error| SeaTableError::Decode {
        message: format!("{what}: {error}"),
    })
}

pub(super) fn status_error(
    status: StatusCode,
    retry_after: Option<Duration>,
    body: &[u8],
    what: &str,
) -> SeaTableError {
    let code = status.as_u16();
    if status == StatusCode::TOO_MANY_REQUESTS {
        return SeaTableError::RateLimited { retry_after };
    }
    let (error_type, server_message) = error_body(body);
    let server_message = if server_message.is_empty() {
        status.canonical_reason().unwrap_or("no message").to_owned()
    } else {
        server_message
    };
    let message = format!("{what}: {server_message}");
    match code {
        401 | 403 => SeaTableError::Unauthorized {
            status: code,
            message,
        },
        404 => SeaTableError::NotFound { message },
        500..=599 => SeaTableError::Server {
            status: code,
            message,
        },
        _ => SeaTableError::Api {
            status: code,
            error_type,
            message,
        },
    }
}

/// `(error_type, message)` of an error body: `error_message` (gateway), `error_msg`
/// (dtable-web) or `detail` (DRF), §4; else the raw body, trimmed and truncated to
/// [`ERROR_BODY_QUOTE_CHARS`] characters. Empty for an empty body.
pub(super) fn error_body(body: &[u8]) -> (Option<String>, String) {
    if let Ok(Value::Object(object)) = serde_json::from_slice::<Value>(body) {
        let error_type = object
            .get("error_type")
            .and_then(Value::as_str)
            .map(str::to_owned);
        for field in ["error_message", "error_msg", "detail"] {
            match object.get(field) {
                Some(Value::String(text)) if !text.is_empty() => {
                    return (error_type, text.clone());
                }
                Some(value) if !value.is_null() && !value.is_string() => {
                    return (error_type, value.to_string());
                }
                _ => {}
            }
        }
        if let Some(error_type) = error_type {
            return (Some(error_type.clone()), error_type);
        }
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    let mut quoted: String = text.chars().take(ERROR_BODY_QUOTE_CHARS).collect();
    if quoted.len() < text.len() {
        quoted.push('…');
    }
    (None, quoted)
}
