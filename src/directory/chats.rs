//! Chat statuses (blocked, removed, kept in the state) and group migrations (a basic group
//! upgraded to a supergroup): pending sends, statuses and the SeaTable row follow the new `chat_id`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Directory;
use crate::state::State;

/// Chats that blocked or removed the bot, kept in the state (not in SeaTable) and skipped in
/// deliveries until they come back (`/start`, or the bot re-added).
pub struct ChatStatuses {
    state: State,
    map: RwLock<HashMap<i64, String>>,
}

impl std::fmt::Debug for ChatStatuses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChatStatuses")
    }
}

impl ChatStatuses {
    /// Loads the statuses persisted in `state`.
    ///
    /// # Errors
    /// A database error.
    pub async fn load(state: State) -> anyhow::Result<Arc<Self>> {
        let map = state.chat_statuses().await?.into_iter().collect();
        Ok(Arc::new(Self {
            state,
            map: RwLock::new(map),
        }))
    }

    /// Reloads the statuses from the state each time `changed` is woken (another replica
    /// changed one: [`crate::state::CHAT_STATUS_CHANNEL`]), until `cancel` fires. A read that
    /// fails keeps the statuses as they were until the next wake.
    pub async fn follow(self: Arc<Self>, changed: Arc<Notify>, cancel: CancellationToken) {
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = changed.notified() => {}
            }
            match self.state.chat_statuses().await {
                Ok(statuses) => {
                    if let Ok(mut map) = self.map.write() {
                        *map = statuses.into_iter().collect();
                    }
                }
                Err(error) => warn!(
                    error = format!("{error:#}"),
                    "Cannot reload the chat statuses; keeping the ones loaded before."
                ),
            }
        }
    }

    /// Why `chat_id` is skipped (`blocked`, `left`, `kicked`), or `None` when it is reachable.
    pub fn status(&self, chat_id: i64) -> Option<String> {
        self.map.read().ok().and_then(|m| m.get(&chat_id).cloned())
    }

    /// Records (`Some`) or clears (`None`) a chat's status, in memory and in the state.
    ///
    /// # Errors
    /// A database error; the in-memory status is changed anyway.
    pub async fn set(&self, chat_id: i64, status: Option<&str>) -> anyhow::Result<()> {
        if let Ok(mut map) = self.map.write() {
            match status {
                Some(status) => map.insert(chat_id, status.to_owned()),
                None => map.remove(&chat_id),
            };
        }
        self.state
            .set_chat_status(chat_id, status.map(str::to_owned))
            .await
    }

    /// Moves a status to a group's new id (a migration).
    ///
    /// # Errors
    /// A database error.
    pub async fn migrate(&self, old: i64, new: i64) -> anyhow::Result<()> {
        if let Some(status) = self.status(old) {
            self.set(old, None).await?;
            self.set(new, Some(&status)).await?;
        }
        Ok(())
    }
}

/// What to do when a basic group becomes a supergroup (Bot API `migrate_to_chat_id`), shared by
/// the delivery worker (a send answered with the migrate error) and the registration bot (the
/// service message): move pending sends and chat status to the new id, and rewrite the group's
/// `id_telegram_chat` in SeaTable, keeping its lock. Also remembers recent migrations so a
/// promotion that races its migration message can be recognised.
pub struct Migrations {
    directory: Arc<Directory>,
    state: State,
    statuses: Arc<ChatStatuses>,
    recent: Mutex<HashMap<i64, i64>>,
    changed: Notify,
}

impl std::fmt::Debug for Migrations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Migrations")
    }
}

impl Migrations {
    /// A handler writing through `directory` and `state`.
    pub fn new(directory: Arc<Directory>, state: State, statuses: Arc<ChatStatuses>) -> Arc<Self> {
        Arc::new(Self {
            directory,
            state,
            statuses,
            recent: Mutex::new(HashMap::new()),
            changed: Notify::new(),
        })
    }

    /// `old` is now `new`. Idempotent.
    ///
    /// # Errors
    /// The state or SeaTable could not be written.
    pub async fn migrated(&self, old: i64, new: i64) -> anyhow::Result<()> {
        if let Ok(mut recent) = self.recent.lock() {
            recent.insert(new, old);
        }
        self.changed.notify_waiters();
        let moved = self.state.migrate_chat(old, new).await?;
        if moved > 0 {
            info!(
                old,
                new, moved, "Moved pending sends to the supergroup's new id."
            );
        }
        self.statuses.migrate(old, new).await?;
        let bound = self
            .directory
            .last_good()
            .is_some_and(|s| s.groups.iter().any(|g| g.chat_id == Some(old)));
        if bound {
            self.directory.migrate_group(old, new).await?;
        }
        Ok(())
    }

    /// The basic group `new` was migrated from, if that migration was seen (waiting up to
    /// `wait` for it to arrive).
    pub async fn migrated_from(&self, new: i64, wait: Duration) -> Option<i64> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.changed.notified();
            if let Some(old) = self.recent.lock().ok().and_then(|r| r.get(&new).copied()) {
                return Some(old);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }
}

impl crate::delivery::ChatEvents for Migrations {
    fn chat_migrated(&self, old: i64, new: i64) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(self.migrated(old, new))
    }
}
