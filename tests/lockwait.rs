//! Lock safety on real servers: a migration that queues behind a long transaction on a
//! busy table waits at most its lock timeout, rolls back, retries, and applies exactly once
//! when the table is free; the app's queries are never held for long (measured by a
//! concurrent client, asserted loosely); a spent retry budget fails with exit 19 naming the
//! session that holds the lock; a non-transactional step (CREATE INDEX CONCURRENTLY, a
//! MariaDB DDL step) is retried only where nothing of it was applied.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sqlx::Connection;
use support::*;

/// A client session on its own thread: runs `setup` (opening a transaction that holds
/// locks), then waits; `release` commits and closes it.
struct Holder {
    release: mpsc::Sender<()>,
    thread: JoinHandle<()>,
}

fn exec_all<'c, C>(conn: &'c mut C, sql: &str) -> impl std::future::Future<Output = ()> + 'c
where
    for<'e> &'e mut C: sqlx::Executor<'e>,
{
    let sql = sql.to_string();
    async move {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
            .execute(conn)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

impl Holder {
    fn start(url: &str, setup: &str) -> Self {
        let (url, setup) = (url.to_string(), setup.to_string());
        let (release, wait) = mpsc::channel::<()>();
        let (ready, started) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if url.starts_with("postgres") {
                    let mut c = sqlx::PgConnection::connect(&url).await.unwrap();
                    exec_all(&mut c, "SET application_name = 'report-job'").await;
                    exec_all(&mut c, &setup).await;
                    ready.send(()).unwrap();
                    let _ = wait.recv();
                    exec_all(&mut c, "COMMIT").await;
                    c.close().await.unwrap();
                } else {
                    let mut c = sqlx::MySqlConnection::connect(&url).await.unwrap();
                    exec_all(&mut c, &setup).await;
                    ready.send(()).unwrap();
                    let _ = wait.recv();
                    exec_all(&mut c, "COMMIT").await;
                    c.close().await.unwrap();
                }
            });
        });
        started
            .recv_timeout(Duration::from_secs(30))
            .expect("the holder opened its transaction");
        Holder { release, thread }
    }

    fn release(self) {
        let _ = self.release.send(());
        self.thread.join().unwrap();
    }
}

/// The app: queries `table` every 20 ms on its own connection until stopped; the longest
/// query it saw.
struct App {
    stop: Arc<AtomicBool>,
    longest: Arc<Mutex<Duration>>,
    thread: JoinHandle<()>,
}

impl App {
    fn start(url: &str, table: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let longest = Arc::new(Mutex::new(Duration::ZERO));
        let (url, sql) = (url.to_string(), format!("SELECT count(*) FROM {table}"));
        let (s, l) = (stop.clone(), longest.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                macro_rules! run {
                    ($conn:expr) => {{
                        let mut tick = tokio::time::interval(Duration::from_millis(20));
                        while !s.load(Ordering::SeqCst) {
                            tick.tick().await;
                            let t = Instant::now();
                            exec_all(&mut $conn, &sql).await;
                            let took = t.elapsed();
                            let mut m = l.lock().unwrap();
                            *m = (*m).max(took);
                        }
                    }};
                }
                if url.starts_with("postgres") {
                    let mut c = sqlx::PgConnection::connect(&url).await.unwrap();
                    run!(c);
                } else {
                    let mut c = sqlx::MySqlConnection::connect(&url).await.unwrap();
                    run!(c);
                }
            });
        });
        App {
            stop,
            longest,
            thread,
        }
    }

    fn stop(self) -> Duration {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap();
        *self.longest.lock().unwrap()
    }
}

fn upgrade(url: &str, dir: &MigDir, args: &[&str]) -> Watched {
    let mut c = migrate(url, dir.path());
    c.arg("upgrade").args(args);
    Watched::spawn(c)
}

const RETRYING: &str = "waited too long for a table lock and was rolled back; retrying";

fn successes(url: &str, version: &str) -> i64 {
    count(
        url,
        &format!(
            "SELECT count(*) FROM schemagate_history WHERE version = '{version}' AND kind = 'up' AND success"
        ),
    )
}

/// A busy table, a long reader, an ALTER: retried until the reader is gone, applied once,
/// the app never held for long.
fn blocked_alter_is_retried_and_applied_once(url: &str, lock_timeout: &str, hold: &str) {
    exec(
        url,
        "CREATE TABLE orders (id INTEGER PRIMARY KEY, total INTEGER); INSERT INTO orders VALUES (1, 10)",
    );
    let dir = MigDir::new();
    dir.pair(
        "1",
        "add_note",
        "ALTER TABLE orders ADD COLUMN note VARCHAR(40);\n",
        None,
    );
    let reader = Holder::start(url, hold);
    let app = App::start(url, "orders");
    let mut runner = upgrade(url, &dir, &["--migration-lock-timeout", lock_timeout]);
    // Two timed-out attempts while the reader holds its lock...
    runner.wait_line(RETRYING, Duration::from_secs(60));
    runner.wait_line(RETRYING, Duration::from_secs(60));
    let log = runner.seen.join("\n");
    assert!(log.contains("held_by") && log.contains("pid "), "{log}");
    // ... then it is gone, and the next attempt applies.
    reader.release();
    assert_eq!(
        runner.exit_code(Duration::from_secs(60)),
        Some(0),
        "{:?}",
        runner.seen
    );
    let longest = app.stop();
    assert_eq!(successes(url, "1"), 1, "applied exactly once");
    assert_eq!(
        count(url, "SELECT count(note) + 1 FROM orders"),
        1,
        "the column is there"
    );
    // Without the lock timeout the app waits as long as the reader holds its lock (here
    // several seconds, two attempts and two pauses); with it, about one lock timeout.
    assert!(
        longest < Duration::from_millis(2500),
        "the app was held for {longest:?}"
    );
}

#[test]
fn postgres_a_blocked_alter_is_retried_and_applied_once_without_holding_the_app() {
    let url = postgres::server().fresh_db();
    blocked_alter_is_retried_and_applied_once(&url, "300ms", "BEGIN; SELECT count(*) FROM orders");
    // The app's reader was named in the retries (application name, state).
}

#[test]
fn mariadb_a_blocked_alter_is_retried_and_applied_once_without_holding_the_app() {
    let url = mysql::server().fresh_db();
    blocked_alter_is_retried_and_applied_once(
        &url,
        "1s",
        "START TRANSACTION; SELECT count(*) FROM orders",
    );
}

#[test]
fn postgres_a_spent_retry_budget_fails_with_exit_19_naming_the_holder() {
    let url = postgres::server().fresh_db();
    exec(&url, "CREATE TABLE orders (id INTEGER PRIMARY KEY)");
    let dir = MigDir::new();
    dir.pair(
        "1",
        "add_note",
        "ALTER TABLE orders ADD COLUMN note text;\n",
        None,
    );
    let reader = Holder::start(&url, "BEGIN; SELECT count(*) FROM orders");
    let mut runner = upgrade(
        &url,
        &dir,
        &[
            "--migration-lock-timeout",
            "200ms",
            "--lock-retry-budget",
            "2s",
            "--output",
            "json",
        ],
    );
    let code = runner.exit_code(Duration::from_secs(60));
    let out = std::io::read_to_string(runner.child.stdout.take().unwrap()).unwrap();
    reader.release();
    assert_eq!(code, Some(19), "{out}\n{:?}", runner.seen);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("report-job") && message.contains("idle in transaction"),
        "the holder is named: {message}"
    );
    assert!(
        !message.contains("SELECT count"),
        "never the holder's query text: {message}"
    );
    assert_eq!(v["error"]["kind"], "lock_busy");
    assert!(
        v["error"]["hint"]
            .as_str()
            .unwrap()
            .contains("the migration is fine"),
        "{v}"
    );
    assert_eq!(successes(&url, "1"), 0, "nothing applied");
    // Waiting forever stays possible, explicitly: with the reader gone it just applies.
    let mut c = migrate(&url, dir.path());
    c.args(["upgrade", "--migration-lock-timeout", "0"]);
    assert_code(&run(c), 0);
    assert_eq!(successes(&url, "1"), 1);
}

#[test]
fn postgres_a_timed_out_create_index_concurrently_is_cleaned_up_and_retried() {
    // CREATE INDEX CONCURRENTLY is non-transactional: retried only because its one
    // statement timed out before anything was applied, after the INVALID index a failed
    // build left is dropped.
    let url = postgres::server().fresh_db();
    exec(
        &url,
        "CREATE TABLE orders (id INTEGER PRIMARY KEY, note text); INSERT INTO orders VALUES (1, 'a')",
    );
    let dir = MigDir::new();
    dir.pair(
        "1",
        "index_note",
        "-- schemagate:no-transaction\nCREATE INDEX CONCURRENTLY orders_note ON orders (note);\n",
        None,
    );
    // A failed CREATE INDEX CONCURRENTLY leaves an INVALID index behind (here: a unique
    // one over duplicates, as an earlier crashed attempt would).
    exec(&url, "INSERT INTO orders VALUES (2, 'a')");
    let mut c = std::process::Command::new("psql");
    c.args([
        url.as_str(),
        "-c",
        "CREATE UNIQUE INDEX CONCURRENTLY orders_note ON orders (note)",
    ]);
    assert!(
        !run(c).status.success(),
        "the unique index fails over duplicates"
    );
    assert_eq!(
        count(
            &url,
            "SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname = 'orders_note' AND NOT i.indisvalid"
        ),
        1,
        "an INVALID index is left"
    );
    // A session whose lock conflicts with the index build's holds the table.
    let reader = Holder::start(&url, "BEGIN; LOCK TABLE orders IN SHARE ROW EXCLUSIVE MODE");
    let mut runner = upgrade(&url, &dir, &["--migration-lock-timeout", "300ms"]);
    runner.wait_line(RETRYING, Duration::from_secs(60));
    reader.release();
    assert_eq!(
        runner.exit_code(Duration::from_secs(60)),
        Some(0),
        "{:?}",
        runner.seen
    );
    assert_eq!(
        count(
            &url,
            "SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
             WHERE c.relname = 'orders_note' AND i.indisvalid"
        ),
        1,
        "one valid index"
    );
    assert_eq!(successes(&url, "1"), 1, "applied exactly once");
    assert_eq!(
        count(
            &url,
            "SELECT count(*) FROM schemagate_history WHERE version = '1' AND kind = 'mark_reverted'"
        ),
        count(
            &url,
            "SELECT count(*) FROM schemagate_history WHERE version = '1' AND kind = 'up' AND success = false"
        ),
        "every failed attempt is resolved as reverted: the step is not left dirty"
    );
    let mut c = migrate(&url, dir.path());
    c.arg("status");
    assert_code(&run(c), 0);
}
