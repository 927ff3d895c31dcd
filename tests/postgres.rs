//! The engine against a real PostgreSQL server started by the harness.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use support::postgres::{PASSWORD, server};
use support::scenarios::{self, DbKind};
use support::*;

struct Pg;

impl DbKind for Pg {
    fn fresh(&self) -> String {
        server().fresh_db()
    }
    fn slow(&self, secs: u32) -> String {
        format!("SELECT pg_sleep({secs})")
    }
    fn table_exists_sql(&self, table: &str) -> String {
        format!("SELECT CASE WHEN to_regclass('{table}') IS NULL THEN '0' ELSE '1' END")
    }
    fn wait_lock_released(&self, url: &str) {
        wait_for(
            "the dead runner's advisory lock to be released",
            Duration::from_secs(60),
            || {
                count(
                    url,
                    "SELECT CAST(count(*) AS TEXT) FROM pg_locks WHERE locktype = 'advisory' \
                     AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                ) == 0
            },
        );
    }
    fn wait_running(&self, url: &str, _transactional: bool) {
        wait_for("the slow statement to run", Duration::from_secs(30), || {
            count(
                url,
                "SELECT CAST(count(*) AS TEXT) FROM pg_stat_activity \
                 WHERE datname = current_database() AND query LIKE '%pg_sleep%' \
                 AND state = 'active' AND pid <> pg_backend_pid()",
            ) == 1
        });
    }
}

#[test]
fn lifecycle() {
    scenarios::lifecycle(&Pg);
}

#[test]
fn twenty_concurrent_runners_apply_each_migration_once() {
    scenarios::concurrent_runners(&Pg, 20);
}

#[test]
fn kill9_mid_transactional_migration() {
    scenarios::kill9_transactional(&Pg);
}

#[test]
fn kill9_mid_non_transactional_migration() {
    scenarios::kill9_non_transactional(&Pg);
}

#[test]
fn dirty_downgrade_is_resolved() {
    scenarios::dirty_downgrade_is_resolved(&Pg);
}

#[test]
fn destructive_guard() {
    scenarios::destructive_guard(&Pg);
}

#[test]
fn drift_is_detected() {
    scenarios::drift(&Pg);
}

#[test]
fn failing_migration_rolls_back_and_names_the_statement() {
    scenarios::failing_migration(&Pg);
}

#[test]
fn downgrade_needs_every_down_script() {
    scenarios::downgrade_needs_every_down_script(&Pg);
}

#[test]
fn stamp_adopts_an_existing_schema() {
    scenarios::stamp_adopts(&Pg);
}

#[test]
fn empty_scripts_are_refused_unless_marked() {
    scenarios::empty_scripts_are_refused(&Pg);
}

#[test]
fn plan_and_status_change_nothing() {
    scenarios::plan_and_status(&Pg);
}

#[test]
fn wait_blocks_until_the_version_is_reached() {
    scenarios::wait_for_version(&Pg);
}

#[test]
fn foreign_formats_run_as_they_are() {
    scenarios::foreign_formats(&Pg);
}

/// Holds the migration lock from a `psql` session until dropped.
struct LockHolder(std::process::Child);

impl LockHolder {
    fn hold(url: &str) -> Self {
        // The engine locks on the schema-qualified name, however the table was named.
        let key = schemagate::engine::HistoryTable::parse("public.schemagate_history")
            .unwrap()
            .lock_key();
        let child = Command::new("psql")
            .arg(url.replace("?sslmode=disable", ""))
            .args([
                "-X",
                "-q",
                "-c",
                &format!("SELECT pg_advisory_lock({key})"),
                "-c",
                "SELECT pg_sleep(600)",
            ])
            .env("PGAPPNAME", "lock-holder-under-test")
            .env("PGSSLMODE", "disable")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("psql");
        wait_for("psql to take the lock", Duration::from_secs(30), || {
            count(
                url,
                "SELECT CAST(count(*) AS TEXT) FROM pg_locks WHERE locktype = 'advisory' AND granted \
                 AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            ) == 1
        });
        LockHolder(child)
    }
}

impl Drop for LockHolder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn noop_upgrade_takes_no_lock_and_a_busy_lock_names_its_holder() {
    let url = server().fresh_db();
    let dir = MigDir::new();
    scenarios::standard(&dir);
    assert_code(
        &run({
            let mut c = migrate(&url, dir.path());
            c.arg("upgrade");
            c
        }),
        0,
    );

    let holder = LockHolder::hold(&url);
    // Up to date: succeeds at once although the lock is held (and it may not wait for it).
    let o = run({
        let mut c = migrate(&url, dir.path());
        c.args(["upgrade", "--lock-timeout", "0"]);
        c
    });
    assert_code(&o, 0);

    // Pending: waits for the lock, gives up, and says who holds it.
    dir.pair("11", "more", "CREATE TABLE more_t (x INTEGER);\n", None);
    let o = run({
        let mut c = migrate(&url, dir.path());
        c.args(["upgrade", "--lock-timeout", "1s", "-o", "json"]);
        c
    });
    assert_code(&o, 14);
    let e = stdout_json(&o);
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("lock-holder-under-test"),
        "{}",
        text(&o)
    );
    let o = run({
        let mut c = migrate(&url, dir.path());
        c.args(["status", "-o", "json"]);
        c
    });
    assert_code(&o, 3);
    assert!(
        stdout_json(&o)["lockHolder"]["who"]
            .as_str()
            .unwrap()
            .contains("lock-holder-under-test")
    );
    drop(holder);
    let o = run({
        let mut c = migrate(&url, dir.path());
        c.args(["upgrade", "--lock-timeout", "30s"]);
        c
    });
    assert_code(&o, 0);
}

#[test]
fn create_index_concurrently_needs_and_works_without_a_transaction() {
    let url = server().fresh_db();
    let dir = MigDir::new();
    dir.pair("1", "t", "CREATE TABLE big (id INTEGER, v TEXT);\nINSERT INTO big SELECT g, md5(g::text) FROM generate_series(1, 1000) g;\n", None);
    dir.pair(
        "2",
        "idx",
        "CREATE INDEX CONCURRENTLY big_v ON big (v);\n",
        None,
    );
    let o = run({
        let mut c = migrate(&url, dir.path());
        c.arg("upgrade");
        c
    });
    assert_code(&o, 12);
    assert!(
        text(&o).contains("no-transaction"),
        "the hint names the fix: {}",
        text(&o)
    );
    dir.file(
        "2_idx.up.sql",
        "-- schemagate:no-transaction\nCREATE INDEX CONCURRENTLY big_v ON big (v);\n",
    );
    let o = run({
        let mut c = migrate(&url, dir.path());
        c.arg("upgrade");
        c
    });
    assert_code(&o, 0);
    assert_eq!(
        count(
            &url,
            "SELECT CASE WHEN to_regclass('big_v') IS NULL THEN '0' ELSE '1' END"
        ),
        1
    );
    assert_eq!(
        count(
            &url,
            "SELECT CAST(count(*) AS TEXT) FROM schemagate_history WHERE version = '2' AND success AND NOT transactional"
        ),
        1
    );
}

fn assert_no_secret(o: &std::process::Output, secret: &str) {
    for (name, bytes) in [("stdout", &o.stdout), ("stderr", &o.stderr)] {
        let s = String::from_utf8_lossy(bytes);
        assert!(!s.contains(secret), "{name} leaks the password: {s}");
    }
}

#[test]
fn connection_failures_are_clear_and_never_leak_the_password() {
    let dir = MigDir::new();
    scenarios::standard(&dir);
    let secret = "Sup3r-Secret-Pw";
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cases = [
        (
            format!("postgres://app:{secret}@127.0.0.1:{closed_port}/db?sslmode=disable"),
            "check the host and port",
        ),
        (
            format!(
                "postgres://postgres:{secret}@127.0.0.1:{}/postgres?sslmode=disable",
                server().port
            ),
            "password",
        ),
        (server().url("no_such_database"), "does not exist"),
    ];
    for (url, expect) in &cases {
        for output in ["human", "json"] {
            let summary = dir.path().join("summary.json");
            let o = run({
                let mut c = migrate(url, dir.path());
                c.args([
                    "upgrade",
                    "-o",
                    output,
                    "--connect-timeout",
                    "5s",
                    "--summary-file",
                ])
                .arg(&summary);
                c
            });
            assert_code(&o, 11);
            let all = text(&o);
            assert!(
                all.to_lowercase().contains(expect),
                "{expect:?} missing: {all}"
            );
            assert_no_secret(&o, secret);
            assert_no_secret(&o, PASSWORD);
            let s = std::fs::read_to_string(&summary).unwrap();
            assert!(
                !s.contains(secret) && !s.contains(PASSWORD),
                "summary leaks: {s}"
            );
            assert!(s.contains("\"exitCode\":11"), "{s}");
        }
    }
}

#[test]
fn successful_runs_never_print_the_password() {
    let url = server().fresh_db();
    let dir = MigDir::new();
    scenarios::standard(&dir);
    for args in [
        &["upgrade"][..],
        &["status"],
        &["status", "-o", "json"],
        &["history"],
        &["plan", "-1"],
        &["current", "--log-level", "trace"],
    ] {
        let o = run({
            let mut c = migrate(&url, dir.path());
            c.args(args);
            c
        });
        assert!(o.status.success(), "{}", text(&o));
        assert_no_secret(&o, PASSWORD);
        assert_no_secret(&o, &PASSWORD.replace('&', "%26"));
    }
}

#[test]
fn examples_migrate_up_and_down() {
    let url = server().fresh_db();
    let examples =
        std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/migrations"));
    for (args, expect) in [
        (&["upgrade"][..], 0),
        (&["status"], 0),
        (&["downgrade", "base"], 0),
        (&["status"], 3),
    ] {
        let o = run({
            let mut c = migrate(&url, examples);
            c.args(args);
            c
        });
        assert_code(&o, expect);
    }
}

#[test]
fn a_migration_changing_the_search_path_cannot_redirect_the_history() {
    let url = server().fresh_db();
    let dir = MigDir::new();
    dir.pair(
        "1",
        "app_schema",
        "CREATE SCHEMA app;\nSET search_path = app;\nCREATE TABLE app_t (x INTEGER);\n",
        None,
    );
    dir.pair("2", "public_t", "CREATE TABLE t2 (x INTEGER);\n", None);
    dir.pair(
        "3",
        "non_tx",
        "-- schemagate:no-transaction\nSET search_path = app;\nCREATE TABLE app_t3 (x INTEGER);\n",
        None,
    );
    dir.pair("4", "public_t4", "CREATE TABLE t4 (x INTEGER);\n", None);
    let o = run({
        let mut c = migrate(&url, dir.path());
        c.arg("upgrade");
        c
    });
    assert_code(&o, 0);
    let exists = |t: &str| {
        count(
            &url,
            &format!("SELECT CASE WHEN to_regclass('{t}') IS NULL THEN '0' ELSE '1' END"),
        ) == 1
    };
    assert!(exists("app.app_t") && exists("app.app_t3"));
    assert!(
        exists("public.t2") && exists("public.t4"),
        "each step starts with the default search path"
    );
    assert!(!exists("app.schemagate_history"));
    assert_eq!(
        count(
            &url,
            "SELECT CAST(count(*) AS TEXT) FROM public.schemagate_history WHERE success"
        ),
        4
    );
    let o = run({
        let mut c = migrate(&url, dir.path());
        c.args(["status", "--history-table", "public.schemagate_history"]);
        c
    });
    assert_code(&o, 0);
}
