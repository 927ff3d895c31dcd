//! The gate under the orderings a real cluster produces. A GitOps sync (Argo CD, Flux,
//! `kubectl apply -f`) changes the migrations and the app in one apply; the ReplicaSet
//! creates the new pods at once, and the webhook admits them before the controller has
//! reconciled (or while it is down). In every case the app container may start only once
//! the database is at the version its own pod's migrations define.
//!
//! Real parts: the webhook's admission (`review`, real AdmissionReview JSON, the resource
//! read through the real `KubeLookup` from a mock API server), the controller's real
//! `reconcile` against the same mock API server, and the real `schemagate` binary started
//! as a kubelet would start the injected init containers and the controller's Jobs
//! (volumes materialised from what the API server holds at mount time), on a real SQLite
//! database (PostgreSQL for expand/contract).
//!
//! Expand/contract: a rename in one release, old and new pods side by side; the contract
//! migration runs once, only after the last old pod is gone; rollback pods are admitted
//! before it and refused after it; new pods never wait for a held contract migration.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Request, Response, StatusCode};
use k8s_openapi::ByteString;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, PodSpec, Secret};
use kube::Client;
use kube::api::ObjectMeta;
use kube::client::Body;
use kube::runtime::events::Reporter;
use schemagate::api::{
    DowngradePolicy, ImageSource, InlineMigration, MigrationMode, Phase, SchemaMigration,
    SchemaMigrationSpec, SchemaMigrationStatus, SourceSpec,
};
use schemagate::controller::events::EventRecorder;
use schemagate::controller::reconcile::{self, Context, Settings};
use schemagate::runner::policy::RunnerPolicy;
use schemagate::telemetry::metrics::Metrics;
use schemagate::webhook::server::{KubeLookup, Webhook, review};
use serde_json::{Value, json};
use support::*;

const NS: &str = "shop";
const IMAGE: &str = "ghcr.io/schemagate/schemagate:test";

/// What the API server holds.
#[derive(Default)]
struct Store {
    sm: Option<SchemaMigration>,
    secret: Option<Secret>,
    config_maps: BTreeMap<String, ConfigMap>,
    jobs: BTreeMap<String, Job>,
    /// Every write: (method, path).
    writes: Vec<(String, String)>,
}

type Shared = Arc<Mutex<Store>>;

fn respond(status: StatusCode, body: Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(&body).unwrap()))
        .unwrap()
}

fn status(code: u16, reason: &str) -> Response<Body> {
    respond(
        StatusCode::from_u16(code).unwrap(),
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code, "message": reason}),
    )
}

fn found<T: serde::Serialize>(v: Option<&T>) -> Response<Body> {
    match v {
        Some(v) => respond(StatusCode::OK, serde_json::to_value(v).unwrap()),
        None => status(404, "NotFound"),
    }
}

fn list<T: serde::Serialize>(kind: &str, items: Vec<&T>) -> Response<Body> {
    respond(
        StatusCode::OK,
        json!({"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": items}),
    )
}

/// Answers one request from the store, as the API server would.
fn answer(store: &mut Store, method: &str, path: &str, body: Value) -> Response<Body> {
    let last = path.rsplit('/').next().unwrap_or_default().to_string();
    if method != "GET" {
        store.writes.push((method.into(), path.into()));
    }
    match method {
        "GET" if path.contains("/schemamigrations/") => found(store.sm.as_ref()),
        "GET" if path.contains("/secrets/") => found(store.secret.as_ref()),
        "GET" if path.ends_with("/configmaps") => {
            list("ConfigMapList", store.config_maps.values().collect())
        }
        "GET" if path.contains("/configmaps/") => found(store.config_maps.get(&last)),
        "GET" if path.ends_with("/jobs") => list("JobList", store.jobs.values().collect()),
        "GET" if path.contains("/jobs/") => found(store.jobs.get(&last)),
        // A finished Job's pods (their termination messages): gone with the test's kubelet.
        "GET" if path.ends_with("/pods") => list::<Pod>("PodList", Vec::new()),
        "POST" if path.ends_with("/configmaps") => {
            let cm: ConfigMap = serde_json::from_value(body.clone()).unwrap();
            let name = cm.metadata.name.clone().unwrap();
            if store.config_maps.contains_key(&name) {
                return status(409, "AlreadyExists");
            }
            store.config_maps.insert(name, cm);
            respond(StatusCode::CREATED, body)
        }
        "POST" if path.ends_with("/jobs") => {
            let job: Job = serde_json::from_value(body.clone()).unwrap();
            let name = job.metadata.name.clone().unwrap();
            if store.jobs.contains_key(&name) {
                return status(409, "AlreadyExists");
            }
            store.jobs.insert(name, job);
            respond(StatusCode::CREATED, body)
        }
        "PATCH" if path.ends_with("/status") => {
            let sm = store.sm.as_mut().unwrap();
            sm.status = serde_json::from_value(body["status"].clone()).unwrap();
            respond(StatusCode::OK, serde_json::to_value(&*sm).unwrap())
        }
        "DELETE" if path.contains("/configmaps/") => {
            store.config_maps.remove(&last);
            respond(
                StatusCode::OK,
                json!({"kind": "Status", "status": "Success"}),
            )
        }
        // Events (core and events.k8s.io).
        "POST" | "PATCH" => respond(StatusCode::CREATED, body),
        _ => status(404, "NotFound"),
    }
}

/// A client whose requests the store answers (kube's tower-test mock service).
fn client(store: &Shared) -> (Client, tokio::task::JoinHandle<()>) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let store = store.clone();
    let task = tokio::spawn(async move {
        while let Some((request, send)) = handle.next_request().await {
            let (parts, body) = request.into_parts();
            let bytes = http_body_util::BodyExt::collect(body)
                .await
                .unwrap()
                .to_bytes();
            let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let response = answer(
                &mut store.lock().unwrap(),
                parts.method.as_str(),
                parts.uri.path(),
                body,
            );
            send.send_response(response);
        }
    });
    (Client::new(service, NS), task)
}

fn policy(wait: Duration) -> RunnerPolicy {
    RunnerPolicy {
        image: IMAGE.into(),
        wait_timeout: wait,
        ..Default::default()
    }
}

/// The migrations 1..=n: migration k creates table tk (the app of version k reads it).
fn migrations(n: u32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for k in 1..=n {
        out.push((
            format!("{k}_t{k}.up.sql"),
            format!("CREATE TABLE t{k} (id INTEGER PRIMARY KEY);\n"),
        ));
        out.push((format!("{k}_t{k}.down.sql"), format!("DROP TABLE t{k};\n")));
    }
    out
}

fn config_map(name: &str, n: u32) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(NS.into()),
            ..Default::default()
        },
        data: Some(migrations(n).into_iter().collect()),
        ..Default::default()
    }
}

fn inline(n: u32) -> Vec<InlineMigration> {
    (1..=n)
        .map(|k| InlineMigration {
            version: k.to_string(),
            description: format!("t{k}"),
            up: format!("CREATE TABLE t{k} (id INTEGER PRIMARY KEY);\n"),
            down: Some(format!("DROP TABLE t{k};\n")),
        })
        .collect()
}

/// A resource that the controller last saw Ready at 3 (its status says so, for the
/// generation it observed).
fn resource(mode: MigrationMode, source: SourceSpec) -> SchemaMigration {
    let mut sm = SchemaMigration::new(
        "orders",
        SchemaMigrationSpec {
            mode,
            ..SchemaMigrationSpec::new("orders-db", "url", source)
        },
    );
    sm.metadata.namespace = Some(NS.into());
    sm.metadata.uid = Some("uid-orders".into());
    sm.metadata.generation = Some(1);
    sm.status = Some(SchemaMigrationStatus {
        observed_generation: Some(1),
        phase: Some(Phase::Ready),
        current_version: Some("3".into()),
        target_version: Some("3".into()),
        ..Default::default()
    });
    sm
}

/// A cluster with a database (SQLite migrated to 3 by the real binary, unless given).
struct Cluster {
    store: Shared,
    /// The database URL the Secret holds.
    url: String,
    _sqlite: Option<SqliteDb>,
    /// The gated pods running (as the controller's pod watch delivers them).
    running: Mutex<Vec<Pod>>,
    /// Image references -> the directory their files are in (a registry).
    images: HashMap<String, PathBuf>,
    _image_dirs: Vec<MigDir>,
    work: tempfile::TempDir,
}

impl Cluster {
    fn new(sm: SchemaMigration) -> Self {
        let db = sqlite_db();
        let three = MigDir::new();
        for (n, t) in migrations(3) {
            three.file(&n, &t);
        }
        let mut c = migrate(&db.url, three.path());
        c.args(["upgrade"]);
        assert_code(&run(c), 0);
        let url = db.url.clone();
        Self::on(sm, url, Some(db))
    }

    /// A cluster whose Secret names the database at `url`.
    fn on(sm: SchemaMigration, url: String, sqlite: Option<SqliteDb>) -> Self {
        let store = Store {
            sm: Some(sm),
            secret: Some(Secret {
                metadata: ObjectMeta {
                    name: Some("orders-db".into()),
                    namespace: Some(NS.into()),
                    resource_version: Some("7".into()),
                    ..Default::default()
                },
                data: Some([("url".to_string(), ByteString(url.as_bytes().to_vec()))].into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        Cluster {
            store: Arc::new(Mutex::new(store)),
            url,
            _sqlite: sqlite,
            running: Mutex::default(),
            images: HashMap::new(),
            _image_dirs: Vec::new(),
            work: tempfile::tempdir().unwrap(),
        }
    }

    /// Pushes a migrations image holding the migrations 1..=n at /migrations.
    fn push_image(&mut self, reference: &str, n: u32) {
        let dir = MigDir::new();
        std::fs::create_dir_all(dir.path().join("migrations")).unwrap();
        for (name, text) in migrations(n) {
            std::fs::write(dir.path().join("migrations").join(name), text).unwrap();
        }
        self.images
            .insert(reference.into(), dir.path().to_path_buf());
        self._image_dirs.push(dir);
    }

    /// The database's version, read by the real binary.
    fn version(&self) -> Option<String> {
        let empty = MigDir::new();
        let mut c = migrate(&self.url, empty.path());
        c.args(["current", "--output", "json"]);
        let o = run(c);
        assert_code(&o, 0);
        stdout_json(&o)["current"].as_str().map(String::from)
    }

    /// One apply of a GitOps sync: whatever `change` does to the store at once.
    fn apply(&self, change: impl FnOnce(&mut Store)) {
        let mut s = self.store.lock().unwrap();
        change(&mut s);
        if let Some(sm) = s.sm.as_mut() {
            // A spec change is a new generation; the status still describes the old one.
            sm.metadata.generation = Some(sm.metadata.generation.unwrap_or(1) + 1);
        }
    }

    /// The ReplicaSet creates a pod of the new app: the API server sends it to the webhook
    /// (a real AdmissionReview), which reads the resource from the API server. Returns the
    /// pod as admitted (patched).
    async fn admit(&self, pod_name: &str, wait: Duration) -> Pod {
        let (response, outcome) = self.review(pod_name, wait).await;
        assert_eq!(outcome, "injected", "{response:#}");
        let pod = app_pod(pod_name);
        let patch = response["response"]["patch"].as_str().unwrap();
        use base64::Engine;
        let patch: json_patch::Patch = serde_json::from_slice(
            &base64::engine::general_purpose::STANDARD
                .decode(patch)
                .unwrap(),
        )
        .unwrap();
        let mut value = serde_json::to_value(&pod).unwrap();
        json_patch::patch(&mut value, &patch).unwrap();
        serde_json::from_value(value).unwrap()
    }

    /// The webhook's answer for a new pod of the app: the AdmissionReview and the outcome.
    async fn review(&self, pod_name: &str, wait: Duration) -> (Value, &'static str) {
        let (client, task) = client(&self.store);
        let webhook = Webhook {
            lookup: KubeLookup {
                client,
                timeout: Duration::from_secs(5),
            },
            policy: policy(wait),
            metrics: Arc::new(Metrics::new()),
        };
        let pod = app_pod(pod_name);
        let body = json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": format!("uid-{pod_name}"),
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
                "requestResource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": NS,
                "operation": "CREATE",
                "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
                "object": serde_json::to_value(&pod).unwrap(),
                "dryRun": false,
                "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
            }
        });
        let (response, outcome) = review(&webhook, "/mutate", body.to_string().as_bytes()).await;
        task.abort();
        (response, outcome)
    }

    /// One reconcile of the resource by the real controller, as its watch delivers it.
    async fn reconcile(&self) {
        let (client, task) = client(&self.store);
        let (pods, mut writer) = kube::runtime::reflector::store::<Pod>();
        for pod in self.running.lock().unwrap().iter() {
            let mut slim = pod.clone();
            reconcile::slim_pod(&mut slim);
            writer.apply_watcher_event(&kube::runtime::watcher::Event::Apply(slim));
        }
        let ctx = Arc::new(Context {
            client: client.clone(),
            settings: Settings {
                runner: policy(Duration::from_secs(600)),
                ..Settings::default()
            },
            metrics: Arc::new(Metrics::new()),
            recorder: EventRecorder::new(
                client,
                Reporter {
                    controller: "schemagate-test".into(),
                    instance: None,
                },
            ),
            failures: Default::default(),
            pods,
            reads: Default::default(),
        });
        let sm = self.store.lock().unwrap().sm.clone().unwrap();
        let result = reconcile::reconcile(Arc::new(sm), ctx).await;
        task.abort();
        result.expect("reconcile");
    }

    /// The kubelet mounts a pod's volumes from what the API server holds now. `Err`: the
    /// pod cannot start yet (a ConfigMap it mounts does not exist: ContainerCreating).
    fn mount(&self, name: &str, spec: &PodSpec) -> Result<HashMap<String, PathBuf>, String> {
        let store = self.store.lock().unwrap();
        let mut out = HashMap::new();
        for v in spec.volumes.iter().flatten() {
            let dir = self.work.path().join(name).join(&v.name);
            std::fs::create_dir_all(&dir).unwrap();
            if let Some(cm) = &v.config_map {
                let Some(found) = store.config_maps.get(&cm.name) else {
                    return Err(format!("ConfigMap {} not found", cm.name));
                };
                for (file, text) in found.data.iter().flatten() {
                    std::fs::write(dir.join(file), text).unwrap();
                }
            }
            out.insert(v.name.clone(), dir);
        }
        Ok(out)
    }

    /// Starts one container as the kubelet would (`cp` of a migrations image is done here,
    /// from the registry; the schemagate binary runs for real).
    fn start(&self, pod: &str, c: &Container, volumes: &HashMap<String, PathBuf>) -> Option<Child> {
        let mount = |path: &str| -> PathBuf {
            let m = c
                .volume_mounts
                .iter()
                .flatten()
                .find(|m| m.mount_path == path)
                .unwrap_or_else(|| panic!("{} mounts nothing at {path}", c.name));
            volumes[&m.name].clone()
        };
        if c.command.as_ref().is_some_and(|cmd| cmd[0] == "cp") {
            let image = c.image.as_deref().unwrap();
            let root = self
                .images
                .get(image)
                .unwrap_or_else(|| panic!("image {image} not in the registry"));
            let cmd = c.command.as_ref().unwrap();
            let from = root.join(cmd[2].trim_start_matches('/').trim_end_matches("/."));
            let to = mount(cmd[3].trim_end_matches('/'));
            for f in std::fs::read_dir(from).unwrap() {
                let f = f.unwrap();
                std::fs::copy(f.path(), to.join(f.file_name())).unwrap();
            }
            return None;
        }
        let migrations = mount("/migrations");
        let mut cmd = Command::new(bin());
        cmd.env_clear().args(c.args.clone().unwrap_or_default());
        for e in c.env.iter().flatten() {
            let from = e.value_from.as_ref();
            let value = if from.is_some_and(|f| f.secret_key_ref.is_some()) {
                self.url.clone()
            } else if from.is_some_and(|f| f.field_ref.is_some()) {
                pod.to_string()
            } else {
                match e.value.as_deref().unwrap_or_default() {
                    "/migrations" => migrations.display().to_string(),
                    "/dev/termination-log" => self
                        .work
                        .path()
                        .join(format!("{pod}-{}.log", c.name))
                        .display()
                        .to_string(),
                    v => v.to_string(),
                }
            };
            cmd.env(&e.name, value);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Some(cmd.spawn().expect("start the runner"))
    }

    /// The summary a container wrote to its termination log.
    fn summary(&self, pod: &str, container: &str) -> Value {
        let path = self.work.path().join(format!("{pod}-{container}.log"));
        serde_json::from_str(std::fs::read_to_string(path).unwrap().trim()).unwrap()
    }

    /// Runs the Jobs the controller created that have not run yet (their init containers,
    /// then their runner), and marks them Complete as the Job controller would.
    fn run_jobs(&self) -> usize {
        let jobs: Vec<Job> = self
            .store
            .lock()
            .unwrap()
            .jobs
            .values()
            .filter(|j| j.status.is_none())
            .cloned()
            .collect();
        for job in &jobs {
            let name = job.metadata.name.clone().unwrap();
            let spec = job.spec.as_ref().unwrap().template.spec.clone().unwrap();
            let volumes = self.mount(&name, &spec).expect("the Job's volumes");
            for c in spec
                .init_containers
                .iter()
                .flatten()
                .chain(&spec.containers)
            {
                if let Some(child) = self.start(&name, c, &volumes) {
                    let o = child.wait_with_output().unwrap();
                    assert_code(&o, 0);
                }
            }
            let done = json!({"startTime": "2026-12-06T08:00:00Z", "completionTime": "2026-12-06T08:00:05Z",
                "conditions": [{"type": "Complete", "status": "True"}]});
            if let Some(j) = self.store.lock().unwrap().jobs.get_mut(&name) {
                j.status = Some(serde_json::from_value(done).unwrap());
            }
        }
        jobs.len()
    }
}

fn app_pod(name: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": NS,
            "labels": {"app": "web", "schemagate.dev/migration": "orders"}
        },
        "spec": {"containers": [{"name": "web", "image": "registry.example/web:4"}]}
    }))
    .unwrap()
}

/// A pod the kubelet is starting: its init containers run one by one; the app starts when
/// all of them exited 0.
struct Starting {
    name: String,
    pod: Pod,
    volumes: HashMap<String, PathBuf>,
}

impl Starting {
    /// Mounts the pod's volumes (the pod waits while a ConfigMap is missing).
    fn new(cluster: &Cluster, pod: Pod) -> Result<Self, String> {
        let name = pod.metadata.name.clone().unwrap();
        let volumes = cluster.mount(&name, pod.spec.as_ref().unwrap())?;
        Ok(Starting { name, pod, volumes })
    }

    fn init(&self) -> Vec<Container> {
        self.pod
            .spec
            .as_ref()
            .unwrap()
            .init_containers
            .clone()
            .unwrap_or_default()
    }

    /// Runs the init containers in order; the runner's exit code (the copy containers
    /// always succeed).
    fn run_init(&self, cluster: &Cluster, deadline: Duration) -> i32 {
        for c in self.init() {
            if let Some(child) = cluster.start(&self.name, &c, &self.volumes) {
                return finish(child, deadline);
            }
        }
        panic!("no runner was injected")
    }

    /// Starts the init containers; returns the runner, still running.
    fn spawn_init(&self, cluster: &Cluster) -> Child {
        for c in self.init() {
            if let Some(child) = cluster.start(&self.name, &c, &self.volumes) {
                return child;
            }
        }
        panic!("no runner was injected")
    }
}

/// Waits for a child to exit (deadline: then it is killed and the test fails).
fn finish(mut child: Child, deadline: Duration) -> i32 {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let o = child.wait_with_output().unwrap();
            if status.code() != Some(0) {
                eprintln!("{}", text(&o));
            }
            return status.code().unwrap_or(-1);
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            panic!("the runner did not finish within {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

const DEADLINE: Duration = Duration::from_secs(60);

/// The app starts: the database must be at the head of the pod's own migrations (4), and
/// the table the new app reads must be there.
#[track_caller]
fn app_starts_on(cluster: &Cluster, head: &str) {
    assert_eq!(
        cluster.version().as_deref(),
        Some(head),
        "the app container started on the wrong schema"
    );
    // The new app's table is there (read outside the test's async runtime).
    let url = cluster.url.clone();
    let sql = format!("SELECT count(*) FROM t{head}");
    let rows = std::thread::spawn(move || count(&url, &sql))
        .join()
        .unwrap();
    assert_eq!(rows, 0);
}

/// InitContainer mode: the admitted pod's runner migrates to the head of its own files.
async fn init_container_mode(cluster: &Cluster) {
    let pod = cluster.admit("web-new-0", Duration::from_secs(600)).await;
    let starting = Starting::new(cluster, pod).expect("the pod's volumes mount");
    assert_eq!(starting.run_init(cluster, DEADLINE), 0);
    app_starts_on(cluster, "4");
    let s = cluster.summary("web-new-0", "schemagate-migrate");
    assert_eq!(s["applied"], json!(["4"]), "{s}");
}

/// Job mode: the admitted pod's runner waits for the head of its own files until the
/// controller's Job (after its reconcile) migrates.
async fn job_mode(cluster: &Cluster) {
    let pod = cluster.admit("web-new-0", Duration::from_secs(600)).await;
    let starting = Starting::new(cluster, pod).expect("the pod's volumes mount");
    let waiting = starting.spawn_init(cluster);
    // Only now does the controller see the change (its watch event arrives late).
    cluster.reconcile().await;
    assert_eq!(cluster.run_jobs(), 1, "one Job");
    assert_eq!(finish(waiting, DEADLINE), 0);
    app_starts_on(cluster, "4");
    let s = cluster.summary("web-new-0", "schemagate-migrate");
    assert_eq!(s["current"], "4", "the wait ended at 4: {s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_map_edited_in_place_with_the_app_gates_on_its_new_head() {
    for mode in [MigrationMode::InitContainer, MigrationMode::Job] {
        let sm = resource(mode, SourceSpec::config_map("orders-migrations"));
        let cluster = Cluster::new(sm);
        cluster.apply(|s| {
            s.config_maps.insert(
                "orders-migrations".into(),
                config_map("orders-migrations", 3),
            );
        });
        // The sync: migration 4 lands in the same ConfigMap, the app's new pods right after;
        // the resource itself did not change.
        {
            let mut s = cluster.store.lock().unwrap();
            s.config_maps.insert(
                "orders-migrations".into(),
                config_map("orders-migrations", 4),
            );
        }
        match mode {
            MigrationMode::InitContainer => init_container_mode(&cluster).await,
            MigrationMode::Job => job_mode(&cluster).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_config_map_and_the_app_in_one_apply_with_the_controller_down() {
    // InitContainer mode needs no controller at all.
    let sm = resource(
        MigrationMode::InitContainer,
        SourceSpec::config_map("orders-migrations-3"),
    );
    let cluster = Cluster::new(sm);
    cluster.apply(|s| {
        s.config_maps.insert(
            "orders-migrations-4".into(),
            config_map("orders-migrations-4", 4),
        );
        s.sm.as_mut().unwrap().spec.source = SourceSpec::config_map("orders-migrations-4");
    });
    init_container_mode(&cluster).await;

    // Job mode: the pod waits (and fails its wait, and is restarted) while the controller
    // is down; it never starts on schema 3; once the controller is back, it starts on 4.
    let sm = resource(
        MigrationMode::Job,
        SourceSpec::config_map("orders-migrations-3"),
    );
    let cluster = Cluster::new(sm);
    cluster.apply(|s| {
        s.config_maps.insert(
            "orders-migrations-4".into(),
            config_map("orders-migrations-4", 4),
        );
        s.sm.as_mut().unwrap().spec.source = SourceSpec::config_map("orders-migrations-4");
    });
    let pod = cluster.admit("web-new-0", Duration::from_secs(1)).await;
    let starting = Starting::new(&cluster, pod).expect("the pod's volumes mount");
    assert_eq!(
        starting.run_init(&cluster, DEADLINE),
        15,
        "the wait times out while nothing migrates"
    );
    assert_eq!(cluster.version().as_deref(), Some("3"));
    // The controller comes back; the kubelet restarts the failed init container.
    cluster.reconcile().await;
    assert_eq!(cluster.run_jobs(), 1);
    assert_eq!(starting.run_init(&cluster, DEADLINE), 0);
    app_starts_on(&cluster, "4");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inline_source_changed_with_the_app_gates_on_the_new_snapshot() {
    for mode in [MigrationMode::InitContainer, MigrationMode::Job] {
        let sm = resource(
            mode,
            SourceSpec {
                inline: Some(inline(3)),
                ..Default::default()
            },
        );
        let cluster = Cluster::new(sm);
        // The controller is down: nobody but the webhook can write the new snapshot.
        cluster.apply(|s| s.sm.as_mut().unwrap().spec.source.inline = Some(inline(4)));
        match mode {
            MigrationMode::InitContainer => init_container_mode(&cluster).await,
            MigrationMode::Job => job_mode(&cluster).await,
        }
        let s = cluster.store.lock().unwrap();
        let snapshots: Vec<&String> = s.config_maps.keys().collect();
        assert_eq!(
            snapshots.len(),
            1,
            "one snapshot, written once: {snapshots:?}"
        );
        let cm = &s.config_maps[snapshots[0]];
        assert_eq!(cm.immutable, Some(true));
        let owner = &cm.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(owner.uid, "uid-orders");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_source_whose_tag_moves_with_the_app_gates_on_the_new_images_head() {
    for mode in [MigrationMode::InitContainer, MigrationMode::Job] {
        let source = |tag: &str| SourceSpec {
            image: Some(ImageSource {
                reference: format!("registry.example/orders-migrations:{tag}"),
                path: "/migrations".into(),
            }),
            ..Default::default()
        };
        let mut cluster = Cluster::new(resource(mode, source("3")));
        cluster.push_image("registry.example/orders-migrations:3", 3);
        cluster.push_image("registry.example/orders-migrations:4", 4);
        cluster.apply(|s| s.sm.as_mut().unwrap().spec.source = source("4"));
        match mode {
            MigrationMode::InitContainer => init_container_mode(&cluster).await,
            MigrationMode::Job => job_mode(&cluster).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lowered_target_with_downgrades_allowed_reverts_whatever_the_status_says() {
    let mut sm = resource(
        MigrationMode::InitContainer,
        SourceSpec::config_map("orders-migrations"),
    );
    // The status is from before someone migrated by hand: it says 2, the database is at 3.
    sm.status.as_mut().unwrap().current_version = Some("2".into());
    let cluster = Cluster::new(sm);
    cluster.apply(|s| {
        s.config_maps.insert(
            "orders-migrations".into(),
            config_map("orders-migrations", 3),
        );
        let spec = &mut s.sm.as_mut().unwrap().spec;
        spec.target_version = Some("2".into());
        spec.downgrade = DowngradePolicy::Allow;
    });
    let pod = cluster.admit("web-old-0", Duration::from_secs(600)).await;
    let starting = Starting::new(&cluster, pod).unwrap();
    assert_eq!(starting.run_init(&cluster, DEADLINE), 0);
    assert_eq!(cluster.version().as_deref(), Some("2"));
    let s = cluster.summary("web-old-0", "schemagate-migrate");
    assert_eq!(s["applied"], json!(["3"]), "reverted 3: {s}");

    // With downgrades denied the same pod changes nothing (the controller blocks the
    // resource; see tests/controller.rs).
    let cluster = Cluster::new(resource(
        MigrationMode::InitContainer,
        SourceSpec::config_map("orders-migrations"),
    ));
    cluster.apply(|s| {
        s.config_maps.insert(
            "orders-migrations".into(),
            config_map("orders-migrations", 3),
        );
        s.sm.as_mut().unwrap().spec.target_version = Some("2".into());
    });
    let pod = cluster.admit("web-old-0", Duration::from_secs(600)).await;
    let starting = Starting::new(&cluster, pod).unwrap();
    assert_eq!(starting.run_init(&cluster, DEADLINE), 0);
    assert_eq!(cluster.version().as_deref(), Some("3"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_and_late_watch_events_create_one_job() {
    let cluster = Cluster::new(resource(
        MigrationMode::Job,
        SourceSpec::config_map("orders-migrations"),
    ));
    cluster.apply(|s| {
        s.config_maps.insert(
            "orders-migrations".into(),
            config_map("orders-migrations", 4),
        );
    });
    // The same change delivered three times (a resync, a ConfigMap event, a Job event)
    // before the Job ran, then once more after.
    for _ in 0..3 {
        cluster.reconcile().await;
    }
    assert_eq!(cluster.run_jobs(), 1);
    cluster.reconcile().await;
    let s = cluster.store.lock().unwrap();
    let creates = s
        .writes
        .iter()
        .filter(|(m, p)| m == "POST" && p.ends_with("/jobs"))
        .count();
    assert_eq!(creates, 1, "{:?}", s.writes);
    assert_eq!(s.jobs.len(), 1);
}

// Expand/contract: a rename done in one release. 1 creates users(fullname); 2 (expand) adds
// display_name and backfills it; 3 (contract) drops fullname. The old app reads fullname,
// the new one display_name.

const EXPAND: &str = "ALTER TABLE users ADD COLUMN display_name TEXT;\n\
UPDATE users SET display_name = fullname WHERE display_name IS NULL;\n";
const CONTRACT: &str = "-- schemagate:phase contract\n\
-- schemagate:allow-destructive fullname is display_name since 2\n\
ALTER TABLE users DROP COLUMN fullname;\n";

/// The release's migrations: 1, then 2 (expand) and 3 (contract) when `release` is 3.
fn rename_files(release: u32) -> BTreeMap<String, String> {
    let mut files = BTreeMap::from([(
        "1_users.up.sql".to_string(),
        "CREATE TABLE users (id SERIAL PRIMARY KEY, fullname TEXT);\n\
         INSERT INTO users (fullname) VALUES ('Ada');\n"
            .to_string(),
    )]);
    if release >= 3 {
        files.insert("2_display_name.up.sql".into(), EXPAND.into());
        files.insert("3_drop_fullname.up.sql".into(), CONTRACT.into());
    }
    files
}

fn set_release(cluster: &Cluster, release: u32) {
    set_files(cluster, rename_files(release));
}

/// The migrations' ConfigMap now holds `files` (a GitOps sync changed it).
fn set_files(cluster: &Cluster, files: BTreeMap<String, String>) {
    let mut s = cluster.store.lock().unwrap();
    s.config_maps.insert(
        "orders-migrations".into(),
        ConfigMap {
            metadata: ObjectMeta {
                name: Some("orders-migrations".into()),
                namespace: Some(NS.into()),
                ..Default::default()
            },
            data: Some(files),
            ..Default::default()
        },
    );
}

/// What each app version reads works (off the async runtime: `query` starts its own).
fn app_reads(url: &str, column: &str) -> Result<Vec<String>, String> {
    let (url, sql) = (
        url.to_string(),
        format!("SELECT {column} FROM users ORDER BY id"),
    );
    std::thread::spawn(move || {
        std::panic::catch_unwind(|| query(&url, &sql)).map_err(|e| {
            e.downcast_ref::<String>()
                .cloned()
                .unwrap_or_else(|| "query failed".into())
        })
    })
    .join()
    .unwrap()
}

fn history_rows(url: &str, version: &str) -> i64 {
    let (url, sql) = (
        url.to_string(),
        format!("SELECT count(*) FROM schemagate_history WHERE version = '{version}'"),
    );
    std::thread::spawn(move || count(&url, &sql))
        .join()
        .unwrap()
}

impl Cluster {
    /// Admits a pod, runs its init containers, and keeps it running (the controller's pod
    /// watch sees it, with the version the webhook recorded).
    async fn start_pod(&self, name: &str) -> String {
        let pod = self.admit(name, Duration::from_secs(30)).await;
        let version = pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(schemagate::api::VERSION_ANNOTATION))
            .cloned()
            .expect("the webhook records the pod's version");
        let starting = Starting::new(self, pod.clone()).expect("the pod's volumes mount");
        assert_eq!(starting.run_init(self, DEADLINE), 0, "{name}'s runner");
        let mut running = pod;
        running.status = Some(serde_json::from_value(json!({"phase": "Running"})).unwrap());
        self.running.lock().unwrap().push(running);
        version
    }

    fn stop_pods(&self, prefix: &str) {
        self.running.lock().unwrap().retain(|p| {
            !p.metadata
                .name
                .as_deref()
                .is_some_and(|n| n.starts_with(prefix))
        });
    }

    fn contract_jobs(&self) -> Vec<String> {
        self.store
            .lock()
            .unwrap()
            .jobs
            .iter()
            .filter(|(_, j)| {
                j.spec
                    .as_ref()
                    .unwrap()
                    .template
                    .spec
                    .as_ref()
                    .unwrap()
                    .containers[0]
                    .args
                    .as_ref()
                    .is_some_and(|a| a.iter().any(|x| x == "contract"))
            })
            .map(|(n, _)| n.clone())
            .collect()
    }

    fn status(&self) -> SchemaMigrationStatus {
        self.store
            .lock()
            .unwrap()
            .sm
            .as_ref()
            .unwrap()
            .status
            .clone()
            .unwrap_or_default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rename_in_one_release_contracts_only_after_the_old_pods_are_gone() {
    let url = std::thread::spawn(|| support::postgres::server().fresh_db())
        .join()
        .unwrap();
    let mut sm = resource(
        MigrationMode::InitContainer,
        SourceSpec::config_map("orders-migrations"),
    );
    sm.status = None;
    let cluster = Cluster::on(sm, url.clone(), None);
    set_release(&cluster, 1);
    // Release 1 runs: two pods of the old app.
    assert_eq!(cluster.start_pod("web-v1-a").await, "1");
    assert_eq!(cluster.start_pod("web-v1-b").await, "1");
    cluster.reconcile().await;
    assert_eq!(cluster.status().phase, Some(Phase::Ready));

    // Release 3 (a rolling update, old pods kept): the new pods' runners apply the expand
    // migration and hold the contract one; both app versions work.
    set_release(&cluster, 3);
    assert_eq!(cluster.start_pod("web-v3-a").await, "3");
    assert_eq!(cluster.version().as_deref(), Some("2"));
    assert_eq!(app_reads(&url, "fullname").unwrap(), ["Ada"], "old app");
    assert_eq!(app_reads(&url, "display_name").unwrap(), ["Ada"], "new app");
    let s = cluster.summary("web-v3-a", "schemagate-migrate");
    assert_eq!(s["applied"], json!(["2"]), "{s}");

    // The controller sees old pods: the contract migration is held, nothing runs; the
    // resource is Ready (the rollout goes on). Repeated events change nothing.
    for _ in 0..2 {
        cluster.reconcile().await;
        let st = cluster.status();
        assert_eq!(st.phase, Some(Phase::Ready), "{:?}", st.conditions);
        assert_eq!(st.contract.held.len(), 1, "{:?}", st.contract);
        assert_eq!(st.contract.held[0].version, "3");
        assert!(
            st.contract.held[0].reason.contains("web-v1-"),
            "{:?}",
            st.contract
        );
        assert!(cluster.contract_jobs().is_empty());
    }

    // A rollback to release 1 before the contract: admitted, changes nothing, runs.
    set_release(&cluster, 1);
    assert_eq!(cluster.start_pod("web-rb-a").await, "1");
    assert_eq!(
        cluster.version().as_deref(),
        Some("2"),
        "no implicit downgrade"
    );
    assert_eq!(app_reads(&url, "fullname").unwrap(), ["Ada"]);
    cluster.stop_pods("web-rb-");
    set_release(&cluster, 3);

    // One old pod left: still held. The last old pod goes: exactly one contract Job.
    cluster.stop_pods("web-v1-a");
    cluster.reconcile().await;
    assert!(cluster.contract_jobs().is_empty(), "web-v1-b still runs");
    cluster.stop_pods("web-v1-");
    assert_eq!(cluster.start_pod("web-v3-b").await, "3");
    cluster.reconcile().await;
    cluster.reconcile().await; // a late, repeated watch event
    let jobs = cluster.contract_jobs();
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(cluster.status().phase, Some(Phase::Ready));
    cluster.run_jobs();
    assert_eq!(history_rows(&url, "3"), 1, "applied exactly once");
    assert!(
        app_reads(&url, "fullname").is_err(),
        "the old column is gone"
    );
    assert_eq!(app_reads(&url, "display_name").unwrap(), ["Ada"], "new app");

    // The controller reports it: applied, when and by whom, the oldest compatible version.
    cluster.reconcile().await;
    let st = cluster.status();
    assert!(st.contract.held.is_empty(), "{:?}", st.contract);
    assert_eq!(st.contract.oldest_compatible_version.as_deref(), Some("3"));
    assert_eq!(st.contract.applied[0].version, "3");
    assert!(
        st.contract.applied[0]
            .applied_by
            .as_deref()
            .is_some_and(|b| b.starts_with(&jobs[0])),
        "{:?}",
        st.contract
    );
    assert_eq!(cluster.contract_jobs().len(), 1, "no second Job");

    // A rollback to release 1 now is refused at admission, naming the contract migration.
    set_release(&cluster, 1);
    let (response, outcome) = cluster.review("web-rb-b", Duration::from_secs(30)).await;
    assert_eq!(outcome, "denied", "{response:#}");
    let why = response["response"]["status"]["message"].as_str().unwrap();
    assert!(
        why.contains("contract migration 3") && why.contains("version 1"),
        "{why}"
    );
    // A pod of release 3 (or later) is admitted and changes nothing.
    set_release(&cluster, 3);
    assert_eq!(cluster.start_pod("web-v3-c").await, "3");
    assert_eq!(history_rows(&url, "3"), 1);
}

/// The no-deadlock rules: a new pod never waits for a held contract migration (Job mode:
/// its `wait` looks for the newest expand migration), and an expand migration newer than a
/// held contract one is applied, the contract one recorded later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_pods_never_wait_for_a_held_contract_migration() {
    let url = std::thread::spawn(|| support::postgres::server().fresh_db())
        .join()
        .unwrap();
    let mut sm = resource(
        MigrationMode::Job,
        SourceSpec::config_map("orders-migrations"),
    );
    sm.status = None;
    let cluster = Cluster::on(sm, url.clone(), None);
    set_release(&cluster, 1);
    cluster.reconcile().await;
    assert_eq!(cluster.run_jobs(), 1);
    let old = cluster.admit("web-v1-a", Duration::from_secs(30)).await;
    let mut old = old;
    old.status = Some(serde_json::from_value(json!({"phase": "Running"})).unwrap());
    cluster.running.lock().unwrap().push(old);

    // Release 4: 2 expand, 3 contract, 4 expand (an index the new app needs).
    let mut files = rename_files(3);
    files.insert(
        "4_users_display_idx.up.sql".into(),
        "CREATE INDEX users_display ON users (display_name);\n".into(),
    );
    set_files(&cluster, files);
    // The new pod is admitted and starts waiting before the controller reconciles.
    let pod = cluster.admit("web-v4-a", Duration::from_secs(30)).await;
    let starting = Starting::new(&cluster, pod).unwrap();
    let waiting = starting.spawn_init(&cluster);
    cluster.reconcile().await;
    cluster.run_jobs();
    assert_eq!(
        finish(waiting, DEADLINE),
        0,
        "the new pod did not wait for 3"
    );
    assert_eq!(cluster.version().as_deref(), Some("4"));
    assert_eq!(history_rows(&url, "3"), 0, "3 is held: web-v1-a still runs");
    assert_eq!(app_reads(&url, "fullname").unwrap(), ["Ada"]);
    cluster.reconcile().await;
    assert_eq!(cluster.status().contract.held[0].version, "3");
    assert!(cluster.contract_jobs().is_empty());

    // The old pod goes: 3 is applied below the current version 4, once.
    cluster.stop_pods("web-v1-");
    cluster.reconcile().await;
    assert_eq!(cluster.contract_jobs().len(), 1);
    cluster.run_jobs();
    assert_eq!(history_rows(&url, "3"), 1);
    assert_eq!(cluster.version().as_deref(), Some("4"));
    assert!(app_reads(&url, "fullname").is_err());
}
