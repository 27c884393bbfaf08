//! An in-memory [`DirectoryBackend`] for tests that need a directory without SeaTable: it reads
//! what a closure returns and accepts every write without doing anything.

#![allow(dead_code)]

use futures::future::BoxFuture;
use report_relay::directory::{DirectoryBackend, Snapshot};
use serde_json::Value;

/// Reads whatever `fetch` returns (a snapshot, an error, or a future that never ends);
/// writes succeed and change nothing (a group claim is never won).
pub struct ReadOnly<F>(pub F);

impl<F> DirectoryBackend for ReadOnly<F>
where
    F: Fn() -> BoxFuture<'static, anyhow::Result<Snapshot>> + Send + Sync + 'static,
{
    fn fetch(&self) -> BoxFuture<'_, anyhow::Result<Snapshot>> {
        (self.0)()
    }
    fn write_last_uid(&self, _: &str, _: u32) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async { Ok(()) })
    }
    fn rewrite_group_chat_id(&self, _: i64, _: i64) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async { Ok(()) })
    }
    fn write_user_telegram_id(&self, _: &str, _: i64) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async { Ok(()) })
    }
    fn claim_group(&self, _: &str, _: i64) -> BoxFuture<'_, anyhow::Result<bool>> {
        Box::pin(async { Ok(false) })
    }
}

/// A snapshot of one mailbox row (`_id` m1, with a password) and no recipients.
pub fn one_mailbox(address: &str, disabled: bool) -> Snapshot {
    let row: Value = serde_json::json!({"_id": "m1", "Name": "reports", "email": address,
                                        "imap_password": "secret", "disabled": disabled});
    Snapshot::from_rows(&[], &[row.as_object().unwrap().clone().into()], &[])
}
