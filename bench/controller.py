#!/usr/bin/env python3
"""Controller benchmark: memory and API traffic with many SchemaMigrations.

There is no cluster here, so this script is the API server: a small in-memory fake that
speaks enough of the Kubernetes API for the real `schemagate controller` binary (list and
watch with resourceVersions and watch events, metadata-only lists, get, server-side apply
of status, Events). It creates N SchemaMigrations (init-container mode, each with its
Secret and ConfigMap, the Secrets pointing at one SQLite database already at the target
version), starts the release binary against it with a kubeconfig, and reports:

  - the controller's RSS once every resource is Ready, and after a resync period;
  - requests per resource during a quiet resync period, reads and writes separately
    (the goal: zero writes when nothing changed).

Usage: bench/controller.py [--resources 1000] [--resync 20] [--no-build]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

ROOT = Path(__file__).resolve().parent.parent


class Store:
    def __init__(self):
        self.lock = threading.Condition()
        self.rv = 1
        self.objects = {}  # (plural, ns, name) -> object
        self.events = []  # (rv, plural, type, object)
        self.requests = []  # (time, method, path)

    def bump(self):
        self.rv += 1
        return str(self.rv)

    def put(self, plural, obj, kind="ADDED"):
        with self.lock:
            obj["metadata"]["resourceVersion"] = self.bump()
            key = (plural, obj["metadata"].get("namespace"), obj["metadata"]["name"])
            self.objects[key] = obj
            self.events.append((self.rv, plural, kind, json.loads(json.dumps(obj))))
            self.lock.notify_all()


STORE = Store()


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
        if name:
            obj = STORE.objects.get((plural, ns, name))
            if obj is None:
                return self.send_json(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"})
            return self.send_json(200, self.shape(obj))
        selector = q.get("labelSelector")
        if q.get("watch") in ("true", "1"):
            return self.watch(plural, ns, selector, int(q.get("resourceVersion") or 0), int(q.get("timeoutSeconds") or 290))
        with STORE.lock:
            items = [self.shape(o) for (p, n, _), o in STORE.objects.items()
                     if p == plural and (ns is None or n == ns) and matches_selector(o, selector)]
            rv = str(STORE.rv)
        kind = "PartialObjectMetadataList" if self.metadata_only() else "List"
        api = "meta.k8s.io/v1" if self.metadata_only() else "v1"
        self.send_json(200, {"apiVersion": api, "kind": kind, "metadata": {"resourceVersion": rv}, "items": items})

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
                    pending = [e for e in STORE.events if e[0] > seen and e[1] == plural
                               and (ns is None or e[3]["metadata"].get("namespace") == ns)
                               and matches_selector(e[3], selector)]
                    if not pending:
                        STORE.lock.wait(timeout=1.0)
                        continue
                for rv, _, kind, obj in pending:
                    seen = max(seen, rv)
                    line = (json.dumps({"type": kind, "object": self.shape(obj)}) + "\n").encode()
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
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


def rss_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resources", type=int, default=1000)
    ap.add_argument("--resync", type=int, default=20, help="the controller's --resync, seconds")
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    binary = ROOT / "target" / "release" / "schemagate"

    with tempfile.TemporaryDirectory(prefix="schemagate-ctl-bench-") as tmp:
        tmp = Path(tmp)
        mig = tmp / "migrations"
        mig.mkdir()
        files = {
            "1_create_orders.up.sql": "CREATE TABLE orders (id INTEGER PRIMARY KEY);\n",
            "2_add_total.up.sql": "ALTER TABLE orders ADD COLUMN total INTEGER;\n",
        }
        for n, t in files.items():
            (mig / n).write_text(t)
        db = tmp / "app.db"
        subprocess.run([str(binary), "migrate", "--database-url", f"sqlite:{db}", "--dir", str(mig), "upgrade"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        import base64
        url_b64 = base64.b64encode(f"sqlite:{db}".encode()).decode()
        for i in range(args.resources):
            ns = f"team-{i % 50}"
            name = f"app-{i}"
            STORE.put("secrets", {"apiVersion": "v1", "kind": "Secret",
                                  "metadata": {"name": f"{name}-db", "namespace": ns}, "data": {"url": url_b64}})
            STORE.put("configmaps", {"apiVersion": "v1", "kind": "ConfigMap",
                                     "metadata": {"name": f"{name}-migrations", "namespace": ns}, "data": files})
            STORE.put("schemamigrations", {
                "apiVersion": "schemagate.dev/v1alpha1", "kind": "SchemaMigration",
                "metadata": {"name": name, "namespace": ns, "uid": f"uid-{i}", "generation": 1},
                "spec": {"database": {"urlSecretRef": {"name": f"{name}-db", "key": "url"}},
                         "source": {"configMapRef": {"name": f"{name}-migrations"}}, "mode": "InitContainer"}})

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
        env = dict(os.environ, KUBECONFIG=str(kubeconfig), SCHEMAGATE_LOG="warn")
        proc = subprocess.Popen([str(binary), "controller", "--leader-election=false", "--metrics-addr", "127.0.0.1:0",
                                 "--resync", f"{args.resync}s"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            start = time.time()

            def ready_count():
                return sum(1 for (p, _, _), o in list(STORE.objects.items())
                           if p == "schemamigrations" and (o.get("status") or {}).get("phase") == "Ready")
            while ready_count() < args.resources:
                if proc.poll() is not None:
                    sys.exit("controller exited: " + proc.stderr.read().decode(errors="replace"))
                if time.time() - start > 600:
                    sys.exit(f"only {ready_count()} of {args.resources} became Ready")
                time.sleep(0.5)
            settled = time.time() - start
            rss_ready = rss_kib(proc.pid)
            # Let the status-change reconciles pass, then watch one quiet resync period.
            time.sleep(min(5, args.resync / 2))
            window_start = time.time()
            time.sleep(args.resync + 2)
            window = [r for r in STORE.requests if r[0] >= window_start]
            rss_after = rss_kib(proc.pid)
        finally:
            proc.terminate()
            proc.wait()
            server.shutdown()

    reads = [r for r in window if r[1] == "GET"]
    writes = [r for r in window if r[1] != "GET"]
    n = args.resources
    print(f"controller benchmark: {n} SchemaMigrations (init-container mode, one SQLite database), resync {args.resync}s")
    print(f"  all Ready after {settled:.1f}s")
    print(f"  RSS when all Ready: {rss_ready / 1024:.1f} MiB; after a quiet resync period: {rss_after / 1024:.1f} MiB")
    print(f"  in one quiet resync period ({args.resync + 2}s): {len(reads)} reads ({len(reads) / n:.2f} per resource), "
          f"{len(writes)} writes ({len(writes) / n:.2f} per resource)")
    for _, m, p in writes:
        print(f"    write: {m} {p}")
    kinds = {}
    for _, m, p in reads:
        plural = path_parts(p)[0]
        kinds[plural] = kinds.get(plural, 0) + 1
    print("  reads by kind: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))


if __name__ == "__main__":
    main()
