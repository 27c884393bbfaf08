//! Test harness: a real, throw-away Dovecot IMAP server per test.
//!
//! Every [`Dovecot`] owns a private temp dir under `/tmp` (config,
//! `base_dir`, `state_dir`, maildirs, one passwd-file per user, log) and
//! listens in plaintext on `127.0.0.1` on a free
//! port. No system config (`/etc/dovecot`) and no system ports (143/993) are
//! used, so any number of instances can run at once, in one process or in
//! parallel processes (cargo-nextest).
//!
//! Requirements: Debian's `dovecot-imapd` (`dovecot`, `doveadm`); run
//! `scripts/test-deps.sh` to install it. Works as root (mail owned by
//! `nobody`, because Dovecot refuses uid 0 for mail) and rootless (everything
//! runs as the current user).
//!
//! ```ignore
//! mod support;
//!
//! let server = support::dovecot::Dovecot::start().await?;
//! server.add_user("reports@test.local", "secret")?;
//! let uid = server.append("reports@test.local", "INBOX", raw_eml).await?;
//! let tcp = tokio::net::TcpStream::connect(server.addr()).await?;
//! ```
//!
//! Process lifetime: `dovecot -F` runs under a tiny `sh` watchdog, in a
//! process group of its own, whose stdin is a pipe from the test process.
//! [`Dovecot::stop`] and `Drop` close that pipe; the watchdog then sends
//! SIGTERM to the whole group (the harness escalates to SIGKILL if anything
//! is still alive after a timeout). If the test process dies without
//! unwinding (SIGKILL, `process::exit`, nextest timeout) the pipe closes too
//! and the watchdog does the same, so no server outlives its test.
//!
//! Dovecot facts worth knowing (Dovecot 2.3.19, Debian 12):
//! * An IDLE session learns about new mail about **0.5 s** after the mail was
//!   saved (Dovecot batches mailbox change notifications), no matter whether
//!   it came via IMAP APPEND or `doveadm save`.
//! * `doveadm kick` makes IDLE sessions get `* BYE Server shutting down.`
//!   followed by EOF; so do [`Dovecot::restart`] and [`Dovecot::stop`]
//!   (the harness signals the whole process group: SIGTERM to the master
//!   alone leaves sessions with a connected client running, orphaned).
//! * A session that selected a folder sees mail added since only after
//!   IDLE/NOOP delivered `EXISTS`; until then `UID FETCH n:*` answers from
//!   its old view (nothing). `UID FETCH n:*` past the end returns the last
//!   message (RFC 3501 `*` rule).
//! * Dovecot re-reads a passwd-file at most once per second, hence one file
//!   per user, so [`Dovecot::add_user`] takes effect at once.
//! * Wrong passwords are answered after `auth_failure_delay` (2 s); tests
//!   that log in with bad credentials can add `auth_failure_delay = 0` via
//!   [`DovecotOptions::extra_config`].
//! * The server log is `dovecot.log` in the temp dir ([`Dovecot::log_path`]);
//!   Dovecot's own startup errors (config syntax, bind) go to
//!   `dovecot.stderr`. On a panicking test, `Drop` prints the log tail.
//! * Set `RR_DOVECOT_KEEP=1` to keep the temp dir after the test.
//! * Dovecot's auth penalty (anvil, per client IP; not configurable, independent of
//!   `auth_failure_delay`): for 15 s after a failed login, the next authentication from the
//!   same IP is held back 4 s (8 s after two failures, at most 15 s), successful or not. A
//!   client may connect from another loopback address (`127.0.0.N`, bind before connect) to
//!   avoid it.
//!
//! OAuth2 ([`DovecotOptions::oauth2_introspection_url`], Dovecot 2.3 `passdb oauth2`,
//! doc.dovecot.org "Open Authentication v2.0 database"; source `src/auth/mech-oauth2.c`,
//! `src/auth/db-oauth2.c`, `src/lib-oauth2/oauth2-request.c` of 2.3.19):
//! * `XOAUTH2` and `OAUTHBEARER` are advertised (`AUTH=XOAUTH2 AUTH=OAUTHBEARER`) next to
//!   `PLAIN`/`LOGIN`, with `SASL-IR`. Every login POSTs `token=<T>` (plus empty `client_id` and
//!   `client_secret`) to the introspection URL; the answer's `active` must be `true` and its
//!   `username` equal the SASL user after lowercasing both (`username_format = %Lu`). No auth
//!   cache (`auth_cache_size = 0`), so a revoked or expired token fails on the next login.
//! * A refused token (inactive, unknown, another user's) gets a challenge, not a `NO`:
//!   `+ eyJzdGF0dXMiOiI0MDEiLCJzY2hlbWVzIjoiYmVhcmVyIiwic2NvcGUiOiJtYWlsIn0=`
//!   (`{"status":"401","schemes":"bearer","scope":"mail"}`) for XOAUTH2,
//!   `+ eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIn0=` (`{"status":"invalid_token"}`) for OAUTHBEARER;
//!   the client answers an empty line (XOAUTH2) or `AQ==` (`\x01`, RFC 7628 §3.2.3) and gets
//!   `<tag> NO [AUTHENTICATIONFAILED] Authentication failed.` after `auth_failure_delay`.
//! * An introspection endpoint that answers 5xx or not at all: no challenge,
//!   `<tag> NO [UNAVAILABLE] Temporary authentication failure. [<host>:<date>]`.
//! * `tests/fake_oauth2.rs` has the exact exchanges, with and without an initial response.

// Each integration test binary uses a different subset of this module.
#![allow(dead_code)]

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener as StdTcpListener};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command as StdCommand, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// How long [`Dovecot::start`] / [`Dovecot::restart`] wait for the greeting.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How many fresh ports [`Dovecot::start`] tries when another process grabs
/// the chosen port between probing and Dovecot's `bind()`.
const START_ATTEMPTS: usize = 5;
/// Upper bound for every network step of the harness's own IMAP client and
/// every `doveadm` call.
const OP_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a graceful stop may take before the harness sends SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs `dovecot -F` in the foreground and, when stdin (a pipe from the test
/// process) reaches EOF, sends SIGTERM to its whole process group (the
/// harness spawns it as a group leader): master *and* children. Dovecot's
/// master alone does not end sessions with a connected client when it gets
/// SIGTERM. `$1` = dovecot binary, `$2` = config file. Exit status is the
/// master's.
const WATCHDOG_SH: &str = r#"exec 3<&0 </dev/null
"$1" -F -c "$2" 3<&- &
pid=$!
trap '' TERM
( read -r _ <&3; kill -TERM 0 ) &
watcher=$!
exec 3<&-
wait "$pid"
rc=$?
kill -KILL "$watcher" 2>/dev/null
exit "$rc"
"#;

/// The mailbox user the IMAP tests log in as.
pub const USER: &str = "reports@test.local";
/// [`USER`]'s password: a space and quotes, so a client must quote it in `LOGIN`.
pub const PASS: &str = "s3cret-Pa55 \"quoted\"";

/// A small plain-text mail to [`USER`]: `Subject: [Report] {subject}`, `Message-ID:
/// <{subject}@test.local>`, body `body of {subject}`.
pub fn message(subject: &str) -> Vec<u8> {
    format!(
        "From: Superset <superset@test.local>\r\n\
         To: {USER}\r\n\
         Subject: [Report] {subject}\r\n\
         Message-ID: <{subject}@test.local>\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\
         \r\n\
         body of {subject}\r\n"
    )
    .into_bytes()
}

/// Tunables for [`Dovecot::start_with`]. `Default` gives Dovecot's own
/// defaults for everything except what the harness needs.
#[derive(Debug, Clone, Default)]
pub struct DovecotOptions {
    /// `imap_idle_notify_interval`: how often an IDLE session gets
    /// `* OK Still here` (Dovecot default: 2 min). A few seconds speeds up
    /// keepalive tests.
    pub idle_notify_interval: Option<Duration>,
    /// `mail_max_userip_connections` (Dovecot default: 10). The harness's
    /// own [`Dovecot::append`] briefly uses one connection too.
    pub max_userip_connections: Option<u32>,
    /// Configure the server for this many concurrent IMAP clients: long-lived
    /// `imap-login` processes (`service_count = 0`) with room for all of them,
    /// `service imap { service_count = 0; client_limit = 100 }` (a process per
    /// 100 sessions instead of one each, which keeps IDLE's inotify instances
    /// under the kernel's default of 128 per user) and `default_client_limit` raised for
    /// auth, anvil and the other internal services. `None` keeps Dovecot's
    /// defaults (100 login processes of one connection each).
    pub scale_clients: Option<u32>,
    /// OAuth2 login: `Some(url)` makes the server accept `AUTHENTICATE XOAUTH2` and
    /// `AUTHENTICATE OAUTHBEARER` (RFC 7628), each bearer token checked by a `passdb oauth2` that
    /// POSTs `token=<T>` to this RFC 7662 introspection URL (e.g.
    /// [`super::oauth2::FakeOAuth2::introspection_url`]) on every login and takes the mailbox
    /// from the answer's `username`, which must equal the SASL user (case-insensitively), with
    /// `active` = `true`. `PLAIN`/`LOGIN` keep working against the passwd-files of
    /// [`Dovecot::add_user`]: each passdb is limited to its mechanisms (`passdb { mechanisms =
    /// }`), so a token is never tried as a password nor a password as a token. See
    /// [`Dovecot::oauth2_config_path`] and the module docs for what Dovecot answers.
    pub oauth2_introspection_url: Option<String>,
    /// Extra lines appended verbatim at the end of `dovecot.conf`. A later
    /// setting overrides an earlier one, and a repeated section (e.g.
    /// `service imap-login { inet_listener imaps { ... } }`) is merged into
    /// the harness's, so this can also enable TLS on an extra listener.
    pub extra_config: String,
}

/// `doveadm mailbox status` of one folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MailboxStatus {
    /// Number of messages in the folder.
    pub messages: u32,
    /// UIDNEXT: the UID the next delivered message will get.
    pub uid_next: u32,
    /// UIDVALIDITY of the folder.
    pub uid_validity: u32,
}

/// A running, private Dovecot instance. Dropping it stops the server and
/// deletes its temp dir.
///
/// All methods take `&self`, so the value can be shared (`Arc<Dovecot>`)
/// between a test and background tasks; do not call [`Dovecot::restart`] or
/// [`Dovecot::stop`] concurrently with each other.
pub struct Dovecot {
    dir: Option<tempfile::TempDir>,
    root: PathBuf,
    port: u16,
    instance: String,
    dovecot_bin: PathBuf,
    doveadm_bin: PathBuf,
    mail_owner: MailOwner,
    options: DovecotOptions,
    users: Mutex<HashMap<String, String>>,
    running: Mutex<Option<Running>>,
}

/// Who owns the mail files and which users Dovecot's own processes use.
#[derive(Debug, Clone)]
struct MailOwner {
    running_as_root: bool,
    uid: u32,
    gid: u32,
    /// Rootless only: user and group names of the current process.
    user: String,
    group: String,
}

/// One spawned server (watchdog `sh` + `dovecot -F`).
struct Running {
    child: Child,
    stdin: Option<ChildStdin>,
    greeting_token: String,
}

impl Dovecot {
    /// Starts a server with [`DovecotOptions::default`] and no users.
    ///
    /// Returns once the server answers the IMAP greeting on its port.
    pub async fn start() -> Result<Dovecot> {
        Self::start_with(DovecotOptions::default()).await
    }

    /// Starts a server with the given options and no users.
    ///
    /// Picks a free loopback port (bind `127.0.0.1:0`, release) and, if
    /// another process wins the race for it, retries with a new port.
    pub async fn start_with(options: DovecotOptions) -> Result<Dovecot> {
        let dovecot_bin = find_binary("dovecot")?;
        let doveadm_bin = find_binary("doveadm")?;
        let mail_owner = MailOwner::detect()?;

        // Short path: Dovecot puts unix sockets under base_dir (108-byte limit).
        let dir = tempfile::Builder::new()
            .prefix("rr-dovecot-")
            .tempdir_in("/tmp")
            .context("creating the Dovecot temp dir")?;
        let root = dir.path().to_path_buf();
        // Mail processes run as `nobody` when we are root: they must be able
        // to traverse the temp dir.
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755))?;
        let mail = root.join("mail");
        fs::create_dir(&mail)?;
        if mail_owner.running_as_root {
            std::os::unix::fs::chown(&mail, Some(mail_owner.uid), Some(mail_owner.gid))
                .context("chown of the mail dir to the mail user")?;
        }
        let users_dir = root.join("users");
        fs::create_dir(&users_dir)?;
        fs::set_permissions(&users_dir, fs::Permissions::from_mode(0o755))?;

        let instance = format!(
            "rrdovecot-{}",
            root.file_name()
                .unwrap()
                .to_string_lossy()
                .trim_start_matches("rr-dovecot-")
        );

        let mut server = Dovecot {
            dir: Some(dir),
            root,
            port: 0,
            instance,
            dovecot_bin,
            doveadm_bin,
            mail_owner,
            options,
            users: Mutex::new(HashMap::new()),
            running: Mutex::new(None),
        };

        let mut last_err = None;
        for _ in 0..START_ATTEMPTS {
            server.port = free_port()?;
            match server.spawn_and_wait_ready().await {
                Ok(running) => {
                    *server.running.lock().unwrap() = Some(running);
                    return Ok(server);
                }
                Err(StartError::PortTaken(e)) => last_err = Some(e),
                Err(StartError::Other(e)) => return Err(e),
            }
        }
        Err(last_err.unwrap().context(format!(
            "Dovecot could not bind a free port after {START_ATTEMPTS} attempts"
        )))
    }

    /// Host to connect to (`127.0.0.1`).
    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    /// Plaintext IMAP port (stable across [`Dovecot::restart`]).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:port`, ready for `tokio::net::TcpStream::connect`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, self.port))
    }

    /// The instance's temp dir (config, maildirs, logs).
    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// Path of this instance's `dovecot.conf` (for manual `doveadm -c`).
    pub fn config_path(&self) -> PathBuf {
        self.root.join("dovecot.conf")
    }

    /// Path of the `passdb oauth2` settings file (`dovecot-oauth2.conf.ext`), written when
    /// [`DovecotOptions::oauth2_introspection_url`] is set.
    pub fn oauth2_config_path(&self) -> PathBuf {
        self.root.join("dovecot-oauth2.conf.ext")
    }

    /// Dovecot's log file (all services log here).
    pub fn log_path(&self) -> PathBuf {
        self.root.join("dovecot.log")
    }

    /// Current contents of the log file plus Dovecot's stderr (startup
    /// errors), for assertions and diagnostics.
    pub fn read_log(&self) -> String {
        let mut out = fs::read_to_string(self.log_path()).unwrap_or_default();
        let stderr = fs::read_to_string(self.root.join("dovecot.stderr")).unwrap_or_default();
        if !stderr.trim().is_empty() {
            out.push_str("--- stderr ---\n");
            out.push_str(&stderr);
        }
        out
    }

    /// `instance_name` of this server; its processes are titled
    /// `dovecot-<instance>/<service>`.
    pub fn instance_name(&self) -> &str {
        &self.instance
    }

    /// PIDs of processes that belong to this instance (master and
    /// children), found through `/proc`. Empty once the server is stopped.
    pub fn processes(&self) -> Vec<u32> {
        instance_pids(&self.instance, &self.config_path())
    }

    /// Whether the server process is alive.
    pub fn is_running(&self) -> bool {
        let mut guard = self.running.lock().unwrap();
        match guard.as_mut() {
            Some(r) => matches!(r.child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Adds a mailbox user with a plaintext password; it can log in at once
    /// (no restart). Calling it again for an existing user changes the
    /// password, which Dovecot may only notice up to 1 s later
    /// (passwd-files are re-read at most once per second).
    pub fn add_user(&self, login: &str, password: &str) -> Result<()> {
        for (what, v) in [("login", login), ("password", password)] {
            ensure!(
                !v.is_empty() && !v.contains([':', '\n', '\r', '\0']),
                "invalid {what} {v:?} for the passwd-file"
            );
        }
        ensure!(!login.contains(['/', ' ']), "invalid login {login:?}");
        ensure!(
            !login.starts_with('.'),
            "invalid login {login:?} (leading dot)"
        );
        // One passwd-file per user (`passdb ... args = .../users/%u`):
        // Dovecot re-reads a changed passwd-file at most once per second, so
        // a user added to a shared file right after a lookup would stay
        // unknown for up to 1 s; a new file is read at once.
        let users_dir = self.root.join("users");
        let tmp = users_dir.join(format!(".{login}.tmp"));
        fs::write(&tmp, format!("{login}:{{PLAIN}}{password}:::::\n"))?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644))?;
        fs::rename(&tmp, users_dir.join(login))?;
        self.users
            .lock()
            .unwrap()
            .insert(login.to_owned(), password.to_owned());
        Ok(())
    }

    /// Adds a mailbox user that logs in with OAuth2 only (`XOAUTH2`/`OAUTHBEARER`, see
    /// [`DovecotOptions::oauth2_introspection_url`]): its passwd-file gets a random 32-byte
    /// password that no test knows, so `LOGIN`/`PLAIN` refuse every password a test sends,
    /// while `doveadm` (which needs the user to exist) and [`Dovecot::append`] (which uses that
    /// password internally) work as for any user. Takes effect at once.
    pub fn add_oauth2_user(&self, login: &str) -> Result<()> {
        let secret = format!(
            "oauth2-only-{:016x}{:016x}",
            rand::random::<u64>(),
            rand::random::<u64>()
        );
        self.add_user(login, &secret)
    }

    /// Password of a user added with [`Dovecot::add_user`].
    pub fn password(&self, login: &str) -> Result<String> {
        self.users
            .lock()
            .unwrap()
            .get(login)
            .cloned()
            .ok_or_else(|| anyhow!("unknown user {login:?}; call add_user first"))
    }

    /// Delivers `raw` (a complete RFC 5322 message) to `folder` with an IMAP
    /// `APPEND` over a fresh plaintext connection, and returns its UID (from
    /// `APPENDUID`). IDLE sessions on that folder get `EXISTS` (~0.5 s later).
    ///
    /// `folder` must exist (see [`Dovecot::create_folder`]) and be ASCII.
    pub async fn append(&self, login: &str, folder: &str, raw: &[u8]) -> Result<u32> {
        let password = self.password(login)?;
        let fut = async {
            let mut conn = MiniImap::connect(self.addr()).await?;
            conn.command(&format!(
                "LOGIN {} {}",
                imap_quote(login)?,
                imap_quote(&password)?
            ))
            .await
            .context("LOGIN")?;
            // LITERAL+ (advertised by Dovecot): no wait for a continuation.
            let mut cmd =
                format!("APPEND {} {{{}+}}\r\n", imap_quote(folder)?, raw.len()).into_bytes();
            cmd.extend_from_slice(raw);
            let done = conn.command_bytes(&cmd).await.context("APPEND")?;
            let uid = parse_appenduid(&done).ok_or_else(|| anyhow!("no APPENDUID in {done:?}"))?;
            let _ = conn.command("LOGOUT").await;
            Ok(uid)
        };
        tokio::time::timeout(OP_TIMEOUT, fut)
            .await
            .map_err(|_| anyhow!("IMAP APPEND timed out"))?
    }

    /// Delivers `raw` to `folder` with `doveadm save` (no IMAP connection,
    /// no password needed; IDLE sessions are notified just like on APPEND).
    /// Returns the UID the message got.
    pub async fn save(&self, login: &str, folder: &str, raw: &[u8]) -> Result<u32> {
        let before = self.mailbox_status(login, folder).await?;
        self.doveadm_stdin(&["save", "-u", login, "-m", folder], raw)
            .await?;
        // Dovecot assigns UIDNEXT; nothing else writes while the test does.
        Ok(before.uid_next)
    }

    /// Creates a folder (`doveadm mailbox create`).
    pub async fn create_folder(&self, login: &str, folder: &str) -> Result<()> {
        self.doveadm(&["mailbox", "create", "-u", login, folder])
            .await
            .map(drop)
    }

    /// Deletes a folder and its messages (`doveadm mailbox delete`). INBOX
    /// cannot be deleted.
    pub async fn delete_folder(&self, login: &str, folder: &str) -> Result<()> {
        self.doveadm(&["mailbox", "delete", "-u", login, folder])
            .await
            .map(drop)
    }

    /// Deletes and recreates a (non-INBOX) folder: all messages are gone and
    /// the folder gets a new UIDVALIDITY, UIDs restart at 1. Returns the new
    /// UIDVALIDITY.
    pub async fn recreate_folder(&self, login: &str, folder: &str) -> Result<u32> {
        let old = self.uid_validity(login, folder).await?;
        self.delete_folder(login, folder).await?;
        self.create_folder(login, folder).await?;
        let new = self.uid_validity(login, folder).await?;
        ensure!(
            new != old,
            "UIDVALIDITY of {folder} did not change on recreate"
        );
        Ok(new)
    }

    /// Gives `folder` (INBOX too) a new UIDVALIDITY in place, keeping its
    /// messages and their UIDs (`doveadm mailbox update --uid-validity`).
    /// This is what a client sees after a server-side rebuild: same
    /// history, new UIDVALIDITY — a correct client must not replay it.
    /// Returns the new UIDVALIDITY. Sessions that have the folder selected
    /// get no notification; reconnect to observe the change.
    pub async fn reset_uidvalidity(&self, login: &str, folder: &str) -> Result<u32> {
        let old = self.uid_validity(login, folder).await?;
        let new = match old.wrapping_add(1) {
            0 => 1,
            v => v,
        };
        self.doveadm(&[
            "mailbox",
            "update",
            "-u",
            login,
            "--uid-validity",
            &new.to_string(),
            folder,
        ])
        .await?;
        let now = self.uid_validity(login, folder).await?;
        ensure!(now == new, "UIDVALIDITY is {now}, expected {new}");
        Ok(new)
    }

    /// `messages`, `uidnext` and `uidvalidity` of a folder
    /// (`doveadm mailbox status`).
    pub async fn mailbox_status(&self, login: &str, folder: &str) -> Result<MailboxStatus> {
        let out = self
            .doveadm(&[
                "-f",
                "flow",
                "mailbox",
                "status",
                "-u",
                login,
                "messages uidnext uidvalidity",
                folder,
            ])
            .await?;
        let mut fields = HashMap::new();
        for tok in out.split_whitespace() {
            if let Some((k, v)) = tok.split_once('=') {
                fields.insert(k, v);
            }
        }
        let get = |k: &str| -> Result<u32> {
            fields
                .get(k)
                .ok_or_else(|| anyhow!("no {k} in doveadm output {out:?}"))?
                .parse()
                .with_context(|| format!("parsing {k} in {out:?}"))
        };
        Ok(MailboxStatus {
            messages: get("messages")?,
            uid_next: get("uidnext")?,
            uid_validity: get("uidvalidity")?,
        })
    }

    /// UIDNEXT of a folder.
    pub async fn uid_next(&self, login: &str, folder: &str) -> Result<u32> {
        Ok(self.mailbox_status(login, folder).await?.uid_next)
    }

    /// UIDVALIDITY of a folder.
    pub async fn uid_validity(&self, login: &str, folder: &str) -> Result<u32> {
        Ok(self.mailbox_status(login, folder).await?.uid_validity)
    }

    /// UIDs of all messages in a folder, ascending (`doveadm search`).
    pub async fn uids(&self, login: &str, folder: &str) -> Result<Vec<u32>> {
        let out = self
            .doveadm(&["search", "-u", login, "mailbox", folder, "ALL"])
            .await?;
        let mut uids = out
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .map(|u| u.parse::<u32>().with_context(|| format!("bad uid {u:?}")))
            .collect::<Result<Vec<_>>>()?;
        uids.sort_unstable();
        Ok(uids)
    }

    /// Flags and keywords of one message, e.g. `["\\Seen", "$Forwarded"]`
    /// (`doveadm fetch flags`). Errors if the UID does not exist.
    pub async fn flags(&self, login: &str, folder: &str, uid: u32) -> Result<Vec<String>> {
        let out = self
            .doveadm(&[
                "-f",
                "flow",
                "fetch",
                "-u",
                login,
                "flags",
                "mailbox",
                folder,
                "uid",
                &uid.to_string(),
            ])
            .await?;
        let line = out
            .lines()
            .find_map(|l| l.trim().strip_prefix("flags="))
            .ok_or_else(|| anyhow!("no message with UID {uid} in {folder}"))?;
        Ok(line.split_whitespace().map(str::to_owned).collect())
    }

    /// Disconnects every IMAP session of `login` (`doveadm kick`): IDLE
    /// clients get `* BYE Server shutting down.` and then EOF. Returns
    /// whether any session was kicked.
    pub async fn kick(&self, login: &str) -> Result<bool> {
        let out = self.doveadm_raw(&["kick", login], None).await?;
        match out.status.code() {
            Some(0) => Ok(true),
            // EX_NOUSER: "no users kicked".
            Some(68) => Ok(false),
            _ => bail!(
                "doveadm kick {login} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        }
    }

    /// Stops the server and starts it again on the same port with the same
    /// data and users; returns once it answers the greeting again. Open
    /// sessions get `* BYE Server shutting down.` and EOF.
    pub async fn restart(&self) -> Result<()> {
        self.stop().await?;
        let mut last_err = None;
        // The port normally rebinds at once (SO_REUSEADDR); a retry covers
        // the rare case of another process grabbing it meanwhile.
        for _ in 0..3 {
            match self.spawn_and_wait_ready().await {
                Ok(running) => {
                    *self.running.lock().unwrap() = Some(running);
                    return Ok(());
                }
                Err(StartError::PortTaken(e)) => {
                    last_err = Some(e);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(StartError::Other(e)) => return Err(e),
            }
        }
        Err(last_err
            .unwrap()
            .context(format!("port {} is taken, cannot restart", self.port)))
    }

    /// Stops the server (graceful, SIGKILL after a timeout) and waits until
    /// all of its processes are gone. The data stays; [`Dovecot::restart`]
    /// brings it back. Stopping a stopped server is a no-op.
    pub async fn stop(&self) -> Result<()> {
        let running = self.running.lock().unwrap().take();
        if let Some(running) = running {
            let instance = self.instance.clone();
            let config = self.config_path();
            tokio::task::spawn_blocking(move || stop_running(running, &instance, &config))
                .await
                .context("stop task panicked")??;
        }
        Ok(())
    }

    /// Runs `doveadm -c <this config> <args>` and returns stdout; fails
    /// with stderr on a non-zero exit.
    pub async fn doveadm(&self, args: &[&str]) -> Result<String> {
        let out = self.doveadm_raw(args, None).await?;
        ensure_success(args, &out)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    async fn doveadm_stdin(&self, args: &[&str], stdin: &[u8]) -> Result<String> {
        let out = self.doveadm_raw(args, Some(stdin)).await?;
        ensure_success(args, &out)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    async fn doveadm_raw(
        &self,
        args: &[&str],
        stdin: Option<&[u8]>,
    ) -> Result<std::process::Output> {
        let mut cmd = tokio::process::Command::new(&self.doveadm_bin);
        cmd.arg("-c")
            .arg(self.config_path())
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let fut = async {
            let mut child = cmd.spawn().context("spawning doveadm")?;
            if let Some(input) = stdin {
                let mut pipe = child.stdin.take().unwrap();
                pipe.write_all(input)
                    .await
                    .context("writing doveadm stdin")?;
                drop(pipe);
            }
            child
                .wait_with_output()
                .await
                .context("waiting for doveadm")
        };
        tokio::time::timeout(OP_TIMEOUT, fut)
            .await
            .map_err(|_| anyhow!("doveadm {args:?} timed out"))?
    }

    /// Writes the config (fresh greeting token), spawns the watchdog and
    /// waits until *this* server answers on the port.
    async fn spawn_and_wait_ready(&self) -> Result<Running, StartError> {
        let token = format!("rr-dovecot-ready-{:016x}", rand::random::<u64>());
        if let Some(url) = &self.options.oauth2_introspection_url {
            fs::write(self.oauth2_config_path(), Self::render_oauth2_config(url))
                .context("writing dovecot-oauth2.conf.ext")?;
        }
        fs::write(self.config_path(), self.render_config(&token))
            .context("writing dovecot.conf")?;
        // A master killed with SIGKILL leaves its pid file behind.
        let _ = fs::remove_file(self.root.join("run").join("master.pid"));
        let stderr = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join("dovecot.stderr"))
            .context("opening dovecot.stderr")?;
        let stderr_len = stderr.metadata().map(|m| m.len()).unwrap_or(0);
        let mut child = StdCommand::new("/bin/sh")
            .arg("-c")
            .arg(WATCHDOG_SH)
            .arg("dovecot-watchdog")
            .arg(&self.dovecot_bin)
            .arg(self.config_path())
            // Own process group, so stop can signal master + children.
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(stderr.try_clone().context("dup stderr file")?)
            .stderr(stderr)
            .spawn()
            .context("spawning dovecot")?;
        let stdin = child.stdin.take();
        let mut running = Running {
            child,
            stdin,
            greeting_token: token,
        };

        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = running.child.try_wait().context("try_wait dovecot")? {
                let stderr = fs::read_to_string(self.root.join("dovecot.stderr"))
                    .unwrap_or_default()
                    .get(stderr_len as usize..)
                    .unwrap_or_default()
                    .to_owned();
                let log = self.read_log();
                let err = anyhow!(
                    "dovecot exited during startup ({status}):\n{stderr}\n{}",
                    tail(&log, 20)
                );
                return Err(if stderr.contains("Address already in use") {
                    StartError::PortTaken(err)
                } else {
                    StartError::Other(err)
                });
            }
            match probe_greeting(self.addr()).await {
                Some(greeting) if greeting.contains(&running.greeting_token) => return Ok(running),
                Some(other) => {
                    // Somebody else answers on our port: our bind() fails.
                    let _ = stop_running(running, &self.instance, &self.config_path());
                    return Err(StartError::PortTaken(anyhow!(
                        "port {} answered by another server: {other:?}",
                        self.port
                    )));
                }
                None => {}
            }
            if Instant::now() >= deadline {
                let log = self.read_log();
                let _ = stop_running(running, &self.instance, &self.config_path());
                return Err(StartError::Other(anyhow!(
                    "dovecot did not answer on {} within {READY_TIMEOUT:?}:\n{}",
                    self.addr(),
                    tail(&log, 30)
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The `passdb` sections. Without OAuth2: one passwd-file per user. With OAuth2 (Dovecot
    /// 2.3 `passdb { mechanisms = }`, doc.dovecot.org "Open Authentication v2.0 database"): the
    /// oauth2 passdb for XOAUTH2/OAUTHBEARER only, the passwd-file for PLAIN/LOGIN and for
    /// lookups without a mechanism (`none`: doveadm's userdb lookups, which `userdb static`
    /// answers only for users that a passdb lookup knows).
    fn render_passdbs(&self) -> String {
        let d = self.root.display();
        let passwd_file = format!("  args = scheme=PLAIN username_format=%u {d}/users/%u\n");
        if self.options.oauth2_introspection_url.is_none() {
            return format!("passdb {{\n  driver = passwd-file\n{passwd_file}}}\n");
        }
        format!(
            "# No auth cache (Dovecot's default, made explicit): every login introspects its token,
# so a revoked or expired token is refused at once.
auth_cache_size = 0
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {conf}
}}
passdb {{
  driver = passwd-file
  mechanisms = plain login none
{passwd_file}}}
",
            conf = self.oauth2_config_path().display()
        )
    }

    /// `dovecot-oauth2.conf.ext` for [`DovecotOptions::oauth2_introspection_url`]: RFC 7662
    /// introspection by POST (`token=<T>&client_id=&client_secret=`, see Dovecot 2.3.19
    /// `src/lib-oauth2/oauth2-request.c`), the mailbox from `username`, refused unless
    /// `active` is `true` (Dovecot compares the JSON value as text).
    fn render_oauth2_config(url: &str) -> String {
        format!(
            "# Generated by tests/support/dovecot.rs (doc.dovecot.org, Open Authentication v2.0 database).
introspection_mode = post
introspection_url = {url}
username_attribute = username
active_attribute = active
active_value = true
timeout_msecs = 10000
"
        )
    }

    fn render_config(&self, greeting_token: &str) -> String {
        let d = self.root.display();
        let o = &self.mail_owner;
        let oauth2 = self.options.oauth2_introspection_url.is_some();
        let mut c = String::new();
        let _ = writeln!(
            c,
            "# Generated by tests/support/dovecot.rs; no system config is read.
instance_name = {instance}
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = {mechanisms}
auth_verbose = yes
login_greeting = {greeting_token}
mail_location = maildir:~/Maildir
mail_fsync = never
first_valid_uid = {uid}
first_valid_gid = {gid}
{passdbs}userdb {{
  driver = static
  args = uid={uid} gid={gid} home={d}/mail/%u
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}",
            instance = self.instance,
            uid = o.uid,
            gid = o.gid,
            port = self.port,
            mechanisms = if oauth2 {
                "plain login xoauth2 oauthbearer"
            } else {
                "plain login"
            },
            passdbs = self.render_passdbs(),
        );
        if o.running_as_root {
            // Package users (dovecot/dovenull) when present, else `nobody`
            // (Dovecot's defaults fail when the users do not exist).
            let internal = if user_exists("dovecot") {
                "dovecot"
            } else {
                "nobody"
            };
            let login = if user_exists("dovenull") {
                "dovenull"
            } else {
                "nobody"
            };
            let internal_group = if internal == "dovecot" && group_exists("dovecot") {
                "dovecot"
            } else {
                "nogroup"
            };
            let _ = writeln!(
                c,
                "default_internal_user = {internal}
default_internal_group = {internal_group}
default_login_user = {login}"
            );
        } else {
            // Dovecot's "rootless" layout: everything as the current user,
            // no chroots.
            let _ = writeln!(
                c,
                "default_internal_user = {user}
default_internal_group = {group}
default_login_user = {user}
service anvil {{
  chroot =
}}
service imap-login {{
  chroot =
}}",
                user = o.user,
                group = o.group,
            );
        }
        if self.options.idle_notify_interval.is_some()
            || self.options.max_userip_connections.is_some()
        {
            c.push_str("protocol imap {\n");
            if let Some(i) = self.options.idle_notify_interval {
                let _ = writeln!(
                    c,
                    "  imap_idle_notify_interval = {} secs",
                    i.as_secs().max(1)
                );
            }
            if let Some(n) = self.options.max_userip_connections {
                let _ = writeln!(c, "  mail_max_userip_connections = {n}");
            }
            c.push_str("}\n");
        }
        if let Some(clients) = self.options.scale_clients {
            let _ = writeln!(
                c,
                "default_client_limit = {internal}
service imap-login {{
  service_count = 0
  client_limit = {logins}
  process_min_avail = 2
}}
service imap {{
  service_count = 0
  client_limit = 100
  process_limit = {imap_processes}
}}",
                // Every login and imap process is a client of auth, anvil, log and
                // config, on top of the sessions themselves.
                internal = 2 * clients + 1000,
                logins = clients + 100,
                imap_processes = clients / 100 + 10,
            );
        }
        c.push_str(&self.options.extra_config);
        c.push('\n');
        c
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- dovecot {} (port {}) log tail, dir {} ---\n{}",
                self.instance,
                self.port,
                self.root.display(),
                tail(&self.read_log(), 40)
            );
        }
        let running = self
            .running
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(running) = running
            && let Err(e) = stop_running(running, &self.instance, &self.config_path())
        {
            eprintln!("dovecot harness: stopping {}: {e:#}", self.instance);
        }
        if std::env::var_os("RR_DOVECOT_KEEP").is_some_and(|v| v == "1")
            && let Some(dir) = self.dir.take()
        {
            eprintln!("dovecot harness: keeping {}", dir.keep().display());
        }
    }
}

enum StartError {
    /// Another process holds the port; retry elsewhere.
    PortTaken(anyhow::Error),
    Other(anyhow::Error),
}

impl From<anyhow::Error> for StartError {
    fn from(e: anyhow::Error) -> Self {
        StartError::Other(e)
    }
}

/// Stops one spawned server and waits (bounded) until the watchdog, the
/// master and all children of this instance are gone. Blocking.
fn stop_running(mut running: Running, instance: &str, config: &Path) -> Result<()> {
    let pgid = running.child.id();
    // EOF on the watchdog's stdin -> SIGTERM to the process group: IMAP
    // sessions send `* BYE Server shutting down.`, the master exits.
    drop(running.stdin.take());
    let deadline = Instant::now() + STOP_TIMEOUT;
    let mut exited = false;
    while Instant::now() < deadline {
        if running.child.try_wait()?.is_some() {
            exited = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    if !exited {
        kill(&format!("-{pgid}"), "KILL");
        let _ = running.child.kill();
        let _ = running.child.wait();
    }
    // Children exit right after the master; make sure none is left behind.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let pids = instance_pids(instance, config);
        if pids.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            kill(&format!("-{pgid}"), "KILL");
            for pid in &pids {
                kill(&pid.to_string(), "KILL");
            }
            std::thread::sleep(Duration::from_millis(50));
            let left = instance_pids(instance, config);
            ensure!(
                left.is_empty(),
                "dovecot processes survived SIGKILL: {left:?}"
            );
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `kill -<signal> <target>` (a pid, or `-pgid` for a process group), via
/// the shell builtin: `/usr/bin/kill` (procps) is not on minimal systems.
fn kill(target: &str, signal: &str) {
    let _ = StdCommand::new("/bin/sh")
        .arg("-c")
        .arg(format!("kill -{signal} \"$1\""))
        .arg("sh")
        .arg(target)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// PIDs of the processes of the instance named `instance` with config file
/// `config` (see [`Dovecot::instance_name`], [`Dovecot::config_path`]);
/// usable after the [`Dovecot`] is gone, to prove nothing leaked. Children
/// are titled `dovecot-<instance>/<service>`, the master runs as
/// `dovecot -F -c <config>`. Zombies are skipped.
pub fn instance_pids(instance: &str, config: &Path) -> Vec<u32> {
    let title = format!("dovecot-{instance}/");
    let config = config.to_string_lossy().into_owned();
    let mut pids = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return pids;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if cmdline.is_empty() {
            continue; // zombie or kernel thread
        }
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let is_master = cmdline.contains(" -F -c ")
            && cmdline.contains(&config)
            && !cmdline.starts_with("/bin/sh");
        if cmdline.starts_with(&title) || is_master {
            pids.push(pid);
        }
    }
    pids
}

impl MailOwner {
    fn detect() -> Result<MailOwner> {
        let status =
            fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
        let field = |name: &str| -> Result<u32> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().nth(1)) // effective id
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| anyhow!("no {name} in /proc/self/status"))
        };
        let (euid, egid) = (field("Uid:")?, field("Gid:")?);
        if euid == 0 {
            // Dovecot refuses uid 0 for mail; `nobody` owns the test mail.
            let (uid, gid) = lookup_passwd("nobody").unwrap_or((65534, 65534));
            Ok(MailOwner {
                running_as_root: true,
                uid,
                gid,
                user: "nobody".into(),
                group: String::new(),
            })
        } else {
            let user = id_name("-un")?;
            let group = id_name("-gn")?;
            Ok(MailOwner {
                running_as_root: false,
                uid: euid,
                gid: egid,
                user,
                group,
            })
        }
    }
}

fn id_name(flag: &str) -> Result<String> {
    let out = StdCommand::new("id")
        .arg(flag)
        .output()
        .context("running id")?;
    ensure!(out.status.success(), "id {flag} failed");
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn lookup_passwd(user: &str) -> Option<(u32, u32)> {
    let passwd = fs::read_to_string("/etc/passwd").ok()?;
    let line = passwd.lines().find(|l| l.split(':').next() == Some(user))?;
    let f: Vec<_> = line.split(':').collect();
    Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?))
}

fn user_exists(user: &str) -> bool {
    lookup_passwd(user).is_some()
}

fn group_exists(group: &str) -> bool {
    fs::read_to_string("/etc/group")
        .map(|g| g.lines().any(|l| l.split(':').next() == Some(group)))
        .unwrap_or(false)
}

/// `dovecot`/`doveadm` from PATH or the Debian locations.
fn find_binary(name: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let candidates = std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"].map(PathBuf::from));
    for dir in candidates {
        let p = dir.join(name);
        if p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        {
            return Ok(p);
        }
    }
    bail!(
        "`{name}` not found: install Dovecot with scripts/test-deps.sh (Debian package dovecot-imapd)"
    )
}

/// A port that was free a moment ago (bind `127.0.0.1:0`, release).
pub fn free_port() -> Result<u16> {
    let l = StdTcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Connects and reads the first line; `None` while nothing answers yet.
async fn probe_greeting(addr: SocketAddr) -> Option<String> {
    let probe = async {
        let stream = TcpStream::connect(addr).await.ok()?;
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line).await.ok()?;
        let _ = reader.get_mut().write_all(b"z LOGOUT\r\n").await;
        (!line.is_empty()).then_some(line)
    };
    tokio::time::timeout(Duration::from_secs(2), probe)
        .await
        .ok()
        .flatten()
}

fn ensure_success(args: &[&str], out: &std::process::Output) -> Result<()> {
    ensure!(
        out.status.success(),
        "doveadm {} failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<_> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// IMAP quoted string (ASCII, no CR/LF).
fn imap_quote(s: &str) -> Result<String> {
    ensure!(
        s.is_ascii() && !s.contains(['\r', '\n', '\0']),
        "{s:?} cannot be sent as an IMAP quoted string"
    );
    Ok(format!(
        "\"{}\"",
        s.replace('\\', "\\\\").replace('"', "\\\"")
    ))
}

/// `[APPENDUID <uidvalidity> <uid>]` from a tagged OK.
fn parse_appenduid(line: &str) -> Option<u32> {
    let rest = &line[line.find("[APPENDUID ")? + "[APPENDUID ".len()..];
    let mut it = rest.split([' ', ']']);
    it.next()?;
    it.next()?.parse().ok()
}

/// Just enough IMAP for LOGIN/APPEND/LOGOUT (no literals in responses).
struct MiniImap {
    stream: BufReader<TcpStream>,
    tag: u32,
}

impl MiniImap {
    async fn connect(addr: SocketAddr) -> Result<MiniImap> {
        let stream = TcpStream::connect(addr).await.context("connecting")?;
        let mut conn = MiniImap {
            stream: BufReader::new(stream),
            tag: 0,
        };
        let greeting = conn.read_line().await?;
        ensure!(
            greeting.starts_with("* OK"),
            "unexpected greeting {greeting:?}"
        );
        Ok(conn)
    }

    async fn read_line(&mut self) -> Result<String> {
        let mut line = String::new();
        let n = self.stream.read_line(&mut line).await?;
        ensure!(n > 0, "connection closed by server");
        Ok(line.trim_end().to_owned())
    }

    async fn command(&mut self, cmd: &str) -> Result<String> {
        self.command_bytes(cmd.as_bytes()).await
    }

    /// Sends `<tag> <cmd>\r\n`, returns the tagged OK line.
    async fn command_bytes(&mut self, cmd: &[u8]) -> Result<String> {
        self.tag += 1;
        let tag = format!("h{}", self.tag);
        let mut buf = format!("{tag} ").into_bytes();
        buf.extend_from_slice(cmd);
        buf.extend_from_slice(b"\r\n");
        self.stream.get_mut().write_all(&buf).await?;
        loop {
            let line = self.read_line().await?;
            if let Some(rest) = line.strip_prefix(&format!("{tag} ")) {
                ensure!(rest.starts_with("OK"), "server said: {line}");
                return Ok(line);
            }
        }
    }
}
