//! Locking where session locks break: PgBouncer in transaction mode, the lease lock and its
//! takeover after `kill -9`, waiters that never block the holder's work, per-migration
//! timeouts. Real PostgreSQL, PgBouncer and MariaDB.

mod support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use support::pgbouncer::PgBouncer;
use support::postgres::server;
use support::scenarios;
use support::*;

fn db_name(url: &str) -> String {
    let tail = url.rsplit('/').next().unwrap_or_default();
    tail.split('?').next().unwrap_or_default().to_string()
}

fn history_count(url: &str, filter: &str) -> i64 {
    count(
        url,
        &format!("SELECT count(*) FROM schemagate_history WHERE {filter}"),
    )
}

fn cmd(url: &str, dir: &MigDir, args: &[&str]) -> std::process::Output {
    let mut c = migrate(url, dir.path());
    c.args(args);
    run(c)
}

/// Spawns `n` runners with `args` and waits for all of them (with a deadline, so a hang is
/// a failure, not a stuck test).
fn race(url: &str, dir: &MigDir, n: usize, args: &[&str]) -> Vec<std::process::Output> {
    let children: Vec<_> = (0..n)
        .map(|i| {
            let mut c = migrate(url, dir.path());
            c.args(args)
                .args(["--runner-id", &format!("runner-{i}")])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            c.spawn().expect("spawn runner")
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(180);
    children
        .into_iter()
        .map(|mut child| {
            wait_for(
                "a runner to finish",
                deadline.saturating_duration_since(Instant::now()),
                || child.try_wait().map(|s| s.is_some()).unwrap_or(true),
            );
            child.wait_with_output().expect("runner output")
        })
        .collect()
}

fn slow_set(dir: &MigDir) {
    scenarios::standard(dir);
    dir.pair("0", "slow_start", "SELECT pg_sleep(0.5);\n", None);
}

fn assert_each_applied_once(direct: &str) {
    for v in ["0", "1", "2", "3", "10"] {
        assert_eq!(
            history_count(
                direct,
                &format!("version = '{v}' AND kind = 'up' AND success")
            ),
            1,
            "version {v} applied exactly once"
        );
    }
    assert_eq!(count(direct, "SELECT count(*) FROM orders"), 1);
}

#[test]
fn twenty_runners_through_pgbouncer_with_the_lease_lock() {
    let direct = server().fresh_db();
    let bouncer = PgBouncer::start(5);
    let url = format!("{}&schemagate_lock=lease", bouncer.url(&db_name(&direct)));
    let dir = MigDir::new();
    slow_set(&dir);
    let outs = race(&url, &dir, 20, &["upgrade", "--lease-heartbeat", "500ms"]);
    for o in &outs {
        assert_code(o, 0);
    }
    assert_each_applied_once(&direct);
    // The lease was released: status through the pooler shows no holder.
    let o = cmd(&url, &dir, &["status", "-o", "json"]);
    assert_code(&o, 0);
    assert!(stdout_json(&o)["lockHolder"].is_null());
}

#[test]
fn the_session_lock_through_pgbouncer_is_refused_clearly_never_shared() {
    let direct = server().fresh_db();
    // One server connection: every client shares it, as a busy pooler eventually does.
    let bouncer = PgBouncer::start(1);
    let url = bouncer.url(&db_name(&direct));
    let dir = MigDir::new();
    scenarios::standard(&dir);
    // A client that took the lock through the pooler and went away leaves it on the shared
    // server session (transaction mode resets nothing).
    let key = schemagate::engine::HistoryTable::parse("public.schemagate_history")
        .unwrap()
        .lock_key();
    exec(&url, &format!("SELECT pg_advisory_lock({key})::text"));
    let o = cmd(&url, &dir, &["upgrade", "--lock-timeout", "5s"]);
    assert_code(&o, 17);
    let t = text(&o);
    assert!(t.contains("pooler") && t.contains("--lock lease"), "{t}");
    assert_eq!(
        count(
            &direct,
            "SELECT count(*) FROM pg_tables WHERE tablename = 'items'"
        ),
        0,
        "nothing ran"
    );
    // The lease lock works through the same pooler.
    let o = cmd(&url, &dir, &["upgrade", "--lock", "lease"]);
    assert_code(&o, 0);
    assert_eq!(history_count(&direct, "success"), 4);
}

#[test]
fn racing_session_lock_runners_through_pgbouncer_never_apply_twice_or_hang() {
    let direct = server().fresh_db();
    let bouncer = PgBouncer::start(3);
    let url = bouncer.url(&db_name(&direct));
    let dir = MigDir::new();
    slow_set(&dir);
    let outs = race(&url, &dir, 10, &["upgrade", "--lock-timeout", "20s"]);
    for o in &outs {
        assert!(matches!(code(o), 0 | 14 | 17), "{}", text(o));
    }
    for v in ["0", "1", "2", "3", "10"] {
        assert!(
            history_count(
                &direct,
                &format!("version = '{v}' AND kind = 'up' AND success")
            ) <= 1,
            "version {v} applied at most once"
        );
    }
    // Whatever the racers left, one lease run finishes the job.
    let o = cmd(&url, &dir, &["upgrade", "--lock", "lease"]);
    assert_code(&o, 0);
    assert_each_applied_once(&direct);
}

#[test]
fn a_killed_lease_holder_is_taken_over_after_expiry_and_its_step_rolled_back() {
    let direct = server().fresh_db();
    let bouncer = PgBouncer::start(5);
    let url = format!("{}&schemagate_lock=lease", bouncer.url(&db_name(&direct)));
    let dir = MigDir::new();
    dir.pair("1", "t", "CREATE TABLE t (x INTEGER);\n", None);
    dir.pair(
        "2",
        "slow",
        "INSERT INTO t VALUES (1);\nSELECT pg_sleep(5);\nINSERT INTO t VALUES (2);\n",
        None,
    );
    let lease_args = ["--lease-heartbeat", "200ms", "--lease-ttl", "1s"];
    let mut w = Watched::spawn({
        let mut c = migrate(&url, dir.path());
        c.arg("upgrade").args(lease_args);
        c
    });
    w.wait_line("applying version=2", Duration::from_secs(60));
    wait_for("the slow statement to run", Duration::from_secs(30), || {
        count(
            &direct,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query LIKE '%pg_sleep(5)%' AND state = 'active' AND pid <> pg_backend_pid()",
        ) == 1
    });
    w.kill9();
    let started = Instant::now();
    let o = cmd(
        &url,
        &dir,
        &["upgrade", "--lock-timeout", "60s", "-o", "json"],
    );
    assert_code(&o, 0);
    let report = stdout_json(&o);
    assert_eq!(
        report["steps"][0]["version"], "2",
        "the killed step was rolled back and re-run"
    );
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_eq!(count(&direct, "SELECT count(*) FROM t"), 2);
    assert_eq!(history_count(&direct, "version = '2'"), 1);
}

#[test]
fn a_killed_lease_holder_on_mysql_leaves_its_ddl_step_dirty() {
    let url = format!(
        "{}?schemagate_lock=lease",
        support::mysql::server().fresh_db()
    );
    let dir = MigDir::new();
    dir.pair("1", "t", "CREATE TABLE t (x INTEGER);\n", None);
    dir.pair(
        "2",
        "slow_ddl",
        "CREATE TABLE a (x INTEGER);\nSELECT SLEEP(5);\nCREATE TABLE b (x INTEGER);\n",
        None,
    );
    let lease_args = ["--lease-heartbeat", "200ms", "--lease-ttl", "1s"];
    let mut w = Watched::spawn({
        let mut c = migrate(&url, dir.path());
        c.arg("upgrade").args(lease_args);
        c
    });
    w.wait_line("applying version=2", Duration::from_secs(60));
    wait_for("the slow statement to run", Duration::from_secs(30), || {
        count(
            &url.replace("?schemagate_lock=lease", ""),
            "SELECT count(*) FROM information_schema.PROCESSLIST WHERE DB = DATABASE() AND INFO LIKE 'SELECT SLEEP(%' AND ID <> CONNECTION_ID()",
        ) >= 1
    });
    w.kill9();
    let o = cmd(&url, &dir, &["upgrade", "--lock-timeout", "60s"]);
    assert_code(&o, 13);
    assert!(text(&o).contains("1 of 3 statements"), "{}", text(&o));
    let o = cmd(&url, &dir, &["status", "-o", "json"]);
    assert_code(&o, 4);
}

#[test]
fn create_index_concurrently_finishes_while_ten_runners_wait() {
    let url = server().fresh_db();
    let dir = MigDir::new();
    dir.pair(
        "1",
        "big",
        "CREATE TABLE big (id INTEGER, v TEXT);\nINSERT INTO big SELECT g, md5(g::text) FROM generate_series(1, 20000) g;\n",
        None,
    );
    dir.pair(
        "2",
        "index",
        "-- schemagate:no-transaction\nCREATE INDEX CONCURRENTLY big_v ON big (v);\n",
        None,
    );
    for args in [&["upgrade"][..], &["upgrade", "--lock", "lease"]] {
        let url = if args.len() == 1 {
            url.clone()
        } else {
            server().fresh_db()
        };
        let outs = race(&url, &dir, 11, args);
        for o in &outs {
            assert_code(o, 0);
        }
        assert_eq!(
            count(
                &url,
                "SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
                 WHERE c.relname = 'big_v' AND i.indisvalid"
            ),
            1,
            "the index is valid ({args:?})"
        );
        assert_eq!(history_count(&url, "version = '2' AND success"), 1);
    }
}

/// Holds a lock on a table from another session until dropped.
struct TableLock(std::process::Child);

impl TableLock {
    fn postgres(url: &str, table: &str) -> TableLock {
        let child = std::process::Command::new("psql")
            .arg(url.replace("?sslmode=disable", ""))
            .args([
                "-X",
                "-q",
                "-c",
                &format!(
                    "BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(120);"
                ),
            ])
            .env("PGSSLMODE", "disable")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("psql");
        wait_for("the table lock", Duration::from_secs(30), || {
            count(
                url,
                &format!(
                    "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation WHERE l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) AND c.relname = '{table}' AND l.mode = 'AccessExclusiveLock' AND l.granted"
                ),
            ) == 1
        });
        TableLock(child)
    }
}

impl Drop for TableLock {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn per_migration_timeouts_stop_queueing_and_runaway_statements() {
    let url = server().fresh_db();
    let dir = MigDir::new();
    dir.pair("1", "t", "CREATE TABLE busy (x INTEGER);\n", None);
    assert_code(&cmd(&url, &dir, &["upgrade"]), 0);
    let _held = TableLock::postgres(&url, "busy");
    dir.pair(
        "2",
        "alter",
        "-- schemagate:lock-timeout 1s\nALTER TABLE busy ADD COLUMN y INTEGER;\n",
        None,
    );
    // Retries off: the timed-out step fails at once (exit 12); with a short budget it is
    // retried, then ends with exit 19 naming the holder (tests/lockwait.rs has the rest).
    let started = Instant::now();
    let o = cmd(&url, &dir, &["upgrade", "--lock-retry-budget", "0"]);
    assert_code(&o, 12);
    assert!(text(&o).contains("lock timeout"), "{}", text(&o));
    assert!(started.elapsed() < Duration::from_secs(30));
    let o = cmd(&url, &dir, &["upgrade", "--lock-retry-budget", "3s"]);
    assert_code(&o, 19);
    assert!(
        text(&o).contains("psql"),
        "the holder is named: {}",
        text(&o)
    );
    drop(_held);

    let url = server().fresh_db();
    let dir = MigDir::new();
    dir.pair("1", "runaway", "SELECT pg_sleep(30);\n", None);
    let o = cmd(
        &url,
        &dir,
        &["upgrade", "--migration-statement-timeout", "500ms"],
    );
    assert_code(&o, 12);
    assert!(text(&o).contains("statement timeout"), "{}", text(&o));
    // Limits beyond what the server accepts are capped, not an error that leaves a
    // transaction (and a lease row) locked.
    let big = server().fresh_db();
    let dir2 = MigDir::new();
    dir2.pair(
        "1",
        "huge",
        "-- schemagate:statement-timeout 600h\nSELECT 1;\n",
        None,
    );
    assert_code(&cmd(&big, &dir2, &["upgrade", "--lock", "lease"]), 0);
    let o = cmd(
        &big,
        &dir2,
        &[
            "status",
            "--lock",
            "lease",
            "--lease-heartbeat",
            "5s",
            "--lease-ttl",
            "6s",
        ],
    );
    assert_code(&o, 2);
    assert!(text(&o).contains("at least twice"), "{}", text(&o));
    // The session default is back for the next step: a later step without a limit runs.
    dir.file("1_runaway.up.sql", "SELECT pg_sleep(0.1);\n");
    dir.pair(
        "2",
        "next",
        "-- schemagate:no-transaction\nSELECT pg_sleep(0.6);\n",
        None,
    );
    let o = cmd(&url, &dir, &["upgrade"]);
    assert_code(&o, 0);
}

/// A session holding a PostgreSQL advisory lock until dropped: makes a migration step wait
/// on a condition the test controls.
struct Blocker {
    rt: tokio::runtime::Runtime,
    conn: Option<sqlx::PgConnection>,
}

impl Blocker {
    fn hold(url: &str, key: i64) -> Self {
        Self::run(url, &format!("SELECT pg_advisory_lock({key})"))
    }

    /// Runs `sql` on a session kept open (a transaction it begins stays open).
    fn run(url: &str, sql: &str) -> Self {
        use sqlx::Connection;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut conn = rt.block_on(sqlx::PgConnection::connect(url)).unwrap();
        rt.block_on(sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string())).execute(&mut conn))
            .unwrap();
        Blocker {
            rt,
            conn: Some(conn),
        }
    }

    fn release(mut self) {
        use sqlx::Connection;
        if let Some(conn) = self.conn.take() {
            self.rt.block_on(conn.close()).unwrap();
        }
    }
}

const BLOCK_KEY: i64 = 4242;

/// Step 2 waits for the test's advisory lock; step 3 would create a table.
fn blocked_set(dir: &MigDir) {
    dir.pair("1", "t", "CREATE TABLE t (x INTEGER);\n", None);
    dir.pair(
        "2",
        "waits",
        &format!("SELECT pg_advisory_xact_lock({BLOCK_KEY});\nINSERT INTO t VALUES (2);\n"),
        None,
    );
    dir.pair("3", "later", "CREATE TABLE later (x INTEGER);\n", None);
}

/// Starts an upgrade and returns once its step 2 waits on the blocker.
fn upgrade_waiting_in_step_2(url: &str, dir: &MigDir, args: &[&str]) -> Watched {
    let mut w = Watched::spawn({
        let mut c = migrate(url, dir.path());
        c.arg("upgrade").args(args);
        c
    });
    w.wait_line("applying version=2", Duration::from_secs(60));
    wait_for(
        "step 2 to wait for the lock",
        Duration::from_secs(30),
        || {
            count(
                url,
                &format!(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' \
                 AND objid = {BLOCK_KEY} AND NOT granted \
                 AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
                ),
            ) == 1
        },
    );
    w
}

/// The runner ends with exit 18 within `deadline`, saying `says`.
#[track_caller]
fn assert_stopped(w: &mut Watched, deadline: Duration, says: &str) {
    assert_eq!(w.exit_code(deadline), Some(18), "{:#?}", w.seen);
    assert!(w.seen.iter().any(|l| l.contains(says)), "{:#?}", w.seen);
}

#[test]
fn sigterm_finishes_the_running_step_and_starts_no_other() {
    let url = server().fresh_db();
    let dir = MigDir::new();
    blocked_set(&dir);
    let blocker = Blocker::hold(&url, BLOCK_KEY);
    let summary = dir.path().join("termination-log");
    let summary_arg = summary.display().to_string();
    let mut w = upgrade_waiting_in_step_2(&url, &dir, &["--summary-file", &summary_arg]);
    // Kubernetes deletes the pod: SIGTERM, then the grace period.
    w.signal("TERM");
    w.wait_line("finishing the running step", Duration::from_secs(30));
    blocker.release();
    assert_stopped(
        &mut w,
        Duration::from_secs(60),
        "3 (3_later.up.sql) and later steps were not started",
    );
    // The summary the controller reads says stopped (not failed) and what was applied.
    let line: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(&summary).unwrap().trim()).unwrap();
    assert_eq!(line["result"], "stopped", "{line}");
    assert_eq!(line["exitCode"], 18);
    assert_eq!(line["applied"], serde_json::json!(["1", "2"]), "{line}");
    // Step 2 finished and is recorded; step 3 never started.
    assert_eq!(history_count(&url, "version = '2' AND success"), 1);
    assert_eq!(history_count(&url, "version = '3'"), 0);
    assert_eq!(count(&url, "SELECT count(*) FROM t"), 1);
    assert_eq!(
        count(
            &url,
            "SELECT count(*) FROM pg_tables WHERE tablename = 'later'"
        ),
        0
    );
    // The lock was released: the next run goes on at once.
    let o = cmd(
        &url,
        &dir,
        &["upgrade", "--lock-timeout", "5s", "-o", "json"],
    );
    assert_code(&o, 0);
    assert_eq!(stdout_json(&o)["steps"][0]["version"], "3");
}

#[test]
fn a_second_sigterm_stops_at_once_and_the_step_is_rolled_back() {
    let url = server().fresh_db();
    let dir = MigDir::new();
    blocked_set(&dir);
    let blocker = Blocker::hold(&url, BLOCK_KEY);
    let mut w = upgrade_waiting_in_step_2(&url, &dir, &[]);
    w.signal("TERM");
    w.wait_line("finishing the running step", Duration::from_secs(30));
    w.signal("TERM");
    // Ends while step 2 still waits: nothing of it is recorded or applied.
    assert_stopped(&mut w, Duration::from_secs(30), "stopped at once");
    assert_eq!(history_count(&url, "version = '2'"), 0);
    assert_eq!(count(&url, "SELECT count(*) FROM t"), 0);
    blocker.release();
    let o = cmd(&url, &dir, &["upgrade", "--lock-timeout", "5s"]);
    assert_code(&o, 0);
    assert_eq!(history_count(&url, "version IN ('2', '3') AND success"), 2);
}

#[test]
fn sigterm_ends_a_wait_at_once() {
    let url = server().fresh_db();
    let dir = MigDir::new();
    blocked_set(&dir);
    let mut w = Watched::spawn({
        let mut c = migrate(&url, dir.path());
        c.args(["wait", "--timeout", "10m"]);
        c
    });
    w.wait_line("waiting", Duration::from_secs(30));
    w.signal("TERM");
    assert_stopped(&mut w, Duration::from_secs(10), "nothing was changed");
}

#[test]
fn exec_stops_its_command_when_the_lease_cannot_be_renewed() {
    let direct = server().fresh_db();
    let url = format!("{direct}&schemagate_lock=lease");
    let mut c = migrate(&url, std::path::Path::new("/nonexistent"));
    c.args(["--lease-heartbeat", "200ms", "--lease-ttl", "1s"])
        .args(["exec", "--check-every", "50ms", "--"])
        .args(["sh", "-c", "printf 'cmd-%s\\n' up; sleep 60"]);
    let mut w = Watched::spawn(c);
    w.wait_line("cmd-up", Duration::from_secs(30));
    // Renewals stop getting through (a row lock here; a partition or a stalled server in
    // life): well before the lease could expire and be taken over, the command is stopped.
    let blocker = Blocker::run(
        &direct,
        "BEGIN; SELECT 1 FROM schemagate_history_lock FOR UPDATE",
    );
    assert_eq!(
        w.exit_code(Duration::from_secs(30)),
        Some(17),
        "{:#?}",
        w.seen
    );
    assert!(
        w.seen.iter().any(|l| l.contains("lost the migration lock")),
        "{:#?}",
        w.seen
    );
    blocker.release();
}
