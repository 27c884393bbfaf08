//! `report-relay history`: what happened to each report, per recipient, read from the state
//! (`State::messages_since`), for the host's operator. Beside the pipeline, not in it: it opens
//! the state as a tool beside a running relay does and never writes.
//!
//! Recipients are named from the directory snapshot persisted in the state (no SeaTable call),
//! or shown by `chat_id` alone when it does not know them (any more).

use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, SystemTime};

use serde_json::json;

use crate::directory::Snapshot;
use crate::state::{MessageStatus, SendStatus, Source, State};

/// How a recipient stands with one report: its sends (a report may need several: photos, then
/// documents) folded into one outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every send went out.
    Sent,
    /// A send failed for good, with the reason.
    Failed(String),
    /// Some sends are still in the outbox (the last transient error, if any).
    Pending(Option<String>),
}

/// One recipient of one report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipient {
    /// Its `chat_id`.
    pub chat_id: i64,
    /// Its outcome.
    pub outcome: Outcome,
    /// When the first of its sends went out, and the last.
    pub first_sent_at: Option<SystemTime>,
    /// When the last of its sends finished.
    pub last_sent_at: Option<SystemTime>,
}

/// Folds a report's outbox rows into one [`Recipient`] per chat, in the order of their first
/// row.
pub fn recipients(sends: &[SendStatus]) -> Vec<Recipient> {
    let mut order: Vec<i64> = Vec::new();
    let mut by_chat: HashMap<i64, Recipient> = HashMap::new();
    for send in sends {
        let recipient = by_chat.entry(send.chat_id).or_insert_with(|| {
            order.push(send.chat_id);
            Recipient {
                chat_id: send.chat_id,
                outcome: Outcome::Sent,
                first_sent_at: None,
                last_sent_at: None,
            }
        });
        match send.status.as_str() {
            "done" => {
                if let Some(at) = send.finished_at {
                    recipient.first_sent_at =
                        Some(recipient.first_sent_at.map_or(at, |first| first.min(at)));
                    recipient.last_sent_at =
                        Some(recipient.last_sent_at.map_or(at, |last| last.max(at)));
                }
            }
            "failed" => {
                if !matches!(recipient.outcome, Outcome::Failed(_)) {
                    recipient.outcome =
                        Outcome::Failed(send.error.clone().unwrap_or_else(|| "failed".into()));
                }
            }
            _ => {
                if recipient.outcome == Outcome::Sent {
                    recipient.outcome = Outcome::Pending(send.error.clone());
                }
            }
        }
    }
    order
        .into_iter()
        .filter_map(|chat_id| by_chat.remove(&chat_id))
        .collect()
}

/// Parses `--since`: a number and a unit, `s`, `m`, `h`, `d` or `w` (`90s`, `30m`, `24h`,
/// `7d`).
///
/// # Errors
/// A message saying what is expected.
pub fn parse_since(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("expected a duration such as 24h, 30m or 7d, got {text:?}"))?;
    let seconds = match unit.trim() {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => {
            return Err(format!(
                "expected a duration such as 24h, 30m or 7d (units s, m, h, d, w), got {text:?}"
            ));
        }
    };
    Ok(Duration::from_secs(number.saturating_mul(seconds)))
}

/// The names of chats (users' and groups' `Name`), from a directory snapshot.
pub(crate) fn chat_names(snapshot: Option<&Snapshot>) -> HashMap<i64, String> {
    let mut names = HashMap::new();
    if let Some(snapshot) = snapshot {
        for user in &snapshot.users {
            if let Some(id) = user.telegram_id {
                names.insert(id, user.name.clone());
            }
        }
        for group in &snapshot.groups {
            if let Some(id) = group.chat_id {
                names.insert(id, group.name.clone());
            }
        }
    }
    names
}

/// Seconds from `received_at` to `at`, to the millisecond.
fn seconds_after(received_at: SystemTime, at: Option<SystemTime>) -> Option<f64> {
    at.map(|at| {
        let secs = at
            .duration_since(received_at)
            .unwrap_or_default()
            .as_secs_f64();
        (secs * 1000.0).round() / 1000.0
    })
}

fn rfc3339(time: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(time).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Prints the reports received in the last `since` (of `mailbox` only, when given) to `out`:
/// one block per report, one line per recipient; or, with `json`, one JSON object per report
/// per line (JSON Lines). Returns how many reports it printed.
///
/// # Errors
/// The state cannot be read, or `out` cannot be written.
pub async fn print(
    state: &State,
    mailbox: Option<&str>,
    since: Duration,
    json: bool,
    out: &mut dyn Write,
) -> anyhow::Result<usize> {
    let from = SystemTime::now()
        .checked_sub(since)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let mut messages = state.messages_since(from, mailbox).await?;
    // Admin alerts are in the outbox too, but they are not reports.
    messages.retain(|m| m.source != Source::Alert);
    let snapshot: Option<Snapshot> = match state.load_snapshot().await? {
        Some(text) => serde_json::from_str(&text).ok(),
        None => None,
    };
    let names = chat_names(snapshot.as_ref());
    let name = |chat_id: i64| names.get(&chat_id).cloned();
    for message in &messages {
        if json {
            writeln!(out, "{}", report_json(message, &name))?;
        } else {
            write_report(message, &name, out)?;
        }
    }
    if !json && messages.is_empty() {
        writeln!(out, "No reports since {}.", rfc3339(from))?;
    }
    Ok(messages.len())
}

fn report_json(message: &MessageStatus, name: &dyn Fn(i64) -> Option<String>) -> String {
    let recipients = recipients(&message.sends);
    json!({
        "message_id": message.id,
        "received_at": rfc3339(message.received_at),
        "mailbox": message.mailbox,
        "source": message.source.as_str(),
        "title": message.title,
        "outcome": message.outcome.as_str(),
        "detail": message.detail,
        "recipients": recipients.iter().map(|r| {
            let (outcome, reason) = match &r.outcome {
                Outcome::Sent => ("sent", None),
                Outcome::Failed(reason) => ("failed", Some(reason.clone())),
                Outcome::Pending(reason) => ("pending", reason.clone()),
            };
            json!({
                "chat_id": r.chat_id,
                "name": name(r.chat_id),
                "outcome": outcome,
                "reason": reason,
                "first_send_secs": seconds_after(message.received_at, r.first_sent_at),
                "last_send_secs": seconds_after(message.received_at, r.last_sent_at),
            })
        }).collect::<Vec<_>>(),
    })
    .to_string()
}

fn write_report(
    message: &MessageStatus,
    name: &dyn Fn(i64) -> Option<String>,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    let recipients = recipients(&message.sends);
    let count =
        |wanted: fn(&Outcome) -> bool| recipients.iter().filter(|r| wanted(&r.outcome)).count();
    let sent = count(|o| *o == Outcome::Sent);
    let failed = count(|o| matches!(o, Outcome::Failed(_)));
    let pending = count(|o| matches!(o, Outcome::Pending(_)));
    let first = recipients.iter().filter_map(|r| r.first_sent_at).min();
    let last = recipients.iter().filter_map(|r| r.last_sent_at).max();
    write!(
        out,
        "{}  {}  {}  \"{}\"  {}",
        rfc3339(message.received_at),
        message.mailbox,
        message.source.as_str(),
        message.title,
        message.outcome.as_str()
    )?;
    if let Some(detail) = &message.detail {
        write!(out, " ({detail})")?;
    }
    if !recipients.is_empty() {
        write!(
            out,
            ": {} recipients, {sent} sent, {failed} failed, {pending} pending",
            recipients.len()
        )?;
        if let (Some(first), Some(last)) = (
            seconds_after(message.received_at, first),
            seconds_after(message.received_at, last),
        ) {
            write!(
                out,
                "; first send {first:.1} s, last {last:.1} s after arrival"
            )?;
        }
    }
    writeln!(out)?;
    for recipient in &recipients {
        let who = match name(recipient.chat_id) {
            Some(name) => format!("{name} ({})", recipient.chat_id),
            None => recipient.chat_id.to_string(),
        };
        match &recipient.outcome {
            Outcome::Sent => writeln!(out, "    sent     {who}")?,
            Outcome::Failed(reason) => writeln!(out, "    failed   {who}: {reason}")?,
            Outcome::Pending(None) => writeln!(out, "    pending  {who}")?,
            Outcome::Pending(Some(reason)) => {
                writeln!(out, "    pending  {who} (last error: {reason})")?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send(chat_id: i64, status: &str, error: Option<&str>, at: Option<u64>) -> SendStatus {
        SendStatus {
            chat_id,
            status: status.into(),
            error: error.map(str::to_owned),
            finished_at: at.map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s)),
        }
    }

    #[test]
    fn a_recipients_sends_fold_into_one_outcome() {
        let folded = recipients(&[
            send(1, "done", None, Some(10)),
            send(2, "done", None, Some(11)),
            send(1, "done", None, Some(12)),
            send(
                2,
                "failed",
                Some("Forbidden: bot was blocked by the user"),
                Some(13),
            ),
            send(3, "pending", Some("timed out"), None),
        ]);
        assert_eq!(folded.len(), 3);
        assert_eq!(folded[0].outcome, Outcome::Sent);
        assert_eq!(
            folded[0].first_sent_at,
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(10))
        );
        assert_eq!(
            folded[0].last_sent_at,
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(12))
        );
        assert_eq!(
            folded[1].outcome,
            Outcome::Failed("Forbidden: bot was blocked by the user".into())
        );
        assert_eq!(
            folded[2].outcome,
            Outcome::Pending(Some("timed out".into()))
        );
    }

    #[test]
    fn since_takes_a_number_and_a_unit() {
        assert_eq!(parse_since("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_since("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_since("7d"), Ok(Duration::from_secs(604_800)));
        assert_eq!(parse_since("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_since("2w"), Ok(Duration::from_secs(1_209_600)));
        for bad in ["", "h", "24", "24x", "-1h", "1.5h"] {
            assert!(parse_since(bad).is_err(), "{bad}");
        }
    }
}
