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
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use backon::{ExponentialBuilder, Retryable};
use base64::Engine as _;
use reqwest::header::{ACCEPT, AUTHORIZATION, HeaderMap, HeaderValue, RETRY_AFTER};
use reqwest::{Method, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tokio::sync::Mutex;
use url::Url;

use crate::metrics::Metrics;

/// Most rows one list, append or update call carries (§2.1, §3.1, §3.2, §4 "Size limits").
pub const MAX_ROWS_PER_CALL: usize = 1000;

/// Base-Token lifetime assumed when its `exp` claim cannot be read (the server default is
/// three days, §1; this is deliberately shorter).
const FALLBACK_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);

/// After a failed refresh while the old Base-Token is still valid, the next attempt waits this
/// long (the token endpoint allows 60 requests a minute on SeaTable Cloud, §1).
const REFRESH_RETRY_PAUSE: Duration = Duration::from_secs(60);

/// Error bodies that are not one of the three JSON formats are quoted up to this many chars.
const ERROR_BODY_QUOTE_CHARS: usize = 300;

/// Why a SeaTable call failed. Callers branch on the variant: [`Self::is_transient`] says
/// whether trying again later may help.
///
/// `message` fields start with the request (`GET rows/`) followed by the server's message, read
/// from `error_message`, `error_msg` or `detail` (the three formats of §4), or else the raw body
/// (truncated). They never contain tokens or row contents.
#[derive(Debug, thiserror::Error)]
pub enum SeaTableError {
    /// The client was built with an unusable server URL or API token (nothing was sent).
    #[error("SeaTable client configuration: {message}")]
    Config {
        /// What is wrong.
        message: String,
    },
    /// The API token was refused at the token exchange, or the gateway refused the Base-Token
    /// even after one refresh (401 or 403: revoked token, read-only token on a write, …).
    #[error("SeaTable refused access (HTTP {status}): {message}")]
    Unauthorized {
        /// 401 or 403.
        status: u16,
        /// The request and the server's message.
        message: String,
    },
    /// 404: unknown table, row or base (§2.2: `row _id not exits`).
    #[error("SeaTable: not found: {message}")]
    NotFound {
        /// The request and the server's message.
        message: String,
    },
    /// 429 after the configured retries, or with a `Retry-After` longer than
    /// [`ClientOptions::max_retry_after`] (§4: 200 requests/min per base on Cloud).
    #[error("SeaTable rate limit hit{}", .retry_after.map(|d| format!("; retry after {}s", d.as_secs())).unwrap_or_default())]
    RateLimited {
        /// From the last 429's `Retry-After` (seconds), when present.
        retry_after: Option<Duration>,
    },
    /// 5xx after the retries an idempotent call gets (or at once for other calls).
    #[error("SeaTable server error (HTTP {status}): {message}")]
    Server {
        /// The HTTP status, 500–599.
        status: u16,
        /// The request and the server's message.
        message: String,
    },
    /// Any other non-success answer, mostly 400 (`no such table: X`, `no such column: X`,
    /// `column_already_exists`), and a 200 SQL reply with `success: false`.
    #[error("SeaTable rejected the request (HTTP {status}): {message}")]
    Api {
        /// The HTTP status.
        status: u16,
        /// The body's `error_type` when present, e.g. `column_already_exists` (§3.5).
        error_type: Option<String>,
        /// The request and the server's message.
        message: String,
    },
    /// Connecting, sending or reading failed. The error's URL holds no token (tokens travel
    /// in headers only).
    #[error("cannot reach SeaTable: {0}")]
    Network(#[source] reqwest::Error),
    /// No complete answer within [`ClientOptions::request_timeout`].
    #[error("SeaTable did not answer in time")]
    Timeout,
    /// A success answer that is not the expected JSON.
    #[error("unexpected answer from SeaTable: {message}")]
    Decode {
        /// The request and what did not match.
        message: String,
    },
}

impl SeaTableError {
    /// Whether the same call may succeed later unchanged: rate limits, 5xx, network errors and
    /// timeouts.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::RateLimited { .. } | Self::Server { .. } | Self::Network(_) | Self::Timeout
        )
    }
}

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

/// One row as the gateway returns it with `convert_keys=true`: column **names** as keys, plus
/// the system fields `_id`, `_ctime`, `_mtime`, … (§2.6). Since SeaTable 5.0 every column is
/// present, `null` when empty.
///
/// The helpers read cells leniently (wrong type or missing column give `None`/`false`/empty) so
/// a sysadmin's typo in one cell never fails a whole table read. `Debug` prints the cells but
/// hides every column whose name contains `password`, `secret` or `token`.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Row(pub Map<String, Value>);

impl Row {
    /// The row id (`_id`, 22 characters of `[A-Za-z0-9_-]`).
    pub fn id(&self) -> Option<&str> {
        self.text("_id")
    }

    /// The raw cell value; `None` when the column is absent.
    pub fn get(&self, column: &str) -> Option<&Value> {
        self.0.get(column)
    }

    /// A text cell (also email, URL, long text, single select): the string as stored, or
    /// `None` when absent, not a string, or empty (SeaTable treats `""` as empty, §2.3).
    pub fn text(&self, column: &str) -> Option<&str> {
        match self.0.get(column) {
            Some(Value::String(text)) if !text.is_empty() => Some(text),
            _ => None,
        }
    }

    /// A number cell, or a text cell holding a decimal number (surrounding spaces allowed).
    pub fn number(&self, column: &str) -> Option<f64> {
        match self.0.get(column) {
            Some(Value::Number(number)) => number.as_f64(),
            Some(Value::String(text)) => text.trim().parse().ok(),
            _ => None,
        }
    }

    /// A checkbox cell: true only for JSON `true` (SeaTable stores nothing else as true, §2.6).
    pub fn bool(&self, column: &str) -> bool {
        matches!(self.0.get(column), Some(Value::Bool(true)))
    }

    /// The linked row ids of a link cell: `[{row_id, display_value}]` on the gateway, plain id
    /// strings on legacy servers (§2.5). At most 50 per cell since SeaTable 5.3. Empty when the
    /// cell is empty, absent or not a link.
    pub fn link_ids(&self, column: &str) -> Vec<&str> {
        let Some(Value::Array(items)) = self.0.get(column) else {
            return Vec::new();
        };
        items
            .iter()
            .filter_map(|item| match item {
                Value::Object(link) => link.get("row_id").and_then(Value::as_str),
                Value::String(id) => Some(id.as_str()),
                _ => None,
            })
            .collect()
    }

    /// The cells as a JSON object.
    pub fn into_map(self) -> Map<String, Value> {
        self.0
    }
}

impl From<Map<String, Value>> for Row {
    fn from(map: Map<String, Value>) -> Self {
        Self(map)
    }
}

impl fmt::Debug for Row {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut map = f.debug_map();
        for (column, value) in &self.0 {
            if is_secret_column(column) && !value.is_null() {
                map.entry(column, &"[REDACTED]");
            } else {
                map.entry(column, value);
            }
        }
        map.finish()
    }
}

fn is_secret_column(column: &str) -> bool {
    let column = column.to_ascii_lowercase();
    ["password", "secret", "token"]
        .iter()
        .any(|word| column.contains(word))
}

/// The base's structure from `GET metadata/` (§2.4), reduced to what schema tooling needs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    /// Every table, in the base's order.
    #[serde(default)]
    pub tables: Vec<Table>,
}

impl Metadata {
    /// The table with exactly this name.
    pub fn table(&self, name: &str) -> Option<&Table> {
        self.tables.iter().find(|table| table.name == name)
    }

    /// The table with this `_id`.
    pub fn table_by_id(&self, id: &str) -> Option<&Table> {
        self.tables.iter().find(|table| table.id == id)
    }
}

/// One table of [`Metadata`], also the reply of [`SeaTableClient::create_table`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Table {
    /// The table id, 4 characters (`0000` for the first table).
    #[serde(rename = "_id")]
    pub id: String,
    /// The table name.
    pub name: String,
    /// The columns in display order.
    #[serde(default)]
    pub columns: Vec<Column>,
}

impl Table {
    /// The column with exactly this name.
    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|column| column.name == name)
    }
}

/// One column of a [`Table`], also the reply of [`SeaTableClient::add_column`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Column {
    /// The column key, 4 characters (`0000` for the first column).
    pub key: String,
    /// The column name (rows are keyed by it with `convert_keys=true`).
    pub name: String,
    /// The SeaTable type name: `text`, `number`, `checkbox`, `link`, `email`, … (§3.5).
    #[serde(rename = "type")]
    pub column_type: String,
    /// Type-specific settings; for links `link_id`, `table_id`, `other_table_id`, … (§2.4).
    #[serde(default)]
    pub data: Option<Value>,
}

impl Column {
    /// A link column's `link_id`, shared by both sides of the link.
    pub fn link_id(&self) -> Option<&str> {
        self.data.as_ref()?.get("link_id")?.as_str()
    }

    /// The id of the table a link column in table `own_table_id` points to: whichever of the
    /// column's `table_id` / `other_table_id` is not its own table (servers differ on whether
    /// the reverse side swaps them). `None` for other column types.
    pub fn linked_table_id(&self, own_table_id: &str) -> Option<&str> {
        if self.column_type != "link" {
            return None;
        }
        let data = self.data.as_ref()?;
        let table = data.get("table_id").and_then(Value::as_str);
        let other = data.get("other_table_id").and_then(Value::as_str);
        match (table, other) {
            (Some(table), Some(other)) if table == own_table_id => Some(other),
            (Some(table), Some(_)) => Some(table),
            (None, other) => other,
            (table, None) => table,
        }
    }
}

/// A column to create with [`SeaTableClient::create_table`] or [`SeaTableClient::add_column`]
/// (§3.4, §3.5); serialised as `{column_name, column_type, column_data?}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NewColumn {
    /// The column name.
    #[serde(rename = "column_name")]
    pub name: String,
    /// The SeaTable type name (`text`, `number`, `checkbox`, `link`, …).
    #[serde(rename = "column_type")]
    pub column_type: String,
    /// Type-specific settings; for a link `{table, other_table}` (table names).
    #[serde(rename = "column_data", skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

impl NewColumn {
    /// A column of `column_type` without settings.
    pub fn new(name: impl Into<String>, column_type: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            column_type: column_type.into(),
            data: None,
        }
    }

    /// A link column in `table` pointing to `other_table`. SeaTable adds the other side to
    /// `other_table` by itself (§3.5).
    pub fn link(name: impl Into<String>, table: &str, other_table: &str) -> Self {
        Self {
            name: name.into(),
            column_type: "link".to_owned(),
            data: Some(json!({ "table": table, "other_table": other_table })),
        }
    }
}

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

#[derive(Default)]
struct TokenSlot {
    current: Option<Arc<BaseToken>>,
    generation: u64,
}

/// A cached Base-Token. Deliberately no `Debug`.
#[derive(Clone)]
struct BaseToken {
    /// `Bearer {jwt}`, marked sensitive.
    auth: HeaderValue,
    gateway: Url,
    info: BaseInfo,
    refresh_at: Instant,
    expires_at: Instant,
    generation: u64,
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

/// The app-access-token reply (§1). Deliberately no `Debug`: it holds the Base-Token.
#[derive(Deserialize)]
struct AccessTokenReply {
    access_token: String,
    dtable_uuid: String,
    #[serde(default)]
    dtable_server: Option<String>,
    #[serde(default)]
    use_api_gateway: Option<bool>,
    #[serde(default)]
    dtable_name: Option<String>,
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
        let what = format!("{method} {}/", segments.join("/"));
        let token = self.base_token().await?;
        let bytes = match self
            .send_base(
                &token,
                &method,
                segments,
                query,
                body.as_ref(),
                idempotent,
                &what,
            )
            .await
        {
            Err(SeaTableError::Unauthorized { status, .. }) => {
                tracing::info!(%status, request = %what, "SeaTable refused the Base-Token; refreshing it once");
                let fresh = self.refresh_rejected(&token).await?;
                self.send_base(
                    &fresh,
                    &method,
                    segments,
                    query,
                    body.as_ref(),
                    idempotent,
                    &what,
                )
                .await?
            }
            other => other?,
        };
        decode(&bytes, &what)
    }

    #[allow(clippy::too_many_arguments)]
    async fn send_base(
        &self,
        token: &BaseToken,
        method: &Method,
        segments: &[&str],
        query: &[(&str, String)],
        body: Option<&Value>,
        idempotent: Idempotent,
        what: &str,
    ) -> Result<bytes::Bytes, SeaTableError> {
        let url = gateway_url(&token.gateway, segments, query)?;
        self.send(method, &url, &token.auth, body, idempotent, what)
            .await
    }

    /// The cached Base-Token, exchanged first when missing or due for refresh. Holding the
    /// lock across the exchange makes concurrent callers share it.
    async fn base_token(&self) -> Result<Arc<BaseToken>, SeaTableError> {
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
    async fn refresh_rejected(
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
    async fn exchange(&self, generation: u64) -> Result<BaseToken, SeaTableError> {
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

fn transport_error(error: reqwest::Error) -> SeaTableError {
    if error.is_timeout() {
        SeaTableError::Timeout
    } else {
        SeaTableError::Network(error)
    }
}

fn decode<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, SeaTableError> {
    serde_json::from_slice(bytes).map_err(|error| SeaTableError::Decode {
        message: format!("{what}: {error}"),
    })
}

/// The gateway prefix `…/api/v2/dtables/{uuid}/`: from `dtable_server` when the reply says
/// `use_api_gateway: true` and it is an http(s) URL, else `{server}/api-gateway/` (§1).
fn gateway_base(
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

/// The JWT payload, decoded without verifying the signature; `None` when it is not a JWT.
fn jwt_claims(token: &str) -> Option<Map<String, Value>> {
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
fn token_lifetime(exp: Option<&Value>, now: SystemTime) -> Duration {
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

/// How long a 429 asks to wait: `Retry-After` in seconds. (`x-ratelimit-reset` is not used:
/// whether it ends the per-minute or the daily window is documented both ways, §4, §9.)
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let text = headers.get(RETRY_AFTER)?.to_str().ok()?;
    text.trim().parse::<u64>().ok().map(Duration::from_secs)
}

fn status_error(
    status: StatusCode,
    retry_after: Option<Duration>,
    body: &[u8],
    what: &str,
) -> SeaTableError {
    let code = status.as_u16();
    if status == StatusCode::TOO_MANY_REQUESTS {
        return SeaTableError::RateLimited { retry_after };
    }
    let (error_type, server_message) = error_body(body);
    let server_message = if server_message.is_empty() {
        status.canonical_reason().unwrap_or("no message").to_owned()
    } else {
        server_message
    };
    let message = format!("{what}: {server_message}");
    match code {
        401 | 403 => SeaTableError::Unauthorized {
            status: code,
            message,
        },
        404 => SeaTableError::NotFound { message },
        500..=599 => SeaTableError::Server {
            status: code,
            message,
        },
        _ => SeaTableError::Api {
            status: code,
            error_type,
            message,
        },
    }
}

/// `(error_type, message)` of an error body: `error_message` (gateway), `error_msg`
/// (dtable-web) or `detail` (DRF), §4; else the raw body, trimmed and truncated to
/// [`ERROR_BODY_QUOTE_CHARS`] characters. Empty for an empty body.
fn error_body(body: &[u8]) -> (Option<String>, String) {
    if let Ok(Value::Object(object)) = serde_json::from_slice::<Value>(body) {
        let error_type = object
            .get("error_type")
            .and_then(Value::as_str)
            .map(str::to_owned);
        for field in ["error_message", "error_msg", "detail"] {
            match object.get(field) {
                Some(Value::String(text)) if !text.is_empty() => {
                    return (error_type, text.clone());
                }
                Some(value) if !value.is_null() && !value.is_string() => {
                    return (error_type, value.to_string());
                }
                _ => {}
            }
        }
        if let Some(error_type) = error_type {
            return (Some(error_type.clone()), error_type);
        }
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    let mut quoted: String = text.chars().take(ERROR_BODY_QUOTE_CHARS).collect();
    if quoted.len() < text.len() {
        quoted.push('…');
    }
    (None, quoted)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let gateway = br#"{"error_type":"column_already_exists","error_message":"column name already exists"}"#;
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
}
