//! `schemagate migrate lint`: statements that are correct but risky on a live database
//! (they lock a busy table for long, rewrite it, or break the app version still running).
//!
//! PostgreSQL: the rules of `squawk-linter` (the engine of the squawk CLI) that concern
//! production safety, over each migration as the engine runs it (in a transaction unless
//! `no-transaction`). MySQL/MariaDB: rules of the same spirit, read from the statements'
//! leading keywords. A table created earlier in the same pending set is new: indexing it,
//! adding columns or constraints to it stalls nobody, so those findings are dropped.
//!
//! `-- schemagate:lint-ignore <rule> <reason>` silences one rule: at the top of a file for
//! the whole file, or on the line(s) right before a statement for that statement. The
//! reason is recorded in the step's history row, like `allow-destructive`.

use std::collections::BTreeSet;

use serde::Serialize;

use super::lockwait::tables_named;
use super::script::{self, Dialect, Statement};
use super::source::{Migration, Script};

/// How bad a finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Risky under load; there is a safer way.
    Warning,
    /// Fails or blocks for certain on a table with rows.
    Error,
}

/// One finding.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Finding {
    /// The rule (`require-concurrent-index-creation`, `mysql-rename`, ...).
    pub rule: String,
    pub severity: Severity,
    pub version: String,
    /// The file, as the source names it.
    pub file: String,
    /// 1-based line of the statement in the file.
    pub line: usize,
    /// The statement, shortened to one line.
    pub statement: String,
    /// The risk.
    pub message: String,
    /// The safe alternative.
    pub help: Option<String>,
    /// The reason of a `lint-ignore` that silences it (then it does not count).
    pub ignored: Option<String>,
}

/// A `-- schemagate:lint-ignore <rule> <reason>` comment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LintIgnore {
    pub rule: String,
    pub reason: String,
    /// 1-based line of the comment within the script; `None`: in the header (whole file).
    pub line: Option<usize>,
}

/// The `lint-ignore` comments of a script: those before the first statement apply to the
/// whole file, the others to the statement that follows them.
pub fn ignores(sql: &str) -> Vec<LintIgnore> {
    let mut out = Vec::new();
    let mut header = true;
    for (n, raw) in sql.lines().enumerate() {
        let line = raw.trim();
        let body = line.strip_prefix("--").map(str::trim_start).and_then(|c| {
            c.get(..22)
                .filter(|p| p.eq_ignore_ascii_case("schemagate:lint-ignore"))
                .map(|_| c[22..].trim())
        });
        match body {
            Some(rest) => {
                let mut parts = rest.splitn(2, char::is_whitespace);
                let rule = parts.next().unwrap_or_default().to_ascii_lowercase();
                let reason = parts.next().unwrap_or_default().trim().to_string();
                out.push(LintIgnore {
                    rule,
                    reason,
                    line: (!header).then_some(n + 1),
                });
            }
            None if !line.is_empty() && !line.starts_with("--") => header = false,
            None => {}
        }
    }
    out
}

/// Rules applied on PostgreSQL (squawk's names): those about locks, rewrites and breaking
/// the running app. Style rules (prefer text, bigint...) are left to squawk itself.
const PG_RULES: &[squawk_linter::Rule] = {
    use squawk_linter::Rule::*;
    &[
        RequireConcurrentIndexCreation,
        RequireConcurrentIndexDeletion,
        ConstraintMissingNotValid,
        AddingFieldWithDefault,
        AddingForeignKeyConstraint,
        ChangingColumnType,
        AddingNotNullableField,
        AddingRequiredField,
        AddingSerialPrimaryKeyField,
        RenamingColumn,
        RenamingTable,
        DisallowedUniqueConstraint,
        BanConcurrentIndexCreationInTransaction,
        BanTruncateCascade,
        BanDropNotNull,
    ]
};

/// What the PostgreSQL rules mean for a running app, where squawk's own help is terse.
fn pg_help(rule: &str) -> Option<&'static str> {
    Some(match rule {
        "require-concurrent-index-creation" => {
            "use CREATE INDEX CONCURRENTLY in a file marked `-- schemagate:no-transaction`: \
             writes go on while the index builds"
        }
        "require-concurrent-index-deletion" => {
            "use DROP INDEX CONCURRENTLY in a file marked `-- schemagate:no-transaction`"
        }
        "constraint-missing-not-valid" | "adding-foreign-key-constraint" => {
            "add the constraint NOT VALID (a short lock), then VALIDATE CONSTRAINT in a later \
             migration (no lock on writes)"
        }
        "changing-column-type" => {
            "add a new column, backfill it in batches, switch the app, then drop the old one \
             (expand/contract)"
        }
        "adding-not-nullable-field" | "adding-required-field" => {
            "add the column nullable (or with a constant default), backfill, then add a CHECK \
             (col IS NOT NULL) NOT VALID, VALIDATE it, and SET NOT NULL"
        }
        "renaming-column" | "renaming-table" => {
            "the running app still uses the old name: add the new one (or a view), switch the \
             app, drop the old one in a later release"
        }
        "disallowed-unique-constraint" => {
            "CREATE UNIQUE INDEX CONCURRENTLY first, then ADD CONSTRAINT ... UNIQUE USING INDEX"
        }
        "adding-serial-primary-key-field" => {
            "build a unique index concurrently, then ADD PRIMARY KEY USING INDEX"
        }
        _ => return None,
    })
}

fn line_of(sql: &str, offset: usize) -> usize {
    sql[..offset.min(sql.len())].matches('\n').count() + 1
}

/// The statement of `statements` that contains `offset`.
fn statement_at(statements: &[Statement], offset: usize) -> Option<&Statement> {
    statements
        .iter()
        .find(|s| s.start <= offset && offset < s.after.max(s.start + 1))
        .or_else(|| statements.iter().rev().find(|s| s.start <= offset))
}

/// Findings in one script (`new_tables`: tables created earlier in the same run).
pub fn lint_script(
    dialect: Dialect,
    version: &str,
    script: &Script,
    new_tables: &BTreeSet<String>,
) -> Vec<Finding> {
    let statements = script::split(&script.sql, dialect);
    let mut raw: Vec<(String, Severity, usize, String, Option<String>)> = match dialect {
        Dialect::Postgres => {
            let parse = squawk_syntax::SourceFile::parse(&script.sql);
            let mut linter = squawk_linter::Linter::from(PG_RULES.iter().copied());
            linter.settings.assume_in_transaction = !script.directives.no_transaction;
            linter
                .lint(&parse, &script.sql)
                .into_iter()
                .map(|v| {
                    let rule = v.code.to_string();
                    let offset = usize::from(v.text_range.start());
                    let help = pg_help(&rule).map(String::from).or(v.help);
                    let severity = match rule.as_str() {
                        "adding-required-field"
                        | "ban-concurrent-index-creation-in-transaction" => Severity::Error,
                        _ => Severity::Warning,
                    };
                    (rule, severity, offset, v.message, help)
                })
                .collect()
        }
        Dialect::MySql => statements
            .iter()
            .flat_map(|s| {
                mysql_rules(s.text(&script.sql))
                    .into_iter()
                    .map(|f| (f.0, f.1, s.start, f.2, f.3))
            })
            .collect(),
        Dialect::Sqlite => Vec::new(),
    };
    raw.sort_by_key(|r| r.2);
    let ignores = ignores(&script.sql);
    let mut out = Vec::new();
    for (rule, severity, offset, message, help) in raw {
        let stmt = statement_at(&statements, offset);
        let text = stmt.map(|s| s.text(&script.sql)).unwrap_or_default();
        // A table created earlier in this run (or in this file) has no traffic yet.
        let targets = tables_named(text);
        if !targets.is_empty()
            && targets
                .iter()
                .all(|t| new_tables.contains(&t.to_ascii_lowercase()))
            && rule != "renaming-column"
            && rule != "renaming-table"
        {
            continue;
        }
        let line = stmt
            .map(|s| s.line)
            .unwrap_or_else(|| line_of(&script.sql, offset));
        let ignored = ignores
            .iter()
            .find(|i| {
                i.rule == rule
                    && match i.line {
                        None => true,
                        // The comment block right above the statement.
                        Some(l) => {
                            l < line
                                && script.sql.lines().skip(l).take(line - l - 1).all(|x| {
                                    let x = x.trim();
                                    x.is_empty() || x.starts_with("--")
                                })
                        }
                    }
            })
            .map(|i| i.reason.clone());
        out.push(Finding {
            rule,
            severity,
            version: version.to_string(),
            file: script.file.clone(),
            line: line + script.first_line - 1,
            statement: script::excerpt(text, 120),
            message,
            help,
            ignored,
        });
    }
    out
}

/// MySQL/MariaDB rules over one statement: (rule, severity, risk, safe way).
fn mysql_rules(text: &str) -> Vec<(String, Severity, String, Option<String>)> {
    let up = text.to_ascii_uppercase();
    let words: Vec<&str> = up.split_whitespace().collect();
    let mut out = Vec::new();
    let mut add = |rule: &str, severity, message: &str, help: &str| {
        out.push((
            rule.to_string(),
            severity,
            message.to_string(),
            Some(help.to_string()),
        ));
    };
    let has = |w: &str| words.contains(&w);
    let phrase = |p: &str| {
        up.split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .contains(p)
    };
    let online = phrase("ALGORITHM=INPLACE")
        || phrase("ALGORITHM = INPLACE")
        || phrase("ALGORITHM=INSTANT")
        || phrase("ALGORITHM = INSTANT")
        || phrase("LOCK=NONE")
        || phrase("LOCK = NONE");
    let alter = words.first() == Some(&"ALTER") && words.get(1) == Some(&"TABLE");
    let create_index = words.first() == Some(&"CREATE")
        && (words.get(1) == Some(&"INDEX") || (words.get(2) == Some(&"INDEX")));
    if (create_index
        || (alter && (phrase("ADD INDEX") || phrase("ADD KEY") || phrase("ADD UNIQUE"))))
        && !online
    {
        add(
            "mysql-index-without-online-ddl",
            Severity::Warning,
            "builds an index without asking for online DDL: depending on the version and table, \
             writes can be blocked while it builds",
            "add `ALGORITHM=INPLACE, LOCK=NONE` so the server refuses instead of locking, or use \
             gh-ost/pt-online-schema-change on large tables",
        );
    }
    if alter
        && (phrase(" MODIFY ")
            || has("MODIFY")
            || phrase("CHANGE COLUMN")
            || words.get(3) == Some(&"CHANGE"))
    {
        add(
            "mysql-column-type-change",
            Severity::Warning,
            "MODIFY/CHANGE of a column usually copies the whole table, blocking writes for the \
             duration",
            "add a new column, backfill it in batches, switch the app, drop the old one \
             (expand/contract)",
        );
    }
    if (words.first() == Some(&"RENAME") && words.get(1) == Some(&"TABLE"))
        || (alter && (phrase("RENAME COLUMN") || phrase("RENAME TO") || phrase(" RENAME ")))
    {
        add(
            "mysql-rename",
            Severity::Warning,
            "a rename breaks the app version still running, which uses the old name",
            "add the new name alongside (a new column or a view), switch the app, drop the old \
             one in a later release",
        );
    }
    if alter && (phrase("FOREIGN KEY") || has("REFERENCES")) {
        add(
            "mysql-adding-foreign-key",
            Severity::Warning,
            "adding a foreign key checks every row and locks both tables' metadata",
            "add it in a quiet window, or with foreign_key_checks = 0 in this migration if the \
             data is known to be consistent (recorded with a lint-ignore reason)",
        );
    }
    if alter && phrase("ADD") && phrase("NOT NULL") && !has("DEFAULT") && !phrase("ADD INDEX") {
        add(
            "mysql-adding-not-nullable-field",
            Severity::Warning,
            "a NOT NULL column without a default cannot be added instantly and fails in strict \
             mode on a table with rows",
            "add it with a DEFAULT (instant on MySQL 8 and MariaDB 10.3+), or nullable, backfill, \
             then make it NOT NULL",
        );
    }
    out
}

/// Tables a statement creates (lower-cased), for the new-table exemption.
fn created_tables(statement: &Statement, sql: &str) -> Option<String> {
    let w = &statement.words;
    if w.first().map(String::as_str) != Some("CREATE") {
        return None;
    }
    let text = statement.text(sql);
    let upper: Vec<String> = text
        .split(|c: char| c.is_whitespace() || c == '(')
        .filter(|x| !x.is_empty())
        .map(str::to_ascii_uppercase)
        .collect();
    let i = upper.iter().position(|x| x == "TABLE")?;
    let mut j = i + 1;
    while upper
        .get(j)
        .is_some_and(|x| ["IF", "NOT", "EXISTS"].contains(&x.as_str()))
    {
        j += 1;
    }
    let words: Vec<&str> = text
        .split(|c: char| c.is_whitespace() || c == '(')
        .filter(|x| !x.is_empty())
        .collect();
    words.get(j).map(|n| {
        n.trim_matches(|c| c == '"' || c == '`')
            .to_ascii_lowercase()
    })
}

/// Which tables count as new (no traffic yet).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NewTables {
    /// Those created earlier in the same file: each file is judged as if every earlier
    /// one were applied already (linting files in CI, without a database).
    SameFile,
    /// Those created earlier in the same run: the migrations are the pending set of one
    /// database, applied together.
    SameRun,
}

/// Findings over the up scripts of `migrations`, in order.
pub fn lint(dialect: Dialect, migrations: &[&Migration], scope: NewTables) -> Vec<Finding> {
    let mut new_tables = BTreeSet::new();
    let mut out = Vec::new();
    for m in migrations {
        let statements = script::split(&m.up.sql, dialect);
        if scope == NewTables::SameFile {
            new_tables.clear();
        }
        // Tables this file creates are new for its own later statements too.
        new_tables.extend(
            statements
                .iter()
                .filter_map(|s| created_tables(s, &m.up.sql)),
        );
        out.extend(lint_script(
            dialect,
            &m.version.to_string(),
            &m.up,
            &new_tables,
        ));
    }
    out
}

/// The note a step's history row carries for the findings it silenced.
pub fn ignore_note(findings: &[Finding], version: &str) -> Option<String> {
    let notes: Vec<String> = findings
        .iter()
        .filter(|f| f.version == version)
        .filter_map(|f| {
            f.ignored
                .as_ref()
                .map(|r| format!("lint-ignore {}: {r}", f.rule))
        })
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    (!notes.is_empty()).then(|| notes.join("; "))
}

#[cfg(test)]
mod tests;
