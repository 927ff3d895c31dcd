//! Moving a Flask-Migrate (Alembic) project to schemagate's own files: `migrate convert
//! --from alembic` on the real fixture app, the converted files applied by schemagate to
//! one database and `flask db upgrade` run on a twin, their schemas compared through the
//! catalogs (PostgreSQL and SQLite), downgrades compared the same way, and a database
//! Alembic migrated adopted (`import --from alembic`, `stamp`) so nothing runs twice.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use support::flask::{self, fixture, flask};
use support::postgres::server;
use support::*;

/// `schemagate migrate convert --from alembic [extra] -- flask db` for the app at `app`.
fn convert_app(bin: &Path, app: &Path, url: &str, dir: &Path, extra: &[&str]) -> Command {
    let mut c = migrate(url, dir);
    c.args(["-o", "json", "convert", "--from", "alembic"])
        .args(extra)
        .arg("--")
        .arg(bin.join("flask"))
        .arg("db");
    flask::app_env(&mut c, bin, app);
    c
}

fn convert(bin: &Path, url: &str, dir: &Path) -> Output {
    run(convert_app(bin, &fixture().join("app.py"), url, dir, &[]))
}

#[track_caller]
fn flask_ok(c: Command) {
    assert_code(&run(c), 0);
}

fn sg(url: &str, dir: &Path, args: &[&str]) -> Output {
    let mut c = migrate(url, dir);
    c.args(args);
    run(c)
}

/// The app's tables as PostgreSQL's catalogs describe them: columns, indexes, constraints
/// and sequences, without Alembic's and schemagate's bookkeeping tables.
fn pg_schema(url: &str) -> Vec<String> {
    const NOT_APP: &str = "('alembic_version', 'schemagate_history', 'schemagate_history_lock', 'schemagate_history_fp')";
    let mut rows = query(
        url,
        &format!(
            "SELECT format('column %s.%s #%s %s %s default=%s len=%s', table_name, column_name, \
             ordinal_position, data_type, is_nullable, coalesce(column_default, '-'), \
             coalesce(character_maximum_length::text, '-')) \
             FROM information_schema.columns WHERE table_schema = 'public' \
             AND table_name NOT IN {NOT_APP} ORDER BY 1"
        ),
    );
    rows.extend(query(
        url,
        &format!(
            "SELECT format('index %s %s', indexname, indexdef) FROM pg_indexes \
             WHERE schemaname = 'public' AND tablename NOT IN {NOT_APP} ORDER BY 1"
        ),
    ));
    rows.extend(query(
        url,
        &format!(
            "SELECT format('constraint %s %s %s %s', conrelid::regclass, conname, contype, \
             pg_get_constraintdef(oid)) FROM pg_constraint \
             WHERE connamespace = 'public'::regnamespace AND conrelid <> 0 \
             AND conrelid::regclass::text NOT IN {NOT_APP} ORDER BY 1"
        ),
    ));
    rows.extend(query(
        url,
        "SELECT format('sequence %s %s', sequence_name, data_type) FROM information_schema.sequences \
         WHERE sequence_schema = 'public' AND sequence_name NOT LIKE 'schemagate_history%' \
         AND sequence_name NOT LIKE 'alembic_version%' ORDER BY 1",
    ));
    rows
}

/// The app's tables as SQLite describes them: `sqlite_schema` (whitespace collapsed: Alembic
/// writes tabs online and four spaces in offline SQL, and SQLite keeps the text as sent)
/// and `pragma table_info` of each table.
fn sqlite_schema(url: &str) -> Vec<String> {
    const NOT_APP: &str = "('alembic_version', 'schemagate_history', 'schemagate_history_lock', 'schemagate_history_fp')";
    let mut rows: Vec<String> = query(
        url,
        &format!(
            "SELECT type || ' ' || name || ' ' || tbl_name || ' ' || coalesce(sql, '') \
             FROM sqlite_schema WHERE name NOT LIKE 'sqlite_%' AND tbl_name NOT IN {NOT_APP} \
             ORDER BY name"
        ),
    )
    .into_iter()
    .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
    .collect();
    rows.extend(query(
        url,
        &format!(
            "SELECT m.name || '.' || p.name || ' #' || p.cid || ' ' || p.type || ' notnull=' || \
             p.\"notnull\" || ' default=' || coalesce(p.dflt_value, '-') || ' pk=' || p.pk \
             FROM sqlite_schema m JOIN pragma_table_info(m.name) p \
             WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite_%' AND m.name NOT IN {NOT_APP} \
             ORDER BY m.name, p.cid"
        ),
    ));
    rows
}

/// Where two databases' schemas differ, for the failure message.
#[track_caller]
fn assert_same_schema(what: &str, a: &[String], b: &[String]) {
    assert_eq!(
        a, b,
        "{what}: the converted files (left) and `flask db` (right) built different schemas"
    );
}

/// The versions a JSON run report applied or reverted.
fn steps(o: &Output) -> Vec<String> {
    stdout_json(o)["steps"]
        .as_array()
        .unwrap_or_else(|| panic!("no steps: {}", text(o)))
        .iter()
        .map(|s| s["version"].as_str().unwrap().to_string())
        .collect()
}

/// Checks what `convert` reported and wrote for the fixture's three revisions.
#[track_caller]
fn assert_converted(o: &Output, dir: &Path, dialect: &str) {
    assert_code(o, 0);
    let report = stdout_json(o);
    assert_eq!(report["dialect"], dialect);
    let migrations = report["migrations"].as_array().unwrap();
    let got: Vec<(&str, &str, &str)> = migrations
        .iter()
        .map(|m| {
            (
                m["version"].as_str().unwrap(),
                m["revision"].as_str().unwrap(),
                m["up"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("0001", "0001_create_orders", "0001_create_orders.up.sql"),
            (
                "0002",
                "0002_seed_status",
                "0002_seed_order_status_data_migration.up.sql"
            ),
            ("0003", "0003_add_total", "0003_add_orders_total.up.sql"),
        ]
    );
    for m in migrations {
        let revision = m["revision"].as_str().unwrap();
        for key in ["up", "down"] {
            let file = m[key].as_str().unwrap_or_else(|| panic!("no {key}: {m}"));
            let sql = std::fs::read_to_string(dir.join(file)).unwrap();
            assert!(
                sql.contains(&format!("-- alembic-revision: {revision}\n")),
                "{file}:\n{sql}"
            );
            // Alembic's bookkeeping stays out: schemagate keeps its own history and transaction.
            let statements: String = sql.lines().filter(|l| !l.starts_with("--")).collect();
            for own in ["alembic_version", "BEGIN", "COMMIT"] {
                assert!(!statements.contains(own), "{file} still has {own}:\n{sql}");
            }
        }
    }
    let first = std::fs::read_to_string(dir.join("0001_create_orders.up.sql")).unwrap();
    assert_eq!(
        first.contains("pg_sleep"),
        dialect == "postgres",
        "Alembic's offline SQL follows the dialect:\n{first}"
    );
    // The data migration came along.
    let seed =
        std::fs::read_to_string(dir.join("0002_seed_order_status_data_migration.up.sql")).unwrap();
    assert!(
        seed.contains("INSERT INTO order_status (name) VALUES ('new');"),
        "{seed}"
    );
}

#[test]
fn converted_revisions_build_and_revert_what_flask_db_does_on_postgres() {
    let bin = flask::venv();
    let (a, b) = (server().fresh_db(), server().fresh_db());
    let dir = tempfile::tempdir().unwrap();
    let o = convert(&bin, &a, dir.path());
    assert_converted(&o, dir.path(), "postgres");
    assert!(
        !text(&o).contains(support::postgres::PASSWORD)
            && !text(&o).contains(&support::postgres::urlencode(support::postgres::PASSWORD)),
        "{}",
        text(&o)
    );

    // A: schemagate runs the converted files; B: Flask-Migrate runs the revisions.
    let up = sg(&a, dir.path(), &["-o", "json", "upgrade"]);
    assert_code(&up, 0);
    assert_eq!(steps(&up), ["0001", "0002", "0003"]);
    flask_ok(flask(&bin, &b, &["upgrade"]));
    let schema = pg_schema(&a);
    assert!(
        schema
            .iter()
            .any(|r| r.starts_with("column orders.total #3 integer YES")),
        "{schema:#?}"
    );
    assert_same_schema("after upgrade", &schema, &pg_schema(&b));
    let seeded = "SELECT name FROM order_status ORDER BY id";
    assert_eq!(query(&a, seeded), query(&b, seeded));
    assert_eq!(query(&a, seeded), ["new"]);
    assert_code(&sg(&a, dir.path(), &["status"]), 0);

    // Down one revision each way, then all the way.
    let down = sg(&a, dir.path(), &["-o", "json", "downgrade"]);
    assert_code(&down, 0);
    assert_eq!(steps(&down), ["0003"]);
    flask_ok(flask(&bin, &b, &["downgrade"]));
    assert_same_schema("after one downgrade", &pg_schema(&a), &pg_schema(&b));
    assert!(
        !pg_schema(&a).iter().any(|r| r.contains("orders.total")),
        "total is gone"
    );
    assert_code(&sg(&a, dir.path(), &["downgrade", "base"]), 0);
    flask_ok(flask(&bin, &b, &["downgrade", "base"]));
    assert_eq!(
        pg_schema(&a),
        Vec::<String>::new(),
        "nothing of the app is left"
    );
    assert_same_schema("at base", &pg_schema(&a), &pg_schema(&b));

    // And up again, from base.
    assert_code(&sg(&a, dir.path(), &["upgrade"]), 0);
    flask_ok(flask(&bin, &b, &["upgrade"]));
    assert_same_schema("upgraded again", &pg_schema(&a), &pg_schema(&b));
    assert_eq!(count(&a, "SELECT count(*) FROM order_status"), 1);
}

#[test]
fn converted_revisions_build_and_revert_what_flask_db_does_on_sqlite() {
    let bin = flask::venv();
    let files = tempfile::tempdir().unwrap();
    // One URL per database for both tools: SQLAlchemy's four-slash absolute form.
    let db = |name: &str| -> (String, String) {
        let path = files.path().join(name);
        (
            format!("sqlite:///{}", path.display()),
            format!("sqlite:{}", path.display()),
        )
    };
    let ((a, a_read), (b, b_read)) = (db("a.db"), db("b.db"));
    let dir = files.path().join("migrations");
    let o = convert(&bin, &a, &dir);
    assert_converted(&o, &dir, "sqlite");
    assert!(
        !files.path().join("a.db").exists(),
        "offline: nothing connects"
    );

    let up = sg(&a, &dir, &["-o", "json", "upgrade"]);
    assert_code(&up, 0);
    assert_eq!(steps(&up), ["0001", "0002", "0003"]);
    flask_ok(flask(&bin, &b, &["upgrade"]));
    let schema = sqlite_schema(&a_read);
    assert!(
        schema
            .iter()
            .any(|r| r == "orders.total #2 INTEGER notnull=0 default=- pk=0"),
        "{schema:#?}"
    );
    assert_same_schema("after upgrade", &schema, &sqlite_schema(&b_read));
    let seeded = "SELECT name FROM order_status ORDER BY id";
    assert_eq!(query(&a_read, seeded), query(&b_read, seeded));

    let down = sg(&a, &dir, &["-o", "json", "downgrade", "-2"]);
    assert_code(&down, 0);
    assert_eq!(steps(&down), ["0003", "0002"]);
    flask_ok(flask(&bin, &b, &["downgrade", "0001_create_orders"]));
    assert_same_schema(
        "after two downgrades",
        &sqlite_schema(&a_read),
        &sqlite_schema(&b_read),
    );
    assert_code(&sg(&a, &dir, &["upgrade"]), 0);
    flask_ok(flask(&bin, &b, &["upgrade"]));
    assert_same_schema(
        "upgraded again",
        &sqlite_schema(&a_read),
        &sqlite_schema(&b_read),
    );

    // Adoption by hand: B, migrated by Flask-Migrate, is stamped at the last converted
    // version; nothing is pending and nothing runs.
    let (c, c_read) = db("c.db");
    flask_ok(flask(&bin, &c, &["upgrade"]));
    assert_code(&sg(&c, &dir, &["stamp", "3"]), 0);
    assert_code(&sg(&c, &dir, &["status"]), 0);
    let again = sg(&c, &dir, &["-o", "json", "upgrade"]);
    assert_code(&again, 0);
    assert_eq!(steps(&again), Vec::<String>::new());
    assert_eq!(count(&c_read, "SELECT count(*) FROM order_status"), 1);
}

#[test]
fn a_database_flask_migrated_is_imported_and_nothing_runs_twice() {
    let bin = flask::venv();
    let dir = tempfile::tempdir().unwrap();
    let reference = server().fresh_db();
    assert_code(&convert(&bin, &reference, dir.path()), 0);
    flask_ok(flask(&bin, &reference, &["upgrade"]));

    // Fully migrated by Flask-Migrate: import records every version, runs nothing.
    let url = server().fresh_db();
    flask_ok(flask(&bin, &url, &["upgrade"]));
    let dry = sg(&url, dir.path(), &["import", "--from", "alembic"]);
    assert_code(&dry, 0);
    assert!(
        text(&dry).contains("Would record as applied (from alembic): 0001, 0002, 0003"),
        "{}",
        text(&dry)
    );
    assert_eq!(
        query(&url, "SELECT to_regclass('schemagate_history')::text"),
        ["NULL"],
        "a dry run writes nothing"
    );
    assert_code(
        &sg(
            &url,
            dir.path(),
            &["import", "--from", "alembic", "--apply"],
        ),
        0,
    );
    let status = sg(&url, dir.path(), &["-o", "json", "status"]);
    assert_code(&status, 0);
    assert_eq!(stdout_json(&status)["current"], "0003", "{}", text(&status));
    let up = sg(&url, dir.path(), &["-o", "json", "upgrade"]);
    assert_code(&up, 0);
    assert_eq!(steps(&up), Vec::<String>::new());
    assert_code(&sg(&url, dir.path(), &["verify"]), 0);
    assert_eq!(count(&url, "SELECT count(*) FROM order_status"), 1);

    // Behind by one revision: the applied ones are recorded, the last runs natively.
    let url = server().fresh_db();
    flask_ok(flask(&bin, &url, &["upgrade", "0002_seed_status"]));
    let o = sg(
        &url,
        dir.path(),
        &["-o", "json", "import", "--from", "alembic", "--apply"],
    );
    assert_code(&o, 0);
    assert_eq!(
        stdout_json(&o)["versions"],
        serde_json::json!(["0001", "0002"])
    );
    assert_code(&sg(&url, dir.path(), &["status"]), 3);
    let up = sg(&url, dir.path(), &["-o", "json", "upgrade"]);
    assert_code(&up, 0);
    assert_eq!(steps(&up), ["0003"]);
    assert_same_schema(
        "imported, then upgraded",
        &pg_schema(&url),
        &pg_schema(&reference),
    );
    assert_eq!(count(&url, "SELECT count(*) FROM order_status"), 1);

    // Refused: files that cannot say what Alembic applied.
    let url = server().fresh_db();
    flask_ok(flask(&bin, &url, &["upgrade"]));
    // A file Alembic could not print (only its header) is refused: its checksum would be
    // recorded before anyone wrote its SQL.
    let unfinished = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        let mut text = std::fs::read_to_string(&path).unwrap();
        if path.ends_with("0003_add_orders_total.up.sql") {
            text = text.lines().take(5).map(|l| format!("{l}\n")).collect();
        }
        std::fs::write(unfinished.path().join(path.file_name().unwrap()), text).unwrap();
    }
    let o = sg(
        &url,
        unfinished.path(),
        &["import", "--from", "alembic", "--apply"],
    );
    assert_code(&o, 16);
    assert!(
        text(&o).contains("0003_add_orders_total.up.sql hold(s) no SQL yet"),
        "{}",
        text(&o)
    );

    // Files not converted from this project.
    let other = MigDir::new();
    other.pair("1", "orders", "CREATE TABLE orders (id INT);\n", None);
    let o = sg(
        &url,
        other.path(),
        &["import", "--from", "alembic", "--apply"],
    );
    assert_code(&o, 16);
    assert!(
        text(&o).contains("0003_add_total has no converted file") && text(&o).contains("convert"),
        "{}",
        text(&o)
    );
}

/// A copy of the fixture app (its `app.py` finds `migrations/` next to itself).
fn copy_fixture(to: &Path) -> PathBuf {
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name();
            if name == "__pycache__" {
                continue;
            }
            if entry.file_type().unwrap().is_dir() {
                copy(&entry.path(), &to.join(&name));
            } else {
                std::fs::copy(entry.path(), to.join(&name)).unwrap();
            }
        }
    }
    copy(&fixture(), to);
    to.join("app.py")
}

#[test]
fn convert_refuses_unmerged_heads_never_overwrites_and_never_prints_the_password() {
    let bin = flask::venv();
    // Offline SQL connects to nothing: no server behind this URL.
    let url = "postgres://shop:S3cret-Alembic-pw@127.0.0.1:9/shop?sslmode=disable";
    let dir = tempfile::tempdir().unwrap();

    let o = convert(&bin, url, dir.path());
    assert_code(&o, 0);
    let first: Vec<(PathBuf, String)> = {
        let mut files: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        files
            .into_iter()
            .map(|p| {
                let text = std::fs::read_to_string(&p).unwrap();
                (p, text)
            })
            .collect()
    };
    assert_eq!(first.len(), 6, "{first:#?}");
    // Again: refused, naming the files; nothing changed.
    let again = convert(&bin, url, dir.path());
    assert_code(&again, 16);
    let err = stdout_json(&again)["error"].clone();
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("0001_create_orders.up.sql"),
        "{err}"
    );
    assert!(err["hint"].as_str().unwrap().contains("--force"), "{err}");
    // With --force: the same bytes (the conversion is deterministic, so checksums hold).
    let app = fixture().join("app.py");
    assert_code(
        &run(convert_app(&bin, &app, url, dir.path(), &["--force"])),
        0,
    );
    for (path, text) in &first {
        assert_eq!(&std::fs::read_to_string(path).unwrap(), text, "{path:?}");
    }

    // A second head (a revision branching off 0002 next to 0003) is refused before anything
    // is written.
    let copy = tempfile::tempdir().unwrap();
    let app = copy_fixture(copy.path());
    // Not into Alembic's own directory (schemagate's default --dir is `migrations` too).
    let o = run(convert_app(
        &bin,
        &app,
        url,
        &copy.path().join("migrations"),
        &[],
    ));
    assert_code(&o, 16);
    assert!(
        stdout_json(&o)["error"]["message"]
            .as_str()
            .unwrap()
            .contains("is Alembic's own directory"),
        "{}",
        text(&o)
    );
    assert!(
        !copy
            .path()
            .join("migrations/0001_create_orders.up.sql")
            .exists()
    );
    std::fs::write(
        copy.path().join("migrations/versions/0004_other_branch.py"),
        "\"\"\"other branch\n\nRevision ID: 0004_other_branch\nRevises: 0002_seed_status\n\"\"\"\n\
         from alembic import op\nimport sqlalchemy as sa\n\nrevision = '0004_other_branch'\n\
         down_revision = '0002_seed_status'\nbranch_labels = None\ndepends_on = None\n\n\n\
         def upgrade():\n    op.add_column('orders', sa.Column('note', sa.Text()))\n\n\n\
         def downgrade():\n    op.drop_column('orders', 'note')\n",
    )
    .unwrap();
    let target = copy.path().join("converted");
    let o = run(convert_app(&bin, &app, url, &target, &[]));
    assert_code(&o, 16);
    let err = stdout_json(&o)["error"].clone();
    let message = err["message"].as_str().unwrap();
    assert!(
        message.contains("2 heads")
            && message.contains("0003_add_total")
            && message.contains("0004_other_branch"),
        "{err}"
    );
    assert!(
        err["hint"].as_str().unwrap().contains("merge heads"),
        "{err}"
    );
    assert!(!target.exists(), "nothing written");

    // Whatever the command prints on failure is shown without the password.
    let mut c = migrate(url, dir.path());
    c.args(["convert", "--from", "alembic", "--", "sh", "-c"])
        .arg("echo \"cannot use $DATABASE_URL\" >&2; exit 3")
        .arg("sh");
    let o = run(c);
    assert_code(&o, 12);
    let shown = text(&o);
    assert!(!shown.contains("S3cret-Alembic-pw"), "{shown}");
    assert!(
        shown.contains("cannot use postgres://shop:***@127.0.0.1:9/shop"),
        "{shown}"
    );
}
