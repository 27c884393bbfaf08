//! `SeaTableClient` and the schema tooling against the in-repo fake SeaTable server
//! (`tests/support/seatable.rs`).

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use report_relay::config::TableNames;
use report_relay::metrics::Metrics;
use report_relay::schema::{self, Schema};
use report_relay::seatable::{ClientOptions, SeaTableClient, SeaTableError};
use secrecy::SecretString;
use serde_json::{Map, Value, json};
use support::seatable::{
    DTABLE_NAME, Endpoint, FakeSeaTable, LINK_CELL_CAP, Outage, Permission, Scope,
};

/// API tokens are 40 characters.
const API_TOKEN: &str = "4f2b9c0d8e7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c";
const CLAIM: &str = "UPDATE t_chats SET id_telegram_chat = ?, is_locked = true \
                     WHERE _id = ? AND id_telegram_chat IS NULL";

/// Production behaviour with test-sized delays: 3 retries, millisecond backoff.
fn fast() -> ClientOptions {
    ClientOptions {
        request_timeout: Duration::from_secs(5),
        retries: 3,
        min_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(20),
        max_retry_after: Duration::from_secs(2),
    }
}

fn client_with(
    fake: &FakeSeaTable,
    token: &str,
    options: ClientOptions,
) -> (SeaTableClient, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    let client = SeaTableClient::with_options(
        &fake.server_url(),
        SecretString::from(token.to_owned()),
        reqwest::Client::new(),
        metrics.clone(),
        options,
    )
    .expect("valid client");
    (client, metrics)
}

fn connect(fake: &FakeSeaTable) -> (SeaTableClient, Arc<Metrics>) {
    client_with(fake, API_TOKEN, fast())
}

/// `report_relay_seatable_requests_total{status="<status>"}`, 0 when absent.
fn counted(metrics: &Metrics, status: &str) -> u64 {
    let needle = format!("report_relay_seatable_requests_total{{status=\"{status}\"}} ");
    metrics
        .render()
        .lines()
        .find_map(|line| line.strip_prefix(&needle))
        .map_or(0, |value| value.trim().parse().expect("a count"))
}

fn statuses(fake: &FakeSeaTable) -> Vec<u16> {
    fake.request_log().iter().map(|r| r.status).collect()
}

fn cells(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        other => panic!("not an object: {other}"),
    }
}

#[tokio::test]
async fn token_exchange_is_cached_and_tokens_stay_out_of_urls() {
    let fake = FakeSeaTable::start_with_default_schema(API_TOKEN).await;
    let (client, metrics) = connect(&fake);
    let info = client.login().await.unwrap();
    assert_eq!(info.dtable_uuid, fake.base_uuid());
    assert_eq!(info.dtable_name.as_deref(), Some(DTABLE_NAME));
    assert_eq!(info.permission.as_deref(), Some("rw"));
    assert_eq!(info.gateway_url, format!("{}/", fake.gateway_url()));

    client.metadata().await.unwrap();
    client.list_rows("users").await.unwrap();
    assert_eq!(fake.token_exchanges(), 1);
    assert_eq!(counted(&metrics, "200"), 3);

    for request in fake.request_log() {
        assert!(!request.query.contains(API_TOKEN), "{request:?}");
        assert!(!request.query.contains("eyJ"), "{request:?}");
        assert!(!request.path.contains("eyJ"), "{request:?}");
    }
    let debug = format!("{client:?}");
    assert!(!debug.contains(API_TOKEN), "{debug}");
    assert!(!debug.contains("eyJ"), "{debug}");
}

#[tokio::test]
async fn a_refused_api_token_is_unauthorized() {
    let fake = FakeSeaTable::start_with_default_schema(API_TOKEN).await;
    let (client, metrics) = client_with(&fake, "0000000000000000000000000000000000000000", fast());
    let error = client.list_rows("users").await.unwrap_err();
    match &error {
        SeaTableError::Unauthorized { status, message } => {
            assert_eq!(*status, 403);
            assert!(message.contains("Permission denied."), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert!(!error.to_string().contains("0000000000"), "{error}");
    // Not retried: a refused token stays refused.
    assert_eq!(fake.requests(Endpoint::AccessToken), 1);
    assert_eq!(counted(&metrics, "403"), 1);
}

#[tokio::test]
async fn the_token_is_refreshed_before_it_expires() {
    let fake = FakeSeaTable::start_with_default_schema(API_TOKEN).await;
    fake.set_token_lifetime(Some(Duration::from_secs(2)));
    let (client, _) = connect(&fake);
    client.list_rows("users").await.unwrap();
    assert_eq!(fake.token_exchanges(), 1);
    // Past 80% of the token's life (at most 1.6 s of the 1–2 s left when it was issued).
    tokio::time::sleep(Duration::from_millis(1700)).await;
    client.list_rows("users").await.unwrap();
    assert_eq!(fake.token_exchanges(), 2);
    assert!(!statuses(&fake).contains(&403), "{:?}", statuses(&fake));
}

#[tokio::test]
async fn a_rejected_token_is_refreshed_once_and_the_call_retried_once() {
    let fake = FakeSeaTable::start_with_default_schema(API_TOKEN).await;
    let (client, metrics) = connect(&fake);
    client.login().await.unwrap();

    fake.expire_tokens();
    let rows = client.list_rows("users").await.unwrap();
    assert!(rows.is_empty());
    assert_eq!(fake.token_exchanges(), 2);
    assert_eq!(statuses(&fake).iter().filter(|s| **s == 403).count(), 1);
    assert_eq!(counted(&metrics, "403"), 1);

    // Concurrent callers refused together share one refresh.
    fake.expire_tokens();
    let calls = (0..8).map(|_| {
        let client = client.clone();
        tokio::spawn(async move { client.metadata().await })
    });
    for call in calls.collect::<Vec<_>>() {
        call.await.unwrap().unwrap();
    }
    assert_eq!(fake.token_exchanges(), 3);

    // A token the gateway keeps refusing: one refresh, one retry, then the error.
    fake.reset_counters();
    fake.fail_always(Scope::Gateway, 401);
    let error = client.metadata().await.unwrap_err();
    assert!(
        matches!(error, SeaTableError::Unauthorized { status: 401, .. }),
        "{error:?}"
    );
    assert_eq!(fake.token_exchanges(), 1);
    assert_eq!(fake.requests(Endpoint::Metadata), 2);
}

#[tokio::test]
async fn a_read_only_token_cannot_write() {
    let fake = FakeSeaTable::start_with_default_schema(API_TOKEN).await;
    let read_only = "1111111111111111111111111111111111111111";
    fake.add_api_token(read_only, Permission::ReadOnly);
    let id = fake.add_row("users", json!({"Name": "Ann"}));
    let (client, _) = client_with(&fake, read_only, fast());
    assert_eq!(
        client.login().await.unwrap().permission.as_deref(),
        Some("r")
    );
    assert_eq!(client.list_rows("users").await.unwrap().len(), 1);
    let update = [(id, cells(json!({"id_telegram": "42"})))];
    let error = client.update_rows("users", &update).await.unwrap_err();
    assert!(
        matches!(error, SeaTableError::Unauthorized { status: 403, .. }),
        "{error:?}"
    );
}

#[tokio::test]
async fn list_rows_pages_through_2500_rows() {
    let fake = FakeSeaTable::start_with_default_schema(API_TOKEN).await;
    let ids = fake.add_rows(
        "users",
        (0..2500).map(|i| json!({"Name": format!("user {i}"), "phone": format!("+7999{i:07}")})),
    );
    let (client, _) = connect(&fake);
    let rows = client.list_rows("users").await.unwrap();
    assert_eq!(rows.len(), 2500);
    let got: Vec<&str> = rows.iter().map(|row| row.id().unwrap()).collect();
    assert_eq!(got, ids);
    assert_eq!(rows[1234].text("Name"), Some("user 1234"));
    assert_eq!(rows[1234].text("phone"), Some("+79990001234"));
    // Every column is present, keyed by name, null when empty.
    assert_eq!(rows[0].get("id_telegram"), Some(&Value::Null));

    let queries: Vec<String> = fake
        .request_log()
        .into_iter()
        .filter(|r| r.endpoint == Endpoint::ListRows)
        .map(|r| r.query)
        .collect();
    assert_eq!(queries.len(), 3, "{queries:?}");
    for (page, query) in queries.iter().enumerate() {
        assert!(query.contains(&format!("start={}", page * 1000)), "{query}");
        assert!(query.contains("limit=1000"), "{query}");
        assert!(query.contains("convert_keys=true"), "{query}");
        assert!(query.contains("table_name=users"), "{query}");
    }

    // A table of exactly one page needs one more (empty) page to know it ended.
    let fake = FakeSeaTable::start_with_default_schema(API_TOKEN).await;
    fake.add_rows(
        "t_chats",
        (0..1000).map(|i| json!({"Name": format!("g{i}")})),
    );
    let (client, _) = connect(&fake);
    assert_eq!(client.list_rows("t_chats").await.unwrap().len(), 1000);
    assert_eq!(fake.requests(Endpoint::ListRows), 2);

    let error = client.list_rows("nope").await.unwrap_err();
    assert!(matches!(error, SeaTableError::NotFound { .. }), "{error:?}");
}

#[tokio::test]
async fn link_cells_are_read_from_both_sides() {
    let fake = FakeSeaTable::start_with_default_schema(API_TOKEN).await;
    let mailbox = fake.add_row(
        "mailboxes",
        json!({"Name": "sales", "email": "sales@example.com"}),
    );
    let other = fake.add_row(
        "mailboxes",
        json!({"Name": "ops", "email": "ops@example.com"}),
    );
    let users = fake.add_rows(
        "users",
        (0..60).map(|i| json!({"Name": format!("u{i}"), "id_telegram": format!("{}", 1000 + i)})),
    );
    for user in &users {
        fake.link("users", "mailboxes", user, &[mailbox.as_str()]);
    }
    fake.link("users", "mailboxes", &users[0], &[other.as_str()]);
    let group = fake.add_row("t_chats", json!({"Name": "Sales team"}));
    fake.link("t_chats", "mailboxes", &group, &[mailbox.as_str()]);

    let (client, _) = connect(&fake);
    let rows = client.list_rows("users").await.unwrap();
    assert_eq!(
        rows[0].link_ids("mailboxes"),
        [mailbox.as_str(), other.as_str()]
    );
    assert!(
        rows.iter()
            .all(|row| row.link_ids("mailboxes").contains(&mailbox.as_str()))
    );
    // The mailbox's own cell is capped at 50, which is why the relay reads the "many" side.
    let row = client.get_row("mailboxes", &mailbox).await.unwrap();
    assert_eq!(row.link_ids("users").len(), LINK_CELL_CAP);
    assert_eq!(row.link_ids("t_chats"), [group.as_str()]);
    assert_eq!(row.text("email"), Some("sales@example.com"));
    let groups = client.list_rows("t_chats").await.unwrap();
    assert_eq!(groups[0].link_ids("mailboxes"), [mailbox.as_str()]);
    assert!(!groups[0].bool("is_locked"));
    assert_eq!(row.get("users").unwrap()[0]["display_value"], "u0");
}

#[tokio::test]
async fn update_rows_in_batches_then_read_back() {
    let fake = FakeSeaTable::start_with_default_schema(API_TOKEN).await;
    let ids = fake.add_rows("users", (0..1200).map(|i| json!({"Name": format!("u{i}")})));
    let box_id = fake.add_row("mailboxes", json!({"Name": "sales", "imap_port": 993}));
    let (client, _) = connect(&fake);

    let updates: Vec<(String, Map<String, Value>)> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            (
                id.clone(),
                cells(json!({"id_telegram": format!("{}", 5000 + i)})),
            )
        })
        .collect();
    client.update_rows("users", &updates).await.unwrap();
    assert_eq!(fake.requests(Endpoint::UpdateRows), 2);
    let rows = client.list_rows("users").await.unwrap();
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(
            row.text("id_telegram"),
            Some(format!("{}", 5000 + i).as_str())
        );
    }

    // Names as keys; &str ids work too; an unknown column is silently ignored by SeaTable.
    let update = [(
        box_id.as_str(),
        cells(json!({"last_uid": "4711", "disabled": true, "no_such_column": "x"})),
    )];
    client.update_rows("mailboxes", &update).await.unwrap();
    let row = client.get_row("mailboxes", &box_id).await.unwrap();
    assert_eq!(row.text("last_uid"), Some("4711"));
    assert!(row.bool("disabled"));
    assert_eq!(row.number("imap_port"), Some(993.0));
    assert!(row.get("no_such_column").is_none());

    let error = client
        .get_row("mailboxes", "AAAAAAAAAAAAAAAAAAAAAA")
        .await
        .unwrap_err();
    match error {
        SeaTableError::NotFound { message } => assert!(message.contains("row _id not exits")),
        other => panic!("{other:?}"),
    }

    // append_rows returns the new ids in order, in batches of 1000.
    let new: Vec<Map<String, Value>> = (0..1500)
        .map(|i| cells(json!({"Name": format!("g{i}"), "is_locked": false})))
        .collect();
    let new_ids = client.append_rows("t_chats", &new).await.unwrap();
    assert_eq!(new_ids.len(), 1500);
    assert_eq!(new_ids.iter().collect::<HashSet<_>>().len(), 1500);
    assert_eq!(fake.requests(Endpoint::AppendRows), 2);
    let groups = client.list_rows("t_chats").await.unwrap();
    assert_eq!(groups[1499].id(), Some(new_ids[1499].as_str()));
    assert_eq!(groups[1499].text("Name"), Some("g1499"));
}

#[tokio::test]
async fn sql_conditional_update_claims_a_row_once() {
    let fake = FakeSeaTable::start_with_default_schema(API_TOKEN).await;
    let group = fake.add_row("t_chats", json!({"Name": "Ops"}));
    let (client, _) = connect(&fake);

    let rows = client
        .sql(CLAIM, &[json!("-1001234567890"), json!(group)])
        .await
        .unwrap();
    assert!(rows.is_empty(), "UPDATE returns no rows and no count");
    // A second claim by another chat matches nothing, and says so in no way: read back.
    let rows = client
        .sql(CLAIM, &[json!("-1009999999999"), json!(group)])
        .await
        .unwrap();
    assert!(rows.is_empty());
    let rows = client
        .sql(
            "SELECT _id, id_telegram_chat, is_locked FROM t_chats WHERE _id = ?",
            &[json!(group)],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].id(), Some(group.as_str()));
    assert_eq!(rows[0].text("id_telegram_chat"), Some("-1001234567890"));
    assert!(rows[0].bool("is_locked"));
    assert_eq!(
        fake.row("t_chats", &group).unwrap()["id_telegram_chat"],
        "-1001234567890"
    );

    let body = fake
        .request_log()
        .into_iter()
        .find(|r| r.endpoint == Endpoint::Sql)
        .and_then(|r| r.body)
        .unwrap();
    assert_eq!(body["convert_keys"], true);
    assert_eq!(body["parameters"], json!(["-1001234567890", group]));

    let error = client.sql("SELECT * FROM nope", &[]).await.unwrap_err();
    match error {
        SeaTableError::Api {
            status: 400,
            message,
            ..
        } => assert!(message.contains("no such table"), "{message}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_429_with_an_empty_body_is_retried() {
    let fake = FakeSeaTable::start_with_default_schema(API_TOKEN).await;
    let (client, metrics) = connect(&fake);
    client.login().await.unwrap();

    fake.rate_limit_next(2);
    client.metadata().await.unwrap();
    assert_eq!(fake.requests(Endpoint::Metadata), 3);
    assert_eq!(counted(&metrics, "429"), 2);

    // Writes are retried on 429 too: the server did not process them.
    fake.rate_limit_next(1);
    let ids = client
        .append_rows("users", &[cells(json!({"Name": "Ann"}))])
        .await
        .unwrap();
    assert_eq!(ids.len(), 1);
    assert_eq!(fake.rows("users").len(), 1);

    // Still limited after every retry: RateLimited.
    fake.reset_counters();
    fake.rate_limit_next(10);
    let error = client.list_rows("users").await.unwrap_err();
    assert!(
        matches!(error, SeaTableError::RateLimited { retry_after: None }),
        "{error:?}"
    );
    assert!(error.is_transient());
    assert_eq!(fake.requests(Endpoint::ListRows), 4);
}

#[tokio::test]
async fn outages_surface_as_errors_and_reads_recover() {
    let fake = FakeSeaTable::start_with_default_schema(API_TOKEN).await;
    let (client, metrics) = connect(&fake);
    client.login().await.unwrap();

    // Transient 5xx on a read: retried, then success.
    fake.fail_next(Endpoint::ListRows, 503, 2);
    client.list_rows("users").await.unwrap();
    assert_eq!(fake.requests(Endpoint::ListRows), 3);

    // A 5xx on an append is not retried (it may have been applied).
    fake.fail_next(Endpoint::AppendRows, 502, 1);
    let error = client
        .append_rows("users", &[cells(json!({"Name": "Ann"}))])
        .await
        .unwrap_err();
    assert!(
        matches!(error, SeaTableError::Server { status: 502, .. }),
        "{error:?}"
    );
    assert_eq!(fake.requests(Endpoint::AppendRows), 1);

    // nginx answering 502 with its HTML page.
    fake.go_down(Outage::BadGateway).await;
    fake.reset_counters();
    let error = client.list_rows("users").await.unwrap_err();
    match &error {
        SeaTableError::Server { status, message } => {
            assert_eq!(*status, 502);
            assert!(message.contains("502 Bad Gateway"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(fake.requests(Endpoint::ListRows), 4);

    // The host down: connection refused.
    fake.go_down(Outage::ConnectionRefused).await;
    let before = counted(&metrics, "error");
    let error = client.metadata().await.unwrap_err();
    assert!(matches!(error, SeaTableError::Network(_)), "{error:?}");
    assert!(error.is_transient());
    assert_eq!(counted(&metrics, "error") - before, 4);
    assert!(!error.to_string().contains(API_TOKEN));

    fake.come_back().await;
    client.metadata().await.unwrap();
}

#[tokio::test]
async fn a_slow_server_times_out() {
    let fake = FakeSeaTable::start_with_default_schema(API_TOKEN).await;
    let options = ClientOptions {
        request_timeout: Duration::from_millis(300),
        retries: 1,
        ..fast()
    };
    let (client, metrics) = client_with(&fake, API_TOKEN, options);
    client.login().await.unwrap();
    fake.set_delay(Endpoint::Metadata, Duration::from_secs(5));
    let started = std::time::Instant::now();
    let error = client.metadata().await.unwrap_err();
    assert!(matches!(error, SeaTableError::Timeout), "{error:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(counted(&metrics, "error"), 2);
}

#[tokio::test]
async fn missing_names_a_removed_column_and_table() {
    let fake = FakeSeaTable::start_with_default_schema(API_TOKEN).await;
    let (client, _) = connect(&fake);
    let schema = Schema::bundled();
    assert_eq!(
        schema.missing(&client.metadata().await.unwrap()),
        Vec::<String>::new()
    );

    fake.remove_column("users", "id_telegram");
    fake.remove_column("mailboxes", "imap_password"); // optional: not reported
    assert_eq!(
        schema.missing(&client.metadata().await.unwrap()),
        ["table users has no column id_telegram"]
    );

    fake.rename_column("t_chats", "is_locked", "Is_Locked");
    fake.remove_table("t_chats");
    assert_eq!(
        schema.missing(&client.metadata().await.unwrap()),
        [
            "table users has no column id_telegram",
            "table t_chats is missing"
        ]
    );
}

#[tokio::test]
async fn apply_creates_everything_on_an_empty_base_then_does_nothing() {
    let fake = FakeSeaTable::start(API_TOKEN).await;
    let (client, _) = connect(&fake);
    let schema = Schema::bundled();

    let created = schema::apply(&client, &schema).await.unwrap();
    assert!(
        created.contains(
            &"created table users with columns Name, phone, id_telegram, reports_filter".to_owned()
        ),
        "{created:#?}"
    );
    assert!(
        created.contains(
            &"added link column users.mailboxes → mailboxes (SeaTable added mailboxes.users)"
                .to_owned()
        ),
        "{created:#?}"
    );
    assert!(
        created.contains(
            &"added link column t_chats.mailboxes → mailboxes (SeaTable added mailboxes.t_chats)"
                .to_owned()
        ),
        "{created:#?}"
    );
    assert_eq!(created.len(), 5, "{created:#?}");
    assert_eq!(fake.table_names(), ["users", "mailboxes", "t_chats"]);
    let metadata = client.metadata().await.unwrap();
    assert_eq!(schema.missing(&metadata), Vec::<String>::new());
    // Every column of the schema exists, with its type.
    for spec in &schema.tables {
        let table = metadata.table(&spec.name).unwrap();
        for column in &spec.columns {
            let got = table.column(&column.name).unwrap_or_else(|| {
                panic!("{}.{} missing", spec.name, column.name);
            });
            assert_eq!(
                got.column_type, column.column_type,
                "{}.{}",
                spec.name, column.name
            );
        }
    }
    let port = metadata
        .table("mailboxes")
        .unwrap()
        .column("imap_port")
        .unwrap();
    assert_eq!(port.data.as_ref().unwrap()["thousands"], "no");

    // Rows written through the new schema work, links included.
    let users = client
        .append_rows(
            "users",
            &[cells(json!({"Name": "Ann", "id_telegram": "7"}))],
        )
        .await
        .unwrap();
    let boxes = client
        .append_rows("mailboxes", &[cells(json!({"Name": "sales"}))])
        .await
        .unwrap();
    fake.link("users", "mailboxes", &users[0], &[boxes[0].as_str()]);
    let row = client.get_row("mailboxes", &boxes[0]).await.unwrap();
    assert_eq!(row.link_ids("users"), [users[0].as_str()]);

    // The second run changes nothing and only reads.
    fake.reset_counters();
    let created = schema::apply(&client, &schema).await.unwrap();
    assert_eq!(created, Vec::<String>::new());
    let writes: Vec<_> = fake
        .request_log()
        .into_iter()
        .filter(|r| r.method != "GET")
        .collect();
    assert!(writes.is_empty(), "{writes:?}");
}

#[tokio::test]
async fn apply_fills_gaps_without_touching_the_rest() {
    let fake = FakeSeaTable::start_with_default_schema(API_TOKEN).await;
    fake.remove_column("mailboxes", "last_uid");
    fake.remove_column("t_chats", "is_locked");
    // A sysadmin renamed the link: apply must not add a second one.
    fake.rename_column("users", "mailboxes", "boxes");
    let (client, _) = connect(&fake);
    let schema = Schema::bundled();

    let created = schema::apply(&client, &schema).await.unwrap();
    assert_eq!(
        created,
        [
            "added column mailboxes.last_uid (text)",
            "added column t_chats.is_locked (checkbox)"
        ]
    );
    assert!(fake.column_names("users").contains(&"boxes".to_owned()));
    assert_eq!(
        schema.missing(&client.metadata().await.unwrap()),
        [
            "table users has no column mailboxes (column boxes links to mailboxes; rename it to mailboxes)"
        ]
    );
}

#[tokio::test]
async fn an_old_base_without_the_option_columns_is_accepted_and_apply_adds_them() {
    let fake = FakeSeaTable::start_with_default_schema(API_TOKEN).await;
    for (table, column) in [
        ("users", "reports_filter"),
        ("mailboxes", "silent"),
        ("mailboxes", "protect_content"),
        ("t_chats", "topic"),
        ("t_chats", "reports_filter"),
    ] {
        fake.remove_column(table, column);
    }
    let (client, _) = connect(&fake);
    let tables = TableNames::default();
    let inspection = schema::check(&client, &tables)
        .await
        .expect("the features are off, nothing the relay needs is missing");
    assert_eq!(inspection.missing, Vec::<String>::new());
    assert_eq!(
        inspection.features_off,
        [
            "table users has no column reports_filter: title filters are off",
            "table mailboxes has no column silent: silent reports are off",
            "table mailboxes has no column protect_content: protected reports are off",
            "table t_chats has no column topic: forum topics are off",
            "table t_chats has no column reports_filter: title filters are off",
        ]
    );

    let created = schema::apply(&client, &Schema::bundled()).await.unwrap();
    assert_eq!(
        created,
        [
            "added column users.reports_filter (text)",
            "added column mailboxes.silent (checkbox)",
            "added column mailboxes.protect_content (checkbox)",
            "added column t_chats.topic (text)",
            "added column t_chats.reports_filter (text)",
        ]
    );
    let inspection = schema::inspect(&client, &tables).await.unwrap();
    assert_eq!(inspection, schema::Inspection::default());
}

#[tokio::test]
async fn apply_and_missing_follow_the_configured_table_names() {
    let fake = FakeSeaTable::start(API_TOKEN).await;
    let (client, _) = connect(&fake);
    let names = TableNames {
        users: "people".to_owned(),
        mailboxes: "boxes".to_owned(),
        groups: "groups".to_owned(),
        deliveries: "deliveries".to_owned(),
    };
    let schema = Schema::bundled().with_table_names(&names);
    let created = schema::apply(&client, &schema).await.unwrap();
    assert!(!created.is_empty());
    assert_eq!(fake.table_names(), ["people", "boxes", "groups"]);
    assert_eq!(
        schema.missing(&client.metadata().await.unwrap()),
        Vec::<String>::new()
    );
    // The link columns keep their documented names on the sides the relay reads.
    assert!(
        fake.column_names("people")
            .contains(&"mailboxes".to_owned())
    );
    assert!(
        fake.column_names("groups")
            .contains(&"mailboxes".to_owned())
    );
    assert_eq!(
        schema::apply(&client, &schema).await.unwrap(),
        Vec::<String>::new()
    );
}
