//! The optional `deliveries` table of SeaTable's delivery log: its columns, what a base lacks
//! of it (then the log is off, with a warning), and creating it for `schema apply`.

use crate::seatable::{Metadata, NewColumn, SeaTableClient, SeaTableError};

/// The link column to the mailbox row the report came through.
pub const MAILBOX: &str = "mailbox";
/// The relay's key of a report (`<message id>@<arrival in Unix ms>`): how a retried batch
/// finds the rows an earlier, unanswered append already wrote.
pub const REPORT: &str = "report";

/// The columns other than the link, in creation order, with their SeaTable types: the first
/// (the row's display value) is the title.
pub const COLUMNS: [(&str, &str); 9] = [
    ("title", "text"),
    ("time", "date"),
    ("source", "text"),
    ("recipients", "number"),
    ("delivered", "number"),
    ("failed", "long-text"),
    ("first_send_secs", "number"),
    ("last_send_secs", "number"),
    (REPORT, "text"),
];

fn new_column(name: &str, column_type: &str) -> NewColumn {
    let mut column = NewColumn::new(name, column_type);
    if column_type == "date" {
        // With the time of day, not only the date (§3.5 column_data).
        column.data = Some(serde_json::json!({ "format": "YYYY-MM-DD HH:mm" }));
    }
    column
}

/// What `metadata` lacks for a delivery log in `table` linked to `mailboxes`, one sentence
/// each (as [`crate::schema::Schema::missing`] words them); empty when the log can be written.
pub fn missing(metadata: &Metadata, table: &str, mailboxes: &str) -> Vec<String> {
    let Some(found) = metadata.table(table) else {
        return vec![format!("table {table} is missing")];
    };
    let mut problems = Vec::new();
    for (name, column_type) in COLUMNS {
        match found.column(name) {
            None => problems.push(format!("table {table} has no column {name}")),
            Some(column) if column.column_type != column_type => problems.push(format!(
                "table {table} column {name} is of type {}, expected {column_type}",
                column.column_type
            )),
            Some(_) => {}
        }
    }
    let linked = metadata.table(mailboxes).map(|other| other.id.as_str());
    match found.column(MAILBOX) {
        None => problems.push(format!("table {table} has no column {MAILBOX}")),
        Some(column) if column.column_type != "link" => problems.push(format!(
            "table {table} column {MAILBOX} is of type {}, expected link",
            column.column_type
        )),
        Some(column) if linked.is_none() || column.linked_table_id(&found.id) != linked => {
            problems.push(format!(
                "table {table} column {MAILBOX} does not link to {mailboxes}"
            ));
        }
        Some(_) => {}
    }
    problems
}

/// Creates what the base lacks of the `table` of the delivery log (the table, its columns, the
/// link to `mailboxes`) and returns one line per thing created. Nothing is deleted or retyped.
///
/// # Errors
/// The first failing SeaTable call; what was created before it stays.
pub async fn apply(
    client: &SeaTableClient,
    table: &str,
    mailboxes: &str,
) -> Result<Vec<String>, SeaTableError> {
    let mut created = Vec::new();
    let mut metadata = client.metadata().await?;
    if metadata.table(table).is_none() {
        let columns: Vec<NewColumn> = COLUMNS
            .iter()
            .map(|(name, column_type)| new_column(name, column_type))
            .collect();
        client.create_table(table, &columns).await?;
        let names: Vec<&str> = COLUMNS.iter().map(|(name, _)| *name).collect();
        created.push(format!(
            "created table {table} with columns {}",
            names.join(", ")
        ));
        metadata = client.metadata().await?;
    }
    let Some(found) = metadata.table(table) else {
        return Ok(created);
    };
    for (name, column_type) in COLUMNS {
        if found.column(name).is_some() {
            continue;
        }
        match client
            .add_column(table, &new_column(name, column_type))
            .await
        {
            Ok(_) => created.push(format!("added column {table}.{name} ({column_type})")),
            Err(SeaTableError::Api {
                error_type: Some(kind),
                ..
            }) if kind == "column_already_exists" => {}
            Err(error) => return Err(error),
        }
    }
    if found.column(MAILBOX).is_none() && metadata.table(mailboxes).is_some() {
        client
            .add_column(table, &NewColumn::link(MAILBOX, table, mailboxes))
            .await?;
        created.push(format!("added link column {table}.{MAILBOX} → {mailboxes}"));
    }
    Ok(created)
}
