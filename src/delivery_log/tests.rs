use std::time::{Duration, UNIX_EPOCH};

use serde_json::json;

use super::*;
use crate::state::{MessageOutcome, SendStatus, Source};

fn report() -> MessageStatus {
    let arrived = UNIX_EPOCH + Duration::from_secs(1_780_000_000);
    let at = |ms| Some(arrived + Duration::from_millis(ms));
    MessageStatus {
        id: 42,
        mailbox: "bi@example.com".into(),
        title: "Sales daily".into(),
        source: Source::SupersetWebhook,
        outcome: MessageOutcome::Queued,
        detail: None,
        received_at: arrived,
        sends: vec![
            SendStatus {
                chat_id: 10,
                status: "done".into(),
                error: None,
                finished_at: at(1_250),
            },
            SendStatus {
                chat_id: 10,
                status: "done".into(),
                error: None,
                finished_at: at(1_900),
            },
            SendStatus {
                chat_id: -100,
                status: "failed".into(),
                error: Some("Forbidden: bot was kicked from the supergroup chat".into()),
                finished_at: at(2_000),
            },
            SendStatus {
                chat_id: -100,
                status: "failed".into(),
                error: Some("Forbidden: bot was kicked from the supergroup chat".into()),
                finished_at: at(2_000),
            },
            SendStatus {
                chat_id: 30,
                status: "done".into(),
                error: None,
                finished_at: at(4_040),
            },
        ],
    }
}

#[test]
fn a_row_counts_recipients_names_each_failure_once_and_times_the_sends() {
    let report = report();
    assert_eq!(key(&report), "42@1780000000000");
    let row = cells(&report, &key(&report));
    assert_eq!(row["title"], json!("Sales daily"));
    assert_eq!(row["time"], json!("2026-05-28T20:26:40+00:00"));
    assert_eq!(row["source"], json!("superset_webhook"));
    assert_eq!(row["recipients"], json!(3));
    assert_eq!(row["delivered"], json!(2));
    assert_eq!(
        row["failed"],
        json!("-100: Forbidden: bot was kicked from the supergroup chat")
    );
    assert_eq!(row["first_send_secs"], json!(1.3));
    assert_eq!(row["last_send_secs"], json!(4.0));
    assert_eq!(row[table::REPORT], json!("42@1780000000000"));
    // Every column of the table is written, and nothing else.
    let mut names: Vec<&str> = row.keys().map(String::as_str).collect();
    names.sort_unstable();
    let mut expected: Vec<&str> = table::COLUMNS.iter().map(|(name, _)| *name).collect();
    expected.sort_unstable();
    assert_eq!(names, expected);
}

#[test]
fn a_report_nobody_got_has_no_send_times() {
    let mut report = report();
    for send in &mut report.sends {
        send.status = "failed".into();
        send.error = None;
    }
    let row = cells(&report, "k");
    assert_eq!(row["delivered"], json!(0));
    assert_eq!(row["first_send_secs"], Value::Null);
    assert_eq!(row["last_send_secs"], Value::Null);
    assert_eq!(row["failed"], json!("10: failed\n-100: failed\n30: failed"));
}
