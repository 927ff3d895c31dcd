//! PgBouncer (Debian's package, installed here if missing and we are root) in transaction
//! pooling mode in front of the harness's PostgreSQL, one instance per test so each can
//! choose its pool size. Runs as the unprivileged `postgres` user; stopped on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::postgres::{PASSWORD, server, urlencode};
use super::{unique, wait_for};

pub struct PgBouncer {
    pub port: u16,
    dir: PathBuf,
    child: Child,
}

fn binary() -> PathBuf {
    let path = Path::new("/usr/sbin/pgbouncer");
    if !path.exists() {
        let root = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        assert!(
            root,
            "PgBouncer is not installed: run `apt-get install pgbouncer`"
        );
        let st = Command::new("sh")
            .arg("-c")
            .arg(
                "DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
                 DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends pgbouncer",
            )
            .status()
            .expect("apt-get");
        assert!(st.success(), "installing pgbouncer failed");
    }
    path.to_path_buf()
}

impl PgBouncer {
    /// Starts PgBouncer in transaction mode with `pool_size` server connections per
    /// database.
    pub fn start(pool_size: u32) -> PgBouncer {
        let bin = binary();
        let pg = server();
        let dir = std::env::temp_dir().join(unique("schemagate-pgbouncer"));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let ini = format!(
            "[databases]\n* = host=127.0.0.1 port={pg_port}\n\n[pgbouncer]\n\
             listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
             auth_type = scram-sha-256\nauth_file = {dir}/userlist.txt\n\
             pool_mode = transaction\ndefault_pool_size = {pool_size}\nmin_pool_size = 0\n\
             reserve_pool_size = 0\nmax_client_conn = 500\n\
             ignore_startup_parameters = extra_float_digits,options\n\
             logfile = {dir}/pgbouncer.log\npidfile = {dir}/pgbouncer.pid\n",
            pg_port = pg.port,
            dir = dir.display(),
        );
        std::fs::write(dir.join("pgbouncer.ini"), ini).expect("ini");
        std::fs::write(
            dir.join("userlist.txt"),
            format!("\"postgres\" \"{PASSWORD}\"\n"),
        )
        .expect("userlist");
        let _ = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir)
            .status();
        let mut cmd = if Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false)
        {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=postgres", "--regid=postgres", "--init-groups"])
                .arg(&bin);
            c
        } else {
            Command::new(&bin)
        };
        let child = cmd
            .arg(dir.join("pgbouncer.ini"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start pgbouncer");
        let b = PgBouncer { port, dir, child };
        wait_for("PgBouncer to listen", Duration::from_secs(30), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        b
    }

    /// A URL for `db` through PgBouncer.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://postgres:{}@127.0.0.1:{}/{db}?sslmode=disable",
            urlencode(PASSWORD),
            self.port
        )
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
