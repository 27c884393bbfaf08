//! Self-tests of the Dovecot test harness (`tests/support/dovecot.rs`),
//! driven with async-imap 0.12 over a plain `tokio::net::TcpStream`.
//!
//! Needs Dovecot: `scripts/test-deps.sh`.
//! The IDLE test prints Dovecot's own notification delay (append -> EXISTS):
//! `cargo test --test dovecot_harness -- --nocapture idle`.

mod support;

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use async_imap::extensions::idle::IdleResponse;
use async_imap::imap_proto::{MailboxDatum, Response, Status};
use futures::TryStreamExt;
use support::dovecot::{self, Dovecot, DovecotOptions, PASS, USER, message};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

type Session = async_imap::Session<TcpStream>;

/// Upper bound for any single step in these tests.
const STEP: Duration = Duration::from_secs(15);

async fn step<T>(what: &str, fut: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(STEP, fut)
        .await
        .map_err(|_| anyhow!("{what}: timed out after {STEP:?}"))?
        .with_context(|| what.to_owned())
}

/// TCP connect, greeting, LOGIN.
async fn connect(server: &Dovecot, login: &str) -> Result<Session> {
    let password = server.password(login)?;
    step("connect+login", async {
        let tcp = TcpStream::connect(server.addr()).await?;
        tcp.set_nodelay(true)?;
        let mut client = async_imap::Client::new(tcp);
        let greeting = client
            .read_response()
            .await?
            .ok_or_else(|| anyhow!("no greeting"))?;
        ensure!(
            matches!(
                greeting.parsed(),
                Response::Data {
                    status: Status::Ok,
                    ..
                }
            ),
            "bad greeting {:?}",
            greeting.parsed()
        );
        client
            .login(login, &password)
            .await
            .map_err(|(e, _)| anyhow::Error::from(e))
    })
    .await
}

async fn fetch_bodies(session: &mut Session, range: &str) -> Result<Vec<(u32, Vec<u8>)>> {
    step("UID FETCH", async {
        let fetches: Vec<_> = session
            .uid_fetch(range, "BODY.PEEK[]")
            .await?
            .try_collect()
            .await?;
        Ok(fetches
            .iter()
            .map(|f| (f.uid.unwrap_or(0), f.body().unwrap_or_default().to_vec()))
            .collect())
    })
    .await
}

fn is_exists(resp: &IdleResponse) -> bool {
    matches!(resp, IdleResponse::NewData(d)
        if matches!(d.parsed(), Response::MailboxData(MailboxDatum::Exists(_))))
}

fn describe(resp: &IdleResponse) -> String {
    match resp {
        IdleResponse::NewData(d) => format!("NewData({:?})", d.parsed()),
        IdleResponse::Timeout => "Timeout".into(),
        IdleResponse::ManualInterrupt => "ManualInterrupt (EOF)".into(),
    }
}

/// Waits in IDLE until `accept` matches a response, or EOF/timeout.
/// Returns the accepted response (or the EOF/timeout outcome) and any other
/// untagged responses seen before it.
async fn wait_idle_for(
    idle: &mut async_imap::extensions::idle::Handle<TcpStream>,
    accept: impl Fn(&IdleResponse) -> bool,
) -> Result<(IdleResponse, Vec<String>)> {
    let mut others = Vec::new();
    loop {
        let (wait, _stop) = idle.wait_with_timeout(Duration::from_secs(30));
        let resp = wait.await?;
        if accept(&resp) || !matches!(resp, IdleResponse::NewData(_)) {
            return Ok((resp, others));
        }
        others.push(describe(&resp));
    }
}

/// Enters IDLE, runs `deliver` concurrently, and returns the time from
/// `deliver` completing to the IDLE wake-up with `EXISTS`, plus the
/// session after DONE.
async fn idle_wake_delay<F>(session: Session, deliver: F) -> Result<(Duration, Session)>
where
    F: Future<Output = Result<u32>>,
{
    let mut idle = session.idle();
    step("IDLE init", async { Ok(idle.init().await?) }).await?;
    let ((woke, woke_at), (delivered, delivered_at)) = tokio::join!(
        async {
            let r = wait_idle_for(&mut idle, is_exists).await;
            (r, Instant::now())
        },
        async {
            let r = deliver.await;
            (r, Instant::now())
        }
    );
    delivered?;
    let (woke, others) = woke?;
    if !others.is_empty() {
        eprintln!("IDLE: before EXISTS got {others:?}");
    }
    ensure!(is_exists(&woke), "IDLE woke with {}", describe(&woke));
    let session = step("DONE", async { Ok(idle.done().await?) }).await?;
    Ok((woke_at.saturating_duration_since(delivered_at), session))
}

#[tokio::test]
async fn login_select_append_and_fetch() -> Result<()> {
    let server = Dovecot::start().await?;
    server.add_user(USER, PASS)?;
    assert_eq!(server.host(), "127.0.0.1");
    assert_ne!(server.port(), 0);

    let mut session = connect(&server, USER).await?;
    let mailbox = step("SELECT", async { Ok(session.select("INBOX").await?) }).await?;
    let status = server.mailbox_status(USER, "INBOX").await?;
    assert_eq!(mailbox.exists, 0);
    assert_eq!(mailbox.uid_validity, Some(status.uid_validity));
    assert_eq!(mailbox.uid_next, Some(status.uid_next));
    assert_eq!(status.uid_next, 1);

    // IMAP APPEND returns the UID.
    let raw1 = message("first");
    let uid1 = server.append(USER, "INBOX", &raw1).await?;
    assert_eq!(uid1, 1);
    // doveadm save works too.
    let raw2 = message("second");
    let uid2 = server.save(USER, "INBOX", &raw2).await?;
    assert_eq!(uid2, 2);
    assert_eq!(server.uids(USER, "INBOX").await?, vec![1, 2]);
    assert_eq!(server.uid_next(USER, "INBOX").await?, 3);

    // This session selected INBOX while it was empty and has not been told
    // about the new mail yet: Dovecot answers from the session's view, so
    // a UID FETCH now would return nothing. NOOP syncs the view.
    step("NOOP", async { Ok(session.noop().await?) }).await?;
    let got = fetch_bodies(&mut session, &format!("{uid1}:*")).await?;
    assert_eq!(got, vec![(uid1, raw1.clone()), (uid2, raw2)]);
    // The `N:*` quirk: a range past the end still returns the last message.
    let past_end = fetch_bodies(&mut session, "10:*").await?;
    assert_eq!(
        past_end.iter().map(|(u, _)| *u).collect::<Vec<_>>(),
        vec![2]
    );
    // BODY.PEEK[] leaves \Seen alone.
    assert!(
        !server
            .flags(USER, "INBOX", uid1)
            .await?
            .contains(&"\\Seen".to_owned())
    );
    step("STORE", async {
        let _: Vec<_> = session
            .uid_store(uid1.to_string(), "+FLAGS (\\Seen $Forwarded)")
            .await?
            .try_collect()
            .await?;
        Ok(())
    })
    .await?;
    let flags = server.flags(USER, "INBOX", uid1).await?;
    assert!(flags.contains(&"\\Seen".to_owned()), "{flags:?}");
    assert!(flags.contains(&"$Forwarded".to_owned()), "{flags:?}");

    // Several mailboxes (users) per server, plus folders.
    server.add_user("other@test.local", "pw2")?;
    server.create_folder("other@test.local", "Reports").await?;
    let uid = server
        .append("other@test.local", "Reports", &message("other"))
        .await?;
    assert_eq!(uid, 1);
    let mut other = connect(&server, "other@test.local").await?;
    let mb = step("SELECT Reports", async {
        Ok(other.select("Reports").await?)
    })
    .await?;
    assert_eq!(mb.exists, 1);
    assert_eq!(server.mailbox_status(USER, "INBOX").await?.messages, 2);
    // A wrong password is refused.
    server.add_user("third@test.local", "right")?;
    let tcp = TcpStream::connect(server.addr()).await?;
    let mut client = async_imap::Client::new(tcp);
    client.read_response().await?;
    assert!(client.login("third@test.local", "wrong").await.is_err());

    step("LOGOUT", async { Ok(session.logout().await?) }).await?;
    step("LOGOUT", async { Ok(other.logout().await?) }).await?;
    Ok(())
}

#[tokio::test]
async fn idle_is_woken_by_append_and_save() -> Result<()> {
    let server = Dovecot::start().await?;
    server.add_user(USER, PASS)?;
    let mut session = connect(&server, USER).await?;
    step("SELECT", async { Ok(session.select("INBOX").await?) }).await?;

    const SAMPLES: usize = 4;
    let mut append_delays = Vec::new();
    let mut save_delays = Vec::new();
    for i in 0..SAMPLES {
        let raw = message(&format!("idle-append-{i}"));
        let (d, s) = idle_wake_delay(session, server.append(USER, "INBOX", &raw)).await?;
        append_delays.push(d);
        session = s;
        let raw = message(&format!("idle-save-{i}"));
        let (d, s) = idle_wake_delay(session, server.save(USER, "INBOX", &raw)).await?;
        save_delays.push(d);
        session = s;
    }
    let got = fetch_bodies(&mut session, "1:*").await?;
    assert_eq!(got.len(), 2 * SAMPLES);

    let fmt = |v: &mut Vec<Duration>| {
        v.sort();
        format!(
            "min {:?} median {:?} max {:?} (n={})",
            v[0],
            v[v.len() / 2],
            v[v.len() - 1],
            v.len()
        )
    };
    eprintln!(
        "DOVECOT IDLE NOTIFICATION DELAY (message committed -> IDLE wake with EXISTS):\n  \
         IMAP APPEND : {}\n  doveadm save: {}",
        fmt(&mut append_delays),
        fmt(&mut save_delays)
    );
    for d in append_delays.iter().chain(&save_delays) {
        assert!(*d < Duration::from_secs(5), "IDLE notification took {d:?}");
    }
    step("LOGOUT", async { Ok(session.logout().await?) }).await?;
    Ok(())
}

/// `imap_idle_notify_interval` reaches Dovecot: `* OK Still here` arrives.
#[tokio::test]
async fn idle_keepalive_interval_option() -> Result<()> {
    let server = Dovecot::start_with(DovecotOptions {
        idle_notify_interval: Some(Duration::from_secs(1)),
        max_userip_connections: Some(3),
        ..Default::default()
    })
    .await?;
    server.add_user("k@test.local", "pw")?;
    let config = std::fs::read_to_string(server.config_path())?;
    assert!(
        config.contains("imap_idle_notify_interval = 1 secs"),
        "{config}"
    );
    assert!(
        config.contains("mail_max_userip_connections = 3"),
        "{config}"
    );

    let mut conn = BufReader::new(TcpStream::connect(server.addr()).await?);
    let mut line = String::new();
    let mut expect =
        async |conn: &mut BufReader<TcpStream>, send: &str, until: &str| -> Result<()> {
            if !send.is_empty() {
                conn.get_mut().write_all(send.as_bytes()).await?;
            }
            loop {
                line.clear();
                ensure!(
                    conn.read_line(&mut line).await? > 0,
                    "EOF waiting for {until:?}"
                );
                if line.starts_with(until) {
                    return Ok(());
                }
            }
        };
    step("raw IDLE keepalive", async {
        expect(&mut conn, "", "* OK").await?;
        expect(&mut conn, "a LOGIN k@test.local pw\r\n", "a OK").await?;
        expect(&mut conn, "b SELECT INBOX\r\n", "b OK").await?;
        expect(&mut conn, "c IDLE\r\n", "+ ").await?;
        expect(&mut conn, "", "* OK Still here").await?;
        expect(&mut conn, "DONE\r\n", "c OK").await
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn kick_ends_idle_session() -> Result<()> {
    let server = Dovecot::start().await?;
    server.add_user(USER, PASS)?;
    assert!(!server.kick(USER).await?, "nothing to kick yet");

    let mut session = connect(&server, USER).await?;
    step("SELECT", async { Ok(session.select("INBOX").await?) }).await?;
    let mut idle = session.idle();
    step("IDLE init", async { Ok(idle.init().await?) }).await?;
    let is_bye = |r: &IdleResponse| {
        matches!(r, IdleResponse::NewData(d)
            if matches!(d.parsed(), Response::Data { status: Status::Bye, .. }))
    };
    let (woke, kicked) = tokio::join!(wait_idle_for(&mut idle, is_bye), async {
        // Let the IDLE wait start reading first (not required, but realistic).
        tokio::task::yield_now().await;
        server.kick(USER).await
    });
    assert!(kicked?, "kick found the session");
    let (woke, others) = woke?;
    eprintln!(
        "kick -> IDLE wait returned {} (after {others:?})",
        describe(&woke)
    );
    assert!(
        is_bye(&woke) || matches!(woke, IdleResponse::ManualInterrupt),
        "expected BYE or EOF, got {}",
        describe(&woke)
    );
    // The connection is gone: DONE cannot succeed.
    let done = tokio::time::timeout(STEP, idle.done()).await?;
    assert!(done.is_err(), "DONE after kick succeeded");

    // The user can log in again afterwards.
    let mut again = connect(&server, USER).await?;
    step("NOOP", async { Ok(again.noop().await?) }).await?;
    Ok(())
}

#[tokio::test]
async fn restart_keeps_port_users_and_data() -> Result<()> {
    let server = Dovecot::start().await?;
    server.add_user(USER, PASS)?;
    let uid = server
        .append(USER, "INBOX", &message("before-restart"))
        .await?;
    let before = server.mailbox_status(USER, "INBOX").await?;
    let port = server.port();
    let pids_before = server.processes();
    assert!(!pids_before.is_empty());

    let mut session = connect(&server, USER).await?;
    step("SELECT", async { Ok(session.select("INBOX").await?) }).await?;

    let t = Instant::now();
    server.restart().await?;
    eprintln!("restart took {:?}", t.elapsed());
    assert!(server.is_running());
    assert_eq!(server.port(), port);
    assert!(server.processes().iter().all(|p| !pids_before.contains(p)));

    // The old session is dead (BYE or EOF).
    let noop = tokio::time::timeout(STEP, session.noop()).await?;
    assert!(noop.is_err(), "old session survived the restart");

    let mut session = connect(&server, USER).await?;
    let mb = step("SELECT", async { Ok(session.select("INBOX").await?) }).await?;
    assert_eq!(mb.uid_validity, Some(before.uid_validity));
    assert_eq!(mb.uid_next, Some(before.uid_next));
    let got = fetch_bodies(&mut session, &format!("{uid}:*")).await?;
    assert_eq!(got, vec![(uid, message("before-restart"))]);
    assert_eq!(server.mailbox_status(USER, "INBOX").await?, before);

    // stop() is explicit and idempotent; restart() brings it back.
    server.stop().await?;
    assert!(!server.is_running());
    assert!(server.processes().is_empty());
    assert!(TcpStream::connect(server.addr()).await.is_err());
    server.stop().await?;
    server.restart().await?;
    assert_eq!(server.uids(USER, "INBOX").await?, vec![uid]);
    Ok(())
}

#[tokio::test]
async fn uidvalidity_reset_and_folder_recreate() -> Result<()> {
    let server = Dovecot::start().await?;
    server.add_user(USER, PASS)?;
    for i in 0..3 {
        server
            .append(USER, "INBOX", &message(&format!("hist-{i}")))
            .await?;
    }
    let before = server.mailbox_status(USER, "INBOX").await?;

    // In place: same messages and UIDs, new UIDVALIDITY.
    let new = server.reset_uidvalidity(USER, "INBOX").await?;
    assert_ne!(new, before.uid_validity);
    let after = server.mailbox_status(USER, "INBOX").await?;
    assert_eq!(after.uid_validity, new);
    assert_eq!(after.messages, 3);
    assert_eq!(after.uid_next, before.uid_next);
    assert_eq!(server.uids(USER, "INBOX").await?, vec![1, 2, 3]);
    let mut session = connect(&server, USER).await?;
    let mb = step("SELECT", async { Ok(session.select("INBOX").await?) }).await?;
    assert_eq!(mb.uid_validity, Some(new));
    assert_eq!(mb.exists, 3);
    assert_eq!(fetch_bodies(&mut session, "1:*").await?.len(), 3);

    // Recreate: history gone, UIDs restart, new UIDVALIDITY.
    server.create_folder(USER, "Reports").await?;
    server.append(USER, "Reports", &message("r1")).await?;
    server.append(USER, "Reports", &message("r2")).await?;
    let old = server.mailbox_status(USER, "Reports").await?;
    let new = server.recreate_folder(USER, "Reports").await?;
    assert_ne!(new, old.uid_validity);
    let now = server.mailbox_status(USER, "Reports").await?;
    assert_eq!((now.messages, now.uid_next), (0, 1));
    assert_eq!(server.append(USER, "Reports", &message("r3")).await?, 1);
    let mb = step("SELECT Reports", async {
        Ok(session.select("Reports").await?)
    })
    .await?;
    assert_eq!(mb.uid_validity, Some(new));
    Ok(())
}

#[tokio::test]
async fn two_instances_at_once() -> Result<()> {
    let (a, b) = tokio::join!(Dovecot::start(), Dovecot::start());
    let (a, b) = (a?, b?);
    assert_ne!(a.port(), b.port());
    assert_ne!(a.dir(), b.dir());
    assert_ne!(a.instance_name(), b.instance_name());
    for s in [&a, &b] {
        s.add_user(USER, PASS)?;
    }
    a.append(USER, "INBOX", &message("only-on-a")).await?;
    assert_eq!(a.mailbox_status(USER, "INBOX").await?.messages, 1);
    assert_eq!(b.mailbox_status(USER, "INBOX").await?.messages, 0);

    let (mut sa, mut sb) = (connect(&a, USER).await?, connect(&b, USER).await?);
    let ma = step("SELECT a", async { Ok(sa.select("INBOX").await?) }).await?;
    let mb = step("SELECT b", async { Ok(sb.select("INBOX").await?) }).await?;
    assert_eq!((ma.exists, mb.exists), (1, 0));

    // Kicking or stopping one leaves the other alone.
    assert!(a.kick(USER).await?);
    step("NOOP b", async { Ok(sb.noop().await?) }).await?;
    let (a_name, a_conf) = (a.instance_name().to_owned(), a.config_path());
    drop(sa);
    drop(a);
    assert!(dovecot::instance_pids(&a_name, &a_conf).is_empty());
    step("NOOP b", async { Ok(sb.noop().await?) }).await?;
    assert!(b.is_running());
    Ok(())
}

/// Several servers starting at the same moment (port picking, base_dirs).
#[tokio::test]
async fn parallel_starts() -> Result<()> {
    let servers = futures::future::try_join_all((0..4).map(|_| Dovecot::start())).await?;
    let mut ports: Vec<_> = servers.iter().map(Dovecot::port).collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), servers.len());
    for s in &servers {
        s.add_user(USER, PASS)?;
        let mut session = connect(s, USER).await?;
        step("LOGOUT", async { Ok(session.logout().await?) }).await?;
    }
    Ok(())
}

/// A server that does not react to SIGTERM (here: a SIGSTOPped master) is
/// killed with SIGKILL by stop(), and can be restarted afterwards.
#[tokio::test]
async fn stop_escalates_to_sigkill() -> Result<()> {
    let server = Dovecot::start().await?;
    server.add_user(USER, PASS)?;
    let _session = connect(&server, USER).await?;
    let master = std::fs::read_to_string(server.dir().join("run/master.pid"))?;
    let status = std::process::Command::new("/bin/sh")
        .args(["-c", "kill -STOP \"$1\"", "sh", master.trim()])
        .status()?;
    assert!(status.success());
    let t = Instant::now();
    server.stop().await?;
    eprintln!("stop of a stuck master took {:?}", t.elapsed());
    assert!(server.processes().is_empty(), "{:?}", server.processes());
    server.restart().await?;
    let mut session = connect(&server, USER).await?;
    step("NOOP", async { Ok(session.noop().await?) }).await?;
    Ok(())
}

/// A panicking test still stops its server (Drop during unwinding).
#[tokio::test]
async fn drop_on_panic_leaves_no_processes() -> Result<()> {
    let (tx, rx) = tokio::sync::oneshot::channel::<(String, PathBuf, Vec<u32>)>();
    let task = tokio::spawn(async move {
        let server = Dovecot::start().await.unwrap();
        server.add_user(USER, PASS).unwrap();
        // An open IMAP session means an extra `imap` process.
        let session = connect(&server, USER).await.unwrap();
        tx.send((
            server.instance_name().to_owned(),
            server.config_path(),
            server.processes(),
        ))
        .unwrap();
        let _keep = session;
        panic!("deliberate panic with a running Dovecot");
    });
    let err = task.await.expect_err("task should panic");
    assert!(err.is_panic());
    let (name, config, pids) = rx.await?;
    assert!(pids.len() >= 3, "expected master + children, got {pids:?}");
    let left = dovecot::instance_pids(&name, &config);
    assert!(left.is_empty(), "leaked dovecot processes: {left:?}");
    Ok(())
}

/// A test process killed with SIGKILL (no Drop at all) does not leak its
/// server: the watchdog sees its stdin pipe close and stops Dovecot.
#[tokio::test]
async fn sigkilled_test_process_leaves_no_processes() -> Result<()> {
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .args([
            "--exact",
            "helper_hold_dovecot_until_killed",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("RR_DOVECOT_HELPER", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = step("helper READY", async {
        while let Some(line) = lines.next_line().await? {
            // libtest prints "test <name> ... " on the same line first.
            if let Some((_, rest)) = line.split_once("HELPER-READY ") {
                return Ok(rest.to_owned());
            }
        }
        bail!("helper exited before READY")
    })
    .await?;
    let (name, config) = ready.split_once(' ').context("READY line")?;
    let config = PathBuf::from(config);
    assert!(!dovecot::instance_pids(name, &config).is_empty());

    child.start_kill()?; // SIGKILL
    child.wait().await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = dovecot::instance_pids(name, &config);
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "leaked after SIGKILL: {left:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The temp dir itself is left behind in this case (no Drop ran).
    if let Some(dir) = config.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
    Ok(())
}

/// Helper process for `sigkilled_test_process_leaves_no_processes`.
#[tokio::test]
#[ignore = "helper, run by sigkilled_test_process_leaves_no_processes"]
async fn helper_hold_dovecot_until_killed() -> Result<()> {
    if std::env::var_os("RR_DOVECOT_HELPER").is_none() {
        return Ok(());
    }
    let server = Dovecot::start().await?;
    println!(
        "HELPER-READY {} {}",
        server.instance_name(),
        server.config_path().display()
    );
    tokio::time::sleep(Duration::from_secs(120)).await;
    Ok(())
}
