//! The `report-relay` binary: parse the command line, set up logging, run, map to an exit code.

use std::process::ExitCode;

use clap::Parser;
use report_relay::cli::{Cli, init_logging};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.run() {
        Ok(code) => code,
        Err(error) => {
            eprintln!("report-relay: {error:#}");
            ExitCode::FAILURE
        }
    }
}
