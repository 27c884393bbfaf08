//! The SeaTable schema the relay needs: `seatable-schema/schema.json`, compiled in.
//!
//! - [`Schema::missing`] compares it with a base's [`Metadata`] (for `report-relay check`):
//!   SeaTable silently ignores unknown column names on writes (`reference/seatable-api.md`
//!   §3.1), so a missing `id_telegram`, `id_telegram_chat`, `is_locked` or `last_uid` would turn
//!   the relay's writes into silent no-ops.
//! - [`apply`] creates what the base lacks (for `report-relay schema apply`); it never deletes,
//!   renames or retypes anything.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::Value;

use crate::config::TableNames;
use crate::seatable::{Metadata, NewColumn, SeaTableClient, SeaTableError, Table};

/// The bundled `seatable-schema/schema.json`.
const BUNDLED: &str = include_str!("../seatable-schema/schema.json");

/// The tables and columns the relay reads and writes.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Schema {
    /// The three tables, in creation order.
    pub tables: Vec<TableSpec>,
}

/// Which of the relay's tables a [`TableSpec`] is; the keys of `seatable.tables`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TableRole {
    /// People (`users` by default).
    Users,
    /// Mailboxes (`mailboxes` by default).
    Mailboxes,
    /// Telegram groups (`t_chats` by default).
    Groups,
}

/// One table of the schema.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TableSpec {
    /// The table's role.
    pub role: TableRole,
    /// The table name (the default, or the configured one after [`Schema::with_table_names`]).
    pub name: String,
    /// The columns, in creation order; the first must be a text column (§3.4).
    pub columns: Vec<ColumnSpec>,
}

/// One column of a [`TableSpec`].
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ColumnSpec {
    /// The column name (the same whatever the tables are called).
    pub name: String,
    /// The SeaTable column type it is created with: `text`, `number`, `checkbox`, `link`.
    #[serde(rename = "type")]
    pub column_type: String,
    /// Whether the relay cannot work without it.
    #[serde(default)]
    pub required: bool,
    /// Other types an existing base may use for it instead.
    #[serde(default)]
    pub accepts: Vec<String>,
    /// `column_data` sent when creating it.
    #[serde(default)]
    pub data: Option<Value>,
    /// For a link: the table it points to.
    #[serde(default)]
    pub other_table: Option<String>,
    /// For a link: the name of its other side in `other_table`.
    #[serde(default)]
    pub other_column: Option<String>,
    /// For an optional column a feature needs (e.g. `forum topics`): the feature, which is off
    /// while the base lacks the column ([`Schema::features_off`]).
    #[serde(default)]
    pub feature: Option<String>,
}

impl ColumnSpec {
    fn is_link(&self) -> bool {
        self.column_type == "link"
    }

    fn accepts_type(&self, column_type: &str) -> bool {
        self.column_type == column_type || self.accepts.iter().any(|other| other == column_type)
    }

    fn new_column(&self) -> NewColumn {
        NewColumn {
            name: self.name.clone(),
            column_type: self.column_type.clone(),
            data: self.data.clone(),
        }
    }
}

impl Schema {
    /// The schema compiled in from `seatable-schema/schema.json`, with the default table
    /// names.
    ///
    /// # Panics
    /// Never: the bundled file is checked by this module's tests.
    pub fn bundled() -> Self {
        Self::from_json(BUNDLED).expect("seatable-schema/schema.json is valid (tested)")
    }

    /// Parses and checks a schema in the `schema.json` format: one table per role, links
    /// pointing at tables of the schema, a text first column.
    ///
    /// # Errors
    /// A message naming the problem.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let schema: Self = serde_json::from_str(text).map_err(|error| error.to_string())?;
        for role in [TableRole::Users, TableRole::Mailboxes, TableRole::Groups] {
            let count = schema.tables.iter().filter(|t| t.role == role).count();
            if count != 1 {
                return Err(format!("{count} tables have role {role:?}, expected 1"));
            }
        }
        for table in &schema.tables {
            if table
                .columns
                .first()
                .is_none_or(|c| c.column_type != "text")
            {
                return Err(format!(
                    "table {}: the first column must be text",
                    table.name
                ));
            }
            for column in &table.columns {
                match (&column.other_table, column.is_link()) {
                    (Some(other), true) if schema.table(other).is_some() => {}
                    (None, false) => {}
                    _ => {
                        return Err(format!(
                            "table {} column {}: a link needs other_table naming a table of \
                             the schema, and only links have one",
                            table.name, column.name
                        ));
                    }
                }
            }
        }
        Ok(schema)
    }

    /// The same schema with the configured table names (`seatable.tables`), links included.
    pub fn with_table_names(mut self, names: &TableNames) -> Self {
        let renames: HashMap<String, String> = self
            .tables
            .iter()
            .map(|table| {
                let new = match table.role {
                    TableRole::Users => &names.users,
                    TableRole::Mailboxes => &names.mailboxes,
                    TableRole::Groups => &names.groups,
                };
                (table.name.clone(), new.clone())
            })
            .collect();
        for table in &mut self.tables {
            if let Some(new) = renames.get(&table.name) {
                table.name.clone_from(new);
            }
            for column in &mut table.columns {
                if let Some(other) = &mut column.other_table
                    && let Some(new) = renames.get(other.as_str())
                {
                    other.clone_from(new);
                }
            }
        }
        self
    }

    /// The table spec with this name.
    pub fn table(&self, name: &str) -> Option<&TableSpec> {
        self.tables.iter().find(|table| table.name == name)
    }

    /// The table spec with this role.
    pub fn table_for(&self, role: TableRole) -> Option<&TableSpec> {
        self.tables.iter().find(|table| table.role == role)
    }

    /// What the base lacks for the relay, one sentence each; empty when all is well:
    ///
    /// - `table t_chats is missing`;
    /// - `table users has no column id_telegram` for a missing **required** column (with a
    ///   hint when a column differs only in case, or a link to the right table exists under
    ///   another name);
    /// - `table t_chats column is_locked is of type text, expected checkbox` for any schema
    ///   column present with a type it does not accept;
    /// - `table users column mailboxes links to t_chats, expected mailboxes`.
    ///
    /// Missing optional columns are not reported (those of a feature: [`Self::features_off`]).
    pub fn missing(&self, metadata: &Metadata) -> Vec<String> {
        let mut problems = Vec::new();
        for spec in &self.tables {
            let Some(table) = metadata.table(&spec.name) else {
                problems.push(format!("table {} is missing", spec.name));
                continue;
            };
            for column_spec in &spec.columns {
                match table.column(&column_spec.name) {
                    None if column_spec.required => problems.push(format!(
                        "table {} has no column {}{}",
                        spec.name,
                        column_spec.name,
                        missing_hint(metadata, table, column_spec)
                    )),
                    None => {}
                    Some(column) if !column_spec.accepts_type(&column.column_type) => {
                        problems.push(format!(
                            "table {} column {} is of type {}, expected {}",
                            spec.name, column.name, column.column_type, column_spec.column_type
                        ));
                    }
                    Some(column) => {
                        let Some(expected) = &column_spec.other_table else {
                            continue;
                        };
                        let actual = column
                            .linked_table_id(&table.id)
                            .and_then(|id| metadata.table_by_id(id))
                            .map(|other| other.name.as_str());
                        if actual != Some(expected.as_str()) {
                            problems.push(format!(
                                "table {} column {} links to {}, expected {expected}",
                                spec.name,
                                column.name,
                                actual.unwrap_or("an unknown table")
                            ));
                        }
                    }
                }
            }
        }
        problems
    }
}

/// A hint for a missing column: a column whose name differs only in case, or for a link, a
/// link to the right table under another name.
impl Schema {
    /// The features that are off because the base lacks their optional column, one sentence
    /// each, e.g. `table t_chats has no column topic: forum topics are off`; empty when the
    /// base has them all (a missing table is [`Self::missing`]'s to report).
    pub fn features_off(&self, metadata: &Metadata) -> Vec<String> {
        let mut off = Vec::new();
        for spec in &self.tables {
            let Some(table) = metadata.table(&spec.name) else {
                continue;
            };
            for column in &spec.columns {
                if let Some(feature) = &column.feature
                    && table.column(&column.name).is_none()
                {
                    off.push(format!(
                        "table {} has no column {}: {feature} are off",
                        spec.name, column.name
                    ));
                }
            }
        }
        off
    }
}

fn missing_hint(metadata: &Metadata, table: &Table, spec: &ColumnSpec) -> String {
    if let Some(other) = &spec.other_table
        && let Some(existing) = link_to(metadata, table, other)
    {
        return format!(
            " (column {} links to {other}; rename it to {})",
            existing, spec.name
        );
    }
    match table
        .columns
        .iter()
        .find(|column| column.name.eq_ignore_ascii_case(&spec.name))
    {
        Some(column) => format!(
            " (there is a column {}; names are case-sensitive)",
            column.name
        ),
        None => String::new(),
    }
}

/// The name of a link column of `table` that points to the table named `other`.
fn link_to<'a>(metadata: &Metadata, table: &'a Table, other: &str) -> Option<&'a str> {
    let other_id = &metadata.table(other)?.id;
    table
        .columns
        .iter()
        .find(|column| column.linked_table_id(&table.id) == Some(other_id.as_str()))
        .map(|column| column.name.as_str())
}

/// Creates the tables and columns of `schema` that the base lacks, and returns one line per
/// thing created (empty when the base already had everything):
///
/// 1. missing tables, with their non-link columns (`POST tables/`, §3.4);
/// 2. missing non-link columns of existing tables (`POST columns/`, §3.5);
/// 3. missing links, once both tables exist, required sides first: one `POST columns/` with
///    `column_data: {table, other_table}` creates both sides; SeaTable picks the other side's
///    name (the reference does not document it; the fake uses the first table's name, which
///    gives the schema's names with the default tables). A link is not created when either
///    side already exists or the
///    table already links to the other table under another name ([`Schema::missing`] then
///    names the problem).
///
/// Nothing is deleted, renamed or retyped; wrong types stay for a person to fix. Run
/// [`Schema::missing`] afterwards to see what is still wrong.
///
/// # Errors
/// The first failing SeaTable call; what was created before it stays.
pub async fn apply(client: &SeaTableClient, schema: &Schema) -> Result<Vec<String>, SeaTableError> {
    let mut created = Vec::new();
    let mut metadata = client.metadata().await?;

    for spec in &schema.tables {
        if metadata.table(&spec.name).is_some() {
            continue;
        }
        let columns: Vec<NewColumn> = spec
            .columns
            .iter()
            .filter(|column| !column.is_link())
            .map(ColumnSpec::new_column)
            .collect();
        client.create_table(&spec.name, &columns).await?;
        let names: Vec<&str> = columns.iter().map(|column| column.name.as_str()).collect();
        created.push(format!(
            "created table {} with columns {}",
            spec.name,
            names.join(", ")
        ));
    }
    if !created.is_empty() {
        metadata = client.metadata().await?;
    }
    let mut stale = false;

    for spec in &schema.tables {
        let Some(table) = metadata.table(&spec.name) else {
            continue;
        };
        for column in spec.columns.iter().filter(|column| !column.is_link()) {
            if table.column(&column.name).is_some() {
                continue;
            }
            match client.add_column(&spec.name, &column.new_column()).await {
                Ok(_) => {
                    stale = true;
                    created.push(format!(
                        "added column {}.{} ({})",
                        spec.name, column.name, column.column_type
                    ));
                }
                // Someone added it meanwhile: fine.
                Err(SeaTableError::Api {
                    error_type: Some(kind),
                    ..
                }) if kind == "column_already_exists" => {}
                Err(error) => return Err(error),
            }
        }
    }

    let mut links: Vec<(&TableSpec, &ColumnSpec)> = schema
        .tables
        .iter()
        .flat_map(|table| table.columns.iter().map(move |column| (table, column)))
        .filter(|(_, column)| column.is_link())
        .collect();
    links.sort_by_key(|(_, column)| !column.required);
    for (spec, column) in links {
        let Some(other_name) = &column.other_table else {
            continue;
        };
        if stale {
            metadata = client.metadata().await?;
            stale = false;
        }
        let (Some(table), Some(other)) = (metadata.table(&spec.name), metadata.table(other_name))
        else {
            continue;
        };
        let other_side_exists = column
            .other_column
            .as_ref()
            .and_then(|name| other.column(name))
            .is_some_and(|c| c.linked_table_id(&other.id) == Some(table.id.as_str()));
        if table.column(&column.name).is_some()
            || other_side_exists
            || link_to(&metadata, table, other_name).is_some()
        {
            continue;
        }
        let new = NewColumn::link(&column.name, &spec.name, other_name);
        let added = client.add_column(&spec.name, &new).await?;
        let mut line = format!(
            "added link column {}.{} → {other_name}",
            spec.name, column.name
        );
        metadata = client.metadata().await?;
        if let Some(back) = added.link_id().and_then(|link_id| {
            metadata.table(other_name)?.columns.iter().find(|c| {
                c.column_type == "link" && c.link_id() == Some(link_id) && c.key != added.key
            })
        }) {
            line.push_str(&format!(" (SeaTable added {other_name}.{})", back.name));
        }
        created.push(line);
    }
    Ok(created)
}

/// What the base lacks of the bundled schema (with the configured table names): one line per
/// missing table or column; empty when nothing is missing.
///
/// # Errors
/// SeaTable could not be reached or answered with an error (`GET /metadata/`).
pub async fn missing(
    client: &SeaTableClient,
    tables: &TableNames,
) -> Result<Vec<String>, SeaTableError> {
    Ok(inspect(client, tables).await?.missing)
}

/// What [`inspect`] found: what the relay needs and the base lacks, and the features that are
/// off for lack of their optional column.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inspection {
    /// [`Schema::missing`]: one line per missing table or required column, or wrong type.
    pub missing: Vec<String>,
    /// [`Schema::features_off`]: one line per missing feature column.
    pub features_off: Vec<String>,
}

/// Compares the base with the bundled schema (with the configured table names) in one
/// `GET /metadata/`.
///
/// # Errors
/// SeaTable could not be reached or answered with an error.
pub async fn inspect(
    client: &SeaTableClient,
    tables: &TableNames,
) -> Result<Inspection, SeaTableError> {
    let metadata = client.metadata().await?;
    let schema = Schema::bundled().with_table_names(tables);
    Ok(Inspection {
        missing: schema.missing(&metadata),
        features_off: schema.features_off(&metadata),
    })
}

/// The warning for [`Inspection::features_off`], e.g. for the log and `report-relay check`.
pub fn features_off_warning(features_off: &[String]) -> String {
    format!(
        "the SeaTable base lacks optional columns, so these features are off: {}; run `report-relay schema apply` to add them",
        features_off.join("; ")
    )
}

/// Checks that the base has every table and column the relay writes (SeaTable silently ignores
/// unknown column names on writes); returns the inspection, whose
/// [`Inspection::features_off`] the caller shows as a warning.
///
/// # Errors
/// One line per missing table or column, e.g. `table users has no column id_telegram`; or
/// SeaTable could not be reached.
pub async fn check(client: &SeaTableClient, tables: &TableNames) -> anyhow::Result<Inspection> {
    let inspection = inspect(client, tables).await?;
    let missing = &inspection.missing;
    if missing.is_empty() {
        Ok(inspection)
    } else {
        anyhow::bail!(
            "the SeaTable base lacks what the relay needs ({}); run `report-relay schema apply`",
            missing.join("; ")
        )
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::seatable::Column;

    fn column(key: &str, name: &str, column_type: &str) -> Column {
        Column {
            key: key.to_owned(),
            name: name.to_owned(),
            column_type: column_type.to_owned(),
            data: None,
        }
    }

    fn link(key: &str, name: &str, link_id: &str, table_id: &str, other_id: &str) -> Column {
        Column {
            data: Some(
                json!({"link_id": link_id, "table_id": table_id, "other_table_id": other_id}),
            ),
            ..column(key, name, "link")
        }
    }

    /// The default schema, complete, as the fake and a real base lay it out.
    fn complete() -> Metadata {
        let table = |id: &str, name: &str, columns: Vec<Column>| Table {
            id: id.to_owned(),
            name: name.to_owned(),
            columns,
        };
        Metadata {
            tables: vec![
                table(
                    "0000",
                    "users",
                    vec![
                        column("0000", "Name", "text"),
                        column("aaaa", "phone", "text"),
                        link("bbbb", "mailboxes", "L1", "0000", "0001"),
                        column("cccc", "id_telegram", "text"),
                    ],
                ),
                table(
                    "0001",
                    "mailboxes",
                    vec![
                        column("0000", "Name", "text"),
                        column("aaaa", "email", "email"),
                        column("dddd", "description", "long-text"),
                        link("bbbb", "users", "L1", "0000", "0001"),
                        link("eeee", "t_chats", "L2", "0002", "0001"),
                        column("ffff", "last_uid", "text"),
                        column("gggg", "imap_port", "number"),
                        column("hhhh", "disabled", "checkbox"),
                    ],
                ),
                table(
                    "0002",
                    "t_chats",
                    vec![
                        column("0000", "Name", "text"),
                        column("aaaa", "id_telegram_chat", "text"),
                        column("bbbb", "is_locked", "checkbox"),
                        link("cccc", "mailboxes", "L2", "0002", "0001"),
                    ],
                ),
            ],
        }
    }

    fn table_mut<'a>(metadata: &'a mut Metadata, name: &str) -> &'a mut Table {
        metadata
            .tables
            .iter_mut()
            .find(|table| table.name == name)
            .unwrap()
    }

    #[test]
    fn the_bundled_schema_parses_and_has_what_the_relay_writes() {
        let schema = Schema::bundled();
        let required = |table: &str, column: &str| {
            schema
                .table(table)
                .and_then(|t| t.columns.iter().find(|c| c.name == column))
                .is_some_and(|c| c.required)
        };
        assert!(required("users", "id_telegram"));
        assert!(required("users", "phone"));
        assert!(required("users", "mailboxes"));
        assert!(required("mailboxes", "last_uid"));
        assert!(required("mailboxes", "email"));
        assert!(required("t_chats", "id_telegram_chat"));
        assert!(required("t_chats", "is_locked"));
        assert!(required("t_chats", "mailboxes"));
        let mailboxes = schema.table_for(TableRole::Mailboxes).unwrap();
        for optional in [
            "imap_host",
            "imap_port",
            "imap_login",
            "imap_password",
            "imap_account",
            "folder",
            "allowed_senders",
            "disabled",
            "description",
            "webhook_token",
            "silent",
            "protect_content",
        ] {
            let spec = mailboxes
                .columns
                .iter()
                .find(|c| c.name == optional)
                .unwrap();
            assert!(!spec.required, "{optional}");
        }
        let port = mailboxes
            .columns
            .iter()
            .find(|c| c.name == "imap_port")
            .unwrap();
        assert_eq!(port.column_type, "number");
        let disabled = mailboxes
            .columns
            .iter()
            .find(|c| c.name == "disabled")
            .unwrap();
        assert_eq!(disabled.column_type, "checkbox");
    }

    #[test]
    fn a_complete_base_lacks_nothing() {
        assert_eq!(Schema::bundled().missing(&complete()), Vec::<String>::new());
    }

    #[test]
    fn an_old_base_without_the_option_columns_runs_with_those_features_off() {
        // `complete()` is a base from before issue 12: nothing required is missing.
        let mut metadata = complete();
        let schema = Schema::bundled();
        assert_eq!(schema.missing(&metadata), Vec::<String>::new());
        assert_eq!(
            schema.features_off(&metadata),
            [
                "table users has no column reports_filter: title filters are off",
                "table mailboxes has no column silent: silent reports are off",
                "table mailboxes has no column protect_content: protected reports are off",
                "table t_chats has no column topic: forum topics are off",
                "table t_chats has no column reports_filter: title filters are off",
            ]
        );
        let warning = features_off_warning(&schema.features_off(&metadata));
        assert!(warning.contains("schema apply"), "{warning}");
        table_mut(&mut metadata, "users").columns.push(column(
            "dddd",
            "reports_filter",
            "long-text",
        ));
        let mailboxes = table_mut(&mut metadata, "mailboxes");
        mailboxes.columns.push(column("iiii", "silent", "checkbox"));
        mailboxes
            .columns
            .push(column("jjjj", "protect_content", "checkbox"));
        let groups = table_mut(&mut metadata, "t_chats");
        groups.columns.push(column("dddd", "topic", "number"));
        groups
            .columns
            .push(column("eeee", "reports_filter", "text"));
        assert_eq!(schema.features_off(&metadata), Vec::<String>::new());
        assert_eq!(schema.missing(&metadata), Vec::<String>::new());
        // A feature column of a type the relay cannot read is a schema problem.
        table_mut(&mut metadata, "t_chats")
            .columns
            .iter_mut()
            .find(|c| c.name == "topic")
            .unwrap()
            .column_type = "checkbox".into();
        assert_eq!(
            schema.missing(&metadata),
            ["table t_chats column topic is of type checkbox, expected text"]
        );
    }

    #[test]
    fn missing_tables_and_required_columns_are_named() {
        let mut metadata = complete();
        metadata.tables.retain(|table| table.name != "t_chats");
        table_mut(&mut metadata, "users")
            .columns
            .retain(|c| c.name != "id_telegram");
        table_mut(&mut metadata, "mailboxes").columns.retain(|c| {
            // Removing t_chats removes the link columns pointing at it, as in SeaTable.
            !["last_uid", "imap_port", "description", "t_chats"].contains(&c.name.as_str())
        });
        assert_eq!(
            Schema::bundled().missing(&metadata),
            [
                "table users has no column id_telegram",
                "table mailboxes has no column last_uid",
                "table t_chats is missing",
            ]
        );
    }

    #[test]
    fn wrong_types_links_and_near_misses_are_named() {
        let mut metadata = complete();
        let groups = table_mut(&mut metadata, "t_chats");
        groups.columns[2].column_type = "text".to_owned(); // is_locked
        groups.columns[1].name = "ID_Telegram_Chat".to_owned();
        table_mut(&mut metadata, "mailboxes").columns[7].column_type = "text".to_owned(); // disabled
        let users = table_mut(&mut metadata, "users");
        users.columns[2].name = "boxes".to_owned(); // the link users.mailboxes, renamed
        assert_eq!(
            Schema::bundled().missing(&metadata),
            [
                "table users has no column mailboxes (column boxes links to mailboxes; rename it to mailboxes)",
                "table mailboxes column disabled is of type text, expected checkbox",
                "table t_chats has no column id_telegram_chat (there is a column ID_Telegram_Chat; names are case-sensitive)",
                "table t_chats column is_locked is of type text, expected checkbox",
            ]
        );

        let mut metadata = complete();
        // t_chats.mailboxes pointing at users instead.
        table_mut(&mut metadata, "t_chats").columns[3] =
            link("cccc", "mailboxes", "L3", "0002", "0000");
        assert_eq!(
            Schema::bundled().missing(&metadata),
            ["table t_chats column mailboxes links to users, expected mailboxes"]
        );
    }

    #[test]
    fn configured_table_names_apply_to_tables_and_links() {
        let names = TableNames {
            users: "people".to_owned(),
            mailboxes: "boxes".to_owned(),
            groups: "groups".to_owned(),
            deliveries: "deliveries".to_owned(),
        };
        let schema = Schema::bundled().with_table_names(&names);
        let table_names: Vec<&str> = schema.tables.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(table_names, ["people", "boxes", "groups"]);
        let link = |table: &str, column: &str| {
            schema
                .table(table)
                .unwrap()
                .columns
                .iter()
                .find(|c| c.name == column)
                .unwrap()
                .other_table
                .clone()
        };
        assert_eq!(link("people", "mailboxes").as_deref(), Some("boxes"));
        assert_eq!(link("boxes", "t_chats").as_deref(), Some("groups"));
        assert_eq!(link("groups", "mailboxes").as_deref(), Some("boxes"));

        let mut metadata = complete();
        for (old, new) in [
            ("users", "people"),
            ("mailboxes", "boxes"),
            ("t_chats", "groups"),
        ] {
            table_mut(&mut metadata, old).name = new.to_owned();
        }
        assert_eq!(schema.missing(&metadata), Vec::<String>::new());
        assert_eq!(
            Schema::bundled().missing(&metadata),
            [
                "table users is missing",
                "table mailboxes is missing",
                "table t_chats is missing"
            ]
        );
        // The defaults are the identity.
        assert_eq!(
            Schema::bundled().with_table_names(&TableNames::default()),
            Schema::bundled()
        );
    }

    #[test]
    fn malformed_schemas_are_rejected() {
        let ok = r#"{"tables":[
            {"role":"users","name":"u","columns":[{"name":"Name","type":"text"},
              {"name":"m","type":"link","other_table":"m"}]},
            {"role":"mailboxes","name":"m","columns":[{"name":"Name","type":"text"}]},
            {"role":"groups","name":"g","columns":[{"name":"Name","type":"text"}]}]}"#;
        assert!(Schema::from_json(ok).is_ok());
        let bad_link = ok.replace(r#""other_table":"m""#, r#""other_table":"x""#);
        assert!(
            Schema::from_json(&bad_link)
                .unwrap_err()
                .contains("a link needs")
        );
        let two_users = ok.replace(r#""role":"groups""#, r#""role":"users""#);
        assert!(Schema::from_json(&two_users).unwrap_err().contains("role"));
        let number_first = ok.replace(
            r#"[{"name":"Name","type":"text"}]}]}"#,
            r#"[{"name":"n","type":"number"}]}]}"#,
        );
        assert!(
            Schema::from_json(&number_first)
                .unwrap_err()
                .contains("first column")
        );
        assert!(Schema::from_json("{").is_err());
    }
}
