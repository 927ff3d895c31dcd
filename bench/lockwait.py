#!/usr/bin/env python3
"""Lock-safety benchmark: how long a migration stalls a busy table's queries.

The scenario of issue 13, on a throwaway PostgreSQL: table `orders` is busy (the app,
pgbench, queries it every 20 ms); a long reader holds its ACCESS SHARE lock for --hold
seconds; a migration `ALTER TABLE orders ADD COLUMN note text` starts half a second into
the reader's transaction. Without a lock timeout the ALTER queues behind the reader and
every app query queues behind the ALTER. Each runner runs once, in the same session:

  psql -1 -f             the migration as a script
  sqlx migrate run       if `sqlx` (sqlx-cli) is on PATH
  schemagate upgrade     with its defaults (2 s lock wait, retries for 5 min)

and the script prints, per runner: the app's longest query, the app's p99, how long the
migration took, its exit code, and whether the column was added exactly once.

Usage: bench/lockwait.py [--hold 8] [--no-build] [--binary PATH]
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import ROOT, Server, pg_bin  # noqa: E402

MIGRATION = "ALTER TABLE orders ADD COLUMN note text;\n"


def scenario(server, db, hold, runner_cmd, env, tmp, label):
    server.psql("postgres", "-c", f"CREATE DATABASE {db}")
    server.psql(db, "-c", "CREATE TABLE orders (id INTEGER PRIMARY KEY, total INTEGER); "
                          "INSERT INTO orders SELECT g, g FROM generate_series(1, 1000) g")
    app_sql = tmp / "app.sql"
    app_sql.write_text("SELECT count(*) FROM orders;\n")
    logdir = tmp / f"log-{db}"
    logdir.mkdir()
    duration = int(hold + 6)
    app = subprocess.Popen(
        [pg_bin("pgbench"), "-n", "-f", str(app_sql), "-c", "1", "-R", "50", "-T", str(duration),
         "-l", "--log-prefix", str(logdir / "app"), db],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # the app is running steadily before the reader starts
    reader = subprocess.Popen(
        [pg_bin("psql"), "-X", "-q", "-d", db, "-c",
         f"BEGIN; SELECT count(*) FROM orders; SELECT pg_sleep({hold}); COMMIT;"],
        env=dict(env, PGAPPNAME="report-job"), stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    start = time.perf_counter()
    run = subprocess.run(runner_cmd(db), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    took = time.perf_counter() - start
    reader.wait()
    app.wait()
    latencies = []
    for f in logdir.iterdir():
        for line in f.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3:
                latencies.append(int(parts[2]) / 1e6)
    latencies.sort()
    longest = latencies[-1] if latencies else float("nan")
    p99 = latencies[int(len(latencies) * 0.99) - 1] if latencies else float("nan")
    columns = subprocess.run(
        [pg_bin("psql"), "-X", "-At", "-d", db, "-c",
         "SELECT count(*) FROM information_schema.columns WHERE table_name = 'orders' AND column_name = 'note'"],
        env=env, capture_output=True, text=True).stdout.strip()
    print(f"{label:<34}{longest:>12.3f}{p99:>10.3f}{took:>15.2f}{run.returncode:>7}{columns:>9}")
    if run.returncode != 0:
        print("   " + run.stderr.decode(errors="replace").strip().splitlines()[-1][:200])
    return longest


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hold", type=float, default=8.0, help="seconds the reader holds its lock")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--binary", help="the schemagate binary to run (default: build and use the release one); "
                    "speed is not what is measured here, so a debug build is fine")
    args = ap.parse_args()
    binary = args.binary or str(ROOT / "target" / "release" / "schemagate")
    if not args.no_build and not args.binary:
        subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "schemagate"], cwd=ROOT, check=True)
    with tempfile.TemporaryDirectory(prefix="schemagate-lockwait-") as tmp:
        tmp = Path(tmp)
        os.chmod(tmp, 0o755)
        (tmp / "pg").mkdir()
        server = Server(tmp / "pg")
        env = server.env()
        try:
            mig = tmp / "migrations"
            mig.mkdir()
            (mig / "1_add_note.up.sql").write_text(MIGRATION)
            sqlx_dir = tmp / "sqlx"
            sqlx_dir.mkdir()
            (sqlx_dir / "1_add_note.sql").write_text(MIGRATION)
            (tmp / "m.sql").write_text(MIGRATION)
            print(f"reader holds its lock {args.hold:.1f} s; the app queries every 20 ms\n")
            print(f"{'runner':<34}{'longest [s]':>12}{'p99 [s]':>10}{'migration [s]':>15}{'exit':>7}{'applied':>9}")
            base = scenario(server, "run_psql", args.hold,
                            lambda db: [pg_bin("psql"), "-X", "-q", "-1", "-v", "ON_ERROR_STOP=1", "-d", db, "-f", str(tmp / "m.sql")],
                            env, tmp, "psql -1 -f")
            if shutil.which("sqlx"):
                scenario(server, "run_sqlx", args.hold,
                         lambda db: ["sqlx", "migrate", "run", "--source", str(sqlx_dir), "--database-url", server.url(db)],
                         env, tmp, "sqlx migrate run")
            else:
                print(f"{'sqlx migrate run':<34}   (sqlx-cli not on PATH: skipped)")
            ours = scenario(server, "run_schemagate", args.hold,
                            lambda db: [binary, "migrate", "--database-url", server.url(db), "--dir", str(mig), "upgrade"],
                            env, tmp, "schemagate upgrade (defaults)")
            print(f"\napp stall: schemagate {ours:.2f} s vs psql {base:.2f} s ({ours / base:.2f}x); "
                  "goal: under 2.5 s")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
