//! What happens to one fetched message: parse, check the sender, plan, resolve recipients, and
//! acknowledge it durably (message, outbox rows and checkpoint in one state transaction).
//!
//! This is the watcher's [`crate::imap::MessageSink`], the engine of `replay --mailbox`, and
//! where the HTTP ingest ([`crate::ingest`]) hands its reports ([`Relay::relay_report`]): the
//! same plan, recipients and transaction for every path a report comes in on.

use std::sync::Arc;
use std::time::SystemTime;

use sha2::{Digest, Sha256};
use tokio::sync::Notify;
use tracing::{error, info, warn};

use crate::alerts::Alerts;
use crate::directory::{ChatStatuses, Directory, LastUidWriter};
use crate::metrics::Metrics;
use crate::replica::{Replica, mailbox_lease};
use crate::report::Report;
use crate::report::render::{self, PlanOptions};
use crate::state::{
    AckResult, Acknowledgement, Checkpoint, HttpIngest, LeaseLost, MessageOutcome, OutboxSend,
    SendOptions, Source, State, StoredFile,
};

/// The shared handles of one process that the relay, the bot and `replay` all work through.
#[derive(Clone)]
pub struct Handles {
    /// The state: checkpoints, messages, the outbox.
    pub state: State,
    /// The SeaTable directory behind its cache.
    pub directory: Arc<Directory>,
    /// Chats known to be unreachable (blocked, kicked, migrated).
    pub statuses: Arc<ChatStatuses>,
    /// The counters behind `/metrics`.
    pub metrics: Arc<Metrics>,
}

/// Turns fetched messages into outbox rows.
pub struct Relay {
    handles: Handles,
    settings: RelaySettings,
    delivery_wake: Arc<Notify>,
    last_uid: Option<Arc<LastUidWriter>>,
    /// Whose mailbox leases fence the checkpoint writes.
    replica: Arc<Replica>,
    /// Told about messages that fail to parse (`telegram.admin_chats`), when set.
    alerts: Option<Arc<Alerts>>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Relay")
    }
}

/// How reports are read and planned.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    /// `reports.subject_prefixes`.
    pub subject_prefixes: Vec<String>,
    /// `telegram.png_as`, `telegram.max_upload_bytes`, `reports.forward_errors`.
    pub plan: PlanOptions,
    /// `reports.require_authentication.authserv_id`, when set.
    pub require_authentication: Option<String>,
}

impl RelaySettings {
    /// The settings of `config`.
    pub fn new(config: &crate::config::Config) -> Self {
        Self {
            subject_prefixes: config.reports.subject_prefixes.clone(),
            plan: PlanOptions::from(config),
            require_authentication: config
                .reports
                .require_authentication
                .as_ref()
                .map(|required| required.authserv_id.clone()),
        }
    }
}

/// One message to relay.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// The mailbox address it arrived in.
    pub mailbox: String,
    /// The message's UIDVALIDITY and UID (as a [`Checkpoint`]: once acknowledged, it is the
    /// mailbox's checkpoint), or `None` for `replay --mailbox` (keyed by content hash).
    pub uid: Option<Checkpoint>,
    /// The raw RFC 5322 bytes.
    pub raw: Vec<u8>,
    /// IMAP INTERNALDATE, if known.
    pub internal_date: Option<SystemTime>,
    /// Why the message could not be fetched, when the server would not deliver it; it is then
    /// recorded as failed.
    pub fetch_error: Option<String>,
}

/// A report that came over HTTP, for [`Relay::relay_report`].
#[derive(Debug, Clone)]
pub struct Ingested {
    /// The address of the mailbox row whose recipients get it.
    pub mailbox: String,
    /// The report, built from the request's fields and files.
    pub report: Report,
    /// The path it came in on.
    pub source: Source,
    /// SHA-256 (hex) of what the request carried, stored as the message's content hash.
    pub content_sha256: String,
    /// The dedupe key (see [`crate::state::HttpIngest::dedupe_key`]).
    pub dedupe_key: Option<String>,
    /// How long the key makes the same request a duplicate (`http.dedupe_window_secs`).
    pub dedupe_window: std::time::Duration,
    /// When the request arrived (the start of `ingest_to_send_seconds`).
    pub received_at: SystemTime,
}

/// What [`Relay::relay`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relayed {
    /// The outcome stored with the message.
    pub outcome: MessageOutcome,
    /// How many outbox rows were queued.
    pub sends: usize,
    /// How many chats they go to.
    pub recipients: usize,
    /// The message was acknowledged before (same UID or same content); nothing was queued.
    pub duplicate: bool,
    /// The stored message's row id, the key of its outbox rows: `None` for a duplicate e-mail;
    /// for a duplicate HTTP request, the first request's message.
    pub message_id: Option<i64>,
}

impl Relay {
    /// A relay writing to the handles' state, resolving through their directory (skipping the
    /// chats in their statuses), waking the delivery worker through `delivery_wake`, and
    /// queueing `last_uid` write-backs on `last_uid` (`None`: no write-back, as in `replay`).
    pub fn new(
        handles: Handles,
        settings: RelaySettings,
        delivery_wake: Arc<Notify>,
        last_uid: Option<Arc<LastUidWriter>>,
    ) -> Self {
        Self {
            handles,
            settings,
            delivery_wake,
            last_uid,
            replica: Replica::solo(),
            alerts: None,
        }
    }

    /// This relay telling `alerts` about messages that cannot be parsed.
    pub fn alerting(mut self, alerts: Option<Arc<Alerts>>) -> Self {
        self.alerts = alerts;
        self
    }

    /// The state this relay writes to.
    pub fn state(&self) -> &State {
        &self.handles.state
    }

    /// This relay with its checkpoint writes fenced by `replica`'s mailbox leases (PostgreSQL
    /// replicas); the default is [`Replica::solo`], which needs none.
    pub fn leased(mut self, replica: Arc<Replica>) -> Self {
        self.replica = replica;
        self
    }

    /// The state with the writes for `mailbox` fenced by its lease.
    ///
    /// # Errors
    /// [`LeaseLost`] when this replica does not hold the mailbox's lease (any more).
    fn state_for(&self, mailbox: &str) -> anyhow::Result<State> {
        let name = mailbox_lease(mailbox);
        match self.replica.fence(&name) {
            Some(fence) => Ok(self.handles.state.fenced(fence)),
            None => Err(LeaseLost { name, epoch: 0 }.into()),
        }
    }

    /// Stores the mailbox's checkpoint without a message (first start, new UIDVALIDITY).
    ///
    /// # Errors
    /// A database error.
    pub async fn reset_checkpoint(
        &self,
        mailbox: &str,
        checkpoint: Checkpoint,
    ) -> anyhow::Result<()> {
        self.state_for(mailbox)?
            .set_checkpoint(mailbox, checkpoint)
            .await
    }

    /// Relays one message and acknowledges it. A message that cannot be parsed is stored as
    /// failed (and logged) so the checkpoint moves on; mail from a sender outside
    /// `allowed_senders` is stored as filtered and left on the server.
    ///
    /// # Errors
    /// No directory snapshot was ever loaded, or the state cannot be written. Then nothing was
    /// acknowledged and the caller must retry the message later.
    pub async fn relay(&self, incoming: Incoming) -> anyhow::Result<Relayed> {
        let Incoming {
            mailbox,
            uid,
            raw,
            internal_date,
            fetch_error,
        } = incoming;
        let raw_sha256 = hex::encode(Sha256::digest(&raw));
        let mut ack = Acknowledgement {
            mailbox: mailbox.clone(),
            uid,
            raw_sha256,
            title: String::new(),
            outcome: MessageOutcome::Queued,
            detail: None,
            received_at: internal_date,
            files: Vec::new(),
            sends: Vec::new(),
            checkpoint: uid,
            http: None,
            alert: None,
        };
        let uid_field = uid.map(|u| u.last_uid);
        let mut mailbox_row_id = None;
        let parsed = match fetch_error {
            Some(error) => Err(format!("the server would not deliver it: {error}")),
            None => Report::parse(&raw, &self.settings.subject_prefixes).map_err(|e| e.to_string()),
        };
        match parsed {
            Err(parse_error) => {
                error!(%mailbox, uid = uid_field, error = %parse_error, "Cannot parse a message; recording it as failed and moving on.");
                ack.title = "(unparseable message)".into();
                ack.outcome = MessageOutcome::Failed;
                ack.detail = Some(parse_error.to_string());
            }
            Ok(report) => {
                ack.title = report.title.clone();
                let snapshot = self.snapshot().await?;
                let row = snapshot.mailbox(&mailbox);
                mailbox_row_id = row.map(|r| r.row_id.clone());
                if let Some(row) = row.filter(|r| !r.allows_sender(report.from.as_deref())) {
                    warn!(%mailbox, uid = uid_field, from = report.from.as_deref().unwrap_or(""), title = %report.title,
                          allowed = ?row.allowed_senders, "Mail from a sender outside allowed_senders; not relaying it (it stays on the server).");
                    ack.outcome = MessageOutcome::Filtered;
                    ack.detail = Some(format!(
                        "sender {} is not in allowed_senders",
                        report.from.as_deref().unwrap_or("(none)")
                    ));
                } else if let Some(Err(reason)) = self.authenticated(&report) {
                    warn!(%mailbox, uid = uid_field, from = report.from.as_deref().unwrap_or(""), title = %report.title,
                          %reason, "Mail the receiving server did not authenticate; not relaying it (it stays on the server).");
                    ack.outcome = MessageOutcome::Filtered;
                    ack.detail = Some(format!("not authenticated: {reason}"));
                } else {
                    let muted = self.handles.state.muted_chats(&mailbox).await?;
                    self.plan_into(&mut ack, &report, row, &snapshot, &muted, Source::Imap);
                }
            }
        }
        let parse_error = (ack.outcome == MessageOutcome::Failed)
            .then(|| ack.detail.clone())
            .flatten();
        let result = self.commit(ack, Source::Imap).await?;
        if let (Some(writer), Some(row_id), Some(uid)) = (&self.last_uid, mailbox_row_id, uid) {
            let fence = self.replica.fence(&mailbox_lease(&mailbox));
            writer.set(&row_id, uid.last_uid, fence);
        }
        if let (Some(alerts), Some(error), false) = (&self.alerts, parse_error, result.duplicate) {
            alerts.parse_failed(&mailbox, uid_field, &error).await;
        }
        Ok(result)
    }

    /// Relays a report that came over HTTP (the Superset webhook, the send API) to the
    /// recipients of `mailbox`: the same plan, recipients and acknowledging transaction as an
    /// e-mail, with no sender filter and no checkpoint. Returns once the message and its outbox
    /// rows are committed. A request whose dedupe key was acknowledged within its window is a
    /// duplicate: nothing new is queued and
    /// [`Relayed::message_id`] is the first one's.
    ///
    /// # Errors
    /// No directory snapshot was ever loaded, or the state cannot be written: nothing was
    /// acknowledged.
    pub async fn relay_report(&self, ingested: Ingested) -> anyhow::Result<Relayed> {
        let Ingested {
            mailbox,
            report,
            source,
            content_sha256,
            dedupe_key,
            dedupe_window,
            received_at,
        } = ingested;
        let mut ack = Acknowledgement {
            mailbox: mailbox.clone(),
            uid: None,
            raw_sha256: content_sha256,
            title: report.title.clone(),
            outcome: MessageOutcome::Queued,
            detail: None,
            received_at: Some(received_at),
            files: Vec::new(),
            sends: Vec::new(),
            checkpoint: None,
            http: Some(HttpIngest {
                source,
                dedupe_key: dedupe_key.clone(),
                window: dedupe_window,
            }),
            alert: None,
        };
        let snapshot = self.snapshot().await?;
        let row = snapshot.mailbox(&mailbox);
        let muted = self.handles.state.muted_chats(&mailbox).await?;
        self.plan_into(&mut ack, &report, row, &snapshot, &muted, source);
        let mut relayed = self.commit(ack, source).await?;
        if relayed.duplicate
            && let Some(key) = &dedupe_key
        {
            relayed.message_id = self
                .handles
                .state
                .ingest_key_message(key, dedupe_window)
                .await?;
            info!(%mailbox, source = source.as_str(), title = %report.title, message_id = relayed.message_id,
                  "A retried request; acknowledged again, nothing is sent twice.");
        }
        Ok(relayed)
    }

    /// The directory snapshot, or an error while none was ever loaded.
    async fn snapshot(&self) -> anyhow::Result<Arc<crate::directory::Snapshot>> {
        self.handles
            .directory
            .snapshot()
            .await
            .ok_or_else(|| anyhow::anyhow!("The directory is not loaded yet"))
    }

    /// Plans `report` for the recipients of `row` (none without a row) into `ack`: skipped
    /// (with the reason) when the plan skips it or nobody registered receives the mailbox (or
    /// no recipient's `reports_filter` passes its title), else one outbox row per (recipient,
    /// send) with the recipient's topic and the mailbox's `silent` and `protect_content`, and
    /// the files they need. A recipient whose filter or topic cell is unusable gets nothing
    /// (a warning naming its row), never everything. Chats in `muted`
    /// (people who paused the mailbox with `/mute`) are left out.
    fn plan_into(
        &self,
        ack: &mut Acknowledgement,
        report: &Report,
        row: Option<&crate::directory::Mailbox>,
        snapshot: &crate::directory::Snapshot,
        muted: &std::collections::HashSet<i64>,
        source: Source,
    ) {
        let mailbox = ack.mailbox.clone();
        let uid_field = ack.uid.map(|u| u.last_uid);
        let source = source.as_str();
        let plan = render::plan(report, &self.settings.plan);
        if let Some(reason) = plan.skipped {
            info!(%mailbox, source, uid = uid_field, title = %report.title, %reason, "Not relaying this report.");
            ack.outcome = MessageOutcome::Skipped;
            ack.detail = Some(reason);
            return;
        }
        let (mut recipients, withheld) = row
            .map(|r| snapshot.deliveries(r, &report.title))
            .unwrap_or_default();
        for w in &withheld {
            if w.misconfigured {
                warn!(%mailbox, source, chat_id = w.chat_id, row = %w.row, reason = %w.reason, title = %report.title,
                      "Not sending this report to a recipient whose row is misconfigured.");
            } else {
                info!(%mailbox, source, chat_id = w.chat_id, row = %w.row, reason = %w.reason, title = %report.title,
                      "Not sending this report to a recipient: its title filter does not match.");
            }
        }
        recipients.retain(|r| match self.handles.statuses.status(r.chat_id) {
            Some(status) => {
                info!(%mailbox, chat_id = r.chat_id, status, "Skipping a chat that blocked or removed the bot.");
                false
            }
            None => true,
        });
        recipients.retain(|r| {
            let paused = muted.contains(&r.chat_id);
            if paused {
                info!(%mailbox, chat_id = r.chat_id, "Skipping a person who paused this mailbox with /mute.");
            }
            !paused
        });
        if recipients.is_empty() && !withheld.is_empty() {
            info!(%mailbox, source, uid = uid_field, title = %report.title, withheld = withheld.len(),
                  "No recipient of this mailbox gets this report (title filters, misconfigured rows); it is not relayed.");
            ack.outcome = MessageOutcome::Skipped;
            ack.detail = Some("no recipient's reports_filter passes it".into());
        } else if recipients.is_empty() {
            warn!(%mailbox, source, uid = uid_field, title = %report.title, "No registered user or group receives this mailbox; the report is not relayed.");
            ack.outcome = MessageOutcome::Skipped;
            ack.detail = Some("no registered recipients".into());
        }
        let sends: Vec<OutboxSend> = plan
            .sends
            .iter()
            .map(|send| OutboxSend::planned(send, report))
            .collect();
        for recipient in &recipients {
            let options = SendOptions {
                message_thread_id: recipient.message_thread_id,
                disable_notification: row.is_some_and(|r| r.silent),
                protect_content: row.is_some_and(|r| r.protect_content),
            };
            for send in &sends {
                ack.sends
                    .push((recipient.chat_id, send.clone().with(options)));
            }
        }
        if !ack.sends.is_empty() {
            ack.files = report
                .files
                .iter()
                .map(|f| StoredFile {
                    sha256: f.sha256.clone(),
                    bytes: f.bytes.clone(),
                })
                .collect();
        }
        info!(%mailbox, source, uid = uid_field, title = %report.title, recipients = recipients.len(),
              sends = ack.sends.len(), "Queued a report.");
    }

    /// Writes `ack` in one transaction (fenced by the mailbox's lease when it moves the
    /// checkpoint), counts it, and wakes the delivery worker.
    async fn commit(&self, ack: Acknowledgement, source: Source) -> anyhow::Result<Relayed> {
        let mailbox = ack.mailbox.clone();
        let sends = ack.sends.len();
        let recipients = {
            let mut chats: Vec<i64> = ack.sends.iter().map(|s| s.0).collect();
            chats.sort_unstable();
            chats.dedup();
            chats.len()
        };
        let outcome = ack.outcome;
        let state = match ack.checkpoint {
            Some(_) => self.state_for(&mailbox)?,
            None => self.handles.state.clone(),
        };
        let result = state.acknowledge(ack).await?;
        self.handles
            .metrics
            .reports_acknowledged
            .get_or_create(&vec![
                ("mailbox", mailbox),
                ("outcome", outcome.as_str().to_owned()),
                ("source", source.as_str().to_owned()),
            ])
            .inc();
        if sends > 0 && result != AckResult::Duplicate {
            self.delivery_wake.notify_one();
        }
        let duplicate = result == AckResult::Duplicate;
        Ok(Relayed {
            outcome,
            sends: if duplicate { 0 } else { sends },
            recipients: if duplicate { 0 } else { recipients },
            duplicate,
            message_id: match result {
                AckResult::Stored(id) => Some(id),
                AckResult::Duplicate => None,
            },
        })
    }
}

impl Relay {
    /// `reports.require_authentication`: `None` when it is off, else whether the receiving MTA
    /// authenticated the From domain (see [`crate::report::auth_results::check_from`]).
    fn authenticated(&self, report: &Report) -> Option<Result<(), String>> {
        let authserv_id = self.settings.require_authentication.as_deref()?;
        Some(crate::report::auth_results::check_from(
            &report.authentication_results,
            authserv_id,
            report.from.as_deref(),
        ))
    }
}

impl crate::imap::MessageSink for Relay {
    async fn checkpoint(&self, mailbox: &str) -> anyhow::Result<Option<Checkpoint>> {
        self.handles.state.checkpoint(mailbox).await
    }

    async fn reset_checkpoint(&self, mailbox: &str, checkpoint: Checkpoint) -> anyhow::Result<()> {
        Relay::reset_checkpoint(self, mailbox, checkpoint).await
    }

    async fn acknowledge(
        &self,
        mailbox: &str,
        message: crate::imap::FetchedMessage,
    ) -> anyhow::Result<()> {
        self.relay(Incoming {
            mailbox: mailbox.to_owned(),
            uid: Some(Checkpoint {
                uid_validity: message.uid_validity,
                last_uid: message.uid,
            }),
            raw: message.raw,
            internal_date: message.internal_date,
            fetch_error: message.fetch_error,
        })
        .await
        .map(|_| ())
    }
}
