#!/usr/bin/env python3
"""Engine benchmark: schemagate vs psql doing the same work, in the same run.

Starts its own PostgreSQL (default durability: fsync on), builds the release binary and
prints medians and ratios:

  (a) fresh upgrade of N generated migrations (CREATE TABLE, CREATE INDEX, INSERT of R rows
      each) as one process, vs `psql` applying the same files, one transaction per
      migration, in one session;
  (b) the no-op `migrate upgrade` on the fully migrated database vs `psql -c 'select 1'`;
  (c) peak RSS of (b), next to psql's.

Both sides connect the same way (TCP to 127.0.0.1, SCRAM password, sslmode=disable).
Machines are noisy: compare the ratios, not the absolute times.

Usage: bench/engine.py [--migrations 200] [--rows 100] [--runs 5] [--noop-runs 40]
                       [--insert-style multi|single] [--no-build]
"""

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "bench-pw"


def pg_bin(name):
    # Prefer the real binaries: Debian's /usr/bin/psql is a Perl wrapper (pg_wrapper) that
    # adds ~40 ms to every start, which would flatter any comparison against psql.
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (d / name).exists():
            return str(d / name)
    found = shutil.which(name)
    if found:
        return found
    sys.exit(f"{name} not found: install PostgreSQL's server binaries")


def as_pg(cmd):
    if os.geteuid() == 0:
        return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups"] + cmd
    return cmd


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, root):
        self.root = root
        self.data = root / "data"
        pw = root / "pw"
        pw.write_text(PASSWORD)
        os.chmod(root, 0o755)
        if os.geteuid() == 0:
            subprocess.run(["chown", "-R", "postgres:postgres", str(root)], check=True)
        subprocess.run(
            as_pg([pg_bin("initdb"), "-D", str(self.data), "-U", "postgres",
                   "--auth=scram-sha-256", f"--pwfile={pw}", "-E", "UTF8", "--no-instructions"]),
            check=True, stdout=subprocess.DEVNULL)
        self.port = free_port()
        self.log = open(root / "server.log", "w")
        self.proc = subprocess.Popen(
            as_pg([pg_bin("postgres"), "-D", str(self.data), "-p", str(self.port),
                   "-k", str(root), "-c", "listen_addresses=127.0.0.1"]),
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while subprocess.run([pg_bin("pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-q"]).returncode != 0:
            if time.time() > deadline:
                sys.exit("PostgreSQL did not start; see " + str(root / "server.log"))
            time.sleep(0.05)

    def env(self):
        e = dict(os.environ)
        # GSS encryption off: libpq would otherwise probe Kerberos on every connect, a cost
        # that is not psql's work and would flatter schemagate.
        e.update(PGHOST="127.0.0.1", PGPORT=str(self.port), PGUSER="postgres",
                 PGPASSWORD=PASSWORD, PGSSLMODE="disable", PGGSSENCMODE="disable")
        return e

    def url(self, db):
        return f"postgres://postgres:{PASSWORD}@127.0.0.1:{self.port}/{db}?sslmode=disable"

    def psql(self, db, *args):
        subprocess.run([pg_bin("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", db, *args],
                       env=self.env(), check=True, stdout=subprocess.DEVNULL)

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


def generate(dir_, n, rows, style):
    dir_.mkdir()
    for i in range(1, n + 1):
        lines = [
            f"CREATE TABLE t_{i} (id INTEGER PRIMARY KEY, name TEXT NOT NULL, created TIMESTAMPTZ NOT NULL DEFAULT now());",
            f"CREATE INDEX t_{i}_name ON t_{i} (name);",
        ]
        if style == "multi":
            values = ", ".join(f"({r}, 'name {r}')" for r in range(1, rows + 1))
            lines.append(f"INSERT INTO t_{i} (id, name) VALUES {values};")
        else:
            lines += [f"INSERT INTO t_{i} (id, name) VALUES ({r}, 'name {r}');" for r in range(1, rows + 1)]
        (dir_ / f"{i:04d}_table_{i}.up.sql").write_text("\n".join(lines) + "\n")
        (dir_ / f"{i:04d}_table_{i}.down.sql").write_text(f"DROP TABLE t_{i};\n")


def timed(cmd, env):
    """Runs cmd; returns its wall time in seconds."""
    start = time.perf_counter()
    p = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - start
    if p.returncode != 0:
        sys.exit(f"{cmd[0]} failed ({p.returncode}): {p.stderr.decode(errors='replace')}")
    return elapsed


def peak_rss_kib(cmd, env):
    """Peak RSS of cmd, measured by GNU time (a small parent, so the child's high-water
    mark is its own, not inherited from this Python process)."""
    with tempfile.NamedTemporaryFile("r") as out:
        subprocess.run(["/usr/bin/time", "-f", "%M", "-o", out.name, *cmd], env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        return int(out.read().strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--migrations", type=int, default=200)
    ap.add_argument("--rows", type=int, default=100)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--noop-runs", type=int, default=40)
    ap.add_argument("--insert-style", choices=["multi", "single"], default="multi")
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()

    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    binary = str(ROOT / "target" / "release" / "schemagate")

    with tempfile.TemporaryDirectory(prefix="schemagate-bench-") as tmp:
        tmp = Path(tmp)
        os.chmod(tmp, 0o755)  # the postgres user must reach its data directory
        (tmp / "pg").mkdir()
        server = Server(tmp / "pg")
        try:
            mig = tmp / "migrations"
            generate(mig, args.migrations, args.rows, args.insert_style)
            driver = tmp / "driver.sql"
            with open(driver, "w") as f:
                for path in sorted(mig.glob("*.up.sql")):
                    f.write(f"BEGIN;\n\\i {path}\nCOMMIT;\n")
            env = server.env()
            sg_env = dict(env, SCHEMAGATE_LOG="warn")

            psql_a, sg_a = [], []
            for run in range(args.runs):
                for who in (("psql", "sg") if run % 2 == 0 else ("sg", "psql")):
                    db = f"{who}_{run}"
                    server.psql("postgres", "-c", f"CREATE DATABASE {db}")
                    if who == "psql":
                        t = timed([pg_bin("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", db, "-f", str(driver)], env)
                        psql_a.append(t)
                    else:
                        t = timed([binary, "migrate", "--database-url", server.url(db), "--dir", str(mig), "upgrade"], sg_env)
                        sg_a.append(t)

            migrated = f"sg_{args.runs - 1}"
            psql_b, sg_b, psql_rss, sg_rss = [], [], [], []
            psql_cmd = [pg_bin("psql"), "-X", "-q", "-d", migrated, "-c", "select 1"]
            sg_cmd = [binary, "migrate", "--database-url", server.url(migrated), "--dir", str(mig), "upgrade"]
            for _ in range(args.noop_runs):
                psql_b.append(timed(psql_cmd, env))
                sg_b.append(timed(sg_cmd, sg_env))
            have_time = Path("/usr/bin/time").exists()
            for _ in range(5 if have_time else 0):
                psql_rss.append(peak_rss_kib(psql_cmd, env))
                sg_rss.append(peak_rss_kib(sg_cmd, sg_env))
        finally:
            server.stop()

    med = statistics.median
    print(f"schemagate engine benchmark: {args.migrations} migrations x (table, index, {args.rows} rows, "
          f"{args.insert_style}-row INSERT), PostgreSQL over TCP with SCRAM, fsync on")
    print(f"{'measure':<48}{'psql':>12}{'schemagate':>14}{'ratio':>9}")
    print(f"{'(a) fresh upgrade, median of %d [s]' % args.runs:<48}{med(psql_a):>12.3f}{med(sg_a):>14.3f}{med(sg_a) / med(psql_a):>9.3f}")
    print(f"{'(b) no-op upgrade vs select 1, median of %d [ms]' % args.noop_runs:<48}{med(psql_b) * 1000:>12.2f}{med(sg_b) * 1000:>14.2f}{med(sg_b) / med(psql_b):>9.3f}")
    if sg_rss:
        print(f"{'(c) peak RSS of (b), max of 5 [MiB]':<48}{max(psql_rss) / 1024:>12.2f}{max(sg_rss) / 1024:>14.2f}{max(sg_rss) / max(psql_rss):>9.3f}")
    else:
        print("(c) skipped: /usr/bin/time (Debian package `time`) is not installed")
    print(f"    (a) runs psql: {', '.join(f'{t:.3f}' for t in psql_a)}  schemagate: {', '.join(f'{t:.3f}' for t in sg_a)}")


if __name__ == "__main__":
    main()
