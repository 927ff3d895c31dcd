#!/usr/bin/env python3
"""What schemagate adds around another tool's migration command.

Runs the Flask-Migrate fixture app (tests/fixtures/flask_app) against a throwaway
PostgreSQL: `flask db upgrade` on an up-to-date database alone, and the same command under
`schemagate migrate --tool alembic exec` (connect, lock, read alembic_version before and
after, unlock), alternating so machine noise hits both alike. Prints medians, their ratio
and the absolute difference. The Python virtualenv is target/flaskenv (made by the tests,
or here if missing).

Usage: bench/tools.py [--runs 15] [--no-build]
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
from engine import ROOT, Server  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "flask_app"


def venv():
    env = ROOT / "target" / "flaskenv"
    if not (env / "bin" / "flask").exists():
        subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
        subprocess.run([str(env / "bin" / "pip"), "install", "-q", "--only-binary", ":all:",
                        "-r", str(FIXTURE / "requirements.txt")], check=True)
    return env / "bin"


def timed(cmd, env):
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    binary = str(ROOT / "target" / "release" / "schemagate")
    bin_dir = venv()
    with tempfile.TemporaryDirectory(prefix="schemagate-bench-") as tmp:
        tmp = Path(tmp)
        os.chmod(tmp, 0o755)
        (tmp / "pg").mkdir()
        server = Server(tmp / "pg")
        try:
            server.psql("postgres", "-c", "CREATE DATABASE app")
            env = dict(os.environ, DATABASE_URL=server.url("app"), FLASK_APP=str(FIXTURE / "app.py"),
                       PYTHONDONTWRITEBYTECODE="1", SCHEMAGATE_LOG="warn",
                       PATH=f"{bin_dir}:{os.environ.get('PATH', '')}")
            flask = [str(bin_dir / "flask"), "db", "upgrade"]
            subprocess.run(flask, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wrapped = [binary, "migrate", "--tool", "alembic", "exec", "--"] + flask
            alone, through = [], []
            for i in range(args.runs):
                for which in (("alone", "through") if i % 2 == 0 else ("through", "alone")):
                    if which == "alone":
                        alone.append(timed(flask, env))
                    else:
                        through.append(timed(wrapped, env))
        finally:
            server.stop()
    med = statistics.median
    print(f"flask db upgrade on an up-to-date PostgreSQL database, median of {args.runs}")
    print(f"{'':<34}{'alone [ms]':>12}{'under exec [ms]':>17}{'ratio':>8}")
    print(f"{'wall time':<34}{med(alone) * 1000:>12.1f}{med(through) * 1000:>17.1f}{med(through) / med(alone):>8.3f}")
    print(f"schemagate's part (lock + 2 version reads + start): {(med(through) - med(alone)) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
