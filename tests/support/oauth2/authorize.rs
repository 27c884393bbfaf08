//! `GET /authorize`: the authorization endpoint (authorization code + PKCE, loopback
//! redirect).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::time::Instant;

use super::http::{new_record, parse_form};
use super::state::{AuthCode, Inner, ServerState, random_string};
use super::{AUTH_CODE_LIFETIME_SECS, Endpoint};

/// RFC 7636 §4.1: 43–128 characters of `[A-Za-z0-9-._~]`.
pub(super) fn valid_pkce_string(s: &str) -> bool {
    (43..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
}

/// RFC 8252 §7.3 (plus `localhost`, which Google and Microsoft accept): `http`, a loopback host,
/// no fragment.
fn loopback_redirect(uri: &str) -> Option<url::Url> {
    let url = url::Url::parse(uri).ok()?;
    let loopback = match url.host()? {
        url::Host::Ipv4(ip) => ip.is_loopback(),
        url::Host::Ipv6(ip) => ip.is_loopback(),
        url::Host::Domain(d) => d.eq_ignore_ascii_case("localhost"),
    };
    (url.scheme() == "http" && loopback && url.fragment().is_none()).then_some(url)
}

fn error_page(status: StatusCode, code: &str, description: &str) -> Response {
    let mut resp = (
        status,
        format!("Error {}: {code}\n{description}\n", status.as_u16()),
    )
        .into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

pub(super) async fn authorize_endpoint(
    State(inner): State<Arc<Inner>>,
    RawQuery(query): RawQuery,
) -> Response {
    let mut rec = new_record(Endpoint::Authorize);
    let (params, form_ok) = parse_form(query.unwrap_or_default().as_bytes());
    rec.params = params.clone();
    rec.scope = params.get("scope").cloned();
    rec.client_id = params.get("client_id").cloned();
    let mut st = inner.lock();
    let record = |st: &mut ServerState, status: u16, outcome: &str, username: Option<String>| {
        let mut rec = rec.clone();
        rec.status = status;
        rec.outcome = outcome.to_owned();
        rec.username = username;
        st.record(rec);
        inner.notify();
    };
    // Errors shown to the user, never redirected (RFC 6749 §4.1.2.1).
    let page_error = match (
        &form_ok,
        params.get("client_id"),
        params.get("redirect_uri"),
    ) {
        (Err(e), _, _) => Some(("invalid_request", e.description.clone())),
        (_, None, _) => Some((
            "invalid_request",
            "Missing required parameter: client_id".into(),
        )),
        (_, Some(id), _) if !st.clients.contains_key(id) => {
            Some(("invalid_client", "The OAuth client was not found.".into()))
        }
        (_, _, None) => Some((
            "invalid_request",
            "Missing required parameter: redirect_uri".into(),
        )),
        (_, _, Some(uri)) if loopback_redirect(uri).is_none() => Some((
            "redirect_uri_mismatch",
            format!("redirect_uri {uri} is not an http:// loopback URI without a fragment."),
        )),
        _ => None,
    };
    if let Some((code, description)) = page_error {
        record(&mut st, 400, code, None);
        return error_page(StatusCode::BAD_REQUEST, code, &description);
    }
    let redirect_uri = params["redirect_uri"].clone();
    let mut target = loopback_redirect(&redirect_uri).unwrap();
    let get = |k: &str| params.get(k).map(String::as_str);
    let redirect_error: Option<(&str, &str)> = if get("response_type") != Some("code") {
        Some((
            "unsupported_response_type",
            "Only response_type=code is supported.",
        ))
    } else if get("code_challenge").is_none() {
        Some(("invalid_request", "code challenge required"))
    } else if get("code_challenge_method") != Some("S256") {
        Some(("invalid_request", "transform algorithm not supported"))
    } else if !valid_pkce_string(get("code_challenge").unwrap()) {
        Some((
            "invalid_request",
            "code_challenge is not 43-128 unreserved characters",
        ))
    } else if get("scope").is_none() {
        Some(("invalid_request", "Missing required parameter: scope"))
    } else if st.authorize_username.is_none() {
        Some((
            "access_denied",
            "The user declined the authorization request.",
        ))
    } else {
        None
    };
    {
        let mut q = target.query_pairs_mut();
        match redirect_error {
            Some((code, description)) => {
                q.append_pair("error", code);
                q.append_pair("error_description", description);
            }
            None => {
                let code = random_string("4/", 60);
                let username = st.authorize_username.clone().unwrap();
                st.auth_codes.insert(
                    code.clone(),
                    AuthCode {
                        client_id: params["client_id"].clone(),
                        redirect_uri: redirect_uri.clone(),
                        code_challenge: params["code_challenge"].clone(),
                        username,
                        scope: params["scope"].clone(),
                        offline: get("access_type") == Some("offline"),
                        expires_at: Instant::now() + Duration::from_secs(AUTH_CODE_LIFETIME_SECS),
                        used: false,
                        issued_access: None,
                        issued_refresh: None,
                    },
                );
                q.append_pair("code", &code);
            }
        }
        if let Some(state) = get("state") {
            q.append_pair("state", state);
        }
    }
    let username = redirect_error
        .is_none()
        .then(|| st.authorize_username.clone())
        .flatten();
    record(
        &mut st,
        302,
        redirect_error.map_or("ok", |(code, _)| code),
        username,
    );
    let mut resp = StatusCode::FOUND.into_response();
    resp.headers_mut().insert(
        header::LOCATION,
        HeaderValue::from_str(target.as_str()).expect("a URL is a valid header value"),
    );
    resp
}
