//! Condition types and reasons: one list of constants, so tools and docs can rely on them.
//!
//! kstatus semantics (read by `helm --wait`, Argo CD, Flux): `Ready` True means the
//! database is at the target version; `Reconciling` True means progress is being made;
//! `Stalled` True means nothing will change without a person.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

pub const READY: &str = "Ready";
pub const RECONCILING: &str = "Reconciling";
pub const STALLED: &str = "Stalled";
/// Whether the controller could read the database's history table.
pub const DATABASE_REACHABLE: &str = "DatabaseReachable";
/// The live schema differs from what the migrations left (with spec.drift).
pub const SCHEMA_DRIFTED: &str = "SchemaDrifted";

/// Reasons, as they appear in conditions and Events.
pub mod reason {
    /// The database is at the target version.
    pub const UP_TO_DATE: &str = "UpToDate";
    /// A migration Job runs.
    pub const JOB_RUNNING: &str = "JobRunning";
    /// A migration Job was created.
    pub const JOB_CREATED: &str = "JobCreated";
    /// Init-container mode: the next labelled pod to start migrates.
    pub const WAITING_FOR_POD: &str = "WaitingForPod";
    /// `spec.paused` is true.
    pub const PAUSED: &str = "Paused";
    /// The Secret named by `spec.database.urlSecretRef` does not exist.
    pub const SECRET_NOT_FOUND: &str = "SecretNotFound";
    /// The Secret exists but lacks the key.
    pub const SECRET_KEY_MISSING: &str = "SecretKeyMissing";
    /// The ConfigMap named by `spec.source.configMapRef` does not exist.
    pub const CONFIG_MAP_NOT_FOUND: &str = "ConfigMapNotFound";
    /// The migration files are invalid (names, duplicates, directives).
    pub const INVALID_SOURCE: &str = "InvalidSource";
    /// `targetVersion` is not a version of the source.
    pub const UNKNOWN_TARGET: &str = "UnknownTarget";
    /// The target is below the current version and `downgrade: Deny`.
    pub const DOWNGRADE_DENIED: &str = "DowngradeDenied";
    /// A run (a Job, or a gated pod's init container) applied migrations (Event reason).
    pub const MIGRATED: &str = "Migrated";
    /// The last migration run failed.
    pub const MIGRATION_FAILED: &str = "MigrationFailed";
    /// The last run kept waiting for table locks held by other sessions until its retry
    /// budget was spent (nothing applied; the migration itself is fine).
    pub const LOCK_BUSY: &str = "LockBusy";
    /// A contract migration waits for pods of older app versions to go.
    pub const CONTRACT_HELD: &str = "ContractHeld";
    /// The controller started a Job for held contract migrations.
    pub const CONTRACT_STARTED: &str = "ContractStarted";
    /// A contract migration was applied.
    pub const CONTRACT_APPLIED: &str = "ContractApplied";
    /// The plan needs a person's approval: its hash goes in spec.approvedPlans.
    pub const APPROVAL_REQUIRED: &str = "ApprovalRequired";
    /// The live schema differs from what the migrations left.
    pub const SCHEMA_DRIFTED: &str = "SchemaDrifted";
    /// The live schema is what the migrations left.
    pub const NO_DRIFT: &str = "NoDrift";
    /// No schema fingerprint is recorded at the current version.
    pub const NO_BASELINE: &str = "NoBaseline";
    /// The drift check could not run this time.
    pub const NOT_CHECKED: &str = "NotChecked";
    /// A step did not finish (a non-transactional migration stopped part-way).
    pub const DIRTY: &str = "Dirty";
    /// A tool source's history needs repair first (golang-migrate dirty, a failed Flyway
    /// or sqlx row, unmerged Alembic heads).
    pub const TOOL_NEEDS_REPAIR: &str = "ToolNeedsRepair";
    /// Applied migrations differ from the source (changed or missing files).
    pub const DRIFT: &str = "Drift";
    /// The controller could not read the database.
    pub const DATABASE_UNREACHABLE: &str = "DatabaseUnreachable";
    /// The database refused the credentials in the Secret (permanent: fix the Secret).
    pub const DATABASE_AUTH_FAILED: &str = "DatabaseAuthFailed";
    /// The database named in the Secret's URL does not exist (permanent).
    pub const DATABASE_NOT_FOUND: &str = "DatabaseNotFound";
    /// The Secret's URL (or the history table name) is invalid (permanent).
    pub const INVALID_DATABASE_URL: &str = "InvalidDatabaseUrl";
    /// The controller read the database.
    pub const DATABASE_READ: &str = "HistoryRead";
    /// The controller does not read databases (disabled by a flag).
    pub const NOT_OBSERVED: &str = "NotObserved";
    /// A Job succeeded but the database does not show the target version.
    pub const UNEXPECTED_VERSION: &str = "UnexpectedVersion";
    /// The resource names the controller's own service account for its runner.
    pub const SERVICE_ACCOUNT_NOT_ALLOWED: &str = "ServiceAccountNotAllowed";
    /// The runner image is not allowed by the controller's policy.
    pub const IMAGE_NOT_ALLOWED: &str = "ImageNotAllowed";
    /// An object under a name schemagate derives (a Job, an inline-source ConfigMap) exists
    /// but belongs to someone else (permanent: delete or rename it).
    pub const OBJECT_NOT_OWNED: &str = "ObjectNotOwned";
    /// The API server refused the controller a permission (permanent: fix its RBAC).
    pub const FORBIDDEN: &str = "Forbidden";
    /// The API server rejected an object the controller wrote (permanent).
    pub const REJECTED: &str = "Rejected";
    /// A write lost a race with another writer (transient: retried).
    pub const API_CONFLICT: &str = "ApiConflict";
    /// The API server answered with an error (transient: retried).
    pub const API_ERROR: &str = "ApiError";
    /// The API server could not be reached or did not answer in time (transient).
    pub const API_UNREACHABLE: &str = "ApiUnreachable";
}

/// A condition, keeping the previous `lastTransitionTime` when its status did not change
/// (so it only moves when the condition flips).
pub fn condition(
    previous: &[Condition],
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    let status = if status { "True" } else { "False" };
    let since = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.clone());
    Condition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message,
        observed_generation: generation,
        last_transition_time: since,
    }
}

/// The status of a condition type, if present.
pub fn status_of<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a str> {
    conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.status.as_str())
}
