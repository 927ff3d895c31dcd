//! A throwaway MariaDB server per test process, from Debian's `mariadb-server` (installed
//! here if missing and we are root), run as the unprivileged `mysql` user on a free
//! loopback port, with a password-authenticated user so wrong-password cases are real.
//! Like the PostgreSQL harness, a watchdog stops it and deletes its files when the test
//! process exits.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use super::{unique, wait_for};

pub const USER: &str = "sg";
pub const PASSWORD: &str = "M4ria-Db&Secret";

pub struct MariaDb {
    pub port: u16,
    pub root: PathBuf,
    _watchdog: Mutex<Child>,
}

static SERVER: OnceLock<MariaDb> = OnceLock::new();

pub fn server() -> &'static MariaDb {
    SERVER.get_or_init(start)
}

fn find(name: &str) -> Option<PathBuf> {
    for dir in ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return Some(p);
        }
    }
    None
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Installs MariaDB from Debian's packages when it is missing (CI machines start without).
fn ensure_installed() {
    if find("mariadbd").is_some() && find("mariadb-install-db").is_some() {
        return;
    }
    assert!(
        is_root(),
        "MariaDB is not installed: run `apt-get install mariadb-server` (or .ci/run as root)"
    );
    let st = Command::new("sh")
        .arg("-c")
        .arg(
            "DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
             DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
             mariadb-server mariadb-client",
        )
        .status()
        .expect("apt-get");
    assert!(st.success(), "installing mariadb-server failed");
}

fn as_mysql_user(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=mysql", "--regid=mysql", "--init-groups"])
            .arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn start() -> MariaDb {
    ensure_installed();
    let root = std::env::temp_dir().join(unique("schemagate-mariadb"));
    let data = root.join("data");
    std::fs::create_dir_all(&data).expect("mkdir");
    let _ = Command::new("chmod").arg("755").arg(&root).status();
    if is_root() {
        let st = Command::new("chown")
            .args(["-R", "mysql:mysql"])
            .arg(&root)
            .status()
            .expect("chown");
        assert!(st.success());
    }
    let install = find("mariadb-install-db").expect("mariadb-install-db");
    let out = as_mysql_user(&install)
        .args([
            "--no-defaults",
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
        ])
        .arg(format!("--datadir={}", data.display()))
        .output()
        .expect("mariadb-install-db");
    assert!(
        out.status.success(),
        "mariadb-install-db failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let socket = root.join("sock");
    let mariadbd = find("mariadbd").expect("mariadbd");
    let prefix = if is_root() {
        "setpriv --reuid=mysql --regid=mysql --init-groups "
    } else {
        ""
    };
    // Durability off and small buffers: a throwaway server for tests.
    let script = format!(
        "{prefix}'{bin}' --no-defaults --datadir='{data}' --socket='{socket}' --port={port} \
         --bind-address=127.0.0.1 --pid-file='{root}/pid' --log-error='{root}/error.log' \
         --innodb-buffer-pool-size=64M --innodb-flush-log-at-trx-commit=0 --skip-log-bin \
         --max-connections=300 --skip-name-resolve </dev/null >/dev/null 2>&1 & pid=$!; \
         read _; kill -9 $pid 2>/dev/null; wait $pid; rm -rf '{root}'",
        bin = mariadbd.display(),
        data = data.display(),
        socket = socket.display(),
        root = root.display(),
    );
    let watchdog = Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start mariadbd");
    let client = find("mariadb").expect("mariadb client");
    let admin = |sql: &str| {
        Command::new(&client)
            .args(["--no-defaults", "-u", "root", "-S"])
            .arg(&socket)
            .args(["-e", sql])
            .output()
    };
    wait_for(
        "MariaDB to accept connections",
        Duration::from_secs(60),
        || {
            admin("SELECT 1")
                .map(|o| o.status.success())
                .unwrap_or(false)
        },
    );
    let create = format!(
        "CREATE USER '{USER}'@'%' IDENTIFIED BY '{PASSWORD}'; \
         GRANT ALL PRIVILEGES ON *.* TO '{USER}'@'%' WITH GRANT OPTION; FLUSH PRIVILEGES;"
    );
    let out = admin(&create).expect("mariadb client");
    assert!(
        out.status.success(),
        "creating the test user failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    MariaDb {
        port,
        root,
        _watchdog: Mutex::new(watchdog),
    }
}

impl MariaDb {
    pub fn url(&self, db: &str) -> String {
        format!(
            "mysql://{USER}:{}@127.0.0.1:{}/{db}",
            super::postgres::urlencode(PASSWORD),
            self.port
        )
    }

    pub fn fresh_db(&self) -> String {
        let name = unique("t");
        super::exec(&self.url("mysql"), &format!("CREATE DATABASE {name}"));
        self.url(&name)
    }
}
