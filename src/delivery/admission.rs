//! Which due outbox rows the worker starts in one pass: those the pacer admits now, except rows
//! whose file's first upload is in flight (they wait for its `file_id` and leave their slot to
//! other reports).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::report::render::ItemKind;
use crate::state::{OutboxRow, OutboxSend};

use super::{ADMIT_LEAD, Pacer};

/// A file as Telegram stores it: its sha256 and whether it went as a photo or a document.
pub(super) type FileKey = (String, ItemKind);

/// A task in flight, as the worker tracks it.
pub(super) struct InFlight {
    pub(super) chat_id: i64,
    pub(super) row_id: i64,
    /// Files this send may upload (no `file_id` known when it started).
    pub(super) uploads: Vec<FileKey>,
}

/// What a finished task tells the worker.
pub(super) struct Finished {
    /// Files that now have a `file_id` in the state.
    pub(super) resolved: Vec<FileKey>,
}

/// The files the worker knows about: which have a `file_id`, and which are being uploaded.
#[derive(Default, Clone)]
pub(super) struct Files {
    pub(super) resolved: HashSet<FileKey>,
    pub(super) uploading: HashSet<FileKey>,
}

/// One pass's admission: the pacer's verdict on each candidate row, and the files it starts
/// uploading.
pub(super) struct Admission {
    pub(super) pacer: Arc<Pacer>,
    pub(super) now: tokio::time::Instant,
    pub(super) files: Files,
    pub(super) starts: HashMap<i64, (tokio::time::Instant, Vec<FileKey>)>,
    pub(super) next_ready: Option<tokio::time::Instant>,
}

impl Admission {
    /// Whether the worker may start `row` now; if so, its start instant and the files it may
    /// upload are recorded in `starts`, else the instant it could start in `next_ready`.
    pub(super) fn admit(&mut self, row: &OutboxRow) -> bool {
        let keys: Vec<FileKey> = file_keys(&row.send)
            .filter(|key| !self.files.resolved.contains(key))
            .collect();
        // The first send of a file is in flight: wait for its file_id instead of uploading
        // again, and leave the slot to other reports.
        if keys.iter().any(|key| self.files.uploading.contains(key)) {
            return false;
        }
        match self
            .pacer
            .try_reserve(row.chat_id, row.send.items.len(), self.now, ADMIT_LEAD)
        {
            Ok(start) => {
                self.files.uploading.extend(keys.iter().cloned());
                self.starts.insert(row.id, (start, keys));
                true
            }
            Err(ready) => {
                self.next_ready = Some(self.next_ready.map_or(ready, |at| at.min(ready)));
                false
            }
        }
    }
}

/// The file keys of a send's items, in order.
fn file_keys(send: &OutboxSend) -> impl Iterator<Item = FileKey> + '_ {
    send.items
        .iter()
        .map(|item| (item.sha256.clone(), item.kind))
}
