//! Every Superset fixture gives exactly the plan its manifest entry describes: methods, kinds,
//! names, sizes, pixel sizes and the sha256 of the decoded bytes.
//!
//! `fixtures/superset/manifest.json` came with the shipped fixtures (images, pdf, csv and a
//! prose expectation); `manifest.extra.json` describes the generated ones (`fixtures/generate.py`)
//! with their expected sends spelled out.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use report_relay::config::PngAs;
use report_relay::replay::PlannedReport;
use report_relay::report::Report;
use report_relay::report::render::{self, PlanOptions};
use serde_json::{Value, json};
use support::entities::assert_no_broken_entity;

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/superset")
}

fn manifest(name: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(fixtures_dir().join(name)).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn prefixes() -> Vec<String> {
    vec!["[Report]".into(), "[Alert]".into()]
}

/// The plan of one fixture as the JSON `replay --dry-run --json` prints.
fn planned(file: &str, options: &PlanOptions) -> Value {
    let raw = std::fs::read(fixtures_dir().join(file)).unwrap();
    let report = Report::parse(&raw, &prefixes()).unwrap_or_else(|e| panic!("{file}: {e}"));
    let plan = render::plan(&report, options);
    serde_json::to_value(PlannedReport::new(file.to_owned(), &report, &plan)).unwrap()
}

fn item(kind: &str, name: &str, file: &Value, pixels: bool) -> Value {
    json!({
        "kind": kind,
        "file_name": name,
        "bytes": file["bytes"],
        "sha256": file["sha256"],
        "width": if pixels { file["width"].clone() } else { Value::Null },
        "height": if pixels { file["height"].clone() } else { Value::Null },
    })
}

/// Groups items into sends: albums of at most 10, a lone item as a single send.
fn sends(items: Vec<Value>, single: &str) -> Vec<Value> {
    items
        .chunks(10)
        .map(|chunk| {
            let method = if chunk.len() == 1 {
                single
            } else {
                "sendMediaGroup"
            };
            json!({"method": method, "items": chunk})
        })
        .collect()
}

/// What a shipped manifest entry describes, as sends.
fn expected_from_shipped(entry: &Value) -> Vec<Value> {
    let name = entry["report_name"].as_str().unwrap();
    let images = entry["images"].as_array().unwrap();
    let mut photos = Vec::new();
    let mut documents = Vec::new();
    for (n, image) in images.iter().enumerate() {
        let file_name = if images.len() == 1 {
            format!("{name}.png")
        } else {
            format!("{name} ({}).png", n + 1)
        };
        if image["telegram_send_photo_ok"].as_bool().unwrap() {
            photos.push(item("photo", &file_name, image, true));
        } else {
            documents.push(item("document", &file_name, image, true));
        }
    }
    for key in ["csv", "pdf"] {
        if let Some(file) = entry[key].as_object() {
            let file = Value::Object(file.clone());
            documents.push(item(
                "document",
                file["filename"].as_str().unwrap(),
                &file,
                false,
            ));
        }
    }
    let mut all = sends(photos, "sendPhoto");
    all.extend(sends(documents, "sendDocument"));
    all
}

#[test]
fn shipped_fixtures_plan_as_their_manifest_says() {
    let options = PlanOptions::default();
    let entries = manifest("manifest.json");
    assert_eq!(entries.len(), 7);
    for entry in entries {
        let file = entry["file"].as_str().unwrap();
        let got = planned(file, &options);
        let name = entry["report_name"].as_str().unwrap();
        assert_eq!(got["title"], name, "{file}");
        match entry["format"].as_str().unwrap() {
            "ERROR" => {
                assert_eq!(got["sends"], json!([]), "{file}");
                let skipped = got["skipped"].as_str().unwrap();
                assert!(skipped.contains("error notification"), "{file}: {skipped}");
                assert_eq!(got["caption"], Value::Null);
            }
            "TEXT" => {
                let sends = got["sends"].as_array().unwrap();
                assert_eq!(sends.len(), 1, "{file}");
                assert_eq!(sends[0]["method"], "sendMessage");
                assert_eq!(sends[0]["items"], json!([]));
                let text = sends[0]["text"].as_str().unwrap();
                assert!(text.starts_with(&format!("<b>{name}</b>")), "{text}");
                assert!(text.contains("Germany       1284300.5"), "{text}");
                assert_eq!(got["caption"], Value::Null);
            }
            _ => {
                assert_eq!(got["skipped"], Value::Null, "{file}");
                assert_eq!(got["sends"], json!(expected_from_shipped(&entry)), "{file}");
                let caption = got["caption"].as_str().unwrap();
                assert!(caption.starts_with(&format!("<b>{name}</b>")), "{caption}");
                let link = entry["link"].as_str().unwrap().replace('&', "&amp;");
                assert!(
                    caption.contains(&format!("<a href=\"{link}\">")),
                    "{caption}"
                );
            }
        }
    }
}

#[test]
fn generated_fixtures_plan_their_expected_sends() {
    let options = PlanOptions::default();
    let entries = manifest("manifest.extra.json");
    assert_eq!(entries.len(), 9);
    for entry in entries {
        let file = entry["file"].as_str().unwrap();
        let got = planned(file, &options);
        assert_eq!(got["title"], entry["report_name"], "{file}");
        assert_eq!(got["skipped"], Value::Null, "{file}");
        assert_eq!(got["sends"], entry["expected_sends"], "{file}");

        let raw = std::fs::read(fixtures_dir().join(file)).unwrap();
        let report = Report::parse(&raw, &prefixes()).unwrap();
        assert_eq!(report.subject, entry["subject"].as_str().unwrap(), "{file}");
        assert_eq!(
            report.link.as_ref().map(|l| l.url.as_str()),
            entry["link"].as_str(),
            "{file}"
        );
        // The description keeps block structure as lines; the manifest folds it to one line.
        assert_eq!(
            report.description.replace('\n', " "),
            entry["description_text"].as_str().unwrap(),
            "{file}"
        );
        let images = entry["images"].as_array().unwrap();
        let attachments = entry["attachments"].as_array().unwrap();
        assert_eq!(
            report.files.len(),
            images.len() + attachments.len(),
            "{file}"
        );
    }
}

#[test]
fn png_as_document_sends_every_screenshot_as_a_file() {
    let options = PlanOptions {
        png_as: PngAs::Document,
        ..PlanOptions::default()
    };
    let got = planned("02_dashboard_png_3tabs.eml", &options);
    let sends = got["sends"].as_array().unwrap();
    assert_eq!(sends.len(), 1);
    assert_eq!(sends[0]["method"], "sendMediaGroup");
    for item in sends[0]["items"].as_array().unwrap() {
        assert_eq!(item["kind"], "document");
    }
}

#[test]
fn forwarded_error_notifications_are_a_text_message() {
    let options = PlanOptions {
        forward_errors: true,
        ..PlanOptions::default()
    };
    let got = planned("06_error_notification.eml", &options);
    assert_eq!(got["skipped"], Value::Null);
    let text = got["sends"][0]["text"].as_str().unwrap();
    assert_eq!(
        text,
        "<b>Error occurred for Report: Weekly Sales</b>\n\n\
         Your report/alert was unable to be generated because of the following error: \
         A timeout occurred while taking a screenshot.\n\
         Please check your dashboard/chart for errors.\n\n\
         <a href=\"https://superset.example.com/explore/?form_data=%7B%22slice_id%22:+42%7D&amp;force=false\">Explore in Superset</a>"
    );
}

#[test]
fn the_overflowing_caption_is_cut_at_1024_without_breaking_entities() {
    let got = planned("15_caption_overflow.eml", &PlanOptions::default());
    let caption = got["caption"].as_str().unwrap();
    let visible = render::visible_text(caption);
    let length = visible.encode_utf16().count();
    assert!((1020..=1024).contains(&length), "{length}");
    assert!(visible.contains("…\n\nExplore in Superset"));
    assert_no_broken_entity(caption);
    for send in got["sends"].as_array().unwrap() {
        assert_eq!(send["items"][0]["kind"], "photo");
    }
}

#[test]
fn cyrillic_names_are_decoded() {
    let raw = std::fs::read(fixtures_dir().join("10_dashboard_pdf_cyrillic.eml")).unwrap();
    let report = Report::parse(&raw, &prefixes()).unwrap();
    assert_eq!(report.title, "Продажи 2025/01: Сводка");
    assert_eq!(report.files[0].name, "Продажи 2025_01: Сводка.pdf");
    let raw = std::fs::read(fixtures_dir().join("07_alert_png_cyrillic_hidpi.eml")).unwrap();
    let report = Report::parse(&raw, &prefixes()).unwrap();
    assert_eq!(report.title, "Падение выручки: Выручка по регионам");
    assert_eq!(report.from.as_deref(), Some("bi@analytics.example.com"));
}

fn replay(args: &[&str]) -> (i32, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_report-relay"))
        .arg("replay")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("REPORT_RELAY_CONFIG")
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8(output.stdout).unwrap(),
    )
}

#[test]
fn replay_dry_run_json_prints_one_line_per_file_in_argument_order() {
    let mut files: Vec<String> = std::fs::read_dir(fixtures_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "eml"))
        .map(|p| {
            format!(
                "fixtures/superset/{}",
                p.file_name().unwrap().to_str().unwrap()
            )
        })
        .collect();
    files.sort();
    files.reverse();
    let mut args: Vec<&str> = files.iter().map(String::as_str).collect();
    args.extend(["--dry-run", "--json"]);
    let (code, stdout) = replay(&args);
    assert_eq!(code, 0, "{stdout}");
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), files.len());
    for (line, file) in lines.iter().zip(&files) {
        assert_eq!(line["file"], file.as_str());
        let keys: Vec<&str> = line
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys, ["caption", "file", "sends", "skipped", "title"]);
    }
    let dashboard = lines
        .iter()
        .find(|l| l["file"] == "fixtures/superset/02_dashboard_png_3tabs.eml")
        .unwrap();
    assert_eq!(
        dashboard["sends"][0]["items"][0],
        json!({"kind": "photo", "file_name": "Daily Ops: Operations Overview (1).png",
               "bytes": 15954,
               "sha256": "cc6b3b9e93f171db4e2836fb20fccca982c6bb971aa496d61dc350e1168c9cc5",
               "width": 1600, "height": 1888})
    );
}

#[test]
fn replay_reports_bad_files_and_still_plans_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.eml");
    std::fs::write(&junk, b"\x00\x01 not an e-mail").unwrap();
    let missing = dir.path().join("missing.eml");
    let (code, stdout) = replay(&[
        junk.to_str().unwrap(),
        "fixtures/superset/01_chart_png_report.eml",
        missing.to_str().unwrap(),
        "--dry-run",
        "--json",
    ]);
    assert_eq!(code, 1);
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["file"], junk.to_str().unwrap());
    assert!(
        lines[0]["error"]
            .as_str()
            .unwrap()
            .contains("not an e-mail")
    );
    assert_eq!(lines[1]["sends"][0]["method"], "sendPhoto");
    assert!(lines[2]["error"].as_str().unwrap().contains("cannot read"));
}

#[test]
fn replay_takes_png_as_and_prefixes_from_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        "telegram:\n  bot_token: t\n  png_as: document\n\
         seatable:\n  server_url: https://cloud.seatable.io\n  api_token: s\n\
         reports:\n  subject_prefixes: ['[Report]  Weekly']\n",
    )
    .unwrap();
    let (code, stdout) = replay(&[
        "fixtures/superset/01_chart_png_report.eml",
        "--dry-run",
        "--json",
        "--config",
        config.to_str().unwrap(),
    ]);
    assert_eq!(code, 0);
    let line: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(line["title"], "Sales: Revenue by Region");
    assert_eq!(line["sends"][0]["method"], "sendDocument");
    assert_eq!(line["sends"][0]["items"][0]["kind"], "document");
}
