#!/usr/bin/env python3
"""Fleet benchmark: one upgrade over many tenant databases vs a loop of single upgrades.

Starts its own PostgreSQL (the default 100 connections), creates N databases
(default 1000), writes 10 migrations, then prints:

  (a) wall time of `migrate upgrade --databases DIR --max-parallel P` (one process, canary
      first) vs a sequential loop of `migrate upgrade` runs, one process per database, on
      a second, identical set of databases: the ratio is the figure to read;
  (b) the most connections the fan-out held at once (sampled from pg_stat_activity every
      20 ms while it ran), against P;
  (c) the fan-out's peak RSS (GNU time), and its no-op re-run (every database up to date);
  (d) the controller side, from the pure decision over simulated fleets of 1,000 and 10,000
      databases: the status object's size and the time to decide (`cargo test` prints
      them: `fleet_status_size` below runs it).

Machines are noisy: compare the ratios, not the absolute times.

Usage: bench/fanout.py [--databases 1000] [--parallel 8] [--migrations 10] [--no-build]
                       [--binary PATH]
"""

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine  # noqa: E402  (the PostgreSQL server and helpers of bench/engine.py)


def migrations(d, n):
    d.mkdir()
    for i in range(1, n + 1):
        sql = (f"CREATE TABLE t{i} (id BIGSERIAL PRIMARY KEY, name TEXT NOT NULL, "
               f"created TIMESTAMPTZ NOT NULL DEFAULT now());\n"
               f"CREATE INDEX t{i}_name ON t{i} (name);\n")
        (d / f"{i}_t{i}.up.sql").write_text(sql)


def create_dbs(server, prefix, n):
    # One psql session creates them all (CREATE DATABASE cannot run in a transaction).
    script = "".join(f"CREATE DATABASE {prefix}{i:05d};\n" for i in range(n))
    subprocess.run([engine.pg_bin("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", "postgres"],
                   input=script, text=True, env=server.env(), check=True,
                   stdout=subprocess.DEVNULL)
    return [f"{prefix}{i:05d}" for i in range(n)]


def sample_connections(server, stop, peak):
    while not stop.is_set():
        out = subprocess.run(
            [engine.pg_bin("psql"), "-X", "-At", "-d", "postgres", "-c",
             "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'schemagate%'"],
            env=server.env(), capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip().isdigit():
            peak[0] = max(peak[0], int(out.stdout.strip()))
        stop.wait(0.02)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--databases", type=int, default=1000)
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--migrations", type=int, default=10)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--binary")
    args = ap.parse_args()
    root = engine.ROOT
    if args.binary:
        binary = str(Path(args.binary).resolve())
    else:
        if not args.no_build:
            subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "schemagate"],
                           cwd=root, check=True)
        binary = str(Path(os.environ.get("CARGO_TARGET_DIR", root / "target")) / "release" / "schemagate")

    with tempfile.TemporaryDirectory(prefix="schemagate-fanout-") as tmp:
        tmp = Path(tmp)
        os.chmod(tmp, 0o755)
        (tmp / "pg").mkdir()
        server = engine.Server(tmp / "pg")
        mig = tmp / "migrations"
        migrations(mig, args.migrations)
        print(f"creating 2 x {args.databases} databases ...", flush=True)
        fan = create_dbs(server, "fan", args.databases)
        seq = create_dbs(server, "seq", args.databases)
        listing = tmp / "tenants"
        listing.mkdir()
        for name in fan:
            (listing / name).write_text(server.url(name))
        env = dict(os.environ, SCHEMAGATE_DIR=str(mig), SCHEMAGATE_LOG="warn")
        env.pop("DATABASE_URL", None)

        stop, peak = threading.Event(), [0]
        sampler = threading.Thread(target=sample_connections, args=(server, stop, peak))
        sampler.start()
        t0 = time.perf_counter()
        out = tmp / "rss"
        r = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(out), binary, "migrate",
                            "--output", "json", "upgrade", "--databases", str(listing),
                            "--max-parallel", str(args.parallel)],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        fan_s = time.perf_counter() - t0
        stop.set()
        sampler.join()
        if r.returncode != 0:
            sys.exit(f"the fan-out failed with exit {r.returncode}")
        rss_mib = int(out.read_text().strip().splitlines()[-1]) / 1024

        t0 = time.perf_counter()
        for name in seq:
            subprocess.run([binary, "migrate", "upgrade"], env=dict(env, DATABASE_URL=server.url(name)),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        seq_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        subprocess.run([binary, "migrate", "upgrade", "--databases", str(listing),
                        "--max-parallel", str(args.parallel)],
                       env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        noop_s = time.perf_counter() - t0
        server.stop()

    n = args.databases
    print(f"\n{n} databases x {args.migrations} migrations, PostgreSQL, max-parallel {args.parallel}")
    print(f"  (a) fan-out          {fan_s:8.2f} s   ({fan_s / n * 1000:6.1f} ms per database)")
    print(f"      sequential loop  {seq_s:8.2f} s   ({seq_s / n * 1000:6.1f} ms per database)")
    print(f"      ratio            {fan_s / seq_s:8.2f}x  (fan-out / loop)")
    print(f"  (b) connections held at once: {peak[0]} (max-parallel {args.parallel})")
    print(f"  (c) fan-out peak RSS {rss_mib:.1f} MiB; no-op re-run {noop_s:.2f} s")
    print("  (d) controller: cargo test --release --lib fleet_status_size -- --ignored --nocapture")


if __name__ == "__main__":
    main()
