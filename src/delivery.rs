//! The delivery worker: drains the outbox into the Telegram Bot API.
//!
//! - **Order:** a chat gets its sends one at a time, in outbox order; different chats are sent to
//!   concurrently, up to `delivery.concurrency` in flight.
//! - **Limits** (Bots FAQ, "My bot is hitting limits"): the [`Pacer`] spaces sends so that
//!   every sliding window keeps `telegram.limits`. A row is taken from the outbox only when the
//!   pacer admits it, so no task holds a claimed row while it waits, and what is in flight is
//!   about `global_per_second × round-trip` (the most a `kill -9` can make Telegram repeat).
//! - **Uploads:** each file is uploaded once; the `file_id` Telegram returns is stored in the
//!   state and used for every later recipient, also after a restart (Bot API "Sending files").
//!   While a file's first send is in flight, other rows needing that file stay in the outbox
//!   and leave the slots to other reports; a timed-out upload may have been delivered, so it is
//!   retried at most [`MAYBE_DELIVERED_ATTEMPTS`] times.
//! - **Errors** (Bot API error descriptions, `telegram-bot-api` `Client.cpp`): 429 waits
//!   `retry_after` for that chat and pauses the others for a moment; a group upgraded to a supergroup is re-sent to
//!   `migrate_to_chat_id` at once and the directory is told; blocked, kicked, not a member,
//!   chat not found and missing rights fail that recipient for good;
//!   `PHOTO_INVALID_DIMENSIONS` resends as a document; 5xx and network errors retry with
//!   jittered backoff until `delivery.give_up_after_secs`, then the send is marked failed and
//!   logged at ERROR.
//! - **Albums** are all or nothing, so a failed `sendMediaGroup` is sent again whole: TDLib
//!   sends an album as one `messages.sendMultiMedia`; when one item fails, the others fail with
//!   "Group send failed", the Bot API deletes each failed message and answers with one error
//!   (`telegram-bot-api` `Client::on_message_send_failed`). The `#k` in `Failed to send message
//!   #k` counts the answers before that error, not delivered items.
//! - **Crash safety:** a row is marked done the moment Telegram accepts it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use secrecy::{ExposeSecret, SecretString};
use teloxide::prelude::*;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::alerts::Alerts;
use crate::config::TelegramLimits;
use crate::metrics::Metrics;
use crate::report::render::ItemKind;
use crate::state::{OutboxRow, OutboxSend, SendResult, Source, State};

mod admission;
mod classify;
mod limits;
mod request;

pub use self::classify::{Failure, classify, classify_description};
pub use self::limits::Pacer;

use self::admission::{Admission, FileKey, Files, Finished, InFlight};
use self::classify::{recipient_unreachable, topic_unusable};
use self::request::as_documents;

/// How the directory hears about chats the worker learned something about.
pub trait ChatEvents: Send + Sync + 'static {
    /// A basic group became a supergroup: `old` is now `new` (Bot API `migrate_to_chat_id`).
    /// The handler moves the pending sends of `old` to `new` and rewrites the group's
    /// `id_telegram_chat` (keeping its lock).
    fn chat_migrated(&self, old: i64, new: i64) -> BoxFuture<'_, anyhow::Result<()>>;
}

/// Builds the `Bot` used for sending, with a client whose total timeout suits uploads of
/// `max_upload_bytes` (teloxide's default client gives up after 17 s).
///
/// Never `Debug`-print the returned `Bot`: teloxide's `Debug` shows the token.
///
/// # Errors
/// `api_url` is not a URL, or the HTTP client cannot be built.
pub fn sending_bot(
    token: &SecretString,
    api_url: &str,
    max_upload_bytes: u64,
) -> anyhow::Result<Bot> {
    // Assume at least 250 kB/s to Telegram (a slow office uplink), plus a minute for the reply;
    // a send that times out may still have been delivered (see MAYBE_DELIVERED_ATTEMPTS).
    let total = Duration::from_secs(60 + max_upload_bytes / 250_000);
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .timeout(total)
        .tcp_nodelay(true)
        .build()?;
    let url = reqwest::Url::parse(api_url)?;
    Ok(Bot::with_client(token.expose_secret(), client).set_api_url(url))
}

/// Finished sends, their messages and file bytes are kept this long (for inspection), then
/// pruned; checkpoints and `file_id`s are kept for good.
pub const RETENTION: Duration = Duration::from_secs(30 * 86_400);
/// How long a stopping worker waits for sends already in flight.
const IN_FLIGHT_GRACE: Duration = Duration::from_secs(15);
/// How often the state is pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// How far ahead of its start the worker takes a row the pacer admitted (the task sleeps the
/// rest). The worker wakes this long before the next row's instant, so the time a pass takes
/// (an outbox query) never delays a send and the schedule does not drift.
const ADMIT_LEAD: Duration = Duration::from_millis(25);
/// How far back a starting worker counts the sends done ([`DeliveryWorker::run`]): the longest
/// of Telegram's windows (20 messages a minute in a group).
const SEED_WINDOW: Duration = Duration::from_secs(60);
/// How many times a send whose request timed out is tried in all. A timeout after the upload
/// may mean Telegram delivered it and the answer was lost, so each retry may be a duplicate.
pub const MAYBE_DELIVERED_ATTEMPTS: u32 = 3;

/// The outbox worker. Build with [`DeliveryWorker::new`], run with [`DeliveryWorker::run`].
pub struct DeliveryWorker {
    inner: Arc<Inner>,
    concurrency: usize,
    wake: Arc<Notify>,
}

struct Inner {
    bot: Bot,
    state: State,
    pacer: Arc<Pacer>,
    metrics: Arc<Metrics>,
    events: Arc<dyn ChatEvents>,
    give_up_after: Duration,
    /// Whether this worker may still send (its replica holds the `delivery` lease), checked
    /// right before each send.
    may_send: Arc<dyn Fn() -> bool + Send + Sync>,
    /// Told about recipients that failed for good (`telegram.admin_chats`), when set.
    alerts: Option<Arc<Alerts>>,
}

/// The settings of a [`DeliveryWorker`].
#[derive(Debug, Clone)]
pub struct DeliverySettings {
    /// `delivery.concurrency`.
    pub concurrency: usize,
    /// `delivery.give_up_after_secs`.
    pub give_up_after: Duration,
    /// `telegram.limits`.
    pub limits: TelegramLimits,
}

impl DeliveryWorker {
    /// A worker sending with `bot` (see [`sending_bot`]). Returns it and the [`Notify`] to wake
    /// it when new rows are in the outbox.
    pub fn new(
        bot: Bot,
        state: State,
        settings: &DeliverySettings,
        metrics: Arc<Metrics>,
        events: Arc<dyn ChatEvents>,
    ) -> (Self, Arc<Notify>) {
        let wake = Arc::new(Notify::new());
        let worker = Self {
            inner: Arc::new(Inner {
                bot,
                state,
                pacer: Arc::new(Pacer::new(&settings.limits)),
                metrics,
                events,
                give_up_after: settings.give_up_after,
                may_send: Arc::new(|| true),
                alerts: None,
            }),
            concurrency: settings.concurrency.max(1),
            wake: wake.clone(),
        };
        (worker, wake)
    }

    /// This worker woken by `wake` instead of its own [`Notify`] (a worker started anew each
    /// time its replica takes the `delivery` lease keeps the watchers' handle).
    pub fn with_wake(mut self, wake: Arc<Notify>) -> Self {
        self.wake = wake;
        self
    }

    /// This worker sending only while `may_send` says so (checked right before each send, so
    /// a replica that lost its `delivery` lease, or was paused past it, sends nothing more);
    /// a row it does not send stays pending.
    pub fn sending_while(mut self, may_send: Arc<dyn Fn() -> bool + Send + Sync>) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.may_send = may_send;
        }
        self
    }

    /// This worker telling `alerts` about recipients that failed for good (refused by
    /// Telegram, or given up on).
    pub fn alerting(mut self, alerts: Option<Arc<Alerts>>) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.alerts = alerts;
        }
        self
    }

    /// Drains the outbox until `cancel` fires. In-flight sends are abandoned on cancellation
    /// (they stay pending and are sent again after a restart).
    pub async fn run(self, cancel: CancellationToken) {
        self.seed_pacer().await;
        let mut in_flight: JoinSet<Finished> = JoinSet::new();
        // Each task in flight; a chat is in here at most once.
        let mut busy: HashMap<tokio::task::Id, InFlight> = HashMap::new();
        let mut files = Files::default();
        let mut last_retain = tokio::time::Instant::now();
        // Prune a minute after start, then every PRUNE_EVERY.
        let mut next_prune = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let free = self.concurrency.saturating_sub(in_flight.len());
            let mut next_check = Duration::from_secs(30);
            if free > 0 {
                let admission = Arc::new(Mutex::new(Admission {
                    pacer: self.inner.pacer.clone(),
                    now: tokio::time::Instant::now(),
                    files: files.clone(),
                    starts: HashMap::new(),
                    next_ready: None,
                }));
                let judge = admission.clone();
                let due = self
                    .inner
                    .state
                    .due_sends(
                        SystemTime::now(),
                        busy.values().map(|b| b.chat_id).collect(),
                        busy.values().map(|b| b.row_id).collect(),
                        free,
                        move |row| {
                            judge
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner)
                                .admit(row)
                        },
                    )
                    .await;
                let (mut starts, next_ready) = {
                    let mut admission = admission
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    (std::mem::take(&mut admission.starts), admission.next_ready)
                };
                match due {
                    Ok(rows) => {
                        for row in rows {
                            let Some((start, uploads)) = starts.remove(&row.id) else {
                                continue;
                            };
                            let (chat_id, row_id) = (row.chat_id, row.id);
                            files.uploading.extend(uploads.iter().cloned());
                            let inner = self.inner.clone();
                            let task_uploads = uploads.clone();
                            let task = in_flight.spawn(async move {
                                inner.process(row, start, task_uploads).await
                            });
                            busy.insert(
                                task.id(),
                                InFlight {
                                    chat_id,
                                    row_id,
                                    uploads,
                                },
                            );
                        }
                    }
                    Err(error) => {
                        error!(error = format!("{error:#}"), "Cannot read the outbox.");
                        next_check = Duration::from_secs(1);
                    }
                }
                if let Some(ready) = next_ready {
                    let wake = ready.checked_sub(ADMIT_LEAD).unwrap_or(ready);
                    next_check =
                        next_check.min(wake.saturating_duration_since(tokio::time::Instant::now()));
                }
                if let Ok(Some(due)) = self.inner.state.next_due_at().await
                    && let Ok(wait) = due.duration_since(SystemTime::now())
                {
                    next_check = next_check.min(wait + Duration::from_millis(5));
                }
            }
            if let Ok(depth) = self.inner.state.pending_count().await {
                self.inner.metrics.outbox_depth.set(depth);
            }
            if last_retain.elapsed() > Duration::from_secs(60) {
                self.inner.pacer.retain_recent();
                // Forgotten files cost one serialized first send each, never an upload.
                files.resolved.clear();
                last_retain = tokio::time::Instant::now();
            }
            if tokio::time::Instant::now() >= next_prune {
                next_prune = tokio::time::Instant::now() + PRUNE_EVERY;
                match self.inner.state.prune(SystemTime::now() - RETENTION).await {
                    Ok(0) => {}
                    Ok(deleted) => info!(deleted, "Pruned old delivered work from the state."),
                    Err(error) => warn!(error = format!("{error:#}"), "Cannot prune the state."),
                }
            }
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                Some(done) = in_flight.join_next_with_id() => {
                    let id = match done {
                        Ok((id, finished)) => {
                            files.resolved.extend(finished.resolved);
                            id
                        }
                        Err(error) => {
                            // The row stays pending and is tried again on the next pass.
                            error!(%error, "A send task panicked.");
                            error.id()
                        }
                    };
                    if let Some(task) = busy.remove(&id) {
                        for key in &task.uploads {
                            files.uploading.remove(key);
                        }
                    }
                }
                () = self.wake.notified() => {}
                () = tokio::time::sleep(next_check) => {}
            }
        }
        // Let sends already talking to Telegram finish, so they are marked done and not sent
        // again after the restart; abort whatever is left after the grace period.
        if !in_flight.is_empty() {
            let finish = async { while in_flight.join_next().await.is_some() {} };
            if tokio::time::timeout(IN_FLIGHT_GRACE, finish).await.is_err() {
                warn!(
                    "Some sends did not finish in time; they stay pending and go again after the restart."
                );
            }
        }
        in_flight.shutdown().await;
        debug!("Delivery worker stopped.");
    }
}

impl DeliveryWorker {
    /// Counts the sends done in the last [`SEED_WINDOW`] in the pacer: Telegram's windows still
    /// hold them, whichever process sent them. A read error leaves the pacer empty (and is
    /// logged): the worst case is one 429, which the worker handles.
    async fn seed_pacer(&self) {
        let since = SystemTime::now() - SEED_WINDOW;
        match self.inner.state.recent_sends(since).await {
            Ok(sent) => {
                let (now, wall) = (tokio::time::Instant::now(), SystemTime::now());
                let count = sent.len();
                self.inner.pacer.seed(sent.into_iter().map(|send| {
                    let ago = wall.duration_since(send.finished_at).unwrap_or_default();
                    let at = now.checked_sub(ago).unwrap_or(now);
                    (send.chat_id, send.messages, at)
                }));
                if count > 0 {
                    info!(
                        sends = count,
                        "The pacer counts the sends of the last minute."
                    );
                }
            }
            Err(error) => warn!(
                error = format!("{error:#}"),
                "Cannot read the last minute's sends; the pacer starts empty."
            ),
        }
    }
}

impl Inner {
    /// Sends one outbox row at `start` (the instant the pacer reserved for it), records the
    /// outcome, and tells the worker which of `uploads` (its files without a known `file_id`)
    /// now have one.
    async fn process(
        &self,
        row: OutboxRow,
        start: tokio::time::Instant,
        uploads: Vec<FileKey>,
    ) -> Finished {
        self.pacer
            .start_at(row.chat_id, row.send.items.len(), start)
            .await;
        if !(self.may_send)() {
            debug!(
                outbox_row = row.id,
                "Not sending: the delivery lease is no longer held."
            );
            return Finished {
                resolved: Vec::new(),
            };
        }
        self.record(&row).await;
        // Only the files this send may have uploaded are news to the worker.
        let mut resolved = Vec::new();
        for key in uploads {
            if let Ok(Some(_)) = self.state.file_id(&key.0, key.1).await {
                resolved.push(key);
            }
        }
        Finished { resolved }
    }

    /// Sends one outbox row and records the outcome.
    async fn record(&self, row: &OutboxRow) {
        let chat_id = row.chat_id;
        let method = row.send.method;
        let result = self.send_with_recovery(chat_id, &row.send).await;
        let outcome = match result {
            Ok(()) => {
                if let Err(error) = self.state.finish_send(row.id, SendResult::Done).await {
                    error!(
                        chat_id,
                        error = format!("{error:#}"),
                        "Cannot mark a send done."
                    );
                }
                let latency = SystemTime::now()
                    .duration_since(row.received_at)
                    .unwrap_or_default();
                if row.source == Source::Imap {
                    self.metrics
                        .append_to_send_seconds
                        .observe(latency.as_secs_f64());
                }
                if row.source != Source::Alert {
                    self.metrics
                        .ingest_to_send_seconds
                        .get_or_create(&vec![("source", row.source.as_str().to_owned())])
                        .observe(latency.as_secs_f64());
                }
                info!(
                    chat_id,
                    method = method.as_str(),
                    source = row.source.as_str(),
                    latency_ms = latency.as_millis() as u64,
                    "Sent."
                );
                "ok"
            }
            Err(Failure::RetryAfter(wait)) => {
                warn!(
                    chat_id,
                    retry_after_secs = wait.as_secs(),
                    "Telegram asks this chat to wait."
                );
                self.pacer.penalize(chat_id, wait);
                let at = SystemTime::now() + wait;
                if let Err(error) = self
                    .state
                    .retry_send(
                        row.id,
                        at,
                        false,
                        format!("429: retry after {}s", wait.as_secs()),
                    )
                    .await
                {
                    error!(
                        chat_id,
                        error = format!("{error:#}"),
                        "Cannot reschedule a send."
                    );
                }
                "retry_after"
            }
            Err(Failure::AcceptedUnreadable(raw)) => {
                warn!(chat_id, %raw, "Telegram accepted a send but its answer could not be read; not sending it again.");
                if let Err(error) = self.state.finish_send(row.id, SendResult::Done).await {
                    error!(
                        chat_id,
                        error = format!("{error:#}"),
                        "Cannot mark a send done."
                    );
                }
                "ok"
            }
            Err(Failure::Permanent(reason)) => {
                let topic_gone =
                    row.send.options.message_thread_id.is_some() && topic_unusable(&reason);
                if let (true, Some(message_thread_id)) =
                    (topic_gone, row.send.options.message_thread_id)
                {
                    error!(chat_id, message_thread_id, %reason,
                           "The group's topic (t_chats.topic) was deleted or closed; this group gets nothing until the topic is fixed (never the General topic).");
                } else {
                    warn!(chat_id, %reason, "Telegram refused the send for good; not retrying.");
                }
                self.fail(row.id, &reason).await;
                // Only when the recipient itself (or its topic) is out of reach do the report's
                // other sends to it go too; a refused payload (a caption, a file) leaves the
                // rest alone.
                if (topic_gone || recipient_unreachable(&reason))
                    && let Err(error) = self
                        .state
                        .fail_rest_of_message(row.message_id, chat_id, reason.clone())
                        .await
                {
                    error!(
                        chat_id,
                        error = format!("{error:#}"),
                        "Cannot fail the rest of a message."
                    );
                }
                self.tell_admins(row, &reason, topic_gone).await;
                "permanent"
            }
            Err(failure) => {
                let maybe_delivered = matches!(failure, Failure::MaybeDelivered(_));
                let reason = match failure {
                    Failure::MaybeDelivered(reason) => reason,
                    Failure::Transient(reason)
                    | Failure::PhotoRefused(reason)
                    | Failure::StaleFileId(reason) => reason,
                    Failure::Migrated(id) => format!("migrated again to {id}"),
                    Failure::RetryAfter(_)
                    | Failure::Permanent(_)
                    | Failure::AcceptedUnreadable(_) => String::new(),
                };
                // Counted from the first failure, so a send that waited (a stopped relay, 429s)
                // still gets its retries.
                let age = row
                    .first_failed_at
                    .and_then(|first| SystemTime::now().duration_since(first).ok())
                    .unwrap_or_default();
                let give_up = if maybe_delivered && row.attempts + 1 >= MAYBE_DELIVERED_ATTEMPTS {
                    Some("it timed out again after it was sent and may have been delivered")
                } else if age >= self.give_up_after {
                    Some("delivery.give_up_after_secs passed")
                } else {
                    None
                };
                if let Some(why) = give_up {
                    error!(
                        chat_id,
                        method = method.as_str(),
                        attempts = row.attempts + 1,
                        %reason,
                        why,
                        "Giving up on a send; it is marked failed."
                    );
                    let reason = if maybe_delivered {
                        format!("{reason} (it may have been delivered)")
                    } else {
                        reason
                    };
                    self.fail(row.id, &reason).await;
                    self.tell_admins(row, &reason, false).await;
                    "failed"
                } else {
                    if maybe_delivered {
                        warn!(
                            chat_id,
                            %reason,
                            "A send timed out after it was sent; Telegram may have delivered it, so the retry may be a duplicate."
                        );
                    }
                    let delay = backoff_delay(row.attempts);
                    warn!(
                        chat_id,
                        attempts = row.attempts + 1,
                        retry_in_ms = delay.as_millis() as u64,
                        %reason,
                        "Send failed; retrying."
                    );
                    if let Err(error) = self
                        .state
                        .retry_send(row.id, SystemTime::now() + delay, true, reason)
                        .await
                    {
                        error!(
                            chat_id,
                            error = format!("{error:#}"),
                            "Cannot reschedule a send."
                        );
                    }
                    "retry"
                }
            }
        };
        if matches!(outcome, "ok" | "failed" | "permanent") {
            self.metrics
                .sends
                .get_or_create(&vec![
                    ("method", method.as_str().to_owned()),
                    ("result", outcome.to_owned()),
                ])
                .inc();
        }
    }

    /// Tells the admin chats that `row`'s recipient failed for good; an admin alert that
    /// failed is only logged (its recipient is an admin chat).
    async fn tell_admins(&self, row: &OutboxRow, reason: &str, topic_gone: bool) {
        if row.source == Source::Alert {
            error!(chat_id = row.chat_id, %reason,
                   "An admin alert could not be sent to this admin chat (telegram.admin_chats).");
        } else if let Some(alerts) = &self.alerts {
            alerts
                .recipient_failed(row.chat_id, reason, topic_gone)
                .await;
        }
    }

    async fn fail(&self, id: i64, reason: &str) {
        if let Err(error) = self
            .state
            .finish_send(id, SendResult::Failed(reason.to_owned()))
            .await
        {
            error!(error = format!("{error:#}"), "Cannot mark a send failed.");
        }
    }

    /// One send, with the recoveries that need no waiting: a migrated group gets it at its new
    /// id at once, a refused photo goes again as a document, a stale `file_id` is uploaded
    /// again.
    ///
    /// The first attempt goes at once (the worker took the row when the pacer admitted it);
    /// each recovery waits for the pacer again.
    async fn send_with_recovery(&self, mut chat_id: i64, send: &OutboxSend) -> Result<(), Failure> {
        let mut send = send.clone();
        for attempt in 0..4 {
            if attempt > 0 {
                self.pacer.admit(chat_id, send.items.len()).await;
            }
            match self.send_once(chat_id, &send).await {
                Ok(()) => return Ok(()),
                Err(Failure::Migrated(new)) if new != chat_id => {
                    info!(
                        old = chat_id,
                        new, "Group was upgraded to a supergroup; sending to its new id."
                    );
                    if let Err(error) = self.state.migrate_chat(chat_id, new).await {
                        error!(
                            error = format!("{error:#}"),
                            "Cannot move pending sends to the new chat id."
                        );
                    }
                    if let Err(error) = self.events.chat_migrated(chat_id, new).await {
                        warn!(
                            old = chat_id,
                            new,
                            error = format!("{error:#}"),
                            "Cannot record the new chat id in the directory."
                        );
                    }
                    chat_id = new;
                }
                Err(Failure::PhotoRefused(reason))
                    if send.items.iter().any(|i| i.kind == ItemKind::Photo) =>
                {
                    warn!(chat_id, %reason, "Telegram refused a photo; sending it as a document.");
                    send = as_documents(&send);
                }
                Err(Failure::StaleFileId(reason)) => {
                    warn!(chat_id, %reason, "A stored file_id was refused; uploading again.");
                    for item in &send.items {
                        let _ = self.state.forget_file_id(&item.sha256, item.kind).await;
                    }
                }
                Err(failure) => return Err(failure),
            }
        }
        Err(Failure::Transient(
            "too many recoveries for one send".into(),
        ))
    }
}

/// Jittered exponential backoff for transient failures: 1 s, 2 s, 4 s … capped at 5 minutes,
/// each scaled by a random factor in [0.5, 1.0].
fn backoff_delay(attempts: u32) -> Duration {
    let base = Duration::from_secs(1u64 << attempts.min(8)).min(Duration::from_secs(300));
    let factor = 0.5 + rand::random::<f64>() * 0.5;
    base.mul_f64(factor)
}

#[cfg(test)]
mod tests;
