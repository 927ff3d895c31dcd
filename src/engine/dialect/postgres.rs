//! PostgreSQL: session advisory lock polled with `pg_try_advisory_lock` on the runner's one
//! dedicated connection; a step's body, BEGIN included, goes to the server as one
//! simple-query message.

use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, Row};

use super::{
    Backend, ConnectConfig, DbError, DbErrorKind, ExecFailure, HistoryTable, LockHolder, NewRow,
    begin_with, bind_finish, bind_row, count_results, decode_row, finish_sql, insert_sql,
    progress_sql, select_sql,
};
use crate::engine::history::HistoryRow;
use crate::engine::script::Dialect;

/// A PostgreSQL connection dedicated to one run.
pub struct PgBackend {
    conn: PgConnection,
    table: HistoryTable,
    key: i64,
    insert: String,
    progress: String,
    finish: String,
}

const D: Dialect = Dialect::Postgres;

impl PgBackend {
    pub async fn connect(cfg: &ConnectConfig) -> Result<Self, DbError> {
        let opts = PgConnectOptions::from_str(&cfg.url)
            .map_err(DbError::from)?
            .application_name(&cfg.application_name)
            .disable_statement_logging();
        let conn = match tokio::time::timeout(
            cfg.connect_timeout,
            PgConnection::connect_with(&opts),
        )
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
        Ok(PgBackend {
            conn,
            key: cfg.table.lock_key(),
            insert: format!("{} RETURNING id", insert_sql(D, &cfg.table)),
            progress: progress_sql(D, &cfg.table),
            finish: finish_sql(D, &cfg.table),
            table: cfg.table.clone(),
        })
    }

    /// The advisory lock key split the way `pg_locks` shows a bigint key.
    fn key_parts(&self) -> (i64, i64) {
        let k = self.key as u64;
        ((k >> 32) as i64, (k & 0xffff_ffff) as i64)
    }
}

fn is_missing_relation(e: &sqlx::Error) -> bool {
    // 42P01 undefined_table, 3F000 invalid_schema_name
    matches!(e, sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("42P01" | "3F000")))
}

impl Backend for PgBackend {
    fn dialect(&self) -> Dialect {
        D
    }

    async fn read_history(&mut self) -> Result<Option<Vec<HistoryRow>>, DbError> {
        // A simple query: one round trip, no prepare. A missing table is "never migrated".
        let sql = select_sql(D, &self.table);
        match sqlx::raw_sql(AssertSqlSafe(sql))
            .fetch_all(&mut self.conn)
            .await
        {
            Ok(rows) => rows
                .iter()
                .map(|r| decode_row(r).map_err(DbError::from))
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Err(e) if is_missing_relation(&e) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn create_history_table(&mut self) -> Result<(), DbError> {
        let sql = super::create_table_sql(D, &self.table);
        sqlx::raw_sql(AssertSqlSafe(sql))
            .execute(&mut self.conn)
            .await?;
        Ok(())
    }

    async fn try_lock(&mut self) -> Result<bool, DbError> {
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(self.key)
            .fetch_one(&mut self.conn)
            .await?;
        Ok(got)
    }

    async fn unlock(&mut self) -> Result<(), DbError> {
        let released: bool = sqlx::query_scalar("SELECT pg_advisory_unlock($1)")
            .bind(self.key)
            .fetch_one(&mut self.conn)
            .await?;
        if !released {
            return Err(DbError::new(
                DbErrorKind::Other,
                "the migration lock was not held by this session when releasing it",
            ));
        }
        Ok(())
    }

    async fn lock_holder(&mut self) -> Result<Option<LockHolder>, DbError> {
        let (hi, lo) = self.key_parts();
        let row = sqlx::query(
            "SELECT coalesce(nullif(a.application_name, ''), 'pid ' || a.pid::text) || \
                    ' (server pid ' || a.pid::text || coalesce(', from ' || host(a.client_addr), '') || ')', \
                    to_char(a.backend_start AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), \
                    extract(epoch FROM now() - a.backend_start)::bigint \
             FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
               AND l.classid::bigint = $1 AND l.objid::bigint = $2 \
               AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
             LIMIT 1",
        )
        .bind(hi)
        .bind(lo)
        .fetch_optional(&mut self.conn)
        .await?;
        Ok(row.map(|r| LockHolder {
            who: r.try_get(0).unwrap_or_else(|_| "another session".into()),
            since: r.try_get(1).ok(),
            age_seconds: r.try_get(2).ok(),
        }))
    }

    async fn begin_and_run(&mut self, body: &str) -> Result<(), ExecFailure> {
        count_results(begin_with(D, body).execute_many(&mut self.conn)).await
    }

    async fn commit(&mut self) -> Result<(), DbError> {
        sqlx::raw_sql("COMMIT").execute(&mut self.conn).await?;
        Ok(())
    }

    async fn rollback(&mut self) -> Result<(), DbError> {
        sqlx::raw_sql("ROLLBACK").execute(&mut self.conn).await?;
        Ok(())
    }

    async fn execute(&mut self, statement: &str) -> Result<(), DbError> {
        sqlx::raw_sql(AssertSqlSafe(statement.to_string()))
            .execute(&mut self.conn)
            .await?;
        Ok(())
    }

    async fn insert_row(&mut self, row: &NewRow) -> Result<i64, DbError> {
        let q = sqlx::query(AssertSqlSafe(self.insert.clone()));
        let r = bind_row(q, row).fetch_one(&mut self.conn).await?;
        Ok(r.try_get(0)?)
    }

    async fn record_progress(&mut self, id: i64, done: i64) -> Result<(), DbError> {
        sqlx::query(AssertSqlSafe(self.progress.clone()))
            .bind(done)
            .bind(id)
            .execute(&mut self.conn)
            .await?;
        Ok(())
    }

    async fn finish_row(
        &mut self,
        id: i64,
        success: bool,
        duration_ms: i64,
        error: Option<&str>,
        done: i64,
    ) -> Result<(), DbError> {
        let q = sqlx::query(AssertSqlSafe(self.finish.clone()));
        bind_finish(q, id, success, duration_ms, error, done)
            .execute(&mut self.conn)
            .await?;
        Ok(())
    }

    async fn close(self) {
        // A failed close still drops the socket, which ends the session and its lock.
        let _ = self.conn.close().await;
    }
}
