//! Shared test harness: throwaway real database servers, the real `schemagate` binary,
//! migration directories, and waiting on conditions with deadlines (never blind sleeps).
#![allow(dead_code)]

pub mod flask;
pub mod mysql;
pub mod pgbouncer;
pub mod postgres;
pub mod pss;
pub mod python;
pub mod scenarios;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_schemagate")
}

/// A `schemagate migrate` command with a clean environment (no inherited DATABASE_URL).
pub fn migrate(url: &str, dir: &Path) -> Command {
    let mut c = Command::new(bin());
    c.arg("migrate")
        .env_remove("DATABASE_URL")
        .env_remove("SCHEMAGATE_DIR")
        .env_remove("SCHEMAGATE_OUTPUT")
        .env_remove("SCHEMAGATE_SUMMARY_FILE")
        .env("SCHEMAGATE_LOG", "info")
        .env("DATABASE_URL", url)
        .env("SCHEMAGATE_DIR", dir);
    c
}

/// Runs a command to completion.
pub fn run(mut c: Command) -> Output {
    c.stdin(Stdio::null());
    c.output().expect("spawn schemagate")
}

/// Output as text, for assertions and failure messages.
pub fn text(o: &Output) -> String {
    format!(
        "exit={:?}\n--- stdout\n{}--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

#[track_caller]
pub fn assert_code(o: &Output, expected: i32) {
    assert_eq!(code(o), expected, "{}", text(o));
}

pub fn stdout_json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", text(o)))
}

/// Polls `cond` until it holds or `deadline` passes (then panics with `what`).
#[track_caller]
pub fn wait_for(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    let mut delay = Duration::from_millis(5);
    while !cond() {
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_millis(100));
    }
}

static UNIQUE: AtomicUsize = AtomicUsize::new(0);

/// A name unique within this test process.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}_{}_{}",
        std::process::id(),
        UNIQUE.fetch_add(1, Ordering::Relaxed)
    )
}

/// A directory of migration files.
pub struct MigDir {
    pub dir: tempfile::TempDir,
}

impl MigDir {
    pub fn new() -> Self {
        MigDir {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn file(&self, name: &str, text: &str) -> &Self {
        std::fs::write(self.dir.path().join(name), text).expect("write migration");
        self
    }

    pub fn remove(&self, name: &str) -> &Self {
        std::fs::remove_file(self.dir.path().join(name)).expect("remove migration");
        self
    }

    /// `<v>_<name>.up.sql` and, when given, `.down.sql`.
    pub fn pair(&self, v: &str, name: &str, up: &str, down: Option<&str>) -> &Self {
        self.file(&format!("{v}_{name}.up.sql"), up);
        if let Some(d) = down {
            self.file(&format!("{v}_{name}.down.sql"), d);
        }
        self
    }
}

/// A child process whose stderr is read line by line on a thread, so a test can wait for a
/// log line (a condition) before acting, e.g. before `kill -9`.
pub struct Watched {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    pub seen: Vec<String>,
}

impl Watched {
    pub fn spawn(mut c: Command) -> Self {
        c.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().expect("spawn");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Watched {
            child,
            lines: rx,
            seen: Vec::new(),
        }
    }

    /// Waits for a stderr line containing `needle`.
    #[track_caller]
    pub fn wait_line(&mut self, needle: &str, deadline: Duration) {
        let start = Instant::now();
        loop {
            let left = deadline.saturating_sub(start.elapsed());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let hit = line.contains(needle);
                    self.seen.push(line);
                    if hit {
                        return;
                    }
                }
                Err(_) => panic!(
                    "no line containing {needle:?} within {deadline:?}; saw:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Collects the rest of stderr once the process has ended (the pipe closes).
    #[track_caller]
    pub fn drain(&mut self, deadline: Duration) {
        let start = Instant::now();
        loop {
            let left = deadline.saturating_sub(start.elapsed());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("stderr still open after {deadline:?}")
                }
            }
        }
    }

    /// Sends a signal (`"TERM"`, `"INT"`, ...) to the process.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([format!("-{name}"), self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Waits (with a deadline) for the process to end, then collects the rest of its
    /// stderr; its exit code.
    #[track_caller]
    pub fn exit_code(&mut self, deadline: Duration) -> Option<i32> {
        let mut status = None;
        wait_for("the process to exit", deadline, || {
            status = self.child.try_wait().expect("try_wait");
            status.is_some()
        });
        self.drain(Duration::from_secs(10));
        status.and_then(|s| s.code())
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        let pid = self.child.id().to_string();
        let status = Command::new("kill")
            .args(["-9", &pid])
            .status()
            .expect("kill");
        assert!(status.success());
        let _ = self.child.wait();
    }
}

/// Runs `sql` and returns the first column of every row as text (NULL as "NULL").
pub fn query(url: &str, sql: &str) -> Vec<String> {
    use sqlx::{Connection, Row, ValueRef};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        macro_rules! first_col {
            ($conn:expr) => {{
                let rows = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
                    .fetch_all(&mut $conn)
                    .await
                    .unwrap_or_else(|e| panic!("{sql}: {e}"));
                rows.iter()
                    .map(|r| {
                        if r.try_get_raw(0).map(|v| v.is_null()).unwrap_or(true) {
                            return "NULL".to_string();
                        }
                        r.try_get::<String, _>(0)
                            .or_else(|_| r.try_get::<i64, _>(0).map(|v| v.to_string()))
                            .or_else(|_| r.try_get::<i32, _>(0).map(|v| v.to_string()))
                            .or_else(|_| r.try_get::<bool, _>(0).map(|v| v.to_string()))
                            .unwrap_or_else(|e| panic!("{sql}: cannot read column: {e}"))
                    })
                    .collect::<Vec<_>>()
            }};
        }
        if url.starts_with("sqlite") {
            use sqlx::ConnectOptions;
            use std::str::FromStr;
            let opts = sqlx::sqlite::SqliteConnectOptions::from_str(url)
                .unwrap()
                .create_if_missing(true);
            let mut c = opts.connect().await.unwrap();
            first_col!(c)
        } else if url.starts_with("mysql") {
            let mut c = sqlx::MySqlConnection::connect(url).await.unwrap();
            first_col!(c)
        } else {
            let mut c = sqlx::PgConnection::connect(url).await.unwrap();
            first_col!(c)
        }
    })
}

/// Runs statements, ignoring results.
pub fn exec(url: &str, sql: &str) {
    let _ = query(url, sql);
}

pub fn count(url: &str, sql: &str) -> i64 {
    query(url, sql)[0]
        .parse()
        .unwrap_or_else(|_| panic!("{sql}: not a number"))
}

/// A SQLite database file in its own temporary directory.
pub struct SqliteDb {
    pub dir: tempfile::TempDir,
    pub url: String,
    pub path: PathBuf,
}

pub fn sqlite_db() -> SqliteDb {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("app.db");
    SqliteDb {
        url: format!("sqlite:{}", path.display()),
        path,
        dir,
    }
}
