//! `report-relay check` for one mailbox: connect, authenticate, EXAMINE, LOGOUT.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::command::{Notes, command, logout};
use super::wire::{encode_mailbox_name, quote};
use super::{Checkpoint, FetchedMessage, MailboxSettings, MailboxWatcher, MessageSink};
use crate::metrics::Metrics;

/// A sink for [`check_login`], which never fetches.
pub(super) struct NoSink;

impl MessageSink for NoSink {
    async fn checkpoint(&self, _mailbox: &str) -> anyhow::Result<Option<Checkpoint>> {
        Ok(None)
    }
    async fn reset_checkpoint(
        &self,
        _mailbox: &str,
        _checkpoint: Checkpoint,
    ) -> anyhow::Result<()> {
        Ok(())
    }
    async fn acknowledge(&self, _mailbox: &str, _message: FetchedMessage) -> anyhow::Result<()> {
        Ok(())
    }
}

/// `report-relay check`: connects (TLS as configured), authenticates, EXAMINEs the folder
/// read-only (RFC 3501 §6.3.2) and logs out. Returns a one-line summary.
///
/// # Errors
/// The step that failed: connect, TLS, greeting, authentication or EXAMINE, each within its
/// timeout.
pub async fn check_login(settings: &MailboxSettings) -> anyhow::Result<String> {
    let (watcher, _status) =
        MailboxWatcher::new(settings.clone(), Arc::new(NoSink), Arc::new(Metrics::new()));
    let cancel = CancellationToken::new();
    let mut session = watcher
        .open(&cancel)
        .await
        .map_err(|error| anyhow::anyhow!("{error:#}"))?;
    let mut notes = Notes::default();
    let folder = quote(&encode_mailbox_name(&settings.folder))?;
    let examined = command(
        &mut session,
        &cancel,
        settings.timeouts.command,
        "EXAMINE",
        &format!("EXAMINE {folder}"),
        &mut notes,
        |_| {},
    )
    .await;
    logout(&mut session, settings.timeouts.logout, &mut notes).await;
    examined.map_err(|error| anyhow::anyhow!("{error:#}"))?;
    Ok(format!(
        "logged in as {} at {}:{} ({}), folder {} has {} messages",
        settings.login,
        settings.host,
        settings.port,
        settings.tls,
        settings.folder,
        notes
            .exists
            .map_or_else(|| "?".to_owned(), |n| n.to_string())
    ))
}
