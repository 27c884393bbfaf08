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

pub mod auth_results;
pub mod render;

use std::fmt;

use bytes::Bytes;
use mail_parser::{MessageParser, MimeHeaders, PartType};
use sha2::{Digest, Sha256};

mod files;
mod html;

use self::files::{Candidate, Classified, check_complete, classify, contains, png_dimensions};
use self::html::HtmlSummary;

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
    /// A file sent over HTTP that is none of the formats a report carries.
    #[error("file {part} ({name}) is not a PNG, PDF, CSV or XLSX")]
    UnsupportedFile {
        /// 0-based index of the file in the request.
        part: usize,
        /// Its name, or its Content-Type when it has none.
        name: String,
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
    /// The values of the `Authentication-Results` headers (RFC 8601), topmost first.
    pub authentication_results: Vec<String>,
    /// The files, in MIME order.
    pub files: Vec<ReportFile>,
    /// Parts that were not relayed, with the reason (for the logs).
    pub ignored_parts: Vec<String>,
    /// Whether the title heads the caption or message in bold: true for e-mail and Superset
    /// webhook reports (an empty title shows as "(no subject)"); false for a send API message,
    /// which starts with its own text.
    pub titled: bool,
}

/// A report that came over HTTP instead of e-mail ([`Report::from_upload`]): the Superset
/// webhook's fields, or a send API message.
#[derive(Debug, Clone, Default)]
pub struct Upload {
    /// The title (the webhook's `name`); see [`Report::titled`].
    pub title: String,
    /// Whether the title is shown (false: an untitled send API message).
    pub titled: bool,
    /// Plain text under the title (the webhook's `description` and `text`, the API's `caption`
    /// or `text`).
    pub description: String,
    /// The link under the description (the webhook's `url`), shown as "Explore in Superset".
    pub link: Option<String>,
    /// The files in request order.
    pub files: Vec<UploadedFile>,
}

/// One file of an [`Upload`]: a multipart part.
#[derive(Clone)]
pub struct UploadedFile {
    /// The part's `filename`, used to classify it (`.csv`, `.xlsx`).
    pub file_name: Option<String>,
    /// Whether that name is shown in Telegram. Superset's webhook names every export
    /// `report.pdf`, `report.csv`, `report.xlsx`: those are named after the report instead.
    pub keep_name: bool,
    /// The part's Content-Type, lowercase, without parameters (`text/csv`).
    pub content_type: String,
    /// The raw bytes (multipart carries no transfer encoding).
    pub bytes: Bytes,
}

impl fmt::Debug for UploadedFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UploadedFile")
            .field("file_name", &self.file_name)
            .field("keep_name", &self.keep_name)
            .field("content_type", &self.content_type)
            .field("bytes", &self.bytes.len())
            .finish()
    }
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

    /// A report from HTTP fields and files ([`crate::ingest`]): the files are classified and
    /// named exactly as the parts of an e-mail (screenshots `<title>.png` or `<title> (n).png`,
    /// documents by their name, or `<title>.<ext>` when the name is not kept), so the plan is the
    /// one an e-mail with the same content gets.
    ///
    /// # Errors
    /// [`ParseError::CorruptFile`] for a PNG, PDF or XLSX that is not one or is cut short,
    /// [`ParseError::UnsupportedFile`] for any other kind of file.
    pub fn from_upload(upload: Upload) -> Result<Self, ParseError> {
        let mut candidates = Vec::with_capacity(upload.files.len());
        for (index, file) in upload.files.into_iter().enumerate() {
            let shown = || {
                file.file_name
                    .clone()
                    .unwrap_or_else(|| file.content_type.clone())
            };
            match classify(&file.bytes, file.file_name.as_deref(), &file.content_type) {
                Classified::File(format) => candidates.push(Candidate {
                    index,
                    format,
                    name: file.file_name.clone().filter(|_| file.keep_name),
                    content_type: file.content_type.clone(),
                    bytes: file.bytes.clone(),
                    content_id: None,
                }),
                Classified::Corrupt(format) => {
                    return Err(ParseError::CorruptFile {
                        part: index,
                        name: shown(),
                        format,
                        reason: "its bytes do not start with the format's signature",
                    });
                }
                Classified::Other => {
                    return Err(ParseError::UnsupportedFile {
                        part: index,
                        name: shown(),
                    });
                }
            }
        }
        let title = upload.title.trim().to_owned();
        let files = name_files(candidates, &title)?;
        Ok(Report {
            subject: title.clone(),
            title,
            description: upload.description.trim().to_owned(),
            link: upload
                .link
                .filter(|url| !url.trim().is_empty())
                .map(|url| Link {
                    url: url.trim().to_owned(),
                    text: "Explore in Superset".to_owned(),
                }),
            tables: Vec::new(),
            from: None,
            message_id: None,
            authentication_results: Vec::new(),
            files,
            ignored_parts: Vec::new(),
            titled: upload.titled,
        })
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
    let authentication_results = message
        .headers_raw()
        .filter(|(name, _)| name.eq_ignore_ascii_case("authentication-results"))
        .map(|(_, value)| value.trim().to_owned())
        .collect();

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

    let files = name_files(candidates, &title)?;

    Ok(Report {
        subject,
        title,
        description: body.description,
        link: body.link,
        tables: body.tables,
        from,
        message_id,
        authentication_results,
        files,
        ignored_parts,
        titled: true,
    })
}

/// Names and checks classified files in order: screenshots after the title (`<title>.png`, or
/// `<title> (n).png` when there are several), other files by their own name, else
/// `<title>.<ext>`; PNG sizes read, truncated files refused.
fn name_files(candidates: Vec<Candidate>, title: &str) -> Result<Vec<ReportFile>, ParseError> {
    let png_count = candidates
        .iter()
        .filter(|c| c.format == FileFormat::Png)
        .count();
    let stem = if title.is_empty() {
        "report".to_owned()
    } else {
        sanitize_file_name(title)
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

    Ok(files)
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

#[cfg(test)]
mod tests {
    use super::files::PNG_SIGNATURE;
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
