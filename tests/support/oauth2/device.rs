//! `POST /devicecode`: the device authorization endpoint (RFC 8628 §3.1/§3.2).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use rand::Rng as _;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::Endpoint;
use super::http::{
    OAuthError, authenticate_client, check_form_content_type, finish, new_record, parse_form,
    required,
};
use super::state::{DeviceGrant, Inner, random_string};

pub(super) async fn device_endpoint(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut rec = new_record(Endpoint::DeviceAuthorization);
    let (params, form_ok) = parse_form(&body);
    rec.params = params.clone();
    rec.scope = params.get("scope").cloned();
    let verification_uri = format!("{}/device", inner.base_url);
    let mut st = inner.lock();
    let result = (|| -> Result<Value, OAuthError> {
        check_form_content_type(&headers)?;
        form_ok?;
        let client = authenticate_client(&st, &headers, &params, &mut rec, true)?.unwrap();
        let scope = required(&params, "scope")?.to_owned();
        let device_code = random_string("dc.", 64);
        let user_code = user_code();
        let now = Instant::now();
        let (pending_left, outcome) = match &st.device_script {
            Some((n, outcome)) => (*n, Some(outcome.clone())),
            None => (0, None),
        };
        let (interval, lifetime) = (st.device_interval, st.device_code_lifetime);
        let forced_slow_downs = st.device_slow_downs;
        st.device_codes.insert(
            device_code.clone(),
            DeviceGrant {
                client_id: client.client_id,
                scope,
                issued_at: now,
                expires_at: now + Duration::from_secs(lifetime),
                interval,
                last_poll: None,
                forced_slow_downs,
                pending_left,
                outcome,
                finished: false,
            },
        );
        // Each provider names the page its own way, and never both (a client that reads one
        // must accept the other): Microsoft `verification_uri` and a `message`, Google
        // `verification_url`.
        Ok(match st.google_device_response {
            false => json!({
                "device_code": device_code,
                "user_code": user_code,
                "verification_uri": verification_uri,
                "expires_in": lifetime,
                "interval": interval,
                "message": format!(
                    "To sign in, use a web browser to open the page {verification_uri} and enter \
                     the code {user_code} to authenticate."
                ),
            }),
            true => json!({
                "device_code": device_code,
                "user_code": user_code,
                "verification_url": verification_uri,
                "expires_in": lifetime,
                "interval": interval,
            }),
        })
    })();
    finish(&inner, &mut st, rec, result)
}

/// `XXXX-XXXX` of consonants (RFC 8628 §6.1's base-20 alphabet).
fn user_code() -> String {
    const ALPHABET: &[u8] = b"BCDFGHJKLMNPQRSTVWXZ";
    let mut rng = rand::rng();
    let mut code = String::with_capacity(9);
    for i in 0..8 {
        if i == 4 {
            code.push('-');
        }
        code.push(ALPHABET[rng.random_range(0..ALPHABET.len())] as char);
    }
    code
}
