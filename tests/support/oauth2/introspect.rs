//! `POST /introspect`: RFC 7662 token introspection, as Dovecot's `passdb oauth2` calls it.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tokio::time::Instant;

use super::Introspection;
use super::http::{check_form_content_type, error_response, json_response, parse_form, required};
use super::state::Inner;

pub(super) async fn introspect_endpoint(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (params, form_ok) = parse_form(&body);
    let mut st = inner.lock();
    let mut entry = Introspection {
        token: params.get("token").cloned(),
        active: false,
        username: None,
        status: 200,
        received_at: Instant::now(),
        params: params.clone(),
    };
    let resp = if st.fail_introspection {
        entry.status = 503;
        let mut resp = (StatusCode::SERVICE_UNAVAILABLE, "Service Unavailable\n").into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        resp
    } else {
        match check_form_content_type(&headers)
            .and(form_ok)
            .and_then(|()| required(&params, "token").map(str::to_owned))
        {
            Err(e) => {
                entry.status = e.status.as_u16();
                error_response(&e)
            }
            Ok(token) => {
                let now = Instant::now();
                let body = match st.access_tokens.get(&token) {
                    Some(at) if at.is_active(now) => {
                        entry.active = true;
                        entry.username = Some(at.username.clone());
                        json!({
                            "active": true,
                            "username": at.username,
                            "email": at.username,
                            "sub": at.username,
                            "scope": at.scope,
                            "client_id": at.client_id,
                            "token_type": "Bearer",
                            "exp": at.issued_unix + at.lifetime_secs,
                            "iat": at.issued_unix,
                        })
                    }
                    _ => json!({"active": false}),
                };
                json_response(StatusCode::OK, &body)
            }
        }
    };
    st.introspections.push(entry);
    inner.notify();
    resp
}
