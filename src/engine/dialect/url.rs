//! Database URLs the way the ecosystem writes them, turned into the one form the drivers
//! read. An app's own `DATABASE_URL` (SQLAlchemy, Django, Rails, sqlx, Flyway's JDBC) works
//! as it is:
//!
//! | written | means |
//! |---|---|
//! | `postgres://`, `postgresql://`, `pgsql://`, `postgis://` | PostgreSQL |
//! | `postgresql+psycopg2://`, `+psycopg://`, `+asyncpg://`, `+pg8000://` | PostgreSQL (the SQLAlchemy driver part is dropped) |
//! | `jdbc:postgresql://host/db?user=..&password=..` | PostgreSQL |
//! | `mysql://`, `mariadb://`, `mysql2://` | MySQL/MariaDB |
//! | `mysql+pymysql://`, `+mysqldb://`, `+mysqlconnector://`, `+aiomysql://`, `+asyncmy://`, `mariadb+mariadbconnector://` | MySQL/MariaDB |
//! | `jdbc:mysql://`, `jdbc:mariadb://` | MySQL/MariaDB |
//! | `sqlite:///relative/app.db` (SQLAlchemy, Django), `sqlite://app.db` (sqlx), `sqlite:app.db` | a file relative to the working directory |
//! | `sqlite:////absolute/app.db` (SQLAlchemy), `sqlite:/absolute/app.db` | an absolute path |
//! | `sqlite+pysqlite:///...`, `sqlite+aiosqlite:///...`, `jdbc:sqlite:app.db` | as above |
//! | `sqlite://`, `sqlite:///:memory:`, `sqlite::memory:` | refused: an in-memory database vanishes with the connection |
//!
//! Relative SQLite paths are resolved against the working directory, so messages name the
//! file that is really meant.

use std::path::{Path, PathBuf};

use super::{DbError, DbErrorKind};

/// The schemes accepted, for messages.
pub const ACCEPTED: &str = "postgres://, postgresql[+driver]://, mysql[+driver]://, \
                            mariadb[+driver]://, sqlite:, sqlite[+driver]:///path, jdbc:...";

fn config(message: impl Into<String>) -> DbError {
    DbError::new(DbErrorKind::Config, message)
}

/// `url` in the form the drivers read (`postgres://`, `mysql://`, `sqlite:<absolute path>`),
/// relative SQLite paths resolved against `cwd`.
pub fn normalize(url: &str, cwd: &Path) -> Result<String, DbError> {
    let url = url.trim();
    let url = url
        .get(..5)
        .filter(|p| p.eq_ignore_ascii_case("jdbc:"))
        .map(|_| &url[5..])
        .unwrap_or(url);
    let Some(colon) = url.find(':') else {
        return Err(config(
            "the database URL does not start with a scheme such as postgres:// or sqlite:",
        ));
    };
    let scheme = url[..colon].to_ascii_lowercase();
    let rest = &url[colon + 1..];
    let base = scheme.split('+').next().unwrap_or_default();
    match base {
        "postgres" | "postgresql" | "pgsql" | "postgis" => Ok(format!("postgres:{rest}")),
        "mysql" | "mysql2" | "mariadb" => Ok(format!("mysql:{rest}")),
        "sqlite" | "sqlite3" => sqlite(rest, cwd),
        _ if crate::model::redact::is_scheme(&scheme) => Err(config(format!(
            "unsupported database URL scheme {scheme:?}; accepted: {ACCEPTED}"
        ))),
        // Never echo what is not a scheme: it may be a password or a whole DSN.
        _ => Err(config(
            "the database URL does not start with a scheme such as postgres:// or sqlite:",
        )),
    }
}

/// The part after `sqlite:`.
fn sqlite(rest: &str, cwd: &Path) -> Result<String, DbError> {
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest, None),
    };
    let path = if let Some(abs) = path.strip_prefix("////") {
        format!("/{abs}")
    } else if let Some(rel) = path.strip_prefix("///") {
        rel.to_string()
    } else if let Some(rel) = path.strip_prefix("//") {
        rel.to_string()
    } else {
        path.to_string()
    };
    let memory = path.is_empty()
        || path == ":memory:"
        || query.is_some_and(|q| q.split('&').any(|p| p == "mode=memory"));
    if memory {
        return Err(config(
            "an in-memory SQLite database (sqlite://, :memory:) lives only as long as one \
             connection: nothing migrated would remain; use a file, e.g. \
             sqlite:///instance/app.db (relative to the working directory)",
        ));
    }
    let resolved: PathBuf = if Path::new(&path).is_absolute() {
        PathBuf::from(&path)
    } else {
        cwd.join(&path)
    };
    let mut out = format!("sqlite:{}", resolved.display());
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    Ok(out)
}

/// The file a (normalized) SQLite URL names.
pub fn sqlite_file(url: &str) -> Option<PathBuf> {
    let rest = url.strip_prefix("sqlite:")?;
    let path = rest.split('?').next().unwrap_or_default();
    Some(PathBuf::from(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_accepted_form() {
        let cwd = Path::new("/srv/app");
        let n = |u: &str| normalize(u, cwd).unwrap();
        for (written, meant) in [
            ("postgres://u:p@db:5432/app", "postgres://u:p@db:5432/app"),
            (
                "postgresql://u:p@db/app?sslmode=require",
                "postgres://u:p@db/app?sslmode=require",
            ),
            ("postgresql+psycopg2://u:p@db/app", "postgres://u:p@db/app"),
            ("postgresql+asyncpg://u:p@db/app", "postgres://u:p@db/app"),
            ("postgresql+psycopg://u:p@db/app", "postgres://u:p@db/app"),
            ("pgsql://u:p@db/app", "postgres://u:p@db/app"),
            ("postgis://u:p@db/app", "postgres://u:p@db/app"),
            (
                "jdbc:postgresql://db:5432/app?user=u&password=p",
                "postgres://db:5432/app?user=u&password=p",
            ),
            ("mysql://u:p@db/app", "mysql://u:p@db/app"),
            ("mariadb://u:p@db/app", "mysql://u:p@db/app"),
            ("mysql2://u:p@db/app", "mysql://u:p@db/app"),
            (
                "mysql+pymysql://u:p@db/app?charset=utf8mb4",
                "mysql://u:p@db/app?charset=utf8mb4",
            ),
            (
                "mariadb+mariadbconnector://u:p@db/app",
                "mysql://u:p@db/app",
            ),
            ("jdbc:mariadb://db:3306/app", "mysql://db:3306/app"),
            (
                "sqlite:///instance/app.db",
                "sqlite:/srv/app/instance/app.db",
            ),
            ("sqlite:////var/lib/app.db", "sqlite:/var/lib/app.db"),
            ("sqlite://app.db", "sqlite:/srv/app/app.db"),
            ("sqlite:app.db", "sqlite:/srv/app/app.db"),
            ("sqlite:/tmp/app.db", "sqlite:/tmp/app.db"),
            (
                "sqlite+pysqlite:///instance/app.db",
                "sqlite:/srv/app/instance/app.db",
            ),
            ("jdbc:sqlite:data/app.db", "sqlite:/srv/app/data/app.db"),
            ("SQLITE:///a.db?mode=rwc", "sqlite:/srv/app/a.db?mode=rwc"),
        ] {
            assert_eq!(n(written), meant, "{written}");
        }
    }

    #[test]
    fn in_memory_and_unknown_schemes_are_refused_with_a_reason() {
        let cwd = Path::new("/srv/app");
        for memory in [
            "sqlite://",
            "sqlite:///:memory:",
            "sqlite::memory:",
            "sqlite:a.db?mode=memory",
        ] {
            let e = normalize(memory, cwd).unwrap_err();
            assert!(e.message.contains("in-memory"), "{memory}: {e}");
        }
        let e = normalize("oracle://u:p@db/app", cwd).unwrap_err();
        assert!(
            e.message.contains("\"oracle\"") && e.message.contains("postgresql[+driver]"),
            "{e}"
        );
        // What is not a scheme is never echoed (it may be a password).
        let e = normalize("hunter2", cwd).unwrap_err();
        assert!(!e.message.contains("hunter2"), "{e}");
        assert_eq!(
            sqlite_file("sqlite:/srv/app/a.db?mode=rwc"),
            Some(PathBuf::from("/srv/app/a.db"))
        );
    }
}
