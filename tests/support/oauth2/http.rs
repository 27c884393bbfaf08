//! HTTP plumbing shared by the endpoints: RFC 6749 §5.2 errors, JSON answers with §5.1's
//! headers, form parsing, client authentication (§2.3.1) and the record of each call.

use std::collections::BTreeMap;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::state::{Inner, ServerState};
use super::{BASIC_REALM, ClientAuth, Endpoint, TokenRequest};

/// An RFC 6749 §5.2 error answer.
pub(super) struct OAuthError {
    pub(super) status: StatusCode,
    code: &'static str,
    pub(super) description: String,
    /// Add `WWW-Authenticate: Basic` (a failed HTTP Basic client authentication).
    basic_challenge: bool,
}

pub(super) fn err(
    status: StatusCode,
    code: &'static str,
    description: impl Into<String>,
) -> OAuthError {
    OAuthError {
        status,
        code,
        description: description.into(),
        basic_challenge: false,
    }
}

pub(super) fn invalid_request(description: impl Into<String>) -> OAuthError {
    err(StatusCode::BAD_REQUEST, "invalid_request", description)
}

pub(super) fn invalid_grant(description: impl Into<String>) -> OAuthError {
    err(StatusCode::BAD_REQUEST, "invalid_grant", description)
}

fn invalid_client(description: impl Into<String>, auth: ClientAuth) -> OAuthError {
    OAuthError {
        basic_challenge: auth == ClientAuth::Basic,
        ..err(StatusCode::UNAUTHORIZED, "invalid_client", description)
    }
}

/// JSON with the headers of RFC 6749 §5.1.
pub(super) fn json_response(status: StatusCode, body: &Value) -> Response {
    let mut resp = (status, body.to_string()).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    resp
}

pub(super) fn error_response(e: &OAuthError) -> Response {
    let mut resp = json_response(
        e.status,
        &json!({"error": e.code, "error_description": e.description}),
    );
    if e.basic_challenge {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_str(&format!("Basic realm=\"{BASIC_REALM}\"")).unwrap(),
        );
    }
    resp
}

/// Parses an `application/x-www-form-urlencoded` body or query (RFC 6749 §3.2): empty values
/// count as absent, a repeated parameter is `invalid_request`. Returns every parameter seen
/// even on error, for the record.
pub(super) fn parse_form(data: &[u8]) -> (BTreeMap<String, String>, Result<(), OAuthError>) {
    let mut params = BTreeMap::new();
    let mut result = Ok(());
    for (k, v) in url::form_urlencoded::parse(data) {
        if v.is_empty() {
            continue;
        }
        if params.insert(k.to_string(), v.to_string()).is_some() && result.is_ok() {
            result = Err(invalid_request(format!(
                "Parameter {k} was included more than once."
            )));
        }
    }
    (params, result)
}

pub(super) fn check_form_content_type(headers: &HeaderMap) -> Result<(), OAuthError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = ct.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        Ok(())
    } else {
        Err(invalid_request(format!(
            "Content-Type must be application/x-www-form-urlencoded, got {ct:?}."
        )))
    }
}

pub(super) fn required<'a>(
    params: &'a BTreeMap<String, String>,
    name: &str,
) -> Result<&'a str, OAuthError> {
    params
        .get(name)
        .map(String::as_str)
        .ok_or_else(|| invalid_request(format!("Missing required parameter: {name}")))
}

/// Form-urlencoding decode of one half of HTTP Basic credentials (RFC 6749 §2.3.1).
fn form_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

/// The result of client authentication.
pub(super) struct Authenticated {
    pub(super) client_id: String,
}

/// RFC 6749 §2.3.1: Basic or body credentials. Fills `rec.client_id`/`rec.client_auth`.
/// `required = false` (JWT bearer grant) accepts a request without any client credentials.
pub(super) fn authenticate_client(
    st: &ServerState,
    headers: &HeaderMap,
    params: &BTreeMap<String, String>,
    rec: &mut TokenRequest,
    required: bool,
) -> Result<Option<Authenticated>, OAuthError> {
    let basic = match headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        Some(value) if value.len() > 6 && value[..6].eq_ignore_ascii_case("basic ") => {
            rec.client_auth = ClientAuth::Basic;
            let decoded = STANDARD
                .decode(value[6..].trim())
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| {
                    invalid_client("Malformed HTTP Basic credentials.", ClientAuth::Basic)
                })?;
            let (id, secret) = decoded.split_once(':').ok_or_else(|| {
                invalid_client("Malformed HTTP Basic credentials.", ClientAuth::Basic)
            })?;
            Some((form_decode(id), form_decode(secret)))
        }
        _ => None,
    };
    let (client_id, secret) = match basic {
        Some((id, secret)) => {
            rec.client_id = Some(id.clone());
            if params.contains_key("client_secret") {
                return Err(invalid_request(
                    "The client used more than one authentication method (HTTP Basic and \
                     client_secret in the body).",
                ));
            }
            if let Some(body_id) = params.get("client_id")
                && *body_id != id
            {
                return Err(invalid_request(
                    "client_id in the body differs from the HTTP Basic user.",
                ));
            }
            (id, (!secret.is_empty()).then_some(secret))
        }
        None => {
            let Some(id) = params.get("client_id").cloned() else {
                if required {
                    return Err(invalid_request(
                        "Could not determine client ID from request.",
                    ));
                }
                return Ok(None);
            };
            rec.client_id = Some(id.clone());
            rec.client_auth = ClientAuth::Body;
            (id, params.get("client_secret").cloned())
        }
    };
    let auth = rec.client_auth;
    let Some(client) = st.clients.get(&client_id) else {
        return Err(invalid_client("The OAuth client was not found.", auth));
    };
    match (&client.secret, secret) {
        (Some(_), None) => Err(invalid_client("client_secret is missing.", auth)),
        (Some(expected), Some(given)) if *expected != given => {
            Err(invalid_client("Unauthorized", auth))
        }
        (None, Some(_)) => Err(invalid_client(
            "Client is public so neither 'client_assertion' nor 'client_secret' should be \
             presented.",
            auth,
        )),
        _ => Ok(Some(Authenticated { client_id })),
    }
}

pub(super) fn new_record(endpoint: Endpoint) -> TokenRequest {
    TokenRequest {
        seq: 0,
        endpoint,
        grant_type: None,
        client_id: None,
        client_auth: ClientAuth::None,
        scope: None,
        username: None,
        refresh_token_used: None,
        refresh_token_issued: None,
        access_token_issued: None,
        received_at: Instant::now(),
        status: 0,
        outcome: String::new(),
        params: BTreeMap::new(),
    }
}

/// Records `rec` with the outcome of `result` and renders it.
pub(super) fn finish(
    inner: &Inner,
    st: &mut ServerState,
    mut rec: TokenRequest,
    result: Result<Value, OAuthError>,
) -> Response {
    let resp = match &result {
        Ok(body) => {
            rec.status = 200;
            rec.outcome = "ok".into();
            rec.access_token_issued = body["access_token"].as_str().map(str::to_owned);
            rec.refresh_token_issued = body["refresh_token"].as_str().map(str::to_owned);
            json_response(StatusCode::OK, body)
        }
        Err(e) => {
            rec.status = e.status.as_u16();
            rec.outcome = e.code.to_owned();
            rec.username = None;
            error_response(e)
        }
    };
    st.record(rec);
    inner.notify();
    resp
}
