//! HTTP ingest: reports that arrive over HTTP instead of e-mail, beside the IMAP watchers at the
//! start of the pipeline.
//!
//! - [`superset`]: `POST /ingest/superset/{token}`, Superset's own webhook notification
//!   (`superset/reports/notifications/webhook.py`), routed by a mailbox row's `webhook_token`.
//! - [`api`]: `POST /api/v1/messages` and `GET /api/v1/messages/{id}`, the authenticated send
//!   API for other systems, and `/api/v1/openapi.json`.
//! - `body`: reading a body within `http.max_body_bytes` and a deadline, multipart parts, the
//!   content hash that names a request.
//!
//! Both build a [`crate::report::Report`] and hand it to [`Relay::relay_report`], the same plan,
//! recipients and acknowledging transaction as an e-mail: a request is answered 200 (or 202)
//! only once the message and its outbox rows are committed. Until the directory has loaded, or
//! while the state cannot be written, the answer is 503 (Superset retries 5xx); bad input gets
//! a 4xx with a JSON `{"error": "..."}` body. Tokens are compared in constant time and never
//! logged.

pub mod api;
mod body;
pub mod superset;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::config::HttpConfig;
use crate::directory::{Directory, Snapshot};
use crate::metrics::Metrics;
use crate::relay::Relay;
pub use crate::state::Source;
use crate::state::State;

/// How long a client may take to send its request body.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(120);

/// An HTTP error answer: the status and a JSON body `{"error": "..."}` (plus `Retry-After` on
/// 429 and 503).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The status code.
    pub status: StatusCode,
    /// What went wrong, for the client; never a token.
    pub message: String,
    /// Seconds for `Retry-After`.
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// An error answer with `status` and `message`.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    /// 400 Bad Request.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// 503 Service Unavailable with `Retry-After: 5`: the client should try again.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            retry_after: Some(5),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            axum::Json(serde_json::json!({ "error": self.message })),
        )
            .into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// What the ingest endpoints share; cheap to clone.
#[derive(Clone)]
pub struct Ingest {
    inner: Arc<Inner>,
}

struct Inner {
    /// Set once the directory has loaded and the relay exists ([`Ingest::set_relay`]).
    relay: OnceLock<Arc<Relay>>,
    directory: Arc<Directory>,
    state: State,
    metrics: Arc<Metrics>,
    max_body_bytes: usize,
    dedupe_window: Duration,
    api: api::Clients,
    /// At most [`BODIES_IN_MEMORY`] request bodies are read and handled at once, so memory
    /// stays under that many times `http.max_body_bytes` however many clients post.
    bodies: Arc<tokio::sync::Semaphore>,
}

/// How many request bodies the ingest endpoints hold in memory at once; more requests wait
/// up to [`BODY_QUEUE_TIMEOUT`] for a turn, then get 503 with `Retry-After` (Superset retries).
pub const BODIES_IN_MEMORY: usize = 8;
/// How long a request waits for a turn to read its body.
pub const BODY_QUEUE_TIMEOUT: Duration = Duration::from_secs(30);

impl std::fmt::Debug for Ingest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ingest")
    }
}

impl Ingest {
    /// The ingest endpoints of `config` (`http.max_body_bytes`, `http.dedupe_window_secs`,
    /// `http.api_tokens`), answering 503 until [`Ingest::set_relay`].
    pub fn new(
        config: &HttpConfig,
        directory: Arc<Directory>,
        state: State,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                relay: OnceLock::new(),
                directory,
                state,
                metrics,
                max_body_bytes: usize::try_from(config.max_body_bytes).unwrap_or(usize::MAX),
                dedupe_window: Duration::from_secs(config.dedupe_window_secs),
                api: api::Clients::new(&config.api_tokens),
                bodies: Arc::new(tokio::sync::Semaphore::new(BODIES_IN_MEMORY)),
            }),
        }
    }

    /// Starts taking reports: the directory has loaded and `relay` is the one the watchers use.
    pub fn set_relay(&self, relay: Arc<Relay>) {
        let _ = self.inner.relay.set(relay);
    }

    /// The routes: `POST /ingest/superset/{token}`, `POST /api/v1/messages`,
    /// `GET /api/v1/messages/{id}`, `GET /api/v1/openapi.json`.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/ingest/superset/{token}", post(superset::handle))
            .route("/api/v1/messages", post(api::send))
            .route("/api/v1/messages/{id}", get(api::status))
            .route("/api/v1/openapi.json", get(api::openapi))
            // The handlers read bodies themselves, within `http.max_body_bytes`.
            .layer(DefaultBodyLimit::disable())
            .with_state(self.clone())
    }

    /// The relay and the directory snapshot, or 503 while the directory has never loaded.
    async fn ready(&self) -> Result<(Arc<Relay>, Arc<Snapshot>), ApiError> {
        let starting =
            || ApiError::unavailable("the relay is starting: its directory has not loaded yet");
        let relay = self.inner.relay.get().cloned().ok_or_else(starting)?;
        let snapshot = self.inner.directory.snapshot().await.ok_or_else(starting)?;
        Ok((relay, snapshot))
    }

    /// Reads the request's body within `http.max_body_bytes` once it is its turn (one of
    /// [`BODIES_IN_MEMORY`]); the permit is held while the caller handles the body.
    ///
    /// # Errors
    /// 503 when no turn came within [`BODY_QUEUE_TIMEOUT`]; what [`body::read`] returns.
    async fn read_body(
        &self,
        request: axum::extract::Request,
    ) -> Result<
        (
            axum::http::request::Parts,
            axum::body::Bytes,
            tokio::sync::OwnedSemaphorePermit,
        ),
        ApiError,
    > {
        let permit = tokio::time::timeout(
            BODY_QUEUE_TIMEOUT,
            self.inner.bodies.clone().acquire_owned(),
        )
        .await
        .ok()
        .and_then(Result::ok)
        .ok_or_else(|| ApiError::unavailable("too many requests are being read; try again"))?;
        let (parts, bytes) = body::read(request, self.inner.max_body_bytes).await?;
        Ok((parts, bytes, permit))
    }

    fn count_received(&self, mailbox: &str, source: Source) {
        self.inner
            .metrics
            .reports_received
            .get_or_create(&vec![
                ("mailbox", mailbox.to_owned()),
                ("source", source.as_str().to_owned()),
            ])
            .inc();
    }
}

/// The answer when the relay could not store a report: nothing was acknowledged, so the
/// client must retry (Superset does on a 5xx).
fn not_stored(source: Source, mailbox: &str, error: &anyhow::Error) -> ApiError {
    tracing::error!(
        source = source.as_str(),
        mailbox,
        error = format!("{error:#}"),
        "Cannot store a report that came over HTTP; answering 503 so that the client retries."
    );
    ApiError::unavailable("the report could not be stored; retry later")
}
