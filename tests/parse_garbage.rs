//! Bad input gets a typed error, never a panic: arbitrary bytes, and real fixtures cut short or
//! corrupted.

use std::path::Path;

use proptest::prelude::*;
use report_relay::report::render::{self, PlanOptions};
use report_relay::report::{ParseError, Report};

fn prefixes() -> Vec<String> {
    vec!["[Report]".into(), "[Alert]".into()]
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/superset")
            .join(name),
    )
    .unwrap()
}

/// Parsing and planning must not panic; a parsed report must plan.
fn parse_and_plan(raw: &[u8]) -> Result<(), ParseError> {
    let report = Report::parse(raw, &prefixes())?;
    let _ = render::plan(&report, &PlanOptions::default());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(raw in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = parse_and_plan(&raw);
    }

    #[test]
    fn header_like_text_never_panics(raw in "([A-Za-z-]{1,12}: [ -~]{0,40}\r\n){0,8}(\r\n[ -~\r\n]{0,400})?") {
        let _ = parse_and_plan(raw.as_bytes());
    }

    #[test]
    fn cut_fixtures_never_panic(cut in 0usize..80_000, which in 0usize..4) {
        let name = ["01_chart_png_report.eml", "02_dashboard_png_3tabs.eml",
                    "10_dashboard_pdf_cyrillic.eml", "13_chart_xlsx_report.eml"][which];
        let raw = fixture(name);
        let _ = parse_and_plan(&raw[..cut.min(raw.len())]);
    }

    #[test]
    fn corrupted_fixtures_never_panic(
        flips in proptest::collection::vec((0usize..80_000, any::<u8>()), 1..20),
        which in 0usize..3,
    ) {
        let name = ["02_dashboard_png_3tabs.eml", "03_dashboard_pdf_report.eml",
                    "07_alert_png_cyrillic_hidpi.eml"][which];
        let mut raw = fixture(name);
        let len = raw.len();
        for (at, byte) in flips {
            raw[at % len] = byte;
        }
        let _ = parse_and_plan(&raw);
    }
}

#[test]
fn empty_and_non_email_input() {
    assert_eq!(Report::parse(b"", &prefixes()), Err(ParseError::Empty));
    assert_eq!(
        Report::parse(b"%PDF-1.4 this is a pdf, not mail", &prefixes()),
        Err(ParseError::NotEmail)
    );
}

#[test]
fn a_truncated_mail_is_reported_as_truncated() {
    let raw = fixture("02_dashboard_png_3tabs.eml");
    let cut = &raw[..raw.len() / 2];
    assert!(matches!(
        Report::parse(cut, &prefixes()),
        Err(ParseError::Truncated { .. })
    ));
}

#[test]
fn bad_base64_is_reported_with_its_part() {
    let raw = String::from_utf8(fixture("01_chart_png_report.eml")).unwrap();
    let at = raw.find("iVBORw0KGgo").unwrap();
    let mut broken = raw.clone();
    broken.replace_range(at + 20..at + 24, "=*=*");
    match Report::parse(broken.as_bytes(), &prefixes()) {
        Err(ParseError::BadEncoding { content_type, .. }) => assert_eq!(content_type, "image/png"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_png_cut_short_inside_a_complete_mail_is_corrupt() {
    // Remove a few base64 lines from the middle of the image: the MIME structure stays valid.
    let raw = String::from_utf8(fixture("01_chart_png_report.eml")).unwrap();
    let start = raw.find("iVBORw0KGgo").unwrap();
    let end = raw[start..].find("\r\n--=====").unwrap() + start;
    let lines: Vec<&str> = raw[start..end].split("\r\n").collect();
    let kept = lines[..lines.len() / 2].join("\r\n");
    let broken = format!("{}{}{}", &raw[..start], kept, &raw[end..]);
    match Report::parse(broken.as_bytes(), &prefixes()) {
        Err(ParseError::CorruptFile { reason, .. }) => assert!(reason.contains("IEND"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_pdf_named_part_that_is_not_a_pdf_is_corrupt() {
    let raw = String::from_utf8(fixture("03_dashboard_pdf_report.eml")).unwrap();
    let broken = raw.replacen("JVBERi0", "AAAAAA0", 1);
    assert!(matches!(
        Report::parse(broken.as_bytes(), &prefixes()),
        Err(ParseError::CorruptFile { .. })
    ));
}
