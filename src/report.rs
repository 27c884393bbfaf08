//! A Superset report e-mail, parsed: title, description, link and files.
//!
//! [`Report::parse`] is the first stage after the IMAP watcher hands over raw RFC 5322 bytes.
//! Superset's mails are unusual (see `docs/superset-email-format.md` in the shared research):
//! - the root is `multipart/related` with one `text/html` part and no text alternative;
//! - PNG screenshots are inline `cid:` parts named `<subject> <date>` with no extension;
//! - PDF and CSV files are `application/octet-stream` with no Content-Disposition header, their
//!   name only in a Content-Type `Name` parameter (RFC 2231 `Name*=` when not ASCII).
//!
//! So files are classified by magic bytes and name, never by MIME type alone, and PNGs get names
//! made from the title. [`render`] turns a report into the Bot API calls for one recipient.

pub mod render;

use std::fmt;

use bytes::Bytes;
use mail_parser::{MessageParser, MimeHeaders, PartType};
use scraper::{ElementRef, Html, node::Node};
use sha2::{Digest, Sha256};

/// The call-to-action text Superset puts on its link (`EMAIL_REPORTS_CTA`).
const SUPERSET_CTA: &str = "Explore in Superset";

/// Why bytes could not be read as a report. The watcher records such a message as failed and
/// moves its checkpoint on; `replay` prints the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Zero bytes.
    #[error("the message is empty")]
    Empty,
    /// No RFC 5322 header section was found.
    #[error("not an e-mail: no header fields (From, Subject, Date, Content-Type) were found")]
    NotEmail,
    /// A multipart body ends before its closing boundary (RFC 2046 §5.1.1).
    #[error("the message is truncated: multipart boundary {boundary:?} is never closed")]
    Truncated {
        /// The boundary whose `--boundary--` delimiter is missing.
        boundary: String,
    },
    /// A MIME part's Content-Transfer-Encoding could not be decoded (e.g. bad base64).
    #[error("MIME part {part} ({content_type}) cannot be decoded: broken {encoding} encoding")]
    BadEncoding {
        /// 0-based index of the part in MIME order.
        part: usize,
        /// Its Content-Type.
        content_type: String,
        /// Its Content-Transfer-Encoding.
        encoding: String,
    },
    /// A part that claims to be a PNG, PDF or XLSX (by name or type) is not one, or is cut short.
    #[error("MIME part {part} ({name}) is not a valid {format}: {reason}")]
    CorruptFile {
        /// 0-based index of the part in MIME order.
        part: usize,
        /// The part's name, or its Content-Type when it has none.
        name: String,
        /// What it claims to be.
        format: FileFormat,
        /// What is wrong.
        reason: &'static str,
    },
}

/// The format of a file in a report, from its magic bytes and name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileFormat {
    /// `\x89PNG\r\n\x1a\n` (RFC 2083): a screenshot.
    Png,
    /// `%PDF-`: a PDF export.
    Pdf,
    /// Comma-separated text, by its `.csv` name or `text/csv` type.
    Csv,
    /// A ZIP container named `.xlsx`.
    Xlsx,
    /// Any other ZIP container (Superset's multi-query CSV export).
    Zip,
}

impl fmt::Display for FileFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Png => "PNG",
            Self::Pdf => "PDF",
            Self::Csv => "CSV",
            Self::Xlsx => "XLSX",
            Self::Zip => "ZIP",
        })
    }
}

impl FileFormat {
    fn extension(self) -> &'static str {
        match self {
            Self::Png => "png",
            Self::Pdf => "pdf",
            Self::Csv => "csv",
            Self::Xlsx => "xlsx",
            Self::Zip => "zip",
        }
    }
}

/// One file of a report, in MIME order.
#[derive(Clone, PartialEq, Eq)]
pub struct ReportFile {
    /// The name shown in Telegram: the real (decoded, sanitised) name, or `<title>.png` /
    /// `<title> (n).png` for screenshots.
    pub name: String,
    /// What the bytes are.
    pub format: FileFormat,
    /// The decoded bytes.
    pub bytes: Bytes,
    /// SHA-256 of `bytes`, lowercase hex.
    pub sha256: String,
    /// Pixel width and height from the PNG IHDR chunk (RFC 2083 §4.1.1); `None` for non-images.
    pub dimensions: Option<(u32, u32)>,
    /// The part's Content-ID without angle brackets, if any.
    pub content_id: Option<String>,
}

impl fmt::Debug for ReportFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReportFile")
            .field("name", &self.name)
            .field("format", &self.format)
            .field("bytes", &self.bytes.len())
            .field("sha256", &self.sha256)
            .field("dimensions", &self.dimensions)
            .field("content_id", &self.content_id)
            .finish()
    }
}

/// The "Explore in Superset" link of a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// The `href`.
    pub url: String,
    /// The link text, e.g. `Explore in Superset`.
    pub text: String,
}

/// What kind of mail a report is; decides how [`render`] plans it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportKind {
    /// A report with at least one file.
    Files,
    /// A report with no file (Superset's TEXT format, or a "missing screenshot" notice): its body
    /// is sent as a text message.
    Text,
    /// A Superset error notification (`Error occurred for Report: …` / `… for Alert: …`).
    ErrorNotification,
}

/// A parsed Superset report e-mail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The decoded Subject header (RFC 2047), or empty.
    pub subject: String,
    /// The subject without the first matching configured prefix and surrounding whitespace.
    pub title: String,
    /// The description (or an error notification's text) as plain text: one line per block.
    pub description: String,
    /// The "Explore in Superset" link, if the body has one.
    pub link: Option<Link>,
    /// HTML tables of the body (Superset's TEXT format) as aligned plain text, one per table.
    pub tables: Vec<String>,
    /// The From address (`local@domain`), if any.
    pub from: Option<String>,
    /// The Message-ID without angle brackets; Superset never sets one, some MTAs do.
    pub message_id: Option<String>,
    /// The files, in MIME order.
    pub files: Vec<ReportFile>,
    /// Parts that were not relayed, with the reason (for the logs).
    pub ignored_parts: Vec<String>,
}

impl Report {
    /// Parses raw RFC 5322 bytes. `subject_prefixes` is `reports.subject_prefixes`: the first one
    /// the subject starts with is removed to make the title.
    ///
    /// Never panics, whatever the input.
    ///
    /// # Errors
    /// [`ParseError`] for empty input, input that is not an e-mail, a truncated multipart body,
    /// a broken transfer encoding, or a PNG/PDF/XLSX part that is not what it claims to be.
    pub fn parse(raw: &[u8], subject_prefixes: &[String]) -> Result<Self, ParseError> {
        if raw.iter().all(u8::is_ascii_whitespace) {
            return Err(ParseError::Empty);
        }
        // mail-parser never panics by design, but it carries debug assertions; a panic inside it
        // must not take the watcher down with it.
        let parsed = std::panic::catch_unwind(|| parse_message(raw, subject_prefixes));
        parsed.unwrap_or(Err(ParseError::NotEmail))
    }

    /// What kind of mail this is.
    pub fn kind(&self) -> ReportKind {
        let title = self.title.as_str();
        if title.starts_with("Error occurred for Report:")
            || title.starts_with("Error occurred for Alert:")
        {
            ReportKind::ErrorNotification
        } else if self.files.is_empty() {
            ReportKind::Text
        } else {
            ReportKind::Files
        }
    }
}

fn parse_message(raw: &[u8], subject_prefixes: &[String]) -> Result<Report, ParseError> {
    let message = MessageParser::default()
        .parse(raw)
        .ok_or(ParseError::NotEmail)?;
    let root = message.root_part();
    let known_header = [
        "from",
        "subject",
        "date",
        "content-type",
        "mime-version",
        "message-id",
    ]
    .iter()
    .any(|name| {
        root.headers
            .iter()
            .any(|h| h.name().eq_ignore_ascii_case(name))
    });
    if !known_header {
        return Err(ParseError::NotEmail);
    }

    // Every multipart must be closed; mail-parser silently recovers from a missing end.
    for part in &message.parts {
        if let PartType::Multipart(_) = part.body
            && let Some(boundary) = part.content_type().and_then(|ct| ct.attribute("boundary"))
        {
            let closing = format!("--{boundary}--");
            if !contains(raw, closing.as_bytes()) {
                return Err(ParseError::Truncated {
                    boundary: boundary.to_owned(),
                });
            }
        }
    }

    let subject = message.subject().unwrap_or_default().trim().to_owned();
    let title = make_title(&subject, subject_prefixes);
    let from = message
        .from()
        .and_then(|address| address.first())
        .and_then(|address| address.address())
        .map(str::to_owned);
    let message_id = message.message_id().map(str::to_owned);

    let html_id = message.html_body.first().copied();
    let text_id = message.text_body.first().copied();
    let body = match html_id.and_then(|id| message.part(id)).map(|p| &p.body) {
        Some(PartType::Html(html)) => HtmlSummary::from_html(html),
        _ => match text_id.and_then(|id| message.part(id)).map(|p| &p.body) {
            Some(PartType::Text(text)) => HtmlSummary::from_text(text),
            _ => HtmlSummary::default(),
        },
    };

    let mut candidates = Vec::new();
    let mut ignored_parts = Vec::new();
    for (index, part) in message.parts.iter().enumerate() {
        let id = index as u32;
        if matches!(part.body, PartType::Multipart(_)) {
            continue;
        }
        let content_type = part
            .content_type()
            .map(|ct| match &ct.c_subtype {
                Some(sub) => format!("{}/{}", ct.c_type, sub),
                None => ct.c_type.to_string(),
            })
            .unwrap_or_else(|| "text/plain".to_owned())
            .to_ascii_lowercase();
        if part.is_encoding_problem && index != 0 {
            return Err(ParseError::BadEncoding {
                part: index,
                content_type,
                encoding: part
                    .content_transfer_encoding()
                    .unwrap_or("unknown")
                    .to_owned(),
            });
        }
        if Some(id) == html_id || Some(id) == text_id {
            continue;
        }
        if let PartType::Message(_) = part.body {
            ignored_parts.push(format!("part {index}: an attached e-mail ({content_type})"));
            continue;
        }
        let name = part.attachment_name().map(str::to_owned);
        let data = part.contents();
        match classify(data, name.as_deref(), &content_type) {
            Classified::File(format) => candidates.push(Candidate {
                index,
                format,
                name,
                content_type,
                bytes: Bytes::copy_from_slice(data),
                content_id: part
                    .content_id()
                    .map(|id| id.trim_matches(['<', '>']).to_owned()),
            }),
            Classified::Corrupt(format) => {
                return Err(ParseError::CorruptFile {
                    part: index,
                    name: name.unwrap_or(content_type),
                    format,
                    reason: "its bytes do not start with the format's signature",
                });
            }
            Classified::Other => ignored_parts.push(format!(
                "part {index}: {content_type}{} is not a PNG, PDF, CSV or XLSX",
                name.map(|n| format!(" named {n:?}")).unwrap_or_default()
            )),
        }
    }

    let png_count = candidates
        .iter()
        .filter(|c| c.format == FileFormat::Png)
        .count();
    let stem = if title.is_empty() {
        "report".to_owned()
    } else {
        sanitize_file_name(&title)
    };
    let mut png_number = 0;
    let mut files = Vec::with_capacity(candidates.len());
    for candidate in candidates {
        let corrupt = |reason| ParseError::CorruptFile {
            part: candidate.index,
            name: candidate
                .name
                .clone()
                .unwrap_or_else(|| candidate.content_type.clone()),
            format: candidate.format,
            reason,
        };
        let mut dimensions = None;
        let name = match candidate.format {
            FileFormat::Png => {
                dimensions = Some(png_dimensions(&candidate.bytes).map_err(corrupt)?);
                png_number += 1;
                if png_count == 1 {
                    format!("{stem}.png")
                } else {
                    format!("{stem} ({png_number}).png")
                }
            }
            format => {
                check_complete(format, &candidate.bytes).map_err(corrupt)?;
                match candidate.name.as_deref().map(str::trim) {
                    Some(name) if !name.is_empty() => sanitize_file_name(name),
                    _ => format!("{stem}.{}", format.extension()),
                }
            }
        };
        files.push(ReportFile {
            name,
            format: candidate.format,
            sha256: hex::encode(Sha256::digest(&candidate.bytes)),
            bytes: candidate.bytes,
            dimensions,
            content_id: candidate.content_id,
        });
    }

    Ok(Report {
        subject,
        title,
        description: body.description,
        link: body.link,
        tables: body.tables,
        from,
        message_id,
        files,
        ignored_parts,
    })
}

struct Candidate {
    index: usize,
    format: FileFormat,
    name: Option<String>,
    content_type: String,
    bytes: Bytes,
    content_id: Option<String>,
}

enum Classified {
    File(FileFormat),
    Corrupt(FileFormat),
    Other,
}

const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";

/// Classifies a leaf part by magic bytes first, then by name, then by MIME type.
fn classify(data: &[u8], name: Option<&str>, content_type: &str) -> Classified {
    let extension = name
        .and_then(|n| n.trim().rsplit_once('.'))
        .map(|(_, ext)| ext.to_ascii_lowercase());
    let ext = extension.as_deref();
    if data.starts_with(PNG_SIGNATURE) {
        return Classified::File(FileFormat::Png);
    }
    if data.starts_with(b"%PDF-") {
        return Classified::File(FileFormat::Pdf);
    }
    if data.starts_with(b"PK\x03\x04") {
        return Classified::File(match ext {
            Some("xlsx") => FileFormat::Xlsx,
            _ => FileFormat::Zip,
        });
    }
    match (ext, content_type) {
        (Some("png"), _) | (_, "image/png") => Classified::Corrupt(FileFormat::Png),
        (Some("pdf"), _) | (_, "application/pdf") => Classified::Corrupt(FileFormat::Pdf),
        (Some("xlsx"), _)
        | (_, "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet") => {
            Classified::Corrupt(FileFormat::Xlsx)
        }
        (Some("zip"), _) | (_, "application/zip") => Classified::Corrupt(FileFormat::Zip),
        (Some("csv"), _) | (_, "text/csv") => Classified::File(FileFormat::Csv),
        _ => Classified::Other,
    }
}

/// Width and height from the IHDR chunk, which must come first (RFC 2083 §3.2, §4.1.1); also
/// checks that the file ends with an IEND chunk, so a cut-off screenshot is caught here.
fn png_dimensions(data: &[u8]) -> Result<(u32, u32), &'static str> {
    if data.len() < 33 || &data[12..16] != b"IHDR" {
        return Err("no IHDR chunk after the signature");
    }
    let width = u32::from_be_bytes([data[16], data[17], data[18], data[19]]);
    let height = u32::from_be_bytes([data[20], data[21], data[22], data[23]]);
    if width == 0 || height == 0 || width > i32::MAX as u32 || height > i32::MAX as u32 {
        return Err("IHDR gives an invalid width or height");
    }
    if !data.ends_with(b"IEND\xaeB`\x82") {
        return Err("it is truncated: no IEND chunk at the end");
    }
    Ok((width, height))
}

/// A cheap end-of-file check for the container formats, to catch truncated attachments.
fn check_complete(format: FileFormat, data: &[u8]) -> Result<(), &'static str> {
    let tail = &data[data.len().saturating_sub(1024)..];
    match format {
        // ISO 32000-1 §7.5.5: the last line of the file contains only %%EOF.
        FileFormat::Pdf if !contains(tail, b"%%EOF") => {
            Err("it is truncated: no %%EOF marker at the end")
        }
        // APPNOTE.TXT §4.3.16: a ZIP ends with the end of central directory record.
        FileFormat::Xlsx | FileFormat::Zip
            if !contains(&data[data.len().saturating_sub(65_557)..], b"PK\x05\x06") =>
        {
            Err("it is truncated: no end of central directory record")
        }
        _ => Ok(()),
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// The subject without the first matching prefix and surrounding whitespace.
fn make_title(subject: &str, prefixes: &[String]) -> String {
    let subject = subject.trim();
    let stripped = prefixes
        .iter()
        .find_map(|prefix| subject.strip_prefix(prefix.as_str()))
        .unwrap_or(subject);
    stripped.trim().to_owned()
}

/// Replaces `/`, `\` and control characters with `_`, so a name is safe as a file name.
pub fn sanitize_file_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c == '/' || c == '\\' || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect()
}

/// What the body of a mail says, as plain text.
#[derive(Debug, Default)]
struct HtmlSummary {
    description: String,
    link: Option<Link>,
    tables: Vec<String>,
}

impl HtmlSummary {
    fn from_text(text: &str) -> Self {
        let description = text
            .lines()
            .map(|line| collapse_whitespace(line).trim().to_owned())
            .filter(|line| !line.is_empty())
            .collect::<Vec<_>>()
            .join("\n");
        Self {
            description,
            ..Self::default()
        }
    }

    /// Superset's template is `<div>description</div><br><b><a href=URL>Explore in
    /// Superset</a></b><p></p>{table}{images}`; its error template puts the error in `<p>`s
    /// before the link. So the description is the text before the call-to-action link.
    fn from_html(html: &str) -> Self {
        let document = Html::parse_document(html);
        let root = document.root_element();
        let anchors: Vec<ElementRef<'_>> = root
            .descendent_elements()
            .filter(|e| e.value().name() == "a" && e.attr("href").is_some())
            .collect();
        let cta = anchors
            .iter()
            .find(|a| collapse_whitespace(&a.text().collect::<String>()).trim() == SUPERSET_CTA)
            .or_else(|| {
                anchors.iter().find(|a| {
                    a.parent()
                        .and_then(ElementRef::wrap)
                        .is_some_and(|p| matches!(p.value().name(), "b" | "strong"))
                })
            })
            .copied();
        let link = cta.map(|a| Link {
            url: a.attr("href").unwrap_or_default().trim().to_owned(),
            text: collapse_whitespace(&a.text().collect::<String>())
                .trim()
                .to_owned(),
        });

        let mut text = TextCollector {
            stop_at: cta,
            stopped: false,
            lines: Vec::new(),
            current: String::new(),
        };
        text.walk(root);
        text.break_line();
        let description = text.lines.join("\n");

        let tables = root
            .descendent_elements()
            .filter(|e| e.value().name() == "table")
            // A nested table is rendered as part of its outer table's cell text.
            .filter(|e| {
                !e.ancestors()
                    .filter_map(ElementRef::wrap)
                    .any(|a| a.value().name() == "table")
            })
            .map(table_to_text)
            .filter(|t| !t.is_empty())
            .collect();
        Self {
            description,
            link,
            tables,
        }
    }
}

/// Collects the visible text before the call-to-action link, one line per block element.
struct TextCollector<'a> {
    stop_at: Option<ElementRef<'a>>,
    stopped: bool,
    lines: Vec<String>,
    current: String,
}

impl<'a> TextCollector<'a> {
    fn walk(&mut self, element: ElementRef<'a>) {
        for child in element.children() {
            if self.stopped {
                return;
            }
            match child.value() {
                Node::Text(text) => self.current.push_str(text),
                Node::Element(e) => {
                    if self.stop_at.is_some() && ElementRef::wrap(child) == self.stop_at {
                        self.stopped = true;
                        return;
                    }
                    let name = e.name();
                    if matches!(
                        name,
                        "head" | "style" | "script" | "title" | "table" | "img" | "template"
                    ) {
                        continue;
                    }
                    let block = is_block(name);
                    if block || name == "br" {
                        self.break_line();
                    }
                    if name == "li" {
                        self.current.push_str("• ");
                    }
                    if let Some(child) = ElementRef::wrap(child) {
                        self.walk(child);
                    }
                    if block {
                        self.break_line();
                    }
                }
                _ => {}
            }
        }
    }

    fn break_line(&mut self) {
        let line = collapse_whitespace(&self.current).trim().to_owned();
        self.current.clear();
        if !line.is_empty() && line != "•" {
            self.lines.push(line);
        }
    }
}

fn is_block(name: &str) -> bool {
    matches!(
        name,
        "p" | "div"
            | "ul"
            | "ol"
            | "li"
            | "blockquote"
            | "h1"
            | "h2"
            | "h3"
            | "h4"
            | "h5"
            | "h6"
            | "pre"
            | "tr"
            | "section"
            | "article"
            | "header"
            | "footer"
            | "hr"
    )
}

fn collapse_whitespace(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut space = false;
    for c in text.chars() {
        if c.is_whitespace() {
            space = true;
        } else {
            if space && !out.is_empty() {
                out.push(' ');
            }
            space = false;
            out.push(c);
        }
    }
    if space && !out.is_empty() {
        out.push(' ');
    }
    out
}

/// Renders an HTML table as aligned plain text: columns padded to their widest cell (by
/// display width), two spaces apart, with a dashed rule under a header row.
fn table_to_text(table: ElementRef<'_>) -> String {
    use unicode_width::UnicodeWidthStr;
    let mut rows: Vec<(bool, Vec<String>)> = Vec::new();
    for row in table
        .descendent_elements()
        .filter(|e| e.value().name() == "tr")
    {
        let cells: Vec<ElementRef<'_>> = row
            .child_elements()
            .filter(|c| matches!(c.value().name(), "td" | "th"))
            .collect();
        if cells.is_empty() {
            continue;
        }
        let header = row
            .ancestors()
            .filter_map(ElementRef::wrap)
            .any(|a| a.value().name() == "thead")
            || cells.iter().all(|c| c.value().name() == "th");
        let texts = cells
            .iter()
            .map(|c| {
                collapse_whitespace(&c.text().collect::<String>())
                    .trim()
                    .to_owned()
            })
            .collect();
        rows.push((header, texts));
    }
    let columns = rows.iter().map(|(_, r)| r.len()).max().unwrap_or(0);
    let mut widths = vec![0; columns];
    for (_, row) in &rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.width());
        }
    }
    let mut lines = Vec::with_capacity(rows.len() + 1);
    let mut previous_header = false;
    for (header, row) in &rows {
        if previous_header && !header {
            let rule = widths
                .iter()
                .map(|w| "-".repeat(*w))
                .collect::<Vec<_>>()
                .join("  ");
            lines.push(rule);
        }
        previous_header = *header;
        let mut line = String::new();
        for (i, width) in widths.iter().enumerate() {
            let cell = row.get(i).map(String::as_str).unwrap_or("");
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            line.push_str(&" ".repeat(width - cell.width()));
        }
        lines.push(line.trim_end().to_owned());
    }
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefixes() -> Vec<String> {
        vec!["[Report]".into(), "[Alert]".into()]
    }

    #[test]
    fn title_strips_the_first_matching_prefix_and_whitespace() {
        let p = prefixes();
        assert_eq!(
            make_title("[Report]  Weekly Sales: Revenue", &p),
            "Weekly Sales: Revenue"
        );
        assert_eq!(make_title("  [Alert] Stock low ", &p), "Stock low");
        assert_eq!(make_title("No prefix here", &p), "No prefix here");
        assert_eq!(make_title("[Report] [Alert] x", &p), "[Alert] x");
    }

    #[test]
    fn file_names_lose_slashes_and_control_characters() {
        assert_eq!(sanitize_file_name("a/b\\c\td\u{7}.pdf"), "a_b_c_d_.pdf");
        assert_eq!(sanitize_file_name("Продажи: итог.pdf"), "Продажи: итог.pdf");
    }

    #[test]
    fn tables_become_aligned_text() {
        let summary = HtmlSummary::from_html(
            "<table><thead><tr><th></th><th>country</th><th>SUM(revenue)</th></tr></thead>\
             <tbody><tr><th>0</th><td>Germany</td><td>1284300.5</td></tr>\
             <tr><th>1</th><td>Spain</td><td>455120.25</td></tr></tbody></table>",
        );
        assert_eq!(
            summary.tables,
            [
                "   country  SUM(revenue)\n-  -------  ------------\n0  Germany  1284300.5\n1  Spain    455120.25"
            ]
        );
    }

    #[test]
    fn description_is_the_text_before_the_link() {
        let summary = HtmlSummary::from_html(
            "<html><head><style>p{}</style></head><body><div>Line &amp; one. <b>Bold</b></div>\
             <br><b><a href=\"https://x/y?a=1&amp;b=2\">Explore in Superset</a></b><p></p>\
             <div class=\"image\"><img src=\"cid:1\"></div></body></html>",
        );
        assert_eq!(summary.description, "Line & one. Bold");
        assert_eq!(
            summary.link,
            Some(Link {
                url: "https://x/y?a=1&b=2".into(),
                text: "Explore in Superset".into()
            })
        );
    }

    #[test]
    fn png_dimensions_come_from_ihdr_and_need_iend() {
        let mut png = PNG_SIGNATURE.to_vec();
        png.extend_from_slice(&13u32.to_be_bytes());
        png.extend_from_slice(b"IHDR");
        png.extend_from_slice(&1600u32.to_be_bytes());
        png.extend_from_slice(&10400u32.to_be_bytes());
        png.extend_from_slice(&[8, 2, 0, 0, 0, 0, 0, 0, 0]);
        assert!(png_dimensions(&png).is_err());
        png.extend_from_slice(&[0, 0, 0, 0]);
        png.extend_from_slice(b"IEND\xaeB`\x82");
        assert_eq!(png_dimensions(&png), Ok((1600, 10400)));
        assert!(png_dimensions(&png[..20]).is_err());
    }

    #[test]
    fn garbage_gives_typed_errors() {
        let p = prefixes();
        assert_eq!(Report::parse(b"", &p), Err(ParseError::Empty));
        assert_eq!(Report::parse(b" \r\n", &p), Err(ParseError::Empty));
        assert_eq!(
            Report::parse(b"\x00\x01\x02 binary junk", &p),
            Err(ParseError::NotEmail)
        );
    }
}
