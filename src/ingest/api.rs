//! The send API: `POST /api/v1/messages` sends a message or files to a mailbox's recipients,
//! planned and delivered like a report; `GET /api/v1/messages/{id}` tells how each recipient's
//! sends stand; `GET /api/v1/openapi.json` describes both (OpenAPI 3.1, `openapi.json`).
//!
//! Clients authenticate with `Authorization: Bearer <token>`; the config holds each token's
//! SHA-256 (`http.api_tokens`), a name, the mailboxes it may address and its rate limit (GCRA
//! with the `governor` crate; 429 with `Retry-After` beyond it). Presented tokens are hashed and
//! compared with every configured hash in constant time, and never logged. An `Idempotency-Key`
//! header makes a retried request (same token, same key, within `http.dedupe_window_secs`)
//! return the first answer without sending again.

use std::num::NonZeroU32;
use std::time::SystemTime;

use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::body::{self, ContentHash, Framing, Part};
use super::{ApiError, Ingest, Source, not_stored};
use crate::config::ApiToken;
use crate::directory::Snapshot;
use crate::relay::Ingested;
use crate::report::{Report, Upload, UploadedFile};
use crate::state::MessageOutcome;

/// The OpenAPI 3.1 description served at `/api/v1/openapi.json`.
pub const OPENAPI: &str = include_str!("openapi.json");
/// The longest `Idempotency-Key` accepted, in characters.
pub const IDEMPOTENCY_KEY_MAX_LEN: usize = 255;

/// One configured client: its token's hash, scope and limiter.
struct Client {
    name: String,
    sha256: [u8; 32],
    mailboxes: Vec<String>,
    limiter: DefaultDirectRateLimiter,
}

/// The configured clients of the send API.
pub(super) struct Clients(Vec<Client>);

impl Clients {
    /// The clients of `http.api_tokens` (validated: 64 hex digits, at least 1 per minute).
    pub(super) fn new(tokens: &[ApiToken]) -> Self {
        Self(
            tokens
                .iter()
                .map(|token| {
                    let mut sha256 = [0u8; 32];
                    // Validated when the config loaded; a bad one matches nothing.
                    let _ = hex::decode_to_slice(token.sha256.to_ascii_lowercase(), &mut sha256);
                    let per_minute =
                        NonZeroU32::new(token.requests_per_minute).unwrap_or(NonZeroU32::MIN);
                    Client {
                        name: token.name.clone(),
                        sha256,
                        mailboxes: token
                            .mailboxes
                            .iter()
                            .map(|m| m.trim().to_ascii_lowercase())
                            .collect(),
                        limiter: RateLimiter::direct(Quota::per_minute(per_minute)),
                    }
                })
                .collect(),
        )
    }

    /// The client whose token is presented in `headers`, counted against its rate limit.
    ///
    /// # Errors
    /// 401 without a known bearer token, 429 (with `Retry-After`) beyond its rate limit.
    fn authenticate(&self, headers: &HeaderMap) -> Result<&Client, ApiError> {
        let unauthorized = || {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "a valid Authorization: Bearer <token> header is required",
            )
        };
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .filter(|token| !token.is_empty())
            .ok_or_else(unauthorized)?;
        let presented = Sha256::digest(presented.as_bytes());
        let mut found = None;
        for client in &self.0 {
            let matches: bool = client.sha256.ct_eq(presented.as_slice()).into();
            if matches && found.is_none() {
                found = Some(client);
            }
        }
        let Some(client) = found else {
            tracing::warn!(
                source = Source::Api.as_str(),
                "A send API request with an unknown token; answering 401."
            );
            return Err(unauthorized());
        };
        if let Err(not_until) = client.limiter.check() {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            tracing::info!(client = %client.name, retry_after_secs = seconds, "A send API client is over its rate limit.");
            return Err(ApiError {
                retry_after: Some(seconds.max(1)),
                ..ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!(
                        "rate limit of the token {:?} reached; retry after {} s",
                        client.name,
                        seconds.max(1)
                    ),
                )
            });
        }
        Ok(client)
    }
}

impl Client {
    fn may_address(&self, mailbox: &str) -> bool {
        let mailbox = mailbox.trim().to_ascii_lowercase();
        self.mailboxes.contains(&mailbox)
    }
}

/// The JSON body of `POST /api/v1/messages`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonMessage {
    mailbox: String,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    caption: Option<String>,
}

/// A request to send, from either framing.
#[derive(Debug, Default)]
struct Message {
    mailbox: String,
    text: Option<String>,
    caption: Option<String>,
    files: Vec<UploadedFile>,
}

impl Message {
    fn from_json(bytes: &[u8]) -> Result<Self, ApiError> {
        let message: JsonMessage = serde_json::from_slice(bytes)
            .map_err(|error| ApiError::bad_request(format!("invalid JSON body: {error}")))?;
        Ok(Self {
            mailbox: message.mailbox,
            text: message.text,
            caption: message.caption,
            files: Vec::new(),
        })
    }

    fn from_parts(parts: Vec<Part>) -> Result<Self, ApiError> {
        let mut message = Self::default();
        let mut mailbox = None;
        for part in parts {
            match part.name.as_str() {
                "mailbox" => mailbox = Some(part.text()?),
                "text" => message.text = Some(part.text()?),
                "caption" => message.caption = Some(part.text()?),
                "files" => message.files.push(UploadedFile {
                    file_name: part.file_name.clone(),
                    keep_name: true,
                    content_type: part.content_type.clone().unwrap_or_default(),
                    bytes: part.bytes,
                }),
                other => {
                    return Err(ApiError::bad_request(format!(
                        "unknown field {:?}: expected mailbox, text, caption or files",
                        other.chars().take(64).collect::<String>()
                    )));
                }
            }
        }
        message.mailbox = mailbox.ok_or_else(|| ApiError::bad_request("mailbox is missing"))?;
        Ok(message)
    }

    /// The report: untitled, the caption (or the text) on the files, or the text alone.
    ///
    /// # Errors
    /// 400 without text or files, with both a caption and a text for files, or with a file
    /// that is not a PNG, PDF, CSV or XLSX.
    fn report(self) -> Result<Report, ApiError> {
        let text = self.text.filter(|t| !t.trim().is_empty());
        let caption = self.caption.filter(|t| !t.trim().is_empty());
        let description = if self.files.is_empty() {
            match (text, caption) {
                (Some(text), _) | (None, Some(text)) => text,
                (None, None) => {
                    return Err(ApiError::bad_request("give a text, or files"));
                }
            }
        } else {
            match (caption, text) {
                (Some(_), Some(_)) => {
                    return Err(ApiError::bad_request(
                        "with files, give either a caption or a text (it becomes the caption), not both",
                    ));
                }
                (Some(caption), None) | (None, Some(caption)) => caption,
                (None, None) => String::new(),
            }
        };
        Report::from_upload(Upload {
            title: String::new(),
            titled: false,
            description,
            link: None,
            files: self.files,
        })
        .map_err(|error| ApiError::bad_request(error.to_string()))
    }

    fn content_sha256(&self) -> String {
        let mut hash = ContentHash::new("api");
        hash.value(self.mailbox.as_bytes())
            .optional(self.text.as_deref().map(str::as_bytes))
            .optional(self.caption.as_deref().map(str::as_bytes));
        for file in &self.files {
            hash.optional(file.file_name.as_deref().map(str::as_bytes))
                .value(file.content_type.as_bytes())
                .value(&Sha256::digest(&file.bytes));
        }
        hash.hex()
    }
}

/// The `Idempotency-Key` header, if any.
///
/// # Errors
/// 400 when it is empty, longer than [`IDEMPOTENCY_KEY_MAX_LEN`] or not visible ASCII.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .map(str::trim)
        .filter(|k| {
            !k.is_empty()
                && k.len() <= IDEMPOTENCY_KEY_MAX_LEN
                && k.bytes().all(|b| b.is_ascii_graphic())
        })
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_MAX_LEN} visible ASCII characters"
            ))
        })?;
    Ok(Some(key.to_owned()))
}

fn accepted(id: i64, replayed: bool) -> Response {
    let mut response = (
        StatusCode::ACCEPTED,
        axum::Json(json!({ "id": id, "status_url": format!("/api/v1/messages/{id}") })),
    )
        .into_response();
    if replayed {
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    response
}

/// `POST /api/v1/messages`.
pub(super) async fn send(State(ingest): State<Ingest>, request: Request) -> Response {
    match send_message(&ingest, request).await {
        Ok(answer) => answer,
        Err(error) => error.into_response(),
    }
}

async fn send_message(ingest: &Ingest, request: Request) -> Result<Response, ApiError> {
    let received_at = SystemTime::now();
    let client = ingest.inner.api.authenticate(request.headers())?;
    let idempotency_key = idempotency_key(request.headers())?;
    let (relay, snapshot) = ingest.ready().await?;
    let (parts, bytes, _turn) = ingest.read_body(request).await?;
    let message = match body::framing(&parts)? {
        Framing::Json => Message::from_json(&bytes)?,
        Framing::Multipart => Message::from_parts(body::multipart(parts, bytes).await?)?,
    };
    if !client.may_address(&message.mailbox) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "the token {:?} may not send to {}",
                client.name, message.mailbox
            ),
        ));
    }
    let Some(row) = snapshot.mailbox(message.mailbox.trim()) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no mailbox row has the address {}", message.mailbox.trim()),
        ));
    };
    let mailbox = row.email.clone();
    ingest.count_received(&mailbox, Source::Api);
    let content_sha256 = message.content_sha256();
    let dedupe_key = idempotency_key.map(|key| {
        ContentHash::new("api idempotency-key")
            .value(client.name.as_bytes())
            .value(key.as_bytes())
            .hex()
    });
    let report = message.report()?;
    let relayed = relay
        .relay_report(Ingested {
            mailbox: mailbox.clone(),
            report,
            source: Source::Api,
            content_sha256,
            dedupe_key,
            dedupe_window: ingest.inner.dedupe_window,
            received_at,
        })
        .await
        .map_err(|error| not_stored(Source::Api, &mailbox, &error))?;
    tracing::info!(client = %client.name, %mailbox, message_id = relayed.message_id, duplicate = relayed.duplicate,
                   outcome = relayed.outcome.as_str(), "Accepted a send API message.");
    match relayed.message_id {
        Some(id) => Ok(accepted(id, relayed.duplicate)),
        // A duplicate whose first message was pruned: it was accepted long ago.
        None => Err(ApiError::new(
            StatusCode::CONFLICT,
            "this Idempotency-Key was used before and its message is gone",
        )),
    }
}

/// `GET /api/v1/messages/{id}`.
pub(super) async fn status(
    State(ingest): State<Ingest>,
    headers: HeaderMap,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Response {
    match message_status(&ingest, &headers, id.map(|Path(id)| id).unwrap_or_default()).await {
        Ok(answer) => answer,
        Err(error) => error.into_response(),
    }
}

async fn message_status(
    ingest: &Ingest,
    headers: &HeaderMap,
    id: String,
) -> Result<Response, ApiError> {
    let client = ingest.inner.api.authenticate(headers)?;
    let not_found = || ApiError::new(StatusCode::NOT_FOUND, "no such message");
    let id: i64 = id.parse().map_err(|_| not_found())?;
    let message = ingest
        .inner
        .state
        .message_status(id)
        .await
        .map_err(|error| not_stored(Source::Api, "", &error))?
        .filter(|m| m.source == Source::Api && client.may_address(&m.mailbox))
        .ok_or_else(not_found)?;
    let snapshot = ingest.inner.directory.last_good();
    let mut recipients: Vec<(i64, &'static str, Option<String>)> = Vec::new();
    for send in &message.sends {
        let status = match send.status.as_str() {
            "done" => "sent",
            "failed" => "failed",
            _ => "pending",
        };
        match recipients.iter_mut().find(|r| r.0 == send.chat_id) {
            None => recipients.push((send.chat_id, status, send.error.clone())),
            Some(recipient) => {
                // Failed wins, then pending; the reason is the first failure's.
                let rank = |s: &str| match s {
                    "failed" => 2,
                    "pending" => 1,
                    _ => 0,
                };
                if rank(status) > rank(recipient.1) {
                    *recipient = (send.chat_id, status, send.error.clone());
                }
            }
        }
    }
    let overall = if recipients.iter().any(|r| r.1 == "pending") {
        "pending"
    } else if recipients.is_empty() {
        match message.outcome {
            MessageOutcome::Queued => "sent",
            _ => "not_sent",
        }
    } else if recipients.iter().all(|r| r.1 == "sent") {
        "sent"
    } else if recipients.iter().all(|r| r.1 == "failed") {
        "failed"
    } else {
        "partially_sent"
    };
    let received_at: chrono::DateTime<chrono::Utc> = message.received_at.into();
    let body = json!({
        "id": message.id,
        "mailbox": message.mailbox,
        "outcome": message.outcome.as_str(),
        "detail": message.detail,
        "received_at": received_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "status": overall,
        "recipients": recipients.iter().map(|(chat_id, status, error)| json!({
            "chat_id": chat_id,
            "name": snapshot.as_deref().and_then(|s| recipient_name(s, *chat_id)),
            "status": status,
            "reason": match *status {
                "failed" => error.clone(),
                _ => None,
            },
            "last_error": match *status {
                "pending" => error.clone(),
                _ => None,
            },
        })).collect::<Vec<_>>(),
    });
    Ok((StatusCode::OK, axum::Json(body)).into_response())
}

/// The user's or group's name in the directory for a chat id.
fn recipient_name(snapshot: &Snapshot, chat_id: i64) -> Option<String> {
    snapshot
        .users
        .iter()
        .find(|u| u.telegram_id == Some(chat_id))
        .map(|u| u.name.clone())
        .or_else(|| {
            snapshot
                .groups
                .iter()
                .find(|g| g.chat_id == Some(chat_id))
                .map(|g| g.name.clone())
        })
}

/// `GET /api/v1/openapi.json`.
pub(super) async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clients() -> Clients {
        Clients::new(&[ApiToken {
            name: "tracker".into(),
            sha256: hex::encode(Sha256::digest(b"secret-token")),
            mailboxes: vec!["Reports@Example.com".into()],
            requests_per_minute: 2,
        }])
    }

    fn bearer(token: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
        );
        headers
    }

    #[test]
    fn a_known_token_authenticates_within_its_rate_and_scope() {
        let clients = clients();
        let client = clients.authenticate(&bearer("secret-token")).unwrap();
        assert_eq!(client.name, "tracker");
        assert!(client.may_address("reports@example.com"));
        assert!(!client.may_address("other@example.com"));
        assert!(clients.authenticate(&bearer("secret-token")).is_ok());
        let limited = clients.authenticate(&bearer("secret-token")).err().unwrap();
        assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
        assert!(limited.retry_after.unwrap() >= 1);
    }

    #[test]
    fn unknown_or_missing_tokens_are_401() {
        let clients = clients();
        for headers in [bearer("wrong"), HeaderMap::new(), bearer("")] {
            let error = clients.authenticate(&headers).err().unwrap();
            assert_eq!(error.status, StatusCode::UNAUTHORIZED);
        }
    }

    #[test]
    fn the_openapi_document_lists_the_paths() {
        let document: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        assert!(document["openapi"].as_str().unwrap().starts_with("3.1"));
        for path in [
            "/api/v1/messages",
            "/api/v1/messages/{id}",
            "/ingest/superset/{token}",
        ] {
            assert!(document["paths"].get(path).is_some(), "{path}");
        }
    }

    #[test]
    fn text_and_caption_make_the_report() {
        let message = Message {
            mailbox: "a@b".into(),
            text: Some("Disk full".into()),
            ..Message::default()
        };
        let report = message.report().unwrap();
        assert_eq!(report.description, "Disk full");
        assert!(!report.titled);
        let empty = Message {
            mailbox: "a@b".into(),
            ..Message::default()
        };
        assert_eq!(empty.report().unwrap_err().status, StatusCode::BAD_REQUEST);
    }
}
