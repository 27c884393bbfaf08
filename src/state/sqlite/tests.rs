use std::time::Duration;

use super::Sqlite;

/// A state in a fresh temp dir (kept alive by the returned guard).
fn fresh_state() -> (tempfile::TempDir, Sqlite) {
    let dir = tempfile::tempdir().unwrap();
    let state = Sqlite::open(&dir.path().join("state.db")).unwrap();
    (dir, state)
}

#[test]
fn a_second_process_cannot_open_the_same_state() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let first = Sqlite::open(&path).unwrap();
    let error = Sqlite::open(&path).unwrap_err().to_string();
    assert!(
        error.contains("in use by another report-relay process"),
        "{error}"
    );
    drop(first);
    Sqlite::open(&path).unwrap();
}

/// Callers waiting for the connection wait asynchronously, not on the blocking pool: with one
/// call holding the connection and 100 more queued behind it, a runtime allowed only two
/// blocking threads still runs other blocking work (a host-name lookup, say) at once.
#[test]
fn queued_calls_hold_no_blocking_threads() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .max_blocking_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (_dir, state) = fresh_state();
        let (release, held) = std::sync::mpsc::channel::<()>();
        let (started, holding) = tokio::sync::oneshot::channel();
        let holder = tokio::spawn({
            let state = state.clone();
            async move {
                state
                    .with(move |_conn| {
                        let _ = started.send(());
                        let _ = held.recv();
                        Ok(())
                    })
                    .await
            }
        });
        holding.await.unwrap();

        let mailboxes: Vec<String> = (0..100).map(|i| format!("m{i}@example.com")).collect();
        let mut queued: Vec<_> = mailboxes
            .iter()
            .map(|mailbox| Box::pin(state.checkpoint(mailbox)))
            .collect();
        for call in &mut queued {
            assert!(futures::poll!(call.as_mut()).is_pending());
        }
        // The deadline only turns a regression (the pool full of waiting calls) into a failure.
        let other = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::task::spawn_blocking(|| "ran"),
        )
        .await
        .expect("the blocking pool has room while 100 calls wait")
        .unwrap();
        assert_eq!(other, "ran");

        release.send(()).unwrap();
        holder.await.unwrap().unwrap();
        for checkpoint in futures::future::join_all(queued).await {
            assert_eq!(checkpoint.unwrap(), None);
        }
    });
}
