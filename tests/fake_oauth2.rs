//! Self-tests of the fake OAuth2 authorization server (`tests/support/oauth2/`) over real HTTP
//! (reqwest), and of Dovecot's `passdb oauth2` ([`DovecotOptions::oauth2_introspection_url`])
//! driven by a raw IMAP client over a `tokio::net::TcpStream`.
//!
//! Needs Dovecot (`scripts/test-deps.sh`): `cargo nextest run --test fake_oauth2`.
//!
//! # What Dovecot 2.3.19 answers (observed here, `C:` client, `S:` server; `<IR>` the base64
//! initial response, `<caps>` its post-login capability list)
//!
//! XOAUTH2, initial response `base64("user=" U "\x01auth=Bearer " TOKEN "\x01\x01")`:
//! ```text
//! C: a1 AUTHENTICATE XOAUTH2 <IR>
//! S: a1 OK [CAPABILITY IMAP4rev1 SASL-IR … <caps>] Logged in
//! ```
//! (When the client sent `CAPABILITY` before logging in, Dovecot sends the list as an untagged
//! `* CAPABILITY …` line instead, and the tagged line is just `a1 OK Logged in`.)
//!
//! OAUTHBEARER (RFC 7628 §3.1), `base64("n,a=" U ",\x01host=127.0.0.1\x01port=" P
//! "\x01auth=Bearer " TOKEN "\x01\x01")`: the same `a1 OK [CAPABILITY …] Logged in`.
//!
//! Without an initial response (async-imap's way) the server first sends an empty challenge,
//! `+` and a space:
//! ```text
//! C: a1 AUTHENTICATE XOAUTH2
//! S: +␠
//! C: <IR>
//! S: a1 OK [CAPABILITY …] Logged in
//! ```
//!
//! A revoked, expired or unknown token, or one whose `username` is another mailbox
//! (`{"active":false}` or a user mismatch in the introspection answer):
//! ```text
//! C: a1 AUTHENTICATE XOAUTH2 <IR>
//! S: + eyJzdGF0dXMiOiI0MDEiLCJzY2hlbWVzIjoiYmVhcmVyIiwic2NvcGUiOiJtYWlsIn0=
//!      (= {"status":"401","schemes":"bearer","scope":"mail"})
//! C: (an empty line)
//! S: a1 NO [AUTHENTICATIONFAILED] Authentication failed.
//!
//! C: a1 AUTHENTICATE OAUTHBEARER <IR>
//! S: + eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIn0=
//!      (= {"status":"invalid_token"}, RFC 7628 §3.2.2)
//! C: AQ==            (base64 of "\x01", RFC 7628 §3.2.3)
//! S: a1 NO [AUTHENTICATIONFAILED] Authentication failed.
//! ```
//! The challenge comes at once; the tagged `NO` after `auth_failure_delay` (Dovecot's default
//! 2 s, measured 2.0 s; these tests set 0). Answering the challenge with any other line (`Zm9v`
//! to XOAUTH2, an empty line to OAUTHBEARER) ends in the same `NO`. Answering it with `*`
//! (RFC 3501 §6.2.2 cancel) ends at once in
//! ```text
//! S: a1 BAD Authentication aborted by client.
//! ```
//!
//! When the introspection endpoint itself fails (HTTP 5xx, or unreachable), there is no
//! challenge, and the `NO` also waits `auth_failure_delay`:
//! ```text
//! C: a1 AUTHENTICATE XOAUTH2 <IR>
//! S: a1 NO [UNAVAILABLE] Temporary authentication failure. [<hostname>:<yyyy-mm-dd hh:mm:ss>]
//! ```
//! So `[AUTHENTICATIONFAILED]` means "get a new token", `[UNAVAILABLE]` means "retry later
//! with the same one" (RFC 5530 response codes).
//!
//! A server without OAuth2 (the harness's default) advertises neither mechanism and answers
//! `a1 NO [ALERT] Unsupported authentication mechanism.` at once.
//!
//! Dovecot's auth penalty (anvil, per client IP, `src/auth/auth-penalty.c`; not configurable,
//! independent of `auth_failure_delay`): for 15 s after a failed login, the next
//! authentication from the same IP, successful or not, is held back 4 s before Dovecot even
//! looks at it (8 s after two failures with different tokens, up to 15 s). A client that
//! re-logs in with a fresh token right after a rejected one sees that 4 s delay. The tests
//! below therefore connect each session from its own loopback address (`127.0.0.N`), except
//! the one that measures the penalty.

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, ensure};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use support::dovecot::{Dovecot, DovecotOptions};
use support::oauth2::{
    ClientAuth, DEVICE_CODE_GRANT, DeviceOutcome, Endpoint, FakeOAuth2, JWT_BEARER_GRANT,
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

/// Upper bound for every network step.
const STEP: Duration = Duration::from_secs(15);
/// A little more than a protocol interval, so a poll is never early by rounding.
const MARGIN: Duration = Duration::from_millis(60);
/// The mailbox the tests log in as.
const USER: &str = "reports@test.local";

// ---------------------------------------------------------------------------------------------
// HTTP helpers
// ---------------------------------------------------------------------------------------------

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(STEP)
        .build()
        .expect("reqwest client")
}

/// An HTTP answer: status, headers and the body as JSON (`Value::Null` if not JSON).
struct Answer {
    status: u16,
    headers: HeaderMap,
    body: Value,
    text: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn str(&self, field: &str) -> &str {
        self.body[field]
            .as_str()
            .unwrap_or_else(|| panic!("no string {field:?} in {}", self.text))
    }

    /// An RFC 6749 §5.2 error with exactly `status` and `code`, and §5.1's headers.
    fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(
            (self.status, self.body["error"].as_str()),
            (status, Some(code)),
            "{}",
            self.text
        );
        assert!(self.body["error_description"].is_string(), "{}", self.text);
        self.assert_json_headers();
    }

    fn assert_ok(&self) {
        assert_eq!(self.status, 200, "{}", self.text);
        self.assert_json_headers();
    }

    fn assert_json_headers(&self) {
        assert_eq!(
            self.header("content-type"),
            Some("application/json; charset=utf-8")
        );
        assert_eq!(self.header("cache-control"), Some("no-store"));
        assert_eq!(self.header("pragma"), Some("no-cache"));
    }
}

async fn answer(resp: reqwest::Response) -> Answer {
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.expect("response body");
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    Answer {
        status,
        headers,
        body,
        text,
    }
}

async fn post_form(url: &str, params: &[(&str, &str)]) -> Answer {
    answer(http().post(url).form(params).send().await.expect("POST")).await
}

/// RFC 6749 §2.3.1: each half form-urlencoded, then base64 (reqwest's `basic_auth` skips the
/// first step).
fn basic(id: &str, secret: &str) -> String {
    let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    format!(
        "Basic {}",
        STANDARD.encode(format!("{}:{}", enc(id), enc(secret)))
    )
}

async fn post_form_basic(url: &str, id: &str, secret: &str, params: &[(&str, &str)]) -> Answer {
    let resp = http()
        .post(url)
        .header("authorization", basic(id, secret))
        .form(params)
        .send()
        .await
        .expect("POST");
    answer(resp).await
}

async fn post_raw(url: &str, content_type: &str, body: &str) -> Answer {
    let resp = http()
        .post(url)
        .header("content-type", content_type)
        .body(body.to_owned())
        .send()
        .await
        .expect("POST");
    answer(resp).await
}

async fn introspect(idp: &FakeOAuth2, token: &str) -> Answer {
    post_form(&idp.introspection_url(), &[("token", token)]).await
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// `grant_type=refresh_token&refresh_token=<token>` plus `extra`.
fn refresh_params<'a>(
    token: &'a str,
    extra: &[(&'static str, &'a str)],
) -> Vec<(&'static str, &'a str)> {
    let mut params = vec![("grant_type", "refresh_token"), ("refresh_token", token)];
    params.extend_from_slice(extra);
    params
}

/// A refresh grant of `token` with the client's credentials in the body (`client_secret` only
/// for a confidential client).
async fn refresh_in_body(url: &str, token: &str, client_id: &str, secret: Option<&str>) -> Answer {
    let mut auth = vec![("client_id", client_id)];
    auth.extend(secret.map(|secret| ("client_secret", secret)));
    post_form(url, &refresh_params(token, &auth)).await
}

// ---------------------------------------------------------------------------------------------
// /token: client authentication, request errors, refresh tokens
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn refresh_grant_with_body_and_basic_client_auth() {
    let idp = FakeOAuth2::start().await;
    // ':' '+' '&' '%' ' ' must survive §2.3.1's form-urlencoding inside Basic.
    let secret = "s3cr:t+&% x";
    idp.add_client("relay", Some(secret));
    let rt = idp.issue_refresh_token("relay", USER);

    let body = refresh_in_body(&idp.token_url(), &rt, "relay", Some(secret)).await;
    body.assert_ok();
    assert_eq!(body.str("token_type"), "Bearer");
    assert_eq!(body.body["expires_in"], json!(3599));
    assert_eq!(body.str("scope"), support::oauth2::DEFAULT_SCOPE);
    assert!(
        body.body.get("refresh_token").is_none(),
        "no rotation by default: {}",
        body.text
    );
    let at = body.str("access_token");
    assert_eq!(at.len(), support::oauth2::DEFAULT_ACCESS_TOKEN_LEN);
    assert!(idp.is_access_token_active(at));

    let basic = post_form_basic(&idp.token_url(), "relay", secret, &refresh_params(&rt, &[])).await;
    basic.assert_ok();
    assert_ne!(
        basic.str("access_token"),
        at,
        "every grant mints a new token"
    );

    // HTTP Basic plus client_id in the body is fine when they agree.
    post_form_basic(
        &idp.token_url(),
        "relay",
        secret,
        &refresh_params(&rt, &[("client_id", "relay")]),
    )
    .await
    .assert_ok();

    let reqs = idp.requests();
    assert_eq!(
        reqs.iter().map(|r| r.client_auth).collect::<Vec<_>>(),
        [ClientAuth::Body, ClientAuth::Basic, ClientAuth::Basic]
    );
    assert!(reqs.iter().all(|r| r.is_ok()
        && r.endpoint == Endpoint::Token
        && r.grant_type.as_deref() == Some("refresh_token")
        && r.client_id.as_deref() == Some("relay")
        && r.username.as_deref() == Some(USER)
        && r.refresh_token_used.as_deref() == Some(rt.as_str())
        && r.refresh_token_issued.is_none()));
    assert_eq!(reqs[0].access_token_issued.as_deref(), Some(at));
    // Debug is a summary: no secrets, no tokens.
    let debug = format!("{reqs:?}");
    assert!(!debug.contains(secret) && !debug.contains(&rt) && !debug.contains(at));
}

#[tokio::test]
async fn client_authentication_errors() {
    let idp = FakeOAuth2::start().await;
    idp.add_client("relay", Some("right"));
    idp.add_client("public", None);
    let rt = idp.issue_refresh_token("relay", USER);
    let prt = idp.issue_refresh_token("public", USER);
    let url = idp.token_url();

    // Unknown client, wrong and missing secret: 401 invalid_client; no challenge header when
    // the credentials came in the body.
    for extra in [
        &[("client_id", "nobody"), ("client_secret", "x")][..],
        &[("client_id", "relay"), ("client_secret", "wrong")],
        &[("client_id", "relay")],
    ] {
        let a = post_form(&url, &refresh_params(&rt, extra)).await;
        a.assert_error(401, "invalid_client");
        assert_eq!(a.header("www-authenticate"), None);
    }
    // Failed HTTP Basic: 401 with `WWW-Authenticate` (RFC 6749 §5.2).
    for (id, secret) in [("relay", "wrong"), ("nobody", "x")] {
        let a = post_form_basic(&url, id, secret, &refresh_params(&rt, &[])).await;
        a.assert_error(401, "invalid_client");
        assert_eq!(
            a.header("www-authenticate"),
            Some("Basic realm=\"fake-oauth2\"")
        );
    }
    // A public client must not present a secret (Microsoft: AADSTS700025)...
    let params = refresh_params(&prt, &[("client_id", "public"), ("client_secret", "x")]);
    post_form(&url, &params)
        .await
        .assert_error(401, "invalid_client");
    // ... and sends only its client_id.
    post_form(&url, &refresh_params(&prt, &[("client_id", "public")]))
        .await
        .assert_ok();
    // Two authentication methods at once (RFC 6749 §2.3): invalid_request.
    let params = refresh_params(&rt, &[("client_secret", "right")]);
    post_form_basic(&url, "relay", "right", &params)
        .await
        .assert_error(400, "invalid_request");
    // Basic user and body client_id disagree.
    let params = refresh_params(&rt, &[("client_id", "public")]);
    post_form_basic(&url, "relay", "right", &params)
        .await
        .assert_error(400, "invalid_request");
    // No client at all.
    post_form(&url, &refresh_params(&rt, &[]))
        .await
        .assert_error(400, "invalid_request");
    // A refresh token of another client.
    post_form(&url, &refresh_params(&rt, &[("client_id", "public")]))
        .await
        .assert_error(400, "invalid_grant");
}

#[tokio::test]
async fn malformed_token_requests() {
    let idp = FakeOAuth2::start().await;
    idp.add_client("relay", Some("s"));
    let rt = idp.issue_refresh_token("relay", USER);
    let url = idp.token_url();
    let auth = [("client_id", "relay"), ("client_secret", "s")];
    let with_auth = |p: &[(&'static str, &str)]| {
        let mut v: Vec<(&str, String)> = p.iter().map(|(k, v)| (*k, v.to_string())).collect();
        v.extend(auth.iter().map(|(k, v)| (*k, v.to_string())));
        v
    };
    let send = async |params: Vec<(&str, String)>| {
        let params: Vec<(&str, &str)> = params.iter().map(|(k, v)| (*k, v.as_str())).collect();
        post_form(&url, &params).await
    };

    send(with_auth(&[("grant_type", "password")]))
        .await
        .assert_error(400, "unsupported_grant_type");
    // The grant type is checked before the client.
    post_form(&url, &[("grant_type", "password"), ("client_id", "nobody")])
        .await
        .assert_error(400, "unsupported_grant_type");
    send(with_auth(&[("refresh_token", &rt)]))
        .await
        .assert_error(400, "invalid_request");
    send(with_auth(&[("grant_type", "refresh_token")]))
        .await
        .assert_error(400, "invalid_request");
    // An empty value counts as absent (RFC 6749 §3.2).
    send(with_auth(&[
        ("grant_type", "refresh_token"),
        ("refresh_token", ""),
    ]))
    .await
    .assert_error(400, "invalid_request");
    // A repeated parameter (§3.2).
    let body = format!(
        "grant_type=refresh_token&refresh_token={rt}&refresh_token={rt}&client_id=relay&client_secret=s"
    );
    post_raw(&url, "application/x-www-form-urlencoded", &body)
        .await
        .assert_error(400, "invalid_request");
    // Only application/x-www-form-urlencoded; a charset parameter is fine.
    let json_body = json!({"grant_type": "refresh_token", "refresh_token": rt,
                           "client_id": "relay", "client_secret": "s"});
    post_raw(&url, "application/json", &json_body.to_string())
        .await
        .assert_error(400, "invalid_request");
    let body =
        format!("grant_type=refresh_token&refresh_token={rt}&client_id=relay&client_secret=s");
    post_raw(
        &url,
        "application/x-www-form-urlencoded; charset=UTF-8",
        &body,
    )
    .await
    .assert_ok();
    // GET is not a token request.
    let get = http().get(&url).send().await.unwrap();
    assert_eq!(get.status().as_u16(), 405);

    // Injected outage: 503 temporarily_unavailable, then normal again.
    idp.fail_next_token_requests(1);
    let params = with_auth(&[("grant_type", "refresh_token"), ("refresh_token", &rt)]);
    send(params.clone())
        .await
        .assert_error(503, "temporarily_unavailable");
    send(params).await.assert_ok();
    let outcomes: Vec<_> = idp.requests().iter().map(|r| r.outcome.clone()).collect();
    assert_eq!(
        outcomes,
        [
            "unsupported_grant_type",
            "unsupported_grant_type",
            "invalid_request",
            "invalid_request",
            "invalid_request",
            "invalid_request",
            "invalid_request",
            "ok",
            "temporarily_unavailable",
            "ok"
        ]
    );
}

#[tokio::test]
async fn refresh_token_revocation_scope_and_rotation() {
    let idp = FakeOAuth2::start().await;
    idp.add_client("relay", Some("s"));
    let rt = idp.issue_refresh_token_with_scope("relay", USER, "mail offline_access");
    let url = idp.token_url();
    let refresh = async |token: &str, scope: Option<&str>| {
        let mut params = refresh_params(token, &[("client_id", "relay"), ("client_secret", "s")]);
        params.extend(scope.map(|scope| ("scope", scope)));
        post_form(&url, &params).await
    };

    // A narrower scope is fine (RFC 6749 §6), a wider one is not.
    let narrow = refresh(&rt, Some("mail")).await;
    narrow.assert_ok();
    assert_eq!(narrow.str("scope"), "mail");
    refresh(&rt, Some("mail calendar"))
        .await
        .assert_error(400, "invalid_scope");
    refresh("1//never-issued", None)
        .await
        .assert_error(400, "invalid_grant");

    // Rotation (Microsoft): a new refresh token each time, the used one is dead.
    idp.set_rotation(true);
    let first = refresh(&rt, None).await;
    first.assert_ok();
    let rt2 = first.str("refresh_token").to_owned();
    assert_ne!(rt2, rt);
    assert!(!idp.is_refresh_token_valid(&rt));
    refresh(&rt, None).await.assert_error(400, "invalid_grant");
    let second = refresh(&rt2, None).await;
    second.assert_ok();
    let rt3 = second.str("refresh_token").to_owned();
    assert_eq!(second.str("scope"), "mail offline_access");
    let last = idp.requests().pop().unwrap();
    assert_eq!(last.refresh_token_used.as_deref(), Some(rt2.as_str()));
    assert_eq!(last.refresh_token_issued.as_deref(), Some(rt3.as_str()));

    // Revocation (user removed consent, password change...).
    idp.revoke_refresh_token(&rt3);
    let revoked = refresh(&rt3, None).await;
    revoked.assert_error(400, "invalid_grant");
    assert_eq!(
        revoked.str("error_description"),
        "Token has been expired or revoked."
    );
}

// ---------------------------------------------------------------------------------------------
// Access tokens and introspection
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn access_token_expiry_revocation_and_introspection() {
    let idp = FakeOAuth2::start().await;
    idp.add_client("relay", Some("s"));
    idp.set_access_token_lifetime(1);
    let rt = idp.issue_refresh_token("relay", USER);
    let got = refresh_in_body(&idp.token_url(), &rt, "relay", Some("s")).await;
    let issued = Instant::now();
    got.assert_ok();
    assert_eq!(got.body["expires_in"], json!(1));
    let at = got.str("access_token").to_owned();

    let live = introspect(&idp, &at).await;
    live.assert_ok();
    let b = &live.body;
    assert_eq!(b["active"], json!(true));
    assert_eq!(b["username"], json!(USER));
    assert_eq!(b["email"], json!(USER));
    assert_eq!(b["client_id"], json!("relay"));
    assert_eq!(b["token_type"], json!("Bearer"));
    assert_eq!(b["scope"], json!(support::oauth2::DEFAULT_SCOPE));
    let exp = b["exp"].as_i64().unwrap();
    assert!((exp - unix_now() - 1).abs() <= 1, "exp {exp}");

    // The token's lifetime is the thing under test: wait it out.
    tokio::time::sleep_until(issued + Duration::from_secs(1) + MARGIN).await;
    let expired = introspect(&idp, &at).await;
    expired.assert_ok();
    assert_eq!(expired.body, json!({"active": false}));
    assert!(!idp.is_access_token_active(&at));

    idp.set_access_token_lifetime(3599);
    let a1 = idp.issue_access_token("relay", USER);
    let a2 = idp.issue_access_token("relay", "other@test.local");
    idp.revoke_access_tokens(USER);
    assert_eq!(introspect(&idp, &a1).await.body, json!({"active": false}));
    assert_eq!(introspect(&idp, &a2).await.body["active"], json!(true));
    let a3 = idp.issue_access_token("relay", USER);
    assert_eq!(
        introspect(&idp, &a3).await.body["active"],
        json!(true),
        "issued after the revocation"
    );
    assert_eq!(
        introspect(&idp, "at.unknown").await.body,
        json!({"active": false})
    );
    post_form(&idp.introspection_url(), &[("client_id", "x")])
        .await
        .assert_error(400, "invalid_request");
    assert_eq!(idp.introspections(), 7);
    let log = idp.introspection_log();
    assert_eq!(
        log.iter().map(|i| i.active).collect::<Vec<_>>(),
        [true, false, false, true, true, false, false]
    );
}

// ---------------------------------------------------------------------------------------------
// Device flow (RFC 8628)
// ---------------------------------------------------------------------------------------------

async fn device_code(idp: &FakeOAuth2, client: &str, scope: &str) -> Answer {
    post_form(
        &idp.device_authorization_url(),
        &[("client_id", client), ("scope", scope)],
    )
    .await
}

async fn poll(idp: &FakeOAuth2, client: &str, device_code: &str) -> Answer {
    post_form(
        &idp.token_url(),
        &[
            ("grant_type", DEVICE_CODE_GRANT),
            ("device_code", device_code),
            ("client_id", client),
        ],
    )
    .await
}

/// The `device_code` of a new device authorization of `client` (panics without one).
async fn new_device_code(idp: &FakeOAuth2, client: &str, scope: &str) -> String {
    device_code(idp, client, scope)
        .await
        .str("device_code")
        .to_owned()
}

/// A poll that must be answered 400 `error` (RFC 8628 §3.5).
async fn poll_error(idp: &FakeOAuth2, client: &str, device_code: &str, error: &str) {
    poll(idp, client, device_code)
        .await
        .assert_error(400, error);
}

#[tokio::test]
async fn device_flow_pending_then_approved() {
    let idp = FakeOAuth2::start().await;
    idp.add_client("tv", None);
    idp.set_device_interval(1);
    idp.script_device_flow(
        2,
        DeviceOutcome::Approve {
            username: USER.into(),
        },
    );
    let dc = device_code(&idp, "tv", "https://mail.google.com/").await;
    let mut last = Instant::now();
    dc.assert_ok();
    let b = &dc.body;
    assert_eq!(b["interval"], json!(1));
    assert_eq!(b["expires_in"], json!(900));
    assert_eq!(b["verification_uri"], json!(idp.verification_uri()));
    assert!(
        b.get("verification_url").is_none(),
        "Microsoft's shape: {b}"
    );
    let user_code = dc.str("user_code");
    assert_eq!(user_code.len(), 9);
    assert!(dc.str("message").contains(user_code));
    let code = dc.str("device_code").to_owned();

    let interval = Duration::from_secs(1) + MARGIN;
    let mut outcomes = Vec::new();
    for _ in 0..3 {
        // RFC 8628 §3.5: wait `interval` before each poll.
        tokio::time::sleep_until(last + interval).await;
        let a = poll(&idp, "tv", &code).await;
        last = Instant::now();
        outcomes.push(a.body["error"].as_str().unwrap_or("ok").to_owned());
        if a.status == 200 {
            a.assert_ok();
            assert_eq!(a.str("scope"), "https://mail.google.com/");
            let at = a.str("access_token");
            let rt = a.str("refresh_token");
            assert!(idp.is_refresh_token_valid(rt));
            assert_eq!(introspect(&idp, at).await.body["username"], json!(USER));
        } else {
            a.assert_error(400, "authorization_pending");
        }
    }
    assert_eq!(
        outcomes,
        ["authorization_pending", "authorization_pending", "ok"]
    );
    // Used up.
    tokio::time::sleep_until(last + interval).await;
    poll_error(&idp, "tv", &code, "invalid_grant").await;

    let reqs = idp.requests();
    assert_eq!(reqs[0].endpoint, Endpoint::DeviceAuthorization);
    assert_eq!(reqs[0].client_auth, ClientAuth::Body);
    let polls: Vec<_> = reqs[1..].iter().map(|r| r.outcome.as_str()).collect();
    assert_eq!(
        polls,
        [
            "authorization_pending",
            "authorization_pending",
            "ok",
            "invalid_grant"
        ]
    );
    assert_eq!(reqs[3].username.as_deref(), Some(USER));
    assert!(reqs[3].refresh_token_issued.is_some());
}

#[tokio::test]
async fn device_flow_slow_down_adds_five_seconds() {
    let idp = FakeOAuth2::start().await;
    idp.add_client("tv", None);
    idp.set_device_interval(1);
    // Four device codes, issued together, polled on different schedules.
    let mut codes = Vec::new();
    for _ in 0..3 {
        codes.push(new_device_code(&idp, "tv", "mail").await);
    }
    // `d`: a busy server answers slow_down to its first poll although it kept the interval.
    idp.script_slow_down(1);
    idp.script_device_flow(
        0,
        DeviceOutcome::Approve {
            username: USER.into(),
        },
    );
    codes.push(new_device_code(&idp, "tv", "mail").await);
    let t0 = Instant::now();
    let [a, b, c, d] = &codes[..] else {
        unreachable!()
    };

    // The first poll must also wait `interval` after the device authorization response.
    poll_error(&idp, "tv", a, "slow_down").await;
    poll_error(&idp, "tv", b, "slow_down").await;
    let b_polled = Instant::now();
    // `c` is polled on time: pending.
    tokio::time::sleep_until(t0 + Duration::from_secs(1) + MARGIN).await;
    poll_error(&idp, "tv", c, "authorization_pending").await;
    // `a` after the old interval: still too soon, its interval is now 1 + 5 s.
    poll_error(&idp, "tv", a, "slow_down").await;
    // `d` kept the interval, and gets slow_down all the same.
    poll_error(&idp, "tv", d, "slow_down").await;
    let d_polled = Instant::now();
    // `b` after 6 s: on time again (exactly +5 s, not more).
    tokio::time::sleep_until(b_polled + Duration::from_secs(6) + MARGIN).await;
    poll_error(&idp, "tv", b, "authorization_pending").await;
    // `c` still has its 1 s interval.
    poll_error(&idp, "tv", c, "authorization_pending").await;
    // `d` 6 s after its slow_down: approved (the forced slow_down was no pending poll).
    tokio::time::sleep_until(d_polled + Duration::from_secs(6) + MARGIN).await;
    poll(&idp, "tv", d).await.assert_ok();
}

#[tokio::test]
async fn device_flow_denied_expired_and_errors() {
    let idp = FakeOAuth2::start().await;
    idp.add_client("tv", None);
    idp.add_client("other", None);
    idp.add_client("confidential", Some("s"));
    idp.set_device_interval(1);

    idp.script_device_flow(0, DeviceOutcome::Deny);
    let denied = new_device_code(&idp, "tv", "mail").await;
    idp.script_device_flow(1, DeviceOutcome::Expire);
    let expiring = new_device_code(&idp, "tv", "mail").await;
    // Pending for good: `expired_token` once `expires_in` has passed.
    idp.script_device_flow(u32::MAX, DeviceOutcome::Deny);
    idp.set_device_code_lifetime(2);
    let short = device_code(&idp, "tv", "mail").await;
    assert_eq!(short.body["expires_in"], json!(2));
    let short = short.str("device_code").to_owned();
    let t0 = Instant::now();

    tokio::time::sleep_until(t0 + Duration::from_secs(1) + MARGIN).await;
    poll_error(&idp, "tv", &denied, "access_denied").await;
    poll_error(&idp, "tv", &expiring, "authorization_pending").await;
    let expiring_polled = Instant::now();
    poll_error(&idp, "tv", &short, "authorization_pending").await;
    // Another client's device code, an unknown one.
    poll_error(&idp, "other", &expiring, "invalid_grant").await;
    poll_error(&idp, "tv", "dc.unknown", "invalid_grant").await;

    tokio::time::sleep_until(
        (t0 + Duration::from_secs(2)).max(expiring_polled + Duration::from_secs(1)) + MARGIN,
    )
    .await;
    poll_error(&idp, "tv", &expiring, "expired_token").await;
    poll_error(&idp, "tv", &short, "expired_token").await;
    // After a final answer, the device code is used up.
    tokio::time::sleep_until(t0 + Duration::from_secs(3) + MARGIN * 3).await;
    poll_error(&idp, "tv", &denied, "invalid_grant").await;

    // The device authorization request itself.
    post_form(&idp.device_authorization_url(), &[("client_id", "tv")])
        .await
        .assert_error(400, "invalid_request");
    post_form(&idp.device_authorization_url(), &[("scope", "mail")])
        .await
        .assert_error(400, "invalid_request");
    device_code(&idp, "nobody", "mail")
        .await
        .assert_error(401, "invalid_client");
    device_code(&idp, "confidential", "mail")
        .await
        .assert_error(401, "invalid_client");
    let resp = http()
        .post(idp.device_authorization_url())
        .header("authorization", basic("confidential", "s"))
        .form(&[("scope", "mail")])
        .send()
        .await
        .unwrap();
    answer(resp).await.assert_ok();
}

// ---------------------------------------------------------------------------------------------
// Authorization code + PKCE (RFC 6749 §4.1, RFC 7636, RFC 8252)
// ---------------------------------------------------------------------------------------------

fn pkce_pair() -> (String, String) {
    let verifier = URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
    let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
    (verifier, challenge)
}

/// `GET /authorize`; returns the status and the redirect target's query pairs.
async fn authorize<K: AsRef<str>, V: AsRef<str>>(
    idp: &FakeOAuth2,
    params: &[(K, V)],
) -> (u16, Vec<(String, String)>) {
    let mut url = url::Url::parse(&idp.authorization_url()).unwrap();
    url.query_pairs_mut().extend_pairs(params);
    let resp = http().get(url).send().await.expect("GET /authorize");
    let status = resp.status().as_u16();
    let query = resp
        .headers()
        .get("location")
        .map(|l| {
            url::Url::parse(l.to_str().unwrap())
                .unwrap()
                .query_pairs()
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    (status, query)
}

fn get<'a>(query: &'a [(String, String)], key: &str) -> Option<&'a str> {
    query
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// `/authorize` parameters of the client `desktop` asking for a code with PKCE (S256).
fn code_request<'a>(
    redirect_uri: &'a str,
    scope: &'a str,
    challenge: &'a str,
) -> Vec<(&'static str, &'a str)> {
    vec![
        ("response_type", "code"),
        ("client_id", "desktop"),
        ("redirect_uri", redirect_uri),
        ("scope", scope),
        ("code_challenge", challenge),
        ("code_challenge_method", "S256"),
    ]
}

/// Redeems an authorization code of the client `desktop` (secret `s`) at `/token`, with a
/// `code_verifier` when `Some`.
async fn redeem(
    idp: &FakeOAuth2,
    code: &str,
    redirect_uri: &str,
    verifier: Option<&str>,
) -> Answer {
    let mut params = vec![
        ("grant_type", "authorization_code"),
        ("code", code),
        ("redirect_uri", redirect_uri),
        ("client_id", "desktop"),
        ("client_secret", "s"),
    ];
    params.extend(verifier.map(|verifier| ("code_verifier", verifier)));
    post_form(&idp.token_url(), &params).await
}

#[tokio::test]
async fn authorization_code_with_pkce() {
    let idp = FakeOAuth2::start().await;
    idp.add_client("desktop", Some("s"));
    idp.set_authorize_username(Some(USER));
    let redirect = "http://127.0.0.1:53682/callback";
    let (verifier, challenge) = pkce_pair();
    let mut params = code_request(redirect, "https://mail.google.com/", &challenge);
    params.extend([("state", "st-123"), ("access_type", "offline")]);
    let (status, query) = authorize(&idp, &params).await;
    assert_eq!(status, 302);
    assert_eq!(get(&query, "state"), Some("st-123"));
    let code = get(&query, "code").expect("code").to_owned();

    let exchange = async |verifier: Option<&str>, redirect_uri: &str| {
        redeem(&idp, &code, redirect_uri, verifier).await
    };
    let (other_verifier, _) = pkce_pair();
    exchange(Some(&other_verifier), redirect)
        .await
        .assert_error(400, "invalid_grant");
    exchange(None, redirect)
        .await
        .assert_error(400, "invalid_request");
    exchange(Some(&verifier), "http://127.0.0.1:53682/other")
        .await
        .assert_error(400, "invalid_grant");
    let ok = exchange(Some(&verifier), redirect).await;
    ok.assert_ok();
    let at = ok.str("access_token").to_owned();
    let rt = ok.str("refresh_token").to_owned();
    assert!(idp.is_access_token_active(&at));
    // A second use fails and revokes what the first one issued (RFC 6749 §4.1.2).
    exchange(Some(&verifier), redirect)
        .await
        .assert_error(400, "invalid_grant");
    assert!(!idp.is_access_token_active(&at));
    assert!(!idp.is_refresh_token_valid(&rt));
    let auth = &idp.requests()[0];
    assert_eq!(
        (auth.endpoint, auth.status, auth.outcome.as_str()),
        (Endpoint::Authorize, 302, "ok")
    );
    assert_eq!(auth.username.as_deref(), Some(USER));

    // Microsoft's and Google's rule: no refresh token without offline access.
    idp.set_require_offline_access(true);
    for (scope, access_type, refresh) in [
        ("mail", None, false),
        ("mail offline_access", None, true),
        ("https://mail.google.com/", Some("offline"), true),
    ] {
        let (verifier, challenge) = pkce_pair();
        let mut params = code_request(redirect, scope, &challenge);
        params.extend(access_type.map(|access_type| ("access_type", access_type)));
        let (_, query) = authorize(&idp, &params).await;
        let code = get(&query, "code").unwrap();
        let a = redeem(&idp, code, redirect, Some(&verifier)).await;
        a.assert_ok();
        assert_eq!(a.body.get("refresh_token").is_some(), refresh, "{scope}");
    }
}

#[tokio::test]
async fn authorization_endpoint_errors() {
    let idp = FakeOAuth2::start().await;
    idp.add_client("desktop", None);
    let (_, challenge) = pkce_pair();
    type Params = Vec<(&'static str, String)>;
    let base = |redirect: &str| -> Params {
        let mut params = code_request(redirect, "mail", &challenge);
        params.push(("state", "s1"));
        params.into_iter().map(|(k, v)| (k, v.to_owned())).collect()
    };
    let without = |mut p: Params, key: &str| -> Params {
        p.retain(|(k, _)| *k != key);
        p
    };
    let with = |mut p: Params, key: &'static str, v: &str| -> Params {
        p.retain(|(k, _)| *k != key);
        p.push((key, v.to_owned()));
        p
    };
    let ok_redirect = "http://localhost:8080/cb";

    // No user to approve: the user "declines".
    let (status, q) = authorize(&idp, &base(ok_redirect)).await;
    assert_eq!((status, get(&q, "error")), (302, Some("access_denied")));
    assert_eq!(get(&q, "state"), Some("s1"));
    idp.set_authorize_username(Some(USER));
    for redirect in ["http://[::1]:9/cb", "http://127.0.0.1:1/", ok_redirect] {
        let (status, q) = authorize(&idp, &base(redirect)).await;
        assert_eq!(status, 302, "{redirect}");
        assert!(get(&q, "code").is_some(), "{redirect}");
    }
    // Never redirected: bad client or redirect URI (400, no Location).
    for params in [
        with(base(ok_redirect), "redirect_uri", "https://example.com/cb"),
        with(base(ok_redirect), "redirect_uri", "http://192.168.1.2/cb"),
        with(
            base(ok_redirect),
            "redirect_uri",
            "http://127.0.0.1:8080/cb#frag",
        ),
        without(base(ok_redirect), "redirect_uri"),
        with(base(ok_redirect), "client_id", "nobody"),
        without(base(ok_redirect), "client_id"),
    ] {
        let (status, q) = authorize(&idp, &params).await;
        assert_eq!((status, q.len()), (400, 0), "{params:?}");
    }
    // Redirected errors (RFC 6749 §4.1.2.1, RFC 7636 §4.4.1).
    for (params, error) in [
        (
            without(base(ok_redirect), "code_challenge"),
            "invalid_request",
        ),
        (
            with(base(ok_redirect), "code_challenge_method", "plain"),
            "invalid_request",
        ),
        (
            without(base(ok_redirect), "code_challenge_method"),
            "invalid_request",
        ),
        (
            with(base(ok_redirect), "code_challenge", "too-short"),
            "invalid_request",
        ),
        (without(base(ok_redirect), "scope"), "invalid_request"),
        (
            with(base(ok_redirect), "response_type", "token"),
            "unsupported_response_type",
        ),
    ] {
        let (status, q) = authorize(&idp, &params).await;
        assert_eq!((status, get(&q, "error")), (302, Some(error)), "{params:?}");
        assert_eq!(get(&q, "state"), Some("s1"));
        assert!(get(&q, "code").is_none());
    }
}

// ---------------------------------------------------------------------------------------------
// Client credentials and JWT bearer (RFC 7523)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn client_credentials_app_only_token() {
    let idp = FakeOAuth2::start().await;
    idp.add_app("daemon", "app-secret", USER);
    idp.add_client("relay", Some("s"));
    let url = idp.token_url();
    let grant = async |client_id: &str, secret: &str, scope: Option<&str>| {
        let mut params = vec![
            ("grant_type", "client_credentials"),
            ("client_id", client_id),
            ("client_secret", secret),
        ];
        params.extend(scope.map(|scope| ("scope", scope)));
        post_form(&url, &params).await
    };
    let a = grant(
        "daemon",
        "app-secret",
        Some("https://outlook.office365.com/.default"),
    )
    .await;
    a.assert_ok();
    assert!(a.body.get("refresh_token").is_none(), "{}", a.text);
    assert!(a.body.get("scope").is_none(), "{}", a.text);
    let i = introspect(&idp, a.str("access_token")).await;
    assert_eq!(i.body["username"], json!(USER));
    assert_eq!(i.body["client_id"], json!("daemon"));

    post_form_basic(
        &idp.token_url(),
        "daemon",
        "app-secret",
        &[("grant_type", "client_credentials")],
    )
    .await
    .assert_ok();
    grant("relay", "s", None)
        .await
        .assert_error(400, "unauthorized_client");
    grant("daemon", "wrong", None)
        .await
        .assert_error(401, "invalid_client");
}

/// The service-account fixture, as a Google key file has it.
struct ServiceAccount {
    client_email: String,
    key: ring::signature::RsaKeyPair,
}

fn service_account() -> ServiceAccount {
    let text = std::fs::read_to_string(support::oauth2::SERVICE_ACCOUNT_KEY_FILE).unwrap();
    let json: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["type"], json!("service_account"));
    assert!(json["private_key_id"].is_string());
    assert!(json["token_uri"].is_string());
    let pem = json["private_key"].as_str().unwrap();
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    assert!(
        pem.starts_with("-----BEGIN PRIVATE KEY-----\n"),
        "PKCS#8 PEM"
    );
    let der = STANDARD.decode(b64).unwrap();
    ServiceAccount {
        client_email: json["client_email"].as_str().unwrap().to_owned(),
        key: ring::signature::RsaKeyPair::from_pkcs8(&der).expect("PKCS#8 RSA key"),
    }
}

fn sign_jwt(key: &ring::signature::RsaKeyPair, header: &Value, claims: &Value) -> String {
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let mut sig = vec![0; key.public().modulus_len()];
    key.sign(
        &ring::signature::RSA_PKCS1_SHA256,
        &ring::rand::SystemRandom::new(),
        input.as_bytes(),
        &mut sig,
    )
    .unwrap();
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
}

#[tokio::test]
async fn jwt_bearer_service_account() {
    let idp = FakeOAuth2::start().await;
    let email = idp.add_fixture_service_account();
    let sa = service_account();
    assert_eq!(email, sa.client_email);
    let now = unix_now();
    let header =
        json!({"alg": "RS256", "typ": "JWT", "kid": "49293ca236887d6a6c8adb90e54dcb11f75a70a3"});
    let claims = json!({
        "iss": sa.client_email,
        "scope": "https://mail.google.com/",
        "aud": idp.token_url(),
        "iat": now,
        "exp": now + 3600,
        "sub": USER,
    });
    let exchange = async |assertion: &str| {
        post_form(
            &idp.token_url(),
            &[("grant_type", JWT_BEARER_GRANT), ("assertion", assertion)],
        )
        .await
    };

    let ok = exchange(&sign_jwt(&sa.key, &header, &claims)).await;
    ok.assert_ok();
    assert!(ok.body.get("refresh_token").is_none(), "{}", ok.text);
    assert_eq!(ok.body["expires_in"], json!(3599));
    assert_eq!(
        introspect(&idp, ok.str("access_token")).await.body["username"],
        json!(USER)
    );
    let rec = idp.requests().pop().unwrap();
    assert_eq!(
        (rec.client_auth, rec.username.as_deref()),
        (ClientAuth::None, Some(USER))
    );

    // Tampering: a flipped signature bit, claims changed after signing.
    let good = sign_jwt(&sa.key, &header, &claims);
    let (input, sig) = good.rsplit_once('.').unwrap();
    let mut sig = URL_SAFE_NO_PAD.decode(sig).unwrap();
    sig[10] ^= 1;
    let bad_sig = format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig));
    let a = exchange(&bad_sig).await;
    a.assert_error(400, "invalid_grant");
    assert_eq!(a.str("error_description"), "Invalid JWT Signature.");
    let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
    let mut other = claims.clone();
    other["sub"] = json!("ceo@test.local");
    parts[1] = URL_SAFE_NO_PAD.encode(other.to_string());
    exchange(&parts.join("."))
        .await
        .assert_error(400, "invalid_grant");

    // Claims.
    let with = |k: &str, v: Value| {
        let mut c = claims.clone();
        if v.is_null() {
            c.as_object_mut().unwrap().remove(k);
        } else {
            c[k] = v;
        }
        sign_jwt(&sa.key, &header, &c)
    };
    for (assertion, code) in [
        (
            with("aud", json!("https://oauth2.googleapis.com/token")),
            "invalid_grant",
        ),
        (with("exp", json!(now + 3601)), "invalid_grant"),
        (with("exp", json!(now - 1)), "invalid_grant"),
        (with("iat", json!(now + 600)), "invalid_grant"),
        (with("iat", Value::Null), "invalid_grant"),
        (
            with("iss", json!("stranger@x.iam.gserviceaccount.com")),
            "invalid_grant",
        ),
        (with("scope", Value::Null), "invalid_scope"),
        (
            sign_jwt(&sa.key, &json!({"alg": "RS384", "typ": "JWT"}), &claims),
            "invalid_grant",
        ),
        ("not-a-jwt".to_owned(), "invalid_grant"),
    ] {
        exchange(&assertion).await.assert_error(400, code);
    }
    post_form(&idp.token_url(), &[("grant_type", JWT_BEARER_GRANT)])
        .await
        .assert_error(400, "invalid_request");
    // Without `sub` the token is the service account's own.
    let own = exchange(&with("sub", Value::Null)).await;
    own.assert_ok();
    assert_eq!(
        introspect(&idp, own.str("access_token")).await.body["username"],
        json!(sa.client_email)
    );
    // The key file with the fake's token_uri, for a client under test.
    let key_file: Value =
        serde_json::from_str(&support::oauth2::service_account_key_json(&idp.token_url())).unwrap();
    assert_eq!(key_file["token_uri"], json!(idp.token_url()));
    assert_eq!(key_file["client_email"], json!(sa.client_email));
}

// ---------------------------------------------------------------------------------------------
// Recording
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn wait_for_awaits_requests_and_times_out() {
    let idp = FakeOAuth2::start().await;
    idp.add_client("relay", None);
    let rt = idp.issue_refresh_token("relay", USER);
    let url = idp.token_url();
    let client =
        tokio::spawn(async move { refresh_in_body(&url, &rt, "relay", None).await.status });
    idp.wait_for(
        |reqs| {
            reqs.iter()
                .any(|r| r.is_ok() && r.grant_type.as_deref() == Some("refresh_token"))
        },
        STEP,
    )
    .await
    .unwrap();
    assert_eq!(client.await.unwrap(), 200);
    let err = idp
        .wait_for(|reqs| reqs.len() > 1, Duration::from_millis(50))
        .await
        .unwrap_err();
    assert!(err.contains("refresh_token"), "{err}");
    // A clone is the same server; dropping it does not stop the server.
    let clone = idp.clone();
    drop(clone);
    assert_eq!(introspect(&idp, "x").await.status, 200);
    let url = idp.url();
    idp.shutdown().await;
    let gone = http().get(format!("{url}/introspect")).send().await;
    assert!(gone.is_err(), "stopped: {gone:?}");
}

// ---------------------------------------------------------------------------------------------
// Dovecot with passdb oauth2
// ---------------------------------------------------------------------------------------------

/// A fresh loopback source address for every connection: Dovecot's auth penalty is per client
/// IP (see the module docs).
fn fresh_source() -> Ipv4Addr {
    static NEXT: AtomicU8 = AtomicU8::new(2);
    Ipv4Addr::new(127, 0, 1, NEXT.fetch_add(1, Ordering::Relaxed))
}

/// A raw IMAP connection that keeps a transcript.
struct Imap {
    conn: BufReader<TcpStream>,
    transcript: Vec<String>,
}

impl Imap {
    /// Connects from `source` and reads the greeting.
    async fn connect_from(server: &Dovecot, source: Ipv4Addr) -> Result<Imap> {
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(source.into(), 0))?;
        let tcp = tokio::time::timeout(STEP, socket.connect(server.addr()))
            .await
            .map_err(|_| anyhow!("connect timed out"))??;
        let mut imap = Imap {
            conn: BufReader::new(tcp),
            transcript: Vec::new(),
        };
        let greeting = imap.line().await?;
        ensure!(greeting.starts_with("* OK "), "greeting {greeting:?}");
        Ok(imap)
    }

    async fn connect(server: &Dovecot) -> Result<Imap> {
        Self::connect_from(server, fresh_source()).await
    }

    async fn send(&mut self, line: &str) -> Result<()> {
        self.transcript.push(format!("C: {line}"));
        tokio::time::timeout(
            STEP,
            self.conn
                .get_mut()
                .write_all(format!("{line}\r\n").as_bytes()),
        )
        .await
        .map_err(|_| anyhow!("write timed out"))??;
        Ok(())
    }

    /// One line without CRLF.
    async fn line(&mut self) -> Result<String> {
        let mut line = String::new();
        let n = tokio::time::timeout(STEP, self.conn.read_line(&mut line))
            .await
            .map_err(|_| anyhow!("no line within {STEP:?}; transcript {:#?}", self.transcript))??;
        ensure!(n > 0, "EOF; transcript {:#?}", self.transcript);
        let line = line
            .strip_suffix("\r\n")
            .context("line without CRLF")?
            .to_owned();
        self.transcript.push(format!("S: {line}"));
        Ok(line)
    }

    /// Lines until the tagged one, which is returned.
    async fn tagged(&mut self, tag: &str) -> Result<String> {
        loop {
            let line = self.line().await?;
            if line.starts_with(&format!("{tag} ")) {
                return Ok(line);
            }
        }
    }

    async fn select_inbox(&mut self) -> Result<()> {
        self.send("s1 SELECT INBOX").await?;
        let done = self.tagged("s1").await?;
        ensure!(done.starts_with("s1 OK [READ-WRITE]"), "{done}");
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mech {
    XOAuth2,
    OAuthBearer,
}

impl Mech {
    fn name(self) -> &'static str {
        match self {
            Mech::XOAuth2 => "XOAUTH2",
            Mech::OAuthBearer => "OAUTHBEARER",
        }
    }

    /// The base64 initial response: Google's XOAUTH2 format, or RFC 7628 §3.1.
    fn initial_response(self, user: &str, token: &str, port: u16) -> String {
        let raw = match self {
            Mech::XOAuth2 => format!("user={user}\x01auth=Bearer {token}\x01\x01"),
            Mech::OAuthBearer => {
                format!(
                    "n,a={user},\x01host=127.0.0.1\x01port={port}\x01auth=Bearer {token}\x01\x01"
                )
            }
        };
        STANDARD.encode(raw)
    }

    /// Exactly what Dovecot challenges a rejected token with.
    fn failure_challenge(self) -> &'static str {
        match self {
            Mech::XOAuth2 => {
                "+ eyJzdGF0dXMiOiI0MDEiLCJzY2hlbWVzIjoiYmVhcmVyIiwic2NvcGUiOiJtYWlsIn0="
            }
            Mech::OAuthBearer => "+ eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIn0=",
        }
    }

    /// The client's answer to that challenge: empty for XOAUTH2, `%x01` for OAUTHBEARER
    /// (RFC 7628 §3.2.3).
    fn failure_ack(self) -> &'static str {
        match self {
            Mech::XOAuth2 => "",
            Mech::OAuthBearer => "AQ==",
        }
    }
}

/// `AUTHENTICATE`, with the initial response on the command line (SASL-IR) or after an empty
/// `+ ` challenge; returns the first line after the credentials.
async fn authenticate(imap: &mut Imap, mech: Mech, ir: &str, sasl_ir: bool) -> Result<String> {
    if sasl_ir {
        imap.send(&format!("a1 AUTHENTICATE {} {ir}", mech.name()))
            .await?;
    } else {
        imap.send(&format!("a1 AUTHENTICATE {}", mech.name()))
            .await?;
        let go_ahead = imap.line().await?;
        ensure!(
            go_ahead == "+ ",
            "expected an empty challenge, got {go_ahead:?}"
        );
        imap.send(ir).await?;
    }
    imap.line().await
}

/// Connects from `source` and authenticates as `user` with `token`; returns the connection and
/// the first line after the credentials.
async fn start_login_from(
    server: &Dovecot,
    source: Ipv4Addr,
    mech: Mech,
    user: &str,
    token: &str,
    sasl_ir: bool,
) -> Result<(Imap, String)> {
    let mut imap = Imap::connect_from(server, source).await?;
    let ir = mech.initial_response(user, token, server.port());
    let first = authenticate(&mut imap, mech, &ir, sasl_ir).await?;
    Ok((imap, first))
}

/// [`start_login_from`] a fresh source address.
async fn start_login(
    server: &Dovecot,
    mech: Mech,
    user: &str,
    token: &str,
    sasl_ir: bool,
) -> Result<(Imap, String)> {
    start_login_from(server, fresh_source(), mech, user, token, sasl_ir).await
}

/// Logs in and asserts Dovecot's exact success answer, then SELECTs INBOX.
async fn login_ok(
    server: &Dovecot,
    mech: Mech,
    user: &str,
    token: &str,
    sasl_ir: bool,
) -> Result<()> {
    let (mut imap, done) = start_login(server, mech, user, token, sasl_ir).await?;
    ensure!(
        done.starts_with("a1 OK [CAPABILITY IMAP4rev1 ") && done.ends_with("] Logged in"),
        "{mech:?} sasl_ir={sasl_ir}: {:#?}",
        imap.transcript
    );
    imap.select_inbox().await
}

/// Logs in with a token Dovecot must refuse and asserts the exact challenge and `NO`.
async fn login_refused(
    server: &Dovecot,
    mech: Mech,
    user: &str,
    token: &str,
    sasl_ir: bool,
) -> Result<()> {
    let (mut imap, challenge) = start_login(server, mech, user, token, sasl_ir).await?;
    ensure!(
        challenge == mech.failure_challenge(),
        "{mech:?}: {:#?}",
        imap.transcript
    );
    imap.send(mech.failure_ack()).await?;
    let no = imap.line().await?;
    ensure!(
        no == "a1 NO [AUTHENTICATIONFAILED] Authentication failed.",
        "{mech:?}: {:#?}",
        imap.transcript
    );
    Ok(())
}

/// Logs in while introspection fails and asserts Dovecot's temporary failure.
async fn login_unavailable(server: &Dovecot, mech: Mech, user: &str, token: &str) -> Result<()> {
    let (imap, no) = start_login(server, mech, user, token, true).await?;
    ensure!(
        no.starts_with("a1 NO [UNAVAILABLE] Temporary authentication failure. ["),
        "{:#?}",
        imap.transcript
    );
    Ok(())
}

/// Dovecot with `passdb oauth2` against `introspection_url`, no `auth_failure_delay`, and the
/// OAuth2 user [`USER`].
async fn oauth2_dovecot(introspection_url: String) -> Result<Dovecot> {
    let server = Dovecot::start_with(DovecotOptions {
        oauth2_introspection_url: Some(introspection_url),
        extra_config: "auth_failure_delay = 0\n".into(),
        ..Default::default()
    })
    .await?;
    server.add_oauth2_user(USER)?;
    Ok(server)
}

/// The fake with the confidential client `relay` (secret `s`), and an [`oauth2_dovecot`]
/// that introspects there.
async fn oauth2_stack() -> (FakeOAuth2, Dovecot) {
    let idp = FakeOAuth2::start().await;
    idp.add_client("relay", Some("s"));
    let server = oauth2_dovecot(idp.introspection_url())
        .await
        .expect("Dovecot starts");
    (idp, server)
}

#[tokio::test]
async fn dovecot_accepts_xoauth2_and_oauthbearer() -> Result<()> {
    let (idp, server) = oauth2_stack().await;
    // A token the relay would get: through the refresh grant.
    let rt = idp.issue_refresh_token("relay", USER);
    let got = refresh_in_body(&idp.token_url(), &rt, "relay", Some("s")).await;
    got.assert_ok();
    let token = got.str("access_token").to_owned();
    for mech in [Mech::XOAuth2, Mech::OAuthBearer] {
        for sasl_ir in [true, false] {
            login_ok(&server, mech, USER, &token, sasl_ir).await?;
        }
    }
    // The SASL user is compared case-insensitively (username_format = %Lu).
    login_ok(&server, Mech::XOAuth2, "Reports@Test.Local", &token, true).await?;
    // No auth cache: every login asked the introspection endpoint.
    assert_eq!(idp.introspections(), 5);
    let log = idp.introspection_log();
    assert!(
        log.iter()
            .all(|i| i.active && i.token.as_deref() == Some(token.as_str()))
    );
    // What Dovecot 2.3 POSTs (introspection_mode = post): token, client_id, client_secret.
    assert_eq!(
        log[0].params.keys().collect::<Vec<_>>(),
        ["token"],
        "empty client_id/client_secret count as absent"
    );
    // Microsoft-sized tokens (2,500 characters), both ways.
    idp.set_access_token_len(2500);
    let long = idp.issue_access_token("relay", USER);
    for sasl_ir in [true, false] {
        login_ok(&server, Mech::XOAuth2, USER, &long, sasl_ir).await?;
        login_ok(&server, Mech::OAuthBearer, USER, &long, sasl_ir).await?;
    }
    Ok(())
}

#[tokio::test]
async fn dovecot_refuses_revoked_expired_foreign_and_unknown_tokens() -> Result<()> {
    let (idp, server) = oauth2_stack().await;
    server.add_oauth2_user("other@test.local")?;

    let revoked = idp.issue_access_token("relay", USER);
    login_ok(&server, Mech::XOAuth2, USER, &revoked, true).await?;
    idp.revoke_access_tokens(USER);
    let foreign = idp.issue_access_token("relay", "other@test.local");
    idp.set_access_token_lifetime(0);
    let expired = idp.issue_access_token("relay", USER);
    // Concurrently: Dovecot answers failures from a queue it checks every 0.5 s.
    let mut attempts = Vec::new();
    for mech in [Mech::XOAuth2, Mech::OAuthBearer] {
        for sasl_ir in [true, false] {
            attempts.push((mech, revoked.as_str(), sasl_ir));
        }
        attempts.push((mech, expired.as_str(), true));
        attempts.push((mech, foreign.as_str(), true));
        attempts.push((mech, "at.never-issued", true));
    }
    futures::future::try_join_all(
        attempts
            .into_iter()
            .map(|(mech, token, sasl_ir)| login_refused(&server, mech, USER, token, sasl_ir)),
    )
    .await?;
    // `*` cancels at the challenge.
    let (mut imap, _) = start_login(&server, Mech::XOAuth2, USER, &revoked, true).await?;
    imap.send("*").await?;
    let bad = imap.line().await?;
    ensure!(bad == "a1 BAD Authentication aborted by client.", "{bad}");
    // A fresh token works again at once.
    idp.set_access_token_lifetime(3599);
    let fresh = idp.issue_access_token("relay", USER);
    login_ok(&server, Mech::OAuthBearer, USER, &fresh, true).await?;
    assert_eq!(idp.introspections(), 1 + 2 * 5 + 1 + 1);
    Ok(())
}

#[tokio::test]
async fn dovecot_temporary_failure_when_introspection_fails_or_is_down() -> Result<()> {
    let (idp, server) = oauth2_stack().await;
    let token = idp.issue_access_token("relay", USER);
    idp.fail_introspection(true);
    for mech in [Mech::XOAuth2, Mech::OAuthBearer] {
        login_unavailable(&server, mech, USER, &token).await?;
    }
    idp.fail_introspection(false);
    login_ok(&server, Mech::XOAuth2, USER, &token, true).await?;

    // Nothing listens at the introspection URL: the same temporary failure.
    let closed = support::dovecot::free_port()?;
    let unreachable = oauth2_dovecot(format!("http://127.0.0.1:{closed}/introspect")).await?;
    login_unavailable(&unreachable, Mech::XOAuth2, USER, &token).await?;
    Ok(())
}

#[tokio::test]
async fn dovecot_keeps_password_users_and_doveadm_working() -> Result<()> {
    let (idp, server) = oauth2_stack().await;
    server.add_user("plain@test.local", "pw")?;
    let token = idp.issue_access_token("relay", USER);

    // PLAIN/LOGIN against the passwd-files.
    let mut imap = Imap::connect(&server).await?;
    imap.send("a1 LOGIN plain@test.local pw").await?;
    let ok = imap.tagged("a1").await?;
    ensure!(ok.starts_with("a1 OK "), "{ok}");
    // A token is never tried as a password, a password never as a token.
    let mut imap = Imap::connect(&server).await?;
    imap.send(&format!("a1 LOGIN {USER} {token}")).await?;
    let no = imap.tagged("a1").await?;
    ensure!(
        no == "a1 NO [AUTHENTICATIONFAILED] Authentication failed.",
        "{no}"
    );
    login_refused(&server, Mech::XOAuth2, "plain@test.local", "pw", true).await?;
    // A token for a password user works too (the passdbs differ by mechanism, not by user).
    let plain_token = idp.issue_access_token("relay", "plain@test.local");
    login_ok(
        &server,
        Mech::XOAuth2,
        "plain@test.local",
        &plain_token,
        true,
    )
    .await?;

    // doveadm (userdb) and the harness's APPEND work for the OAuth2-only user.
    let uid = server
        .append(USER, "INBOX", &support::dovecot::message("oauth2"))
        .await?;
    let saved = server
        .save(USER, "INBOX", &support::dovecot::message("saved"))
        .await?;
    assert_eq!(server.uids(USER, "INBOX").await?, [uid, saved]);
    let (mut imap, _) = start_login(&server, Mech::XOAuth2, USER, &token, true).await?;
    imap.select_inbox().await?;
    assert!(server.kick(USER).await?, "the OAuth2 session was kicked");
    imap.send("i1 NOOP").await.ok();
    let bye = imap.line().await?;
    ensure!(bye.starts_with("* BYE "), "{bye}");

    let config = std::fs::read_to_string(server.oauth2_config_path())?;
    assert!(config.contains(&format!("introspection_url = {}", idp.introspection_url())));
    assert!(config.contains("introspection_mode = post"));
    Ok(())
}

#[tokio::test]
async fn dovecot_auth_penalty_delays_the_next_login_from_the_same_ip() -> Result<()> {
    let (idp, server) = oauth2_stack().await;
    let source = fresh_source();
    let rejected = "at.rejected";
    let (mut imap, _) =
        start_login_from(&server, source, Mech::XOAuth2, USER, rejected, true).await?;
    imap.send("").await?;
    imap.line().await?;

    // The relay refreshes and logs in again at once, from the same address.
    let token = idp.issue_access_token("relay", USER);
    let started = Instant::now();
    let (_imap, ok) = start_login_from(&server, source, Mech::XOAuth2, USER, &token, true).await?;
    let waited = started.elapsed();
    ensure!(ok.starts_with("a1 OK "), "{ok}");
    ensure!(
        waited >= Duration::from_millis(3500),
        "Dovecot answered after {waited:?}; expected its 4 s auth penalty"
    );
    // Another address is not penalised.
    let started = Instant::now();
    login_ok(&server, Mech::XOAuth2, USER, &token, true).await?;
    ensure!(
        started.elapsed() < Duration::from_millis(3500),
        "{:?}",
        started.elapsed()
    );
    Ok(())
}

#[tokio::test]
async fn dovecot_without_the_option_has_no_oauth2() -> Result<()> {
    let server = Dovecot::start().await?;
    server.add_user(USER, "pw")?;
    let config = std::fs::read_to_string(server.config_path())?;
    ensure!(
        config.contains("\nauth_mechanisms = plain login\n"),
        "{config}"
    );
    ensure!(!config.contains("oauth2"), "{config}");
    ensure!(!server.oauth2_config_path().exists());
    let (mut imap, no) = start_login(&server, Mech::XOAuth2, USER, "at.x", true).await?;
    let greeting = imap.transcript[0].clone();
    ensure!(!greeting.contains("XOAUTH2"), "{greeting}");
    ensure!(
        no == "a1 NO [ALERT] Unsupported authentication mechanism.",
        "{no}"
    );
    imap.send("a2 LOGIN reports@test.local pw").await?;
    let ok = imap.tagged("a2").await?;
    ensure!(ok.starts_with("a2 OK "), "{ok}");
    Ok(())
}
