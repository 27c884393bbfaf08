//! Self-tests of the fake SeaTable server in `tests/support/seatable.rs`: it must behave like
//! the real API as `docs/reference/seatable-api.md` documents it.

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use support::seatable::{
    ColumnType, Endpoint, FakeSeaTable, LINK_CELL_CAP, Outage, Permission, Scope, hmac_sha256,
};

/// API tokens are 40 characters.
const API_TOKEN: &str = "4f2b9c0d8e7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c";
const WAIT: Duration = Duration::from_secs(10);

struct Reply {
    status: u16,
    headers: HeaderMap,
    text: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.text))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

async fn send(request: reqwest::RequestBuilder) -> Reply {
    let response = request.send().await.expect("request reaches the fake");
    Reply {
        status: response.status().as_u16(),
        headers: response.headers().clone(),
        text: response.text().await.expect("body"),
    }
}

fn token_url(fake: &FakeSeaTable) -> String {
    format!("{}/api/v2.1/dtable/app-access-token/", fake.server_url())
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn decode_segment(segment: &str) -> Value {
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(segment).expect("base64url")).expect("json")
}

fn is_row_id(id: &str) -> bool {
    id.len() == 22
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// A minimal client: exchanges the API token once, then calls the gateway.
struct Api {
    http: reqwest::Client,
    gateway: String,
    token: String,
}

impl Api {
    async fn login(fake: &FakeSeaTable) -> Api {
        Api::login_with(fake, fake.api_token()).await
    }

    async fn login_with(fake: &FakeSeaTable, api_token: &str) -> Api {
        let http = reqwest::Client::new();
        let reply = send(http.get(token_url(fake)).bearer_auth(api_token)).await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        let body = reply.json();
        let server = body["dtable_server"]
            .as_str()
            .unwrap()
            .trim_end_matches('/');
        Api {
            gateway: format!(
                "{server}/api/v2/dtables/{}",
                body["dtable_uuid"].as_str().unwrap()
            ),
            token: body["access_token"].as_str().unwrap().to_owned(),
            http,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}/{path}", self.gateway)
    }

    async fn get(&self, path: &str, query: &[(&str, &str)]) -> Reply {
        send(
            self.http
                .get(self.url(path))
                .query(query)
                .bearer_auth(&self.token),
        )
        .await
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Value) -> Reply {
        send(
            self.http
                .request(method, self.url(path))
                .bearer_auth(&self.token)
                .json(&body),
        )
        .await
    }

    async fn post(&self, path: &str, body: Value) -> Reply {
        self.call(reqwest::Method::POST, path, body).await
    }

    async fn put(&self, path: &str, body: Value) -> Reply {
        self.call(reqwest::Method::PUT, path, body).await
    }

    async fn delete(&self, path: &str, body: Value) -> Reply {
        self.call(reqwest::Method::DELETE, path, body).await
    }

    async fn sql(&self, sql: &str, parameters: Value) -> Reply {
        self.post(
            "sql/",
            json!({"sql": sql, "parameters": parameters, "convert_keys": true}),
        )
        .await
    }

    async fn sql_ok(&self, sql: &str, parameters: Value) -> Vec<Value> {
        let reply = self.sql(sql, parameters).await;
        assert_eq!(reply.status, 200, "{sql}: {}", reply.text);
        let body = reply.json();
        assert_eq!(body["success"], true);
        body["results"].as_array().expect("results").clone()
    }

    async fn rows(&self, table: &str, query: &[(&str, &str)]) -> Vec<Value> {
        let mut q = vec![("table_name", table)];
        q.extend_from_slice(query);
        let reply = self.get("rows/", &q).await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        reply.json()["rows"].as_array().expect("rows").clone()
    }
}

// ----- authentication -----------------------------------------------------------------------

#[test]
fn hmac_sha256_matches_rfc_4231() {
    // RFC 4231, test case 2.
    let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
    assert_eq!(
        hex::encode(mac),
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    );
    // Test case 6: a key longer than the block size.
    let mac = hmac_sha256(
        &[0xaa; 131],
        b"Test Using Larger Than Block-Size Key - Hash Key First",
    );
    assert_eq!(
        hex::encode(mac),
        "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
    );
}

#[tokio::test]
async fn token_exchange_issues_a_signed_hs256_jwt() {
    let fake = FakeSeaTable::start(API_TOKEN).await;
    let http = reqwest::Client::new();

    let reply = send(http.get(token_url(&fake)).bearer_auth(API_TOKEN)).await;
    assert_eq!(reply.status, 200);
    let body = reply.json();
    assert_eq!(body["dtable_uuid"], fake.base_uuid());
    assert_eq!(
        body["dtable_server"],
        format!("{}/api-gateway/", fake.server_url())
    );
    assert!(body["workspace_id"].is_i64());
    assert_eq!(body["use_api_gateway"], true);
    assert!(body["app_name"].is_string());
    assert!(body["dtable_name"].is_string());

    let token = body["access_token"].as_str().unwrap();
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3);
    let header = decode_segment(parts[0]);
    assert_eq!(header["alg"], "HS256");
    assert_eq!(header["typ"], "JWT");
    let claims = decode_segment(parts[1]);
    let exp = claims["exp"].as_u64().expect("exp");
    assert!(
        exp.abs_diff(now() + 3 * 86_400) < 60,
        "default lifetime is 3 days"
    );
    assert_eq!(claims["dtable_uuid"], fake.base_uuid());
    assert_eq!(claims["permission"], "rw");
    assert_eq!(claims["app_name"], body["app_name"]);
    let signature = hmac_sha256(
        &fake.jwt_secret(),
        format!("{}.{}", parts[0], parts[1]).as_bytes(),
    );
    assert_eq!(URL_SAFE_NO_PAD.encode(signature), parts[2]);

    // The old `Token` scheme works too, and `exp` sets the lifetime.
    let reply = send(
        http.get(token_url(&fake))
            .query(&[("exp", "5h")])
            .header("Authorization", format!("Token {API_TOKEN}")),
    )
    .await;
    assert_eq!(reply.status, 200);
    let token = reply.json()["access_token"].as_str().unwrap().to_owned();
    let exp = decode_segment(token.split('.').nth(1).unwrap())["exp"]
        .as_u64()
        .unwrap();
    assert!(exp.abs_diff(now() + 5 * 3600) < 60);

    let reply = send(
        http.get(token_url(&fake))
            .query(&[("exp", "soon")])
            .bearer_auth(API_TOKEN),
    )
    .await;
    assert_eq!(reply.status, 400);

    assert_eq!(fake.token_exchanges(), 2);
    assert_eq!(fake.requests(Endpoint::AccessToken), 3);
}

#[tokio::test]
async fn token_exchange_rejects_an_unknown_api_token() {
    let fake = FakeSeaTable::start(API_TOKEN).await;
    let http = reqwest::Client::new();
    let reply = send(http.get(token_url(&fake)).bearer_auth("x".repeat(40))).await;
    assert_eq!(reply.status, 403);
    assert_eq!(reply.json(), json!({"error_msg": "Permission denied."}));
    let reply = send(http.get(token_url(&fake))).await;
    assert_eq!(reply.status, 403);
    assert_eq!(reply.json(), json!({"error_msg": "Permission denied."}));
    assert_eq!(fake.token_exchanges(), 0);
}

#[tokio::test]
async fn gateway_rejects_missing_forged_foreign_and_expired_tokens() {
    let fake = FakeSeaTable::start_with_default_schema(API_TOKEN).await;
    let api = Api::login(&fake).await;
    let invalid = json!({"error_message": "invalid token"});

    let reply = send(api.http.get(api.url("metadata/"))).await;
    assert_eq!((reply.status, reply.json()), (403, invalid.clone()));
    assert!(
        reply.header("x-ratelimit-limit").is_some(),
        "every gateway answer has the headers"
    );

    // A token with a tampered payload fails the signature check.
    let mut parts: Vec<String> = api.token.split('.').map(str::to_owned).collect();
    let mut claims = decode_segment(&parts[1]);
    claims["exp"] = json!(now() + 10 * 365 * 86_400);
    parts[1] = URL_SAFE_NO_PAD.encode(claims.to_string());
    let reply = send(
        api.http
            .get(api.url("metadata/"))
            .bearer_auth(parts.join(".")),
    )
    .await;
    assert_eq!((reply.status, reply.json()), (403, invalid.clone()));

    // The right token on another base's path.
    let other = format!(
        "{}/api-gateway/api/v2/dtables/00000000-0000-4000-8000-000000000000/metadata/",
        fake.server_url()
    );
    let reply = send(api.http.get(other).bearer_auth(&api.token)).await;
    assert_eq!(reply.status, 403);

    assert_eq!(api.get("metadata/", &[]).await.status, 200);
    let reply = send(
        api.http
            .get(api.url("metadata/"))
            .header("Authorization", format!("Token {}", api.token)),
    )
    .await;
    assert_eq!(
        reply.status, 200,
        "the old Token scheme works on the gateway too"
    );

    fake.expire_tokens();
    let reply = api.get("metadata/", &[]).await;
    assert_eq!((reply.status, reply.json()), (403, invalid.clone()));
    let fresh = Api::login(&fake).await;
    assert_eq!(fresh.get("metadata/", &[]).await.status, 200);

    fake.set_token_lifetime(Some(Duration::ZERO));
    let stillborn = Api::login(&fake).await;
    let reply = stillborn.get("metadata/", &[]).await;
    assert_eq!((reply.status, reply.json()), (403, invalid));
    fake.set_token_lifetime(None);
    assert_eq!(fake.token_exchanges(), 3);
}

#[tokio::test]
async fn read_only_tokens_cannot_write() {
    let fake = FakeSeaTable::start_with_default_schema(API_TOKEN).await;
    let read_only = "r".repeat(40);
    fake.add_api_token(&read_only, Permission::ReadOnly);
    let api = Api::login_with(&fake, &read_only).await;
    let claims = decode_segment(api.token.split('.').nth(1).unwrap());
    assert_eq!(claims["permission"], "r");

    assert!(api.rows("users", &[]).await.is_empty());
    api.sql_ok("SELECT * FROM users", json!([])).await;
    let reply = api
        .post(
            "rows/",
            json!({"table_name": "users", "rows": [{"Name": "x"}]}),
        )
        .await;
    assert_eq!(reply.status, 403);
    let reply = api
        .sql(
            "UPDATE users SET phone = ? WHERE Name = ?",
            json!(["1", "x"]),
        )
        .await;
    assert_eq!(reply.status, 403);
}

// ----- schema ---------------------------------------------------------------------------------

#[tokio::test]
async fn metadata_and_columns_describe_the_default_schema() {
    let fake = FakeSeaTable::start_with_default_schema(API_TOKEN).await;
    let api = Api::login(&fake).await;
    let reply = api.get("metadata/", &[]).await;
    assert_eq!(reply.status, 200);
    let metadata = &reply.json()["metadata"];
    assert_eq!(metadata["format_version"], 9);
    let tables = metadata["tables"].as_array().unwrap();
    let table = |name: &str| {
        tables
            .iter()
            .find(|t| t["name"] == name)
            .unwrap_or_else(|| panic!("table {name}"))
            .clone()
    };
    let columns = |t: &Value| -> Vec<(String, String)> {
        t["columns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["name"].as_str().unwrap().to_owned(),
                    c["type"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    let pairs = |list: &[(&str, &str)]| -> Vec<(String, String)> {
        list.iter()
            .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
            .collect()
    };

    let users = table("users");
    assert_eq!(
        columns(&users),
        pairs(&[
            ("Name", "text"),
            ("phone", "text"),
            ("mailboxes", "link"),
            ("id_telegram", "text"),
            ("reports_filter", "text"),
        ])
    );
    let mailboxes = table("mailboxes");
    assert_eq!(
        columns(&mailboxes),
        pairs(&[
            ("Name", "text"),
            ("email", "text"),
            ("description", "text"),
            ("users", "link"),
            ("t_chats", "link"),
            ("last_uid", "text"),
            ("imap_host", "text"),
            ("imap_port", "number"),
            ("imap_login", "text"),
            ("imap_password", "text"),
            ("imap_account", "text"),
            ("folder", "text"),
            ("allowed_senders", "text"),
            ("webhook_token", "text"),
            ("disabled", "checkbox"),
            ("silent", "checkbox"),
            ("protect_content", "checkbox"),
        ])
    );
    let t_chats = table("t_chats");
    assert_eq!(
        columns(&t_chats),
        pairs(&[
            ("Name", "text"),
            ("id_telegram_chat", "text"),
            ("is_locked", "checkbox"),
            ("mailboxes", "link"),
            ("topic", "text"),
            ("reports_filter", "text"),
        ])
    );

    assert_eq!(users["_id"], "0000");
    assert_eq!(users["columns"][0]["key"], "0000");
    assert_eq!(users["views"][0]["name"], "Default View");
    for t in [&users, &mailboxes, &t_chats] {
        assert_eq!(t["_id"].as_str().unwrap().len(), 4);
        for c in t["columns"].as_array().unwrap() {
            assert_eq!(c["key"].as_str().unwrap().len(), 4);
            assert_eq!(c["width"], 200);
            assert_eq!(c["editable"], true);
        }
    }
    let column = |t: &Value, name: &str| {
        t["columns"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap()
            .clone()
    };
    // One link, two columns: the same link_id on both sides.
    let forward = column(&users, "mailboxes");
    let backward = column(&mailboxes, "users");
    assert_eq!(forward["data"]["link_id"], backward["data"]["link_id"]);
    assert_eq!(forward["data"]["table_id"], users["_id"]);
    assert_eq!(forward["data"]["other_table_id"], mailboxes["_id"]);
    assert_eq!(
        column(&mailboxes, "t_chats")["data"]["link_id"],
        column(&t_chats, "mailboxes")["data"]["link_id"]
    );

    let reply = api.get("columns/", &[("table_name", "users")]).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["columns"], users["columns"]);
    let reply = api.get("columns/", &[("table_name", "nope")]).await;
    assert_eq!(reply.status, 404);
    assert!(reply.json()["error_message"].is_string());
}

#[tokio::test]
async fn removed_columns_and_tables_disappear_everywhere() {
    let fake = FakeSeaTable::start_with_default_schema(API_TOKEN).await;
    fake.add_row("users", json!({"Name": "ivan", "id_telegram": "42"}));
    let api = Api::login(&fake).await;

    fake.remove_column("users", "id_telegram");
    let metadata = api.get("metadata/", &[]).await.json();
    let users = metadata["metadata"]["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "users")
        .unwrap()
        .clone();
    assert!(
        users["columns"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["name"] != "id_telegram")
    );
    let rows = api.rows("users", &[("convert_keys", "true")]).await;
    assert!(rows[0].get("id_telegram").is_none());
    let reply = api.sql("SELECT id_telegram FROM users", json!([])).await;
    assert_eq!(reply.status, 400);
    assert_eq!(
        reply.json(),
        json!({"error_message": "no such column: id_telegram"})
    );

    fake.remove_table("t_chats");
    assert_eq!(fake.table_names(), ["users", "mailboxes"]);
    assert!(
        !fake
            .column_names("mailboxes")
            .contains(&"t_chats".to_owned())
    );
    let reply = api.sql("SELECT * FROM t_chats", json!([])).await;
    assert_eq!(
        reply.json(),
        json!({"error_message": "no such table: t_chats"})
    );
    assert_eq!(
        api.get("rows/", &[("table_name", "t_chats")]).await.status,
        404
    );

    fake.rename_column("users", "phone", "Phone number");
    assert_eq!(
        fake.column_names("users"),
        ["Name", "Phone number", "mailboxes", "reports_filter"]
    );
}

#[tokio::test]
async fn schema_endpoints_create_tables_columns_and_links() {
    let fake = FakeSeaTable::start(API_TOKEN).await;
    let api = Api::login(&fake).await;

    let reply = api
        .post(
            "tables/",
            json!({"table_name": "people", "lang": "en", "columns": [
                {"column_name": "Name", "column_type": "text"},
                {"column_name": "age", "column_type": "number"},
            ]}),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let table = reply.json();
    assert_eq!(table["name"], "people");
    assert_eq!(table["_id"].as_str().unwrap().len(), 4);
    assert_eq!(table["rows"], json!([]));
    assert_eq!(table["id_row_map"], json!({}));
    assert_eq!(table["views"][0]["_id"], "0000");
    assert_eq!(table["columns"].as_array().unwrap().len(), 2);
    assert_eq!(
        api.post("tables/", json!({"table_name": "people"}))
            .await
            .status,
        400
    );
    // Without `columns`, SeaTable creates a `Name` column.
    let reply = api.post("tables/", json!({"table_name": "groups"})).await;
    assert_eq!(reply.json()["columns"][0]["name"], "Name");

    let reply = api
        .post(
            "columns/",
            json!({"table_name": "people", "column_name": "age", "column_type": "text"}),
        )
        .await;
    assert_eq!(reply.status, 400);
    assert_eq!(
        reply.json(),
        json!({"error_type": "column_already_exists", "error_message": "column name already exists"})
    );

    let reply = api
        .post(
            "batch-append-columns/",
            json!({"table_name": "people", "columns": [
                {"column_name": "x", "column_type": "text"},
                {"column_name": "l", "column_type": "link",
                 "column_data": {"table": "people", "other_table": "groups"}},
            ]}),
        )
        .await;
    assert_eq!(reply.status, 400, "batch-append refuses link columns");
    let reply = api
        .post(
            "batch-append-columns/",
            json!({"table_name": "people", "columns": [
                {"column_name": "phone", "column_type": "text"},
                {"column_name": "active", "column_type": "checkbox"},
            ]}),
        )
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["columns"].as_array().unwrap().len(), 2);

    let reply = api
        .post(
            "columns/",
            json!({"table_name": "people", "column_name": "groups", "column_type": "link",
                   "column_data": {"table": "people", "other_table": "groups"}}),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let link_id = reply.json()["data"]["link_id"].as_str().unwrap().to_owned();
    assert_eq!(fake.column_names("groups"), ["Name", "people"]);

    let person = fake.add_row("people", json!({"Name": "ann"}));
    let group = fake.add_row("groups", json!({"Name": "ops"}));
    let reply = api
        .post(
            "links/",
            json!({"link_id": link_id, "table_name": "people", "other_table_name": "groups",
                   "other_rows_ids_map": {person.clone(): [group.clone()]}}),
        )
        .await;
    assert_eq!(reply.json(), json!({"success": true}));
    let people = api.rows("people", &[("convert_keys", "true")]).await;
    assert_eq!(
        people[0]["groups"],
        json!([{"row_id": group, "display_value": "ops"}])
    );
    let groups = api.rows("groups", &[("convert_keys", "true")]).await;
    assert_eq!(
        groups[0]["people"],
        json!([{"row_id": person, "display_value": "ann"}])
    );

    let reply = api
        .delete(
            "links/",
            json!({"link_id": link_id, "table_name": "groups", "other_table_name": "people",
                   "other_rows_ids_map": {group.clone(): [person.clone()]}}),
        )
        .await;
    assert_eq!(reply.json()["deleted_links_count"], 1);
    assert!(fake.linked_ids("people", "groups", &person).is_empty());
}

// ----- reading rows -----------------------------------------------------------------------------

#[tokio::test]
async fn list_rows_pages_through_more_than_1000_rows() {
    let fake = FakeSeaTable::start_with_default_schema(API_TOKEN).await;
    fake.add_rows(
        "users",
        (0..1234).map(|i| json!({"Name": format!("user{i:04}"), "phone": format!("+7999{i:07}")})),
    );
    let api = Api::login(&fake).await;

    let mut names = Vec::new();
    let mut start = 0;
    loop {
        let start_text = start.to_string();
        let page = api
            .rows(
                "users",
                &[
                    ("start", &start_text),
                    ("limit", "1000"),
                    ("convert_keys", "true"),
                ],
            )
            .await;
        names.extend(page.iter().map(|r| r["Name"].as_str().unwrap().to_owned()));
        if page.len() < 1000 {
            assert_eq!(page.len(), 234);
            break;
        }
        start += page.len();
    }
    assert_eq!(names.len(), 1234);
    assert_eq!(names[0], "user0000");
    assert_eq!(names[1233], "user1233");

    // limit is clamped to 1000; no limit means 1000.
    assert_eq!(api.rows("users", &[("limit", "5000")]).await.len(), 1000);
    assert_eq!(api.rows("users", &[]).await.len(), 1000);

    // Every column and system field is present; empty cells are null, empty links [].
    let row = &api
        .rows("users", &[("convert_keys", "True"), ("limit", "1")])
        .await[0];
    assert_eq!(row["Name"], "user0000");
    assert_eq!(row["phone"], "+79990000000");
    assert_eq!(row["id_telegram"], Value::Null);
    assert_eq!(row["reports_filter"], Value::Null);
    assert_eq!(row["mailboxes"], json!([]));
    assert!(is_row_id(row["_id"].as_str().unwrap()));
    for field in ["_ctime", "_mtime", "_creator", "_last_modifier"] {
        assert!(row[field].is_string(), "{field}");
    }
    assert_eq!(row["_archived"], false);
    assert!(row.as_object().unwrap().contains_key("_locked"));
    assert_eq!(row["_locked"], Value::Null);
    assert_eq!(row["_locked_by"], Value::Null);
    // Name, phone, mailboxes, id_telegram, reports_filter and the system fields.
    assert_eq!(row.as_object().unwrap().len(), 8 + 5);

    // Without convert_keys (or with false) cells are keyed by column key.
    for query in [&[][..], &[("convert_keys", "false")][..]] {
        let row = &api.rows("users", query).await[0];
        assert_eq!(row["0000"], "user0000");
        assert!(row.get("Name").is_none());
        assert!(row.get("id_telegram").is_none());
    }
    assert_eq!(
        api.rows("users", &[("table_id", "0000"), ("limit", "3")])
            .await
            .len(),
        3
    );
    let reply = api.get("rows/", &[("table_name", "nope")]).await;
    assert_eq!(
        (reply.status, reply.json()),
        (404, json!({"error_message": "table not found"}))
    );
}

#[tokio::test]
async fn get_row_returns_the_bare_row_or_404() {
    let fake = FakeSeaTable::start_with_default_schema(API_TOKEN).await;
    let id = fake.add_row("users", json!({"Name": "ivan", "phone": "89991234567"}));
    let api = Api::login(&fake).await;
    let reply = api
        .get(
            &format!("rows/{id}/"),
            &[("table_name", "users"), ("convert_keys", "true")],
        )
        .await;
    assert_eq!(reply.status, 200);
    let row = reply.json();
    assert_eq!(row["_id"], id);
    assert_eq!(row["phone"], "89991234567");
    let reply = api
        .get(
            "rows/AAAAAAAAAAAAAAAAAAAAAA/",
            &[("table_name", "users"), ("convert_keys", "true")],
        )
        .await;
    assert_eq!(
        (reply.status, reply.json()),
        (404, json!({"error_message": "row _id not exits"}))
    );
}

#[tokio::test]
async fn link_cells_are_capped_at_50_on_every_read() {
    let fake = FakeSeaTable::start_with_default_schema(API_TOKEN).await;
    let mailbox = fake.add_row("mailboxes", json!({"Name": "sales", "email": "sales@x"}));
    let users = fake.add_rows(
        "users",
        (0..60).map(|i| json!({"Name": format!("u{i:02}")})),
    );
    // Linked from both sides: the link is stored once either way.
    for user in &users[..30] {
        fake.link("users", "mailboxes", user, &[&mailbox]);
    }
    let rest: Vec<&str> = users[30..].iter().map(String::as_str).collect();
    fake.link("mailboxes", "users", &mailbox, &rest);
    assert_eq!(fake.linked_ids("mailboxes", "users", &mailbox).len(), 60);
    assert_eq!(
        fake.row("mailboxes", &mailbox).unwrap()["users"]
            .as_array()
            .unwrap()
            .len(),
        60,
        "the seeding view is uncapped"
    );

    let api = Api::login(&fake).await;
    let rows = api.rows("mailboxes", &[("convert_keys", "true")]).await;
    let cell = rows[0]["users"].as_array().unwrap();
    assert_eq!(cell.len(), LINK_CELL_CAP);
    assert_eq!(cell[0], json!({"row_id": users[0], "display_value": "u00"}));

    let row = api
        .get(
            &format!("rows/{mailbox}/"),
            &[("table_name", "mailboxes"), ("convert_keys", "true")],
        )
        .await
        .json();
    assert_eq!(row["users"].as_array().unwrap().len(), 50);

    let results = api
        .sql_ok("SELECT `users` FROM `mailboxes`", json!([]))
        .await;
    assert_eq!(results[0]["users"].as_array().unwrap().len(), 50);

    // The "many" side sees every link: each user shows the mailbox.
    let all_users = api.rows("users", &[("convert_keys", "true")]).await;
    assert_eq!(all_users.len(), 60);
    for user in &all_users {
        assert_eq!(
            user["mailboxes"],
            json!([{"row_id": mailbox, "display_value": "sales"}])
        );
    }

    // query-links reaches past the cap.
    let reply = api
        .post(
            "query-links/",
            json!({"table_name": "mailboxes", "link_column_name": "users",
                   "rows": [{"row_id": mailbox, "offset": 50, "limit": 20}]}),
        )
        .await;
    assert_eq!(reply.json()[&mailbox].as_array().unwrap().len(), 10);
}

// ----- writing rows -------------------------------------------------------------------------------

#[tokio::test]
async fn append_drops_unknown_columns_and_converts_cells() {
    let fake = FakeSeaTable::start_with_default_schema(API_TOKEN).await;
    let api = Api::login(&fake).await;
    let reply = api
        .post(
            "rows/",
            json!({"table_name": "users", "rows": [
                {"Name": "ivan", "phone": "+79810000000", "id_telegram": "", "id_telgram": "typo"},
                {"Name": "olga", "mailboxes": ["whatever"]},
            ], "apply_default": false}),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let body = reply.json();
    assert_eq!(body["inserted_row_count"], 2);
    let ids: Vec<String> = body["row_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["_id"].as_str().unwrap().to_owned())
        .collect();
    assert!(ids.iter().all(|id| is_row_id(id)), "{ids:?}");
    // first_row is keyed by column key, whatever convert_keys says.
    assert_eq!(body["first_row"]["0000"], "ivan");
    assert_eq!(body["first_row"]["_id"], ids[0]);
    assert!(body["first_row"].get("Name").is_none());

    let ivan = fake.row("users", &ids[0]).unwrap();
    assert_eq!(ivan["Name"], "ivan");
    assert_eq!(ivan["id_telegram"], Value::Null, "\"\" is stored as NULL");
    assert!(!ivan.contains_key("id_telgram"));
    let olga = fake.row("users", &ids[1]).unwrap();
    assert_eq!(
        olga["mailboxes"],
        json!([]),
        "links are not written via rows"
    );

    // Checkboxes: only JSON true is true.
    let reply = api
        .post(
            "rows/",
            json!({"table_name": "t_chats", "rows": [
                {"Name": "a", "is_locked": true},
                {"Name": "b", "is_locked": 1},
                {"Name": "c", "is_locked": "true"},
                {"Name": "d"},
            ]}),
        )
        .await;
    let ids = reply.json()["row_ids"].clone();
    let locked: Vec<Value> = (0..4)
        .map(|i| {
            fake.row("t_chats", ids[i]["_id"].as_str().unwrap())
                .unwrap()["is_locked"]
                .clone()
        })
        .collect();
    assert_eq!(
        locked,
        [json!(true), json!(false), json!(false), Value::Null]
    );

    let too_many: Vec<Value> = (0..1001).map(|i| json!({"Name": i.to_string()})).collect();
    let reply = api
        .post("rows/", json!({"table_name": "users", "rows": too_many}))
        .await;
    assert_eq!(reply.status, 400);
    let reply = api
        .post("rows/", json!({"table_name": "nope", "rows": [{}]}))
        .await;
    assert_eq!(reply.status, 404);
}

#[tokio::test]
async fn update_rows_ignores_unknown_columns_and_bumps_mtime() {
    let fake = FakeSeaTable::start_with_default_schema(API_TOKEN).await;
    let id = fake.add_row("users", json!({"Name": "ivan", "phone": "1"}));
    let before = fake.row("users", &id).unwrap();
    let api = Api::login(&fake).await;

    let reply = api
        .put(
            "rows/",
            json!({"table_name": "users", "updates": [
                {"row_id": id, "row": {"id_telegram": "123456789", "id_telgram": "typo"}},
                {"row_id": "AAAAAAAAAAAAAAAAAAAAAA", "row": {"Name": "ghost"}},
            ]}),
        )
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json(), json!({"success": true}));
    let after = fake.row("users", &id).unwrap();
    assert_eq!(after["id_telegram"], "123456789");
    assert_eq!(after["phone"], "1");
    assert!(!after.contains_key("id_telgram"));
    assert!(after["_mtime"].as_str() > before["_mtime"].as_str());
    assert_eq!(after["_ctime"], before["_ctime"]);
    assert_eq!(fake.rows("users").len(), 1);

    // A typo alone is a "successful" no-op.
    let reply = api
        .put(
            "rows/",
            json!({"table_name": "users", "updates": [{"row_id": id, "row": {"id_telgram": "x"}}]}),
        )
        .await;
    assert_eq!(reply.json(), json!({"success": true}));
    assert_eq!(fake.row("users", &id).unwrap()["id_telegram"], "123456789");

    let chat = fake.add_row("t_chats", json!({"Name": "Ops"}));
    api.put(
        "rows/",
        json!({"table_name": "t_chats", "updates": [
            {"row_id": chat, "row": {"id_telegram_chat": "-100123", "is_locked": 1}}]}),
    )
    .await;
    assert_eq!(fake.row("t_chats", &chat).unwrap()["is_locked"], false);
}

#[tokio::test]
async fn delete_rows_removes_rows_and_their_links() {
    let fake = FakeSeaTable::start_with_default_schema(API_TOKEN).await;
    let mailbox = fake.add_row("mailboxes", json!({"Name": "sales"}));
    let a = fake.add_row("users", json!({"Name": "a"}));
    let b = fake.add_row("users", json!({"Name": "b"}));
    fake.link("mailboxes", "users", &mailbox, &[&a, &b]);
    let api = Api::login(&fake).await;
    let reply = api
        .delete("rows/", json!({"table_name": "users", "row_ids": [a]}))
        .await;
    assert_eq!(reply.json(), json!({"success": true}));
    assert_eq!(fake.rows("users").len(), 1);
    assert_eq!(fake.linked_ids("mailboxes", "users", &mailbox), [b]);
}

// ----- SQL ------------------------------------------------------------------------------------------

#[tokio::test]
async fn sql_select_supports_the_documented_dialect() {
    let fake = FakeSeaTable::start_with_default_schema(API_TOKEN).await;
    fake.add_rows(
        "mailboxes",
        (0..150).map(|i| {
            json!({
                "Name": format!("box{i:03}"),
                "email": format!("box{i:03}@mail.ru"),
                "last_uid": if i % 3 == 0 { json!(null) } else if i % 3 == 1 { json!("") } else { json!(i.to_string()) },
                "imap_port": if i < 10 { json!(993) } else { json!(null) },
            })
        }),
    );
    let api = Api::login(&fake).await;

    let results = api
        .sql_ok(
            "SELECT `Name`, `email` FROM `mailboxes` WHERE `email` = ? LIMIT 1000",
            json!(["box007@mail.ru"]),
        )
        .await;
    assert_eq!(results.len(), 1);
    let row = results[0].as_object().unwrap();
    assert_eq!(row["Name"], "box007");
    assert!(
        is_row_id(row["_id"].as_str().unwrap()),
        "_id comes with every row"
    );
    assert_eq!(row.len(), 3);

    // The whole answer, as documented.
    let reply = api
        .sql(
            "SELECT Name FROM mailboxes WHERE Name = 'box001'",
            json!([]),
        )
        .await;
    let body = reply.json();
    assert_eq!(body["success"], true);
    assert_eq!(body["error_message"], "");
    assert_eq!(body["is_join_stmt"], false);
    assert_eq!(body["metadata"][0]["name"], "Name");
    assert_eq!(body["metadata"][0]["key"], "0000");

    // Empty cells and "" are both NULL.
    let nulls = api
        .sql_ok(
            "SELECT Name FROM mailboxes WHERE last_uid IS NULL LIMIT 500",
            json!([]),
        )
        .await;
    assert_eq!(nulls.len(), 100);
    let empty = api
        .sql_ok(
            "SELECT Name FROM mailboxes WHERE last_uid = ? LIMIT 500",
            json!([""]),
        )
        .await;
    assert!(empty.is_empty(), "= '' never matches: '' is NULL");
    // `!=` is true for NULL.
    let not_two = api
        .sql_ok(
            "SELECT Name FROM mailboxes WHERE last_uid != '2' LIMIT 500",
            json!([]),
        )
        .await;
    assert_eq!(not_two.len(), 149);

    let chosen = api
        .sql_ok(
            "SELECT Name FROM mailboxes WHERE Name IN ('box001', \"box002\", ?) AND email IS NOT NULL",
            json!(["box149"]),
        )
        .await;
    let mut names: Vec<&str> = chosen.iter().map(|r| r["Name"].as_str().unwrap()).collect();
    names.sort_unstable();
    assert_eq!(names, ["box001", "box002", "box149"]);

    let numeric = api
        .sql_ok(
            "SELECT Name FROM mailboxes WHERE imap_port = ?",
            json!([993]),
        )
        .await;
    assert_eq!(numeric.len(), 10);

    // Default limit 100; LIMIT/OFFSET page; LIMIT above 10000 is clamped.
    assert_eq!(
        api.sql_ok("SELECT * FROM mailboxes", json!([])).await.len(),
        100
    );
    let page = api
        .sql_ok("SELECT Name FROM mailboxes LIMIT 20 OFFSET 140", json!([]))
        .await;
    assert_eq!(page.len(), 10);
    assert_eq!(page[0]["Name"], "box140");
    assert_eq!(
        api.sql_ok("SELECT Name FROM mailboxes LIMIT 20000", json!([]))
            .await
            .len(),
        150
    );
    let sorted = api
        .sql_ok(
            "select NAME from MAILBOXES where name like 'box00%' order by Name desc limit 3;",
            json!([]),
        )
        .await;
    let names: Vec<&str> = sorted.iter().map(|r| r["Name"].as_str().unwrap()).collect();
    assert_eq!(names, ["box009", "box008", "box007"]);

    // `SELECT *` has every column and system field.
    let all = api
        .sql_ok(
            "SELECT * FROM mailboxes WHERE _id = ?",
            json!([results[0]["_id"]]),
        )
        .await;
    assert_eq!(all.len(), 1);
    assert_eq!(all[0]["users"], json!([]));
    assert_eq!(all[0]["disabled"], Value::Null);
    assert_eq!(all[0]["_archived"], false);

    // convert_keys false (and absent) keys results by column key; `/sql` works without slash.
    for body in [
        json!({"sql": "SELECT Name FROM mailboxes LIMIT 1", "convert_keys": false}),
        json!({"sql": "SELECT Name FROM mailboxes LIMIT 1"}),
    ] {
        let reply = api.post("sql", body).await;
        assert_eq!(reply.status, 200);
        let row = &reply.json()["results"][0];
        assert_eq!(row["0000"], "box000");
        assert!(row.get("Name").is_none());
    }
    assert_eq!(fake.requests(Endpoint::Sql), 14);
}

#[tokio::test]
async fn sql_conditional_update_writes_once() {
    let fake = FakeSeaTable::start_with_default_schema(API_TOKEN).await;
    let chat = fake.add_row("t_chats", json!({"Name": "Ops reports"}));
    let api = Api::login(&fake).await;
    let claim = "UPDATE `t_chats` SET `id_telegram_chat` = ?, `is_locked` = true \
                 WHERE `_id` = ? AND `id_telegram_chat` IS NULL";

    let reply = api.sql(claim, json!(["-1001234567890", chat])).await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.json(),
        json!({"success": true, "metadata": null, "results": null}),
        "no affected-row count"
    );
    let won = fake.row("t_chats", &chat).unwrap();
    assert_eq!(won["id_telegram_chat"], "-1001234567890");
    assert_eq!(won["is_locked"], true);

    // The second claim answers the same, and changes nothing.
    let reply = api.sql(claim, json!(["-1009999999999", chat])).await;
    assert_eq!(
        reply.json(),
        json!({"success": true, "metadata": null, "results": null})
    );
    let after = fake.row("t_chats", &chat).unwrap();
    assert_eq!(after, won, "value and _mtime unchanged");

    // Racing claims: exactly one wins.
    let other = fake.add_row("t_chats", json!({"Name": "Sales"}));
    let claims = (0..8).map(|i| {
        let (http, url, token, other) = (
            api.http.clone(),
            api.url("sql/"),
            api.token.clone(),
            other.clone(),
        );
        tokio::spawn(async move {
            let body = json!({"sql": claim, "parameters": [format!("-100{i}"), other], "convert_keys": true});
            let reply = send(http.post(url).bearer_auth(token).json(&body)).await;
            assert_eq!(reply.status, 200);
            format!("-100{i}")
        })
    });
    let mut sent = Vec::new();
    for handle in claims.collect::<Vec<_>>() {
        sent.push(handle.await.unwrap());
    }
    let stored = fake.row("t_chats", &other).unwrap()["id_telegram_chat"].clone();
    assert!(sent.iter().any(|s| stored == *s), "{stored}");

    // Without WHERE every row is updated; the SELECT verifies.
    let results = api
        .sql_ok(
            "SELECT `_id`, `id_telegram_chat` FROM `t_chats` WHERE `_id` = ?",
            json!([chat]),
        )
        .await;
    assert_eq!(results[0]["id_telegram_chat"], "-1001234567890");
    let reply = api
        .sql("UPDATE t_chats SET is_locked = false", json!([]))
        .await;
    assert_eq!(reply.status, 200);
    assert!(fake.rows("t_chats").iter().all(|r| r["is_locked"] == false));
    // SQL DELETE answers like UPDATE.
    let reply = api
        .sql("DELETE FROM t_chats WHERE _id = ?", json!([other]))
        .await;
    assert_eq!(
        reply.json(),
        json!({"success": true, "metadata": null, "results": null})
    );
    assert_eq!(fake.rows("t_chats").len(), 1);
}

#[tokio::test]
async fn sql_errors_use_the_documented_bodies() {
    let fake = FakeSeaTable::start_with_default_schema(API_TOKEN).await;
    let api = Api::login(&fake).await;
    let error = |reply: Reply| {
        assert_eq!(reply.status, 400, "{}", reply.text);
        reply.json()["error_message"].as_str().unwrap().to_owned()
    };
    assert_eq!(
        error(api.sql("SELECT * FROM nonexistent_table", json!([])).await),
        "no such table: nonexistent_table"
    );
    assert_eq!(
        error(api.sql("SELECT pi FROM users", json!([])).await),
        "no such column: pi"
    );
    assert_eq!(
        error(
            api.sql("UPDATE users SET pi = ? WHERE _id = ?", json!(["1", "x"]))
                .await
        ),
        "no such column: pi"
    );
    assert!(!error(api.sql("SELEC * FORM users", json!([])).await).is_empty());
    // Placeholders and parameters must match.
    error(
        api.sql("SELECT * FROM users WHERE Name = ?", json!([]))
            .await,
    );
    // Link cells cannot be filtered on (the reference documents no such query).
    let message = error(
        api.sql("SELECT * FROM users WHERE mailboxes = ?", json!(["sales"]))
            .await,
    );
    assert!(message.contains("mailboxes"), "{message}");
    // INSERT does not work through the gateway; the append API does.
    error(
        api.sql("INSERT INTO users (Name) VALUES ('x')", json!([]))
            .await,
    );
    // Links cannot be written with SQL.
    error(api.sql("UPDATE users SET mailboxes = 'x'", json!([])).await);
}

// ----- faults -----------------------------------------------------------------------------------------

#[tokio::test]
async fn rate_limits_answer_429_with_an_empty_body() {
    let fake = FakeSeaTable::start_with_default_schema(API_TOKEN).await;
    let api = Api::login(&fake).await;

    let reply = api.get("metadata/", &[]).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("x-ratelimit-limit"), Some("500"));
    let remaining: u32 = reply
        .header("x-ratelimit-remaining")
        .unwrap()
        .parse()
        .unwrap();
    assert!(remaining < 500);
    let reset: u64 = reply.header("x-ratelimit-reset").unwrap().parse().unwrap();
    assert!(reset > now() && reset <= now() + 61);

    fake.rate_limit_next(1);
    let reply = api.get("metadata/", &[]).await;
    assert_eq!(reply.status, 429);
    assert!(reply.text.is_empty());
    assert!(reply.header("x-ratelimit-reset").is_some());
    assert_eq!(api.get("metadata/", &[]).await.status, 200);

    // A per-minute limit: the fourth request in the window is refused.
    fake.set_rate_limit_per_minute(Some(3));
    for left in ["2", "1", "0"] {
        let reply = api.get("metadata/", &[]).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("x-ratelimit-limit"), Some("3"));
        assert_eq!(reply.header("x-ratelimit-remaining"), Some(left));
    }
    let reply = api.sql("SELECT * FROM users", json!([])).await;
    assert_eq!((reply.status, reply.text.as_str()), (429, ""));
    // The token exchange is not a gateway call.
    assert_eq!(
        send(api.http.get(token_url(&fake)).bearer_auth(API_TOKEN))
            .await
            .status,
        200
    );
    fake.set_rate_limit_per_minute(None);
    assert_eq!(api.get("metadata/", &[]).await.status, 200);
}

#[tokio::test]
async fn outages_look_like_nginx_or_a_dead_host() {
    let fake = FakeSeaTable::start_with_default_schema(API_TOKEN).await;
    let api = Api::login(&fake).await;

    fake.go_down(Outage::BadGateway).await;
    let reply = api.get("metadata/", &[]).await;
    assert_eq!(reply.status, 502);
    assert!(
        reply
            .header("content-type")
            .unwrap()
            .starts_with("text/html")
    );
    assert!(reply.text.contains("502 Bad Gateway"));
    let reply = send(api.http.get(token_url(&fake)).bearer_auth(API_TOKEN)).await;
    assert_eq!(reply.status, 502);
    fake.come_back().await;
    assert_eq!(api.get("metadata/", &[]).await.status, 200);

    fake.go_down(Outage::ServiceUnavailable).await;
    assert_eq!(api.get("metadata/", &[]).await.status, 503);
    fake.come_back().await;

    fake.go_down(Outage::ConnectionRefused).await;
    let err = reqwest::Client::new()
        .get(api.url("metadata/"))
        .bearer_auth(&api.token)
        .send()
        .await
        .expect_err("connection refused");
    assert!(err.is_connect(), "{err:?}");
    assert!(
        api.http
            .get(api.url("metadata/"))
            .bearer_auth(&api.token)
            .send()
            .await
            .is_err(),
        "kept-alive connections die too"
    );
    let counted = fake.requests(Endpoint::Metadata);
    fake.come_back().await;
    assert_eq!(
        fake.requests(Endpoint::Metadata),
        counted,
        "refused requests are not counted"
    );
    let fresh = reqwest::Client::new();
    let reply = send(fresh.get(api.url("metadata/")).bearer_auth(&api.token)).await;
    assert_eq!(reply.status, 200, "same URL, same token after the restart");

    // Host back, backend still down: straight from refused to 502.
    fake.go_down(Outage::ConnectionRefused).await;
    fake.go_down(Outage::BadGateway).await;
    let reply = send(
        reqwest::Client::new()
            .get(api.url("metadata/"))
            .bearer_auth(&api.token),
    )
    .await;
    assert_eq!(reply.status, 502);
    fake.come_back().await;
    assert_eq!(
        send(fresh.get(api.url("metadata/")).bearer_auth(&api.token))
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn injected_failures_and_delays_hit_only_their_scope() {
    let fake = FakeSeaTable::start_with_default_schema(API_TOKEN).await;
    let api = Api::login(&fake).await;

    fake.fail_next(Endpoint::Sql, 500, 1);
    let reply = api.sql("SELECT * FROM users", json!([])).await;
    assert_eq!(reply.status, 500);
    assert_eq!(
        reply.json(),
        json!({"error_message": "Internal Server Error"})
    );
    assert!(reply.header("x-ratelimit-limit").is_some());
    assert_eq!(
        api.get("rows/", &[("table_name", "users")]).await.status,
        200
    );
    assert_eq!(api.sql("SELECT * FROM users", json!([])).await.status, 200);

    fake.fail_next(Endpoint::ListRows, 503, 2);
    for _ in 0..2 {
        let reply = api.get("rows/", &[("table_name", "users")]).await;
        assert_eq!(reply.status, 503);
        assert!(reply.text.contains("nginx"));
    }
    assert_eq!(
        api.get("rows/", &[("table_name", "users")]).await.status,
        200
    );

    fake.fail_always(Scope::Gateway, 504);
    assert_eq!(api.get("metadata/", &[]).await.status, 504);
    assert_eq!(api.get("metadata/", &[]).await.status, 504);
    assert_eq!(
        send(api.http.get(token_url(&fake)).bearer_auth(API_TOKEN))
            .await
            .status,
        200
    );
    fake.clear_faults();
    assert_eq!(api.get("metadata/", &[]).await.status, 200);

    fake.set_delay(Endpoint::Metadata, Duration::from_millis(400));
    let err = api
        .http
        .get(api.url("metadata/"))
        .bearer_auth(&api.token)
        .timeout(Duration::from_millis(50))
        .send()
        .await
        .expect_err("delayed past the client timeout");
    assert!(err.is_timeout());
    assert_eq!(
        api.get("rows/", &[("table_name", "users")]).await.status,
        200
    );
    fake.set_delay(Endpoint::Metadata, Duration::ZERO);
    assert_eq!(api.get("metadata/", &[]).await.status, 200);
}

#[tokio::test]
async fn counters_log_and_waiting() {
    let fake = FakeSeaTable::start_with_default_schema(API_TOKEN).await;
    let api = Api::login(&fake).await;
    fake.reset_counters();
    assert_eq!(fake.token_exchanges(), 0);

    let (http, url, token) = (api.http.clone(), api.url("rows/"), api.token.clone());
    let task = tokio::spawn(async move {
        for _ in 0..3 {
            let reply = send(
                http.get(&url)
                    .query(&[("table_name", "users")])
                    .bearer_auth(&token),
            )
            .await;
            assert_eq!(reply.status, 200);
        }
    });
    tokio::time::timeout(WAIT, fake.wait_for_requests(Endpoint::ListRows, 3))
        .await
        .expect("three list calls");
    task.await.unwrap();
    assert_eq!(fake.requests(Endpoint::ListRows), 3);
    assert_eq!(fake.requests(Endpoint::Sql), 0);
    assert_eq!(fake.gateway_requests(), 3);
    let log = fake.request_log();
    assert_eq!(log.len(), 3);
    assert!(log.iter().all(|r| r.endpoint == Endpoint::ListRows
        && r.method == "GET"
        && r.status == 200
        && r.query == "table_name=users"));

    api.sql("SELECT * FROM users", json!([])).await;
    let last = fake.request_log().pop().unwrap();
    assert_eq!(last.endpoint, Endpoint::Sql);
    assert_eq!(last.body.unwrap()["sql"], "SELECT * FROM users");

    // Unknown paths and wrong methods are counted as Unknown.
    assert_eq!(api.get("nope/", &[]).await.status, 404);
    assert_eq!(api.get("sql/", &[]).await.status, 405);
    assert_eq!(fake.requests(Endpoint::Unknown), 2);
}

#[tokio::test]
async fn seeding_helpers_round_trip() {
    let fake = FakeSeaTable::start_with_default_schema(API_TOKEN).await;
    let id = fake.add_row(
        "mailboxes",
        json!({"Name": "sales", "email": "sales@x", "imap_port": "993", "disabled": true}),
    );
    let row = fake.row("mailboxes", &id).unwrap();
    assert_eq!(row["imap_port"], 993, "numbers are converted");
    assert_eq!(row["disabled"], true);
    assert_eq!(row["last_uid"], Value::Null);
    fake.update_row("mailboxes", &id, json!({"last_uid": "17"}));
    assert_eq!(fake.row("mailboxes", &id).unwrap()["last_uid"], "17");
    fake.delete_row("mailboxes", &id);
    assert!(fake.row("mailboxes", &id).is_none());

    let t = fake.create_table("extra", &[("Title", ColumnType::Text)]);
    assert_eq!(t.len(), 4);
    fake.add_column("extra", "n", ColumnType::Number);
    assert_eq!(fake.column_names("extra"), ["Title", "n"]);
}

#[tokio::test]
#[should_panic(expected = "no column")]
async fn seeding_an_unknown_column_panics() {
    let fake = FakeSeaTable::start_with_default_schema(API_TOKEN).await;
    fake.add_row("users", json!({"Nmae": "typo"}));
}
