#!/usr/bin/env python3
"""What schema fingerprints cost: a fresh `migrate upgrade` of N migrations on PostgreSQL
with `--schema-fingerprints on` (the default) vs `off`, medians of 6 interleaved runs, each
on a new database. Runs of up to 20 steps read the catalogs after every step; longer runs
once, after the last (see README, Live-schema drift).

Usage: bench/fingerprints.py [--binary PATH] (default: target/release/schemagate, built
by `cargo build --release`)
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine  # noqa: E402  (the PostgreSQL server of bench/engine.py)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=str(engine.ROOT / "target" / "release" / "schemagate"))
    ap.add_argument("--runs", type=int, default=6)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="schemagate-fp-") as tmp:
        tmp = Path(tmp)
        os.chmod(tmp, 0o755)
        (tmp / "pg").mkdir()
        server = engine.Server(tmp / "pg")
        try:
            for n in (10, 200):
                mig = tmp / f"m{n}"
                mig.mkdir()
                for i in range(1, n + 1):
                    (mig / f"{i}_t{i}.up.sql").write_text(
                        f"CREATE TABLE t{i} (id BIGSERIAL PRIMARY KEY, name TEXT NOT NULL DEFAULT '', v INT);\n"
                        f"CREATE INDEX t{i}_name ON t{i} (name);\n")
                times = {"on": [], "off": []}
                for r in range(args.runs):
                    for mode in ("on", "off"):
                        db = f"d{n}_{mode}_{r}"
                        server.psql("postgres", "-c", f"CREATE DATABASE {db}")
                        env = dict(os.environ, DATABASE_URL=server.url(db), SCHEMAGATE_DIR=str(mig),
                                   SCHEMAGATE_SCHEMA_FINGERPRINTS=mode, SCHEMAGATE_LOG="warn")
                        t = time.perf_counter()
                        subprocess.run([args.binary, "migrate", "upgrade"], env=env, check=True,
                                       stdout=subprocess.DEVNULL)
                        times[mode].append(time.perf_counter() - t)
                on, off = statistics.median(times["on"]), statistics.median(times["off"])
                print(f"fresh upgrade of {n:>3} migrations: fingerprints on {on * 1000:6.0f} ms, "
                      f"off {off * 1000:6.0f} ms, ratio {on / off:.2f}x")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
