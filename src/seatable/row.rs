//! One SeaTable row as the gateway returns it, with lenient cell readers (text, number,
//! checkbox, link ids) and a `Debug` that hides secret columns.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

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
