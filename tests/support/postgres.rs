//! A throwaway PostgreSQL server per test process: `initdb` into a temporary directory, run
//! as the unprivileged `postgres` user when the tests run as root, on a free loopback port,
//! with password (SCRAM) authentication so wrong-password cases are real.
//!
//! A watchdog shell owns the server: it holds the read end of a pipe whose write end lives in
//! this process. When the test process exits, however it exits, the pipe closes, the
//! watchdog stops the server and deletes the data directory.

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use super::{unique, wait_for};

pub const PASSWORD: &str = "Tr0ub4dor&3-Horse";

pub struct PgServer {
    pub port: u16,
    pub root: PathBuf,
    watchdog: Mutex<Child>,
}

static SERVER: OnceLock<PgServer> = OnceLock::new();

/// The shared server, started on first use.
pub fn server() -> &'static PgServer {
    SERVER.get_or_init(start)
}

fn pg_bin(name: &str) -> PathBuf {
    // Prefer PATH; fall back to Debian's versioned directory.
    if let Ok(out) = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
    {
        let p = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !p.is_empty() {
            return PathBuf::from(p);
        }
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    dirs.pop()
        .map(|d| d.join(name))
        .unwrap_or_else(|| panic!("{name} not found: install PostgreSQL's server binaries"))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Runs a command as the `postgres` user when we are root.
fn as_pg_user(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=postgres", "--regid=postgres", "--init-groups"])
            .arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn chown_to_postgres(path: &Path) {
    if is_root() {
        let st = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(path)
            .status()
            .expect("chown");
        assert!(st.success(), "chown {path:?}");
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn start() -> PgServer {
    let root = std::env::temp_dir().join(unique("schemagate-pg"));
    std::fs::create_dir_all(&root).expect("mkdir");
    let _ = Command::new("chmod").arg("755").arg(&root).status();
    let data = root.join("data");
    let pwfile = root.join("pw");
    std::fs::write(&pwfile, PASSWORD).expect("pwfile");
    chown_to_postgres(&root);

    let out = as_pg_user(&pg_bin("initdb"))
        .arg("-D")
        .arg(&data)
        .args([
            "-U",
            "postgres",
            "--auth=scram-sha-256",
            "-E",
            "UTF8",
            "--no-sync",
            "--no-instructions",
        ])
        .arg(format!("--pwfile={}", pwfile.display()))
        .output()
        .expect("initdb");
    assert!(
        out.status.success(),
        "initdb failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let port = free_port();
    let log = root.join("server.log");
    let postgres = pg_bin("postgres");
    let prefix = if is_root() {
        "setpriv --reuid=postgres --regid=postgres --init-groups "
    } else {
        ""
    };
    // fsync off: these are throwaway clusters; durability is not what the tests measure.
    // client_connection_check_interval: a killed client's backend notices within a second
    // (a setting the README recommends for production too).
    let script = format!(
        "{prefix}'{postgres}' -D '{data}' -p {port} -k '{root}' -c listen_addresses=127.0.0.1 \
         -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200 \
         -c client_connection_check_interval=500ms </dev/null >'{log}' 2>&1 & pg=$!; \
         read _; kill -QUIT $pg 2>/dev/null; wait $pg; rm -rf '{root}'",
        postgres = postgres.display(),
        data = data.display(),
        root = root.display(),
        log = log.display(),
    );
    let watchdog = Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start postgres");
    let server = PgServer {
        port,
        root,
        watchdog: Mutex::new(watchdog),
    };
    let admin = server.url("postgres");
    wait_for(
        "PostgreSQL to accept connections",
        Duration::from_secs(60),
        || {
            let ok = Command::new(pg_bin("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q"])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            ok && std::panic::catch_unwind(|| super::query(&admin, "SELECT 1")).is_ok()
        },
    );
    server
}

impl PgServer {
    /// A URL for `db` as the superuser, with the password.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://postgres:{}@127.0.0.1:{}/{db}?sslmode=disable",
            urlencode(PASSWORD),
            self.port
        )
    }

    /// Creates a fresh database and returns its URL.
    pub fn fresh_db(&self) -> String {
        let name = unique("t");
        super::exec(&self.url("postgres"), &format!("CREATE DATABASE {name}"));
        self.url(&name)
    }

    /// The server log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root.join("server.log")).unwrap_or_default()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Ok(mut w) = self.watchdog.lock() {
            if let Some(mut stdin) = w.stdin.take() {
                let _ = stdin.write_all(b"stop\n");
            }
            let _ = w.wait();
        }
    }
}

pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
