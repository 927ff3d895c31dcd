//! The seam between the engine and each database: the SQL it sends, how it locks, how it
//! runs a migration and its history row in one transaction.
//!
//! Every dialect implements [`Backend`]; [`Db`] picks one from the URL's scheme. The SQL
//! text is built by the pure functions of [`sql`] and assembled per step by
//! [`crate::engine::sent`], so `plan` prints exactly what `upgrade` sends; a backend only
//! sends it ([`Backend::send`]) and says what it needs to know about its session.

pub mod mysql;
pub mod postgres;
pub mod sql;
pub mod sqlite;
pub mod url;

use std::future::Future;
use std::time::Duration;

use futures_util::StreamExt;
use sqlx::{ColumnIndex, Decode, Either, Row, Type};

use super::guard::ColumnType;
use super::history::{HistoryRow, Kind};
use super::redact;
use super::script::Dialect;

/// The history table's name, validated (`name` or `schema.name`, plain identifiers only).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryTable {
    parts: Vec<String>,
}

/// Default history table name.
pub const DEFAULT_HISTORY_TABLE: &str = "schemagate_history";

impl HistoryTable {
    pub fn parse(name: &str) -> Result<Self, String> {
        let parts: Vec<String> = name.split('.').map(str::to_string).collect();
        // 58: the lease table's name adds `_lock` and must stay within PostgreSQL's 63.
        let ok = |p: &str| {
            !p.is_empty()
                && p.len() <= 58
                && p.bytes()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphabetic() || c == b'_')
                && p.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_')
        };
        if parts.len() > 2 || !parts.iter().all(|p| ok(p)) {
            return Err(format!(
                "history table name {name:?} must be `name` or `schema.name` made of letters, digits \
                 and `_` (at most 58 each)"
            ));
        }
        Ok(HistoryTable { parts })
    }

    pub fn name(&self) -> String {
        self.parts.join(".")
    }

    /// The lease table that goes with this history table (`<name>_lock`).
    pub fn lease_table(&self) -> HistoryTable {
        self.with_suffix("_lock")
    }

    /// A table beside this one: the same schema, `suffix` (at most 5 characters, within
    /// PostgreSQL's 63) added to the name.
    pub fn with_suffix(&self, suffix: &str) -> HistoryTable {
        let mut parts = self.parts.clone();
        if let Some(last) = parts.last_mut() {
            last.push_str(suffix);
        }
        HistoryTable { parts }
    }

    /// The table's own name, without its schema.
    pub fn table_name(&self) -> &str {
        self.parts.last().map(String::as_str).unwrap_or_default()
    }

    /// True when the name says its schema.
    pub fn is_qualified(&self) -> bool {
        self.parts.len() == 2
    }

    /// The same table in `schema` (the name as resolved by the server).
    pub fn in_schema(&self, schema: &str) -> HistoryTable {
        let table = self.parts.last().cloned().unwrap_or_default();
        HistoryTable {
            parts: vec![schema.to_string(), table],
        }
    }

    /// The name quoted for SQL.
    pub fn quoted(&self, dialect: Dialect) -> String {
        let q = if dialect == Dialect::MySql { '`' } else { '"' };
        // Names from the server (a schema, a database) are not validated: escape the quote.
        self.parts
            .iter()
            .map(|p| format!("{q}{}{q}", p.replace(q, &format!("{q}{q}"))))
            .collect::<Vec<_>>()
            .join(".")
    }

    /// The advisory lock key: the first 8 bytes of SHA-256("schemagate:" + name). Advisory
    /// locks are per database, so the key only has to tell history tables apart.
    pub fn lock_key(&self) -> i64 {
        let digest = super::script::sha256_hex(format!("schemagate:{}", self.name()).as_bytes());
        let hi = u64::from_str_radix(&digest[..16], 16).unwrap_or(0);
        hi as i64
    }
}

/// The columns the runner writes for a step.
#[derive(Clone, Debug)]
pub struct NewRow {
    pub version: String,
    pub description: String,
    pub kind: Kind,
    pub success: Option<bool>,
    pub checksum: Option<String>,
    pub checksum_normalized: Option<String>,
    pub transactional: bool,
    pub statements_total: Option<i64>,
    pub statements_done: Option<i64>,
    pub applied_by: String,
    pub duration_ms: Option<sql::Int>,
    pub error: Option<String>,
    pub note: Option<String>,
}

/// Timestamps come as ISO-8601 text, or (MySQL, whose session time zone schemagate leaves
/// alone) as epoch milliseconds.
fn iso_time(t: String) -> String {
    match t.parse::<i64>() {
        Ok(ms) => super::clock::iso_from_millis(ms),
        Err(_) => t,
    }
}

/// Decodes a history row (column order of [`sql::select_history`]).
fn decode_row<'r, R>(r: &'r R) -> Result<HistoryRow, sqlx::Error>
where
    R: Row,
    usize: ColumnIndex<R>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    bool: Decode<'r, R::Database> + Type<R::Database>,
    String: Decode<'r, R::Database> + Type<R::Database>,
{
    let kind: String = r.try_get(3)?;
    Ok(HistoryRow {
        id: r.try_get(0)?,
        version: r.try_get(1)?,
        description: r.try_get(2)?,
        kind: Kind::parse(&kind).ok_or_else(|| sqlx::Error::ColumnDecode {
            index: "kind".into(),
            source: format!("unknown history kind {kind:?}").into(),
        })?,
        success: r.try_get(4)?,
        checksum: r.try_get(5)?,
        checksum_normalized: r.try_get(6)?,
        transactional: r.try_get(7)?,
        statements_total: r.try_get(8)?,
        statements_done: r.try_get(9)?,
        applied_by: r.try_get(10)?,
        applied_at: iso_time(r.try_get(11)?),
        duration_ms: r.try_get(12)?,
        error: r.try_get(13)?,
        note: r.try_get(14)?,
    })
}

/// Who holds the migration lock, as far as the database can tell.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LockHolder {
    /// The holder's runner identity (host or pod name and process id).
    pub who: String,
    /// When it took the lock (or connected), ISO-8601 UTC.
    pub since: Option<String>,
    pub age_seconds: Option<i64>,
}

impl std::fmt::Display for LockHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.who)?;
        if let Some(since) = &self.since {
            write!(f, " since {since}")?;
        }
        if let Some(age) = self.age_seconds {
            write!(f, " ({age}s)")?;
        }
        Ok(())
    }
}

/// What kind of database failure this is, for exit codes and hints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DbErrorKind {
    /// The server could not be reached (refused, unknown host, timeout).
    Unreachable,
    /// The server refused the credentials.
    Auth,
    /// The URL or an option in it is invalid.
    Config,
    /// The database named in the URL does not exist.
    NoDatabase,
    /// The server ran the statement and reported an error.
    Statement,
    /// The migration lock cannot be trusted: a pooler shares or moves sessions, or this
    /// runner lost its lease.
    Lock,
    /// The connection broke or anything else went wrong.
    Other,
}

/// A database failure with the server's message (never the URL).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct DbError {
    pub kind: DbErrorKind,
    pub message: String,
    /// SQLSTATE (PostgreSQL, MySQL) or the extended result code (SQLite).
    pub code: Option<String>,
}

impl DbError {
    pub fn new(kind: DbErrorKind, message: impl Into<String>) -> Self {
        DbError {
            kind,
            message: redact::redact(&message.into()).into_owned(),
            code: None,
        }
    }

    /// The next step for the user.
    pub fn hint(&self) -> &'static str {
        match self.kind {
            DbErrorKind::Unreachable => {
                "check the host and port in the database URL, that the server is running, and \
                 that the network allows the connection"
            }
            DbErrorKind::Auth => {
                "check the user name and password in the database URL (or the Secret it comes from)"
            }
            DbErrorKind::Config => {
                "fix the database URL, e.g. postgres://user:password@host:5432/db or sqlite:app.db"
            }
            DbErrorKind::NoDatabase => {
                "create the database first (schemagate migrates schemas; it never creates or drops \
                 databases)"
            }
            DbErrorKind::Statement => "fix the statement and run again",
            DbErrorKind::Lock => {
                "behind a connection pooler in transaction mode (PgBouncer) or a proxy that \
                 multiplexes sessions, use the lease lock: --lock lease (or \
                 schemagate_lock=lease in the URL); if the lease was lost, run again"
            }
            DbErrorKind::Other => "check the database server's log; then run again",
        }
    }
}

impl From<sqlx::Error> for DbError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::Database(db) => {
                let code = db.code().map(|c| c.into_owned());
                let mut message = db.message().to_string();
                if let Some(pg) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
                    if let Some(detail) = pg.detail() {
                        message.push_str(&format!(" (detail: {detail})"));
                    }
                    if let Some(hint) = pg.hint() {
                        message.push_str(&format!(" (server hint: {hint})"));
                    }
                }
                let kind = match code.as_deref() {
                    _ if message.starts_with("schemagate: ") => DbErrorKind::Lock,
                    // 28000 is also MySQL's "access denied".
                    Some("28P01" | "28000") => DbErrorKind::Auth,
                    // 3D000 PostgreSQL, 42000 with "Unknown database" MySQL.
                    Some("3D000") => DbErrorKind::NoDatabase,
                    Some("42000") if message.starts_with("Unknown database") => {
                        DbErrorKind::NoDatabase
                    }
                    // 08: connection exceptions; 57P03: the server is starting or shutting
                    // down; 53300: too many connections. All worth retrying.
                    Some(c) if c.starts_with("08") || c.starts_with("57P0") || c == "53300" => {
                        DbErrorKind::Unreachable
                    }
                    _ => DbErrorKind::Statement,
                };
                let mut err = DbError::new(kind, message);
                err.code = code;
                err
            }
            sqlx::Error::Io(io) => DbError::new(
                DbErrorKind::Unreachable,
                format!("cannot talk to the database server: {io}"),
            ),
            sqlx::Error::Tls(tls) => {
                let text = without_source_locations(&tls.to_string());
                if text.contains("does not support TLS") {
                    // The URL asks for TLS the server does not offer: the URL must change.
                    DbError::new(
                        DbErrorKind::Config,
                        format!(
                            "the database server does not accept TLS, but the URL requires it \
                             (sslmode=require or stricter); use sslmode=prefer or \
                             sslmode=disable, or turn TLS on in the server ({text})"
                        ),
                    )
                } else {
                    DbError::new(
                        DbErrorKind::Unreachable,
                        format!("TLS handshake with the database server failed: {text}"),
                    )
                }
            }
            sqlx::Error::Configuration(c) => {
                DbError::new(DbErrorKind::Config, format!("invalid database URL: {c}"))
            }
            other => DbError::new(
                DbErrorKind::Other,
                without_source_locations(&other.to_string()),
            ),
        }
    }
}

/// Drops the driver's own source locations (`(sqlx_postgres::connection::tls:95)`) from
/// a message: they mean nothing to a user.
pub fn without_source_locations(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("sqlx_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(tail.len());
        let token = &tail[..end];
        if token.contains("::")
            && token
                .rsplit(':')
                .next()
                .is_some_and(|n| n.chars().all(|c| c.is_ascii_digit()) && !n.is_empty())
        {
            out.push_str(
                rest[..i]
                    .trim_end_matches(['(', ' ', '@'])
                    .trim_end_matches(" at"),
            );
            rest = tail[end..].trim_start_matches(')');
        } else {
            out.push_str(&rest[..i + end.max(1)]);
            rest = &tail[end.max(1)..];
        }
    }
    out.push_str(rest);
    out.trim().to_string()
}

/// Which server the SQL is for: the dialect and, for MySQL, the flavour (MariaDB names
/// the statement timeout differently).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Flavor {
    Postgres,
    Sqlite,
    MySql,
    MariaDb,
}

impl Flavor {
    /// The server's product name, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Flavor::Postgres => "PostgreSQL",
            Flavor::Sqlite => "SQLite",
            Flavor::MySql => "MySQL",
            Flavor::MariaDb => "MariaDB",
        }
    }

    pub fn dialect(self) -> Dialect {
        match self {
            Flavor::Postgres => Dialect::Postgres,
            Flavor::Sqlite => Dialect::Sqlite,
            Flavor::MySql | Flavor::MariaDb => Dialect::MySql,
        }
    }
}

/// What a step's SQL depends on besides the step: the server's flavour and the session
/// state each step's reset restores.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    pub flavor: Flavor,
    /// MySQL: the URL's database, selected again after each step.
    pub database: Option<String>,
    /// SQLite: the busy timeout restored after each step.
    pub busy_timeout: Duration,
}

/// The result of one statement of a round trip.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Done {
    /// Rows it changed (or returned).
    pub rows: u64,
    /// The first column of its first row, when that is an integer (`RETURNING id`, a fence
    /// query's answer).
    pub value: Option<i64>,
    /// MySQL: the id of the row it inserted.
    pub insert_id: Option<i64>,
}

/// A round trip that failed: the statements before the failing one completed.
#[derive(Debug)]
pub struct SendFailure {
    pub done: Vec<Done>,
    pub error: DbError,
}

/// How to connect.
#[derive(Clone, Debug)]
pub struct ConnectConfig {
    pub url: String,
    pub table: HistoryTable,
    pub connect_timeout: Duration,
    /// How long SQLite waits for another writer before `BEGIN IMMEDIATE` fails.
    pub busy_timeout: Duration,
    /// Shown in `pg_stat_activity`, so a waiting runner can say who holds the lock.
    pub application_name: String,
}

/// Per-step limits a migration sets for itself (or the run sets for all).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StepTimeouts {
    /// How long a statement may wait for a lock held by other sessions.
    pub lock: Option<Duration>,
    /// How long a statement may run.
    pub statement: Option<Duration>,
}

impl StepTimeouts {
    pub fn is_empty(&self) -> bool {
        self.lock.is_none() && self.statement.is_none()
    }
}

/// What each dialect provides to the runner. Every method works on one dedicated
/// connection (never a pool), so a session lock dies with it.
pub trait Backend: Send {
    fn dialect(&self) -> Dialect;

    /// The history table as the database resolved it (schema-qualified where schemas exist).
    fn table(&self) -> &HistoryTable;

    /// The whole history, or `None` when the history table does not exist.
    fn read_history(
        &mut self,
    ) -> impl Future<Output = Result<Option<Vec<HistoryRow>>, DbError>> + Send;

    fn create_history_table(&mut self) -> impl Future<Output = Result<(), DbError>> + Send;

    /// One attempt to take the session lock; never blocks. Fails (kind `Lock`) when this
    /// server session already holds it: a pooler is sharing sessions between clients.
    fn try_lock(&mut self) -> impl Future<Output = Result<bool, DbError>> + Send;

    fn unlock(&mut self) -> impl Future<Output = Result<(), DbError>> + Send;

    /// Who holds the session lock now, if anyone (and if the database can tell).
    fn lock_holder(&mut self) -> impl Future<Output = Result<Option<LockHolder>, DbError>> + Send;

    /// The guard that proves this session holds the session lock.
    fn session_guard(&self) -> sql::Guard;

    /// One attempt to take (or take over, once expired) the lease; never blocks.
    fn lease_acquire(
        &mut self,
        holder: &str,
        token: &str,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool, DbError>> + Send;

    /// Extends the lease; false when it is not ours any more.
    fn lease_renew(
        &mut self,
        token: &str,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool, DbError>> + Send;

    fn lease_release(&mut self, token: &str) -> impl Future<Output = Result<(), DbError>> + Send;

    /// The live lease's holder, if any.
    fn lease_holder(&mut self) -> impl Future<Output = Result<Option<LockHolder>, DbError>> + Send;

    /// What the SQL of a step depends on besides the step ([`Session`]); MySQL asks the
    /// server its flavour once (never on the no-op path).
    fn session(&mut self) -> impl Future<Output = Result<Session, DbError>> + Send;

    /// Sends `text` (one statement or several separated by `;`) in one round trip, as
    /// plain text (no prepared statement), and reports each statement's result. The
    /// statements run in order and stop at the first error.
    fn send(&mut self, text: &str) -> impl Future<Output = Result<Vec<Done>, SendFailure>> + Send;

    /// The current type of `table.column` (`table` as written: `[schema,] name`), if the
    /// database can tell; for the destructive-change guard.
    fn column_type(
        &mut self,
        table: &[String],
        column: &str,
    ) -> impl Future<Output = Result<Option<ColumnType>, DbError>> + Send;

    /// Runs one read-only query whose columns are all text (cast them in the SQL): the
    /// rows, or `None` when a table it reads does not exist. For reading other tools'
    /// history tables.
    fn query_text(
        &mut self,
        sql: &str,
    ) -> impl Future<Output = Result<Option<TextRows>, DbError>> + Send;

    /// A round trip to the server on this connection: fails once the session (and with
    /// it any session lock) is gone.
    fn ping(&mut self) -> impl Future<Output = Result<(), DbError>> + Send;

    /// Closes the connection (releasing any session lock).
    fn close(self) -> impl Future<Output = ()> + Send;
}

/// A connected database of any supported dialect.
pub enum Db {
    Postgres(postgres::PgBackend),
    Sqlite(Box<sqlite::SqliteBackend>),
    MySql(Box<mysql::MySqlBackend>),
}

/// Query parameter of the database URL that picks the lock mode (`session` or `lease`);
/// schemagate removes it before the driver sees the URL.
pub const LOCK_URL_PARAM: &str = "schemagate_lock";

/// Splits schemagate's own parameters off a database URL: the URL for the driver, and the
/// lock mode the URL asks for, if any.
pub fn split_url_params(url: &str) -> (String, Option<String>) {
    let Some((head, query)) = url.split_once('?') else {
        return (url.to_string(), None);
    };
    let mut lock = None;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| match pair.split_once('=') {
            Some((k, v)) if k == LOCK_URL_PARAM => {
                lock = Some(v.to_string());
                false
            }
            _ => true,
        })
        .collect();
    let url = if kept.is_empty() {
        head.to_string()
    } else {
        format!("{head}?{}", kept.join("&"))
    };
    (url, lock)
}

/// The dialect a URL asks for.
pub fn dialect_of(url: &str) -> Result<Dialect, DbError> {
    let scheme = url
        .split(':')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    match scheme.as_str() {
        "postgres" | "postgresql" => Ok(Dialect::Postgres),
        "sqlite" => Ok(Dialect::Sqlite),
        "mysql" | "mariadb" => Ok(Dialect::MySql),
        "" => Err(DbError::new(
            DbErrorKind::Config,
            "no database URL given (set --database-url or DATABASE_URL)",
        )),
        other if redact::is_scheme(other) => Err(DbError::new(
            DbErrorKind::Config,
            format!(
                "unsupported database URL scheme {other:?}; use postgres://, mysql://, \
                 mariadb:// or sqlite:"
            ),
        )),
        // Never echo what is not a scheme: it may be a password or a whole DSN.
        _ => Err(DbError::new(
            DbErrorKind::Config,
            "the database URL does not start with a scheme such as postgres:// or sqlite:",
        )),
    }
}

impl Db {
    pub async fn connect(cfg: &ConnectConfig) -> Result<Db, DbError> {
        Self::connect_dialect(cfg).await.map_err(|mut e| {
            // Whatever fails while connecting is a connection failure: a missing CONNECT
            // privilege is about credentials, the rest (a server that is starting, out of
            // connections, or broke the protocol) is worth retrying.
            e.kind = match (e.kind, e.code.as_deref()) {
                (DbErrorKind::Statement, Some("42501")) => DbErrorKind::Auth,
                (DbErrorKind::Statement | DbErrorKind::Other, _) => DbErrorKind::Unreachable,
                (kind, _) => kind,
            };
            e
        })
    }

    async fn connect_dialect(cfg: &ConnectConfig) -> Result<Db, DbError> {
        match dialect_of(&cfg.url)? {
            Dialect::Postgres => Ok(Db::Postgres(postgres::PgBackend::connect(cfg).await?)),
            Dialect::Sqlite => Ok(Db::Sqlite(Box::new(
                sqlite::SqliteBackend::connect(cfg).await?,
            ))),
            Dialect::MySql => Ok(Db::MySql(Box::new(
                mysql::MySqlBackend::connect(cfg).await?,
            ))),
        }
    }
}

macro_rules! dispatch {
    ($self:expr, $b:ident => $e:expr) => {
        match $self {
            Db::Postgres($b) => $e,
            Db::Sqlite($b) => $e,
            Db::MySql($b) => $e,
        }
    };
}

impl Backend for Db {
    fn dialect(&self) -> Dialect {
        dispatch!(self, b => b.dialect())
    }
    fn table(&self) -> &HistoryTable {
        dispatch!(self, b => b.table())
    }
    async fn read_history(&mut self) -> Result<Option<Vec<HistoryRow>>, DbError> {
        dispatch!(self, b => b.read_history().await)
    }
    async fn create_history_table(&mut self) -> Result<(), DbError> {
        dispatch!(self, b => b.create_history_table().await)
    }
    async fn try_lock(&mut self) -> Result<bool, DbError> {
        dispatch!(self, b => b.try_lock().await)
    }
    async fn unlock(&mut self) -> Result<(), DbError> {
        dispatch!(self, b => b.unlock().await)
    }
    async fn lock_holder(&mut self) -> Result<Option<LockHolder>, DbError> {
        dispatch!(self, b => b.lock_holder().await)
    }
    fn session_guard(&self) -> sql::Guard {
        dispatch!(self, b => b.session_guard())
    }
    async fn lease_acquire(
        &mut self,
        holder: &str,
        token: &str,
        ttl: Duration,
    ) -> Result<bool, DbError> {
        dispatch!(self, b => b.lease_acquire(holder, token, ttl).await)
    }
    async fn lease_renew(&mut self, token: &str, ttl: Duration) -> Result<bool, DbError> {
        dispatch!(self, b => b.lease_renew(token, ttl).await)
    }
    async fn lease_release(&mut self, token: &str) -> Result<(), DbError> {
        dispatch!(self, b => b.lease_release(token).await)
    }
    async fn lease_holder(&mut self) -> Result<Option<LockHolder>, DbError> {
        dispatch!(self, b => b.lease_holder().await)
    }
    async fn session(&mut self) -> Result<Session, DbError> {
        dispatch!(self, b => b.session().await)
    }
    async fn send(&mut self, text: &str) -> Result<Vec<Done>, SendFailure> {
        dispatch!(self, b => b.send(text).await)
    }
    async fn column_type(
        &mut self,
        table: &[String],
        column: &str,
    ) -> Result<Option<ColumnType>, DbError> {
        dispatch!(self, b => b.column_type(table, column).await)
    }
    async fn query_text(&mut self, sql: &str) -> Result<Option<TextRows>, DbError> {
        dispatch!(self, b => b.query_text(sql).await)
    }
    async fn ping(&mut self) -> Result<(), DbError> {
        dispatch!(self, b => b.ping().await)
    }
    async fn close(self) {
        dispatch!(self, b => b.close().await)
    }
}

/// Rows of text columns (`NULL` is `None`).
pub type TextRows = Vec<Vec<Option<String>>>;

fn text_rows<R>(rows: &[R]) -> Result<TextRows, sqlx::Error>
where
    R: sqlx::Row,
    usize: sqlx::ColumnIndex<R>,
    for<'a> Option<String>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    rows.iter()
        .map(|r| {
            (0..r.len())
                .map(|i| r.try_get::<Option<String>, _>(i))
                .collect()
        })
        .collect()
}

/// SQL reading a column's type from `information_schema` (PostgreSQL and MySQL), with
/// the schema defaulting to the session's.
fn column_type_sql(d: Dialect, table: &[String], column: &str) -> Option<String> {
    let (schema, name) = match table {
        [name] => (None, name),
        [schema, name] => (Some(schema), name),
        _ => return None,
    };
    let schema = match (schema, d) {
        (Some(s), _) => sql::literal(d, s),
        (None, Dialect::Postgres) => "current_schema()".into(),
        (None, _) => "DATABASE()".into(),
    };
    Some(match d {
        Dialect::Postgres => format!(
            "SELECT data_type::text, coalesce(character_maximum_length, numeric_precision)::bigint, \
             numeric_scale::bigint FROM information_schema.columns WHERE table_schema = {schema} \
             AND table_name = {} AND column_name = {}",
            sql::literal(d, name),
            sql::literal(d, column)
        ),
        Dialect::MySql => format!(
            "SELECT CAST(DATA_TYPE AS CHAR), CAST(COALESCE(CHARACTER_MAXIMUM_LENGTH, NUMERIC_PRECISION) AS SIGNED), \
             CAST(NUMERIC_SCALE AS SIGNED) FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = {schema} \
             AND TABLE_NAME = {} AND COLUMN_NAME = {}",
            sql::literal(d, name),
            sql::literal(d, column)
        ),
        Dialect::Sqlite => return None,
    })
}

/// Reads a [`column_type_sql`] row.
fn column_type_of<R>(row: &R) -> Result<ColumnType, sqlx::Error>
where
    R: Row,
    usize: ColumnIndex<R>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
{
    Ok(ColumnType {
        name: row.try_get::<String, _>(0)?.to_ascii_lowercase(),
        length: row.try_get(1)?,
        scale: row.try_get(2)?,
    })
}

/// The error a lease renewal reports when the lease row is locked (by the holder's own
/// running step, which renews the lease when it commits): not a loss.
fn lease_busy() -> DbError {
    DbError::new(DbErrorKind::Other, LEASE_BUSY)
}

/// Message of [`lease_busy`].
pub const LEASE_BUSY: &str = "the lease row is locked by a running step";

/// The error a guarded history write reports when the guard did not hold.
pub fn lock_lost() -> DbError {
    DbError::new(
        DbErrorKind::Lock,
        "the history write was refused: this runner's server session does not hold the \
         migration lock (a pooler in transaction mode moved the session, or the lease was taken \
         over)",
    )
}

/// Collects the results of a round trip: one [`Done`] per statement (the driver reports
/// each statement's result after its rows), or the failure with those that completed.
/// `result` reads (rows affected, inserted id) from a statement's result.
async fn collect<Q, R>(
    mut results: futures_util::stream::BoxStream<'_, Result<Either<Q, R>, sqlx::Error>>,
    result: impl Fn(&Q) -> (u64, Option<i64>),
) -> Result<Vec<Done>, SendFailure>
where
    R: Row,
    usize: ColumnIndex<R>,
    for<'r> Option<i64>: Decode<'r, R::Database> + Type<R::Database>,
{
    let mut done = Vec::new();
    // The first row's first column of the statement running now.
    let mut value: Option<Option<i64>> = None;
    while let Some(item) = results.next().await {
        match item {
            Ok(Either::Right(row)) => {
                if value.is_none() {
                    value = Some(row.try_get::<Option<i64>, _>(0).ok().flatten());
                }
            }
            Ok(Either::Left(r)) => {
                let (rows, insert_id) = result(&r);
                done.push(Done {
                    rows,
                    value: value.take().flatten(),
                    insert_id,
                });
            }
            Err(e) => {
                return Err(SendFailure {
                    done,
                    error: e.into(),
                });
            }
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {

    #[test]
    fn driver_source_locations_never_reach_a_message() {
        assert_eq!(
            without_source_locations(
                "server does not support TLS (sqlx_postgres::connection::tls:95)"
            ),
            "server does not support TLS"
        );
        assert_eq!(
            without_source_locations("error at sqlx_core::pool::inner:123"),
            "error"
        );
        assert_eq!(
            without_source_locations("sqlx_history is a table"),
            "sqlx_history is a table"
        );
    }
    use super::*;

    #[test]
    fn history_table_names_are_validated_and_quoted() {
        let t = HistoryTable::parse("ops.schemagate_history").unwrap();
        assert_eq!(
            t.quoted(Dialect::Postgres),
            "\"ops\".\"schemagate_history\""
        );
        assert_eq!(t.quoted(Dialect::MySql), "`ops`.`schemagate_history`");
        for bad in ["", "a.b.c", "x;drop", "1abc", "a b", "\"x\""] {
            assert!(HistoryTable::parse(bad).is_err(), "{bad}");
        }
        let a = HistoryTable::parse("a").unwrap().lock_key();
        let b = HistoryTable::parse("b").unwrap().lock_key();
        assert_ne!(a, b);
        assert_eq!(a, HistoryTable::parse("a").unwrap().lock_key());
    }

    #[test]
    fn lease_tables_and_url_parameters() {
        let t = HistoryTable::parse("ops.schemagate_history").unwrap();
        assert_eq!(t.lease_table().name(), "ops.schemagate_history_lock");
        assert!(HistoryTable::parse(&"x".repeat(59)).is_err());
        let (url, lock) =
            split_url_params("postgres://u@h/db?sslmode=disable&schemagate_lock=lease");
        assert_eq!(url, "postgres://u@h/db?sslmode=disable");
        assert_eq!(lock.as_deref(), Some("lease"));
        let (url, lock) = split_url_params("postgres://u@h/db?schemagate_lock=session");
        assert_eq!(url, "postgres://u@h/db");
        assert_eq!(lock.as_deref(), Some("session"));
        assert_eq!(split_url_params("sqlite:a.db").1, None);
    }

    #[test]
    fn mysql_timestamps_become_iso_text() {
        assert_eq!(iso_time("0".into()), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            iso_time("2026-01-01T00:00:00.000Z".into()),
            "2026-01-01T00:00:00.000Z"
        );
    }

    #[test]
    fn url_schemes_pick_the_dialect() {
        assert_eq!(dialect_of("postgresql://x/y").unwrap(), Dialect::Postgres);
        assert_eq!(dialect_of("sqlite:app.db").unwrap(), Dialect::Sqlite);
        assert_eq!(dialect_of("mariadb://h/db").unwrap(), Dialect::MySql);
        assert_eq!(
            dialect_of("oracle://x").unwrap_err().kind,
            DbErrorKind::Config
        );
        assert_eq!(dialect_of("").unwrap_err().kind, DbErrorKind::Config);
    }
}
