//! Decide: everything the controller observed about one SchemaMigration -> its status and
//! the one action to take. A pure function, tested exhaustively; `reconcile` observes and
//! acts around it.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::api::conditions::{self as cond, reason};
use crate::api::{
    AppliedContract, AppliedMigration, ContractStatus, DowngradePolicy, DriftAction, HeldContract,
    LastRun, MigrationMode, Phase, STATUS_LIST_MAX, SchemaDriftStatus, SchemaMigration,
    SchemaMigrationStatus,
};
use crate::model::Version;
pub use crate::runner::command::RunCommand;
pub use crate::runner::summary::{RunResult, RunSummary, SummaryError};

/// The database URL Secret, as far as the controller can tell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretState {
    Found { resource_version: String },
    Missing,
    KeyMissing,
}

/// The migration source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceState {
    /// Read and valid: its versions in order and a hash of its content.
    Loaded { versions: Vec<String>, hash: String },
    /// An image: its content is not visible to the controller.
    Opaque { hash: String },
    /// The ConfigMap does not exist.
    Missing,
    /// The files are invalid; the message says why.
    Invalid(String),
}

impl SourceState {
    fn hash(&self) -> Option<&str> {
        match self {
            SourceState::Loaded { hash, .. } | SourceState::Opaque { hash } => Some(hash),
            _ => None,
        }
    }
}

/// The database, as the controller read it.
#[derive(Clone, Debug, PartialEq)]
pub enum DbView {
    /// The controller does not read databases.
    NotObserved,
    /// It tried and could not.
    Failed(DbFailure),
    Read(Box<DbRead>),
}

/// Why the controller could not read a database: transient (it may pass by itself) or
/// permanent (a person must fix the Secret or the server).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DbFailureKind {
    /// Refused, unknown host, no answer in time, a broken connection.
    Unreachable,
    /// The server refused the credentials.
    Auth,
    /// The database named in the URL does not exist.
    NoDatabase,
    /// The URL (or the history table name) is invalid.
    Config,
}

impl DbFailureKind {
    /// True when waiting will not help.
    pub fn permanent(self) -> bool {
        !matches!(self, DbFailureKind::Unreachable)
    }
}

/// A failed database read (the message never holds a secret).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DbFailure {
    pub kind: DbFailureKind,
    pub message: String,
}

impl DbFailure {
    pub fn new(kind: DbFailureKind, message: impl Into<String>) -> Self {
        DbFailure {
            kind,
            message: message.into(),
        }
    }
}

/// A step whose outcome the history table lacks, or that failed part-way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyStep {
    pub version: String,
    /// It failed (a non-transactional step stopped part-way); else it has no outcome.
    pub failed: bool,
    /// What the engine says about it.
    pub message: String,
}

/// Applied migrations that differ from the source.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Drifted {
    /// Applied versions whose file changed.
    pub changed: Vec<String>,
    /// Applied versions whose file is gone.
    pub missing: Vec<String>,
    /// What the engine says about it (which files, what to do).
    pub message: String,
}

/// What the history table says.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DbRead {
    pub current: Option<String>,
    /// The last applied migrations, newest last.
    pub applied: Vec<AppliedMigration>,
    /// Migrations of the source not applied yet.
    pub pending: Vec<String>,
    /// A step that did not finish.
    pub unfinished: Option<DirtyStep>,
    /// Applied migrations that differ from the source.
    pub drift: Option<Drifted>,
    /// Another tool's history needs a person (golang-migrate dirty, a failed Flyway row).
    pub tool_problem: Option<String>,
    /// Lint findings of the pending migrations, one line each.
    pub lint: Vec<String>,
    /// Pending contract migrations (`-- schemagate:phase contract`), in version order.
    pub held_contract: Vec<String>,
    /// Applied contract migrations, in version order.
    pub contracts: Vec<AppliedContract>,
}

/// A running gated pod and the version it is for (the webhook's annotation; `None`: not
/// known, e.g. admitted before schemagate recorded it, or an image source).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodVersion {
    pub name: String,
    pub version: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobState {
    Active,
    Succeeded,
    Failed,
}

/// What ran a migration: a Job of the controller, or an app pod's init container.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunKind {
    Job,
    Pod,
}

/// A migration run: a Job the controller created for this resource, or a gated pod's
/// init container.
#[derive(Clone, Debug, PartialEq)]
pub struct JobView {
    pub kind: RunKind,
    pub name: String,
    pub state: JobState,
    pub started: Option<String>,
    pub finished: Option<String>,
    pub summary: Option<RunSummary>,
    /// Why the Job failed, when it has no summary (deadline exceeded, image pull...).
    pub failure: Option<String>,
    /// A contract Job (held contract migrations, `--phase contract`).
    pub contract: bool,
}

/// The Job to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobPlan {
    pub name: String,
    /// `None`: the newest migration of the source (an image source without a target).
    pub target: Option<String>,
    pub command: RunCommand,
    /// What determines the run (target, source, Secret, settings), hashed.
    pub run_hash: String,
    /// A fleet's batch: the Secrets of the databases this Job migrates (empty: the one
    /// database of `spec.database`).
    pub members: Vec<String>,
}

/// Names a Job from its target and command: (name, run hash).
pub type Namer<'a> = dyn Fn(Option<&str>, RunCommand) -> (String, String) + Sync + 'a;

/// Everything observed about one resource.
pub struct Inputs<'a> {
    pub sm: &'a SchemaMigration,
    pub now: Time,
    pub secret: SecretState,
    pub source: SourceState,
    pub database: DbView,
    /// The runs of this resource, newest first: the Jobs it owns and (init-container mode)
    /// the init containers of its gated pods.
    pub jobs: Vec<JobView>,
    /// Names the Job a run with these inputs gets, for a target and command: its name
    /// and run hash (see `job::run_hash`). `None` when the inputs are not all there.
    pub namer: Option<&'a Namer<'a>>,
    /// False when the runner image is outside the controller's allowed list.
    pub image_allowed: bool,
    /// False when the resource names the controller's own service account.
    pub service_account_allowed: bool,
    /// A live-schema drift check made for this decision (`None`: none was due; the
    /// status keeps the last one).
    pub schema_drift: Option<SchemaDriftStatus>,
    /// The running gated pods of this resource and their versions.
    pub pods: Vec<PodVersion>,
}

/// An Event to record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventNote {
    pub warning: bool,
    pub reason: &'static str,
    pub note: String,
}

/// What to do.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    Nothing,
    CreateJob(JobPlan),
}

/// The decision for one resource.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub status: SchemaMigrationStatus,
    pub action: Action,
    pub events: Vec<EventNote>,
}

fn ver(s: &str) -> Option<Version> {
    Version::parse(s).ok()
}

/// How `current` compares with `target`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Position {
    AtTarget,
    Behind,
    Ahead,
}

fn position(current: Option<&str>, target: &str) -> Position {
    let Some(t) = ver(target) else {
        return Position::Behind;
    };
    match current.and_then(ver) {
        None => Position::Behind,
        Some(c) if c == t => Position::AtTarget,
        Some(c) if c < t => Position::Behind,
        Some(_) => Position::Ahead,
    }
}

/// The one overall state, from which phase and conditions follow.
struct Verdict {
    phase: Phase,
    /// Ready condition: true only for `Phase::Ready`.
    reason: &'static str,
    message: String,
    reconciling: bool,
    stalled: bool,
}

impl Verdict {
    fn new(phase: Phase, reason: &'static str, message: String) -> Self {
        let (reconciling, stalled) = match phase {
            Phase::Ready => (false, false),
            Phase::Migrating => (true, false),
            Phase::Pending => (true, false),
            Phase::Failed | Phase::Blocked => (false, true),
        };
        Verdict {
            phase,
            reason,
            message,
            reconciling,
            stalled,
        }
    }

    fn stalled_pending(reason: &'static str, message: String) -> Self {
        Verdict {
            phase: Phase::Pending,
            reason,
            message,
            reconciling: false,
            stalled: true,
        }
    }
}

/// A run's state as `status.lastRun.result` says it.
pub fn run_result(state: JobState) -> &'static str {
    match state {
        JobState::Active => "Running",
        JobState::Succeeded => "Succeeded",
        JobState::Failed => "Failed",
    }
}

/// `status.lastRun` for a run.
pub fn last_run_of(job: &JobView) -> LastRun {
    last_run(job)
}

fn last_run(job: &JobView) -> LastRun {
    let result = run_result(job.state);
    let message = match (&job.summary, &job.failure) {
        (Some(s), _) => Some(s.describe()),
        (None, Some(f)) => Some(f.clone()),
        (None, None) => None,
    };
    LastRun {
        kind: match job.kind {
            RunKind::Job => "Job",
            RunKind::Pod => "Pod",
        }
        .into(),
        name: job.name.clone(),
        started_at: job.started.clone(),
        finished_at: job.finished.clone(),
        result: result.into(),
        message: message.map(|m| crate::engine::runner::clip(&m, 1024)),
    }
}

/// What the decision works from, computed once from the inputs.
struct Facts<'a> {
    read: Option<&'a DbRead>,
    /// The database's version (read, or unread: the last successful run's, or the status's).
    current: Option<String>,
    /// The target: `spec.targetVersion`, else the newest migration of a readable source.
    target: Option<String>,
    /// "3", or "the newest migration" when the target is not known (an image source).
    describe_target: String,
    /// The Job of this resource that is running.
    active: Option<&'a JobView>,
    /// The newest drift check (this decision's, else the status's), with spec.drift.
    drift: Option<SchemaDriftStatus>,
    /// Held contract migrations and which of them may run now.
    contract: Contract,
}

/// Expand/contract, as far as the database read tells.
#[derive(Default)]
struct Contract {
    /// Every pending migration up to the target is a contract one: the app's own
    /// migrations are all applied (the target is reached as far as the rollout goes).
    only_contract_pending: bool,
    /// The newest held contract migration that may run now (no running gated pod is for
    /// an older version).
    runnable: Option<String>,
    status: ContractStatus,
}

/// Which held contract migrations may run: those no running gated pod is older than.
fn contract_of(i: &Inputs<'_>, read: Option<&DbRead>, target: Option<&str>) -> Contract {
    let previous = i.sm.status.as_ref().map(|s| s.contract.clone());
    let Some(read) = read else {
        return Contract {
            status: previous.unwrap_or_default(),
            ..Default::default()
        };
    };
    let upto = |v: &str| target.is_none_or(|t| ver(v) <= ver(t));
    let pending: Vec<&String> = read.pending.iter().filter(|p| upto(p)).collect();
    let is_contract = |v: &String| read.held_contract.contains(v);
    // Held: contract migrations with no pending expand migration below them.
    let held: Vec<&String> = pending
        .iter()
        .copied()
        .filter(|c| is_contract(c))
        .filter(|c| !pending.iter().any(|p| !is_contract(p) && ver(p) < ver(c)))
        .collect();
    let unknown: Vec<&PodVersion> = i.pods.iter().filter(|p| p.version.is_none()).collect();
    let mut runnable = None;
    let mut held_status = Vec::new();
    for c in held {
        let older: Vec<&PodVersion> = i
            .pods
            .iter()
            .filter(|p| {
                p.version
                    .as_deref()
                    .and_then(ver)
                    .is_some_and(|v| Some(v) < ver(c))
            })
            .collect();
        let reason = match (older.first(), unknown.first()) {
            (Some(p), _) => Some(format!(
                "waits for {} pod(s) of older app versions to go (pod {} runs version {})",
                older.len(),
                p.name,
                p.version.as_deref().unwrap_or("?")
            )),
            (None, Some(p)) => Some(format!(
                "waits for {} pod(s) whose app version is not known to go (pod {} has no {} \
                 annotation: admitted before schemagate recorded versions, or an image \
                 source; run it by hand with `schemagate migrate upgrade --phase contract` \
                 once the old version is gone)",
                unknown.len(),
                p.name,
                crate::api::VERSION_ANNOTATION
            )),
            (None, None) => None,
        };
        match reason {
            Some(reason) => held_status.push(HeldContract {
                version: c.clone(),
                reason,
            }),
            None => runnable = Some(c.clone()),
        }
    }
    let skip = read.contracts.len().saturating_sub(STATUS_LIST_MAX);
    Contract {
        only_contract_pending: !pending.is_empty() && pending.iter().all(|p| is_contract(p)),
        runnable,
        status: ContractStatus {
            held: held_status.into_iter().take(STATUS_LIST_MAX).collect(),
            applied: read.contracts[skip..].to_vec(),
            oldest_compatible_version: read.contracts.last().map(|c| c.version.clone()),
        },
    }
}

fn facts<'a>(i: &'a Inputs<'_>) -> Facts<'a> {
    let previous = i.sm.status.as_ref();
    let read = match &i.database {
        DbView::Read(r) => Some(r.as_ref()),
        _ => None,
    };
    let last_success = i
        .jobs
        .iter()
        .filter(|j| j.state == JobState::Succeeded)
        .find_map(|j| j.summary.as_ref()?.reached().map(str::to_string));
    let current = match read {
        Some(r) => r.current.clone(),
        None => last_success.or_else(|| previous.and_then(|p| p.current_version.clone())),
    };
    let target =
        i.sm.spec
            .target_version
            .clone()
            .or_else(|| match &i.source {
                SourceState::Loaded { versions, .. } => versions.last().cloned(),
                _ => None,
            });
    let describe_target = target
        .clone()
        .unwrap_or_else(|| "the newest migration".into());
    let active = i
        .jobs
        .iter()
        .find(|j| j.kind == RunKind::Job && j.state == JobState::Active && !j.contract);
    let drift = i.sm.spec.drift.as_ref().and_then(|_| {
        i.schema_drift
            .clone()
            .or_else(|| previous.and_then(|p| p.schema_drift.clone()))
    });
    let contract = contract_of(i, read, target.as_deref());
    Facts {
        read,
        current,
        target,
        describe_target,
        active,
        drift,
        contract,
    }
}

/// Inputs a person must fix before anything can be judged: the Secret, the source, the
/// runner policy, the target, a database that refuses the controller for good.
fn input_problem(i: &Inputs<'_>, f: &Facts<'_>) -> Option<Verdict> {
    let spec = &i.sm.spec;
    let none = crate::api::SecretKeyRef {
        name: String::new(),
        key: String::new(),
    };
    let secret = spec.secret_ref().unwrap_or(&none);
    match &i.secret {
        SecretState::Missing => {
            return Some(Verdict::stalled_pending(
                reason::SECRET_NOT_FOUND,
                format!(
                    "Secret {} not found in this namespace; create it with the database URL \
                     under key {}",
                    secret.name, secret.key
                ),
            ));
        }
        SecretState::KeyMissing => {
            return Some(Verdict::stalled_pending(
                reason::SECRET_KEY_MISSING,
                format!("Secret {} has no key {}", secret.name, secret.key),
            ));
        }
        SecretState::Found { .. } => {}
    }
    match &i.source {
        SourceState::Missing => {
            let name = spec
                .source
                .config_map_ref
                .as_ref()
                .map(|c| c.name.as_str())
                .unwrap_or("?");
            return Some(Verdict::stalled_pending(
                reason::CONFIG_MAP_NOT_FOUND,
                format!(
                    "ConfigMap {name} not found in this namespace; create it with the migration files"
                ),
            ));
        }
        SourceState::Invalid(m) => {
            return Some(Verdict::new(
                Phase::Blocked,
                reason::INVALID_SOURCE,
                m.clone(),
            ));
        }
        _ => {}
    }
    if !i.image_allowed {
        return Some(Verdict::new(
            Phase::Blocked,
            reason::IMAGE_NOT_ALLOWED,
            "the runner image is not in the controller's list of allowed images".into(),
        ));
    }
    if !i.service_account_allowed {
        return Some(Verdict::new(
            Phase::Blocked,
            reason::SERVICE_ACCOUNT_NOT_ALLOWED,
            "spec.runner.serviceAccountName is the schemagate controller's own service \
             account, which no SchemaMigration may use"
                .into(),
        ));
    }
    if let (Some(t), SourceState::Loaded { versions, .. }) = (&spec.target_version, &i.source) {
        let known = versions.iter().any(|v| ver(v) == ver(t))
            || f.read
                .is_some_and(|r| r.applied.iter().any(|a| ver(&a.version) == ver(t)));
        if !known {
            return Some(Verdict::new(
                Phase::Blocked,
                reason::UNKNOWN_TARGET,
                format!("targetVersion {t} is not a migration of the source"),
            ));
        }
    }
    if let DbView::Failed(e) = &i.database
        && e.kind.permanent()
    {
        let (why, todo) = match e.kind {
            DbFailureKind::Auth => (
                reason::DATABASE_AUTH_FAILED,
                "fix the credentials in the Secret",
            ),
            DbFailureKind::NoDatabase => (
                reason::DATABASE_NOT_FOUND,
                "create the database, or fix its name in the Secret's URL",
            ),
            _ => (reason::INVALID_DATABASE_URL, "fix the URL in the Secret"),
        };
        return Some(Verdict::stalled_pending(
            why,
            format!(
                "{}; {todo} ({} key {}): the runner would fail the same way",
                e.message, secret.name, secret.key
            ),
        ));
    }
    None
}

/// A history table that needs a person: a dirty step, drift, another tool's repair.
fn database_problem(read: &DbRead) -> Option<Verdict> {
    if let Some(u) = &read.unfinished {
        return Some(Verdict::new(
            Phase::Failed,
            reason::DIRTY,
            format!(
                "{}; inspect the database, then run `schemagate migrate resolve {} \
                 --applied` (or `--reverted`)",
                u.message, u.version
            ),
        ));
    }
    if let Some(d) = &read.drift {
        return Some(Verdict::new(
            Phase::Failed,
            reason::DRIFT,
            d.message.clone(),
        ));
    }
    read.tool_problem
        .as_ref()
        .map(|p| Verdict::new(Phase::Failed, reason::TOOL_NEEDS_REPAIR, p.clone()))
}

/// At the target, with held contract migrations that may run now: the contract Job (found,
/// or to create). The resource stays Ready (the app's migrations are applied); a failed
/// contract Job fails it.
fn contract_verdict(
    i: &Inputs<'_>,
    f: &Facts<'_>,
    ready: Verdict,
    action: &mut Action,
    events: &mut Vec<EventNote>,
) -> Verdict {
    // At the target as far as the app goes: what is left is contract migrations.
    let ready = if f.contract.only_contract_pending {
        Verdict {
            message: format!(
                "the database is at {}; contract migrations wait until no pod of an older \
                 app version runs (status.contract)",
                f.current.as_deref().unwrap_or("no version")
            ),
            ..ready
        }
    } else {
        ready
    };
    let Some(c) = f.contract.runnable.as_deref() else {
        return ready;
    };
    let Some((name, hash)) = i.namer.map(|n| n(Some(c), RunCommand::Contract)) else {
        return ready;
    };
    let job = i
        .jobs
        .iter()
        .find(|j| j.kind == RunKind::Job && j.name == name);
    match job {
        Some(j)
            if j.state == JobState::Failed
                && let Some(v) = approval_verdict(i, j, &format!("contract Job {}", j.name)) =>
        {
            v
        }
        Some(j) if j.state == JobState::Failed => Verdict::new(
            Phase::Failed,
            failed_reason(j),
            format!(
                "contract Job {} failed: {}; fix the contract migration (a changed source \
                 runs a new Job), or delete the Job to retry",
                j.name,
                last_run(j).message.unwrap_or_else(|| "no message".into())
            ),
        ),
        Some(j) => Verdict {
            message: format!(
                "{}; contract migrations up to {c} {} in Job {}",
                ready.message,
                if j.state == JobState::Active {
                    "run"
                } else {
                    "ran"
                },
                j.name
            ),
            ..ready
        },
        None => {
            *action = Action::CreateJob(JobPlan {
                name: name.clone(),
                target: Some(c.to_string()),
                command: RunCommand::Contract,
                run_hash: hash,
                members: Vec::new(),
            });
            events.push(EventNote {
                warning: false,
                reason: reason::CONTRACT_STARTED,
                note: format!(
                    "no pod of an older app version runs: created Job {name} to apply the \
                     held contract migrations up to {c}"
                ),
            });
            Verdict {
                message: format!(
                    "{}; contract migrations up to {c} run in Job {name}",
                    ready.message
                ),
                ..ready
            }
        }
    }
}

/// Events for contract migrations: newly held, newly applied.
fn contract_events(i: &Inputs<'_>, f: &Facts<'_>, events: &mut Vec<EventNote>) {
    let before =
        i.sm.status
            .as_ref()
            .map(|s| s.contract.clone())
            .unwrap_or_default();
    for h in &f.contract.status.held {
        if !before.held.iter().any(|b| b.version == h.version) {
            events.push(EventNote {
                warning: false,
                reason: reason::CONTRACT_HELD,
                note: format!("contract migration {} is held: {}", h.version, h.reason),
            });
        }
    }
    for a in &f.contract.status.applied {
        // Not for what a resource's first status finds applied already.
        if !before.applied.iter().any(|b| b.version == a.version) && i.sm.status.is_some() {
            events.push(EventNote {
                warning: false,
                reason: reason::CONTRACT_APPLIED,
                note: format!(
                    "contract migration {} applied{}{}; app versions below {} can no longer run",
                    a.version,
                    a.applied_at
                        .as_deref()
                        .map(|t| format!(" at {t}"))
                        .unwrap_or_default(),
                    a.applied_by
                        .as_deref()
                        .map(|b| format!(" by {b}"))
                        .unwrap_or_default(),
                    a.version
                ),
            });
        }
    }
}

/// With `onDrift: Block`, a drifted live schema blocks the resource (gated pods are
/// refused, nothing runs) until it is fixed or accepted.
fn drift_block(i: &Inputs<'_>, f: &Facts<'_>) -> Option<Verdict> {
    let spec = i.sm.spec.drift.as_ref()?;
    let d = f.drift.as_ref().filter(|d| d.result == DRIFTED)?;
    // Pending migrations may be the fix: they run (the next check judges the result).
    if f.read.is_some_and(|r| !r.pending.is_empty()) {
        return None;
    }
    (spec.on_drift == DriftAction::Block).then(|| {
        Verdict::new(
            Phase::Blocked,
            reason::SCHEMA_DRIFTED,
            format!(
                "{}; fix it with a migration (or revert it by hand), or keep it with \
                 `schemagate migrate drift --accept --reason <why>`; spec.drift.onDrift: \
                 Block refuses gated pods meanwhile",
                d.message
            ),
        )
    })
}

/// `status.schemaDrift.result` values.
pub const DRIFTED: &str = "Drifted";
pub const CLEAN: &str = "Clean";
pub const NO_BASELINE: &str = "NoBaseline";
pub const NOT_CHECKED: &str = "NotChecked";

/// Where the database stands against the target: at it (Ready), above it with downgrades
/// denied (Blocked), or paused. `None`: something must run.
fn version_verdict(i: &Inputs<'_>, f: &Facts<'_>, pos: Option<Position>) -> Option<Verdict> {
    if pos == Some(Position::AtTarget) && f.active.is_none() {
        return Some(Verdict::new(
            Phase::Ready,
            reason::UP_TO_DATE,
            format!("the database is at {}", f.describe_target),
        ));
    }
    if pos == Some(Position::Ahead) && i.sm.spec.downgrade == DowngradePolicy::Deny {
        return Some(Verdict::new(
            Phase::Blocked,
            reason::DOWNGRADE_DENIED,
            format!(
                "the database is at {}, above the target {}; set downgrade: Allow to \
                 revert, or raise targetVersion",
                f.current.as_deref().unwrap_or("?"),
                f.describe_target
            ),
        ));
    }
    i.sm.spec.paused.then(|| Verdict {
        phase: Phase::Pending,
        reason: reason::PAUSED,
        message: "paused: nothing runs until spec.paused is false".into(),
        reconciling: false,
        stalled: false,
    })
}

/// Init-container mode: the gated pods migrate; the controller reports their runs.
fn init_container_verdict(i: &Inputs<'_>, f: &Facts<'_>) -> Verdict {
    // Without a known target (an image source), the newest successful run says.
    if f.target.is_none()
        && let Some(run) = i.jobs.first().filter(|r| r.state == JobState::Succeeded)
    {
        return Verdict::new(
            Phase::Ready,
            reason::UP_TO_DATE,
            format!(
                "{} migrated the database to {}",
                run.name,
                f.current.as_deref().unwrap_or("the newest migration")
            ),
        );
    }
    if let Some(run) = i
        .jobs
        .first()
        .filter(|r| r.kind == RunKind::Pod && r.state == JobState::Failed)
    {
        if let Some(v) = approval_verdict(i, run, &format!("pod {}", run.name)) {
            return v;
        }
        return Verdict::new(
            Phase::Failed,
            failed_reason(run),
            format!(
                "the init container of pod {} failed: {}{}",
                run.name,
                last_run(run).message.unwrap_or_else(|| "no message".into()),
                if failed_reason(run) == reason::LOCK_BUSY {
                    "; the kubelet retries it"
                } else {
                    ""
                }
            ),
        );
    }
    if let DbView::Failed(e) = &i.database {
        return Verdict::new(
            Phase::Pending,
            reason::DATABASE_UNREACHABLE,
            format!(
                "cannot read the database to check its version: {}",
                e.message
            ),
        );
    }
    Verdict::new(
        Phase::Migrating,
        reason::WAITING_FOR_POD,
        format!(
            "the next pod labelled {}={} migrates the database to {}",
            crate::api::MIGRATION_LABEL,
            i.sm.metadata.name.as_deref().unwrap_or_default(),
            f.describe_target
        ),
    )
}

/// The runner's error kind for a plan refused for want of an approval.
const APPROVAL_KIND: &str = "approval_required";

/// True when `hash` is among the resource's approved plans.
pub fn plan_approved(sm: &SchemaMigration, hash: &str) -> bool {
    sm.spec
        .approved_plans
        .iter()
        .any(|a| crate::engine::approval::same_hash(&a.plan_hash, hash))
}

/// A run refused because its plan needs an approval: `Some(Blocked)` with the hash while
/// the plan is not approved; `Some(Migrating)` once it is (runs started before the
/// approval do not carry it: the next one does). `None` for any other run.
fn approval_verdict(i: &Inputs<'_>, run: &JobView, who: &str) -> Option<Verdict> {
    let s = run.summary.as_ref()?;
    let e = s.error.as_ref().filter(|e| e.kind == APPROVAL_KIND)?;
    let hash = s.plan_hash.clone().unwrap_or_default();
    if plan_approved(i.sm, &hash) {
        return Some(Verdict::new(
            Phase::Migrating,
            reason::WAITING_FOR_POD,
            format!(
                "plan {hash} is approved; {}",
                match run.kind {
                    RunKind::Pod =>
                        "the next pod admitted runs it (pods admitted before the \
                                     approval keep failing: restart them, e.g. `kubectl rollout \
                                     restart`)",
                    RunKind::Job => "a new Job runs it",
                }
            ),
        ));
    }
    Some(Verdict::new(
        Phase::Blocked,
        reason::APPROVAL_REQUIRED,
        format!(
            "{who}: {}; to run it, review the plan (`schemagate migrate plan`) and add \
             {{planHash: {hash}, approvedBy: <you>, reason: <why>}} to spec.approvedPlans",
            e.message
        ),
    ))
}

/// Why a run failed, as a condition reason: the runner's own kind where it has one.
fn failed_reason(run: &JobView) -> &'static str {
    match run.summary.as_ref().and_then(|s| s.error.as_ref()) {
        Some(e) if e.kind == "lock_busy" => reason::LOCK_BUSY,
        Some(e) if e.kind == APPROVAL_KIND => reason::APPROVAL_REQUIRED,
        _ => reason::MIGRATION_FAILED,
    }
}

/// Job mode: the Job for this target and command, found (running, failed, succeeded) or
/// to create.
fn job_verdict(
    i: &Inputs<'_>,
    f: &Facts<'_>,
    command: RunCommand,
    action: &mut Action,
    events: &mut Vec<EventNote>,
) -> Verdict {
    let planned_name = i.namer.map(|namer| namer(f.target.as_deref(), command));
    let planned = planned_name.as_ref().and_then(|(name, _)| {
        i.jobs
            .iter()
            .find(|j| j.kind == RunKind::Job && &j.name == name)
    });
    if let Some(job) = f.active {
        return Verdict::new(
            Phase::Migrating,
            reason::JOB_RUNNING,
            format!("Job {} is migrating the database", job.name),
        );
    }
    match planned {
        Some(job)
            if job.state == JobState::Failed
                && let Some(v) = approval_verdict(i, job, &format!("Job {}", job.name)) =>
        {
            v
        }
        Some(job) if job.state == JobState::Failed => Verdict::new(
            Phase::Failed,
            failed_reason(job),
            format!(
                "Job {} failed: {}; {}",
                job.name,
                last_run(job).message.unwrap_or_else(|| "no message".into()),
                if failed_reason(job) == reason::LOCK_BUSY {
                    "delete the Job to retry once those sessions are gone (or raise \
                     spec.options.lockRetryBudget)"
                } else {
                    "fix the migration (a changed source or target runs a new Job), or \
                     delete the Job to retry"
                }
            ),
        ),
        // Succeeded. Without a known target (an image source), that is the goal; with one,
        // the database is not at it (read, or unread and the Job's summary says otherwise).
        Some(job) if f.target.is_none() => Verdict::new(
            Phase::Ready,
            reason::UP_TO_DATE,
            format!(
                "Job {} migrated the database to {}",
                job.name,
                job.summary
                    .as_ref()
                    .and_then(|s| s.reached())
                    .unwrap_or("the newest migration")
            ),
        ),
        Some(job) => Verdict::new(
            Phase::Failed,
            reason::UNEXPECTED_VERSION,
            format!(
                "Job {} succeeded but the database is at {}, not {}; delete the Job to run \
                 it again",
                job.name,
                f.current.as_deref().unwrap_or("no version"),
                f.describe_target
            ),
        ),
        None => match &planned_name {
            Some((name, hash)) => {
                *action = Action::CreateJob(JobPlan {
                    name: name.clone(),
                    target: f.target.clone(),
                    command,
                    run_hash: hash.clone(),
                    members: Vec::new(),
                });
                events.push(EventNote {
                    warning: false,
                    reason: reason::JOB_CREATED,
                    note: format!(
                        "created Job {name} to {} to {}",
                        command.as_str(),
                        f.describe_target
                    ),
                });
                Verdict::new(
                    Phase::Migrating,
                    reason::JOB_CREATED,
                    format!("Job {name} created"),
                )
            }
            None => Verdict::stalled_pending(
                reason::INVALID_SOURCE,
                "no Job can be planned for this source".into(),
            ),
        },
    }
}

/// The one verdict for the resource, and the action it implies.
fn verdict(i: &Inputs<'_>, f: &Facts<'_>, events: &mut Vec<EventNote>) -> (Verdict, Action) {
    let mut action = Action::Nothing;
    if let Some(v) = input_problem(i, f)
        .or_else(|| f.read.and_then(database_problem))
        .or_else(|| drift_block(i, f))
    {
        return (v, action);
    }
    let pos = f
        .target
        .as_deref()
        .map(|t| position(f.current.as_deref(), t))
        // What is left is contract migrations: the app's own are applied.
        .map(|p| match p {
            Position::Behind if f.contract.only_contract_pending => Position::AtTarget,
            p => p,
        });
    if let Some(v) = version_verdict(i, f, pos) {
        if v.phase == Phase::Ready {
            return (contract_verdict(i, f, v, &mut action, events), action);
        }
        return (v, action);
    }
    let v = match i.sm.spec.mode {
        MigrationMode::InitContainer => init_container_verdict(i, f),
        MigrationMode::Job => {
            let command = if pos == Some(Position::Ahead) {
                RunCommand::Downgrade
            } else {
                RunCommand::Upgrade
            };
            job_verdict(i, f, command, &mut action, events)
        }
    };
    (v, action)
}

/// The kstatus conditions of a verdict, plus whether the database could be read.
fn conditions_of(i: &Inputs<'_>, f: &Facts<'_>, v: &Verdict) -> Vec<Condition> {
    let db_condition = match &i.database {
        DbView::NotObserved => (
            false,
            reason::NOT_OBSERVED,
            "the controller does not read databases".to_string(),
        ),
        DbView::Failed(e) => (false, reason::DATABASE_UNREACHABLE, e.message.clone()),
        DbView::Read(_) => (
            true,
            reason::DATABASE_READ,
            "read the history table".to_string(),
        ),
    };
    let previous =
        i.sm.status
            .as_ref()
            .map(|s| s.conditions.as_slice())
            .unwrap_or_default();
    let generation = i.sm.metadata.generation;
    let condition = |kind, status, reason, message| {
        cond::condition(previous, kind, status, reason, message, generation, &i.now)
    };
    let drift = i.sm.spec.drift.as_ref().map(|_| {
        let (status, why, message) = match f.drift.as_ref() {
            Some(d) if d.result == DRIFTED => (true, reason::SCHEMA_DRIFTED, d.message.clone()),
            Some(d) if d.result == CLEAN => (false, reason::NO_DRIFT, d.message.clone()),
            Some(d) if d.result == NO_BASELINE => (false, reason::NO_BASELINE, d.message.clone()),
            Some(d) => (false, reason::NOT_CHECKED, d.message.clone()),
            None => (
                false,
                reason::NOT_CHECKED,
                "no drift check has run yet".to_string(),
            ),
        };
        condition(cond::SCHEMA_DRIFTED, status, why, message)
    });
    let mut all = vec![
        condition(
            cond::READY,
            v.phase == Phase::Ready,
            v.reason,
            v.message.clone(),
        ),
        condition(
            cond::RECONCILING,
            v.reconciling,
            v.reason,
            v.message.clone(),
        ),
        condition(cond::STALLED, v.stalled, v.reason, v.message.clone()),
        condition(
            cond::DATABASE_REACHABLE,
            db_condition.0,
            db_condition.1,
            db_condition.2,
        ),
    ];
    all.extend(drift);
    all
}

/// Events for what changed since the last status: a new phase, a run that finished.
fn events_of(i: &Inputs<'_>, v: &Verdict, events: &mut Vec<EventNote>) {
    let previous = i.sm.status.clone().unwrap_or_default();
    if previous.phase != Some(v.phase) {
        events.push(EventNote {
            warning: v.stalled,
            reason: v.reason,
            note: format!("{}: {}", v.phase.as_str(), v.message),
        });
    }
    // A run that finished since the last status: who migrated what, or why it failed.
    let Some(run) = i.jobs.first().filter(|r| r.state != JobState::Active) else {
        return;
    };
    let seen = previous
        .last_run
        .as_ref()
        .is_some_and(|l| l.name == run.name && l.result == last_run(run).result);
    let applied = run.summary.as_ref().is_some_and(|s| !s.applied.is_empty());
    let kind = match run.kind {
        RunKind::Job => "Job",
        RunKind::Pod => "pod",
    };
    let message = last_run(run).message.unwrap_or_default();
    let told = events.iter().any(|e| e.reason == reason::MIGRATION_FAILED);
    if !seen && run.state == JobState::Failed && !told {
        events.push(EventNote {
            warning: true,
            reason: reason::MIGRATION_FAILED,
            note: format!("{kind} {} failed: {message}", run.name),
        });
    } else if !seen && applied {
        events.push(EventNote {
            warning: false,
            reason: reason::MIGRATED,
            note: format!("{kind} {} {message}", run.name),
        });
    }
}

/// A Warning Event when a drift check finds the live schema drifted (again, or
/// differently), a Normal one when a drift is gone.
fn drift_events(i: &Inputs<'_>, events: &mut Vec<EventNote>) {
    let Some(now) = i
        .schema_drift
        .as_ref()
        .filter(|_| i.sm.spec.drift.is_some())
    else {
        return;
    };
    let before = i.sm.status.as_ref().and_then(|s| s.schema_drift.as_ref());
    let was_drifted = before.is_some_and(|b| b.result == DRIFTED);
    if now.result == DRIFTED {
        let same = before.is_some_and(|b| {
            b.result == DRIFTED && b.differences == now.differences && b.count == now.count
        });
        if !same && !events.iter().any(|e| e.reason == reason::SCHEMA_DRIFTED) {
            events.push(EventNote {
                warning: true,
                reason: reason::SCHEMA_DRIFTED,
                note: now.message.clone(),
            });
        }
    } else if was_drifted && now.result == CLEAN {
        events.push(EventNote {
            warning: false,
            reason: reason::NO_DRIFT,
            note: now.message.clone(),
        });
    }
}

/// Decides status and action for one resource: the facts, the verdict (input problems,
/// then database problems, then the version against the target, then the mode's own
/// rules), its conditions and Events.
pub fn decide(i: &Inputs<'_>) -> Decision {
    let f = facts(i);
    let mut events = Vec::new();
    let (v, action) = verdict(i, &f, &mut events);
    let conditions = conditions_of(i, &f, &v);
    events_of(i, &v, &mut events);
    drift_events(i, &mut events);
    contract_events(i, &f, &mut events);
    let previous = i.sm.status.clone().unwrap_or_default();
    let status = SchemaMigrationStatus {
        observed_generation: i.sm.metadata.generation,
        phase: Some(v.phase),
        current_version: f.current.clone(),
        target_version: f.target.clone(),
        pending: f
            .read
            .map(|r| r.pending.iter().take(STATUS_LIST_MAX).cloned().collect())
            .unwrap_or_else(|| previous.pending.clone()),
        lint_findings: f
            .read
            .map(|r| r.lint.iter().take(STATUS_LIST_MAX).cloned().collect())
            .unwrap_or_else(|| previous.lint_findings.clone()),
        applied: f
            .read
            .map(|r| {
                let skip = r.applied.len().saturating_sub(STATUS_LIST_MAX);
                r.applied[skip..].to_vec()
            })
            .unwrap_or_else(|| previous.applied.clone()),
        last_run: i.jobs.first().map(last_run).or(previous.last_run.clone()),
        schema_drift: f.drift.clone(),
        databases: None,
        contract: f.contract.status.clone(),
        conditions,
    };
    Decision {
        status,
        action,
        events,
    }
}

/// The source hash of the inputs, for naming Jobs.
pub fn source_hash(source: &SourceState) -> Option<&str> {
    source.hash()
}

#[cfg(test)]
mod tests;
