//! The HTTP listener and its health endpoints: `GET /healthz`, `GET /readyz` and `GET /metrics`
//! (interface.md "HTTP"), over plain HTTP or TLS ([`tls`], `http.tls`). The ingest endpoints
//! (`/ingest/superset/{token}`, `/api/v1/…`) are [`crate::ingest`]'s router, merged in by the
//! composition root.

pub mod tls;

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
    /// How long ago the directory snapshot in use was read from SeaTable (`None`: none yet).
    fn directory_age(&self) -> Option<std::time::Duration> {
        None
    }
    /// Why the relay refuses to write to SeaTable (a missing column), if it does.
    fn schema_problem(&self) -> Option<String> {
        None
    }
    /// This replica's id and leases (`None` before start-up has them).
    fn replica(&self) -> Option<ReplicaHealth> {
        None
    }
}

/// The `replica` object of `/readyz`.
#[derive(Debug, Clone, Serialize)]
pub struct ReplicaHealth {
    /// `state.replica_id`.
    pub id: String,
    /// The leases held now, sorted: `delivery`, `mailbox:<address>`, `updates`.
    pub leases: Vec<String>,
    /// Whether the last lease round reached the state database; the answer is 503 when not.
    #[serde(skip)]
    pub state_reachable: bool,
}

/// The `/readyz` body.
#[derive(Debug, Serialize)]
pub struct Readiness {
    /// Whether the answer is 200.
    pub ready: bool,
    /// Whether the directory is loaded.
    pub directory_loaded: bool,
    /// Seconds since the directory snapshot in use was read from SeaTable; it grows while
    /// SeaTable is down and reports are served from the last good snapshot.
    pub directory_age_seconds: Option<u64>,
    /// Why SeaTable writes are refused (the base lacks a column): then the answer is 503.
    pub schema_problem: Option<String>,
    /// Each mailbox this replica watches.
    pub mailboxes: Vec<MailboxHealth>,
    /// This replica: its id and the leases it holds. A replica holding none is still ready.
    pub replica: Option<ReplicaHealth>,
    /// Whether the state database answers (`false`: PostgreSQL is unreachable; 503).
    pub state_reachable: bool,
}

/// Works out readiness at `now`: the directory is loaded, SeaTable writes are not refused for a
/// missing column, and every mailbox has completed a catch-up since start, none longer ago than [`CATCH_UP_STALE_AFTER`].
pub fn readiness(source: &dyn HealthSource, now: SystemTime) -> Readiness {
    let directory_loaded = source.directory_loaded();
    let mailboxes = source.mailboxes();
    let fresh = |m: &MailboxHealth| {
        m.last_catch_up.is_some_and(|t| {
            t >= m.started_at && now.duration_since(t).unwrap_or_default() < m.stale_after
        })
    };
    let schema_problem = source.schema_problem();
    let replica = source.replica();
    let state_reachable = replica.as_ref().is_none_or(|r| r.state_reachable);
    let ready = directory_loaded
        && state_reachable
        && schema_problem.is_none()
        && mailboxes.iter().all(fresh);
    Readiness {
        ready,
        directory_loaded,
        directory_age_seconds: source.directory_age().map(|age| age.as_secs()),
        schema_problem,
        mailboxes,
        replica,
        state_reachable,
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
    if let Some(age) = app.health.directory_age() {
        app.metrics.directory_age_seconds.set(age.as_secs_f64());
    }
    if let Some(replica) = app.health.replica() {
        app.metrics.set_leases_held(&replica.leases);
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.metrics.render(),
    )
}

/// Binds `listen` (`http.listen`). Start-up calls this before anything else runs, so an
/// address in use fails the start instead of leaving a service without health endpoints.
///
/// # Errors
/// The address cannot be bound (in use, not local, no permission), naming it.
pub async fn bind(listen: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("Cannot listen on {listen} (http.listen): {e}"))
}

/// Serves `app` on `listener` (from [`bind`]) until `cancel` fires: plain HTTP, or TLS with
/// `tls`'s certificate (reloaded on SIGHUP and when its files change).
///
/// # Errors
/// The server failed while running.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    tls: Option<Arc<tls::ReloadingCert>>,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let listen = listener.local_addr()?;
    let shutdown = {
        let cancel = cancel.clone();
        async move { cancel.cancelled().await }
    };
    match tls {
        None => {
            tracing::info!(%listen, "Serving HTTP: /healthz, /readyz, /metrics, the ingest endpoints.");
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await?;
        }
        Some(cert) => {
            tracing::info!(%listen, "Serving HTTPS: /healthz, /readyz, /metrics, the ingest endpoints.");
            let config = cert.server_config()?;
            tokio::spawn(cert.watch(cancel.clone()));
            let listener = tls::TlsListener::new(listener, config, cancel.clone())?;
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await?;
        }
    }
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

    struct Aged(Duration);
    impl HealthSource for Aged {
        fn directory_loaded(&self) -> bool {
            true
        }
        fn mailboxes(&self) -> Vec<MailboxHealth> {
            Vec::new()
        }
        fn directory_age(&self) -> Option<Duration> {
            Some(self.0)
        }
    }

    #[tokio::test]
    async fn the_directory_age_is_in_readyz_and_metrics() {
        let health: Arc<dyn HealthSource> = Arc::new(Aged(Duration::from_secs(95)));
        let body = readiness(health.as_ref(), SystemTime::now());
        assert_eq!(body.directory_age_seconds, Some(95));
        let app = AppState {
            health,
            metrics: Arc::new(Metrics::new()),
        };
        let response = metrics_text(AxumState(app)).await.into_response();
        let text = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&text);
        assert!(
            text.contains("report_relay_directory_age_seconds 95.0"),
            "{text}"
        );
    }
}
