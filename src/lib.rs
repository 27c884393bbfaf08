//! report-relay: relays Apache Superset e-mail reports from IMAP mailboxes to Telegram chats,
//! with the directory of users, mailboxes and groups kept in SeaTable.
//!
//! # Layout
//!
//! - [`config`]: `config.yaml`, `${VAR}` expansion, validation.
//! - [`report`]: [`report::Report::parse`] turns a Superset e-mail into title, description,
//!   link and files; [`report::render`] plans the Bot API calls for one recipient.
//! - [`cli`]: the command line (`run`, `replay`, `check`, `schema apply`).

#![warn(missing_docs)]

pub mod app;
pub mod bot;
pub mod cli;
pub mod config;
pub mod delivery;
pub mod directory;
pub mod http;
pub mod imap;
pub mod metrics;
pub mod relay;
pub mod replay;
pub mod report;
pub mod schema;
pub mod seatable;
pub mod state;
pub mod supervisor;
