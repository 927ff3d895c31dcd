//! SQLite: each step runs in `BEGIN IMMEDIATE` (SQLite's write lock, waited for up to the
//! busy timeout), and the run as a whole holds an OS file lock (`flock`) on a sidecar file
//! `<database>.schemagate-lock`, which the kernel releases when the process dies, exactly
//! like a PostgreSQL session lock. The sidecar holds the holder's identity for waiters.
//! (On network filesystems `flock` may not be shared between hosts; neither is SQLite's
//! own locking, which SQLite documents.)

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection};

use super::sql::{self, Guard};
use super::{
    Backend, ConnectConfig, DbError, DbErrorKind, Done, Flavor, HistoryTable, LockHolder,
    SendFailure, Session, collect, decode_row,
};
use crate::engine::clock;
use crate::engine::guard::ColumnType;
use crate::engine::history::HistoryRow;
use crate::engine::script::Dialect;

const D: Dialect = Dialect::Sqlite;

/// A SQLite connection dedicated to one run.
pub struct SqliteBackend {
    /// `None` when the database file does not exist and the command only reads.
    conn: Option<SqliteConnection>,
    /// The database file; `None` for an in-memory database.
    path: Option<PathBuf>,
    opts: SqliteConnectOptions,
    table: HistoryTable,
    who: String,
    lock: Option<File>,
    busy_timeout: Duration,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct HolderFile {
    who: String,
    since_ms: i64,
}

impl SqliteBackend {
    pub async fn connect(cfg: &ConnectConfig) -> Result<Self, DbError> {
        let opts = SqliteConnectOptions::from_str(&cfg.url)
            .map_err(DbError::from)?
            .busy_timeout(cfg.busy_timeout)
            .disable_statement_logging()
            // SQLite's own default. With foreign keys on, the DROP TABLE of a table rebuild
            // (the usual way to alter a SQLite table) would cascade into the children's rows.
            .foreign_keys(false);
        let in_memory = cfg.url.contains(":memory:") || cfg.url.contains("mode=memory");
        let path = (!in_memory).then(|| canonical(opts.get_filename()));
        let mut backend = SqliteBackend {
            conn: None,
            path: path.clone(),
            opts,
            table: cfg.table.clone(),
            who: cfg.application_name.clone(),
            lock: None,
            busy_timeout: cfg.busy_timeout,
        };
        // A missing file stays missing until something is written: reading commands and
        // failed runs must not leave an empty database behind.
        if path.as_ref().is_none_or(|p| p.exists()) {
            backend.open(false).await?;
        }
        Ok(backend)
    }

    async fn open(&mut self, create: bool) -> Result<(), DbError> {
        let opts = self.opts.clone().create_if_missing(create);
        self.conn = Some(
            SqliteConnection::connect_with(&opts)
                .await
                .map_err(DbError::from)?,
        );
        Ok(())
    }

    fn conn(&mut self) -> Result<&mut SqliteConnection, DbError> {
        self.conn.as_mut().ok_or_else(|| {
            DbError::new(
                DbErrorKind::NoDatabase,
                "the SQLite database file does not exist",
            )
        })
    }

    fn lock_path(&self) -> Option<PathBuf> {
        self.path.as_ref().map(|p| {
            let mut s = p.clone().into_os_string();
            s.push(".schemagate-lock");
            PathBuf::from(s)
        })
    }
}

/// The database file's canonical path, so that every runner (whatever relative path or
/// symlink it was given) locks the same sidecar file.
fn canonical(path: &std::path::Path) -> PathBuf {
    if let Ok(p) = path.canonicalize() {
        return p;
    }
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => {
            let parent = if parent.as_os_str().is_empty() {
                std::path::Path::new(".")
            } else {
                parent
            };
            parent
                .canonicalize()
                .map(|p| p.join(name))
                .unwrap_or_else(|_| path.to_path_buf())
        }
        _ => path.to_path_buf(),
    }
}

fn lease_unsupported() -> DbError {
    DbError::new(
        DbErrorKind::Config,
        "the lease lock is for PostgreSQL and MySQL; SQLite always uses its file lock",
    )
}

fn lock_err(e: std::io::Error, path: &std::path::Path) -> DbError {
    DbError::new(
        DbErrorKind::Other,
        format!("cannot use the lock file {}: {e}", path.display()),
    )
}

impl Backend for SqliteBackend {
    fn dialect(&self) -> Dialect {
        D
    }

    fn table(&self) -> &HistoryTable {
        &self.table
    }

    fn session_guard(&self) -> Guard {
        // A file lock cannot be lost while the process lives.
        Guard::None
    }

    async fn lease_acquire(&mut self, _: &str, _: &str, _: Duration) -> Result<bool, DbError> {
        Err(lease_unsupported())
    }

    async fn lease_renew(&mut self, _: &str, _: Duration) -> Result<bool, DbError> {
        Err(lease_unsupported())
    }

    async fn lease_release(&mut self, _: &str) -> Result<(), DbError> {
        Err(lease_unsupported())
    }

    async fn lease_holder(&mut self) -> Result<Option<LockHolder>, DbError> {
        Ok(None)
    }

    async fn read_history(&mut self) -> Result<Option<Vec<HistoryRow>>, DbError> {
        let sql = sql::select_history(D, &self.table);
        // Another runner may have created the file since we looked: look again.
        if self.conn.is_none() && self.path.as_ref().is_some_and(|p| p.exists()) {
            self.open(false).await?;
        }
        let Some(conn) = self.conn.as_mut() else {
            return Ok(None);
        };
        match sqlx::raw_sql(AssertSqlSafe(sql)).fetch_all(conn).await {
            Ok(rows) => rows
                .iter()
                .map(|r| decode_row(r).map_err(DbError::from))
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Err(sqlx::Error::Database(e)) if e.message().starts_with("no such table") => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn create_history_table(&mut self) -> Result<(), DbError> {
        if self.conn.is_none() {
            self.open(true).await?;
        }
        let sql = sql::create_history(D, &self.table);
        sqlx::raw_sql(AssertSqlSafe(sql))
            .execute(self.conn()?)
            .await?;
        Ok(())
    }

    async fn try_lock(&mut self) -> Result<bool, DbError> {
        let Some(path) = self.lock_path() else {
            return Ok(true); // in-memory: nobody else can see this database
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| lock_err(e, &path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Ok(false),
            Err(TryLockError::Error(e)) => return Err(lock_err(e, &path)),
        }
        let holder = HolderFile {
            who: self.who.clone(),
            since_ms: clock::now_millis(),
        };
        let text = serde_json::to_string(&holder).unwrap_or_default();
        file.set_len(0)
            .and_then(|_| file.rewind())
            .and_then(|_| file.write_all(text.as_bytes()))
            .map_err(|e| lock_err(e, &path))?;
        self.lock = Some(file);
        Ok(true)
    }

    async fn unlock(&mut self) -> Result<(), DbError> {
        if let Some(file) = self.lock.take() {
            file.unlock().map_err(|e| {
                DbError::new(
                    DbErrorKind::Other,
                    format!("cannot release the lock file: {e}"),
                )
            })?;
        }
        Ok(())
    }

    async fn lock_holder(&mut self) -> Result<Option<LockHolder>, DbError> {
        let Some(path) = self.lock_path() else {
            return Ok(None);
        };
        if self.lock.is_some() {
            return Ok(Some(LockHolder {
                who: self.who.clone(),
                since: None,
                age_seconds: None,
            }));
        }
        let mut file = match OpenOptions::new().read(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(lock_err(e, &path)),
        };
        // Probe: if the lock can be taken, nobody holds it.
        match file.try_lock_shared() {
            Ok(()) => {
                let _ = file.unlock();
                return Ok(None);
            }
            Err(TryLockError::WouldBlock) => {}
            Err(TryLockError::Error(e)) => return Err(lock_err(e, &path)),
        }
        let mut text = String::new();
        let _ = file.read_to_string(&mut text);
        Ok(Some(match serde_json::from_str::<HolderFile>(&text) {
            Ok(h) => LockHolder {
                who: h.who,
                since: Some(clock::iso_from_millis(h.since_ms)),
                age_seconds: Some((clock::now_millis() - h.since_ms) / 1000),
            },
            Err(_) => LockHolder {
                who: "another process (it has not written its name yet)".into(),
                since: None,
                age_seconds: None,
            },
        }))
    }

    async fn session(&mut self) -> Result<Session, DbError> {
        Ok(Session {
            flavor: Flavor::Sqlite,
            database: None,
            busy_timeout: self.busy_timeout,
        })
    }

    async fn send(&mut self, text: &str) -> Result<Vec<Done>, SendFailure> {
        let conn = self.conn().map_err(|error| SendFailure {
            done: Vec::new(),
            error,
        })?;
        // `RETURNING id` carries inserted ids.
        collect(
            sqlx::raw_sql(AssertSqlSafe(text.to_string())).fetch_many(conn),
            |r| (r.rows_affected(), None),
        )
        .await
    }

    async fn column_type(&mut self, _: &[String], _: &str) -> Result<Option<ColumnType>, DbError> {
        Ok(None) // SQLite cannot change a column's type in place
    }

    async fn query_text(&mut self, sql: &str) -> Result<Option<super::TextRows>, DbError> {
        if self.conn.is_none() && self.path.as_ref().is_some_and(|p| p.exists()) {
            self.open(false).await?;
        }
        let Some(conn) = self.conn.as_mut() else {
            return Ok(None);
        };
        match sqlx::raw_sql(AssertSqlSafe(sql.to_string()))
            .fetch_all(conn)
            .await
        {
            Ok(rows) => Ok(Some(super::text_rows(&rows)?)),
            Err(sqlx::Error::Database(e)) if e.message().starts_with("no such table") => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn ping(&mut self) -> Result<(), DbError> {
        // The lock is on the file, not on this connection; nothing to lose but the file.
        if let Some(conn) = self.conn.as_mut() {
            sqlx::raw_sql("SELECT 1").execute(conn).await?;
        }
        Ok(())
    }

    async fn close(mut self) {
        let _ = self.unlock().await;
        if let Some(conn) = self.conn.take() {
            let _ = conn.close().await;
        }
    }
}
