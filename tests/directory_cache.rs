//! The directory's cache: stale-while-refresh. A report never waits for SeaTable while a last
//! good snapshot exists; only a directory that was never loaded does.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use report_relay::directory::{Directory, Snapshot};
use report_relay::state::State;
use support::directory::{ReadOnly, one_mailbox};

/// What the fake SeaTable does on a read.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Answer,
    Fail,
    Hang,
}

/// A directory over a backend switched by the returned handle, counting its reads.
fn directory(
    ttl: Duration,
) -> (
    tempfile::TempDir,
    Arc<Directory>,
    Arc<Mutex<Mode>>,
    Arc<AtomicUsize>,
) {
    let mode = Arc::new(Mutex::new(Mode::Answer));
    let reads = Arc::new(AtomicUsize::new(0));
    let (switch, count) = (mode.clone(), reads.clone());
    let backend = ReadOnly(move || -> BoxFuture<'static, anyhow::Result<Snapshot>> {
        count.fetch_add(1, Ordering::SeqCst);
        let mode = *switch.lock().unwrap();
        Box::pin(async move {
            match mode {
                Mode::Hang => std::future::pending().await,
                Mode::Fail => anyhow::bail!("503 Service Unavailable"),
                Mode::Answer => Ok(one_mailbox("reports@test.local", false)),
            }
        })
    });
    let dir = tempfile::tempdir().unwrap();
    let state = State::open(&dir.path().join("state.db")).unwrap();
    (
        dir,
        Arc::new(Directory::new(Arc::new(backend), state, ttl)),
        mode,
        reads,
    )
}

#[tokio::test]
async fn a_stale_snapshot_is_served_at_once_while_one_refresh_runs() {
    let (_dir, directory, mode, reads) = directory(Duration::from_millis(50));
    directory.load().await.unwrap();
    assert_eq!(reads.load(Ordering::SeqCst), 1);
    *mode.lock().unwrap() = Mode::Hang;
    tokio::time::sleep(Duration::from_millis(100)).await;
    // SeaTable does not answer at all: every report still gets the last good snapshot
    // without waiting, and only one refresh is in flight.
    for _ in 0..10 {
        let served = tokio::time::timeout(Duration::from_secs(1), directory.snapshot())
            .await
            .expect("a stale snapshot is served without waiting for SeaTable");
        assert_eq!(served.unwrap().mailboxes.len(), 1);
    }
    tokio::task::yield_now().await;
    assert_eq!(
        reads.load(Ordering::SeqCst),
        2,
        "one background refresh at a time"
    );
    assert!(directory.age().unwrap() >= Duration::from_millis(100));
}

#[tokio::test]
async fn a_failed_refresh_keeps_the_last_good_snapshot_and_a_later_one_replaces_it() {
    let (_dir, directory, mode, _) = directory(Duration::from_millis(20));
    directory.load().await.unwrap();
    let first = directory.last_good().unwrap();
    *mode.lock().unwrap() = Mode::Fail;
    tokio::time::sleep(Duration::from_millis(40)).await;
    assert!(directory.refresh().await.is_err());
    assert!(Arc::ptr_eq(&directory.snapshot().await.unwrap(), &first));
    *mode.lock().unwrap() = Mode::Answer;
    let fresh = directory.refresh().await.unwrap();
    assert!(!Arc::ptr_eq(&fresh, &first));
    assert!(directory.age().unwrap() < Duration::from_secs(1));
}

#[tokio::test]
async fn a_directory_never_loaded_waits_for_seatable() {
    let (_dir, directory, mode, _) = directory(Duration::from_secs(60));
    *mode.lock().unwrap() = Mode::Fail;
    assert!(directory.snapshot().await.is_none());
    assert_eq!(directory.age(), None);
    *mode.lock().unwrap() = Mode::Answer;
    assert!(directory.snapshot().await.is_some());
}
