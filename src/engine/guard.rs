//! The destructive-change guard: which statements of a migration lose data.
//!
//! Statements are read with a real SQL parser (`sqlparser`), per dialect, so a comment or
//! a string that merely contains `DROP TABLE` is not flagged. What the parser cannot read
//! is checked by its leading keywords (the splitter already skipped comments and quotes).
//! Flagged: `DROP TABLE`/`SCHEMA`/`DATABASE`, `DROP COLUMN`, `DROP PARTITION`, `TRUNCATE`,
//! `DELETE` or `UPDATE` without `WHERE`, and column type changes that narrow the column,
//! where the current type can be read from the database.

use serde::Serialize;
use sqlparser::ast::{
    AlterColumnOperation, AlterTableOperation, ObjectName, ObjectNamePart, ObjectType,
    Statement as Ast,
};
use sqlparser::dialect::{Dialect as SqlDialect, MySqlDialect, PostgreSqlDialect, SQLiteDialect};
use sqlparser::parser::Parser;

use super::script::{Dialect, Statement, excerpt};

/// What kind of data loss a statement causes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Loss {
    DropTable,
    /// `CREATE OR REPLACE TABLE` (MariaDB): the old table and its rows go.
    ReplaceTable,
    DropSchema,
    DropDatabase,
    DropColumn,
    DropPartition,
    Truncate,
    DeleteWithoutWhere,
    UpdateWithoutWhere,
    NarrowingTypeChange,
    /// `DROP TYPE/DOMAIN/EXTENSION ... CASCADE` drops the columns that use it.
    DropCascade,
}

impl Loss {
    pub fn describe(self) -> &'static str {
        match self {
            Loss::DropTable => "drops a table",
            Loss::ReplaceTable => "replaces a table (CREATE OR REPLACE drops the old one)",
            Loss::DropCascade => "drops with CASCADE (dependent columns go too)",
            Loss::DropSchema => "drops a schema",
            Loss::DropDatabase => "drops a database",
            Loss::DropColumn => "drops a column",
            Loss::DropPartition => "drops a partition",
            Loss::Truncate => "truncates a table",
            Loss::DeleteWithoutWhere => "deletes every row (DELETE without WHERE)",
            Loss::UpdateWithoutWhere => "overwrites every row (UPDATE without WHERE)",
            Loss::NarrowingTypeChange => "narrows a column's type",
        }
    }
}

/// A statement that loses data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Finding {
    /// 1-based number of the statement in its script.
    pub statement_number: usize,
    /// Line of the statement in its file.
    pub line: usize,
    pub loss: Loss,
    pub statement: String,
    /// What was compared, for type changes; "keywords" when the parser could not read it.
    pub detail: Option<String>,
}

/// A column type change whose effect depends on the column's current type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TypeChange {
    pub statement_number: usize,
    pub line: usize,
    pub statement: String,
    /// Schema (when written) and table, unquoted.
    pub table: Vec<String>,
    pub column: String,
    /// The new type as the statement writes it, e.g. `VARCHAR(20)`.
    pub new_type: String,
}

/// What the parser found in a script.
#[derive(Clone, Debug, Default)]
pub struct Analysis {
    pub findings: Vec<Finding>,
    /// Type changes to compare with the database's current column types.
    pub type_changes: Vec<TypeChange>,
}

fn parser_dialect(d: Dialect) -> Box<dyn SqlDialect> {
    match d {
        Dialect::Postgres => Box::new(PostgreSqlDialect {}),
        Dialect::MySql => Box::new(MySqlDialect {}),
        Dialect::Sqlite => Box::new(SQLiteDialect {}),
    }
}

/// An identifier as the database stores it: PostgreSQL folds unquoted names to lower case.
fn ident(i: &sqlparser::ast::Ident, d: Dialect) -> String {
    if d == Dialect::Postgres && i.quote_style.is_none() {
        i.value.to_lowercase()
    } else {
        i.value.clone()
    }
}

fn name_parts(n: &ObjectName, d: Dialect) -> Vec<String> {
    n.0.iter()
        .map(|p| match p {
            ObjectNamePart::Identifier(i) => ident(i, d),
            other => other.to_string(),
        })
        .collect()
}

/// Finds the data-losing statements of a script (`first_line`: the file line where the
/// script starts).
pub fn analyse(sql: &str, statements: &[Statement], d: Dialect, first_line: usize) -> Analysis {
    let dialect = parser_dialect(d);
    let mut out = Analysis::default();
    for (i, st) in statements.iter().enumerate() {
        let text = st.text(sql);
        let line = st.line + first_line - 1;
        let finding = |loss: Loss, detail: Option<String>| Finding {
            statement_number: i + 1,
            line,
            loss,
            statement: excerpt(text, 100),
            detail,
        };
        match Parser::parse_sql(dialect.as_ref(), text) {
            Ok(asts) => {
                for ast in &asts {
                    classify(
                        ast,
                        d,
                        &mut |loss| out.findings.push(finding(loss, None)),
                        &mut |table, column, new_type| {
                            out.type_changes.push(TypeChange {
                                statement_number: i + 1,
                                line,
                                statement: excerpt(text, 100),
                                table,
                                column,
                                new_type,
                            })
                        },
                    );
                }
            }
            Err(_) => {
                if let Some(loss) = by_keywords(&st.words) {
                    out.findings.push(finding(
                        loss,
                        Some(
                            "found by its keywords: the parser could not read this statement"
                                .into(),
                        ),
                    ));
                }
            }
        }
    }
    out
}

fn classify(
    ast: &Ast,
    d: Dialect,
    flag: &mut dyn FnMut(Loss),
    type_change: &mut dyn FnMut(Vec<String>, String, String),
) {
    match ast {
        Ast::Drop {
            object_type,
            cascade,
            ..
        } => match object_type {
            ObjectType::Table => flag(Loss::DropTable),
            ObjectType::Schema => flag(Loss::DropSchema),
            ObjectType::Database => flag(Loss::DropDatabase),
            ObjectType::Type if *cascade => flag(Loss::DropCascade),
            _ => {}
        },
        Ast::DropDomain(dd)
            if matches!(
                dd.drop_behavior,
                Some(sqlparser::ast::DropBehavior::Cascade)
            ) =>
        {
            flag(Loss::DropCascade)
        }
        Ast::DropExtension(de)
            if matches!(
                de.cascade_or_restrict,
                Some(sqlparser::ast::ReferentialAction::Cascade)
            ) =>
        {
            flag(Loss::DropCascade)
        }
        Ast::CreateTable(ct) if ct.or_replace => flag(Loss::ReplaceTable),
        Ast::Truncate(_) => flag(Loss::Truncate),
        Ast::Delete(del) if del.selection.is_none() => flag(Loss::DeleteWithoutWhere),
        Ast::Update(up) if up.selection.is_none() => flag(Loss::UpdateWithoutWhere),
        Ast::AlterTable(alter) => {
            let table = name_parts(&alter.name, d);
            for op in &alter.operations {
                match op {
                    AlterTableOperation::DropColumn { .. } => flag(Loss::DropColumn),
                    AlterTableOperation::DropPartitions { .. } => flag(Loss::DropPartition),
                    AlterTableOperation::AlterColumn {
                        column_name,
                        op: AlterColumnOperation::SetDataType { data_type, .. },
                    } => type_change(table.clone(), ident(column_name, d), data_type.to_string()),
                    AlterTableOperation::ModifyColumn {
                        col_name,
                        data_type,
                        ..
                    } => type_change(table.clone(), ident(col_name, d), data_type.to_string()),
                    AlterTableOperation::ChangeColumn {
                        old_name,
                        data_type,
                        ..
                    } => type_change(table.clone(), ident(old_name, d), data_type.to_string()),
                    _ => {}
                }
            }
        }
        _ => {}
    }
}

/// The fallback for statements the parser cannot read: leading keywords only.
fn by_keywords(words: &[String]) -> Option<Loss> {
    let w: Vec<&str> = words.iter().map(String::as_str).collect();
    match w.as_slice() {
        ["DROP", "TABLE", ..] => Some(Loss::DropTable),
        ["DROP", "TEMPORARY", "TABLE", ..] => Some(Loss::DropTable),
        ["DROP", "SCHEMA", ..] => Some(Loss::DropSchema),
        ["DROP", "DATABASE", ..] => Some(Loss::DropDatabase),
        ["TRUNCATE", ..] => Some(Loss::Truncate),
        ["CREATE", "OR", "REPLACE", "TABLE", ..] => Some(Loss::ReplaceTable),
        ["ALTER", "TABLE", _, "DROP", "COLUMN", ..] => Some(Loss::DropColumn),
        ["ALTER", "TABLE", _, "DROP", "PARTITION", ..] => Some(Loss::DropPartition),
        ["ALTER", "TABLE", _, "TRUNCATE", "PARTITION", ..] => Some(Loss::Truncate),
        _ => None,
    }
}

/// A column type, as far as narrowing is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ColumnType {
    /// The type's name, lower-case, as the database reports it (`character varying`,
    /// `varchar`, `integer`, `numeric`, ...).
    pub name: String,
    /// Character length, or numeric precision.
    pub length: Option<i64>,
    pub scale: Option<i64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    Text,
    Integer,
    Exact,
    Float,
    Temporal,
    Other,
}

struct Shape {
    family: Family,
    /// Text: length (None = unbounded); integer/float: bytes; exact: precision;
    /// temporal: 1 date, 2 timestamp.
    size: Option<i64>,
    scale: Option<i64>,
}

fn shape(d: Dialect, name: &str, length: Option<i64>, scale: Option<i64>) -> Shape {
    let n = name.trim().to_ascii_lowercase();
    let n = n.trim_end_matches(" unsigned");
    let mysql = d == Dialect::MySql;
    let (family, size) = match n {
        "varchar" | "character varying" | "char" | "character" | "bpchar" | "nvarchar"
        | "nchar" | "varchar2" => (Family::Text, length),
        // MySQL's TEXT types are bounded (bytes); PostgreSQL's text is not.
        "text" if mysql => (Family::Text, Some(65_535)),
        "text" | "longtext" | "clob" | "string" => (Family::Text, None),
        "tinytext" => (Family::Text, Some(255)),
        "mediumtext" => (Family::Text, Some(16_777_215)),
        "tinyint" => (Family::Integer, Some(1)),
        "smallint" | "int2" | "smallserial" => (Family::Integer, Some(2)),
        "mediumint" => (Family::Integer, Some(3)),
        "int" | "integer" | "int4" | "serial" => (Family::Integer, Some(4)),
        "bigint" | "int8" | "bigserial" => (Family::Integer, Some(8)),
        "numeric" | "decimal" => (Family::Exact, length),
        "real" | "float4" => (Family::Float, Some(4)),
        "double" | "double precision" | "float8" | "float" => (Family::Float, Some(8)),
        "date" => (Family::Temporal, Some(1)),
        n if n.starts_with("timestamp") || n == "datetime" => (Family::Temporal, Some(2)),
        _ => (Family::Other, None),
    };
    Shape {
        family,
        size,
        scale,
    }
}

/// Splits `VARCHAR(20)` / `NUMERIC(10,2) UNSIGNED` into a name and its arguments.
fn parse_written(t: &str) -> (String, Option<i64>, Option<i64>) {
    let (name, args) = match t.split_once('(') {
        Some((n, rest)) => (n, rest.split(')').next().unwrap_or_default()),
        None => (t, ""),
    };
    let mut nums = args.split(',').map(|a| a.trim().parse::<i64>().ok());
    (
        name.trim().to_string(),
        nums.next().flatten(),
        nums.next().flatten(),
    )
}

/// Whether changing a column from `old` to the type written as `new` can lose data, and
/// why. `None`: it widens or keeps the column.
pub fn narrowing(d: Dialect, old: &ColumnType, new: &str) -> Option<String> {
    let (new_name, new_len, new_scale) = parse_written(new);
    let (old_name, _, _) = parse_written(&old.name);
    let o = shape(d, &old_name, old.length, old.scale);
    let n = shape(d, &new_name, new_len, new_scale);
    let old_text = match (old.length, old.scale) {
        (Some(l), Some(s)) if s > 0 => format!("{}({l},{s})", old.name),
        (Some(l), _) => format!("{}({l})", old.name),
        _ => old.name.clone(),
    };
    let why = |what: &str| Some(format!("{old_text} -> {new}: {what}"));
    match (o.family, n.family) {
        (Family::Text, Family::Text) => match (o.size, n.size) {
            (None, Some(_)) => why("an unbounded string becomes bounded"),
            (Some(a), Some(b)) if b < a => why("shorter strings"),
            _ => None,
        },
        (Family::Integer, Family::Integer) | (Family::Float, Family::Float) => {
            match (o.size, n.size) {
                (Some(a), Some(b)) if b < a => why("a smaller range"),
                _ => None,
            }
        }
        (Family::Exact, Family::Exact) => {
            let fewer_digits = matches!((o.size, n.size), (Some(a), Some(b)) if b < a)
                || (o.size.is_none() && n.size.is_some());
            let fewer_decimals = o.scale.unwrap_or(0) > n.scale.unwrap_or(0);
            (fewer_digits || fewer_decimals).then(|| format!("{old_text} -> {new}: fewer digits"))
        }
        (Family::Temporal, Family::Temporal) => match (o.size, n.size) {
            (Some(a), Some(b)) if b < a => why("the time of day is dropped"),
            _ => None,
        },
        (Family::Exact | Family::Float, Family::Integer) => why("fractions are dropped"),
        (Family::Float, Family::Exact) => why("values are rounded"),
        (Family::Other, _) | (_, Family::Other) if o.family == n.family => None,
        (from, Family::Text) if from != Family::Text => match n.size {
            Some(_) => why("values are converted to bounded strings"),
            None => None,
        },
        (Family::Text, _) => why("strings are converted (and may fail or lose text)"),
        _ => why("a conversion between unrelated types"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::script::split;

    fn losses(sql: &str, d: Dialect) -> Vec<Loss> {
        let st = split(sql, d);
        analyse(sql, &st, d, 1)
            .findings
            .iter()
            .map(|f| f.loss)
            .collect()
    }

    #[test]
    fn each_statement_kind_is_flagged_per_dialect() {
        for d in [Dialect::Postgres, Dialect::MySql, Dialect::Sqlite] {
            assert_eq!(losses("DROP TABLE users;", d), [Loss::DropTable], "{d:?}");
            assert_eq!(
                losses("ALTER TABLE users DROP COLUMN email;", d),
                [Loss::DropColumn],
                "{d:?}"
            );
            assert_eq!(
                losses("DELETE FROM users;", d),
                [Loss::DeleteWithoutWhere],
                "{d:?}"
            );
            assert_eq!(
                losses("UPDATE users SET name = 'x';", d),
                [Loss::UpdateWithoutWhere],
                "{d:?}"
            );
            assert!(
                losses("DELETE FROM users WHERE id = 1;", d).is_empty(),
                "{d:?}"
            );
            assert!(
                losses("UPDATE users SET name = 'x' WHERE id = 1;", d).is_empty(),
                "{d:?}"
            );
            assert!(
                losses("CREATE TABLE users (id INTEGER);", d).is_empty(),
                "{d:?}"
            );
            assert!(losses("DROP INDEX users_name;", d).is_empty() || d == Dialect::MySql);
        }
        for d in [Dialect::Postgres, Dialect::MySql] {
            assert_eq!(
                losses("TRUNCATE TABLE users;", d),
                [Loss::Truncate],
                "{d:?}"
            );
            assert_eq!(losses("DROP SCHEMA app;", d), [Loss::DropSchema], "{d:?}");
        }
        assert_eq!(
            losses("DROP DATABASE app;", Dialect::MySql),
            [Loss::DropDatabase]
        );
        assert_eq!(
            losses(
                "ALTER TABLE t DROP COLUMN a, DROP COLUMN b;",
                Dialect::Postgres
            ),
            [Loss::DropColumn, Loss::DropColumn]
        );
    }

    #[test]
    fn words_in_comments_and_strings_are_not_statements() {
        let sql = "-- DROP TABLE users;\n/* TRUNCATE users; */\nINSERT INTO log (msg) VALUES ('DROP TABLE users; DELETE FROM users');\n\
                   CREATE TABLE notes (body TEXT DEFAULT 'truncate me');";
        for d in [Dialect::Postgres, Dialect::MySql, Dialect::Sqlite] {
            assert!(losses(sql, d).is_empty(), "{d:?}");
        }
    }

    #[test]
    fn unparseable_statements_fall_back_to_keywords() {
        // A statement sqlparser does not know, starting with DROP TABLE.
        let sql = "DROP TABLE users CASCADE CONSTRAINTS PURGE WITH EXTRA NONSENSE ((;";
        let st = split(sql, Dialect::Postgres);
        let a = analyse(sql, &st, Dialect::Postgres, 1);
        assert_eq!(a.findings.len(), 1);
        assert_eq!(a.findings[0].loss, Loss::DropTable);
        assert!(
            a.findings[0]
                .detail
                .as_deref()
                .unwrap_or("")
                .contains("keywords")
        );
    }

    #[test]
    fn type_changes_are_collected_with_their_columns() {
        let sql = "ALTER TABLE App.Users ALTER COLUMN Name TYPE VARCHAR(20);";
        let a = analyse(sql, &split(sql, Dialect::Postgres), Dialect::Postgres, 3);
        assert_eq!(a.type_changes.len(), 1);
        let c = &a.type_changes[0];
        assert_eq!(c.table, ["app", "users"]);
        assert_eq!(c.column, "name");
        assert_eq!(c.new_type, "VARCHAR(20)");
        assert_eq!(c.line, 3);
        let sql = "ALTER TABLE users MODIFY COLUMN age SMALLINT;";
        let a = analyse(sql, &split(sql, Dialect::MySql), Dialect::MySql, 1);
        assert_eq!(a.type_changes[0].column, "age");
    }

    fn col(name: &str, length: Option<i64>, scale: Option<i64>) -> ColumnType {
        ColumnType {
            name: name.into(),
            length,
            scale,
        }
    }

    #[test]
    fn narrowing_rules() {
        assert!(
            narrowing(
                Dialect::Postgres,
                &col("character varying", Some(100), None),
                "VARCHAR(20)"
            )
            .is_some()
        );
        assert!(
            narrowing(
                Dialect::Postgres,
                &col("character varying", Some(20), None),
                "VARCHAR(100)"
            )
            .is_none()
        );
        assert!(narrowing(Dialect::Postgres, &col("text", None, None), "VARCHAR(255)").is_some());
        assert!(narrowing(Dialect::Postgres, &col("varchar", Some(10), None), "TEXT").is_none());
        assert!(narrowing(Dialect::Postgres, &col("bigint", None, None), "INTEGER").is_some());
        assert!(narrowing(Dialect::Postgres, &col("integer", None, None), "BIGINT").is_none());
        assert!(narrowing(Dialect::Postgres, &col("int", None, None), "SMALLINT").is_some());
        assert!(
            narrowing(
                Dialect::Postgres,
                &col("numeric", Some(10), Some(2)),
                "NUMERIC(10,0)"
            )
            .is_some()
        );
        assert!(
            narrowing(
                Dialect::Postgres,
                &col("numeric", Some(10), Some(2)),
                "NUMERIC(12,2)"
            )
            .is_none()
        );
        assert!(
            narrowing(
                Dialect::Postgres,
                &col("numeric", Some(10), Some(2)),
                "INTEGER"
            )
            .is_some()
        );
        assert!(
            narrowing(
                Dialect::Postgres,
                &col("timestamp without time zone", None, None),
                "DATE"
            )
            .is_some()
        );
        assert!(narrowing(Dialect::Postgres, &col("date", None, None), "TIMESTAMP").is_none());
        assert!(narrowing(Dialect::Postgres, &col("text", None, None), "INTEGER").is_some());
        assert!(narrowing(Dialect::Postgres, &col("integer", None, None), "TEXT").is_none());
        assert!(narrowing(Dialect::Postgres, &col("integer", None, None), "VARCHAR(5)").is_some());
        assert!(
            narrowing(
                Dialect::Postgres,
                &col("double precision", None, None),
                "REAL"
            )
            .is_some()
        );
        assert!(narrowing(Dialect::MySql, &col("longtext", None, None), "TEXT").is_some());
        assert!(
            narrowing(
                Dialect::MySql,
                &col("decimal", Some(10), Some(2)),
                "DECIMAL(10,2) UNSIGNED"
            )
            .is_none()
        );
        let why = narrowing(
            Dialect::Postgres,
            &col("character varying", Some(100), None),
            "VARCHAR(20)",
        )
        .unwrap();
        assert!(
            why.contains("character varying(100) -> VARCHAR(20)"),
            "{why}"
        );
    }
}
