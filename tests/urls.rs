//! An app's own DATABASE_URL works unchanged: the SQLAlchemy forms a Flask team's `.env`
//! holds (`sqlite:///instance/app.db` relative to the working directory,
//! `postgresql+psycopg2://`), the JDBC and driver-suffixed forms, on real servers; and the
//! same URL serves both Flask-Migrate and schemagate around it.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};

use support::*;

fn sg(url: &str, cwd: &Path, dir: &Path, args: &[&str]) -> std::process::Output {
    let mut c = migrate(url, dir);
    c.current_dir(cwd).args(args);
    run(c)
}

fn migrations() -> MigDir {
    let dir = MigDir::new();
    dir.pair(
        "1",
        "orders",
        "CREATE TABLE orders (id INTEGER PRIMARY KEY);\n",
        Some("DROP TABLE orders;\n"),
    );
    dir.pair(
        "2",
        "total",
        "ALTER TABLE orders ADD COLUMN total INTEGER;\n",
        Some(
            "-- schemagate:allow-destructive reverting 2\nALTER TABLE orders DROP COLUMN total;\n",
        ),
    );
    dir
}

/// The full round: status, upgrade, history, downgrade, status again.
#[track_caller]
fn round(url: &str, cwd: &Path) {
    let dir = migrations();
    assert_code(&sg(url, cwd, dir.path(), &["upgrade"]), 0);
    let o = sg(url, cwd, dir.path(), &["status", "-o", "json"]);
    assert_code(&o, 0);
    assert_eq!(stdout_json(&o)["current"], "2");
    let o = sg(url, cwd, dir.path(), &["history", "-o", "json"]);
    assert_code(&o, 0);
    assert_code(&sg(url, cwd, dir.path(), &["downgrade"]), 0);
    let o = sg(url, cwd, dir.path(), &["current", "-o", "json"]);
    assert_eq!(stdout_json(&o)["current"], "1", "{}", text(&o));
}

#[test]
fn a_flask_env_sqlite_url_is_relative_to_the_working_directory() {
    let work = tempfile::tempdir().unwrap();
    std::fs::create_dir(work.path().join("instance")).unwrap();
    let url = "sqlite:///instance/app.db";
    let dir = migrations();
    // Before the first upgrade, reading commands say the file is missing and where:
    // `status` (pending, exit 3) ...
    let o = sg(url, work.path(), dir.path(), &["status"]);
    assert_code(&o, 3);
    let expected = work.path().join("instance/app.db");
    assert!(
        text(&o).contains(&format!(
            "{} (sqlite): the file does not exist yet",
            expected.display()
        )),
        "{}",
        text(&o)
    );
    assert!(!text(&o).contains("connected"), "{}", text(&o));
    // ... and `current`, without creating anything.
    let o = sg(url, work.path(), dir.path(), &["current"]);
    assert_code(&o, 0);
    assert!(
        text(&o).contains(&format!("{} does not exist", expected.display())),
        "{}",
        text(&o)
    );
    assert!(!expected.exists(), "a reading command creates nothing");
    round(url, work.path());
    assert!(expected.exists(), "the file is where SQLAlchemy puts it");
    assert!(!Path::new("/instance/app.db").exists());
    // The four-slash form is absolute.
    let abs = format!("sqlite:///{}", expected.display());
    let o = sg(&abs, Path::new("/"), dir.path(), &["current", "-o", "json"]);
    assert_code(&o, 0);
    assert_eq!(stdout_json(&o)["current"], "1");
}

#[test]
fn in_memory_sqlite_is_refused_with_a_reason() {
    let dir = migrations();
    for url in ["sqlite://", "sqlite:///:memory:"] {
        let o = sg(url, Path::new("/"), dir.path(), &["upgrade"]);
        assert_code(&o, 11);
        assert!(text(&o).contains("in-memory"), "{}", text(&o));
    }
}

#[test]
fn sqlalchemy_and_jdbc_postgres_urls() {
    let base = postgres::server().fresh_db();
    // postgres://user:pw@host:port/db?sslmode=disable
    let rest = base.strip_prefix("postgres://").unwrap();
    for scheme in [
        "postgresql+psycopg2://",
        "postgresql+asyncpg://",
        "postgresql://",
    ] {
        let url = format!("{scheme}{rest}");
        round(&url, Path::new("/"));
        assert_code(
            &sg(
                &url,
                Path::new("/"),
                migrations().path(),
                &["downgrade", "base"],
            ),
            0,
        );
    }
    // JDBC: credentials as parameters.
    let (creds, hostpart) = rest.split_once('@').unwrap();
    let (user, pw) = creds.split_once(':').unwrap();
    let (host_db, _) = hostpart.split_once('?').unwrap_or((hostpart, ""));
    let jdbc = format!("jdbc:postgresql://{host_db}?user={user}&password={pw}&sslmode=disable");
    round(&jdbc, Path::new("/"));
    let o = sg(&jdbc, Path::new("/"), migrations().path(), &["status"]);
    assert!(
        !text(&o).contains(pw),
        "the password never shows: {}",
        text(&o)
    );
}

#[test]
fn sqlalchemy_mysql_urls_against_mariadb() {
    let base = mysql::server().fresh_db();
    let rest = base.split_once("://").unwrap().1;
    for scheme in ["mysql+pymysql://", "mariadb+mariadbconnector://"] {
        let url = format!("{scheme}{rest}");
        round(&url, Path::new("/"));
        assert_code(
            &sg(
                &url,
                Path::new("/"),
                migrations().path(),
                &["downgrade", "base"],
            ),
            0,
        );
    }
}

/// The Flask app and schemagate read the same `postgresql+psycopg2://` URL: `flask db
/// upgrade` runs under schemagate's lock, and schemagate reads Alembic's version.
#[test]
fn one_url_for_flask_migrate_and_schemagate() {
    let base = postgres::server().fresh_db();
    let url = format!(
        "postgresql+psycopg2://{}",
        base.strip_prefix("postgres://").unwrap()
    );
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/flask_app");
    let bin = support::python::venv("flaskenv", &fixture.join("requirements.txt"));
    let mut c = migrate(&url, Path::new("/nonexistent"));
    c.args(["--tool", "alembic", "exec", "--"])
        .arg(bin.join("flask"))
        .args(["db", "upgrade"])
        .env("FLASK_APP", fixture.join("app.py"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null());
    let o = run(c);
    assert_code(&o, 0);
    let mut c = migrate(&url, Path::new("/nonexistent"));
    c.args(["--tool", "alembic", "current", "-o", "json"]);
    let o = run(c);
    assert_code(&o, 0);
    assert_eq!(stdout_json(&o)["current"], "0003_add_total", "{}", text(&o));
    // And Flask itself reads it back with the very same URL.
    let o = Command::new(bin.join("flask"))
        .args(["db", "current"])
        .env("FLASK_APP", fixture.join("app.py"))
        .env("DATABASE_URL", &url)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("0003"));
}
