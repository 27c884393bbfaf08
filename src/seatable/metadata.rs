//! The base's structure (`GET metadata/`, §2.4) and the columns `schema apply` creates.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

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
