//! The engine against SQLite files.

mod support;

use std::fs::{File, OpenOptions, TryLockError};
use std::time::Duration;

use support::scenarios::{self, DbKind};
use support::*;

struct Lite;

/// Rows the slow recursive query counts per second of wanted duration; generous, since the
/// test only needs "long enough to kill it in the middle".
const ROWS_PER_SEC: u64 = 4_000_000;

fn lock_file(url: &str) -> String {
    format!("{}.schemagate-lock", url.trim_start_matches("sqlite:"))
}

/// True when another process holds the file lock.
fn locked(path: &str) -> bool {
    let Ok(f) = OpenOptions::new().read(true).write(true).open(path) else {
        return false;
    };
    match f.try_lock() {
        Ok(()) => {
            let _ = f.unlock();
            false
        }
        Err(TryLockError::WouldBlock) => true,
        Err(TryLockError::Error(e)) => panic!("{e}"),
    }
}

/// True when a writer holds SQLite's write lock (a step's BEGIN IMMEDIATE).
fn write_locked(url: &str) -> bool {
    use sqlx::{ConnectOptions, Connection};
    use std::str::FromStr;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let opts = sqlx::sqlite::SqliteConnectOptions::from_str(url)
            .unwrap()
            .busy_timeout(Duration::ZERO);
        let mut c = opts.connect().await.unwrap();
        let busy = sqlx::raw_sql("BEGIN IMMEDIATE")
            .execute(&mut c)
            .await
            .is_err();
        if !busy {
            let _ = sqlx::raw_sql("ROLLBACK").execute(&mut c).await;
        }
        let _ = c.close().await;
        busy
    })
}

impl DbKind for Lite {
    fn fresh(&self) -> String {
        let dir = tempfile::tempdir().unwrap().keep();
        format!("sqlite:{}", dir.join("app.db").display())
    }
    fn slow(&self, secs: u32) -> String {
        format!(
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {}) SELECT count(*) FROM c",
            ROWS_PER_SEC * u64::from(secs)
        )
    }
    fn table_exists_sql(&self, table: &str) -> String {
        format!("SELECT CAST(count(*) AS TEXT) FROM sqlite_master WHERE name = '{table}'")
    }
    fn wait_lock_released(&self, url: &str) {
        let path = lock_file(url);
        wait_for(
            "the dead runner's file lock to be released",
            Duration::from_secs(30),
            || !locked(&path),
        );
    }
    fn change_type(&self, _: &str, _: &str, _: &str) -> Option<String> {
        None // SQLite cannot change a column's type in place
    }
    fn wait_running(&self, url: &str, transactional: bool) {
        wait_for("the slow statement to run", Duration::from_secs(30), || {
            if transactional {
                // The step holds SQLite's write lock from its BEGIN IMMEDIATE on.
                return write_locked(url);
            }
            // A non-transactional step records progress after each statement.
            count(
                url,
                "SELECT CAST(count(*) AS TEXT) FROM sqlite_master WHERE name = 'schemagate_history'",
            ) == 1
                && count(
                    url,
                    "SELECT CAST(count(*) AS TEXT) FROM schemagate_history WHERE success IS NULL AND statements_done >= 1",
                ) == 1
        });
    }
}

#[test]
fn lifecycle() {
    scenarios::lifecycle(&Lite);
}

#[test]
fn twenty_concurrent_runners_apply_each_migration_once() {
    scenarios::concurrent_runners(&Lite, 20);
}

#[test]
fn kill9_mid_transactional_migration() {
    scenarios::kill9_transactional(&Lite);
}

#[test]
fn kill9_mid_non_transactional_migration() {
    scenarios::kill9_non_transactional(&Lite);
}

#[test]
fn dirty_downgrade_is_resolved() {
    scenarios::dirty_downgrade_is_resolved(&Lite);
}

#[test]
fn destructive_guard() {
    scenarios::destructive_guard(&Lite);
}

#[test]
fn drift_is_detected() {
    scenarios::drift(&Lite);
}

#[test]
fn failing_migration_rolls_back_and_names_the_statement() {
    scenarios::failing_migration(&Lite);
}

#[test]
fn downgrade_needs_every_down_script() {
    scenarios::downgrade_needs_every_down_script(&Lite);
}

#[test]
fn stamp_adopts_an_existing_schema() {
    scenarios::stamp_adopts(&Lite);
}

#[test]
fn empty_scripts_are_refused_unless_marked() {
    scenarios::empty_scripts_are_refused(&Lite);
}

#[test]
fn plan_and_status_change_nothing() {
    scenarios::plan_and_status(&Lite);
}

#[test]
fn wait_blocks_until_the_version_is_reached() {
    scenarios::wait_for_version(&Lite);
}

#[test]
fn foreign_formats_run_as_they_are() {
    scenarios::foreign_formats(&Lite);
}

#[test]
fn noop_upgrade_takes_no_lock_and_a_busy_lock_names_its_holder() {
    let db = sqlite_db();
    let dir = MigDir::new();
    scenarios::standard(&dir);
    assert_code(
        &run({
            let mut c = migrate(&db.url, dir.path());
            c.arg("upgrade");
            c
        }),
        0,
    );
    // Hold the run lock the way another runner would.
    let f = File::options()
        .read(true)
        .write(true)
        .open(lock_file(&db.url))
        .unwrap();
    f.try_lock().unwrap();
    std::fs::write(
        lock_file(&db.url),
        r#"{"who":"other-runner/42","since_ms":0}"#,
    )
    .unwrap();
    let o = run({
        let mut c = migrate(&db.url, dir.path());
        c.args(["upgrade", "--lock-timeout", "0"]);
        c
    });
    assert_code(&o, 0);
    dir.pair("11", "more", "CREATE TABLE more_t (x INTEGER);\n", None);
    let o = run({
        let mut c = migrate(&db.url, dir.path());
        c.args(["upgrade", "--lock-timeout", "500ms"]);
        c
    });
    assert_code(&o, 14);
    assert!(text(&o).contains("other-runner/42"), "{}", text(&o));
    f.unlock().unwrap();
    let o = run({
        let mut c = migrate(&db.url, dir.path());
        c.arg("upgrade");
        c
    });
    assert_code(&o, 0);
}

#[test]
fn read_commands_never_create_the_database_file() {
    let db = sqlite_db();
    let dir = MigDir::new();
    scenarios::standard(&dir);
    for args in [
        &["status"][..],
        &["current"],
        &["history"],
        &["verify"],
        &["plan"],
    ] {
        let o = run({
            let mut c = migrate(&db.url, dir.path());
            c.args(args);
            c
        });
        assert!(matches!(code(&o), 0 | 3), "{args:?}: {}", text(&o));
        assert!(!db.path.exists(), "{args:?} created the database file");
    }
    let o = run({
        let mut c = migrate(&db.url, dir.path());
        c.args(["downgrade", "base"]);
        c
    });
    assert_code(&o, 0);
    assert!(
        !db.path.exists(),
        "a no-op downgrade created the database file"
    );
}

/// A migration that switches foreign keys on cannot make a later table rebuild cascade into
/// child rows: each step starts with SQLite's default (off) again.
#[test]
fn foreign_keys_switched_on_by_a_migration_do_not_leak_into_the_next() {
    let db = sqlite_db();
    let dir = MigDir::new();
    dir.pair(
        "1",
        "tables",
        "CREATE TABLE parent (id INTEGER PRIMARY KEY);\n\
         CREATE TABLE child (id INTEGER PRIMARY KEY, parent_id INTEGER REFERENCES parent (id) ON DELETE CASCADE);\n\
         INSERT INTO parent VALUES (1);\nINSERT INTO child VALUES (1, 1);\n",
        None,
    );
    dir.pair(
        "2",
        "fk_on",
        "-- schemagate:no-transaction\nPRAGMA foreign_keys = ON;\n",
        None,
    );
    dir.pair(
        "3",
        "rebuild_parent",
        "-- schemagate:allow-destructive the rebuild keeps every row\n\
         CREATE TABLE parent_new (id INTEGER PRIMARY KEY, name TEXT);\n\
         INSERT INTO parent_new (id) SELECT id FROM parent;\n\
         DROP TABLE parent;\nALTER TABLE parent_new RENAME TO parent;\n",
        None,
    );
    let o = run({
        let mut c = migrate(&db.url, dir.path());
        c.arg("upgrade");
        c
    });
    assert_code(&o, 0);
    assert_eq!(
        count(&db.url, "SELECT count(*) FROM child"),
        1,
        "the rebuild kept the child rows"
    );
}
