//! The supervisor against a real Dovecot, with an in-memory directory and a sink that panics
//! once: the panicked watcher is restarted and the message is not lost.

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use report_relay::config::Config;
use report_relay::directory::{Directory, Snapshot};
use report_relay::imap::{Checkpoint, FetchedMessage, MessageSink};
use report_relay::metrics::Metrics;
use report_relay::oauth2::TokenSources;
use report_relay::state::State;
use report_relay::supervisor::{Supervisor, Watchers};
use support::directory::{ReadOnly, one_mailbox};
use support::dovecot::Dovecot;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

const ADDRESS: &str = "reports@test.local";

/// Keeps checkpoints in memory; the first acknowledge panics.
#[derive(Default)]
struct PanicOnce {
    checkpoints: Mutex<HashMap<String, Checkpoint>>,
    acknowledged: Mutex<Vec<u32>>,
    calls: AtomicUsize,
    changed: Notify,
}

impl MessageSink for PanicOnce {
    async fn checkpoint(&self, mailbox: &str) -> anyhow::Result<Option<Checkpoint>> {
        Ok(self.checkpoints.lock().unwrap().get(mailbox).copied())
    }
    async fn reset_checkpoint(&self, mailbox: &str, checkpoint: Checkpoint) -> anyhow::Result<()> {
        self.checkpoints
            .lock()
            .unwrap()
            .insert(mailbox.to_owned(), checkpoint);
        self.changed.notify_waiters();
        Ok(())
    }
    async fn acknowledge(&self, mailbox: &str, message: FetchedMessage) -> anyhow::Result<()> {
        if self.calls.fetch_add(1, Ordering::SeqCst) == 0 {
            panic!("injected panic in the sink");
        }
        self.checkpoints.lock().unwrap().insert(
            mailbox.to_owned(),
            Checkpoint {
                uid_validity: message.uid_validity,
                last_uid: message.uid,
            },
        );
        self.acknowledged.lock().unwrap().push(message.uid);
        self.changed.notify_waiters();
        Ok(())
    }
}

async fn wait_until(sink: &PanicOnce, mut done: impl FnMut(&PanicOnce) -> bool) {
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let changed = sink.changed.notified();
            if done(sink) {
                return;
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), changed).await;
        }
    })
    .await
    .expect("condition within 60 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicked_watcher_is_restarted_and_a_disabled_row_is_stopped() {
    let server = Dovecot::start().await.unwrap();
    server.add_user(ADDRESS, "secret").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "telegram:\n  bot_token: \"1:x\"\nseatable:\n  server_url: http://127.0.0.1:9\n  \
         api_token: t\n  reload_secs: 1\nimap:\n  host: 127.0.0.1\n  port: {}\n  tls: none\n\
         state:\n  path: {}\n",
        server.port(),
        dir.path().join("state.db").display()
    );
    let config = Arc::new(Config::from_yaml(&yaml, Path::new("test.yaml"), &|_| None).unwrap());
    // One mailbox row whose `disabled` flag the test can flip.
    let disabled = Arc::new(AtomicBool::new(false));
    let flag = disabled.clone();
    let backend = Arc::new(ReadOnly(
        move || -> BoxFuture<'static, anyhow::Result<Snapshot>> {
            let snapshot = one_mailbox(ADDRESS, flag.load(Ordering::SeqCst));
            Box::pin(async move { Ok(snapshot) })
        },
    ));
    let state = State::open(&config.state.sqlite_path()).unwrap();
    let tokens = Arc::new(TokenSources::new(
        state.clone(),
        report_relay::oauth2::http_client().unwrap(),
    ));
    let directory = Arc::new(Directory::new(
        backend.clone(),
        state,
        Duration::from_secs(60),
    ));
    directory.load().await.unwrap();
    let sink = Arc::new(PanicOnce::default());
    let watchers = Watchers::new(directory.clone(), config.imap.idle_renew_secs);
    let supervisor = Supervisor::new(
        config,
        directory,
        sink.clone(),
        Arc::new(Metrics::new()),
        watchers.clone(),
        tokens,
    );
    let cancel = CancellationToken::new();
    let task = tokio::spawn(supervisor.run(cancel.clone(), Duration::from_secs(5)));

    wait_until(&sink, |s| {
        s.checkpoints.lock().unwrap().contains_key(ADDRESS)
    })
    .await;
    let uid = server
        .append(ADDRESS, "INBOX", b"Subject: one\r\n\r\nbody\r\n")
        .await
        .unwrap();
    // The first acknowledge panics; the restarted watcher fetches the same message again.
    wait_until(&sink, |s| s.acknowledged.lock().unwrap().contains(&uid)).await;
    assert_eq!(*sink.acknowledged.lock().unwrap(), [uid]);
    assert!(sink.calls.load(Ordering::SeqCst) >= 2);

    // Disabling the row stops the watcher at the next reload.
    disabled.store(true, Ordering::SeqCst);
    tokio::time::timeout(Duration::from_secs(30), async {
        while !watchers.statuses().is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the watcher of a disabled row stops");
    tokio::time::timeout(Duration::from_secs(10), async {
        while server
            .doveadm(&["who"])
            .await
            .unwrap_or_default()
            .contains(ADDRESS)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("its IMAP connection is closed");

    cancel.cancel();
    task.await.unwrap();
}
