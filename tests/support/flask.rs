//! The Flask-Migrate (Alembic) fixture app (`tests/fixtures/flask_app`), its virtualenv, and
//! `flask db ...` run the way the app's image runs it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The fixture app's directory.
pub fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/flask_app")
}

/// The `bin/` directory of the fixture's virtualenv (Flask, Flask-Migrate, Alembic,
/// SQLAlchemy, psycopg2), made once from its pinned requirements.
pub fn venv() -> PathBuf {
    super::python::venv("flaskenv", &fixture().join("requirements.txt"))
}

/// The environment `flask` needs for the app at `app` (an `app.py`), the venv first on PATH.
pub fn app_env(c: &mut Command, bin: &Path, app: &Path) {
    c.env("FLASK_APP", app)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env(
            "PATH",
            format!(
                "{}:{}",
                bin.display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        );
}

/// `flask db <args>` for the fixture app against `url`.
pub fn flask(bin: &Path, url: &str, args: &[&str]) -> Command {
    flask_app(bin, &fixture().join("app.py"), url, args)
}

/// `flask db <args>` for the app at `app` (a copy of the fixture) against `url`.
pub fn flask_app(bin: &Path, app: &Path, url: &str, args: &[&str]) -> Command {
    let mut c = Command::new(bin.join("flask"));
    c.args(["db"]).args(args).env("DATABASE_URL", url);
    app_env(&mut c, bin, app);
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}
