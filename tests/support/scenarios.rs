//! The scenario suite every dialect must pass, against a real server (or file).

use std::time::Duration;

use super::*;

/// What a scenario needs to know about a database kind.
pub trait DbKind: Sync {
    /// A new, empty database.
    fn fresh(&self) -> String;
    /// A statement that keeps the server busy for about `secs` seconds.
    fn slow(&self, secs: u32) -> String;
    /// SQL returning 1 if `table` exists, else 0.
    fn table_exists_sql(&self, table: &str) -> String;
    /// Called after a runner was killed: waits until its lock is free.
    fn wait_lock_released(&self, url: &str);
    /// Called once the runner logged that it started a step: waits until the step's slow
    /// statement runs (inside the step's transaction, or after its first statement).
    fn wait_running(&self, url: &str, transactional: bool);
    /// `DROP INDEX` for an index of `table` (MySQL names the table).
    fn drop_index(&self, index: &str, _table: &str) -> String {
        format!("DROP INDEX {index}")
    }
    /// False where DDL commits implicitly (MySQL): a failing DDL migration is then dirty
    /// instead of rolled back.
    fn transactional_ddl(&self) -> bool {
        true
    }
    /// A statement changing `table.column`'s type to `new_type`, if the dialect has one.
    fn change_type(&self, table: &str, column: &str, new_type: &str) -> Option<String> {
        Some(format!(
            "ALTER TABLE {table} ALTER COLUMN {column} TYPE {new_type}"
        ))
    }
}

pub fn table_exists(k: &dyn DbKind, url: &str, table: &str) -> bool {
    count(url, &k.table_exists_sql(table)) == 1
}

fn history_count(url: &str, filter: &str) -> i64 {
    count(
        url,
        &format!("SELECT count(*) FROM schemagate_history WHERE {filter}"),
    )
}

fn items_count(url: &str) -> i64 {
    count(url, "SELECT count(*) FROM items")
}

/// Four reversible migrations used by most scenarios.
pub fn standard(dir: &MigDir) {
    standard_for(dir, "DROP INDEX items_name");
}

/// The standard set with a dialect's `DROP INDEX`.
pub fn standard_for(dir: &MigDir, drop_index: &str) {
    dir.pair(
        "1",
        "create_items",
        "CREATE TABLE items (id INTEGER PRIMARY KEY, name VARCHAR(100) NOT NULL);\n",
        Some("DROP TABLE items;\n"),
    )
    .pair(
        "2",
        "add_qty",
        "ALTER TABLE items ADD COLUMN qty INTEGER NOT NULL DEFAULT 0;\n",
        Some("ALTER TABLE items DROP COLUMN qty;\n"),
    )
    .pair(
        "3",
        "create_orders",
        "CREATE TABLE orders (id INTEGER PRIMARY KEY, item_id INTEGER NOT NULL);\n\
         -- a comment; with a semicolon\nINSERT INTO orders (id, item_id) VALUES (1, 1);\n",
        Some("DROP TABLE orders;\n"),
    )
    .pair(
        "10",
        "index_names",
        "CREATE INDEX items_name ON items (name);\n",
        Some(&format!("{drop_index};\n")),
    );
}

fn standard_of(k: &dyn DbKind, dir: &MigDir) {
    standard_for(dir, &k.drop_index("items_name", "items"));
}

fn current(url: &str, dir: &MigDir) -> Option<String> {
    let o = run({
        let mut c = migrate(url, dir.path());
        c.args(["current", "-o", "json"]);
        c
    });
    assert_code(&o, 0);
    stdout_json(&o)["current"].as_str().map(str::to_string)
}

fn cmd(url: &str, dir: &MigDir, args: &[&str]) -> std::process::Output {
    let mut c = migrate(url, dir.path());
    c.args(args);
    run(c)
}

/// Upgrade from empty, to a target, downgrade by one and to a target, re-upgrade; rows
/// survive every step and every process; history and current agree with what ran.
pub fn lifecycle(k: &dyn DbKind) {
    let url = k.fresh();
    let dir = MigDir::new();
    standard_of(k, &dir);

    assert_eq!(current(&url, &dir), None);
    assert!(
        !table_exists(k, &url, "schemagate_history"),
        "read commands must not create the history table"
    );

    let o = cmd(&url, &dir, &["upgrade", "2"]);
    assert_code(&o, 0);
    assert_eq!(current(&url, &dir).as_deref(), Some("2"));
    exec(
        &url,
        "INSERT INTO items (id, name, qty) VALUES (1, 'apple', 3), (2, 'pear', 5)",
    );

    let o = cmd(&url, &dir, &["upgrade"]);
    assert_code(&o, 0);
    assert_eq!(
        current(&url, &dir).as_deref(),
        Some("10"),
        "numeric order: 10 after 3"
    );
    assert_eq!(items_count(&url), 2);
    assert!(table_exists(k, &url, "orders"));

    let o = cmd(&url, &dir, &["downgrade"]);
    assert_code(&o, 0);
    assert_eq!(current(&url, &dir).as_deref(), Some("3"));
    assert_eq!(items_count(&url), 2);

    let o = cmd(&url, &dir, &["downgrade", "1"]);
    assert_code(&o, 0);
    assert_eq!(current(&url, &dir).as_deref(), Some("1"));
    assert!(!table_exists(k, &url, "orders"));
    assert_eq!(
        items_count(&url),
        2,
        "downgrade must keep the rows of tables it does not revert"
    );

    exec(&url, "INSERT INTO items (id, name) VALUES (3, 'plum')");
    let o = cmd(&url, &dir, &["upgrade", "-o", "json"]);
    assert_code(&o, 0);
    let report = stdout_json(&o);
    let applied: Vec<&str> = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["version"].as_str().unwrap())
        .collect();
    assert_eq!(applied, ["2", "3", "10"]);
    assert_eq!(items_count(&url), 3);
    assert_eq!(
        count(&url, "SELECT count(*) FROM items WHERE qty <> 0"),
        0,
        "re-added column starts at its default"
    );

    // History agrees with what ran: 1,2,3,10 up; 10,3,2 down; 2,3,10 up again.
    assert_eq!(history_count(&url, "kind = 'up' AND success = TRUE"), 7);
    assert_eq!(history_count(&url, "kind = 'down' AND success = TRUE"), 3);
    assert_eq!(history_count(&url, "success IS NULL OR success = FALSE"), 0);
    let o = cmd(&url, &dir, &["history", "-o", "json"]);
    assert_code(&o, 0);
    assert_eq!(stdout_json(&o)["entries"].as_array().unwrap().len(), 10);

    // A no-op upgrade changes nothing and reports so.
    let o = cmd(&url, &dir, &["upgrade", "-o", "json"]);
    assert_code(&o, 0);
    assert_eq!(stdout_json(&o)["noop"], true);
    assert_eq!(history_count(&url, "1 = 1"), 10);

    let o = cmd(&url, &dir, &["status"]);
    assert_code(&o, 0);

    // Downgrade to base and back, by a relative count.
    let o = cmd(&url, &dir, &["downgrade", "base"]);
    assert_code(&o, 0);
    assert!(!table_exists(k, &url, "items"));
    let o = cmd(&url, &dir, &["upgrade", "+2"]);
    assert_code(&o, 0);
    assert_eq!(current(&url, &dir).as_deref(), Some("2"));
}

/// `n` processes started at once: all exit 0, each migration applied exactly once.
pub fn concurrent_runners(k: &dyn DbKind, n: usize) {
    let url = k.fresh();
    let dir = MigDir::new();
    standard_of(k, &dir);
    // Widen the race window: the first migration takes a moment.
    dir.pair("0", "slow_start", &format!("{};\n", k.slow(1)), None);
    let children: Vec<_> = (0..n)
        .map(|i| {
            let mut c = migrate(&url, dir.path());
            c.args(["upgrade", "--runner-id", &format!("runner-{i}")])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped());
            c.spawn().expect("spawn runner")
        })
        .collect();
    for child in children {
        let o = child.wait_with_output().expect("wait runner");
        assert_code(&o, 0);
    }
    for v in ["0", "1", "2", "3", "10"] {
        assert_eq!(
            history_count(
                &url,
                &format!("version = '{v}' AND kind = 'up' AND success = TRUE")
            ),
            1,
            "version {v} must be applied exactly once"
        );
    }
    assert_eq!(history_count(&url, "1 = 1"), 5, "no failed or extra rows");
    assert_eq!(
        count(&url, "SELECT count(*) FROM orders"),
        1,
        "the INSERT of 3 ran once"
    );
    assert!(table_exists(k, &url, "items"));
}

/// `kill -9` in the middle of a slow transactional migration: no history row for it, no
/// lock left; the next run applies it.
pub fn kill9_transactional(k: &dyn DbKind) {
    let url = k.fresh();
    let dir = MigDir::new();
    dir.pair("1", "first", "CREATE TABLE first_t (x INTEGER);\n", None);
    // Data statements only, so the step is transactional on every dialect (MySQL included).
    dir.pair(
        "2",
        "slow",
        &format!(
            "INSERT INTO first_t (x) VALUES (1);\n{};\nINSERT INTO first_t (x) VALUES (2);\n",
            k.slow(3)
        ),
        None,
    );
    let mut w = Watched::spawn({
        let mut c = migrate(&url, dir.path());
        c.arg("upgrade");
        c
    });
    w.wait_line("applying version=2", Duration::from_secs(60));
    k.wait_running(&url, true);
    w.kill9();
    k.wait_lock_released(&url);
    assert_eq!(
        history_count(&url, "version = '2'"),
        0,
        "a killed transactional step leaves no row"
    );
    assert_eq!(history_count(&url, "version = '1' AND success = TRUE"), 1);
    assert_eq!(
        count(&url, "SELECT count(*) FROM first_t"),
        0,
        "the killed step's changes roll back"
    );

    let o = cmd(&url, &dir, &["upgrade", "--lock-timeout", "30s"]);
    assert_code(&o, 0);
    assert_eq!(count(&url, "SELECT count(*) FROM first_t"), 2);
    assert_eq!(history_count(&url, "version = '2' AND success = TRUE"), 1);
}

/// `kill -9` in the middle of a non-transactional migration: the next run reports the
/// dirty step (never re-runs or skips it) until a person resolves it.
pub fn kill9_non_transactional(k: &dyn DbKind) {
    let url = k.fresh();
    let dir = MigDir::new();
    dir.pair("1", "first", "CREATE TABLE first_t (x INTEGER);\n", None);
    dir.pair(
        "2",
        "no_tx",
        &format!(
            "-- schemagate:no-transaction\nCREATE TABLE nt_a (x INTEGER);\n{};\nCREATE TABLE nt_b (x INTEGER);\n",
            k.slow(3)
        ),
        None,
    );
    dir.pair("3", "after", "CREATE TABLE after_t (x INTEGER);\n", None);
    let mut w = Watched::spawn({
        let mut c = migrate(&url, dir.path());
        c.arg("upgrade");
        c
    });
    w.wait_line("applying version=2", Duration::from_secs(60));
    k.wait_running(&url, false);
    w.kill9();
    k.wait_lock_released(&url);

    let o = cmd(&url, &dir, &["upgrade"]);
    assert_code(&o, 13);
    let t = text(&o);
    assert!(
        t.contains("step 2") && t.contains("1 of 3 statements"),
        "{t}"
    );
    assert!(t.contains("resolve 2"), "the hint names the next step: {t}");
    assert!(
        !table_exists(k, &url, "after_t"),
        "nothing runs past a dirty step"
    );

    let o = cmd(&url, &dir, &["status", "-o", "json"]);
    assert_code(&o, 4);
    let st = stdout_json(&o);
    assert_eq!(st["verdict"], "dirty");
    assert_eq!(st["unfinished"]["version"], "2");
    assert_eq!(st["unfinished"]["statementsDone"], 1);

    // Resolving a version that is not the unfinished one is refused.
    let o = cmd(&url, &dir, &["resolve", "3", "--reverted"]);
    assert_code(&o, 16);
    // The person undoes statement 1 and records it; the next upgrade runs 2 and 3.
    exec(&url, "DROP TABLE nt_a");
    let o = cmd(
        &url,
        &dir,
        &["resolve", "2", "--reverted", "-m", "dropped nt_a by hand"],
    );
    assert_code(&o, 0);
    let o = cmd(&url, &dir, &["upgrade"]);
    assert_code(&o, 0);
    assert!(table_exists(k, &url, "nt_b") && table_exists(k, &url, "after_t"));
    assert_eq!(history_count(&url, "kind = 'mark_reverted'"), 1);
}

/// A non-transactional down script that fails part-way is dirty; `resolve --reverted`
/// records the version as gone, and the next upgrade applies it again.
pub fn dirty_downgrade_is_resolved(k: &dyn DbKind) {
    let url = k.fresh();
    let dir = MigDir::new();
    dir.pair(
        "1",
        "two_tables",
        "CREATE TABLE da (x INTEGER);\nCREATE TABLE db (x INTEGER);\n",
        Some("-- schemagate:no-transaction\nDROP TABLE da;\nDROP TABLE no_such_table;\nDROP TABLE db;\n"),
    );
    assert_code(&cmd(&url, &dir, &["upgrade"]), 0);
    let o = cmd(&url, &dir, &["downgrade"]);
    assert_code(&o, 12);
    assert!(
        text(&o).contains("--reverted` if 1's changes are now all gone"),
        "{}",
        text(&o)
    );
    let o = cmd(&url, &dir, &["status", "-o", "json"]);
    assert_code(&o, 4);
    let st = stdout_json(&o);
    assert_eq!(st["unfinished"]["kind"], "down");
    assert_eq!(st["unfinished"]["statementsDone"], 1);
    assert_eq!(
        st["current"], "1",
        "the version stays applied until resolved"
    );
    // Finish the down script by hand, then record that 1 is gone.
    exec(&url, "DROP TABLE db");
    assert_code(&cmd(&url, &dir, &["resolve", "1", "--reverted"]), 0);
    assert_eq!(current(&url, &dir), None);
    assert_code(&cmd(&url, &dir, &["upgrade"]), 0);
    assert!(table_exists(k, &url, "da") && table_exists(k, &url, "db"));
}

/// Editing an applied file is found by verify, status and upgrade.
pub fn drift(k: &dyn DbKind) {
    let url = k.fresh();
    let dir = MigDir::new();
    standard_of(k, &dir);
    assert_code(&cmd(&url, &dir, &["upgrade"]), 0);
    dir.file(
        "2_add_qty.up.sql",
        "ALTER TABLE items ADD COLUMN qty INTEGER NOT NULL DEFAULT 1;\n",
    );
    dir.pair("11", "more", "CREATE TABLE more_t (x INTEGER);\n", None);

    let o = cmd(&url, &dir, &["verify"]);
    assert_code(&o, 4);
    assert!(text(&o).contains("2_add_qty.up.sql"), "{}", text(&o));
    let o = cmd(&url, &dir, &["status", "-o", "json"]);
    assert_code(&o, 4);
    assert_eq!(
        stdout_json(&o)["drift"]["changed"][0]["file"],
        "2_add_qty.up.sql"
    );
    let o = cmd(&url, &dir, &["upgrade"]);
    assert_code(&o, 13);
    let t = text(&o);
    assert!(
        t.contains("2_add_qty.up.sql") && t.contains("recorded"),
        "{t}"
    );
    assert!(!table_exists(k, &url, "more_t"), "nothing runs on drift");

    // Whitespace-only edits pass in normalized mode, not in strict mode.
    dir.file(
        "2_add_qty.up.sql",
        "ALTER TABLE items ADD COLUMN qty INTEGER NOT NULL DEFAULT 0;   \r\n\r\n",
    );
    assert_code(&cmd(&url, &dir, &["verify"]), 4);
    assert_code(&cmd(&url, &dir, &["verify", "--checksum", "normalized"]), 0);
    assert_code(
        &cmd(&url, &dir, &["upgrade", "--checksum", "normalized"]),
        0,
    );
    assert!(table_exists(k, &url, "more_t"));
}

/// A SQL error in migration N: N-1 stays applied, N is not applied, the error names the
/// file and the statement.
pub fn failing_migration(k: &dyn DbKind) {
    let url = k.fresh();
    let dir = MigDir::new();
    dir.pair("1", "ok", "CREATE TABLE ok_t (x INTEGER);\n", None);
    dir.pair(
        "2",
        "broken",
        "CREATE TABLE half_t (x INTEGER);\nINSERT INTO no_such_table VALUES (1);\nCREATE TABLE never_t (x INTEGER);\n",
        None,
    );
    let summary = dir.path().join("summary.json");
    let mut c = migrate(&url, dir.path());
    c.args(["upgrade", "--summary-file"]).arg(&summary);
    let o = run(c);
    assert_code(&o, 12);
    let t = text(&o);
    assert!(t.contains("2_broken.up.sql"), "{t}");
    assert!(
        t.contains("statement 2 of 3") && t.contains("line 2"),
        "{t}"
    );
    assert!(t.contains("no_such_table"), "{t}");
    assert_eq!(current(&url, &dir).as_deref(), Some("1"));
    assert_eq!(history_count(&url, "version = '2' AND success = TRUE"), 0);
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    assert_eq!(s["result"], "failed");
    assert_eq!(s["applied"], serde_json::json!(["1"]));
    assert_eq!(s["failedVersion"], "2");
    assert_eq!(s["failedLine"], 2);

    if k.transactional_ddl() {
        assert!(
            !table_exists(k, &url, "half_t"),
            "the failed migration rolled back"
        );
        assert_eq!(
            history_count(&url, "version = '2' AND success = FALSE"),
            1,
            "the failure is audited"
        );
        // JSON errors carry the same facts.
        let o = cmd(&url, &dir, &["upgrade", "-o", "json"]);
        assert_code(&o, 12);
        let e = stdout_json(&o);
        assert_eq!(e["error"]["kind"], "migration_failed");
        assert_eq!(e["error"]["details"]["statementNumber"], 2);
        assert_eq!(e["error"]["exitCode"], 12);
    } else {
        // DDL committed as it ran: the step is dirty with its progress, and blocks.
        assert!(
            table_exists(k, &url, "half_t"),
            "statement 1 committed implicitly"
        );
        let o = cmd(&url, &dir, &["status", "-o", "json"]);
        assert_code(&o, 4);
        assert_eq!(stdout_json(&o)["unfinished"]["statementsDone"], 1);
        assert_code(&cmd(&url, &dir, &["upgrade"]), 13);
        exec(&url, "DROP TABLE half_t");
        assert_code(&cmd(&url, &dir, &["resolve", "2", "--reverted"]), 0);
    }

    // Fixed, it applies; earlier failures do not block.
    dir.file("2_broken.up.sql", "CREATE TABLE half_t (x INTEGER);\n");
    assert_code(&cmd(&url, &dir, &["upgrade"]), 0);
    assert!(table_exists(k, &url, "half_t"));
}

/// A downgrade that would need a missing down script refuses before running anything.
pub fn downgrade_needs_every_down_script(k: &dyn DbKind) {
    let url = k.fresh();
    let dir = MigDir::new();
    dir.pair(
        "1",
        "a",
        "CREATE TABLE a_t (x INTEGER);\n",
        Some("DROP TABLE a_t;\n"),
    );
    dir.pair("2", "b", "CREATE TABLE b_t (x INTEGER);\n", None);
    dir.pair(
        "3",
        "c",
        "CREATE TABLE c_t (x INTEGER);\n",
        Some("DROP TABLE c_t;\n"),
    );
    assert_code(&cmd(&url, &dir, &["upgrade"]), 0);
    let o = cmd(&url, &dir, &["downgrade", "base"]);
    assert_code(&o, 16);
    assert!(text(&o).contains("2 has no down script"), "{}", text(&o));
    assert!(table_exists(k, &url, "c_t"), "nothing was reverted");
    assert_code(&cmd(&url, &dir, &["downgrade", "-1"]), 0);
    assert!(!table_exists(k, &url, "c_t"));
}

/// `stamp` adopts an existing schema; the next upgrade runs only newer migrations.
pub fn stamp_adopts(k: &dyn DbKind) {
    let url = k.fresh();
    let dir = MigDir::new();
    standard_of(k, &dir);
    exec(
        &url,
        "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT NOT NULL)",
    );
    exec(
        &url,
        "ALTER TABLE items ADD COLUMN qty INTEGER NOT NULL DEFAULT 0",
    );
    exec(&url, "INSERT INTO items (id, name) VALUES (1, 'kept')");
    let o = cmd(&url, &dir, &["stamp", "2", "-o", "json"]);
    assert_code(&o, 0);
    assert_eq!(stdout_json(&o)["stamped"], serde_json::json!(["1", "2"]));
    assert_code(&cmd(&url, &dir, &["upgrade"]), 0);
    assert_eq!(items_count(&url), 1);
    assert_eq!(history_count(&url, "kind = 'baseline'"), 2);
    assert_eq!(history_count(&url, "kind = 'up'"), 2);
    assert_code(&cmd(&url, &dir, &["stamp", "1"]), 16);
}

/// `plan` prints SQL and changes nothing; `status` reports pending with exit code 3.
pub fn plan_and_status(k: &dyn DbKind) {
    let url = k.fresh();
    let dir = MigDir::new();
    standard_of(k, &dir);
    let o = cmd(&url, &dir, &["plan"]);
    assert_code(&o, 0);
    let t = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        t.contains("CREATE TABLE IF NOT EXISTS") && t.contains("CREATE INDEX items_name"),
        "{t}"
    );
    assert!(
        t.contains("schemagate_history") && t.contains("(version, description"),
        "the history write is shown: {t}"
    );
    assert!(
        !table_exists(k, &url, "schemagate_history"),
        "plan changes nothing"
    );
    assert!(!table_exists(k, &url, "items"));
    let o = cmd(&url, &dir, &["status", "-o", "json"]);
    assert_code(&o, 3);
    assert_eq!(stdout_json(&o)["pending"].as_array().unwrap().len(), 4);
    assert_code(&cmd(&url, &dir, &["upgrade", "3"]), 0);
    let o = cmd(&url, &dir, &["plan", "-2", "-o", "json"]);
    assert_code(&o, 0);
    let p = stdout_json(&o);
    assert_eq!(p["direction"], "down");
    assert_eq!(p["steps"][0]["version"], "3");
    assert_eq!(p["steps"][1]["version"], "2");
    assert_eq!(current(&url, &dir).as_deref(), Some("3"));
}

/// `wait` blocks until another runner upgrades, and times out with its own exit code.
pub fn wait_for_version(k: &dyn DbKind) {
    let url = k.fresh();
    let dir = MigDir::new();
    standard_of(k, &dir);
    let o = cmd(&url, &dir, &["wait", "--version", "3", "--timeout", "1s"]);
    assert_code(&o, 15);
    let mut w = Watched::spawn({
        let mut c = migrate(&url, dir.path());
        c.args(["wait", "--timeout", "60s"]);
        c
    });
    w.wait_line("waiting for the database", Duration::from_secs(30));
    assert_code(&cmd(&url, &dir, &["upgrade"]), 0);
    let status = w.child.wait().expect("wait process");
    assert_eq!(status.code(), Some(0));
    assert_code(&cmd(&url, &dir, &["wait", "--version", "2"]), 0);
    assert_code(
        &cmd(
            &url,
            &dir,
            &["wait", "--version", "2", "--exact", "--timeout", "1s"],
        ),
        15,
    );
}

/// Flyway, dbmate and sqlx directories run as they are.
pub fn foreign_formats(k: &dyn DbKind) {
    let url = k.fresh();
    let dir = MigDir::new();
    dir.file("V1__create_a.sql", "CREATE TABLE fa (x INTEGER);\n")
        .file("U1__create_a.sql", "DROP TABLE fa;\n")
        .file("V1_1__create_b.sql", "CREATE TABLE fb (x INTEGER);\n");
    assert_code(&cmd(&url, &dir, &["upgrade"]), 0);
    assert_eq!(current(&url, &dir).as_deref(), Some("1.1"));

    let url = k.fresh();
    let dir = MigDir::new();
    dir.file(
        "20240101000000_a.sql",
        "-- migrate:up\nCREATE TABLE da (x INTEGER);\n\n-- migrate:down\nDROP TABLE da;\n",
    )
    .file("20240102000000_b.sql", "CREATE TABLE sb (x INTEGER);\n");
    assert_code(&cmd(&url, &dir, &["upgrade"]), 0);
    assert!(table_exists(k, &url, "da") && table_exists(k, &url, "sb"));
    let o = cmd(&url, &dir, &["downgrade", "base"]);
    assert_code(&o, 16);
    assert_code(&cmd(&url, &dir, &["downgrade", "20240101000000"]), 16);
}

/// Data-losing migrations are refused by default unless they say why; comments and strings
/// that merely contain the words are not statements; the permission is recorded;
/// `--destructive allow` is the explicit way back to running them unrecorded.
pub fn destructive_guard(k: &dyn DbKind) {
    let url = k.fresh();
    let dir = MigDir::new();
    dir.pair(
        "1",
        "people",
        "CREATE TABLE people (id INTEGER PRIMARY KEY, name VARCHAR(100), nick VARCHAR(50));\n\
         INSERT INTO people (id, name, nick) VALUES (1, 'Ada', 'a'), (2, 'Grace', 'g');\n",
        None,
    );
    dir.pair(
        "2",
        "harmless",
        "-- TRUNCATE people; DROP TABLE people (a comment, not a statement)\n\
         INSERT INTO people (id, name) VALUES (3, 'DROP TABLE people; DELETE FROM people');\n",
        None,
    );
    dir.pair(
        "3",
        "drop_nick",
        "SELECT 1;\nALTER TABLE people DROP COLUMN nick;\n",
        None,
    );
    let o = cmd(&url, &dir, &["upgrade"]);
    assert_code(&o, 16);
    let t = text(&o);
    assert!(
        t.contains("3_drop_nick.up.sql line 2") && t.contains("drops a column"),
        "{t}"
    );
    assert!(
        !t.contains("2_harmless"),
        "comments and strings are not flagged: {t}"
    );
    assert!(!table_exists(k, &url, "people"), "nothing ran");

    let o = cmd(&url, &dir, &["plan", "-o", "json"]);
    assert_code(&o, 0);
    let p = stdout_json(&o);
    assert_eq!(p["steps"][2]["destructive"][0]["loss"], "drop-column");
    assert!(p["steps"][1]["destructive"].is_null());

    dir.file(
        "3_drop_nick.up.sql",
        "-- schemagate:allow-destructive nick is unused since v2\nSELECT 1;\nALTER TABLE people DROP COLUMN nick;\n",
    );
    assert_code(&cmd(&url, &dir, &["upgrade"]), 0);
    assert_eq!(
        history_count(
            &url,
            "version = '3' AND note = 'allow-destructive: nick is unused since v2'"
        ),
        1,
        "the permission is recorded"
    );
    assert_eq!(count(&url, "SELECT count(*) FROM people"), 3);

    if let Some(narrow) = k.change_type("people", "name", "VARCHAR(20)") {
        dir.pair("4", "narrow", &format!("{narrow};\n"), None);
        let o = cmd(&url, &dir, &["upgrade"]);
        assert_code(&o, 16);
        let t = text(&o);
        assert!(
            t.contains("narrows a column's type") && t.contains("(100)"),
            "{t}"
        );
        let wide = k.change_type("people", "name", "VARCHAR(200)").unwrap();
        dir.file("4_narrow.up.sql", &format!("{wide};\n"));
        assert_code(&cmd(&url, &dir, &["upgrade"]), 0);
    }
    // Refused by default; `--destructive allow` (or its environment variable) runs it.
    dir.pair("5", "truncate_free", "DELETE FROM people;\n", None);
    assert_code(&cmd(&url, &dir, &["upgrade"]), 16);
    assert_eq!(count(&url, "SELECT count(*) FROM people"), 3, "nothing ran");
    // The old flag is accepted (and changes nothing: refusing is the default).
    assert_code(&cmd(&url, &dir, &["upgrade", "--deny-destructive"]), 16);
    assert_code(&cmd(&url, &dir, &["upgrade", "--destructive", "allow"]), 0);
    assert_eq!(count(&url, "SELECT count(*) FROM people"), 0);
}

/// Every history row, as `history -o json` shows it.
fn history_entries(url: &str, dir: &MigDir) -> Vec<serde_json::Value> {
    let o = cmd(url, dir, &["history", "-o", "json"]);
    assert_code(&o, 0);
    stdout_json(&o)["entries"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// An empty script is not a migration. `new` writes files holding only comments that say
/// what to write; `upgrade` refuses such an up script before anything runs (also when it
/// is the 2nd of 3 pending steps: the 1st is not applied either), `downgrade` refuses such
/// a down script the same way, and `plan`, `status` and `verify` name them. A
/// `-- schemagate:empty <reason>` line lets one through, with the reason in its history row.
pub fn empty_scripts_are_refused(k: &dyn DbKind) {
    let url = k.fresh();
    let dir = MigDir::new();
    dir.pair(
        "1",
        "base",
        "CREATE TABLE base (id INTEGER PRIMARY KEY);\n",
        Some("DROP TABLE base;\n"),
    );
    assert_code(&cmd(&url, &dir, &["upgrade"]), 0);
    let rows_before = history_entries(&url, &dir);

    dir.pair(
        "2",
        "create_widgets",
        "CREATE TABLE widgets (id INTEGER PRIMARY KEY, name VARCHAR(50));\n",
        Some("DROP TABLE widgets;\n"),
    );
    let o = cmd(&url, &dir, &["new", "-m", "fill widgets", "-o", "json"]);
    assert_code(&o, 0);
    assert_eq!(stdout_json(&o)["version"], "3");
    let up = std::fs::read_to_string(dir.path().join("3_fill_widgets.up.sql")).unwrap();
    assert!(
        up.contains("Write this migration's SQL") && up.contains("`-- schemagate:empty <reason>`"),
        "new says what to write: {up}"
    );
    dir.pair(
        "4",
        "create_gadgets",
        "CREATE TABLE gadgets (id INTEGER PRIMARY KEY);\n",
        Some("DROP TABLE gadgets;\n"),
    );

    // The empty step is the 2nd of 3 pending: nothing at all runs.
    let o = cmd(&url, &dir, &["upgrade", "-o", "json"]);
    assert_code(&o, 10);
    let err = &stdout_json(&o)["error"];
    assert_eq!(err["exitCode"], 10, "{err}");
    assert_eq!(err["kind"], "invalid_script", "{err}");
    let message = err["message"].as_str().unwrap();
    assert!(
        message.starts_with("3_fill_widgets.up.sql: has no SQL statement")
            && message.contains("nothing was run"),
        "{message}"
    );
    assert!(
        err["hint"]
            .as_str()
            .unwrap()
            .contains("`-- schemagate:empty <reason>`"),
        "{err}"
    );
    let o = cmd(&url, &dir, &["upgrade"]);
    assert_code(&o, 10);
    assert!(
        text(&o).contains("error: 3_fill_widgets.up.sql: has no SQL statement"),
        "{}",
        text(&o)
    );
    assert!(!table_exists(k, &url, "widgets"), "step 2 must not run");
    assert!(!table_exists(k, &url, "gadgets"));
    assert_eq!(current(&url, &dir).as_deref(), Some("1"));
    assert_eq!(
        history_entries(&url, &dir),
        rows_before,
        "history untouched"
    );

    // plan refuses the same way; status and verify name both of new's files.
    let o = cmd(&url, &dir, &["plan"]);
    assert_code(&o, 10);
    assert!(text(&o).contains("3_fill_widgets.up.sql"), "{}", text(&o));
    let o = cmd(&url, &dir, &["status", "-o", "json"]);
    assert_code(&o, 3);
    let files = |v: &serde_json::Value| -> Vec<(String, String)> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["file"].as_str().unwrap().to_string(),
                    e["direction"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let expected = vec![
        ("3_fill_widgets.up.sql".to_string(), "up".to_string()),
        ("3_fill_widgets.down.sql".to_string(), "down".to_string()),
    ];
    assert_eq!(files(&stdout_json(&o)["emptyScripts"]), expected);
    let o = cmd(&url, &dir, &["status"]);
    assert!(
        text(&o).contains("3_fill_widgets.down.sql: no SQL statement; downgrade refuses it"),
        "{}",
        text(&o)
    );
    let o = cmd(&url, &dir, &["verify", "-o", "json"]);
    assert_code(&o, 10);
    let v = stdout_json(&o);
    assert_eq!(v["ok"], false);
    assert_eq!(files(&v["emptyScripts"]), expected);

    // Filled in, the up script runs; its down script still only holds new's comment.
    dir.file(
        "3_fill_widgets.up.sql",
        &format!("{up}INSERT INTO widgets (id, name) VALUES (1, 'w');\n"),
    );
    assert_code(&cmd(&url, &dir, &["upgrade"]), 0);
    assert_eq!(current(&url, &dir).as_deref(), Some("4"));
    let rows_before = history_entries(&url, &dir);
    let o = cmd(&url, &dir, &["downgrade", "-2", "-o", "json"]);
    assert_code(&o, 10);
    let err = &stdout_json(&o)["error"];
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .starts_with("3_fill_widgets.down.sql: has no SQL statement"),
        "{err}"
    );
    assert!(err["hint"].as_str().unwrap().contains("undoes"), "{err}");
    assert!(
        table_exists(k, &url, "gadgets"),
        "step 4's down script must not run either"
    );
    assert_eq!(current(&url, &dir).as_deref(), Some("4"));
    assert_eq!(
        history_entries(&url, &dir),
        rows_before,
        "history untouched"
    );

    // Empty on purpose: both directions go through, with the reason recorded.
    dir.file(
        "3_fill_widgets.down.sql",
        "-- schemagate:empty the sample rows are harmless; 2's down drops the table\n\
         -- revert: fill widgets\n",
    );
    dir.pair(
        "5",
        "hotfix_placeholder",
        "-- schemagate:empty hotfix 1234 was applied by hand; this records it\n",
        Some("-- schemagate:empty the hotfix stays\n"),
    );
    dir.file(
        "6_contradiction.up.sql",
        "-- schemagate:empty nothing here\nSELECT 1;\n",
    );
    let o = cmd(&url, &dir, &["upgrade", "5"]);
    assert_code(&o, 0);
    let o = cmd(&url, &dir, &["upgrade"]);
    assert_code(&o, 10);
    assert!(
        text(&o).contains("6_contradiction.up.sql: `-- schemagate:empty` says the script has no statement, but it has 1"),
        "{}",
        text(&o)
    );
    std::fs::remove_file(dir.path().join("6_contradiction.up.sql")).unwrap();
    assert_code(&cmd(&url, &dir, &["downgrade", "2"]), 0);
    assert_eq!(current(&url, &dir).as_deref(), Some("2"));
    assert!(table_exists(k, &url, "widgets") && !table_exists(k, &url, "gadgets"));
    let notes: Vec<(String, String, String)> = history_entries(&url, &dir)
        .iter()
        .filter_map(|e| {
            Some((
                e["version"].as_str()?.to_string(),
                e["kind"].as_str()?.to_string(),
                e["note"].as_str()?.to_string(),
            ))
        })
        .collect();
    assert_eq!(
        notes,
        vec![
            (
                "5".to_string(),
                "up".to_string(),
                "empty: hotfix 1234 was applied by hand; this records it".to_string()
            ),
            (
                "5".to_string(),
                "down".to_string(),
                "empty: the hotfix stays".to_string()
            ),
            (
                "3".to_string(),
                "down".to_string(),
                "empty: the sample rows are harmless; 2's down drops the table".to_string()
            ),
        ]
    );
}
