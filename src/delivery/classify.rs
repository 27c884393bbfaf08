//! What a failed Bot API call means for a send ([`Failure`]): retry after a 429, follow a
//! migration, fail for good, or retry later. Descriptions as `telegram-bot-api` (`Client.cpp`) words them.

use std::time::Duration;

use teloxide::{ApiError, RequestError};

/// What one failed Bot API call means for the send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// 429: wait this long, then retry (only this chat waits).
    RetryAfter(Duration),
    /// The basic group is now the supergroup with this id.
    Migrated(i64),
    /// This recipient will not take it (blocked, kicked, not a member, chat not found, no
    /// rights, a deactivated account), or the payload is refused for good.
    Permanent(String),
    /// Telegram refuses the photo's size: send the same bytes as a document.
    PhotoRefused(String),
    /// A stored `file_id` is no longer accepted: upload again.
    StaleFileId(String),
    /// 5xx, network, a connect timeout: retry with backoff.
    Transient(String),
    /// The request was sent but its answer timed out: Telegram may have delivered it (there is
    /// no idempotency key in the Bot API), so it is retried only a few times.
    MaybeDelivered(String),
    /// Telegram answered `ok: true` but the answer could not be read: the message was
    /// delivered; do not send it again (its `file_id` is lost).
    AcceptedUnreadable(String),
}

/// Classifies a Bot API error (descriptions from `telegram-bot-api` `Client.cpp`).
pub fn classify(error: &RequestError) -> Failure {
    match error {
        RequestError::RetryAfter(seconds) => Failure::RetryAfter(seconds.duration()),
        RequestError::MigrateToChatId(chat) => Failure::Migrated(chat.0),
        // A revoked or wrong token is the operator's to fix; keep the sends until then.
        RequestError::Api(ApiError::InvalidToken) => Failure::Transient(
            "Telegram refuses the bot token (401 Unauthorized): fix telegram.bot_token".into(),
        ),
        RequestError::Api(api) => classify_description(&api_description(api)),
        RequestError::Network(error) if error.is_timeout() && !error.is_connect() => {
            Failure::MaybeDelivered(format!("request timed out: {error}"))
        }
        RequestError::Network(error) => Failure::Transient(format!("network error: {error}")),
        RequestError::Io(error) => Failure::Transient(format!("I/O error: {error}")),
        // Telegram accepted it, but teloxide cannot read the returned Message: sending again
        // would duplicate it.
        RequestError::InvalidJson { raw, .. } if raw.contains("\"ok\":true") => {
            Failure::AcceptedUnreadable(raw.chars().take(200).collect())
        }
        RequestError::InvalidJson { raw, .. } => Failure::Transient(format!(
            "unreadable answer (a proxy error page?): {}",
            raw.chars().take(200).collect::<String>()
        )),
    }
}

fn api_description(error: &ApiError) -> String {
    match error {
        ApiError::Unknown(text) => text.clone(),
        other => other.to_string(),
    }
}

/// Classifies a Bot API error description.
pub fn classify_description(description: &str) -> Failure {
    let text = description.to_owned();
    let lower = description.to_ascii_lowercase();
    // An album item failing is wrapped: `Failed to send message #k with the error message "…"`.
    if let Some(at) = lower.find("retry after ") {
        let digits: String = lower[at + 12..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        if let Ok(seconds) = digits.parse::<u64>() {
            return Failure::RetryAfter(Duration::from_secs(seconds));
        }
    }
    if lower.contains("photo_invalid_dimensions")
        || lower.contains("image_process_failed")
        || lower.contains("photo_save_file_invalid")
    {
        return Failure::PhotoRefused(text);
    }
    if lower.contains("wrong file identifier")
        || lower.contains("file_id")
        || lower.contains("wrong remote file")
    {
        return Failure::StaleFileId(text);
    }
    let permanent_prefixes = [
        "forbidden:",
        "bad request:",
        "unauthorized",
        "not found",
        "request entity too large",
        "conflict:",
    ];
    if permanent_prefixes.iter().any(|p| lower.starts_with(p)) {
        return Failure::Permanent(text);
    }
    Failure::Transient(text)
}

/// Whether a permanent refusal is about the recipient (blocked, kicked, not a member, deleted,
/// chat not found) rather than the payload.
pub(super) fn recipient_unreachable(description: &str) -> bool {
    let lower = description.to_ascii_lowercase();
    lower.starts_with("forbidden:")
        || lower.contains("chat not found")
        || lower.contains("user is deactivated")
        || lower.contains("not enough rights")
}

/// Whether a permanent refusal says the send's forum topic (`message_thread_id`) cannot take
/// it: `Bad Request: message thread not found` (a deleted topic, or a thread id that never
/// existed in the group; tdlib/telegram-bot-api#854, #472), `Bad Request: TOPIC_CLOSED`
/// (closed topic) or `Bad Request: TOPIC_DELETED`.
pub(super) fn topic_unusable(description: &str) -> bool {
    let lower = description.to_ascii_lowercase();
    lower.contains("message thread not found")
        || lower.contains("topic_closed")
        || lower.contains("topic_deleted")
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    /// A real reqwest error: the server takes the request and never answers.
    async fn timed_out_request() -> reqwest::Error {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(socket);
        });
        let error = reqwest::Client::builder()
            .timeout(Duration::from_millis(200))
            .build()
            .unwrap()
            .post(format!("http://{address}/bot123:abc/sendDocument"))
            .body(vec![0u8; 1024])
            .send()
            .await
            .unwrap_err();
        server.abort();
        error
    }

    #[test]
    fn a_deleted_or_closed_topic_is_a_permanent_topic_failure() {
        for description in [
            "Bad Request: message thread not found",
            "Bad Request: TOPIC_CLOSED",
            "Bad Request: TOPIC_DELETED",
        ] {
            assert!(
                matches!(classify_description(description), Failure::Permanent(_)),
                "{description}"
            );
            assert!(topic_unusable(description), "{description}");
        }
        assert!(!topic_unusable("Bad Request: chat not found"));
        assert!(!topic_unusable("Forbidden: bot was blocked by the user"));
    }

    #[tokio::test]
    async fn a_request_that_timed_out_after_it_was_sent_may_have_been_delivered() {
        let error = RequestError::Network(Arc::new(timed_out_request().await));
        assert!(
            matches!(classify(&error), Failure::MaybeDelivered(_)),
            "{:?}",
            classify(&error)
        );
    }

    #[tokio::test]
    async fn a_refused_connection_is_plainly_transient() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        drop(listener);
        let error = reqwest::Client::new()
            .post(format!("http://{address}/bot123:abc/sendDocument"))
            .send()
            .await
            .unwrap_err();
        let error = RequestError::Network(Arc::new(error));
        assert!(matches!(classify(&error), Failure::Transient(_)));
    }
}
