//! Mailboxes' `last_uid` written back to SeaTable, coalesced per mailbox.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::DirectoryBackend;

/// Writes mailboxes' `last_uid` back to SeaTable, coalesced: at most one write per mailbox per
/// `interval`, always the latest value, retried on failure.
pub struct LastUidWriter {
    backend: Arc<dyn DirectoryBackend>,
    pending: Mutex<HashMap<String, u32>>,
    wake: Notify,
    interval: Duration,
}

impl std::fmt::Debug for LastUidWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LastUidWriter")
    }
}

impl LastUidWriter {
    /// A writer flushing at most every `interval`.
    pub fn new(backend: Arc<dyn DirectoryBackend>, interval: Duration) -> Self {
        Self {
            backend,
            pending: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            interval,
        }
    }

    /// Queues `last_uid` for the mailbox row; only the highest queued value is written.
    pub fn set(&self, mailbox_row_id: &str, last_uid: u32) {
        if let Ok(mut pending) = self.pending.lock() {
            let entry = pending.entry(mailbox_row_id.to_owned()).or_insert(last_uid);
            *entry = (*entry).max(last_uid);
        }
        self.wake.notify_one();
    }

    /// Flushes until `cancel` fires, then flushes once more.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                () = self.wake.notified() => {}
            }
            self.flush().await;
            tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep(self.interval) => {}
            }
        }
        self.flush().await;
    }

    async fn flush(&self) {
        let batch: Vec<(String, u32)> = match self.pending.lock() {
            Ok(mut pending) => pending.drain().collect(),
            Err(_) => return,
        };
        for (row_id, uid) in batch {
            let write = tokio::time::timeout(
                Duration::from_secs(60),
                self.backend.write_last_uid(&row_id, uid),
            )
            .await;
            let failed = match write {
                Ok(Ok(())) => None,
                Ok(Err(error)) => Some(format!("{error:#}")),
                Err(_) => Some("timed out".to_owned()),
            };
            if let Some(error) = failed {
                warn!(
                    row_id,
                    last_uid = uid,
                    error,
                    "Cannot write last_uid to SeaTable; will retry."
                );
                if let Ok(mut pending) = self.pending.lock() {
                    let entry = pending.entry(row_id).or_insert(uid);
                    *entry = (*entry).max(uid);
                }
                self.wake.notify_one();
            }
        }
    }
}
