//! What the integration tests share: a real Dovecot (and, for the PostgreSQL state, a real
//! PostgreSQL) per test, the fake SeaTable, Telegram and OAuth2
//! servers, and the whole relay on top of them.
//!
//! Every test crate (and `benches/relay.rs`) includes it the same way and uses what it needs:
//! ```ignore
//! mod support;
//!
//! use support::stack::{Stack, Tuning};
//! ```
//! A crate compiles every module; each carries `#![allow(dead_code)]` because no crate uses
//! every helper.

pub mod directory;
pub mod dovecot;
#[allow(dead_code)]
pub mod entities;
pub mod imap_script;
pub mod oauth2;
pub mod postgres;
pub mod replicas;
pub mod seatable;
pub mod stack;
pub mod superset_webhook;
pub mod telegram;
pub mod watcher;
