//! The Base-Token: the API token is exchanged at `app-access-token` (§1) for a JWT that every
//! gateway call carries; cached, refreshed at 80 % of its lifetime and once more on a 401/403.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use reqwest::Method;
use reqwest::header::HeaderValue;
use serde::Deserialize;
use serde_json::{Map, Value};
use url::Url;

use super::error::SeaTableError;
use super::{Idempotent, SeaTableClient, bearer};

/// Base-Token lifetime assumed when its `exp` claim cannot be read (the server default is
/// three days, §1; this is deliberately shorter).
pub(super) const FALLBACK_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);

/// After a failed refresh while the old Base-Token is still valid, the next attempt waits this
/// long (the token endpoint allows 60 requests a minute on SeaTable Cloud, §1).
pub(super) const REFRESH_RETRY_PAUSE: Duration = Duration::from_secs(60);

/// What the token exchange told about the base (see [`SeaTableClient::login`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseInfo {
    /// The base's uuid.
    pub dtable_uuid: String,
    /// The base's name, when the server sent it.
    pub dtable_name: Option<String>,
    /// The token's permission from the JWT: `r` (read-only) or `rw`, when present.
    pub permission: Option<String>,
    /// The gateway prefix every base call uses (`…/api/v2/dtables/{uuid}/`).
    pub gateway_url: String,
}

#[derive(Default)]
pub(super) struct TokenSlot {
    pub(super) current: Option<Arc<BaseToken>>,
    pub(super) generation: u64,
}

/// A cached Base-Token. Deliberately no `Debug`.
#[derive(Clone)]
pub(super) struct BaseToken {
    /// `Bearer {jwt}`, marked sensitive.
    pub(super) auth: HeaderValue,
    pub(super) gateway: Url,
    pub(super) info: BaseInfo,
    pub(super) refresh_at: Instant,
    pub(super) expires_at: Instant,
    pub(super) generation: u64,
}

/// The app-access-token reply (§1). Deliberately no `Debug`: it holds the Base-Token.
#[derive(Deserialize)]
pub(super) struct AccessTokenReply {
    pub(super) access_token: String,
    pub(super) dtable_uuid: String,
    #[serde(default)]
    pub(super) dtable_server: Option<String>,
    #[serde(default)]
    pub(super) use_api_gateway: Option<bool>,
    #[serde(default)]
    pub(super) dtable_name: Option<String>,
}

/// The gateway prefix `…/api/v2/dtables/{uuid}/`: from `dtable_server` when the reply says
/// `use_api_gateway: true` and it is an http(s) URL, else `{server}/api-gateway/` (§1).
pub(super) fn gateway_base(
    server: &Url,
    dtable_server: Option<&str>,
    use_api_gateway: Option<bool>,
    dtable_uuid: &str,
) -> Result<Url, SeaTableError> {
    let decode_error = |message: String| SeaTableError::Decode {
        message: format!("GET /api/v2.1/dtable/app-access-token/: {message}"),
    };
    if dtable_uuid.trim().is_empty() {
        return Err(decode_error("empty dtable_uuid".to_owned()));
    }
    let announced = match (use_api_gateway, dtable_server) {
        (Some(true), Some(text)) => Url::parse(text)
            .ok()
            .filter(|url| matches!(url.scheme(), "http" | "https") && !url.cannot_be_a_base()),
        _ => None,
    };
    let mut base = match announced {
        Some(mut url) => {
            url.set_query(None);
            url.set_fragment(None);
            url
        }
        None => server
            .join("api-gateway/")
            .map_err(|error| decode_error(error.to_string()))?,
    };
    base.path_segments_mut()
        .map_err(|()| decode_error("dtable_server cannot hold a path".to_owned()))?
        .pop_if_empty()
        .extend(["api", "v2", "dtables", dtable_uuid, ""]);
    Ok(base)
}

/// The JWT payload, decoded without verifying the signature; `None` when it is not a JWT.
pub(super) fn jwt_claims(token: &str) -> Option<Map<String, Value>> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    match serde_json::from_slice(&bytes).ok()? {
        Value::Object(claims) => Some(claims),
        _ => None,
    }
}

/// The token's remaining life from its `exp` claim (Unix seconds, integer or float) at
/// `now`; [`FALLBACK_TOKEN_LIFETIME`] when the claim is missing, not a number, or not in the
/// future by our clock (then our clock is off, or the token is bad and the 403 path handles it).
pub(super) fn token_lifetime(exp: Option<&Value>, now: SystemTime) -> Duration {
    let Some(exp) = exp.and_then(Value::as_f64) else {
        return FALLBACK_TOKEN_LIFETIME;
    };
    let now = now
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |since| since.as_secs_f64());
    let remaining = exp - now;
    if remaining.is_finite() && remaining > 0.0 {
        // Longer than a year is nonsense; cap it so a bad claim cannot pin a token forever.
        Duration::from_secs_f64(remaining.min(365.0 * 86_400.0))
    } else {
        FALLBACK_TOKEN_LIFETIME
    }
}

impl SeaTableClient {
    /// The cached Base-Token, exchanged first when missing or due for refresh. Holding the
    /// lock across the exchange makes concurrent callers share it.
    pub(super) async fn base_token(&self) -> Result<Arc<BaseToken>, SeaTableError> {
        let mut slot = self.inner.token.lock().await;
        let now = Instant::now();
        if let Some(token) = &slot.current
            && now < token.refresh_at
        {
            return Ok(token.clone());
        }
        match self.exchange(slot.generation + 1).await {
            Ok(token) => {
                slot.generation = token.generation;
                let token = Arc::new(token);
                slot.current = Some(token.clone());
                Ok(token)
            }
            Err(error) => {
                if let Some(old) = &slot.current
                    && error.is_transient()
                    && now < old.expires_at
                {
                    tracing::warn!(%error, "refreshing the SeaTable Base-Token failed; using the current one a little longer");
                    let mut old = (**old).clone();
                    old.refresh_at = (now + REFRESH_RETRY_PAUSE).min(old.expires_at);
                    let old = Arc::new(old);
                    slot.current = Some(old.clone());
                    return Ok(old);
                }
                Err(error)
            }
        }
    }

    /// A new Base-Token after the gateway refused `rejected`, unless another caller already
    /// replaced it, in which case that one is returned.
    pub(super) async fn refresh_rejected(
        &self,
        rejected: &BaseToken,
    ) -> Result<Arc<BaseToken>, SeaTableError> {
        let mut slot = self.inner.token.lock().await;
        if let Some(current) = &slot.current
            && current.generation != rejected.generation
        {
            return Ok(current.clone());
        }
        let token = Arc::new(self.exchange(slot.generation + 1).await?);
        slot.generation = token.generation;
        slot.current = Some(token.clone());
        Ok(token)
    }

    /// `GET /api/v2.1/dtable/app-access-token/` (§1).
    pub(super) async fn exchange(&self, generation: u64) -> Result<BaseToken, SeaTableError> {
        const WHAT: &str = "GET /api/v2.1/dtable/app-access-token/";
        let url = self
            .inner
            .server
            .join("api/v2.1/dtable/app-access-token/")
            .map_err(|error| SeaTableError::Config {
                message: format!("token URL: {error}"),
            })?;
        let fetched = Instant::now();
        let fetched_at = SystemTime::now();
        let bytes = self
            .send(
                &Method::GET,
                &url,
                &self.inner.api_auth,
                None,
                Idempotent::Yes,
                WHAT,
            )
            .await?;
        // serde's messages may quote values; for this reply they must not (it holds the token).
        let reply: AccessTokenReply =
            serde_json::from_slice(&bytes).map_err(|error| SeaTableError::Decode {
                message: format!(
                    "{WHAT}: not the expected token reply ({:?} error at line {} column {})",
                    error.classify(),
                    error.line(),
                    error.column()
                ),
            })?;
        let auth = bearer(&reply.access_token).ok_or_else(|| SeaTableError::Decode {
            message: format!("{WHAT}: the access token is empty or not a valid header value"),
        })?;
        let gateway = gateway_base(
            &self.inner.server,
            reply.dtable_server.as_deref(),
            reply.use_api_gateway,
            &reply.dtable_uuid,
        )?;
        let claims = jwt_claims(&reply.access_token);
        let lifetime = token_lifetime(
            claims.as_ref().and_then(|claims| claims.get("exp")),
            fetched_at,
        );
        let permission = claims
            .as_ref()
            .and_then(|claims| claims.get("permission"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        tracing::debug!(
            lifetime_secs = lifetime.as_secs(),
            "got a SeaTable Base-Token"
        );
        Ok(BaseToken {
            auth,
            info: BaseInfo {
                dtable_uuid: reply.dtable_uuid,
                dtable_name: reply.dtable_name,
                permission,
                gateway_url: gateway.to_string(),
            },
            gateway,
            refresh_at: fetched + lifetime.mul_f64(0.8),
            expires_at: fetched + lifetime,
            generation,
        })
    }
}
