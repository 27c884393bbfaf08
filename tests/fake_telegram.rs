//! Self-tests of the fake Telegram Bot API server (`tests/support/telegram.rs`).
//!
//! Most tests drive the fake through a real `teloxide::Bot` (`set_api_url`), which proves that
//! the envelope, the error texts and the JSON fixtures are what teloxide 0.17 understands.
//! Wire-level details (status codes, headers, key order, 5xx) are checked with reqwest, because
//! teloxide sleeps 10 s on any 5xx answer.

mod support;

use std::time::Duration;

use bytes::Bytes;
use teloxide::payloads::{GetUpdatesSetters, SendMessageSetters};
use teloxide::prelude::*;
use teloxide::types::{
    AllowedUpdate, BotCommand, ChatAction, ChatMemberUpdated, Contact, InputFile, InputMedia,
    InputMediaDocument, InputMediaPhoto, KeyboardButton, KeyboardMarkup, ParseMode, UpdateKind,
};
use teloxide::{ApiError, RequestError};
use tokio::time::Instant;

use support::telegram::{
    BASIC_GROUP_ID, ChatState, ContactCard, FakeConfig, FakeTelegram, Fault, FaultRule, FileKind,
    FileSource, FloodControl, OTHER_USER_ID, Outcome, RateLimits, RateScope, SUPERGROUP_ID, TOKEN,
    TgChat, TgUser, TopicState, USER_ID, desc, make_png, parse_html, utf16_len, visible_text,
    visible_text_lenient,
};

const WAIT: Duration = Duration::from_secs(5);

fn unknown(err: &RequestError) -> &str {
    match err {
        RequestError::Api(ApiError::Unknown(s)) => s,
        other => panic!("expected ApiError::Unknown, got {other:?}"),
    }
}

/// The Bot API error inside `err` (panics on a network or parse error).
fn api(err: &RequestError) -> &ApiError {
    match err {
        RequestError::Api(api) => api,
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// POSTs `body` as JSON to the fake's `method`.
async fn post_json(
    fake: &FakeTelegram,
    method: &str,
    body: serde_json::Value,
) -> reqwest::Response {
    reqwest::Client::new()
        .post(fake.method_url(method))
        .json(&body)
        .send()
        .await
        .unwrap()
}

fn ann() -> TgUser {
    TgUser::new(USER_ID, "Ann").with_username("ann_sales")
}

fn owner() -> TgUser {
    TgUser::new(OTHER_USER_ID, "Oleg")
}

#[tokio::test]
async fn get_me_through_teloxide() {
    let fake = FakeTelegram::start(TOKEN).await;
    let me = fake.bot().get_me().await.expect("getMe");
    assert_eq!(me.id.0, 7_012_345_678);
    assert!(me.is_bot);
    assert_eq!(me.username(), "report_relay_bot");
    assert!(me.can_join_groups);

    let calls = fake.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].method, "getMe");
    assert_eq!(calls[0].path_method, "GetMe", "teloxide sends PascalCase");
    assert_eq!(calls[0].http_method, "POST");
    assert!(calls[0].is_ok());
}

#[tokio::test]
async fn wrong_token_is_invalid_token() {
    let fake = FakeTelegram::start(TOKEN).await;
    let bot =
        Bot::new("7012345678:AAHwrongwrongwrongwrongwrongwrong123").set_api_url(fake.api_url());
    let err = bot.get_me().await.unwrap_err();
    assert_eq!(api(&err), &ApiError::InvalidToken);
    assert!(
        fake.calls().is_empty(),
        "unauthorized calls are not methods"
    );
}

#[tokio::test]
async fn routing_and_envelope_on_the_wire() {
    let fake = FakeTelegram::start(TOKEN).await;
    let http = reqwest::Client::new();
    let base = format!("http://{}", fake.addr());

    let check = |status: u16, body: &str| {
        let body = body.to_owned();
        move |resp: (reqwest::StatusCode, String, String)| {
            assert_eq!(resp.0.as_u16(), status);
            assert_eq!(resp.1, "application/json");
            assert_eq!(resp.2, body);
        }
    };
    async fn get(http: &reqwest::Client, url: &str) -> (reqwest::StatusCode, String, String) {
        let r = http.get(url).send().await.expect("request");
        let status = r.status();
        let ct = r.headers()[reqwest::header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .to_owned();
        (status, ct, r.text().await.unwrap())
    }

    check(
        404,
        r#"{"ok":false,"error_code":404,"description":"Not Found: method not found"}"#,
    )(get(&http, &fake.method_url("doesNotExist")).await);
    check(
        404,
        r#"{"ok":false,"error_code":404,"description":"Not Found"}"#,
    )(get(&http, &format!("{base}/favicon.ico")).await);
    check(
        404,
        r#"{"ok":false,"error_code":404,"description":"Not Found"}"#,
    )(get(&http, &format!("{base}/bot{TOKEN}/test/getMe")).await);
    check(
        401,
        r#"{"ok":false,"error_code":401,"description":"Unauthorized"}"#,
    )(get(&http, &format!("{base}/bot123:nope/getMe")).await);

    // Case-insensitive method names, GET with a query string.
    let (status, _, body) = get(&http, &fake.method_url("GETME")).await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["result"]["username"], "report_relay_bot");
    assert!(body.starts_with(r#"{"ok":true,"result":"#));

    let (status, _, body) = get(
        &http,
        &format!(
            "{}?chat_id={USER_ID}&text=hi%20there",
            fake.method_url("sendmessage")
        ),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["result"]["text"], "hi there");

    // application/x-www-form-urlencoded and JSON bodies.
    let r = http
        .post(fake.method_url("sendMessage"))
        .form(&[
            ("chat_id", USER_ID.to_string()),
            ("text", "form".to_owned()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = post_json(
        &fake,
        "sendMessage",
        serde_json::json!({"chat_id": USER_ID, "text": "json"}),
    )
    .await;
    assert_eq!(r.status(), 200);

    // A 400 error keeps the key order and has no `parameters`.
    let r = post_json(&fake, "sendMessage", serde_json::json!({"text": "no chat"})).await;
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.text().await.unwrap(),
        r#"{"ok":false,"error_code":400,"description":"Bad Request: chat_id is empty"}"#
    );

    let methods: Vec<_> = fake
        .calls()
        .iter()
        .map(|c| c.content_type.clone())
        .collect();
    assert!(methods.contains(&Some("application/x-www-form-urlencoded".to_owned())));
    assert!(methods.contains(&Some("application/json".to_owned())));
}

#[tokio::test]
async fn document_upload_then_resend_by_file_id() {
    let fake = FakeTelegram::start(TOKEN).await;
    let bot = fake.bot();
    let pdf = Bytes::from_static(b"%PDF-1.7\n% a fake Superset report\n%%EOF\n");

    let first = bot
        .send_document(
            ChatId(USER_ID),
            InputFile::memory(pdf.clone()).file_name("report.pdf"),
        )
        .caption("Weekly sales &amp; <b>KPIs</b>")
        .parse_mode(ParseMode::Html)
        .await
        .expect("upload");
    let doc = first.document().expect("a document").clone();
    assert_eq!(doc.file_name.as_deref(), Some("report.pdf"));
    assert_eq!(
        doc.mime_type.as_ref().map(|m| m.essence_str().to_owned()),
        Some("application/pdf".to_owned())
    );
    assert_eq!(doc.file.size as usize, pdf.len());
    assert_eq!(first.caption(), Some("Weekly sales & KPIs"));
    let entities = first.caption_entities().expect("bold entity");
    assert_eq!((entities[0].offset, entities[0].length), (15, 4));

    let second = bot
        .send_document(
            ChatId(BASIC_GROUP_ID),
            InputFile::file_id(doc.file.id.clone()),
        )
        .caption("again")
        .await
        .expect("resend by file_id");
    let doc2 = second.document().unwrap();
    assert_eq!(doc2.file.unique_id, doc.file.unique_id);
    assert_eq!(doc2.file.id, doc.file.id);
    assert_eq!(doc2.file_name.as_deref(), Some("report.pdf"));

    // The same bytes uploaded again: a new file_id, the same file_unique_id.
    let third = bot
        .send_document(
            ChatId(SUPERGROUP_ID),
            InputFile::memory(pdf.clone()).file_name("copy.pdf"),
        )
        .await
        .unwrap();
    let doc3 = third.document().unwrap();
    assert_ne!(doc3.file.id, doc.file.id);
    assert_eq!(doc3.file.unique_id, doc.file.unique_id);

    let calls = fake.calls_of("sendDocument");
    assert_eq!(calls.len(), 3);
    assert_eq!(
        calls[0].content_type.as_deref(),
        Some("multipart/form-data")
    );
    assert_eq!(calls[0].path_method, "SendDocument");
    let f0 = &calls[0].files[0];
    assert_eq!(f0.kind, FileKind::Document);
    assert!(matches!(&f0.source, FileSource::Upload { part } if part.len() == 32));
    assert_eq!(f0.file_name.as_deref(), Some("report.pdf"));
    assert_eq!(f0.bytes.as_ref(), Some(&pdf));
    assert_eq!(f0.sha256.as_deref(), Some(sha256(&pdf).as_str()));
    assert_eq!(
        f0.caption.as_deref(),
        Some("Weekly sales &amp; <b>KPIs</b>")
    );
    assert_eq!(f0.parse_mode.as_deref(), Some("HTML"));
    assert_eq!(f0.file_id.as_ref(), Some(&doc.file.id.0));
    assert_eq!(calls[0].chat_id, Some(USER_ID));
    // teloxide also sends file_id resends as multipart.
    assert_eq!(
        calls[1].content_type.as_deref(),
        Some("multipart/form-data")
    );
    assert_eq!(
        calls[1].files[0].source,
        FileSource::FileId(doc.file.id.0.clone())
    );
    assert_eq!(calls[1].files[0].bytes.as_ref(), Some(&pdf));

    let stats = fake.stats();
    assert_eq!((stats.uploads, stats.file_id_sends), (2, 1));
    assert_eq!(stats.messages_delivered, 3);
}

#[tokio::test]
async fn photos_sizes_dimensions_and_file_types() {
    let fake = FakeTelegram::start(TOKEN).await;
    let bot = fake.bot();

    let msg = bot
        .send_photo(
            ChatId(USER_ID),
            InputFile::memory(make_png(640, 480)).file_name("chart.png"),
        )
        .caption("Chart")
        .await
        .expect("a valid photo");
    let sizes = msg.photo().expect("photo sizes").to_vec();
    let dims: Vec<_> = sizes.iter().map(|s| (s.width, s.height)).collect();
    assert_eq!(
        dims,
        vec![(90, 68), (320, 240), (640, 480)],
        "ascending, largest last"
    );
    let largest = sizes.last().unwrap().file.clone();

    // Resend by the largest size's file_id.
    let again = bot
        .send_photo(
            ChatId(BASIC_GROUP_ID),
            InputFile::file_id(largest.id.clone()),
        )
        .await
        .expect("photo by file_id");
    assert_eq!(
        again.photo().unwrap().last().unwrap().file.unique_id,
        largest.unique_id
    );

    // Too tall (w + h > 10000) and too thin (ratio > 20).
    for (w, h) in [(100, 12_000), (50, 1_200)] {
        let err = bot
            .send_photo(
                ChatId(USER_ID),
                InputFile::memory(make_png(w, h)).file_name("tall.png"),
            )
            .await
            .unwrap_err();
        assert_eq!(unknown(&err), "Bad Request: PHOTO_INVALID_DIMENSIONS");
    }
    // Not an image.
    let err = bot
        .send_photo(
            ChatId(USER_ID),
            InputFile::memory(&b"%PDF-1.7"[..]).file_name("x.png"),
        )
        .await
        .unwrap_err();
    assert_eq!(api(&err), &ApiError::ImageProcessFailed);

    // A photo id is no document and vice versa; unknown ids are refused.
    let err = bot
        .send_document(ChatId(USER_ID), InputFile::file_id(largest.id.clone()))
        .await
        .unwrap_err();
    assert_eq!(
        unknown(&err),
        "Bad Request: can't use file of type Photo as Document"
    );
    let doc = bot
        .send_document(
            ChatId(USER_ID),
            InputFile::memory(&b"csv,1"[..]).file_name("t.csv"),
        )
        .await
        .unwrap();
    let doc_id = doc.document().unwrap().file.id.clone();
    assert_eq!(
        doc.document()
            .unwrap()
            .mime_type
            .as_ref()
            .map(|m| m.to_string()),
        Some("text/csv".to_owned())
    );
    let err = bot
        .send_photo(ChatId(USER_ID), InputFile::file_id(doc_id))
        .await
        .unwrap_err();
    assert_eq!(
        unknown(&err),
        "Bad Request: can't use file of type Document as Photo"
    );
    let err = bot
        .send_photo(
            ChatId(USER_ID),
            InputFile::file_id("AgACAgIAAxkDAAIunknown".into()),
        )
        .await
        .unwrap_err();
    assert_eq!(api(&err), &ApiError::WrongFileIdOrUrl);

    // Photo upload limit (TDLib: 10 MiB).
    let big = Bytes::from(vec![0u8; (10 << 20) + 1]);
    let err = bot
        .send_photo(ChatId(USER_ID), InputFile::memory(big).file_name("big.png"))
        .await
        .unwrap_err();
    assert_eq!(
        unknown(&err),
        "Bad Request: file of size 10485761 bytes is too big for a photo; the maximum size is 10485760 bytes"
    );
    // No photo at all.
    let r = post_json(&fake, "sendPhoto", serde_json::json!({"chat_id": USER_ID})).await;
    assert_eq!(
        r.text().await.unwrap(),
        format!(
            r#"{{"ok":false,"error_code":400,"description":"{}"}}"#,
            desc::NO_PHOTO
        )
    );
}

#[tokio::test]
async fn document_over_the_upload_limit_is_413() {
    let fake = FakeTelegram::start_with(
        TOKEN,
        FakeConfig {
            max_upload_bytes: 1_000,
            ..FakeConfig::default()
        },
    )
    .await;
    let err = fake
        .bot()
        .send_document(
            ChatId(USER_ID),
            InputFile::memory(vec![b'x'; 1_001]).file_name("big.pdf"),
        )
        .await
        .unwrap_err();
    assert_eq!(api(&err), &ApiError::RequestEntityTooLarge);
    let call = &fake.calls_of("sendDocument")[0];
    assert_eq!(call.error_code(), Some(413));
    assert_eq!(call.files[0].bytes.as_ref().map(|b| b.len()), Some(1_001));
}

#[tokio::test]
async fn media_groups() {
    let fake = FakeTelegram::start(TOKEN).await;
    let bot = fake.bot();
    let doc = |name: &'static str, body: &'static [u8]| {
        InputMediaDocument::new(InputFile::memory(body).file_name(name))
    };

    // Documents can't be mixed with photos.
    let err = bot
        .send_media_group(
            ChatId(SUPERGROUP_ID),
            vec![
                InputMedia::Photo(InputMediaPhoto::new(
                    InputFile::memory(make_png(320, 240)).file_name("a.png"),
                )),
                InputMedia::Document(doc("b.pdf", b"%PDF b")),
            ],
        )
        .await
        .unwrap_err();
    assert_eq!(unknown(&err), desc::ALBUM_DOCUMENT_MIXED);

    // A valid album: an array of Messages sharing media_group_id, captions per item.
    let msgs = bot
        .send_media_group(
            ChatId(SUPERGROUP_ID),
            vec![
                InputMedia::Document(
                    doc("a.pdf", b"%PDF a")
                        .caption("<i>Dashboard</i> A")
                        .parse_mode(ParseMode::Html),
                ),
                InputMedia::Document(doc("b.pdf", b"%PDF b")),
            ],
        )
        .await
        .expect("album");
    assert_eq!(msgs.len(), 2);
    let group = msgs[0].media_group_id().expect("media_group_id").clone();
    assert_eq!(msgs[1].media_group_id(), Some(&group));
    assert_eq!(msgs[0].caption(), Some("Dashboard A"));
    assert_eq!(msgs[1].caption(), None);
    assert_eq!(
        msgs[1].document().unwrap().file_name.as_deref(),
        Some("b.pdf")
    );

    let call = fake.calls_of("sendMediaGroup").pop().unwrap();
    assert_eq!(call.delivered_messages(), 2);
    assert_eq!(call.files.len(), 2);
    assert_eq!(call.files[0].field, "media[0]");
    assert_eq!(call.files[0].caption.as_deref(), Some("<i>Dashboard</i> A"));
    assert_eq!(call.files[0].parse_mode.as_deref(), Some("HTML"));
    assert!(
        call.files
            .iter()
            .all(|f| f.is_upload() && f.file_id.is_some())
    );

    // A photo album with a bad photo: the failing item's position is reported.
    let err = bot
        .send_media_group(
            ChatId(USER_ID),
            vec![
                InputMedia::Photo(InputMediaPhoto::new(
                    InputFile::memory(make_png(320, 240)).file_name("ok.png"),
                )),
                InputMedia::Photo(InputMediaPhoto::new(
                    InputFile::memory(make_png(30, 3_000)).file_name("thin.png"),
                )),
            ],
        )
        .await
        .unwrap_err();
    assert_eq!(
        unknown(&err),
        "Bad Request: failed to send message #2 with the error message \"PHOTO_INVALID_DIMENSIONS\""
    );

    // More than 10 items.
    let eleven: Vec<_> = (0..11)
        .map(|_| InputMedia::Document(doc("x.pdf", b"%PDF x")))
        .collect();
    let err = bot
        .send_media_group(ChatId(USER_ID), eleven)
        .await
        .unwrap_err();
    assert_eq!(unknown(&err), desc::ALBUM_TOO_MANY);
    assert_eq!(fake.stats().messages_delivered, 2);
}

#[tokio::test]
async fn captions_and_texts_are_validated_after_entity_parsing() {
    let fake = FakeTelegram::start(TOKEN).await;
    let bot = fake.bot();
    let send = |caption: String| {
        bot.send_document(
            ChatId(USER_ID),
            InputFile::memory(&b"data"[..]).file_name("r.csv"),
        )
        .caption(caption)
        .parse_mode(ParseMode::Html)
    };

    // 1024 visible characters are fine, whatever the markup around them.
    send(format!("<b>{}</b>", "x".repeat(1024)))
        .await
        .expect("1024 visible");
    send("&amp;".repeat(1024)).await.expect("1024 entities");
    // 1025 visible characters, or 513 emoji (1026 UTF-16 code units), are too long.
    for caption in ["x".repeat(1025), "😀".repeat(513)] {
        let err = send(caption).await.unwrap_err();
        assert_eq!(unknown(&err), desc::CAPTION_TOO_LONG);
    }
    // Bad HTML.
    let err = send("Revenue <foo>".to_owned()).await.unwrap_err();
    assert!(
        matches!(&err, RequestError::Api(ApiError::CantParseEntities(d))
            if d == "Bad Request: can't parse entities: Unsupported start tag \"foo\" at byte offset 8"),
        "{err:?}"
    );
    let err = send("a < b".to_owned()).await.unwrap_err();
    assert!(
        matches!(err, RequestError::Api(ApiError::CantParseEntities(_))),
        "{err:?}"
    );
    let err = send("<b>unclosed".to_owned()).await.unwrap_err();
    assert!(
        matches!(&err, RequestError::Api(ApiError::CantParseEntities(d))
            if d.ends_with("Can't find end tag corresponding to start tag \"b\"")),
        "{err:?}"
    );
    // Without parse_mode nothing is parsed.
    bot.send_document(
        ChatId(USER_ID),
        InputFile::memory(&b"data"[..]).file_name("r.csv"),
    )
    .caption("a < b & c")
    .await
    .expect("plain caption");

    // Texts: 4096 visible characters.
    bot.send_message(ChatId(USER_ID), "y".repeat(4096))
        .await
        .expect("4096");
    let err = bot
        .send_message(ChatId(USER_ID), "y".repeat(4097))
        .await
        .unwrap_err();
    assert_eq!(api(&err), &ApiError::MessageIsTooLong);
    let err = bot
        .send_message(ChatId(USER_ID), "<b> </b>")
        .parse_mode(ParseMode::Html)
        .await
        .unwrap_err();
    assert_eq!(api(&err), &ApiError::MessageTextIsEmpty);
}

#[tokio::test]
async fn replies_with_reply_markup_are_recorded() {
    let fake = FakeTelegram::start(TOKEN).await;
    let keyboard = KeyboardMarkup::new(vec![vec![
        KeyboardButton::new("Share phone").request(teloxide::types::ButtonRequest::Contact),
    ]])
    .resize_keyboard()
    .one_time_keyboard();
    let msg = fake
        .bot()
        .send_message(ChatId(USER_ID), "Please share your phone number")
        .reply_markup(keyboard)
        .await
        .expect("reply");
    assert_eq!(msg.text(), Some("Please share your phone number"));

    let replies = fake.replies_to(USER_ID);
    assert_eq!(replies.len(), 1);
    let markup = replies[0]
        .reply_markup
        .as_ref()
        .expect("reply_markup recorded");
    assert_eq!(markup["keyboard"][0][0]["request_contact"], true);
    assert_eq!(markup["one_time_keyboard"], true);
    // Only inline keyboards are echoed in the Message (as the real server does).
    assert!(replies[0].result().unwrap().get("reply_markup").is_none());
}

#[tokio::test]
async fn retry_after_through_teloxide_and_on_the_wire() {
    let fake = FakeTelegram::start(TOKEN).await;
    let bot = fake.bot();
    fake.inject(
        FaultRule::new(Fault::RetryAfter(3))
            .method("sendMessage")
            .chat(USER_ID),
    );
    let err = bot
        .send_message(ChatId(USER_ID), "hello")
        .await
        .unwrap_err();
    assert!(
        matches!(err, RequestError::RetryAfter(s) if s.seconds() == 3),
        "{err:?}"
    );
    bot.send_message(ChatId(USER_ID), "hello")
        .await
        .expect("second try");
    assert_eq!(fake.pending_faults(), 0);

    fake.fail_next("sendMessage", Fault::RetryAfter(7));
    let r = post_json(
        &fake,
        "sendMessage",
        serde_json::json!({"chat_id": USER_ID, "text": "x"}),
    )
    .await;
    assert_429_envelope(r, 7).await;
    let calls = fake.calls_of("sendMessage");
    assert_eq!(calls[0].fault, Some(Fault::RetryAfter(3)));
    assert!(matches!(calls[0].outcome, Outcome::Error { code: 429, .. }));
    assert!(calls[1].is_ok());
}

#[tokio::test]
async fn migrate_to_chat_id() {
    let fake = FakeTelegram::start(TOKEN).await;
    let bot = fake.bot();
    fake.migrate_chat(BASIC_GROUP_ID, SUPERGROUP_ID);
    let err = bot
        .send_message(ChatId(BASIC_GROUP_ID), "report")
        .await
        .unwrap_err();
    assert!(
        matches!(err, RequestError::MigrateToChatId(ChatId(id)) if id == SUPERGROUP_ID),
        "{err:?}"
    );
    bot.send_message(ChatId(SUPERGROUP_ID), "report")
        .await
        .expect("new id works");

    // One-shot injection, and the exact wire format (only the migrate key).
    fake.inject(FaultRule::new(Fault::MigrateTo(SUPERGROUP_ID)).chat(-555_666_777));
    let r = post_json(
        &fake,
        "sendMessage",
        serde_json::json!({"chat_id": -555_666_777i64, "text": "x"}),
    )
    .await;
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.text().await.unwrap(),
        r#"{"ok":false,"error_code":400,"description":"Bad Request: group chat was upgraded to a supergroup chat","parameters":{"migrate_to_chat_id":-1001987654321}}"#
    );
}

#[tokio::test]
async fn forum_topics_silent_and_protected_sends() {
    use teloxide::payloads::{SendDocumentSetters, SendMediaGroupSetters};
    use teloxide::types::{MessageId, ThreadId};

    let fake = FakeTelegram::start(TOKEN).await;
    let bot = fake.bot();
    let topic = ThreadId(MessageId(42));
    fake.add_topic(SUPERGROUP_ID, 42);

    // Into an open topic, silently and protected: the options are recorded and the message says
    // where it went.
    let message = bot
        .send_message(ChatId(SUPERGROUP_ID), "report")
        .message_thread_id(topic)
        .disable_notification(true)
        .protect_content(true)
        .await
        .expect("an open topic takes it");
    assert_eq!(message.thread_id, Some(topic));
    assert!(message.is_topic_message);
    assert!(message.has_protected_content());
    let call = fake.sends_to(SUPERGROUP_ID).pop().unwrap();
    assert_eq!(call.message_thread_id(), Some(42));
    assert!(call.flag("disable_notification"));
    assert!(call.flag("protect_content"));
    let documents = bot
        .send_document(
            ChatId(SUPERGROUP_ID),
            InputFile::memory(&b"%PDF"[..]).file_name("r.pdf"),
        )
        .message_thread_id(topic)
        .await
        .expect("a document into the topic");
    assert_eq!(documents.thread_id, Some(topic));
    let album = bot
        .send_media_group(
            ChatId(SUPERGROUP_ID),
            vec![
                InputMedia::Document(InputMediaDocument::new(
                    InputFile::memory(&b"%PDF a"[..]).file_name("a.pdf"),
                )),
                InputMedia::Document(InputMediaDocument::new(
                    InputFile::memory(&b"%PDF b"[..]).file_name("b.pdf"),
                )),
            ],
        )
        .message_thread_id(topic)
        .await
        .expect("an album into the topic");
    assert!(album.iter().all(|m| m.thread_id == Some(topic)));

    // Without options nothing is flagged.
    let plain = bot
        .send_message(ChatId(SUPERGROUP_ID), "plain")
        .await
        .unwrap();
    assert_eq!(plain.thread_id, None);
    assert!(!plain.has_protected_content());
    let call = fake.sends_to(SUPERGROUP_ID).pop().unwrap();
    assert_eq!(call.message_thread_id(), None);
    assert!(!call.flag("disable_notification"));
    assert!(!call.flag("protect_content"));

    // A closed topic, a deleted one and one that never existed: Telegram's errors, nothing
    // delivered (never the General topic).
    fake.set_topic(SUPERGROUP_ID, 42, TopicState::Closed);
    let err = bot
        .send_message(ChatId(SUPERGROUP_ID), "report")
        .message_thread_id(topic)
        .await
        .unwrap_err();
    assert_eq!(unknown(&err), desc::TOPIC_CLOSED);
    fake.set_topic(SUPERGROUP_ID, 42, TopicState::Deleted);
    let err = bot
        .send_document(
            ChatId(SUPERGROUP_ID),
            InputFile::memory(&b"%PDF"[..]).file_name("r.pdf"),
        )
        .message_thread_id(topic)
        .await
        .unwrap_err();
    assert_eq!(unknown(&err), desc::THREAD_NOT_FOUND);
    let r = post_json(
        &fake,
        "sendMessage",
        serde_json::json!({"chat_id": SUPERGROUP_ID, "text": "x", "message_thread_id": 77}),
    )
    .await;
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.text().await.unwrap(),
        r#"{"ok":false,"error_code":400,"description":"Bad Request: message thread not found"}"#
    );
    assert_eq!(fake.sends_to(SUPERGROUP_ID).len(), 4);
}

#[tokio::test]
async fn chat_states_and_forbidden_errors() {
    let fake = FakeTelegram::start(TOKEN).await;
    let bot = fake.bot();
    let pdf = || InputFile::memory(&b"%PDF"[..]).file_name("r.pdf");

    fake.block_chat(USER_ID);
    let err = bot.send_message(ChatId(USER_ID), "hi").await.unwrap_err();
    assert_eq!(api(&err), &ApiError::BotBlocked);
    let err = bot.send_document(ChatId(USER_ID), pdf()).await.unwrap_err();
    assert_eq!(api(&err), &ApiError::BotBlocked);
    fake.clear_chat_state(USER_ID);
    bot.send_message(ChatId(USER_ID), "hi")
        .await
        .expect("unblocked");

    fake.set_chat_state(SUPERGROUP_ID, ChatState::Kicked);
    let err = bot
        .send_document(ChatId(SUPERGROUP_ID), pdf())
        .await
        .unwrap_err();
    assert_eq!(api(&err), &ApiError::BotKickedFromSupergroup);
    fake.set_chat_state(BASIC_GROUP_ID, ChatState::Kicked);
    let err = bot
        .send_document(ChatId(BASIC_GROUP_ID), pdf())
        .await
        .unwrap_err();
    assert_eq!(unknown(&err), desc::KICKED_FROM_GROUP);
    fake.set_chat_state(SUPERGROUP_ID, ChatState::NotMember);
    let err = bot
        .send_message(ChatId(SUPERGROUP_ID), "x")
        .await
        .unwrap_err();
    assert_eq!(unknown(&err), desc::NOT_MEMBER_SUPERGROUP);
    fake.set_chat_state(SUPERGROUP_ID, ChatState::NoRights);
    let err = bot
        .send_document(ChatId(SUPERGROUP_ID), pdf())
        .await
        .unwrap_err();
    assert_eq!(unknown(&err), desc::NO_RIGHTS_DOCUMENTS);
    fake.set_chat_state(-222_333_444, ChatState::NotFound);
    let err = bot
        .send_message(ChatId(-222_333_444), "x")
        .await
        .unwrap_err();
    assert_eq!(api(&err), &ApiError::ChatNotFound);

    // Scripted one-shot errors on the nth call of a method in a chat.
    fake.inject(
        FaultRule::new(Fault::KickedFromGroup)
            .method("SendMessage")
            .chat(-333_444_555)
            .nth(2),
    );
    let chat = ChatId(-333_444_555);
    bot.send_message(chat, "1").await.expect("first");
    let err = bot.send_message(chat, "2").await.unwrap_err();
    assert_eq!(unknown(&err), desc::KICKED_FROM_GROUP);
    bot.send_message(chat, "3").await.expect("third");

    fake.inject(FaultRule::new(Fault::NotMemberOfSupergroup).times(2));
    for _ in 0..2 {
        let err = bot.send_message(chat, "x").await.unwrap_err();
        assert_eq!(unknown(&err), desc::NOT_MEMBER_SUPERGROUP);
    }
    fake.inject(FaultRule::new(Fault::ChatNotFound).method("sendDocument"));
    let err = bot.send_document(chat, pdf()).await.unwrap_err();
    assert_eq!(api(&err), &ApiError::ChatNotFound);
    fake.inject(FaultRule::new(Fault::NotEnoughRightsDocuments));
    let err = bot.send_document(chat, pdf()).await.unwrap_err();
    assert_eq!(unknown(&err), desc::NO_RIGHTS_DOCUMENTS);
    fake.inject(FaultRule::new(Fault::BotBlocked).always().chat(USER_ID));
    for _ in 0..3 {
        let err = bot.send_message(ChatId(USER_ID), "x").await.unwrap_err();
        assert_eq!(api(&err), &ApiError::BotBlocked);
    }
    fake.clear_faults();
    bot.send_message(ChatId(USER_ID), "x")
        .await
        .expect("cleared");
}

#[tokio::test]
async fn closed_connection_is_a_network_error() {
    let fake = FakeTelegram::start(TOKEN).await;
    fake.fail_next("sendDocument", Fault::CloseConnection);
    let err = fake
        .bot()
        .send_document(
            ChatId(USER_ID),
            InputFile::memory(&b"%PDF"[..]).file_name("r.pdf"),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, RequestError::Network(_)), "{err:?}");
    let call = &fake.calls_of("sendDocument")[0];
    assert_eq!(call.outcome, Outcome::ConnectionClosed);
    // The server keeps serving other connections.
    fake.bot().get_me().await.expect("still up");
}

#[tokio::test]
async fn server_errors_on_the_wire() {
    // teloxide sleeps 10 s on any 5xx, so 5xx answers are checked with reqwest.
    let fake = FakeTelegram::start(TOKEN).await;
    let http = reqwest::Client::new();
    fake.fail_next("getMe", Fault::InternalServerError);
    let r = http.get(fake.method_url("getMe")).send().await.unwrap();
    assert_eq!(r.status(), 500);
    assert_eq!(
        r.text().await.unwrap(),
        r#"{"ok":false,"error_code":500,"description":"Internal Server Error"}"#
    );
    fake.fail_next("getMe", Fault::BadGatewayHtml);
    let r = http.get(fake.method_url("getMe")).send().await.unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(r.headers()["content-type"], "text/html");
    assert!(r.text().await.unwrap().contains("<center>nginx"));
    fake.fail_next(
        "getMe",
        Fault::Api {
            code: 409,
            description: desc::CONFLICT_GET_UPDATES.to_owned(),
        },
    );
    let err = fake.bot().get_me().await.unwrap_err();
    assert!(
        matches!(
            err,
            RequestError::Api(ApiError::TerminatedByOtherGetUpdates)
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn delayed_answer_still_delivers() {
    let fake = FakeTelegram::start(TOKEN).await;
    fake.fail_next("sendMessage", Fault::Delay(Duration::from_secs(2)));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let err = http
        .post(fake.method_url("sendMessage"))
        .json(&serde_json::json!({"chat_id": USER_ID, "text": "late"}))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    let call = &fake.calls_of("sendMessage")[0];
    assert!(call.is_ok(), "processed although the answer came too late");
    assert_eq!(call.fault, Some(Fault::Delay(Duration::from_secs(2))));
    assert_eq!(fake.delivered_messages().len(), 1);
}

#[tokio::test]
async fn updates_parse_in_teloxide() {
    let fake = FakeTelegram::start(TOKEN).await;
    let bot = fake.bot();
    let ann = ann();
    let sales = TgChat::supergroup(SUPERGROUP_ID, "Sales");
    let ops = TgChat::group(BASIC_GROUP_ID, "Ops");

    let start = fake.push_start(&ann);
    let own = fake.push_contact(&ann, ContactCard::own(&ann, "79991234567"));
    let forwarded = fake.push_contact(
        &ann,
        ContactCard::other("+79990000000", "Boris", Some(OTHER_USER_ID)).forwarded_from(&owner()),
    );
    let promoted = fake.push_bot_promoted(&sales, &owner());
    let added = fake.push_bot_added(&ops, &owner());
    let blocked = fake.push_bot_blocked(&ann);
    let left = fake.push_bot_left(&ops, &owner());
    let (to, from) = fake.push_migration(&ops, SUPERGROUP_ID, &owner());
    assert!(start < own && own < forwarded && to < from);

    let updates = bot.get_updates().await.expect("getUpdates");
    assert_eq!(updates.len(), 9);
    for u in &updates {
        assert!(
            !matches!(u.kind, UpdateKind::Error(_)),
            "teloxide could not parse {:?}",
            u.kind
        );
    }
    let by_id = |id: i64| {
        updates
            .iter()
            .find(|u| u.id.0 as i64 == id)
            .unwrap_or_else(|| panic!("update {id}"))
    };
    let message = |id: i64| match &by_id(id).kind {
        UpdateKind::Message(m) => m.clone(),
        other => panic!("not a message: {other:?}"),
    };
    let member = |id: i64| match &by_id(id).kind {
        UpdateKind::MyChatMember(m) => m.clone(),
        other => panic!("not my_chat_member: {other:?}"),
    };

    let m = message(start);
    assert_eq!(m.text(), Some("/start"));
    assert!(m.chat.is_private());

    let m = message(own);
    let c = m.contact().expect("contact");
    assert_eq!(c.phone_number, "79991234567");
    assert_eq!(c.user_id, Some(UserId(USER_ID as u64)));
    assert_eq!(m.from.as_ref().map(|u| u.id), Some(UserId(USER_ID as u64)));
    assert!(m.forward_origin().is_none());

    let m = message(forwarded);
    assert_eq!(
        m.contact().unwrap().user_id,
        Some(UserId(OTHER_USER_ID as u64))
    );
    assert!(m.forward_origin().is_some());

    let u = member(promoted);
    assert!(u.new_chat_member.kind.is_administrator());
    assert!(u.old_chat_member.kind.is_present());
    assert!(u.chat.is_supergroup());
    assert_eq!(u.chat.title(), Some("Sales"));
    assert_eq!(u.new_chat_member.user.id.0, 7_012_345_678);

    let u = member(added);
    assert!(u.chat.is_group());
    assert!(u.new_chat_member.kind.is_present() && u.old_chat_member.kind.is_left());

    let u = member(blocked);
    assert!(u.chat.is_private() && u.new_chat_member.kind.is_banned());

    assert!(member(left).new_chat_member.kind.is_left());

    let m = message(to);
    assert_eq!(m.migrate_to_chat_id(), Some(&ChatId(SUPERGROUP_ID)));
    let m = message(from);
    assert_eq!(m.migrate_from_chat_id(), Some(&ChatId(BASIC_GROUP_ID)));
    assert!(m.chat.is_supergroup());

    // The migration also made the old id answer the migrate error.
    assert_eq!(
        fake.chat_state(BASIC_GROUP_ID),
        Some(ChatState::MigratedTo(SUPERGROUP_ID))
    );

    // Confirming with offset drops them.
    let last = updates.last().unwrap().id.0 as i32;
    let rest = bot.get_updates().offset(last + 1).await.unwrap();
    assert!(rest.is_empty());
    assert!(fake.pending_updates().is_empty());
    fake.wait_update_confirmed(from, WAIT)
        .await
        .expect("confirmed");
}

#[tokio::test]
async fn long_poll_returns_when_an_update_arrives() {
    let fake = FakeTelegram::start(TOKEN).await;
    let bot = fake.bot();
    let started = tokio::time::Instant::now();
    let poll = tokio::spawn({
        let bot = bot.clone();
        async move { bot.get_updates().timeout(10).await }
    });
    fake.wait_for_long_poll(WAIT).await.expect("poll parked");
    let id = fake.push_start(&ann());
    let updates = poll.await.unwrap().expect("updates");
    assert_eq!(updates.len(), 1);
    assert_eq!(updates[0].id.0 as i64, id);
    assert!(started.elapsed() < Duration::from_secs(5));

    // A short poll with nothing new returns at once.
    let updates = bot
        .get_updates()
        .offset(id as i32 + 1)
        .timeout(0)
        .await
        .unwrap();
    assert!(updates.is_empty());
}

#[tokio::test]
async fn a_second_poller_terminates_the_first() {
    let fake = FakeTelegram::start(TOKEN).await;
    let bot = fake.bot();
    let first = tokio::spawn({
        let bot = bot.clone();
        async move { bot.get_updates().timeout(10).await }
    });
    fake.wait_for_long_poll(WAIT).await.unwrap();
    bot.get_updates().timeout(0).await.expect("second poller");
    let err = first.await.unwrap().unwrap_err();
    assert!(
        matches!(
            err,
            RequestError::Api(ApiError::TerminatedByOtherGetUpdates)
        ),
        "{err:?}"
    );

    // A webhook blocks getUpdates until deleted.
    fake.set_webhook_url("https://relay.example.com/hook");
    let err = bot.get_updates().await.unwrap_err();
    assert!(format!("{err:?}").contains("webhook is active"), "{err:?}");
    assert!(bot.get_webhook_info().await.unwrap().url.is_some());
    bot.delete_webhook().await.unwrap();
    bot.get_updates().await.expect("after deleteWebhook");
}

#[tokio::test]
async fn allowed_updates_are_sticky() {
    let fake = FakeTelegram::start(TOKEN).await;
    let bot = fake.bot();
    let sales = TgChat::supergroup(SUPERGROUP_ID, "Sales");
    bot.get_updates()
        .allowed_updates(vec![AllowedUpdate::Message])
        .await
        .unwrap();
    assert_eq!(fake.allowed_updates(), Some(vec!["message".to_owned()]));
    fake.push_bot_promoted(&sales, &owner());
    let kept = fake.push_start(&ann());
    // A later call without allowed_updates keeps the filter.
    let updates = bot.get_updates().await.unwrap();
    assert_eq!(updates.len(), 1);
    assert_eq!(updates[0].id.0 as i64, kept);
    assert_eq!(fake.dropped_updates().len(), 1);
    // An empty list restores the default set (which includes my_chat_member).
    bot.get_updates()
        .offset(kept as i32 + 1)
        .allowed_updates(Vec::new())
        .await
        .unwrap();
    assert_eq!(fake.allowed_updates(), None);
    fake.push_bot_promoted(&sales, &owner());
    assert_eq!(bot.get_updates().await.unwrap().len(), 1);
}

#[tokio::test]
async fn dispatcher_registration_flow() {
    let fake = FakeTelegram::start(TOKEN).await;
    fake.set_webhook_url("https://old.example.com/hook");
    let bot = fake.bot();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();

    let handler =
        dptree::entry()
            .branch(Update::filter_message().branch(
                Message::filter_contact().endpoint(
                    |msg: Message,
                     contact: Contact,
                     tx: tokio::sync::mpsc::UnboundedSender<String>| async move {
                        let own = contact.user_id == msg.from.as_ref().map(|u| u.id);
                        let _ = tx.send(format!("contact {} own={own}", contact.phone_number));
                        respond(())
                    },
                ),
            ))
            .branch(Update::filter_my_chat_member().endpoint(
                |u: ChatMemberUpdated, tx: tokio::sync::mpsc::UnboundedSender<String>| async move {
                    let _ = tx.send(format!(
                        "member {} admin={}",
                        u.chat.title().unwrap_or(""),
                        u.new_chat_member.kind.is_administrator()
                    ));
                    respond(())
                },
            ));
    let mut dispatcher = Dispatcher::builder(bot, handler)
        .dependencies(dptree::deps![tx])
        .default_handler(|_| async {})
        .build();
    let task = tokio::spawn(async move { dispatcher.dispatch().await });

    fake.push_contact(&ann(), ContactCard::own(&ann(), "79991234567"));
    fake.push_bot_promoted(&TgChat::supergroup(SUPERGROUP_ID, "Sales"), &owner());
    let mut seen = vec![
        tokio::time::timeout(WAIT, rx.recv())
            .await
            .unwrap()
            .unwrap(),
        tokio::time::timeout(WAIT, rx.recv())
            .await
            .unwrap()
            .unwrap(),
    ];
    seen.sort();
    assert_eq!(
        seen,
        ["contact 79991234567 own=true", "member Sales admin=true"]
    );
    task.abort();

    let methods: Vec<String> = fake.calls().iter().map(|c| c.method.clone()).collect();
    assert_eq!(&methods[..3], ["getWebhookInfo", "deleteWebhook", "getMe"]);
    let first_poll = fake.calls_of("getUpdates").remove(0);
    let allowed: Vec<String> = serde_json::from_str(&first_poll.params["allowed_updates"]).unwrap();
    assert!(allowed.contains(&"message".to_owned()));
    assert!(allowed.contains(&"my_chat_member".to_owned()));
    assert_eq!(fake.webhook_url(), "");
}

#[tokio::test]
async fn other_methods_parse_in_teloxide() {
    let fake = FakeTelegram::start(TOKEN).await;
    let bot = fake.bot();
    fake.add_chat(TgChat::supergroup(SUPERGROUP_ID, "Sales"));
    let chat = bot.get_chat(ChatId(SUPERGROUP_ID)).await.expect("getChat");
    assert_eq!(chat.title(), Some("Sales"));
    let chat = bot
        .get_chat(ChatId(USER_ID))
        .await
        .expect("getChat private");
    assert!(chat.is_private());

    bot.set_my_commands(vec![BotCommand::new("start", "Register with your phone")])
        .await
        .expect("setMyCommands");
    let commands = bot.get_my_commands().await.unwrap();
    assert_eq!(commands[0].command, "start");
    assert_eq!(fake.commands()[0]["command"], "start");
    let err = bot
        .set_my_commands(vec![BotCommand::new("Bad Command", "x")])
        .await
        .unwrap_err();
    assert_eq!(unknown(&err), "Bad Request: BOT_COMMAND_INVALID");

    bot.send_chat_action(ChatId(USER_ID), ChatAction::UploadDocument)
        .await
        .expect("sendChatAction");
    let info = bot.get_webhook_info().await.unwrap();
    assert!(info.url.is_none());
    bot.delete_webhook().await.unwrap();
}

// ----- strict limits: the windows, checked at chosen instants ---------------------------------

/// `t0 + ms` milliseconds.
fn at(t0: Instant, ms: u64) -> Instant {
    t0 + Duration::from_millis(ms)
}

/// Private chats `USER_ID + k` for `k` in `range`, one message each at `when`.
fn singles(f: &mut FloodControl, range: std::ops::Range<i64>, when: Instant) {
    for k in range {
        f.check(USER_ID + k, 1, when)
            .unwrap_or_else(|e| panic!("message {k} refused: {e:?}"));
    }
}

#[test]
fn a_burst_of_thirty_then_one_more_half_a_second_later_is_refused() {
    let t0 = Instant::now();
    let mut f = FloodControl::new(RateLimits::telegram());
    singles(&mut f, 0..30, t0);
    let (scope, wait) = f.check(USER_ID + 30, 1, at(t0, 500)).unwrap_err();
    assert_eq!(scope, RateScope::Global);
    // It fits once the burst has left the window (less the 1-ms tolerance).
    assert_eq!(wait, Duration::from_millis(499));
    f.check(USER_ID + 30, 1, at(t0, 999))
        .expect("a window later");
}

#[test]
fn thirty_at_zero_and_thirty_one_second_later_are_accepted() {
    let t0 = Instant::now();
    let mut f = FloodControl::new(RateLimits::telegram());
    singles(&mut f, 0..30, t0);
    singles(&mut f, 30..60, at(t0, 1000));
    singles(&mut f, 60..90, at(t0, 2000));
    // The tolerance is clock granularity, no more: 2 ms short of a window is refused.
    let (scope, _) = f.check(USER_ID + 90, 1, at(t0, 2998)).unwrap_err();
    assert_eq!(scope, RateScope::Global);
    f.check(USER_ID + 90, 1, at(t0, 2999))
        .expect("a window less 1 ms");
    assert_eq!(RateLimits::telegram().tolerance, Duration::from_millis(1));
}

#[test]
fn a_token_bucket_burst_then_one_every_33_ms_is_refused() {
    // governor's Quota::per_second(30): 30 cells at once, then one every 33.3 ms.
    let t0 = Instant::now();
    let mut f = FloodControl::new(RateLimits::telegram());
    singles(&mut f, 0..30, t0);
    let refused = (1..30)
        .filter(|&k| f.check(USER_ID + 30 + k, 1, at(t0, 33 * k as u64)).is_err())
        .count();
    assert_eq!(
        refused, 29,
        "every trickled message within the first second"
    );

    // Evenly spaced, 33 ms apart is 31 in 990 ms: refused; 34 ms apart fits for good.
    let mut f = FloodControl::new(RateLimits::telegram());
    for k in 0..30 {
        f.check(USER_ID + k, 1, at(t0, 33 * k as u64)).unwrap();
    }
    assert!(f.check(USER_ID + 30, 1, at(t0, 33 * 30)).is_err());
    let mut f = FloodControl::new(RateLimits::telegram());
    for k in 0..120 {
        f.check(USER_ID + k, 1, at(t0, 34 * k as u64))
            .unwrap_or_else(|e| panic!("message {k}: {e:?}"));
    }
}

#[test]
fn an_album_counts_its_items_globally_and_in_its_group_but_one_request_in_its_chat() {
    let t0 = Instant::now();
    let mut f = FloodControl::new(RateLimits::telegram());
    // Three albums of 10 are 30 messages: the global window is full.
    for k in 0..3 {
        f.check(USER_ID + k, 10, t0).unwrap();
    }
    let (scope, _) = f.check(USER_ID + 3, 1, at(t0, 500)).unwrap_err();
    assert_eq!(scope, RateScope::Global);
    let (scope, wait) = f.check(USER_ID + 3, 2, at(t0, 998)).unwrap_err();
    assert_eq!((scope, wait), (RateScope::Global, Duration::from_millis(1)));
    f.check(USER_ID + 3, 2, at(t0, 999))
        .expect("an album of 2 once the albums left");

    // In one chat an album is one request: the next send to it may follow a window later.
    let mut f = FloodControl::new(RateLimits::telegram());
    f.check(USER_ID, 3, t0).unwrap();
    let (scope, wait) = f.check(USER_ID, 1, at(t0, 500)).unwrap_err();
    assert_eq!((scope, wait), (RateScope::Chat, Duration::from_millis(499)));
    f.check(USER_ID, 1, at(t0, 1000))
        .expect("one request per second");

    // A group: 20 messages in any 60 s, albums counted per item.
    let mut f = FloodControl::new(RateLimits::telegram());
    f.check(SUPERGROUP_ID, 10, t0).unwrap();
    f.check(SUPERGROUP_ID, 9, at(t0, 1000)).unwrap();
    let (scope, wait) = f.check(SUPERGROUP_ID, 2, at(t0, 30_000)).unwrap_err();
    assert_eq!(scope, RateScope::Group);
    assert_eq!(
        wait,
        Duration::from_millis(29_999),
        "until the first album left"
    );
    f.check(SUPERGROUP_ID, 1, at(t0, 30_000)).expect("the 20th");
    f.check(SUPERGROUP_ID, 2, at(t0, 59_999))
        .expect("the first album has left the window");
}

#[test]
fn a_request_that_arrived_earlier_but_is_checked_later_counts_where_it_arrived() {
    // A slow upload's head arrives first; 30 quick sends arrive and are processed before it.
    let t0 = Instant::now();
    let mut f = FloodControl::new(RateLimits::telegram());
    singles(&mut f, 0..30, at(t0, 600));
    // [300 ms, 1300 ms) would hold 31.
    let (scope, _) = f.check(USER_ID + 30, 1, at(t0, 300)).unwrap_err();
    assert_eq!(scope, RateScope::Global);
    // So would [600 ms, 1600 ms) for one arriving at 1.2 s, though it is 0.6 s after the burst.
    assert!(f.check(USER_ID + 31, 1, at(t0, 1200)).is_err());
    f.check(USER_ID + 31, 1, at(t0, 1599)).unwrap();
}

#[test]
fn scaled_limits_shrink_the_windows_and_keep_the_counts() {
    let limits = RateLimits::telegram().scaled(0.05);
    assert_eq!(limits.global_window, Duration::from_millis(50));
    assert_eq!(limits.per_chat_window, Duration::from_millis(50));
    assert_eq!(limits.group_window, Duration::from_secs(3));
    assert_eq!(
        (limits.global_max, limits.group_max, limits.per_chat),
        (30, 20, 1)
    );
    let t0 = Instant::now();
    let mut f = FloodControl::new(limits);
    singles(&mut f, 0..30, t0);
    assert!(f.check(USER_ID + 30, 1, at(t0, 25)).is_err());
    f.check(USER_ID + 30, 1, at(t0, 49)).unwrap();
}

#[test]
fn the_minimum_span_follows_the_global_window() {
    let limits = RateLimits::telegram();
    assert_eq!(limits.min_span(1), Duration::ZERO);
    assert_eq!(limits.min_span(30), Duration::ZERO);
    assert_eq!(limits.min_span(31), Duration::from_secs(1));
    assert_eq!(limits.min_span(123), Duration::from_secs(4));
    // And it is reachable: bursts of 30 a window apart.
    let t0 = Instant::now();
    let mut f = FloodControl::new(limits);
    for k in 0..123 {
        f.check(USER_ID + k, 1, at(t0, 1000 * (k as u64 / 30)))
            .unwrap();
    }
}

// ----- strict limits: through the server --------------------------------------------------

/// The server's 429 to the byte: status, `Retry-After`, JSON envelope with `retry_after`.
async fn assert_429_envelope(r: reqwest::Response, retry_after: u32) {
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], retry_after.to_string().as_str());
    assert_eq!(r.headers()["content-type"], "application/json");
    assert_eq!(
        r.text().await.unwrap(),
        format!(
            r#"{{"ok":false,"error_code":429,"description":"Too Many Requests: retry after {retry_after}","parameters":{{"retry_after":{retry_after}}}}}"#
        )
    );
}

/// A fake enforcing Telegram's real limits.
async fn strict_fake() -> FakeTelegram {
    FakeTelegram::start_with(
        TOKEN,
        FakeConfig {
            rate_limits: Some(RateLimits::telegram()),
            ..FakeConfig::default()
        },
    )
    .await
}

#[tokio::test]
async fn strict_limits_answer_the_servers_429_envelope() {
    let fake = strict_fake().await;
    let http = reqwest::Client::new();
    let send = || {
        http.post(fake.method_url("sendMessage"))
            .json(&serde_json::json!({"chat_id": USER_ID, "text": "x"}))
            .send()
    };
    assert_eq!(send().await.unwrap().status(), 200);
    let r = send().await.unwrap();
    assert_429_envelope(r, 1).await;
    let v = fake.rate_violations();
    assert_eq!(v.len(), 1);
    assert_eq!(
        (v[0].scope, v[0].chat_id, v[0].retry_after),
        (RateScope::Chat, USER_ID, 1)
    );
    let calls = fake.calls_of("sendMessage");
    assert_eq!(v[0].at, calls[1].received_at, "counted when it arrived");
    assert!(calls[1].fault.is_none());
    assert_eq!(
        fake.delivered_messages().len(),
        1,
        "a refused send delivers nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_that_keeps_every_window_gets_no_429_over_http() {
    // Bursts of 30 concurrent sends, each a window after the previous one was answered (so a
    // window after it arrived, whatever the way to the server took).
    let fake = strict_fake().await;
    let bot = fake.bot();
    let mut answered = Instant::now() - Duration::from_secs(1);
    for burst in 0..3i64 {
        tokio::time::sleep_until(answered + Duration::from_secs(1)).await;
        let sends = (0..30).map(|k| {
            bot.send_message(ChatId(USER_ID + burst * 30 + k), "x")
                .send()
        });
        for result in futures::future::join_all(sends).await {
            result.expect("within every window");
        }
        answered = Instant::now();
    }
    // One more right after the last burst is one too many in its window.
    let err = bot
        .send_message(ChatId(OTHER_USER_ID), "x")
        .await
        .unwrap_err();
    assert!(matches!(err, RequestError::RetryAfter(_)), "{err:?}");
    let v = fake.rate_violations();
    assert_eq!((v.len(), v[0].scope), (1, RateScope::Global));
    assert_eq!(fake.stats().messages_delivered, 90);
}

#[tokio::test]
async fn strict_limits_count_albums_and_record_violations() {
    // One request per 200 ms per chat, 20 per 12 s per group, 30 per 200 ms overall.
    let limits = RateLimits::telegram().scaled(0.2);
    let fake = FakeTelegram::start_with(
        TOKEN,
        FakeConfig {
            rate_limits: Some(limits.clone()),
            ..FakeConfig::default()
        },
    )
    .await;
    let bot = fake.bot();

    bot.send_message(ChatId(USER_ID), "1").await.expect("first");
    let err = bot.send_message(ChatId(USER_ID), "2").await.unwrap_err();
    assert!(
        matches!(err, RequestError::RetryAfter(s) if s.seconds() == 1),
        "{err:?}"
    );
    let v = fake.rate_violations();
    assert_eq!(
        (v.len(), v[0].scope, v[0].chat_id),
        (1, RateScope::Chat, USER_ID)
    );
    // Waiting out the window is exactly what the sender must do (a timing test).
    tokio::time::sleep(limits.per_chat_window).await;
    bot.send_message(ChatId(USER_ID), "2")
        .await
        .expect("after the window");

    // An album of 3 is one request in its chat: the next send may follow one window later.
    let docs = |n: usize| -> Vec<InputMedia> {
        (0..n)
            .map(|_| {
                InputMedia::Document(InputMediaDocument::new(
                    InputFile::memory(&b"%PDF"[..]).file_name("r.pdf"),
                ))
            })
            .collect()
    };
    bot.send_media_group(ChatId(SUPERGROUP_ID), docs(3))
        .await
        .expect("album");
    let err = bot
        .send_message(ChatId(SUPERGROUP_ID), "x")
        .await
        .unwrap_err();
    assert!(matches!(err, RequestError::RetryAfter(_)), "{err:?}");
    tokio::time::sleep(limits.per_chat_window).await;
    bot.send_message(ChatId(SUPERGROUP_ID), "x")
        .await
        .expect("one window after the album");

    // The group window: 20 messages per window, albums counted per item.
    fake.set_rate_limits(Some(RateLimits {
        per_chat_window: Duration::ZERO,
        ..RateLimits::telegram()
    }));
    bot.send_media_group(ChatId(BASIC_GROUP_ID), docs(10))
        .await
        .unwrap();
    bot.send_media_group(ChatId(BASIC_GROUP_ID), docs(10))
        .await
        .unwrap();
    let err = bot
        .send_message(ChatId(BASIC_GROUP_ID), "21st")
        .await
        .unwrap_err();
    assert!(
        matches!(err, RequestError::RetryAfter(s) if s.seconds() >= 59),
        "{err:?}"
    );
    let last = fake.rate_violations().pop().unwrap();
    assert_eq!((last.scope, last.messages), (RateScope::Group, 1));
    assert_eq!(fake.stats().rate_violations, 3);
}

// ----- answer delay -------------------------------------------------------------------------

#[tokio::test]
async fn an_answer_delay_delivers_at_once_and_answers_later() {
    const DELAY: Duration = Duration::from_millis(400);
    let fake = FakeTelegram::start_with(
        TOKEN,
        FakeConfig {
            answer_delay: DELAY,
            ..FakeConfig::default()
        },
    )
    .await;
    let http = reqwest::Client::new();
    let url = fake.method_url("sendMessage");
    let started = Instant::now();
    let send = tokio::spawn(
        http.post(&url)
            .json(&serde_json::json!({"chat_id": USER_ID, "text": "late"}))
            .send(),
    );
    // Recorded and delivered long before the answer.
    fake.wait_for_calls("sendMessage", 1, DELAY / 2)
        .await
        .expect("processed before the answer");
    assert_eq!(fake.delivered_messages().len(), 1);
    assert!(!send.is_finished());
    let r = send.await.unwrap().unwrap();
    assert_eq!(r.status(), 200);
    assert!(started.elapsed() >= DELAY, "{:?}", started.elapsed());

    // Only sends wait: getMe answers at once.
    let started = Instant::now();
    fake.bot().get_me().await.unwrap();
    assert!(started.elapsed() < DELAY / 2, "{:?}", started.elapsed());

    // A client that gives up before the answer does not undo the delivery.
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let err = impatient
        .post(&url)
        .json(&serde_json::json!({"chat_id": USER_ID + 1, "text": "gone"}))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    assert!(fake.sends_to(USER_ID + 1)[0].is_ok());
    assert_eq!(fake.delivered_messages().len(), 2);

    // set_answer_delay changes it at run time; a Fault::Delay on one chat replaces it there.
    fake.set_answer_delay(Duration::ZERO);
    fake.inject(FaultRule::new(Fault::Delay(DELAY)).chat(USER_ID + 2));
    let started = Instant::now();
    fake.bot()
        .send_message(ChatId(USER_ID), "quick")
        .await
        .unwrap();
    assert!(started.elapsed() < DELAY / 2, "{:?}", started.elapsed());
    let started = Instant::now();
    fake.bot()
        .send_message(ChatId(USER_ID + 2), "slow")
        .await
        .unwrap();
    assert!(started.elapsed() >= DELAY, "{:?}", started.elapsed());
}

#[test]
fn html_parser_matches_tdlib() {
    // Error cases from TDLib's test/message_entities.cpp (parse_html).
    let errors = [
        ("🏟 🏟&lt;<abacaba", "Unclosed start tag at byte offset 13"),
        (
            "🏟 🏟&lt;<abac aba>",
            "Unsupported start tag \"abac\" at byte offset 13",
        ),
        (
            "🏟 🏟&lt;<i   =aba>",
            "Empty attribute name in the tag \"i\" at byte offset 13",
        ),
        (
            "🏟 🏟&lt;<i    aba>",
            "Can't find end tag corresponding to start tag \"i\"",
        ),
        (
            "🏟 🏟&lt;<i    aba  =  ",
            "Unclosed start tag \"i\" at byte offset 13",
        ),
        (
            "🏟 🏟&lt;<i    aba  =  190azAz-.,",
            "Unexpected end of name token at byte offset 27",
        ),
        (
            "🏟 🏟&lt;<i    aba  =  \"&lt;&gt;&quot;>",
            "Unclosed start tag at byte offset 13",
        ),
        ("🏟 🏟&lt;</", "Unexpected end tag at byte offset 13"),
        ("🏟 🏟&lt;<b></b></", "Unexpected end tag at byte offset 20"),
        ("🏟 🏟&lt;<i>a</i   ", "Unclosed end tag at byte offset 17"),
        (
            "🏟 🏟&lt;<i>a</em   >",
            "Unmatched end tag at byte offset 17, expected \"</i>\", found \"</em>\"",
        ),
        (
            "&#57311;",
            "Text contains invalid Unicode characters after decoding HTML entities, check for unmatched surrogate code units",
        ),
        ("a < b", "Unsupported start tag \"\" at byte offset 2"),
        (
            "<span>x</span>",
            "Tag \"span\" must have class \"tg-spoiler\" at byte offset 0",
        ),
        (
            "<tg-emoji emoji-id=\"x\">y</tg-emoji>",
            "Invalid custom emoji identifier specified",
        ),
        ("<br>", "Unsupported start tag \"br\" at byte offset 0"),
    ];
    for (html, detail) in errors {
        assert_eq!(visible_text_lenient(html), Err(detail.to_owned()), "{html}");
    }
    // Accepted inputs and their visible text.
    let ok = [
        ("", ""),
        ("<b>Sales</b> &amp; <i>KPIs</i>", "Sales & KPIs"),
        ("🏟 🏟<i>🏟 &lt🏟</i>", "🏟 🏟🏟 <🏟"),
        ("🏟 🏟&lt;<i>🏟 🏟&lt;</>", "🏟 🏟<🏟 🏟<"),
        (
            "<a href=\"https://superset.example.com/r/1?a=1&amp;b=2\">open</a>",
            "open",
        ),
        (
            "<span class=\"tg-spoiler\">s</span><tg-spoiler>t</tg-spoiler>",
            "st",
        ),
        (
            "<pre><code class=\"language-sql\">SELECT 1</code></pre>",
            "SELECT 1",
        ),
        ("<blockquote expandable>q</blockquote>", "q"),
        ("<B>upper</B> 1 &gt; 0 &#65;&#x42;", "upper 1 > 0 AB"),
        ("a > b", "a > b"),
    ];
    for (html, text) in ok {
        assert_eq!(visible_text(html), Ok(text.to_owned()), "{html}");
    }
    // TDLib keeps an unescaped or unknown "&" literally; the fake's strict default refuses it.
    assert_eq!(
        visible_text_lenient("&ge;&lt;&gt;&amp;&quot;&laquo;&#12345678; AT&T"),
        Ok("&ge;<>&\"&laquo;&#12345678; AT&T".to_owned())
    );
    assert!(visible_text("AT&T").unwrap_err().contains("byte offset 2"));

    // Entities in UTF-16 offsets, pre+code language merged.
    let parsed = parse_html(
        "😀 <b>bold</b> <pre><code class=\"language-sql\">q</code></pre>",
        true,
    )
    .unwrap();
    assert_eq!(parsed.text, "😀 bold q");
    assert_eq!(
        parsed.entities[0],
        serde_json::json!({"type":"bold","offset":3,"length":4})
    );
    assert_eq!(
        parsed.entities[1],
        serde_json::json!({"type":"pre","offset":8,"length":1,"language":"sql"})
    );
    assert_eq!(utf16_len("😀a"), 3);
}

#[tokio::test]
async fn wait_for_times_out_with_a_useful_message() {
    let fake = FakeTelegram::start(TOKEN).await;
    fake.bot().get_me().await.unwrap();
    let err = fake
        .wait_for(|calls| calls.len() > 5, Duration::from_millis(50))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("1 calls recorded") && text.contains("getMe"),
        "{text}"
    );
    fake.shutdown().await;
}
