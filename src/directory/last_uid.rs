//! Mailboxes' `last_uid` written back to SeaTable, coalesced per mailbox: after the watcher's
//! checkpoint commits (`crate::relay`), the writer sends the highest UID to the mailbox row.
//!
//! SeaTable cannot make a write conditional on a lease, so each write is checked against the
//! mailbox's lease in the state right before it is sent ([`State::lease_held`]): a replica that
//! lost the mailbox (or was paused past its lease) drops the write and leaves it to the new
//! holder.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::DirectoryBackend;
use crate::state::{Fence, State};

/// Writes mailboxes' `last_uid` back to SeaTable, coalesced: at most one write per mailbox per
/// `interval`, always the latest value, retried on failure, and only while the write's lease
/// is held.
pub struct LastUidWriter {
    backend: Arc<dyn DirectoryBackend>,
    state: State,
    /// Mailbox row `_id` → the highest UID queued and the lease the write depends on.
    pending: Mutex<HashMap<String, Pending>>,
    wake: Notify,
    interval: Duration,
}

/// A queued write.
#[derive(Clone)]
struct Pending {
    last_uid: u32,
    fence: Option<Fence>,
}

impl std::fmt::Debug for LastUidWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LastUidWriter")
    }
}

impl LastUidWriter {
    /// A writer flushing at most every `interval` (seconds apart at most), checking fences
    /// against `state`.
    pub fn new(backend: Arc<dyn DirectoryBackend>, state: State, interval: Duration) -> Self {
        Self {
            backend,
            state,
            pending: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            interval,
        }
    }

    /// Queues `last_uid` for the mailbox row `_id`; only the highest queued value is written,
    /// and only while `fence` (the mailbox's lease, `None` for no condition) is held.
    pub fn set(&self, mailbox_row_id: &str, last_uid: u32, fence: Option<Fence>) {
        self.queue(mailbox_row_id.to_owned(), Pending { last_uid, fence });
        self.wake.notify_one();
    }

    /// Merges a write into the queue: the highest UID, with the fence it was queued under.
    fn queue(&self, row_id: String, write: Pending) {
        if let Ok(mut pending) = self.pending.lock() {
            let entry = pending.entry(row_id).or_insert_with(|| write.clone());
            if write.last_uid >= entry.last_uid {
                *entry = write;
            }
        }
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
        let batch: Vec<(String, Pending)> = match self.pending.lock() {
            Ok(mut pending) => pending.drain().collect(),
            Err(_) => return,
        };
        for (row_id, write) in batch {
            let uid = write.last_uid;
            let failed = match self.write(&row_id, &write).await {
                Ok(()) => continue,
                Err(error) => error,
            };
            warn!(
                row_id,
                last_uid = uid,
                error = failed,
                "Cannot write last_uid to SeaTable; will retry."
            );
            self.queue(row_id, write);
            self.wake.notify_one();
        }
    }

    /// One write, if its lease is still held. `Err`: why it must be retried.
    async fn write(&self, row_id: &str, write: &Pending) -> Result<(), String> {
        if let Some(fence) = &write.fence {
            match self.state.lease_held(fence).await {
                Ok(true) => {}
                Ok(false) => {
                    debug!(
                        row_id,
                        last_uid = write.last_uid,
                        lease = fence.name,
                        "Not writing last_uid: this replica no longer holds the mailbox's lease."
                    );
                    return Ok(());
                }
                Err(error) => return Err(format!("cannot check the lease: {error:#}")),
            }
        }
        match tokio::time::timeout(
            Duration::from_secs(60),
            self.backend.write_last_uid(row_id, write.last_uid),
        )
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(format!("{error:#}")),
            Err(_) => Err("timed out".to_owned()),
        }
    }
}
