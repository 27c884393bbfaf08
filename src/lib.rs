//! report-relay: relays Apache Superset e-mail reports from IMAP mailboxes to Telegram chats,
//! with the directory of users, mailboxes and groups kept in SeaTable.
//!
//! # Layout
//!
//! The pipeline, in the order a report travels:
//!
//! - [`supervisor`]: one [`imap::MailboxWatcher`] per enabled mailbox row, reloaded every
//!   `seatable.reload_secs` and on SIGHUP, restarted on panic.
//! - [`imap`]: connect (TLS), authenticate, SELECT, catch up by UID, IDLE, reconnect forever;
//!   one file per step under `imap/` (connect, auth, sasl, command, select, idle, wire, check).
//! - [`oauth2`]: access tokens for OAuth2 mailboxes (refresh, client credentials, service
//!   accounts), refreshed one at a time per account, rotated refresh tokens kept in the state;
//!   `oauth login` (device flow, loopback redirect) in `oauth2/login.rs`.
//! - [`ingest`]: the other way in, over HTTP: Superset's webhook (`ingest/superset.rs`, routed
//!   by a mailbox row's `webhook_token`) and the authenticated send API (`ingest/api.rs`), both
//!   handing a [`report::Report`] to the relay's sink.
//! - [`relay`]: the watcher's sink: [`report::Report::parse`], the sender filter,
//!   [`report::render`]'s plan, the recipients from [`directory`], and one transaction in
//!   [`state`] (message, outbox rows, checkpoint), on SQLite or PostgreSQL.
//! - [`delivery`]: drains the outbox into the Bot API within Telegram's limits over every
//!   sliding window (its pacer in `delivery/limits.rs`, error classes in
//!   `delivery/classify.rs`), uploading each file once.
//! - [`delivery_log`]: with `seatable.delivery_log: true`, one row per finished report in
//!   SeaTable's `deliveries` table, appended in batches in the background after delivery.
//! - [`alerts`]: with `telegram.admin_chats`, plain-words alerts to the sysadmins (a mailbox
//!   failing, SeaTable unreachable, a recipient lost, a report unparseable, a schema problem),
//!   once per condition and once when it clears, through the same outbox.
//! - [`bot`]: registration of people (own phone number) and groups (promotion), next to it.
//! - [`replica`]: on a shared PostgreSQL state, the leases that decide which replica watches
//!   which mailbox, delivers, and polls getUpdates.
//!
//! Around them: [`config`] (`config.yaml`), [`seatable`] (REST client: token, rows, errors,
//! metadata) and [`schema`] (`seatable-schema/`), [`directory`] (cached snapshot, its model,
//! the SeaTable backend that owns every SeaTable write, migrations, chat statuses), [`http`]
//! (`/healthz`, `/readyz`, `/metrics`, TLS in `http/tls.rs`), [`metrics`], [`app`] (composition root), [`cli`] and
//! [`replay`] and [`history`] (the command line).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod alerts;
pub mod app;
pub mod bot;
pub mod cli;
pub mod config;
pub mod delivery;
pub mod delivery_log;
pub mod directory;
pub mod history;
pub mod http;
pub mod imap;
pub mod ingest;
pub mod metrics;
pub mod oauth2;
pub mod relay;
pub mod replay;
pub mod replica;
pub mod report;
pub mod schema;
pub mod seatable;
pub mod state;
pub mod supervisor;
