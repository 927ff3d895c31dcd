//! Lock safety: a migration never stalls production traffic for long.
//!
//! A DDL statement waits for its table lock behind open transactions, and every query of
//! the app then waits behind the DDL. So each statement of a step waits at most a short
//! time for its locks (`--migration-lock-timeout`, 2 s by default: PostgreSQL
//! `lock_timeout`, MySQL/MariaDB `lock_wait_timeout`); a step that times out is rolled back
//! and tried again after a backoff with jitter, until a total budget (`--lock-retry-budget`,
//! 5 min) is spent. Each retry names the sessions holding locks on the tables involved
//! (pid, application, state, age; never their query text).
//!
//! Only what is safe is retried: a transactional step (rolled back whole), or a
//! non-transactional one whose first statement timed out (nothing applied; a `CREATE INDEX
//! CONCURRENTLY` that left an INVALID index has it dropped first). Anything else is
//! reported, never applied twice.

use std::time::Duration;

use serde::Serialize;

use super::dialect::Backend;
use super::script::Dialect;
use crate::model::digest::sha256_hex;

/// How timed-out steps are retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockRetry {
    /// Total time spent retrying one step (zero: no retries).
    pub budget: Duration,
    /// The first pause; doubled each attempt, capped at `max`, with +-25% jitter.
    pub first: Duration,
    pub max: Duration,
}

impl Default for LockRetry {
    fn default() -> Self {
        LockRetry {
            budget: Duration::from_secs(300),
            first: Duration::from_secs(1),
            max: Duration::from_secs(30),
        }
    }
}

impl LockRetry {
    /// The pause before attempt `attempt + 1` (`attempt` >= 1), jittered by `key`.
    pub fn delay(&self, attempt: u32, key: &str) -> Duration {
        let base = self
            .first
            .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1).min(16)))
            .min(self.max);
        let seed = sha256_hex(format!("{key}/{attempt}").as_bytes());
        let n = u64::from_str_radix(&seed[..4], 16).unwrap_or(0) as f64 / 65535.0;
        base.mul_f64(0.75 + 0.5 * n)
    }
}

/// Whether a database error is a statement's lock wait running out (not a deadlock, not
/// a statement timeout).
pub fn is_lock_wait_timeout(dialect: Dialect, code: Option<&str>, message: &str) -> bool {
    match dialect {
        // lock_not_available
        Dialect::Postgres => code == Some("55P03"),
        // ER_LOCK_WAIT_TIMEOUT (1205), for metadata and row locks alike.
        Dialect::MySql => message.contains("Lock wait timeout exceeded"),
        Dialect::Sqlite => false,
    }
}

/// The tables a DDL or DML statement locks, as written (`schema.table` kept whole),
/// read from its leading keywords; empty when it cannot tell.
pub fn tables_named(statement: &str) -> Vec<String> {
    let words: Vec<String> = statement
        .split(|c: char| c.is_whitespace() || c == '(' || c == ';' || c == ',')
        .filter(|w| !w.is_empty())
        .map(String::from)
        .collect();
    let upper: Vec<String> = words.iter().map(|w| w.to_ascii_uppercase()).collect();
    let skip = [
        "IF",
        "NOT",
        "EXISTS",
        "ONLY",
        "TABLE",
        "CONCURRENTLY",
        "ONLINE",
    ];
    let name_after = |i: usize| -> Option<String> {
        let mut j = i;
        while j < words.len() && skip.contains(&upper[j].as_str()) {
            j += 1;
        }
        words
            .get(j)
            .map(|w| w.trim_matches(|c| c == '"' || c == '`').to_string())
    };
    let mut out = Vec::new();
    let at = |kw: &[&str]| -> Option<usize> {
        upper
            .windows(kw.len())
            .position(|w| w.iter().zip(kw).all(|(a, b)| a == b))
    };
    let first = upper.first().map(String::as_str).unwrap_or_default();
    match first {
        "ALTER" | "DROP" | "TRUNCATE" | "LOCK" | "RENAME" | "OPTIMIZE" => {
            if let Some(i) = at(&["TABLE"]) {
                out.extend(name_after(i + 1));
            } else if first == "TRUNCATE" {
                out.extend(name_after(1));
            }
        }
        "CREATE" => {
            // CREATE [UNIQUE] INDEX ... ON table; CREATE TRIGGER ... ON table.
            if let Some(i) = at(&["ON"]) {
                out.extend(name_after(i + 1));
            }
        }
        "INSERT" | "REPLACE" => {
            if let Some(i) = at(&["INTO"]) {
                out.extend(name_after(i + 1));
            }
        }
        "UPDATE" => out.extend(name_after(1)),
        "DELETE" => {
            if let Some(i) = at(&["FROM"]) {
                out.extend(name_after(i + 1));
            }
        }
        _ => {}
    }
    // A foreign key locks the table it references too.
    for (i, w) in upper.iter().enumerate() {
        if w == "REFERENCES" {
            out.extend(name_after(i + 1));
        }
    }
    out.retain(|t| {
        !t.is_empty()
            && t.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
    });
    out.dedup();
    out
}

/// The index a `CREATE [UNIQUE] INDEX CONCURRENTLY [IF NOT EXISTS] name ON ...` builds, if
/// the statement is one and names it.
pub fn concurrent_index(statement: &str) -> Option<String> {
    let upper = statement.to_ascii_uppercase();
    let words: Vec<&str> = statement.split_whitespace().collect();
    let up: Vec<&str> = upper.split_whitespace().collect();
    if up.first() != Some(&"CREATE") || !up.contains(&"CONCURRENTLY") {
        return None;
    }
    let i = up.iter().position(|w| *w == "CONCURRENTLY")?;
    let mut j = i + 1;
    while up
        .get(j)
        .is_some_and(|w| ["IF", "NOT", "EXISTS"].contains(w))
    {
        j += 1;
    }
    let name = words.get(j)?.trim_matches('"');
    (up.get(j) != Some(&"ON")
        && !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.'))
    .then(|| name.to_string())
}

/// A session holding a lock the migration waited for (never its query text: it may hold
/// data or secrets).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Blocker {
    /// PostgreSQL backend pid, MySQL connection id.
    pub pid: String,
    pub application: Option<String>,
    pub user: Option<String>,
    /// `idle in transaction`, `active`, a MySQL command.
    pub state: Option<String>,
    /// Seconds since its transaction (or query) began.
    pub age_seconds: Option<i64>,
}

impl std::fmt::Display for Blocker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if let Some(a) = self.application.as_deref().filter(|a| !a.is_empty()) {
            parts.push(a.to_string());
        }
        if let Some(u) = &self.user {
            parts.push(format!("user {u}"));
        }
        if let Some(s) = &self.state {
            parts.push(s.clone());
        }
        if let Some(a) = self.age_seconds {
            parts.push(format!("open for {a}s"));
        }
        write!(f, "pid {} ({})", self.pid, parts.join(", "))
    }
}

/// Quotes a name as a string literal (only the name characters `tables_named` keeps).
fn literal(name: &str) -> String {
    format!("'{}'", name.replace('\'', "''"))
}

/// The sessions holding locks on `tables` (other than this one); when none can be told,
/// the sessions with the oldest open transactions in this database, the usual culprits.
/// Best effort: an error (a missing privilege) gives an empty list.
pub async fn blockers(db: &mut impl Backend, tables: &[String]) -> Vec<Blocker> {
    let queries: Vec<String> = match db.dialect() {
        Dialect::Postgres => {
            let regs: Vec<String> = tables
                .iter()
                .map(|t| format!("to_regclass({})", literal(t)))
                .collect();
            let mut q = Vec::new();
            if !regs.is_empty() {
                q.push(format!(
                    "SELECT DISTINCT a.pid::text, a.application_name, a.usename::text, a.state, \
                     extract(epoch FROM now() - coalesce(a.xact_start, a.query_start))::bigint::text \
                     FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
                     WHERE l.granted AND a.pid <> pg_backend_pid() AND l.relation IN ({}) \
                     ORDER BY 5 DESC LIMIT 5",
                    regs.join(", ")
                ));
            }
            q.push(
                "SELECT a.pid::text, a.application_name, a.usename::text, a.state, \
                 extract(epoch FROM now() - a.xact_start)::bigint::text \
                 FROM pg_stat_activity a WHERE a.pid <> pg_backend_pid() \
                 AND a.datname = current_database() AND a.xact_start IS NOT NULL \
                 ORDER BY a.xact_start LIMIT 3"
                    .into(),
            );
            q
        }
        Dialect::MySql => {
            let mut q = Vec::new();
            if !tables.is_empty() {
                let names: Vec<String> = tables
                    .iter()
                    .map(|t| literal(t.rsplit('.').next().unwrap_or(t)))
                    .collect();
                // performance_schema knows metadata lock holders (when it is on).
                q.push(format!(
                    "SELECT DISTINCT CAST(p.ID AS CHAR), NULL, p.USER, p.COMMAND, CAST(p.TIME AS CHAR) \
                     FROM performance_schema.metadata_locks m \
                     JOIN performance_schema.threads t ON t.THREAD_ID = m.OWNER_THREAD_ID \
                     JOIN information_schema.PROCESSLIST p ON p.ID = t.PROCESSLIST_ID \
                     WHERE m.OBJECT_SCHEMA = DATABASE() AND m.OBJECT_NAME IN ({}) \
                     AND m.LOCK_STATUS = 'GRANTED' AND p.ID <> CONNECTION_ID() LIMIT 5",
                    names.join(", ")
                ));
            }
            q.push(
                "SELECT CAST(p.ID AS CHAR), NULL, p.USER, p.COMMAND, \
                 CAST(TIMESTAMPDIFF(SECOND, t.trx_started, NOW()) AS CHAR) \
                 FROM information_schema.INNODB_TRX t \
                 JOIN information_schema.PROCESSLIST p ON p.ID = t.trx_mysql_thread_id \
                 WHERE p.ID <> CONNECTION_ID() ORDER BY t.trx_started LIMIT 3"
                    .into(),
            );
            q
        }
        Dialect::Sqlite => Vec::new(),
    };
    for q in queries {
        let Ok(Some(rows)) = db.query_text(&q).await else {
            continue;
        };
        let found: Vec<Blocker> = rows
            .into_iter()
            .filter_map(|r| {
                let col = |i: usize| r.get(i).cloned().flatten();
                Some(Blocker {
                    pid: col(0)?,
                    application: col(1),
                    user: col(2),
                    state: col(3),
                    age_seconds: col(4).and_then(|a| a.parse().ok()),
                })
            })
            .collect();
        if !found.is_empty() {
            return found;
        }
    }
    Vec::new()
}

/// One line for logs and messages.
pub fn describe(blockers: &[Blocker]) -> String {
    if blockers.is_empty() {
        return "no holder could be read (it may have finished)".into();
    }
    blockers
        .iter()
        .map(Blocker::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_timeouts_are_told_from_other_failures() {
        assert!(is_lock_wait_timeout(
            Dialect::Postgres,
            Some("55P03"),
            "canceling statement due to lock timeout"
        ));
        assert!(!is_lock_wait_timeout(
            Dialect::Postgres,
            Some("57014"),
            "canceling statement due to statement timeout"
        ));
        assert!(is_lock_wait_timeout(
            Dialect::MySql,
            Some("HY000"),
            "Lock wait timeout exceeded; try restarting transaction"
        ));
        assert!(!is_lock_wait_timeout(
            Dialect::MySql,
            Some("40001"),
            "Deadlock found"
        ));
    }

    #[test]
    fn the_tables_a_statement_locks() {
        let t = |s: &str| tables_named(s);
        assert_eq!(t("ALTER TABLE orders ADD COLUMN note text"), ["orders"]);
        assert_eq!(
            t("ALTER TABLE IF EXISTS ONLY shop.orders DROP x"),
            ["shop.orders"]
        );
        assert_eq!(
            t("ALTER TABLE items ADD CONSTRAINT fk FOREIGN KEY (o) REFERENCES orders (id)"),
            ["items", "orders"]
        );
        assert_eq!(
            t("CREATE INDEX CONCURRENTLY i ON orders (note)"),
            ["orders"]
        );
        assert_eq!(t("CREATE UNIQUE INDEX i ON \"Orders\"(a)"), ["Orders"]);
        assert_eq!(t("DROP TABLE IF EXISTS old_orders"), ["old_orders"]);
        assert_eq!(t("TRUNCATE orders"), ["orders"]);
        assert_eq!(t("UPDATE orders SET a = 1"), ["orders"]);
        assert_eq!(t("INSERT INTO audit (a) VALUES (1)"), ["audit"]);
        assert!(t("SELECT 1").is_empty());
        assert!(t("CREATE TABLE fresh (id int)").is_empty());
    }

    #[test]
    fn concurrent_index_names() {
        assert_eq!(
            concurrent_index("CREATE INDEX CONCURRENTLY orders_note ON orders (note)").as_deref(),
            Some("orders_note")
        );
        assert_eq!(
            concurrent_index("create unique index concurrently if not exists ux on t(a)")
                .as_deref(),
            Some("ux")
        );
        assert_eq!(concurrent_index("CREATE INDEX CONCURRENTLY ON t (a)"), None);
        assert_eq!(concurrent_index("CREATE INDEX i ON t (a)"), None);
    }

    #[test]
    fn delays_grow_with_jitter_up_to_the_cap() {
        let r = LockRetry::default();
        let d1 = r.delay(1, "v3");
        assert!(d1 >= Duration::from_millis(750) && d1 <= Duration::from_millis(1250));
        let d3 = r.delay(3, "v3");
        assert!(d3 >= Duration::from_secs(3) && d3 <= Duration::from_secs(5));
        assert!(r.delay(30, "v3") <= Duration::from_millis(37_500));
        let b = Blocker {
            pid: "42".into(),
            application: Some("report-job".into()),
            user: Some("app".into()),
            state: Some("idle in transaction".into()),
            age_seconds: Some(8),
        };
        assert_eq!(
            b.to_string(),
            "pid 42 (report-job, user app, idle in transaction, open for 8s)"
        );
    }
}
