//! The admission webhook over real HTTPS: a rustls client that trusts only the CA the
//! webhook generated, real AdmissionReview v1 JSON in, the returned JSON Patch applied to
//! the original pod. And end to end on one machine: the runners the webhook injects (the
//! real binary, started with the injected container's arguments and environment, as a
//! kubelet would) racing against a real PostgreSQL.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateTerminated, ContainerStatus, Pod, PodStatus,
};
use k8s_openapi::jiff::Timestamp;
use kube::runtime::reflector;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use schemagate::api::{MigrationMode, Phase, SchemaMigration, SchemaMigrationSpec, SourceSpec};
use schemagate::controller::reconcile::{pod_runs, slim_pod};
use schemagate::telemetry::metrics::Metrics;
use schemagate::webhook::server::{Lookup, Webhook, serve};
use schemagate::webhook::tls::{Bundle, Lifetimes, Resolver, server_config};
use schemagate::webhook::{INIT_CONTAINER, InjectSettings, Outcome, inject};
use serde_json::{Value, json};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

const IMAGE: &str = "ghcr.io/schemagate/schemagate:test";

/// SchemaMigrations by name (the name `unreadable` fails like an unreachable API server),
/// and what each user may do: (user, verb, resource, namespace) granted.
struct Fake(
    HashMap<String, SchemaMigration>,
    Vec<(&'static str, &'static str, &'static str, &'static str)>,
);

impl Lookup for Fake {
    async fn get(&self, namespace: &str, name: &str) -> Result<Option<SchemaMigration>, String> {
        if name == "unreadable" {
            return Err("connection refused".into());
        }
        Ok(self
            .0
            .get(name)
            .filter(|sm| sm.metadata.namespace.as_deref() == Some(namespace))
            .cloned())
    }

    async fn authorized(
        &self,
        user: &k8s_openapi::api::authentication::v1::UserInfo,
        a: k8s_openapi::api::authorization::v1::ResourceAttributes,
    ) -> Result<bool, String> {
        let who = user.username.as_deref().unwrap_or_default();
        if who == "flaky" {
            return Err("the API server did not answer".into());
        }
        Ok(self.1.iter().any(|(u, verb, resource, ns)| {
            *u == who
                && Some(*verb) == a.verb.as_deref()
                && Some(*resource) == a.resource.as_deref()
                && Some(*ns) == a.namespace.as_deref()
        }))
    }
}

fn resource(name: &str, mode: MigrationMode) -> SchemaMigration {
    let mut sm = SchemaMigration::new(
        name,
        SchemaMigrationSpec {
            mode,
            target_version: Some("2".into()),
            ..SchemaMigrationSpec::new(
                "orders-db",
                "url",
                SourceSpec::config_map("orders-migrations"),
            )
        },
    );
    sm.metadata.namespace = Some("shop".into());
    sm
}

fn settings() -> InjectSettings {
    InjectSettings {
        image: IMAGE.into(),
        allowed_images: vec![],
        wait_timeout: Duration::from_secs(600),
        ..Default::default()
    }
}

struct Server {
    addr: SocketAddr,
    bundle: Bundle,
    resolver: Arc<Resolver>,
    metrics: Arc<Metrics>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start() -> Server {
    let mut sms = HashMap::new();
    for (name, mode) in [
        ("orders", MigrationMode::InitContainer),
        ("billing", MigrationMode::Job),
    ] {
        sms.insert(name.to_string(), resource(name, mode));
    }
    let mut paused = resource("paused", MigrationMode::InitContainer);
    paused.spec.paused = true;
    sms.insert("paused".into(), paused);
    let mut blocked = resource("blocked", MigrationMode::InitContainer);
    blocked.metadata.generation = Some(1);
    blocked.status = Some(schemagate::api::SchemaMigrationStatus {
        phase: Some(Phase::Blocked),
        observed_generation: Some(1),
        ..Default::default()
    });
    sms.insert("blocked".into(), blocked);

    let bundle = Bundle::generate(
        &["127.0.0.1".to_string(), "localhost".to_string()],
        Timestamp::now(),
        &Lifetimes::default(),
    )
    .unwrap();
    let resolver = Resolver::new(bundle.certified_key().unwrap());
    let config = server_config(resolver.clone()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let metrics = Arc::new(Metrics::new());
    let webhook = Arc::new(Webhook {
        lookup: Fake(
            sms,
            vec![
                ("deployer", "get", "secrets", "shop"),
                ("deployer", "get", "configmaps", "shop"),
                ("deployer", "create", "jobs", "shop"),
                ("deployer", "create", "pods", "shop"),
                ("app-dev", "get", "secrets", "shop"),
                ("app-dev", "get", "configmaps", "shop"),
                ("app-dev", "create", "pods", "shop"),
            ],
        ),
        policy: InjectSettings {
            allowed_images: vec!["registry.example/db/*".into()],
            controller_namespace: "schemagate-system".into(),
            controller_service_account: Some("schemagate".into()),
            ..settings()
        },
        metrics: metrics.clone(),
    });
    let task = tokio::spawn(serve(listener, config, webhook));
    Server {
        addr,
        bundle,
        resolver,
        metrics,
        task,
    }
}

fn connector(ca_pem: &str) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

/// One HTTP/1.1 request over TLS, verified against `ca_pem` for the name 127.0.0.1:
/// (status, headers, body).
async fn request(
    addr: SocketAddr,
    ca_pem: &str,
    method: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> std::io::Result<(u16, String, Vec<u8>)> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::IpAddress(addr.ip().into());
    let mut tls = connector(ca_pem).connect(name, tcp).await?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {content_type}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes()).await?;
    tls.write_all(body).await?;
    let mut raw = Vec::new();
    // The server closes after the response (Connection: close); a TLS close without
    // close_notify still leaves the full response read.
    let _ = tls.read_to_end(&mut raw).await;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP response");
    let headers = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = headers[9..12].parse().unwrap();
    Ok((status, headers, raw[split + 4..].to_vec()))
}

/// A pod as a ReplicaSet controller creates it, labelled for `migration`. Its init
/// container carries a field this build does not know, as pods of newer clusters may.
fn app_pod(migration: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "web-7f9c6d-",
            "namespace": "shop",
            "labels": {
                "app": "web",
                "pod-template-hash": "7f9c6d",
                "schemagate.dev/migration": migration
            },
            "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7f9c6d",
                "uid": "3d8c2a70-5b34-4c1e-9a8e-2f1f0d5b8a11", "controller": true,
                "blockOwnerDeletion": true
            }]
        },
        "spec": {
            "volumes": [{
                "name": "kube-api-access-x2x7d",
                "projected": {"sources": [{"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}}]}
            }],
            "initContainers": [{
                "name": "app-init",
                "image": "shop/web:2",
                "command": ["/bin/warm-cache"],
                "futureField": {"enabled": true},
                "resources": {},
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File",
                "imagePullPolicy": "IfNotPresent"
            }],
            "containers": [{
                "name": "web",
                "image": "shop/web:2",
                "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                "resources": {},
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File",
                "imagePullPolicy": "IfNotPresent"
            }],
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "default",
            "serviceAccount": "default",
            "securityContext": {},
            "schedulerName": "default-scheduler",
            "enableServiceLinks": true,
            "preemptionPolicy": "PreemptLowerPriority"
        },
        "status": {}
    })
}

/// An AdmissionReview v1 as the API server sends it for a Pod CREATE.
fn review(uid: &str, pod: Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": {
                "username": "system:serviceaccount:kube-system:replicaset-controller",
                "uid": "a0e4a2c2-6f2b-4c0e-8f7e-0c8f5a1d2b3c",
                "groups": ["system:serviceaccounts", "system:serviceaccounts:kube-system", "system:authenticated"]
            },
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"}
        }
    })
}

/// Posts a review; returns the response part of the answer.
async fn admit(s: &Server, review: &Value) -> Value {
    admit_at(s, "/mutate", review).await
}

/// Posts a review to `path`; returns the response part of the answer.
async fn admit_at(s: &Server, path: &str, review: &Value) -> Value {
    let (status, headers, body) = request(
        s.addr,
        &s.bundle.ca_bundle_pem,
        "POST",
        path,
        "application/json",
        review.to_string().as_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{headers}");
    assert!(
        headers
            .to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{headers}"
    );
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    answer["response"].clone()
}

/// The original pod with the response's JSON Patch applied.
fn patched(pod: &Value, response: &Value) -> Value {
    assert_eq!(response["patchType"], "JSONPatch", "{response}");
    let raw = base64::engine::general_purpose::STANDARD
        .decode(response["patch"].as_str().unwrap())
        .unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&raw).unwrap();
    let mut out = pod.clone();
    json_patch::patch(&mut out, &patch).unwrap();
    out
}

fn names(list: &Value) -> Vec<&str> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn a_gated_pod_gets_the_runner_by_json_patch_over_https() {
    let s = start().await;
    let pod = app_pod("orders");
    let response = admit(&s, &review("uid-1", pod.clone())).await;
    assert_eq!(response["uid"], "uid-1");
    assert_eq!(response["allowed"], true);
    let out = patched(&pod, &response);

    let init = &out["spec"]["initContainers"];
    assert_eq!(names(init), [INIT_CONTAINER, "app-init"]);
    // The pod's own init container is intact, with the field this build does not know.
    assert_eq!(init[1], pod["spec"]["initContainers"][0]);
    let runner = &init[0];
    assert_eq!(runner["image"], IMAGE);
    assert_eq!(
        runner["args"],
        json!([
            "migrate", "upgrade", "2", "--phase", "expand", "--output", "json"
        ])
    );
    let url = runner["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "DATABASE_URL")
        .unwrap();
    assert_eq!(
        url["valueFrom"]["secretKeyRef"],
        json!({"name": "orders-db", "key": "url", "optional": false})
    );
    assert_eq!(runner["terminationMessagePolicy"], "FallbackToLogsOnError");
    assert_eq!(runner["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(runner["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        runner["securityContext"]["capabilities"]["drop"],
        json!(["ALL"])
    );
    assert_eq!(
        names(&out["spec"]["volumes"]),
        [
            "kube-api-access-x2x7d",
            "schemagate-migrations",
            "schemagate-tmp"
        ]
    );
    assert_eq!(
        out["spec"]["volumes"][1]["configMap"]["name"],
        "orders-migrations"
    );
    // Nothing else changed.
    let mut rest = out.clone();
    rest["spec"]["initContainers"] = pod["spec"]["initContainers"].clone();
    rest["spec"]["volumes"] = pod["spec"]["volumes"].clone();
    assert_eq!(rest, pod);
    // The patched pod is still a valid Pod.
    let typed: Pod = serde_json::from_value(out.clone()).unwrap();
    assert_eq!(typed.spec.unwrap().containers.len(), 1);

    // Re-admitting the mutated pod changes nothing.
    let again = admit(&s, &review("uid-2", out)).await;
    assert_eq!(again["allowed"], true);
    assert!(again.get("patch").is_none(), "{again}");

    let metrics = s.metrics.encode();
    assert!(
        metrics.contains("schemagate_admissions_total{result=\"injected\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn job_mode_injects_a_runner_that_waits_for_the_version() {
    let s = start().await;
    let pod = app_pod("billing");
    let response = admit(&s, &review("uid-3", pod.clone())).await;
    let out = patched(&pod, &response);
    assert_eq!(
        out["spec"]["initContainers"][0]["args"],
        json!([
            "migrate",
            "wait",
            "--phase",
            "expand",
            "--version",
            "2",
            "--timeout",
            "600s",
            "--output",
            "json"
        ])
    );
}

#[tokio::test]
async fn missing_paused_blocked_and_unreadable_resources_refuse_the_pod() {
    let s = start().await;
    for (name, expect) in [
        ("nope", "SchemaMigration shop/nope does not exist"),
        ("paused", "is paused"),
        ("blocked", "is blocked"),
        ("unreadable", "cannot read SchemaMigration shop/unreadable"),
    ] {
        let response = admit(&s, &review("uid-x", app_pod(name))).await;
        assert_eq!(response["uid"], "uid-x");
        assert_eq!(response["allowed"], false, "{name}: {response}");
        let message = response["status"]["message"].as_str().unwrap();
        assert!(message.contains(expect), "{name}: {message}");
        assert!(response.get("patch").is_none());
    }
}

#[tokio::test]
async fn pods_without_the_label_and_other_operations_pass_untouched() {
    let s = start().await;
    let mut plain = app_pod("orders");
    plain["metadata"]["labels"]
        .as_object_mut()
        .unwrap()
        .remove("schemagate.dev/migration");
    let response = admit(&s, &review("uid-4", plain)).await;
    assert_eq!(response["allowed"], true);
    assert!(response.get("patch").is_none());

    let mut update = review("uid-5", app_pod("orders"));
    update["request"]["operation"] = json!("UPDATE");
    update["request"]["oldObject"] = app_pod("orders");
    let response = admit(&s, &update).await;
    assert_eq!(response["allowed"], true);
    assert!(response.get("patch").is_none());
}

#[tokio::test]
async fn malformed_reviews_get_an_invalid_response() {
    let s = start().await;
    for body in [
        json!({"not": "a review"}),
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}),
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"uid": 7}}),
    ] {
        let response = admit(&s, &body).await;
        assert_eq!(response["allowed"], false, "{body}: {response}");
        assert_eq!(response["status"]["status"], "Failure", "{response}");
        assert!(
            !response["status"]["message"].as_str().unwrap().is_empty(),
            "{response}"
        );
    }
    // Not JSON at all.
    let (status, _, body) = request(
        s.addr,
        &s.bundle.ca_bundle_pem,
        "POST",
        "/mutate",
        "application/json",
        b"\x00\xffgarbage{",
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["response"]["allowed"], false);
    let message = answer["response"]["status"]["message"].as_str().unwrap();
    assert!(message.contains("not an AdmissionReview"), "{message}");
    // Still serving.
    let response = admit(&s, &review("uid-6", app_pod("orders"))).await;
    assert_eq!(response["allowed"], true);
}

#[tokio::test]
async fn wrong_content_type_method_and_path_get_clear_http_errors() {
    let s = start().await;
    let ca = s.bundle.ca_bundle_pem.clone();
    let body = review("uid-7", app_pod("orders")).to_string();
    let (status, _, text) = request(
        s.addr,
        &ca,
        "POST",
        "/mutate",
        "text/plain",
        body.as_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(status, 415);
    let text = String::from_utf8(text).unwrap();
    assert!(
        text.contains("\"text/plain\"") && text.contains("application/json"),
        "{text}"
    );
    let (status, headers, _) = request(s.addr, &ca, "GET", "/mutate", "application/json", b"")
        .await
        .unwrap();
    assert_eq!(status, 405);
    assert!(
        headers.to_ascii_lowercase().contains("allow: post"),
        "{headers}"
    );
    let (status, _, _) = request(s.addr, &ca, "POST", "/admit", "application/json", b"{}")
        .await
        .unwrap();
    assert_eq!(status, 404);
    // JSON with a charset parameter is JSON.
    let (status, _, _) = request(
        s.addr,
        &ca,
        "POST",
        "/mutate",
        "application/json; charset=utf-8",
        body.as_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
}

#[tokio::test]
async fn only_the_generated_ca_is_trusted_and_a_renewed_certificate_is_served_at_once() {
    let s = start().await;
    let stranger = Bundle::generate(
        &["127.0.0.1".to_string()],
        Timestamp::now(),
        &Lifetimes::default(),
    )
    .unwrap();
    let err = request(
        s.addr,
        &stranger.ca_bundle_pem,
        "POST",
        "/mutate",
        "application/json",
        b"{}",
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "{err}"
    );

    // A CA renewal: the new bundle trusts old and new; the server swaps without a restart.
    let renewed = s
        .bundle
        .renew(
            schemagate::webhook::tls::Renewal::Ca,
            &["127.0.0.1".to_string(), "localhost".to_string()],
            Timestamp::now(),
            &Lifetimes::default(),
        )
        .unwrap();
    let new_ca_only = renewed
        .ca_bundle_pem
        .split_inclusive("-----END CERTIFICATE-----\n")
        .next()
        .unwrap()
        .to_string();
    assert!(
        request(
            s.addr,
            &new_ca_only,
            "POST",
            "/mutate",
            "application/json",
            b"{}"
        )
        .await
        .is_err(),
        "not yet served"
    );
    // The old certificate is still trusted through the published bundle.
    let (status, _, _) = request(
        s.addr,
        &renewed.ca_bundle_pem,
        "POST",
        "/mutate",
        "application/json",
        b"{}",
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    s.resolver.set(renewed.certified_key().unwrap());
    let (status, _, _) = request(
        s.addr,
        &new_ca_only,
        "POST",
        "/mutate",
        "application/json",
        b"{}",
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
}

/// The runner container the webhook injects, started as a kubelet would: its arguments,
/// its environment with the Secret reference and field reference resolved, the
/// migrations volume and termination log mapped to local paths.
fn as_kubelet(
    runner: &Container,
    pod_name: &str,
    url: &str,
    migrations: &std::path::Path,
    termination_log: &std::path::Path,
) -> std::process::Command {
    let mut c = std::process::Command::new(bin());
    c.env_clear();
    c.args(runner.args.clone().unwrap_or_default());
    for e in runner.env.iter().flatten() {
        let from = e.value_from.as_ref();
        let value = if from.is_some_and(|f| f.secret_key_ref.is_some()) {
            url.to_string()
        } else if from.is_some_and(|f| f.field_ref.is_some()) {
            pod_name.to_string()
        } else {
            match e.value.as_deref().unwrap_or_default() {
                "/migrations" => migrations.display().to_string(),
                "/dev/termination-log" => termination_log.display().to_string(),
                v => v.to_string(),
            }
        };
        c.env(&e.name, value);
    }
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

#[test]
fn injected_runners_racing_on_postgres_migrate_exactly_once() {
    let url = support::postgres::server().fresh_db();
    let dir = MigDir::new();
    // The first migration takes a moment, so the pods really overlap.
    dir.pair(
        "1",
        "create_orders",
        "CREATE TABLE orders (id INTEGER PRIMARY KEY);\nSELECT pg_sleep(1);\n",
        None,
    );
    dir.pair(
        "2",
        "add_total",
        "ALTER TABLE orders ADD COLUMN total INTEGER;\n",
        None,
    );
    dir.pair(
        "3",
        "not_yet",
        "ALTER TABLE orders ADD COLUMN later INTEGER;\n",
        None,
    );
    let sm = resource("orders", MigrationMode::InitContainer);
    let pod: Pod = serde_json::from_value(app_pod("orders")).unwrap();
    let Outcome::Patched(injected) =
        inject(&pod, "shop", "orders", Some(&sm), &settings()).unwrap()
    else {
        panic!("not injected")
    };
    let runner = injected
        .spec
        .as_ref()
        .unwrap()
        .init_containers
        .as_ref()
        .unwrap()[0]
        .clone();
    assert_eq!(runner.name, INIT_CONTAINER);

    let logs = tempfile::tempdir().unwrap();
    let pods: Vec<String> = (0..4).map(|i| format!("web-7f9c6d-{i}")).collect();
    let children: Vec<_> = pods
        .iter()
        .map(|name| {
            as_kubelet(&runner, name, &url, dir.path(), &logs.path().join(name))
                .spawn()
                .expect("spawn runner")
        })
        .collect();
    let mut statuses = Vec::new();
    for (name, child) in pods.iter().zip(children) {
        let o = child.wait_with_output().unwrap();
        assert_code(&o, 0);
        let message = std::fs::read_to_string(logs.path().join(name)).unwrap();
        let summary: Value = serde_json::from_str(message.trim()).unwrap();
        statuses.push((name.clone(), message, summary));
    }
    let migrating: Vec<&(String, String, Value)> = statuses
        .iter()
        .filter(|(_, _, s)| !s["applied"].as_array().unwrap().is_empty())
        .collect();
    assert_eq!(
        migrating.len(),
        1,
        "exactly one pod migrates: {statuses:#?}"
    );
    assert_eq!(migrating[0].2["applied"], json!(["1", "2"]));
    for (_, _, s) in &statuses {
        assert_eq!(s["exitCode"], 0);
    }
    assert_eq!(
        count(
            &url,
            "SELECT count(*) FROM schemagate_history WHERE kind = 'up' AND success"
        ),
        2,
        "each migration once, and not past the target"
    );

    // The controller reads those termination messages back into the resource's lastRun.
    let (store, mut writer) = reflector::store::<Pod>();
    for (name, message, _) in &statuses {
        let mut p = (*injected).clone();
        p.metadata.name = Some(name.clone());
        p.metadata.namespace = Some("shop".into());
        p.status = Some(PodStatus {
            init_container_statuses: Some(vec![ContainerStatus {
                name: INIT_CONTAINER.into(),
                state: Some(ContainerState {
                    terminated: Some(ContainerStateTerminated {
                        exit_code: 0,
                        message: Some(message.clone()),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ..Default::default()
        });
        slim_pod(&mut p);
        writer.apply_watcher_event(&kube::runtime::watcher::Event::Apply(p));
    }
    let runs = pod_runs(&store, "shop", "orders");
    assert_eq!(runs.len(), 4);
    assert_eq!(
        runs[0].name, migrating[0].0,
        "the pod that migrated comes first"
    );
    assert_eq!(
        runs[0].summary.as_ref().unwrap().applied,
        vec!["1".to_string(), "2".to_string()]
    );
}

/// A cluster holding only what the certificate bootstrap touches, behind kube's mock
/// service: the Secret (with resourceVersions and conflicts) and the webhook configuration.
#[derive(Default)]
struct Cluster {
    secret: Option<Value>,
    rv: u64,
    /// Webhook configurations by resource (mutating..., validating...).
    configurations: HashMap<String, Value>,
    /// The next update of the Secret loses a race with another replica.
    lose_next_update: bool,
    seen: Vec<(String, String, String)>,
}

fn mock_client(
    cluster: Arc<std::sync::Mutex<Cluster>>,
) -> (kube::Client, tokio::task::JoinHandle<()>) {
    use http::{Request, Response, StatusCode};
    use kube::client::Body;
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let task = tokio::spawn(async move {
        while let Some((request, send)) = handle.next_request().await {
            let (parts, body) = request.into_parts();
            let bytes = http_body_util::BodyExt::collect(body)
                .await
                .unwrap()
                .to_bytes();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let method = parts.method.to_string();
            let path = parts.uri.path().to_string();
            let mut c = cluster.lock().unwrap();
            c.seen.push((
                method.clone(),
                path.clone(),
                parts.uri.query().unwrap_or_default().to_string(),
            ));
            let status = |code: u16, reason: &str| {
                (
                    StatusCode::from_u16(code).unwrap(),
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code, "message": reason}),
                )
            };
            let (code, out) = if path.contains("/secrets") {
                match method.as_str() {
                    "GET" => match &c.secret {
                        Some(s) => (StatusCode::OK, s.clone()),
                        None => status(404, "NotFound"),
                    },
                    "POST" if c.secret.is_some() => status(409, "AlreadyExists"),
                    "PUT" if c.lose_next_update => {
                        c.lose_next_update = false;
                        c.rv += 1;
                        let rv = c.rv.to_string();
                        c.secret.as_mut().unwrap()["metadata"]["resourceVersion"] = json!(rv);
                        status(409, "Conflict")
                    }
                    "PUT"
                        if body["metadata"]["resourceVersion"]
                            != c.secret.as_ref().unwrap()["metadata"]["resourceVersion"] =>
                    {
                        status(409, "Conflict")
                    }
                    "POST" | "PUT" => {
                        c.rv += 1;
                        let mut stored = body.clone();
                        stored["metadata"]["resourceVersion"] = json!(c.rv.to_string());
                        c.secret = Some(stored.clone());
                        (StatusCode::OK, stored)
                    }
                    _ => status(405, "MethodNotAllowed"),
                }
            } else {
                let resource = path.split('/').nth(4).unwrap_or_default().to_string();
                let apply = parts
                    .headers
                    .get("content-type")
                    .is_some_and(|v| v == "application/apply-patch+yaml");
                if method == "PATCH" && apply {
                    c.configurations.insert(resource.clone(), body.clone());
                }
                match (method.as_str(), c.configurations.get_mut(&resource)) {
                    ("GET", Some(m)) => (StatusCode::OK, m.clone()),
                    ("GET", None) => status(404, "NotFound"),
                    ("PATCH", Some(m)) if apply => (StatusCode::OK, m.clone()),
                    ("PATCH", Some(m)) => {
                        // Strategic merge of webhooks by name.
                        for w in body["webhooks"].as_array().unwrap() {
                            for have in m["webhooks"].as_array_mut().unwrap() {
                                if have["name"] == w["name"] {
                                    have["clientConfig"]["caBundle"] =
                                        w["clientConfig"]["caBundle"].clone();
                                }
                            }
                        }
                        (StatusCode::OK, m.clone())
                    }
                    _ => status(404, "NotFound"),
                }
            };
            send.send_response(
                Response::builder()
                    .status(code)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&out).unwrap()))
                    .unwrap(),
            );
        }
    });
    (kube::Client::new(service, "ops"), task)
}

fn writes(c: &Cluster) -> Vec<String> {
    c.seen
        .iter()
        .filter(|(m, _, _)| m != "GET")
        .map(|(m, p, _)| format!("{m} {p}"))
        .collect()
}

const HOSTS: [&str; 2] = ["schemagate-webhook.ops.svc", "schemagate-webhook.ops"];

fn hosts() -> Vec<String> {
    HOSTS.iter().map(|s| s.to_string()).collect()
}

async fn ensure(client: &kube::Client) -> Result<Bundle, schemagate::webhook::tls::TlsError> {
    let api = kube::Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), "ops");
    schemagate::webhook::tls::ensure_secret(
        &api,
        "ops",
        "schemagate-webhook-tls",
        &hosts(),
        &Lifetimes::default(),
    )
    .await
}

#[tokio::test]
async fn the_certificate_secret_is_created_once_then_only_read() {
    let cluster = Arc::new(std::sync::Mutex::new(Cluster::default()));
    let (client, task) = mock_client(cluster.clone());
    let first = ensure(&client).await.unwrap();
    assert_eq!(
        writes(&cluster.lock().unwrap()),
        ["POST /api/v1/namespaces/ops/secrets"]
    );
    // Another replica (or a restart) reads the same certificate and writes nothing.
    let second = ensure(&client).await.unwrap();
    assert_eq!(second, first);
    assert_eq!(writes(&cluster.lock().unwrap()).len(), 1);
    let c = cluster.lock().unwrap();
    let secret = c.secret.as_ref().unwrap();
    assert_eq!(secret["type"], "kubernetes.io/tls");
    assert!(secret["data"]["tls.crt"].is_string() && secret["data"]["ca.crt"].is_string());
    task.abort();
}

#[tokio::test]
async fn an_expiring_certificate_is_renewed_with_the_same_ca_despite_a_racing_replica() {
    let cluster = Arc::new(std::sync::Mutex::new(Cluster::default()));
    let old = Bundle::generate(
        &hosts(),
        Timestamp::now()
            .checked_sub(k8s_openapi::jiff::SignedDuration::from_hours(24 * 300))
            .unwrap(),
        &Lifetimes::default(),
    )
    .unwrap();
    {
        let mut c = cluster.lock().unwrap();
        let mut s = serde_json::to_value(old.to_secret("ops", "schemagate-webhook-tls")).unwrap();
        s["metadata"]["resourceVersion"] = json!("1");
        c.rv = 1;
        c.secret = Some(s);
        c.lose_next_update = true;
    }
    let (client, task) = mock_client(cluster.clone());
    let renewed = ensure(&client).await.unwrap();
    assert_ne!(renewed.cert_pem, old.cert_pem);
    assert_eq!(renewed.ca_bundle_pem, old.ca_bundle_pem, "same CA");
    assert!(renewed.not_after > old.not_after);
    let c = cluster.lock().unwrap();
    // The first update lost the race (409), the re-read one won.
    assert_eq!(
        writes(&c),
        [
            "PUT /api/v1/namespaces/ops/secrets/schemagate-webhook-tls",
            "PUT /api/v1/namespaces/ops/secrets/schemagate-webhook-tls"
        ]
    );
    let stored: k8s_openapi::api::core::v1::Secret =
        serde_json::from_value(c.secret.clone().unwrap()).unwrap();
    assert_eq!(Bundle::from_secret(&stored).unwrap(), renewed);
    task.abort();
}

#[tokio::test]
async fn a_damaged_certificate_secret_is_replaced() {
    let cluster = Arc::new(std::sync::Mutex::new(Cluster::default()));
    cluster.lock().unwrap().secret = Some(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "schemagate-webhook-tls", "namespace": "ops", "resourceVersion": "0"},
        "data": {"tls.crt": "bm90IGEgY2VydA=="}
    }));
    let (client, task) = mock_client(cluster.clone());
    let bundle = ensure(&client).await.unwrap();
    assert!(bundle.certified_key().is_ok());
    assert_eq!(writes(&cluster.lock().unwrap()).len(), 1);
    task.abort();
}

#[tokio::test]
async fn the_ca_bundle_is_written_into_both_configurations_only_when_it_differs() {
    use schemagate::webhook::tls::{
        Endpoint, register, validating_configuration, webhook_configuration,
    };
    const MUTATING: &str = "mutatingwebhookconfigurations";
    const VALIDATING: &str = "validatingwebhookconfigurations";
    let cluster = Arc::new(std::sync::Mutex::new(Cluster::default()));
    let (client, task) = mock_client(cluster.clone());
    let service = Endpoint::Service {
        namespace: "ops".into(),
        name: "schemagate-webhook".into(),
    };
    // In a cluster the chart installs the configurations; without them nothing is checked.
    let err = register(&client, "schemagate", &service, "CA1", "ops", &[])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("install it"), "{err}");

    {
        let mut c = cluster.lock().unwrap();
        let m = webhook_configuration("schemagate", &service, "", "ops", &[]);
        let v = validating_configuration("schemagate", &service, "");
        c.configurations
            .insert(MUTATING.into(), serde_json::to_value(m).unwrap());
        c.configurations
            .insert(VALIDATING.into(), serde_json::to_value(v).unwrap());
        c.seen.clear();
    }
    assert!(
        register(&client, "schemagate", &service, "CA1", "ops", &[])
            .await
            .unwrap()
    );
    assert!(
        !register(&client, "schemagate", &service, "CA1", "ops", &[])
            .await
            .unwrap()
    );
    {
        let c = cluster.lock().unwrap();
        assert_eq!(
            writes(&c).len(),
            2,
            "one patch each, then nothing: {:?}",
            c.seen
        );
        let ca = json!(base64::engine::general_purpose::STANDARD.encode("CA1"));
        let m = &c.configurations[MUTATING]["webhooks"][0];
        assert_eq!(m["clientConfig"]["caBundle"], ca);
        assert_eq!(m["clientConfig"]["service"]["path"], "/mutate");
        let v = &c.configurations[VALIDATING]["webhooks"][0];
        assert_eq!(v["clientConfig"]["caBundle"], ca);
        assert_eq!(v["clientConfig"]["service"]["path"], "/validate");
        assert_eq!(v["rules"][0]["resources"], json!(["schemamigrations"]));
        assert_eq!(v["rules"][0]["operations"], json!(["CREATE", "UPDATE"]));
    }

    // Outside a cluster the controller registers both whole, at its URL.
    {
        let mut c = cluster.lock().unwrap();
        c.configurations.clear();
        c.seen.clear();
    }
    let url = Endpoint::Url("https://127.0.0.1:9443".into());
    assert!(
        register(&client, "schemagate", &url, "CA2", "ops", &[])
            .await
            .unwrap()
    );
    assert!(
        !register(&client, "schemagate", &url, "CA2", "ops", &[])
            .await
            .unwrap()
    );
    let c = cluster.lock().unwrap();
    let applies: Vec<&(String, String, String)> =
        c.seen.iter().filter(|(m, _, _)| m == "PATCH").collect();
    assert_eq!(applies.len(), 2, "{:?}", c.seen);
    assert!(
        applies
            .iter()
            .all(|a| a.2.contains("fieldManager=schemagate-controller")),
        "{applies:?}"
    );
    let m = &c.configurations[MUTATING]["webhooks"][0];
    assert_eq!(m["clientConfig"]["url"], "https://127.0.0.1:9443/mutate");
    assert_eq!(m["failurePolicy"], "Fail");
    let v = &c.configurations[VALIDATING]["webhooks"][0];
    assert_eq!(v["clientConfig"]["url"], "https://127.0.0.1:9443/validate");
    task.abort();
}

/// A SchemaMigration write as the API server sends it to the validating webhook.
fn sm_review(
    uid: &str,
    user: &str,
    operation: &str,
    sm: &SchemaMigration,
    old: Option<&SchemaMigration>,
) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "schemagate.dev", "version": "v1alpha1", "kind": "SchemaMigration"},
            "resource": {"group": "schemagate.dev", "version": "v1alpha1", "resource": "schemamigrations"},
            "requestKind": {"group": "schemagate.dev", "version": "v1alpha1", "kind": "SchemaMigration"},
            "requestResource": {"group": "schemagate.dev", "version": "v1alpha1", "resource": "schemamigrations"},
            "name": sm.metadata.name,
            "namespace": sm.metadata.namespace,
            "operation": operation,
            "userInfo": {
                "username": user,
                "uid": "4b1f8d0e-0000-4000-8000-000000000001",
                "groups": ["team-shop", "system:authenticated"],
                "extra": {"authentication.kubernetes.io/credential-id": ["X509SHA256=ab12"]}
            },
            "object": serde_json::to_value(sm).unwrap(),
            "oldObject": old.map(|o| serde_json::to_value(o).unwrap()),
            "dryRun": false,
            "options": {"kind": if operation == "CREATE" { "CreateOptions" } else { "UpdateOptions" }, "apiVersion": "meta.k8s.io/v1"}
        }
    })
}

fn written(mode: MigrationMode) -> SchemaMigration {
    let mut sm = resource("orders", mode);
    sm.metadata.uid = None;
    sm
}

#[tokio::test]
async fn schema_migration_writes_ask_nothing_their_writer_may_not_do() {
    let s = start().await;
    let check = |user: &'static str,
                 op: &'static str,
                 sm: SchemaMigration,
                 old: Option<SchemaMigration>| {
        let s = &s;
        async move {
            admit_at(
                s,
                "/validate",
                &sm_review("uid-v", user, op, &sm, old.as_ref()),
            )
            .await
        }
    };
    let allowed = |r: &Value| r["allowed"] == true;
    let message = |r: &Value| {
        r["status"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    // Refused, saying why.
    let assert_refused = |r: &Value, says: &str| {
        assert!(!allowed(r), "{r}");
        assert!(message(r).contains(says), "{}", message(r));
    };

    // Init-container mode: the writer must be able to read the Secret and ConfigMap the
    // resource names and to run pods, since its SQL runs in them with that URL.
    let r = check(
        "app-dev",
        "CREATE",
        written(MigrationMode::InitContainer),
        None,
    )
    .await;
    assert!(allowed(&r), "{r}");
    assert_eq!(r["uid"], "uid-v");
    let r = check(
        "viewer",
        "CREATE",
        written(MigrationMode::InitContainer),
        None,
    )
    .await;
    assert_refused(&r, "viewer may not get secrets orders-db in namespace shop");

    // Job mode: the controller creates Jobs, so the writer must be able to.
    let r = check("app-dev", "CREATE", written(MigrationMode::Job), None).await;
    assert!(!allowed(&r));
    let m = message(&r);
    assert!(
        m.contains("app-dev may not create jobs.batch in namespace shop")
            && m.contains("mode: Job"),
        "{m}"
    );
    let r = check("deployer", "CREATE", written(MigrationMode::Job), None).await;
    assert!(allowed(&r), "{r}");

    // A chosen runner image, allowed by policy: the writer must be able to create pods.
    let mut own_image = written(MigrationMode::InitContainer);
    own_image.spec.runner.image = Some("registry.example/db/runner:2".into());
    assert!(allowed(
        &check("app-dev", "CREATE", own_image.clone(), None).await
    ));
    let r = check("viewer", "CREATE", own_image.clone(), None).await;
    assert_refused(&r, "viewer may not get secrets");

    // An image outside the allowlist: refused whoever asks, naming the list.
    let mut evil = written(MigrationMode::Job);
    evil.spec.runner.image = Some("evil.example/miner:latest".into());
    let r = check("deployer", "CREATE", evil, None).await;
    assert!(!allowed(&r));
    assert!(
        message(&r).contains("evil.example/miner:latest is not allowed")
            && message(&r).contains("registry.example/db/*"),
        "{}",
        message(&r)
    );

    // The controller's own service account: never.
    let mut own_sa = written(MigrationMode::Job);
    own_sa.metadata.namespace = Some("schemagate-system".into());
    own_sa.spec.runner.service_account_name = Some("schemagate".into());
    let r = check("cluster-admin", "CREATE", own_sa, None).await;
    assert_refused(&r, "own service account");

    // A service account the writer may not run Jobs with (no Job creation at all here).
    let mut sa = written(MigrationMode::Job);
    sa.spec.runner.service_account_name = Some("migrator".into());
    let r = check("app-dev", "CREATE", sa, None).await;
    assert_refused(&r, "serviceAccountName migrator");

    // Permission checks that cannot be made refuse (fail closed).
    let r = check("flaky", "CREATE", written(MigrationMode::Job), None).await;
    assert_refused(&r, "cannot check whether flaky");

    // Updates: a label change asks nothing; a new target in Job mode runs a new Job.
    let before = written(MigrationMode::Job);
    let mut labelled = before.clone();
    labelled.metadata.labels = Some([("team".to_string(), "shop".to_string())].into());
    assert!(allowed(
        &check("viewer", "UPDATE", labelled, Some(before.clone())).await
    ));
    let mut retarget = before.clone();
    retarget.spec.target_version = Some("3".into());
    let r = check("app-dev", "UPDATE", retarget, Some(before)).await;
    assert!(!allowed(&r), "{r}");
}

#[tokio::test]
async fn the_check_sends_a_subject_access_review_for_the_requesting_user() {
    use http::{Request, Response};
    use kube::client::Body;
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let seen: Arc<std::sync::Mutex<Vec<(String, String, Value)>>> = Arc::default();
    let log = seen.clone();
    let api = tokio::spawn(async move {
        while let Some((request, send)) = handle.next_request().await {
            let (parts, body) = request.into_parts();
            let bytes = http_body_util::BodyExt::collect(body)
                .await
                .unwrap()
                .to_bytes();
            let mut body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            log.lock().unwrap().push((
                parts.method.to_string(),
                parts.uri.path().to_string(),
                body.clone(),
            ));
            body["status"] = json!({"allowed": false, "reason": "no RBAC policy matched"});
            send.send_response(
                Response::builder()
                    .status(201)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&body).unwrap()))
                    .unwrap(),
            );
        }
    });
    let webhook = Webhook {
        lookup: schemagate::webhook::server::KubeLookup {
            client: kube::Client::new(service, "default"),
            timeout: Duration::from_secs(5),
        },
        policy: settings(),
        metrics: Arc::new(Metrics::new()),
    };
    let body = sm_review(
        "uid-sar",
        "app-dev",
        "CREATE",
        &written(MigrationMode::Job),
        None,
    );
    let (answer, outcome) =
        schemagate::webhook::server::review(&webhook, "/validate", body.to_string().as_bytes())
            .await;
    assert_eq!(outcome, "denied");
    assert_eq!(answer["response"]["allowed"], false);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:#?}");
    let (method, path, sar) = &seen[0];
    assert_eq!(
        (method.as_str(), path.as_str()),
        ("POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews")
    );
    assert_eq!(sar["kind"], "SubjectAccessReview");
    let spec = &sar["spec"];
    assert_eq!(spec["user"], "app-dev");
    assert_eq!(spec["uid"], "4b1f8d0e-0000-4000-8000-000000000001");
    assert_eq!(spec["groups"], json!(["team-shop", "system:authenticated"]));
    assert_eq!(
        spec["extra"],
        json!({"authentication.kubernetes.io/credential-id": ["X509SHA256=ab12"]})
    );
    assert_eq!(
        spec["resourceAttributes"],
        json!({"namespace": "shop", "verb": "get", "group": "", "resource": "secrets", "name": "orders-db"})
    );
    api.abort();
}
