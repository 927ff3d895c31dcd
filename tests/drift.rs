//! Live-schema drift and approvals by plan hash, on real PostgreSQL, MariaDB and SQLite:
//! no drift right after migrating; an index and a column added and a column dropped by
//! hand are each reported precisely (exit 4), also by `status`; `drift --accept` keeps
//! them; a downgrade records the schema it leaves. A plan the policy marks is refused with
//! its hash (exit 21) until that hash is approved, runs once approved (recorded in the
//! history), and is refused again when the plan changes (another file, another target).

mod support;

use support::*;

fn migrations(dir: &MigDir) {
    dir.pair(
        "1",
        "users",
        "CREATE TABLE users (id INTEGER PRIMARY KEY, email VARCHAR(200) NOT NULL, name VARCHAR(100));\n\
         CREATE INDEX users_email ON users (email);\n",
        Some("-- schemagate:allow-destructive reverting the first migration\nDROP TABLE users;\n"),
    );
    dir.pair(
        "2",
        "orders",
        "CREATE TABLE orders (id INTEGER PRIMARY KEY, user_id INTEGER NOT NULL, total INTEGER NOT NULL DEFAULT 0);\n",
        Some("-- schemagate:allow-destructive orders are archived elsewhere\nDROP TABLE orders;\n"),
    );
}

fn drift(url: &str, dir: &MigDir) -> std::process::Output {
    let mut c = migrate(url, dir.path());
    c.args(["--output", "json", "drift"]);
    run(c)
}

fn messages(json: &serde_json::Value) -> Vec<String> {
    json["differences"]
        .as_array()
        .unwrap_or(&Vec::new())
        .iter()
        .map(|d| d["message"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn upgrade(url: &str, dir: &MigDir, extra: &[&str]) -> std::process::Output {
    let mut c = migrate(url, dir.path());
    c.args(["--output", "json"]).args(extra).arg("upgrade");
    run(c)
}

fn scenario(url: &str) {
    let dir = MigDir::new();
    migrations(&dir);
    assert_code(&upgrade(url, &dir, &[]), 0);

    // Right after migrating: nothing differs.
    let o = drift(url, &dir);
    assert_code(&o, 0);
    assert_eq!(stdout_json(&o)["result"], "clean", "{}", text(&o));

    // Changes made by hand, outside the migrations.
    exec(url, "CREATE INDEX orders_total ON orders (total)");
    exec(url, "ALTER TABLE users DROP COLUMN name");
    exec(url, "ALTER TABLE orders ADD COLUMN note VARCHAR(50)");
    let o = drift(url, &dir);
    assert_code(&o, 4);
    let json = stdout_json(&o);
    assert_eq!(json["result"], "drifted");
    let found = messages(&json);
    assert_eq!(found.len(), 3, "{found:#?}");
    let has = |needle: &str| found.iter().any(|m| m.starts_with(needle));
    assert!(
        has("index orders_total on orders exists but no migration created it"),
        "{found:#?}"
    );
    assert!(
        has("column users.name missing: the migrations created it"),
        "{found:#?}"
    );
    assert!(
        has("column orders.note exists but no migration created it"),
        "{found:#?}"
    );
    // Human output names them too; `status` reports the live schema apart from the files.
    let mut c = migrate(url, dir.path());
    c.arg("drift");
    let o = run(c);
    assert_code(&o, 4);
    assert!(
        text(&o).contains("column users.name missing"),
        "{}",
        text(&o)
    );
    let mut c = migrate(url, dir.path());
    c.args(["--output", "json", "status"]);
    let o = run(c);
    assert_code(&o, 0); // the files match the history: status's own verdict is unchanged
    let json = stdout_json(&o);
    assert_eq!(json["schemaDrift"]["result"], "drifted", "{}", text(&o));
    assert_eq!(json["drift"]["changed"].as_array().map(Vec::len), Some(0));

    // Kept on purpose: accepted, audited, and clean from then on.
    let mut c = migrate(url, dir.path());
    c.args([
        "--output",
        "json",
        "drift",
        "--accept",
        "--reason",
        "hotfix index kept",
    ]);
    let o = run(c);
    assert_code(&o, 0);
    assert_eq!(
        stdout_json(&o)["accepted"].as_array().map(Vec::len),
        Some(3)
    );
    assert_code(&drift(url, &dir), 0);
    let notes = query(url, "SELECT note FROM schemagate_history_fp ORDER BY id");
    assert_eq!(
        notes.last().map(String::as_str),
        Some("accepted with drift --accept: hotfix index kept")
    );

    // Approvals: a destructive step, with its file's own permission, still needs one.
    dir.pair(
        "3",
        "drop_note",
        "-- schemagate:allow-destructive the note column was never used\nALTER TABLE orders DROP COLUMN note;\n",
        None,
    );
    let policy = ["--require-approval", "Destructive"];
    let o = upgrade(url, &dir, &policy);
    assert_code(&o, 21);
    let err = &stdout_json(&o)["error"];
    assert_eq!(err["kind"], "approval_required");
    let hash = err["details"]["planHash"].as_str().unwrap().to_string();
    assert_eq!(hash.len(), 64);
    assert!(err["message"].as_str().unwrap().contains(&hash));
    assert_eq!(
        query(
            url,
            "SELECT count(*) FROM schemagate_history WHERE version = '3'"
        ),
        ["0"],
        "nothing ran"
    );
    // `plan` prints the same hash and what needs approving.
    let mut c = migrate(url, dir.path());
    c.args([
        "--output",
        "json",
        "--require-approval",
        "destructive",
        "plan",
    ]);
    let o = run(c);
    assert_code(&o, 0);
    let plan = stdout_json(&o);
    assert_eq!(plan["planHash"], hash.as_str());
    assert_eq!(plan["approval"]["approved"], false);
    assert_eq!(plan["approval"]["required"][0], "Destructive");

    // The file changes before it runs: the old approval does not cover the new plan.
    dir.pair(
        "3",
        "drop_note",
        "-- schemagate:allow-destructive the note column was never used\nALTER TABLE orders DROP COLUMN note;\nALTER TABLE orders DROP COLUMN user_id;\n",
        None,
    );
    let o = upgrade(url, &dir, &[&policy[..], &["--approve", &hash]].concat());
    assert_code(&o, 21);
    let changed = stdout_json(&o)["error"]["details"]["planHash"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(changed, hash);

    // Approved: runs once, the approval in the history, the new schema fingerprinted.
    let o = upgrade(
        url,
        &dir,
        &[&policy[..], &["--approve", &format!("sha256:{changed}")]].concat(),
    );
    assert_code(&o, 0);
    assert_eq!(stdout_json(&o)["planHash"], changed.as_str());
    let note = query(
        url,
        "SELECT note FROM schemagate_history WHERE version = '3'",
    );
    assert!(
        note[0].contains(&format!("approved plan {changed} (Destructive)")),
        "{note:?}"
    );
    assert_code(&upgrade(url, &dir, &policy), 0); // nothing left: no approval needed
    assert_code(&drift(url, &dir), 0);
}

/// Approving one target does not approve another.
fn another_target_needs_its_own_approval(url: &str) {
    let dir = MigDir::new();
    migrations(&dir);
    let policy = ["--require-approval", "Downgrade"];
    assert_code(&upgrade(url, &dir, &[]), 0);
    let plan_hash = |target: &str| {
        let mut c = migrate(url, dir.path());
        c.args([
            "--output",
            "json",
            "--require-approval",
            "Downgrade",
            "plan",
            target,
        ]);
        let o = run(c);
        assert_code(&o, 0);
        stdout_json(&o)["planHash"].as_str().unwrap().to_string()
    };
    let to_one = plan_hash("1");
    let to_base = plan_hash("base");
    assert_ne!(to_one, to_base);
    let mut c = migrate(url, dir.path());
    c.args(["--output", "json"])
        .args(policy)
        .args(["--approve", &to_one, "downgrade", "base"]);
    let o = run(c);
    assert_code(&o, 21);
    assert_eq!(
        stdout_json(&o)["error"]["details"]["planHash"],
        to_base.as_str()
    );
    let mut c = migrate(url, dir.path());
    c.args(["--output", "json"])
        .args(policy)
        .args(["--approve", &to_one, "downgrade", "1"]);
    assert_code(&run(c), 0);
    // The schema the downgrade left is the expected one now.
    let o = drift(url, &dir);
    assert_code(&o, 0);
    assert_eq!(stdout_json(&o)["version"], "1");
}

#[test]
fn postgres_drift_and_approvals() {
    let pg = support::postgres::server();
    scenario(&pg.fresh_db());
    another_target_needs_its_own_approval(&pg.fresh_db());
}

#[test]
fn mariadb_drift_and_approvals() {
    let maria = support::mysql::server();
    scenario(&maria.fresh_db());
    another_target_needs_its_own_approval(&maria.fresh_db());
}

#[test]
fn sqlite_drift_and_approvals() {
    let db = sqlite_db();
    exec(&db.url, "SELECT 1");
    scenario(&db.url);
    let other = sqlite_db();
    exec(&other.url, "SELECT 1");
    another_target_needs_its_own_approval(&other.url);
}

/// Objects of every kind the fingerprint covers, on PostgreSQL: a changed default, a
/// dropped constraint, a replaced view, an enum value added, in another schema too.
#[test]
fn postgres_fingerprints_cover_constraints_views_types_and_schemas() {
    let url = support::postgres::server().fresh_db();
    // The app's schemas are on its search path (what the fingerprint reads).
    let db = url
        .rsplit('/')
        .next()
        .unwrap()
        .split('?')
        .next()
        .unwrap()
        .to_string();
    exec(
        &url,
        &format!("ALTER DATABASE {db} SET search_path = public, billing"),
    );
    // Another app's schema in the same database is not this one's drift.
    exec(&url, "CREATE SCHEMA other_app");
    let dir = MigDir::new();
    dir.file(
        "1_all.up.sql",
        "CREATE SCHEMA billing;\n\
         CREATE TYPE mood AS ENUM ('ok', 'sad');\n\
         CREATE TABLE billing.invoices (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, amount numeric(10,2) NOT NULL DEFAULT 0 CHECK (amount >= 0), m mood);\n\
         CREATE VIEW billing.big AS SELECT id FROM billing.invoices WHERE amount > 100;\n",
    );
    assert_code(&upgrade(&url, &dir, &[]), 0);
    assert_code(&drift(&url, &dir), 0);
    exec(
        &url,
        "ALTER TABLE billing.invoices ALTER COLUMN amount SET DEFAULT 1",
    );
    exec(
        &url,
        "ALTER TABLE billing.invoices DROP CONSTRAINT invoices_amount_check",
    );
    exec(
        &url,
        "CREATE OR REPLACE VIEW billing.big AS SELECT id FROM billing.invoices WHERE amount > 1000",
    );
    exec(&url, "ALTER TYPE mood ADD VALUE 'glad'");
    exec(&url, "CREATE TABLE other_app.things (id INT)");
    let o = drift(&url, &dir);
    assert_code(&o, 4);
    let found = messages(&stdout_json(&o));
    let has = |needle: &str| found.iter().any(|m| m.starts_with(needle));
    assert_eq!(found.len(), 4, "{found:#?}");
    assert!(
        has(
            "column billing.invoices.amount changed: the migrations left numeric(10,2) NOT NULL DEFAULT 0, the database has numeric(10,2) NOT NULL DEFAULT 1"
        ),
        "{found:#?}"
    );
    assert!(
        has("constraint invoices_amount_check on billing.invoices missing"),
        "{found:#?}"
    );
    assert!(has("view billing.big changed"), "{found:#?}");
    assert!(has("type mood changed"), "{found:#?}");
}

/// A database migrated before fingerprints (or adopted by stamp) has nothing to compare
/// with: exit 5 and what to do; stamp records the adopted schema.
#[test]
fn no_baseline_is_said_and_stamp_records_one() {
    let db = sqlite_db();
    exec(&db.url, "CREATE TABLE legacy (id INTEGER PRIMARY KEY)");
    let dir = MigDir::new();
    dir.file(
        "1_legacy.up.sql",
        "CREATE TABLE legacy (id INTEGER PRIMARY KEY);\n",
    );
    // Adopted: stamp records the schema as it is.
    let mut c = migrate(&db.url, dir.path());
    c.args(["stamp", "1"]);
    assert_code(&run(c), 0);
    assert_code(&drift(&db.url, &dir), 0);
    exec(&db.url, "DROP TABLE schemagate_history_fp");
    let o = drift(&db.url, &dir);
    assert_code(&o, 5);
    let json = stdout_json(&o);
    assert_eq!(json["result"], "noBaseline");
    let mut c = migrate(&db.url, dir.path());
    c.arg("drift");
    let o = run(c);
    assert!(text(&o).contains("drift --accept"), "{}", text(&o));
}
