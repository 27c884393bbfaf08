//! The command line: `replay` now; `run`, `check` and `schema apply` follow the interface.
//!
//! `main` parses [`Cli`], sets up logging with [`init_logging`] and hands over to [`Cli::run`].

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

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
    /// Parse e-mail files and print the delivery plan of each (with --dry-run; no network).
    Replay(ReplayArgs),
}

/// `report-relay replay`.
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// The .eml files (raw RFC 5322 messages).
    #[arg(required = true, value_name = "EML")]
    pub files: Vec<PathBuf>,
    /// Print the plan only; send nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print JSON Lines, one object per file.
    #[arg(long, requires = "dry_run")]
    pub json: bool,
    /// The config file (optional with --dry-run: only `reports` and `telegram.png_as` matter).
    #[arg(long, env = "REPORT_RELAY_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// Sets up `tracing` output on stderr.
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
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
        }
    }
}

fn replay_command(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    if !args.dry_run {
        anyhow::bail!(
            "replay without --dry-run (relaying for real) is not available yet; use --dry-run"
        );
    }
    let (prefixes, options) = match &args.config {
        Some(path) => {
            let config = Config::load(path)?;
            let options = PlanOptions::new(
                config.telegram.png_as,
                config.telegram.max_upload_bytes,
                &config.reports,
            );
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
