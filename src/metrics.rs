//! Prometheus metrics, served as text at `GET /metrics`.
//!
//! One [`Metrics`] value is built by the composition root and shared (`Arc`) with every task;
//! there is no global registry.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Labels `(name, value)` pairs; the families below document theirs.
pub type Labels = Vec<(&'static str, String)>;

/// Every metric the relay exports.
pub struct Metrics {
    registry: Registry,
    /// `report_relay_reports_received_total{mailbox,source}`: messages fetched from a mailbox
    /// (`source="imap"`) or received over HTTP (`superset_webhook`, `api`; counted once the
    /// route is known, before the body is read).
    pub reports_received: Family<Labels, Counter>,
    /// `report_relay_reports_acknowledged_total{mailbox,outcome,source}`: messages stored
    /// durably (and checkpointed); outcome is `queued`, `skipped`, `filtered` or `failed`,
    /// source `imap`, `superset_webhook` or `api`.
    pub reports_acknowledged: Family<Labels, Counter>,
    /// `report_relay_sends_total{method,result}`: Bot API sends by method and final result
    /// (`ok`, `failed`, `permanent`).
    pub sends: Family<Labels, Counter>,
    /// `report_relay_outbox_depth`: sends waiting in the outbox.
    pub outbox_depth: Gauge<i64, std::sync::atomic::AtomicI64>,
    /// `report_relay_watcher_state{mailbox,state}`: 1 for the current state of each watcher.
    pub watcher_state: Family<Labels, Gauge>,
    /// `report_relay_append_to_send_seconds`: from the message's arrival in the mailbox (IMAP
    /// INTERNALDATE, else the acknowledgement) to Telegram accepting a send.
    pub append_to_send_seconds: Histogram,
    /// `report_relay_ingest_to_send_seconds{source}`: from a report's arrival (the mailbox's
    /// INTERNALDATE for `imap`, the HTTP request for `superset_webhook` and `api`) to Telegram
    /// accepting a send, by ingest path.
    pub ingest_to_send_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    /// `report_relay_seatable_requests_total{status}`: SeaTable HTTP requests by status code
    /// (`error` for network failures).
    pub seatable_requests: Family<Labels, Counter>,
    /// `report_relay_telegram_requests_total{method,status}`: Bot API requests by outcome.
    pub telegram_requests: Family<Labels, Counter>,
    /// `report_relay_directory_age_seconds`: set from the directory at each scrape.
    pub directory_age_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// `report_relay_leases_held{kind}`: leases this replica holds, by kind (`mailbox`,
    /// `delivery`, `updates`); set at each scrape.
    pub leases_held: Family<Labels, Gauge>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Sets `report_relay_leases_held{kind}` from the names of the leases held now.
    pub fn set_leases_held(&self, leases: &[String]) {
        for kind in ["mailbox", "delivery", "updates"] {
            let count = leases
                .iter()
                .filter(|name| name.split(':').next() == Some(kind))
                .count();
            self.leases_held
                .get_or_create(&vec![("kind", kind.to_owned())])
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
    }

    /// Registers every family.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("report_relay");
        let reports_received = Family::<Labels, Counter>::default();
        registry.register(
            "reports_received",
            "Messages fetched from a mailbox",
            reports_received.clone(),
        );
        let reports_acknowledged = Family::<Labels, Counter>::default();
        registry.register(
            "reports_acknowledged",
            "Messages stored durably with their checkpoint, by outcome",
            reports_acknowledged.clone(),
        );
        let sends = Family::<Labels, Counter>::default();
        registry.register(
            "sends",
            "Bot API sends by method and final result",
            sends.clone(),
        );
        let outbox_depth = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
        registry.register(
            "outbox_depth",
            "Sends waiting in the outbox",
            outbox_depth.clone(),
        );
        let watcher_state = Family::<Labels, Gauge>::default();
        registry.register(
            "watcher_state",
            "1 for the current state of each mailbox watcher",
            watcher_state.clone(),
        );
        let append_to_send_seconds =
            Histogram::new([0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0]);
        registry.register(
            "append_to_send_seconds",
            "Seconds from a message's arrival in the mailbox to Telegram accepting a send",
            append_to_send_seconds.clone(),
        );
        let ingest_to_send_seconds =
            Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(|| {
                Histogram::new([
                    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0,
                    1800.0,
                ])
            });
        registry.register(
            "ingest_to_send_seconds",
            "Seconds from a report's arrival (mailbox or HTTP request) to Telegram accepting a send, by source",
            ingest_to_send_seconds.clone(),
        );
        let seatable_requests = Family::<Labels, Counter>::default();
        registry.register(
            "seatable_requests",
            "SeaTable HTTP requests by status",
            seatable_requests.clone(),
        );
        let directory_age_seconds = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "directory_age_seconds",
            "Seconds since the directory snapshot in use was read from SeaTable",
            directory_age_seconds.clone(),
        );
        let leases_held = Family::<Labels, Gauge>::default();
        registry.register(
            "leases_held",
            "Leases this replica holds, by kind",
            leases_held.clone(),
        );
        let telegram_requests = Family::<Labels, Counter>::default();
        registry.register(
            "telegram_requests",
            "Telegram Bot API requests by method and status",
            telegram_requests.clone(),
        );
        Self {
            registry,
            reports_received,
            reports_acknowledged,
            sends,
            outbox_depth,
            watcher_state,
            append_to_send_seconds,
            ingest_to_send_seconds,
            seatable_requests,
            telegram_requests,
            directory_age_seconds,
            leases_held,
        }
    }

    /// Counts one SeaTable request that ended with HTTP `status` (`None`: network error).
    pub fn seatable_request(&self, status: Option<u16>) {
        let status = status.map_or_else(|| "error".to_owned(), |s| s.to_string());
        self.seatable_requests
            .get_or_create(&vec![("status", status)])
            .inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
