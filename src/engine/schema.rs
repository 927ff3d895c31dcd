//! Schema fingerprints and live-schema drift.
//!
//! After each step a runner applies (or reverts), it reads the schema the migrations
//! manage from the server's catalogs (tables, columns with type, nullability and default,
//! indexes, constraints, views, PostgreSQL enum types) and records it, normalized, in the
//! fingerprint table beside the history table (`<history>_fp`): a digest per step for the
//! audit trail, and the whole description for the newest one. `migrate drift` (and the
//! controller's periodic check) compares the live schema with that description, object by
//! object: what someone changed outside the migrations (a hotfix index, a dropped column)
//! is named precisely.
//!
//! schemagate's own tables (history, lease, fingerprints) are left out.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::dialect::{Backend, DbError, DbErrorKind, HistoryTable, sql};
use super::history::DbState;
use super::script::Dialect;

/// What kind of schema object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ObjectKind {
    Table,
    Column,
    Index,
    Constraint,
    View,
    Type,
}

impl ObjectKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ObjectKind::Table => "table",
            ObjectKind::Column => "column",
            ObjectKind::Index => "index",
            ObjectKind::Constraint => "constraint",
            ObjectKind::View => "view",
            ObjectKind::Type => "type",
        }
    }
}

/// One schema object, normalized: its kind, the table it belongs to (`schema.table` outside
/// the default schema), its name and its definition as the catalogs describe it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SchemaObject {
    pub kind: ObjectKind,
    /// The table (or view, or type) it is part of; for tables, views and types their own
    /// name.
    pub table: String,
    pub name: String,
    pub definition: String,
}

impl SchemaObject {
    /// How messages name it: `column users.email`, `index orders_total on orders`.
    pub fn label(&self) -> String {
        match self.kind {
            ObjectKind::Table | ObjectKind::View | ObjectKind::Type => {
                format!("{} {}", self.kind.as_str(), self.name)
            }
            ObjectKind::Column => format!("column {}.{}", self.table, self.name),
            ObjectKind::Index | ObjectKind::Constraint => {
                format!("{} {} on {}", self.kind.as_str(), self.name, self.table)
            }
        }
    }

    fn key(&self) -> (ObjectKind, &str, &str) {
        (self.kind, &self.table, &self.name)
    }
}

/// A normalized description of a schema.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub objects: Vec<SchemaObject>,
}

impl Fingerprint {
    fn new(mut objects: Vec<SchemaObject>) -> Self {
        objects.sort();
        objects.dedup();
        Fingerprint { objects }
    }

    /// SHA-256 (hex) of the description.
    pub fn digest(&self) -> String {
        let json = serde_json::to_string(&self.objects).unwrap_or_default();
        crate::model::digest::sha256_hex(json.as_bytes())
    }

    pub fn count(&self, kind: ObjectKind) -> usize {
        self.objects.iter().filter(|o| o.kind == kind).count()
    }
}

/// How the live schema differs from the recorded one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    /// In the live schema, created by no migration.
    Unexpected,
    /// Created by the migrations, gone from the live schema.
    Missing,
    /// In both, defined differently.
    Changed,
}

/// One difference.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Difference {
    pub change: Change,
    pub kind: ObjectKind,
    pub table: String,
    pub name: String,
    /// The definition the migrations left (missing, changed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected: Option<String>,
    /// The definition in the database now (unexpected, changed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub live: Option<String>,
    /// One line for people.
    pub message: String,
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Object by object: what the live schema has that the recorded one lacks, the reverse,
/// and what both have defined differently. Columns of a table that is missing (or
/// unexpected) as a whole are not listed again.
pub fn diff(expected: &Fingerprint, live: &Fingerprint) -> Vec<Difference> {
    let index = |f: &Fingerprint| -> BTreeMap<(ObjectKind, String, String), SchemaObject> {
        f.objects
            .iter()
            .map(|o| {
                let (k, t, n) = o.key();
                ((k, t.to_string(), n.to_string()), o.clone())
            })
            .collect()
    };
    let (want, have) = (index(expected), index(live));
    let tables = |m: &BTreeMap<(ObjectKind, String, String), SchemaObject>| -> Vec<String> {
        m.keys()
            .filter(|(k, _, _)| *k == ObjectKind::Table)
            .map(|(_, t, _)| t.clone())
            .collect()
    };
    let (want_tables, have_tables) = (tables(&want), tables(&have));
    let part_of =
        |o: &SchemaObject, gone: &[String]| o.kind != ObjectKind::Table && gone.contains(&o.table);
    let missing_tables: Vec<String> = want_tables
        .iter()
        .filter(|t| !have_tables.contains(t))
        .cloned()
        .collect();
    let new_tables: Vec<String> = have_tables
        .iter()
        .filter(|t| !want_tables.contains(t))
        .cloned()
        .collect();
    let mut out = Vec::new();
    for (key, w) in &want {
        match have.get(key) {
            None if part_of(w, &missing_tables) => {}
            None => out.push(Difference {
                change: Change::Missing,
                kind: w.kind,
                table: w.table.clone(),
                name: w.name.clone(),
                expected: Some(w.definition.clone()),
                live: None,
                message: format!(
                    "{} missing: the migrations created it ({})",
                    w.label(),
                    shown(&w.definition)
                ),
            }),
            Some(h) if h.definition != w.definition => out.push(Difference {
                change: Change::Changed,
                kind: w.kind,
                table: w.table.clone(),
                name: w.name.clone(),
                expected: Some(w.definition.clone()),
                live: Some(h.definition.clone()),
                message: format!(
                    "{} changed: the migrations left {}, the database has {}",
                    w.label(),
                    shown(&w.definition),
                    shown(&h.definition)
                ),
            }),
            Some(_) => {}
        }
    }
    for (key, h) in &have {
        if want.contains_key(key) || part_of(h, &new_tables) {
            continue;
        }
        out.push(Difference {
            change: Change::Unexpected,
            kind: h.kind,
            table: h.table.clone(),
            name: h.name.clone(),
            expected: None,
            live: Some(h.definition.clone()),
            message: format!(
                "{} exists but no migration created it ({})",
                h.label(),
                shown(&h.definition)
            ),
        });
    }
    out
}

fn shown(definition: &str) -> String {
    if definition.is_empty() {
        return "no definition".into();
    }
    super::runner::clip(definition, 200)
}

/// Whitespace runs become one space (views and index definitions as the server prints
/// them).
fn squeeze(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The fingerprint table that goes with a history table (`<name>_fp`).
pub fn fingerprint_table(history: &HistoryTable) -> HistoryTable {
    history.with_suffix("_fp")
}

/// schemagate's own tables, left out of every fingerprint.
fn own_tables(history: &HistoryTable) -> [String; 3] {
    [
        history.table_name().to_string(),
        history.lease_table().table_name().to_string(),
        fingerprint_table(history).table_name().to_string(),
    ]
}

/// Rows of a catalog query (an absent catalog reads as no rows).
async fn rows(db: &mut impl Backend, q: &str) -> Result<Vec<Vec<String>>, DbError> {
    Ok(db
        .query_text(q)
        .await?
        .unwrap_or_default()
        .into_iter()
        .map(|r| r.into_iter().map(Option::unwrap_or_default).collect())
        .collect())
}

fn col(r: &[String], i: usize) -> String {
    r.get(i).cloned().unwrap_or_default()
}

/// Reads the live schema of the database `db` is connected to.
pub async fn read_live(db: &mut impl Backend) -> Result<Fingerprint, DbError> {
    let own = own_tables(db.table());
    let mut objects = match db.dialect() {
        Dialect::Postgres => postgres(db).await?,
        Dialect::MySql => mysql(db).await?,
        Dialect::Sqlite => sqlite(db).await?,
    };
    objects.retain(|o| {
        let bare = o.table.rsplit('.').next().unwrap_or(&o.table);
        !own.iter().any(|t| t == bare)
    });
    Ok(Fingerprint::new(objects))
}

/// PostgreSQL, through pg_catalog: the schemas of the session's search path and the
/// history table's (not every schema of the database: where apps or tenants share one
/// database in schemas of their own, the others' changes are not this one's drift); names
/// outside `public` carry their schema.
async fn postgres(db: &mut impl Backend) -> Result<Vec<SchemaObject>, DbError> {
    let own_schema = db
        .table()
        .name()
        .rsplit_once('.')
        .map(|(s, _)| s.to_string())
        .unwrap_or_else(|| "public".into());
    let scope = format!(
        "(n.nspname = ANY (current_schemas(false)) OR n.nspname = {})",
        sql::literal(Dialect::Postgres, &own_schema)
    );
    let rels = format!(
        "SELECT c.oid, CASE WHEN n.nspname = 'public' THEN '' ELSE n.nspname || '.' END AS q, \
         c.relname::text AS relname, c.relkind::text AS relkind \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE {scope} \
         AND c.relkind IN ('r', 'p', 'v', 'm', 'f') \
         AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = c.oid AND d.deptype = 'e')"
    );
    let q = format!(
        "WITH rels AS ({rels}) \
         SELECT 'table', q || relname, q || relname, \
           CASE relkind WHEN 'p' THEN 'partitioned' WHEN 'f' THEN 'foreign' ELSE '' END \
           FROM rels WHERE relkind IN ('r', 'p', 'f') \
         UNION ALL \
         SELECT 'view', q || relname, q || relname, \
           CASE relkind WHEN 'm' THEN 'materialized ' ELSE '' END || pg_get_viewdef(oid, true) \
           FROM rels WHERE relkind IN ('v', 'm') \
         UNION ALL \
         SELECT 'column', q || r.relname, a.attname::text, \
           format_type(a.atttypid, a.atttypmod) \
           || CASE WHEN a.attnotnull THEN ' NOT NULL' ELSE ' NULL' END \
           || COALESCE(' DEFAULT ' || pg_get_expr(d.adbin, d.adrelid), '') \
           || CASE a.attidentity WHEN 'a' THEN ' GENERATED ALWAYS AS IDENTITY' \
                                 WHEN 'd' THEN ' GENERATED BY DEFAULT AS IDENTITY' ELSE '' END \
           FROM rels r JOIN pg_attribute a ON a.attrelid = r.oid AND a.attnum > 0 AND NOT a.attisdropped \
           LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
           WHERE r.relkind IN ('r', 'p', 'f') \
         UNION ALL \
         SELECT 'index', q || r.relname, ic.relname::text, pg_get_indexdef(i.indexrelid) \
           FROM rels r JOIN pg_index i ON i.indrelid = r.oid JOIN pg_class ic ON ic.oid = i.indexrelid \
           WHERE NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid \
                             AND k.conrelid = r.oid AND k.contype IN ('p', 'u', 'x')) \
         UNION ALL \
         SELECT 'constraint', q || r.relname, k.conname::text, pg_get_constraintdef(k.oid, true) \
           FROM rels r JOIN pg_constraint k ON k.conrelid = r.oid \
         UNION ALL \
         SELECT 'type', CASE WHEN n.nspname = 'public' THEN '' ELSE n.nspname || '.' END || t.typname, \
           CASE WHEN n.nspname = 'public' THEN '' ELSE n.nspname || '.' END || t.typname, \
           'enum (' || string_agg(quote_literal(e.enumlabel), ', ' ORDER BY e.enumsortorder) || ')' \
           FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace JOIN pg_enum e ON e.enumtypid = t.oid \
           WHERE {scope} AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = t.oid AND d.deptype = 'e') \
           GROUP BY n.nspname, t.typname"
    );
    let mut out = Vec::new();
    for r in rows(db, &q).await? {
        let kind = match col(&r, 0).as_str() {
            "table" => ObjectKind::Table,
            "view" => ObjectKind::View,
            "column" => ObjectKind::Column,
            "index" => ObjectKind::Index,
            "constraint" => ObjectKind::Constraint,
            _ => ObjectKind::Type,
        };
        out.push(SchemaObject {
            kind,
            table: col(&r, 1),
            name: col(&r, 2),
            definition: squeeze(&col(&r, 3)),
        });
    }
    Ok(out)
}

/// A foreign key, assembled from one catalog row per column.
struct ForeignKey {
    to: String,
    from: Vec<String>,
    to_cols: Vec<String>,
    /// SQLite: `<on update> <on delete>`.
    actions: String,
}

impl ForeignKey {
    fn to(table: String, actions: String) -> Self {
        ForeignKey {
            to: table,
            from: Vec::new(),
            to_cols: Vec::new(),
            actions,
        }
    }
}

/// MySQL and MariaDB: the connection's database, through information_schema (one query
/// per kind, assembled here: no GROUP_CONCAT length limit, no collation mix).
async fn mysql(db: &mut impl Backend) -> Result<Vec<SchemaObject>, DbError> {
    let mut out = Vec::new();
    for r in rows(
        db,
        "SELECT TABLE_NAME, TABLE_TYPE FROM information_schema.TABLES \
         WHERE TABLE_SCHEMA = DATABASE()",
    )
    .await?
    {
        if col(&r, 1) == "VIEW" {
            continue;
        }
        out.push(SchemaObject {
            kind: ObjectKind::Table,
            table: col(&r, 0),
            name: col(&r, 0),
            definition: String::new(),
        });
    }
    for r in rows(
        db,
        "SELECT TABLE_NAME, VIEW_DEFINITION FROM information_schema.VIEWS \
         WHERE TABLE_SCHEMA = DATABASE()",
    )
    .await?
    {
        out.push(SchemaObject {
            kind: ObjectKind::View,
            table: col(&r, 0),
            name: col(&r, 0),
            definition: squeeze(&col(&r, 1)),
        });
    }
    let tables: Vec<String> = out
        .iter()
        .filter(|o| o.kind == ObjectKind::Table)
        .map(|o| o.name.clone())
        .collect();
    for r in rows(
        db,
        "SELECT TABLE_NAME, COLUMN_NAME, COLUMN_TYPE, IS_NULLABLE, COLUMN_DEFAULT, EXTRA \
         FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE()",
    )
    .await?
    {
        if !tables.contains(&col(&r, 0)) {
            continue; // a view's column
        }
        let mut def = col(&r, 2);
        def.push_str(if col(&r, 3) == "YES" {
            " NULL"
        } else {
            " NOT NULL"
        });
        // MariaDB writes a NULL default as the text NULL; MySQL as a NULL.
        let default = r.get(4).cloned().unwrap_or_default();
        let null_default = default == "NULL" && col(&r, 3) == "YES";
        if !default.is_empty() && !null_default {
            def.push_str(&format!(" DEFAULT {default}"));
        }
        let extra = col(&r, 5);
        if !extra.is_empty() {
            def.push_str(&format!(" {}", extra.to_ascii_uppercase()));
        }
        out.push(SchemaObject {
            kind: ObjectKind::Column,
            table: col(&r, 0),
            name: col(&r, 1),
            definition: def,
        });
    }
    // Indexes: one row per column, in order.
    let mut indexes: BTreeMap<(String, String), (String, Vec<String>)> = BTreeMap::new();
    for r in rows(
        db,
        "SELECT TABLE_NAME, INDEX_NAME, CAST(NON_UNIQUE AS CHAR), INDEX_TYPE, COLUMN_NAME, \
         CAST(SUB_PART AS CHAR) FROM information_schema.STATISTICS \
         WHERE TABLE_SCHEMA = DATABASE() ORDER BY TABLE_NAME, INDEX_NAME, SEQ_IN_INDEX",
    )
    .await?
    {
        let head = format!(
            "{}{}",
            if col(&r, 2) == "0" { "UNIQUE " } else { "" },
            col(&r, 3)
        );
        let part = match col(&r, 5) {
            p if p.is_empty() => col(&r, 4),
            p => format!("{}({p})", col(&r, 4)),
        };
        indexes
            .entry((col(&r, 0), col(&r, 1)))
            .or_insert_with(|| (head, Vec::new()))
            .1
            .push(part);
    }
    for ((table, name), (head, cols)) in indexes {
        out.push(SchemaObject {
            kind: ObjectKind::Index,
            table,
            name,
            definition: format!("{head} ({})", cols.join(", ")),
        });
    }
    // Foreign keys, one row per column.
    let mut fks: BTreeMap<(String, String), ForeignKey> = BTreeMap::new();
    for r in rows(
        db,
        "SELECT TABLE_NAME, CONSTRAINT_NAME, REFERENCED_TABLE_NAME, COLUMN_NAME, \
         REFERENCED_COLUMN_NAME FROM information_schema.KEY_COLUMN_USAGE \
         WHERE TABLE_SCHEMA = DATABASE() AND REFERENCED_TABLE_NAME IS NOT NULL \
         ORDER BY TABLE_NAME, CONSTRAINT_NAME, ORDINAL_POSITION",
    )
    .await?
    {
        let e = fks
            .entry((col(&r, 0), col(&r, 1)))
            .or_insert_with(|| ForeignKey::to(col(&r, 2), String::new()));
        e.from.push(col(&r, 3));
        e.to_cols.push(col(&r, 4));
    }
    for (
        (table, name),
        ForeignKey {
            to,
            from: from_cols,
            to_cols,
            ..
        },
    ) in fks
    {
        out.push(SchemaObject {
            kind: ObjectKind::Constraint,
            table,
            name,
            definition: format!(
                "FOREIGN KEY ({}) REFERENCES {to} ({})",
                from_cols.join(", "),
                to_cols.join(", ")
            ),
        });
    }
    // CHECK constraints: MariaDB lists their table; MySQL 8 through TABLE_CONSTRAINTS.
    let checks = match rows(
        db,
        "SELECT TABLE_NAME, CONSTRAINT_NAME, CHECK_CLAUSE FROM information_schema.CHECK_CONSTRAINTS \
         WHERE CONSTRAINT_SCHEMA = DATABASE()",
    )
    .await
    {
        Ok(r) => r,
        Err(_) => rows(
            db,
            "SELECT t.TABLE_NAME, c.CONSTRAINT_NAME, c.CHECK_CLAUSE \
             FROM information_schema.CHECK_CONSTRAINTS c \
             JOIN information_schema.TABLE_CONSTRAINTS t ON t.CONSTRAINT_SCHEMA = c.CONSTRAINT_SCHEMA \
             AND t.CONSTRAINT_NAME = c.CONSTRAINT_NAME AND t.CONSTRAINT_TYPE = 'CHECK' \
             WHERE c.CONSTRAINT_SCHEMA = DATABASE()",
        )
        .await
        .unwrap_or_default(),
    };
    for r in checks {
        out.push(SchemaObject {
            kind: ObjectKind::Constraint,
            table: col(&r, 0),
            name: col(&r, 1),
            definition: format!("CHECK ({})", squeeze(&col(&r, 2))),
        });
    }
    Ok(out)
}

/// SQLite: the main database, through sqlite_schema and the table-valued pragmas. CHECK
/// constraints are not exposed by SQLite apart from the table's text, and are not compared.
async fn sqlite(db: &mut impl Backend) -> Result<Vec<SchemaObject>, DbError> {
    let mut out = Vec::new();
    for r in rows(
        db,
        "SELECT type, name, sql FROM sqlite_schema \
         WHERE type IN ('table', 'view') AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\'",
    )
    .await?
    {
        let view = col(&r, 0) == "view";
        out.push(SchemaObject {
            kind: if view {
                ObjectKind::View
            } else {
                ObjectKind::Table
            },
            table: col(&r, 1),
            name: col(&r, 1),
            definition: if view {
                squeeze(&col(&r, 2))
            } else {
                String::new()
            },
        });
    }
    for r in rows(
        db,
        "SELECT m.name, p.name, p.type, CAST(p.\"notnull\" AS TEXT), p.dflt_value, CAST(p.pk AS TEXT) \
         FROM sqlite_schema m JOIN pragma_table_info(m.name) p \
         WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY m.name, p.cid",
    )
    .await?
    {
        let mut def = col(&r, 2);
        def.push_str(if col(&r, 3) == "1" {
            " NOT NULL"
        } else {
            " NULL"
        });
        if let Some(d) = r.get(4).filter(|d| !d.is_empty()) {
            def.push_str(&format!(" DEFAULT {d}"));
        }
        if col(&r, 5) != "0" {
            def.push_str(&format!(" PRIMARY KEY {}", col(&r, 5)));
        }
        out.push(SchemaObject {
            kind: ObjectKind::Column,
            table: col(&r, 0),
            name: col(&r, 1),
            definition: def,
        });
    }
    let mut indexes: BTreeMap<(String, String), (String, Vec<String>)> = BTreeMap::new();
    for r in rows(
        db,
        "SELECT m.name, il.name, CAST(il.\"unique\" AS TEXT), il.origin, s.sql, ii.name \
         FROM sqlite_schema m JOIN pragma_index_list(m.name) il \
         JOIN pragma_index_info(il.name) ii \
         LEFT JOIN sqlite_schema s ON s.type = 'index' AND s.name = il.name \
         WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite\\_%' ESCAPE '\\' \
         ORDER BY m.name, il.name, ii.seqno",
    )
    .await?
    {
        let head = match (col(&r, 4), col(&r, 3).as_str()) {
            (sql, _) if !sql.is_empty() => squeeze(&sql),
            (_, "pk") => "PRIMARY KEY".into(),
            _ if col(&r, 2) == "1" => "UNIQUE".into(),
            _ => "INDEX".into(),
        };
        indexes
            .entry((col(&r, 0), col(&r, 1)))
            .or_insert_with(|| (head, Vec::new()))
            .1
            .push(col(&r, 5));
    }
    for ((table, name), (head, cols)) in indexes {
        // Indexes written with CREATE INDEX are described by their text; the automatic ones
        // of UNIQUE and PRIMARY KEY by their columns (their names are numbered by position).
        let (name, definition) = if name.starts_with("sqlite_autoindex_") {
            (
                format!("{} ({})", head.to_ascii_lowercase(), cols.join(", ")),
                format!("{head} ({})", cols.join(", ")),
            )
        } else {
            (name, head)
        };
        out.push(SchemaObject {
            kind: ObjectKind::Index,
            table,
            name,
            definition,
        });
    }
    let mut fks: BTreeMap<(String, String), ForeignKey> = BTreeMap::new();
    for r in rows(
        db,
        "SELECT m.name, CAST(f.id AS TEXT), f.\"table\", f.\"from\", f.\"to\", \
         f.on_update || ' ' || f.on_delete \
         FROM sqlite_schema m JOIN pragma_foreign_key_list(m.name) f \
         WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite\\_%' ESCAPE '\\' \
         ORDER BY m.name, f.id, f.seq",
    )
    .await?
    {
        let e = fks
            .entry((col(&r, 0), col(&r, 1)))
            .or_insert_with(|| ForeignKey::to(col(&r, 2), col(&r, 5)));
        e.from.push(col(&r, 3));
        e.to_cols.push(col(&r, 4));
    }
    for (
        (table, _),
        ForeignKey {
            to,
            from: from_cols,
            to_cols,
            actions,
        },
    ) in fks
    {
        let (update, delete) = actions.split_once(' ').unwrap_or(("", ""));
        out.push(SchemaObject {
            kind: ObjectKind::Constraint,
            table,
            // SQLite does not keep constraint names: the columns name it.
            name: format!("foreign key ({})", from_cols.join(", ")),
            definition: format!(
                "REFERENCES {to} ({}) ON UPDATE {update} ON DELETE {delete}",
                to_cols.join(", ")
            ),
        });
    }
    Ok(out)
}

/// A recorded fingerprint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Recorded {
    /// The version the database was at (empty: none applied).
    pub version: String,
    pub digest: String,
    pub recorded_at: String,
    pub recorded_by: String,
    pub note: Option<String>,
    #[serde(skip)]
    pub fingerprint: Fingerprint,
}

/// `CREATE TABLE` for the fingerprint table.
fn create_table(d: Dialect, t: &HistoryTable) -> String {
    let (id, text, long, ts) = match d {
        Dialect::Postgres => (
            "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
            "TEXT",
            "TEXT",
            "TIMESTAMPTZ NOT NULL DEFAULT now()",
        ),
        Dialect::MySql => (
            "BIGINT AUTO_INCREMENT PRIMARY KEY",
            "VARCHAR(255)",
            "LONGTEXT",
            "TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3)",
        ),
        Dialect::Sqlite => (
            "INTEGER PRIMARY KEY AUTOINCREMENT",
            "TEXT",
            "TEXT",
            "TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))",
        ),
    };
    format!(
        "CREATE TABLE IF NOT EXISTS {} (id {id}, version {text} NOT NULL, digest {text} NOT NULL, \
         objects {long}, recorded_by {text} NOT NULL, recorded_at {ts}, note TEXT)",
        t.quoted(d)
    )
}

/// Records `fp` as the schema at `version` (`None`: no version applied), by `by`: its
/// digest, and with `whole` its description, which then becomes the only one kept (older
/// rows keep their digest: the audit trail of how the schema moved).
pub async fn record(
    db: &mut impl Backend,
    version: Option<&str>,
    fp: &Fingerprint,
    by: &str,
    note: Option<&str>,
    whole: bool,
) -> Result<String, DbError> {
    let d = db.dialect();
    let t = fingerprint_table(db.table());
    let digest = fp.digest();
    let objects = if whole {
        sql::literal(d, &serde_json::to_string(&fp.objects).unwrap_or_default())
    } else {
        "NULL".into()
    };
    let insert = format!(
        "INSERT INTO {} (version, digest, objects, recorded_by, note) VALUES ({}, {}, {objects}, {}, {})",
        t.quoted(d),
        sql::literal(d, version.unwrap_or_default()),
        sql::literal(d, &digest),
        sql::literal(d, by),
        note.map(|n| sql::literal(d, n))
            .unwrap_or_else(|| "NULL".into())
    );
    let statements = if whole {
        vec![
            create_table(d, &t),
            sql::begin(d).to_string(),
            format!(
                "UPDATE {} SET objects = NULL WHERE objects IS NOT NULL",
                t.quoted(d)
            ),
            insert,
            sql::COMMIT.to_string(),
        ]
    } else {
        vec![create_table(d, &t), insert]
    };
    for s in &statements {
        if let Err(f) = db.send(s).await {
            let _ = db.send(sql::ROLLBACK).await;
            return Err(f.error);
        }
    }
    Ok(digest)
}

/// Reads the live schema and records it for `version` (see [`record`]).
pub async fn record_live(
    db: &mut impl Backend,
    version: Option<&str>,
    by: &str,
    note: Option<&str>,
) -> Result<String, DbError> {
    let fp = read_live(db).await?;
    record(db, version, &fp, by, note, true).await
}

/// The newest recorded fingerprint, if any.
pub async fn newest(db: &mut impl Backend) -> Result<Option<Recorded>, DbError> {
    let d = db.dialect();
    let t = fingerprint_table(db.table());
    let ts = match d {
        Dialect::Postgres => {
            "to_char(recorded_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"
        }
        Dialect::Sqlite => "recorded_at",
        Dialect::MySql => "DATE_FORMAT(recorded_at, '%Y-%m-%dT%H:%i:%s.%fZ')",
    };
    let q = format!(
        "SELECT version, digest, objects, recorded_by, {ts}, note FROM {} \
         WHERE objects IS NOT NULL ORDER BY id DESC LIMIT 1",
        t.quoted(d)
    );
    let Some(rows) = db.query_text(&q).await? else {
        return Ok(None);
    };
    let Some(r) = rows.into_iter().next() else {
        return Ok(None);
    };
    let get = |i: usize| r.get(i).cloned().flatten().unwrap_or_default();
    let objects: Vec<SchemaObject> = serde_json::from_str(&get(2)).map_err(|e| {
        DbError::new(
            DbErrorKind::Other,
            format!(
                "the recorded fingerprint in {} cannot be read ({e}); record the live schema \
                 again with `schemagate migrate drift --accept`",
                t.name()
            ),
        )
    })?;
    Ok(Some(Recorded {
        version: get(0),
        digest: get(1),
        recorded_by: get(3),
        recorded_at: get(4),
        note: r.get(5).cloned().flatten(),
        fingerprint: Fingerprint::new(objects),
    }))
}

/// What a drift check found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(
    rename_all = "camelCase",
    rename_all_fields = "camelCase",
    tag = "result"
)]
pub enum DriftCheck {
    /// The live schema is what the migrations left.
    Clean {
        version: Option<String>,
        digest: String,
        recorded_at: String,
    },
    /// It differs.
    Drifted {
        version: Option<String>,
        recorded_at: String,
        recorded_by: String,
        expected_digest: String,
        live_digest: String,
        differences: Vec<Difference>,
    },
    /// Nothing to compare with: no fingerprint was recorded at the current version (the
    /// database was migrated before schemagate recorded them, or adopted by stamp/import,
    /// or the runner stopped right after a step).
    NoBaseline {
        version: Option<String>,
        recorded_version: Option<String>,
    },
    /// A step is unfinished or a migration ran meanwhile: the schema is in motion.
    Busy { reason: String },
}

impl DriftCheck {
    /// One line for people.
    pub fn summary(&self) -> String {
        let at = |v: &Option<String>| {
            v.as_deref()
                .map(|v| format!("version {v}"))
                .unwrap_or_else(|| "no version".into())
        };
        match self {
            DriftCheck::Clean { version, .. } => format!(
                "no drift: the live schema is what the migrations left at {}",
                at(version)
            ),
            DriftCheck::Drifted {
                version,
                differences,
                ..
            } => {
                let first: Vec<&str> = differences
                    .iter()
                    .take(3)
                    .map(|d| d.message.as_str())
                    .collect();
                format!(
                    "the live schema differs from what the migrations left at {} in {} \
                     object(s): {}{}",
                    at(version),
                    differences.len(),
                    first.join("; "),
                    if differences.len() > 3 { "; ..." } else { "" }
                )
            }
            DriftCheck::NoBaseline {
                version,
                recorded_version,
            } => format!(
                "cannot tell: no schema fingerprint is recorded at {}{}; `schemagate migrate \
                 drift --accept` records the live schema as the expected one",
                at(version),
                match recorded_version {
                    Some(r) if !r.is_empty() => format!(" (the newest is for version {r})"),
                    _ => String::new(),
                }
            ),
            DriftCheck::Busy { reason } => format!("not checked: {reason}"),
        }
    }
}

/// Compares the live schema with the one recorded at the database's current version.
/// `state` is the history read before; it is read again after the live schema, and a
/// change in between (a migration ran) makes the result `Busy` rather than a false drift.
pub async fn check(db: &mut impl Backend, state: &DbState) -> Result<DriftCheck, DbError> {
    if let Some(u) = &state.unfinished {
        return Ok(DriftCheck::Busy {
            reason: format!(
                "step {} has no outcome yet (running, or unfinished): the schema is in motion",
                u.version
            ),
        });
    }
    let version = state.current().map(|v| v.to_string());
    let want = version.clone().unwrap_or_default();
    let recorded = match newest(db).await? {
        Some(r) if r.version == want => r,
        other => {
            return Ok(DriftCheck::NoBaseline {
                version,
                recorded_version: other.map(|r| r.version),
            });
        }
    };
    let live = read_live(db).await?;
    let after = super::runner::read_state(db)
        .await
        .map_err(|e| DbError::new(DbErrorKind::Other, e.to_string()))?;
    if &after != state {
        return Ok(DriftCheck::Busy {
            reason: "a migration ran during the check; check again".into(),
        });
    }
    let differences = diff(&recorded.fingerprint, &live);
    if differences.is_empty() {
        return Ok(DriftCheck::Clean {
            version,
            digest: recorded.digest,
            recorded_at: recorded.recorded_at,
        });
    }
    Ok(DriftCheck::Drifted {
        version,
        recorded_at: recorded.recorded_at,
        recorded_by: recorded.recorded_by,
        expected_digest: recorded.digest,
        live_digest: live.digest(),
        differences,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(kind: ObjectKind, table: &str, name: &str, def: &str) -> SchemaObject {
        SchemaObject {
            kind,
            table: table.into(),
            name: name.into(),
            definition: def.into(),
        }
    }

    #[test]
    fn differences_name_each_object() {
        let expected = Fingerprint::new(vec![
            obj(ObjectKind::Table, "users", "users", ""),
            obj(ObjectKind::Column, "users", "id", "integer NOT NULL"),
            obj(ObjectKind::Column, "users", "email", "text NULL"),
            obj(ObjectKind::Column, "users", "name", "text NULL"),
            obj(ObjectKind::Table, "gone", "gone", ""),
            obj(ObjectKind::Column, "gone", "id", "integer NULL"),
        ]);
        let live = Fingerprint::new(vec![
            obj(ObjectKind::Table, "users", "users", ""),
            obj(ObjectKind::Column, "users", "id", "integer NOT NULL"),
            obj(
                ObjectKind::Column,
                "users",
                "name",
                "character varying(20) NULL",
            ),
            obj(
                ObjectKind::Index,
                "orders",
                "orders_total",
                "CREATE INDEX orders_total ON public.orders USING btree (total)",
            ),
        ]);
        let d = diff(&expected, &live);
        let messages: Vec<&str> = d.iter().map(|d| d.message.as_str()).collect();
        assert_eq!(d.len(), 4, "{messages:#?}");
        assert!(
            messages.contains(&"column users.email missing: the migrations created it (text NULL)")
        );
        assert!(
            messages.contains(&"table gone missing: the migrations created it (no definition)")
        );
        assert!(messages.iter().any(|m| m.starts_with(
            "column users.name changed: the migrations left text NULL, the database has character varying(20) NULL"
        )));
        assert!(messages.iter().any(|m| {
            m.starts_with("index orders_total on orders exists but no migration created it")
        }));
        assert!(diff(&expected, &expected).is_empty());
    }

    #[test]
    fn digests_do_not_depend_on_catalog_order() {
        let a = Fingerprint::new(vec![
            obj(ObjectKind::Table, "a", "a", ""),
            obj(ObjectKind::Table, "b", "b", ""),
        ]);
        let b = Fingerprint::new(vec![
            obj(ObjectKind::Table, "b", "b", ""),
            obj(ObjectKind::Table, "a", "a", ""),
        ]);
        assert_eq!(a.digest(), b.digest());
    }
}
