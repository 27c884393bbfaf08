//! The delivery plan: the ordered Bot API calls that carry one [`Report`] to one recipient.
//!
//! The rules (Bot API `sendPhoto`, `sendDocument`, `sendMediaGroup`, `sendMessage`; "Formatting
//! options"):
//! - with `png_as: photo`, a PNG Telegram accepts as a photo (≤ 10,000,000 bytes, width + height
//!   ≤ 10000, aspect ratio ≤ 20) goes as a photo; every other file goes as a document;
//! - several photos, or several documents, go in albums of 2–10 (a lone leftover is a single
//!   send); photos and documents never share an album;
//! - photo sends come first, then document sends, each in MIME order;
//! - a file over `telegram.max_upload_bytes` is replaced by a text message saying so;
//! - the caption (title in bold, description, link; `parse_mode` HTML) is at most 1024 UTF-16
//!   code units after entity parsing and sits on the first item of every send;
//! - a mail with no file is one `sendMessage` of at most 4096 code units.

use super::{Report, ReportFile, ReportKind};
use crate::config::{Config, PngAs};

/// Telegram's caption limit, in UTF-16 code units after entity parsing (sendPhoto, sendDocument,
/// InputMedia*).
pub const CAPTION_LIMIT: usize = 1024;
/// Telegram's text message limit, in UTF-16 code units after entity parsing (sendMessage).
pub const MESSAGE_LIMIT: usize = 4096;
/// Largest photo upload, in bytes (sendPhoto: "The photo must be at most 10 MB").
pub const PHOTO_MAX_BYTES: u64 = 10_000_000;
/// sendPhoto: "The photo's width and height must not exceed 10000 in total".
pub const PHOTO_MAX_SIDES_SUM: u64 = 10_000;
/// sendPhoto: "Width and height ratio must be at most 20".
pub const PHOTO_MAX_RATIO: u64 = 20;
/// sendMediaGroup: "must include 2-10 items".
pub const ALBUM_MAX_ITEMS: usize = 10;

/// The settings that shape a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanOptions {
    /// `telegram.png_as`.
    pub png_as: PngAs,
    /// `telegram.max_upload_bytes`.
    pub max_upload_bytes: u64,
    /// `reports.forward_errors`.
    pub forward_errors: bool,
}

impl From<&Config> for PlanOptions {
    /// `telegram.png_as`, `telegram.max_upload_bytes` and `reports.forward_errors`.
    fn from(config: &Config) -> Self {
        Self {
            png_as: config.telegram.png_as,
            max_upload_bytes: config.telegram.max_upload_bytes,
            forward_errors: config.reports.forward_errors,
        }
    }
}

impl Default for PlanOptions {
    fn default() -> Self {
        Self {
            png_as: PngAs::Photo,
            max_upload_bytes: 50_000_000,
            forward_errors: false,
        }
    }
}

/// A Bot API method the plan uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Method {
    /// `sendPhoto`.
    #[serde(rename = "sendPhoto")]
    SendPhoto,
    /// `sendDocument`.
    #[serde(rename = "sendDocument")]
    SendDocument,
    /// `sendMediaGroup`.
    #[serde(rename = "sendMediaGroup")]
    SendMediaGroup,
    /// `sendMessage`.
    #[serde(rename = "sendMessage")]
    SendMessage,
}

impl Method {
    /// The Bot API method name, e.g. `sendPhoto`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SendPhoto => "sendPhoto",
            Self::SendDocument => "sendDocument",
            Self::SendMediaGroup => "sendMediaGroup",
            Self::SendMessage => "sendMessage",
        }
    }
}

/// How a file travels: as a photo (recompressed by Telegram) or as a document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ItemKind {
    /// `InputMediaPhoto` / sendPhoto.
    Photo,
    /// `InputMediaDocument` / sendDocument.
    Document,
}

/// One file in one send.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Item {
    /// Photo or document.
    pub kind: ItemKind,
    /// Index into [`Report::files`].
    pub file: usize,
    /// The caption (HTML) on this item: set on the first item of each send.
    pub caption: Option<String>,
}

/// One Bot API call.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Send {
    /// The method.
    pub method: Method,
    /// The files, in order; empty for `sendMessage`.
    pub items: Vec<Item>,
    /// The HTML text of a `sendMessage`.
    pub text: Option<String>,
}

impl Send {
    /// The items with their files looked up in `report` (`report.files[item.file]`): the one
    /// place a plan's file indices are resolved, for the relay's outbox rows and for `replay`.
    /// `report` must be the report this plan was made from.
    pub fn items_with_files<'r>(
        &'r self,
        report: &'r Report,
    ) -> impl Iterator<Item = (&'r Item, &'r ReportFile)> + 'r {
        self.items
            .iter()
            .map(move |item| (item, &report.files[item.file]))
    }
}

/// The plan for one report and one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The caption HTML exactly as sent; `None` when the report has no file.
    pub caption: Option<String>,
    /// Why the report is not relayed at all, e.g. an error notification with
    /// `reports.forward_errors: false`. Then `sends` is empty.
    pub skipped: Option<String>,
    /// The calls, in the order they are made.
    pub sends: Vec<Send>,
}

/// Whether Telegram accepts a PNG of this size as a photo (sendPhoto limits).
pub fn fits_photo_limits(bytes: u64, width: u32, height: u32) -> bool {
    let (w, h) = (u64::from(width), u64::from(height));
    let (long, short) = if w >= h { (w, h) } else { (h, w) };
    bytes <= PHOTO_MAX_BYTES
        && w + h <= PHOTO_MAX_SIDES_SUM
        && short > 0
        && long <= short * PHOTO_MAX_RATIO
}

/// Plans the Bot API calls that deliver `report` to one recipient.
pub fn plan(report: &Report, options: &PlanOptions) -> Plan {
    match report.kind() {
        ReportKind::ErrorNotification if !options.forward_errors => Plan {
            caption: None,
            skipped: Some(format!(
                "Superset error notification ({}); reports.forward_errors is false",
                report.title
            )),
            sends: Vec::new(),
        },
        ReportKind::ErrorNotification | ReportKind::Text => Plan {
            caption: None,
            skipped: None,
            sends: vec![message(text_message(report))],
        },
        ReportKind::Files => plan_files(report, options),
    }
}

fn plan_files(report: &Report, options: &PlanOptions) -> Plan {
    let caption = caption(report);
    let mut photos = Vec::new();
    let mut documents = Vec::new();
    let mut too_large = Vec::new();
    for (index, file) in report.files.iter().enumerate() {
        let size = file.bytes.len() as u64;
        let photo = options.png_as == PngAs::Photo
            && file
                .dimensions
                .is_some_and(|(w, h)| fits_photo_limits(size, w, h));
        if photo {
            photos.push(index);
        } else if size > options.max_upload_bytes {
            too_large.push(index);
        } else {
            documents.push(index);
        }
    }
    let mut sends = Vec::new();
    for (kind, files, single) in [
        (ItemKind::Photo, photos, Method::SendPhoto),
        (ItemKind::Document, documents, Method::SendDocument),
    ] {
        for chunk in files.chunks(ALBUM_MAX_ITEMS) {
            let items = chunk
                .iter()
                .enumerate()
                .map(|(position, &file)| Item {
                    kind,
                    file,
                    caption: (position == 0).then(|| caption.clone()),
                })
                .collect();
            let method = if chunk.len() == 1 {
                single
            } else {
                Method::SendMediaGroup
            };
            sends.push(Send {
                method,
                items,
                text: None,
            });
        }
    }
    for index in too_large {
        let file = &report.files[index];
        let notice = format!(
            "The file “{}” ({} bytes) is too large to send through Telegram (limit: {} bytes).",
            file.name,
            file.bytes.len(),
            options.max_upload_bytes
        );
        let mut spans = heading(report);
        spans.push(Span::fixed("\n\n", Style::Plain));
        spans.push(Span::elastic(notice, Style::Plain));
        push_link(&mut spans, report);
        sends.push(message(render_spans(&spans, MESSAGE_LIMIT)));
    }
    Plan {
        caption: Some(caption),
        skipped: None,
        sends,
    }
}

fn message(text: String) -> Send {
    Send {
        method: Method::SendMessage,
        items: Vec::new(),
        text: Some(text),
    }
}

/// The caption: the title in bold, the description, the link; ≤ 1024 code units visible.
pub fn caption(report: &Report) -> String {
    let mut spans = heading(report);
    if !report.description.is_empty() {
        spans.push(Span::elastic(
            format!("{}{}", separator(&spans), report.description),
            Style::Plain,
        ));
    }
    push_link(&mut spans, report);
    render_spans(&spans, CAPTION_LIMIT)
}

/// The text message for a mail with no file: title, description, tables (monospaced), link.
fn text_message(report: &Report) -> String {
    let mut spans = heading(report);
    if !report.description.is_empty() {
        spans.push(Span::elastic(
            format!("{}{}", separator(&spans), report.description),
            Style::Plain,
        ));
    }
    for table in &report.tables {
        spans.push(Span::elastic(separator(&spans), Style::Plain));
        spans.push(Span::elastic(table.clone(), Style::Pre));
    }
    push_link(&mut spans, report);
    render_spans(&spans, MESSAGE_LIMIT)
}

/// The blank line between blocks: none before the first one (an untitled message starts with
/// its text).
fn separator(spans: &[Span]) -> &'static str {
    if spans.is_empty() { "" } else { "\n\n" }
}

/// The bold title; nothing for an untitled report (a send API message without a title).
fn heading(report: &Report) -> Vec<Span> {
    if !report.titled {
        return Vec::new();
    }
    let title = if report.title.is_empty() {
        "(no subject)"
    } else {
        &report.title
    };
    vec![Span::fixed(title, Style::Bold)]
}

fn push_link(spans: &mut Vec<Span>, report: &Report) {
    let Some(link) = &report.link else { return };
    // Telegram rejects text links to anything but http(s) and tg: URLs.
    let usable = url::Url::parse(&link.url)
        .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
    if !usable {
        return;
    }
    let text = if link.text.is_empty() {
        link.url.clone()
    } else {
        link.text.clone()
    };
    if !spans.is_empty() {
        spans.push(Span::fixed("\n\n", Style::Plain));
    }
    spans.push(Span::fixed(text, Style::Link(link.url.clone())));
}

/// How a span is marked up.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Style {
    Plain,
    Bold,
    Pre,
    Link(String),
}

/// A run of plain text with one style. Elastic spans are shortened (in order, the first cut
/// gets "…") when the whole does not fit; fixed spans are kept whole while they fit alone.
#[derive(Debug, Clone)]
struct Span {
    text: String,
    style: Style,
    elastic: bool,
}

impl Span {
    fn fixed(text: impl Into<String>, style: Style) -> Self {
        Self {
            text: text.into(),
            style,
            elastic: false,
        }
    }
    fn elastic(text: impl Into<String>, style: Style) -> Self {
        Self {
            text: text.into(),
            style,
            elastic: true,
        }
    }
}

fn utf16_len(text: &str) -> usize {
    text.encode_utf16().count()
}

/// Renders spans as Telegram HTML whose visible text is at most `limit` UTF-16 code units.
///
/// Truncation works on the plain text, before escaping, so it never cuts a tag or an entity.
fn render_spans(spans: &[Span], limit: usize) -> String {
    let total: usize = spans.iter().map(|s| utf16_len(&s.text)).sum();
    let mut spans = spans.to_vec();
    if total > limit {
        let fixed: usize = spans
            .iter()
            .filter(|s| !s.elastic)
            .map(|s| utf16_len(&s.text))
            .sum();
        // One code unit is kept for the "…".
        let (mut budget, all_elastic) = if fixed < limit {
            (limit - fixed - 1, false)
        } else {
            (limit - 1, true)
        };
        let mut cut = false;
        for span in spans.iter_mut() {
            if !(span.elastic || all_elastic) {
                continue;
            }
            if cut {
                span.text.clear();
                continue;
            }
            let length = utf16_len(&span.text);
            if length <= budget {
                budget -= length;
                continue;
            }
            let mut kept = String::new();
            let mut used = 0;
            for c in span.text.chars() {
                if used + c.len_utf16() > budget {
                    break;
                }
                used += c.len_utf16();
                kept.push(c);
            }
            let trimmed = kept.trim_end();
            span.text = format!("{trimmed}…");
            cut = true;
        }
    }
    let mut html = String::new();
    for span in spans.iter().filter(|s| !s.text.is_empty()) {
        let text = escape_html(&span.text);
        match &span.style {
            Style::Plain => html.push_str(&text),
            Style::Bold => html.push_str(&format!("<b>{text}</b>")),
            Style::Pre => html.push_str(&format!("<pre>{text}</pre>")),
            Style::Link(url) => html.push_str(&format!(
                "<a href=\"{}\">{text}</a>",
                escape_html_attribute(url)
            )),
        }
    }
    html
}

/// Escapes `&`, `<` and `>`, as Telegram's HTML parse mode requires outside tags.
pub fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
    out
}

fn escape_html_attribute(text: &str) -> String {
    escape_html(text).replace('"', "&quot;")
}

/// The visible text of HTML produced by this module: tags removed, the four entities decoded.
/// Used to check the limits in tests.
pub fn visible_text(html: &str) -> String {
    let mut out = String::with_capacity(html.len());
    let mut rest = html;
    while let Some(c) = rest.chars().next() {
        if c == '<' {
            match rest.find('>') {
                Some(end) => rest = &rest[end + 1..],
                None => break,
            }
        } else if c == '&' {
            let entity = ["&amp;", "&lt;", "&gt;", "&quot;"]
                .into_iter()
                .find(|e| rest.starts_with(e));
            match entity {
                Some(e) => {
                    out.push(match e {
                        "&amp;" => '&',
                        "&lt;" => '<',
                        "&gt;" => '>',
                        _ => '"',
                    });
                    rest = &rest[e.len()..];
                }
                None => {
                    out.push('&');
                    rest = &rest[1..];
                }
            }
        } else {
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{FileFormat, Link, ReportFile};
    use bytes::Bytes;

    // `assert_no_broken_entity`, shared with `tests/report_fixtures.rs`.
    include!("../../tests/support/entities.rs");

    fn report(title: &str, description: &str) -> Report {
        Report {
            subject: format!("[Report] {title}"),
            title: title.into(),
            description: description.into(),
            link: Some(Link {
                url: "https://superset.example.com/explore/?a=1&b=2".into(),
                text: "Explore in Superset".into(),
            }),
            tables: Vec::new(),
            from: None,
            message_id: None,
            authentication_results: Vec::new(),
            files: Vec::new(),
            ignored_parts: Vec::new(),
            titled: true,
        }
    }

    #[test]
    fn an_untitled_message_starts_with_its_text() {
        let mut untitled = report("", "Disk <full> on db1");
        untitled.titled = false;
        untitled.link = None;
        assert_eq!(text_message(&untitled), "Disk &lt;full&gt; on db1");
        assert_eq!(caption(&untitled), "Disk &lt;full&gt; on db1");
    }

    fn png(name: &str, width: u32, height: u32, size: usize) -> ReportFile {
        ReportFile {
            name: name.into(),
            format: FileFormat::Png,
            bytes: Bytes::from(vec![0; size]),
            sha256: String::new(),
            dimensions: Some((width, height)),
            content_id: None,
        }
    }

    fn pdf(name: &str, size: usize) -> ReportFile {
        ReportFile {
            name: name.into(),
            format: FileFormat::Pdf,
            bytes: Bytes::from(vec![0; size]),
            sha256: String::new(),
            dimensions: None,
            content_id: None,
        }
    }

    fn shape(plan: &Plan) -> Vec<(Method, Vec<(ItemKind, usize)>)> {
        plan.sends
            .iter()
            .map(|s| (s.method, s.items.iter().map(|i| (i.kind, i.file)).collect()))
            .collect()
    }

    #[test]
    fn photo_limits_follow_send_photo() {
        assert!(fits_photo_limits(1000, 2400, 1200));
        assert!(fits_photo_limits(1000, 4800, 2400));
        assert!(fits_photo_limits(10_000_000, 5000, 5000));
        assert!(!fits_photo_limits(10_000_001, 100, 100));
        assert!(!fits_photo_limits(1000, 1600, 10400));
        assert!(!fits_photo_limits(1000, 5001, 5000));
        assert!(fits_photo_limits(1000, 2000, 100));
        assert!(!fits_photo_limits(1000, 2001, 100));
    }

    #[test]
    fn caption_is_bold_title_description_and_link() {
        let caption = caption(&report("Sales <Q1> & more", "Up 5% & <b>"));
        assert_eq!(
            caption,
            "<b>Sales &lt;Q1&gt; &amp; more</b>\n\nUp 5% &amp; &lt;b&gt;\n\n\
             <a href=\"https://superset.example.com/explore/?a=1&amp;b=2\">Explore in Superset</a>"
        );
    }

    #[test]
    fn long_captions_cut_the_description_and_keep_title_and_link() {
        let description = "a&<".repeat(400);
        let caption = caption(&report("Title", &description));
        let visible = visible_text(&caption);
        assert_eq!(utf16_len(&visible), CAPTION_LIMIT);
        assert!(caption.starts_with("<b>Title</b>\n\n"));
        assert!(caption.ends_with("…\n\n<a href=\"https://superset.example.com/explore/?a=1&amp;b=2\">Explore in Superset</a>"));
        assert_no_broken_entity(&caption);
    }

    #[test]
    fn truncation_counts_utf16_code_units() {
        // '𝄞' is two UTF-16 code units; never split one.
        let description = "𝄞".repeat(600);
        let caption = caption(&report("T", &description));
        let visible = visible_text(&caption);
        assert!(utf16_len(&visible) <= CAPTION_LIMIT);
        assert!(utf16_len(&visible) >= CAPTION_LIMIT - 1);
    }

    #[test]
    fn a_giant_title_is_cut_too() {
        let caption = caption(&report(&"T".repeat(2000), "d"));
        assert_eq!(utf16_len(&visible_text(&caption)), CAPTION_LIMIT);
        assert!(caption.starts_with("<b>TTT"));
        assert!(caption.ends_with("…</b>"));
    }

    #[test]
    fn albums_hold_ten_and_a_lone_leftover_is_a_single_send() {
        let mut r = report("T", "");
        r.files = (0..11)
            .map(|i| png(&format!("{i}"), 1600, 2000, 10))
            .collect();
        let p = plan(&r, &PlanOptions::default());
        let methods: Vec<_> = p.sends.iter().map(|s| (s.method, s.items.len())).collect();
        assert_eq!(
            methods,
            [(Method::SendMediaGroup, 10), (Method::SendPhoto, 1)]
        );
        r.files.push(png("x", 1600, 2000, 10));
        let p = plan(&r, &PlanOptions::default());
        let methods: Vec<_> = p.sends.iter().map(|s| (s.method, s.items.len())).collect();
        assert_eq!(
            methods,
            [(Method::SendMediaGroup, 10), (Method::SendMediaGroup, 2)]
        );
        for send in &p.sends {
            assert!(send.items[0].caption.is_some());
            assert!(send.items[1..].iter().all(|i| i.caption.is_none()));
        }
    }

    #[test]
    fn photos_first_then_documents_never_mixed() {
        let mut r = report("T", "");
        r.files = vec![
            pdf("a.pdf", 10),
            png("1", 1600, 1900, 10),
            png("2", 1600, 9000, 10),
            png("3", 1600, 2100, 10),
        ];
        let p = plan(&r, &PlanOptions::default());
        assert_eq!(
            shape(&p),
            [
                (
                    Method::SendMediaGroup,
                    vec![(ItemKind::Photo, 1), (ItemKind::Photo, 3)]
                ),
                (
                    Method::SendMediaGroup,
                    vec![(ItemKind::Document, 0), (ItemKind::Document, 2)]
                ),
            ]
        );
        let documents = PlanOptions {
            png_as: PngAs::Document,
            ..PlanOptions::default()
        };
        let p = plan(&r, &documents);
        assert_eq!(p.sends.len(), 1);
        assert_eq!(p.sends[0].items.len(), 4);
        assert!(
            p.sends[0]
                .items
                .iter()
                .all(|i| i.kind == ItemKind::Document)
        );
    }

    #[test]
    fn too_large_files_become_a_message_naming_them() {
        let mut r = report("T", "");
        r.files = vec![pdf("big.pdf", 101), pdf("small.pdf", 100)];
        let options = PlanOptions {
            max_upload_bytes: 100,
            ..PlanOptions::default()
        };
        let p = plan(&r, &options);
        assert_eq!(p.sends[0].method, Method::SendDocument);
        assert_eq!(p.sends[1].method, Method::SendMessage);
        let text = p.sends[1].text.as_deref().unwrap();
        assert!(
            text.contains("“big.pdf” (101 bytes) is too large"),
            "{text}"
        );
        assert!(text.contains("limit: 100 bytes"), "{text}");
    }

    #[test]
    fn error_notifications_are_skipped_unless_forwarded() {
        let r = report("Error occurred for Report: Weekly Sales", "It broke.");
        let p = plan(&r, &PlanOptions::default());
        assert!(p.sends.is_empty());
        assert!(p.skipped.unwrap().contains("forward_errors is false"));
        let forward = PlanOptions {
            forward_errors: true,
            ..PlanOptions::default()
        };
        let p = plan(&r, &forward);
        assert_eq!(p.sends.len(), 1);
        assert_eq!(p.sends[0].method, Method::SendMessage);
        assert!(p.sends[0].text.as_deref().unwrap().contains("It broke."));
    }

    #[test]
    fn text_reports_fit_one_message() {
        let mut r = report("T", "d");
        r.tables = vec!["a  b\n".repeat(2000)];
        let p = plan(&r, &PlanOptions::default());
        let text = p.sends[0].text.as_deref().unwrap();
        let length = utf16_len(&visible_text(text));
        // The cut drops trailing spaces before the "…".
        assert!(
            (MESSAGE_LIMIT - 4..=MESSAGE_LIMIT).contains(&length),
            "{length}"
        );
        assert!(text.contains("<pre>"));
        assert!(text.contains("…</pre>"));
        assert!(text.ends_with("Explore in Superset</a>"));
    }

    #[test]
    fn unusable_links_are_left_out() {
        let mut r = report("T", "");
        r.link = Some(Link {
            url: "javascript:alert(1)".into(),
            text: "Explore in Superset".into(),
        });
        assert_eq!(caption(&r), "<b>T</b>");
    }
}
