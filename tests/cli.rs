//! Command-line behaviour that does not depend on the database kind: bad input, exit codes,
//! output formats, `new`, `heads`, the run summary. SQLite keeps these fast.

mod support;

use support::*;

fn cmd(url: &str, dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    let mut c = migrate(url, dir);
    c.args(args);
    run(c)
}

#[test]
fn invalid_sources_exit_10_with_the_file_named() {
    let db = sqlite_db();
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (vec![("create_users.sql", "select 1;")], "create_users.sql"),
        (vec![("1-init.up.sql", "select 1;")], "1-init.up.sql"),
        (
            vec![("1_a.up.sql", "select 1;"), ("001_b.up.sql", "select 2;")],
            "defined twice",
        ),
        (vec![("2_x.down.sql", "select 1;")], "without an up script"),
        (vec![("R__views.sql", "select 1;")], "repeatable"),
        (
            vec![("1_a.up.sql", "select 1;\n-- schemagate:no-transaction\n")],
            "line 2",
        ),
        (
            vec![("1_a.up.sql", "-- schemagate:no-transactoin\nselect 1;")],
            "unknown directive",
        ),
        (
            vec![("README.md", "# not a migration")],
            "no migrations found",
        ),
    ];
    for (files, expect) in cases {
        let dir = MigDir::new();
        for (n, t) in &files {
            dir.file(n, t);
        }
        for args in [&["upgrade"][..], &["status"], &["heads"]] {
            let o = cmd(&db.url, dir.path(), args);
            assert_code(&o, 10);
            assert!(
                text(&o).contains(expect),
                "{args:?} {files:?}: {}",
                text(&o)
            );
            assert!(text(&o).contains("hint:"), "{}", text(&o));
        }
    }
    let o = cmd(
        &db.url,
        std::path::Path::new("/nonexistent/migrations"),
        &["upgrade"],
    );
    assert_code(&o, 10);
    assert!(text(&o).contains("does not exist"), "{}", text(&o));
    assert!(!db.path.exists(), "nothing was created");
}

#[test]
fn transaction_control_inside_a_migration_is_refused_before_anything_runs() {
    let db = sqlite_db();
    let dir = MigDir::new();
    dir.pair("1", "ok", "CREATE TABLE a (x INTEGER);\n", None);
    dir.pair(
        "2",
        "bad",
        "CREATE TABLE b (x INTEGER);\nCOMMIT;\nCREATE TABLE c (x INTEGER);\n",
        None,
    );
    let o = cmd(&db.url, dir.path(), &["upgrade"]);
    assert_code(&o, 10);
    assert!(
        text(&o).contains("2_bad.up.sql") && text(&o).contains("line 2"),
        "{}",
        text(&o)
    );
    assert!(!db.path.exists(), "refused before connecting for writes");
    // A whole-file BEGIN/COMMIT wrapper (golang-migrate style) is fine.
    dir.file(
        "2_bad.up.sql",
        "BEGIN;\nCREATE TABLE b (x INTEGER);\nCOMMIT;\n",
    );
    assert_code(&cmd(&db.url, dir.path(), &["upgrade"]), 0);
}

#[test]
fn bad_targets_and_urls() {
    let db = sqlite_db();
    let dir = MigDir::new();
    dir.pair(
        "1",
        "a",
        "CREATE TABLE a (x INTEGER);\n",
        Some("DROP TABLE a;\n"),
    );
    assert_code(&cmd(&db.url, dir.path(), &["upgrade", "banana"]), 2);
    assert_code(&cmd(&db.url, dir.path(), &["upgrade", "7"]), 16);
    assert_code(&cmd(&db.url, dir.path(), &["upgrade", "base"]), 16);
    assert_code(&cmd(&db.url, dir.path(), &["upgrade"]), 0);
    assert_code(&cmd(&db.url, dir.path(), &["downgrade", "-5"]), 16);
    let o = cmd("oracle://x/y", dir.path(), &["status"]);
    assert_code(&o, 11);
    assert!(
        text(&o).contains("unsupported database URL scheme"),
        "{}",
        text(&o)
    );
    let o = cmd("", dir.path(), &["status"]);
    assert_code(&o, 11);
    assert!(text(&o).contains("--database-url"), "{}", text(&o));
    let o = cmd(
        &db.url,
        dir.path(),
        &["upgrade", "--history-table", "x;drop"],
    );
    assert_code(&o, 2);
}

#[test]
fn json_errors_are_one_document_on_stdout() {
    let db = sqlite_db();
    let dir = MigDir::new();
    dir.file("bad name.sql", "select 1;");
    let o = cmd(&db.url, dir.path(), &["upgrade", "-o", "json"]);
    assert_code(&o, 10);
    let v = stdout_json(&o);
    assert_eq!(v["error"]["kind"], "invalid_source");
    assert_eq!(v["error"]["exitCode"], 10);
    assert!(v["error"]["hint"].as_str().is_some());
}

#[test]
fn new_follows_the_directory_format_and_versioning() {
    let db = sqlite_db();
    let dir = MigDir::new();
    let o = cmd(
        &db.url,
        dir.path(),
        &["new", "-m", "Create users!", "-o", "json"],
    );
    assert_code(&o, 0);
    let v = stdout_json(&o);
    let version = v["version"].as_str().unwrap().to_string();
    assert_eq!(version.len(), 14, "a UTC timestamp for the first migration");
    assert!(
        dir.path()
            .join(format!("{version}_create_users.up.sql"))
            .exists()
    );
    assert!(
        dir.path()
            .join(format!("{version}_create_users.down.sql"))
            .exists()
    );
    std::fs::write(
        dir.path().join(format!("{version}_create_users.up.sql")),
        "CREATE TABLE users (id INTEGER);\n",
    )
    .unwrap();
    let o = cmd(&db.url, dir.path(), &["status"]);
    assert_code(&o, 3);
    assert_code(&cmd(&db.url, dir.path(), &["upgrade"]), 0);

    let seq = MigDir::new();
    seq.file("0001_init.up.sql", "select 1;");
    let o = cmd(
        &db.url,
        seq.path(),
        &["new", "-m", "second one", "--no-down"],
    );
    assert_code(&o, 0);
    assert!(seq.path().join("0002_second_one.up.sql").exists());
    assert!(!seq.path().join("0002_second_one.down.sql").exists());

    let fly = MigDir::new();
    fly.file("V1__init.sql", "select 1;");
    assert_code(&cmd(&db.url, fly.path(), &["new", "-m", "next"]), 0);
    assert!(fly.path().join("V2__next.sql").exists() && fly.path().join("U2__next.sql").exists());

    let dbm = MigDir::new();
    dbm.file(
        "20240101000000_init.sql",
        "-- migrate:up\nselect 1;\n-- migrate:down\nselect 2;\n",
    );
    let o = cmd(
        &db.url,
        dbm.path(),
        &["new", "-m", "more", "--version", "20240102000000"],
    );
    assert_code(&o, 0);
    let t = std::fs::read_to_string(dbm.path().join("20240102000000_more.sql")).unwrap();
    assert!(t.contains("-- migrate:up") && t.contains("-- migrate:down"));
    assert_code(
        &cmd(
            &db.url,
            dbm.path(),
            &["new", "-m", "dup", "--version", "20240102000000"],
        ),
        16,
    );
}

#[test]
fn heads_needs_no_database() {
    let dir = MigDir::new();
    dir.pair("2", "b", "select 1;", None)
        .pair("10", "j", "select 1;", None);
    let o = cmd("", dir.path(), &["heads", "-o", "json"]);
    assert_code(&o, 0);
    assert_eq!(stdout_json(&o)["heads"][0]["version"], "10");
}

#[test]
fn summary_file_is_one_json_line() {
    let db = sqlite_db();
    let dir = MigDir::new();
    dir.pair("1", "a", "CREATE TABLE a (x INTEGER);\n", None);
    dir.pair("2", "b", "CREATE TABLE b (x INTEGER);\n", None);
    let summary = dir.path().join("termination-log");
    let mut c = migrate(&db.url, dir.path());
    c.arg("upgrade").env("SCHEMAGATE_SUMMARY_FILE", &summary);
    assert_code(&run(c), 0);
    let line = std::fs::read_to_string(&summary).unwrap();
    assert_eq!(line.lines().count(), 1);
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["result"], "success");
    assert_eq!(v["applied"], serde_json::json!(["1", "2"]));
    assert_eq!(v["to"], "2");
    assert_eq!(v["exitCode"], 0);
    let mut c = migrate(&db.url, dir.path());
    c.arg("upgrade").env("SCHEMAGATE_SUMMARY_FILE", &summary);
    assert_code(&run(c), 0);
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    assert_eq!(v["result"], "noop");
}

#[test]
fn help_never_shows_the_database_url() {
    let secret = "Help-Leak-Pw-123";
    let mut c = std::process::Command::new(bin());
    c.args(["migrate", "upgrade", "--help"])
        .env("DATABASE_URL", format!("postgres://u:{secret}@h/db"));
    let o = run(c);
    assert_code(&o, 0);
    assert!(!text(&o).contains(secret), "{}", text(&o));
}

/// The README's first command works as written, and the examples migrate up and down.
#[test]
fn readme_quickstart_runs_on_the_examples() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    assert!(
        readme.contains(
            "cargo run -- migrate --database-url sqlite:demo.db --dir examples/migrations upgrade"
        ),
        "the README's quickstart command changed: update this test with it"
    );
    let db = sqlite_db();
    let examples =
        std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/migrations"));
    let mut c = std::process::Command::new(bin());
    c.args(["migrate", "--database-url", &db.url, "--dir"])
        .arg(examples)
        .arg("upgrade");
    assert_code(&run(c), 0);
    for (args, expect) in [
        (&["status"][..], 0),
        (&["downgrade", "base"], 0),
        (&["status"], 3),
        (&["upgrade"], 0),
    ] {
        assert_code(&cmd(&db.url, examples, args), expect);
    }
}

/// `wait --version V` needs no migration files (a waiting runner may have none); without
/// `--version` it needs them for the version to wait for.
#[test]
fn wait_for_a_given_version_needs_no_files() {
    let db = sqlite_db();
    exec(&db.url, "SELECT 1");
    let missing = db.dir.path().join("no-such-dir");
    let mut c = migrate(&db.url, &missing);
    c.args(["wait", "--version", "1", "--timeout", "200ms"]);
    assert_code(&run(c), 15);
    let mut c = migrate(&db.url, &missing);
    c.args(["wait", "--timeout", "200ms"]);
    assert_code(&run(c), 10);
}
