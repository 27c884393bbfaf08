//! The HTTP endpoints: `GET /healthz`, `GET /readyz` and `GET /metrics` (interface.md "HTTP").

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::State as AxumState;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// A mailbox with no successful catch-up for this long makes `/readyz` answer 503
/// (interface.md), unless one IDLE round may last longer (`imap.idle_renew_secs` + 60 s).
pub const CATCH_UP_STALE_AFTER: Duration = Duration::from_secs(600);

/// One mailbox's health, for `/readyz`.
#[derive(Debug, Clone, Serialize)]
pub struct MailboxHealth {
    /// The mailbox address.
    pub mailbox: String,
    /// `connecting`, `idle`, `polling` or `backoff`.
    pub state: String,
    /// The last error, in `backoff`.
    pub last_error: Option<String>,
    /// The last successful catch-up, RFC 3339, or null.
    #[serde(serialize_with = "rfc3339")]
    pub last_catch_up: Option<SystemTime>,
    /// When the watcher started (for the 10-minute rule before a first catch-up).
    #[serde(skip)]
    pub started_at: SystemTime,
    /// How long without a catch-up makes it stale: [`CATCH_UP_STALE_AFTER`], or longer when
    /// one IDLE round may last longer.
    #[serde(skip)]
    pub stale_after: Duration,
}

fn rfc3339<S: serde::Serializer>(time: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match time {
        Some(time) => {
            let time: chrono::DateTime<chrono::Utc> = (*time).into();
            s.serialize_str(&time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        }
        None => s.serialize_none(),
    }
}

/// What `/readyz` looks at.
pub trait HealthSource: Send + Sync + 'static {
    /// Whether the directory is loaded (from SeaTable or the persisted snapshot).
    fn directory_loaded(&self) -> bool;
    /// Every enabled mailbox being watched.
    fn mailboxes(&self) -> Vec<MailboxHealth>;
}

/// The `/readyz` body.
#[derive(Debug, Serialize)]
pub struct Readiness {
    /// Whether the answer is 200.
    pub ready: bool,
    /// Whether the directory is loaded.
    pub directory_loaded: bool,
    /// Each mailbox.
    pub mailboxes: Vec<MailboxHealth>,
}

/// Works out readiness at `now`: the directory is loaded and every mailbox has completed a
/// catch-up since start, none longer ago than [`CATCH_UP_STALE_AFTER`].
pub fn readiness(source: &dyn HealthSource, now: SystemTime) -> Readiness {
    let directory_loaded = source.directory_loaded();
    let mailboxes = source.mailboxes();
    let fresh = |m: &MailboxHealth| {
        m.last_catch_up.is_some_and(|t| {
            t >= m.started_at && now.duration_since(t).unwrap_or_default() < m.stale_after
        })
    };
    let ready = directory_loaded && mailboxes.iter().all(fresh);
    Readiness {
        ready,
        directory_loaded,
        mailboxes,
    }
}

#[derive(Clone)]
struct AppState {
    health: Arc<dyn HealthSource>,
    metrics: Arc<Metrics>,
}

/// The router, for tests and [`serve`].
pub fn router(health: Arc<dyn HealthSource>, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(AppState { health, metrics })
}

async fn readyz(AxumState(app): AxumState<AppState>) -> impl IntoResponse {
    let body = readiness(app.health.as_ref(), SystemTime::now());
    let status = if body.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body))
}

async fn metrics_text(AxumState(app): AxumState<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.metrics.render(),
    )
}

/// Binds `listen` and serves until `cancel` fires.
///
/// # Errors
/// The address cannot be bound.
pub async fn serve(
    listen: SocketAddr,
    health: Arc<dyn HealthSource>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("Cannot listen on {listen} (http.listen): {e}"))?;
    tracing::info!(%listen, "Serving /healthz, /readyz and /metrics.");
    axum::serve(listener, router(health, metrics))
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(bool, Vec<MailboxHealth>);
    impl HealthSource for Fixed {
        fn directory_loaded(&self) -> bool {
            self.0
        }
        fn mailboxes(&self) -> Vec<MailboxHealth> {
            self.1.clone()
        }
    }

    fn mailbox(started: SystemTime, caught_up: Option<SystemTime>) -> MailboxHealth {
        MailboxHealth {
            mailbox: "a@example.com".into(),
            state: "idle".into(),
            last_error: None,
            last_catch_up: caught_up,
            started_at: started,
            stale_after: CATCH_UP_STALE_AFTER,
        }
    }

    #[test]
    fn ready_needs_directory_and_a_recent_catch_up_everywhere() {
        let now = SystemTime::now();
        let start = now - Duration::from_secs(60);
        assert!(readiness(&Fixed(true, vec![mailbox(start, Some(now))]), now).ready);
        assert!(!readiness(&Fixed(false, vec![mailbox(start, Some(now))]), now).ready);
        assert!(!readiness(&Fixed(true, vec![mailbox(start, None)]), now).ready);
        let stale = now - Duration::from_secs(601);
        assert!(
            !readiness(
                &Fixed(
                    true,
                    vec![mailbox(start - Duration::from_secs(900), Some(stale))]
                ),
                now
            )
            .ready
        );
        assert!(readiness(&Fixed(true, vec![]), now).ready);
    }
}
