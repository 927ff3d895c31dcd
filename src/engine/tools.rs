//! Other migration tools' history tables, read without conversion: Alembic (Flask-Migrate),
//! Flyway, golang-migrate, sqlx and dbmate. So the status of an app that keeps its own tool
//! still shows its current version and history, a dirty golang-migrate state or a failed
//! Flyway row is reported, and `import` can adopt such a database into schemagate's history.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use super::dialect::{Backend, TextRows};
use super::script::Dialect;
use super::version::Version;
use super::{DbError, DbErrorKind};

/// A migration tool whose history schemagate reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Tool {
    /// schemagate's own history table.
    Native,
    /// Alembic and Flask-Migrate: `alembic_version` (one row per head).
    Alembic,
    /// Flyway: `flyway_schema_history`.
    Flyway,
    /// golang-migrate: `schema_migrations (version, dirty)`.
    GolangMigrate,
    /// sqlx: `_sqlx_migrations`.
    Sqlx,
    /// dbmate: `schema_migrations (version)`.
    Dbmate,
}

impl Tool {
    pub const ALL: [Tool; 6] = [
        Tool::Native,
        Tool::Alembic,
        Tool::Flyway,
        Tool::GolangMigrate,
        Tool::Sqlx,
        Tool::Dbmate,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Tool::Native => "native",
            Tool::Alembic => "alembic",
            Tool::Flyway => "flyway",
            Tool::GolangMigrate => "golang-migrate",
            Tool::Sqlx => "sqlx",
            Tool::Dbmate => "dbmate",
        }
    }

    /// The table the tool keeps its history in (its default name).
    pub fn table(self) -> &'static str {
        match self {
            Tool::Native => "schemagate_history",
            Tool::Alembic => "alembic_version",
            Tool::Flyway => "flyway_schema_history",
            Tool::GolangMigrate | Tool::Dbmate => "schema_migrations",
            Tool::Sqlx => "_sqlx_migrations",
        }
    }
}

impl fmt::Display for Tool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Tool {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let norm = s.to_ascii_lowercase().replace(['_', ' '], "-");
        let norm = match norm.as_str() {
            "flask-migrate" | "flask" => "alembic",
            "migrate" | "golang" => "golang-migrate",
            "schemagate" => "native",
            other => other,
        };
        Tool::ALL
            .into_iter()
            .find(|t| t.name() == norm)
            .ok_or_else(|| {
                format!(
                    "unknown tool {s:?}: use one of {}",
                    Tool::ALL.map(|t| t.name()).join(", ")
                )
            })
    }
}

/// One applied migration in a tool's history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ToolRow {
    pub version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub applied_at: Option<String>,
    pub success: bool,
}

/// What a tool's history says.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ToolState {
    /// False when the tool's table does not exist (never migrated by it).
    pub initialized: bool,
    /// The current version (Alembic: the heads, comma-separated).
    pub current: Option<String>,
    /// Alembic's heads (more than one: unmerged branches).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub heads: Vec<String>,
    /// Applied (and failed) migrations, oldest first, where the tool records them.
    pub applied: Vec<ToolRow>,
    /// The versions in effect: applied and not undone (Flyway's undo and delete rows
    /// taken into account), in version order.
    pub versions: Vec<String>,
    /// A state a person must fix first (golang-migrate dirty, a failed Flyway or sqlx row).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

fn text(d: Dialect, expr: &str) -> String {
    match d {
        Dialect::MySql => format!("CAST({expr} AS CHAR)"),
        _ => format!("CAST({expr} AS TEXT)"),
    }
}

fn truthy(v: Option<&str>) -> bool {
    matches!(
        v.map(|s| s.trim().to_ascii_lowercase()).as_deref(),
        Some("t" | "true" | "1" | "yes")
    )
}

fn col(row: &[Option<String>], i: usize) -> Option<String> {
    row.get(i).cloned().flatten()
}

/// The SQL reading `tool`'s table (every column as text).
pub fn query(tool: Tool, d: Dialect) -> Option<String> {
    Some(match tool {
        Tool::Native => return None,
        Tool::Alembic => format!(
            "SELECT {} FROM alembic_version ORDER BY 1",
            text(d, "version_num")
        ),
        Tool::Flyway => format!(
            "SELECT {}, {}, {}, {}, {}, {} FROM flyway_schema_history ORDER BY installed_rank",
            text(d, "installed_rank"),
            text(d, "version"),
            text(d, "description"),
            text(d, "type"),
            text(d, "installed_on"),
            text(d, "success"),
        ),
        Tool::GolangMigrate => format!(
            "SELECT {}, {} FROM schema_migrations",
            text(d, "version"),
            text(d, "dirty")
        ),
        Tool::Sqlx => format!(
            "SELECT {}, {}, {}, {} FROM _sqlx_migrations ORDER BY version",
            text(d, "version"),
            text(d, "description"),
            text(d, "installed_on"),
            text(d, "success"),
        ),
        Tool::Dbmate => format!("SELECT {} FROM schema_migrations", text(d, "version")),
    })
}

fn newest<'a>(versions: impl Iterator<Item = &'a str>) -> Option<String> {
    versions
        .max_by(|a, b| match (Version::parse(a), Version::parse(b)) {
            (Ok(a), Ok(b)) => a.cmp(&b),
            _ => a.cmp(b),
        })
        .map(str::to_string)
}

/// Interprets `rows` of `query(tool)` (`None`: the table does not exist).
pub fn interpret(tool: Tool, rows: Option<TextRows>) -> ToolState {
    let Some(rows) = rows else {
        return ToolState::default();
    };
    let mut s = ToolState {
        initialized: true,
        ..Default::default()
    };
    match tool {
        Tool::Native => {}
        Tool::Alembic => {
            s.heads = rows.iter().filter_map(|r| col(r, 0)).collect();
            s.current = (!s.heads.is_empty()).then(|| s.heads.join(","));
            if s.heads.len() > 1 {
                s.problem = Some(format!(
                    "Alembic has {} heads ({}): merge them (`alembic merge heads`) so one \
                     version describes the schema",
                    s.heads.len(),
                    s.heads.join(", ")
                ));
            }
        }
        Tool::Flyway => {
            // Versioned rows apply; UNDO rows revert; repeatable rows (no version) and
            // deletes do not change the version.
            let mut applied: Vec<String> = Vec::new();
            for r in &rows {
                let (rank, version, kind) = (col(r, 0), col(r, 1), col(r, 3).unwrap_or_default());
                let success = truthy(r.get(5).and_then(|v| v.as_deref()));
                let Some(version) = version else { continue };
                s.applied.push(ToolRow {
                    version: version.clone(),
                    description: col(r, 2),
                    applied_at: col(r, 4),
                    success,
                });
                if !success {
                    s.problem = Some(format!(
                        "Flyway recorded a failed migration {version} (installed_rank {}): \
                         fix the schema, then run `flyway repair`",
                        rank.unwrap_or_default()
                    ));
                } else if kind.starts_with("UNDO") {
                    applied.retain(|v| *v != version);
                } else if kind != "DELETE" {
                    applied.push(version);
                }
            }
            s.current = newest(applied.iter().map(String::as_str));
            s.versions = applied;
        }
        Tool::GolangMigrate => {
            if let Some(r) = rows.first() {
                let version = col(r, 0).filter(|v| v != "-1");
                if truthy(r.get(1).and_then(|v| v.as_deref())) {
                    s.problem = Some(format!(
                        "golang-migrate's version {} is dirty (a migration failed part-way): \
                         fix the schema, then `migrate force {}`",
                        version.as_deref().unwrap_or("?"),
                        version.as_deref().unwrap_or("<version>")
                    ));
                }
                if let Some(v) = &version {
                    s.applied.push(ToolRow {
                        version: v.clone(),
                        description: None,
                        applied_at: None,
                        success: s.problem.is_none(),
                    });
                }
                s.current = version;
            }
        }
        Tool::Sqlx => {
            for r in &rows {
                let Some(version) = col(r, 0) else { continue };
                let success = truthy(r.get(3).and_then(|v| v.as_deref()));
                if !success {
                    s.problem = Some(format!(
                        "sqlx recorded a failed migration {version}: fix the schema, then \
                         delete its row from _sqlx_migrations"
                    ));
                }
                s.applied.push(ToolRow {
                    version,
                    description: col(r, 1),
                    applied_at: col(r, 2),
                    success,
                });
            }
            s.current = newest(
                s.applied
                    .iter()
                    .filter(|r| r.success)
                    .map(|r| r.version.as_str()),
            );
            s.versions = s
                .applied
                .iter()
                .filter(|r| r.success)
                .map(|r| r.version.clone())
                .collect();
        }
        Tool::Dbmate => {
            let mut versions: Vec<String> = rows.iter().filter_map(|r| col(r, 0)).collect();
            versions.sort_by(|a, b| match (Version::parse(a), Version::parse(b)) {
                (Ok(a), Ok(b)) => a.cmp(&b),
                _ => a.cmp(b),
            });
            s.current = versions.last().cloned();
            s.versions = versions.clone();
            s.applied = versions
                .into_iter()
                .map(|version| ToolRow {
                    version,
                    description: None,
                    applied_at: None,
                    success: true,
                })
                .collect();
        }
    }
    s
}

/// Reads `tool`'s history through `db` (never creating anything).
pub async fn read(db: &mut impl Backend, tool: Tool) -> Result<ToolState, DbError> {
    if tool == Tool::Native {
        let state = super::runner::read_state(db).await.map_err(|e| match e {
            super::RunError::Db { source, .. } => source,
            other => DbError::new(DbErrorKind::Other, other.to_string()),
        })?;
        let mut s = ToolState {
            initialized: state.initialized,
            current: state.current().map(|v| v.to_string()),
            ..Default::default()
        };
        s.applied = state
            .applied
            .values()
            .map(|a| ToolRow {
                version: a.version.clone(),
                description: Some(a.description.clone()),
                applied_at: Some(a.applied_at.clone()),
                success: true,
            })
            .collect();
        s.problem = state
            .unfinished
            .as_ref()
            .map(|u| super::plan::PlanError::Unfinished(Box::new(u.clone())).to_string());
        return Ok(s);
    }
    let sql = query(tool, db.dialect()).unwrap_or_default();
    let rows = db.query_text(&sql).await.map_err(|e| {
        DbError::new(
            e.kind,
            format!("reading {}'s table {}: {}", tool, tool.table(), e.message),
        )
    })?;
    Ok(interpret(tool, rows))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(r: &[&[Option<&str>]]) -> Option<TextRows> {
        Some(
            r.iter()
                .map(|row| row.iter().map(|c| c.map(str::to_string)).collect())
                .collect(),
        )
    }

    #[test]
    fn tool_names_parse_forgivingly() {
        assert_eq!("Flask-Migrate".parse::<Tool>(), Ok(Tool::Alembic));
        assert_eq!("golang_migrate".parse::<Tool>(), Ok(Tool::GolangMigrate));
        assert_eq!("SQLX".parse::<Tool>(), Ok(Tool::Sqlx));
        assert!("liquibase".parse::<Tool>().unwrap_err().contains("dbmate"));
    }

    #[test]
    fn a_missing_table_is_a_database_the_tool_never_touched() {
        for t in Tool::ALL {
            let s = interpret(t, None);
            assert!(!s.initialized && s.current.is_none(), "{t}");
        }
    }

    #[test]
    fn alembic_heads() {
        let s = interpret(Tool::Alembic, rows(&[&[Some("0003_add_total")]]));
        assert_eq!(s.current.as_deref(), Some("0003_add_total"));
        assert!(s.problem.is_none());
        let s = interpret(Tool::Alembic, rows(&[&[Some("a1")], &[Some("b2")]]));
        assert_eq!(s.heads, ["a1", "b2"]);
        assert!(s.problem.unwrap().contains("2 heads"));
        let empty = interpret(Tool::Alembic, rows(&[]));
        assert!(empty.initialized && empty.current.is_none());
    }

    #[test]
    fn flyway_versions_undo_and_failures() {
        let s = interpret(
            Tool::Flyway,
            rows(&[
                &[
                    Some("1"),
                    Some("1"),
                    Some("init"),
                    Some("SQL"),
                    Some("2025-11-01"),
                    Some("true"),
                ],
                &[
                    Some("2"),
                    None,
                    Some("views"),
                    Some("SQL"),
                    Some("2025-11-01"),
                    Some("1"),
                ],
                &[
                    Some("3"),
                    Some("1.10"),
                    Some("more"),
                    Some("SQL"),
                    Some("2025-11-02"),
                    Some("t"),
                ],
                &[
                    Some("4"),
                    Some("1.2"),
                    Some("later"),
                    Some("SQL"),
                    Some("2025-11-03"),
                    Some("1"),
                ],
            ]),
        );
        assert_eq!(s.current.as_deref(), Some("1.10"), "numeric by segment");
        assert!(s.problem.is_none());
        let s = interpret(
            Tool::Flyway,
            rows(&[
                &[
                    Some("1"),
                    Some("1"),
                    Some("init"),
                    Some("SQL"),
                    None,
                    Some("1"),
                ],
                &[
                    Some("2"),
                    Some("2"),
                    Some("x"),
                    Some("SQL"),
                    None,
                    Some("1"),
                ],
                &[
                    Some("3"),
                    Some("2"),
                    Some("x"),
                    Some("UNDO_SQL"),
                    None,
                    Some("1"),
                ],
                &[
                    Some("4"),
                    Some("3"),
                    Some("bad"),
                    Some("SQL"),
                    None,
                    Some("0"),
                ],
            ]),
        );
        assert_eq!(s.current.as_deref(), Some("1"));
        assert_eq!(s.versions, ["1"], "2 was undone, 3 failed");
        let p = s.problem.unwrap();
        assert!(
            p.contains("failed migration 3") && p.contains("flyway repair"),
            "{p}"
        );
    }

    #[test]
    fn golang_migrate_dirty() {
        let s = interpret(
            Tool::GolangMigrate,
            rows(&[&[Some("20251101"), Some("false")]]),
        );
        assert_eq!(s.current.as_deref(), Some("20251101"));
        assert!(s.problem.is_none());
        let s = interpret(Tool::GolangMigrate, rows(&[&[Some("3"), Some("1")]]));
        let p = s.problem.unwrap();
        assert!(p.contains("dirty") && p.contains("migrate force 3"), "{p}");
    }

    #[test]
    fn sqlx_and_dbmate() {
        let s = interpret(
            Tool::Sqlx,
            rows(&[
                &[
                    Some("20251101000000"),
                    Some("init"),
                    Some("2025-11-01"),
                    Some("true"),
                ],
                &[
                    Some("20251102000000"),
                    Some("two"),
                    Some("2025-11-02"),
                    Some("false"),
                ],
            ]),
        );
        assert_eq!(s.current.as_deref(), Some("20251101000000"));
        assert!(
            s.problem
                .unwrap()
                .contains("failed migration 20251102000000")
        );
        let s = interpret(
            Tool::Dbmate,
            rows(&[&[Some("20251102")], &[Some("20251101")], &[Some("9")]]),
        );
        assert_eq!(s.current.as_deref(), Some("20251102"));
        assert_eq!(s.applied.len(), 3);
    }

    #[test]
    fn queries_cast_to_text_per_dialect() {
        let pg = query(Tool::GolangMigrate, Dialect::Postgres).unwrap();
        assert!(pg.contains("CAST(dirty AS TEXT)"), "{pg}");
        let my = query(Tool::GolangMigrate, Dialect::MySql).unwrap();
        assert!(my.contains("CAST(dirty AS CHAR)"), "{my}");
        assert!(query(Tool::Native, Dialect::Sqlite).is_none());
    }
}
