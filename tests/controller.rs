//! Reconcile flows against a mock Kubernetes API server (kube's tower-test pattern), with
//! a real SQLite database behind the Secret's URL, so the controller's history reads are
//! real too.

mod support;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use k8s_openapi::ByteString;
use k8s_openapi::api::batch::v1::{Job, JobCondition, JobStatus};
use k8s_openapi::api::core::v1::{
    ConfigMap, ContainerState, ContainerStateTerminated, ContainerStatus, Pod, PodStatus, Secret,
};
use kube::api::ObjectMeta;
use kube::client::Body;
use kube::runtime::events::Reporter;
use kube::{Client, Resource};
use schemagate::api::{
    InlineMigration, MIGRATION_LABEL, MigrationMode, SchemaMigration, SchemaMigrationSpec,
    SourceSpec,
};
use schemagate::controller::events::EventRecorder;
use schemagate::controller::reconcile::{self, Context, Settings};
use schemagate::runner::policy::RunnerPolicy;
use schemagate::telemetry::metrics::Metrics;
use serde_json::{Value, json};
use support::*;

const NS: &str = "shop";
const IMAGE: &str = "ghcr.io/schemagate/schemagate:test";

/// One request the mock API server saw.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    path: String,
    query: String,
    body: Value,
}

/// The cluster the mock API server answers from.
#[derive(Clone, Default)]
struct World {
    secret: Option<Secret>,
    /// Secrets a label selector lists (a fleet's tenants).
    fleet_secrets: Vec<Secret>,
    config_map: Option<ConfigMap>,
    jobs: Vec<Job>,
    pods: Vec<Pod>,
    /// Answer job creation with 409 (a Job of that name exists).
    job_conflict: bool,
    /// ... and that Job was created by someone else (not owned by the resource).
    job_squatted: bool,
    /// Someone else created the inline source's ConfigMap under its name.
    inline_squatted: bool,
    /// ConfigMaps carrying the resource's label (earlier inline sources, and others').
    labelled_config_maps: Vec<Value>,
    /// The resource, as the server returns it after a status patch.
    resource: Value,
    /// How many requests, from the first, fail below the API (no answer: a connection the
    /// server closed as the request went out).
    unanswered: usize,
}

fn json_response(status: StatusCode, body: Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(&body).unwrap()))
        .unwrap()
}

fn not_found(what: &str) -> Response<Body> {
    json_response(
        StatusCode::NOT_FOUND,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": format!("{what} not found")}),
    )
}

fn list(kind: &str, items: Value) -> Value {
    json!({ "kind": kind, "apiVersion": "v1", "metadata": { "resourceVersion": "1" }, "items": items })
}

fn answer(world: &World, seen: &Seen) -> Response<Body> {
    let p = seen.path.as_str();
    match (seen.method.as_str(), p) {
        ("GET", _) if p.ends_with("/secrets") => json_response(
            StatusCode::OK,
            list(
                "SecretList",
                serde_json::to_value(&world.fleet_secrets).unwrap(),
            ),
        ),
        ("GET", _) if p.ends_with("/secrets/orders-db") => match &world.secret {
            Some(s) => json_response(StatusCode::OK, serde_json::to_value(s).unwrap()),
            None => not_found("secret"),
        },
        ("GET", _) if p.ends_with("/configmaps/orders-migrations") => match &world.config_map {
            Some(c) => json_response(StatusCode::OK, serde_json::to_value(c).unwrap()),
            None => not_found("configmap"),
        },
        ("GET", _) if p.contains("/configmaps/orders-inline-") && world.inline_squatted => {
            json_response(
                StatusCode::OK,
                json!({"apiVersion": "v1", "kind": "ConfigMap",
                       "metadata": {"name": p.rsplit('/').next(), "namespace": NS},
                       "data": {"1_evil.up.sql": "DROP TABLE orders;"}}),
            )
        }
        ("GET", _) if p.contains("/jobs/") => {
            let name = p.rsplit('/').next().unwrap_or_default();
            let owners = if world.job_squatted {
                json!([])
            } else {
                json!([sm_owner()])
            };
            json_response(
                StatusCode::OK,
                json!({"apiVersion": "batch/v1", "kind": "Job",
                       "metadata": {"name": name, "namespace": NS, "ownerReferences": owners}}),
            )
        }
        ("GET", _) if p.ends_with("/configmaps") => json_response(
            StatusCode::OK,
            list("ConfigMapList", json!(world.labelled_config_maps)),
        ),
        ("DELETE", _) => json_response(
            StatusCode::OK,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "code": 200}),
        ),
        ("GET", _) if p.ends_with("/jobs") => json_response(
            StatusCode::OK,
            list("JobList", serde_json::to_value(&world.jobs).unwrap()),
        ),
        ("GET", _) if p.ends_with("/pods") => json_response(
            StatusCode::OK,
            list("PodList", serde_json::to_value(&world.pods).unwrap()),
        ),
        ("POST", _) if p.ends_with("/jobs") && world.job_conflict => json_response(
            StatusCode::CONFLICT,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "AlreadyExists", "code": 409, "message": "exists"}),
        ),
        ("POST", _) => json_response(StatusCode::CREATED, seen.body.clone()),
        ("PATCH", _) => {
            let mut body = world.resource.clone();
            body["status"] = seen.body["status"].clone();
            json_response(StatusCode::OK, body)
        }
        _ => not_found("path"),
    }
}

/// A controller context over the mock API server answering from `world`, kept across
/// reconciliations (its pod store and its shared database reads live as long as it does).
struct Cluster {
    ctx: Arc<Context>,
    pods: kube::runtime::reflector::store::Writer<Pod>,
    seen: Arc<Mutex<Vec<Seen>>>,
    server: tokio::task::JoinHandle<()>,
}

impl Cluster {
    fn new(mut world: World, settings: Settings) -> Self {
        // Gated pods reach the controller through its watch (a reflector store), not a list.
        let (pod_store, pods) = kube::runtime::reflector::store::<Pod>();
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let log = seen.clone();
        let server = tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                let (parts, body) = request.into_parts();
                let bytes = http_body_util::BodyExt::collect(body)
                    .await
                    .unwrap()
                    .to_bytes();
                let s = Seen {
                    method: parts.method.to_string(),
                    path: parts.uri.path().to_string(),
                    query: parts.uri.query().unwrap_or_default().to_string(),
                    body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
                };
                log.lock().unwrap().push(s.clone());
                if world.unanswered > 0 {
                    world.unanswered -= 1;
                    send.send_error(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
                    continue;
                }
                send.send_response(answer(&world, &s));
            }
        });
        let client = Client::new(service, NS);
        let ctx = Arc::new(Context {
            client: client.clone(),
            settings,
            metrics: Arc::new(Metrics::new()),
            recorder: EventRecorder::new(
                client,
                Reporter {
                    controller: "schemagate-test".into(),
                    instance: None,
                },
            ),
            failures: Default::default(),
            pods: pod_store,
            reads: Default::default(),
        });
        Cluster {
            ctx,
            pods,
            seen,
            server,
        }
    }

    /// The settings every test runs with.
    fn settings() -> Settings {
        Settings {
            runner: RunnerPolicy {
                image: IMAGE.into(),
                ..Default::default()
            },
            db_timeout: Duration::from_secs(5),
            ..Settings::default()
        }
    }

    /// A gated pod, as its watch delivers it (slimmed).
    fn pod(&mut self, pod: &Pod) {
        let mut slim = pod.clone();
        reconcile::slim_pod(&mut slim);
        self.pods
            .apply_watcher_event(&kube::runtime::watcher::Event::Apply(slim));
    }

    /// Reconciles `sm`; returns what the API server saw meanwhile and the result.
    async fn reconcile(
        &self,
        sm: SchemaMigration,
    ) -> (
        Vec<Seen>,
        Result<kube::runtime::controller::Action, reconcile::Error>,
    ) {
        self.seen.lock().unwrap().clear();
        let result = reconcile::reconcile(Arc::new(sm), self.ctx.clone()).await;
        (self.seen.lock().unwrap().clone(), result)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Runs one reconciliation against `world`; returns what the API server saw and the result.
async fn reconcile_once(
    sm: SchemaMigration,
    mut world: World,
) -> (
    Vec<Seen>,
    Result<kube::runtime::controller::Action, reconcile::Error>,
) {
    world.resource = serde_json::to_value(&sm).unwrap();
    let pods = world.pods.clone();
    let mut cluster = Cluster::new(world, Cluster::settings());
    for pod in pods.iter().filter(|p| {
        p.metadata
            .labels
            .as_ref()
            .is_some_and(|l| l.contains_key(MIGRATION_LABEL))
    }) {
        cluster.pod(pod);
    }
    cluster.reconcile(sm).await
}

fn files() -> Vec<(&'static str, &'static str)> {
    vec![
        (
            "1_create_orders.up.sql",
            "CREATE TABLE orders (id INTEGER PRIMARY KEY);\n",
        ),
        ("1_create_orders.down.sql", "DROP TABLE orders;\n"),
        (
            "2_add_total.up.sql",
            "ALTER TABLE orders ADD COLUMN total INTEGER;\n",
        ),
        (
            "3_add_customer.up.sql",
            "ALTER TABLE orders ADD COLUMN customer TEXT;\n",
        ),
    ]
}

/// A SQLite database migrated to `version` by the real binary, and its URL.
fn database(version: Option<&str>) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("app.db").display());
    if let Some(v) = version {
        let mig = MigDir::new();
        for (n, t) in files() {
            mig.file(n, t);
        }
        let mut c = migrate(&url, mig.path());
        c.args(["upgrade", v]);
        assert_code(&run(c), 0);
    }
    (dir, url)
}

fn world(url: &str) -> World {
    World {
        secret: Some(Secret {
            metadata: ObjectMeta {
                name: Some("orders-db".into()),
                namespace: Some(NS.into()),
                resource_version: Some("41".into()),
                ..Default::default()
            },
            data: Some([("url".to_string(), ByteString(url.as_bytes().to_vec()))].into()),
            ..Default::default()
        }),
        config_map: Some(ConfigMap {
            metadata: ObjectMeta {
                name: Some("orders-migrations".into()),
                namespace: Some(NS.into()),
                ..Default::default()
            },
            data: Some(
                files()
                    .into_iter()
                    .map(|(n, t)| (n.to_string(), t.to_string()))
                    .collect(),
            ),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn resource(mode: MigrationMode) -> SchemaMigration {
    let mut sm = SchemaMigration::new(
        "orders",
        SchemaMigrationSpec {
            mode,
            ..SchemaMigrationSpec::new(
                "orders-db",
                "url",
                SourceSpec::config_map("orders-migrations"),
            )
        },
    );
    sm.metadata.namespace = Some(NS.into());
    sm.metadata.uid = Some("uid-orders".into());
    sm.metadata.generation = Some(1);
    sm
}

/// An init-container resource with one inline migration.
fn inline_resource() -> SchemaMigration {
    let mut sm = resource(MigrationMode::InitContainer);
    sm.spec.source = SourceSpec {
        inline: Some(vec![InlineMigration {
            version: "1".into(),
            description: "create orders".into(),
            up: "CREATE TABLE orders (id INTEGER PRIMARY KEY);".into(),
            down: None,
        }]),
        ..Default::default()
    };
    sm
}

fn posts<'a>(seen: &'a [Seen], suffix: &str) -> Vec<&'a Seen> {
    seen.iter()
        .filter(|s| s.method == "POST" && s.path.ends_with(suffix))
        .collect()
}

fn status_patch(seen: &[Seen]) -> Value {
    let p: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.method == "PATCH" && s.path.ends_with("/schemamigrations/orders/status"))
        .collect();
    assert_eq!(p.len(), 1, "{seen:#?}");
    assert!(
        p[0].query.contains("fieldManager=schemagate-controller")
            && p[0].query.contains("force=true"),
        "{}",
        p[0].query
    );
    p[0].body["status"].clone()
}

/// Failed and Stalled for `reason`, with a message that says `says`.
#[track_caller]
fn assert_failed_stalled(status: &Value, reason: &str, says: &str) {
    assert_eq!(status["phase"], "Failed", "{status:#}");
    let stalled = condition(status, "Stalled");
    assert_eq!(
        (stalled["status"].as_str(), stalled["reason"].as_str()),
        (Some("True"), Some(reason))
    );
    assert!(
        stalled["message"].as_str().unwrap().contains(says),
        "{stalled}"
    );
}

fn condition<'a>(status: &'a Value, t: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == t)
        .unwrap()
}

/// The Job the controller would have named for this world (as created in the first test).
async fn created_job(sm: &SchemaMigration, w: &World) -> Job {
    let (seen, result) = reconcile_once(sm.clone(), w.clone()).await;
    result.unwrap();
    let jobs = posts(&seen, "/jobs");
    assert_eq!(jobs.len(), 1, "{seen:#?}");
    serde_json::from_value(jobs[0].body.clone()).unwrap()
}

fn finished(mut job: Job, ok: bool) -> Job {
    job.metadata.uid = Some("uid-job".into());
    job.metadata.owner_references = Some(vec![sm_owner()]);
    job.status = Some(JobStatus {
        start_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            "2026-11-25T07:00:00Z".parse().unwrap(),
        )),
        completion_time: ok.then(|| {
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                "2026-11-25T07:00:09Z".parse().unwrap(),
            )
        }),
        conditions: Some(vec![JobCondition {
            type_: if ok { "Complete" } else { "Failed" }.into(),
            status: "True".into(),
            reason: (!ok).then(|| "BackoffLimitExceeded".into()),
            message: (!ok).then(|| "Job has reached the specified backoff limit".into()),
            last_transition_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                "2026-11-25T07:00:09Z".parse().unwrap(),
            )),
            ..Default::default()
        }]),
        ..Default::default()
    });
    job
}

fn sm_owner() -> k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
    resource(MigrationMode::Job)
        .controller_owner_ref(&())
        .unwrap()
}

fn pod_with_summary(job: &str, summary: Value) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(format!("{job}-abcde")),
            namespace: Some(NS.into()),
            // The Job's own pod (see `finished`): only those are read.
            owner_references: Some(vec![
                k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                    api_version: "batch/v1".into(),
                    kind: "Job".into(),
                    name: job.into(),
                    uid: "uid-job".into(),
                    controller: Some(true),
                    block_owner_deletion: None,
                },
            ]),
            ..Default::default()
        },
        status: Some(PodStatus {
            container_statuses: Some(vec![ContainerStatus {
                name: "migrate".into(),
                state: Some(ContainerState {
                    terminated: Some(ContainerStateTerminated {
                        exit_code: summary["exitCode"].as_i64().unwrap_or(0) as i32,
                        message: Some(summary.to_string()),
                        finished_at: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                            "2026-11-25T07:00:09Z".parse().unwrap(),
                        )),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_new_resource_creates_exactly_the_expected_job() {
    let (_db, url) = database(Some("1"));
    let sm = resource(MigrationMode::Job);
    let (seen, result) = reconcile_once(sm.clone(), world(&url)).await;
    result.unwrap();
    let jobs = posts(&seen, "/jobs");
    assert_eq!(jobs.len(), 1, "exactly one Job: {seen:#?}");
    let job: Job = serde_json::from_value(jobs[0].body.clone()).unwrap();
    let name = job.metadata.name.clone().unwrap();
    assert!(name.starts_with("orders-") && name.len() <= 63, "{name}");
    let owner = &job.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
        ("SchemaMigration", "uid-orders", Some(true))
    );
    let pod = job.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let c = &pod.containers[0];
    assert_eq!(c.image.as_deref(), Some(IMAGE));
    assert_eq!(c.args.as_ref().unwrap()[..3], ["migrate", "upgrade", "3"]);
    let env = c.env.as_ref().unwrap();
    let db = env.iter().find(|e| e.name == "DATABASE_URL").unwrap();
    assert!(db.value.is_none());
    assert_eq!(
        db.value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap()
            .name,
        "orders-db"
    );
    assert!(
        !serde_json::to_string(&job).unwrap().contains(&url),
        "the URL is never copied into the Job"
    );
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(
        (
            sc.run_as_non_root,
            sc.read_only_root_filesystem,
            sc.allow_privilege_escalation
        ),
        (Some(true), Some(true), Some(false))
    );
    let vol = pod
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "schemagate-migrations")
        .unwrap();
    assert_eq!(vol.config_map.as_ref().unwrap().name, "orders-migrations");
    // A runner stopped with its pod (exit 18, an eviction) is not a failed attempt.
    let policy = &jobs[0].body["spec"]["podFailurePolicy"]["rules"];
    assert_eq!(
        policy[0],
        json!({"action": "Ignore", "onExitCodes":
               {"containerName": c.name, "operator": "In", "values": [18]}})
    );
    assert_eq!(
        policy[1]["onPodConditions"][0],
        json!({"type": "DisruptionTarget", "status": "True"})
    );
    assert_eq!(pod.restart_policy.as_deref(), Some("Never"));

    let status = status_patch(&seen);
    assert_eq!(status["phase"], "Migrating");
    assert_eq!(
        status["currentVersion"], "1",
        "read from the real history table"
    );
    assert_eq!(status["targetVersion"], "3");
    assert_eq!(status["pending"], json!(["2", "3"]));
    assert_eq!(status["observedGeneration"], 1);
    assert_eq!(condition(&status, "Reconciling")["status"], "True");
    assert_eq!(condition(&status, "DatabaseReachable")["status"], "True");
    assert!(
        posts(&seen, "/events")
            .iter()
            .any(|e| e.body["reason"] == "JobCreated")
    );
    // Secrets are read with get; never listed.
    assert!(
        seen.iter()
            .all(|s| !(s.method == "GET" && s.path.ends_with("/secrets")))
    );
}

#[tokio::test]
async fn job_success_makes_the_resource_ready_with_versions() {
    let (_db, url) = database(Some("1"));
    let sm = resource(MigrationMode::Job);
    let w = world(&url);
    let job = created_job(&sm, &w).await;
    let name = job.metadata.name.clone().unwrap();
    // The runner migrates the database and reports.
    let mig = MigDir::new();
    for (n, t) in files() {
        mig.file(n, t);
    }
    let mut c = migrate(&url, mig.path());
    c.arg("upgrade");
    assert_code(&run(c), 0);
    let mut w = w;
    w.jobs = vec![finished(job, true)];
    w.pods = vec![pod_with_summary(
        &name,
        json!({"schemagate": 1, "command": "upgrade", "result": "success", "from": "1", "to": "3", "applied": ["2", "3"], "exitCode": 0, "durationMs": 40}),
    )];
    let (seen, result) = reconcile_once(sm, w).await;
    result.unwrap();
    assert!(posts(&seen, "/jobs").is_empty(), "no second Job");
    let status = status_patch(&seen);
    assert_eq!(status["phase"], "Ready");
    assert_eq!(status["currentVersion"], "3");
    assert_eq!(condition(&status, "Ready")["status"], "True");
    assert_eq!(condition(&status, "Stalled")["status"], "False");
    assert_eq!(status["applied"].as_array().unwrap().len(), 3);
    let run = &status["lastRun"];
    assert_eq!(
        (
            run["kind"].as_str(),
            run["name"].as_str(),
            run["result"].as_str()
        ),
        (Some("Job"), Some(name.as_str()), Some("Succeeded"))
    );
    assert_eq!(run["message"], "applied 2, 3 (1 -> 3)");
}

#[tokio::test]
async fn job_failure_makes_the_resource_failed_and_stalled_with_the_runner_message() {
    let (_db, url) = database(Some("1"));
    let sm = resource(MigrationMode::Job);
    let w = world(&url);
    let job = created_job(&sm, &w).await;
    let name = job.metadata.name.clone().unwrap();
    let mut w = w;
    w.jobs = vec![finished(job, false)];
    w.pods = vec![pod_with_summary(
        &name,
        json!({"schemagate": 1, "result": "failed", "exitCode": 12, "applied": [],
               "error": {"kind": "migration_failed", "message": "migration 2 (2_add_total.up.sql) failed at statement 1 of 1 (line 1): duplicate column name: total"}}),
    )];
    let (seen, result) = reconcile_once(sm, w).await;
    result.unwrap();
    assert!(
        posts(&seen, "/jobs").is_empty(),
        "a failed Job is not retried"
    );
    let status = status_patch(&seen);
    assert_failed_stalled(&status, "MigrationFailed", "2_add_total.up.sql");
    assert!(
        posts(&seen, "/events")
            .iter()
            .any(|e| e.body["type"] == "Warning" && e.body["reason"] == "MigrationFailed")
    );
}

#[tokio::test]
async fn an_existing_job_is_adopted_not_duplicated() {
    let (_db, url) = database(Some("1"));
    let sm = resource(MigrationMode::Job);
    let w = world(&url);
    let mut job = created_job(&sm, &w).await;
    // A restarted controller finds its Job still running: it waits for it.
    job.metadata.owner_references = Some(vec![sm_owner()]);
    job.status = Some(JobStatus {
        active: Some(1),
        ..Default::default()
    });
    let mut running = w.clone();
    running.jobs = vec![job];
    let (seen, result) = reconcile_once(sm.clone(), running).await;
    result.unwrap();
    assert!(posts(&seen, "/jobs").is_empty(), "{seen:#?}");
    let status = status_patch(&seen);
    assert_eq!(status["phase"], "Migrating");
    assert_eq!(condition(&status, "Reconciling")["reason"], "JobRunning");
    // A Job created by a concurrent reconciliation (409 on create) is adopted too.
    let mut conflict = w;
    conflict.job_conflict = true;
    let (seen, result) = reconcile_once(sm.clone(), conflict.clone()).await;
    result.unwrap();
    assert_eq!(posts(&seen, "/jobs").len(), 1);
    assert_eq!(status_patch(&seen)["phase"], "Migrating");
    // A Job somebody else created under that name is never taken for ours.
    // It is a permanent problem: the resource is Blocked and Stalled with the reason and
    // what to do, a Warning Event says so, and the retry is slow (not a hot loop).
    let mut squatted = conflict;
    squatted.job_squatted = true;
    let (seen, result) = reconcile_once(sm.clone(), squatted).await;
    let err = result.unwrap_err();
    assert!(
        err.to_string()
            .contains("was not created by this SchemaMigration"),
        "{err}"
    );
    assert_eq!(err.class(), reconcile::ErrorClass::Permanent);
    let status = status_patch(&seen);
    assert_eq!(status["phase"], "Blocked", "{status:#}");
    let stalled = condition(&status, "Stalled");
    assert_eq!(stalled["status"], "True");
    assert_eq!(stalled["reason"], "ObjectNotOwned");
    assert!(
        stalled["message"]
            .as_str()
            .unwrap()
            .contains("delete or rename"),
        "{stalled}"
    );
    assert_eq!(condition(&status, "Ready")["status"], "False");
    let warned = events(&seen, "ObjectNotOwned");
    assert_eq!(warned.len(), 1, "{seen:#?}");
}

/// A context whose API calls the mock answers with `status`, recording what it saw.
fn failing_context(
    status: StatusCode,
) -> (
    Arc<Context>,
    Arc<Mutex<Vec<Seen>>>,
    tokio::task::JoinHandle<()>,
) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let log = seen.clone();
    let api = tokio::spawn(async move {
        while let Some((request, send)) = handle.next_request().await {
            let (parts, body) = request.into_parts();
            let bytes = http_body_util::BodyExt::collect(body)
                .await
                .unwrap()
                .to_bytes();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            log.lock().unwrap().push(Seen {
                method: parts.method.to_string(),
                path: parts.uri.path().to_string(),
                query: parts.uri.query().unwrap_or_default().to_string(),
                body: body.clone(),
            });
            send.send_response(json_response(status, body));
        }
    });
    let client = Client::new(service, NS);
    let ctx = Arc::new(Context {
        client: client.clone(),
        settings: Settings::default(),
        metrics: Arc::new(Metrics::new()),
        recorder: EventRecorder::new(
            client,
            Reporter {
                controller: "schemagate-test".into(),
                instance: None,
            },
        ),
        failures: Default::default(),
        pods: kube::runtime::reflector::store::<Pod>().0,
        reads: Default::default(),
    });
    (ctx, seen, api)
}

#[tokio::test]
async fn a_transient_failure_backs_off_with_one_event_per_message_not_per_retry() {
    let sm = resource(MigrationMode::Job);
    let (ctx, seen, api) = failing_context(StatusCode::CREATED);
    let conflict = || reconcile::Error::Kube {
        op: "patch_status",
        source: kube::Error::Api(
            kube::core::Status::failure("the object has been modified", "Conflict")
                .with_code(409)
                .boxed(),
        ),
    };
    let mut delays = Vec::new();
    for _ in 0..4 {
        let e = conflict();
        assert_eq!(e.class(), reconcile::ErrorClass::Transient);
        reconcile::report_failure(&ctx, &sm, &e).await;
        let requeue = reconcile::error_policy(Arc::new(sm.clone()), &e, ctx.clone());
        delays.push(format!("{requeue:?}"));
    }
    api.abort();
    let seen = seen.lock().unwrap().clone();
    let warned: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.body.to_string().contains("ApiConflict") && s.path.contains("events"))
        .collect();
    assert_eq!(warned.len(), 1, "one Event for the streak: {seen:#?}");
    // Backoff grows: every delay differs from the one before.
    assert!(delays.windows(2).all(|w| w[0] != w[1]), "{delays:?}");
    let status = seen
        .iter()
        .find(|s| s.method == "PATCH" && s.path.ends_with("/status"))
        .expect("a status write")
        .body["status"]
        .clone();
    assert_eq!(condition(&status, "Reconciling")["reason"], "ApiConflict");
    assert_eq!(condition(&status, "Stalled")["status"], "False");
    let metrics = ctx.metrics.encode();
    assert!(
        metrics.contains(
            "schemagate_reconcile_errors_total{reason=\"patch_status\",class=\"transient\"} 4"
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_permanent_failure_is_retried_slowly_not_in_a_hot_loop() {
    let sm = resource(MigrationMode::Job);
    let (ctx, _seen, api) = failing_context(StatusCode::CREATED);
    let forbidden = reconcile::Error::Kube {
        op: "create_job",
        source: kube::Error::Api(
            kube::core::Status::failure("jobs.batch is forbidden", "Forbidden")
                .with_code(403)
                .boxed(),
        ),
    };
    assert_eq!(forbidden.class(), reconcile::ErrorClass::Permanent);
    reconcile::report_failure(&ctx, &sm, &forbidden).await;
    let requeue = reconcile::error_policy(Arc::new(sm.clone()), &forbidden, ctx.clone());
    api.abort();
    assert_eq!(
        format!("{requeue:?}"),
        format!(
            "{:?}",
            kube::runtime::controller::Action::requeue(Settings::default().requeue)
        )
    );
}

#[tokio::test]
async fn a_denied_downgrade_blocks_and_creates_nothing() {
    let (_db, url) = database(Some("3"));
    let mut sm = resource(MigrationMode::Job);
    sm.spec.target_version = Some("1".into());
    let (seen, result) = reconcile_once(sm, world(&url)).await;
    result.unwrap();
    assert!(posts(&seen, "/jobs").is_empty());
    let status = status_patch(&seen);
    assert_eq!(status["phase"], "Blocked");
    let stalled = condition(&status, "Stalled");
    assert_eq!(
        (stalled["status"].as_str(), stalled["reason"].as_str()),
        (Some("True"), Some("DowngradeDenied"))
    );
}

#[tokio::test]
async fn paused_creates_nothing_and_says_so() {
    let (_db, url) = database(Some("1"));
    let mut sm = resource(MigrationMode::Job);
    sm.spec.paused = true;
    let (seen, result) = reconcile_once(sm, world(&url)).await;
    result.unwrap();
    assert!(posts(&seen, "/jobs").is_empty());
    let status = status_patch(&seen);
    assert_eq!(status["phase"], "Pending");
    assert_eq!(condition(&status, "Reconciling")["reason"], "Paused");
}

#[tokio::test]
async fn a_missing_secret_is_named_and_nothing_else_is_read() {
    let (_db, url) = database(Some("1"));
    let mut w = world(&url);
    w.secret = None;
    let (seen, result) = reconcile_once(resource(MigrationMode::Job), w).await;
    let action = result.unwrap();
    assert!(posts(&seen, "/jobs").is_empty());
    let status = status_patch(&seen);
    let stalled = condition(&status, "Stalled");
    assert_eq!(stalled["reason"], "SecretNotFound");
    assert!(stalled["message"].as_str().unwrap().contains("orders-db"));
    // Retried: a missing Secret appears later.
    assert_ne!(action, kube::runtime::controller::Action::await_change());
}

#[tokio::test]
async fn a_steady_state_writes_nothing() {
    let (_db, url) = database(Some("3"));
    let sm = resource(MigrationMode::InitContainer);
    let (seen, result) = reconcile_once(sm.clone(), world(&url)).await;
    result.unwrap();
    let status: schemagate::api::SchemaMigrationStatus =
        serde_json::from_value(status_patch(&seen)).unwrap();
    assert_eq!(status.phase, Some(schemagate::api::Phase::Ready));
    let mut settled = sm;
    settled.status = Some(status);
    let (seen, result) = reconcile_once(settled, world(&url)).await;
    result.unwrap();
    let writes: Vec<&Seen> = seen.iter().filter(|s| s.method != "GET").collect();
    assert!(
        writes.is_empty(),
        "no writes when nothing changed: {writes:#?}"
    );
}

#[tokio::test]
async fn a_read_that_got_no_answer_is_tried_again_not_reported() {
    let (_db, url) = database(Some("3"));
    let mut settled = resource(MigrationMode::InitContainer);
    let (seen, result) = reconcile_once(settled.clone(), world(&url)).await;
    result.unwrap();
    settled.status = Some(written_status(&seen));
    // Steady state; the Secret's read goes unanswered once (a kept-alive connection the
    // API server closed as the request went out).
    let mut w = world(&url);
    w.unanswered = 1;
    let (seen, result) = reconcile_once(settled.clone(), w).await;
    result.unwrap();
    let gets: Vec<&str> = seen
        .iter()
        .filter(|s| s.method == "GET")
        .map(|s| s.path.as_str())
        .collect();
    assert!(
        gets.len() == 3 && gets[0] == gets[1] && gets[0].ends_with("/secrets/orders-db"),
        "{gets:?}"
    );
    let writes: Vec<&Seen> = seen.iter().filter(|s| s.method != "GET").collect();
    assert!(writes.is_empty(), "nothing to report: {writes:#?}");
    // Twice in a row is a failure to report.
    let mut w = world(&url);
    w.unanswered = 2;
    let (seen, result) = reconcile_once(settled, w).await;
    let e = result.unwrap_err();
    assert_eq!(e.class(), reconcile::ErrorClass::Transient, "{e}");
    let status = written_status(&seen);
    let reconciling = status.conditions.iter().find(|c| c.type_ == "Reconciling");
    assert_eq!(
        reconciling.map(|c| (c.status.as_str(), c.reason.as_str())),
        Some(("True", "ApiUnreachable")),
        "{seen:#?}"
    );
}

/// The status a reconciliation wrote (of whichever resource).
fn written_status(seen: &[Seen]) -> schemagate::api::SchemaMigrationStatus {
    let p: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.method == "PATCH" && s.path.ends_with("/status"))
        .collect();
    assert_eq!(p.len(), 1, "{seen:#?}");
    serde_json::from_value(p[0].body["status"].clone()).unwrap()
}

#[tokio::test]
async fn resources_on_one_database_share_a_read_until_a_run_moves_it() {
    let (_db, url) = database(Some("2"));
    let mut w = world(&url);
    let orders = resource(MigrationMode::InitContainer);
    w.resource = serde_json::to_value(&orders).unwrap();
    let mut cluster = Cluster::new(
        w,
        Settings {
            database_read_ttl: Duration::from_secs(3600),
            ..Cluster::settings()
        },
    );
    let mut billing = orders.clone();
    billing.metadata.name = Some("billing".into());
    billing.metadata.uid = Some("uid-billing".into());

    let (seen, result) = cluster.reconcile(orders.clone()).await;
    result.unwrap();
    let orders_status = written_status(&seen);
    assert_eq!(orders_status.current_version.as_deref(), Some("2"));

    // A pod of `orders` migrates the database to 3 (here: the binary, as its init
    // container would).
    let mig = MigDir::new();
    for (n, t) in files() {
        mig.file(n, t);
    }
    let mut c = migrate(&url, mig.path());
    c.args(["upgrade", "3"]);
    assert_code(&run(c), 0);

    // `billing` names the same database and source: it takes the read `orders` made.
    let (seen, result) = cluster.reconcile(billing.clone()).await;
    result.unwrap();
    let billing_status = written_status(&seen);
    assert_eq!(
        billing_status.current_version.as_deref(),
        Some("2"),
        "shared within the time to live"
    );

    // `orders` sees its pod's run finish: it reads the database afresh...
    let applied =
        json!({"result": "applied", "from": "2", "to": "3", "applied": ["3"], "exitCode": 0});
    cluster.pod(&gated_pod("web-1", "2026-11-25T07:00:05Z", applied, false));
    let mut settled = orders.clone();
    settled.status = Some(orders_status);
    let (seen, result) = cluster.reconcile(settled).await;
    result.unwrap();
    let status = written_status(&seen);
    assert_eq!(status.current_version.as_deref(), Some("3"));
    assert_eq!(status.phase, Some(schemagate::api::Phase::Ready));

    // ... and `billing` gets that newer read.
    let mut settled = billing;
    settled.status = Some(billing_status);
    let (seen, result) = cluster.reconcile(settled).await;
    result.unwrap();
    assert_eq!(written_status(&seen).current_version.as_deref(), Some("3"));
}

/// An app pod gated by `orders`, its injected init container finished as `summary` says
/// (`restarting`: the kubelet restarts it after that failure).
fn gated_pod(name: &str, finished_at: &str, summary: Value, restarting: bool) -> Pod {
    let code = summary["exitCode"].as_i64().unwrap_or(0) as i32;
    let terminated = ContainerState {
        terminated: Some(ContainerStateTerminated {
            exit_code: code,
            message: Some(format!("some log line\n{summary}")),
            started_at: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                "2026-11-25T07:00:00Z".parse().unwrap(),
            )),
            finished_at: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                finished_at.parse().unwrap(),
            )),
            ..Default::default()
        }),
        ..Default::default()
    };
    let waiting = ContainerState {
        waiting: Some(k8s_openapi::api::core::v1::ContainerStateWaiting {
            reason: Some("CrashLoopBackOff".into()),
            message: None,
        }),
        ..Default::default()
    };
    let (state, last_state) = if restarting {
        (waiting, Some(terminated))
    } else {
        (terminated, None)
    };
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(NS.into()),
            labels: Some([(MIGRATION_LABEL.to_string(), "orders".to_string())].into()),
            annotations: Some([("big".to_string(), "x".repeat(4096))].into()),
            ..Default::default()
        },
        spec: Some(Default::default()),
        status: Some(PodStatus {
            init_container_statuses: Some(vec![ContainerStatus {
                name: "schemagate-migrate".into(),
                state: Some(state),
                last_state,
                ..Default::default()
            }]),
            ..Default::default()
        }),
    }
}

fn events<'a>(seen: &'a [Seen], reason: &str) -> Vec<&'a Seen> {
    posts(seen, "/events")
        .into_iter()
        .filter(|e| e.body["reason"] == reason)
        .collect()
}

#[tokio::test]
async fn init_container_runs_are_recorded_from_the_pod_that_migrated() {
    let (_db, url) = database(Some("3"));
    let mut w = world(&url);
    let applied =
        json!({"result": "applied", "from": "1", "to": "3", "applied": ["2", "3"], "exitCode": 0});
    let noop = json!({"result": "noop", "current": "3", "exitCode": 0});
    // The pod that migrated, and a later one that found nothing to do.
    w.pods = vec![
        gated_pod("web-7f9-a", "2026-11-25T07:00:05Z", applied, false),
        gated_pod("web-7f9-b", "2026-11-25T07:00:06Z", noop, false),
    ];
    let mut sm = resource(MigrationMode::InitContainer);
    sm.status = Some(Default::default());
    let (seen, result) = reconcile_once(sm, w).await;
    result.unwrap();
    assert!(posts(&seen, "/jobs").is_empty());
    assert!(
        !seen.iter().any(|s| s.path.ends_with("/pods")),
        "pods come from the watch, not a list: {seen:#?}"
    );
    let status = status_patch(&seen);
    assert_eq!(status["phase"], "Ready");
    assert_eq!(status["currentVersion"], "3");
    let last = &status["lastRun"];
    assert_eq!(
        (
            last["kind"].as_str(),
            last["name"].as_str(),
            last["result"].as_str()
        ),
        (Some("Pod"), Some("web-7f9-a"), Some("Succeeded"))
    );
    assert_eq!(last["message"], "applied 2, 3 (1 -> 3)");
    assert_eq!(last["finishedAt"], "2026-11-25T07:00:05Z");
    let migrated = events(&seen, "Migrated");
    assert_eq!(migrated.len(), 1, "{seen:#?}");
    assert!(
        migrated[0].body["note"]
            .as_str()
            .unwrap()
            .contains("pod web-7f9-a applied 2, 3"),
        "{:?}",
        migrated[0].body
    );
}

#[tokio::test]
async fn a_failed_init_container_fails_the_resource_with_the_runner_message() {
    let (_db, url) = database(Some("1"));
    let mut w = world(&url);
    let failed = json!({"result": "failed", "from": "1", "applied": [], "exitCode": 13,
        "error": {"kind": "migration_failed", "message": "migration 2 failed at statement 1: no such table: order"}});
    w.pods = vec![gated_pod("web-8a1-a", "2026-11-25T07:00:05Z", failed, true)];
    let (seen, result) = reconcile_once(resource(MigrationMode::InitContainer), w).await;
    result.unwrap();
    let status = status_patch(&seen);
    assert_eq!(status["phase"], "Failed");
    let stalled = condition(&status, "Stalled");
    assert_eq!(stalled["reason"], "MigrationFailed");
    let message = stalled["message"].as_str().unwrap();
    assert!(
        message.contains("web-8a1-a") && message.contains("no such table: order"),
        "{message}"
    );
    assert_eq!(status["lastRun"]["result"], "Failed");
    let warned = events(&seen, "MigrationFailed");
    assert_eq!(warned.len(), 1, "one Event, not one per source: {seen:#?}");
    assert_eq!(warned[0].body["type"], "Warning");
}

#[tokio::test]
async fn an_init_container_stopped_with_its_pod_is_not_a_failure() {
    let (_db, url) = database(Some("1"));
    let mut w = world(&url);
    // The pod was deleted while its runner waited for the lock: SIGTERM, exit 18.
    let stopped = json!({"result": "stopped", "applied": [], "exitCode": 18,
        "error": {"kind": "stopped", "message": "stopped at once on request (SIGTERM)"}});
    w.pods = vec![
        gated_pod("web-8a1-a", "2026-11-25T07:00:05Z", stopped.clone(), false),
        gated_pod("web-8a1-b", "2026-11-25T07:00:06Z", stopped, true),
    ];
    let (seen, result) = reconcile_once(resource(MigrationMode::InitContainer), w).await;
    result.unwrap();
    let status = status_patch(&seen);
    assert_ne!(status["phase"], "Failed", "{status:#}");
    assert_ne!(status["lastRun"]["result"], "Failed", "{status:#}");
    assert_ne!(status["lastRun"]["name"], "web-8a1-a", "{status:#}");
    assert!(events(&seen, "MigrationFailed").is_empty(), "{seen:#?}");
}

#[tokio::test]
async fn init_container_mode_creates_the_inline_config_map_the_pods_mount() {
    let (_db, url) = database(None);
    let mut w = world(&url);
    w.config_map = None;
    let sm = inline_resource();
    let (seen, result) = reconcile_once(sm, w).await;
    result.unwrap();
    let created = posts(&seen, "/configmaps");
    assert_eq!(created.len(), 1, "{seen:#?}");
    let name = created[0].body["metadata"]["name"].as_str().unwrap();
    assert!(name.starts_with("orders-inline-"), "{name}");
    assert_eq!(
        created[0].body["metadata"]["ownerReferences"][0]["kind"],
        "SchemaMigration"
    );
    assert_eq!(status_patch(&seen)["phase"], "Migrating");
}

#[tokio::test]
async fn a_new_inline_source_deletes_all_but_the_newest_superseded_config_maps() {
    let (_db, url) = database(None);
    let mut w = world(&url);
    w.config_map = None;
    let old = |name: &str, day: u32, owners: Value| {
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": name, "namespace": NS, "uid": format!("uid-{name}"),
                            "creationTimestamp": format!("2026-11-{day:02}T00:00:00Z"),
                            "labels": {schemagate::api::JOB_FOR_LABEL: "orders"},
                            "ownerReferences": owners}})
    };
    let ours = json!([sm_owner()]);
    w.labelled_config_maps = vec![
        old("orders-inline-a", 1, ours.clone()),
        old("orders-inline-d", 4, ours.clone()),
        old("someone-elses", 2, json!([])),
        old("orders-inline-b", 2, ours.clone()),
        old("orders-inline-c", 3, ours.clone()),
    ];
    let sm = inline_resource();
    let (seen, result) = reconcile_once(sm, w).await;
    result.unwrap();
    assert_eq!(posts(&seen, "/configmaps").len(), 1, "{seen:#?}");
    let listed: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.method == "GET" && s.path.ends_with("/configmaps"))
        .collect();
    assert_eq!(listed.len(), 1);
    assert!(
        listed[0]
            .query
            .contains("labelSelector=schemagate.dev%2Fjob-for%3Dorders")
            || listed[0]
                .query
                .contains("labelSelector=schemagate.dev/job-for=orders"),
        "{}",
        listed[0].query
    );
    // The two newest superseded ones stay (pods admitted before may mount them); the older
    // ones this resource owns go, each only if it is still the same object; others' stay.
    let deleted: Vec<(&str, &Value)> = seen
        .iter()
        .filter(|s| s.method == "DELETE")
        .map(|s| (s.path.rsplit('/').next().unwrap(), &s.body))
        .collect();
    let names: Vec<&str> = deleted.iter().map(|(n, _)| *n).collect();
    assert_eq!(names, ["orders-inline-b", "orders-inline-a"], "{seen:#?}");
    assert_eq!(deleted[1].1["preconditions"]["uid"], "uid-orders-inline-a");
    assert_eq!(status_patch(&seen)["phase"], "Migrating");
}

/// A log sink for one test.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn the_controller_shows_the_database_password_nowhere() {
    let password = "Pl41n-S3cret&pw";
    let encoded = support::postgres::urlencode(password);
    // Unreachable on purpose: the connection error is the likeliest place for a URL.
    let url = format!("postgres://app:{encoded}@127.0.0.1:1/orders?sslmode=disable");
    let logs = Captured::default();
    let sink = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || sink.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let sm = resource(MigrationMode::Job);
    let mut w = world(&url);
    // A Job that failed, whose runner (an older or foreign one) put the URL in its message.
    let job = finished(created_job(&sm, &w).await, false);
    let name = job.metadata.name.clone().unwrap();
    w.jobs = vec![job];
    w.pods = vec![pod_with_summary(
        &name,
        json!({"result": "failed", "exitCode": 11, "error": {"kind": "connect",
               "message": format!("cannot connect to {url}: password {password} rejected")}}),
    )];
    let (seen, result) = reconcile_once(sm.clone(), w.clone()).await;
    result.unwrap();
    let status = status_patch(&seen);
    assert_eq!(
        status["phase"], "Failed",
        "the failure is reported: {status}"
    );
    let reachable = condition(&status, "DatabaseReachable");
    assert_eq!(reachable["status"], "False");

    // A failing reconciliation goes through error_policy: log line, metric, Event.
    let ctx_metrics = Arc::new(Metrics::new());
    let err = reconcile::Error::Kube {
        op: "get_secret",
        source: kube::Error::Service(format!("connecting to {url} failed").into()),
    };
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let events: Arc<Mutex<Vec<Value>>> = Arc::default();
    let log = events.clone();
    let (first, arrived) = tokio::sync::oneshot::channel::<()>();
    let mut first = Some(first);
    let api = tokio::spawn(async move {
        while let Some((request, send)) = handle.next_request().await {
            let bytes = http_body_util::BodyExt::collect(request.into_body())
                .await
                .unwrap()
                .to_bytes();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            log.lock().unwrap().push(body.clone());
            send.send_response(json_response(StatusCode::CREATED, body));
            if let Some(f) = first.take() {
                let _ = f.send(());
            }
        }
    });
    let client = Client::new(service, NS);
    let ctx = Arc::new(Context {
        client: client.clone(),
        settings: Settings::default(),
        metrics: ctx_metrics.clone(),
        recorder: EventRecorder::new(
            client,
            Reporter {
                controller: "schemagate-test".into(),
                instance: None,
            },
        ),
        failures: Default::default(),
        pods: kube::runtime::reflector::store::<Pod>().0,
        reads: Default::default(),
    });
    reconcile::report_failure(&ctx, &sm, &err).await;
    tokio::time::timeout(Duration::from_secs(10), arrived)
        .await
        .expect("the error Event within 10s")
        .unwrap();
    api.abort();

    let mut surfaces: Vec<(String, String)> = seen
        .iter()
        .map(|s| {
            (
                format!("{} {}?{}", s.method, s.path, s.query),
                s.body.to_string(),
            )
        })
        .collect();
    surfaces.extend(
        events
            .lock()
            .unwrap()
            .iter()
            .map(|e| ("error Event".to_string(), e.to_string())),
    );
    surfaces.push((
        "logs".into(),
        String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned(),
    ));
    surfaces.push(("metrics".into(), ctx_metrics.encode()));
    assert!(
        surfaces.iter().any(|(at, _)| at == "logs")
            && surfaces.iter().any(|(_, t)| t.contains("ApiUnreachable")),
        "the error went somewhere"
    );
    for (at, text) in &surfaces {
        assert!(
            !text.contains(password) && !text.contains(&encoded),
            "{at} shows the password: {text}"
        );
    }
}

#[tokio::test]
async fn a_tool_sources_status_comes_from_the_tools_own_table() {
    use schemagate::api::{ToolName, ToolSource};
    let (_db, url) = database(None);
    // The harness's SQL helper runs its own runtime: off this one.
    let sql = |url: &str, text: &'static str| {
        let url = url.to_string();
        std::thread::spawn(move || exec(&url, text)).join().unwrap()
    };
    sql(
        &url,
        "CREATE TABLE schema_migrations (version bigint NOT NULL PRIMARY KEY, dirty boolean NOT NULL);
         INSERT INTO schema_migrations VALUES (20251102, 0)",
    );
    let mut sm = resource(MigrationMode::InitContainer);
    sm.spec.source = SourceSpec {
        tool: Some(ToolSource {
            name: ToolName::GolangMigrate,
            image: "shop/api:7".into(),
            command: vec!["migrate".into(), "-path".into(), "/m".into(), "up".into()],
            working_dir: None,
            env: vec![],
        }),
        ..Default::default()
    };
    let mut w = world(&url);
    w.config_map = None;
    let (seen, result) = reconcile_once(sm.clone(), w.clone()).await;
    result.unwrap();
    assert!(
        !seen.iter().any(|s| s.path.contains("configmaps")),
        "a tool source reads no ConfigMap: {seen:#?}"
    );
    let status = status_patch(&seen);
    assert_eq!(status["currentVersion"], "20251102");
    assert_eq!(condition(&status, "DatabaseReachable")["status"], "True");

    // A dirty golang-migrate state: Failed, Stalled, with the tool's repair command.
    sql(&url, "UPDATE schema_migrations SET dirty = 1");
    let (seen, result) = reconcile_once(sm, w).await;
    result.unwrap();
    let status = status_patch(&seen);
    assert_failed_stalled(&status, "ToolNeedsRepair", "migrate force 20251102");
}

#[tokio::test]
async fn an_inline_config_map_somebody_else_created_blocks_the_resource() {
    let (_db, url) = database(None);
    let mut w = world(&url);
    w.config_map = None;
    w.inline_squatted = true;
    let sm = inline_resource();
    let (seen, result) = reconcile_once(sm, w).await;
    result.unwrap();
    assert!(posts(&seen, "/configmaps").is_empty(), "{seen:#?}");
    let status = status_patch(&seen);
    // Blocked: the webhook refuses gated pods, so none mounts the impostor.
    assert_eq!(status["phase"], "Blocked");
    let stalled = condition(&status, "Stalled");
    assert_eq!(stalled["reason"], "InvalidSource");
    assert!(
        stalled["message"]
            .as_str()
            .unwrap()
            .contains("was not created by this SchemaMigration"),
        "{stalled}"
    );
}

/// A controller restarted while its Job runs (every `reconcile_once` is a fresh
/// controller: new context, no memory) adopts the Job, never creates a second one, and
/// carries the status forward to the Job's end.
#[tokio::test]
async fn a_controller_restarted_mid_run_adopts_its_job_and_carries_the_status_forward() {
    let (_db, url) = database(Some("1"));
    let mut sm = resource(MigrationMode::Job);
    let w = world(&url);
    // The first controller creates the Job and records it, then dies (kill -9).
    let (seen, result) = reconcile_once(sm.clone(), w.clone()).await;
    result.unwrap();
    let job: Job = serde_json::from_value(posts(&seen, "/jobs")[0].body.clone()).unwrap();
    let name = job.metadata.name.clone().unwrap();
    let before: schemagate::api::SchemaMigrationStatus =
        serde_json::from_value(status_patch(&seen)).unwrap();
    assert_eq!(before.phase, Some(schemagate::api::Phase::Migrating));
    sm.status = Some(before);

    // The new controller starts while the Job runs: its watch delivers the resource and
    // the Job, maybe several times (a resync, the Job's own events).
    let mut running = w.clone();
    let mut active = job.clone();
    active.metadata.uid = Some("uid-job".into());
    active.metadata.owner_references = Some(vec![sm_owner()]);
    active.status = Some(JobStatus {
        active: Some(1),
        ..Default::default()
    });
    running.jobs = vec![active];
    let (seen, result) = reconcile_once(sm.clone(), running.clone()).await;
    result.unwrap();
    assert!(
        posts(&seen, "/jobs").is_empty(),
        "never a second Job: {seen:#?}"
    );
    let status = status_patch(&seen);
    assert_eq!(status["phase"], "Migrating");
    assert_eq!(condition(&status, "Reconciling")["reason"], "JobRunning");
    assert_eq!(status["lastRun"]["name"], name.as_str());
    assert_eq!(status["lastRun"]["result"], "Running");
    sm.status = Some(serde_json::from_value(status).unwrap());
    // The same events again: nothing is created and nothing is written.
    let (seen, result) = reconcile_once(sm.clone(), running.clone()).await;
    result.unwrap();
    let writes: Vec<&Seen> = seen.iter().filter(|s| s.method != "GET").collect();
    assert!(writes.is_empty(), "{writes:#?}");

    // The Job finishes while nobody watches; the restarted controller reports it.
    let mig = MigDir::new();
    for (n, t) in files() {
        mig.file(n, t);
    }
    let mut c = migrate(&url, mig.path());
    c.arg("upgrade");
    assert_code(&run(c), 0);
    let mut done = w;
    done.jobs = vec![finished(job, true)];
    done.pods = vec![pod_with_summary(
        &name,
        json!({"schemagate": 1, "command": "upgrade", "result": "success", "from": "1", "to": "3", "applied": ["2", "3"], "exitCode": 0, "lockWaitMs": 12}),
    )];
    let (seen, result) = reconcile_once(sm, done).await;
    result.unwrap();
    assert!(posts(&seen, "/jobs").is_empty());
    let status = status_patch(&seen);
    assert_eq!(status["phase"], "Ready");
    assert_eq!(status["lastRun"]["name"], name.as_str());
    assert_eq!(status["lastRun"]["result"], "Succeeded");
    assert_eq!(events(&seen, "Migrated").len(), 1, "{seen:#?}");
}

/// `exec` from an async test (it starts its own runtime: on another thread).
fn exec_off_runtime(url: &str, sql: &str) {
    std::thread::scope(|t| {
        t.spawn(|| exec(url, sql));
    });
}

/// The runner's environment in a Job the controller created, as `(name, value)`.
fn job_env(job: &Job) -> Vec<(String, String)> {
    job.spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
        .env
        .iter()
        .flatten()
        .filter_map(|e| e.value.clone().map(|v| (e.name.clone(), v)))
        .collect()
}

#[tokio::test]
async fn drift_is_checked_on_its_interval_and_reported_as_a_condition() {
    let (_db, url) = database(Some("3"));
    let mut sm = resource(MigrationMode::InitContainer);
    sm.spec.drift = Some(schemagate::api::DriftSpec {
        interval: "1h".into(),
        on_drift: schemagate::api::DriftAction::Report,
    });
    let (seen, result) = reconcile_once(sm.clone(), world(&url)).await;
    result.unwrap();
    let status = status_patch(&seen);
    assert_eq!(status["phase"], "Ready");
    assert_eq!(status["schemaDrift"]["result"], "Clean", "{status:#}");
    assert_eq!(condition(&status, "SchemaDrifted")["status"], "False");
    let mut settled = sm.clone();
    settled.status = Some(serde_json::from_value(status).unwrap());

    // Someone adds an index by hand. A reconcile within the interval (a repeated watch
    // event) does not check again and writes nothing.
    exec_off_runtime(&url, "CREATE INDEX orders_customer ON orders (customer)");
    let (seen, result) = reconcile_once(settled.clone(), world(&url)).await;
    result.unwrap();
    assert!(seen.iter().all(|s| s.method == "GET"), "{seen:#?}");

    // Once the interval has passed: the drift is found, named, and told once.
    let mut due = settled.clone();
    let drift = due.status.as_mut().unwrap().schema_drift.as_mut().unwrap();
    drift.checked_at = Some("2026-01-01T00:00:00Z".into());
    let (seen, result) = reconcile_once(due.clone(), world(&url)).await;
    result.unwrap();
    let status = status_patch(&seen);
    assert_eq!(status["phase"], "Ready", "drift does not block by default");
    assert_eq!(status["schemaDrift"]["result"], "Drifted");
    assert_eq!(status["schemaDrift"]["count"], 1);
    assert_eq!(
        status["schemaDrift"]["differences"][0],
        "index orders_customer on orders exists but no migration created it (CREATE INDEX orders_customer ON orders (customer))"
    );
    let c = condition(&status, "SchemaDrifted");
    assert_eq!(
        (c["status"].as_str(), c["reason"].as_str()),
        (Some("True"), Some("SchemaDrifted"))
    );
    let events: Vec<&Seen> = posts(&seen, "/events")
        .into_iter()
        .filter(|e| e.body["reason"] == "SchemaDrifted")
        .collect();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].body["type"], "Warning");

    // While a migration runs (a gated pod's init container), the schema is in motion: no
    // check, the last result stays.
    let mut drifted = due.clone();
    drifted.status = Some(serde_json::from_value(status).unwrap());
    let mut moving = drifted.clone();
    moving
        .status
        .as_mut()
        .unwrap()
        .schema_drift
        .as_mut()
        .unwrap()
        .checked_at = Some("2026-01-01T00:00:00Z".into());
    let mut w = world(&url);
    exec_off_runtime(&url, "DROP INDEX orders_customer");
    w.pods = vec![running_gated_pod()];
    let (seen, result) = reconcile_once(moving, w).await;
    result.unwrap();
    let status = status_patch(&seen); // the running pod is news: lastRun
    assert_eq!(status["lastRun"]["result"], "Running", "{status:#}");
    assert_eq!(status["schemaDrift"]["result"], "Drifted", "not re-checked");
    assert_eq!(
        status["schemaDrift"]["checkedAt"], "2026-01-01T00:00:00Z",
        "the last result stays"
    );

    // onDrift: Block makes the resource Blocked (the webhook then refuses gated pods).
    exec_off_runtime(&url, "CREATE INDEX orders_customer ON orders (customer)");
    let mut block = due.clone();
    block.spec.drift.as_mut().unwrap().on_drift = schemagate::api::DriftAction::Block;
    let (seen, result) = reconcile_once(block, world(&url)).await;
    result.unwrap();
    let status = status_patch(&seen);
    assert_eq!(status["phase"], "Blocked");
    assert_eq!(condition(&status, "Stalled")["reason"], "SchemaDrifted");
}

/// A gated pod whose init container is running (a migration in progress).
fn running_gated_pod() -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web-1", "namespace": NS, "labels": {MIGRATION_LABEL: "orders"},
                     "creationTimestamp": "2026-12-06T08:00:00Z"},
        "spec": {"containers": [{"name": "app", "image": "app"}],
                 "initContainers": [{"name": "schemagate-migrate", "image": IMAGE}]},
        "status": {"initContainerStatuses": [{"name": "schemagate-migrate", "image": IMAGE, "imageID": "",
            "ready": false, "restartCount": 0, "state": {"running": {"startedAt": "2026-12-06T08:00:01Z"}}}]}
    }))
    .unwrap()
}

#[tokio::test]
async fn a_plan_that_needs_approval_blocks_with_its_hash_until_approved() {
    let (_db, url) = database(Some("3"));
    let mut w = world(&url);
    let destructive = (
        "4_drop_customer.up.sql",
        "-- schemagate:allow-destructive customers moved to the CRM\nALTER TABLE orders DROP COLUMN customer;\n",
    );
    w.config_map
        .as_mut()
        .unwrap()
        .data
        .as_mut()
        .unwrap()
        .insert(destructive.0.into(), destructive.1.into());
    let mut sm = resource(MigrationMode::Job);
    sm.spec.approval.required = vec![schemagate::api::ApprovalKind::Destructive];
    let job = created_job(&sm, &w).await;
    let env = job_env(&job);
    assert!(
        env.contains(&("SCHEMAGATE_REQUIRE_APPROVAL".into(), "Destructive".into())),
        "{env:?}"
    );

    // The Job's runner, as the kubelet starts it: refused, with the plan's hash.
    let mig = MigDir::new();
    for (n, t) in files().into_iter().chain([destructive]) {
        mig.file(n, t);
    }
    let summary = tempfile::NamedTempFile::new().unwrap();
    let runner = |env: &[(String, String)]| {
        let mut c = migrate(&url, mig.path());
        c.envs(
            env.iter()
                .filter(|(n, _)| {
                    n.starts_with("SCHEMAGATE_")
                        && n != "SCHEMAGATE_DIR"
                        && n != "SCHEMAGATE_SUMMARY_FILE"
                })
                .cloned(),
        )
        .env("SCHEMAGATE_SUMMARY_FILE", summary.path())
        .arg("upgrade");
        let o = run(c);
        let line: Value =
            serde_json::from_str(std::fs::read_to_string(summary.path()).unwrap().trim()).unwrap();
        (o, line)
    };
    let (o, line) = runner(&env);
    assert_code(&o, 21);
    let hash = line["planHash"].as_str().unwrap().to_string();
    let name = job.metadata.name.clone().unwrap();
    let mut failed = w.clone();
    failed.jobs = vec![finished(job.clone(), false)];
    failed.pods = vec![pod_with_summary(&name, line)];
    let (seen, result) = reconcile_once(sm.clone(), failed.clone()).await;
    result.unwrap();
    assert!(
        posts(&seen, "/jobs").is_empty(),
        "no retry of an unapproved plan"
    );
    let status = status_patch(&seen);
    assert_eq!(status["phase"], "Blocked");
    let stalled = condition(&status, "Stalled");
    assert_eq!(stalled["reason"], "ApprovalRequired");
    assert!(
        stalled["message"].as_str().unwrap().contains(&hash),
        "{stalled}"
    );

    // Approved: a new Job (another name) that carries the approval, and runs.
    let mut approved = sm.clone();
    approved.metadata.generation = Some(2);
    approved.spec.approved_plans = vec![schemagate::api::ApprovedPlan {
        plan_hash: hash.clone(),
        approved_by: "dba@example.com".into(),
        reason: Some("customers moved to the CRM".into()),
    }];
    approved.status = Some(serde_json::from_value(status).unwrap());
    let (seen, result) = reconcile_once(approved, failed).await;
    result.unwrap();
    let jobs = posts(&seen, "/jobs");
    assert_eq!(jobs.len(), 1, "{seen:#?}");
    let second: Job = serde_json::from_value(jobs[0].body.clone()).unwrap();
    assert_ne!(second.metadata.name, job.metadata.name);
    let env = job_env(&second);
    assert!(
        env.contains(&("SCHEMAGATE_APPROVED_PLANS".into(), hash.clone())),
        "{env:?}"
    );
    let (o, line) = runner(&env);
    assert_code(&o, 0);
    assert_eq!(line["planHash"], hash.as_str());
    assert_eq!(line["applied"], json!(["4"]));
}

/// A fleet's tenant: a SQLite database and the Secret holding its URL.
fn tenant(name: &str, dir: &Path) -> Secret {
    let url = format!("sqlite:{}", dir.join(format!("{name}.db")).display());
    std::fs::write(dir.join(format!("{name}.db")), b"").unwrap();
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(NS.into()),
            labels: Some([("app".to_string(), "orders".to_string())].into()),
            ..Default::default()
        },
        data: Some([("url".to_string(), ByteString(url.into_bytes()))].into()),
        ..Default::default()
    }
}

fn fleet_resource() -> SchemaMigration {
    let mut sm = resource(MigrationMode::Job);
    sm.spec.database = None;
    sm.spec.databases = Some(schemagate::api::DatabasesSpec {
        secret_selector: k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector {
            match_labels: Some([("app".to_string(), "orders".to_string())].into()),
            ..Default::default()
        },
        key: "url".into(),
        canary: 1,
        max_parallel: 2,
        on_failure: schemagate::api::FleetFailurePolicy::Halt,
    });
    sm
}

/// Runs a fleet Job's runner as the kubelet would: its Secrets as files in /databases, the
/// ConfigMap's files in /migrations; returns its summary line and exit code.
fn run_fleet_job_code(job: &Job, w: &World) -> (Value, i32) {
    let work = tempfile::tempdir().unwrap();
    let (dbs, mig) = (
        work.path().join("databases"),
        work.path().join("migrations"),
    );
    std::fs::create_dir_all(&dbs).unwrap();
    std::fs::create_dir_all(&mig).unwrap();
    for name in schemagate::controller::job::batch_members(job) {
        let s = w
            .fleet_secrets
            .iter()
            .find(|s| s.metadata.name.as_deref() == Some(&name))
            .unwrap();
        std::fs::write(dbs.join(&name), &s.data.as_ref().unwrap()["url"].0).unwrap();
    }
    for (n, t) in w.config_map.as_ref().unwrap().data.as_ref().unwrap() {
        std::fs::write(mig.join(n), t).unwrap();
    }
    let c = &job
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0];
    let summary = work.path().join("summary");
    let mut cmd = std::process::Command::new(bin());
    cmd.env_clear()
        .args(c.args.as_ref().unwrap().iter().map(|a| {
            if a == "/databases" {
                dbs.display().to_string()
            } else {
                a.clone()
            }
        }))
        .env("SCHEMAGATE_DIR", &mig)
        .env("SCHEMAGATE_SUMMARY_FILE", &summary);
    let code = code(&run(cmd));
    let line = serde_json::from_str(std::fs::read_to_string(summary).unwrap().trim()).unwrap();
    (line, code)
}

fn run_fleet_job(job: &Job, w: &World) -> Value {
    let (line, code) = run_fleet_job_code(job, w);
    assert_eq!(code, 0, "{line}");
    line
}

#[tokio::test]
async fn a_fleet_runs_its_canary_then_batches_and_a_restarted_controller_adopts_the_running_job() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = world("sqlite:unused.db");
    w.fleet_secrets = ["tenant-a", "tenant-b", "tenant-c", "tenant-d"]
        .iter()
        .map(|n| tenant(n, dir.path()))
        .collect();
    let sm = fleet_resource();
    // The canary first, alone.
    let (seen, result) = reconcile_once(sm.clone(), w.clone()).await;
    result.unwrap();
    let jobs = posts(&seen, "/jobs");
    assert_eq!(jobs.len(), 1, "{seen:#?}");
    let canary: Job = serde_json::from_value(jobs[0].body.clone()).unwrap();
    assert_eq!(
        schemagate::controller::job::batch_members(&canary),
        ["tenant-a"]
    );
    let status = status_patch(&seen);
    assert_eq!(status["phase"], "Migrating");
    assert_eq!(status["databases"]["total"], 4);
    assert_eq!(status["databases"]["pending"], 4);
    let summary = run_fleet_job(&canary, &w);
    assert_eq!(summary["result"], "success", "{summary}");

    // The canary is done: one batch with the rest.
    let canary_name = canary.metadata.name.clone().unwrap();
    w.jobs = vec![finished(canary.clone(), true)];
    w.pods = vec![pod_with_summary(&canary_name, summary)];
    let (seen, result) = reconcile_once(sm.clone(), w.clone()).await;
    result.unwrap();
    let jobs = posts(&seen, "/jobs");
    assert_eq!(jobs.len(), 1, "{seen:#?}");
    let batch: Job = serde_json::from_value(jobs[0].body.clone()).unwrap();
    assert_eq!(
        schemagate::controller::job::batch_members(&batch),
        ["tenant-b", "tenant-c", "tenant-d"]
    );
    assert_eq!(status_patch(&seen)["databases"]["atTarget"], 1);

    // The controller restarts while the batch runs: it finds the Job, makes no other.
    let mut running = batch.clone();
    running.metadata.uid = Some("uid-batch".into());
    running.metadata.owner_references = Some(vec![sm_owner()]);
    running.metadata.creation_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            "2026-11-25T08:00:00Z".parse().unwrap(),
        ));
    w.jobs = vec![running, finished(canary, true)];
    let (seen, result) = reconcile_once(sm.clone(), w.clone()).await;
    result.unwrap();
    assert!(posts(&seen, "/jobs").is_empty(), "{seen:#?}");
    let status = status_patch(&seen);
    assert!(
        status["conditions"][1]["message"]
            .as_str()
            .unwrap()
            .contains("is migrating 3 database(s)"),
        "{status:#}"
    );

    // It finishes: all four at the target, Ready.
    let summary = run_fleet_job(&batch, &w);
    assert_eq!(summary["result"], "success");
    w.jobs = vec![finished(batch, true)];
    let (seen, result) = reconcile_once(sm, w).await;
    result.unwrap();
    let status = status_patch(&seen);
    assert_eq!(status["phase"], "Ready", "{status:#}");
    assert_eq!(status["databases"]["atTarget"], 4);
    assert_eq!(status["targetVersion"], "3");
}

#[tokio::test]
async fn a_failing_tenant_halts_the_fleet_and_the_resource_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = world("sqlite:unused.db");
    w.fleet_secrets = ["tenant-a", "tenant-b", "tenant-c", "tenant-d"]
        .iter()
        .map(|n| tenant(n, dir.path()))
        .collect();
    // tenant-c's database already has what migration 2 adds (changed by hand): it fails.
    let c = dir.path().join("tenant-c.db");
    let url = format!("sqlite:{}", c.display());
    let mig = MigDir::new();
    mig.file(
        "1_create_orders.up.sql",
        "CREATE TABLE orders (id INTEGER PRIMARY KEY);\n",
    );
    let mut cmd = migrate(&url, mig.path());
    cmd.arg("upgrade");
    assert_code(&run(cmd), 0);
    exec_off_runtime(&url, "ALTER TABLE orders ADD COLUMN total INTEGER");
    let mut sm = fleet_resource();
    sm.spec.databases.as_mut().unwrap().canary = 0;
    sm.spec.databases.as_mut().unwrap().max_parallel = 1;
    let (seen, result) = reconcile_once(sm.clone(), w.clone()).await;
    result.unwrap();
    let batch: Job = serde_json::from_value(posts(&seen, "/jobs")[0].body.clone()).unwrap();
    assert_eq!(schemagate::controller::job::batch_members(&batch).len(), 4);
    // The batch's runner, for real: c fails, d is not started (halt).
    let (summary, code) = run_fleet_job_code(&batch, &w);
    assert_eq!(code, 22, "{summary}");
    assert_eq!(summary["result"], "failed");
    let name = batch.metadata.name.clone().unwrap();
    w.jobs = vec![finished(batch, false)];
    w.pods = vec![pod_with_summary(&name, summary)];
    let (seen, result) = reconcile_once(sm, w).await;
    result.unwrap();
    assert!(posts(&seen, "/jobs").is_empty(), "halted: no new batch");
    let status = status_patch(&seen);
    assert_eq!(status["phase"], "Failed", "{status:#}");
    let failed = &status["databases"]["failedDatabases"];
    assert_eq!(failed.as_array().unwrap().len(), 1, "{status:#}");
    assert_eq!(failed[0]["secret"], "tenant-c");
    assert!(
        failed[0]["reason"].as_str().unwrap().contains("total"),
        "{status:#}"
    );
    assert_eq!(status["databases"]["atTarget"], 2);
    assert_eq!(
        status["databases"]["pending"], 1,
        "tenant-d was not started"
    );
    let stalled = condition(&status, "Stalled");
    assert!(
        stalled["message"].as_str().unwrap().contains("tenant-c"),
        "{stalled}"
    );
}
