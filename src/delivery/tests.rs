use super::*;
use crate::report::render::Method;
use crate::state::OutboxItem;

#[test]
fn descriptions_are_classified() {
    use Failure::*;
    let permanent = [
        "Forbidden: bot was blocked by the user",
        "Forbidden: bot was kicked from the group chat",
        "Forbidden: bot is not a member of the supergroup chat",
        "Forbidden: user is deactivated",
        "Forbidden: bot can't initiate conversation with a user",
        "Bad Request: chat not found",
        "Bad Request: not enough rights to send documents to the chat",
        "Request Entity Too Large",
        "Bad Request: message caption is too long",
    ];
    for text in permanent {
        assert!(matches!(classify_description(text), Permanent(_)), "{text}");
    }
    assert!(matches!(
        classify_description("Bad Request: PHOTO_INVALID_DIMENSIONS"),
        PhotoRefused(_)
    ));
    assert_eq!(
        classify_description(
            "Bad Request: failed to send message #1 with the error message \"Too Many Requests: retry after 8\""
        ),
        RetryAfter(Duration::from_secs(8))
    );
    assert!(matches!(
        classify_description("Bad Request: wrong file identifier/HTTP URL specified"),
        StaleFileId(_)
    ));
    assert!(matches!(
        classify_description("Internal Server Error: restart"),
        Transient(_)
    ));
}

#[test]
fn only_recipient_errors_cancel_the_rest_of_a_report() {
    assert!(recipient_unreachable(
        "Forbidden: bot was blocked by the user"
    ));
    assert!(recipient_unreachable("Bad Request: chat not found"));
    assert!(recipient_unreachable(
        "Bad Request: not enough rights to send documents to the chat"
    ));
    assert!(!recipient_unreachable(
        "Bad Request: message caption is too long"
    ));
    assert!(!recipient_unreachable("Request Entity Too Large"));
}

#[test]
fn backoff_grows_and_is_capped() {
    assert!(backoff_delay(0) <= Duration::from_secs(1));
    assert!(backoff_delay(3) >= Duration::from_secs(4));
    assert!(backoff_delay(30) <= Duration::from_secs(300));
}

#[test]
fn refused_photos_become_documents() {
    let send = OutboxSend {
        method: Method::SendPhoto,
        items: vec![OutboxItem {
            kind: ItemKind::Photo,
            sha256: "a".into(),
            file_name: "a.png".into(),
            caption: Some("c".into()),
        }],
        text: None,
        options: crate::state::SendOptions {
            message_thread_id: Some(7),
            disable_notification: true,
            protect_content: true,
        },
    };
    let documents = as_documents(&send);
    assert_eq!(documents.method, Method::SendDocument);
    assert_eq!(documents.items[0].kind, ItemKind::Document);
    assert_eq!(documents.items[0].caption.as_deref(), Some("c"));
}
