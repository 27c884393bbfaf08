//! Which MIME parts of a Superset mail are report files: classified by magic bytes (PNG, `%PDF-`,
//! ZIP) and then by name, never by MIME type alone; PNG pixel sizes from the IHDR chunk; files cut
//! short are refused.

use super::FileFormat;
use bytes::Bytes;

pub(super) struct Candidate {
    pub(super) index: usize,
    pub(super) format: FileFormat,
    pub(super) name: Option<String>,
    pub(super) content_type: String,
    pub(super) bytes: Bytes,
    pub(super) content_id: Option<String>,
}

pub(super) enum Classified {
    File(FileFormat),
    Corrupt(FileFormat),
    Other,
}

pub(super) const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";

/// Classifies a leaf part by magic bytes first, then by name, then by MIME type.
pub(super) fn classify(data: &[u8], name: Option<&str>, content_type: &str) -> Classified {
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
pub(super) fn png_dimensions(data: &[u8]) -> Result<(u32, u32), &'static str> {
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
pub(super) fn check_complete(format: FileFormat, data: &[u8]) -> Result<(), &'static str> {
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

pub(super) fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}
