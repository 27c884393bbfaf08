//! Test harness: a real, throw-away PostgreSQL server per test.
//!
//! Every [`Postgres`] owns a private temp dir under `/tmp` (`data/` cluster, `sock/` for the
//! unix socket, `postgres.log`) and listens on `127.0.0.1` on a free port, so any number of
//! instances can run at once, in one process or in parallel processes (cargo-nextest). The
//! cluster has a role [`USER`] with password [`PASSWORD`] that owns the database [`DATABASE`];
//! [`Postgres::url`] is the URL to give the relay. The superuser `postgres` can log in over the
//! unix socket only (`trust`); TCP logins need a password (`scram-sha-256`).
//!
//! Requirements: Debian's `postgresql` package (binaries in `/usr/lib/postgresql/<version>/bin`,
//! the highest version is used); run `scripts/test-deps.sh` to install it. PostgreSQL refuses to
//! run as root, so as root `initdb` and `postgres` run as the `postgres` system user (or `nobody`
//! when it does not exist) via `setpriv`; rootless, everything runs as the current user.
//!
//! ```ignore
//! mod support;
//!
//! let pg = support::postgres::Postgres::start().await?;
//! let url = pg.url(); // postgres://relay:<password>@127.0.0.1:<port>/relay
//! assert_eq!(pg.psql("SELECT 1").await?, "1");
//! pg.restart().await?; // same data dir, same port
//! ```
//!
//! Speed: `initdb` runs once per machine, for a template cluster in
//! `target/tmp/pg-template-<version>-<owner>-r<rev>` (created under a file lock, so parallel
//! test processes wait for the first one). Each [`Postgres::start`] copies the template
//! (`cp -a`) and starts the server with `fsync`, `synchronous_commit` and `full_page_writes`
//! off: durability against an OS crash is not needed, a server crash or restart is still
//! survived (WAL is written).
//!
//! Process lifetime: `postgres` runs under a tiny `sh` watchdog, in a process group of its own,
//! whose stdin is a pipe from the test process. [`Postgres::stop`] asks for a fast shutdown
//! (SIGINT: sessions are terminated, a shutdown checkpoint is written); `Drop` closes the pipe
//! and the watchdog sends SIGQUIT (immediate shutdown). If the test process dies without
//! unwinding (SIGKILL, nextest timeout) the pipe closes too, so no server outlives its test.
//!
//! On a panicking test `Drop` prints the log tail; set `RR_POSTGRES_KEEP=1` to keep the temp dir.

// Each integration test binary uses a different subset of this module.
#![allow(dead_code)]

use std::fs;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command as StdCommand, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use tokio::net::TcpStream;

use super::dovecot::free_port;

/// The role the relay logs in as; it owns [`DATABASE`].
pub const USER: &str = "relay";
/// [`USER`]'s password (URL-safe, so [`Postgres::url`] needs no escaping).
pub const PASSWORD: &str = "relay-test-pw-7c1e";
/// The relay's database.
pub const DATABASE: &str = "relay";

/// How long [`Postgres::start`] / [`Postgres::start_again`] wait for the server.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How many fresh ports [`Postgres::start`] tries when another process grabs the chosen port
/// between probing and the server's `bind()`.
const START_ATTEMPTS: usize = 5;
/// How long a fast shutdown may take before the harness escalates (SIGQUIT, then SIGKILL).
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound for one `psql` run.
const PSQL_TIMEOUT: Duration = Duration::from_secs(20);
/// Bump when the template's contents change, so an old template under `target/` is not reused.
const TEMPLATE_REV: u32 = 2;

/// Runs the server command (`$@`) in the background with stdin from `/dev/null`. Each line read
/// from the watchdog's stdin (a pipe from the test process) is a signal name sent to the server
/// (`INT` = fast shutdown); EOF sends `QUIT` (immediate shutdown). Exit status is the server's.
const WATCHDOG_SH: &str = r#"exec 3<&0 </dev/null
"$@" 3<&- &
pid=$!
( while read -r sig; do kill -"$sig" "$pid" 2>/dev/null; done; kill -QUIT "$pid" 2>/dev/null ) <&3 &
watcher=$!
exec 3<&-
wait "$pid"
rc=$?
kill -KILL "$watcher" 2>/dev/null
exit "$rc"
"#;

/// A running, private PostgreSQL cluster. Dropping it kills the server and deletes its temp dir.
///
/// All methods take `&self`, so the value can be shared (`Arc<Postgres>`) between a test and
/// background tasks; do not call [`Postgres::stop`], [`Postgres::start_again`] or
/// [`Postgres::restart`] concurrently with each other.
pub struct Postgres {
    dir: Option<tempfile::TempDir>,
    root: PathBuf,
    port: u16,
    bin: PathBuf,
    run_as: Option<RunAs>,
    running: Mutex<Option<Running>>,
}

/// The unprivileged user the server runs as when the tests run as root.
#[derive(Debug, Clone)]
struct RunAs {
    name: String,
    uid: u32,
    gid: u32,
}

/// One spawned server (watchdog `sh` + `postgres`).
struct Running {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Postgres {
    /// Starts a fresh cluster (a copy of the template) on a free loopback port and returns once
    /// it accepts connections.
    pub async fn start() -> Result<Postgres> {
        let (dir, bin, run_as) = tokio::task::spawn_blocking(prepare)
            .await
            .context("prepare task panicked")??;
        let root = dir.path().to_path_buf();
        let mut server = Postgres {
            dir: Some(dir),
            root,
            port: 0,
            bin,
            run_as,
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
            "PostgreSQL could not bind a free port after {START_ATTEMPTS} attempts"
        )))
    }

    /// `postgres://relay:<password>@127.0.0.1:<port>/relay`.
    pub fn url(&self) -> String {
        format!(
            "postgres://{USER}:{PASSWORD}@127.0.0.1:{port}/{DATABASE}",
            port = self.port
        )
    }

    /// Host to connect to (`127.0.0.1`).
    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    /// TCP port (stable across [`Postgres::restart`]).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:port`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, self.port))
    }

    /// The instance's temp dir (`data/`, `sock/`, `postgres.log`).
    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// The cluster's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    /// Directory of the unix socket `.s.PGSQL.<port>` (superuser `postgres` logs in with
    /// `trust` there).
    pub fn socket_dir(&self) -> PathBuf {
        self.root.join("sock")
    }

    /// `/usr/lib/postgresql/<version>/bin/<name>` of the version this server runs.
    pub fn bin(&self, name: &str) -> PathBuf {
        self.bin.join(name)
    }

    /// The server log (stderr of `postgres`, all restarts appended).
    pub fn log_path(&self) -> PathBuf {
        self.root.join("postgres.log")
    }

    /// Current contents of the server log.
    pub fn read_log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// PID of the postmaster, from `postmaster.pid`; `None` while stopped.
    pub fn pid(&self) -> Option<u32> {
        postmaster_pid(&self.data_dir())
    }

    /// Whether the server process is alive.
    pub fn is_running(&self) -> bool {
        let mut guard = self.running.lock().unwrap();
        match guard.as_mut() {
            Some(r) => matches!(r.child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Runs `sql` with `psql` as [`USER`] over TCP (password in `PGPASSWORD`); returns the
    /// unaligned, tuples-only output (`|`-separated columns, one row a line), trimmed. Fails
    /// with psql's stderr when the login or a statement fails.
    pub async fn psql(&self, sql: &str) -> Result<String> {
        self.psql_with_password(PASSWORD, sql).await
    }

    /// [`Postgres::psql`] with another password (for testing rejected logins).
    pub async fn psql_with_password(&self, password: &str, sql: &str) -> Result<String> {
        let mut cmd = tokio::process::Command::new(self.bin("psql"));
        cmd.args([
            "-X",
            "-A",
            "-t",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
        ])
        .arg("-p")
        .arg(self.port.to_string())
        .args(["-U", USER, "-d", DATABASE, "-c", sql])
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "5")
        .env_remove("PGSERVICE")
        .env_remove("PGOPTIONS")
        .stdin(Stdio::null())
        .kill_on_drop(true);
        let out = tokio::time::timeout(PSQL_TIMEOUT, cmd.output())
            .await
            .map_err(|_| anyhow!("psql {sql:?} timed out after {PSQL_TIMEOUT:?}"))?
            .context("running psql")?;
        ensure!(
            out.status.success(),
            "psql {sql:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Fast shutdown (SIGINT: open sessions are terminated, a shutdown checkpoint is written);
    /// escalates to SIGQUIT and SIGKILL after timeouts. Returns once the server is gone. The data
    /// stays; [`Postgres::start_again`] brings it back. Stopping a stopped server is a no-op.
    pub async fn stop(&self) -> Result<()> {
        let running = self.running.lock().unwrap().take();
        let Some(mut running) = running else {
            return Ok(());
        };
        if let Some(stdin) = running.stdin.as_mut() {
            let _ = stdin.write_all(b"INT\n").and_then(|()| stdin.flush());
        }
        if wait_exit(&mut running.child, STOP_TIMEOUT).await {
            return Ok(());
        }
        eprintln!(
            "postgres harness: no fast shutdown within {STOP_TIMEOUT:?}, sending SIGQUIT (port {})",
            self.port
        );
        drop(running.stdin.take());
        if wait_exit(&mut running.child, Duration::from_secs(5)).await {
            return Ok(());
        }
        kill_group(&running.child, "KILL");
        ensure!(
            wait_exit(&mut running.child, Duration::from_secs(5)).await,
            "postgres (port {}) survived SIGKILL",
            self.port
        );
        Ok(())
    }

    /// Starts the stopped server again: same data dir, same port. Returns once it accepts
    /// connections; a no-op while it runs.
    pub async fn start_again(&self) -> Result<()> {
        if self.is_running() {
            return Ok(());
        }
        // A reaped-but-recorded server (it died on its own) must not keep its slot.
        self.running.lock().unwrap().take();
        let mut last_err = None;
        // The port normally rebinds at once (SO_REUSEADDR); a retry covers the rare case of
        // another process grabbing it meanwhile.
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
            .context(format!("port {} is taken, cannot start again", self.port)))
    }

    /// [`Postgres::stop`] then [`Postgres::start_again`].
    pub async fn restart(&self) -> Result<()> {
        self.stop().await?;
        self.start_again().await
    }

    /// Spawns the watchdog + `postgres` and waits until *this* server accepts connections.
    async fn spawn_and_wait_ready(&self) -> Result<Running, StartError> {
        let data = self.data_dir();
        // Left behind by a SIGKILLed server; its "ready" line must not fool the readiness check.
        let _ = fs::remove_file(data.join("postmaster.pid"));
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .context("opening postgres.log")?;
        let log_len = log.metadata().map(|m| m.len()).unwrap_or(0);
        let mut cmd = StdCommand::new("/bin/sh");
        cmd.arg("-c").arg(WATCHDOG_SH).arg("postgres-watchdog");
        if let Some(user) = &self.run_as {
            cmd.args(setpriv_args(user));
        }
        cmd.arg(self.bin("postgres"))
            .arg("-D")
            .arg(&data)
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(self.socket_dir())
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "fsync=off"])
            .args(["-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off"])
            .env("LC_ALL", "C")
            // Own process group: Drop can kill watchdog and postmaster together.
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(log.try_clone().context("dup postgres.log")?)
            .stderr(log);
        let mut child = cmd.spawn().context("spawning postgres")?;
        let stdin = child.stdin.take();
        let mut running = Running { child, stdin };

        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = running.child.try_wait().context("try_wait postgres")? {
                let log = self.read_log();
                let new = log.get(log_len as usize..).unwrap_or_default();
                let err = anyhow!(
                    "postgres exited during startup ({status}):\n{}",
                    tail(new, 30)
                );
                return Err(
                    if new.contains("could not bind") || new.contains("already in use") {
                        StartError::PortTaken(err)
                    } else {
                        StartError::Other(err)
                    },
                );
            }
            if self.answers().await {
                return Ok(running);
            }
            if Instant::now() >= deadline {
                drop(running.stdin.take());
                let _ = wait_exit(&mut running.child, Duration::from_secs(5)).await;
                kill_group(&running.child, "KILL");
                let _ = running.child.wait();
                let log = self.read_log();
                return Err(StartError::Other(anyhow!(
                    "postgres did not accept connections on {} within {READY_TIMEOUT:?}:\n{}",
                    self.addr(),
                    tail(log.get(log_len as usize..).unwrap_or_default(), 30)
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// TCP connect, `pg_isready`, and our own `postmaster.pid` says `ready` on our port (so a
    /// foreign server on the port does not count).
    async fn answers(&self) -> bool {
        let connect = tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(self.addr()));
        if !matches!(connect.await, Ok(Ok(_))) {
            return false;
        }
        let isready = tokio::process::Command::new(self.bin("pg_isready"))
            .args([
                "-q",
                "-h",
                "127.0.0.1",
                "-U",
                USER,
                "-d",
                DATABASE,
                "-t",
                "2",
            ])
            .arg("-p")
            .arg(self.port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .status();
        if !matches!(
            tokio::time::timeout(Duration::from_secs(5), isready).await,
            Ok(Ok(s)) if s.success()
        ) {
            return false;
        }
        let pid_file =
            fs::read_to_string(self.data_dir().join("postmaster.pid")).unwrap_or_default();
        let lines: Vec<_> = pid_file.lines().map(str::trim).collect();
        lines.get(3) == Some(&self.port.to_string().as_str()) && lines.get(7) == Some(&"ready")
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- postgres (port {}) log tail, dir {} ---\n{}",
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
        if let Some(mut running) = running {
            // EOF on the watchdog's stdin -> SIGQUIT (immediate shutdown).
            drop(running.stdin.take());
            if !wait_exit_blocking(&mut running.child, Duration::from_secs(5)) {
                kill_group(&running.child, "KILL");
                if !wait_exit_blocking(&mut running.child, Duration::from_secs(5)) {
                    eprintln!("postgres harness: port {} survived SIGKILL", self.port);
                }
            }
        }
        if std::env::var_os("RR_POSTGRES_KEEP").is_some_and(|v| v == "1")
            && let Some(dir) = self.dir.take()
        {
            eprintln!("postgres harness: keeping {}", dir.keep().display());
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

/// Blocking part of [`Postgres::start`]: binaries, user, template, and the instance's temp dir
/// with a copy of the template in `data/`.
fn prepare() -> Result<(tempfile::TempDir, PathBuf, Option<RunAs>)> {
    let (version, bin) = find_bin_dir()?;
    let run_as = run_as()?;
    let template = template(&version, &bin, run_as.as_ref())?;
    // Short path: the unix socket path has a 108-byte limit.
    let dir = tempfile::Builder::new()
        .prefix("rr-pg-")
        .tempdir_in("/tmp")
        .context("creating the PostgreSQL temp dir")?;
    let root = dir.path();
    fs::create_dir(root.join("sock"))?;
    if let Some(user) = &run_as {
        for p in [root.to_path_buf(), root.join("sock")] {
            std::os::unix::fs::chown(&p, Some(user.uid), Some(user.gid))
                .with_context(|| format!("chown of {} to {}", p.display(), user.name))?;
        }
    }
    run(
        StdCommand::new("cp")
            .arg("-a")
            .arg(&template)
            .arg(root.join("data")),
        "cp -a of the template cluster",
    )?;
    Ok((dir, bin, run_as))
}

/// The template cluster for this PostgreSQL version and server user, created once per machine
/// (under a file lock) in `target/tmp`: `initdb`, then role [`USER`] and database [`DATABASE`]
/// in single-user mode. Returns its data dir.
fn template(version: &str, bin: &Path, run_as: Option<&RunAs>) -> Result<PathBuf> {
    let owner = run_as.map_or_else(|| format!("uid{}", euid().unwrap_or(0)), |u| u.name.clone());
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let name = format!("pg-template-{version}-{owner}-r{TEMPLATE_REV}");
    let path = base.join(&name);
    let ready = |p: &Path| p.join("PG_VERSION").is_file();
    if ready(&path) {
        return Ok(path);
    }
    fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    let lock_path = base.join(format!("{name}.lock"));
    let lock = fs::File::create(&lock_path)
        .with_context(|| format!("creating {}", lock_path.display()))?;
    lock.lock()
        .with_context(|| format!("locking {}", lock_path.display()))?;
    if ready(&path) {
        return Ok(path); // another process made it while we waited
    }
    let started = Instant::now();
    // Built in /tmp, where the server user can write (it may not be able to enter target/).
    let staging = tempfile::Builder::new()
        .prefix("rr-pg-template-")
        .tempdir_in("/tmp")
        .context("creating the template staging dir")?;
    if let Some(user) = run_as {
        std::os::unix::fs::chown(staging.path(), Some(user.uid), Some(user.gid))
            .context("chown of the template staging dir")?;
    }
    let data = staging.path().join("data");
    let mut initdb = as_user(run_as, &bin.join("initdb"));
    initdb
        .arg("-D")
        .arg(&data)
        .args([
            "-U",
            "postgres",
            "--auth-host=scram-sha-256",
            "--auth-local=trust",
        ])
        .args(["-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"])
        // 1 MB WAL segments instead of 16: the copy per test is a third smaller.
        .arg("--wal-segsize=1");
    run(&mut initdb, "initdb")?;
    let sql = format!(
        "CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}';\nCREATE DATABASE {DATABASE} OWNER {USER};\n"
    );
    let mut single = as_user(run_as, &bin.join("postgres"));
    single.arg("--single").arg("-D").arg(&data).args([
        "-F",
        "-c",
        "exit_on_error=true",
        "postgres",
    ]);
    run_with_stdin(
        &mut single,
        sql.as_bytes(),
        "postgres --single (role and database)",
    )?;
    let tmp = base.join(format!("{name}.tmp-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    run(
        StdCommand::new("cp").arg("-a").arg(&data).arg(&tmp),
        "cp -a of the new template",
    )?;
    fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))?;
    eprintln!(
        "postgres harness: created template {} in {:?}",
        path.display(),
        started.elapsed()
    );
    Ok(path)
}

/// Highest `/usr/lib/postgresql/<version>/bin` with `initdb` and `postgres`.
fn find_bin_dir() -> Result<(String, PathBuf)> {
    let root = Path::new("/usr/lib/postgresql");
    let mut best: Option<(u32, String, PathBuf)> = None;
    for entry in fs::read_dir(root).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Ok(major) = name.split('.').next().unwrap_or("").parse::<u32>() else {
            continue;
        };
        let bin = entry.path().join("bin");
        if bin.join("initdb").is_file()
            && bin.join("postgres").is_file()
            && best.as_ref().is_none_or(|(m, _, _)| major > *m)
        {
            best = Some((major, name, bin));
        }
    }
    best.map(|(_, v, b)| (v, b)).ok_or_else(|| {
        anyhow!(
            "PostgreSQL not found in /usr/lib/postgresql/<version>/bin: install it with \
             scripts/test-deps.sh (Debian package postgresql)"
        )
    })
}

/// `None` when not root; as root the `postgres` system user, else `nobody`.
fn run_as() -> Result<Option<RunAs>> {
    if euid()? != 0 {
        return Ok(None);
    }
    for name in ["postgres", "nobody"] {
        if let Some((uid, gid)) = lookup_passwd(name) {
            return Ok(Some(RunAs {
                name: name.to_owned(),
                uid,
                gid,
            }));
        }
    }
    bail!("running as root, but neither user `postgres` nor `nobody` exists to run PostgreSQL as")
}

fn euid() -> Result<u32> {
    let status = fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|rest| rest.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("no effective uid in /proc/self/status"))
}

fn lookup_passwd(user: &str) -> Option<(u32, u32)> {
    let passwd = fs::read_to_string("/etc/passwd").ok()?;
    let line = passwd.lines().find(|l| l.split(':').next() == Some(user))?;
    let f: Vec<_> = line.split(':').collect();
    Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?))
}

/// `setpriv` switches uid/gid and execs, so the server is a direct child of the watchdog and gets
/// its signals.
fn setpriv_args(user: &RunAs) -> Vec<String> {
    vec![
        "setpriv".into(),
        format!("--reuid={}", user.uid),
        format!("--regid={}", user.gid),
        "--clear-groups".into(),
        "--".into(),
    ]
}

fn as_user(run_as: Option<&RunAs>, program: &Path) -> StdCommand {
    let mut cmd = match run_as {
        Some(user) => {
            let args = setpriv_args(user);
            let mut cmd = StdCommand::new(&args[0]);
            cmd.args(&args[1..]).arg(program);
            cmd
        }
        None => StdCommand::new(program),
    };
    cmd.env("LC_ALL", "C").current_dir("/");
    cmd
}

fn run(cmd: &mut StdCommand, what: &str) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {what}"))?;
    ensure_success(what, &out)
}

fn run_with_stdin(cmd: &mut StdCommand, stdin: &[u8], what: &str) -> Result<()> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {what}"))?;
    child.stdin.take().unwrap().write_all(stdin)?;
    let out = child.wait_with_output()?;
    ensure_success(what, &out)
}

fn ensure_success(what: &str, out: &std::process::Output) -> Result<()> {
    ensure!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// First line of `postmaster.pid`.
fn postmaster_pid(data: &Path) -> Option<u32> {
    fs::read_to_string(data.join("postmaster.pid"))
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// `kill -<signal> -<pgid>`: watchdog and postmaster (backends have their own process groups
/// and exit when the postmaster is gone).
fn kill_group(child: &Child, signal: &str) {
    let _ = StdCommand::new("/bin/sh")
        .arg("-c")
        .arg(format!("kill -{signal} \"$1\""))
        .arg("sh")
        .arg(format!("-{}", child.id()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

async fn wait_exit(child: &mut Child, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !matches!(child.try_wait(), Ok(None)) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn wait_exit_blocking(child: &mut Child, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !matches!(child.try_wait(), Ok(None)) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<_> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
