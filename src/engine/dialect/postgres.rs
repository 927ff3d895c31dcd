//! PostgreSQL: session advisory lock polled with `pg_try_advisory_lock` on the runner's one
//! dedicated connection (or a lease row, behind poolers); a step's BEGIN, fence, timeouts
//! and statements go to the server as one simple-query message (see `engine::sent`); no
//! prepared statements anywhere, so every statement also works through PgBouncer in
//! transaction mode.

use std::str::FromStr;
use std::time::Duration;

use futures_util::StreamExt;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, Either, Row};

use super::sql::{self, Guard, SessionKey};
use super::{
    Backend, ConnectConfig, DbError, DbErrorKind, Done, Flavor, HistoryTable, LockHolder,
    SendFailure, Session, collect, column_type_of, column_type_sql, decode_row, lease_busy,
};
use crate::engine::guard::ColumnType;
use crate::engine::history::HistoryRow;
use crate::engine::script::Dialect;

const D: Dialect = Dialect::Postgres;

/// A PostgreSQL connection dedicated to one run.
pub struct PgBackend {
    conn: PgConnection,
    /// The history table; schema-qualified once `resolved`, so that a migration's
    /// `SET search_path` can never redirect the history writes, and so that
    /// `schemagate_history` and `public.schemagate_history` share one lock.
    table: HistoryTable,
    resolved: bool,
}

fn raw(text: String) -> sqlx::RawSql {
    sqlx::raw_sql(AssertSqlSafe(text))
}

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
            resolved: cfg.table.is_qualified(),
            table: cfg.table.clone(),
        })
    }

    /// The schema that holds the table if the search path finds it, else the one `CREATE`
    /// would put it in.
    fn resolve_sql(&self) -> String {
        format!(
            "SELECT coalesce((SELECT n.nspname::text FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass({})), \
             current_schema()::text)",
            sql::literal(D, &self.table.quoted(D))
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
        self.table = self.table.in_schema(&schema);
        self.resolved = true;
        Ok(())
    }

    async fn resolve(&mut self) -> Result<(), DbError> {
        if !self.resolved {
            let schema: Option<String> = raw(self.resolve_sql())
                .fetch_one(&mut self.conn)
                .await?
                .try_get(0)?;
            self.resolved_to(schema)?;
        }
        Ok(())
    }

    fn key(&self) -> i64 {
        self.table.lock_key()
    }

    /// Runs a statement that returns at most one row with one text column.
    async fn fetch_text(&mut self, text: String) -> Result<Option<String>, DbError> {
        let row = raw(text).fetch_optional(&mut self.conn).await?;
        Ok(match row {
            Some(r) => r.try_get::<Option<String>, _>(0)?,
            None => None,
        })
    }
}

fn code_of(e: &sqlx::Error) -> Option<String> {
    match e {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
        _ => None,
    }
}

fn is_missing_relation(e: &sqlx::Error) -> bool {
    // 42P01 undefined_table, 3F000 invalid_schema_name
    matches!(code_of(e).as_deref(), Some("42P01" | "3F000"))
}

impl Backend for PgBackend {
    fn dialect(&self) -> Dialect {
        D
    }

    fn table(&self) -> &HistoryTable {
        &self.table
    }

    async fn read_history(&mut self) -> Result<Option<Vec<HistoryRow>>, DbError> {
        // Simple queries in one message: one round trip, no prepare. The first read on a
        // connection also resolves the table's schema in the same message.
        let select = sql::select_history(D, &self.table);
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
            let mut results = raw(text).fetch_many(&mut self.conn);
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
        raw(sql::create_history(D, &self.table))
            .execute(&mut self.conn)
            .await?;
        Ok(())
    }

    async fn try_lock(&mut self) -> Result<bool, DbError> {
        self.resolve().await?;
        let key = self.key();
        // Taking a lock this very server session already holds would succeed (advisory
        // locks are re-entrant): the sign of a pooler sharing one server session between
        // clients. Refuse rather than let two runners both "hold" it.
        let got = self
            .fetch_text(format!(
                "SELECT CASE WHEN {} THEN NULL ELSE pg_try_advisory_lock({key})::text END",
                sql::holds_session_lock(D, &SessionKey::Advisory(key))
            ))
            .await?;
        match got.as_deref() {
            Some("true") => Ok(true),
            Some(_) => Ok(false),
            None => Err(DbError::new(
                DbErrorKind::Lock,
                "this server session already holds the migration lock before schemagate took \
                 it: a connection pooler (PgBouncer in transaction mode) is sharing server \
                 sessions between clients, so the session lock cannot work",
            )),
        }
    }

    async fn unlock(&mut self) -> Result<(), DbError> {
        let key = self.key();
        let released = self
            .fetch_text(format!("SELECT pg_advisory_unlock({key})::text"))
            .await?;
        if released.as_deref() != Some("true") {
            return Err(DbError::new(
                DbErrorKind::Lock,
                "the migration lock was not held by this session when releasing it",
            ));
        }
        Ok(())
    }

    async fn lock_holder(&mut self) -> Result<Option<LockHolder>, DbError> {
        self.resolve().await?;
        let (hi, lo) = sql::advisory_parts(self.key());
        let row = raw(format!(
            "SELECT coalesce(nullif(a.application_name, ''), 'pid ' || a.pid::text) || \
                    ' (server pid ' || a.pid::text || coalesce(', from ' || host(a.client_addr), '') || ')', \
                    to_char(a.backend_start AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), \
                    extract(epoch FROM now() - a.backend_start)::bigint \
             FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
               AND l.classid::bigint = {hi} AND l.objid::bigint = {lo} \
               AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
             LIMIT 1"
        ))
        .fetch_optional(&mut self.conn)
        .await?;
        Ok(row.map(|r| LockHolder {
            who: r.try_get(0).unwrap_or_else(|_| "another session".into()),
            since: r.try_get(1).ok(),
            age_seconds: r.try_get(2).ok(),
        }))
    }

    fn session_guard(&self) -> Guard {
        Guard::Session {
            key: SessionKey::Advisory(self.key()),
        }
    }

    async fn lease_acquire(
        &mut self,
        holder: &str,
        token: &str,
        ttl: Duration,
    ) -> Result<bool, DbError> {
        self.resolve().await?;
        let lease = self.table.lease_table();
        // One message = one implicit transaction (pinned to one server connection even
        // through a pooler): make sure the row exists, then take it if it is free.
        let text = format!(
            "{};\n{}",
            sql::lease_seed(D, &lease),
            sql::lease_take(D, &lease, holder, token, ttl)
        );
        let taken = match raw(text.clone()).fetch_optional(&mut self.conn).await {
            Err(e) if is_missing_relation(&e) => {
                // Several runners may create it at once; whoever loses just polls again.
                if let Err(e) = raw(sql::create_lease(D, &lease))
                    .execute(&mut self.conn)
                    .await
                {
                    tracing::debug!(error = %e, "creating the lease table");
                    return Ok(false);
                }
                raw(text).fetch_optional(&mut self.conn).await?
            }
            other => other?,
        };
        Ok(taken.is_some())
    }

    async fn lease_renew(&mut self, token: &str, ttl: Duration) -> Result<bool, DbError> {
        let lease = self.table.lease_table();
        // In its own transaction, with a short lock wait: while the holder's own step locks
        // the row (it renews the lease when it commits), a renewal must not hang.
        let text = format!(
            "BEGIN;\nSET LOCAL lock_timeout = '500ms';\n{};\nCOMMIT",
            sql::lease_renew(D, &lease, token, ttl)
        );
        let mut renewed = false;
        let outcome = {
            let mut results = raw(text).fetch_many(&mut self.conn);
            let mut outcome = Ok(());
            while let Some(item) = results.next().await {
                match item {
                    Ok(Either::Right(_)) => renewed = true,
                    Ok(Either::Left(_)) => {}
                    Err(e) => {
                        outcome = Err(e);
                        break;
                    }
                }
            }
            outcome
        };
        match outcome {
            Ok(()) => Ok(renewed),
            Err(e) => {
                let _ = sqlx::raw_sql("ROLLBACK").execute(&mut self.conn).await;
                if code_of(&e).as_deref() == Some("55P03") {
                    Err(lease_busy())
                } else {
                    Err(e.into())
                }
            }
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
        self.resolve().await?;
        let lease = self.table.lease_table();
        match raw(sql::lease_holder(D, &lease))
            .fetch_optional(&mut self.conn)
            .await
        {
            Ok(row) => Ok(row.map(|r| LockHolder {
                who: r.try_get(0).unwrap_or_default(),
                since: r.try_get(1).ok(),
                age_seconds: r.try_get(2).ok(),
            })),
            Err(e) if is_missing_relation(&e) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn session(&mut self) -> Result<Session, DbError> {
        Ok(Session {
            flavor: Flavor::Postgres,
            database: None,
            busy_timeout: Duration::ZERO,
        })
    }

    async fn send(&mut self, text: &str) -> Result<Vec<Done>, SendFailure> {
        // PostgreSQL reports no inserted id: `RETURNING id` carries it.
        collect(raw(text.to_string()).fetch_many(&mut self.conn), |r| {
            (r.rows_affected(), None)
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
            Err(e) if is_missing_relation(&e) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn ping(&mut self) -> Result<(), DbError> {
        raw("SELECT 1".to_string()).execute(&mut self.conn).await?;
        Ok(())
    }

    async fn close(self) {
        // A failed close still drops the socket, which ends the session and its lock.
        let _ = self.conn.close().await;
    }
}
