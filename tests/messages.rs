//! The messages a newcomer meets, each as the real binary prints it: what went wrong,
//! named precisely, and a next step that fits.

mod support;

use std::process::Command;

use support::*;

fn sg(args: &[&str]) -> std::process::Output {
    let mut c = Command::new(bin());
    c.arg("migrate")
        .env_remove("DATABASE_URL")
        .env_remove("SCHEMAGATE_DIR")
        .args(args);
    run(c)
}

#[test]
fn a_file_given_as_the_directory_says_so_and_not_permissions() {
    let db = sqlite_db();
    let file = db.dir.path().join("notes.txt");
    std::fs::write(&file, "x").unwrap();
    let o = sg(&[
        "--database-url",
        &db.url,
        "--dir",
        file.to_str().unwrap(),
        "heads",
    ]);
    assert_code(&o, 10);
    let t = text(&o);
    assert!(
        t.contains("is a file, not a directory") && t.contains("parent directory"),
        "{t}"
    );
    assert!(!t.contains("permission"), "{t}");
}

#[test]
fn without_url_and_directory_the_url_comes_first() {
    let o = sg(&["--dir", "/nonexistent/migrations", "status"]);
    assert_code(&o, 11);
    assert!(text(&o).contains("no database URL"), "{}", text(&o));
}

#[test]
fn drift_has_a_hint_and_line_endings_point_to_normalized_checksums() {
    let db = sqlite_db();
    let dir = MigDir::new();
    dir.pair("1", "a", "CREATE TABLE a (id INTEGER);\n", None);
    dir.pair("2", "b", "CREATE TABLE b (id INTEGER);\n", None);
    let mut c = migrate(&db.url, dir.path());
    c.arg("upgrade");
    assert_code(&run(c), 0);
    // An editor turned 1's line endings into CRLF; 2 really changed.
    dir.file("1_a.up.sql", "CREATE TABLE a (id INTEGER);\r\n");
    dir.file("2_b.up.sql", "CREATE TABLE b (id BIGINT);\n");
    for command in ["status", "verify"] {
        let mut c = migrate(&db.url, dir.path());
        c.arg(command);
        let o = run(c);
        assert_code(&o, 4);
        let t = text(&o);
        assert!(
            t.contains("only line endings or whitespace differ"),
            "{command}: {t}"
        );
        assert!(
            t.contains("hint: only line endings") && t.contains("--checksum normalized"),
            "{command}: {t}"
        );
        assert!(
            t.contains("hint: an applied migration must not change"),
            "{command}: {t}"
        );
    }
    // With normalized checksums only the real change remains.
    dir.file("2_b.up.sql", "CREATE TABLE b (id INTEGER);\n");
    let mut c = migrate(&db.url, dir.path());
    c.args(["verify", "--checksum", "normalized"]);
    assert_code(&run(c), 0);
}

#[test]
fn sqlite_errors_name_their_result_code_not_a_sqlstate() {
    let db = sqlite_db();
    let dir = MigDir::new();
    dir.pair(
        "1",
        "bad",
        "CREATE TABLE a (id INTEGER);\nINSERT INTO missing VALUES (1);\n",
        None,
    );
    let mut c = migrate(&db.url, dir.path());
    c.arg("upgrade");
    let o = run(c);
    assert_code(&o, 12);
    let t = text(&o);
    assert!(
        t.contains("SQLite result code") && !t.contains("SQLSTATE"),
        "{t}"
    );
}

#[test]
fn tls_required_against_a_server_without_tls_says_what_to_change() {
    let url = postgres::server().fresh_db();
    let url = url.replace("sslmode=disable", "sslmode=require");
    let o = sg(&["--database-url", &url, "--dir", "/tmp", "current"]);
    assert_code(&o, 11);
    let t = text(&o);
    assert!(
        t.contains("does not accept TLS") && t.contains("sslmode=prefer"),
        "{t}"
    );
    assert!(!t.contains("sqlx_"), "no driver source locations: {t}");
}

#[test]
fn upper_case_up_and_down_suffixes_are_a_pair() {
    let db = sqlite_db();
    let dir = MigDir::new();
    dir.file("1_orders.UP.sql", "CREATE TABLE orders (id INTEGER);\n");
    dir.file("1_orders.Down.sql", "DROP TABLE orders;\n");
    let mut c = migrate(&db.url, dir.path());
    c.args(["upgrade"]);
    assert_code(&run(c), 0);
    let mut c = migrate(&db.url, dir.path());
    c.args(["history", "-o", "json"]);
    let o = run(c);
    let v = stdout_json(&o);
    assert_eq!(v["entries"][0]["description"], "orders", "{v}");
    let mut c = migrate(&db.url, dir.path());
    c.args(["downgrade", "base"]);
    assert_code(&run(c), 0);
}

#[test]
fn new_twice_in_one_second_gives_real_timestamps_and_history_durations_are_never_zero() {
    let db = sqlite_db();
    let dir = MigDir::new();
    dir.pair(
        "20260101000000",
        "first",
        "CREATE TABLE a (id INTEGER);\n",
        None,
    );
    let mut versions = Vec::new();
    for m in ["second", "third"] {
        let mut c = migrate(&db.url, dir.path());
        c.args(["new", "-m", m, "-o", "json"]);
        let o = run(c);
        assert_code(&o, 0);
        versions.push(stdout_json(&o)["version"].as_str().unwrap().to_string());
    }
    for v in &versions {
        assert_eq!(v.len(), 14, "{v}");
        let (h, m, s) = (&v[8..10], &v[10..12], &v[12..14]);
        assert!(h < "24" && m < "60" && s < "60", "a real time: {v}");
    }
    assert!(versions[1] > versions[0], "{versions:?}");
    // Fill them in and run: every step's recorded duration is at least 1 ms.
    for f in std::fs::read_dir(dir.path()).unwrap() {
        let p = f.unwrap().path();
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        if name.ends_with(".up.sql") && name != "20260101000000_first.up.sql" {
            let table = name
                .trim_end_matches(".up.sql")
                .replace(|c: char| !c.is_ascii_alphanumeric(), "_");
            std::fs::write(&p, format!("CREATE TABLE t_{table} (id INTEGER);\n")).unwrap();
        }
        if name.ends_with(".down.sql") {
            std::fs::write(&p, "-- schemagate:empty nothing to undo in this test\n").unwrap();
        }
    }
    let mut c = migrate(&db.url, dir.path());
    c.arg("upgrade");
    assert_code(&run(c), 0);
    assert_eq!(
        count(
            &db.url,
            "SELECT count(*) FROM schemagate_history WHERE kind = 'up' AND (duration_ms IS NULL OR duration_ms < 1)"
        ),
        0
    );
}
