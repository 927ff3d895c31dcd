//! Decide: everything the controller observed about one SchemaMigration -> its status and
//! the one action to take. A pure function, tested exhaustively; `reconcile` observes and
//! acts around it.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::api::conditions::{self as cond, reason};
use crate::api::{
    AppliedMigration, DowngradePolicy, LastRun, MigrationMode, Phase, STATUS_LIST_MAX,
    SchemaMigration, SchemaMigrationStatus,
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
    /// It tried and could not; the message says why (never with a secret in it).
    Unreachable(String),
    Read(DbRead),
}

/// What the history table says.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DbRead {
    pub current: Option<String>,
    /// The last applied migrations, newest last.
    pub applied: Vec<AppliedMigration>,
    /// Migrations of the source not applied yet.
    pub pending: Vec<String>,
    /// A step that did not finish, described.
    pub unfinished: Option<String>,
    /// Applied migrations that differ from the source, described.
    pub drift: Option<String>,
    /// Another tool's history needs a person (golang-migrate dirty, a failed Flyway row).
    pub tool_problem: Option<String>,
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

fn last_run(job: &JobView) -> LastRun {
    let result = match job.state {
        JobState::Active => "Running",
        JobState::Succeeded => "Succeeded",
        JobState::Failed => "Failed",
    };
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

/// Decides status and action for one resource.
pub fn decide(i: &Inputs<'_>) -> Decision {
    let sm = i.sm;
    let spec = &sm.spec;
    let previous = sm.status.clone().unwrap_or_default();
    let generation = sm.metadata.generation;
    let mut action = Action::Nothing;
    let mut events = Vec::new();

    // What the database says (or, unread, what the last successful run reported).
    let read = match &i.database {
        DbView::Read(r) => Some(r),
        _ => None,
    };
    let last_success = i
        .jobs
        .iter()
        .filter(|j| j.state == JobState::Succeeded)
        .find_map(|j| j.summary.as_ref()?.reached().map(str::to_string));
    let current: Option<String> = match read {
        Some(r) => r.current.clone(),
        None => last_success.clone().or(previous.current_version.clone()),
    };

    let target: Option<String> = spec.target_version.clone().or_else(|| match &i.source {
        SourceState::Loaded { versions, .. } => versions.last().cloned(),
        _ => None,
    });
    let active = i
        .jobs
        .iter()
        .find(|j| j.kind == RunKind::Job && j.state == JobState::Active);

    let verdict = 'verdict: {
        // Inputs first: without them nothing can be judged.
        match &i.secret {
            SecretState::Missing => {
                break 'verdict Verdict::stalled_pending(
                    reason::SECRET_NOT_FOUND,
                    format!(
                        "Secret {} not found in this namespace; create it with the database URL \
                         under key {}",
                        spec.database.url_secret_ref.name, spec.database.url_secret_ref.key
                    ),
                );
            }
            SecretState::KeyMissing => {
                break 'verdict Verdict::stalled_pending(
                    reason::SECRET_KEY_MISSING,
                    format!(
                        "Secret {} has no key {}",
                        spec.database.url_secret_ref.name, spec.database.url_secret_ref.key
                    ),
                );
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
                break 'verdict Verdict::stalled_pending(
                    reason::CONFIG_MAP_NOT_FOUND,
                    format!(
                        "ConfigMap {name} not found in this namespace; create it with the migration files"
                    ),
                );
            }
            SourceState::Invalid(m) => {
                break 'verdict Verdict::new(Phase::Blocked, reason::INVALID_SOURCE, m.clone());
            }
            _ => {}
        }
        if !i.image_allowed {
            break 'verdict Verdict::new(
                Phase::Blocked,
                reason::IMAGE_NOT_ALLOWED,
                "the runner image is not in the controller's list of allowed images".into(),
            );
        }
        if !i.service_account_allowed {
            break 'verdict Verdict::new(
                Phase::Blocked,
                reason::SERVICE_ACCOUNT_NOT_ALLOWED,
                "spec.runner.serviceAccountName is the schemagate controller's own service \
                 account, which no SchemaMigration may use"
                    .into(),
            );
        }
        if let (Some(t), SourceState::Loaded { versions, .. }) = (&spec.target_version, &i.source) {
            let known = versions.iter().any(|v| ver(v) == ver(t))
                || read.is_some_and(|r| r.applied.iter().any(|a| ver(&a.version) == ver(t)));
            if !known {
                break 'verdict Verdict::new(
                    Phase::Blocked,
                    reason::UNKNOWN_TARGET,
                    format!("targetVersion {t} is not a migration of the source"),
                );
            }
        }
        if let Some(r) = read {
            if let Some(u) = &r.unfinished {
                break 'verdict Verdict::new(
                    Phase::Failed,
                    reason::DIRTY,
                    format!("{u}; inspect the database, then run `schemagate migrate resolve`"),
                );
            }
            if let Some(d) = &r.drift {
                break 'verdict Verdict::new(Phase::Failed, reason::DRIFT, d.clone());
            }
            if let Some(p) = &r.tool_problem {
                break 'verdict Verdict::new(Phase::Failed, reason::TOOL_NEEDS_REPAIR, p.clone());
            }
        }

        let pos = target.as_deref().map(|t| position(current.as_deref(), t));
        let describe_target = target
            .clone()
            .unwrap_or_else(|| "the newest migration".into());
        if pos == Some(Position::AtTarget) && active.is_none() {
            break 'verdict Verdict::new(
                Phase::Ready,
                reason::UP_TO_DATE,
                format!("the database is at {describe_target}"),
            );
        }
        if pos == Some(Position::Ahead) && spec.downgrade == DowngradePolicy::Deny {
            break 'verdict Verdict::new(
                Phase::Blocked,
                reason::DOWNGRADE_DENIED,
                format!(
                    "the database is at {}, above the target {describe_target}; set \
                     downgrade: Allow to revert, or raise targetVersion",
                    current.as_deref().unwrap_or("?")
                ),
            );
        }
        if spec.paused {
            break 'verdict Verdict {
                phase: Phase::Pending,
                reason: reason::PAUSED,
                message: "paused: nothing runs until spec.paused is false".into(),
                reconciling: false,
                stalled: false,
            };
        }
        let command = if pos == Some(Position::Ahead) {
            RunCommand::Downgrade
        } else {
            RunCommand::Upgrade
        };

        match spec.mode {
            MigrationMode::InitContainer => {
                // Without a known target (an image source), the newest successful run says.
                if target.is_none()
                    && let Some(run) = i.jobs.first().filter(|r| r.state == JobState::Succeeded)
                {
                    break 'verdict Verdict::new(
                        Phase::Ready,
                        reason::UP_TO_DATE,
                        format!(
                            "{} migrated the database to {}",
                            run.name,
                            current.as_deref().unwrap_or("the newest migration")
                        ),
                    );
                }
                if let Some(run) = i
                    .jobs
                    .first()
                    .filter(|r| r.kind == RunKind::Pod && r.state == JobState::Failed)
                {
                    break 'verdict Verdict::new(
                        Phase::Failed,
                        reason::MIGRATION_FAILED,
                        format!(
                            "the init container of pod {} failed: {}",
                            run.name,
                            last_run(run).message.unwrap_or_else(|| "no message".into())
                        ),
                    );
                }
                if let DbView::Unreachable(m) = &i.database {
                    break 'verdict Verdict::new(
                        Phase::Pending,
                        reason::DATABASE_UNREACHABLE,
                        format!("cannot read the database to check its version: {m}"),
                    );
                }
                Verdict::new(
                    Phase::Migrating,
                    reason::WAITING_FOR_POD,
                    format!(
                        "the next pod labelled {}={} migrates the database to {describe_target}",
                        crate::api::MIGRATION_LABEL,
                        sm.metadata.name.as_deref().unwrap_or_default()
                    ),
                )
            }
            MigrationMode::Job => {
                let planned_name = i.namer.map(|namer| namer(target.as_deref(), command));
                let planned = planned_name.as_ref().and_then(|(name, _)| {
                    i.jobs
                        .iter()
                        .find(|j| j.kind == RunKind::Job && &j.name == name)
                });
                if let Some(job) = active {
                    break 'verdict Verdict::new(
                        Phase::Migrating,
                        reason::JOB_RUNNING,
                        format!("Job {} is migrating the database", job.name),
                    );
                }
                match planned {
                    Some(job) if job.state == JobState::Failed => Verdict::new(
                        Phase::Failed,
                        reason::MIGRATION_FAILED,
                        format!(
                            "Job {} failed: {}; fix the migration (a changed source or target \
                             runs a new Job), or delete the Job to retry",
                            job.name,
                            last_run(job).message.unwrap_or_else(|| "no message".into())
                        ),
                    ),
                    Some(job) => {
                        // Succeeded. Without a known target (an image source), that is the
                        // goal; with one, the database is not at it (read, or unread and the
                        // Job's summary says otherwise).
                        let reached = job
                            .summary
                            .as_ref()
                            .and_then(|s| s.reached())
                            .map(str::to_string);
                        if target.is_none() {
                            break 'verdict Verdict::new(
                                Phase::Ready,
                                reason::UP_TO_DATE,
                                format!(
                                    "Job {} migrated the database to {}",
                                    job.name,
                                    reached.as_deref().unwrap_or("the newest migration")
                                ),
                            );
                        }
                        Verdict::new(
                            Phase::Failed,
                            reason::UNEXPECTED_VERSION,
                            format!(
                                "Job {} succeeded but the database is at {}, not {describe_target}; \
                                 delete the Job to run it again",
                                job.name,
                                current.as_deref().unwrap_or("no version")
                            ),
                        )
                    }
                    None => match &planned_name {
                        Some((name, hash)) => {
                            action = Action::CreateJob(JobPlan {
                                name: name.clone(),
                                target: target.clone(),
                                command,
                                run_hash: hash.clone(),
                            });
                            events.push(EventNote {
                                warning: false,
                                reason: reason::JOB_CREATED,
                                note: format!(
                                    "created Job {name} to {} to {describe_target}",
                                    command.as_str()
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
        }
    };

    let db_condition = match &i.database {
        DbView::NotObserved => (
            false,
            reason::NOT_OBSERVED,
            "the controller does not read databases".to_string(),
        ),
        DbView::Unreachable(m) => (false, reason::DATABASE_UNREACHABLE, m.clone()),
        DbView::Read(_) => (
            true,
            reason::DATABASE_READ,
            "read the history table".to_string(),
        ),
    };
    let prev = &previous.conditions;
    let ready = verdict.phase == Phase::Ready;
    let condition = |kind, status, reason, message| {
        cond::condition(prev, kind, status, reason, message, generation, &i.now)
    };
    let message = &verdict.message;
    let conditions: Vec<Condition> = vec![
        condition(cond::READY, ready, verdict.reason, message.clone()),
        condition(
            cond::RECONCILING,
            verdict.reconciling,
            verdict.reason,
            message.clone(),
        ),
        condition(
            cond::STALLED,
            verdict.stalled,
            verdict.reason,
            message.clone(),
        ),
        condition(
            cond::DATABASE_REACHABLE,
            db_condition.0,
            db_condition.1,
            db_condition.2,
        ),
    ];

    if previous.phase != Some(verdict.phase) {
        events.push(EventNote {
            warning: verdict.stalled,
            reason: verdict.reason,
            note: format!("{}: {}", verdict.phase.as_str(), verdict.message),
        });
    }

    let newest = i.jobs.first();
    // A run that finished since the last status: who migrated what, or why it failed.
    if let Some(run) = newest.filter(|r| r.state != JobState::Active) {
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
    let status = SchemaMigrationStatus {
        observed_generation: generation,
        phase: Some(verdict.phase),
        current_version: current,
        target_version: target,
        pending: read
            .map(|r| r.pending.iter().take(STATUS_LIST_MAX).cloned().collect())
            .unwrap_or_else(|| previous.pending.clone()),
        applied: read
            .map(|r| {
                let skip = r.applied.len().saturating_sub(STATUS_LIST_MAX);
                r.applied[skip..].to_vec()
            })
            .unwrap_or_else(|| previous.applied.clone()),
        last_run: newest.map(last_run).or(previous.last_run.clone()),
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
