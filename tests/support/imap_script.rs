//! A scripted loopback IMAP server, for the watcher's edge cases a real Dovecot cannot be made
//! to produce on demand: EXISTS before the IDLE continuation, tagged NO on FETCH, no UIDNEXT,
//! no IDLE, a link that dies mid-IDLE. [`FakeState`] says how it behaves and records the
//! commands it got; `tests/imap_scripted.rs` runs the watcher against it.

#![allow(dead_code)]

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use report_relay::imap::{Checkpoint, Credentials, ImapTimeouts, MailboxSettings};
use secrecy::SecretString;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc};

use super::watcher;

/// The folder's UIDVALIDITY unless a test sets another.
pub const UID_VALIDITY: u32 = 1000;
/// The password the server accepts unless a test sets another.
pub const PASSWORD: &str = "s3cret";

/// A checkpoint at `last_uid` under [`UID_VALIDITY`].
pub fn checkpoint(last_uid: u32) -> Checkpoint {
    Checkpoint {
        uid_validity: UID_VALIDITY,
        last_uid,
    }
}

/// [`watcher::settings`] for the server on `port`: its [`PASSWORD`] and tighter timeouts (a
/// 0.3 s DONE timeout, 20–100 ms backoff).
pub fn settings(port: u16) -> MailboxSettings {
    let mut settings = watcher::settings("127.0.0.1", port);
    settings.credentials = Credentials::Password(SecretString::from(PASSWORD));
    settings.timeouts = ImapTimeouts {
        connect: Duration::from_secs(2),
        login: Duration::from_secs(2),
        command: Duration::from_secs(2),
        fetch: Duration::from_secs(2),
        idle_keepalive: Duration::from_secs(60),
        done: Duration::from_millis(300),
        logout: Duration::from_secs(1),
        reconnect_min_delay: Duration::from_millis(20),
        reconnect_max_delay: Duration::from_millis(100),
    };
    settings
}

/// How the server behaves, and what it saw.
#[derive(Debug)]
pub struct FakeState {
    pub uid_validity: u32,
    pub next_uid: u32,
    pub messages: Vec<(u32, Vec<u8>)>,
    pub idle: bool,
    pub uidnext_in_select: bool,
    pub uidnext_in_status: bool,
    pub password: String,
    /// Appended when the next IDLE arrives; the EXISTS goes out before `+ idling`.
    pub append_at_idle: Vec<Vec<u8>>,
    /// So many `UID FETCH` get a tagged NO.
    pub fail_fetches: u32,
    /// So many body fetches are never answered (a link too slow for the timeout).
    pub stall_fetches: u32,
    /// Never answer DONE (a link that died mid-IDLE).
    pub ignore_done: bool,
    pub commands: Vec<String>,
    pub connections: u32,
}

impl Default for FakeState {
    fn default() -> Self {
        Self {
            uid_validity: UID_VALIDITY,
            next_uid: 1,
            messages: Vec::new(),
            idle: true,
            uidnext_in_select: true,
            uidnext_in_status: true,
            password: PASSWORD.into(),
            append_at_idle: Vec::new(),
            fail_fetches: 0,
            ignore_done: false,
            stall_fetches: 0,
            commands: Vec::new(),
            connections: 0,
        }
    }
}

impl FakeState {
    pub fn append(&mut self, raw: &[u8]) -> u32 {
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

/// The server, listening on [`Fake::addr`]; every connection is served from one [`FakeState`].
pub struct Fake {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Fake {
    /// Listens on a free loopback port, with the default state changed by `setup`.
    pub async fn start(setup: impl FnOnce(&mut FakeState)) -> Self {
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

    /// Changes (or reads) the state and wakes the sessions that wait in IDLE.
    pub fn with<T>(&self, change: impl FnOnce(&mut FakeState) -> T) -> T {
        let out = change(&mut self.shared.state.lock().unwrap());
        self.shared.changed.notify_waiters();
        out
    }

    pub fn append(&self, raw: &[u8]) -> u32 {
        self.with(|state| state.append(raw))
    }

    /// Every command so far, `LOGIN` without its arguments.
    pub fn commands(&self) -> Vec<String> {
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
            "UID" if upper.starts_with("UID FETCH ") && upper.ends_with("(RFC822.SIZE)") => {
                let state = shared.state.lock().unwrap();
                let uid: u32 = upper.split(' ').nth(2).unwrap().parse().unwrap();
                if let Some(position) = state.messages.iter().position(|(u, _)| *u == uid) {
                    let size = state.messages[position].1.len();
                    out.extend(
                        format!(
                            "* {} FETCH (UID {uid} RFC822.SIZE {size})\r\n",
                            position + 1
                        )
                        .bytes(),
                    );
                }
            }
            "UID" if upper.starts_with("UID FETCH ") => {
                assert!(upper.contains("BODY.PEEK[]"), "{line}");
                let stall = {
                    let mut state = shared.state.lock().unwrap();
                    let stall = state.stall_fetches > 0;
                    state.stall_fetches = state.stall_fetches.saturating_sub(1);
                    stall
                };
                if stall {
                    // Never answer; the client gives up and reconnects.
                    while lines.recv().await.is_some() {}
                    return Ok(());
                }
                let mut state = shared.state.lock().unwrap();
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
