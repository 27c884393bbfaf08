//! Pure helpers, plus the watcher against a scripted loopback IMAP server for the edge cases
//! a real Dovecot cannot be made to produce on demand (`tests/imap_watcher.rs` covers the
//! rest against Dovecot).

use std::net::SocketAddr;
use std::sync::Mutex;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;

use super::select::Plan;
use super::select::ResetReason;
use super::select::ServerLast;
use super::select::plan_checkpoint;
use super::wire::encode_mailbox_name;
use super::wire::parse_internal_date;
use super::wire::quote;
use super::*;
use std::io;
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(10);

// ---- pure helpers ------------------------------------------------------------------------

fn exact(last_uid: u32) -> ServerLast {
    ServerLast {
        last_uid,
        exact: true,
    }
}

fn checkpoint(uid_validity: u32, last_uid: u32) -> Checkpoint {
    Checkpoint {
        uid_validity,
        last_uid,
    }
}

#[test]
fn first_start_skips_history_or_honours_the_seed() {
    assert_eq!(
        plan_checkpoint(None, 7, exact(41), None),
        Plan::Reset {
            checkpoint: checkpoint(7, 41),
            reason: ResetReason::FirstStart
        }
    );
    assert_eq!(
        plan_checkpoint(None, 7, exact(41), Some(30)),
        Plan::Reset {
            checkpoint: checkpoint(7, 30),
            reason: ResetReason::Seeded
        }
    );
    assert_eq!(
        plan_checkpoint(None, 7, exact(41), Some(99)),
        Plan::Reset {
            checkpoint: checkpoint(7, 41),
            reason: ResetReason::SeedAhead { seed: 99 }
        }
    );
    // Without UIDNEXT the highest UID is only a lower bound: the seed wins.
    let estimate = ServerLast {
        last_uid: 41,
        exact: false,
    };
    assert_eq!(
        plan_checkpoint(None, 7, estimate, Some(99)),
        Plan::Reset {
            checkpoint: checkpoint(7, 99),
            reason: ResetReason::Seeded
        }
    );
}

#[test]
fn stored_checkpoint_is_resumed_or_reset_without_replay() {
    let stored = checkpoint(7, 30);
    assert_eq!(
        plan_checkpoint(Some(stored), 7, exact(41), Some(1)),
        Plan::Resume(30)
    );
    assert_eq!(
        plan_checkpoint(Some(stored), 8, exact(3), None),
        Plan::Reset {
            checkpoint: checkpoint(8, 3),
            reason: ResetReason::UidValidityChanged { stored }
        }
    );
    assert_eq!(
        plan_checkpoint(Some(stored), 7, exact(12), None),
        Plan::Reset {
            checkpoint: checkpoint(7, 12),
            reason: ResetReason::Ahead { stored }
        }
    );
    let estimate = ServerLast {
        last_uid: 12,
        exact: false,
    };
    assert_eq!(
        plan_checkpoint(Some(stored), 7, estimate, None),
        Plan::Resume(30)
    );
}

#[test]
fn the_star_quirk_and_duplicates_are_filtered() {
    // `UID SEARCH UID 6:*` in a folder whose highest UID is 5 answers 5.
    assert!(uids_above([5], 5).is_empty());
    assert_eq!(uids_above([9, 6, 5, 7, 9], 5), [6, 7, 9]);
    assert!(uids_above([u32::MAX], u32::MAX).is_empty());
}

#[test]
fn internal_dates_parse_with_zone_and_padding() {
    let at = |secs| Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs));
    assert_eq!(parse_internal_date("01-Jan-1970 00:00:00 +0000"), at(0));
    assert_eq!(
        parse_internal_date(" 2-Mar-2024 10:11:12 +0300"),
        at(1_709_363_472)
    );
    assert_eq!(
        parse_internal_date("29-Feb-2024 23:59:59 -0130"),
        at(1_709_256_599)
    );
    assert_eq!(parse_internal_date("31-Foo-2024 00:00:00 +0000"), None);
    assert_eq!(parse_internal_date("garbage"), None);
    assert_eq!(parse_internal_date("01-Jan-1960 00:00:00 +0000"), None);
}

#[test]
fn mailbox_names_use_modified_utf7() {
    // RFC 3501 §5.1.3's example.
    assert_eq!(
        encode_mailbox_name("~peter/mail/台北/日本語"),
        "~peter/mail/&U,BTFw-/&ZeVnLIqe-"
    );
    assert_eq!(encode_mailbox_name("INBOX"), "INBOX");
    assert_eq!(encode_mailbox_name("A&B"), "A&-B");
    assert_eq!(encode_mailbox_name("Отчёты"), "&BB4EQgRHBFEEQgRL-");
    assert_eq!(quote("a\"b\\c").unwrap(), r#""a\"b\\c""#);
    assert!(quote("a\r\nb").is_err());
}

#[test]
fn backoff_grows_with_jitter_and_never_ends() {
    let timeouts = ImapTimeouts {
        reconnect_min_delay: Duration::from_millis(100),
        reconnect_max_delay: Duration::from_millis(400),
        ..ImapTimeouts::default()
    };
    let delays: Vec<_> = reconnect_delays(&timeouts).take(50).collect();
    assert_eq!(delays.len(), 50);
    let first = delays[0];
    assert!(first >= Duration::from_millis(100) && first <= Duration::from_millis(200));
    assert!(
        delays
            .iter()
            .all(|delay| *delay <= Duration::from_millis(800))
    );
    assert!(delays[10] >= Duration::from_millis(400));
}

#[test]
fn settings_debug_hides_the_password() {
    let debug = format!("{:?}", settings(1));
    assert!(!debug.contains("s3cret"), "{debug}");
    assert!(debug.contains("REDACTED"), "{debug}");
}

#[test]
fn error_chains_read_like_anyhow() {
    let error = SessionError::Auth {
        mechanism: "LOGIN",
        source: AuthError::Rejected("[AUTHENTICATIONFAILED] nope".into()),
    };
    assert_eq!(
        error_chain(&error),
        "authentication failed (LOGIN): the server rejected the credentials: \
         [AUTHENTICATIONFAILED] nope"
    );
}

// ---- an in-memory sink -------------------------------------------------------------------

#[derive(Debug, Default)]
struct SinkState {
    checkpoint: Option<Checkpoint>,
    acked: Vec<FetchedMessage>,
    resets: Vec<Checkpoint>,
    fail_acks: u32,
    failed_acks: u32,
}

struct MemorySink {
    state: Mutex<SinkState>,
    version: watch::Sender<u64>,
}

impl MemorySink {
    fn new(checkpoint: Option<Checkpoint>) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(SinkState {
                checkpoint,
                ..SinkState::default()
            }),
            version: watch::channel(0).0,
        })
    }

    fn update<T>(&self, change: impl FnOnce(&mut SinkState) -> T) -> T {
        let out = change(&mut self.state.lock().unwrap());
        self.version.send_modify(|version| *version += 1);
        out
    }

    fn acked_uids(&self) -> Vec<u32> {
        let state = self.state.lock().unwrap();
        state.acked.iter().map(|message| message.uid).collect()
    }

    async fn wait(&self, what: &str, condition: impl Fn(&SinkState) -> bool) {
        let mut version = self.version.subscribe();
        let waited = tokio::time::timeout(
            WAIT,
            version.wait_for(|_| condition(&self.state.lock().unwrap())),
        )
        .await;
        assert!(
            waited.is_ok(),
            "timed out waiting for {what}: {:?}",
            self.state.lock().unwrap()
        );
    }
}

impl MessageSink for MemorySink {
    async fn checkpoint(&self, _mailbox: &str) -> anyhow::Result<Option<Checkpoint>> {
        Ok(self.state.lock().unwrap().checkpoint)
    }

    async fn reset_checkpoint(&self, _mailbox: &str, checkpoint: Checkpoint) -> anyhow::Result<()> {
        self.update(|state| {
            state.checkpoint = Some(checkpoint);
            state.resets.push(checkpoint);
        });
        Ok(())
    }

    async fn acknowledge(&self, _mailbox: &str, message: FetchedMessage) -> anyhow::Result<()> {
        self.update(|state| {
            if state.fail_acks > 0 {
                state.fail_acks -= 1;
                state.failed_acks += 1;
                anyhow::bail!("disk full");
            }
            state.checkpoint = Some(Checkpoint {
                uid_validity: message.uid_validity,
                last_uid: message.uid,
            });
            state.acked.push(message);
            Ok(())
        })
    }
}

// ---- a scripted IMAP server --------------------------------------------------------------

#[derive(Debug)]
struct FakeState {
    uid_validity: u32,
    next_uid: u32,
    messages: Vec<(u32, Vec<u8>)>,
    idle: bool,
    uidnext_in_select: bool,
    uidnext_in_status: bool,
    password: String,
    /// Appended when the next IDLE arrives; the EXISTS goes out before `+ idling`.
    append_at_idle: Vec<Vec<u8>>,
    /// So many `UID FETCH` get a tagged NO.
    fail_fetches: u32,
    /// Never answer DONE (a link that died mid-IDLE).
    ignore_done: bool,
    commands: Vec<String>,
    connections: u32,
}

impl Default for FakeState {
    fn default() -> Self {
        Self {
            uid_validity: 1000,
            next_uid: 1,
            messages: Vec::new(),
            idle: true,
            uidnext_in_select: true,
            uidnext_in_status: true,
            password: "s3cret".into(),
            append_at_idle: Vec::new(),
            fail_fetches: 0,
            ignore_done: false,
            commands: Vec::new(),
            connections: 0,
        }
    }
}

impl FakeState {
    fn append(&mut self, raw: &[u8]) -> u32 {
        let uid = self.next_uid;
        self.next_uid += 1;
        self.messages.push((uid, raw.to_vec()));
        uid
    }
}

struct Shared {
    state: Mutex<FakeState>,
    changed: Notify,
}

struct Fake {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Fake {
    async fn start(setup: impl FnOnce(&mut FakeState)) -> Self {
        let mut state = FakeState::default();
        setup(&mut state);
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            changed: Notify::new(),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepting = Arc::clone(&shared);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                accepting.state.lock().unwrap().connections += 1;
                tokio::spawn(serve(stream, Arc::clone(&accepting)));
            }
        });
        Self { addr, shared }
    }

    fn with<T>(&self, change: impl FnOnce(&mut FakeState) -> T) -> T {
        let out = change(&mut self.shared.state.lock().unwrap());
        self.shared.changed.notify_waiters();
        out
    }

    fn append(&self, raw: &[u8]) -> u32 {
        self.with(|state| state.append(raw))
    }

    fn commands(&self) -> Vec<String> {
        self.with(|state| state.commands.clone())
    }
}

async fn serve(stream: TcpStream, shared: Arc<Shared>) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let (lines_tx, mut lines) = mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        let mut read = BufReader::new(read);
        loop {
            let mut line = String::new();
            match read.read_line(&mut line).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if lines_tx.send(line.trim_end().to_owned()).is_err() {
                        break;
                    }
                }
            }
        }
    });
    write.write_all(b"* OK fake IMAP ready\r\n").await?;
    let mut told = 0_usize;
    let mut selected = false;
    while let Some(line) = lines.recv().await {
        let (tag, rest) = line.split_once(' ').unwrap_or((line.as_str(), ""));
        let upper = rest.to_ascii_uppercase();
        let word = upper.split(' ').next().unwrap_or_default().to_owned();
        let recorded = if word == "LOGIN" { "LOGIN" } else { rest };
        shared
            .state
            .lock()
            .unwrap()
            .commands
            .push(recorded.to_owned());
        let mut out: Vec<u8> = Vec::new();
        let mut done = format!("{tag} OK done\r\n");
        match word.as_str() {
            "CAPABILITY" => {
                let idle = shared.state.lock().unwrap().idle;
                let extra = if idle { " IDLE" } else { "" };
                out.extend(format!("* CAPABILITY IMAP4rev1{extra}\r\n").bytes());
            }
            "LOGIN" => {
                let password = rest.split('"').nth(3).unwrap_or_default();
                if password != shared.state.lock().unwrap().password {
                    done = format!("{tag} NO [AUTHENTICATIONFAILED] Authentication failed.\r\n");
                }
            }
            "SELECT" => {
                let state = shared.state.lock().unwrap();
                selected = true;
                told = state.messages.len();
                out.extend(format!("* {told} EXISTS\r\n* 0 RECENT\r\n").bytes());
                out.extend(
                    format!("* OK [UIDVALIDITY {}] UIDs valid\r\n", state.uid_validity).bytes(),
                );
                if state.uidnext_in_select {
                    out.extend(format!("* OK [UIDNEXT {}] Predicted\r\n", state.next_uid).bytes());
                }
            }
            "STATUS" => {
                let state = shared.state.lock().unwrap();
                let items = if state.uidnext_in_status {
                    format!("UIDNEXT {}", state.next_uid)
                } else {
                    format!("MESSAGES {}", state.messages.len())
                };
                out.extend(format!("* STATUS \"INBOX\" ({items})\r\n").bytes());
            }
            "UID" if upper.starts_with("UID SEARCH UID ") => {
                let state = shared.state.lock().unwrap();
                let range = &upper["UID SEARCH UID ".len()..];
                let max = state.messages.iter().map(|(uid, _)| *uid).max();
                let mut found: Vec<u32> = match range.split_once(':') {
                    Some((from, _)) => {
                        let from: u32 = from.parse().unwrap();
                        state
                            .messages
                            .iter()
                            .map(|(uid, _)| *uid)
                            .filter(|uid| *uid >= from)
                            .collect()
                    }
                    None => Vec::new(),
                };
                // `n:*` and `*` always match the highest UID (RFC 3501 §6.4.8).
                if found.is_empty() {
                    found.extend(max);
                }
                let list: Vec<String> = found.iter().map(u32::to_string).collect();
                out.extend(
                    format!("* SEARCH {}\r\n", list.join(" "))
                        .trim_end()
                        .bytes(),
                );
                out.extend(b"\r\n");
            }
            "UID" if upper.starts_with("UID FETCH ") => {
                let mut state = shared.state.lock().unwrap();
                assert!(upper.contains("BODY.PEEK[]"), "{line}");
                let uid: u32 = upper.split(' ').nth(2).unwrap().parse().unwrap();
                if state.fail_fetches > 0 {
                    state.fail_fetches -= 1;
                    done = format!("{tag} NO Some messages could not be FETCHed\r\n");
                } else if let Some(position) = state.messages.iter().position(|(u, _)| *u == uid) {
                    let raw = &state.messages[position].1;
                    out.extend(
                        format!(
                            "* {} FETCH (UID {uid} INTERNALDATE \" 2-Mar-2024 10:11:12 +0300\" BODY[] {{{}}}\r\n",
                            position + 1,
                            raw.len()
                        )
                        .bytes(),
                    );
                    out.extend_from_slice(raw);
                    out.extend(b")\r\n");
                }
            }
            "IDLE" => {
                {
                    let mut state = shared.state.lock().unwrap();
                    for raw in std::mem::take(&mut state.append_at_idle) {
                        state.append(&raw);
                    }
                }
                let mut head = Vec::new();
                tell_exists(&shared, &mut told, &mut head);
                head.extend(b"+ idling\r\n");
                write.write_all(&head).await?;
                loop {
                    let changed = shared.changed.notified();
                    let mut news = Vec::new();
                    tell_exists(&shared, &mut told, &mut news);
                    write.write_all(&news).await?;
                    tokio::select! {
                        line = lines.recv() => match line {
                            Some(line) if line.eq_ignore_ascii_case("DONE") => break,
                            Some(_) => {}
                            None => return Ok(()),
                        },
                        () = changed => {}
                    }
                }
                shared.state.lock().unwrap().commands.push("DONE".into());
                if shared.state.lock().unwrap().ignore_done {
                    // A dead link: swallow everything, answer nothing.
                    while lines.recv().await.is_some() {}
                    return Ok(());
                }
                done = format!("{tag} OK Idle completed.\r\n");
            }
            "NOOP" => {}
            "LOGOUT" => {
                write
                    .write_all(
                        format!("* BYE Logging out\r\n{tag} OK Logout completed.\r\n").as_bytes(),
                    )
                    .await?;
                return Ok(());
            }
            _ => done = format!("{tag} BAD Unknown command\r\n"),
        }
        if selected {
            tell_exists(&shared, &mut told, &mut out);
        }
        out.extend(done.bytes());
        write.write_all(&out).await?;
    }
    Ok(())
}

fn tell_exists(shared: &Shared, told: &mut usize, out: &mut Vec<u8>) {
    let count = shared.state.lock().unwrap().messages.len();
    if count > *told {
        *told = count;
        out.extend(format!("* {count} EXISTS\r\n* 1 RECENT\r\n").bytes());
    }
}

// ---- the watcher against the fake --------------------------------------------------------

fn settings(port: u16) -> MailboxSettings {
    MailboxSettings {
        address: "reports@test.local".into(),
        host: "127.0.0.1".into(),
        port,
        tls: TlsMode::None,
        login: "reports@test.local".into(),
        password: SecretString::from("s3cret"),
        folder: "INBOX".into(),
        idle_renew_secs: 60,
        seed_last_uid: None,
        timeouts: ImapTimeouts {
            connect: Duration::from_secs(2),
            login: Duration::from_secs(2),
            command: Duration::from_secs(2),
            fetch: Duration::from_secs(2),
            idle_keepalive: Duration::from_secs(60),
            done: Duration::from_millis(300),
            logout: Duration::from_secs(1),
            reconnect_min_delay: Duration::from_millis(20),
            reconnect_max_delay: Duration::from_millis(100),
        },
        poll_secs: 1,
    }
}

struct Running {
    task: JoinHandle<()>,
    cancel: CancellationToken,
    status: watch::Receiver<WatcherStatus>,
    metrics: Arc<Metrics>,
}

impl Running {
    fn start(settings: MailboxSettings, sink: &Arc<MemorySink>) -> Self {
        let metrics = Arc::new(Metrics::new());
        let (watcher, status) =
            MailboxWatcher::new(settings, Arc::clone(sink), Arc::clone(&metrics));
        let cancel = CancellationToken::new();
        let task = tokio::spawn(watcher.run(cancel.clone()));
        Self {
            task,
            cancel,
            status,
            metrics,
        }
    }

    async fn wait_state(&mut self, what: &str, condition: impl Fn(&WatcherStatus) -> bool) {
        let waited = tokio::time::timeout(WAIT, self.status.wait_for(|s| condition(s)))
            .await
            .is_ok_and(|result| result.is_ok());
        assert!(
            waited,
            "timed out waiting for {what}: {:?}",
            *self.status.borrow()
        );
    }

    async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(Duration::from_secs(3), self.task)
            .await
            .expect("the watcher stops promptly")
            .unwrap();
    }
}

fn is_idle(status: &WatcherStatus) -> bool {
    status.state == WatcherState::Idle
}

#[tokio::test]
async fn exists_before_the_idle_continuation_is_not_missed() {
    let fake = Fake::start(|state| {
        state.append(b"Subject: old\r\n\r\nold");
        state
            .append_at_idle
            .push(b"Subject: racing\r\n\r\nnew".to_vec());
    })
    .await;
    let sink = MemorySink::new(None);
    // The keepalive timeout is a minute: only the drain after `init` can find this mail.
    let running = Running::start(settings(fake.addr.port()), &sink);
    sink.wait("the racing message", |state| state.acked.len() == 1)
        .await;
    assert_eq!(sink.acked_uids(), [2]);
    let message = sink.state.lock().unwrap().acked[0].clone();
    assert_eq!(message.raw, b"Subject: racing\r\n\r\nnew");
    assert_eq!(message.uid_validity, 1000);
    assert_eq!(
        message.internal_date,
        Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_709_363_472))
    );
    assert_eq!(sink.state.lock().unwrap().resets, [checkpoint(1000, 1)]);
    running.stop().await;
}

#[tokio::test]
async fn a_tagged_no_on_fetch_is_retried_not_skipped() {
    let fake = Fake::start(|state| {
        state.append(b"one");
        state.append(b"two");
        state.fail_fetches = 1;
    })
    .await;
    let sink = MemorySink::new(Some(checkpoint(1000, 0)));
    let running = Running::start(settings(fake.addr.port()), &sink);
    sink.wait("both messages", |state| state.acked.len() == 2)
        .await;
    assert_eq!(sink.acked_uids(), [1, 2]);
    assert_eq!(fake.with(|state| state.connections), 2);
    running.stop().await;
}

#[tokio::test]
async fn a_message_the_server_never_delivers_is_handed_over_as_failed() {
    let fake = Fake::start(|state| {
        state.append(b"one");
        state.append(b"two");
        state.fail_fetches = MAX_FETCH_ATTEMPTS;
    })
    .await;
    let sink = MemorySink::new(Some(checkpoint(1000, 0)));
    let running = Running::start(settings(fake.addr.port()), &sink);
    sink.wait("both messages", |state| state.acked.len() == 2)
        .await;
    let acked = sink.state.lock().unwrap().acked.clone();
    assert_eq!(acked[0].uid, 1);
    assert!(acked[0].raw.is_empty());
    assert!(
        acked[0]
            .fetch_error
            .as_deref()
            .is_some_and(|e| e.contains("5 attempts")),
        "{:?}",
        acked[0].fetch_error
    );
    // The mailbox moved on: the next message arrives normally.
    assert_eq!(acked[1].uid, 2);
    assert_eq!(acked[1].raw, b"two");
    assert_eq!(acked[1].fetch_error, None);
    running.stop().await;
}

#[tokio::test]
async fn a_failing_sink_keeps_the_message_for_the_next_session() {
    let fake = Fake::start(|state| {
        state.append(b"one");
    })
    .await;
    let sink = MemorySink::new(Some(checkpoint(1000, 0)));
    sink.update(|state| state.fail_acks = 2);
    let mut running = Running::start(settings(fake.addr.port()), &sink);
    running
        .wait_state("a backoff after the sink failed", |status| {
            matches!(&status.state, WatcherState::Backoff { last_error } if last_error.contains("disk full"))
        })
        .await;
    sink.wait("the message", |state| state.acked.len() == 1)
        .await;
    assert_eq!(sink.acked_uids(), [1]);
    assert_eq!(sink.state.lock().unwrap().failed_acks, 2);
    let metrics = running.metrics.render();
    // Fetched three times, acknowledged once.
    assert!(
        metrics.contains(r#"report_relay_reports_received_total{mailbox="reports@test.local"} 3"#),
        "{metrics}"
    );
    running.stop().await;
}

#[tokio::test]
async fn missing_uidnext_falls_back_to_status_then_to_the_highest_uid() {
    let fake = Fake::start(|state| {
        state.append(b"one");
        state.append(b"two");
        state.next_uid = 10;
        state.uidnext_in_select = false;
    })
    .await;
    let sink = MemorySink::new(None);
    let mut running = Running::start(settings(fake.addr.port()), &sink);
    running.wait_state("idle", is_idle).await;
    assert_eq!(sink.state.lock().unwrap().resets, [checkpoint(1000, 9)]);
    running.stop().await;

    let fake = Fake::start(|state| {
        state.append(b"one");
        state.append(b"two");
        state.next_uid = 10;
        state.uidnext_in_select = false;
        state.uidnext_in_status = false;
    })
    .await;
    let sink = MemorySink::new(None);
    let mut running = Running::start(settings(fake.addr.port()), &sink);
    running.wait_state("idle", is_idle).await;
    assert_eq!(sink.state.lock().unwrap().resets, [checkpoint(1000, 2)]);
    assert!(fake.commands().iter().any(|c| c == "UID SEARCH UID *"));
    running.stop().await;
}

#[tokio::test]
async fn servers_without_idle_are_polled() {
    let fake = Fake::start(|state| state.idle = false).await;
    let sink = MemorySink::new(None);
    let mut running = Running::start(settings(fake.addr.port()), &sink);
    running
        .wait_state("polling", |status| status.state == WatcherState::Polling)
        .await;
    fake.append(b"polled");
    sink.wait("the polled message", |state| state.acked.len() == 1)
        .await;
    assert!(!fake.commands().iter().any(|c| c == "IDLE"));
    running.stop().await;
    assert_eq!(fake.commands().last().map(String::as_str), Some("LOGOUT"));
}

#[tokio::test]
async fn cancellation_while_idle_sends_done_and_logout() {
    let fake = Fake::start(|_| {}).await;
    let sink = MemorySink::new(None);
    let mut running = Running::start(settings(fake.addr.port()), &sink);
    running.wait_state("idle", is_idle).await;
    let metrics = Arc::clone(&running.metrics);
    assert!(
        metrics
            .render()
            .contains(r#"report_relay_watcher_state{mailbox="reports@test.local",state="idle"} 1"#)
    );
    running.stop().await;
    let commands = fake.commands();
    assert_eq!(commands[commands.len() - 2..], ["DONE", "LOGOUT"]);
    let rendered = metrics.render();
    assert!(
        rendered
            .contains(r#"report_relay_watcher_state{mailbox="reports@test.local",state="idle"} 0"#),
        "{rendered}"
    );
}

#[tokio::test]
async fn a_dead_link_in_idle_is_detected_by_the_keepalive_and_done_timeouts() {
    let fake = Fake::start(|state| state.ignore_done = true).await;
    let sink = MemorySink::new(None);
    let mut settings = settings(fake.addr.port());
    settings.timeouts.idle_keepalive = Duration::from_millis(200);
    let mut running = Running::start(settings, &sink);
    running
        .wait_state("a DONE timeout", |status| {
            matches!(&status.state, WatcherState::Backoff { last_error } if last_error == "DONE timed out after 0.3 s")
        })
        .await;
    running.wait_state("idle again", is_idle).await;
    assert!(fake.with(|state| state.connections) >= 2);
    running.stop().await;
}

#[tokio::test]
async fn a_silent_server_times_out_at_the_greeting() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let _hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let sink = MemorySink::new(None);
    let mut settings = settings(port);
    settings.timeouts.connect = Duration::from_millis(100);
    let mut running = Running::start(settings, &sink);
    running
        .wait_state("a greeting timeout", |status| {
            matches!(&status.state, WatcherState::Backoff { last_error } if last_error == "greeting timed out after 0.1 s")
        })
        .await;
    running.stop().await;
}

#[tokio::test]
async fn a_wrong_password_is_an_authentication_failure() {
    let fake = Fake::start(|state| state.password = "other".into()).await;
    let sink = MemorySink::new(None);
    let mut running = Running::start(settings(fake.addr.port()), &sink);
    running
        .wait_state("an auth failure", |status| {
            matches!(&status.state, WatcherState::Backoff { last_error } if last_error.starts_with("authentication failed (LOGIN): the server rejected the credentials"))
        })
        .await;
    running.stop().await;
    assert!(sink.state.lock().unwrap().resets.is_empty());
}
