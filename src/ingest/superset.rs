//! `POST /ingest/superset/{token}`: Superset's webhook notification
//! (`superset/reports/notifications/webhook.py`, behind the `ALERT_REPORT_WEBHOOK` feature
//! flag), routed by the mailbox row whose `webhook_token` is `{token}`.
//!
//! What Superset sends (6.x): without files, a JSON object `{"name", "header": {...}, "text",
//! "description", "url"}`; with files, `multipart/form-data` with the same fields (`header` as a
//! JSON string, fields whose value is `None` left out) followed by one `files` part per file, in
//! the order `report.csv` (`text/csv`), `report.xlsx`, `report.pdf` (`application/pdf`),
//! `screenshot_0.png`, `screenshot_1.png`, … (`image/png`). `text` is set only on an error
//! notification ("Contact the report owner for error details."), whose `name` is
//! `Error occurred for Report: …`. There is no id, signature or timestamp, and each retry is
//! framed with a new random multipart boundary: a request is named by the hash of its decoded
//! fields and files ([`Payload::content_sha256`]), per route, for deduplication.
//!
//! Superset retries a 5xx, a 429, a timeout or a broken connection; a 4xx is final and shown to
//! the Superset user. So: 200 once stored, 503 while the relay cannot store, 404 for an unknown
//! token, 400/413/415 for a body it should not send again.

use std::time::SystemTime;

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::body::{self, ContentHash, Framing, Part};
use super::{ApiError, Ingest, Source, not_stored};
use crate::directory::{Mailbox, Snapshot};
use crate::relay::Ingested;
use crate::report::{Report, Upload, UploadedFile};

/// The fields of one webhook request.
#[derive(Debug, Clone, Default)]
pub struct Payload {
    /// `name`: the report's or alert's name (the title).
    pub name: String,
    /// `header`: `notification_format`, `notification_type`, `notification_source`,
    /// `chart_id`, `dashboard_id` (informational).
    pub header: Option<Value>,
    /// `text`: an error notification's text.
    pub text: Option<String>,
    /// `description`.
    pub description: Option<String>,
    /// `url`: the link to the chart or dashboard.
    pub url: Option<String>,
    /// The `files` parts, in order.
    pub files: Vec<UploadedFile>,
}

/// A JSON value that must be a string or null.
fn optional_string(
    object: &serde_json::Map<String, Value>,
    key: &str,
) -> Result<Option<String>, ApiError> {
    match object.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text.clone())),
        Some(other) => Err(ApiError::bad_request(format!(
            "{key} must be a string or null, got {}",
            kind(other)
        ))),
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl Payload {
    /// The JSON body Superset sends for a notification without files.
    ///
    /// # Errors
    /// 400 when it is not a JSON object with a string `name`, or a field has the wrong type.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ApiError> {
        let value: Value = serde_json::from_slice(bytes).map_err(|error| {
            ApiError::bad_request(format!("the body is not valid JSON: {error}"))
        })?;
        let Value::Object(object) = value else {
            return Err(ApiError::bad_request(format!(
                "expected a JSON object, got {}",
                kind(&value)
            )));
        };
        let name = optional_string(&object, "name")?.ok_or_else(|| {
            ApiError::bad_request("name is missing: not a Superset webhook payload")
        })?;
        let header = match object.get("header") {
            None | Some(Value::Null) => None,
            Some(header @ Value::Object(_)) => Some(header.clone()),
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "header must be an object, got {}",
                    kind(other)
                )));
            }
        };
        Ok(Self {
            name,
            header,
            text: optional_string(&object, "text")?,
            description: optional_string(&object, "description")?,
            url: optional_string(&object, "url")?,
            files: Vec::new(),
        })
    }

    /// The multipart body Superset sends for a notification with files.
    ///
    /// # Errors
    /// 400 when `name` is missing, a field is not UTF-8, `header` is not JSON, or a `files`
    /// part has no file name. Other parts are ignored.
    fn from_parts(parts: Vec<Part>) -> Result<Self, ApiError> {
        let mut payload = Self::default();
        let mut name = None;
        for part in parts {
            match part.name.as_str() {
                "name" => name = Some(part.text()?),
                "header" => {
                    let text = part.text()?;
                    payload.header = Some(serde_json::from_str(&text).map_err(|error| {
                        ApiError::bad_request(format!("header is not valid JSON: {error}"))
                    })?);
                }
                "text" => payload.text = Some(part.text()?),
                "description" => payload.description = Some(part.text()?),
                "url" => payload.url = Some(part.text()?),
                "files" => payload.files.push(UploadedFile {
                    file_name: part.file_name.clone(),
                    // Superset names every export report.csv, report.pdf, …: the relay names
                    // them after the report, as it names screenshots.
                    keep_name: false,
                    content_type: part.content_type.clone().unwrap_or_default(),
                    bytes: part.bytes,
                }),
                _ => {}
            }
        }
        payload.name = name.ok_or_else(|| {
            ApiError::bad_request("name is missing: not a Superset webhook payload")
        })?;
        Ok(payload)
    }

    /// SHA-256 (hex) of the decoded fields and files, the same for every framing of the same
    /// notification.
    pub fn content_sha256(&self) -> String {
        let mut hash = ContentHash::new("superset_webhook");
        hash.value(self.name.as_bytes());
        // serde_json's maps are sorted: the same header always serialises the same way.
        let header = self.header.as_ref().map(Value::to_string);
        hash.optional(header.as_deref().map(str::as_bytes))
            .optional(self.text.as_deref().map(str::as_bytes))
            .optional(self.description.as_deref().map(str::as_bytes))
            .optional(self.url.as_deref().map(str::as_bytes));
        for file in &self.files {
            hash.optional(file.file_name.as_deref().map(str::as_bytes))
                .value(file.content_type.as_bytes())
                .value(&Sha256::digest(&file.bytes));
        }
        hash.hex()
    }

    /// The report: title from `name`, the description and an error's `text` under it, the
    /// `url` as the link, the files in order.
    pub fn upload(self) -> Upload {
        let description = [self.description, self.text]
            .into_iter()
            .flatten()
            .map(|text| text.trim().to_owned())
            .filter(|text| !text.is_empty())
            .collect::<Vec<_>>()
            .join("\n\n");
        Upload {
            title: self.name,
            titled: true,
            description,
            link: self.url,
            files: self.files,
        }
    }

    /// The payload of a request body framed as `framing`.
    async fn read(
        framing: Framing,
        parts: axum::http::request::Parts,
        bytes: Bytes,
    ) -> Result<Self, ApiError> {
        match framing {
            Framing::Json => Self::from_json(&bytes),
            Framing::Multipart => Self::from_parts(body::multipart(parts, bytes).await?),
        }
    }
}

/// The enabled-or-not mailbox row whose `webhook_token` is `token`, comparing the SHA-256 of
/// every row's token with the presented one's in constant time (no early exit), so neither the
/// position nor a common prefix of a valid token can be timed.
pub fn route<'s>(snapshot: &'s Snapshot, token: &str) -> Option<&'s Mailbox> {
    let presented = Sha256::digest(token.as_bytes());
    let mut found = None;
    for row in &snapshot.mailboxes {
        let Some(expected) = row.webhook_token.as_deref() else {
            continue;
        };
        let matches: bool = Sha256::digest(expected.as_bytes()).ct_eq(&presented).into();
        if matches && found.is_none() && !row.email.is_empty() {
            found = Some(row);
        }
    }
    found
}

/// The handler.
pub(super) async fn handle(
    State(ingest): State<Ingest>,
    token: Result<Path<String>, axum::extract::rejection::PathRejection>,
    request: Request,
) -> Response {
    match receive(&ingest, token.map(|Path(t)| t).unwrap_or_default(), request).await {
        Ok(answer) => answer,
        Err(error) => error.into_response(),
    }
}

async fn receive(ingest: &Ingest, token: String, request: Request) -> Result<Response, ApiError> {
    let received_at = SystemTime::now();
    let (relay, snapshot) = ingest.ready().await?;
    let Some(row) = route(&snapshot, &token) else {
        // Never the token itself: it is a secret, and a wrong one may be one digit off.
        tracing::warn!(
            source = Source::SupersetWebhook.as_str(),
            "A webhook request with an unknown token; answering 404."
        );
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown webhook token",
        ));
    };
    let mailbox = row.email.clone();
    let route_id = row.row_id.clone();
    drop(token);
    ingest.count_received(&mailbox, Source::SupersetWebhook);
    let (parts, bytes, _turn) = ingest.read_body(request).await?;
    let framing = body::framing(&parts)?;
    let payload = Payload::read(framing, parts, bytes).await?;
    let content_sha256 = payload.content_sha256();
    let dedupe_key = ContentHash::new("superset_webhook route")
        .value(route_id.as_bytes())
        .value(content_sha256.as_bytes())
        .hex();
    let report = Report::from_upload(payload.upload()).map_err(|error| {
        tracing::warn!(source = Source::SupersetWebhook.as_str(), %mailbox, %error, "A webhook report with a broken file; answering 400.");
        ApiError::bad_request(error.to_string())
    })?;
    let relayed = relay
        .relay_report(Ingested {
            mailbox: mailbox.clone(),
            report,
            source: Source::SupersetWebhook,
            content_sha256,
            dedupe_key: Some(dedupe_key),
            dedupe_window: ingest.inner.dedupe_window,
            received_at,
        })
        .await
        .map_err(|error| not_stored(Source::SupersetWebhook, &mailbox, &error))?;
    Ok((
        StatusCode::OK,
        axum::Json(json!({
            "status": relayed.outcome.as_str(),
            "duplicate": relayed.duplicate,
            "message_id": relayed.message_id,
            "recipients": relayed.recipients,
        })),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_without_files_is_read_as_superset_writes_it() {
        let body = br#"{"name": "Daily KPIs", "header": {"notification_format": "PNG", "notification_type": "Report", "notification_source": "dashboard", "chart_id": null, "dashboard_id": 7}, "text": null, "description": "Numbers", "url": "https://superset.example.com/superset/dashboard/7/"}"#;
        let payload = Payload::from_json(body).unwrap();
        assert_eq!(payload.name, "Daily KPIs");
        assert_eq!(payload.header.as_ref().unwrap()["dashboard_id"], 7);
        let upload = payload.upload();
        assert_eq!(upload.description, "Numbers");
        assert_eq!(
            upload.link.as_deref(),
            Some("https://superset.example.com/superset/dashboard/7/")
        );
    }

    #[test]
    fn malformed_json_is_a_400_naming_the_problem() {
        for (body, expected) in [
            (&b"{"[..], "not valid JSON"),
            (b"[1, 2]", "expected a JSON object, got an array"),
            (b"{\"header\": {}}", "name is missing"),
            (
                b"{\"name\": 5}",
                "name must be a string or null, got a number",
            ),
            (
                b"{\"name\": \"x\", \"header\": \"y\"}",
                "header must be an object",
            ),
        ] {
            let error = Payload::from_json(body).unwrap_err();
            assert_eq!(error.status, StatusCode::BAD_REQUEST);
            assert!(error.message.contains(expected), "{}", error.message);
        }
    }

    #[test]
    fn the_content_hash_ignores_framing_but_not_content() {
        let mut a = Payload::from_json(br#"{"name": "x", "header": {"b": 1, "a": 2}}"#).unwrap();
        let b = Payload::from_json(br#"{"header": {"a": 2, "b": 1}, "name": "x"}"#).unwrap();
        assert_eq!(a.content_sha256(), b.content_sha256());
        a.description = Some(String::new());
        assert_ne!(a.content_sha256(), b.content_sha256());
    }
}
