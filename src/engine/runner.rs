//! Running plans: the lock, the steps, the history rows.
//!
//! The order of a run is fixed: read the history (no lock) -> plan -> if nothing to do,
//! stop (the no-op path: one connect, one read) -> take the lock -> read the history again
//! and plan again (another runner may have done the work meanwhile) -> run each step with
//! its history row -> release the lock.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::approval::{self, ApprovalPolicy, PlanApproval};
use super::dialect::sql::{self, Guard};
use super::dialect::{Backend, DbError, DbErrorKind, Done, LockHolder, NewRow, StepTimeouts};
use super::guard;
use super::history::{DbState, Kind};
use super::lint;
use super::lock::{self, Held, LockError, LockMode};
use super::lockwait::{self, Blocker, LockRetry};
use super::plan::{self, Direction, Plan, PlanError, PlanOptions, Step, Target};
use super::redact;
use super::schema;
use super::script::{self, Dialect, Statement, TxControlError};
use super::sent::{self, Fill, Role, Sent, StepScript};
use super::source::{Migration, MigrationSet, Script};
use super::version::Version;

/// Settings of a run.
#[derive(Clone, Debug)]
pub struct RunSettings {
    /// Recorded in `applied_by` and shown to waiting runners: host or pod name and pid.
    pub runner_id: String,
    /// How long to wait for another runner's lock before giving up.
    pub lock_timeout: Duration,
    /// Session lock or lease.
    pub lock: LockMode,
    /// Timeouts for every step that does not set its own.
    pub timeouts: StepTimeouts,
    /// Refuse an upgrade with data-losing statements in migrations that do not carry
    /// `-- schemagate:allow-destructive <reason>`.
    pub deny_destructive: bool,
    /// How a step that timed out waiting for a table lock is retried (see `lockwait`).
    pub lock_retry: LockRetry,
    /// What lint findings of the steps about to run do (see `lint`).
    pub lint: LintPolicy,
    /// Which plans need a person's approval, and the approved plan hashes (see `approval`).
    pub approval: ApprovalPolicy,
    /// Record the schema's fingerprint after each step (see `schema`).
    pub fingerprints: bool,
    pub plan: PlanOptions,
    /// Asked from outside (SIGTERM, Ctrl-C) to stop: checked before each step.
    pub stop: Option<Arc<StopRequest>>,
}

/// A request to stop a run at the next step boundary, and whether a run is between its
/// first and last step (so the one asking knows whether stopping now would cut a step).
#[derive(Debug, Default)]
pub struct StopRequest {
    requested: AtomicBool,
    busy: AtomicBool,
    /// The versions this process's runs applied (or reverted), in order.
    done: std::sync::Mutex<Vec<String>>,
}

impl StopRequest {
    pub fn request(&self) {
        self.requested.store(true, Ordering::SeqCst);
    }
    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }
    /// True while a run holds the lock and is running steps.
    pub fn busy(&self) -> bool {
        self.busy.load(Ordering::SeqCst)
    }
    /// The versions applied (or reverted) so far.
    pub fn done(&self) -> Vec<String> {
        self.done.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
    fn record(&self, version: &Version) {
        self.done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(version.to_string());
    }
    fn enter(&self) -> Busy<'_> {
        self.busy.store(true, Ordering::SeqCst);
        Busy(self)
    }
}

struct Busy<'a>(&'a StopRequest);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.busy.store(false, Ordering::SeqCst);
    }
}

/// What a run did.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunReport {
    pub direction: Direction,
    pub from: Option<String>,
    pub to: Option<String>,
    pub steps: Vec<StepReport>,
    /// Nothing had to run.
    pub noop: bool,
    /// The database is above the requested target; nothing ran (use downgrade to go back).
    pub ahead: bool,
    pub lock_wait_ms: u64,
    pub duration_ms: u64,
    /// The hash of the plan that ran (see `approval`); none when nothing ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan_hash: Option<String>,
    /// Contract migrations this expand run held (`--phase expand`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub held: Vec<String>,
}

/// One step that ran.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StepReport {
    pub version: String,
    pub description: String,
    pub direction: Direction,
    pub file: String,
    pub transactional: bool,
    pub duration_ms: u64,
}

/// What a failed step left behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum StepOutcome {
    /// The step's transaction rolled back: the database is as before the step.
    RolledBack,
    /// A non-transactional step stopped part-way and is recorded as dirty.
    Dirty,
    /// The connection broke during COMMIT: the next run's read of the history tells
    /// whether the step (and its history row) committed.
    Unknown,
}

/// A step that failed.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StepFailure {
    pub version: String,
    pub description: String,
    pub direction: Direction,
    pub file: String,
    /// Line in the file of the failing statement (when it could be told).
    pub line: Option<usize>,
    /// 1-based number of the failing statement and the script's statement count.
    pub statement_number: Option<usize>,
    pub statements_total: usize,
    pub statement: Option<String>,
    pub message: String,
    pub code: Option<String>,
    /// What the failure left behind.
    pub outcome: StepOutcome,
    /// Steps of this run that completed before the failure (they stay applied).
    pub completed_steps: Vec<StepReport>,
}

impl std::fmt::Display for StepFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verb = if self.direction == Direction::Up {
            "migration"
        } else {
            "downgrade of"
        };
        write!(f, "{verb} {} ({}) failed", self.version, self.file)?;
        if let (Some(n), Some(line)) = (self.statement_number, self.line) {
            write!(
                f,
                " at statement {n} of {} (line {line})",
                self.statements_total
            )?;
        }
        if let Some(s) = &self.statement {
            write!(f, ": `{s}`")?;
        }
        write!(f, ": {}", self.message)?;
        match &self.code {
            // SQLSTATE codes have five characters; SQLite reports its own result codes.
            Some(code) if code.len() == 5 => write!(f, " [SQLSTATE {code}]")?,
            Some(code) => write!(f, " [SQLite result code {code}]")?,
            None => {}
        }
        f.write_str(match self.outcome {
            StepOutcome::RolledBack => "; its transaction was rolled back",
            StepOutcome::Dirty => "; it ran outside a transaction and is recorded as dirty",
            StepOutcome::Unknown => {
                "; whether it committed is unknown (`schemagate migrate status` will tell)"
            }
        })
    }
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{during}: {source}")]
    Db {
        during: &'static str,
        #[source]
        source: DbError,
    },
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("{file}: {source}")]
    Script {
        file: String,
        #[source]
        source: TxControlError,
    },
    #[error("gave up waiting for the migration lock after {}s{}", .waited.as_secs(), holder_text(.holder))]
    LockTimeout {
        waited: Duration,
        holder: Option<LockHolder>,
    },
    #[error("{0}")]
    StepFailed(Box<StepFailure>),
    #[error(
        "{failure}; retried for {}s ({attempts} attempts), but other sessions kept holding the \
         lock: {}",
        .spent.as_secs(),
        lockwait::describe(.blockers)
    )]
    LockRetriesExhausted {
        failure: Box<StepFailure>,
        attempts: u32,
        spent: Duration,
        blockers: Vec<Blocker>,
    },
    #[error("{0} is not an unfinished step; nothing to resolve{1}")]
    NothingToResolve(String, String),
    #[error("the database is at {current}, above {target}: stamp only records versions forward")]
    StampBelowCurrent { target: String, current: String },
    #[error("{file}: {message}")]
    Directive {
        file: String,
        message: String,
        /// What to do, where the engine knows better than "fix the directive".
        hint: Option<&'static str>,
    },
    #[error("stopped: {0}")]
    LockLost(String),
    #[error("stopped on request: {what}")]
    Stopped {
        what: String,
        completed_steps: Vec<StepReport>,
    },
    #[error("refused: {}", destructive_text(.0))]
    Destructive(Vec<StepFindings>),
    #[error(
        "refused: {} lint finding(s) and --lint deny: {}",
        .0.len(),
        .0.iter().map(|f| format!("{}:{} {} ({})", f.file, f.line, f.rule, f.message)).collect::<Vec<_>>().join("; ")
    )]
    Lint(Vec<lint::Finding>),
    #[error(
        "refused: this plan needs an approval ({}): approve plan hash {} (`--approve {}`, or \
         spec.approvedPlans in the cluster)",
        .0.marks.iter().filter(|m| .0.required.contains(&m.kind)).map(|m| m.to_string()).collect::<Vec<_>>().join("; "),
        .0.plan_hash,
        .0.plan_hash
    )]
    ApprovalRequired(Box<PlanApproval>),
    #[error(
        "refused: these migrations end at {head}, but contract migration {contract} ({description}) \
         was applied {applied_at} by {applied_by}: it removed what app versions below {contract} \
         read, so this one cannot run on the schema any more (nothing was changed)"
    )]
    BelowContract {
        head: String,
        contract: String,
        description: String,
        applied_at: String,
        applied_by: String,
    },
    #[error(
        "refused: the history table already records {count} applied version(s); import \
         adopts a database schemagate has not migrated yet"
    )]
    ImportIntoHistory { count: usize },
    #[error("refused: {tool} reports a problem to fix first: {problem}")]
    ToolProblem { tool: String, problem: String },
    #[error(
        "refused: {tool} records versions with no migration file in the directory: {}",
        .versions.join(", ")
    )]
    ImportWithoutFiles { tool: String, versions: Vec<String> },
}

fn destructive_text(steps: &[StepFindings]) -> String {
    let mut parts = Vec::new();
    for s in steps.iter().filter(|s| s.allowed.is_none()) {
        for f in &s.findings {
            parts.push(format!(
                "{} line {}: `{}` {}{}",
                s.file,
                f.line,
                f.statement,
                f.loss.describe(),
                f.detail
                    .as_deref()
                    .map(|d| format!(" ({d})"))
                    .unwrap_or_default()
            ));
        }
    }
    format!(
        "the plan loses data without a recorded permission: {}",
        parts.join("; ")
    )
}

/// The data-losing statements of one step.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StepFindings {
    pub version: String,
    pub file: String,
    pub direction: Direction,
    pub findings: Vec<guard::Finding>,
    /// The reason given by `-- schemagate:allow-destructive`, if the migration has one.
    pub allowed: Option<String>,
}

/// Finds the data-losing statements of each step; type changes are compared with the
/// database's current column types where it can tell them.
pub async fn destructive(db: &mut impl Backend, prepared: &[Prepared<'_>]) -> Vec<StepFindings> {
    let dialect = db.dialect();
    let mut out = Vec::new();
    for p in prepared {
        let analysis = guard::analyse(
            &p.script.sql,
            p.work.statements(),
            dialect,
            p.script.first_line,
        );
        let mut findings = analysis.findings;
        for change in analysis.type_changes {
            let current = match db.column_type(&change.table, &change.column).await {
                Ok(Some(c)) => c,
                // Not detectable: the column is new (an earlier step adds it), or SQLite.
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(table = %change.table.join("."), column = %change.column, error = %e,
                        "could not read the column's current type; its type change is not checked");
                    continue;
                }
            };
            if let Some(why) = guard::narrowing(dialect, &current, &change.new_type) {
                findings.push(guard::Finding {
                    statement_number: change.statement_number,
                    line: change.line,
                    loss: guard::Loss::NarrowingTypeChange,
                    statement: change.statement,
                    detail: Some(format!("column {}: {why}", change.column)),
                });
            }
        }
        findings.sort_by_key(|f| f.statement_number);
        if !findings.is_empty() {
            out.push(StepFindings {
                version: p.step.migration.version.to_string(),
                file: p.script.file.clone(),
                direction: p.step.direction,
                findings,
                allowed: p.script.directives.allow_destructive.clone(),
            });
        }
    }
    out
}

/// What lint findings do to a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LintPolicy {
    /// Each finding of the steps about to run is logged; they run.
    #[default]
    Warn,
    /// A finding not silenced by `lint-ignore` refuses the run before anything starts.
    Deny,
    /// Not linted.
    Off,
}

/// The lint findings (not silenced) of the up steps about to run.
fn lint_findings(dialect: Dialect, prepared: &[Prepared<'_>]) -> Vec<lint::Finding> {
    let migrations: Vec<&Migration> = prepared
        .iter()
        .filter(|p| p.step.direction == Direction::Up)
        .map(|p| p.step.migration)
        .collect();
    lint::lint(dialect, &migrations, lint::NewTables::SameRun)
        .into_iter()
        .filter(|f| f.ignored.is_none())
        .collect()
}

/// The checks before a plan runs, in order: data-losing steps without a recorded
/// permission are refused (unless `--destructive allow`); lint findings are logged or
/// refused (`--lint`); a plan of a kind the approval policy names runs only when its hash
/// is approved. Returns the plan's approval facts (its hash).
pub async fn vet(
    db: &mut impl Backend,
    plan: &Plan<'_>,
    prepared: &[Prepared<'_>],
    settings: &RunSettings,
) -> Result<PlanApproval, RunError> {
    let policy = &settings.approval;
    let needs = |k| policy.required.contains(&k);
    let deny = settings.deny_destructive && plan.direction == Direction::Up;
    let found = if deny || needs(approval::ApprovalKind::Destructive) {
        destructive(db, prepared).await
    } else {
        Vec::new()
    };
    if deny && found.iter().any(|s| s.allowed.is_none()) {
        return Err(RunError::Destructive(found));
    }
    let lint = if settings.lint != LintPolicy::Off || needs(approval::ApprovalKind::LintFindings) {
        lint_findings(db.dialect(), prepared)
    } else {
        Vec::new()
    };
    match settings.lint {
        LintPolicy::Deny if !lint.is_empty() => return Err(RunError::Lint(lint)),
        LintPolicy::Warn => {
            for f in &lint {
                tracing::warn!(
                    rule = %f.rule, file = %f.file, line = f.line,
                    help = f.help.as_deref().unwrap_or_default(),
                    "lint: {}", f.message
                );
            }
        }
        _ => {}
    }
    let marks = approval::marks(plan, &found, &lint);
    let verdict = approval::judge(policy, approval::plan_hash(plan, prepared), marks);
    if !verdict.approved {
        return Err(RunError::ApprovalRequired(Box::new(verdict)));
    }
    Ok(verdict)
}

impl From<LockError> for RunError {
    fn from(e: LockError) -> Self {
        match e {
            LockError::Db { during, source } => RunError::Db { during, source },
            LockError::Timeout { waited, holder } => RunError::LockTimeout { waited, holder },
        }
    }
}

fn holder_text(h: &Option<LockHolder>) -> String {
    match h {
        Some(h) => format!("; it is held by {h}"),
        None => String::new(),
    }
}

impl RunError {
    fn db(during: &'static str) -> impl FnOnce(DbError) -> RunError {
        move |source| RunError::Db { during, source }
    }
}

/// Refuses an app version whose migrations end below an applied contract migration: the
/// schema lost what that version reads (a rollback past the contract). Gate runners and
/// `wait` check it, so such a pod never starts, even if admission did not catch it.
pub fn below_contract(set: &MigrationSet, state: &DbState) -> Result<(), RunError> {
    let Some(head) = set.head() else {
        return Ok(());
    };
    match state
        .applied
        .values()
        .filter(|a| a.contract)
        .filter_map(|a| Version::parse(&a.version).ok().map(|v| (v, a)))
        .filter(|(v, _)| *v > head.version)
        .max_by(|a, b| a.0.cmp(&b.0))
    {
        Some((v, a)) => Err(RunError::BelowContract {
            head: head.version.to_string(),
            contract: v.to_string(),
            description: a.description.clone(),
            applied_at: a.applied_at.clone(),
            applied_by: a.applied_by.clone(),
        }),
        None => Ok(()),
    }
}

/// Reads the history and folds it into a state.
pub async fn read_state(db: &mut impl Backend) -> Result<DbState, RunError> {
    let rows = db
        .read_history()
        .await
        .map_err(RunError::db("reading the history table"))?;
    Ok(match rows {
        Some(rows) => DbState::from_rows(&rows),
        None => DbState::default(),
    })
}

/// What a run should do.
#[derive(Clone, Debug)]
pub enum Mode {
    Upgrade(Target),
    Downgrade(Target),
}

fn make_plan<'a>(
    set: &'a MigrationSet,
    state: &DbState,
    mode: &Mode,
    opts: &PlanOptions,
) -> Result<Plan<'a>, PlanError> {
    match mode {
        Mode::Upgrade(t) => plan::plan_upgrade(set, state, t, opts),
        Mode::Downgrade(t) => plan::plan_downgrade(set, state, t, opts),
    }
}

/// A step with its SQL worked out before anything runs.
pub struct Prepared<'a> {
    pub step: Step<'a>,
    pub script: &'a Script,
    pub work: Work,
}

/// How a step's SQL runs (what it sends is [`sent::step`]).
pub enum Work {
    /// In the engine's transaction, with its history row: the script's statements (a
    /// `BEGIN; ... COMMIT;` wrapper left out).
    Transactional { statements: Vec<Statement> },
    /// Statement by statement, progress recorded after each.
    NonTransactional {
        statements: Vec<Statement>,
        /// True when the file asked for it; false when the dialect forces it (MySQL
        /// commits DDL implicitly).
        requested: bool,
    },
}

impl Work {
    pub fn statements(&self) -> &[Statement] {
        match self {
            Work::Transactional { statements, .. } | Work::NonTransactional { statements, .. } => {
                statements
            }
        }
    }
}

fn script_of<'a>(step: &Step<'a>) -> &'a Script {
    match step.direction {
        Direction::Up => &step.migration.up,
        // The planner only makes down steps for migrations that have a down script.
        Direction::Down => step.migration.down.as_ref().unwrap_or(&step.migration.up),
    }
}

/// Refuses a plan with a step whose script has no statement and does not say it is empty
/// on purpose (all of them named in one error), or that says so but has statements.
fn check_empty(plan: &Plan<'_>, dialect: Dialect) -> Result<(), RunError> {
    let scripts: Vec<&Script> = plan.steps.iter().map(script_of).collect();
    for script in &scripts {
        let n = script::split(&script.sql, dialect).len();
        if n > 0 && script.directives.empty.is_some() {
            return Err(RunError::Directive {
                file: script.file.clone(),
                message: format!(
                    "`-- schemagate:empty` says the script has no statement, but it has {n}"
                ),
                hint: Some("remove the `-- schemagate:empty` line (or the statements)"),
            });
        }
    }
    let empty: Vec<&str> = scripts
        .iter()
        .filter(|s| plan::unmarked_empty(s, dialect))
        .map(|s| s.file.as_str())
        .collect();
    if empty.is_empty() {
        return Ok(());
    }
    let (has, it) = if empty.len() == 1 {
        ("has", "it")
    } else {
        ("have", "each")
    };
    let (what, hint) = match plan.direction {
        Direction::Up => (
            format!(
                "applying {it} would record its version as applied while changing nothing (and \
                 SQL written into the file later would never run)"
            ),
            EMPTY_UP_HINT,
        ),
        Direction::Down => (
            format!(
                "reverting with {it} would record its version as reverted while the schema \
                 change stays"
            ),
            EMPTY_DOWN_HINT,
        ),
    };
    Err(RunError::Directive {
        file: empty.join(", "),
        message: format!(
            "{has} no SQL statement, only comments or blank lines: {what}; nothing was run"
        ),
        hint: Some(hint),
    })
}

/// What to do about an empty up script.
pub const EMPTY_UP_HINT: &str = "write the migration's SQL in the file; if the step is meant \
     to change nothing, add the line `-- schemagate:empty <reason>` at its top (the reason is \
     recorded in the history)";

/// What to do about an empty down script.
pub const EMPTY_DOWN_HINT: &str = "write the SQL that undoes the migration in the file; if \
     undoing needs no SQL, add the line `-- schemagate:empty <reason>` at its top (the reason \
     is recorded in the history); if it cannot be undone, delete the file (downgrade then \
     refuses to go below that version)";

impl RunError {
    /// The engine's own advice for this error, where it has one: it takes precedence over
    /// the generic hint of the error's kind.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            RunError::Directive { hint, .. } => *hint,
            _ => None,
        }
    }
}

/// Works out every step's SQL; a script that cannot run as asked fails here, before the
/// first step runs.
pub fn prepare<'a>(plan: &Plan<'a>, dialect: Dialect) -> Result<Vec<Prepared<'a>>, RunError> {
    check_empty(plan, dialect)?;
    plan.steps
        .iter()
        .map(|step| {
            let script = script_of(step);
            let located = |e: TxControlError| RunError::Script {
                file: script.file.clone(),
                source: TxControlError {
                    line: e.line + script.first_line - 1,
                    ..e
                },
            };
            if dialect == Dialect::Sqlite && script.directives.statement_timeout.is_some() {
                return Err(RunError::Directive {
                    file: script.file.clone(),
                    message: "SQLite has no statement timeout; remove \
                              `-- schemagate:statement-timeout` (lock-timeout works)"
                        .into(),
                    hint: None,
                });
            }
            let statements = script::split(&script.sql, dialect);
            // MySQL commits DDL implicitly: only a script of data statements can run in a
            // transaction with its history row; anything else runs statement by statement.
            let implicit_commits = dialect == Dialect::MySql && !script::dml_only(&statements);
            let work = if script.directives.no_transaction || implicit_commits {
                script::check_balanced(&script.sql, &statements).map_err(located)?;
                Work::NonTransactional {
                    statements,
                    requested: script.directives.no_transaction,
                }
            } else {
                // The statements are sent as split (joined by `;`), on every dialect: no
                // comments between them, no client-side DELIMITER lines, and what `plan`
                // prints is what the server parses.
                let body = script::transactional_body(&script.sql, dialect).map_err(located)?;
                Work::Transactional {
                    statements: body.statements,
                }
            };
            Ok(Prepared {
                step: step.clone(),
                script,
                work,
            })
        })
        .collect()
}

/// The history row a step writes.
pub fn step_row(p: &Prepared<'_>, runner_id: &str) -> NewRow {
    let m: &Migration = p.step.migration;
    let up = p.step.direction == Direction::Up;
    NewRow {
        version: m.version.to_string(),
        description: m.description.clone(),
        kind: if up { Kind::Up } else { Kind::Down },
        success: Some(true),
        checksum: Some(p.script.checksum().to_string()),
        checksum_normalized: Some(p.script.checksum_normalized().to_string()),
        transactional: matches!(p.work, Work::Transactional { .. }),
        statements_total: Some(p.work.statements().len() as i64),
        statements_done: Some(p.work.statements().len() as i64),
        applied_by: runner_id.to_string(),
        duration_ms: None,
        error: None,
        note: step_note(p.script),
    }
}

/// The note of a step's history row: the permissions its script gives itself are part of
/// the audit trail (losing data, being empty on purpose).
fn step_note(script: &Script) -> Option<String> {
    let d = &script.directives;
    let mut notes: Vec<String> = [
        (d.phase == script::Phase::Contract).then(|| super::history::CONTRACT_NOTE.to_string()),
        d.allow_destructive
            .as_ref()
            .map(|r| format!("allow-destructive: {r}")),
        d.empty.as_ref().map(|r| format!("empty: {r}")),
    ]
    .into_iter()
    .flatten()
    .collect();
    notes.extend(
        lint::ignores(&script.sql)
            .into_iter()
            .map(|i| format!("lint-ignore {}: {}", i.rule, i.reason)),
    );
    (!notes.is_empty()).then(|| notes.join("; "))
}

/// A step's timeouts: its own directives, else the run's defaults.
pub fn step_timeouts(script: &Script, defaults: &StepTimeouts) -> StepTimeouts {
    StepTimeouts {
        lock: script.directives.lock_timeout.or(defaults.lock),
        statement: script.directives.statement_timeout.or(defaults.statement),
    }
}

fn noop_report(plan: &Plan<'_>, waited: Duration, started: Instant) -> RunReport {
    RunReport {
        direction: plan.direction,
        from: plan.from.as_ref().map(Version::to_string),
        to: plan.to.as_ref().map(Version::to_string),
        steps: Vec::new(),
        noop: true,
        ahead: plan.ahead,
        lock_wait_ms: waited.as_millis() as u64,
        duration_ms: started.elapsed().as_millis() as u64,
        plan_hash: None,
        held: plan.held.iter().map(Version::to_string).collect(),
    }
}

/// Runs an upgrade or downgrade.
pub async fn run(
    db: &mut impl Backend,
    set: &MigrationSet,
    mode: &Mode,
    settings: &RunSettings,
) -> Result<RunReport, RunError> {
    let started = Instant::now();
    let state = read_state(db).await?;
    if matches!(mode, Mode::Upgrade(_)) {
        below_contract(set, &state)?;
    }
    // A step with no outcome may belong to a runner that is alive: judge it under the lock.
    let maybe_running = matches!(&state.unfinished, Some(u) if !u.failed);
    if !maybe_running {
        let plan = make_plan(set, &state, mode, &settings.plan)?;
        if plan.steps.is_empty() {
            return Ok(noop_report(&plan, Duration::ZERO, started));
        }
        // Refuse early (before waiting for the lock) what will be refused anyway.
        let prepared = prepare(&plan, db.dialect())?;
        vet(db, &plan, &prepared, settings).await?;
    }
    let held = lock::acquire(
        db,
        &settings.lock,
        &settings.runner_id,
        settings.lock_timeout,
    )
    .await?;
    // From here a stop request waits for the step boundary, and the lock is released.
    let _busy = settings.stop.as_deref().map(StopRequest::enter);
    let mut shapes = Shapes::default();
    let result = run_locked(db, set, mode, settings, &held, started, &mut shapes).await;
    // However the run ended: the schema as its last completed step left it.
    shapes.finish(db, &settings.runner_id).await;
    lock::release(db, held).await;
    result
}

async fn run_locked(
    db: &mut impl Backend,
    set: &MigrationSet,
    mode: &Mode,
    settings: &RunSettings,
    held: &Held,
    started: Instant,
    shapes: &mut Shapes,
) -> Result<RunReport, RunError> {
    let waited = held.waited;
    let state = read_state(db).await?;
    let plan = make_plan(set, &state, mode, &settings.plan)?;
    if plan.steps.is_empty() {
        return Ok(noop_report(&plan, waited, started));
    }
    let prepared = prepare(&plan, db.dialect())?;
    let approval = vet(db, &plan, &prepared, settings).await?;
    let note = approval_note(&approval);
    let session = db
        .session()
        .await
        .map_err(RunError::db("asking the server its version"))?;
    let table = db.table().clone();
    let cx = sent::Context {
        session: &session,
        table: &table,
        guard: &held.guard,
        runner_id: &settings.runner_id,
        note: note.as_deref(),
    };
    let scripts = sent::steps(&prepared, &settings.timeouts, &cx);
    shapes.every_step = prepared.len() <= FINGERPRINT_EVERY_STEP_MAX;
    let mut versions: std::collections::BTreeSet<Version> = state.applied.keys().cloned().collect();
    if !state.initialized {
        db.create_history_table()
            .await
            .map_err(RunError::db("creating the history table"))?;
    }
    let mut done = Vec::with_capacity(prepared.len());
    for (p, script) in prepared.iter().zip(&scripts) {
        if settings.stop.as_ref().is_some_and(|s| s.requested()) {
            return Err(RunError::Stopped {
                what: format!(
                    "{} ({}) and later steps were not started; {} step(s) of this run completed",
                    p.step.migration.version,
                    p.script.file,
                    done.len()
                ),
                completed_steps: done,
            });
        }
        if held.lost() {
            return Err(RunError::LockLost(format!(
                "the migration lease was lost before {} ({}); {} step(s) of this run completed",
                p.step.migration.version,
                p.script.file,
                done.len()
            )));
        }
        let mut retries = Retries::new(p, settings);
        let outcome = loop {
            match run_step(db, p, script, &cx).await {
                Err(StepError::Failed(failure)) if retries.applies(db.dialect(), &failure) => {
                    match retries.after(db, set, p, &cx, failure, settings).await {
                        Ok(()) => continue,
                        Err(e) => break Err(e),
                    }
                }
                other => break other,
            }
        };
        match outcome {
            Ok(report) => {
                if let Some(stop) = &settings.stop {
                    stop.record(&p.step.migration.version);
                }
                match p.step.direction {
                    Direction::Up => versions.insert(p.step.migration.version.clone()),
                    Direction::Down => versions.remove(&p.step.migration.version),
                };
                if settings.fingerprints {
                    shapes.step(db, versions.last(), &settings.runner_id).await;
                }
                done.push(report)
            }
            Err(StepError::Failed(mut failure)) => {
                failure.completed_steps = done;
                return Err(RunError::StepFailed(failure));
            }
            Err(StepError::Exhausted(mut e)) => {
                if let RunError::LockRetriesExhausted { failure, .. } = &mut e {
                    failure.completed_steps = done;
                }
                return Err(e);
            }
            Err(StepError::Lock(e)) => {
                return Err(RunError::LockLost(format!(
                    "{} ({}) was not run: {e}; {} step(s) of this run completed",
                    p.step.migration.version,
                    p.script.file,
                    done.len()
                )));
            }
        }
    }
    Ok(RunReport {
        direction: plan.direction,
        from: plan.from.as_ref().map(Version::to_string),
        to: plan.to.as_ref().map(Version::to_string),
        steps: done,
        noop: false,
        ahead: false,
        lock_wait_ms: waited.as_millis() as u64,
        duration_ms: started.elapsed().as_millis() as u64,
        plan_hash: Some(approval.plan_hash),
        held: plan.held.iter().map(Version::to_string).collect(),
    })
}

/// Runs of more steps than this fingerprint the schema after their last step only (a
/// fresh database applying hundreds of migrations would spend most of its time reading
/// its growing catalogs).
const FINGERPRINT_EVERY_STEP_MAX: usize = 20;

/// The schema's fingerprint after each step of a run: every step's digest is recorded
/// (the audit trail), the whole description only for the last one (what `drift` compares
/// with), so a run does not write its growing schema once per step. Long runs (see
/// [`FINGERPRINT_EVERY_STEP_MAX`]) read the catalogs once, after their last step.
#[derive(Default)]
struct Shapes {
    /// Read the catalogs after every step.
    every_step: bool,
    /// The last step's version and fingerprint, not recorded yet.
    last: Option<(Option<String>, schema::Fingerprint)>,
    /// A long run's last completed step (not read yet).
    unread: Option<Option<String>>,
}

impl Shapes {
    /// After a step: the previous step's digest is recorded, this one's kept.
    async fn step(&mut self, db: &mut impl Backend, version: Option<&Version>, runner_id: &str) {
        if !self.every_step {
            self.unread = Some(version.map(Version::to_string));
            return;
        }
        let fp = match schema::read_live(db).await {
            Ok(fp) => fp,
            Err(e) => {
                self.last = None;
                tracing::warn!(error = %e, "could not read the schema's fingerprint after the step");
                return;
            }
        };
        let previous = self.last.replace((version.map(Version::to_string), fp));
        if let Some((v, fp)) = previous {
            warn_unrecorded(
                schema::record(db, v.as_deref(), &fp, runner_id, None, false).await,
                &v,
            );
        }
    }

    /// At the end of the run: the last step's fingerprint, whole.
    async fn finish(&mut self, db: &mut impl Backend, runner_id: &str) {
        if let Some(v) = self.unread.take() {
            warn_unrecorded(
                schema::record_live(db, v.as_deref(), runner_id, None).await,
                &v,
            );
        } else if let Some((v, fp)) = self.last.take() {
            warn_unrecorded(
                schema::record(db, v.as_deref(), &fp, runner_id, None, true).await,
                &v,
            );
        }
    }
}

/// A fingerprint that could not be recorded is logged, not fatal: the step is applied and
/// in the history; `migrate drift` then says no fingerprint exists for this version.
fn warn_unrecorded(result: Result<String, DbError>, version: &Option<String>) {
    if let Err(e) = result {
        tracing::warn!(version = ?version, error = %e,
            "could not record the schema's fingerprint; `schemagate migrate drift` cannot check this version until `drift --accept`");
    }
}

/// Records the schema as it is now, whole, at `version` (after stamp, import, resolve).
async fn record_fingerprint(db: &mut impl Backend, version: Option<&Version>, runner_id: &str) {
    let version = version.map(Version::to_string);
    warn_unrecorded(
        schema::record_live(db, version.as_deref(), runner_id, None).await,
        &version,
    );
}

/// The history note of a plan that ran with an approval.
pub fn approval_note(a: &PlanApproval) -> Option<String> {
    (!a.required.is_empty()).then(|| {
        format!(
            "approved plan {} ({})",
            a.plan_hash,
            a.required
                .iter()
                .map(|k| k.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}

/// The retries of one step that timed out waiting for table locks.
struct Retries {
    retry: LockRetry,
    started: Instant,
    attempts: u32,
    key: String,
}

impl Retries {
    fn new(p: &Prepared<'_>, settings: &RunSettings) -> Self {
        Retries {
            retry: p
                .script
                .directives
                .lock_retry_budget
                .map(|budget| LockRetry {
                    budget,
                    ..settings.lock_retry
                })
                .unwrap_or(settings.lock_retry),
            started: Instant::now(),
            attempts: 0,
            key: format!("{}/{}", settings.runner_id, p.step.migration.version),
        }
    }

    /// The failure is a lock wait running out (retried, or reported as such).
    fn applies(&self, dialect: Dialect, f: &StepFailure) -> bool {
        lockwait::is_lock_wait_timeout(dialect, f.code.as_deref(), &f.message)
    }

    /// After a step timed out on a lock: who holds it; then either a pause and `Ok` (try
    /// again), or the error that ends the run (unsafe to retry, budget spent, stopped).
    async fn after(
        &mut self,
        db: &mut impl Backend,
        set: &MigrationSet,
        p: &Prepared<'_>,
        cx: &sent::Context<'_>,
        failure: Box<StepFailure>,
        settings: &RunSettings,
    ) -> Result<(), StepError> {
        let statements = p.work.statements();
        let index = failure.statement_number.map(|n| n.saturating_sub(1));
        let text = index
            .and_then(|i| statements.get(i))
            .map(|st| st.text(&p.script.sql).to_string())
            .unwrap_or_default();
        let lock_timeout = step_timeouts(p.script, &settings.timeouts).lock;
        loop {
            self.attempts += 1;
            let blockers = lockwait::blockers(db, &lockwait::tables_named(&text)).await;
            if let Err(why) = self
                .make_retryable(db, set, p, cx, &failure, index, &text)
                .await
            {
                let mut failure = failure;
                failure.message = format!(
                    "{}; held by: {}; not retried: {why}",
                    failure.message,
                    lockwait::describe(&blockers)
                );
                return Err(StepError::Failed(failure));
            }
            let delay = self.retry.delay(self.attempts, &self.key);
            let spent = self.started.elapsed();
            if spent + delay > self.retry.budget {
                return Err(StepError::Exhausted(RunError::LockRetriesExhausted {
                    failure,
                    attempts: self.attempts,
                    spent,
                    blockers,
                }));
            }
            tracing::warn!(
                version = %p.step.migration.version,
                file = %p.script.file,
                attempt = self.attempts,
                retry_in_ms = delay.as_millis() as u64,
                budget_left_s = (self.retry.budget - spent).as_secs(),
                held_by = %lockwait::describe(&blockers),
                "the step waited too long for a table lock and was rolled back; retrying"
            );
            // Stop requests are honoured during the pause (nothing of the step is applied).
            let deadline = Instant::now() + delay;
            while Instant::now() < deadline {
                if settings.stop.as_ref().is_some_and(|s| s.requested()) {
                    let mut failure = failure;
                    failure.message =
                        format!("{}; stopped on request before retrying", failure.message);
                    return Err(StepError::Failed(failure));
                }
                tokio::time::sleep((deadline - Instant::now()).min(Duration::from_millis(100)))
                    .await;
            }
            // What a failed CREATE INDEX CONCURRENTLY left must go before the next attempt;
            // the drop waits for locks no longer than the step would.
            match drop_invalid_index(db, &text, lock_timeout).await {
                Ok(()) => return Ok(()),
                Err(e)
                    if lockwait::is_lock_wait_timeout(
                        db.dialect(),
                        e.code.as_deref(),
                        &e.message,
                    ) =>
                {
                    continue;
                }
                Err(e) => {
                    let mut failure = failure;
                    failure.message = format!(
                        "{}; not retried: cannot drop the INVALID index it left: {e}",
                        failure.message
                    );
                    return Err(StepError::Failed(failure));
                }
            }
        }
    }

    /// Makes the timed-out step safe to run again, or says why it is not: a transactional
    /// step rolled back is; a non-transactional one only when its first statement timed
    /// out (nothing applied), after its failed row is resolved as reverted (an INVALID
    /// index left by `CREATE INDEX CONCURRENTLY` is dropped before the next attempt).
    #[allow(clippy::too_many_arguments)]
    async fn make_retryable(
        &self,
        db: &mut impl Backend,
        set: &MigrationSet,
        p: &Prepared<'_>,
        cx: &sent::Context<'_>,
        failure: &StepFailure,
        index: Option<usize>,
        statement: &str,
    ) -> Result<(), String> {
        if self.retry.budget.is_zero() {
            return Err("lock retries are off (--lock-retry-budget 0)".into());
        }
        match (&p.work, failure.outcome) {
            (Work::Transactional { .. }, StepOutcome::RolledBack) => return Ok(()),
            (Work::Transactional { .. }, _) => {
                return Err("the step's outcome is not known".into());
            }
            (Work::NonTransactional { .. }, _) if index != Some(0) => {
                return Err(format!(
                    "statement {} of a non-transactional step timed out after the ones \
                     before it were applied; resolve the step, then run again",
                    failure.statement_number.unwrap_or(0)
                ));
            }
            _ => {}
        }
        if lockwait::concurrent_index(statement).is_none()
            && statement
                .to_ascii_uppercase()
                .split_whitespace()
                .any(|w| w == "CONCURRENTLY")
        {
            return Err(
                "a CREATE INDEX CONCURRENTLY without an index name may have left an INVALID \
                 index; name the index so it can be dropped and retried"
                    .into(),
            );
        }
        // The failed row would make the step unfinished: record that nothing of it stays.
        let state = read_state(db).await.map_err(|e| e.to_string())?;
        let Some(u) = state.unfinished.filter(|u| {
            Version::parse(&u.version).ok().as_ref() == Some(&p.step.migration.version)
        }) else {
            return Ok(());
        };
        let row = record_row(
            u.version.clone(),
            u.description.clone(),
            Kind::MarkReverted,
            set.get(&p.step.migration.version)
                .map(|m| m.up.checksums())
                .as_ref(),
            cx.runner_id,
            format!(
                "resolved row {}: its first statement timed out waiting for a lock; nothing \
                 applied; retried",
                u.row_id
            ),
        );
        send_trip(db, &[sent::insert(&row, cx)], &Fill::default())
            .await
            .map_err(|f| format!("cannot record that nothing was applied: {}", f.error))?;
        Ok(())
    }
}

/// Drops the INVALID index a timed-out `CREATE INDEX CONCURRENTLY <name>` (`statement`)
/// left, if any, waiting for locks at most `lock_timeout`.
async fn drop_invalid_index(
    db: &mut impl Backend,
    statement: &str,
    lock_timeout: Option<Duration>,
) -> Result<(), DbError> {
    let Some(name) = lockwait::concurrent_index(statement) else {
        return Ok(());
    };
    let q = format!(
        "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
         WHERE NOT i.indisvalid AND c.oid = to_regclass('{}')",
        name.replace('\'', "''")
    );
    let invalid = db
        .query_text(&q)
        .await?
        .is_some_and(|rows| !rows.is_empty());
    if !invalid {
        return Ok(());
    }
    if let Some(t) = lock_timeout {
        let set = format!(
            "SET lock_timeout = '{}ms'",
            t.as_millis().min(i32::MAX as u128)
        );
        db.send(&set).await.map_err(|f| f.error)?;
    }
    let dropped = db
        .send(&format!("DROP INDEX CONCURRENTLY IF EXISTS {name}"))
        .await
        .map_err(|f| f.error);
    let _ = db.send("RESET lock_timeout").await;
    dropped?;
    tracing::warn!(index = %name, "dropped the INVALID index a timed-out CREATE INDEX CONCURRENTLY left");
    Ok(())
}

/// Longest error text kept in a history row.
const MAX_ERROR_LEN: usize = 2000;

/// `s` cut to at most `max` bytes on a character boundary, with `…` if it was cut.
pub fn clip(s: &str, max: usize) -> String {
    let kept = prefix(s, max);
    if kept.len() == s.len() {
        kept.to_string()
    } else {
        format!("{kept}…")
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub fn prefix(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn failure(
    p: &Prepared<'_>,
    index: Option<usize>,
    error: &DbError,
    outcome: StepOutcome,
) -> Box<StepFailure> {
    let statements = p.work.statements();
    let stmt = index.and_then(|i| statements.get(i));
    Box::new(StepFailure {
        version: p.step.migration.version.to_string(),
        description: p.step.migration.description.clone(),
        direction: p.step.direction,
        file: p.script.file.clone(),
        line: stmt.map(|s| s.line + p.script.first_line - 1),
        statement_number: stmt.and(index.map(|i| i + 1)),
        statements_total: statements.len(),
        statement: stmt.map(|s| script::excerpt(s.text(&p.script.sql), 120)),
        message: redact::redact(&error.message).into_owned(),
        code: error.code.clone(),
        outcome,
        completed_steps: Vec::new(),
    })
}

fn step_report(p: &Prepared<'_>, elapsed: Duration) -> StepReport {
    StepReport {
        version: p.step.migration.version.to_string(),
        description: p.step.migration.description.clone(),
        direction: p.step.direction,
        file: p.script.file.clone(),
        transactional: matches!(p.work, Work::Transactional { .. }),
        duration_ms: elapsed.as_micros().div_ceil(1000) as u64,
    }
}

/// How a step can fail.
enum StepError {
    /// Its SQL (or its history write) failed.
    Failed(Box<StepFailure>),
    /// The lock turned out not to be ours: nothing of the step was recorded, its
    /// transaction (if any) rolled back.
    Lock(DbError),
    /// It kept timing out on table locks until the retry budget ran out (rolled back).
    Exhausted(RunError),
}

impl From<Box<StepFailure>> for StepError {
    fn from(f: Box<StepFailure>) -> Self {
        StepError::Failed(f)
    }
}

async fn run_step(
    db: &mut impl Backend,
    p: &Prepared<'_>,
    script: &StepScript,
    cx: &sent::Context<'_>,
) -> Result<StepReport, StepError> {
    let m = p.step.migration;
    let verb = if p.step.direction == Direction::Up {
        "applying"
    } else {
        "reverting"
    };
    tracing::info!(version = %m.version, description = %m.description, file = %p.script.file, "{verb}");
    let start = Instant::now();
    match &p.work {
        Work::Transactional { .. } => run_transactional(db, p, script, cx, start).await?,
        Work::NonTransactional { .. } => run_non_transactional(db, p, script, cx, start).await?,
    }
    let report = step_report(p, start.elapsed());
    tracing::info!(version = %m.version, duration_ms = report.duration_ms, "{verb} done");
    Ok(report)
}

/// A round trip that failed at its statement `at` (the ones before it completed).
struct TripFailure {
    at: usize,
    error: DbError,
}

/// Sends one round trip of a script (its slots filled from `fill`) and checks each
/// statement's result.
async fn send_trip(
    db: &mut impl Backend,
    trip: &[Sent],
    fill: &Fill,
) -> Result<Vec<Done>, TripFailure> {
    let text = trip
        .iter()
        .map(|s| s.sql(fill))
        .collect::<Vec<_>>()
        .join(";\n");
    let last = trip.len().saturating_sub(1);
    let done = db.send(&text).await.map_err(|f| TripFailure {
        at: f.done.len().min(last),
        error: f.error,
    })?;
    for (at, (s, d)) in trip.iter().zip(&done).enumerate() {
        s.check(d).map_err(|error| TripFailure { at, error })?;
    }
    Ok(done)
}

/// What of a step has completed so far.
#[derive(Default)]
struct Tally {
    began: bool,
    committed: bool,
    /// Statements of the migration that completed.
    migration: usize,
}

impl Tally {
    fn add(&mut self, completed: &[Sent]) {
        for s in completed {
            match s.role {
                Role::Begin => self.began = true,
                Role::Commit => self.committed = true,
                Role::Migration => self.migration += 1,
                _ => {}
            }
        }
    }
}

/// Milliseconds since `start`, rounded up: a step that took 0.4 ms is recorded as 1 ms,
/// not 0 (the history's `ms` column then agrees with what the run printed).
fn elapsed_ms(start: Instant) -> i64 {
    start.elapsed().as_micros().div_ceil(1000) as i64
}

/// A transactional step: everything up to COMMIT, or nothing.
async fn run_transactional(
    db: &mut impl Backend,
    p: &Prepared<'_>,
    script: &StepScript,
    cx: &sent::Context<'_>,
    start: Instant,
) -> Result<(), StepError> {
    let mut tally = Tally::default();
    for trip in script.round_trips() {
        let fill = Fill {
            row_id: None,
            duration_ms: Some(elapsed_ms(start)),
        };
        let Err(f) = send_trip(db, trip, &fill).await else {
            tally.add(trip);
            continue;
        };
        tally.add(&trip[..f.at]);
        if tally.committed {
            // Committed: a failed reset must not make the step look rolled back.
            tracing::warn!(error = %f.error, "could not reset the session after the step");
            return Ok(());
        }
        return Err(abort_transaction(db, p, cx, &tally, trip[f.at].role, f.error, start).await);
    }
    Ok(())
}

/// Rolls back a transactional step that failed at a statement of `role`, and records the
/// failure where the step's own history row did not get written.
async fn abort_transaction(
    db: &mut impl Backend,
    p: &Prepared<'_>,
    cx: &sent::Context<'_>,
    tally: &Tally,
    role: Role,
    error: DbError,
    start: Instant,
) -> StepError {
    // The transaction is open (perhaps aborted), or the COMMIT never reached it (a failed
    // lease renewal before it): end it.
    if tally.began {
        let _ = db.send(sql::ROLLBACK).await;
    }
    if error.kind == DbErrorKind::Lock {
        return StepError::Lock(error);
    }
    match role {
        Role::HistoryInsert => {
            let mut fail = failure(p, None, &error, StepOutcome::RolledBack);
            fail.message = format!("recording the step in the history failed: {}", fail.message);
            fail.into()
        }
        Role::LeaseRenewal | Role::Commit => {
            // The server refusing the COMMIT (a deferred constraint, say) rolls it back; a
            // connection lost during COMMIT leaves the outcome to the server.
            let outcome = if error.kind == DbErrorKind::Statement {
                StepOutcome::RolledBack
            } else {
                StepOutcome::Unknown
            };
            let mut fail = failure(p, None, &error, outcome);
            fail.message = format!("COMMIT failed: {}", fail.message);
            fail.into()
        }
        _ => {
            // The statement count from the server names the failing statement.
            let index = (role == Role::Migration).then_some(tally.migration);
            let fail = failure(p, index, &error, StepOutcome::RolledBack);
            let msg = clip(&fail.message, MAX_ERROR_LEN);
            let row = sent::failed_insert(p, cx, tally.migration, elapsed_ms(start), msg);
            if let Err(f) = send_trip(db, &[row], &Fill::default()).await {
                tracing::warn!(error = %f.error, "could not record the failed step in the history");
            }
            let _ = send_trip(db, &sent::reset(cx), &Fill::default()).await;
            fail.into()
        }
    }
}

/// A non-transactional step: its running row, each statement followed by its progress
/// record, its outcome, and the session reset whatever happened.
async fn run_non_transactional(
    db: &mut impl Backend,
    p: &Prepared<'_>,
    script: &StepScript,
    cx: &sent::Context<'_>,
    start: Instant,
) -> Result<(), StepError> {
    let mut id = None;
    let mut ran = 0usize;
    let mut outcome = Ok(());
    for trip in script.round_trips() {
        let role = trip[0].role;
        if role == Role::Reset {
            break;
        }
        let fill = Fill {
            row_id: id,
            duration_ms: Some(elapsed_ms(start)),
        };
        match send_trip(db, trip, &fill).await {
            Ok(done) => match role {
                Role::HistoryInsert => id = done.first().and_then(sent::row_id),
                Role::Migration => ran += 1,
                _ => {}
            },
            Err(f) => {
                outcome =
                    Err(abort_non_transactional(db, p, cx, role, f.error, id, ran, start).await);
                break;
            }
        }
    }
    for trip in script.round_trips().filter(|t| t[0].role == Role::Reset) {
        if let Err(f) = send_trip(db, trip, &Fill::default()).await {
            tracing::warn!(error = %f.error, "could not reset the session after the step");
        }
    }
    outcome
}

/// Records how a non-transactional step failed at a statement of `role`, after `ran` of
/// its statements ran: it is dirty from then on, unless nothing ran.
#[allow(clippy::too_many_arguments)]
async fn abort_non_transactional(
    db: &mut impl Backend,
    p: &Prepared<'_>,
    cx: &sent::Context<'_>,
    role: Role,
    error: DbError,
    id: Option<i64>,
    ran: usize,
    start: Instant,
) -> StepError {
    let (index, duration, message) = match role {
        // Claiming the step (its running row) is what the lock guards: if the claim is
        // refused, nothing ran.
        Role::HistoryInsert if error.kind == DbErrorKind::Lock => return StepError::Lock(error),
        Role::HistoryInsert => {
            return failure(p, None, &error, StepOutcome::RolledBack).into();
        }
        Role::Setting => (None, 0, None),
        Role::Migration => (Some(ran), elapsed_ms(start), None),
        Role::HistoryProgress => {
            let mut fail = failure(p, ran.checked_sub(1), &error, StepOutcome::Dirty);
            fail.statement = None;
            fail.message = format!(
                "statement {ran} ran, but recording progress failed: {}",
                fail.message
            );
            return fail.into();
        }
        _ => (
            None,
            elapsed_ms(start),
            Some("all statements ran, but recording success failed"),
        ),
    };
    let mut fail = failure(p, index, &error, StepOutcome::Dirty);
    if let Some(what) = message {
        fail.message = format!("{what}: {}", fail.message);
        return fail.into();
    }
    let msg = clip(&fail.message, MAX_ERROR_LEN);
    if let Some(id) = id {
        let finish = sent::failed_finish(cx, id, duration, &msg, ran);
        if let Err(f) = send_trip(db, &[finish], &Fill::default()).await {
            tracing::warn!(error = %f.error, "could not record the failure; the step shows as unfinished");
        }
    }
    fail.into()
}

/// A history row that records a decision (stamp, resolve) rather than a run.
fn record_row(
    version: String,
    description: String,
    kind: Kind,
    checksums: Option<&script::Checksums>,
    runner_id: &str,
    note: String,
) -> NewRow {
    NewRow {
        version,
        description,
        kind,
        success: Some(true),
        checksum: checksums.map(|c| c.strict.clone()),
        checksum_normalized: checksums.map(|c| c.normalized.clone()),
        transactional: true,
        statements_total: None,
        statements_done: None,
        applied_by: runner_id.to_string(),
        duration_ms: Some(0.into()),
        error: None,
        note: Some(note),
    }
}

/// What `stamp` recorded.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StampReport {
    pub stamped: Vec<String>,
    pub current: Option<String>,
}

/// Records every migration up to `target` as applied without running it (adopting a
/// database whose schema already has them). Runs under the lock, in one transaction.
pub async fn stamp(
    db: &mut impl Backend,
    set: &MigrationSet,
    target: &Target,
    settings: &RunSettings,
) -> Result<StampReport, RunError> {
    // The history read first resolves the table (and its lease table) on this connection.
    read_state(db).await?;
    let held = lock::acquire(
        db,
        &settings.lock,
        &settings.runner_id,
        settings.lock_timeout,
    )
    .await?;
    let result = stamp_locked(db, set, target, settings, &held.guard).await;
    if let Ok(r) = &result
        && !r.stamped.is_empty()
    {
        adopt_fingerprint(db, r.current.as_deref(), settings).await;
    }
    lock::release(db, held).await;
    result
}

/// After stamp, import or resolve (the version moved without running a step): the live
/// schema becomes what the history says at that version.
async fn adopt_fingerprint(db: &mut impl Backend, current: Option<&str>, settings: &RunSettings) {
    if settings.fingerprints {
        let v = current.and_then(|c| Version::parse(c).ok());
        record_fingerprint(db, v.as_ref(), &settings.runner_id).await;
    }
}

async fn stamp_locked(
    db: &mut impl Backend,
    set: &MigrationSet,
    target: &Target,
    settings: &RunSettings,
    guard: &Guard,
) -> Result<StampReport, RunError> {
    let state = read_state(db).await?;
    let version = match target {
        Target::Head => set.head().map(|m| m.version.clone()),
        Target::Version(v) => Some(v.clone()),
        other => {
            return Err(PlanError::WrongDirection {
                what: other.to_string(),
                direction: "stamp",
            }
            .into());
        }
    };
    let Some(version) = version.filter(|v| set.get(v).is_some()) else {
        return Err(PlanError::UnknownTarget {
            target: target.to_string(),
        }
        .into());
    };
    if let Some(u) = &state.unfinished {
        return Err(PlanError::Unfinished(Box::new(u.clone())).into());
    }
    if let Some(cur) = state.current()
        && *cur > version
    {
        return Err(RunError::StampBelowCurrent {
            target: version.to_string(),
            current: cur.to_string(),
        });
    }
    let todo: Vec<&Migration> = plan::pending(set, &state)
        .into_iter()
        .filter(|m| m.version <= version)
        .collect();
    // A pending migration older than the current version was never run; stamping it
    // would record it as applied without anyone deciding so.
    if let Some(cur) = state.current() {
        let older: Vec<String> = todo
            .iter()
            .filter(|m| m.version < *cur)
            .map(|m| m.version.to_string())
            .collect();
        if !older.is_empty() && !settings.plan.out_of_order {
            return Err(PlanError::OutOfOrder {
                versions: older,
                current: cur.to_string(),
            }
            .into());
        }
    }
    if !todo.is_empty() {
        record_baselines(
            db,
            guard,
            state.initialized,
            &todo,
            &settings.runner_id,
            "stamped: recorded as applied without running",
            Recording::Stamp,
        )
        .await?;
    }
    let current = state
        .current()
        .cloned()
        .into_iter()
        .chain(todo.iter().map(|m| m.version.clone()))
        .max();
    Ok(StampReport {
        stamped: todo.iter().map(|m| m.version.to_string()).collect(),
        current: current.map(|v| v.to_string()),
    })
}

/// Which operation records baseline rows (named in its errors).
#[derive(Clone, Copy)]
enum Recording {
    Stamp,
    Import,
}

impl Recording {
    /// What failed: opening the transaction, writing a row, committing.
    fn during(self) -> [&'static str; 3] {
        match self {
            Recording::Stamp => [
                "opening the stamp transaction",
                "recording the stamp",
                "committing the stamp",
            ],
            Recording::Import => [
                "opening the import transaction",
                "recording the import",
                "committing the import",
            ],
        }
    }
}

/// Records `todo` as applied without running them (baseline rows with the files'
/// checksums and `note`), all in one transaction; creates the history table first if
/// the database has none.
async fn record_baselines(
    db: &mut impl Backend,
    guard: &Guard,
    initialized: bool,
    todo: &[&Migration],
    runner_id: &str,
    note: &str,
    what: Recording,
) -> Result<(), RunError> {
    let [opening, recording, committing] = what.during();
    let session = db.session().await.map_err(RunError::db(opening))?;
    let table = db.table().clone();
    let cx = sent::Context {
        session: &session,
        table: &table,
        guard,
        runner_id,
        note: None,
    };
    if !initialized {
        db.create_history_table()
            .await
            .map_err(RunError::db("creating the history table"))?;
    }
    let rows: Vec<NewRow> = todo
        .iter()
        .map(|m| {
            record_row(
                m.version.to_string(),
                m.description.clone(),
                Kind::Baseline,
                Some(&m.up.checksums()),
                runner_id,
                note.to_string(),
            )
        })
        .collect();
    let script = sent::record(&rows, &cx);
    let mut tally = Tally::default();
    for trip in script.round_trips() {
        let Err(f) = send_trip(db, trip, &Fill::default()).await else {
            tally.add(trip);
            continue;
        };
        tally.add(&trip[..f.at]);
        if tally.committed {
            tracing::warn!(error = %f.error, "could not reset the session after recording");
            return Ok(());
        }
        if tally.began {
            let _ = db.send(sql::ROLLBACK).await;
        }
        let during = match trip[f.at].role {
            Role::HistoryInsert => recording,
            Role::LeaseRenewal | Role::Commit => committing,
            _ => opening,
        };
        return Err(RunError::Db {
            during,
            source: f.error,
        });
    }
    Ok(())
}

/// What `import` recorded (or would record).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ImportReport {
    pub from: String,
    pub versions: Vec<String>,
    pub applied: bool,
    pub current: Option<String>,
}

/// Records the versions another tool applied (`applied`, which must all have files in
/// `set`) into the history as baseline rows with the files' checksums, so the engine can
/// take over without running anything again. Refuses when the history already has
/// applied versions. With `apply` false, only says what it would record.
pub async fn import(
    db: &mut impl Backend,
    set: &MigrationSet,
    from: &str,
    applied: &[Version],
    apply: bool,
    settings: &RunSettings,
) -> Result<ImportReport, RunError> {
    let state = read_state(db).await?;
    if !state.applied.is_empty() {
        return Err(RunError::ImportIntoHistory {
            count: state.applied.len(),
        });
    }
    let mut todo: Vec<&Migration> = applied.iter().filter_map(|v| set.get(v)).collect();
    todo.sort_by(|a, b| a.version.cmp(&b.version));
    let report = |applied| ImportReport {
        from: from.to_string(),
        versions: todo.iter().map(|m| m.version.to_string()).collect(),
        applied,
        current: todo.last().map(|m| m.version.to_string()),
    };
    if !apply || todo.is_empty() {
        return Ok(report(false));
    }
    let held = lock::acquire(
        db,
        &settings.lock,
        &settings.runner_id,
        settings.lock_timeout,
    )
    .await?;
    let result = async {
        // Under the lock: nobody recorded anything meanwhile.
        let state = read_state(db).await?;
        if !state.applied.is_empty() {
            return Err(RunError::ImportIntoHistory {
                count: state.applied.len(),
            });
        }
        record_baselines(
            db,
            &held.guard,
            state.initialized,
            &todo,
            &settings.runner_id,
            &format!("imported from {from}: applied by it, recorded without running"),
            Recording::Import,
        )
        .await
    }
    .await;
    if result.is_ok() {
        let current = report(true).current;
        adopt_fingerprint(db, current.as_deref(), settings).await;
    }
    lock::release(db, held).await;
    result.map(|_| report(true))
}

/// A person's verdict on an unfinished step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// The schema has all of the version's changes.
    Applied,
    /// The schema has none of the version's changes.
    Reverted,
}

/// What `resolve` recorded.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ResolveReport {
    pub version: String,
    pub verdict: Verdict,
    pub current: Option<String>,
}

/// Records a person's verdict on an unfinished (dirty) step, so runs can go on.
pub async fn resolve(
    db: &mut impl Backend,
    set: &MigrationSet,
    version: &Version,
    verdict: Verdict,
    reason: Option<String>,
    settings: &RunSettings,
) -> Result<ResolveReport, RunError> {
    read_state(db).await?;
    let held = lock::acquire(
        db,
        &settings.lock,
        &settings.runner_id,
        settings.lock_timeout,
    )
    .await?;
    let result = async {
        let state = read_state(db).await?;
        let Some(u) = state
            .unfinished
            .as_ref()
            .filter(|u| Version::parse(&u.version).as_ref() == Ok(version))
        else {
            let what = match &state.unfinished {
                Some(u) => format!("; the unfinished step is {}", u.version),
                None => "; no step is unfinished".to_string(),
            };
            return Err(RunError::NothingToResolve(version.to_string(), what));
        };
        let kind = match verdict {
            Verdict::Applied => Kind::MarkApplied,
            Verdict::Reverted => Kind::MarkReverted,
        };
        let note = match &reason {
            Some(r) => format!("resolved row {}: {r}", u.row_id),
            None => format!("resolved row {}", u.row_id),
        };
        let checksums = set.get(version).map(|m| m.up.checksums());
        let row = record_row(
            u.version.clone(),
            u.description.clone(),
            kind,
            checksums.as_ref(),
            &settings.runner_id,
            note,
        );
        let session = db
            .session()
            .await
            .map_err(RunError::db("recording the resolution"))?;
        let table = db.table().clone();
        let cx = sent::Context {
            session: &session,
            table: &table,
            guard: &held.guard,
            runner_id: &settings.runner_id,
            note: None,
        };
        send_trip(db, &[sent::insert(&row, &cx)], &Fill::default())
            .await
            .map_err(|f| RunError::Db {
                during: "recording the resolution",
                source: f.error,
            })?;
        let after = read_state(db).await?;
        Ok(ResolveReport {
            version: u.version.clone(),
            verdict,
            current: after.current().map(Version::to_string),
        })
    }
    .await;
    if let Ok(r) = &result {
        adopt_fingerprint(db, r.current.as_deref(), settings).await;
    }
    lock::release(db, held).await;
    result
}
