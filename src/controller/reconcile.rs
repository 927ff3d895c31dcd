//! Reconcile one SchemaMigration: observe (Secret, source, database, Jobs) -> decide (pure,
//! `decide.rs`) -> act (create the Job, apply the status, record Events).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action as Requeue;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::Store;
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;

use super::decide::{
    self, Action, DbFailure, DbFailureKind, DbRead, DbView, Decision, DirtyStep, Drifted, Inputs,
    JobState, JobView, RunCommand, RunKind, RunSummary, SecretState, SourceState,
};
use super::events::EventRecorder;
use super::fleet;
use super::job;
use super::reads::{ReadKey, SharedReads};
use crate::api::conditions::{self, reason};
use crate::api::{
    AppliedMigration, FIELD_MANAGER, JOB_FOR_LABEL, MIGRATION_LABEL, MigrationMode, Phase,
    STATUS_LIST_MAX, SchemaDriftStatus, SchemaMigration, SchemaMigrationStatus,
};
use crate::engine::dialect::{ConnectConfig, Db, HistoryTable};
use crate::engine::{self, Backend, ChecksumMode, redact, runner, source};
use crate::runner::pod::INJECTED_CONTAINERS;
use crate::runner::policy::RunnerPolicy;
use crate::runner::source as files;
use crate::telemetry::metrics::Metrics;

/// How the controller behaves.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Which images and service accounts runners may use (shared with the webhook).
    pub runner: RunnerPolicy,
    /// Read each database's history table to report its version.
    pub observe_database: bool,
    /// How long a database read may take.
    pub db_timeout: Duration,
    /// How long one database read answers for every resource with the same database,
    /// history table and source (see `reads`); zero: only reads in flight are shared.
    pub database_read_ttl: Duration,
    /// Steady-state requeue: picks up Secret changes (Secrets are read, never watched)
    /// and database changes made outside schemagate.
    pub requeue: Duration,
    /// Requeue while a migration is expected to make progress.
    pub requeue_busy: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            runner: RunnerPolicy::default(),
            observe_database: true,
            db_timeout: Duration::from_secs(5),
            database_read_ttl: Duration::from_secs(10),
            requeue: Duration::from_secs(300),
            requeue_busy: Duration::from_secs(15),
        }
    }
}

/// Shared by every reconciliation.
pub struct Context {
    pub client: Client,
    pub settings: Settings,
    pub metrics: Arc<Metrics>,
    pub recorder: EventRecorder,
    /// Consecutive failures per resource (for backoff) and the last one's message (an
    /// Event is recorded when it changes, not at every retry).
    pub failures: Mutex<HashMap<String, Failures>>,
    /// Pods labelled `schemagate.dev/migration`, slimmed to what `pod_run` reads (see
    /// `slim_pod`), kept by a reflector: init-container runs cost no API reads.
    pub pods: Store<Pod>,
    /// Database reads shared between resources that name the same database and source.
    pub reads: SharedReads,
}

/// A resource's streak of failed reconciliations.
#[derive(Clone, Debug, Default)]
pub struct Failures {
    pub count: u32,
    pub last_message: String,
}

/// Why a reconciliation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op}: {source}")]
    Kube {
        op: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error("the resource has no namespace")]
    NoNamespace,
    #[error(
        "{kind} {name} exists but was not created by this SchemaMigration; schemagate will not \
         use it: delete it (or rename the resource)"
    )]
    NotOwned { kind: String, name: String },
}

/// Whether waiting can fix a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// It may pass by itself (API conflicts, timeouts, an API server that is restarting):
    /// retried with exponential backoff and jitter; the resource stays `Reconciling`.
    Transient,
    /// A person must act (a squatted object, an object the API server rejects, missing
    /// permissions): the resource turns `Stalled` with what to do; retried when something
    /// it watches changes, and slowly (every resync) otherwise.
    Permanent,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Transient => "transient",
            ErrorClass::Permanent => "permanent",
        }
    }
}

impl Error {
    /// A metric label: a fixed string, never the message.
    pub fn metric_reason(&self) -> &'static str {
        match self {
            Error::Kube { op, .. } => op,
            Error::NoNamespace => "no_namespace",
            Error::NotOwned { .. } => "not_owned",
        }
    }

    /// Transient or permanent (see [`ErrorClass`]).
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::Kube {
                source: kube::Error::Api(s),
                ..
            } if matches!(s.code, 400 | 403 | 422) => ErrorClass::Permanent,
            Error::Kube { .. } => ErrorClass::Transient,
            Error::NoNamespace | Error::NotOwned { .. } => ErrorClass::Permanent,
        }
    }

    /// The condition reason it is reported under.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube {
                source: kube::Error::Api(s),
                ..
            } => match s.code {
                403 => reason::FORBIDDEN,
                400 | 422 => reason::REJECTED,
                409 => reason::API_CONFLICT,
                _ => reason::API_ERROR,
            },
            Error::Kube { .. } => reason::API_UNREACHABLE,
            Error::NoNamespace => reason::REJECTED,
            Error::NotOwned { .. } => reason::OBJECT_NOT_OWNED,
        }
    }

    /// What a person should do about it (for the condition message).
    pub fn next_step(&self) -> &'static str {
        match (self.reason(), self.class()) {
            (reason::FORBIDDEN, _) => {
                "grant the schemagate controller's service account this permission (the chart's \
                 RBAC), then it retries by itself"
            }
            (reason::OBJECT_NOT_OWNED, _) => {
                "delete or rename that object; schemagate creates its own and goes on"
            }
            (_, ErrorClass::Permanent) => "fix the resource; schemagate retries when it changes",
            (_, ErrorClass::Transient) => "retrying with backoff; nothing to do unless it persists",
        }
    }
}

fn kube_err(op: &'static str) -> impl FnOnce(kube::Error) -> Error {
    move |source| Error::Kube { op, source }
}

/// True for a request that failed below the API: no answer from the server (a kept-alive
/// connection it closed just as the request went out, a GOAWAY, a reset), not a Status.
fn below_the_api(e: &kube::Error) -> bool {
    matches!(
        e,
        kube::Error::HyperError(_) | kube::Error::Service(_) | kube::Error::ReadEvents(_)
    )
}

/// A read, tried once more at once when it failed below the API. Such a failure says
/// nothing about the resource; reported, it would flip the status and back (two writes
/// and an Event) in a period when nothing changed. A second failure is reported.
async fn read<T, F, Fut>(op: &'static str, attempt: F) -> Result<T, Error>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, kube::Error>>,
{
    match attempt().await {
        Err(e) if below_the_api(&e) => {
            let e = redact::redact(&e.to_string()).into_owned();
            tracing::debug!(op, error = %e, "a read failed below the API; trying once more");
            attempt().await.map_err(kube_err(op))
        }
        result => result.map_err(kube_err(op)),
    }
}

/// What was observed, with the database URL kept out of it.
pub struct Observed {
    pub secret: SecretState,
    pub source: SourceState,
    pub database: DbView,
    pub jobs: Vec<JobView>,
    /// An inline source's ConfigMap: its name, and whether it exists (owned by this
    /// resource: one somebody else created makes the source invalid).
    pub inline_config_map: Option<(String, bool)>,
    /// A live-schema drift check, when one was due.
    pub schema_drift: Option<SchemaDriftStatus>,
    /// The running gated pods and the versions they are for.
    pub pods: Vec<decide::PodVersion>,
}

/// True when `meta` names the resource with `uid` as its controller.
fn owned_by(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    uid: Option<&String>,
) -> bool {
    uid.is_some_and(|uid| {
        meta.owner_references
            .iter()
            .flatten()
            .any(|o| &o.uid == uid && o.controller == Some(true))
    })
}

async fn read_secret(
    client: &Client,
    ns: &str,
    sm: &SchemaMigration,
) -> Result<(SecretState, Option<String>), Error> {
    let Some(r) = sm.spec.secret_ref() else {
        return Ok((SecretState::Missing, None));
    };
    let secrets = Api::<Secret>::namespaced(client.clone(), ns);
    let secret = read("get_secret", || secrets.get_opt(&r.name)).await?;
    let Some(secret) = secret else {
        return Ok((SecretState::Missing, None));
    };
    let value = secret
        .data
        .as_ref()
        .and_then(|d| d.get(&r.key))
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
        .or_else(|| {
            secret
                .string_data
                .as_ref()
                .and_then(|d| d.get(&r.key).cloned())
        });
    match value {
        None => Ok((SecretState::KeyMissing, None)),
        Some(url) => {
            // Registers the password, so no message or log line can carry it.
            redact::redact_url(url.trim());
            Ok((
                SecretState::Found {
                    resource_version: secret.resource_version().unwrap_or_default(),
                },
                Some(url.trim().to_string()),
            ))
        }
    }
}

/// The source's files (none for an image), and its state.
async fn read_source(
    client: &Client,
    ns: &str,
    sm: &SchemaMigration,
) -> Result<(SourceState, Option<Vec<(String, String)>>), Error> {
    let src = &sm.spec.source;
    let files = if let Some(cm) = &src.config_map_ref {
        let cms = Api::<ConfigMap>::namespaced(client.clone(), ns);
        let found = read("get_configmap", || cms.get_opt(&cm.name)).await?;
        let Some(found) = found else {
            return Ok((SourceState::Missing, None));
        };
        let mut files: Vec<(String, String)> = found.data.unwrap_or_default().into_iter().collect();
        for (k, v) in found.binary_data.unwrap_or_default() {
            if let Ok(text) = String::from_utf8(v.0) {
                files.push((k, text));
            }
        }
        files
    } else if src.inline.is_some() {
        files::inline_files(src)
    } else if let Some(image) = &src.image {
        let hash = crate::engine::script::sha256_hex(
            format!("{}\n{}", image.reference, image.path).as_bytes(),
        );
        return Ok((SourceState::Opaque { hash }, None));
    } else if let Some(tool) = &src.tool {
        let text = serde_json::to_string(tool).unwrap_or_default();
        let hash = crate::engine::script::sha256_hex(text.as_bytes());
        return Ok((SourceState::Opaque { hash }, None));
    } else {
        return Ok((SourceState::Invalid("no source is set".into()), None));
    };
    match source::load_files("the source", files.clone()) {
        Ok(set) => Ok((
            SourceState::Loaded {
                versions: set
                    .migrations
                    .iter()
                    .map(|m| m.version.to_string())
                    .collect(),
                hash: files::files_hash(&files),
            },
            Some(files),
        )),
        Err(e) => Ok((SourceState::Invalid(format!("{e}; {}", e.hint())), None)),
    }
}

/// Reads the history table (never creating anything) and compares it with the files.
/// How the controller connects to a resource's database (a read-only visit: the history,
/// the catalogs).
fn db_config(
    sm: &SchemaMigration,
    url: &str,
    timeout: Duration,
) -> Result<ConnectConfig, DbFailure> {
    let table_name = sm
        .spec
        .options
        .history_table
        .clone()
        .unwrap_or_else(|| engine::dialect::DEFAULT_HISTORY_TABLE.into());
    let Ok(table) = HistoryTable::parse(&table_name) else {
        return Err(DbFailure::new(
            DbFailureKind::Config,
            format!("invalid history table name {table_name:?} in spec.options.historyTable"),
        ));
    };
    let (url, _) = engine::dialect::split_url_params(url);
    let url = engine::dialect::url::normalize(&url, std::path::Path::new("/"))
        .map_err(|e| db_failure(&e))?;
    Ok(ConnectConfig {
        url,
        table,
        connect_timeout: timeout,
        busy_timeout: Duration::from_millis(100),
        application_name: "schemagate controller".into(),
    })
}

/// The live-schema drift check of `spec.drift`, when one is due: none ran yet, the
/// interval passed, the version moved, or the spec changed. Only when the database was
/// read and no run is in progress (a schema in motion is not drift).
fn drift_due(sm: &SchemaMigration, database: &DbView, jobs: &[JobView], now: Timestamp) -> bool {
    let Some(spec) = &sm.spec.drift else {
        return false;
    };
    // A tool's history records no fingerprints: nothing to compare (said once, in the
    // status, when the check first runs).
    if sm.spec.source.tool.is_some() && sm.status.as_ref().is_some_and(|s| s.schema_drift.is_some())
    {
        return false;
    }
    let DbView::Read(read) = database else {
        return false;
    };
    if read.unfinished.is_some() || jobs.iter().any(|j| j.state == JobState::Active) {
        return false;
    }
    let status = sm.status.as_ref();
    let Some(last) = status.and_then(|s| s.schema_drift.as_ref()) else {
        return true;
    };
    // A drift is looked at again every minute: a fix or `drift --accept` shows soon.
    let interval = if last.result == decide::DRIFTED {
        drift_interval(spec).min(Duration::from_secs(60))
    } else {
        drift_interval(spec)
    };
    let old = last
        .checked_at
        .as_deref()
        .and_then(|t| t.parse::<Timestamp>().ok())
        .is_none_or(|t| now.duration_since(t).as_secs_f64() >= interval.as_secs_f64());
    old || last.version != read.current
        || status.and_then(|s| s.observed_generation) != sm.metadata.generation
}

/// `spec.drift.interval`, at least a minute.
pub fn drift_interval(spec: &crate::api::DriftSpec) -> Duration {
    crate::model::clock::parse_duration(&spec.interval)
        .unwrap_or(Duration::from_secs(3600))
        .max(Duration::from_secs(60))
}

/// Compares the live schema with the fingerprint recorded at the database's version.
async fn check_drift(
    sm: &SchemaMigration,
    url: &str,
    current: Option<String>,
    timeout: Duration,
    now: Timestamp,
) -> SchemaDriftStatus {
    // Results that could not compare keep the version read (or every reconcile would find
    // the version "moved" and check again).
    let status = |result: &str, version: Option<String>, message: String| SchemaDriftStatus {
        checked_at: Some(now.to_string()),
        version: version.or_else(|| current.clone()),
        result: result.into(),
        count: 0,
        differences: Vec::new(),
        message: redact::redact(&message).into_owned(),
    };
    if sm.spec.source.tool.is_some() {
        return status(
            decide::NOT_CHECKED,
            None,
            "drift checks compare the fingerprints schemagate's own runs record; a tool source \
             records none"
                .into(),
        );
    }
    let cfg = match db_config(sm, url, timeout) {
        Ok(c) => c,
        Err(f) => return status(decide::NOT_CHECKED, None, f.message),
    };
    let check = async {
        let mut db = Db::connect(&cfg).await?;
        let result = async {
            let state = runner::read_state(&mut db)
                .await
                .map_err(|e| engine::DbError::new(engine::DbErrorKind::Other, e.to_string()))?;
            engine::schema::check(&mut db, &state).await
        }
        .await;
        db.close().await;
        result
    };
    let check = match tokio::time::timeout(timeout * 4, check).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            return status(
                decide::NOT_CHECKED,
                None,
                format!("cannot read the schema: {}", db_failure(&e).message),
            );
        }
        Err(_) => {
            return status(
                decide::NOT_CHECKED,
                None,
                format!("cannot read the schema: {}", no_answer(timeout * 4).message),
            );
        }
    };
    use engine::schema::DriftCheck;
    let message = check.summary();
    match check {
        DriftCheck::Clean { version, .. } => status(decide::CLEAN, version, message),
        DriftCheck::NoBaseline { version, .. } => status(decide::NO_BASELINE, version, message),
        DriftCheck::Busy { .. } => status(decide::NOT_CHECKED, None, message),
        DriftCheck::Drifted {
            version,
            differences,
            ..
        } => SchemaDriftStatus {
            count: differences.len(),
            differences: differences
                .iter()
                .take(STATUS_LIST_MAX)
                .map(|d| runner::clip(&d.message, 300))
                .collect(),
            ..status(decide::DRIFTED, version, message)
        },
    }
}

async fn read_database(
    sm: &SchemaMigration,
    url: &str,
    files: Option<&[(String, String)]>,
    timeout: Duration,
) -> DbView {
    let cfg = match db_config(sm, url, timeout) {
        Ok(c) => c,
        Err(f) => return DbView::Failed(f),
    };
    if let Some(tool) = &sm.spec.source.tool {
        return read_tool(&cfg, crate::runner::source::tool(tool.name), timeout).await;
    }
    let state_dialect = match engine::dialect::dialect_of(&cfg.url) {
        Ok(d) => d,
        Err(e) => return DbView::Failed(db_failure(&e)),
    };
    let read = || async {
        let mut db = Db::connect(&cfg).await?;
        let state = runner::read_state(&mut db).await;
        db.close().await;
        state.map_err(|e| match e {
            runner::RunError::Db { source, .. } => source,
            other => engine::DbError::new(engine::DbErrorKind::Other, other.to_string()),
        })
    };
    let state = match read_twice(timeout, read).await {
        Ok(s) => s,
        Err(failure) => return DbView::Failed(failure),
    };
    let set = files.and_then(|f| source::load_files("the source", f.to_vec()).ok());
    let applied: Vec<AppliedMigration> = state
        .applied
        .values()
        .map(|a| AppliedMigration {
            version: a.version.clone(),
            description: a.description.clone(),
            checksum: a.checksum.clone(),
            applied_at: Some(a.applied_at.clone()),
            duration_ms: a.duration_ms,
            applied_by: Some(a.applied_by.clone()),
        })
        .collect();
    let skip = applied.len().saturating_sub(STATUS_LIST_MAX);
    let mut lint = Vec::new();
    let (pending, drift) = match &set {
        Some(set) => {
            let pending = engine::plan::pending(set, &state)
                .into_iter()
                .map(|m| m.version.to_string())
                .collect();
            let pending_set = engine::plan::pending(set, &state);
            lint = engine::lint::lint(
                state_dialect,
                &pending_set,
                engine::lint::NewTables::SameRun,
            )
            .into_iter()
            .filter(|f| f.ignored.is_none())
            .map(|f| format!("{}:{} {}: {}", f.file, f.line, f.rule, f.message))
            .collect();
            let mut d = engine::plan::drift(set, &state, ChecksumMode::Strict);
            // Applied versions above the newest file: the database is ahead (an app rolled
            // back with its migrations), not drifted; the runners treat it so too.
            let head = set.head().map(|m| m.version.clone());
            d.missing.retain(|m| {
                engine::Version::parse(&m.version)
                    .ok()
                    .zip(head.clone())
                    .is_none_or(|(v, h)| v <= h)
            });
            let drift = (!d.is_empty()).then(|| Drifted {
                changed: d.changed.iter().map(|c| c.version.to_string()).collect(),
                missing: d.missing.iter().map(|m| m.version.to_string()).collect(),
                message: engine::plan::PlanError::Drift(d).to_string(),
            });
            (pending, drift)
        }
        None => (Vec::new(), None),
    };
    let held_contract = set
        .as_ref()
        .map(|set| {
            engine::plan::pending(set, &state)
                .into_iter()
                .filter(|m| m.is_contract())
                .map(|m| m.version.to_string())
                .collect()
        })
        .unwrap_or_default();
    // In version order (the map's).
    let contracts: Vec<crate::api::AppliedContract> = state
        .applied
        .values()
        .filter(|a| a.contract)
        .map(|a| crate::api::AppliedContract {
            version: a.version.clone(),
            applied_at: Some(a.applied_at.clone()),
            applied_by: Some(a.applied_by.clone()),
        })
        .collect();
    DbView::Read(Box::new(DbRead {
        current: state.current().map(|v| v.to_string()),
        applied: applied[skip..].to_vec(),
        pending,
        unfinished: state.unfinished.as_ref().map(|u| DirtyStep {
            version: u.version.clone(),
            failed: u.failed,
            message: engine::plan::PlanError::Unfinished(Box::new(u.clone())).to_string(),
        }),
        drift,
        tool_problem: None,
        lint,
        held_contract,
        contracts,
    }))
}

/// A database read within `timeout * 2`, tried once more when it failed fast for a reason
/// that may pass (a connection reset or refused while the server restarts): one dropped
/// connection is not worth two status writes. A failure that took long (a timeout) or
/// will not pass (credentials, a missing database) is not retried.
async fn read_twice<T, F, Fut>(timeout: Duration, read: F) -> Result<T, DbFailure>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, engine::DbError>>,
{
    let started = Instant::now();
    let failure = match tokio::time::timeout(timeout * 2, read()).await {
        Ok(Ok(s)) => return Ok(s),
        Ok(Err(e)) => db_failure(&e),
        Err(_) => return Err(no_answer(timeout * 2)),
    };
    if failure.kind.permanent() || started.elapsed() >= timeout {
        return Err(failure);
    }
    tracing::debug!(error = %failure.message, "a database read failed; trying once more");
    match tokio::time::timeout(timeout * 2, read()).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(db_failure(&e)),
        Err(_) => Err(no_answer(timeout * 2)),
    }
}

/// A database error as a fact for the decision: what kind, and the message (scrubbed).
fn db_failure(e: &engine::DbError) -> DbFailure {
    let kind = match e.kind {
        engine::DbErrorKind::Auth => DbFailureKind::Auth,
        engine::DbErrorKind::NoDatabase => DbFailureKind::NoDatabase,
        engine::DbErrorKind::Config => DbFailureKind::Config,
        _ => DbFailureKind::Unreachable,
    };
    DbFailure::new(kind, redact::redact(&e.to_string()).into_owned())
}

fn no_answer(after: Duration) -> DbFailure {
    DbFailure::new(
        DbFailureKind::Unreachable,
        format!("no answer within {}s", after.as_secs()),
    )
}

/// Another tool's history table, as the status reports it.
async fn read_tool(cfg: &ConnectConfig, tool: engine::tools::Tool, timeout: Duration) -> DbView {
    let read = || async {
        let mut db = Db::connect(cfg).await?;
        let state = engine::tools::read(&mut db, tool).await;
        db.close().await;
        state
    };
    let state = match read_twice(timeout, read).await {
        Ok(s) => s,
        Err(failure) => return DbView::Failed(failure),
    };
    let skip = state.applied.len().saturating_sub(STATUS_LIST_MAX);
    DbView::Read(Box::new(DbRead {
        current: state.current.clone(),
        applied: state.applied[skip..]
            .iter()
            .filter(|r| r.success)
            .map(|r| AppliedMigration {
                version: r.version.clone(),
                description: r.description.clone().unwrap_or_default(),
                checksum: None,
                applied_at: r.applied_at.clone(),
                duration_ms: None,
                applied_by: Some(tool.name().to_string()),
            })
            .collect(),
        tool_problem: state.problem.map(|p| format!("{tool}: {p}")),
        ..Default::default()
    }))
}

fn job_view(job: &Job) -> JobView {
    let status = job.status.clone().unwrap_or_default();
    let conditions = status.conditions.unwrap_or_default();
    let finished = |t: &str| {
        conditions
            .iter()
            .find(|c| c.type_ == t && c.status == "True")
    };
    let (state, failure) = if let Some(c) = finished("Failed") {
        let why = [c.reason.clone(), c.message.clone()]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(": ");
        (JobState::Failed, Some(why))
    } else if finished("Complete").is_some() {
        (JobState::Succeeded, None)
    } else {
        (JobState::Active, None)
    };
    let ts = |t: Option<Time>| t.map(|t| t.0.to_string());
    // A contract Job runs `migrate upgrade T --phase contract`.
    let contract = job
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|s| s.containers.first())
        .and_then(|c| c.args.as_ref())
        .is_some_and(|a| {
            a.windows(2)
                .any(|w| w[0] == "--phase" && w[1] == "contract")
        });
    JobView {
        contract,
        kind: RunKind::Job,
        name: job.name_any(),
        state,
        started: ts(status.start_time),
        finished: ts(status.completion_time).or_else(|| {
            finished("Failed")
                .and_then(|c| c.last_transition_time.as_ref().map(|t| t.0.to_string()))
        }),
        summary: None,
        failure,
    }
}

/// The last JSON line of a termination message: the runner's summary.
fn summary_of(message: Option<&str>) -> Option<RunSummary> {
    RunSummary::from_message(message?)
}

/// Keeps only what `pod_run` and the pod-to-resource mapping read: a watched pod costs a
/// few hundred bytes in the store, not its whole spec.
pub fn slim_pod(pod: &mut Pod) {
    pod.spec = None;
    let m = &mut pod.metadata;
    m.managed_fields = None;
    // Only the version the webhook recorded (what contract migrations wait for).
    if let Some(a) = &mut m.annotations {
        a.retain(|k, _| k == crate::api::VERSION_ANNOTATION);
    }
    m.owner_references = None;
    m.finalizers = None;
    if let Some(labels) = &mut m.labels {
        labels.retain(|k, _| k == MIGRATION_LABEL);
    }
    if let Some(status) = &mut pod.status {
        let ours = status
            .init_container_statuses
            .take()
            .unwrap_or_default()
            .into_iter()
            .filter(|c| c.name == INJECTED_CONTAINERS.runner)
            .collect::<Vec<_>>();
        *status = k8s_openapi::api::core::v1::PodStatus {
            phase: status.phase.take(),
            init_container_statuses: (!ours.is_empty()).then_some(ours),
            ..Default::default()
        };
    }
}

/// A gated pod's migration run, from its injected init container's status (`None`: the
/// pod has not got that far, or was not injected).
pub fn pod_run(pod: &Pod) -> Option<JobView> {
    let cs = pod
        .status
        .as_ref()?
        .init_container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == INJECTED_CONTAINERS.runner)?;
    let ts = |t: &Option<Time>| t.as_ref().map(|t| t.0.to_string());
    let state = cs.state.clone().unwrap_or_default();
    let view = |state, started, finished, message: Option<&str>, code: i32| JobView {
        contract: false,
        kind: RunKind::Pod,
        name: pod.name_any(),
        state,
        started,
        finished,
        summary: summary_of(message),
        failure: (state == JobState::Failed).then(|| {
            let tail = message
                .map(|m| m.lines().last().unwrap_or_default().trim().to_string())
                .filter(|m| !m.is_empty());
            tail.unwrap_or_else(|| format!("the init container exited with code {code}"))
        }),
    };
    // A runner stopped on request (its pod is going away) ran no step halfway: not a
    // run to report; the next pod's runner goes on.
    let stopped = i32::from(crate::runner::exit::Exit::Stopped.code());
    if state
        .terminated
        .as_ref()
        .is_some_and(|t| t.exit_code == stopped)
    {
        return None;
    }
    if let Some(t) = &state.terminated {
        let result = if t.exit_code == 0 {
            JobState::Succeeded
        } else {
            JobState::Failed
        };
        return Some(view(
            result,
            ts(&t.started_at),
            ts(&t.finished_at),
            t.message.as_deref(),
            t.exit_code,
        ));
    }
    // Restarting after a failure (CrashLoopBackOff): the failure is the news.
    if let Some(t) = cs.last_state.as_ref().and_then(|s| s.terminated.as_ref())
        && t.exit_code != 0
        && t.exit_code != stopped
    {
        return Some(view(
            JobState::Failed,
            ts(&t.started_at),
            ts(&t.finished_at),
            t.message.as_deref(),
            t.exit_code,
        ));
    }
    let started = state.running.as_ref().and_then(|r| ts(&r.started_at));
    Some(view(JobState::Active, started, None, None, 0))
}

/// The runs of a resource's gated pods, most telling first: failures and runs that
/// applied something (newest first), then the rest. Pods that only found the database
/// current do not push the run that migrated it out of `lastRun`.
pub fn pod_runs(pods: &Store<Pod>, namespace: &str, name: &str) -> Vec<JobView> {
    let mut runs: Vec<(bool, String, JobView)> = pods
        .state()
        .iter()
        .filter(|p| {
            p.namespace().as_deref() == Some(namespace)
                && p.labels().get(MIGRATION_LABEL).map(String::as_str) == Some(name)
                && p.metadata.deletion_timestamp.is_none()
        })
        .filter_map(|p| {
            let run = pod_run(p)?;
            let telling = run.state == JobState::Failed
                || run.summary.as_ref().is_some_and(|s| !s.applied.is_empty());
            let at = run
                .finished
                .clone()
                .or(run.started.clone())
                .or_else(|| p.creation_timestamp().map(|t| t.0.to_string()))
                .unwrap_or_default();
            Some((telling, at, run))
        })
        .collect();
    // RFC 3339 UTC times sort as text.
    runs.sort_by(|a, b| (b.0, &b.1, &b.2.name).cmp(&(a.0, &a.1, &a.2.name)));
    runs.into_iter().map(|(_, _, r)| r).collect()
}

/// The runner's summary from a finished Job's pod (its termination message).
async fn job_summary(
    client: &Client,
    ns: &str,
    job: &str,
    job_uid: Option<&str>,
) -> Result<Option<RunSummary>, Error> {
    let api = Api::<Pod>::namespaced(client.clone(), ns);
    let params = ListParams::default().labels(&format!("job-name={job}"));
    let pods = read("list_pods", || api.list(&params)).await?;
    let mut newest: Option<(Timestamp, RunSummary)> = None;
    // Only the Job's own pods: anyone may label a pod job-name=<this Job>.
    let ours =
        |p: &Pod| job_uid.is_none_or(|uid| p.owner_references().iter().any(|o| o.uid == uid));
    for pod in pods.items.into_iter().filter(|p| ours(p)) {
        let Some(status) = pod.status else { continue };
        for cs in status.container_statuses.unwrap_or_default() {
            if cs.name != "migrate" {
                continue;
            }
            let Some(term) = cs.state.and_then(|s| s.terminated) else {
                continue;
            };
            let Some(summary) = summary_of(term.message.as_deref()) else {
                continue;
            };
            let at = term
                .finished_at
                .map(|t| t.0)
                .unwrap_or(Timestamp::UNIX_EPOCH);
            if newest.as_ref().is_none_or(|(t, _)| at > *t) {
                newest = Some((at, summary));
            }
        }
    }
    Ok(newest.map(|(_, s)| s))
}

/// Observes everything a decision needs.
pub async fn observe(ctx: &Context, sm: &SchemaMigration) -> Result<Observed, Error> {
    let ns = sm.namespace().ok_or(Error::NoNamespace)?;
    let name = sm.name_any();
    let (secret, url) = read_secret(&ctx.client, &ns, sm).await?;
    let (mut source, files) = read_source(&ctx.client, &ns, sm).await?;
    let inline_config_map = inline_config_map(ctx, sm, &ns, &name, &mut source).await?;
    // The runs before the database: a read that follows them shows at least what they did
    // (read the other way round, a run finishing in between looks like a run that
    // succeeded without moving the version).
    let jobs = runs(ctx, sm, &ns, &name).await?;
    let database = match (&url, ctx.settings.observe_database) {
        (Some(url), true) => {
            let table = sm
                .spec
                .options
                .history_table
                .as_deref()
                .unwrap_or(engine::dialect::DEFAULT_HISTORY_TABLE);
            let key = ReadKey::new(url, table, decide::source_hash(&source));
            let read = read_database(sm, url, files.as_deref(), ctx.settings.db_timeout);
            ctx.reads
                .read(
                    key,
                    ctx.settings.database_read_ttl,
                    runs_moved(sm, &jobs),
                    read,
                )
                .await
        }
        (_, false) => DbView::NotObserved,
        (None, true) => DbView::Failed(DbFailure::new(
            DbFailureKind::Config,
            "the database URL is not available",
        )),
    };
    let schema_drift = match &url {
        Some(url)
            if ctx.settings.observe_database
                && drift_due(sm, &database, &jobs, Timestamp::now()) =>
        {
            let current = match &database {
                DbView::Read(r) => r.current.clone(),
                _ => None,
            };
            Some(check_drift(sm, url, current, ctx.settings.db_timeout, Timestamp::now()).await)
        }
        _ => None,
    };
    // Init-container mode lists no Jobs, except for contract migrations: then their Jobs.
    let mut jobs = jobs;
    let contract_pending = matches!(&database, DbView::Read(r) if !r.held_contract.is_empty())
        || sm
            .status
            .as_ref()
            .is_some_and(|s| !s.contract.held.is_empty());
    if sm.spec.mode == MigrationMode::InitContainer && contract_pending {
        let mut contract_jobs = owned_jobs(ctx, sm, &ns, &name).await?;
        contract_jobs.retain(|j| j.contract);
        jobs.extend(contract_jobs);
    }
    Ok(Observed {
        secret,
        source,
        database,
        jobs,
        inline_config_map,
        schema_drift,
        pods: running_pods(&ctx.pods, &ns, &name),
    })
}

/// The inline source's ConfigMap (name, exists): gated pods and Jobs mount it by name, so
/// one that someone else created under that name must never be used (the source is then
/// invalid).
async fn inline_config_map(
    ctx: &Context,
    sm: &SchemaMigration,
    ns: &str,
    name: &str,
    source: &mut SourceState,
) -> Result<Option<(String, bool)>, Error> {
    if sm.spec.source.inline.is_none() {
        return Ok(None);
    }
    let files = files::inline_files(&sm.spec.source);
    let cm_name = files::inline_config_map_name(name, &files::files_hash(&files));
    let cms = Api::<ConfigMap>::namespaced(ctx.client.clone(), ns);
    let found = read("get_configmap", || cms.get_metadata_opt(&cm_name)).await?;
    if let Some(found) = &found
        && !owned_by(&found.metadata, sm.uid().as_ref())
    {
        *source = SourceState::Invalid(format!(
            "ConfigMap {cm_name}, where this resource's inline migrations go, exists but \
             was not created by this SchemaMigration; delete it and schemagate recreates it"
        ));
    }
    Ok(Some((cm_name, found.is_some())))
}

/// A label selector as the API's `labelSelector` parameter.
pub fn selector_string(
    s: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
) -> String {
    let mut parts: Vec<String> = s
        .match_labels
        .iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    for e in s.match_expressions.iter().flatten() {
        let values = e.values.clone().unwrap_or_default().join(",");
        parts.push(match e.operator.as_str() {
            "In" => format!("{} in ({values})", e.key),
            "NotIn" => format!("{} notin ({values})", e.key),
            "Exists" => e.key.clone(),
            _ => format!("!{}", e.key),
        });
    }
    parts.join(",")
}

/// A fleet (`spec.databases`): the selected Secrets, each database's history (shared
/// reads, a few at a time), the fleet's Jobs; then the decision and its action.
async fn reconcile_fleet(sm: &SchemaMigration, ctx: &Context) -> Result<Requeue, Error> {
    use futures_util::StreamExt;
    let ns = sm.namespace().ok_or(Error::NoNamespace)?;
    let name = sm.name_any();
    let spec = sm.spec.databases.clone().ok_or(Error::NoNamespace)?;
    let (mut source, files) = read_source(&ctx.client, &ns, sm).await?;
    let inline_cm = inline_config_map(ctx, sm, &ns, &name, &mut source).await?;
    let selector = selector_string(&spec.secret_selector);
    let secrets: Vec<Secret> = if selector.is_empty() {
        Vec::new()
    } else {
        let api = Api::<Secret>::namespaced(ctx.client.clone(), &ns);
        let params = ListParams::default().labels(&selector);
        let mut items = read("list_secrets", || api.list(&params)).await?.items;
        items.sort_by_key(|s| s.name_any());
        items
    };
    let jobs = fleet_jobs(ctx, sm, &ns, &name).await?;
    let target = sm.spec.target_version.clone().or_else(|| match &source {
        SourceState::Loaded { versions, .. } => versions.last().cloned(),
        _ => None,
    });
    let source_hash = decide::source_hash(&source).unwrap_or_default().to_string();
    let base = job::run_hash(sm, target.as_deref(), RunCommand::Upgrade, &source_hash, "");
    let jobs: Vec<fleet::FleetJob> = jobs
        .into_iter()
        .map(|(view, members, hash)| fleet::FleetJob {
            current: hash == base,
            view,
            members,
        })
        .collect();
    let fresh = runs_moved(sm, &jobs.iter().map(|j| j.view.clone()).collect::<Vec<_>>());
    let table = sm
        .spec
        .options
        .history_table
        .clone()
        .unwrap_or_else(|| engine::dialect::DEFAULT_HISTORY_TABLE.into());
    let mut reads = Vec::with_capacity(secrets.len());
    for s in &secrets {
        let url = s
            .data
            .as_ref()
            .and_then(|d| d.get(&spec.key))
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
            .map(|u| u.trim().to_string());
        reads.push(read_member(
            ctx,
            sm,
            s.name_any(),
            url,
            ReadKeyParts {
                table: &table,
                source: &source_hash,
                files: files.as_deref(),
                fresh,
            },
        ));
    }
    let members: Vec<fleet::Member> = futures_util::stream::iter(reads)
        .buffered(16)
        .collect()
        .await;
    let policy = &ctx.settings.runner;
    let namer = |batch: &[String]| (job::batch_job_name(&name, &base, batch), base.clone());
    let d = fleet::decide(&fleet::FleetInputs {
        sm,
        now: Time(Timestamp::now()),
        source,
        members,
        jobs,
        namer: &namer,
        image_allowed: policy.image_allowed(policy.runner_image(sm)),
        service_account_allowed: policy.resource_service_account_allowed(sm),
    });
    let d = redacted(d);
    act(ctx, sm, &d, inline_cm.as_ref()).await?;
    Ok(Requeue::requeue(requeue_after(ctx, sm, d.status.phase)))
}

/// What a fleet member's read shares with the others.
struct ReadKeyParts<'a> {
    table: &'a str,
    source: &'a str,
    files: Option<&'a [(String, String)]>,
    fresh: bool,
}

/// One database of a fleet: its history, read (shared with other resources), or `None`
/// when its Secret has no URL.
async fn read_member(
    ctx: &Context,
    sm: &SchemaMigration,
    secret: String,
    url: Option<String>,
    k: ReadKeyParts<'_>,
) -> fleet::Member {
    let database = match url {
        Some(url) => {
            redact::redact_url(&url);
            let key = ReadKey::new(&url, k.table, Some(k.source));
            let read = read_database(sm, &url, k.files, ctx.settings.db_timeout);
            Some(
                ctx.reads
                    .read(key, ctx.settings.database_read_ttl, k.fresh, read)
                    .await,
            )
        }
        None => None,
    };
    fleet::Member { secret, database }
}

/// A fleet's Jobs, newest first: each with its members and run hash; the newest finished
/// one with its runner's summary.
async fn fleet_jobs(
    ctx: &Context,
    sm: &SchemaMigration,
    ns: &str,
    name: &str,
) -> Result<Vec<(JobView, Vec<String>, String)>, Error> {
    Ok(listed_jobs(ctx, sm, ns, name)
        .await?
        .into_iter()
        .map(|(j, view)| {
            let hash = j
                .annotations()
                .get(job::RUN_HASH_ANNOTATION)
                .cloned()
                .unwrap_or_default();
            (view, job::batch_members(&j), hash)
        })
        .collect())
}

/// True when the runs show what the status does not yet: one in progress, or a newest run
/// it has not reported (finished since). The database must then be read afresh, not taken
/// from a read shared before the run moved it.
fn runs_moved(sm: &SchemaMigration, runs: &[JobView]) -> bool {
    let reported = sm.status.as_ref().and_then(|s| s.last_run.as_ref());
    runs.iter().any(|r| r.state == JobState::Active)
        || runs.first().is_some_and(|r| {
            reported.is_none_or(|l| l.name != r.name || l.result != decide::run_result(r.state))
        })
}

/// The resource's runs, newest first: in Job mode its Jobs (with the newest finished one's
/// summary), in init-container mode its gated pods' init containers (from the pod store).
async fn runs(
    ctx: &Context,
    sm: &SchemaMigration,
    ns: &str,
    name: &str,
) -> Result<Vec<JobView>, Error> {
    // Jobs exist in Job mode only (a switch to init-container mode while a Job runs is
    // harmless: the runner holds the database lock, the pods wait for it); init-container
    // runs are read from the pod store.
    if sm.spec.mode == MigrationMode::InitContainer {
        return Ok(pod_runs(&ctx.pods, ns, name));
    }
    owned_jobs(ctx, sm, ns, name).await
}

/// The Jobs this resource owns, newest first, the newest finished one with its summary.
async fn owned_jobs(
    ctx: &Context,
    sm: &SchemaMigration,
    ns: &str,
    name: &str,
) -> Result<Vec<JobView>, Error> {
    Ok(listed_jobs(ctx, sm, ns, name)
        .await?
        .into_iter()
        .map(|(_, v)| v)
        .collect())
}

/// The Jobs this resource owns with their views, newest first; the newest finished one
/// with its runner's summary (older ones were reported when they finished).
async fn listed_jobs(
    ctx: &Context,
    sm: &SchemaMigration,
    ns: &str,
    name: &str,
) -> Result<Vec<(Job, JobView)>, Error> {
    let uid = sm.uid();
    let api = Api::<Job>::namespaced(ctx.client.clone(), ns);
    let params = ListParams::default().labels(&format!("{JOB_FOR_LABEL}={name}"));
    let mut jobs: Vec<Job> = read("list_jobs", || api.list(&params))
        .await?
        .items
        .into_iter()
        .filter(|j| {
            j.owner_references()
                .iter()
                .any(|o| Some(&o.uid) == uid.as_ref())
        })
        .collect();
    jobs.sort_by_key(|j| std::cmp::Reverse(j.creation_timestamp().map(|t| t.0)));
    let mut out: Vec<(Job, JobView)> = jobs
        .into_iter()
        .map(|j| {
            let v = job_view(&j);
            (j, v)
        })
        .collect();
    if let Some((j, v)) = out.iter_mut().find(|(_, v)| v.state != JobState::Active) {
        v.summary = job_summary(&ctx.client, ns, &v.name, j.uid().as_deref()).await?;
    }
    Ok(out)
}

/// The gated pods of `name` that run (or will: not finished), with the version the webhook
/// recorded on each. Terminating pods count until they are gone: they still serve.
pub fn running_pods(pods: &Store<Pod>, namespace: &str, name: &str) -> Vec<decide::PodVersion> {
    let mut out: Vec<decide::PodVersion> = pods
        .state()
        .iter()
        .filter(|p| {
            p.namespace().as_deref() == Some(namespace)
                && p.labels().get(MIGRATION_LABEL).map(String::as_str) == Some(name)
                && !matches!(
                    p.status.as_ref().and_then(|s| s.phase.as_deref()),
                    Some("Succeeded" | "Failed")
                )
        })
        .map(|p| decide::PodVersion {
            name: p.name_any(),
            version: p.annotations().get(crate::api::VERSION_ANNOTATION).cloned(),
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Decides from what was observed.
pub fn decision(ctx: &Context, sm: &SchemaMigration, o: &Observed, now: Time) -> Decision {
    let policy = &ctx.settings.runner;
    let allowed = policy.image_allowed(policy.runner_image(sm));
    let secret_version = match &o.secret {
        SecretState::Found { resource_version } => Some(resource_version.clone()),
        _ => None,
    };
    let source_hash = decide::source_hash(&o.source).map(str::to_string);
    let name = sm.name_any();
    let namer = move |target: Option<&str>, command: RunCommand| {
        let hash = job::run_hash(
            sm,
            target,
            command,
            source_hash.as_deref().unwrap_or_default(),
            secret_version.as_deref().unwrap_or_default(),
        );
        (job::job_name(&name, &hash), hash)
    };
    let can_name =
        matches!(o.secret, SecretState::Found { .. }) && decide::source_hash(&o.source).is_some();
    let decision = decide::decide(&Inputs {
        sm,
        now,
        secret: o.secret.clone(),
        source: o.source.clone(),
        database: o.database.clone(),
        jobs: o.jobs.clone(),
        namer: can_name.then_some(&namer as &decide::Namer<'_>),
        image_allowed: allowed,
        service_account_allowed: policy.resource_service_account_allowed(sm),
        schema_drift: o.schema_drift.clone(),
        pods: o.pods.clone(),
    });
    redacted(decision)
}

/// The decision with every registered secret (the database passwords the controller read)
/// masked: runners' messages reach the status and Events, and a runner (an older or a
/// foreign one) may have printed a URL. Done here, before the status is compared with the
/// stored one, so the comparison sees what is stored.
fn redacted(mut d: Decision) -> Decision {
    let text = serde_json::to_string(&d.status).unwrap_or_default();
    if let std::borrow::Cow::Owned(clean) = redact::redact(&text) {
        match serde_json::from_str(&clean) {
            Ok(status) => d.status = status,
            // Never fall back to the unmasked text: drop the messages instead.
            Err(_) => {
                const WITHHELD: &str = "(message withheld: it contained a secret)";
                for c in &mut d.status.conditions {
                    c.message = WITHHELD.into();
                }
                if let Some(r) = &mut d.status.last_run {
                    r.message = Some(WITHHELD.into());
                }
            }
        }
    }
    for e in &mut d.events {
        e.note = redact::redact(&e.note).into_owned();
    }
    d
}

/// Carries out a decision: the Job (adopted if it exists), the status (only when it
/// changed: nothing is written at steady state), the Events.
pub async fn act(
    ctx: &Context,
    sm: &SchemaMigration,
    d: &Decision,
    inline_config_map: Option<&(String, bool)>,
) -> Result<(), Error> {
    let ns = sm.namespace().ok_or(Error::NoNamespace)?;
    let uid = sm.uid();
    let cms = Api::<ConfigMap>::namespaced(ctx.client.clone(), &ns);
    // The inline migrations' ConfigMap must exist before gated pods start (Init-container
    // mode) or the Job runs; observed already, so nothing is written at steady state.
    let wanted = d.status.phase != Some(Phase::Blocked)
        && (sm.spec.mode == MigrationMode::InitContainer
            || matches!(d.action, Action::CreateJob(_)));
    if let Some((name, false)) = inline_config_map
        && wanted
    {
        let cm = files::inline_config_map(sm, name, &files::inline_files(&sm.spec.source));
        create_or_adopt(&cms, &cm, "create_configmap", uid.as_ref()).await?;
        // A new source superseded the older ones: keep a few (pods admitted before the
        // change may still mount them), delete the rest.
        if let Err(e) = prune_inline_config_maps(&cms, sm, name).await {
            tracing::warn!(error = %e, "could not delete superseded inline-source ConfigMaps; retried at the next change");
        }
    }
    if let Action::CreateJob(plan) = &d.action {
        let inline_cm = inline_config_map.map(|(name, _)| name.clone());
        let image = ctx.settings.runner.runner_image(sm);
        let job = job::job(sm, plan, image, inline_cm.as_deref());
        create_or_adopt(
            &Api::<Job>::namespaced(ctx.client.clone(), &ns),
            &job,
            "create_job",
            uid.as_ref(),
        )
        .await?;
    }
    if sm.status.as_ref() != Some(&d.status) {
        let api = Api::<SchemaMigration>::namespaced(ctx.client.clone(), &ns);
        let patch = json!({
            "apiVersion": "schemagate.dev/v1alpha1",
            "kind": "SchemaMigration",
            "status": d.status,
        });
        api.patch_status(
            &sm.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(patch),
        )
        .await
        .map_err(kube_err("patch_status"))?;
    }
    let reference = sm.object_ref(&());
    for e in &d.events {
        let event = Event {
            type_: if e.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: e.reason.into(),
            note: Some(redact::redact(&e.note).chars().take(1000).collect()),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(err) = ctx.recorder.publish(&event, &reference).await {
            tracing::warn!(error = %err, "could not record an Event");
        }
    }
    Ok(())
}

/// How many superseded inline-source ConfigMaps a resource keeps besides the current one.
pub const INLINE_CONFIG_MAPS_KEPT: usize = 2;

/// Deletes this resource's inline-source ConfigMaps older than the newest
/// [`INLINE_CONFIG_MAPS_KEPT`] besides `current`. Only ConfigMaps this resource owns (by
/// uid) are touched, each deleted with a uid precondition.
async fn prune_inline_config_maps(
    cms: &Api<ConfigMap>,
    sm: &SchemaMigration,
    current: &str,
) -> Result<(), Error> {
    let uid = sm.uid();
    let selector = format!("{JOB_FOR_LABEL}={}", sm.name_any());
    let mut old: Vec<_> = cms
        .list_metadata(&ListParams::default().labels(&selector))
        .await
        .map_err(kube_err("list_configmaps"))?
        .items
        .into_iter()
        .filter(|c| owned_by(&c.metadata, uid.as_ref()) && c.name_any() != current)
        .collect();
    old.sort_by_key(|c| std::cmp::Reverse(c.creation_timestamp().map(|t| t.0)));
    for cm in old.iter().skip(INLINE_CONFIG_MAPS_KEPT) {
        let params = kube::api::DeleteParams {
            preconditions: cm.uid().map(|uid| kube::api::Preconditions {
                uid: Some(uid),
                resource_version: None,
            }),
            ..Default::default()
        };
        match cms.delete(&cm.name_any(), &params).await {
            Ok(_) => {
                tracing::info!(configmap = %cm.name_any(), "deleted a superseded inline-source ConfigMap")
            }
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(e) => return Err(kube_err("delete_configmap")(e)),
        }
    }
    Ok(())
}

/// Creates `obj`; if it exists already (a restarted controller, a concurrent
/// reconciliation), adopts it: deterministic names make it the same object. One this
/// resource does not own (someone else took the name) is never used.
async fn create_or_adopt<K>(
    api: &Api<K>,
    obj: &K,
    op: &'static str,
    owner: Option<&String>,
) -> Result<(), Error>
where
    K: Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
    <K as Resource>::DynamicType: Default,
{
    match api
        .create(
            &PostParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..Default::default()
            },
            obj,
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let name = obj.meta().name.clone().unwrap_or_default();
            let existing = api.get(&name).await.map_err(kube_err(op))?;
            if owned_by(existing.meta(), owner) {
                Ok(())
            } else {
                Err(Error::NotOwned {
                    kind: K::kind(&Default::default()).to_string(),
                    name,
                })
            }
        }
        Err(e) => Err(Error::Kube { op, source: e }),
    }
}

/// The whole reconciliation of one resource. A failure is reported (log line, metric,
/// Event when its message is new, and the status: `Stalled` for a permanent one) before
/// it goes to [`error_policy`], which only decides when to retry.
pub async fn reconcile(sm: Arc<SchemaMigration>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    match reconcile_inner(&sm, &ctx).await {
        Ok(requeue) => Ok(requeue),
        Err(e) => {
            report_failure(&ctx, &sm, &e).await;
            Err(e)
        }
    }
}

fn key_of(sm: &SchemaMigration) -> String {
    format!("{}/{}", sm.namespace().unwrap_or_default(), sm.name_any())
}

async fn reconcile_inner(sm: &SchemaMigration, ctx: &Context) -> Result<Requeue, Error> {
    let started = Instant::now();
    ctx.metrics.reconciles.inc();
    let key = key_of(sm);
    if sm.metadata.deletion_timestamp.is_some() {
        // Deleting a SchemaMigration never touches the database; its Jobs go with it.
        return Ok(Requeue::await_change());
    }
    if sm.spec.databases.is_some() {
        let requeue = reconcile_fleet(sm, ctx).await?;
        if let Ok(mut f) = ctx.failures.lock() {
            f.remove(&key);
        }
        return Ok(requeue);
    }
    let observed = observe(ctx, sm).await?;
    let now = Time(Timestamp::now());
    let d = decision(ctx, sm, &observed, now);
    note_finished_runs(ctx, sm, &d, observed.jobs.first());
    act(ctx, sm, &d, observed.inline_config_map.as_ref()).await?;
    if let Ok(mut f) = ctx.failures.lock() {
        f.remove(&key);
    }
    ctx.metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    Ok(Requeue::requeue(requeue_after(ctx, sm, d.status.phase)))
}

/// When to look again: soon while something is on its way, at the resync otherwise, and
/// within the drift interval at the latest (the next check is due then).
fn requeue_after(ctx: &Context, sm: &SchemaMigration, phase: Option<Phase>) -> Duration {
    let busy = matches!(phase, Some(Phase::Migrating | Phase::Pending));
    let after = if busy {
        ctx.settings.requeue_busy
    } else {
        ctx.settings.requeue
    };
    match &sm.spec.drift {
        Some(spec) => after.min(drift_interval(spec)),
        None => after,
    }
}

/// The status a failure leaves: permanent ones make the resource Blocked and `Stalled`
/// with the reason and what to do; transient ones keep the phase and set `Reconciling`
/// with the reason (kstatus: in progress, not failed).
pub fn failure_status(
    sm: &SchemaMigration,
    error: &Error,
    message: &str,
    now: &Time,
) -> SchemaMigrationStatus {
    let mut status = sm.status.clone().unwrap_or_default();
    let previous = status.conditions.clone();
    let why = error.reason();
    let text = format!("{message}; {}", error.next_step());
    let condition = |kind, on: bool, generation| {
        conditions::condition(&previous, kind, on, why, text.clone(), generation, now)
    };
    let keep = |kind: &str| previous.iter().find(|c| c.type_ == kind).cloned();
    let reachable = keep(conditions::DATABASE_REACHABLE);
    match error.class() {
        ErrorClass::Permanent => {
            let generation = sm.metadata.generation;
            status.observed_generation = generation;
            status.phase = Some(Phase::Blocked);
            status.conditions = vec![
                condition(conditions::READY, false, generation),
                condition(conditions::RECONCILING, false, generation),
                condition(conditions::STALLED, true, generation),
            ];
        }
        ErrorClass::Transient => {
            let generation = status.observed_generation;
            status.phase = status.phase.or(Some(Phase::Pending));
            status.conditions = vec![
                keep(conditions::READY)
                    .unwrap_or_else(|| condition(conditions::READY, false, generation)),
                condition(conditions::RECONCILING, true, generation),
                condition(conditions::STALLED, false, generation),
            ];
        }
    }
    status.conditions.extend(reachable);
    status
}

/// Reports a failed reconciliation: a log line at the level its class deserves, a metric
/// by reason and class, an Event when the message is new (not one per retry), and the
/// status (written only when it changes).
pub async fn report_failure(ctx: &Context, sm: &SchemaMigration, error: &Error) {
    let key = key_of(sm);
    let class = error.class();
    let message = redact::redact(&error.to_string()).into_owned();
    let (count, new_message) = ctx
        .failures
        .lock()
        .map(|mut f| {
            let entry = f.entry(key.clone()).or_default();
            entry.count += 1;
            let new = entry.last_message != message;
            entry.last_message = message.clone();
            (entry.count, new)
        })
        .unwrap_or((1, true));
    let why = error.reason();
    match class {
        ErrorClass::Transient => tracing::warn!(
            resource = %key, reason = why, class = class.as_str(), failures = count,
            error = %message, "reconcile failed; retrying with backoff"
        ),
        ErrorClass::Permanent => tracing::error!(
            resource = %key, reason = why, class = class.as_str(), failures = count,
            error = %message, "reconcile failed; the resource is stalled until someone acts"
        ),
    }
    ctx.metrics.error(error.metric_reason(), class.as_str());
    if new_message {
        let event = Event {
            type_: EventType::Warning,
            reason: why.into(),
            note: Some(
                format!("{message}; {}", error.next_step())
                    .chars()
                    .take(1000)
                    .collect(),
            ),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&event, &sm.object_ref(&())).await {
            tracing::warn!(resource = %key, error = %e, "could not record an Event");
        }
    }
    let status = failure_status(sm, error, &message, &Time(Timestamp::now()));
    if sm.status.as_ref() == Some(&status) {
        return;
    }
    let api =
        Api::<SchemaMigration>::namespaced(ctx.client.clone(), &sm.namespace().unwrap_or_default());
    let patch = json!({
        "apiVersion": "schemagate.dev/v1alpha1",
        "kind": "SchemaMigration",
        "status": status,
    });
    if let Err(e) = api
        .patch_status(
            &sm.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(patch),
        )
        .await
    {
        let e = redact::redact(&e.to_string()).into_owned();
        tracing::warn!(resource = %key, error = %e, "could not write the failure into the status");
    }
}

/// Counts a run once, when the status first shows it finished: by result, with how long
/// it took and how long it waited for the database lock (from its summary).
fn note_finished_runs(ctx: &Context, sm: &SchemaMigration, d: &Decision, newest: Option<&JobView>) {
    let (Some(new), old) = (
        d.status.last_run.as_ref(),
        sm.status.as_ref().and_then(|s| s.last_run.as_ref()),
    ) else {
        return;
    };
    let finished = new.result == "Succeeded" || new.result == "Failed";
    let seen = old.is_some_and(|o| o.name == new.name && o.result == new.result);
    if finished && !seen {
        let took = match (&new.started_at, &new.finished_at) {
            (Some(a), Some(b)) => a
                .parse::<Timestamp>()
                .ok()
                .zip(b.parse::<Timestamp>().ok())
                .and_then(|(a, b)| b.duration_since(a).try_into().ok()),
            _ => None,
        };
        let summary = newest
            .filter(|r| r.name == new.name)
            .and_then(|r| r.summary.as_ref());
        let lock_wait = summary
            .and_then(|s| s.lock_wait_ms)
            .map(Duration::from_millis);
        ctx.metrics
            .run_finished(&new.result.to_ascii_lowercase(), took, lock_wait);
    }
}

/// When to retry a failed reconciliation (it was reported by [`reconcile`]): transient
/// failures with exponential backoff and jitter, permanent ones at the slow resync (a
/// change to the resource or anything it watches retries at once).
pub fn error_policy(sm: Arc<SchemaMigration>, error: &Error, ctx: Arc<Context>) -> Requeue {
    let key = key_of(&sm);
    let failures = ctx
        .failures
        .lock()
        .ok()
        .and_then(|f| f.get(&key).map(|f| f.count))
        .unwrap_or(1)
        .max(1);
    match error.class() {
        ErrorClass::Transient => Requeue::requeue(backoff(failures, &key)),
        ErrorClass::Permanent => Requeue::requeue(ctx.settings.requeue),
    }
}

/// 1s, 2s, 4s ... up to 5 minutes, with +-20% jitter derived from the resource and count.
pub fn backoff(failures: u32, key: &str) -> Duration {
    let base = Duration::from_secs(1) * 2u32.saturating_pow(failures.saturating_sub(1).min(9));
    let base = base.min(Duration::from_secs(300));
    let seed = crate::model::digest::sha256_hex(format!("{key}/{failures}").as_bytes());
    let n = u64::from_str_radix(&seed[..4], 16).unwrap_or(0) as f64 / 65535.0;
    base.mul_f64(0.8 + 0.4 * n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let a = backoff(1, "shop/orders");
        assert!(
            a >= Duration::from_millis(800) && a <= Duration::from_millis(1200),
            "{a:?}"
        );
        let b = backoff(4, "shop/orders");
        assert!(
            b >= Duration::from_millis(6400) && b <= Duration::from_millis(9600),
            "{b:?}"
        );
        assert!(backoff(40, "shop/orders") <= Duration::from_secs(360));
        assert_ne!(
            backoff(3, "a/b"),
            backoff(3, "c/d"),
            "spread across resources"
        );
    }
}
