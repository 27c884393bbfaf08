//! PostgreSQL's `LISTEN/NOTIFY` between replicas: the channels the relay announces on, and the
//! one listener loop every follower uses (the delivery worker, the lease loop, the chat
//! statuses).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::Postgres;

/// The channel on which a replica announces that it changed a chat's status (the bot was
/// blocked, removed, or came back), so the others reload theirs.
pub const CHAT_STATUS_CHANNEL: &str = "report_relay_chat_status";

/// How long a listener waits before connecting again after it lost its connection.
const RECONNECT_DELAY: Duration = Duration::from_secs(1);

impl Postgres {
    /// Wakes `wake` on every notification on `channel` until `cancel` fires, and once each
    /// time it (re)connects, for what it may have missed while it was not listening. A lost
    /// connection is logged at debug level and opened again after [`RECONNECT_DELAY`]; the
    /// followers also poll, so a notification is a shortcut, never the only way.
    pub async fn listen(self, channel: &'static str, wake: Arc<Notify>, cancel: CancellationToken) {
        loop {
            let listening = async {
                let mut listener = sqlx::postgres::PgListener::connect_with(&self.pool).await?;
                listener.listen(channel).await?;
                wake.notify_one();
                loop {
                    listener.recv().await?;
                    wake.notify_one();
                }
                #[allow(unreachable_code)]
                Ok::<(), sqlx::Error>(())
            };
            tokio::select! {
                () = cancel.cancelled() => return,
                result = listening => if let Err(error) = result {
                    debug!(channel, %error, "Lost the PostgreSQL notifications; reconnecting.");
                },
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(RECONNECT_DELAY) => {}
            }
        }
    }
}
