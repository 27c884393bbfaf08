//! An in-process fake of the SeaTable REST API for integration tests.
//!
//! It follows `docs/reference/seatable-api.md` (the "fake server" spec of §8, the cell formats of
//! §2.6, the limits and error bodies of §4), not any particular client: a client that works
//! against this fake should work against a real SeaTable ≥ 5.3 behind nginx.
//!
//! # What it serves
//!
//! * `GET /api/v2.1/dtable/app-access-token/[?exp=5h|3d]`: API token → Base-Token, a real HS256
//!   JWT (`exp`, `dtable_uuid`, `permission`, `app_name`, …). `Bearer` and `Token` both work;
//!   an unknown API token gets 403 `{"error_msg":"Permission denied."}`.
//! * Under `/api-gateway/api/v2/dtables/{uuid}/`: `metadata/`, `columns/` (GET, POST, PUT rename,
//!   DELETE), `batch-append-columns/`, `rows/` (GET list, POST append, PUT update, DELETE),
//!   `rows/{row_id}/`, `sql` and `sql/`, `tables/` (POST, PUT rename, DELETE), `links/` (POST,
//!   PUT, DELETE) and `query-links/`. A missing, foreign, expired or revoked Base-Token gets 403
//!   `{"error_message":"invalid token"}`; every gateway response (errors and 429 included)
//!   carries `x-ratelimit-limit`, `x-ratelimit-remaining` and `x-ratelimit-reset`.
//!
//! Paths are matched exactly as documented, trailing slash included; only the SQL endpoint is
//! accepted both with and without it (§2.3). Anything else answers 404, or 405 for a known path
//! with the wrong method.
//!
//! # Behaviour a client must cope with (all documented for the real server)
//!
//! * List/get rows key cells by column *key* unless `convert_keys=true` (parsed
//!   case-insensitively); every column is present, empty cells are `null`, link cells are
//!   `[{row_id, display_value}]` (`[]` when empty) **capped at 50 entries**, as in SQL results.
//! * `limit` on list rows is clamped to 1000; SQL returns 100 rows unless `LIMIT` says otherwise,
//!   at most 10,000.
//! * Append and update match column **names** and silently drop unknown ones; only JSON `true`
//!   ticks a checkbox (`1` stores `false`); writing `""` stores NULL; link cells cannot be written
//!   through rows (use `links/`).
//! * SQL `UPDATE`/`DELETE` answer `{"success":true,"metadata":null,"results":null}` whether or
//!   not a row matched; the WHERE check and the write happen under one lock, so
//!   `UPDATE … WHERE _id = ? AND id_telegram_chat IS NULL` is an atomic compare-and-set.
//! * `""`, empty cells and empty lists are NULL in SQL; `!=`/`NOT IN`/`NOT LIKE` are true for
//!   NULL; identifiers are case-insensitive; every non-aggregate `SELECT` result has `_id`.
//! * Link columns cannot be used in a SQL `WHERE`: the reference documents no way to filter on a
//!   link cell, so the fake answers 400 and clients must page through rows and read the link
//!   cells of the "many" side.
//!
//! * The gateway enforces a per-minute limit of [`DEFAULT_RATE_LIMIT_PER_MINUTE`] requests, as a
//!   self-hosted server does by default; see [`FakeSeaTable::set_rate_limit_per_minute`].
//!
//! # Test hooks
//!
//! Seeding ([`FakeSeaTable::create_default_schema`], [`FakeSeaTable::add_row`],
//! [`FakeSeaTable::link`], …) changes the base directly, counts no request, and panics on
//! mistakes (unknown table or column), because those are bugs in the test. Faults
//! ([`FakeSeaTable::go_down`], [`FakeSeaTable::fail_next`], [`FakeSeaTable::rate_limit_next`],
//! [`FakeSeaTable::set_delay`], [`FakeSeaTable::expire_tokens`]) and observation
//! ([`FakeSeaTable::requests`], [`FakeSeaTable::request_log`],
//! [`FakeSeaTable::wait_for_requests`]) are on the same handle.

// Every test crate compiles this file (`tests/support/mod.rs`); none of them uses every helper.
#![allow(dead_code)]

use std::cmp::Ordering as CmpOrdering;
use std::collections::{HashMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::Rng as _;
use serde_json::{Map, Value, json};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

/// `app_name` in the token exchange answer and in the JWT.
pub const APP_NAME: &str = "report-relay";
/// `dtable_name` in the token exchange answer.
pub const DTABLE_NAME: &str = "report-relay-test";
/// `workspace_id` in the token exchange answer.
pub const WORKSPACE_ID: i64 = 1;
/// `_creator` / `_last_modifier` of every row written through the API or the seeding helpers.
pub const APP_USER: &str = "2e3f0a6c1d4b4c8e9a7b5d6c3e2f1a0b@auth.local";
/// Default per-base per-minute limit of a self-hosted gateway (SeaTable Cloud uses 200).
pub const DEFAULT_RATE_LIMIT_PER_MINUTE: u32 = 500;
/// At most this many linked records appear in one link cell (list, get and SQL).
pub const LINK_CELL_CAP: usize = 50;
/// Largest `limit` of list rows; larger values are clamped.
pub const LIST_ROWS_MAX: usize = 1000;
/// Rows a SQL `SELECT` returns without a `LIMIT`.
pub const SQL_DEFAULT_LIMIT: usize = 100;
/// Largest SQL `LIMIT`; larger values are clamped.
pub const SQL_MAX_LIMIT: usize = 10_000;
/// Most rows per append or update call.
pub const WRITE_BATCH_MAX: usize = 1000;
/// Most rows per delete call.
pub const DELETE_BATCH_MAX: usize = 10_000;
/// The only view of every table.
pub const DEFAULT_VIEW: &str = "Default View";
/// Base-Token lifetime when the exchange has no `exp` (3 days).
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(3 * 24 * 3600);

const MINUTE: Duration = Duration::from_secs(60);
const SYSTEM_FIELDS: [&str; 8] = [
    "_id",
    "_ctime",
    "_mtime",
    "_creator",
    "_last_modifier",
    "_archived",
    "_locked",
    "_locked_by",
];

// ---------------------------------------------------------------------------------------------
// Public types
// ---------------------------------------------------------------------------------------------

/// The permission of an API token, copied into the Base-Token's `permission` claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Permission {
    /// `"rw"`: may read and write.
    ReadWrite,
    /// `"r"`: any write answers 403 (assumed; §8.2 says "not verified").
    ReadOnly,
}

impl Permission {
    fn claim(self) -> &'static str {
        match self {
            Permission::ReadWrite => "rw",
            Permission::ReadOnly => "r",
        }
    }
}

/// One API operation, for counters, the request log and scoped faults.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `GET /api/v2.1/dtable/app-access-token/`
    AccessToken,
    /// `GET …/metadata/`
    Metadata,
    /// `GET …/columns/`
    ListColumns,
    /// `POST …/columns/`
    AddColumn,
    /// `PUT …/columns/`
    UpdateColumn,
    /// `DELETE …/columns/`
    DeleteColumn,
    /// `POST …/batch-append-columns/`
    BatchAppendColumns,
    /// `GET …/rows/`
    ListRows,
    /// `GET …/rows/{row_id}/`
    GetRow,
    /// `POST …/rows/`
    AppendRows,
    /// `PUT …/rows/`
    UpdateRows,
    /// `DELETE …/rows/`
    DeleteRows,
    /// `POST …/sql` or `…/sql/`
    Sql,
    /// `POST …/tables/`
    CreateTable,
    /// `PUT …/tables/`
    RenameTable,
    /// `DELETE …/tables/`
    DeleteTable,
    /// `POST …/links/`
    CreateLinks,
    /// `PUT …/links/`
    UpdateLinks,
    /// `DELETE …/links/`
    DeleteLinks,
    /// `POST …/query-links/`
    QueryLinks,
    /// Anything else (answered 404 or 405).
    Unknown,
}

impl Endpoint {
    fn writes(self) -> bool {
        !matches!(
            self,
            Endpoint::AccessToken
                | Endpoint::Metadata
                | Endpoint::ListColumns
                | Endpoint::ListRows
                | Endpoint::GetRow
                | Endpoint::Sql
                | Endpoint::QueryLinks
                | Endpoint::Unknown
        )
    }
}

/// Which requests a fault or delay applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every request, the token exchange included.
    All,
    /// Every request under `/api-gateway/`.
    Gateway,
    /// One operation.
    Endpoint(Endpoint),
}

impl From<Endpoint> for Scope {
    fn from(endpoint: Endpoint) -> Self {
        Scope::Endpoint(endpoint)
    }
}

impl Scope {
    fn matches(self, endpoint: Endpoint, gateway: bool) -> bool {
        match self {
            Scope::All => true,
            Scope::Gateway => gateway,
            Scope::Endpoint(e) => e == endpoint,
        }
    }
}

/// How the server is unreachable during [`FakeSeaTable::go_down`].
///
/// A self-hosted or Cloud SeaTable sits behind nginx. When the SeaTable container is down or
/// restarting, nginx is still up and answers **502 Bad Gateway** with its HTML error page; that
/// is the usual outage. During maintenance some setups answer 503. When the whole host is down,
/// connections are refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outage {
    /// nginx up, backend down: every request gets 502 with nginx's HTML page (`text/html`).
    BadGateway,
    /// Maintenance page: every request gets 503 with nginx's HTML page.
    ServiceUnavailable,
    /// Host down: the listening socket is closed (connect → ECONNREFUSED) and kept-alive
    /// connections are cut. [`FakeSeaTable::come_back`] listens on the same port again.
    ConnectionRefused,
}

/// One answered request, as recorded by the fake.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// The operation.
    pub endpoint: Endpoint,
    /// HTTP method.
    pub method: String,
    /// Path without the query.
    pub path: String,
    /// Raw query string (empty when none).
    pub query: String,
    /// The body, when it was JSON.
    pub body: Option<Value>,
    /// The status the fake answered with.
    pub status: u16,
}

/// SeaTable column types (the `column_type` strings of §3.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ColumnType {
    Text,
    LongText,
    Number,
    Checkbox,
    Date,
    SingleSelect,
    MultipleSelect,
    Image,
    File,
    Collaborator,
    Link,
    Formula,
    LinkFormula,
    Creator,
    Ctime,
    LastModifier,
    Mtime,
    Geolocation,
    AutoNumber,
    Url,
    Email,
    Duration,
    Button,
    Rate,
    DigitalSign,
}

const COLUMN_TYPES: [(ColumnType, &str); 25] = [
    (ColumnType::Text, "text"),
    (ColumnType::LongText, "long-text"),
    (ColumnType::Number, "number"),
    (ColumnType::Checkbox, "checkbox"),
    (ColumnType::Date, "date"),
    (ColumnType::SingleSelect, "single-select"),
    (ColumnType::MultipleSelect, "multiple-select"),
    (ColumnType::Image, "image"),
    (ColumnType::File, "file"),
    (ColumnType::Collaborator, "collaborator"),
    (ColumnType::Link, "link"),
    (ColumnType::Formula, "formula"),
    (ColumnType::LinkFormula, "link-formula"),
    (ColumnType::Creator, "creator"),
    (ColumnType::Ctime, "ctime"),
    (ColumnType::LastModifier, "last-modifier"),
    (ColumnType::Mtime, "mtime"),
    (ColumnType::Geolocation, "geolocation"),
    (ColumnType::AutoNumber, "auto-number"),
    (ColumnType::Url, "url"),
    (ColumnType::Email, "email"),
    (ColumnType::Duration, "duration"),
    (ColumnType::Button, "button"),
    (ColumnType::Rate, "rate"),
    (ColumnType::DigitalSign, "digital-sign"),
];

impl ColumnType {
    /// The API name, e.g. `"single-select"`.
    pub fn as_str(self) -> &'static str {
        COLUMN_TYPES
            .iter()
            .find(|(t, _)| *t == self)
            .map(|(_, s)| *s)
            .expect("every column type has a name")
    }

    /// Parses an API name; `None` for anything SeaTable does not know.
    pub fn parse(name: &str) -> Option<Self> {
        COLUMN_TYPES
            .iter()
            .find(|(_, s)| *s == name)
            .map(|(t, _)| *t)
    }

    /// Types whose value SeaTable computes; writes to them are ignored.
    fn is_computed(self) -> bool {
        matches!(
            self,
            ColumnType::Link
                | ColumnType::LinkFormula
                | ColumnType::Formula
                | ColumnType::Creator
                | ColumnType::Ctime
                | ColumnType::LastModifier
                | ColumnType::Mtime
                | ColumnType::Button
        )
    }
}

// ---------------------------------------------------------------------------------------------
// The handle
// ---------------------------------------------------------------------------------------------

/// A running fake SeaTable server with one base. Dropping it stops the server.
pub struct FakeSeaTable {
    shared: Arc<Shared>,
    addr: SocketAddr,
    api_token: String,
    task: JoinHandle<()>,
}

impl Drop for FakeSeaTable {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeSeaTable {
    /// Starts a server on `127.0.0.1:0` with one empty base (no tables) and `api_token` as a
    /// read-write API token for it.
    pub async fn start(api_token: &str) -> FakeSeaTable {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("fake SeaTable: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("fake SeaTable: local_addr");
        let server_url = format!("http://{addr}");
        let (outage, _) = watch::channel(None);
        let (bound, _) = watch::channel(true);
        let shared = Arc::new(Shared {
            state: Mutex::new(ServerState::new(server_url, api_token)),
            changed: Notify::new(),
            outage,
            bound,
            refusing: AtomicBool::new(false),
            conn_epoch: AtomicU64::new(0),
            conn_wakers: Mutex::new(HashMap::new()),
            next_conn_id: AtomicU64::new(0),
        });
        let app = Router::new()
            .fallback(handle)
            .layer(DefaultBodyLimit::max(256 * 1024 * 1024))
            .with_state(shared.clone());
        let gated = GatedListener {
            inner: Some(listener),
            addr,
            outage: shared.outage.subscribe(),
            shared: shared.clone(),
        };
        let task = tokio::spawn(async move {
            if let Err(err) = axum::serve(gated, app).await {
                tracing::warn!("fake SeaTable stopped: {err}");
            }
        });
        FakeSeaTable {
            shared,
            addr,
            api_token: api_token.to_owned(),
            task,
        }
    }

    /// [`FakeSeaTable::start`] followed by [`FakeSeaTable::create_default_schema`].
    pub async fn start_with_default_schema(api_token: &str) -> FakeSeaTable {
        let fake = FakeSeaTable::start(api_token).await;
        fake.create_default_schema();
        fake
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash: the `server_url` a client is given.
    pub fn server_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The base's `dtable_uuid`.
    pub fn base_uuid(&self) -> String {
        self.lock().base.uuid.clone()
    }

    /// `{server}/api-gateway/api/v2/dtables/{uuid}` (no trailing slash).
    pub fn gateway_url(&self) -> String {
        format!(
            "{}/api-gateway/api/v2/dtables/{}",
            self.server_url(),
            self.base_uuid()
        )
    }

    /// The API token given to [`FakeSeaTable::start`].
    pub fn api_token(&self) -> &str {
        &self.api_token
    }

    // ----- authentication ---------------------------------------------------------------------

    /// Registers another API token for the base.
    pub fn add_api_token(&self, token: &str, permission: Permission) {
        self.lock()
            .auth
            .api_tokens
            .insert(token.to_owned(), permission);
    }

    /// Forces the lifetime of every Base-Token issued from now on, overriding both the default
    /// of 3 days and the client's `?exp=`. `Duration::ZERO` issues tokens that are already
    /// expired. `None` restores the real behaviour.
    pub fn set_token_lifetime(&self, lifetime: Option<Duration>) {
        self.lock().auth.lifetime = lifetime;
    }

    /// Expires every Base-Token issued so far: the gateway answers them 403
    /// `{"error_message":"invalid token"}` until the client exchanges its API token again.
    pub fn expire_tokens(&self) {
        for expired in self.lock().auth.issued.values_mut() {
            *expired = true;
        }
    }

    /// Successful token exchanges (Base-Tokens issued) since start or [`Self::reset_counters`].
    pub fn token_exchanges(&self) -> u64 {
        self.lock().auth.exchanges
    }

    /// The HS256 key that signs Base-Tokens, so a test can verify a signature.
    pub fn jwt_secret(&self) -> Vec<u8> {
        self.lock().auth.secret.to_vec()
    }

    // ----- schema and data (seeding) ------------------------------------------------------------

    /// Creates the default schema of `interface.md`:
    ///
    /// * `users`: `Name` text, `phone` text, `mailboxes` link → mailboxes, `id_telegram`,
    ///   `reports_filter` text;
    /// * `mailboxes`: `Name`, `email`, `description` text, `users` link (the other side of
    ///   `users.mailboxes`), `t_chats` link → t_chats, `last_uid`, `imap_host` text,
    ///   `imap_port` number, `imap_login`, `imap_password`, `imap_account`, `folder`,
    ///   `allowed_senders`, `webhook_token` text,
    ///   `disabled`, `silent`, `protect_content` checkbox;
    /// * `t_chats`: `Name` text, `id_telegram_chat` text, `is_locked` checkbox, `mailboxes` link
    ///   (the other side of `mailboxes.t_chats`), `topic`, `reports_filter` text.
    ///
    /// A base from before issue 12 lacks `users.reports_filter`, `mailboxes.silent`,
    /// `mailboxes.protect_content`, `t_chats.topic` and `t_chats.reports_filter`
    /// ([`Self::remove_column`] them).
    pub fn create_default_schema(&self) {
        use ColumnType::{Checkbox, Number, Text};
        self.create_table("users", &[("Name", Text), ("phone", Text)]);
        self.create_table(
            "mailboxes",
            &[("Name", Text), ("email", Text), ("description", Text)],
        );
        self.create_table(
            "t_chats",
            &[
                ("Name", Text),
                ("id_telegram_chat", Text),
                ("is_locked", Checkbox),
            ],
        );
        self.add_link_column("users", "mailboxes", "mailboxes");
        self.add_column("users", "id_telegram", Text);
        self.add_column("users", "reports_filter", Text);
        self.add_link_column("mailboxes", "t_chats", "t_chats");
        for (name, kind) in [
            ("last_uid", Text),
            ("imap_host", Text),
            ("imap_port", Number),
            ("imap_login", Text),
            ("imap_password", Text),
            ("imap_account", Text),
            ("folder", Text),
            ("allowed_senders", Text),
            ("webhook_token", Text),
            ("disabled", Checkbox),
            ("silent", Checkbox),
            ("protect_content", Checkbox),
        ] {
            self.add_column("mailboxes", name, kind);
        }
        self.add_column("t_chats", "topic", Text);
        self.add_column("t_chats", "reports_filter", Text);
    }

    /// Creates a table with these columns (no link columns; see [`Self::add_link_column`]).
    /// Returns the table's 4-character `_id`.
    pub fn create_table(&self, name: &str, columns: &[(&str, ColumnType)]) -> String {
        let columns: Vec<NewColumn> = columns
            .iter()
            .map(|(n, kind)| NewColumn {
                name: (*n).to_owned(),
                kind: *kind,
                data: None,
            })
            .collect();
        let id = {
            let mut st = self.lock();
            let t = st
                .base
                .create_table(name, &columns)
                .unwrap_or_else(seed_panic);
            st.base.tables[t].id.clone()
        };
        self.notify();
        id
    }

    /// Appends a column to a table. Returns its 4-character key.
    pub fn add_column(&self, table: &str, name: &str, kind: ColumnType) -> String {
        assert!(
            kind != ColumnType::Link,
            "fake SeaTable: use add_link_column for links"
        );
        self.add_column_with_data(table, name, kind, None)
    }

    /// Appends a link column `table.name` → `other_table`. Like SeaTable, this also creates the
    /// other side: a link column in `other_table` named after `table` (or `table2`, … when
    /// that name is taken). Returns the `link_id`.
    pub fn add_link_column(&self, table: &str, name: &str, other_table: &str) -> String {
        let key = self.add_column_with_data(
            table,
            name,
            ColumnType::Link,
            Some(json!({"table": table, "other_table": other_table})),
        );
        let st = self.lock();
        let t = st.base.table_index(table).expect("table exists");
        let col = st.base.tables[t]
            .columns
            .iter()
            .find(|c| c.key == key)
            .expect("column exists");
        col.data["link_id"]
            .as_str()
            .expect("link column has a link_id")
            .to_owned()
    }

    fn add_column_with_data(
        &self,
        table: &str,
        name: &str,
        kind: ColumnType,
        data: Option<Value>,
    ) -> String {
        self.edit(table, |base, t| {
            let new = NewColumn {
                name: name.to_owned(),
                kind,
                data,
            };
            let c = base.add_column(t, &new, None).unwrap_or_else(seed_panic);
            base.tables[t].columns[c].key.clone()
        })
    }

    /// Removes a column (by name), as a sysadmin would in the web UI. Removing one side of a
    /// link leaves the other side in place.
    pub fn remove_column(&self, table: &str, column: &str) {
        self.edit(table, |base, t| {
            let c = seeded_column(base, t, column);
            base.remove_column(t, c);
        });
    }

    /// Renames a column, as a sysadmin would in the web UI.
    pub fn rename_column(&self, table: &str, column: &str, new_name: &str) {
        self.edit(table, |base, t| {
            let c = seeded_column(base, t, column);
            base.tables[t].columns[c].name = new_name.to_owned();
            base.version += 1;
        });
    }

    /// Removes a table, with the link columns of other tables that point at it.
    pub fn remove_table(&self, table: &str) {
        self.edit(table, Base::remove_table);
    }

    /// Table names, in order.
    pub fn table_names(&self) -> Vec<String> {
        self.lock()
            .base
            .tables
            .iter()
            .map(|t| t.name.clone())
            .collect()
    }

    /// Column names of a table, in order.
    pub fn column_names(&self, table: &str) -> Vec<String> {
        self.view(table, |base, t| {
            base.tables[t]
                .columns
                .iter()
                .map(|c| c.name.clone())
                .collect()
        })
    }

    /// Adds a row given as `{"column name": value}` (the same conversions as the append API)
    /// and returns its `_id`. Panics on an unknown column or a link column.
    pub fn add_row(&self, table: &str, row: Value) -> String {
        self.add_rows(table, [row])
            .pop()
            .expect("one row was added")
    }

    /// [`Self::add_row`] for many rows at once.
    pub fn add_rows(&self, table: &str, rows: impl IntoIterator<Item = Value>) -> Vec<String> {
        self.edit(table, |base, t| {
            rows.into_iter()
                .map(|row| {
                    let values = row
                        .as_object()
                        .unwrap_or_else(|| panic!("fake SeaTable: a row must be a JSON object"));
                    base.insert_row(t, values, true)
                        .unwrap_or_else(|e| panic!("fake SeaTable: table {table}: {e}"))
                })
                .collect()
        })
    }

    /// Changes cells of a row by column name, as a person editing in the web UI would (bumps
    /// `_mtime`). Panics on an unknown row or column.
    pub fn update_row(&self, table: &str, row_id: &str, values: Value) {
        self.edit(table, |base, t| {
            let values = values
                .as_object()
                .unwrap_or_else(|| panic!("fake SeaTable: values must be a JSON object"));
            let found = base
                .update_row(t, row_id, values, true)
                .unwrap_or_else(|e| panic!("fake SeaTable: table {table}: {e}"));
            assert!(found, "fake SeaTable: table {table} has no row {row_id}");
        });
    }

    /// Deletes a row and its links.
    pub fn delete_row(&self, table: &str, row_id: &str) {
        self.edit(table, |base, t| base.delete_rows(t, &[row_id.to_owned()]));
    }

    /// Links `row_id` of `table` to `other_row_ids` through the link column `link_column`
    /// (either side of the link). The link is stored once and shows on both sides.
    pub fn link(&self, table: &str, link_column: &str, row_id: &str, other_row_ids: &[&str]) {
        self.change_links(table, link_column, row_id, other_row_ids, LinkMode::Add);
    }

    /// Removes links added with [`Self::link`].
    pub fn unlink(&self, table: &str, link_column: &str, row_id: &str, other_row_ids: &[&str]) {
        self.change_links(table, link_column, row_id, other_row_ids, LinkMode::Remove);
    }

    fn change_links(
        &self,
        table: &str,
        link_column: &str,
        row_id: &str,
        other_row_ids: &[&str],
        mode: LinkMode,
    ) {
        self.edit(table, |base, t| {
            let (li, forward) = seeded_link_column(base, t, link_column);
            let o = base.other_table(li, forward);
            assert!(
                base.tables[t].rows.iter().any(|r| r.id == row_id),
                "fake SeaTable: table {table} has no row {row_id}"
            );
            for other in other_row_ids {
                assert!(
                    base.tables[o].rows.iter().any(|r| r.id == *other),
                    "fake SeaTable: table {} has no row {other}",
                    base.tables[o].name
                );
                let pair = oriented(forward, row_id, other);
                let pairs = &mut base.links[li].pairs;
                match mode {
                    LinkMode::Add | LinkMode::Replace => {
                        if !pairs.contains(&pair) {
                            pairs.push(pair);
                        }
                    }
                    LinkMode::Remove => pairs.retain(|p| *p != pair),
                }
            }
        });
    }

    /// Every row id linked to `row_id` through `link_column`, uncapped, in link order.
    pub fn linked_ids(&self, table: &str, link_column: &str, row_id: &str) -> Vec<String> {
        self.view(table, |base, t| {
            let (li, forward) = seeded_link_column(base, t, link_column);
            base.links[li]
                .pairs
                .iter()
                .filter_map(|(a, b)| {
                    let (mine, theirs) = if forward { (a, b) } else { (b, a) };
                    (mine == row_id).then(|| theirs.clone())
                })
                .collect()
        })
    }

    /// A row by `_id` as a name-keyed map with the system fields; link cells are
    /// `[{row_id, display_value}]` **uncapped** (the truth, not what the API shows).
    pub fn row(&self, table: &str, row_id: &str) -> Option<Map<String, Value>> {
        self.view(table, |base, t| {
            let row = base.tables[t].rows.iter().find(|r| r.id == row_id)?;
            Some(base.render_by_name(t, std::slice::from_ref(row)).remove(0))
        })
    }

    /// Every row of a table, as [`Self::row`] returns them, in table order.
    pub fn rows(&self, table: &str) -> Vec<Map<String, Value>> {
        self.view(table, |base, t| {
            base.render_by_name(t, &base.tables[t].rows)
        })
    }

    // ----- faults -------------------------------------------------------------------------------

    /// Starts an outage; see [`Outage`]. Returns once it is in effect (for
    /// [`Outage::ConnectionRefused`], once the listening socket is closed).
    pub async fn go_down(&self, outage: Outage) {
        let refusing = outage == Outage::ConnectionRefused;
        self.shared.refusing.store(refusing, Ordering::SeqCst);
        if refusing {
            self.shared.conn_epoch.fetch_add(1, Ordering::SeqCst);
        }
        let mut bound = self.shared.bound.subscribe();
        let previous = self.shared.outage.send_replace(Some(outage));
        if refusing {
            let wakers: Vec<Waker> = {
                let mut map = self
                    .shared
                    .conn_wakers
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                map.drain().map(|(_, w)| w).collect()
            };
            wakers.into_iter().for_each(Waker::wake);
            let _ = bound.wait_for(|b| !*b).await;
        } else if previous == Some(Outage::ConnectionRefused) {
            // nginx is back up and answering with its error page.
            let _ = bound.wait_for(|b| *b).await;
        }
    }

    /// Ends an outage. Returns once the server answers again (listening again after
    /// [`Outage::ConnectionRefused`]; connections from before the outage stay dead, as after a
    /// real restart).
    pub async fn come_back(&self) {
        self.shared.refusing.store(false, Ordering::SeqCst);
        let mut bound = self.shared.bound.subscribe();
        let previous = self.shared.outage.send_replace(None);
        if previous == Some(Outage::ConnectionRefused) {
            let _ = bound.wait_for(|b| *b).await;
        }
    }

    /// The next `times` requests in `scope` answer `status`: 429 with an empty body (and the
    /// rate-limit headers); 502, 503 or 504 with nginx's HTML page (as when the backend is
    /// unreachable); any other status with `{"error_message": "<reason phrase>"}`.
    pub fn fail_next(&self, scope: impl Into<Scope>, status: u16, times: usize) {
        if times > 0 {
            self.lock().faults.rules.push(FaultRule {
                scope: scope.into(),
                status,
                remaining: Some(times),
            });
        }
    }

    /// Like [`Self::fail_next`], until [`Self::clear_faults`].
    pub fn fail_always(&self, scope: impl Into<Scope>, status: u16) {
        self.lock().faults.rules.push(FaultRule {
            scope: scope.into(),
            status,
            remaining: None,
        });
    }

    /// The next `times` gateway requests answer 429 with an empty body.
    pub fn rate_limit_next(&self, times: usize) {
        self.fail_next(Scope::Gateway, 429, times);
    }

    /// The per-base per-minute limit of gateway requests (default
    /// [`DEFAULT_RATE_LIMIT_PER_MINUTE`]): once a fixed one-minute window has seen more, the
    /// gateway answers 429 with an empty body until the window ends. `None` disables it (the
    /// headers still report the default limit). The window runs on `tokio::time`, so a test
    /// with paused time can `advance` past it.
    pub fn set_rate_limit_per_minute(&self, limit: Option<u32>) {
        let mut st = self.lock();
        st.faults.limit = limit;
        st.faults.window = None;
    }

    /// Delays the answer to every request in `scope` by `delay` (`Duration::ZERO` removes the
    /// delay for that scope). When several scopes match, the longest delay applies.
    pub fn set_delay(&self, scope: impl Into<Scope>, delay: Duration) {
        let scope = scope.into();
        let mut st = self.lock();
        st.faults.delays.retain(|(s, _)| *s != scope);
        if !delay.is_zero() {
            st.faults.delays.push((scope, delay));
        }
    }

    /// Removes every injected failure and delay (not an outage, not the rate limit).
    pub fn clear_faults(&self) {
        let mut st = self.lock();
        st.faults.rules.clear();
        st.faults.delays.clear();
    }

    // ----- observation --------------------------------------------------------------------------

    /// Requests of one operation answered so far (faulted ones included; requests refused at
    /// the TCP level, or abandoned by the client during a delay, are not counted).
    pub fn requests(&self, endpoint: Endpoint) -> u64 {
        self.lock()
            .stats
            .counts
            .get(&endpoint)
            .copied()
            .unwrap_or(0)
    }

    /// Requests answered under `/api-gateway/`.
    pub fn gateway_requests(&self) -> u64 {
        self.lock().stats.gateway
    }

    /// Every answered request, in order.
    pub fn request_log(&self) -> Vec<RecordedRequest> {
        self.lock().stats.log.clone()
    }

    /// Zeroes the request counters, the log and [`Self::token_exchanges`].
    pub fn reset_counters(&self) {
        let mut st = self.lock();
        st.stats = Stats::default();
        st.auth.exchanges = 0;
    }

    /// Waits until at least `n` requests of `endpoint` have been answered. Wrap it in
    /// `tokio::time::timeout`.
    pub async fn wait_for_requests(&self, endpoint: Endpoint, n: u64) {
        self.wait_until(|fake| fake.requests(endpoint) >= n).await;
    }

    /// Waits until `cond` holds; it is re-checked after every answered request and every
    /// seeding change. Wrap it in `tokio::time::timeout`.
    pub async fn wait_until(&self, mut cond: impl FnMut(&FakeSeaTable) -> bool) {
        loop {
            let notified = self.shared.changed.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if cond(self) {
                return;
            }
            notified.await;
        }
    }

    fn lock(&self) -> MutexGuard<'_, ServerState> {
        self.shared.lock()
    }

    fn notify(&self) {
        self.shared.changed.notify_waiters();
    }

    /// Runs `change` on the base with the index of `table` (panics on an unknown table: a bug
    /// in the test), then wakes whoever waits for a change.
    fn edit<T>(&self, table: &str, change: impl FnOnce(&mut Base, usize) -> T) -> T {
        let out = {
            let mut st = self.lock();
            let t = st
                .base
                .table_index(table)
                .unwrap_or_else(|| no_table(table));
            change(&mut st.base, t)
        };
        self.notify();
        out
    }

    /// Runs `look` on the base with the index of `table` (panics on an unknown table).
    fn view<T>(&self, table: &str, look: impl FnOnce(&Base, usize) -> T) -> T {
        let st = self.lock();
        let t = st
            .base
            .table_index(table)
            .unwrap_or_else(|| no_table(table));
        look(&st.base, t)
    }
}

fn seed_panic<T>(err: ApiError) -> T {
    panic!("fake SeaTable: {}", err.body)
}

fn no_table(table: &str) -> usize {
    panic!("fake SeaTable: no table {table}")
}

/// The index of the column named `column` of table `t`, for the seeding API.
fn seeded_column(base: &Base, t: usize, column: &str) -> usize {
    base.tables[t]
        .columns
        .iter()
        .position(|c| c.name == column)
        .unwrap_or_else(|| {
            let table = &base.tables[t].name;
            panic!("fake SeaTable: table {table} has no column {column}")
        })
}

/// The link and direction of the link column `link_column` of table `t`, for the seeding API.
fn seeded_link_column(base: &Base, t: usize, link_column: &str) -> (usize, bool) {
    base.link_column(t, link_column).unwrap_or_else(|| {
        let table = &base.tables[t].name;
        panic!("fake SeaTable: {table}.{link_column} is not a link column")
    })
}

// ---------------------------------------------------------------------------------------------
// Server state
// ---------------------------------------------------------------------------------------------

struct Shared {
    state: Mutex<ServerState>,
    /// Woken after every answered request and every seeding change.
    changed: Notify,
    /// The current outage; the listener watches it.
    outage: watch::Sender<Option<Outage>>,
    /// Whether the listening socket is open (the listener reports it).
    bound: watch::Sender<bool>,
    /// True during an [`Outage::ConnectionRefused`]: accepted connections are cut.
    refusing: AtomicBool,
    /// Bumped when a refused-connection outage starts; older connections stay cut.
    conn_epoch: AtomicU64,
    /// Wakers of the open connections' reads, so an outage closes idle keep-alive connections
    /// at once (the client's pool then sees them closed, as after a real crash).
    conn_wakers: Mutex<HashMap<u64, Waker>>,
    next_conn_id: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, ServerState> {
        // A panicking test thread must not hide the state from the others.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct ServerState {
    server_url: String,
    base: Base,
    auth: Auth,
    faults: Faults,
    stats: Stats,
}

impl ServerState {
    fn new(server_url: String, api_token: &str) -> Self {
        let mut api_tokens = HashMap::new();
        api_tokens.insert(api_token.to_owned(), Permission::ReadWrite);
        ServerState {
            server_url,
            base: Base::new(),
            auth: Auth {
                api_tokens,
                secret: rand::rng().random(),
                issued: HashMap::new(),
                lifetime: None,
                exchanges: 0,
            },
            faults: Faults {
                rules: Vec::new(),
                delays: Vec::new(),
                limit: Some(DEFAULT_RATE_LIMIT_PER_MINUTE),
                window: None,
            },
            stats: Stats::default(),
        }
    }
}

struct Auth {
    api_tokens: HashMap<String, Permission>,
    secret: [u8; 32],
    /// Every Base-Token issued, with whether [`FakeSeaTable::expire_tokens`] expired it.
    issued: HashMap<String, bool>,
    lifetime: Option<Duration>,
    exchanges: u64,
}

struct FaultRule {
    scope: Scope,
    status: u16,
    remaining: Option<usize>,
}

struct RateWindow {
    started: tokio::time::Instant,
    reset_unix: u64,
    count: u32,
}

struct RateInfo {
    limit: u32,
    remaining: u32,
    reset_unix: u64,
    exceeded: bool,
}

struct Faults {
    rules: Vec<FaultRule>,
    delays: Vec<(Scope, Duration)>,
    limit: Option<u32>,
    window: Option<RateWindow>,
}

impl Faults {
    fn delay_for(&self, endpoint: Endpoint, gateway: bool) -> Duration {
        self.delays
            .iter()
            .filter(|(s, _)| s.matches(endpoint, gateway))
            .map(|(_, d)| *d)
            .max()
            .unwrap_or(Duration::ZERO)
    }

    fn take_fault(&mut self, endpoint: Endpoint, gateway: bool) -> Option<u16> {
        let i = self
            .rules
            .iter()
            .position(|r| r.scope.matches(endpoint, gateway))?;
        let status = self.rules[i].status;
        let exhausted = match &mut self.rules[i].remaining {
            Some(left) => {
                *left -= 1;
                *left == 0
            }
            None => false,
        };
        if exhausted {
            self.rules.remove(i);
        }
        Some(status)
    }

    fn tick_rate(&mut self) -> RateInfo {
        let now = tokio::time::Instant::now();
        let expired = self
            .window
            .as_ref()
            .is_none_or(|w| now.duration_since(w.started) >= MINUTE);
        if expired {
            self.window = Some(RateWindow {
                started: now,
                reset_unix: unix_secs() + MINUTE.as_secs(),
                count: 0,
            });
        }
        let window = self.window.as_mut().expect("window was just set");
        window.count = window.count.saturating_add(1);
        let limit = self.limit.unwrap_or(DEFAULT_RATE_LIMIT_PER_MINUTE);
        let exceeded = self.limit.is_some_and(|l| window.count > l);
        RateInfo {
            limit,
            remaining: limit.saturating_sub(window.count),
            reset_unix: window.reset_unix,
            exceeded,
        }
    }
}

#[derive(Default)]
struct Stats {
    counts: HashMap<Endpoint, u64>,
    gateway: u64,
    log: Vec<RecordedRequest>,
}

// ---------------------------------------------------------------------------------------------
// The base: tables, columns, rows, links
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Column {
    key: String,
    name: String,
    kind: ColumnType,
    /// Type-specific data; for links only `{"link_id": …}` (the rest is derived).
    data: Value,
}

#[derive(Clone, Debug)]
struct Row {
    id: String,
    ctime: String,
    mtime: String,
    creator: String,
    last_modifier: String,
    /// Cells by column key; a missing key is an empty (NULL) cell.
    cells: HashMap<String, Value>,
}

#[derive(Debug)]
struct Table {
    id: String,
    name: String,
    columns: Vec<Column>,
    rows: Vec<Row>,
}

/// A link between two tables, stored once; both link columns refer to it by `link_id`.
/// `pairs` are `(row of table_id, row of other_table_id)`, in the order they were linked.
#[derive(Debug)]
struct Link {
    id: String,
    table_id: String,
    other_table_id: String,
    pairs: Vec<(String, String)>,
}

struct NewColumn {
    name: String,
    kind: ColumnType,
    data: Option<Value>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum LinkMode {
    Add,
    Replace,
    Remove,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Keys {
    Names,
    ColumnKeys,
}

/// A field of a rendered row: a system field or a column (by index).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    System(&'static str),
    Col(usize),
}

/// Row id → `[(linked row id, display value)]`.
type LinkCells = HashMap<String, Vec<(String, Value)>>;

/// The link cells of one table, by column key.
struct LinkIndex {
    by_column: HashMap<String, LinkCells>,
}

struct Base {
    uuid: String,
    tables: Vec<Table>,
    links: Vec<Link>,
    version: u64,
    last_ms: u64,
}

fn oriented(forward: bool, mine: &str, theirs: &str) -> (String, String) {
    if forward {
        (mine.to_owned(), theirs.to_owned())
    } else {
        (theirs.to_owned(), mine.to_owned())
    }
}

impl Base {
    fn new() -> Self {
        Base {
            uuid: new_uuid(),
            tables: Vec::new(),
            links: Vec::new(),
            version: 1,
            last_ms: 0,
        }
    }

    /// An ISO timestamp that is strictly later than every earlier one, so `_mtime` always moves.
    fn now_iso(&mut self) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        self.last_ms = now.max(self.last_ms + 1);
        iso_from_millis(self.last_ms)
    }

    fn table_index(&self, name: &str) -> Option<usize> {
        self.tables.iter().position(|t| t.name == name)
    }

    fn table_index_by_id(&self, id: &str) -> Option<usize> {
        self.tables.iter().position(|t| t.id == id)
    }

    /// SQL: identifiers are case-insensitive (an exact match wins).
    fn table_index_sql(&self, name: &str) -> Option<usize> {
        self.table_index(name).or_else(|| {
            self.tables
                .iter()
                .position(|t| t.name.eq_ignore_ascii_case(name))
        })
    }

    /// `table_name` or `table_id`, as the row endpoints take them.
    fn resolve_table(&self, name: Option<&str>, id: Option<&str>) -> Result<usize, ApiError> {
        let name = name.filter(|s| !s.is_empty());
        let id = id.filter(|s| !s.is_empty());
        let found = match (name, id) {
            (Some(name), _) => self.table_index(name),
            (None, Some(id)) => self.table_index_by_id(id),
            (None, None) => return Err(ApiError::new(400, "table_name invalid.")),
        };
        found.ok_or_else(|| ApiError::new(404, "table not found"))
    }

    fn new_table_id(&self) -> String {
        if self.tables.is_empty() {
            return "0000".to_owned();
        }
        loop {
            let id = random_key();
            if self.tables.iter().all(|t| t.id != id) {
                return id;
            }
        }
    }

    fn new_link_id(&self) -> String {
        loop {
            let id = random_key();
            if self.links.iter().all(|l| l.id != id) {
                return id;
            }
        }
    }

    fn create_table(&mut self, name: &str, columns: &[NewColumn]) -> Result<usize, ApiError> {
        if name.trim().is_empty() {
            return Err(ApiError::new(400, "table_name invalid."));
        }
        if self.table_index(name).is_some() {
            return Err(ApiError::typed(
                400,
                "table_already_exists",
                "table name already exists",
            ));
        }
        if let Some(first) = columns.first()
            && !matches!(
                first.kind,
                ColumnType::Text
                    | ColumnType::Number
                    | ColumnType::Date
                    | ColumnType::SingleSelect
                    | ColumnType::Formula
                    | ColumnType::AutoNumber
            )
        {
            return Err(ApiError::typed(
                400,
                "column_type_error",
                "the first column must be text, number, date, single-select, formula or auto-number",
            ));
        }
        let mut seen = HashSet::new();
        for c in columns {
            if !seen.insert(c.name.as_str()) {
                return Err(ApiError::typed(
                    400,
                    "column_already_exists",
                    "column name already exists",
                ));
            }
        }
        let id = self.new_table_id();
        self.tables.push(Table {
            id,
            name: name.to_owned(),
            columns: Vec::new(),
            rows: Vec::new(),
        });
        let t = self.tables.len() - 1;
        for c in columns {
            if let Err(err) = self.add_column(t, c, None) {
                self.remove_table(t);
                return Err(err);
            }
        }
        self.version += 1;
        Ok(t)
    }

    fn remove_table(&mut self, t: usize) {
        let table_id = self.tables[t].id.clone();
        let dead_links: Vec<String> = self
            .links
            .iter()
            .filter(|l| l.table_id == table_id || l.other_table_id == table_id)
            .map(|l| l.id.clone())
            .collect();
        for table in &mut self.tables {
            table.columns.retain(|c| {
                c.kind != ColumnType::Link || !dead_links.iter().any(|id| c.data["link_id"] == **id)
            });
        }
        self.links.retain(|l| !dead_links.contains(&l.id));
        self.tables.remove(t);
        self.version += 1;
    }

    /// Adds a column (and, for a link, the link and the other side's column). Returns the new
    /// column's index.
    fn add_column(
        &mut self,
        t: usize,
        new: &NewColumn,
        anchor: Option<&str>,
    ) -> Result<usize, ApiError> {
        if new.name.trim().is_empty() {
            return Err(ApiError::new(400, "column_name invalid."));
        }
        if self.tables[t].columns.iter().any(|c| c.name == new.name) {
            return Err(ApiError::typed(
                400,
                "column_already_exists",
                "column name already exists",
            ));
        }
        let data = match new.kind {
            ColumnType::Link => {
                let column_data_error =
                    |msg: &str| ApiError::typed(400, "column_data_error", msg.to_owned());
                let other_name = new
                    .data
                    .as_ref()
                    .and_then(|d| d.get("other_table"))
                    .and_then(Value::as_str)
                    .ok_or_else(|| column_data_error("column_data.other_table is required"))?;
                let o = self
                    .table_index(other_name)
                    .ok_or_else(|| column_data_error("other_table not found"))?;
                if o == t {
                    return Err(column_data_error(
                        "fake SeaTable does not support links from a table to itself",
                    ));
                }
                let link_id = self.new_link_id();
                self.links.push(Link {
                    id: link_id.clone(),
                    table_id: self.tables[t].id.clone(),
                    other_table_id: self.tables[o].id.clone(),
                    pairs: Vec::new(),
                });
                let back_name = unique_column_name(&self.tables[o], &self.tables[t].name);
                let back_key = new_column_key(&self.tables[o]);
                self.tables[o].columns.push(Column {
                    key: back_key,
                    name: back_name,
                    kind: ColumnType::Link,
                    data: json!({"link_id": link_id}),
                });
                json!({"link_id": link_id})
            }
            ColumnType::Number => new.data.clone().unwrap_or_else(
                || json!({"format": "number", "decimal": "dot", "thousands": "no"}),
            ),
            ColumnType::SingleSelect | ColumnType::MultipleSelect => {
                let mut data = new.data.clone().unwrap_or_else(|| json!({}));
                if !data.is_object() {
                    data = json!({});
                }
                if !data["options"].is_array() {
                    data["options"] = json!([]);
                }
                data
            }
            _ => new.data.clone().unwrap_or(Value::Null),
        };
        let table = &mut self.tables[t];
        let column = Column {
            key: new_column_key(table),
            name: new.name.clone(),
            kind: new.kind,
            data,
        };
        let at = anchor
            .and_then(|a| table.columns.iter().position(|c| c.name == a || c.key == a))
            .map_or(table.columns.len(), |i| i + 1);
        table.columns.insert(at, column);
        self.version += 1;
        Ok(at)
    }

    fn remove_column(&mut self, t: usize, c: usize) {
        let column = self.tables[t].columns.remove(c);
        for row in &mut self.tables[t].rows {
            row.cells.remove(&column.key);
        }
        if column.kind == ColumnType::Link {
            let still_used = self.tables.iter().any(|table| {
                table
                    .columns
                    .iter()
                    .any(|other| other.kind == ColumnType::Link && other.data == column.data)
            });
            if !still_used {
                self.links.retain(|l| column.data["link_id"] != *l.id);
            }
        }
        self.version += 1;
    }

    /// The link behind a link column and whether this table is its `table_id` side.
    fn link_of(&self, t: usize, column: &Column) -> Option<(usize, bool)> {
        if column.kind != ColumnType::Link {
            return None;
        }
        let link_id = column.data["link_id"].as_str()?;
        let li = self.links.iter().position(|l| l.id == link_id)?;
        Some((li, self.links[li].table_id == self.tables[t].id))
    }

    fn link_column(&self, t: usize, name: &str) -> Option<(usize, bool)> {
        let column = self.tables[t].columns.iter().find(|c| c.name == name)?;
        self.link_of(t, column)
    }

    fn other_table(&self, li: usize, forward: bool) -> usize {
        let link = &self.links[li];
        let id = if forward {
            &link.other_table_id
        } else {
            &link.table_id
        };
        self.table_index_by_id(id)
            .expect("both tables of a link exist")
    }

    fn link_index(&self, t: usize) -> LinkIndex {
        let mut by_column = HashMap::new();
        for column in &self.tables[t].columns {
            let Some((li, forward)) = self.link_of(t, column) else {
                continue;
            };
            let other = &self.tables[self.other_table(li, forward)];
            let display_key = other.columns.first().map(|c| c.key.as_str());
            let display: HashMap<&str, Value> = other
                .rows
                .iter()
                .map(|r| {
                    let value = display_key
                        .and_then(|k| r.cells.get(k).cloned())
                        .unwrap_or(Value::Null);
                    (r.id.as_str(), value)
                })
                .collect();
            let mut cells: LinkCells = HashMap::new();
            for (a, b) in &self.links[li].pairs {
                let (mine, theirs) = if forward { (a, b) } else { (b, a) };
                if let Some(value) = display.get(theirs.as_str()) {
                    cells
                        .entry(mine.clone())
                        .or_default()
                        .push((theirs.clone(), value.clone()));
                }
            }
            by_column.insert(column.key.clone(), cells);
        }
        LinkIndex { by_column }
    }

    fn all_fields(&self, t: usize) -> Vec<Field> {
        SYSTEM_FIELDS
            .into_iter()
            .map(Field::System)
            .chain((0..self.tables[t].columns.len()).map(Field::Col))
            .collect()
    }

    fn system_value(row: &Row, name: &str) -> Value {
        match name {
            "_id" => json!(row.id),
            "_ctime" => json!(row.ctime),
            "_mtime" => json!(row.mtime),
            "_creator" => json!(row.creator),
            "_last_modifier" => json!(row.last_modifier),
            "_archived" => json!(false),
            _ => Value::Null,
        }
    }

    /// `rows` of table `t` with every field, keyed by column name, link cells uncapped (what
    /// the seeding API shows).
    fn render_by_name(&self, t: usize, rows: &[Row]) -> Vec<Map<String, Value>> {
        let links = self.link_index(t);
        let fields = self.all_fields(t);
        rows.iter()
            .map(|row| self.render(t, row, &fields, Keys::Names, &links, None))
            .collect()
    }

    fn render(
        &self,
        t: usize,
        row: &Row,
        fields: &[Field],
        keys: Keys,
        links: &LinkIndex,
        cap: Option<usize>,
    ) -> Map<String, Value> {
        let table = &self.tables[t];
        let mut out = Map::new();
        for field in fields {
            match *field {
                Field::System(name) => {
                    out.insert(name.to_owned(), Base::system_value(row, name));
                }
                Field::Col(c) => {
                    let column = &table.columns[c];
                    let value = if column.kind == ColumnType::Link {
                        let linked = links
                            .by_column
                            .get(&column.key)
                            .and_then(|cells| cells.get(&row.id))
                            .map(Vec::as_slice)
                            .unwrap_or_default();
                        Value::Array(
                            linked
                                .iter()
                                .take(cap.unwrap_or(usize::MAX))
                                .map(|(id, dv)| json!({"row_id": id, "display_value": dv}))
                                .collect(),
                        )
                    } else {
                        row.cells.get(&column.key).cloned().unwrap_or(Value::Null)
                    };
                    let key = match keys {
                        Keys::Names => column.name.clone(),
                        Keys::ColumnKeys => column.key.clone(),
                    };
                    out.insert(key, value);
                }
            }
        }
        out
    }

    fn column_json(&self, t: usize, column: &Column) -> Value {
        let data = match self.link_of(t, column) {
            Some((li, forward)) => {
                let link = &self.links[li];
                let other = &self.tables[self.other_table(li, forward)];
                json!({
                    "link_id": link.id,
                    "table_id": link.table_id,
                    "other_table_id": link.other_table_id,
                    "display_column_key": other.columns.first().map_or("0000", |c| c.key.as_str()),
                    "is_multiple": true,
                    "is_internal_link": true,
                })
            }
            None => column.data.clone(),
        };
        json!({
            "key": column.key,
            "name": column.name,
            "type": column.kind.as_str(),
            "data": data,
            "width": 200,
            "editable": true,
            "resizable": true,
            "draggable": true,
            "description": null,
            "colorbys": {},
            "permission_type": "",
            "permitted_users": [],
            "permitted_group": [],
            "edit_metadata_permission_type": "",
            "edit_metadata_permitted_users": [],
            "edit_metadata_permitted_group": [],
        })
    }

    fn columns_json(&self, t: usize) -> Vec<Value> {
        self.tables[t]
            .columns
            .iter()
            .map(|c| self.column_json(t, c))
            .collect()
    }

    fn table_json(&self, t: usize) -> Value {
        json!({
            "_id": self.tables[t].id,
            "name": self.tables[t].name,
            "is_header_locked": false,
            "header_settings": {},
            "summary_configs": {},
            "columns": self.columns_json(t),
            "views": [default_view()],
        })
    }

    fn metadata_json(&self) -> Value {
        json!({
            "tables": (0..self.tables.len()).map(|t| self.table_json(t)).collect::<Vec<_>>(),
            "version": self.version,
            "format_version": 9,
            "settings": {},
        })
    }

    /// Appends a row; `strict` (seeding) rejects unknown and link columns instead of dropping
    /// them. Returns the new `_id`.
    fn insert_row(
        &mut self,
        t: usize,
        values: &Map<String, Value>,
        strict: bool,
    ) -> Result<String, String> {
        let now = self.now_iso();
        let mut row = Row {
            id: new_row_id(),
            ctime: now.clone(),
            mtime: now,
            creator: APP_USER.to_owned(),
            last_modifier: APP_USER.to_owned(),
            cells: HashMap::new(),
        };
        write_cells(&mut self.tables[t].columns, &mut row.cells, values, strict)?;
        let id = row.id.clone();
        self.tables[t].rows.push(row);
        Ok(id)
    }

    /// Updates a row by column names. Ok(false) when there is no such row.
    fn update_row(
        &mut self,
        t: usize,
        row_id: &str,
        values: &Map<String, Value>,
        strict: bool,
    ) -> Result<bool, String> {
        let Some(r) = self.tables[t].rows.iter().position(|r| r.id == row_id) else {
            return Ok(false);
        };
        let table = &mut self.tables[t];
        let written = write_cells(&mut table.columns, &mut table.rows[r].cells, values, strict)?;
        if written > 0 {
            self.touch(t, r);
        }
        Ok(true)
    }

    fn touch(&mut self, t: usize, r: usize) {
        let now = self.now_iso();
        let row = &mut self.tables[t].rows[r];
        row.mtime = now;
        row.last_modifier = APP_USER.to_owned();
    }

    fn delete_rows(&mut self, t: usize, ids: &[String]) {
        let ids: HashSet<&str> = ids.iter().map(String::as_str).collect();
        self.tables[t].rows.retain(|r| !ids.contains(r.id.as_str()));
        let table_id = self.tables[t].id.clone();
        for link in &mut self.links {
            let here_a = link.table_id == table_id;
            let here_b = link.other_table_id == table_id;
            link.pairs.retain(|(a, b)| {
                !(here_a && ids.contains(a.as_str()) || here_b && ids.contains(b.as_str()))
            });
        }
    }
}

fn unique_column_name(table: &Table, wanted: &str) -> String {
    if table.columns.iter().all(|c| c.name != wanted) {
        return wanted.to_owned();
    }
    (2..)
        .map(|n| format!("{wanted}{n}"))
        .find(|name| table.columns.iter().all(|c| c.name != *name))
        .expect("some suffix is free")
}

fn new_column_key(table: &Table) -> String {
    if table.columns.is_empty() && table.rows.is_empty() {
        return "0000".to_owned();
    }
    loop {
        let key = random_key();
        if table.columns.iter().all(|c| c.key != key) {
            return key;
        }
    }
}

fn default_view() -> Value {
    json!({
        "_id": "0000",
        "name": DEFAULT_VIEW,
        "type": "table",
        "is_locked": false,
        "private_for": null,
        "row_height": "default",
        "filter_conjunction": "And",
        "filters": [],
        "sorts": [],
        "groupbys": [],
        "group_rows": [],
        "groups": [],
        "colorbys": {},
        "colors": {},
        "column_colors": {},
        "hidden_columns": [],
        "rows": [],
        "formula_rows": {},
        "link_rows": {},
        "summaries": {},
    })
}

enum CellWrite {
    Set(Value),
    Clear,
    /// A computed column (link, formula, …): writes are ignored.
    ReadOnly,
}

/// Writes `{"column name": value}` into `cells`. Unknown names are dropped (the API's
/// behaviour) or rejected when `strict`. Returns how many cells were written.
fn write_cells(
    columns: &mut [Column],
    cells: &mut HashMap<String, Value>,
    values: &Map<String, Value>,
    strict: bool,
) -> Result<usize, String> {
    let mut written = 0;
    for (name, value) in values {
        let Some(column) = columns.iter_mut().find(|c| c.name == *name) else {
            if strict {
                return Err(format!("no column {name:?}"));
            }
            continue;
        };
        match coerce_cell(column, value) {
            CellWrite::Set(v) => {
                cells.insert(column.key.clone(), v);
                written += 1;
            }
            CellWrite::Clear => {
                cells.remove(&column.key);
                written += 1;
            }
            CellWrite::ReadOnly if strict => {
                return Err(format!(
                    "column {name:?} is a {} column and cannot be written (links: use link())",
                    column.kind.as_str()
                ));
            }
            CellWrite::ReadOnly => {}
        }
    }
    Ok(written)
}

/// How SeaTable stores a written value (§2.6, §3.1 and API_ISSUES #1, #2, #5).
fn coerce_cell(column: &mut Column, value: &Value) -> CellWrite {
    use ColumnType as T;
    if column.kind.is_computed() {
        return CellWrite::ReadOnly;
    }
    if value.is_null() {
        return CellWrite::Clear;
    }
    match column.kind {
        // Only JSON `true` ticks a checkbox; `1`, `"true"` … store false.
        T::Checkbox => CellWrite::Set(Value::Bool(*value == Value::Bool(true))),
        T::Number | T::Duration | T::Rate => match value {
            Value::Number(_) => CellWrite::Set(value.clone()),
            Value::String(s) => parse_number(s).map_or(CellWrite::Clear, CellWrite::Set),
            _ => CellWrite::Clear,
        },
        // An unparseable date is stored as null without an error.
        T::Date => match value {
            Value::String(s) if looks_like_date(s) => CellWrite::Set(value.clone()),
            _ => CellWrite::Clear,
        },
        T::SingleSelect => match value {
            Value::String(s) if !s.is_empty() => {
                ensure_option(column, s);
                CellWrite::Set(value.clone())
            }
            _ => CellWrite::Clear,
        },
        T::MultipleSelect => {
            let names: Vec<String> = match value {
                Value::Array(items) => items
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .filter(|s| !s.is_empty())
                    .collect(),
                Value::String(s) if !s.is_empty() => vec![s.clone()],
                _ => Vec::new(),
            };
            if names.is_empty() {
                return CellWrite::Clear;
            }
            for name in &names {
                ensure_option(column, name);
            }
            CellWrite::Set(json!(names))
        }
        // Empty strings are NULL.
        _ => match value {
            Value::String(s) if s.is_empty() => CellWrite::Clear,
            Value::Array(a) if a.is_empty() => CellWrite::Clear,
            _ => CellWrite::Set(value.clone()),
        },
    }
}

fn parse_number(s: &str) -> Option<Value> {
    let s = s.trim();
    if let Ok(i) = s.parse::<i64>() {
        return Some(json!(i));
    }
    s.parse::<f64>()
        .ok()
        .filter(|f| f.is_finite())
        .map(|f| json!(f))
}

fn looks_like_date(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() >= 10
        && b[..4].iter().all(u8::is_ascii_digit)
        && b[4] == b'-'
        && b[5..7].iter().all(u8::is_ascii_digit)
        && b[7] == b'-'
        && b[8..10].iter().all(u8::is_ascii_digit)
}

fn ensure_option(column: &mut Column, name: &str) {
    if !column.data.is_object() {
        column.data = json!({});
    }
    if !column.data["options"].is_array() {
        column.data["options"] = json!([]);
    }
    let options = column.data["options"]
        .as_array_mut()
        .expect("options is an array");
    if options.iter().any(|o| o["name"] == name) {
        return;
    }
    let id = rand::rng().random_range(100_000..1_000_000).to_string();
    options.push(json!({"id": id, "name": name, "color": "#FFFCB5", "textColor": "#202428"}));
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    body: Value,
}

impl ApiError {
    /// The gateway's error body: `{"error_message": …}`.
    fn new(status: u16, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::from_u16(status).expect("valid status"),
            body: json!({"error_message": message.into()}),
        }
    }

    /// `{"error_type": …, "error_message": …}`.
    fn typed(status: u16, error_type: &str, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::from_u16(status).expect("valid status"),
            body: json!({"error_type": error_type, "error_message": message.into()}),
        }
    }

    fn invalid_token() -> Self {
        ApiError::new(403, "invalid token")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body)).into_response()
    }
}

struct Route {
    endpoint: Endpoint,
    gateway: bool,
    /// The path exists, but not with this method (→ 405).
    wrong_method: bool,
    uuid: String,
    row_id: Option<String>,
}

impl Route {
    fn classify(method: &Method, path: &str) -> Route {
        let mut route = Route {
            endpoint: Endpoint::Unknown,
            gateway: false,
            wrong_method: false,
            uuid: String::new(),
            row_id: None,
        };
        if path == "/api/v2.1/dtable/app-access-token/" {
            if method == Method::GET {
                route.endpoint = Endpoint::AccessToken;
            } else {
                route.wrong_method = true;
            }
            return route;
        }
        let Some(rest) = path.strip_prefix("/api-gateway/") else {
            return route;
        };
        route.gateway = true;
        let Some(rest) = rest.strip_prefix("api/v2/dtables/") else {
            return route;
        };
        let (uuid, rest) = rest.split_once('/').unwrap_or((rest, ""));
        route.uuid = uuid.to_owned();
        use Endpoint as E;
        let candidates: &[(&str, E)] = match rest {
            "metadata/" => &[("GET", E::Metadata)],
            "columns/" => &[
                ("GET", E::ListColumns),
                ("POST", E::AddColumn),
                ("PUT", E::UpdateColumn),
                ("DELETE", E::DeleteColumn),
            ],
            "batch-append-columns/" => &[("POST", E::BatchAppendColumns)],
            "rows/" => &[
                ("GET", E::ListRows),
                ("POST", E::AppendRows),
                ("PUT", E::UpdateRows),
                ("DELETE", E::DeleteRows),
            ],
            "sql" | "sql/" => &[("POST", E::Sql)],
            "tables/" => &[
                ("POST", E::CreateTable),
                ("PUT", E::RenameTable),
                ("DELETE", E::DeleteTable),
            ],
            "links/" => &[
                ("POST", E::CreateLinks),
                ("PUT", E::UpdateLinks),
                ("DELETE", E::DeleteLinks),
            ],
            "query-links/" => &[("POST", E::QueryLinks)],
            _ => {
                let row_id = rest
                    .strip_prefix("rows/")
                    .and_then(|r| r.strip_suffix('/'))
                    .filter(|r| !r.is_empty() && !r.contains('/'));
                match row_id {
                    Some(id) => {
                        route.row_id = Some(id.to_owned());
                        &[("GET", E::GetRow)]
                    }
                    None => &[],
                }
            }
        };
        match candidates.iter().find(|(m, _)| *m == method.as_str()) {
            Some((_, endpoint)) => route.endpoint = *endpoint,
            None => route.wrong_method = !candidates.is_empty(),
        }
        route
    }
}

/// The single axum handler: classify, apply faults, dispatch, record.
async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let route = Route::classify(&method, uri.path());
    let request = Request {
        route: &route,
        method: &method,
        uri: &uri,
        headers: &headers,
        body: &body,
    };
    let response = respond(&shared, &request).await;
    tracing::debug!(
        "fake SeaTable: {method} {uri} -> {} ({:?})",
        response.status(),
        route.endpoint
    );
    {
        let mut st = shared.lock();
        *st.stats.counts.entry(route.endpoint).or_default() += 1;
        if route.gateway {
            st.stats.gateway += 1;
        }
        st.stats.log.push(RecordedRequest {
            endpoint: route.endpoint,
            method: method.to_string(),
            path: uri.path().to_owned(),
            query: uri.query().unwrap_or_default().to_owned(),
            body: serde_json::from_slice(&body).ok(),
            status: response.status().as_u16(),
        });
    }
    shared.changed.notify_waiters();
    response
}

/// One request as [`handle`] got it, with its route.
struct Request<'a> {
    route: &'a Route,
    method: &'a Method,
    uri: &'a Uri,
    headers: &'a HeaderMap,
    body: &'a Bytes,
}

async fn respond(shared: &Shared, request: &Request<'_>) -> Response {
    let Request {
        route,
        uri,
        headers,
        ..
    } = *request;
    if let Some(outage) = *shared.outage.borrow() {
        return match outage {
            Outage::ServiceUnavailable => nginx_error(503),
            Outage::BadGateway | Outage::ConnectionRefused => nginx_error(502),
        };
    }
    let delay = shared
        .lock()
        .faults
        .delay_for(route.endpoint, route.gateway);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
        if shared.outage.borrow().is_some() {
            return nginx_error(502);
        }
    }
    let mut st = shared.lock();
    let rate = route.gateway.then(|| st.faults.tick_rate());
    let mut response = if let Some(status) = st.faults.take_fault(route.endpoint, route.gateway) {
        fault_response(status)
    } else if rate.as_ref().is_some_and(|r| r.exceeded) {
        empty_response(429)
    } else if route.endpoint == Endpoint::AccessToken {
        access_token(&mut st, uri, headers)
    } else if route.gateway {
        gateway(&mut st, request)
    } else if route.wrong_method {
        json_response(405, json!({"detail": "Method not allowed."}))
    } else {
        json_response(404, json!({"detail": "Not found."}))
    };
    let nginx = matches!(response.status().as_u16(), 502..=504)
        && response
            .headers()
            .get(header::SERVER)
            .is_some_and(|s| s == "nginx");
    if let Some(rate) = rate
        && !nginx
    {
        let h = response.headers_mut();
        h.insert("x-ratelimit-limit", HeaderValue::from(rate.limit));
        h.insert("x-ratelimit-remaining", HeaderValue::from(rate.remaining));
        h.insert("x-ratelimit-reset", HeaderValue::from(rate.reset_unix));
    }
    response
}

fn json_response(status: u16, body: Value) -> Response {
    (
        StatusCode::from_u16(status).expect("valid status"),
        axum::Json(body),
    )
        .into_response()
}

fn empty_response(status: u16) -> Response {
    Response::builder()
        .status(status)
        .body(Body::empty())
        .expect("valid response")
}

fn nginx_error(status: u16) -> Response {
    let reason = match status {
        502 => "Bad Gateway",
        503 => "Service Temporarily Unavailable",
        _ => "Gateway Time-out",
    };
    let page = format!(
        "<html>\r\n<head><title>{status} {reason}</title></head>\r\n<body>\r\n\
         <center><h1>{status} {reason}</h1></center>\r\n<hr><center>nginx</center>\r\n\
         </body>\r\n</html>\r\n"
    );
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/html")
        .header(header::SERVER, "nginx")
        .body(Body::from(page))
        .expect("valid response")
}

fn fault_response(status: u16) -> Response {
    match status {
        429 => empty_response(429),
        502..=504 => nginx_error(status),
        _ => {
            let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let reason = code.canonical_reason().unwrap_or("error");
            json_response(code.as_u16(), json!({"error_message": reason}))
        }
    }
}

fn query_map(uri: &Uri) -> HashMap<String, String> {
    Query::<HashMap<String, String>>::try_from_uri(uri)
        .map(|q| q.0)
        .unwrap_or_default()
}

/// The token of `Authorization: Bearer <t>` or `Authorization: Token <t>`.
fn auth_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    ((scheme.eq_ignore_ascii_case("bearer") || scheme.eq_ignore_ascii_case("token"))
        && !token.is_empty())
    .then_some(token)
}

/// `5h`, `3d` (the documented forms of the `exp` parameter).
fn parse_exp(exp: &str) -> Option<Duration> {
    let unit = exp.chars().last()?;
    let n: u64 = exp[..exp.len() - unit.len_utf8()].parse().ok()?;
    let secs = match unit {
        'h' => 3600,
        'd' => 86_400,
        _ => return None,
    };
    (n > 0).then(|| Duration::from_secs(n * secs))
}

fn access_token(st: &mut ServerState, uri: &Uri, headers: &HeaderMap) -> Response {
    let denied = || json_response(403, json!({"error_msg": "Permission denied."}));
    let Some(permission) = auth_token(headers).and_then(|t| st.auth.api_tokens.get(t).copied())
    else {
        return denied();
    };
    let query = query_map(uri);
    let lifetime = match (st.auth.lifetime, query.get("exp")) {
        (Some(forced), _) => forced,
        (None, Some(exp)) => match parse_exp(exp) {
            Some(lifetime) => lifetime,
            None => return json_response(400, json!({"error_msg": "exp invalid."})),
        },
        (None, None) => DEFAULT_TOKEN_LIFETIME,
    };
    let claims = json!({
        "exp": unix_secs() + lifetime.as_secs(),
        "dtable_uuid": st.base.uuid,
        "username": "",
        "permission": permission.claim(),
        "app_name": APP_NAME,
        "id_in_org": "",
    });
    let token = sign_jwt(&st.auth.secret, &claims);
    st.auth.issued.insert(token.clone(), false);
    st.auth.exchanges += 1;
    json_response(
        200,
        json!({
            "app_name": APP_NAME,
            "access_token": token,
            "dtable_uuid": st.base.uuid,
            "dtable_server": format!("{}/api-gateway/", st.server_url),
            "workspace_id": WORKSPACE_ID,
            "use_api_gateway": true,
            "dtable_name": DTABLE_NAME,
        }),
    )
}

/// Checks the Base-Token for a gateway request; returns its permission.
fn check_base_token(
    st: &ServerState,
    headers: &HeaderMap,
    path_uuid: &str,
) -> Result<Permission, ApiError> {
    let token = auth_token(headers).ok_or_else(ApiError::invalid_token)?;
    if st.auth.issued.get(token) != Some(&false) {
        return Err(ApiError::invalid_token());
    }
    let claims = verify_jwt(&st.auth.secret, token).ok_or_else(ApiError::invalid_token)?;
    let live = claims["exp"].as_u64().is_some_and(|exp| exp > unix_secs());
    if !live || claims["dtable_uuid"] != path_uuid || path_uuid != st.base.uuid {
        return Err(ApiError::invalid_token());
    }
    Ok(if claims["permission"] == "rw" {
        Permission::ReadWrite
    } else {
        Permission::ReadOnly
    })
}

fn gateway(st: &mut ServerState, request: &Request<'_>) -> Response {
    let Request {
        route,
        method,
        uri,
        headers,
        body,
    } = *request;
    let permission = match check_base_token(st, headers, &route.uuid) {
        Ok(p) => p,
        Err(err) => return err.into_response(),
    };
    if route.endpoint == Endpoint::Unknown {
        return if route.wrong_method {
            json_response(
                405,
                json!({"error_message": format!("method {method} not allowed")}),
            )
        } else {
            json_response(404, json!({"error_message": "Not Found"}))
        };
    }
    if route.endpoint.writes() && permission == Permission::ReadOnly {
        return ApiError::new(403, "Permission denied.").into_response();
    }
    let query = query_map(uri);
    let json_body = || -> Result<Value, ApiError> {
        serde_json::from_slice(body).map_err(|_| ApiError::new(400, "invalid json body"))
    };
    let base = &mut st.base;
    let result = match route.endpoint {
        Endpoint::Metadata => Ok(json!({"metadata": base.metadata_json()})),
        Endpoint::ListColumns => list_columns(base, &query),
        Endpoint::ListRows => list_rows(base, &query),
        Endpoint::GetRow => get_row(base, &query, route.row_id.as_deref().unwrap_or_default()),
        Endpoint::Sql => json_body().and_then(|b| sql(base, &b, permission)),
        other => json_body().and_then(|b| write_endpoint(base, other, &b)),
    };
    match result {
        Ok(value) => json_response(200, value),
        Err(err) => err.into_response(),
    }
}

fn write_endpoint(base: &mut Base, endpoint: Endpoint, body: &Value) -> Result<Value, ApiError> {
    match endpoint {
        Endpoint::AppendRows => append_rows(base, body),
        Endpoint::UpdateRows => update_rows(base, body),
        Endpoint::DeleteRows => delete_rows(base, body),
        Endpoint::CreateTable => create_table(base, body),
        Endpoint::RenameTable => rename_table(base, body),
        Endpoint::DeleteTable => delete_table(base, body),
        Endpoint::AddColumn => add_column(base, body),
        Endpoint::UpdateColumn => update_column(base, body),
        Endpoint::DeleteColumn => delete_column(base, body),
        Endpoint::BatchAppendColumns => batch_append_columns(base, body),
        Endpoint::CreateLinks => change_links(base, body, LinkMode::Add),
        Endpoint::UpdateLinks => change_links(base, body, LinkMode::Replace),
        Endpoint::DeleteLinks => change_links(base, body, LinkMode::Remove),
        Endpoint::QueryLinks => query_links(base, body),
        _ => Err(ApiError::new(404, "Not Found")),
    }
}

fn str_field<'a>(body: &'a Value, key: &str) -> Option<&'a str> {
    body.get(key).and_then(Value::as_str)
}

fn body_table(base: &Base, body: &Value) -> Result<usize, ApiError> {
    base.resolve_table(str_field(body, "table_name"), str_field(body, "table_id"))
}

fn flag(value: Option<&str>) -> bool {
    value.is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// The table a GET names by `table_name` or `table_id`.
fn query_table(base: &Base, query: &HashMap<String, String>) -> Result<usize, ApiError> {
    base.resolve_table(
        query.get("table_name").map(String::as_str),
        query.get("table_id").map(String::as_str),
    )
}

fn list_columns(base: &Base, query: &HashMap<String, String>) -> Result<Value, ApiError> {
    let t = query_table(base, query)?;
    check_view(query)?;
    Ok(json!({"columns": base.columns_json(t)}))
}

fn check_view(query: &HashMap<String, String>) -> Result<(), ApiError> {
    match query.get("view_name").map(String::as_str) {
        None | Some("") | Some(DEFAULT_VIEW) => Ok(()),
        Some(_) => Err(ApiError::new(404, "view not found")),
    }
}

fn list_rows(base: &Base, query: &HashMap<String, String>) -> Result<Value, ApiError> {
    let t = query_table(base, query)?;
    check_view(query)?;
    let start = match query.get("start").map(|s| s.trim()) {
        None | Some("") => 0,
        Some(s) => s
            .parse::<usize>()
            .map_err(|_| ApiError::new(400, "start invalid"))?,
    };
    let limit = match query.get("limit").map(|s| s.trim()) {
        None | Some("") => LIST_ROWS_MAX,
        Some(s) => match s.parse::<i64>() {
            Ok(n) if n >= 1 => (n as u64).min(LIST_ROWS_MAX as u64) as usize,
            _ => return Err(ApiError::new(400, "limit invalid")),
        },
    };
    let keys = if flag(query.get("convert_keys").map(String::as_str)) {
        Keys::Names
    } else {
        Keys::ColumnKeys
    };
    let links = base.link_index(t);
    let fields = base.all_fields(t);
    let rows: Vec<Value> = base.tables[t]
        .rows
        .iter()
        .skip(start)
        .take(limit)
        .map(|row| Value::Object(base.render(t, row, &fields, keys, &links, Some(LINK_CELL_CAP))))
        .collect();
    Ok(json!({"rows": rows}))
}

fn get_row(base: &Base, query: &HashMap<String, String>, row_id: &str) -> Result<Value, ApiError> {
    let t = query_table(base, query)?;
    let keys = if flag(query.get("convert_keys").map(String::as_str)) {
        Keys::Names
    } else {
        Keys::ColumnKeys
    };
    let row = base.tables[t]
        .rows
        .iter()
        .find(|r| r.id == row_id)
        .ok_or_else(|| ApiError::new(404, "row _id not exits"))?;
    let links = base.link_index(t);
    let fields = base.all_fields(t);
    Ok(Value::Object(base.render(
        t,
        row,
        &fields,
        keys,
        &links,
        Some(LINK_CELL_CAP),
    )))
}

/// The array `key` of a row write, at most [`WRITE_BATCH_MAX`] long.
fn write_batch<'a>(body: &'a Value, key: &str) -> Result<&'a [Value], ApiError> {
    let items = body
        .get(key)
        .and_then(Value::as_array)
        .ok_or_else(|| ApiError::new(400, format!("{key} invalid")))?;
    if items.len() > WRITE_BATCH_MAX {
        return Err(ApiError::new(
            400,
            format!("{key} exceeds the limit of {WRITE_BATCH_MAX}"),
        ));
    }
    Ok(items)
}

fn append_rows(base: &mut Base, body: &Value) -> Result<Value, ApiError> {
    let t = body_table(base, body)?;
    let rows = write_batch(body, "rows")?;
    let Some(values) = rows
        .iter()
        .map(Value::as_object)
        .collect::<Option<Vec<_>>>()
    else {
        return Err(ApiError::new(400, "rows invalid"));
    };
    let mut ids = Vec::with_capacity(values.len());
    for row in values {
        let id = base
            .insert_row(t, row, false)
            .map_err(|e| ApiError::new(400, e))?;
        ids.push(id);
    }
    // `first_row` is keyed by column keys whatever the request says (API_ISSUES #8).
    let first_row = ids.first().map(|id| {
        let table = &base.tables[t];
        let row = table
            .rows
            .iter()
            .find(|r| r.id == *id)
            .expect("row was inserted");
        let mut out: Map<String, Value> = row
            .cells
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        out.insert("_id".into(), json!(row.id));
        out.insert("_creator".into(), json!(row.creator));
        out.insert("_last_modifier".into(), json!(row.last_modifier));
        Value::Object(out)
    });
    Ok(json!({
        "inserted_row_count": ids.len(),
        "row_ids": ids.iter().map(|id| json!({"_id": id})).collect::<Vec<_>>(),
        "first_row": first_row,
    }))
}

fn update_rows(base: &mut Base, body: &Value) -> Result<Value, ApiError> {
    let t = body_table(base, body)?;
    let updates = write_batch(body, "updates")?;
    let mut parsed = Vec::with_capacity(updates.len());
    for update in updates {
        let row_id =
            str_field(update, "row_id").ok_or_else(|| ApiError::new(400, "row_id invalid"))?;
        let row = update
            .get("row")
            .and_then(Value::as_object)
            .ok_or_else(|| ApiError::new(400, "row invalid"))?;
        parsed.push((row_id, row));
    }
    for (row_id, row) in parsed {
        // An unknown row_id is skipped silently (real behaviour unverified, §8.8).
        base.update_row(t, row_id, row, false)
            .map_err(|e| ApiError::new(400, e))?;
    }
    Ok(json!({"success": true}))
}

fn delete_rows(base: &mut Base, body: &Value) -> Result<Value, ApiError> {
    let t = body_table(base, body)?;
    let ids: Vec<String> = body
        .get("row_ids")
        .and_then(Value::as_array)
        .ok_or_else(|| ApiError::new(400, "row_ids invalid"))?
        .iter()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    if ids.len() > DELETE_BATCH_MAX {
        return Err(ApiError::new(
            400,
            format!("row_ids exceeds the limit of {DELETE_BATCH_MAX}"),
        ));
    }
    base.delete_rows(t, &ids);
    Ok(json!({"success": true}))
}

fn parse_new_column(spec: &Value) -> Result<NewColumn, ApiError> {
    let name =
        str_field(spec, "column_name").ok_or_else(|| ApiError::new(400, "column_name invalid."))?;
    let kind = str_field(spec, "column_type")
        .and_then(ColumnType::parse)
        .ok_or_else(|| ApiError::new(400, "column_type invalid."))?;
    Ok(NewColumn {
        name: name.to_owned(),
        kind,
        data: spec.get("column_data").filter(|d| !d.is_null()).cloned(),
    })
}

fn create_table(base: &mut Base, body: &Value) -> Result<Value, ApiError> {
    let name =
        str_field(body, "table_name").ok_or_else(|| ApiError::new(400, "table_name invalid."))?;
    let columns = match body.get("columns") {
        None | Some(Value::Null) => vec![NewColumn {
            name: "Name".to_owned(),
            kind: ColumnType::Text,
            data: None,
        }],
        Some(Value::Array(specs)) => specs
            .iter()
            .map(parse_new_column)
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => return Err(ApiError::new(400, "columns invalid.")),
    };
    let t = base.create_table(name, &columns)?;
    let mut table = base.table_json(t);
    table["rows"] = json!([]);
    table["id_row_map"] = json!({});
    table["view_structure"] = json!({"folders": [], "view_ids": ["0000"]});
    Ok(table)
}

fn rename_table(base: &mut Base, body: &Value) -> Result<Value, ApiError> {
    let t = body_table(base, body)?;
    let new_name = str_field(body, "new_table_name")
        .filter(|n| !n.trim().is_empty())
        .ok_or_else(|| ApiError::new(400, "new_table_name invalid."))?;
    if base.table_index(new_name).is_some_and(|other| other != t) {
        return Err(ApiError::typed(
            400,
            "table_already_exists",
            "table name already exists",
        ));
    }
    base.tables[t].name = new_name.to_owned();
    base.version += 1;
    Ok(json!({"success": true}))
}

fn delete_table(base: &mut Base, body: &Value) -> Result<Value, ApiError> {
    let t = body_table(base, body)?;
    base.remove_table(t);
    Ok(json!({"success": true}))
}

fn add_column(base: &mut Base, body: &Value) -> Result<Value, ApiError> {
    let t = body_table(base, body)?;
    let new = parse_new_column(body)?;
    let c = base.add_column(t, &new, str_field(body, "anchor_column"))?;
    Ok(base.column_json(t, &base.tables[t].columns[c]))
}

fn find_column(base: &Base, t: usize, name_or_key: &str) -> Result<usize, ApiError> {
    base.tables[t]
        .columns
        .iter()
        .position(|c| c.name == name_or_key)
        .or_else(|| {
            base.tables[t]
                .columns
                .iter()
                .position(|c| c.key == name_or_key)
        })
        .ok_or_else(|| ApiError::new(404, "column not found"))
}

fn update_column(base: &mut Base, body: &Value) -> Result<Value, ApiError> {
    let t = body_table(base, body)?;
    if str_field(body, "op_type") != Some("rename_column") {
        return Err(ApiError::new(
            400,
            "fake SeaTable supports only op_type rename_column",
        ));
    }
    let c = find_column(base, t, str_field(body, "column").unwrap_or_default())?;
    let new_name = str_field(body, "new_column_name")
        .filter(|n| !n.trim().is_empty())
        .ok_or_else(|| ApiError::new(400, "new_column_name invalid."))?;
    if base.tables[t]
        .columns
        .iter()
        .enumerate()
        .any(|(i, col)| i != c && col.name == new_name)
    {
        return Err(ApiError::typed(
            400,
            "column_already_exists",
            "column name already exists",
        ));
    }
    base.tables[t].columns[c].name = new_name.to_owned();
    base.version += 1;
    Ok(base.column_json(t, &base.tables[t].columns[c]))
}

fn delete_column(base: &mut Base, body: &Value) -> Result<Value, ApiError> {
    let t = body_table(base, body)?;
    let c = find_column(base, t, str_field(body, "column").unwrap_or_default())?;
    base.remove_column(t, c);
    Ok(json!({"success": true}))
}

fn batch_append_columns(base: &mut Base, body: &Value) -> Result<Value, ApiError> {
    let t = body_table(base, body)?;
    let specs = body
        .get("columns")
        .and_then(Value::as_array)
        .ok_or_else(|| ApiError::new(400, "columns invalid."))?;
    let columns = specs
        .iter()
        .map(parse_new_column)
        .collect::<Result<Vec<_>, _>>()?;
    let mut names: HashSet<&str> = base.tables[t]
        .columns
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    for c in &columns {
        if matches!(
            c.kind,
            ColumnType::Link | ColumnType::Formula | ColumnType::LinkFormula
        ) {
            return Err(ApiError::new(
                400,
                format!("column type {} is not supported", c.kind.as_str()),
            ));
        }
        if !names.insert(c.name.as_str()) {
            return Err(ApiError::typed(
                400,
                "column_already_exists",
                "column name already exists",
            ));
        }
    }
    let mut out = Vec::with_capacity(columns.len());
    for c in &columns {
        let i = base.add_column(t, c, None)?;
        out.push(base.column_json(t, &base.tables[t].columns[i]));
    }
    Ok(json!({"columns": out}))
}

fn change_links(base: &mut Base, body: &Value, mode: LinkMode) -> Result<Value, ApiError> {
    let link_id =
        str_field(body, "link_id").ok_or_else(|| ApiError::new(400, "link_id invalid."))?;
    let t = body_table(base, body)?;
    let o = base.resolve_table(
        str_field(body, "other_table_name"),
        str_field(body, "other_table_id"),
    )?;
    let li = base
        .links
        .iter()
        .position(|l| l.id == link_id)
        .ok_or_else(|| ApiError::new(400, "link_id invalid."))?;
    let (tid, oid) = (&base.tables[t].id, &base.tables[o].id);
    let link = &base.links[li];
    let forward = if link.table_id == *tid && link.other_table_id == *oid {
        true
    } else if link.table_id == *oid && link.other_table_id == *tid {
        false
    } else {
        return Err(ApiError::new(400, "link_id does not link these tables"));
    };
    let map = body
        .get("other_rows_ids_map")
        .and_then(Value::as_object)
        .ok_or_else(|| ApiError::new(400, "other_rows_ids_map invalid."))?;
    let mine: HashSet<String> = base.tables[t].rows.iter().map(|r| r.id.clone()).collect();
    let theirs: HashSet<String> = base.tables[o].rows.iter().map(|r| r.id.clone()).collect();
    let mut requested = 0usize;
    let pairs = &mut base.links[li].pairs;
    for (row_id, others) in map {
        let others: Vec<&str> = others
            .as_array()
            .ok_or_else(|| ApiError::new(400, "other_rows_ids_map invalid."))?
            .iter()
            .filter_map(Value::as_str)
            .collect();
        if mode == LinkMode::Replace {
            pairs.retain(|(a, b)| if forward { a != row_id } else { b != row_id });
        }
        for other in others {
            let pair = oriented(forward, row_id, other);
            match mode {
                LinkMode::Add | LinkMode::Replace => {
                    if mine.contains(row_id) && theirs.contains(other) && !pairs.contains(&pair) {
                        pairs.push(pair);
                    }
                }
                LinkMode::Remove => {
                    // The count is of requested pairs, existing or not (API_ISSUES #9).
                    requested += 1;
                    pairs.retain(|p| *p != pair);
                }
            }
        }
    }
    Ok(match mode {
        LinkMode::Remove => json!({"success": true, "deleted_links_count": requested}),
        _ => json!({"success": true}),
    })
}

fn query_links(base: &Base, body: &Value) -> Result<Value, ApiError> {
    let t = body_table(base, body)?;
    let column_name = str_field(body, "link_column_name").unwrap_or_default();
    let c = find_column(base, t, column_name)?;
    let column = &base.tables[t].columns[c];
    if column.kind != ColumnType::Link {
        return Err(ApiError::new(400, "link_column_name invalid."));
    }
    let requests = body
        .get("rows")
        .and_then(Value::as_array)
        .ok_or_else(|| ApiError::new(400, "rows invalid."))?;
    let links = base.link_index(t);
    let cells = links.by_column.get(&column.key);
    let mut out = Map::new();
    for request in requests {
        let row_id = str_field(request, "row_id").unwrap_or_default();
        let offset = request.get("offset").and_then(Value::as_u64).unwrap_or(0) as usize;
        let limit = request.get("limit").and_then(Value::as_u64).unwrap_or(10) as usize;
        let linked: Vec<Value> = cells
            .and_then(|c| c.get(row_id))
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .skip(offset)
            .take(limit)
            .map(|(id, dv)| json!({"row_id": id, "display_value": dv}))
            .collect();
        out.insert(row_id.to_owned(), Value::Array(linked));
    }
    Ok(Value::Object(out))
}

// ---------------------------------------------------------------------------------------------
// SQL: the small dialect of §8.10
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Word(String),
    Quoted(String),
    Str(String),
    Num(String),
    Param(usize),
    Sym(&'static str),
}

impl std::fmt::Display for Tok {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Tok::Word(w) | Tok::Num(w) => write!(f, "{w}"),
            Tok::Quoted(q) => write!(f, "`{q}`"),
            Tok::Str(s) => write!(f, "'{s}'"),
            Tok::Param(_) => write!(f, "?"),
            Tok::Sym(s) => write!(f, "{s}"),
        }
    }
}

const RESERVED: [&str; 28] = [
    "SELECT", "FROM", "WHERE", "AND", "OR", "NOT", "IN", "IS", "NULL", "LIKE", "ILIKE", "LIMIT",
    "OFFSET", "ORDER", "BY", "ASC", "DESC", "SET", "UPDATE", "DELETE", "INSERT", "BETWEEN", "TRUE",
    "FALSE", "DISTINCT", "JOIN", "GROUP", "HAVING",
];

fn syntax_error(near: Option<&Tok>) -> ApiError {
    match near {
        Some(tok) => ApiError::new(400, format!("SQL syntax error near '{tok}'")),
        None => ApiError::new(400, "SQL syntax error: unexpected end of statement"),
    }
}

fn unsupported(what: &str) -> ApiError {
    ApiError::new(400, format!("fake SeaTable does not support {what}"))
}

fn tokenize(sql: &str) -> Result<Vec<Tok>, ApiError> {
    let chars: Vec<char> = sql.chars().collect();
    let mut toks = Vec::new();
    let mut params = 0;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        if c == '`' || c == '\'' || c == '"' {
            let mut text = String::new();
            let mut j = i + 1;
            loop {
                let Some(&d) = chars.get(j) else {
                    return Err(ApiError::new(400, "SQL syntax error: unterminated quote"));
                };
                if d == c {
                    if chars.get(j + 1) == Some(&c) {
                        text.push(c);
                        j += 2;
                        continue;
                    }
                    break;
                }
                if d == '\\' && c != '`' && j + 1 < chars.len() {
                    text.push(match chars[j + 1] {
                        'n' => '\n',
                        't' => '\t',
                        other => other,
                    });
                    j += 2;
                    continue;
                }
                text.push(d);
                j += 1;
            }
            toks.push(if c == '`' {
                Tok::Quoted(text)
            } else {
                Tok::Str(text)
            });
            i = j + 1;
        } else if c == '?' {
            toks.push(Tok::Param(params));
            params += 1;
            i += 1;
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == '.') {
                i += 1;
            }
            toks.push(Tok::Num(chars[start..i].iter().collect()));
        } else if c.is_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            toks.push(Tok::Word(chars[start..i].iter().collect()));
        } else {
            let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
            let sym = ["<=", ">=", "<>", "!="]
                .into_iter()
                .find(|s| *s == two)
                .or_else(|| {
                    ["=", "<", ">", "(", ")", ",", "*", ".", ";", "-"]
                        .into_iter()
                        .find(|s| s.starts_with(c))
                })
                .ok_or_else(|| ApiError::new(400, format!("SQL syntax error near '{c}'")))?;
            toks.push(Tok::Sym(sym));
            i += sym.len();
        }
    }
    Ok(toks)
}

#[derive(Clone, Debug)]
struct Ident {
    qualifier: Option<String>,
    name: String,
}

#[derive(Clone, Debug)]
enum Lit {
    Str(String),
    Num(f64),
    Bool(bool),
    Null,
    Param(usize),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Clone, Debug)]
enum Pred {
    Cmp(CmpOp, Lit),
    IsNull {
        negated: bool,
    },
    IsBool {
        value: bool,
        negated: bool,
    },
    In {
        items: Vec<Lit>,
        negated: bool,
    },
    Like {
        pattern: Lit,
        ci: bool,
        negated: bool,
    },
    Between {
        low: Lit,
        high: Lit,
        negated: bool,
    },
}

#[derive(Clone, Debug)]
enum Expr {
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
    Pred(Ident, Pred),
}

#[derive(Clone, Debug)]
enum Count {
    Lit(u64),
    Param(usize),
}

#[derive(Debug)]
struct Select {
    distinct: bool,
    /// `None` for `*`.
    fields: Option<Vec<Ident>>,
    table: String,
    filter: Option<Expr>,
    order: Vec<(Ident, bool)>,
    limit: Option<Count>,
    offset: Option<Count>,
}

#[derive(Debug)]
enum Stmt {
    Select(Select),
    Update {
        table: String,
        sets: Vec<(Ident, Lit)>,
        filter: Option<Expr>,
    },
    Delete {
        table: String,
        filter: Option<Expr>,
    },
    Insert,
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }

    fn bump(&mut self) -> Option<Tok> {
        let tok = self.toks.get(self.pos).cloned();
        self.pos += 1;
        tok
    }

    fn error(&self) -> ApiError {
        syntax_error(self.peek())
    }

    fn is_kw(&self, kw: &str) -> bool {
        matches!(self.peek(), Some(Tok::Word(w)) if w.eq_ignore_ascii_case(kw))
    }

    fn is_sym(&self, sym: &str) -> bool {
        matches!(self.peek(), Some(Tok::Sym(s)) if *s == sym)
    }

    /// Steps over the next token if it is what the caller `found`; returns `found`.
    fn eat_if(&mut self, found: bool) -> bool {
        if found {
            self.pos += 1;
        }
        found
    }

    /// A syntax error at the next token unless the caller `found` what it expected.
    fn expected(&self, found: bool) -> Result<(), ApiError> {
        if found { Ok(()) } else { Err(self.error()) }
    }

    fn eat_kw(&mut self, kw: &str) -> bool {
        let found = self.is_kw(kw);
        self.eat_if(found)
    }

    fn expect_kw(&mut self, kw: &str) -> Result<(), ApiError> {
        let found = self.eat_kw(kw);
        self.expected(found)
    }

    fn eat_sym(&mut self, sym: &str) -> bool {
        let found = self.is_sym(sym);
        self.eat_if(found)
    }

    fn expect_sym(&mut self, sym: &str) -> Result<(), ApiError> {
        let found = self.eat_sym(sym);
        self.expected(found)
    }

    fn name(&mut self) -> Result<String, ApiError> {
        match self.peek() {
            Some(Tok::Word(w)) if !RESERVED.iter().any(|r| r.eq_ignore_ascii_case(w)) => {
                let w = w.clone();
                self.pos += 1;
                Ok(w)
            }
            Some(Tok::Quoted(q)) => {
                let q = q.clone();
                self.pos += 1;
                Ok(q)
            }
            _ => Err(self.error()),
        }
    }

    fn ident(&mut self) -> Result<Ident, ApiError> {
        let first = self.name()?;
        if matches!(self.peek(), Some(Tok::Sym("("))) {
            return Err(unsupported("SQL functions"));
        }
        if self.eat_sym(".") {
            let name = self.name()?;
            return Ok(Ident {
                qualifier: Some(first),
                name,
            });
        }
        Ok(Ident {
            qualifier: None,
            name: first,
        })
    }

    fn literal(&mut self) -> Result<Lit, ApiError> {
        let negative = self.eat_sym("-");
        let lit = match self.peek().cloned() {
            Some(Tok::Num(n)) => Lit::Num(n.parse::<f64>().map_err(|_| self.error())?),
            Some(Tok::Str(s)) if !negative => Lit::Str(s),
            Some(Tok::Param(i)) if !negative => Lit::Param(i),
            Some(Tok::Word(w)) if !negative && w.eq_ignore_ascii_case("true") => Lit::Bool(true),
            Some(Tok::Word(w)) if !negative && w.eq_ignore_ascii_case("false") => Lit::Bool(false),
            Some(Tok::Word(w)) if !negative && w.eq_ignore_ascii_case("null") => Lit::Null,
            Some(Tok::Word(_) | Tok::Quoted(_)) if !negative => {
                return Err(unsupported(
                    "comparing a column with another column or an expression",
                ));
            }
            _ => return Err(self.error()),
        };
        self.pos += 1;
        Ok(match lit {
            Lit::Num(n) if negative => Lit::Num(-n),
            other => other,
        })
    }

    fn count(&mut self) -> Result<Count, ApiError> {
        match self.bump() {
            Some(Tok::Num(n)) => n
                .parse::<u64>()
                .map(Count::Lit)
                .map_err(|_| syntax_error(Some(&Tok::Num(n.clone())))),
            Some(Tok::Param(i)) => Ok(Count::Param(i)),
            other => Err(syntax_error(other.as_ref())),
        }
    }

    fn end(&mut self) -> Result<(), ApiError> {
        self.eat_sym(";");
        if self.pos < self.toks.len() {
            if self.is_kw("GROUP") || self.is_kw("HAVING") {
                return Err(unsupported("GROUP BY / HAVING"));
            }
            return Err(self.error());
        }
        Ok(())
    }

    fn statement(&mut self) -> Result<Stmt, ApiError> {
        if self.eat_kw("SELECT") {
            self.select().map(Stmt::Select)
        } else if self.eat_kw("UPDATE") {
            self.update()
        } else if self.eat_kw("DELETE") {
            self.expect_kw("FROM")?;
            let table = self.name()?;
            let filter = self.filter()?;
            self.end()?;
            Ok(Stmt::Delete { table, filter })
        } else if self.is_kw("INSERT") {
            Ok(Stmt::Insert)
        } else {
            Err(self.error())
        }
    }

    fn table_name(&mut self) -> Result<String, ApiError> {
        let table = self.name()?;
        if matches!(self.peek(), Some(Tok::Sym(","))) || self.is_kw("JOIN") {
            return Err(unsupported("joins"));
        }
        if self.is_kw("AS") {
            return Err(unsupported("aliases"));
        }
        Ok(table)
    }

    fn select(&mut self) -> Result<Select, ApiError> {
        let distinct = self.eat_kw("DISTINCT");
        let fields = if self.eat_sym("*") {
            None
        } else {
            let mut fields = vec![self.ident()?];
            while self.eat_sym(",") {
                fields.push(self.ident()?);
            }
            if self.is_kw("AS") {
                return Err(unsupported("aliases"));
            }
            Some(fields)
        };
        self.expect_kw("FROM")?;
        let table = self.table_name()?;
        let filter = self.filter()?;
        if self.is_kw("GROUP") || self.is_kw("HAVING") {
            return Err(unsupported("GROUP BY / HAVING"));
        }
        let mut order = Vec::new();
        if self.eat_kw("ORDER") {
            self.expect_kw("BY")?;
            loop {
                let ident = self.ident()?;
                let desc = if self.eat_kw("DESC") {
                    true
                } else {
                    self.eat_kw("ASC");
                    false
                };
                order.push((ident, desc));
                if !self.eat_sym(",") {
                    break;
                }
            }
        }
        let (mut limit, mut offset) = (None, None);
        if self.eat_kw("LIMIT") {
            let first = self.count()?;
            if self.eat_sym(",") {
                offset = Some(first);
                limit = Some(self.count()?);
            } else {
                limit = Some(first);
                if self.eat_kw("OFFSET") {
                    offset = Some(self.count()?);
                }
            }
        }
        self.end()?;
        Ok(Select {
            distinct,
            fields,
            table,
            filter,
            order,
            limit,
            offset,
        })
    }

    fn update(&mut self) -> Result<Stmt, ApiError> {
        let table = self.table_name()?;
        self.expect_kw("SET")?;
        let mut sets = Vec::new();
        loop {
            let column = self.ident()?;
            self.expect_sym("=")?;
            sets.push((column, self.literal()?));
            if !self.eat_sym(",") {
                break;
            }
        }
        let filter = self.filter()?;
        if self.is_kw("LIMIT") || self.is_kw("ORDER") {
            return Err(self.error());
        }
        self.end()?;
        Ok(Stmt::Update {
            table,
            sets,
            filter,
        })
    }

    fn filter(&mut self) -> Result<Option<Expr>, ApiError> {
        if self.eat_kw("WHERE") {
            self.or_expr().map(Some)
        } else {
            Ok(None)
        }
    }

    fn or_expr(&mut self) -> Result<Expr, ApiError> {
        let mut left = self.and_expr()?;
        while self.eat_kw("OR") {
            left = Expr::Or(Box::new(left), Box::new(self.and_expr()?));
        }
        Ok(left)
    }

    fn and_expr(&mut self) -> Result<Expr, ApiError> {
        let mut left = self.not_expr()?;
        while self.eat_kw("AND") {
            left = Expr::And(Box::new(left), Box::new(self.not_expr()?));
        }
        Ok(left)
    }

    fn not_expr(&mut self) -> Result<Expr, ApiError> {
        if self.eat_kw("NOT") {
            return Ok(Expr::Not(Box::new(self.not_expr()?)));
        }
        if self.eat_sym("(") {
            let inner = self.or_expr()?;
            self.expect_sym(")")?;
            return Ok(inner);
        }
        let column = self.ident()?;
        let pred = self.predicate()?;
        Ok(Expr::Pred(column, pred))
    }

    fn predicate(&mut self) -> Result<Pred, ApiError> {
        if self.eat_kw("IS") {
            let negated = self.eat_kw("NOT");
            if self.eat_kw("NULL") {
                return Ok(Pred::IsNull { negated });
            }
            if self.eat_kw("TRUE") {
                return Ok(Pred::IsBool {
                    value: true,
                    negated,
                });
            }
            if self.eat_kw("FALSE") {
                return Ok(Pred::IsBool {
                    value: false,
                    negated,
                });
            }
            return Err(self.error());
        }
        let negated = self.eat_kw("NOT");
        if self.eat_kw("IN") {
            self.expect_sym("(")?;
            let mut items = vec![self.literal()?];
            while self.eat_sym(",") {
                items.push(self.literal()?);
            }
            self.expect_sym(")")?;
            return Ok(Pred::In { items, negated });
        }
        if self.is_kw("LIKE") || self.is_kw("ILIKE") {
            let ci = self.is_kw("ILIKE");
            self.pos += 1;
            return Ok(Pred::Like {
                pattern: self.literal()?,
                ci,
                negated,
            });
        }
        if self.eat_kw("BETWEEN") {
            let low = self.literal()?;
            self.expect_kw("AND")?;
            let high = self.literal()?;
            return Ok(Pred::Between { low, high, negated });
        }
        if self.is_kw("HAS") {
            return Err(unsupported("HAS ANY OF / HAS ALL OF / HAS NONE OF"));
        }
        if negated {
            return Err(self.error());
        }
        let op = match self.bump() {
            Some(Tok::Sym("=")) => CmpOp::Eq,
            Some(Tok::Sym("!=" | "<>")) => CmpOp::Ne,
            Some(Tok::Sym("<")) => CmpOp::Lt,
            Some(Tok::Sym("<=")) => CmpOp::Le,
            Some(Tok::Sym(">")) => CmpOp::Gt,
            Some(Tok::Sym(">=")) => CmpOp::Ge,
            other => return Err(syntax_error(other.as_ref())),
        };
        Ok(Pred::Cmp(op, self.literal()?))
    }
}

/// A SQL value: what a cell or a literal means to the WHERE clause.
#[derive(Clone, Debug, PartialEq)]
enum SqlVal {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
}

impl SqlVal {
    /// Empty cells, `""` and empty lists are NULL; a list counts as its first element.
    fn from_json(value: Option<&Value>) -> SqlVal {
        match value {
            None | Some(Value::Null) => SqlVal::Null,
            Some(Value::Bool(b)) => SqlVal::Bool(*b),
            Some(Value::Number(n)) => n.as_f64().map_or(SqlVal::Null, SqlVal::Num),
            Some(Value::String(s)) if s.is_empty() => SqlVal::Null,
            Some(Value::String(s)) => SqlVal::Str(s.clone()),
            Some(Value::Array(items)) => SqlVal::from_json(items.first()),
            Some(other @ Value::Object(_)) => SqlVal::Str(other.to_string()),
        }
    }

    fn from_lit(lit: &Lit, params: &[Value]) -> SqlVal {
        match lit {
            Lit::Str(s) if s.is_empty() => SqlVal::Null,
            Lit::Str(s) => SqlVal::Str(s.clone()),
            Lit::Num(n) => SqlVal::Num(*n),
            Lit::Bool(b) => SqlVal::Bool(*b),
            Lit::Null => SqlVal::Null,
            Lit::Param(i) => SqlVal::from_json(params.get(*i)),
        }
    }

    fn text(&self) -> Option<String> {
        match self {
            SqlVal::Null => None,
            SqlVal::Bool(b) => Some(b.to_string()),
            SqlVal::Num(n) => Some(format_number(*n)),
            SqlVal::Str(s) => Some(s.clone()),
        }
    }

    fn rank(&self) -> u8 {
        match self {
            SqlVal::Null => 0,
            SqlVal::Bool(_) => 1,
            SqlVal::Num(_) => 2,
            SqlVal::Str(_) => 3,
        }
    }
}

fn format_number(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e15 {
        format!("{}", n as i64)
    } else {
        n.to_string()
    }
}

enum Compared {
    Null,
    Incomparable,
    Ord(CmpOrdering),
}

/// Compares a cell with a literal, converting the literal to the cell's kind.
fn compare(cell: &SqlVal, lit: &SqlVal) -> Compared {
    use SqlVal as V;
    let ord = |o: Option<CmpOrdering>| o.map_or(Compared::Incomparable, Compared::Ord);
    match (cell, lit) {
        (V::Null, _) | (_, V::Null) => Compared::Null,
        (V::Num(a), V::Num(b)) => ord(a.partial_cmp(b)),
        (V::Num(a), V::Str(s)) => ord(s.trim().parse::<f64>().ok().and_then(|b| a.partial_cmp(&b))),
        (V::Bool(a), V::Bool(b)) => Compared::Ord(a.cmp(b)),
        (V::Bool(a), V::Str(s)) => match s.to_ascii_lowercase().as_str() {
            "true" => Compared::Ord(a.cmp(&true)),
            "false" => Compared::Ord(a.cmp(&false)),
            _ => Compared::Incomparable,
        },
        (V::Bool(a), V::Num(n)) if *n == 0.0 || *n == 1.0 => Compared::Ord(a.cmp(&(*n == 1.0))),
        (V::Bool(_), V::Num(_)) | (V::Num(_), V::Bool(_)) => Compared::Incomparable,
        (V::Str(a), other) => ord(other.text().map(|b| a.as_str().cmp(b.as_str()))),
    }
}

fn like(text: &str, pattern: &str, ci: bool) -> bool {
    let fold = |s: &str| -> Vec<char> {
        if ci {
            s.to_lowercase().chars().collect()
        } else {
            s.chars().collect()
        }
    };
    let (t, p) = (fold(text), fold(pattern));
    let mut dp = vec![vec![false; p.len() + 1]; t.len() + 1];
    dp[0][0] = true;
    for j in 1..=p.len() {
        dp[0][j] = p[j - 1] == '%' && dp[0][j - 1];
    }
    for i in 1..=t.len() {
        for j in 1..=p.len() {
            dp[i][j] = match p[j - 1] {
                '%' => dp[i][j - 1] || dp[i - 1][j],
                '_' => dp[i - 1][j - 1],
                c => dp[i - 1][j - 1] && t[i - 1] == c,
            };
        }
    }
    dp[t.len()][p.len()]
}

/// Resolves a column of the SQL table (case-insensitive; exact match first).
fn resolve_field(base: &Base, t: usize, ident: &Ident) -> Result<Field, ApiError> {
    let table = &base.tables[t];
    if let Some(q) = &ident.qualifier
        && !q.eq_ignore_ascii_case(&table.name)
    {
        return Err(ApiError::new(400, format!("no such table: {q}")));
    }
    if let Some(system) = SYSTEM_FIELDS
        .into_iter()
        .find(|f| f.eq_ignore_ascii_case(&ident.name))
    {
        return Ok(Field::System(system));
    }
    table
        .columns
        .iter()
        .position(|c| c.name == ident.name)
        .or_else(|| {
            table
                .columns
                .iter()
                .position(|c| c.name.eq_ignore_ascii_case(&ident.name))
        })
        .map(Field::Col)
        .ok_or_else(|| ApiError::new(400, format!("no such column: {}", ident.name)))
}

/// Resolves every column of a WHERE clause, refusing link columns.
fn check_filter(base: &Base, t: usize, expr: &Expr) -> Result<(), ApiError> {
    match expr {
        Expr::And(a, b) | Expr::Or(a, b) => {
            check_filter(base, t, a)?;
            check_filter(base, t, b)
        }
        Expr::Not(inner) => check_filter(base, t, inner),
        Expr::Pred(ident, _) => {
            if let Field::Col(c) = resolve_field(base, t, ident)?
                && base.tables[t].columns[c].kind == ColumnType::Link
            {
                return Err(unsupported(&format!(
                    "link column {} in WHERE: the reference documents no way to filter on a \
                     link cell; page through the rows instead",
                    ident.name
                )));
            }
            Ok(())
        }
    }
}

fn field_value(base: &Base, t: usize, row: &Row, field: Field) -> SqlVal {
    match field {
        Field::System(name) => SqlVal::from_json(Some(&Base::system_value(row, name))),
        Field::Col(c) => SqlVal::from_json(row.cells.get(&base.tables[t].columns[c].key)),
    }
}

fn eval(base: &Base, t: usize, row: &Row, expr: &Expr, params: &[Value]) -> bool {
    match expr {
        Expr::And(a, b) => eval(base, t, row, a, params) && eval(base, t, row, b, params),
        Expr::Or(a, b) => eval(base, t, row, a, params) || eval(base, t, row, b, params),
        Expr::Not(inner) => !eval(base, t, row, inner, params),
        Expr::Pred(ident, pred) => {
            let field = resolve_field(base, t, ident).expect("checked before evaluation");
            let cell = field_value(base, t, row, field);
            let lit = |l: &Lit| SqlVal::from_lit(l, params);
            match pred {
                Pred::Cmp(op, l) => match (compare(&cell, &lit(l)), op) {
                    // `!=` is true for NULL.
                    (Compared::Null | Compared::Incomparable, CmpOp::Ne) => true,
                    (Compared::Null | Compared::Incomparable, _) => false,
                    (Compared::Ord(o), CmpOp::Eq) => o == CmpOrdering::Equal,
                    (Compared::Ord(o), CmpOp::Ne) => o != CmpOrdering::Equal,
                    (Compared::Ord(o), CmpOp::Lt) => o == CmpOrdering::Less,
                    (Compared::Ord(o), CmpOp::Le) => o != CmpOrdering::Greater,
                    (Compared::Ord(o), CmpOp::Gt) => o == CmpOrdering::Greater,
                    (Compared::Ord(o), CmpOp::Ge) => o != CmpOrdering::Less,
                },
                Pred::IsNull { negated } => (cell == SqlVal::Null) != *negated,
                Pred::IsBool { value, negated } => (cell == SqlVal::Bool(*value)) != *negated,
                Pred::In { items, negated } => {
                    if cell == SqlVal::Null {
                        return *negated;
                    }
                    let found = items.iter().any(|i| {
                        matches!(compare(&cell, &lit(i)), Compared::Ord(CmpOrdering::Equal))
                    });
                    found != *negated
                }
                Pred::Like {
                    pattern,
                    ci,
                    negated,
                } => match (cell.text(), lit(pattern).text()) {
                    (Some(text), Some(pattern)) => like(&text, &pattern, *ci) != *negated,
                    _ => *negated,
                },
                Pred::Between { low, high, negated } => {
                    let ge = matches!(
                        compare(&cell, &lit(low)),
                        Compared::Ord(CmpOrdering::Greater | CmpOrdering::Equal)
                    );
                    let le = matches!(
                        compare(&cell, &lit(high)),
                        Compared::Ord(CmpOrdering::Less | CmpOrdering::Equal)
                    );
                    if cell == SqlVal::Null {
                        *negated
                    } else {
                        (ge && le) != *negated
                    }
                }
            }
        }
    }
}

fn count_value(count: &Count, params: &[Value]) -> Result<usize, ApiError> {
    match count {
        Count::Lit(n) => Ok(*n as usize),
        Count::Param(i) => {
            let invalid = || ApiError::new(400, "LIMIT and OFFSET must be non-negative integers");
            match params.get(*i) {
                Some(Value::Number(n)) => n.as_u64().map(|v| v as usize).ok_or_else(invalid),
                Some(Value::String(s)) => s.trim().parse().map_err(|_| invalid()),
                _ => Err(invalid()),
            }
        }
    }
}

fn sql(base: &mut Base, body: &Value, permission: Permission) -> Result<Value, ApiError> {
    let text = str_field(body, "sql")
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| ApiError::new(400, "sql invalid."))?;
    // Documented both ways; the spec says false and the Python SDK relies on keys (§2.3).
    let keys = match body.get("convert_keys") {
        Some(Value::Bool(true)) => Keys::Names,
        Some(Value::String(s)) if flag(Some(s)) => Keys::Names,
        _ => Keys::ColumnKeys,
    };
    let params: Vec<Value> = match body.get("parameters") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => {
            if items.iter().any(|v| v.is_array() || v.is_object()) {
                return Err(ApiError::new(400, "parameters invalid."));
            }
            items.clone()
        }
        Some(_) => return Err(ApiError::new(400, "parameters invalid.")),
    };
    let toks = tokenize(text)?;
    let placeholders = toks.iter().filter(|t| matches!(t, Tok::Param(_))).count();
    let mut parser = Parser { toks, pos: 0 };
    let stmt = parser.statement()?;
    if matches!(stmt, Stmt::Insert) {
        // INSERT through the gateway fails on 6.1.8 (API_ISSUES #32); use the append API.
        return Err(ApiError::new(400, format!("base {} not found", base.uuid)));
    }
    if placeholders != params.len() {
        return Err(ApiError::new(
            400,
            format!(
                "the statement has {placeholders} placeholders but {} parameters were given",
                params.len()
            ),
        ));
    }
    let table_of = |name: &str| {
        base.table_index_sql(name)
            .ok_or_else(|| ApiError::new(400, format!("no such table: {name}")))
    };
    match stmt {
        Stmt::Select(select) => {
            let t = table_of(&select.table)?;
            sql_select(base, t, &select, &params, keys)
        }
        Stmt::Update {
            table,
            sets,
            filter,
        } => {
            let t = table_of(&table)?;
            if permission == Permission::ReadOnly {
                return Err(ApiError::new(403, "Permission denied."));
            }
            sql_update(base, t, &sets, filter.as_ref(), &params)
        }
        Stmt::Delete { table, filter } => {
            let t = table_of(&table)?;
            if permission == Permission::ReadOnly {
                return Err(ApiError::new(403, "Permission denied."));
            }
            if let Some(filter) = &filter {
                check_filter(base, t, filter)?;
            }
            let doomed: Vec<String> = base.tables[t]
                .rows
                .iter()
                .filter(|row| {
                    filter
                        .as_ref()
                        .is_none_or(|f| eval(base, t, row, f, &params))
                })
                .map(|row| row.id.clone())
                .collect();
            base.delete_rows(t, &doomed);
            Ok(json!({"success": true, "metadata": null, "results": null}))
        }
        Stmt::Insert => unreachable!("handled above"),
    }
}

fn sql_select(
    base: &Base,
    t: usize,
    select: &Select,
    params: &[Value],
    keys: Keys,
) -> Result<Value, ApiError> {
    let fields: Vec<Field> = match &select.fields {
        None => base.all_fields(t),
        Some(idents) => {
            // Every non-aggregate result carries `_id`, selected or not (DISTINCT aside).
            let mut fields = if select.distinct {
                Vec::new()
            } else {
                vec![Field::System("_id")]
            };
            for ident in idents {
                let field = resolve_field(base, t, ident)?;
                if !fields.contains(&field) {
                    fields.push(field);
                }
            }
            fields
        }
    };
    if let Some(filter) = &select.filter {
        check_filter(base, t, filter)?;
    }
    let order: Vec<(Field, bool)> = select
        .order
        .iter()
        .map(|(ident, desc)| resolve_field(base, t, ident).map(|f| (f, *desc)))
        .collect::<Result<_, _>>()?;
    let limit = match &select.limit {
        Some(count) => count_value(count, params)?.min(SQL_MAX_LIMIT),
        None => SQL_DEFAULT_LIMIT,
    };
    let offset = match &select.offset {
        Some(count) => count_value(count, params)?,
        None => 0,
    };
    let mut rows: Vec<&Row> = base.tables[t]
        .rows
        .iter()
        .filter(|row| {
            select
                .filter
                .as_ref()
                .is_none_or(|f| eval(base, t, row, f, params))
        })
        .collect();
    if !order.is_empty() {
        rows.sort_by(|a, b| {
            for (field, desc) in &order {
                let (x, y) = (
                    field_value(base, t, a, *field),
                    field_value(base, t, b, *field),
                );
                let o = x.rank().cmp(&y.rank()).then_with(|| match (&x, &y) {
                    (SqlVal::Num(p), SqlVal::Num(q)) => {
                        p.partial_cmp(q).unwrap_or(CmpOrdering::Equal)
                    }
                    (SqlVal::Str(p), SqlVal::Str(q)) => p.cmp(q),
                    (SqlVal::Bool(p), SqlVal::Bool(q)) => p.cmp(q),
                    _ => CmpOrdering::Equal,
                });
                let o = if *desc { o.reverse() } else { o };
                if o != CmpOrdering::Equal {
                    return o;
                }
            }
            CmpOrdering::Equal
        });
    }
    let links = base.link_index(t);
    let mut results: Vec<Value> = Vec::new();
    for row in rows {
        let rendered =
            Value::Object(base.render(t, row, &fields, keys, &links, Some(LINK_CELL_CAP)));
        if select.distinct && results.contains(&rendered) {
            continue;
        }
        results.push(rendered);
    }
    let results: Vec<Value> = results.into_iter().skip(offset).take(limit).collect();
    let metadata: Vec<Value> = fields
        .iter()
        .filter_map(|f| match f {
            Field::Col(c) => Some(base.column_json(t, &base.tables[t].columns[*c])),
            Field::System(_) => None,
        })
        .collect();
    Ok(json!({
        "success": true,
        "error_message": "",
        "is_join_stmt": false,
        "metadata": metadata,
        "results": results,
    }))
}

fn sql_update(
    base: &mut Base,
    t: usize,
    sets: &[(Ident, Lit)],
    filter: Option<&Expr>,
    params: &[Value],
) -> Result<Value, ApiError> {
    let mut targets = Vec::with_capacity(sets.len());
    for (ident, lit) in sets {
        let Field::Col(c) = resolve_field(base, t, ident)? else {
            return Err(ApiError::new(
                400,
                format!("column {} cannot be updated", ident.name),
            ));
        };
        let column = &base.tables[t].columns[c];
        if column.kind.is_computed() || column.kind == ColumnType::AutoNumber {
            return Err(ApiError::new(
                400,
                format!("column {} cannot be updated", column.name),
            ));
        }
        let value = match lit {
            Lit::Param(i) => params.get(*i).cloned().unwrap_or(Value::Null),
            Lit::Str(s) => json!(s),
            Lit::Num(n) => json!(n),
            Lit::Bool(b) => json!(b),
            Lit::Null => Value::Null,
        };
        // SQL converts constants to the column's type: a number into a text column is text.
        let value = match (column.kind, &value) {
            (
                ColumnType::Text | ColumnType::LongText | ColumnType::Email | ColumnType::Url,
                Value::Number(n),
            ) => json!(
                n.as_f64()
                    .map(format_number)
                    .unwrap_or_else(|| n.to_string())
            ),
            _ => value,
        };
        targets.push((c, value));
    }
    if let Some(filter) = filter {
        check_filter(base, t, filter)?;
    }
    // The WHERE check and the write happen under the same lock: atomic.
    let matched: Vec<usize> = base.tables[t]
        .rows
        .iter()
        .enumerate()
        .filter(|(_, row)| filter.is_none_or(|f| eval(base, t, row, f, params)))
        .map(|(r, _)| r)
        .collect();
    for r in matched {
        let table = &mut base.tables[t];
        for (c, value) in &targets {
            let column = &mut table.columns[*c];
            match coerce_cell(column, value) {
                CellWrite::Set(v) => {
                    table.rows[r].cells.insert(column.key.clone(), v);
                }
                CellWrite::Clear => {
                    table.rows[r].cells.remove(&column.key);
                }
                CellWrite::ReadOnly => {}
            }
        }
        base.touch(t, r);
    }
    // No affected-row count, and success even when nothing matched (DEV sql/update.md).
    Ok(json!({"success": true, "metadata": null, "results": null}))
}

// ---------------------------------------------------------------------------------------------
// Listener with a switchable "connection refused" outage
// ---------------------------------------------------------------------------------------------

struct GatedListener {
    inner: Option<TcpListener>,
    addr: SocketAddr,
    outage: watch::Receiver<Option<Outage>>,
    shared: Arc<Shared>,
}

impl axum::serve::Listener for GatedListener {
    type Io = GatedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (GatedStream, SocketAddr) {
        loop {
            let refusing = *self.outage.borrow_and_update() == Some(Outage::ConnectionRefused);
            if refusing {
                if self.inner.take().is_some() {
                    self.shared.bound.send_replace(false);
                }
                // The sender lives in `shared`, which we hold: this only ends on a change.
                let _ = self.outage.changed().await;
                continue;
            }
            if self.inner.is_none() {
                match TcpListener::bind(self.addr).await {
                    Ok(listener) => {
                        self.inner = Some(listener);
                        self.shared.bound.send_replace(true);
                    }
                    Err(err) => {
                        tracing::warn!("fake SeaTable: re-binding {}: {err}", self.addr);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                }
            }
            let listener = self.inner.as_ref().expect("bound above");
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let stream = GatedStream {
                            inner: stream,
                            id: self.shared.next_conn_id.fetch_add(1, Ordering::SeqCst),
                            epoch: self.shared.conn_epoch.load(Ordering::SeqCst),
                            shared: self.shared.clone(),
                        };
                        return (stream, peer);
                    }
                    Err(err) => {
                        tracing::warn!("fake SeaTable: accept: {err}");
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                },
                _ = self.outage.changed() => {}
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.addr)
    }
}

/// A TCP stream that fails once a refused-connection outage has started after it was accepted.
struct GatedStream {
    inner: TcpStream,
    id: u64,
    epoch: u64,
    shared: Arc<Shared>,
}

impl GatedStream {
    fn cut(&self) -> bool {
        self.shared.refusing.load(Ordering::SeqCst)
            || self.shared.conn_epoch.load(Ordering::SeqCst) != self.epoch
    }

    fn wakers(&self) -> MutexGuard<'_, HashMap<u64, Waker>> {
        self.shared
            .conn_wakers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for GatedStream {
    fn drop(&mut self) {
        self.wakers().remove(&self.id);
    }
}

fn reset() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, "fake SeaTable is down")
}

impl AsyncRead for GatedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.cut() {
            return Poll::Ready(Err(reset()));
        }
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        if poll.is_pending() {
            let mut wakers = this.wakers();
            match wakers.get(&this.id) {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => {
                    wakers.insert(this.id, cx.waker().clone());
                }
            }
        }
        poll
    }
}

impl AsyncWrite for GatedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.cut() {
            return Poll::Ready(Err(reset()));
        }
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.cut() {
            return Poll::Ready(Err(reset()));
        }
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

// ---------------------------------------------------------------------------------------------
// JWT, ids, time
// ---------------------------------------------------------------------------------------------

/// HMAC-SHA256 (RFC 2104) over `sha2`.
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut block_key = [0u8; BLOCK];
    if key.len() > BLOCK {
        block_key[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block_key[..key.len()].copy_from_slice(key);
    }
    let ipad: Vec<u8> = block_key.iter().map(|b| b ^ 0x36).collect();
    let opad: Vec<u8> = block_key.iter().map(|b| b ^ 0x5c).collect();
    let inner = Sha256::new()
        .chain_update(&ipad)
        .chain_update(message)
        .finalize();
    Sha256::new()
        .chain_update(&opad)
        .chain_update(inner)
        .finalize()
        .into()
}

fn sign_jwt(secret: &[u8], claims: &Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signing_input = format!("{header}.{payload}");
    let signature = URL_SAFE_NO_PAD.encode(hmac_sha256(secret, signing_input.as_bytes()));
    format!("{signing_input}.{signature}")
}

/// The claims of a JWT signed with `secret`, or `None` if it is malformed or forged.
fn verify_jwt(secret: &[u8], token: &str) -> Option<Value> {
    let (signing_input, signature) = token.rsplit_once('.')?;
    let (_, payload) = signing_input.split_once('.')?;
    let expected = URL_SAFE_NO_PAD.encode(hmac_sha256(secret, signing_input.as_bytes()));
    if expected != signature {
        return None;
    }
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()
}

/// 22 characters from `[A-Za-z0-9_-]`, like SeaTable's row ids.
fn new_row_id() -> String {
    let bytes: [u8; 16] = rand::rng().random();
    URL_SAFE_NO_PAD.encode(bytes)
}

/// 4 alphanumeric characters, like table ids, column keys and link ids.
fn random_key() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..4)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

fn new_uuid() -> String {
    let mut b: [u8; 16] = rand::rng().random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `2025-07-08T13:58:08.914+00:00`.
fn iso_from_millis(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}+00:00",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}
