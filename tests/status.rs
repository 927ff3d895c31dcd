//! `schemagate status` and its kubectl-plugin name, end to end: the real binary with a
//! kubeconfig pointing at a small HTTP API server that lists SchemaMigrations.

mod support;

use std::convert::Infallible;
use std::process::Command;

use http::{Request, Response};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use support::*;

fn resource(ns: &str, name: &str, phase: &str, stalled: Option<(&str, &str)>) -> Value {
    let (on, reason, message) = match stalled {
        Some((r, m)) => ("True", r, m),
        None => ("False", "UpToDate", "the database is at 4"),
    };
    json!({
        "apiVersion": "schemagate.dev/v1alpha1", "kind": "SchemaMigration",
        "metadata": {"name": name, "namespace": ns, "generation": 1},
        "spec": {"database": {"urlSecretRef": {"name": "db", "key": "url"}},
                 "source": {"configMapRef": {"name": "m"}}},
        "status": {"observedGeneration": 1, "phase": phase, "currentVersion": "3",
                   "targetVersion": "4", "pending": ["4"],
                   "lastRun": {"kind": "Job", "name": format!("{name}-1a2b3c"), "result": "Failed",
                               "finishedAt": "2026-12-06T05:00:09Z"},
                   "conditions": [{"type": "Stalled", "status": on, "reason": reason,
                                   "message": message, "lastTransitionTime": "2026-12-06T05:00:09Z"}]}
    })
}

/// Serves the list for every namespace and for `shop`; records the paths asked.
async fn api_server() -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let path = req.uri().path().to_string();
                    let items: Vec<Value> = vec![
                        resource("billing", "ledger", "Ready", None),
                        resource(
                            "shop",
                            "orders",
                            "Failed",
                            Some(("MigrationFailed", "Job orders-1a2b3c failed: syntax error")),
                        ),
                    ]
                    .into_iter()
                    .filter(|r| {
                        !path.contains("/namespaces/")
                            || path.contains(&format!(
                                "/namespaces/{}/",
                                r["metadata"]["namespace"].as_str().unwrap()
                            ))
                    })
                    .collect();
                    let body = json!({"apiVersion": "schemagate.dev/v1alpha1",
                        "kind": "SchemaMigrationList", "metadata": {"resourceVersion": "9"},
                        "items": items});
                    Ok::<_, Infallible>(
                        Response::builder()
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from(body.to_string())))
                            .unwrap(),
                    )
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (format!("http://{addr}"), task)
}

fn kubeconfig(dir: &std::path::Path, server: &str) -> std::path::PathBuf {
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {server}\n\
             contexts:\n- name: test\n  context:\n    cluster: test\n    user: me\n    namespace: shop\n\
             current-context: test\nusers:\n- name: me\n  user:\n    token: t0ken\n"
        ),
    )
    .unwrap();
    path
}

fn status(
    program: &std::path::Path,
    kubeconfig: &std::path::Path,
    args: &[&str],
) -> std::process::Output {
    let mut c = Command::new(program);
    c.env_clear()
        .env("KUBECONFIG", kubeconfig)
        .arg("status")
        .args(args);
    run(c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_lists_a_namespace_or_the_cluster_for_people_and_machines() {
    let (server, task) = api_server().await;
    let dir = tempfile::tempdir().unwrap();
    let config = kubeconfig(dir.path(), &server);
    let bin = std::path::PathBuf::from(bin());
    let (o_ns, o_all, o_json) = tokio::task::spawn_blocking({
        let (bin, config) = (bin.clone(), config.clone());
        move || {
            (
                status(&bin, &config, &[]),
                status(&bin, &config, &["-A"]),
                status(&bin, &config, &["-A", "-o", "json"]),
            )
        }
    })
    .await
    .unwrap();
    // The context's namespace by default.
    assert_code(&o_ns, 0);
    let text = String::from_utf8_lossy(&o_ns.stdout).to_string();
    assert!(text.starts_with("NAME"), "{text}");
    assert!(
        text.contains("orders") && !text.contains("ledger"),
        "{text}"
    );
    assert!(
        text.contains("MigrationFailed: Job orders-1a2b3c failed: syntax error"),
        "{text}"
    );
    assert_code(&o_all, 0);
    let text = String::from_utf8_lossy(&o_all.stdout).to_string();
    assert!(text.starts_with("NAMESPACE"), "{text}");
    assert!(text.contains("ledger") && text.contains("orders"), "{text}");
    assert_code(&o_json, 0);
    let v = stdout_json(&o_json);
    let items = v["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[1]["name"], "orders");
    assert_eq!(items[1]["phase"], "Failed");
    assert_eq!(items[1]["pending"], 1);
    assert_eq!(items[0]["ready"], true);

    // As a kubectl plugin: the same binary under the name kubectl looks for.
    let plugin = dir.path().join("kubectl-schemagate");
    std::fs::copy(&bin, &plugin).unwrap();
    let o = tokio::task::spawn_blocking({
        let config = config.clone();
        move || status(&plugin, &config, &["-n", "billing"])
    })
    .await
    .unwrap();
    assert_code(&o, 0);
    assert!(String::from_utf8_lossy(&o.stdout).contains("ledger"));
    task.abort();

    // No cluster: a clear error, exit 11, and the token is never shown.
    let unreachable = kubeconfig(dir.path(), "http://127.0.0.1:1");
    let o = tokio::task::spawn_blocking(move || status(&bin, &unreachable, &[]))
        .await
        .unwrap();
    assert_code(&o, 11);
    let all = support::text(&o);
    assert!(all.contains("cannot list SchemaMigrations"), "{all}");
    assert!(!all.contains("t0ken"), "{all}");
}
