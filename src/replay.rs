//! `report-relay replay EML... --dry-run [--json]`: parse e-mail files and print their delivery
//! plans, with no network.
//!
//! The JSON Lines shape is part of the public interface (`interface.md`): one object per input
//! file, in argument order.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::report::Report;
use crate::report::render::{self, ItemKind, Method, Plan, PlanOptions};

/// One input file's line of `--json` output.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum DryRunLine {
    /// The file was parsed and planned.
    Planned(PlannedReport),
    /// The file could not be read or parsed.
    Failed {
        /// The path as given.
        file: String,
        /// Why.
        error: String,
    },
}

/// The plan of one parsed file, in the interface's JSON shape.
#[derive(Debug, Serialize)]
pub struct PlannedReport {
    /// The path as given.
    pub file: String,
    /// The report title.
    pub title: String,
    /// The caption HTML exactly as sent; null when the report has no file.
    pub caption: Option<String>,
    /// Why the mail is not relayed, or null.
    pub skipped: Option<String>,
    /// The Bot API calls in order.
    pub sends: Vec<PlannedSend>,
}

/// One call of a [`PlannedReport`].
#[derive(Debug, Serialize)]
pub struct PlannedSend {
    /// `sendPhoto`, `sendDocument`, `sendMediaGroup` or `sendMessage`.
    pub method: Method,
    /// The files; empty for `sendMessage`.
    pub items: Vec<PlannedItem>,
    /// The HTML text of a `sendMessage`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

/// One file of a [`PlannedSend`].
#[derive(Debug, Serialize)]
pub struct PlannedItem {
    /// `photo` or `document`.
    pub kind: ItemKind,
    /// The file name shown in Telegram.
    pub file_name: String,
    /// Size in bytes.
    pub bytes: usize,
    /// SHA-256 of the bytes, lowercase hex.
    pub sha256: String,
    /// Pixel width, null for non-images.
    pub width: Option<u32>,
    /// Pixel height, null for non-images.
    pub height: Option<u32>,
}

impl PlannedReport {
    /// Builds the output shape from a report and its plan.
    pub fn new(file: String, report: &Report, plan: &Plan) -> Self {
        let sends = plan
            .sends
            .iter()
            .map(|send| PlannedSend {
                method: send.method,
                text: send.text.clone(),
                items: send
                    .items_with_files(report)
                    .map(|(item, f)| PlannedItem {
                        kind: item.kind,
                        file_name: f.name.clone(),
                        bytes: f.bytes.len(),
                        sha256: f.sha256.clone(),
                        width: f.dimensions.map(|d| d.0),
                        height: f.dimensions.map(|d| d.1),
                    })
                    .collect(),
            })
            .collect();
        Self {
            file,
            title: report.title.clone(),
            caption: plan.caption.clone(),
            skipped: plan.skipped.clone(),
            sends,
        }
    }
}

/// Parses and plans one file.
pub fn dry_run_file(path: &Path, subject_prefixes: &[String], options: &PlanOptions) -> DryRunLine {
    let file = path.display().to_string();
    let raw = match std::fs::read(path) {
        Ok(raw) => raw,
        Err(error) => {
            return DryRunLine::Failed {
                file,
                error: format!("cannot read the file: {error}"),
            };
        }
    };
    match Report::parse(&raw, subject_prefixes) {
        Ok(report) => {
            let plan = render::plan(&report, options);
            DryRunLine::Planned(PlannedReport::new(file, &report, &plan))
        }
        Err(error) => DryRunLine::Failed {
            file,
            error: error.to_string(),
        },
    }
}

/// Prints the plans of `files` to `out`, as JSON Lines or as readable text. Returns whether
/// every file was read and parsed.
///
/// # Errors
/// Only a failure to write to `out`.
pub fn dry_run(
    files: &[PathBuf],
    subject_prefixes: &[String],
    options: &PlanOptions,
    json: bool,
    out: &mut dyn Write,
) -> std::io::Result<bool> {
    let mut all_ok = true;
    for path in files {
        let line = dry_run_file(path, subject_prefixes, options);
        all_ok &= matches!(line, DryRunLine::Planned(_));
        if json {
            serde_json::to_writer(&mut *out, &line)?;
            writeln!(out)?;
        } else {
            write_text(&line, out)?;
        }
    }
    Ok(all_ok)
}

fn write_text(line: &DryRunLine, out: &mut dyn Write) -> std::io::Result<()> {
    match line {
        DryRunLine::Failed { file, error } => writeln!(out, "{file}\n  error: {error}\n"),
        DryRunLine::Planned(report) => {
            writeln!(out, "{}", report.file)?;
            writeln!(out, "  title:   {}", report.title)?;
            if let Some(caption) = &report.caption {
                writeln!(out, "  caption: {}", indent(caption))?;
            }
            if let Some(skipped) = &report.skipped {
                writeln!(out, "  skipped: {skipped}")?;
            }
            for (number, send) in report.sends.iter().enumerate() {
                writeln!(out, "  {}. {}", number + 1, send.method.as_str())?;
                if let Some(text) = &send.text {
                    writeln!(out, "     text: {}", indent(text))?;
                }
                for item in &send.items {
                    let kind = match item.kind {
                        ItemKind::Photo => "photo",
                        ItemKind::Document => "document",
                    };
                    let pixels = match (item.width, item.height) {
                        (Some(w), Some(h)) => format!("  {w}×{h}"),
                        _ => String::new(),
                    };
                    writeln!(
                        out,
                        "     {kind:<8}  {}  {} bytes{pixels}",
                        item.file_name, item.bytes
                    )?;
                }
            }
            writeln!(out)
        }
    }
}

fn indent(text: &str) -> String {
    text.replace('\n', "\n           ")
}
