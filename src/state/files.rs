//! File bytes, stored once per SHA-256, and the `file_id` Telegram returned for each upload
//! (per kind: a photo's `file_id` cannot be sent as a document).

use crate::report::render::ItemKind;

/// A file to store with a message.
#[derive(Debug, Clone)]
pub struct StoredFile {
    /// SHA-256 of `bytes`, lowercase hex.
    pub sha256: String,
    /// The bytes.
    pub bytes: bytes::Bytes,
}

pub(crate) fn kind_name(kind: ItemKind) -> &'static str {
    match kind {
        ItemKind::Photo => "photo",
        ItemKind::Document => "document",
    }
}
