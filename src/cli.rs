//! The command line: `run`, `replay`, `check`, `history`, `oauth login` and `schema apply`
//! (interface.md).
//!
//! `main` parses [`Cli`], sets up logging with [`init_logging`] and hands over to [`Cli::run`].

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use crate::config::{Config, ReportsConfig};
use crate::replay;
use crate::report::render::PlanOptions;

/// report-relay: relays Apache Superset e-mail reports from IMAP mailboxes to Telegram.
#[derive(Debug, Parser)]
#[command(name = "report-relay", version, about)]
pub struct Cli {
    /// Log format on stderr. `RUST_LOG` filters as usual (default: info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// The service: watch every enabled mailbox, relay reports, serve /healthz, /readyz and
    /// /metrics, until SIGTERM or SIGINT (a second signal exits at once).
    Run(ConfigArgs),
    /// Parse e-mail files and print the delivery plan of each (--dry-run, no network), or relay
    /// them for real as if they had arrived in a mailbox (--mailbox).
    Replay(ReplayArgs),
    /// Validate the config, log in to SeaTable and check its tables, call Telegram getMe, log in
    /// to each enabled mailbox; one line per check.
    Check(ConfigArgs),
    /// What happened to each report, per recipient, from the state (read-only; works beside a
    /// running relay).
    History(HistoryArgs),
    /// OAuth2 mailboxes (imap.accounts.<name>.oauth2).
    Oauth {
        /// What to do.
        #[command(subcommand)]
        action: OauthAction,
    },
    /// Manage the SeaTable base.
    Schema {
        /// What to do.
        #[command(subcommand)]
        action: SchemaAction,
    },
}

/// `report-relay schema …`.
#[derive(Debug, Subcommand)]
pub enum SchemaAction {
    /// Create the tables and columns of seatable-schema/ that the base lacks (never deletes or
    /// renames).
    Apply(ConfigArgs),
}

/// `report-relay history`.
#[derive(Debug, clap::Args)]
pub struct HistoryArgs {
    /// The config file (for `state`).
    #[arg(long, env = "REPORT_RELAY_CONFIG", value_name = "FILE")]
    pub config: PathBuf,
    /// Only the reports of this mailbox.
    #[arg(long, value_name = "ADDRESS")]
    pub mailbox: Option<String>,
    /// How far back: a number and a unit (s, m, h, d, w).
    #[arg(long, value_name = "DURATION", default_value = "24h",
          value_parser = crate::history::parse_since)]
    pub since: Duration,
    /// One JSON object per report per line (JSON Lines).
    #[arg(long)]
    pub json: bool,
}

/// `report-relay oauth …`.
#[derive(Debug, Subcommand)]
pub enum OauthAction {
    /// Sign a mailbox's OAuth2 account in once (the device flow, or for Google the loopback
    /// redirect flow) and store its refresh token in the state; a running relay uses it at its
    /// next login, without a restart.
    Login(OauthLoginArgs),
}

/// `report-relay oauth login`.
#[derive(Debug, clap::Args)]
pub struct OauthLoginArgs {
    /// The config file.
    #[arg(long, env = "REPORT_RELAY_CONFIG", value_name = "FILE")]
    pub config: PathBuf,
    /// The mailbox to sign in: its imap.accounts entry, or the one its SeaTable row's
    /// imap_account names.
    #[arg(long, value_name = "ADDRESS")]
    pub mailbox: String,
}

/// The `--config` argument of the commands that need a config.
#[derive(Debug, clap::Args)]
pub struct ConfigArgs {
    /// The config file.
    #[arg(long, env = "REPORT_RELAY_CONFIG", value_name = "FILE")]
    pub config: PathBuf,
}

/// `report-relay replay`.
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// The .eml files (raw RFC 5322 messages).
    #[arg(required = true, value_name = "EML")]
    pub files: Vec<PathBuf>,
    /// Print the plan only; send nothing.
    #[arg(long, conflicts_with = "mailbox")]
    pub dry_run: bool,
    /// Relay for real, as if the files had arrived in the mailbox with this address (keyed by
    /// content hash, so running it twice does not send twice).
    #[arg(long, value_name = "ADDRESS", requires = "config")]
    pub mailbox: Option<String>,
    /// With --mailbox: how long to wait for the sends of these files, in seconds; what is still
    /// pending then stays in the outbox for `run` (exit status 1).
    #[arg(long, value_name = "SECS", default_value_t = 600, requires = "mailbox")]
    pub timeout: u64,
    /// Print JSON Lines, one object per file.
    #[arg(long, requires = "dry_run")]
    pub json: bool,
    /// The config file (optional with --dry-run: only `reports` and `telegram.png_as` matter).
    #[arg(long, env = "REPORT_RELAY_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// Sets up `tracing` output on stderr.
pub fn init_logging(format: LogFormat) {
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // These libraries log request lines at debug/trace: async-imap its LOGIN command with the
    // password, the HTTP stack URLs with the bot token. Cap them whatever RUST_LOG says.
    for directive in [
        "async_imap=info",
        "imap_proto=info",
        "reqwest=info",
        "hyper=info",
        "hyper_util=info",
        "teloxide_core=info",
        "teloxide=info",
    ] {
        if let Ok(directive) = directive.parse() {
            filter = filter.add_directive(directive);
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

impl Cli {
    /// Runs the command and returns the process exit code.
    ///
    /// # Errors
    /// A fatal error (bad config, unusable arguments); the caller prints it and exits non-zero.
    pub fn run(self) -> anyhow::Result<ExitCode> {
        match self.command {
            Command::Replay(args) => replay_command(args),
            Command::Run(args) => {
                let config = Config::load(&args.config)?;
                runtime()?.block_on(crate::app::run_reloading(
                    config,
                    Some(args.config.clone()),
                    crate::app::shutdown_signal(),
                ))?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Check(args) => {
                let config = match Config::load(&args.config) {
                    Ok(config) => config,
                    Err(error) => {
                        println!("FAIL config: {error}");
                        return Ok(ExitCode::FAILURE);
                    }
                };
                let lines = runtime()?.block_on(crate::app::check(&config));
                for line in &lines {
                    println!("{} {}", if line.ok { "ok  " } else { "FAIL" }, line.text);
                }
                Ok(if lines.iter().all(|l| l.ok) {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                })
            }
            Command::History(args) => {
                let config = Config::load(&args.config)?;
                let stdout = std::io::stdout();
                runtime()?.block_on(async {
                    let state = crate::state::State::beside_relay(&config.state).await?;
                    crate::history::print(
                        &state,
                        args.mailbox.as_deref(),
                        args.since,
                        args.json,
                        &mut stdout.lock(),
                    )
                    .await
                })?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Oauth {
                action: OauthAction::Login(args),
            } => {
                let config = Config::load(&args.config)?;
                let logged_in = runtime()?.block_on(crate::app::oauth_login(
                    &config,
                    &args.mailbox,
                    &mut std::io::stdout(),
                ))?;
                println!(
                    "Stored the refresh token of account {} in the state; the relay uses it at \
                     its next login, without a restart.",
                    logged_in.account
                );
                Ok(ExitCode::SUCCESS)
            }
            Command::Schema {
                action: SchemaAction::Apply(args),
            } => {
                let config = Config::load(&args.config)?;
                let created = runtime()?.block_on(crate::app::schema_apply(&config))?;
                if created.is_empty() {
                    println!("The base already has every table and column.");
                }
                for line in created {
                    println!("created {line}");
                }
                Ok(ExitCode::SUCCESS)
            }
        }
    }
}

/// Most worker threads of the runtime: one per available core, up to this many. The relay waits
/// on the network far more than it computes; more workers would only add threads.
pub const MAX_WORKER_THREADS: usize = 8;
/// Most threads of tokio's blocking pool (tokio's default is 512). It runs the SQLite calls
/// (one at a time: callers queue asynchronously in [`crate::state`]) and host-name lookups
/// (one per IMAP host at a time, shared by its watchers, in `imap/resolve.rs`; the HTTP
/// clients' own, a few). Idle blocking threads exit after 10 s.
pub const MAX_BLOCKING_THREADS: usize = 16;

/// The multi-threaded runtime every command runs on: at most 1 + [`MAX_WORKER_THREADS`] +
/// [`MAX_BLOCKING_THREADS`] threads whatever the number of mailboxes.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores.clamp(1, MAX_WORKER_THREADS))
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .enable_all()
        .build()
        .context("Failed to start the async runtime")
}

fn replay_command(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    if let Some(mailbox) = args.mailbox {
        let path = args
            .config
            .context("replay --mailbox needs --config (or REPORT_RELAY_CONFIG)")?;
        let config = Config::load(&path)?;
        let all_ok = runtime()?.block_on(crate::app::replay_to_mailbox(
            config,
            args.files,
            mailbox,
            Duration::from_secs(args.timeout),
        ))?;
        return Ok(if all_ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    if !args.dry_run {
        anyhow::bail!(
            "replay needs --dry-run (print the plan) or --mailbox ADDRESS (relay for real)"
        );
    }
    let (prefixes, options) = match &args.config {
        Some(path) => {
            let config = Config::load(path)?;
            let options = PlanOptions::from(&config);
            (config.reports.subject_prefixes, options)
        }
        None => (
            ReportsConfig::default().subject_prefixes,
            PlanOptions::default(),
        ),
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let all_ok = replay::dry_run(&args.files, &prefixes, &options, args.json, &mut out)
        .context("Failed to write the plan to stdout")?;
    out.flush().context("Failed to write the plan to stdout")?;
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
