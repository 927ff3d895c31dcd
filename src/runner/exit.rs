//! Exit codes (a contract: the controller, init containers and scripts rely on them) and the
//! mapping from every failure to one.

use serde::Serialize;
use serde_json::json;

use crate::engine::history::Kind;
use crate::engine::plan::{self, Direction, PlanError};
use crate::engine::runner::StepOutcome;
use crate::engine::source::SourceError;
use crate::engine::{DbError, DbErrorKind, RunError};

/// The documented exit codes of `schemagate migrate`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[repr(u8)]
pub enum Exit {
    /// Success; for `status`: up to date.
    Ok = 0,
    /// An unexpected failure (a bug, or the machine: disk, permissions).
    Internal = 1,
    /// The command line is wrong.
    Usage = 2,
    /// `status`: migrations are pending.
    Pending = 3,
    /// `status`/`verify`: applied migrations differ from the files, or a step is dirty;
    /// `drift`: the live schema differs from what the migrations left.
    Drift = 4,
    /// `drift`: nothing to compare with: no schema fingerprint is recorded at the current
    /// version (`drift --accept` records one), or the schema is in motion (a step runs).
    NoBaseline = 5,
    /// The migration files are invalid (names, duplicates, directives, an empty directory,
    /// scripts without statements).
    Source = 10,
    /// The database cannot be reached or refuses the credentials, or the URL is wrong.
    Connect = 11,
    /// A migration's SQL failed (rolled back, or recorded dirty if non-transactional).
    MigrationFailed = 12,
    /// Refused to run: the database is dirty or has drifted from the files.
    Blocked = 13,
    /// Another runner held the migration lock for longer than --lock-timeout.
    LockTimeout = 14,
    /// `wait`: the database did not reach the version in time.
    WaitTimeout = 15,
    /// Refused: the request does not fit this database (unknown target, missing down
    /// script, out-of-order migrations, nothing to resolve, destructive changes denied).
    Refused = 16,
    /// The lock cannot be trusted: a pooler shares or moves sessions (use the lease lock),
    /// or this runner lost its lease. Nothing was recorded for the step it stopped at.
    LockUnusable = 17,
    /// Stopped on request (SIGTERM, Ctrl-C): between steps (the running one was finished
    /// and recorded), or before anything started. Nothing is half-applied.
    Stopped = 18,
    /// A step kept waiting for table locks held by other sessions (long transactions,
    /// reports) for longer than --lock-retry-budget; it was rolled back each time and
    /// nothing of it is applied. The message names the sessions holding the lock.
    LockBusy = 19,
    /// `lint`: findings not silenced by `lint-ignore`; `upgrade --lint deny`: refused
    /// because of them (nothing ran).
    LintFindings = 20,
    /// Refused: the plan is of a kind the approval policy names (`--require-approval`,
    /// `spec.approval.required`) and its hash is not approved (`--approve`,
    /// `spec.approvedPlans`). Nothing ran; the message and `details.planHash` give the hash.
    ApprovalRequired = 21,
    /// `upgrade --databases`: one or more databases of the fleet failed (the summary names
    /// each, with why), and those not started after a halt were skipped. Run it again
    /// after the fix: it resumes.
    FanOutIncomplete = 22,
}

impl Exit {
    pub fn code(self) -> u8 {
        self as u8
    }
}

/// A failure as the CLI reports it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CliError {
    #[serde(skip)]
    pub exit: Exit,
    pub kind: &'static str,
    pub message: String,
    pub hint: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
}

impl CliError {
    pub fn new(exit: Exit, kind: &'static str, message: impl Into<String>) -> Self {
        CliError {
            exit,
            kind,
            message: message.into(),
            hint: None,
            details: None,
        }
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub fn details(mut self, details: impl Serialize) -> Self {
        self.details = serde_json::to_value(details).ok();
        self
    }
}

impl From<SourceError> for CliError {
    fn from(e: SourceError) -> Self {
        CliError::new(Exit::Source, "invalid_source", e.to_string()).hint(e.hint())
    }
}

fn db_exit(kind: DbErrorKind) -> (Exit, &'static str) {
    match kind {
        DbErrorKind::Unreachable
        | DbErrorKind::Auth
        | DbErrorKind::Config
        | DbErrorKind::NoDatabase => (Exit::Connect, "connection_failed"),
        DbErrorKind::Statement | DbErrorKind::Other => (Exit::Internal, "database_error"),
        DbErrorKind::Lock => (Exit::LockUnusable, "lock_unusable"),
    }
}

impl From<DbError> for CliError {
    fn from(e: DbError) -> Self {
        let (exit, kind) = db_exit(e.kind);
        CliError::new(exit, kind, e.to_string()).hint(e.hint())
    }
}

impl From<RunError> for CliError {
    fn from(e: RunError) -> Self {
        let message = e.to_string();
        match e {
            RunError::Db { source, .. } => {
                let (exit, kind) = db_exit(source.kind);
                CliError::new(exit, kind, message).hint(source.hint())
            }
            RunError::Plan(p) => {
                let (exit, kind) = match &p {
                    PlanError::Unfinished(_) => (Exit::Blocked, "dirty"),
                    PlanError::Drift(_) => (Exit::Blocked, "drift"),
                    _ => (Exit::Refused, "refused"),
                };
                let details = match &p {
                    PlanError::Unfinished(u) => serde_json::to_value(u).ok(),
                    PlanError::Drift(d) => serde_json::to_value(d).ok(),
                    _ => None,
                };
                let mut err = CliError::new(exit, kind, message).hint(p.hint());
                err.details = details;
                err
            }
            RunError::Script { ref source, .. } => {
                let hint = source.problem.hint();
                CliError::new(Exit::Source, "invalid_script", message).hint(hint)
            }
            RunError::LockTimeout { ref holder, .. } => {
                let details = holder.clone();
                CliError::new(Exit::LockTimeout, "lock_timeout", message)
                    .hint(
                        "another runner is migrating this database: wait for it, or raise \
                         --lock-timeout; if its process is gone, its session ends and the lock \
                         with it (PostgreSQL frees it when the server notices the dead connection)",
                    )
                    .details(details)
            }
            RunError::Lint(ref findings) => {
                let details = findings.clone();
                CliError::new(Exit::LintFindings, "lint", message)
                    .hint(
                        "`schemagate migrate lint` shows each finding with the safe way to do it; \
                         fix it, or silence one with `-- schemagate:lint-ignore <rule> <reason>` \
                         right above its statement (recorded in the history), or run with \
                         --lint warn",
                    )
                    .details(details)
            }
            RunError::ApprovalRequired(ref a) => {
                let details = (**a).clone();
                CliError::new(Exit::ApprovalRequired, "approval_required", message)
                    .hint(format!(
                        "review the plan (`schemagate migrate plan`), then run it with \
                         `--approve {h}`; in a cluster add {{planHash: {h}, approvedBy: <you>, \
                         reason: <why>}} to spec.approvedPlans. Another file or target is \
                         another plan and needs its own approval",
                        h = a.plan_hash
                    ))
                    .details(details)
            }
            RunError::LockRetriesExhausted { ref failure, .. } => {
                let details = (**failure).clone();
                CliError::new(Exit::LockBusy, "lock_busy", message)
                    .hint(
                        "the migration is fine: other sessions hold locks on its tables (see \
                         above). Run it when they end, end or shorten those transactions, or \
                         give it longer (--lock-retry-budget, or --migration-lock-timeout: \
                         each second of lock wait stalls the app's queries on that table)",
                    )
                    .details(details)
            }
            RunError::StepFailed(f) => {
                let hint = match f.outcome {
                    StepOutcome::RolledBack => "fix the migration file and run upgrade again; \
                                                earlier migrations stay applied"
                        .to_string(),
                    StepOutcome::Dirty => {
                        let kind = match f.direction {
                            Direction::Up => Kind::Up,
                            Direction::Down => Kind::Down,
                        };
                        plan::resolve_hint(&f.version, kind)
                    }
                    StepOutcome::Unknown => "run `schemagate migrate status`: the history says \
                                             whether the step committed"
                        .to_string(),
                };
                let hint = match f.code.as_deref() {
                    Some("25001") => format!(
                        "this statement cannot run inside a transaction: make the file's first \
                         line `-- schemagate:no-transaction`; {hint}"
                    ),
                    _ => hint,
                };
                CliError::new(Exit::MigrationFailed, "migration_failed", message)
                    .hint(hint)
                    .details(&*f)
            }
            RunError::NothingToResolve(..) => CliError::new(Exit::Refused, "refused", message)
                .hint("`schemagate migrate status` shows the unfinished step, if any"),
            RunError::StampBelowCurrent { .. } => CliError::new(Exit::Refused, "refused", message)
                .hint("to go back, use `schemagate migrate downgrade`"),
            RunError::Directive { hint, .. } => {
                CliError::new(Exit::Source, "invalid_script", message)
                    .hint(hint.unwrap_or("fix the `-- schemagate:` line"))
            }
            RunError::Destructive(ref steps) => {
                let details = steps.clone();
                CliError::new(Exit::Refused, "destructive", message)
                    .hint(
                        "if losing this data is intended, add `-- schemagate:allow-destructive \
                         <reason>` at the top of the migration (the reason is recorded in the \
                         history), or run with --destructive allow; `schemagate migrate plan` \
                         lists every flagged statement",
                    )
                    .details(details)
            }
            RunError::BelowContract { ref contract, .. } => {
                CliError::new(Exit::Refused, "below_contract", message).hint(format!(
                    "roll the app forward to {contract} or later; going back below a contract \
                     migration takes a new migration that restores what it removed"
                ))
            }
            RunError::ImportIntoHistory { .. } => CliError::new(Exit::Refused, "refused", message)
                .hint("`schemagate migrate history` shows what is recorded already"),
            RunError::ToolProblem { .. } => CliError::new(Exit::Blocked, "tool_problem", message)
                .hint("fix it with the tool, then run again"),
            RunError::ImportWithoutFiles { .. } => CliError::new(Exit::Refused, "refused", message)
                .hint(
                    "point --dir at the tool's migration files (sqlx, golang-migrate, dbmate and \
                     Flyway files are read as they are)",
                ),
            RunError::Stopped {
                completed_steps, ..
            } => CliError::new(Exit::Stopped, "stopped", message)
                .hint("run again to go on from where this run stopped")
                .details(json!({ "completedSteps": completed_steps })),
            RunError::LockLost(_) => CliError::new(Exit::LockUnusable, "lock_unusable", message)
                .hint(
                    "run again: the next runner reads the history and goes on from where this \
                     one stopped; behind a pooler in transaction mode use --lock lease",
                ),
        }
    }
}
