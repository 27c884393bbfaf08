//! Reading an ingest request's body: within `http.max_body_bytes` (413 beyond it) and
//! [`super::BODY_TIMEOUT`], as JSON or `multipart/form-data` (its parts, in order), and the
//! content hash that names what a request carried independently of how it was framed.

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use sha2::{Digest, Sha256};

use super::{ApiError, BODY_TIMEOUT};

/// How a body is framed, from its `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Framing {
    /// `application/json` (or any `+json`).
    Json,
    /// `multipart/form-data`.
    Multipart,
}

/// The framing of `parts`, or 415 naming what is accepted.
pub(super) fn framing(parts: &Parts) -> Result<Framing, ApiError> {
    let content_type = parts
        .headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if essence == "multipart/form-data" {
        Ok(Framing::Multipart)
    } else if essence == "application/json" || essence.ends_with("+json") {
        Ok(Framing::Json)
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "expected Content-Type application/json or multipart/form-data, got {:?}",
                content_type.chars().take(100).collect::<String>()
            ),
        ))
    }
}

fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the request body is larger than {limit} bytes (http.max_body_bytes)"),
    )
}

/// Reads the whole body of `request`, at most `limit` bytes.
///
/// # Errors
/// 413 when the body (or its `Content-Length`) is larger than `limit`, 408 when it does not
/// arrive within [`BODY_TIMEOUT`], 400 when the connection breaks off.
pub(super) async fn read(request: Request, limit: usize) -> Result<(Parts, Bytes), ApiError> {
    let (parts, body) = request.into_parts();
    let declared = parts
        .headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(too_large(limit));
    }
    let collected = tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, limit).collect()).await;
    match collected {
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body did not arrive within {} s",
                BODY_TIMEOUT.as_secs()
            ),
        )),
        Ok(Err(error)) if error.downcast_ref::<LengthLimitError>().is_some() => {
            Err(too_large(limit))
        }
        Ok(Err(error)) => Err(ApiError::bad_request(format!(
            "cannot read the request body: {error}"
        ))),
        Ok(Ok(collected)) => Ok((parts, collected.to_bytes())),
    }
}

/// One part of a `multipart/form-data` body.
#[derive(Clone)]
pub(super) struct Part {
    /// The form field's name.
    pub name: String,
    /// Its `filename`, for a file.
    pub file_name: Option<String>,
    /// Its Content-Type, lowercase, without parameters.
    pub content_type: Option<String>,
    /// Its bytes.
    pub bytes: Bytes,
}

impl Part {
    /// The part as UTF-8 text.
    ///
    /// # Errors
    /// 400 naming the field when it is not UTF-8.
    pub fn text(&self) -> Result<String, ApiError> {
        String::from_utf8(self.bytes.to_vec()).map_err(|_| {
            ApiError::bad_request(format!("the field {} is not UTF-8 text", self.name))
        })
    }
}

/// The parts of a `multipart/form-data` body, in order.
///
/// # Errors
/// 400 for a body that is not valid multipart (no boundary, cut short, a part without a name).
pub(super) async fn multipart(parts: Parts, body: Bytes) -> Result<Vec<Part>, ApiError> {
    let request = Request::from_parts(parts, Body::from(body));
    let mut multipart = Multipart::from_request(request, &())
        .await
        .map_err(|rejection| ApiError::bad_request(rejection.body_text()))?;
    let mut out = Vec::new();
    loop {
        let field = multipart.next_field().await.map_err(|error| {
            ApiError::bad_request(format!("malformed multipart body: {}", error.body_text()))
        })?;
        let Some(field) = field else { break };
        let name = field
            .name()
            .map(str::to_owned)
            .ok_or_else(|| ApiError::bad_request("a multipart part has no name"))?;
        let file_name = field.file_name().map(str::to_owned);
        let content_type = field.content_type().map(|ct| {
            ct.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
        let bytes = field.bytes().await.map_err(|error| {
            ApiError::bad_request(format!("malformed multipart body: {}", error.body_text()))
        })?;
        out.push(Part {
            name,
            file_name,
            content_type,
            bytes,
        });
    }
    Ok(out)
}

/// SHA-256 over named values, each framed by its length: what a request carried, the same
/// whatever multipart boundary (a new random one on each of Superset's retries) framed it.
#[derive(Clone, Default)]
pub(super) struct ContentHash(Sha256);

impl ContentHash {
    /// A hash whose first value is `kind` (e.g. `superset_webhook`).
    pub fn new(kind: &str) -> Self {
        let mut hash = Self::default();
        hash.value(kind.as_bytes());
        hash
    }

    /// Adds one value.
    pub fn value(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.update((bytes.len() as u64).to_be_bytes());
        self.0.update(bytes);
        self
    }

    /// Adds an optional value (absent and empty differ).
    pub fn optional(&mut self, bytes: Option<&[u8]>) -> &mut Self {
        match bytes {
            None => self.value(b"\0absent"),
            Some(bytes) => self.value(b"\0present").value(bytes),
        }
    }

    /// The hash, lowercase hex.
    pub fn hex(&self) -> String {
        hex::encode(self.0.clone().finalize())
    }
}
