#!/usr/bin/env python3
"""Controller benchmark: time, memory and API traffic with many SchemaMigrations.

There is no cluster here, so this script is the API server: a small in-memory fake that
speaks enough of the Kubernetes API for the real `schemagate controller` binary (list and
watch with resourceVersions and watch events, metadata-only lists, get, server-side apply
of status, Events). It creates N SchemaMigrations (init-container mode, each with its own
Secret and ConfigMap holding the same two migrations), spread over D databases already at
the newest migration (SQLite files, or databases of one throwaway PostgreSQL server with
SCRAM passwords, as a cluster's would be), starts the controller against it with a
kubeconfig, and reports:

  - how long until every resource is Ready, and the mean reconcile time (from /metrics);
  - the controller's peak RSS (VmHWM), its RSS when all are Ready and after a quiet period;
  - requests per resource during a quiet period (--quiet seconds, by default one resync
    period and a bit), reads and writes separately, and every write by method and path
    (the goal: zero writes when nothing changed); database sessions opened meanwhile
    (PostgreSQL only, from pg_stat_database).

Usage: bench/controller.py [--resources 1000] [--databases 1] [--engine sqlite|postgres]
                           [--resync 60] [--quiet SECONDS] [--concurrency N]
                           [--binary PATH] [--no-build] [--drop-every N]
"""

import argparse
import base64
import bisect
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import Server, pg_bin  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


class Store:
    def __init__(self):
        self.lock = threading.Condition()
        self.rv = 1
        self.objects = {}  # (plural, ns, name) -> object
        # Per kind, in resourceVersion order: a watch finds what it has not seen by bisection
        # (a scan of every event per wake-up makes the fake, not the controller, the bottleneck).
        self.events = {}  # plural -> [(rv, type, object)]
        self.requests = []  # (time, method, path)
        # Every Nth GET of one object is answered by closing the connection (0: never), as
        # an API server's idle-connection close racing a request, or a GOAWAY, looks.
        self.drop_every = 0
        self.dropped = 0

    def bump(self):
        self.rv += 1
        return str(self.rv)

    def put(self, plural, obj, kind="ADDED"):
        with self.lock:
            obj["metadata"]["resourceVersion"] = self.bump()
            key = (plural, obj["metadata"].get("namespace"), obj["metadata"]["name"])
            self.objects[key] = obj
            self.events.setdefault(plural, []).append((self.rv, kind, json.loads(json.dumps(obj))))
            self.lock.notify_all()

    def since(self, plural, rv):
        events = self.events.get(plural, [])
        return events[bisect.bisect_right(events, rv, key=lambda e: e[0]):]


STORE = Store()


def fields_v1(value):
    """A value's field set as managedFields records it (FieldsV1)."""
    if isinstance(value, dict):
        return {f"f:{k}": fields_v1(v) for k, v in value.items()}
    if isinstance(value, list):
        out = {}
        for item in value:
            if isinstance(item, dict) and "type" in item:
                out[f'k:{{"type":"{item["type"]}"}}'] = {".": {}, **fields_v1(item)}
            else:
                out[f"v:{json.dumps(item)}"] = {}
        return out
    return {}


def now_rfc3339():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def kubectl_applied(obj):
    """`obj` as the API server stores it after `kubectl apply`: a uid, a creation time, the
    last-applied annotation and the managed fields (a controller's cache drops the last
    two, but every watch event and list carries them)."""
    meta = obj["metadata"]
    applied = json.dumps(obj, separators=(",", ":"))
    meta["uid"] = str(uuid.uuid4())
    meta["creationTimestamp"] = now_rfc3339()
    meta.setdefault("annotations", {})["kubectl.kubernetes.io/last-applied-configuration"] = applied + "\n"
    body = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata", "status")}
    meta["managedFields"] = [{
        "manager": "kubectl-client-side-apply", "operation": "Update", "apiVersion": obj["apiVersion"],
        "time": now_rfc3339(), "fieldsType": "FieldsV1",
        "fieldsV1": {"f:metadata": {"f:annotations": {".": {}, "f:kubectl.kubernetes.io/last-applied-configuration": {}}},
                     **fields_v1(body)}}]
    return obj


def path_parts(path):
    """(plural, namespace, name, subresource) from an API path."""
    parts = [p for p in path.split("/") if p]
    if parts[0] == "api":
        parts = parts[2:]
    else:
        parts = parts[3:]
    ns = None
    if parts and parts[0] == "namespaces" and len(parts) >= 3:
        ns = parts[1]
        parts = parts[2:]
    plural = parts[0] if parts else ""
    name = parts[1] if len(parts) > 1 else None
    sub = parts[2] if len(parts) > 2 else None
    return plural, ns, name, sub


def path_shape(method, path):
    """A write's method and path with the namespace and name generalised, for a summary."""
    plural, ns, name, sub = path_parts(path)
    shape = f"{method} {'namespaces/*/' if ns else ''}{plural}"
    if name:
        shape += "/*"
    if sub:
        shape += "/" + sub
    return shape


def matches_selector(obj, selector):
    if not selector:
        return True
    labels = obj["metadata"].get("labels") or {}
    for term in selector.split(","):
        if "=" in term:
            k, v = term.split("=", 1)
            if labels.get(k) != v:
                return False
        elif term not in labels:
            return False
    return True


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out as separate writes: with Nagle's algorithm on, each response
    # would wait for the client's delayed ACK (40 ms), which the real API server (Go sets
    # TCP_NODELAY) never does.
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def send_json(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def metadata_only(self):
        return "as=PartialObjectMetadata" in (self.headers.get("accept") or "")

    def shape(self, obj):
        if self.metadata_only():
            return {"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": obj["metadata"]}
        return obj

    def do_GET(self):
        u = urlparse(self.path)
        q = {k: v[0] for k, v in parse_qs(u.query).items()}
        STORE.requests.append((time.time(), "GET", u.path))
        plural, ns, name, _ = path_parts(u.path)
        if name and STORE.drop_every and len(STORE.requests) % STORE.drop_every == 0:
            STORE.dropped += 1
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if name:
            obj = STORE.objects.get((plural, ns, name))
            if obj is None:
                return self.send_json(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"})
            return self.send_json(200, self.shape(obj))
        selector = q.get("labelSelector")
        if q.get("watch") in ("true", "1"):
            return self.watch(plural, ns, selector, int(q.get("resourceVersion") or 0), int(q.get("timeoutSeconds") or 290))
        # Paged like the real API server (`limit` and `continue`): clients list in pages
        # of 500, and one 10,000-object body would inflate the client's peak memory.
        # Every page carries the first page's resourceVersion, so the watch that follows
        # replays whatever changed meanwhile.
        offset, _, rv = (q.get("continue") or "0:").partition(":")
        offset = int(offset)
        limit = int(q.get("limit") or 0)
        with STORE.lock:
            items = [self.shape(o) for (p, n, _), o in STORE.objects.items()
                     if p == plural and (ns is None or n == ns) and matches_selector(o, selector)]
            rv = rv or str(STORE.rv)
        meta = {"resourceVersion": rv}
        if limit and offset + limit < len(items):
            meta["continue"] = f"{offset + limit}:{rv}"
        items = items[offset:offset + limit] if limit else items[offset:]
        kind = "PartialObjectMetadataList" if self.metadata_only() else "List"
        api = "meta.k8s.io/v1" if self.metadata_only() else "v1"
        self.send_json(200, {"apiVersion": api, "kind": kind, "metadata": meta, "items": items})

    def watch(self, plural, ns, selector, since, timeout):
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        deadline = time.time() + min(timeout, 60)
        seen = since
        try:
            while time.time() < deadline:
                with STORE.lock:
                    fresh = STORE.since(plural, seen)
                    if not fresh:
                        STORE.lock.wait(timeout=1.0)
                        continue
                seen = fresh[-1][0]
                chunk = b"".join(
                    (json.dumps({"type": kind, "object": self.shape(obj)}) + "\n").encode()
                    for _, kind, obj in fresh
                    if (ns is None or obj["metadata"].get("namespace") == ns) and matches_selector(obj, selector))
                if chunk:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def read_body(self):
        n = int(self.headers.get("content-length") or 0)
        return json.loads(self.rfile.read(n) or b"null")

    def do_PATCH(self):
        u = urlparse(self.path)
        STORE.requests.append((time.time(), "PATCH", u.path))
        body = self.read_body()
        plural, ns, name, sub = path_parts(u.path)
        obj = STORE.objects.get((plural, ns, name))
        if obj is None:
            return self.send_json(404, {"kind": "Status", "code": 404})
        obj = json.loads(json.dumps(obj))
        if sub == "status":
            obj["status"] = body.get("status")
            # Server-side apply records the status's fields under the writer's manager.
            manager = parse_qs(u.query).get("fieldManager", ["unknown"])[0]
            managed = [m for m in obj["metadata"].get("managedFields", [])
                       if not (m["manager"] == manager and m.get("subresource") == "status")]
            managed.append({"manager": manager, "operation": "Apply", "apiVersion": obj["apiVersion"],
                            "time": now_rfc3339(), "fieldsType": "FieldsV1",
                            "fieldsV1": {"f:status": fields_v1(body.get("status"))}, "subresource": "status"})
            obj["metadata"]["managedFields"] = managed
        STORE.put(plural, obj, "MODIFIED")
        self.send_json(200, obj)

    def do_POST(self):
        u = urlparse(self.path)
        STORE.requests.append((time.time(), "POST", u.path))
        body = self.read_body()
        self.send_json(201, body)

    def do_PUT(self):
        u = urlparse(self.path)
        STORE.requests.append((time.time(), "PUT", u.path))
        self.send_json(200, self.read_body())


def proc_status_kib(pid, field):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid, children=False):
    """User + system CPU time of a process so far (and of its exited children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


def postmaster_pid(pg):
    """The PostgreSQL server's pid (its backends' CPU is its children's)."""
    if pg is None:
        return None
    return int((pg.data / "postmaster.pid").read_text().split()[0])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port):
    """The controller's /metrics as {name{labels}: value}."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            k, _, v = line.rpartition(" ")
            try:
                out[k] = float(v)
            except ValueError:
                pass
    return out


FILES = {
    "1_create_orders.up.sql": "CREATE TABLE orders (id INTEGER PRIMARY KEY);\n",
    "2_add_total.up.sql": "ALTER TABLE orders ADD COLUMN total INTEGER;\n",
}


def databases(args, binary, tmp):
    """(URLs of the databases, at the newest migration; the PostgreSQL server or None)."""
    mig = tmp / "migrations"
    mig.mkdir()
    for n, t in FILES.items():
        (mig / n).write_text(t)
    server = None
    urls = []
    if args.engine == "postgres":
        root = tmp / "pg"
        root.mkdir()
        server = Server(root)
        for d in range(args.databases):
            server.psql("postgres", "-c", f"CREATE DATABASE app{d}")
            urls.append(server.url(f"app{d}"))
    else:
        urls = [f"sqlite:{tmp / f'app{d}.db'}" for d in range(args.databases)]
    for url in urls:
        subprocess.run([str(binary), "migrate", "--database-url", url, "--dir", str(mig), "upgrade"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return urls, server


def pg_sessions(server, n):
    """Sessions opened so far on the benchmark's databases (PostgreSQL's statistics)."""
    if server is None:
        return None
    names = ",".join(f"'app{d}'" for d in range(n))
    out = subprocess.run([pg_bin("psql"), "-X", "-At", "-d", "postgres", "-c",
                          f"SELECT coalesce(sum(sessions), 0) FROM pg_stat_database WHERE datname IN ({names})"],
                         env=server.env(), capture_output=True, text=True)
    try:
        return int(out.stdout.strip())
    except ValueError:
        return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resources", type=int, default=1000)
    ap.add_argument("--databases", type=int, default=1, help="resources are spread over this many databases")
    ap.add_argument("--engine", choices=["sqlite", "postgres"], default="sqlite")
    ap.add_argument("--resync", type=int, default=60,
                    help="the controller's --resync, seconds; keep it above the time all take to get Ready, "
                         "or resyncs compete with the first reconciles")
    ap.add_argument("--quiet", type=int, default=None,
                    help="the quiet period measured, seconds [default: resync + 2: every resource is "
                         "reconciled once in it]")
    ap.add_argument("--concurrency", type=int, default=None, help="the controller's --concurrency [default: its own]")
    ap.add_argument("--binary", default=None, help="the controller binary [default: the release build]")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--ready-timeout", type=int, default=900)
    ap.add_argument("--drop-every", type=int, default=0,
                    help="in the quiet period, answer every Nth GET of one object by closing the connection")
    args = ap.parse_args()
    # Stopped (timeout, kill): still stop the controller and PostgreSQL and clean up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    target = Path(os.environ.get("CARGO_TARGET_DIR") or ROOT / "target")
    if args.binary:
        binary = Path(args.binary)
    else:
        if not args.no_build:
            subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "schemagate"], cwd=ROOT, check=True)
        binary = target / "release" / "schemagate"
    quiet = args.quiet if args.quiet is not None else args.resync + 2

    with tempfile.TemporaryDirectory(prefix="schemagate-ctl-bench-") as tmp:
        tmp = Path(tmp)
        os.chmod(tmp, 0o755)  # the postgres user must reach its data directory
        urls, pg = databases(args, binary, tmp)
        try:
            for i in range(args.resources):
                ns = f"team-{i % 50}"
                name = f"app-{i}"
                url_b64 = base64.b64encode(urls[i % len(urls)].encode()).decode()
                STORE.put("secrets", kubectl_applied({
                    "apiVersion": "v1", "kind": "Secret",
                    "metadata": {"name": f"{name}-db", "namespace": ns}, "data": {"url": url_b64}}))
                STORE.put("configmaps", kubectl_applied({
                    "apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": f"{name}-migrations", "namespace": ns}, "data": FILES}))
                STORE.put("schemamigrations", kubectl_applied({
                    "apiVersion": "schemagate.dev/v1alpha1", "kind": "SchemaMigration",
                    "metadata": {"name": name, "namespace": ns, "generation": 1},
                    "spec": {"database": {"urlSecretRef": {"name": f"{name}-db", "key": "url"}},
                             "source": {"configMapRef": {"name": f"{name}-migrations"}}, "mode": "InitContainer"}}))
            result = run_controller(args, binary, quiet, pg, tmp)
        finally:
            if pg is not None:
                pg.stop()
    report(args, quiet, result)


def run_controller(args, binary, quiet, pg, tmp):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    kubeconfig = tmp / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "bench",
        "clusters": [{"name": "bench", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "users": [{"name": "bench", "user": {}}],
        "contexts": [{"name": "bench", "context": {"cluster": "bench", "user": "bench", "namespace": "default"}}],
    }))
    metrics_port = free_port()
    env = dict(os.environ, KUBECONFIG=str(kubeconfig), SCHEMAGATE_LOG="warn")
    cmd = [str(binary), "controller", "--leader-election=false", "--metrics-addr", f"127.0.0.1:{metrics_port}",
           "--resync", f"{args.resync}s"]
    if args.concurrency:
        cmd += ["--concurrency", str(args.concurrency)]
    stderr = open(tmp / "controller.log", "w+")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    r = {}
    fake_cpu = sum(os.times()[:2])
    pm = postmaster_pid(pg)
    pg_cpu = cpu_seconds(pm, children=True) if pm else None
    try:
        start = time.time()
        next_progress = start + 15

        def ready_count():
            return sum(1 for (p, _, _), o in list(STORE.objects.items())
                       if p == "schemamigrations" and (o.get("status") or {}).get("phase") == "Ready")
        while ready_count() < args.resources:
            if proc.poll() is not None:
                stderr.seek(0)
                sys.exit("controller exited: " + stderr.read())
            if time.time() - start > args.ready_timeout:
                sys.exit(f"only {ready_count()} of {args.resources} became Ready")
            if time.time() >= next_progress:
                next_progress += 15
                print(f"  ... {time.time() - start:.0f}s: {ready_count()} Ready, {len(STORE.requests)} requests, "
                      f"RSS {proc_status_kib(proc.pid, 'VmRSS') / 1024:.0f} MiB", file=sys.stderr, flush=True)
            time.sleep(0.2)
        r["settled"] = time.time() - start
        r["rss_ready"] = proc_status_kib(proc.pid, "VmRSS")
        r["cpu_ready"] = cpu_seconds(proc.pid)
        r["fake_cpu_ready"] = sum(os.times()[:2]) - fake_cpu
        r["pg_cpu_ready"] = cpu_seconds(pm, children=True) - pg_cpu if pm else None
        # Let the reconciles that the status writes triggered pass, then watch a quiet period.
        time.sleep(min(5, args.resync / 2))
        r["window_start"] = time.time()
        STORE.drop_every = args.drop_every
        sessions_before = pg_sessions(pg, args.databases)
        time.sleep(quiet)
        window_end = time.time()
        STORE.drop_every = 0
        r["dropped"] = STORE.dropped
        r["cpu_quiet"] = cpu_seconds(proc.pid) - r["cpu_ready"]
        r["rss_after"] = proc_status_kib(proc.pid, "VmRSS")
        r["rss_peak"] = proc_status_kib(proc.pid, "VmHWM")
        sessions_after = pg_sessions(pg, args.databases)
        r["sessions"] = (None if sessions_before is None or sessions_after is None
                         else sessions_after - sessions_before)
        r["window"] = [q for q in STORE.requests if r["window_start"] <= q[0] < window_end]
        m = scrape(metrics_port)
        r["reconciles"] = m.get("schemagate_reconciles_total")
        count = m.get("schemagate_reconcile_duration_seconds_count") or 0
        r["reconcile_mean_ms"] = 1000 * m.get("schemagate_reconcile_duration_seconds_sum", 0) / count if count else None
        r["errors"] = {k: v for k, v in m.items() if k.startswith("schemagate_reconcile_errors_total") and v}
        stderr.seek(0)
        r["log_lines"] = stderr.read().splitlines()
    finally:
        proc.terminate()
        proc.wait()
        server.shutdown()
    return r


def report(args, quiet, r):
    window = r["window"]
    reads = [q for q in window if q[1] == "GET"]
    writes = [q for q in window if q[1] != "GET"]
    n = args.resources
    print(f"controller benchmark: {n} SchemaMigrations (init-container mode) over {args.databases} "
          f"{args.engine} database(s), resync {args.resync}s, concurrency {args.concurrency or 'default'}")
    print(f"  all Ready after {r['settled']:.1f}s; {r['reconciles']:.0f} reconciles, "
          f"mean {r['reconcile_mean_ms'] or 0:.1f} ms" if r.get("reconciles") is not None
          else f"  all Ready after {r['settled']:.1f}s")
    print(f"  CPU until all Ready: controller {r['cpu_ready']:.1f}s, this fake API server "
          f"{r['fake_cpu_ready']:.1f}s, "
          + (f"PostgreSQL {r['pg_cpu_ready']:.1f}s " if r["pg_cpu_ready"] is not None else "")
          + f"(of {r['settled']:.1f}s x {os.cpu_count()} cores); "
          f"controller in the quiet period {r['cpu_quiet']:.1f}s")
    print(f"  RSS: peak {r['rss_peak'] / 1024:.1f} MiB; when all Ready {r['rss_ready'] / 1024:.1f} MiB; "
          f"after the quiet period {r['rss_after'] / 1024:.1f} MiB")
    print(f"  in a quiet period of {quiet}s: {len(reads)} reads ({len(reads) / n:.2f} per resource), "
          f"{len(writes)} writes ({len(writes) / n:.4f} per resource)")
    if r["dropped"]:
        print(f"    connections dropped on purpose (--drop-every {args.drop_every}): {r['dropped']}")
    if r["sessions"] is not None:
        print(f"    database sessions opened: {r['sessions']} ({r['sessions'] / n:.2f} per resource)")
    for shape, count in sorted(Counter(path_shape(m, p) for _, m, p in writes).items()):
        print(f"    write: {count} x {shape}")
    for _, m, p in writes[:10]:
        print(f"      e.g. {m} {p}")
    kinds = Counter(path_parts(p)[0] for _, _, p in reads)
    print("  reads by kind: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
    if r["errors"]:
        print("  reconcile errors: " + ", ".join(f"{k} {v:.0f}" for k, v in r["errors"].items()))
    warnings = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in r["log_lines"]]
    if warnings:
        print(f"  controller log: {len(warnings)} lines, e.g.:")
        for line in warnings[:5]:
            print("    " + line[:300])


if __name__ == "__main__":
    main()
