//! `plan` prints exactly what `upgrade` and `downgrade` send: the statements a real server
//! logged for a run, in order, equal the ones `plan --output json` listed before it
//! (PostgreSQL with `log_statement = 'all'`, MariaDB with its general log).
//!
//! What the comparison leaves out, and why:
//! - the driver's connection setup (sqlx sends `SET NAMES utf8mb4` to MySQL when it
//!   connects; to PostgreSQL it sends nothing but the startup packet): everything the
//!   connection sent before its first read of the history table;
//! - the state reads that precede the run: the history reads (once before taking the
//!   lock, once under it), the schema resolution of the history table (PostgreSQL) and the
//!   server version (MySQL: which statement timeout to set), all reads `plan` makes too;
//! - the session lock: `pg_try_advisory_lock`/`GET_LOCK` is polled (how often depends on
//!   other runners) and released at the end; `plan`'s header names the lock;
//! - under `--lock lease`, the lease's own connection (taking, renewing on a timer and
//!   releasing the lease): only the runner's connection, the one that reads the history,
//!   is compared.
//!
//! Everything else must match, statement by statement: the history table's creation,
//! transaction control, fences, timeouts, the migration's statements, history writes and
//! session resets. The only values normalised are the ones `plan` shows as placeholders
//! (`<duration_ms>`, `<row_id>`, `<runner_id>`: the runner's own id, since these runs do
//! not pass `--runner-id`, and `<lease_token>` under the lease lock), each only where
//! `plan` put it and only by a value of its kind.

mod support;

use std::time::Duration;

use schemagate::engine::script::{Dialect, split};
use support::*;

/// The statements `plan -o json` lists, in the order the runner sends them.
fn planned(url: &str, dir: &MigDir, args: &[&str]) -> Vec<String> {
    let mut c = migrate(url, dir.path());
    c.args(args).args(["-o", "json"]);
    let o = run(c);
    assert_code(&o, 0);
    let p = stdout_json(&o);
    let mut out: Vec<String> = p["createHistoryTable"]
        .as_str()
        .map(str::to_string)
        .into_iter()
        .collect();
    for step in p["steps"].as_array().expect("steps") {
        for s in step["sent"].as_array().expect("sent") {
            out.push(s["sql"].as_str().expect("sql").to_string());
        }
    }
    assert!(!out.is_empty(), "plan lists nothing: {}", text(&o));
    out
}

/// True when `got` is `expected` with each placeholder replaced by a value of its kind:
/// digits for `<duration_ms>` and `<row_id>`, one quoted literal for `<runner_id>` and
/// `<lease_token>`.
fn matches(expected: &str, got: &str) -> bool {
    const SLOTS: [&str; 4] = ["<duration_ms>", "<row_id>", "<runner_id>", "<lease_token>"];
    let (mut exp, mut rest) = (expected, got);
    loop {
        let next = SLOTS
            .iter()
            .filter_map(|s| exp.find(s).map(|at| (at, *s)))
            .min();
        let Some((at, slot)) = next else {
            return rest == exp;
        };
        let Some(after) = rest.strip_prefix(&exp[..at]) else {
            return false;
        };
        let taken = if slot == "<runner_id>" || slot == "<lease_token>" {
            // '...' with no quote inside: what the runner's id or its token becomes.
            match after.strip_prefix('\'').and_then(|a| a.find('\'')) {
                Some(end) => end + 2,
                None => 0,
            }
        } else {
            after.bytes().take_while(u8::is_ascii_digit).count()
        };
        if taken == 0 {
            return false;
        }
        rest = &after[taken..];
        exp = &exp[at + slot.len()..];
    }
}

/// How every read of the history table starts: it tells the runner's connection.
const HISTORY_READ: &str = "SELECT id, version, description, kind, success, checksum";

/// Splits what the server logged (one entry per message, several statements each) into
/// statements, and drops what the comparison leaves out (see the module's docs).
fn sent_statements(messages: &[String], dialect: Dialect) -> Vec<String> {
    let mut statements: Vec<String> = messages
        .iter()
        .flat_map(|m| {
            split(m, dialect)
                .into_iter()
                .map(|s| s.text(m).to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    let is_history_read = |s: &str| s.starts_with(HISTORY_READ);
    // PostgreSQL: where the history table is (in the same message as the first read).
    let is_resolution =
        |s: &str| s.starts_with("SELECT coalesce((SELECT n.nspname::text FROM pg_class");
    let first_read = statements
        .iter()
        .position(|s| is_history_read(s) || is_resolution(s))
        .expect("the runner reads the history first");
    let setup: Vec<String> = statements.drain(..first_read).collect();
    assert!(
        setup.iter().all(|s| s.starts_with("SET ")),
        "only the driver's session setup comes before the first history read: {setup:?}"
    );
    statements.retain(|s| {
        let excluded = is_history_read(s)
            || is_resolution(s)
            // MySQL: which statement timeout the server has.
            || s == "SELECT VERSION()"
            // The session lock, polled and released.
            || s.contains("pg_try_advisory_lock(")
            || s.starts_with("SELECT pg_advisory_unlock(")
            || s.contains("GET_LOCK(")
            || s.starts_with("SELECT CAST(RELEASE_LOCK(");
        !excluded
    });
    statements
}

#[track_caller]
fn assert_same(planned: &[String], sent: &[String]) {
    let shown = |v: &[String]| {
        v.iter()
            .enumerate()
            .map(|(i, s)| format!("  {:>3}: {s}", i + 1))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let same = planned.len() == sent.len() && planned.iter().zip(sent).all(|(p, s)| matches(p, s));
    assert!(
        same,
        "the server received other statements than plan printed\n--- plan:\n{}\n--- server:\n{}",
        shown(planned),
        shown(sent)
    );
}

mod postgres {
    use super::*;
    use support::postgres::server;

    /// The prefix of every log line while these tests run: the backend's pid and database,
    /// so that the statements of one run are told apart from everything else.
    const PREFIX: &str = "sglog[%p|%d] ";

    fn log_with_prefix() {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            let admin = server().url("postgres");
            exec(
                &admin,
                &format!("ALTER SYSTEM SET log_line_prefix = '{PREFIX}'"),
            );
            exec(&admin, "SELECT pg_reload_conf()");
            wait_for(
                "the server to reload its configuration",
                Duration::from_secs(30),
                || query(&admin, "SHOW log_line_prefix")[0] == PREFIX,
            );
        });
    }

    /// The messages the server logged for database `db` after byte `from` of its log,
    /// with the pid of the backend that received each.
    fn logged(from: usize, db: &str) -> Vec<(String, String)> {
        let log = server().log();
        let mut out: Vec<(String, String)> = Vec::new();
        let mut ours = false;
        for line in log[from..].lines() {
            if let Some(rest) = line.strip_prefix("sglog[") {
                let (who, entry) = rest.split_once("] ").unwrap_or((rest, ""));
                let pid = who.strip_suffix(&format!("|{db}"));
                ours = false;
                if let (Some(pid), Some(statement)) = (pid, entry.strip_prefix("LOG:  statement: "))
                {
                    out.push((pid.to_string(), statement.to_string()));
                    ours = true;
                }
            } else if let (true, Some(more)) = (ours, line.strip_prefix('\t')) {
                // A message's later lines follow its first, each after a tab.
                let last = out.last_mut().expect("a continued message");
                last.1.push('\n');
                last.1.push_str(more);
            }
        }
        out
    }

    /// Runs `args` with every statement of database `db` logged; what the runner's
    /// connection sent.
    fn run_logged(url: &str, db: &str, dir: &MigDir, args: &[&str]) -> Vec<String> {
        let from = server().log().len();
        let mut c = migrate(url, dir.path());
        // The fingerprint read and record after the steps are not part of `plan`.
        c.args(args).env("SCHEMAGATE_SCHEMA_FINGERPRINTS", "off");
        assert_code(&run(c), 0);
        let log = logged(from, db);
        let runner = &log
            .iter()
            .find(|(_, m)| m.contains(HISTORY_READ))
            .expect("the run read the history")
            .0;
        let messages: Vec<String> = log
            .iter()
            .filter(|(pid, _)| pid == runner)
            .map(|(_, m)| m.clone())
            .collect();
        sent_statements(&messages, Dialect::Postgres)
    }

    #[test]
    fn plan_prints_what_upgrade_and_downgrade_send() {
        log_with_prefix();
        let url = server().fresh_db();
        let db = url
            .rsplit('/')
            .next()
            .and_then(|s| s.split('?').next())
            .expect("database name")
            .to_string();
        exec(
            &url,
            &format!("ALTER DATABASE {db} SET log_statement = 'all'"),
        );
        let dir = MigDir::new();
        dir.pair(
            "1",
            "create_items",
            "-- schemagate:lock-timeout 3s\n\
             CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT NOT NULL);\n\
             -- a comment between statements; with a semicolon\n\
             INSERT INTO items (id, name) VALUES (1, 'it''s here');\n",
            Some("DROP TABLE items;\n"),
        )
        .pair(
            "2",
            "index_names",
            "-- schemagate:no-transaction\n\
             CREATE INDEX CONCURRENTLY items_name ON items (name);\n\
             SELECT 1;\n",
            Some("-- schemagate:no-transaction\nDROP INDEX CONCURRENTLY items_name;\n"),
        )
        .pair(
            "3",
            "wrapped",
            "BEGIN;\nCREATE FUNCTION f() RETURNS int AS $$ SELECT 1; $$ LANGUAGE sql;\nCOMMIT;\n",
            Some("DROP FUNCTION f();\n"),
        );
        let timeout = ["--migration-statement-timeout", "30s"];

        let plan = planned(&url, &dir, &["plan", timeout[0], timeout[1]]);
        let sent = run_logged(&url, &db, &dir, &["upgrade", timeout[0], timeout[1]]);
        assert_same(&plan, &sent);
        assert!(
            plan.iter()
                .any(|s| s == "SET LOCAL lock_timeout = '3000ms'")
                && plan
                    .iter()
                    .any(|s| s == "SET SESSION statement_timeout = '30000ms'"),
            "the timeouts are part of it: {plan:#?}"
        );

        // Under the lease lock: a fence first in each transaction, guarded history writes,
        // the renewal before COMMIT; the lease's own connection is left out.
        let lease = ["--lock", "lease"];
        let plan = planned(&url, &dir, &["plan", "-2", lease[0], lease[1]]);
        let sent = run_logged(&url, &db, &dir, &["downgrade", "-2", lease[0], lease[1]]);
        assert_same(&plan, &sent);
        assert!(
            plan.iter()
                .any(|s| s.starts_with("DO $schemagate$") && s.contains("<lease_token>")),
            "{plan:#?}"
        );
    }
}

mod mariadb {
    use super::*;
    use sqlx::{Connection, Row};
    use support::mysql::server;

    fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    /// The general log's entries (thread id, command, text), oldest first.
    fn general_log(admin: &str) -> Vec<(u64, String, String)> {
        block_on(async {
            let mut c = sqlx::MySqlConnection::connect(admin)
                .await
                .expect("connect");
            let rows = sqlx::raw_sql(
                "SELECT CAST(thread_id AS CHAR), CAST(command_type AS CHAR), \
                 CAST(argument AS CHAR CHARACTER SET utf8mb4) FROM mysql.general_log",
            )
            .fetch_all(&mut c)
            .await
            .expect("read the general log");
            rows.iter()
                .map(|r| {
                    let id: String = r.get(0);
                    (id.parse().expect("thread id"), r.get(1), r.get(2))
                })
                .collect()
        })
    }

    /// Threads that connected to database `db`.
    fn threads(log: &[(u64, String, String)], db: &str) -> Vec<u64> {
        log.iter()
            .filter(|(_, cmd, arg)| cmd == "Connect" && arg.contains(&format!(" on {db} ")))
            .map(|(id, _, _)| *id)
            .collect()
    }

    /// Runs `args`; what the runner's connection (the one that read the history) sent.
    fn run_logged(admin: &str, url: &str, db: &str, dir: &MigDir, args: &[&str]) -> Vec<String> {
        let before = threads(&general_log(admin), db);
        let mut c = migrate(url, dir.path());
        // The fingerprint read and record after the steps are not part of `plan`.
        c.args(args).env("SCHEMAGATE_SCHEMA_FINGERPRINTS", "off");
        assert_code(&run(c), 0);
        let log = general_log(admin);
        let new: Vec<u64> = threads(&log, db)
            .into_iter()
            .filter(|t| !before.contains(t))
            .collect();
        let queries = |thread: u64| -> Vec<String> {
            log.iter()
                .filter(|(id, cmd, _)| *id == thread && cmd == "Query")
                .map(|(_, _, text)| text.clone())
                .collect()
        };
        let runner = new
            .iter()
            .copied()
            .find(|t| queries(*t).iter().any(|q| q.contains(HISTORY_READ)))
            .expect("the run read the history");
        sent_statements(&queries(runner), Dialect::MySql)
    }

    #[test]
    fn plan_prints_what_upgrade_and_downgrade_send() {
        let url = server().fresh_db();
        let db = url.rsplit('/').next().expect("database name").to_string();
        let admin = server().url("mysql");
        exec(&admin, "SET GLOBAL log_output = 'TABLE'");
        exec(&admin, "SET GLOBAL general_log = 'ON'");
        let dir = MigDir::new();
        dir.pair(
            "1",
            "create_items",
            "-- schemagate:statement-timeout 20s\n\
             CREATE TABLE items (id INTEGER PRIMARY KEY, name VARCHAR(100) NOT NULL);\n\
             CREATE INDEX items_name ON items (name);\n",
            Some("DROP TABLE items;\n"),
        )
        .pair(
            "2",
            "fill_items",
            "-- schemagate:lock-timeout 4s\n\
             INSERT INTO items (id, name) VALUES (1, 'a\\\\b'), (2, 'it''s');\n\
             UPDATE items SET name = 'c' WHERE id = 1;\n",
            Some("DELETE FROM items;\n"),
        );

        let plan = planned(&url, &dir, &["plan"]);
        let sent = run_logged(&admin, &url, &db, &dir, &["upgrade"]);
        assert_same(&plan, &sent);
        assert!(
            plan.iter()
                .any(|s| s == "SET SESSION max_statement_time = 20.000"),
            "MariaDB's own statement timeout: {plan:#?}"
        );
        assert!(
            !plan.iter().any(|s| s.contains("max_execution_time")),
            "{plan:#?}"
        );

        let lease = ["--lock", "lease"];
        let plan = planned(&url, &dir, &["plan", "-2", lease[0], lease[1]]);
        let sent = run_logged(
            &admin,
            &url,
            &db,
            &dir,
            &["downgrade", "-2", lease[0], lease[1]],
        );
        assert_same(&plan, &sent);
        assert!(
            plan.iter()
                .any(|s| s.ends_with("AND token = <lease_token> FOR UPDATE")),
            "the fence: {plan:#?}"
        );
    }
}

#[test]
fn placeholders_match_only_values_of_their_kind() {
    assert!(matches("x = <row_id>", "x = 42"));
    assert!(!matches("x = <row_id>", "x = y"));
    assert!(matches(
        "VALUES (<runner_id>, <duration_ms>)",
        "VALUES ('host/17', 3)"
    ));
    assert!(!matches("VALUES (<runner_id>)", "VALUES (NULL)"));
    assert!(!matches("SELECT 1", "SELECT 2"));
}
