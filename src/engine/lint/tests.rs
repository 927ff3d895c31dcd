//! One fixture per rule, the new-table exemption and the silencing comments.

use super::*;
use crate::engine::source::load_files;

fn findings(dialect: Dialect, files: &[(&str, &str)]) -> Vec<Finding> {
    let set = load_files(
        "test",
        files
            .iter()
            .map(|(n, t)| (n.to_string(), t.to_string()))
            .collect::<Vec<_>>(),
    )
    .expect("valid files");
    let all: Vec<&Migration> = set.migrations.iter().collect();
    lint(dialect, &all, NewTables::SameRun)
}

fn rules(dialect: Dialect, sql: &str) -> Vec<String> {
    findings(dialect, &[("1_x.up.sql", sql)])
        .into_iter()
        .filter(|f| f.ignored.is_none())
        .map(|f| f.rule)
        .collect()
}

#[test]
fn postgres_rules_each_have_a_fixture() {
    let cases = [
        (
            "CREATE INDEX orders_total ON orders (total);",
            "require-concurrent-index-creation",
        ),
        (
            "DROP INDEX orders_total;",
            "require-concurrent-index-deletion",
        ),
        (
            "ALTER TABLE orders ADD CONSTRAINT positive CHECK (total > 0);",
            "constraint-missing-not-valid",
        ),
        (
            "ALTER TABLE items ADD CONSTRAINT fk FOREIGN KEY (order_id) REFERENCES orders (id);",
            "adding-foreign-key-constraint",
        ),
        (
            "ALTER TABLE orders ALTER COLUMN total TYPE bigint;",
            "changing-column-type",
        ),
        (
            "ALTER TABLE orders ADD COLUMN code text NOT NULL;",
            "adding-required-field",
        ),
        (
            "ALTER TABLE orders RENAME COLUMN total TO amount;",
            "renaming-column",
        ),
        ("ALTER TABLE orders RENAME TO purchases;", "renaming-table"),
        (
            "ALTER TABLE orders ADD CONSTRAINT u UNIQUE (code);",
            "disallowed-unique-constraint",
        ),
        (
            "ALTER TABLE orders ADD COLUMN id2 serial PRIMARY KEY;",
            "adding-serial-primary-key-field",
        ),
    ];
    for (sql, rule) in cases {
        let got = rules(Dialect::Postgres, sql);
        assert!(
            got.iter().any(|r| r == rule),
            "{sql}: expected {rule}, got {got:?}"
        );
    }
    // The safe forms pass.
    for sql in [
        "-- schemagate:no-transaction\nCREATE INDEX CONCURRENTLY orders_total ON orders (total);",
        "ALTER TABLE orders ADD CONSTRAINT positive CHECK (total > 0) NOT VALID;",
        "ALTER TABLE orders ADD COLUMN note text;",
    ] {
        assert_eq!(rules(Dialect::Postgres, sql), Vec::<String>::new(), "{sql}");
    }
}

#[test]
fn a_finding_names_file_line_statement_risk_and_the_safe_way() {
    let f = findings(
        Dialect::Postgres,
        &[(
            "3_index.up.sql",
            "-- an index for the report\nSELECT 1;\nCREATE INDEX orders_total ON orders (total);\n",
        )],
    );
    assert_eq!(f.len(), 1, "{f:?}");
    let f = &f[0];
    assert_eq!(
        (f.file.as_str(), f.line, f.version.as_str()),
        ("3_index.up.sql", 3, "3")
    );
    assert!(
        f.statement.starts_with("CREATE INDEX orders_total"),
        "{}",
        f.statement
    );
    assert!(!f.message.is_empty());
    assert!(
        f.help.as_deref().unwrap().contains("CONCURRENTLY"),
        "{:?}",
        f.help
    );
}

#[test]
fn tables_created_earlier_in_the_run_are_new_and_exempt() {
    let f = findings(
        Dialect::Postgres,
        &[
            (
                "1_create.up.sql",
                "CREATE TABLE fresh (id int PRIMARY KEY, v int);\n",
            ),
            (
                "2_index.up.sql",
                "CREATE INDEX fresh_v ON fresh (v);\nALTER TABLE fresh ADD CONSTRAINT c CHECK (v > 0);\nCREATE INDEX old_v ON old (v);\n",
            ),
        ],
    );
    let rules: Vec<(&str, usize)> = f.iter().map(|f| (f.rule.as_str(), f.line)).collect();
    assert_eq!(rules, [("require-concurrent-index-creation", 3)], "{f:?}");
}

#[test]
fn lint_ignore_silences_one_rule_for_a_statement_or_a_file() {
    let sql = "CREATE INDEX a ON orders (a);\n\
               -- schemagate:lint-ignore require-concurrent-index-creation orders has 40 rows\n\
               CREATE INDEX b ON orders (b);\n\
               CREATE INDEX c ON orders (c);\n";
    let f = findings(Dialect::Postgres, &[("1_x.up.sql", sql)]);
    let state: Vec<(usize, bool)> = f.iter().map(|f| (f.line, f.ignored.is_some())).collect();
    assert_eq!(state, [(1, false), (3, true), (4, false)], "{f:?}");
    assert_eq!(
        ignore_note(&f, "1").as_deref(),
        Some("lint-ignore require-concurrent-index-creation: orders has 40 rows")
    );
    let whole = "-- schemagate:lint-ignore require-concurrent-index-creation a small table\n\
                 CREATE INDEX a ON orders (a);\nCREATE INDEX b ON orders (b);\n";
    assert!(rules(Dialect::Postgres, whole).is_empty());
}

#[test]
fn mysql_rules_each_have_a_fixture() {
    let cases = [
        (
            "CREATE INDEX i ON orders (total);",
            "mysql-index-without-online-ddl",
        ),
        (
            "ALTER TABLE orders ADD INDEX i (total);",
            "mysql-index-without-online-ddl",
        ),
        (
            "ALTER TABLE orders MODIFY total BIGINT;",
            "mysql-column-type-change",
        ),
        (
            "ALTER TABLE orders CHANGE COLUMN total amount INT;",
            "mysql-column-type-change",
        ),
        ("RENAME TABLE orders TO purchases;", "mysql-rename"),
        (
            "ALTER TABLE orders RENAME COLUMN total TO amount;",
            "mysql-rename",
        ),
        (
            "ALTER TABLE items ADD CONSTRAINT fk FOREIGN KEY (o) REFERENCES orders (id);",
            "mysql-adding-foreign-key",
        ),
        (
            "ALTER TABLE orders ADD COLUMN code VARCHAR(8) NOT NULL;",
            "mysql-adding-not-nullable-field",
        ),
    ];
    for (sql, rule) in cases {
        let got = rules(Dialect::MySql, sql);
        assert!(
            got.iter().any(|r| r == rule),
            "{sql}: expected {rule}, got {got:?}"
        );
    }
    for sql in [
        "ALTER TABLE orders ADD INDEX i (total), ALGORITHM=INPLACE, LOCK=NONE;",
        "ALTER TABLE orders ADD COLUMN note VARCHAR(40) NULL;",
        "ALTER TABLE orders ADD COLUMN code VARCHAR(8) NOT NULL DEFAULT '';",
    ] {
        assert_eq!(rules(Dialect::MySql, sql), Vec::<String>::new(), "{sql}");
    }
}
