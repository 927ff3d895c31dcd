//! The engine against a real MariaDB server started by the harness (installed from
//! Debian's packages if missing).

mod support;

use std::time::Duration;

use schemagate::engine::HistoryTable;
use schemagate::engine::dialect::sql::mysql_lock_name;
use support::mysql::{PASSWORD, server};
use support::scenarios::{self, DbKind};
use support::*;

struct Maria;

fn database_of(url: &str) -> String {
    url.rsplit('/').next().unwrap_or_default().to_string()
}

impl DbKind for Maria {
    fn fresh(&self) -> String {
        server().fresh_db()
    }
    fn slow(&self, secs: u32) -> String {
        format!("SELECT SLEEP({secs})")
    }
    fn table_exists_sql(&self, table: &str) -> String {
        format!(
            "SELECT count(*) FROM information_schema.tables \
             WHERE table_schema = DATABASE() AND table_name = '{table}'"
        )
    }
    fn wait_lock_released(&self, url: &str) {
        let table =
            HistoryTable::parse(&format!("{}.schemagate_history", database_of(url))).unwrap();
        let name = mysql_lock_name(&table);
        wait_for(
            "the dead runner's GET_LOCK to be released",
            Duration::from_secs(60),
            || {
                count(
                    url,
                    &format!("SELECT CAST(IS_FREE_LOCK('{name}') AS SIGNED)"),
                ) == 1
            },
        );
    }
    fn wait_running(&self, url: &str, _transactional: bool) {
        wait_for("the slow statement to run", Duration::from_secs(30), || {
            count(
                url,
                "SELECT count(*) FROM information_schema.PROCESSLIST \
                 WHERE DB = DATABASE() AND INFO LIKE 'SELECT SLEEP(%' AND ID <> CONNECTION_ID()",
            ) >= 1
        });
    }
    fn drop_index(&self, index: &str, table: &str) -> String {
        format!("DROP INDEX {index} ON {table}")
    }
    fn transactional_ddl(&self) -> bool {
        false
    }
    fn change_type(&self, table: &str, column: &str, new_type: &str) -> Option<String> {
        Some(format!(
            "ALTER TABLE {table} MODIFY COLUMN {column} {new_type}"
        ))
    }
}

#[test]
fn lifecycle() {
    scenarios::lifecycle(&Maria);
}

#[test]
fn twenty_concurrent_runners_apply_each_migration_once() {
    scenarios::concurrent_runners(&Maria, 20);
}

#[test]
fn kill9_mid_transactional_migration() {
    scenarios::kill9_transactional(&Maria);
}

#[test]
fn kill9_mid_non_transactional_migration() {
    scenarios::kill9_non_transactional(&Maria);
}

#[test]
fn dirty_downgrade_is_resolved() {
    scenarios::dirty_downgrade_is_resolved(&Maria);
}

#[test]
fn destructive_guard() {
    scenarios::destructive_guard(&Maria);
}

#[test]
fn drift_is_detected() {
    scenarios::drift(&Maria);
}

#[test]
fn failing_migration_is_dirty_with_its_progress() {
    scenarios::failing_migration(&Maria);
}

#[test]
fn downgrade_needs_every_down_script() {
    scenarios::downgrade_needs_every_down_script(&Maria);
}

#[test]
fn stamp_adopts_an_existing_schema() {
    scenarios::stamp_adopts(&Maria);
}

#[test]
fn empty_scripts_are_refused_unless_marked() {
    scenarios::empty_scripts_are_refused(&Maria);
}

#[test]
fn plan_and_status_change_nothing() {
    scenarios::plan_and_status(&Maria);
}

#[test]
fn wait_blocks_until_the_version_is_reached() {
    scenarios::wait_for_version(&Maria);
}

#[test]
fn foreign_formats_run_as_they_are() {
    scenarios::foreign_formats(&Maria);
}

fn cmd(url: &str, dir: &MigDir, args: &[&str]) -> std::process::Output {
    let mut c = migrate(url, dir.path());
    c.args(args);
    run(c)
}

/// MySQL commits DDL as it goes: a migration failing at statement 3 of 5 is recorded with
/// its progress, reported dirty, and nothing runs past it until a person resolves it.
#[test]
fn failure_at_statement_3_of_5_is_dirty_and_blocks() {
    let url = server().fresh_db();
    let dir = MigDir::new();
    dir.pair("1", "base", "CREATE TABLE base_t (x INTEGER);\n", None);
    dir.pair(
        "2",
        "five",
        "CREATE TABLE s1 (x INTEGER);\nCREATE TABLE s2 (x INTEGER);\n\
         ALTER TABLE no_such_table ADD COLUMN y INTEGER;\nCREATE TABLE s4 (x INTEGER);\nCREATE TABLE s5 (x INTEGER);\n",
        None,
    );
    dir.pair("3", "after", "CREATE TABLE after_t (x INTEGER);\n", None);
    let o = cmd(&url, &dir, &["upgrade"]);
    assert_code(&o, 12);
    let t = text(&o);
    assert!(
        t.contains("statement 3 of 5") && t.contains("line 3"),
        "{t}"
    );
    assert!(t.contains("resolve 2"), "{t}");

    let o = cmd(&url, &dir, &["status", "-o", "json"]);
    assert_code(&o, 4);
    let st = stdout_json(&o);
    assert_eq!(st["verdict"], "dirty");
    assert_eq!(st["unfinished"]["statementsDone"], 2);
    assert_eq!(st["unfinished"]["statementsTotal"], 5);
    assert_eq!(st["unfinished"]["failed"], true);

    for _ in 0..2 {
        let o = cmd(&url, &dir, &["upgrade"]);
        assert_code(&o, 13);
    }
    assert_eq!(
        count(&url, &Maria.table_exists_sql("after_t")),
        0,
        "nothing ran past it"
    );
    assert_eq!(count(&url, &Maria.table_exists_sql("s4")), 0);

    // Finish it by hand, make the file say what the schema now has, then record that
    // version 2 is applied (the resolution records the file's checksum as it is now).
    exec(&url, "CREATE TABLE s4 (x INTEGER)");
    exec(&url, "CREATE TABLE s5 (x INTEGER)");
    dir.file(
        "2_five.up.sql",
        "CREATE TABLE s1 (x INTEGER);\nCREATE TABLE s2 (x INTEGER);\n\
         CREATE TABLE s4 (x INTEGER);\nCREATE TABLE s5 (x INTEGER);\n",
    );
    let o = cmd(
        &url,
        &dir,
        &["resolve", "2", "--applied", "-m", "finished by hand"],
    );
    assert_code(&o, 0);
    let o = cmd(&url, &dir, &["upgrade"]);
    assert_code(&o, 0);
    assert_eq!(count(&url, &Maria.table_exists_sql("after_t")), 1);
}

/// Data-only migrations run in a transaction with their history row on MySQL too.
#[test]
fn data_only_migrations_are_atomic() {
    let url = server().fresh_db();
    let dir = MigDir::new();
    dir.pair("1", "t", "CREATE TABLE t (x INTEGER PRIMARY KEY);\n", None);
    dir.pair(
        "2",
        "rows",
        "INSERT INTO t VALUES (1);\nINSERT INTO t VALUES (1);\n",
        None,
    );
    let o = cmd(&url, &dir, &["upgrade"]);
    assert_code(&o, 12);
    assert!(text(&o).contains("rolled back"), "{}", text(&o));
    assert_eq!(
        count(&url, "SELECT count(*) FROM t"),
        0,
        "the first INSERT rolled back"
    );
    let o = cmd(&url, &dir, &["status"]);
    assert_code(&o, 3);
}

#[test]
fn procedures_with_delimiter_blocks_run() {
    let url = server().fresh_db();
    let dir = MigDir::new();
    dir.pair(
        "1",
        "proc",
        "CREATE TABLE counter (n INTEGER);\nINSERT INTO counter VALUES (0);\n\
         DELIMITER $$\nCREATE PROCEDURE bump()\nBEGIN\n  UPDATE counter SET n = n + 1;\n  UPDATE counter SET n = n + 1;\nEND$$\nDELIMITER ;\n\
         CALL bump();\n",
        Some("DROP PROCEDURE bump;\nDROP TABLE counter;\n"),
    );
    assert_code(&cmd(&url, &dir, &["upgrade"]), 0);
    assert_eq!(count(&url, "SELECT n FROM counter"), 2);
    assert_code(&cmd(&url, &dir, &["downgrade"]), 0);
}

#[test]
fn wrong_password_is_clear_and_never_printed() {
    let dir = MigDir::new();
    scenarios::standard(&dir);
    let secret = "Wr0ng-Maria-Pw";
    let url = format!(
        "mariadb://{}:{secret}@127.0.0.1:{}/mysql",
        support::mysql::USER,
        server().port
    );
    for output in ["human", "json"] {
        let o = cmd(&url, &dir, &["status", "-o", output]);
        assert_code(&o, 11);
        let t = text(&o);
        assert!(t.contains("Access denied"), "{t}");
        assert!(!t.contains(secret) && !t.contains(PASSWORD), "{t}");
    }
}
