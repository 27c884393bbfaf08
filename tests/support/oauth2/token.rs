//! `POST /token`: the refresh, device-code, authorization-code, client-credentials and JWT
//! bearer grants.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Value};
use sha2::{Digest as _, Sha256};
use tokio::time::Instant;

use super::authorize::valid_pkce_string;
use super::http::{
    Authenticated, OAuthError, authenticate_client, check_form_content_type, err, finish,
    invalid_grant, invalid_request, new_record, parse_form, required,
};
use super::state::{Inner, ServerState, unix_now};
use super::{
    DEVICE_CODE_GRANT, DeviceOutcome, Endpoint, JWT_BEARER_GRANT, JWT_CLOCK_SKEW_SECS,
    JWT_MAX_LIFETIME_SECS, SLOW_DOWN_STEP_SECS, TokenRequest,
};

pub(super) async fn token_endpoint(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut rec = new_record(Endpoint::Token);
    let (params, form_ok) = parse_form(&body);
    rec.params = params.clone();
    rec.grant_type = params.get("grant_type").cloned();
    rec.scope = params.get("scope").cloned();
    let mut st = inner.lock();
    if st.fail_token_requests > 0 {
        st.fail_token_requests -= 1;
        let e = err(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            "The server is temporarily too busy to handle the request.",
        );
        return finish(&inner, &mut st, rec, Err(e));
    }
    let token_url = inner.token_url();
    let result = (|| -> Result<Value, OAuthError> {
        check_form_content_type(&headers)?;
        form_ok?;
        let grant = params
            .get("grant_type")
            .ok_or_else(|| invalid_request("Missing required parameter: grant_type"))?
            .clone();
        let known = [
            "refresh_token",
            DEVICE_CODE_GRANT,
            "authorization_code",
            "client_credentials",
            JWT_BEARER_GRANT,
        ];
        if !known.contains(&grant.as_str()) {
            return Err(err(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                format!("Invalid grant_type: {grant}"),
            ));
        }
        let client =
            authenticate_client(&st, &headers, &params, &mut rec, grant != JWT_BEARER_GRANT)?;
        match grant.as_str() {
            "refresh_token" => refresh_grant(&mut st, client.unwrap(), &params, &mut rec),
            DEVICE_CODE_GRANT => device_grant(&mut st, client.unwrap(), &params, &mut rec),
            "authorization_code" => auth_code_grant(&mut st, client.unwrap(), &params, &mut rec),
            "client_credentials" => {
                client_credentials_grant(&mut st, client.unwrap(), &params, &mut rec)
            }
            _ => jwt_bearer_grant(&mut st, client, &params, &mut rec, &token_url),
        }
    })();
    finish(&inner, &mut st, rec, result)
}

fn scopes(s: &str) -> Vec<&str> {
    s.split(' ').filter(|p| !p.is_empty()).collect()
}

/// The §5.1 success body.
fn token_body(
    access_token: String,
    expires_in: u64,
    scope: Option<&str>,
    refresh_token: Option<String>,
) -> Value {
    let mut m = Map::new();
    m.insert("access_token".into(), Value::String(access_token));
    m.insert("token_type".into(), Value::String("Bearer".into()));
    m.insert("expires_in".into(), Value::from(expires_in));
    if let Some(scope) = scope {
        m.insert("scope".into(), Value::String(scope.to_owned()));
    }
    if let Some(rt) = refresh_token {
        m.insert("refresh_token".into(), Value::String(rt));
    }
    Value::Object(m)
}

fn refresh_grant(
    st: &mut ServerState,
    client: Authenticated,
    params: &BTreeMap<String, String>,
    rec: &mut TokenRequest,
) -> Result<Value, OAuthError> {
    let token = required(params, "refresh_token")?;
    rec.refresh_token_used = Some(token.to_owned());
    let (username, scope) = match st.refresh_tokens.get(token) {
        Some(rt) if !rt.revoked && rt.client_id == client.client_id => {
            (rt.username.clone(), rt.scope.clone())
        }
        _ => return Err(invalid_grant("Token has been expired or revoked.")),
    };
    // RFC 6749 §6: a narrower scope may be asked for, never a wider one.
    let granted = match params.get("scope") {
        Some(asked) => {
            let have = scopes(&scope);
            if let Some(extra) = scopes(asked).into_iter().find(|s| !have.contains(s)) {
                return Err(err(
                    StatusCode::BAD_REQUEST,
                    "invalid_scope",
                    format!("The scope {extra} was not granted to this refresh token."),
                ));
            }
            asked.clone()
        }
        None => scope.clone(),
    };
    rec.username = Some(username.clone());
    let (at, expires_in) = st.new_access_token(&client.client_id, &username, &granted);
    let new_rt = if st.rotation {
        st.refresh_tokens.get_mut(token).unwrap().revoked = true;
        Some(st.new_refresh_token(&client.client_id, &username, &scope))
    } else {
        None
    };
    Ok(token_body(at, expires_in, Some(&granted), new_rt))
}

fn wants_refresh_token(st: &ServerState, scope: &str, access_type_offline: bool) -> bool {
    !st.require_offline_access || access_type_offline || scopes(scope).contains(&"offline_access")
}

fn device_grant(
    st: &mut ServerState,
    client: Authenticated,
    params: &BTreeMap<String, String>,
    rec: &mut TokenRequest,
) -> Result<Value, OAuthError> {
    let code = required(params, "device_code")?;
    let now = Instant::now();
    let Some(grant) = st.device_codes.get_mut(code) else {
        return Err(invalid_grant("The device code is not known."));
    };
    if grant.client_id != client.client_id {
        return Err(invalid_grant(
            "The device code was issued to another client.",
        ));
    }
    if grant.finished {
        return Err(invalid_grant("The device code has already been used."));
    }
    let since = grant.last_poll.unwrap_or(grant.issued_at);
    grant.last_poll = Some(now);
    if now >= grant.expires_at {
        grant.finished = true;
        return Err(err(
            StatusCode::BAD_REQUEST,
            "expired_token",
            "The device code has expired.",
        ));
    }
    // RFC 8628 §3.5: too soon (or a scripted busy server) -> slow_down, and the interval
    // grows by 5 s for good.
    let too_soon = now.duration_since(since) < Duration::from_secs(grant.interval);
    if too_soon || grant.forced_slow_downs > 0 {
        if !too_soon {
            grant.forced_slow_downs -= 1;
        }
        grant.interval += SLOW_DOWN_STEP_SECS;
        return Err(err(
            StatusCode::BAD_REQUEST,
            "slow_down",
            format!(
                "Polling too frequently; wait at least {} s between polls.",
                grant.interval
            ),
        ));
    }
    if grant.pending_left > 0 || grant.outcome.is_none() {
        grant.pending_left = grant.pending_left.saturating_sub(1);
        return Err(err(
            StatusCode::BAD_REQUEST,
            "authorization_pending",
            "The user has not yet completed authorization.",
        ));
    }
    grant.finished = true;
    let scope = grant.scope.clone();
    match grant.outcome.clone().unwrap() {
        DeviceOutcome::Approve { username } => {
            rec.username = Some(username.clone());
            let (at, expires_in) = st.new_access_token(&client.client_id, &username, &scope);
            let rt = wants_refresh_token(st, &scope, false)
                .then(|| st.new_refresh_token(&client.client_id, &username, &scope));
            Ok(token_body(at, expires_in, Some(&scope), rt))
        }
        DeviceOutcome::Deny => Err(err(
            StatusCode::BAD_REQUEST,
            "access_denied",
            "The user declined the authorization request.",
        )),
        DeviceOutcome::Expire => Err(err(
            StatusCode::BAD_REQUEST,
            "expired_token",
            "The device code has expired.",
        )),
    }
}

fn auth_code_grant(
    st: &mut ServerState,
    client: Authenticated,
    params: &BTreeMap<String, String>,
    rec: &mut TokenRequest,
) -> Result<Value, OAuthError> {
    let code = required(params, "code")?;
    let redirect_uri = required(params, "redirect_uri")?;
    let verifier = required(params, "code_verifier")?;
    let now = Instant::now();
    let Some(ac) = st.auth_codes.get_mut(code) else {
        return Err(invalid_grant("Malformed auth code."));
    };
    if ac.used {
        // RFC 6749 §4.1.2: a code used twice revokes what its first use issued.
        let (at, rt) = (ac.issued_access.take(), ac.issued_refresh.take());
        if let Some(at) = at.and_then(|t| st.access_tokens.get_mut(&t)) {
            at.revoked = true;
        }
        if let Some(rt) = rt.and_then(|t| st.refresh_tokens.get_mut(&t)) {
            rt.revoked = true;
        }
        return Err(invalid_grant(
            "The authorization code has already been used.",
        ));
    }
    if ac.client_id != client.client_id {
        return Err(invalid_grant(
            "The authorization code was issued to another client.",
        ));
    }
    if now >= ac.expires_at {
        return Err(invalid_grant("The authorization code has expired."));
    }
    if ac.redirect_uri != redirect_uri {
        return Err(invalid_grant(
            "redirect_uri does not match the authorization request.",
        ));
    }
    // RFC 7636 §4.6: BASE64URL(SHA256(ASCII(code_verifier))) == code_challenge.
    if !valid_pkce_string(verifier)
        || URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes())) != ac.code_challenge
    {
        return Err(invalid_grant("Invalid code verifier."));
    }
    ac.used = true;
    let (username, scope, offline) = (ac.username.clone(), ac.scope.clone(), ac.offline);
    rec.username = Some(username.clone());
    let (at, expires_in) = st.new_access_token(&client.client_id, &username, &scope);
    let rt = wants_refresh_token(st, &scope, offline)
        .then(|| st.new_refresh_token(&client.client_id, &username, &scope));
    let ac = st.auth_codes.get_mut(code).unwrap();
    ac.issued_access = Some(at.clone());
    ac.issued_refresh = rt.clone();
    Ok(token_body(at, expires_in, Some(&scope), rt))
}

fn client_credentials_grant(
    st: &mut ServerState,
    client: Authenticated,
    params: &BTreeMap<String, String>,
    rec: &mut TokenRequest,
) -> Result<Value, OAuthError> {
    let Some(mailbox) = st.clients[&client.client_id].app_mailbox.clone() else {
        return Err(err(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            "The client is not authorized to use the client_credentials grant.",
        ));
    };
    let scope = params.get("scope").cloned().unwrap_or_default();
    rec.username = Some(mailbox.clone());
    let (at, expires_in) = st.new_access_token(&client.client_id, &mailbox, &scope);
    Ok(token_body(at, expires_in, None, None))
}

fn jwt_bearer_grant(
    st: &mut ServerState,
    client: Option<Authenticated>,
    params: &BTreeMap<String, String>,
    rec: &mut TokenRequest,
    token_url: &str,
) -> Result<Value, OAuthError> {
    let assertion = required(params, "assertion")?;
    let claims = verify_assertion(st, assertion, token_url, unix_now() as i64)?;
    rec.username = Some(claims.subject.clone());
    let client_id = client.map(|c| c.client_id).unwrap_or(claims.issuer);
    let (at, expires_in) = st.new_access_token(&client_id, &claims.subject, &claims.scope);
    Ok(token_body(at, expires_in, None, None))
}

struct AssertionClaims {
    issuer: String,
    subject: String,
    scope: String,
}

/// RFC 7523 §3 checks of an RS256 assertion, with Google's error texts.
fn verify_assertion(
    st: &ServerState,
    assertion: &str,
    token_url: &str,
    now: i64,
) -> Result<AssertionClaims, OAuthError> {
    let parts: Vec<&str> = assertion.split('.').collect();
    let [h, p, s] = parts[..] else {
        return Err(invalid_grant("Invalid JWT: not three base64url parts."));
    };
    let decode_json = |part: &str| -> Option<Map<String, Value>> {
        let bytes = URL_SAFE_NO_PAD.decode(part).ok()?;
        match serde_json::from_slice(&bytes).ok()? {
            Value::Object(m) => Some(m),
            _ => None,
        }
    };
    let header = decode_json(h).ok_or_else(|| invalid_grant("Invalid JWT: bad header."))?;
    let claims = decode_json(p).ok_or_else(|| invalid_grant("Invalid JWT: bad claim set."))?;
    let signature = URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| invalid_grant("Invalid JWT Signature."))?;
    if header.get("alg").and_then(Value::as_str) != Some("RS256") {
        return Err(invalid_grant("Invalid JWT: alg must be RS256."));
    }
    let issuer = claims
        .get("iss")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid_grant("Invalid JWT: no iss claim."))?;
    let key = st
        .service_accounts
        .get(issuer)
        .ok_or_else(|| invalid_grant("Invalid grant: account not found"))?;
    let signing_input = format!("{h}.{p}");
    ring::signature::UnparsedPublicKey::new(&ring::signature::RSA_PKCS1_2048_8192_SHA256, key)
        .verify(signing_input.as_bytes(), &signature)
        .map_err(|_| invalid_grant("Invalid JWT Signature."))?;
    if claims.get("aud").and_then(Value::as_str) != Some(token_url) {
        return Err(invalid_grant(format!(
            "Invalid JWT: Failed audience check. The right audience is {token_url}"
        )));
    }
    let time = |name: &str| claims.get(name).and_then(Value::as_i64);
    let short_lived = "Invalid JWT: Token must be a short-lived token (60 minutes) and in a \
                       reasonable timeframe. Check your iat and exp values in the JWT claim.";
    let (Some(iat), Some(exp)) = (time("iat"), time("exp")) else {
        return Err(invalid_grant(short_lived));
    };
    if exp <= now
        || iat > now + JWT_CLOCK_SKEW_SECS
        || exp <= iat
        || exp - iat > JWT_MAX_LIFETIME_SECS
    {
        return Err(invalid_grant(short_lived));
    }
    let scope = claims
        .get("scope")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            err(
                StatusCode::BAD_REQUEST,
                "invalid_scope",
                "Invalid OAuth scope or ID token audience provided.",
            )
        })?;
    let subject = claims
        .get("sub")
        .and_then(Value::as_str)
        .unwrap_or(issuer)
        .to_owned();
    Ok(AssertionClaims {
        issuer: issuer.to_owned(),
        subject,
        scope: scope.to_owned(),
    })
}
