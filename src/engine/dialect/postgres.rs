//! PostgreSQL: session advisory lock polled with `pg_try_advisory_lock` on the runner's one
//! dedicated connection; a step's body, BEGIN included, goes to the server as one
//! simple-query message.

use std::str::FromStr;

use futures_util::StreamExt;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, Either, Row};

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
    /// The history table; schema-qualified once `resolved`, so that a migration's
    /// `SET search_path` can never redirect the history writes, and so that
    /// `schemagate_history` and `public.schemagate_history` share one lock.
    table: HistoryTable,
    resolved: bool,
    key: i64,
    insert: String,
    progress: String,
    finish: String,
}

const D: Dialect = Dialect::Postgres;

/// Restores what a migration may have changed for the session.
const RESET_SESSION: &str = "RESET ROLE; RESET search_path";
/// A step's COMMIT and the session reset in one message (the reset is skipped if the
/// COMMIT fails).
const COMMIT_AND_RESET: &str = "COMMIT; RESET ROLE; RESET search_path";

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
        let mut backend = PgBackend {
            conn,
            table: cfg.table.clone(),
            resolved: false,
            key: 0,
            insert: String::new(),
            progress: String::new(),
            finish: String::new(),
        };
        if cfg.table.is_qualified() {
            backend.set_table(cfg.table.clone());
        }
        Ok(backend)
    }

    fn set_table(&mut self, table: HistoryTable) {
        self.key = table.lock_key();
        self.insert = format!("{} RETURNING id", insert_sql(D, &table));
        self.progress = progress_sql(D, &table);
        self.finish = finish_sql(D, &table);
        self.table = table;
        self.resolved = true;
    }

    /// The schema that holds the table if the search path finds it, else the one `CREATE`
    /// would put it in.
    fn resolve_sql(&self) -> String {
        format!(
            "SELECT coalesce((SELECT n.nspname::text FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass('{}')), \
             current_schema()::text)",
            self.table.quoted(D)
        )
    }

    fn resolved_to(&mut self, schema: Option<String>) -> Result<(), DbError> {
        let Some(schema) = schema else {
            return Err(DbError::new(
                DbErrorKind::Config,
                "the search_path names no existing schema to hold the history table; pass \
                 --history-table schema.name",
            ));
        };
        let table = self.table.in_schema(&schema);
        self.set_table(table);
        Ok(())
    }

    async fn resolve(&mut self) -> Result<(), DbError> {
        if !self.resolved {
            let sql = self.resolve_sql();
            let schema: Option<String> = sqlx::raw_sql(AssertSqlSafe(sql))
                .fetch_one(&mut self.conn)
                .await?
                .try_get(0)?;
            self.resolved_to(schema)?;
        }
        Ok(())
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
        // Simple queries in one message: one round trip, no prepare. The first run on a
        // connection also resolves the table's schema in the same message.
        let select = select_sql(D, &self.table);
        let resolving = !self.resolved;
        let text = if resolving {
            format!("{};\n{select}", self.resolve_sql())
        } else {
            select
        };
        let mut schema = None;
        let mut rows = Vec::new();
        let mut missing = false;
        {
            let mut results = sqlx::raw_sql(AssertSqlSafe(text)).fetch_many(&mut self.conn);
            let mut statement = 0;
            while let Some(item) = results.next().await {
                match item {
                    Ok(Either::Left(_)) => statement += 1,
                    Ok(Either::Right(row)) if resolving && statement == 0 => {
                        schema = row.try_get::<Option<String>, _>(0)?;
                    }
                    Ok(Either::Right(row)) => rows.push(decode_row(&row)?),
                    // A missing table is "never migrated".
                    Err(e) if is_missing_relation(&e) => {
                        missing = true;
                        break;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        if resolving {
            self.resolved_to(schema)?;
        }
        Ok((!missing).then_some(rows))
    }

    async fn create_history_table(&mut self) -> Result<(), DbError> {
        self.resolve().await?;
        let sql = super::create_table_sql(D, &self.table);
        sqlx::raw_sql(AssertSqlSafe(sql))
            .execute(&mut self.conn)
            .await?;
        Ok(())
    }

    async fn try_lock(&mut self) -> Result<bool, DbError> {
        self.resolve().await?;
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
        self.resolve().await?;
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
        sqlx::raw_sql(COMMIT_AND_RESET)
            .execute(&mut self.conn)
            .await?;
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

    async fn reset_session(&mut self) -> Result<(), DbError> {
        sqlx::raw_sql(RESET_SESSION).execute(&mut self.conn).await?;
        Ok(())
    }

    fn table(&self) -> &HistoryTable {
        &self.table
    }

    async fn close(self) {
        // A failed close still drops the socket, which ends the session and its lock.
        let _ = self.conn.close().await;
    }
}
