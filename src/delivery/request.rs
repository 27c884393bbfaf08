//! How one outbox send becomes one Bot API call: the request builders with the send's files
//! (a stored `file_id`, else the bytes), its caption and its options (the group's
//! `message_thread_id`, `disable_notification`, `protect_content`), and the `file_id`s Telegram
//! returns. Called by the delivery worker ([`super`]) once the pacer admitted the send.

use teloxide::RequestError;
use teloxide::payloads::{
    SendDocumentSetters, SendMediaGroupSetters, SendMessageSetters, SendPhotoSetters,
};
use teloxide::prelude::Requester;
use teloxide::types::{
    ChatId, FileId, InputFile, InputMedia, InputMediaDocument, InputMediaPhoto, LinkPreviewOptions,
    Message, MessageId, ParseMode, ThreadId,
};
use tracing::warn;

use super::Inner;
use super::classify::{Failure, classify};
use crate::report::render::{ItemKind, Method};
use crate::state::{OutboxItem, OutboxSend};

/// Sets a send's [`crate::state::SendOptions`] on any of teloxide's send request builders:
/// `message_thread_id` (the group's topic), `disable_notification`, `protect_content`.
macro_rules! with_options {
    ($request:expr, $options:expr) => {{
        let mut request = $request;
        if let Some(thread) = $options.message_thread_id {
            request = request.message_thread_id(ThreadId(MessageId(thread)));
        }
        if $options.disable_notification {
            request = request.disable_notification(true);
        }
        if $options.protect_content {
            request = request.protect_content(true);
        }
        request
    }};
}

impl Inner {
    /// Resolves files (a stored `file_id`, else the bytes to upload), calls the Bot API once
    /// and stores any new `file_id`s.
    pub(super) async fn send_once(&self, chat_id: i64, send: &OutboxSend) -> Result<(), Failure> {
        let mut media = Vec::with_capacity(send.items.len());
        for item in &send.items {
            media.push(self.input_file(item).await?);
        }
        let chat = ChatId(chat_id);
        let bot = &self.bot;
        let options = send.options;
        let result: Result<Vec<Message>, RequestError> = match send.method {
            Method::SendMessage => {
                let mut request = bot
                    .send_message(chat, send.text.clone().unwrap_or_default())
                    .parse_mode(ParseMode::Html)
                    .link_preview_options(no_preview());
                request = with_options!(request, options);
                request.await.map(|m| vec![m])
            }
            Method::SendPhoto | Method::SendDocument if send.items.len() == 1 => {
                let (item, file) = (&send.items[0], media.remove(0));
                match item.kind {
                    ItemKind::Photo => {
                        let mut request = bot.send_photo(chat, file);
                        if let Some(caption) = &item.caption {
                            request = request.caption(caption.clone()).parse_mode(ParseMode::Html);
                        }
                        request = with_options!(request, options);
                        request.await.map(|m| vec![m])
                    }
                    ItemKind::Document => {
                        let mut request = bot.send_document(chat, file);
                        if let Some(caption) = &item.caption {
                            request = request.caption(caption.clone()).parse_mode(ParseMode::Html);
                        }
                        request = with_options!(request, options);
                        request.await.map(|m| vec![m])
                    }
                }
            }
            _ => {
                let group: Vec<InputMedia> = send
                    .items
                    .iter()
                    .zip(media)
                    .map(|(item, file)| match item.kind {
                        ItemKind::Photo => {
                            let mut m = InputMediaPhoto::new(file);
                            if let Some(caption) = &item.caption {
                                m = m.caption(caption.clone()).parse_mode(ParseMode::Html);
                            }
                            InputMedia::Photo(m)
                        }
                        ItemKind::Document => {
                            let mut m = InputMediaDocument::new(file);
                            if let Some(caption) = &item.caption {
                                m = m.caption(caption.clone()).parse_mode(ParseMode::Html);
                            }
                            InputMedia::Document(m)
                        }
                    })
                    .collect();
                let mut request = bot.send_media_group(chat, group);
                request = with_options!(request, options);
                request.await
            }
        };
        let status = match &result {
            Ok(_) => "ok".to_owned(),
            Err(RequestError::RetryAfter(_)) => "429".to_owned(),
            Err(RequestError::Api(_) | RequestError::MigrateToChatId(_)) => "error".to_owned(),
            Err(_) => "network".to_owned(),
        };
        self.metrics
            .telegram_requests
            .get_or_create(&vec![
                ("method", send.method.as_str().to_owned()),
                ("status", status),
            ])
            .inc();
        let messages = result.map_err(|e| classify(&e))?;
        for (item, message) in send.items.iter().zip(&messages) {
            if let Some(file_id) = returned_file_id(message, item.kind)
                && let Err(error) = self
                    .state
                    .store_file_id(&item.sha256, item.kind, &file_id)
                    .await
            {
                warn!(
                    error = format!("{error:#}"),
                    "Cannot store a file_id; the file will be uploaded again."
                );
            }
        }
        Ok(())
    }

    async fn input_file(&self, item: &OutboxItem) -> Result<InputFile, Failure> {
        let known = self
            .state
            .file_id(&item.sha256, item.kind)
            .await
            .map_err(|e| Failure::Transient(format!("{e:#}")))?;
        if let Some(file_id) = known {
            return Ok(InputFile::file_id(FileId(file_id)));
        }
        let bytes = self
            .state
            .file_bytes(&item.sha256)
            .await
            .map_err(|e| Failure::Permanent(format!("{e:#}")))?;
        Ok(InputFile::memory(bytes).file_name(item.file_name.clone()))
    }
}

fn no_preview() -> LinkPreviewOptions {
    LinkPreviewOptions {
        is_disabled: true,
        url: None,
        prefer_small_media: false,
        prefer_large_media: false,
        show_above_text: false,
    }
}

/// The `file_id` in a sent message: the largest photo size (the last), or the document.
fn returned_file_id(message: &Message, kind: ItemKind) -> Option<String> {
    match kind {
        ItemKind::Photo => message
            .photo()
            .and_then(|sizes| sizes.last())
            .map(|size| size.file.id.0.clone()),
        ItemKind::Document => message.document().map(|d| d.file.id.0.clone()),
    }
}

/// The same send with every photo as a document (photo albums become document albums).
pub(super) fn as_documents(send: &OutboxSend) -> OutboxSend {
    let items = send
        .items
        .iter()
        .map(|item| OutboxItem {
            kind: ItemKind::Document,
            ..item.clone()
        })
        .collect();
    let method = match send.method {
        Method::SendPhoto => Method::SendDocument,
        other => other,
    };
    OutboxSend {
        method,
        items,
        text: send.text.clone(),
        options: send.options,
    }
}
