#!/usr/bin/env python3
"""Engine benchmark: schemagate vs psql doing the same work, in the same run.

Starts its own PostgreSQL (default durability: fsync on), builds the release binary and
prints medians and ratios:

  (a) fresh upgrade of N generated migrations (CREATE TABLE, CREATE INDEX, INSERT of R rows
      each) as one process, vs `psql` applying the same files, one transaction per
      migration, in one session;
  (b) the no-op `migrate upgrade` on the fully migrated database vs `psql -c 'select 1'`
      and vs `sqlx migrate run` (sqlx-cli, if on PATH) on a database that sqlx migrated
      with the same N files in its own format and table: wall time and user+sys CPU time;
  (d) the same as the injected init container runs it (target version, JSON output and
      logs, summary written to the termination log) vs `psql -c 'select 1'`;
  (c) peak RSS of (b), next to psql's and sqlx's (each executable dropped from the page
      cache and run once first, so all are cached alike);
  the same (a) and (b) on MariaDB against the `mariadb` client (if installed), and the lease
  lock's extra cost per run on PostgreSQL against the session (advisory) lock.

Both sides connect the same way (TCP to 127.0.0.1, SCRAM password, sslmode=disable).
Machines are noisy: compare the ratios, not the absolute times.

The no-op runs are interleaved (the order rotates every round) and reported as medians.
`--before OLD_BINARY` adds an older schemagate build to (b), (c) and (d), timed in the same
rounds, for before/after comparisons from one run. `--noop-only` skips the timed fresh
upgrades, the lease comparison and MariaDB.

Usage: bench/engine.py [--migrations 200] [--rows 100] [--runs 5] [--noop-runs 40]
                       [--insert-style multi|single] [--only postgres|mariadb] [--no-build]
                       [--binary PATH] [--before PATH] [--noop-only] [--rss-runs 10]
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


def generate(dir_, n, rows, style, mysql=False):
    dir_.mkdir()
    for i in range(1, n + 1):
        created = "TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3)" if mysql else "TIMESTAMPTZ NOT NULL DEFAULT now()"
        lines = [
            f"CREATE TABLE t_{i} (id INTEGER PRIMARY KEY, name VARCHAR(100) NOT NULL, created {created});",
            f"CREATE INDEX t_{i}_name ON t_{i} (name);",
        ]
        if style == "multi":
            values = ", ".join(f"({r}, 'name {r}')" for r in range(1, rows + 1))
            lines.append(f"INSERT INTO t_{i} (id, name) VALUES {values};")
        else:
            lines += [f"INSERT INTO t_{i} (id, name) VALUES ({r}, 'name {r}');" for r in range(1, rows + 1)]
        (dir_ / f"{i:04d}_table_{i}.up.sql").write_text("\n".join(lines) + "\n")
        (dir_ / f"{i:04d}_table_{i}.down.sql").write_text(f"DROP TABLE t_{i};\n")


def sqlx_copy(src, dst):
    """The up scripts of `src` as sqlx simple migrations (`<version>_<name>.sql`)."""
    dst.mkdir()
    for path in sorted(src.glob("*.up.sql")):
        (dst / path.name.replace(".up.sql", ".sql")).write_text(path.read_text())


def timed(cmd, env):
    """Runs cmd; returns its wall time in seconds."""
    start = time.perf_counter()
    p = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - start
    if p.returncode != 0:
        sys.exit(f"{cmd[0]} failed ({p.returncode}): {p.stderr.decode(errors='replace')}")
    return elapsed


def timed_cpu(cmd, env):
    """Runs cmd; returns (wall seconds, user+sys CPU seconds) of that one child."""
    start = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    elapsed = time.perf_counter() - start
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        sys.exit(f"{cmd[0]} failed ({p.returncode}): {err.decode(errors='replace')}")
    return elapsed, usage.ru_utime + usage.ru_stime


def interleaved(runs, commands):
    """Runs every command once per round, rotating which goes first; returns per command
    the lists of wall and CPU times."""
    out = {name: ([], []) for name in commands}
    names = list(commands)
    for r in range(runs):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            cmd, env = commands[name]
            wall, cpu = timed_cpu(cmd, env)
            out[name][0].append(wall)
            out[name][1].append(cpu)
    return out


def uncache(cmd, env):
    """Drops the executable of cmd from the page cache and runs cmd once, so that it is
    cached the way exec caches it. Resident text depends on how the file's pages were
    cached (a freshly copied or linked binary sits in larger page-cache folios than one
    read by exec, and a fault maps a whole folio), which would skew peak RSS between
    programs installed in different ways."""
    exe = shutil.which(cmd[0]) or cmd[0]
    fd = os.open(exe, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)


def peak_rss_kib(cmd, env):
    """Peak RSS of cmd, measured by GNU time (a small parent, so the child's high-water
    mark is its own, not inherited from this Python process)."""
    with tempfile.NamedTemporaryFile("r") as out:
        subprocess.run(["/usr/bin/time", "-f", "%M", "-o", out.name, *cmd], env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        return int(out.read().strip().splitlines()[-1])


class MariaDb:
    """A throwaway MariaDB with its default durability (innodb_flush_log_at_trx_commit=1)."""

    def __init__(self, root):
        self.root = root
        data = root / "data"
        data.mkdir(parents=True)
        os.chmod(root, 0o755)
        if os.geteuid() == 0:
            subprocess.run(["chown", "-R", "mysql:mysql", str(root)], check=True)
        def as_mysql(cmd):
            if os.geteuid() == 0:
                return ["setpriv", "--reuid=mysql", "--regid=mysql", "--init-groups"] + cmd
            return cmd
        subprocess.run(as_mysql(["mariadb-install-db", "--no-defaults", "--auth-root-authentication-method=normal",
                                 "--skip-test-db", f"--datadir={data}"]), check=True, stdout=subprocess.DEVNULL)
        self.port = free_port()
        self.socket = root / "sock"
        self.log = open(root / "server.log", "w")
        self.proc = subprocess.Popen(
            as_mysql(["/usr/sbin/mariadbd", "--no-defaults", f"--datadir={data}", f"--socket={self.socket}",
                      f"--port={self.port}", "--bind-address=127.0.0.1", f"--pid-file={root}/pid",
                      "--skip-name-resolve", "--skip-log-bin"]),
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while self.admin("SELECT 1").returncode != 0:
            if time.time() > deadline:
                sys.exit("MariaDB did not start; see " + str(root / "server.log"))
            time.sleep(0.1)
        self.admin(f"CREATE USER 'sg'@'%' IDENTIFIED BY '{PASSWORD}'; GRANT ALL ON *.* TO 'sg'@'%';")

    def admin(self, sql):
        return subprocess.run(["mariadb", "--no-defaults", "-u", "root", "-S", str(self.socket), "-e", sql],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def url(self, db):
        return f"mysql://sg:{PASSWORD}@127.0.0.1:{self.port}/{db}"

    def client(self, db):
        return ["mariadb", "--no-defaults", "-h", "127.0.0.1", "-P", str(self.port), "-u", "sg",
                f"-p{PASSWORD}", db]

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


def bench_postgres(args, binary, tmp):
    (tmp / "pg").mkdir()
    server = Server(tmp / "pg")
    try:
        mig = tmp / "pg-migrations"
        generate(mig, args.migrations, args.rows, args.insert_style)
        driver = tmp / "driver.sql"
        with open(driver, "w") as f:
            for path in sorted(mig.glob("*.up.sql")):
                f.write(f"BEGIN;\n\\i {path}\nCOMMIT;\n")
        env = server.env()
        sg_env = dict(env, SCHEMAGATE_LOG="warn")

        psql_a, sg_a = [], []
        for run in range(0 if args.noop_only else args.runs):
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
        if args.noop_only:
            migrated = "sg_noop"
            server.psql("postgres", "-c", f"CREATE DATABASE {migrated}")
            timed([binary, "migrate", "--database-url", server.url(migrated), "--dir", str(mig), "upgrade"], sg_env)
        psql_cmd = [pg_bin("psql"), "-X", "-q", "-d", migrated, "-c", "select 1"]
        sg_cmd = [binary, "migrate", "--database-url", server.url(migrated), "--dir", str(mig), "upgrade"]
        noop = {"psql": (psql_cmd, env), "schemagate": (sg_cmd, sg_env)}
        if args.before:
            noop["before"] = ([args.before] + sg_cmd[1:], sg_env)
        sqlx = shutil.which("sqlx")
        if sqlx:
            # sqlx's own files and table, migrated by sqlx itself.
            sqlx_mig = tmp / "pg-migrations-sqlx"
            sqlx_copy(mig, sqlx_mig)
            server.psql("postgres", "-c", "CREATE DATABASE sqlx_noop")
            sqlx_cmd = [sqlx, "migrate", "run", "--database-url", server.url("sqlx_noop"),
                        "--source", str(sqlx_mig)]
            timed(sqlx_cmd, env)
            noop["sqlx"] = (sqlx_cmd, env)
        b = interleaved(args.noop_runs, noop)
        # (d) the injected init container on a current schema: the same command the webhook
        # injects, with its environment (JSON logs, summary to the termination log).
        last = sorted(p.name.split("_")[0] for p in mig.glob("*.up.sql"))
        init_env = dict(sg_env, DATABASE_URL=server.url(migrated), SCHEMAGATE_DIR=str(mig),
                        SCHEMAGATE_SUMMARY_FILE=str(tmp / "termination-log"),
                        SCHEMAGATE_LOG_FORMAT="json", SCHEMAGATE_LOG="info", POD_NAME="web-7f9c6d-x")
        init_cmd = [binary, "migrate", "upgrade", max(last, key=int), "--output", "json"]
        init = {"psql": (psql_cmd, env), "schemagate": (init_cmd, init_env)}
        if args.before:
            init["before"] = ([args.before] + init_cmd[1:], init_env)
        d = interleaved(args.noop_runs, init)
        rss = {name: [] for name in noop}
        have_time = Path("/usr/bin/time").exists()
        for name in noop if have_time else ():
            uncache(*noop[name])
        for r in range(args.rss_runs if have_time else 0):
            names = list(noop)
            k = r % len(names)
            for name in names[k:] + names[:k]:
                rss[name].append(peak_rss_kib(*noop[name]))
        if args.noop_only:
            print(f"PostgreSQL: no-op on {args.migrations} applied migrations (table, index, "
                  f"{args.rows} rows each), over TCP with SCRAM")
            report_noop(args, b, d, rss, have_time, sqlx)
            return
        # The lease lock's extra cost: the same small upgrade with each lock mode.
        small = tmp / "pg-small"
        generate(small, args.lease_migrations, 10, "multi")
        session_t, lease_t = [], []
        for run in range(args.lease_runs):
            for mode in (("session", "lease") if run % 2 == 0 else ("lease", "session")):
                db = f"lock_{mode}_{run}"
                server.psql("postgres", "-c", f"CREATE DATABASE {db}")
                t = timed([binary, "migrate", "--database-url", server.url(db), "--dir", str(small),
                           "--lock", mode, "upgrade"], sg_env)
                (session_t if mode == "session" else lease_t).append(t)
    finally:
        server.stop()

    med = statistics.median
    print(f"PostgreSQL: {args.migrations} migrations x (table, index, {args.rows} rows, "
          f"{args.insert_style}-row INSERT), over TCP with SCRAM, fsync on")
    print(f"{'measure':<52}{'psql':>12}{'schemagate':>14}{'ratio':>9}")
    print(f"{'(a) fresh upgrade, median of %d [s]' % args.runs:<52}{med(psql_a):>12.3f}{med(sg_a):>14.3f}{med(sg_a) / med(psql_a):>9.3f}")
    print(f"    (a) runs psql: {', '.join(f'{t:.3f}' for t in psql_a)}  schemagate: {', '.join(f'{t:.3f}' for t in sg_a)}")
    report_noop(args, b, d, rss, have_time, sqlx)
    print(f"{'lock':<52}{'session':>12}{'lease':>14}{'ratio':>9}")
    print(f"{'upgrade of %d migrations, median of %d [ms]' % (args.lease_migrations, args.lease_runs):<52}"
          f"{med(session_t) * 1000:>12.1f}{med(lease_t) * 1000:>14.1f}{med(lease_t) / med(session_t):>9.3f}")
    print(f"    lease extra cost per run: {(med(lease_t) - med(session_t)) * 1000:.1f} ms")


def report_noop(args, b, d, rss, have_time, sqlx):
    """(b), (c) and (d): medians per program and the ratios of schemagate to each other."""
    med = statistics.median
    others = [n for n in ("psql", "sqlx", "before") if n in b]
    names = ["schemagate"] + others
    head = f"{'':<44}" + "".join(f"{n:>12}" for n in names) + "".join(f"{'sg/' + n:>12}" for n in others)
    print(head)

    def row(label, values, scale, fmt):
        line = f"{label:<44}" + "".join(f"{values[n] * scale:>12{fmt}}" for n in names)
        line += "".join(f"{values['schemagate'] / values[n]:>12.3f}" for n in others)
        print(line)

    row(f"(b) no-op, wall, median of {args.noop_runs} [ms]", {n: med(b[n][0]) for n in names}, 1000, ".2f")
    row(f"(b) no-op, user+sys CPU, median [ms]", {n: med(b[n][1]) for n in names}, 1000, ".2f")
    if have_time:
        row(f"(c) peak RSS of (b), median of {args.rss_runs} [MiB]", {n: med(rss[n]) for n in names}, 1 / 1024, ".2f")
        row(f"(c) peak RSS of (b), max of {args.rss_runs} [MiB]", {n: max(rss[n]) for n in names}, 1 / 1024, ".2f")
    else:
        print("(c) skipped: /usr/bin/time (Debian package `time`) is not installed")
    if not sqlx:
        print("    sqlx columns skipped: `sqlx` is not on PATH "
              "(cargo install sqlx-cli --no-default-features --features postgres,rustls --locked)")
    d_names = ["schemagate"] + [n for n in ("psql", "before") if n in d]
    print(f"{'':<44}" + "".join(f"{n:>12}" for n in d_names) + "".join(f"{'sg/' + n:>12}" for n in d_names[1:]))
    line = f"{'(d) init container, wall, median [ms]':<44}" + "".join(f"{med(d[n][0]) * 1000:>12.2f}" for n in d_names)
    line += "".join(f"{med(d['schemagate'][0]) / med(d[n][0]):>12.3f}" for n in d_names[1:])
    print(line)
    line = f"{'(d) init container, user+sys CPU [ms]':<44}" + "".join(f"{med(d[n][1]) * 1000:>12.2f}" for n in d_names)
    line += "".join(f"{med(d['schemagate'][1]) / med(d[n][1]):>12.3f}" for n in d_names[1:])
    print(line)


def bench_mariadb(args, binary, tmp):
    if shutil.which("mariadbd") is None and not Path("/usr/sbin/mariadbd").exists():
        print("MariaDB: skipped (apt-get install mariadb-server mariadb-client)")
        return
    server = MariaDb(tmp / "mariadb")
    try:
        mig = tmp / "my-migrations"
        generate(mig, args.migrations, args.rows, args.insert_style, mysql=True)
        driver = tmp / "driver-mysql.sql"
        with open(driver, "w") as f:
            for path in sorted(mig.glob("*.up.sql")):
                f.write(f"START TRANSACTION;\nsource {path}\nCOMMIT;\n")
        env = dict(os.environ, SCHEMAGATE_LOG="warn")
        client_a, sg_a = [], []
        for run in range(args.runs):
            for who in (("client", "sg") if run % 2 == 0 else ("sg", "client")):
                db = f"{who}_{run}"
                server.admin(f"CREATE DATABASE {db}")
                if who == "client":
                    start = time.perf_counter()
                    with open(driver) as stdin:
                        p = subprocess.run(server.client(db), stdin=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                    if p.returncode != 0:
                        sys.exit(f"mariadb client failed: {p.stderr.decode(errors='replace')}")
                    client_a.append(time.perf_counter() - start)
                else:
                    sg_a.append(timed([binary, "migrate", "--database-url", server.url(db), "--dir", str(mig), "upgrade"], env))
        migrated = f"sg_{args.runs - 1}"
        client_b, sg_b = [], []
        for _ in range(args.noop_runs):
            client_b.append(timed(server.client(migrated) + ["-e", "select 1"], env))
            sg_b.append(timed([binary, "migrate", "--database-url", server.url(migrated), "--dir", str(mig), "upgrade"], env))
    finally:
        server.stop()
    med = statistics.median
    print(f"MariaDB: {args.migrations} migrations x (table, index, {args.rows} rows), over TCP, "
          f"innodb_flush_log_at_trx_commit=1")
    print(f"{'measure':<52}{'mariadb':>12}{'schemagate':>14}{'ratio':>9}")
    print(f"{'(a) fresh upgrade, median of %d [s]' % args.runs:<52}{med(client_a):>12.3f}{med(sg_a):>14.3f}{med(sg_a) / med(client_a):>9.3f}")
    print(f"{'(b) no-op upgrade vs select 1, median of %d [ms]' % args.noop_runs:<52}{med(client_b) * 1000:>12.2f}{med(sg_b) * 1000:>14.2f}{med(sg_b) / med(client_b):>9.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--migrations", type=int, default=200)
    ap.add_argument("--rows", type=int, default=100)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--noop-runs", type=int, default=40)
    ap.add_argument("--lease-migrations", type=int, default=10)
    ap.add_argument("--lease-runs", type=int, default=10)
    ap.add_argument("--insert-style", choices=["multi", "single"], default="multi")
    ap.add_argument("--only", choices=["postgres", "mariadb"], default=None)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--binary", help="the schemagate binary to measure [default: the release build]")
    ap.add_argument("--before", help="an older schemagate binary to compare in (b), (c) and (d)")
    ap.add_argument("--noop-only", action="store_true",
                    help="only (b), (c) and (d) on PostgreSQL")
    ap.add_argument("--rss-runs", type=int, default=10)
    args = ap.parse_args()

    if args.binary:
        binary = str(Path(args.binary).resolve())
    else:
        if not args.no_build:
            subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "schemagate"], cwd=ROOT, check=True)
        target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
        binary = str(target / "release" / "schemagate")
    if args.before:
        args.before = str(Path(args.before).resolve())
    if args.noop_only:
        args.only = "postgres"

    with tempfile.TemporaryDirectory(prefix="schemagate-bench-") as tmp:
        tmp = Path(tmp)
        os.chmod(tmp, 0o755)  # the database users must reach their data directories
        if args.only in (None, "postgres"):
            bench_postgres(args, binary, tmp)
        if args.only in (None, "mariadb"):
            bench_mariadb(args, binary, tmp)


if __name__ == "__main__":
    main()
