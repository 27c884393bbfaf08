use super::*;
use std::time::UNIX_EPOCH;

use base64::Engine as _;
use reqwest::StatusCode;

use super::error::{ERROR_BODY_QUOTE_CHARS, error_body, status_error};
use super::token::{FALLBACK_TOKEN_LIFETIME, gateway_base, jwt_claims, token_lifetime};

fn jwt(payload: &str) -> String {
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!(
        "{}.{}.c2lnbmF0dXJl",
        engine.encode(r#"{"alg":"HS256","typ":"JWT"}"#),
        engine.encode(payload)
    )
}

#[test]
fn error_bodies_in_all_three_formats() {
    let gateway =
        br#"{"error_type":"column_already_exists","error_message":"column name already exists"}"#;
    assert_eq!(
        error_body(gateway),
        (
            Some("column_already_exists".to_owned()),
            "column name already exists".to_owned()
        )
    );
    assert_eq!(
        error_body(br#"{"error_msg":"Permission denied."}"#),
        (None, "Permission denied.".to_owned())
    );
    assert_eq!(
        error_body(br#"{"detail":"Invalid token"}"#),
        (None, "Invalid token".to_owned())
    );
    assert_eq!(
        error_body(br#"{"detail":{"field":["bad"]}}"#).1,
        r#"{"field":["bad"]}"#
    );
    // The first non-empty field wins; an empty one falls through.
    assert_eq!(
        error_body(br#"{"error_message":"","error_msg":"params invalid"}"#).1,
        "params invalid"
    );
}

#[test]
fn error_bodies_fall_back_to_the_truncated_raw_body() {
    assert_eq!(error_body(b""), (None, String::new()));
    assert_eq!(
        error_body(b"  <html>Bad Gateway</html>\n").1,
        "<html>Bad Gateway</html>"
    );
    assert_eq!(error_body(br#"{"other":1}"#).1, r#"{"other":1}"#);
    let long = "я".repeat(1000);
    let quoted = error_body(long.as_bytes()).1;
    assert_eq!(quoted.chars().count(), ERROR_BODY_QUOTE_CHARS + 1);
    assert!(quoted.ends_with('…'));
}

#[test]
fn statuses_map_to_variants() {
    let what = "GET rows/";
    let error = status_error(
        StatusCode::NOT_FOUND,
        None,
        br#"{"error_message":"row _id not exits"}"#,
        what,
    );
    assert!(
        matches!(&error, SeaTableError::NotFound { message } if message == "GET rows/: row _id not exits"),
        "{error:?}"
    );
    let error = status_error(
        StatusCode::FORBIDDEN,
        None,
        br#"{"error_message":"invalid token"}"#,
        what,
    );
    assert!(matches!(
        error,
        SeaTableError::Unauthorized { status: 403, .. }
    ));
    let error = status_error(StatusCode::UNAUTHORIZED, None, b"", what);
    assert!(
        matches!(&error, SeaTableError::Unauthorized { status: 401, message } if message == "GET rows/: Unauthorized")
    );
    let error = status_error(
        StatusCode::TOO_MANY_REQUESTS,
        Some(Duration::from_secs(3)),
        b"",
        what,
    );
    assert!(matches!(
        error,
        SeaTableError::RateLimited { retry_after: Some(wait) } if wait == Duration::from_secs(3)
    ));
    let error = status_error(StatusCode::BAD_GATEWAY, None, b"<html>", what);
    assert!(matches!(error, SeaTableError::Server { status: 502, .. }));
    assert!(error.is_transient());
    let error = status_error(
        StatusCode::BAD_REQUEST,
        None,
        br#"{"error_message":"no such column: pi"}"#,
        "POST sql/",
    );
    assert!(
        matches!(&error, SeaTableError::Api { status: 400, message, .. } if message.ends_with("no such column: pi"))
    );
    assert!(!error.is_transient());
}

#[test]
fn retry_after_is_read_in_seconds() {
    let mut headers = HeaderMap::new();
    assert_eq!(retry_after(&headers), None);
    headers.insert("x-ratelimit-reset", HeaderValue::from_static("1042"));
    assert_eq!(retry_after(&headers), None);
    headers.insert(RETRY_AFTER, HeaderValue::from_static(" 7 "));
    assert_eq!(retry_after(&headers), Some(Duration::from_secs(7)));
    headers.insert(
        RETRY_AFTER,
        HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
    );
    assert_eq!(retry_after(&headers), None);
}

#[test]
fn jwt_exp_is_decoded_without_verification() {
    let token = jwt(r#"{"exp":1752326850,"dtable_uuid":"x","permission":"rw"}"#);
    let claims = jwt_claims(&token).unwrap();
    assert_eq!(claims["exp"], 1_752_326_850);
    assert_eq!(claims["permission"], "rw");
    // Padded base64 is accepted too.
    let padded = format!(
        "h.{}.s",
        base64::engine::general_purpose::URL_SAFE.encode(r#"{"exp":1}"#)
    );
    assert_eq!(jwt_claims(&padded).unwrap()["exp"], 1);
    assert_eq!(jwt_claims("not-a-jwt"), None);
    assert_eq!(jwt_claims("a.!!!.c"), None);
    assert_eq!(jwt_claims(&jwt("[1,2]")), None);
}

#[test]
fn token_lifetime_uses_exp_or_the_fallback() {
    let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
    assert_eq!(
        token_lifetime(Some(&json!(1_000_000 + 259_200)), now),
        Duration::from_secs(259_200)
    );
    assert_eq!(
        token_lifetime(Some(&json!(1_000_100.5)), now),
        Duration::from_secs_f64(100.5)
    );
    assert_eq!(token_lifetime(None, now), FALLBACK_TOKEN_LIFETIME);
    assert_eq!(
        token_lifetime(Some(&json!("soon")), now),
        FALLBACK_TOKEN_LIFETIME
    );
    assert_eq!(
        token_lifetime(Some(&json!(999_999)), now),
        FALLBACK_TOKEN_LIFETIME
    );
    assert_eq!(
        token_lifetime(Some(&json!(1e18)), now),
        Duration::from_secs(365 * 86_400)
    );
}

#[test]
fn gateway_urls() {
    let server = Url::parse("https://seatable.example.com/").unwrap();
    let base = gateway_base(
        &server,
        Some("https://cloud.seatable.io/api-gateway/"),
        Some(true),
        "4cacfb1a-7d69",
    )
    .unwrap();
    assert_eq!(
        base.as_str(),
        "https://cloud.seatable.io/api-gateway/api/v2/dtables/4cacfb1a-7d69/"
    );
    // A legacy dtable_server (no use_api_gateway) is not used.
    let base = gateway_base(
        &server,
        Some("https://seatable.example.com/dtable-server/"),
        None,
        "u",
    )
    .unwrap();
    assert_eq!(
        base.as_str(),
        "https://seatable.example.com/api-gateway/api/v2/dtables/u/"
    );
    // Without a trailing slash in dtable_server.
    let base = gateway_base(
        &server,
        Some("http://127.0.0.1:1/api-gateway"),
        Some(true),
        "u",
    )
    .unwrap();
    assert_eq!(
        base.as_str(),
        "http://127.0.0.1:1/api-gateway/api/v2/dtables/u/"
    );
    assert!(gateway_base(&server, None, Some(true), " ").is_err());

    let url = gateway_url(
        &base,
        &["rows", "a/b?c"],
        &[("table_name", "t chats".to_owned())],
    )
    .unwrap();
    assert_eq!(
        url.as_str(),
        "http://127.0.0.1:1/api-gateway/api/v2/dtables/u/rows/a%2Fb%3Fc/?table_name=t+chats"
    );
}

#[test]
fn row_helpers_read_cells_leniently() {
    let row: Row = serde_json::from_value(json!({
        "_id": "Bko1e60YT-egit2SljWSZA",
        "Name": "sales",
        "email": "",
        "imap_port": 993,
        "port_text": " 1143 ",
        "disabled": true,
        "is_locked": 1,
        "mailboxes": [{"row_id": "r1", "display_value": "a"}, {"row_id": "r2", "display_value": null}],
        "legacy": ["r3"],
        "empty": null,
    }))
    .unwrap();
    assert_eq!(row.id(), Some("Bko1e60YT-egit2SljWSZA"));
    assert_eq!(row.text("Name"), Some("sales"));
    assert_eq!(row.text("email"), None);
    assert_eq!(row.text("imap_port"), None);
    assert_eq!(row.text("nope"), None);
    assert_eq!(row.number("imap_port"), Some(993.0));
    assert_eq!(row.number("port_text"), Some(1143.0));
    assert_eq!(row.number("Name"), None);
    assert!(row.bool("disabled"));
    assert!(!row.bool("is_locked"));
    assert!(!row.bool("empty"));
    assert_eq!(row.link_ids("mailboxes"), ["r1", "r2"]);
    assert_eq!(row.link_ids("legacy"), ["r3"]);
    assert!(row.link_ids("empty").is_empty());
    assert!(row.link_ids("Name").is_empty());
}

#[test]
fn debug_hides_secrets() {
    let row: Row = serde_json::from_value(json!({
        "imap_password": "hunter2", "Api_Token": "tok", "imap_login": "box@example.com",
        "client_secret": null,
    }))
    .unwrap();
    let debug = format!("{row:?}");
    assert!(
        !debug.contains("hunter2") && !debug.contains("tok\""),
        "{debug}"
    );
    assert!(debug.contains("box@example.com"), "{debug}");

    let client = SeaTableClient::new(
        "https://cloud.seatable.io",
        SecretString::from("api-token-value"),
        reqwest::Client::new(),
        Arc::new(Metrics::new()),
    )
    .unwrap();
    let debug = format!("{client:?}");
    assert!(!debug.contains("api-token-value"), "{debug}");
    assert!(debug.contains("cloud.seatable.io"), "{debug}");
    let header = bearer("secret-jwt").unwrap();
    assert!(header.is_sensitive());
    assert!(!format!("{header:?}").contains("secret-jwt"));
}

#[test]
fn bad_configuration_is_rejected_up_front() {
    let build = |url: &str, token: &str| {
        SeaTableClient::new(
            url,
            SecretString::from(token.to_owned()),
            reqwest::Client::new(),
            Arc::new(Metrics::new()),
        )
    };
    assert!(matches!(
        build("cloud.seatable.io", "t"),
        Err(SeaTableError::Config { .. })
    ));
    assert!(matches!(
        build("ftp://x", "t"),
        Err(SeaTableError::Config { .. })
    ));
    assert!(matches!(
        build("https://x", ""),
        Err(SeaTableError::Config { .. })
    ));
    let error = build("https://x", "bad\ntoken").unwrap_err().to_string();
    assert!(!error.contains("bad"), "{error}");
    let client = build("https://x/seatable", "t").unwrap();
    assert_eq!(client.inner.server.as_str(), "https://x/seatable/");
}

#[test]
fn link_columns_know_their_other_table() {
    let column: Column = serde_json::from_value(json!({
        "key": "Cp51", "name": "mailboxes", "type": "link",
        "data": {"link_id": "UAmR", "table_id": "0000", "other_table_id": "0001"}
    }))
    .unwrap();
    assert_eq!(column.link_id(), Some("UAmR"));
    assert_eq!(column.linked_table_id("0000"), Some("0001"));
    assert_eq!(column.linked_table_id("0001"), Some("0000"));
    let text = Column {
        key: "0000".into(),
        name: "Name".into(),
        column_type: "text".into(),
        data: None,
    };
    assert_eq!(text.linked_table_id("0000"), None);
}

#[test]
fn new_columns_serialise_as_the_api_expects() {
    assert_eq!(
        serde_json::to_value(NewColumn::new("phone", "text")).unwrap(),
        json!({"column_name": "phone", "column_type": "text"})
    );
    assert_eq!(
        serde_json::to_value(NewColumn::link("mailboxes", "users", "mailboxes")).unwrap(),
        json!({"column_name": "mailboxes", "column_type": "link",
               "column_data": {"table": "users", "other_table": "mailboxes"}})
    );
}
