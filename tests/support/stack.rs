//! The whole relay against a real Dovecot and the fake SeaTable and Telegram servers.
//!
//! The relay's state is a SQLite file in the stack's temp dir, or, with
//! `RELAY_TEST_STATE=postgres` ([`STATE_ENV`]), a PostgreSQL server of the stack's own: the
//! end-to-end tests run on both backends (`scripts/test.sh` runs them twice).
//!
//! ```ignore
//! mod support;
//!
//! use support::stack::{Stack, Tuning};
//! ```

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::dovecot::Dovecot;
use super::postgres::Postgres;
use super::seatable::FakeSeaTable;
use super::telegram::{Call, FakeTelegram};

/// The mailbox every stack starts with.
pub const ADDRESS: &str = "reports@test.local";
/// Its IMAP password.
pub const PASSWORD: &str = "mailbox-secret";
/// The SeaTable API token of the fake base.
pub const SEATABLE_TOKEN: &str = "st-api-token-0123456789";

/// The environment variable that puts the stack's state on PostgreSQL (`postgres`) instead of
/// SQLite (unset, or `sqlite`).
pub const STATE_ENV: &str = "RELAY_TEST_STATE";

/// Settings a test may change before starting the relay.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// `telegram.limits.global_per_second`.
    pub global_per_second: u32,
    /// `telegram.limits.chat_per_second`.
    pub chat_per_second: u32,
    /// `telegram.limits.group_per_minute`.
    pub group_per_minute: u32,
    /// `delivery.concurrency`.
    pub concurrency: usize,
    /// `seatable.cache_ttl_secs`.
    pub cache_ttl_secs: u64,
    /// `seatable.reload_secs`.
    pub reload_secs: u64,
    /// `telegram.default_country_code`, when set.
    pub default_country_code: Option<&'static str>,
    /// The mailbox's `imap.accounts` entry, YAML indented by 6 spaces (e.g. an `oauth2:`
    /// section); `None` for its password.
    pub account: Option<String>,
    /// More `http:` keys (indented by two spaces), e.g. `tls:` or `api_tokens:`.
    pub http_extra: String,
    /// More `seatable:` keys (indented by two spaces), e.g. `delivery_log: true`.
    pub seatable_extra: String,
    /// More `telegram:` keys (indented by two spaces), e.g. `admin_chats: [1]`.
    pub telegram_extra: String,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            global_per_second: 30,
            chat_per_second: 1,
            group_per_minute: 20,
            concurrency: 16,
            cache_ttl_secs: 60,
            reload_secs: 60,
            default_country_code: None,
            account: None,
            http_extra: String::new(),
            seatable_extra: String::new(),
            telegram_extra: String::new(),
        }
    }
}

/// Dovecot, SeaTable, Telegram, a temp dir with the config and the state.
pub struct Stack {
    pub dovecot: Dovecot,
    pub seatable: FakeSeaTable,
    pub telegram: FakeTelegram,
    pub dir: tempfile::TempDir,
    pub mailbox_row: String,
    pub http_port: u16,
    /// The state's PostgreSQL server, when [`STATE_ENV`] asks for one.
    pub postgres: Option<Postgres>,
}

fn free_port() -> u16 {
    super::dovecot::free_port().unwrap()
}

/// Runs `report-relay ARGS` to the end with `RUST_LOG=error`: its exit code and its stdout
/// followed by its stderr.
pub fn run_cli(args: &[&str]) -> (i32, String) {
    run_cli_logging(args, "error")
}

/// [`run_cli`] with another `RUST_LOG`, for output that is logged (a warning).
pub fn run_cli_logging(args: &[&str], rust_log: &str) -> (i32, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_report-relay"))
        .args(args)
        .env("RUST_LOG", rust_log)
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

/// A Superset fixture's bytes.
pub fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/superset")
            .join(name),
    )
    .unwrap()
}

impl Stack {
    /// Starts Dovecot with the mailbox user, the fake SeaTable with the default schema and one
    /// mailbox row, and the fake Telegram.
    pub async fn new() -> Self {
        Self::with_dovecot(super::dovecot::DovecotOptions::default()).await
    }

    /// [`Stack::new`] with a Dovecot started with `options` (e.g. OAuth2 logins).
    pub async fn with_dovecot(options: super::dovecot::DovecotOptions) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
        let dovecot = Dovecot::start_with(options).await.expect("Dovecot starts");
        dovecot.add_user(ADDRESS, PASSWORD).unwrap();
        let seatable = FakeSeaTable::start_with_default_schema(SEATABLE_TOKEN).await;
        seatable.set_rate_limit_per_minute(None);
        let mailbox_row = seatable.add_row(
            "mailboxes",
            json!({"Name": "reports", "email": ADDRESS, "description": "Sales reports"}),
        );
        let telegram = FakeTelegram::start(super::telegram::TOKEN).await;
        let postgres = match std::env::var(STATE_ENV).as_deref() {
            Ok("postgres") => Some(Postgres::start().await.expect("PostgreSQL starts")),
            Ok("sqlite") | Err(_) => None,
            Ok(other) => panic!("{STATE_ENV}={other}: expected sqlite or postgres"),
        };
        Self {
            dovecot,
            seatable,
            telegram,
            dir: tempfile::tempdir().unwrap(),
            mailbox_row,
            http_port: free_port(),
            postgres,
        }
    }

    /// The config's `state:` entries: the SQLite file in the temp dir, or the stack's
    /// PostgreSQL with a fixed `replica_id`, so that a relay started again after a `kill -9`
    /// renews its own leases at once instead of waiting them out.
    pub fn state_config(&self) -> String {
        match &self.postgres {
            Some(postgres) => format!("  url: \"{}\"\n  replica_id: \"stack\"", postgres.url()),
            None => format!("  path: \"{}\"", self.dir.path().join("state.db").display()),
        }
    }

    /// Adds a registered (or not, with `None`) user subscribed to `mailbox_rows`.
    pub fn add_user(&self, name: &str, telegram_id: Option<i64>, mailbox_rows: &[&str]) -> String {
        let row = self.seatable.add_row(
            "users",
            json!({"Name": name, "phone": "+7 999 000-00-00",
                   "id_telegram": telegram_id.map(|id| id.to_string())}),
        );
        self.seatable.link("users", "mailboxes", &row, mailbox_rows);
        row
    }

    /// Adds `count` registered users with chat ids `first_id`, `first_id + 1`, …, all subscribed
    /// to the stack's mailbox; returns their chat ids.
    pub fn add_subscribers(&self, count: i64, first_id: i64) -> Vec<i64> {
        let mailbox = self.mailbox_row.clone();
        (0..count)
            .map(|i| {
                let chat = first_id + i;
                self.add_user(&format!("User {i}"), Some(chat), &[&mailbox]);
                chat
            })
            .collect()
    }

    /// The issue's fan-out: `users` registered subscribers (chat ids 500000000, 500000001, …)
    /// and `supergroups` supergroups (-1001100000001, -1001100000002, …), all bound to the
    /// stack's mailbox; returns their chat ids, users first.
    pub fn add_fan_out(&self, users: i64, supergroups: i64) -> Vec<i64> {
        let mailbox = self.mailbox_row.clone();
        let mut chats = self.add_subscribers(users, 500_000_000);
        for k in 1..=supergroups {
            let chat = -1_001_100_000_000 - k;
            self.add_group(&format!("Team {k}"), Some(chat), &[&mailbox]);
            chats.push(chat);
        }
        chats
    }

    /// Adds a group row bound to `mailbox_rows`.
    pub fn add_group(&self, name: &str, chat_id: Option<i64>, mailbox_rows: &[&str]) -> String {
        let row = self.seatable.add_row(
            "t_chats",
            json!({"Name": name, "id_telegram_chat": chat_id.map(|id| id.to_string()),
                   "is_locked": chat_id.is_some()}),
        );
        self.seatable
            .link("t_chats", "mailboxes", &row, mailbox_rows);
        row
    }

    /// Writes `config.yaml` and returns its path.
    pub fn write_config(&self, tuning: &Tuning) -> PathBuf {
        let path = self.dir.path().join("config.yaml");
        let text = self.config_text(tuning, &self.state_config(), self.http_port);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// The config with `state` as its `state:` entries and `/healthz` on `http_port`.
    pub fn config_text(&self, tuning: &Tuning, state: &str, http_port: u16) -> String {
        format!(
            r#"
telegram:
{country_code}  bot_token: "{token}"
  api_url: "{api_url}"
  limits:
    global_per_second: {global}
    chat_per_second: {chat}
    group_per_minute: {group}
{telegram_extra}
seatable:
  server_url: "{seatable}"
  api_token: "{seatable_token}"
  cache_ttl_secs: {ttl}
  reload_secs: {reload}
{seatable_extra}
imap:
  host: 127.0.0.1
  port: {imap_port}
  tls: none
  idle_renew_secs: 60
  accounts:
    "{address}":
{account}
delivery:
  concurrency: {concurrency}
  give_up_after_secs: 600
state:
{state}
http:
  listen: "127.0.0.1:{http_port}"
{http_extra}
"#,
            country_code = tuning
                .default_country_code
                .map(|code| format!("  default_country_code: \"{code}\"\n"))
                .unwrap_or_default(),
            token = super::telegram::TOKEN,
            api_url = self.telegram.api_url(),
            global = tuning.global_per_second,
            chat = tuning.chat_per_second,
            group = tuning.group_per_minute,
            seatable = self.seatable.server_url(),
            seatable_token = SEATABLE_TOKEN,
            ttl = tuning.cache_ttl_secs,
            reload = tuning.reload_secs,
            imap_port = self.dovecot.port(),
            address = ADDRESS,
            account = tuning
                .account
                .clone()
                .unwrap_or_else(|| format!("      password: \"{PASSWORD}\"")),
            concurrency = tuning.concurrency,
            http_extra = tuning.http_extra,
            seatable_extra = tuning.seatable_extra,
            telegram_extra = tuning.telegram_extra,
        )
    }

    /// Runs the relay in this process until the returned handle is stopped.
    pub fn start(&self, tuning: &Tuning) -> InProcess {
        let path = self.write_config(tuning);
        let config = report_relay::config::Config::load(&path).unwrap();
        let stop = CancellationToken::new();
        let signal = stop.clone();
        let task = tokio::spawn(report_relay::app::run(config, async move {
            signal.cancelled().await
        }));
        InProcess { stop, task }
    }

    /// Runs the relay binary (`report-relay run`) as a child process.
    pub fn spawn_binary(&self, tuning: &Tuning) -> Child {
        self.spawn_with_config(&self.write_config(tuning))
    }

    /// Runs `report-relay run --config path` as a child process (stderr goes to the test's).
    pub fn spawn_with_config(&self, path: &Path) -> Child {
        Command::new(env!("CARGO_BIN_EXE_report-relay"))
            .args(["run", "--config"])
            .arg(path)
            .env(
                "RUST_LOG",
                std::env::var("RELAY_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap()
    }

    /// Runs `report-relay run` as a child process with its stderr written to `log` and
    /// `RUST_LOG=rust_log` (for tests that read what it logs).
    pub fn spawn_binary_logging(&self, tuning: &Tuning, log: &Path, rust_log: &str) -> Child {
        Command::new(env!("CARGO_BIN_EXE_report-relay"))
            .args(["run", "--config"])
            .arg(self.write_config(tuning))
            .env("RUST_LOG", rust_log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap()
    }

    /// The relay's base URL, `http://127.0.0.1:<http_port>`.
    pub fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// Gives the stack's mailbox row a `webhook_token` (adding the optional column first).
    pub fn set_webhook_token(&self, token: &str) {
        if !self
            .seatable
            .column_names("mailboxes")
            .iter()
            .any(|c| c == "webhook_token")
        {
            self.seatable.add_column(
                "mailboxes",
                "webhook_token",
                super::seatable::ColumnType::Text,
            );
        }
        self.seatable.update_row(
            "mailboxes",
            &self.mailbox_row,
            json!({ "webhook_token": token }),
        );
    }

    /// GET /readyz: the status code and JSON body (None while nothing listens).
    pub async fn readyz(&self) -> Option<(u16, Value)> {
        let url = format!("http://127.0.0.1:{}/readyz", self.http_port);
        let response = reqwest::get(url).await.ok()?;
        let status = response.status().as_u16();
        Some((status, response.json().await.ok()?))
    }

    /// Waits up to 60 s until /readyz answers so that `check(status, body)` holds; returns the
    /// body. Panics naming `what` and the last answer.
    pub async fn wait_readyz(&self, what: &str, check: impl Fn(u16, &Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some((status, body)) = self.readyz().await
                && check(status, &body)
            {
                return body;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: {:?}",
                self.readyz().await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until /readyz answers 200 and lists `mailboxes` mailboxes, each caught up.
    pub async fn wait_ready(&self, mailboxes: usize) {
        self.wait_readyz("the relay did not become ready", |status, body| {
            status == 200 && body["mailboxes"].as_array().map(Vec::len) == Some(mailboxes)
        })
        .await;
    }

    /// Waits until every mailbox in /readyz has completed a catch-up after `since` (e.g. after a
    /// reconnect).
    pub async fn wait_caught_up_since(&self, since: std::time::SystemTime) {
        let since: chrono::DateTime<chrono::Utc> = since.into();
        self.wait_readyz("no catch-up after the given time", |_, body| {
            body["mailboxes"].as_array().is_some_and(|mailboxes| {
                !mailboxes.is_empty()
                    && mailboxes.iter().all(|m| {
                        m["last_catch_up"]
                            .as_str()
                            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                            .is_some_and(|t| t > since)
                    })
            })
        })
        .await;
    }

    /// Delivers a message to the mailbox (IMAP APPEND); returns its UID.
    pub async fn deliver(&self, raw: &[u8]) -> u32 {
        self.dovecot.append(ADDRESS, "INBOX", raw).await.unwrap()
    }

    /// Waits until every chat in `chats` has had at least `n` successful message-producing
    /// calls; returns all calls.
    pub async fn wait_for_sends(&self, chats: &[i64], n: usize, timeout: Duration) -> Vec<Call> {
        let chats = chats.to_vec();
        self.telegram
            .wait_for(
                move |calls| {
                    chats.iter().all(|chat| {
                        calls
                            .iter()
                            .filter(|c| c.is_send() && c.is_ok() && c.chat_id == Some(*chat))
                            .count()
                            >= n
                    })
                },
                timeout,
            )
            .await
            .unwrap_or_else(|e| panic!("sends did not arrive: {e:?}"))
    }

    /// Successful message-producing calls to `chat`.
    pub fn ok_sends_to(&self, chat: i64) -> Vec<Call> {
        self.telegram
            .calls()
            .into_iter()
            .filter(|c| c.is_send() && c.is_ok() && c.chat_id == Some(chat))
            .collect()
    }

    /// The chats of `chats` that Telegram accepted a send for more than once: the repeats.
    pub fn repeated(&self, chats: &[i64]) -> Vec<i64> {
        chats
            .iter()
            .copied()
            .filter(|chat| self.ok_sends_to(*chat).len() > 1)
            .collect()
    }
}

/// A relay running inside the test process.
pub struct InProcess {
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl InProcess {
    /// Stops it gracefully and waits for it.
    pub async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("the relay stops within 30 s")
            .expect("the relay task does not panic")
            .expect("the relay exits cleanly");
    }
}
