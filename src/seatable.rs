//! The SeaTable REST client: token exchange, rows, SQL, metadata and the schema calls.
//!
//! Protocol source: the SeaTable research notes (`reference/seatable-api.md`), cited below by
//! section (§1 authentication, §2 reads, §3 writes, §4 limits and errors, §6 conditional writes).
//!
//! # How it talks to SeaTable
//!
//! - **Auth (§1).** The base API token (never expires) is exchanged at
//!   `GET {server}/api/v2.1/dtable/app-access-token/` for a Base-Token, a JWT valid three days by
//!   default. The Base-Token is cached with the expiry decoded from its `exp` claim (not
//!   verified; one hour when the claim is missing or already past by our clock) and refreshed
//!   at 80% of its life. Concurrent callers share one refresh. A 401 or 403 from the gateway
//!   (current servers answer 403 for an expired token) triggers one refresh and one retry.
//! - **Endpoints.** Only the API gateway v2 (`{dtable_server}api/v2/dtables/{uuid}/…`, SeaTable
//!   4.4+, the only API left since 5.3). `dtable_server` and `dtable_uuid` come from the token
//!   reply; when the reply does not say `use_api_gateway: true`, `{server}/api-gateway/` is used.
//! - **Secrets.** Both tokens travel only in the `Authorization` header, marked sensitive, never
//!   in a URL, so [`reqwest::Error`]s (which print the URL) cannot contain them. Nothing here
//!   logs or `Debug`-prints a token; [`Row`]'s `Debug` hides password and token cells.
//! - **Retries (§4).** 429 (empty body on SeaTable) is retried with jittered exponential backoff,
//!   honouring `Retry-After` when present, then surfaces as [`SeaTableError::RateLimited`].
//!   5xx, network errors and timeouts are retried only for idempotent calls (GET, `PUT rows/`,
//!   SQL `SELECT`). Every request has its own timeout ([`ClientOptions::request_timeout`]).
//! - **Metrics.** Every HTTP request, retries and token exchanges included, is counted in
//!   [`Metrics::seatable_request`] by status (`None` for network errors and timeouts).
//!
//! # Sharing
//!
//! [`SeaTableClient`] is an `Arc` inside: clone it freely; clones share the HTTP client, the
//! cached Base-Token and its refresh.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use reqwest::Method;
use reqwest::header::{ACCEPT, AUTHORIZATION, HeaderMap, HeaderValue, RETRY_AFTER};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};
use tokio::sync::Mutex;
use url::Url;

use crate::metrics::Metrics;

mod error;
mod metadata;
mod row;
mod token;

pub use self::error::SeaTableError;
pub use self::metadata::{Column, Metadata, NewColumn, Table};
pub use self::row::Row;
pub use self::token::BaseInfo;

use self::error::{decode, status_error, transport_error};
use self::token::{BaseToken, TokenSlot};

/// Most rows one list, append or update call carries (§2.1, §3.1, §3.2, §4 "Size limits").
pub const MAX_ROWS_PER_CALL: usize = 1000;
/// Tunables of [`SeaTableClient`]; [`Default`] gives the production values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientOptions {
    /// Timeout of each HTTP request, from connecting to the end of the body. Default 30 s.
    pub request_timeout: Duration,
    /// Retries after the first attempt, for 429 (every call) and for 5xx, network errors and
    /// timeouts (idempotent calls only). Default 4 (about 15 s of backoff, up to twice that
    /// with jitter, which spans most of a per-minute rate-limit window).
    pub retries: usize,
    /// First backoff delay; it doubles per retry, plus up to as much again of jitter. Default 1 s.
    pub min_backoff: Duration,
    /// Longest backoff delay before jitter. Default 20 s.
    pub max_backoff: Duration,
    /// A 429's `Retry-After` up to this long is waited out; a longer one ends the retries at
    /// once with [`SeaTableError::RateLimited`]. Default 60 s.
    pub max_retry_after: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(30),
            retries: 4,
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(20),
            max_retry_after: Duration::from_secs(60),
        }
    }
}
/// The SeaTable client. Cheap to clone: an `Arc` inside, clones share the cached Base-Token.
#[derive(Clone)]
pub struct SeaTableClient {
    inner: Arc<Inner>,
}

struct Inner {
    server: Url,
    /// `Bearer {api token}`, marked sensitive.
    api_auth: HeaderValue,
    http: reqwest::Client,
    metrics: Arc<Metrics>,
    options: ClientOptions,
    token: Mutex<TokenSlot>,
}
impl fmt::Debug for SeaTableClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SeaTableClient")
            .field("server", &self.inner.server.as_str())
            .field("api_token", &"[REDACTED]")
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}
#[derive(Deserialize)]
struct RowsReply {
    rows: Vec<Row>,
}

#[derive(Deserialize)]
struct MetadataReply {
    metadata: Metadata,
}

#[derive(Deserialize)]
struct SuccessReply {
    #[serde(default)]
    success: Option<bool>,
}

#[derive(Deserialize)]
struct AppendReply {
    #[serde(default)]
    row_ids: Vec<RowId>,
}

#[derive(Deserialize)]
struct RowId {
    #[serde(rename = "_id")]
    id: String,
}

#[derive(Deserialize)]
struct SqlReply {
    #[serde(default)]
    success: Option<bool>,
    #[serde(default)]
    error_message: Option<String>,
    #[serde(default)]
    results: Option<Vec<Row>>,
}

/// One gateway call, kept whole so the retry after a Base-Token refresh sends the same request.
struct BaseRequest<'a> {
    method: Method,
    /// Path segments under the gateway prefix (`["rows"]`), each percent-encoded.
    segments: &'a [&'a str],
    query: &'a [(&'a str, String)],
    body: Option<Value>,
    idempotent: Idempotent,
    /// `METHOD path/`, for errors and logs.
    what: String,
}

/// Whether 5xx, network errors and timeouts may be retried.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Idempotent {
    Yes,
    No,
}

impl SeaTableClient {
    /// A client for the server at `server_url` (e.g. `https://cloud.seatable.io`, with or
    /// without a path prefix) and a base API token, with [`ClientOptions::default`]. Nothing is
    /// sent until the first call.
    ///
    /// # Errors
    /// [`SeaTableError::Config`] when the URL is not http(s) or the token is not a valid header
    /// value.
    pub fn new(
        server_url: &str,
        api_token: SecretString,
        http: reqwest::Client,
        metrics: Arc<Metrics>,
    ) -> Result<Self, SeaTableError> {
        Self::with_options(
            server_url,
            api_token,
            http,
            metrics,
            ClientOptions::default(),
        )
    }

    /// Like [`Self::new`] with explicit [`ClientOptions`].
    ///
    /// # Errors
    /// As [`Self::new`].
    pub fn with_options(
        server_url: &str,
        api_token: SecretString,
        http: reqwest::Client,
        metrics: Arc<Metrics>,
        options: ClientOptions,
    ) -> Result<Self, SeaTableError> {
        let mut server = Url::parse(server_url.trim()).map_err(|error| SeaTableError::Config {
            message: format!("server URL {server_url:?}: {error}"),
        })?;
        if !matches!(server.scheme(), "http" | "https") || server.cannot_be_a_base() {
            return Err(SeaTableError::Config {
                message: format!("server URL {server_url:?} is not an http(s) URL"),
            });
        }
        server.set_query(None);
        server.set_fragment(None);
        if !server.path().ends_with('/') {
            let path = format!("{}/", server.path());
            server.set_path(&path);
        }
        let api_auth = bearer(api_token.expose_secret()).ok_or_else(|| SeaTableError::Config {
            message: "the API token is empty or contains characters not allowed in an HTTP header"
                .to_owned(),
        })?;
        Ok(Self {
            inner: Arc::new(Inner {
                server,
                api_auth,
                http,
                metrics,
                options,
                token: Mutex::new(TokenSlot::default()),
            }),
        })
    }

    /// Makes sure a valid Base-Token is cached (exchanging the API token if needed) and says
    /// which base it opens. For `check`-style commands.
    ///
    /// # Errors
    /// [`SeaTableError::Unauthorized`] for a refused API token; the transport errors.
    pub async fn login(&self) -> Result<BaseInfo, SeaTableError> {
        Ok(self.base_token().await?.info.clone())
    }

    /// Every row of `table` (column names as keys), read with `GET rows/` in pages of
    /// [`MAX_ROWS_PER_CALL`] (`start`/`limit`, `convert_keys=true`) until a short page (§2.1).
    /// Link cells hold at most 50 links per row (§2.6).
    ///
    /// # Errors
    /// [`SeaTableError::NotFound`] (or `Api`) for an unknown table; [`SeaTableError::Decode`]
    /// when the server ignores `start` (the same page twice); the transport errors.
    pub async fn list_rows(&self, table: &str) -> Result<Vec<Row>, SeaTableError> {
        let mut rows: Vec<Row> = Vec::new();
        let mut previous_first: Option<String> = None;
        loop {
            let start = rows.len();
            let query = [
                ("table_name", table.to_owned()),
                ("start", start.to_string()),
                ("limit", MAX_ROWS_PER_CALL.to_string()),
                ("convert_keys", "true".to_owned()),
            ];
            let reply: RowsReply = self
                .gateway(Method::GET, &["rows"], &query, None, Idempotent::Yes)
                .await?;
            let count = reply.rows.len();
            let first = reply.rows.first().and_then(Row::id).map(str::to_owned);
            if first.is_some() && first == previous_first {
                return Err(SeaTableError::Decode {
                    message: format!(
                        "GET rows/ of {table}: the page at start={start} repeats the previous one"
                    ),
                });
            }
            previous_first = first;
            rows.extend(reply.rows);
            if count < MAX_ROWS_PER_CALL {
                return Ok(rows);
            }
        }
    }

    /// One row by id (`GET rows/{row_id}/`, `convert_keys=true`, §2.2).
    ///
    /// # Errors
    /// [`SeaTableError::NotFound`] for an unknown row (`row _id not exits`); the transport
    /// errors.
    pub async fn get_row(&self, table: &str, row_id: &str) -> Result<Row, SeaTableError> {
        let query = [
            ("table_name", table.to_owned()),
            ("convert_keys", "true".to_owned()),
        ];
        self.gateway(
            Method::GET,
            &["rows", row_id],
            &query,
            None,
            Idempotent::Yes,
        )
        .await
    }

    /// Overwrites cells: each `(row_id, cells)` with cells keyed by column **name** (§3.1),
    /// sent with `PUT rows/` in batches of [`MAX_ROWS_PER_CALL`].
    ///
    /// SeaTable silently ignores unknown column names and stores only JSON `true` as a ticked
    /// checkbox, so check the schema first ([`crate::schema::Schema::missing`]). The updates
    /// are unconditional; for a write-once claim use [`Self::sql`] with `UPDATE … WHERE … IS
    /// NULL` and read back (§6). Batches are applied in order; when one fails the earlier ones
    /// stay applied. Retried on 5xx and network errors (setting the same values twice is
    /// harmless).
    ///
    /// # Errors
    /// The transport errors; [`SeaTableError::Api`] when the server answers `success: false`.
    pub async fn update_rows<S: AsRef<str>>(
        &self,
        table: &str,
        updates: &[(S, Map<String, Value>)],
    ) -> Result<(), SeaTableError> {
        for batch in updates.chunks(MAX_ROWS_PER_CALL) {
            let updates: Vec<Value> = batch
                .iter()
                .map(|(row_id, row)| json!({ "row_id": row_id.as_ref(), "row": row }))
                .collect();
            let body = json!({ "table_name": table, "updates": updates });
            let reply: SuccessReply = self
                .gateway(Method::PUT, &["rows"], &[], Some(body), Idempotent::Yes)
                .await?;
            if reply.success == Some(false) {
                return Err(SeaTableError::Api {
                    status: 200,
                    error_type: None,
                    message: "PUT rows/: success is false".to_owned(),
                });
            }
        }
        Ok(())
    }

    /// Appends rows (cells keyed by column name; unknown names are ignored) with `POST rows/`
    /// in batches of [`MAX_ROWS_PER_CALL`], and returns the new row ids in order (§3.2). For
    /// tests and tools: not retried on 5xx or network errors (it is not idempotent).
    ///
    /// # Errors
    /// The transport errors; [`SeaTableError::Decode`] when the reply lacks the row ids.
    pub async fn append_rows(
        &self,
        table: &str,
        rows: &[Map<String, Value>],
    ) -> Result<Vec<String>, SeaTableError> {
        let mut ids = Vec::with_capacity(rows.len());
        for batch in rows.chunks(MAX_ROWS_PER_CALL) {
            let body = json!({ "table_name": table, "rows": batch });
            let reply: AppendReply = self
                .gateway(Method::POST, &["rows"], &[], Some(body), Idempotent::No)
                .await?;
            if reply.row_ids.len() != batch.len() {
                return Err(SeaTableError::Decode {
                    message: format!(
                        "POST rows/: {} rows sent, {} ids returned",
                        batch.len(),
                        reply.row_ids.len()
                    ),
                });
            }
            ids.extend(reply.row_ids.into_iter().map(|row| row.id));
        }
        Ok(ids)
    }

    /// Links rows of `table` to rows of `other_table` through the link column whose
    /// `link_id` is given (from [`Self::metadata`]): `POST links/` (§3.6) with
    /// `other_rows_ids_map` `{row_id: [other_row_id, …]}`. Links that exist stay as they are,
    /// so linking again is harmless; still not retried on 5xx or network errors.
    ///
    /// # Errors
    /// [`SeaTableError::Api`] (400) for an unknown `link_id` or tables it does not link; the
    /// transport errors.
    pub async fn add_links(
        &self,
        link_id: &str,
        table: &str,
        other_table: &str,
        links: &[(String, Vec<String>)],
    ) -> Result<(), SeaTableError> {
        let map: Map<String, Value> = links
            .iter()
            .map(|(row, others)| (row.clone(), json!(others)))
            .collect();
        let body = json!({
            "link_id": link_id,
            "table_name": table,
            "other_table_name": other_table,
            "other_rows_ids_map": map,
        });
        let reply: SuccessReply = self
            .gateway(Method::POST, &["links"], &[], Some(body), Idempotent::No)
            .await?;
        if reply.success == Some(false) {
            return Err(SeaTableError::Api {
                status: 200,
                error_type: None,
                message: "POST links/: success is false".to_owned(),
            });
        }
        Ok(())
    }

    /// Runs one SQL statement (`POST sql/`, `convert_keys: true`, §2.3) with `?` placeholders
    /// bound to `params` in order (strings or integers), and returns the result rows keyed by
    /// column name.
    ///
    /// - `SELECT` returns 100 rows unless the statement has a `LIMIT` (at most 10,000).
    /// - `UPDATE` and `DELETE` return no rows and **no affected count**, even when nothing
    ///   matched: read back to learn the outcome (§6).
    /// - Statements starting with `SELECT` are retried on 5xx and network errors; others only
    ///   on 429.
    ///
    /// # Errors
    /// [`SeaTableError::Api`] for a 400 (`no such table: X`, `no such column: X`, syntax) or a
    /// reply with `success: false`; the transport errors.
    pub async fn sql(&self, sql: &str, params: &[Value]) -> Result<Vec<Row>, SeaTableError> {
        let is_select = sql
            .trim_start()
            .get(..6)
            .is_some_and(|word| word.eq_ignore_ascii_case("select"));
        let idempotent = if is_select {
            Idempotent::Yes
        } else {
            Idempotent::No
        };
        let body = json!({ "sql": sql, "parameters": params, "convert_keys": true });
        let reply: SqlReply = self
            .gateway(Method::POST, &["sql"], &[], Some(body), idempotent)
            .await?;
        if reply.success == Some(false) {
            return Err(SeaTableError::Api {
                status: 200,
                error_type: None,
                message: format!(
                    "POST sql/: {}",
                    reply
                        .error_message
                        .filter(|message| !message.is_empty())
                        .unwrap_or_else(|| "success is false".to_owned())
                ),
            });
        }
        Ok(reply.results.unwrap_or_default())
    }

    /// The base's tables and columns (`GET metadata/`, §2.4).
    ///
    /// # Errors
    /// The transport errors; [`SeaTableError::Decode`] for an unexpected shape.
    pub async fn metadata(&self) -> Result<Metadata, SeaTableError> {
        let reply: MetadataReply = self
            .gateway(Method::GET, &["metadata"], &[], None, Idempotent::Yes)
            .await?;
        Ok(reply.metadata)
    }

    /// Creates a table (`POST tables/`, §3.4) with these columns, and returns it. With an empty
    /// `columns` SeaTable adds a default `Name` column; otherwise the first column must be
    /// text, number, date, single-select, formula or auto-number. Link columns cannot be
    /// created here: add them with [`Self::add_column`] once both tables exist.
    ///
    /// # Errors
    /// [`SeaTableError::Api`] (400) for a duplicate name or a bad column; the transport errors.
    pub async fn create_table(
        &self,
        table: &str,
        columns: &[NewColumn],
    ) -> Result<Table, SeaTableError> {
        let body = json!({ "table_name": table, "columns": columns });
        self.gateway(Method::POST, &["tables"], &[], Some(body), Idempotent::No)
            .await
    }

    /// Adds one column to `table` (`POST columns/`, §3.5) and returns it. A link column
    /// ([`NewColumn::link`]) also appears in the other table, created by SeaTable.
    ///
    /// # Errors
    /// [`SeaTableError::Api`] (400) with `error_type` `column_already_exists` for a duplicate
    /// name or `column_data_error` for bad settings; the transport errors.
    pub async fn add_column(
        &self,
        table: &str,
        column: &NewColumn,
    ) -> Result<Column, SeaTableError> {
        let mut body = json!({
            "table_name": table,
            "column_name": column.name,
            "column_type": column.column_type,
        });
        if let (Some(data), Some(object)) = (&column.data, body.as_object_mut()) {
            object.insert("column_data".to_owned(), data.clone());
        }
        self.gateway(Method::POST, &["columns"], &[], Some(body), Idempotent::No)
            .await
    }

    /// One base call: the Base-Token, the call with its retries, and on 401/403 one refresh
    /// and one more try.
    async fn gateway<T: DeserializeOwned>(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, String)],
        body: Option<Value>,
        idempotent: Idempotent,
    ) -> Result<T, SeaTableError> {
        let request = BaseRequest {
            what: format!("{method} {}/", segments.join("/")),
            method,
            segments,
            query,
            body,
            idempotent,
        };
        let token = self.base_token().await?;
        let bytes = match self.send_base(&token, &request).await {
            Err(SeaTableError::Unauthorized { status, .. }) => {
                tracing::info!(%status, request = %request.what, "SeaTable refused the Base-Token; refreshing it once");
                let fresh = self.refresh_rejected(&token).await?;
                self.send_base(&fresh, &request).await?
            }
            other => other?,
        };
        decode(&bytes, &request.what)
    }

    /// `request` against the gateway of `token`.
    async fn send_base(
        &self,
        token: &BaseToken,
        request: &BaseRequest<'_>,
    ) -> Result<bytes::Bytes, SeaTableError> {
        let url = gateway_url(&token.gateway, request.segments, request.query)?;
        self.send(
            &request.method,
            &url,
            &token.auth,
            request.body.as_ref(),
            request.idempotent,
            &request.what,
        )
        .await
    }

    /// One request with the retry policy: 429 always, 5xx/network/timeout when idempotent.
    async fn send(
        &self,
        method: &Method,
        url: &Url,
        auth: &HeaderValue,
        body: Option<&Value>,
        idempotent: Idempotent,
        what: &str,
    ) -> Result<bytes::Bytes, SeaTableError> {
        let options = &self.inner.options;
        let backoff = ExponentialBuilder::default()
            .with_jitter()
            .with_min_delay(options.min_backoff)
            .with_max_delay(options.max_backoff)
            .with_max_times(options.retries);
        let max_retry_after = options.max_retry_after;
        (|| self.attempt(method, url, auth, body, what))
            .retry(backoff)
            .when(|error| match error {
                SeaTableError::RateLimited { .. } => true,
                SeaTableError::Server { .. } | SeaTableError::Network(_) | SeaTableError::Timeout => {
                    idempotent == Idempotent::Yes
                }
                _ => false,
            })
            .adjust(|error, delay| match (error, delay) {
                (SeaTableError::RateLimited { retry_after: Some(wait) }, Some(_)) => {
                    (*wait <= max_retry_after).then_some(*wait)
                }
                (_, delay) => delay,
            })
            .notify(|error, delay| {
                tracing::warn!(%error, request = %what, delay_ms = delay.as_millis() as u64, "SeaTable call failed; retrying");
            })
            .await
    }

    /// One HTTP exchange, counted in the metrics.
    async fn attempt(
        &self,
        method: &Method,
        url: &Url,
        auth: &HeaderValue,
        body: Option<&Value>,
        what: &str,
    ) -> Result<bytes::Bytes, SeaTableError> {
        let mut request = self
            .inner
            .http
            .request(method.clone(), url.clone())
            .header(AUTHORIZATION, auth.clone())
            .header(ACCEPT, "application/json")
            .timeout(self.inner.options.request_timeout);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(error) => {
                self.inner.metrics.seatable_request(None);
                return Err(transport_error(error));
            }
        };
        let status = response.status();
        self.inner.metrics.seatable_request(Some(status.as_u16()));
        let retry_after = retry_after(response.headers());
        let bytes = response.bytes().await.map_err(transport_error)?;
        tracing::debug!(request = %what, status = status.as_u16(), "SeaTable answered");
        if status.is_success() {
            Ok(bytes)
        } else {
            Err(status_error(status, retry_after, &bytes, what))
        }
    }
}

/// `Bearer {token}` as a sensitive header value; `None` when empty or not a valid value.
fn bearer(token: &str) -> Option<HeaderValue> {
    let token = token.trim();
    if token.is_empty() {
        return None;
    }
    let mut value = HeaderValue::from_str(&format!("Bearer {token}")).ok()?;
    value.set_sensitive(true);
    Some(value)
}

/// `gateway` + `segments` (each percent-encoded, with a trailing slash) + `query`.
fn gateway_url(
    gateway: &Url,
    segments: &[&str],
    query: &[(&str, String)],
) -> Result<Url, SeaTableError> {
    let mut url = gateway.clone();
    url.path_segments_mut()
        .map_err(|()| SeaTableError::Config {
            message: "the gateway URL cannot hold a path".to_owned(),
        })?
        .pop_if_empty()
        .extend(segments)
        .push("");
    if !query.is_empty() {
        url.query_pairs_mut()
            .extend_pairs(query.iter().map(|(name, value)| (*name, value.as_str())));
    }
    Ok(url)
}

/// How long a 429 asks to wait: `Retry-After` in seconds. (`x-ratelimit-reset` is not used:
/// whether it ends the per-minute or the daily window is documented both ways, §4, §9.)
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let text = headers.get(RETRY_AFTER)?.to_str().ok()?;
    text.trim().parse::<u64>().ok().map(Duration::from_secs)
}

#[cfg(test)]
mod tests;
