//! report-relay: relays Apache Superset e-mail reports from IMAP mailboxes to Telegram.
