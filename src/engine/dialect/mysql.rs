//! MySQL and MariaDB: `GET_LOCK`/`RELEASE_LOCK` on the runner's dedicated connection (or a
//! lease row, where `GET_LOCK` is node-local). MySQL commits DDL implicitly, so only steps
//! made entirely of data statements run in a transaction with their history row; the rest
//! run statement by statement with their progress recorded (see `runner::prepare` and
//! `engine::sent`).
//!
//! schemagate leaves the session's `sql_mode` and `time_zone` as the server has them
//! (sqlx would otherwise add `PIPES_AS_CONCAT` and switch to UTC, changing what a
//! migration's `||` or `NOW()` means).

use std::str::FromStr;
use std::time::Duration;

use sqlx::mysql::{MySqlConnectOptions, MySqlConnection};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, Row};

use super::sql::{self, Guard, SessionKey};
use super::{
    Backend, ConnectConfig, DbError, DbErrorKind, Done, Flavor, HistoryTable, LockHolder,
    SendFailure, Session, collect, column_type_of, column_type_sql, decode_row, lease_busy,
};
use crate::engine::guard::ColumnType;
use crate::engine::history::HistoryRow;
use crate::engine::script::Dialect;

const D: Dialect = Dialect::MySql;

/// A MySQL/MariaDB connection dedicated to one run.
pub struct MySqlBackend {
    conn: MySqlConnection,
    /// Qualified with the URL's database, so a migration's `USE other` cannot redirect it.
    table: HistoryTable,
    database: Option<String>,
    /// MariaDB or MySQL, once asked: they name the statement timeout differently.
    flavor: Option<Flavor>,
    /// The lease connection waits at most a second for a row lock.
    lease_session_set: bool,
}

fn raw(text: String) -> sqlx::RawSql {
    sqlx::raw_sql(AssertSqlSafe(text))
}

fn sqlstate(e: &sqlx::Error) -> Option<String> {
    match e {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
        _ => None,
    }
}

fn is_missing_table(e: &sqlx::Error) -> bool {
    sqlstate(e).as_deref() == Some("42S02")
}

fn is_lock_wait_timeout(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.message().contains("Lock wait timeout"))
}

impl MySqlBackend {
    pub async fn connect(cfg: &ConnectConfig) -> Result<Self, DbError> {
        // sqlx knows the `mysql` scheme only.
        let url = match cfg.url.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("mariadb") => {
                format!("mysql://{rest}")
            }
            _ => cfg.url.clone(),
        };
        let opts = MySqlConnectOptions::from_str(&url)
            .map_err(DbError::from)?
            .pipes_as_concat(false)
            .no_engine_substitution(false)
            .timezone(None)
            .disable_statement_logging();
        let database = opts.get_database().map(str::to_string);
        let conn =
            match tokio::time::timeout(cfg.connect_timeout, MySqlConnection::connect_with(&opts))
                .await
            {
                Ok(r) => r.map_err(DbError::from)?,
                Err(_) => {
                    return Err(DbError::new(
                        DbErrorKind::Unreachable,
                        format!(
                            "no answer from the database server within {}s",
                            cfg.connect_timeout.as_secs_f32()
                        ),
                    ));
                }
            };
        let table = match &database {
            Some(db) if !cfg.table.is_qualified() => cfg.table.in_schema(db),
            _ => cfg.table.clone(),
        };
        Ok(MySqlBackend {
            conn,
            table,
            database,
            flavor: None,
            lease_session_set: false,
        })
    }

    fn lock_name(&self) -> String {
        sql::mysql_lock_name(&self.table)
    }

    async fn flavor(&mut self) -> Result<Flavor, DbError> {
        if let Some(f) = self.flavor {
            return Ok(f);
        }
        let version: String = sqlx::raw_sql("SELECT VERSION()")
            .fetch_one(&mut self.conn)
            .await?
            .try_get(0)?;
        let f = if version.to_ascii_lowercase().contains("mariadb") {
            Flavor::MariaDb
        } else {
            Flavor::MySql
        };
        self.flavor = Some(f);
        Ok(f)
    }

    async fn fetch_int(&mut self, text: String) -> Result<Option<i64>, DbError> {
        let row = raw(text).fetch_optional(&mut self.conn).await?;
        Ok(match row {
            Some(r) => r.try_get::<Option<i64>, _>(0)?,
            None => None,
        })
    }

    async fn lease_session(&mut self) -> Result<(), DbError> {
        if !self.lease_session_set {
            // Lease statements must never queue behind a step holding the lease row, and
            // compare times in UTC (no ambiguous hour when daylight saving time ends).
            sqlx::raw_sql("SET SESSION innodb_lock_wait_timeout = 1, time_zone = '+00:00'")
                .execute(&mut self.conn)
                .await?;
            self.lease_session_set = true;
        }
        Ok(())
    }
}

impl Backend for MySqlBackend {
    fn dialect(&self) -> Dialect {
        D
    }

    fn table(&self) -> &HistoryTable {
        &self.table
    }

    async fn read_history(&mut self) -> Result<Option<Vec<HistoryRow>>, DbError> {
        match raw(sql::select_history(D, &self.table))
            .fetch_all(&mut self.conn)
            .await
        {
            Ok(rows) => rows
                .iter()
                .map(|r| decode_row(r).map_err(DbError::from))
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Err(e) if is_missing_table(&e) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn create_history_table(&mut self) -> Result<(), DbError> {
        raw(sql::create_history(D, &self.table))
            .execute(&mut self.conn)
            .await?;
        Ok(())
    }

    async fn try_lock(&mut self) -> Result<bool, DbError> {
        let name = sql::literal(D, &self.lock_name());
        // GET_LOCK is re-entrant for one connection: a proxy that multiplexes connections
        // (ProxySQL, MaxScale) could make two runners share one. Refuse that.
        let got = self
            .fetch_int(format!(
                "SELECT CAST(CASE WHEN IS_USED_LOCK({name}) = CONNECTION_ID() THEN -1 \
                 ELSE GET_LOCK({name}, 0) END AS SIGNED)"
            ))
            .await?;
        match got {
            Some(1) => Ok(true),
            Some(0) => Ok(false),
            Some(_) => Err(DbError::new(
                DbErrorKind::Lock,
                "this server connection already holds the migration lock before schemagate \
                 took it: a proxy is sharing server connections between clients",
            )),
            None => Err(DbError::new(
                DbErrorKind::Other,
                "GET_LOCK failed (the server returned NULL)",
            )),
        }
    }

    async fn unlock(&mut self) -> Result<(), DbError> {
        let name = sql::literal(D, &self.lock_name());
        let released = self
            .fetch_int(format!("SELECT CAST(RELEASE_LOCK({name}) AS SIGNED)"))
            .await?;
        if released != Some(1) {
            return Err(DbError::new(
                DbErrorKind::Lock,
                "RELEASE_LOCK reports that this connection did not hold the migration lock",
            ));
        }
        Ok(())
    }

    async fn lock_holder(&mut self) -> Result<Option<LockHolder>, DbError> {
        let name = sql::literal(D, &self.lock_name());
        let row = raw(format!(
            "SELECT CAST(p.ID AS SIGNED), p.USER, p.HOST, CAST(p.TIME AS SIGNED) \
             FROM information_schema.PROCESSLIST p WHERE p.ID = IS_USED_LOCK({name})"
        ))
        .fetch_optional(&mut self.conn)
        .await?;
        Ok(row.map(|r| {
            let id: i64 = r.try_get(0).unwrap_or_default();
            let user: String = r.try_get(1).unwrap_or_default();
            let host: String = r.try_get(2).unwrap_or_default();
            LockHolder {
                who: format!("MySQL connection {id} ({user}@{host})"),
                since: None,
                age_seconds: r.try_get(3).ok(),
            }
        }))
    }

    fn session_guard(&self) -> Guard {
        Guard::Session {
            key: SessionKey::Named(self.lock_name()),
        }
    }

    async fn lease_acquire(
        &mut self,
        holder: &str,
        token: &str,
        ttl: Duration,
    ) -> Result<bool, DbError> {
        self.lease_session().await?;
        let lease = self.table.lease_table();
        let seed = sql::lease_seed(D, &lease);
        let take = sql::lease_take(D, &lease, holder, token, ttl);
        for attempt in 0..2 {
            match raw(seed.clone()).execute(&mut self.conn).await {
                Err(e) if is_missing_table(&e) && attempt == 0 => {
                    raw(sql::create_lease(D, &lease))
                        .execute(&mut self.conn)
                        .await?;
                    continue;
                }
                // A running step holds the row: busy, poll again.
                Err(e) if is_lock_wait_timeout(&e) => return Ok(false),
                other => {
                    other?;
                }
            }
            return match raw(take.clone()).execute(&mut self.conn).await {
                Ok(done) => Ok(done.rows_affected() == 1),
                Err(e) if is_lock_wait_timeout(&e) => Ok(false),
                Err(e) => Err(e.into()),
            };
        }
        Ok(false)
    }

    async fn lease_renew(&mut self, token: &str, ttl: Duration) -> Result<bool, DbError> {
        self.lease_session().await?;
        let lease = self.table.lease_table();
        match raw(sql::lease_renew(D, &lease, token, ttl))
            .execute(&mut self.conn)
            .await
        {
            Ok(done) => Ok(done.rows_affected() == 1),
            // Our own running step holds the row (it renews the lease when it commits).
            Err(e) if is_lock_wait_timeout(&e) => Err(lease_busy()),
            Err(e) => Err(e.into()),
        }
    }

    async fn lease_release(&mut self, token: &str) -> Result<(), DbError> {
        let lease = self.table.lease_table();
        raw(sql::lease_release(D, &lease, token))
            .execute(&mut self.conn)
            .await?;
        Ok(())
    }

    async fn lease_holder(&mut self) -> Result<Option<LockHolder>, DbError> {
        let lease = self.table.lease_table();
        match raw(sql::lease_holder(D, &lease))
            .fetch_optional(&mut self.conn)
            .await
        {
            Ok(row) => Ok(row.map(|r| {
                let since: Option<String> = r.try_get(1).ok();
                LockHolder {
                    who: r.try_get(0).unwrap_or_default(),
                    since: since
                        .and_then(|ms| ms.parse::<i64>().ok())
                        .map(crate::engine::clock::iso_from_millis),
                    age_seconds: r.try_get(2).ok(),
                }
            })),
            Err(e) if is_missing_table(&e) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn session(&mut self) -> Result<Session, DbError> {
        Ok(Session {
            flavor: self.flavor().await?,
            database: self.database.clone(),
            busy_timeout: Duration::ZERO,
        })
    }

    async fn send(&mut self, text: &str) -> Result<Vec<Done>, SendFailure> {
        collect(raw(text.to_string()).fetch_many(&mut self.conn), |r| {
            let id = r.last_insert_id();
            (
                r.rows_affected(),
                (id > 0).then(|| i64::try_from(id).ok()).flatten(),
            )
        })
        .await
    }

    async fn column_type(
        &mut self,
        table: &[String],
        column: &str,
    ) -> Result<Option<ColumnType>, DbError> {
        let Some(text) = column_type_sql(D, table, column) else {
            return Ok(None);
        };
        let row = raw(text).fetch_optional(&mut self.conn).await?;
        Ok(row.map(|r| column_type_of(&r)).transpose()?)
    }

    async fn query_text(&mut self, sql: &str) -> Result<Option<super::TextRows>, DbError> {
        match raw(sql.to_string()).fetch_all(&mut self.conn).await {
            Ok(rows) => Ok(Some(super::text_rows(&rows)?)),
            Err(e) if is_missing_table(&e) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn ping(&mut self) -> Result<(), DbError> {
        raw("SELECT 1".to_string()).execute(&mut self.conn).await?;
        Ok(())
    }

    async fn close(self) {
        let _ = self.conn.close().await;
    }
}
