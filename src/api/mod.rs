//! The `SchemaMigration` custom resource (`schemagate.dev/v1alpha1`).
//!
//! Only types here (no server code): the CRD is generated from them, and their doc comments
//! are what `kubectl explain schemamigration.spec` shows. Invalid combinations are refused
//! by the API server itself, through the schema and CEL rules (`x-kubernetes-validations`).
//!
//! Every reference (Secret, ConfigMap, ServiceAccount) names an object in the resource's own
//! namespace: the types have no namespace field, so nothing else can be read through them.

// Each `printcolumn(...)` of the derive repeats `type_ = ...`; that is the derive's syntax,
// not a mistake.
#![allow(clippy::duplicated_attributes)]

pub mod conditions;

use k8s_openapi::api::core::v1::{LocalObjectReference, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use kube::core::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The API group.
pub const GROUP: &str = "schemagate.dev";
/// Label an app's pod template carries to be gated by the named SchemaMigration.
pub const MIGRATION_LABEL: &str = "schemagate.dev/migration";
/// Label on the Jobs (and their pods) the controller runs for a SchemaMigration.
pub const JOB_FOR_LABEL: &str = "schemagate.dev/job-for";
/// The field manager of everything the controller writes (server-side apply).
pub const FIELD_MANAGER: &str = "schemagate-controller";
/// Most entries kept in `status.applied` and `status.pending`.
pub const STATUS_LIST_MAX: usize = 20;

/// Set by the webhook on each pod it admits: the version that pod is for (the newest
/// migration of the files it runs with), read by the controller to hold contract
/// migrations while older app versions run.
pub const VERSION_ANNOTATION: &str = "schemagate.dev/version";

/// A database schema migrated to a target version, safely: one runner at a time, every
/// step versioned and recorded in the database's own history table.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "schemagate.dev",
    version = "v1alpha1",
    kind = "SchemaMigration",
    plural = "schemamigrations",
    shortname = "smig",
    namespaced,
    doc = "A database schema at a target version: schemagate migrates it (as a Job, or from an \
           init container injected into the app's labelled pods) and reports the database's \
           version here.",
    status = "SchemaMigrationStatus",
    printcolumn(
        name = "Current",
        type_ = "string",
        json_path = ".status.currentVersion"
    ),
    printcolumn(name = "Target", type_ = "string", json_path = ".status.targetVersion"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!has(self.source.tool) || !has(self.targetVersion)",
    "message": "targetVersion does not apply to source.tool: the tool's command decides the version (e.g. flask db upgrade <revision>)"
}, {
    "rule": "has(self.database) != has(self.databases)",
    "message": "set exactly one of spec.database (one database) or spec.databases (a fleet of tenant databases)"
}, {
    "rule": "!has(self.databases) || (has(self.mode) && self.mode == 'Job')",
    "message": "spec.databases runs the fleet in the controller's Jobs: set mode: Job"
}, {
    "rule": "!has(self.databases) || !has(self.source.tool)",
    "message": "spec.databases needs schemagate's own migrations, not source.tool"
}, {
    "rule": "!has(self.databases) || !has(self.drift)",
    "message": "spec.drift checks one database; check a fleet's databases with `schemagate migrate drift`"
}, {
    "rule": "!has(self.databases) || !has(self.source.image)",
    "message": "spec.databases needs a configMapRef or inline source: the controller reads the files to know what each database has pending"
}]))]
pub struct SchemaMigrationSpec {
    /// The database to migrate (or `databases`, for many).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<DatabaseSpec>,

    /// Many databases with the same migrations (one per tenant), instead of `database`:
    /// the Secrets a label selector picks, migrated canary first, then with bounded
    /// parallelism. Needs `mode: Job`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub databases: Option<DatabasesSpec>,

    /// Where the migrations come from: exactly one of configMapRef, inline or image.
    pub source: SourceSpec,

    /// The version to reach, e.g. "20251101" or "1.4". Default: the newest migration in
    /// the source. A version below the database's current one is a downgrade, which
    /// `downgrade: Allow` must permit.
    #[schemars(
        length(max = 64),
        extend("x-kubernetes-validations" = [{
            "rule": "self.matches('^[0-9]+(\\\\.[0-9]+)*$')",
            "message": "targetVersion must be digits separated by dots, e.g. 20251101 or 1.4"
        }])
    )]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_version: Option<String>,

    /// How the upgrade runs. InitContainer (default): an init container injected into the
    /// app's labelled pods migrates (the first pod takes the lock, the others wait). Job:
    /// the controller runs one Job per target; the injected init container only waits.
    #[serde(default)]
    pub mode: MigrationMode,

    /// Whether a target below the current version may revert migrations (with their down
    /// scripts). Deny (default) blocks the resource instead.
    #[serde(default)]
    pub downgrade: DowngradePolicy,

    /// Stop acting: no Job is created and gated pods are refused until unpaused.
    #[serde(default)]
    pub paused: bool,

    /// How the migration runner runs (image, service account, resources, scheduling).
    #[serde(default)]
    pub runner: RunnerSpec,

    /// Engine settings passed to the runner.
    #[serde(default)]
    pub options: MigrationOptions,

    /// Which plans a person must approve before they run. Empty by default: nothing needs
    /// an approval.
    #[serde(default, skip_serializing_if = "ApprovalSpec::is_empty")]
    pub approval: ApprovalSpec,

    /// Approved plans, by hash. A plan that `approval.required` marks runs only when its
    /// hash is listed here; until then the resource is Stalled (reason ApprovalRequired)
    /// with the hash in its message. `schemagate migrate plan --output json` prints a
    /// plan's `planHash`. Another file, target or starting version is another plan.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub approved_plans: Vec<ApprovedPlan>,

    /// Periodic live-schema drift checks by the controller: the live schema against the
    /// fingerprint recorded after the last applied step. Off when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift: Option<DriftSpec>,
}

/// What needs an approval.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalSpec {
    /// Destructive (any data-losing statement, even one its file allows with
    /// `allow-destructive`), Downgrade (any plan that reverts migrations), LintFindings
    /// (any lint finding not silenced by `lint-ignore`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 3))]
    pub required: Vec<ApprovalKind>,
}

impl ApprovalSpec {
    pub fn is_empty(&self) -> bool {
        self.required.is_empty()
    }
}

/// A kind of plan that may need an approval.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ApprovalKind {
    Destructive,
    Downgrade,
    LintFindings,
}

impl ApprovalKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalKind::Destructive => "Destructive",
            ApprovalKind::Downgrade => "Downgrade",
            ApprovalKind::LintFindings => "LintFindings",
        }
    }
}

/// One approved plan.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApprovedPlan {
    /// The plan's hash (64 hex digits, optionally prefixed `sha256:`).
    #[schemars(
        length(max = 71),
        extend("x-kubernetes-validations" = [{
            "rule": "self.matches('^(sha256:)?[0-9a-fA-F]{64}$')",
            "message": "planHash must be the 64 hex digits `schemagate migrate plan` prints"
        }])
    )]
    pub plan_hash: String,
    /// Who approved it.
    #[schemars(length(min = 1, max = 256))]
    pub approved_by: String,
    /// Why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub reason: Option<String>,
}

/// Live-schema drift checks.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DriftSpec {
    /// How often to compare, e.g. "1h" (the default), "15m"; at least "1m".
    #[serde(default = "default_drift_interval")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?(s|m|h)$"), length(max = 16))]
    pub interval: String,
    /// Report (default): the SchemaDrifted condition, a Warning Event and the
    /// schemagate_schema_drift_objects metric; pods are admitted as before. Block: the
    /// resource is also Blocked (reason SchemaDrifted), so gated pods are refused and no
    /// migration runs until the drift is fixed or accepted (`migrate drift --accept`).
    #[serde(default)]
    pub on_drift: DriftAction,
}

fn default_drift_interval() -> String {
    "1h".into()
}

/// What drift does.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum DriftAction {
    #[default]
    Report,
    Block,
}

impl SchemaMigrationSpec {
    /// A spec for the database URL under `key` of Secret `secret`, migrations from
    /// `source`, and every other field at its default (InitContainer mode, downgrades
    /// denied, the newest migration as the target).
    pub fn new(secret: &str, key: &str, source: SourceSpec) -> Self {
        SchemaMigrationSpec {
            database: Some(DatabaseSpec {
                url_secret_ref: SecretKeyRef {
                    name: secret.into(),
                    key: key.into(),
                },
            }),
            databases: None,
            source,
            target_version: None,
            mode: MigrationMode::default(),
            downgrade: DowngradePolicy::default(),
            paused: false,
            runner: RunnerSpec::default(),
            options: MigrationOptions::default(),
            approval: ApprovalSpec::default(),
            approved_plans: Vec::new(),
            drift: None,
        }
    }
}

impl SchemaMigrationSpec {
    /// The Secret key of the one database (`None` for a fleet).
    pub fn secret_ref(&self) -> Option<&SecretKeyRef> {
        self.database.as_ref().map(|d| &d.url_secret_ref)
    }
}

impl SourceSpec {
    /// Migrations from the ConfigMap `name`.
    pub fn config_map(name: &str) -> Self {
        SourceSpec {
            config_map_ref: Some(ConfigMapRef { name: name.into() }),
            ..Default::default()
        }
    }
}

/// The database connection.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseSpec {
    /// A key of a Secret in this namespace holding the database URL, e.g.
    /// postgres://user:password@host:5432/db. The URL is never copied anywhere: runners
    /// read it from the Secret.
    pub url_secret_ref: SecretKeyRef,
}

/// A fleet of tenant databases.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatabasesSpec {
    /// Picks the Secrets (in this namespace) that each hold one database's URL. Secrets
    /// that start matching join the fleet; those that stop matching leave it.
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "(has(self.matchLabels) && size(self.matchLabels) > 0) || (has(self.matchExpressions) && size(self.matchExpressions) > 0)",
        "message": "secretSelector must select by matchLabels or matchExpressions (an empty selector would pick every Secret of the namespace)"
    }]))]
    pub secret_selector: LabelSelector,
    /// The key of each Secret holding the URL. Default: url.
    #[serde(default = "default_url_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
    /// How many databases (the first by Secret name) are migrated first, alone, and
    /// verified before the rest start. Default: 1.
    #[serde(default = "default_canary")]
    #[schemars(range(min = 0, max = 1000))]
    pub canary: u32,
    /// At most this many databases migrate at once. Default: 4.
    #[serde(default = "default_max_parallel")]
    #[schemars(range(min = 1, max = 256))]
    pub max_parallel: u32,
    /// Halt (default): after a database fails, no new one starts (those running finish);
    /// Continue: the others go on.
    #[serde(default)]
    pub on_failure: FleetFailurePolicy,
}

impl Default for DatabasesSpec {
    fn default() -> Self {
        DatabasesSpec {
            secret_selector: LabelSelector::default(),
            key: default_url_key(),
            canary: default_canary(),
            max_parallel: default_max_parallel(),
            on_failure: FleetFailurePolicy::default(),
        }
    }
}

fn default_canary() -> u32 {
    1
}

fn default_max_parallel() -> u32 {
    4
}

/// What a failed database does to the rest of the fleet.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum FleetFailurePolicy {
    #[default]
    Halt,
    Continue,
}

/// A key of a Secret in the resource's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret (in this namespace).
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key in the Secret. Default: url.
    #[serde(default = "default_url_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_url_key() -> String {
    "url".into()
}

/// Where migrations come from. Exactly one field is set.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "[has(self.configMapRef), has(self.inline), has(self.image), has(self.tool)].filter(x, x).size() == 1",
    "message": "set exactly one of source.configMapRef, source.inline, source.image or source.tool"
}]))]
pub struct SourceSpec {
    /// A ConfigMap in this namespace whose keys are migration file names (any format
    /// schemagate reads: 1_init.up.sql, V1__init.sql, ...) and whose values are their SQL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_ref: Option<ConfigMapRef>,

    /// Migrations written in the resource itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 200))]
    pub inline: Option<Vec<InlineMigration>>,

    /// An image that contains the migration files (copied with `cp` into the runner).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageSource>,

    /// The app's own migration tool instead of schemagate's engine: its command runs from
    /// its image under schemagate's database lock (never two at once), and the status
    /// reads the tool's history table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<ToolSource>,
}

/// Another tool's migrations, run by its own command.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ToolSource {
    /// Alembic (also Flask-Migrate), Flyway, GolangMigrate, Sqlx or Dbmate: whose history
    /// table holds the version.
    pub name: ToolName,
    /// The image with the tool and the migrations (usually the app's own image). It runs
    /// as a non-root user with a read-only root filesystem and a writable /tmp.
    #[schemars(length(min = 1, max = 1024))]
    pub image: String,
    /// The migration command and its arguments, e.g. ["flask", "db", "upgrade"] or
    /// ["flyway", "migrate"]. DATABASE_URL is set from the Secret.
    #[schemars(length(min = 1, max = 64))]
    pub command: Vec<String>,
    /// The command's working directory. Default: the image's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// Extra environment variables for the command (plain values; the database URL comes
    /// from the Secret).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub env: Vec<ToolEnv>,
}

/// The tools whose history schemagate reads.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ToolName {
    Alembic,
    Flyway,
    GolangMigrate,
    Sqlx,
    Dbmate,
}

/// A plain environment variable.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ToolEnv {
    #[schemars(length(min = 1, max = 256))]
    pub name: String,
    #[serde(default)]
    #[schemars(length(max = 4096))]
    pub value: String,
}

/// A ConfigMap in the resource's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMapRef {
    /// Name of the ConfigMap (in this namespace).
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// One migration written in the resource.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InlineMigration {
    /// Version, e.g. "1" or "20251101".
    #[schemars(
        length(min = 1, max = 64),
        extend("x-kubernetes-validations" = [{
            "rule": "self.matches('^[0-9]+(\\\\.[0-9]+)*$')",
            "message": "inline migration versions must be digits separated by dots"
        }])
    )]
    pub version: String,
    /// A few words on what it does.
    #[serde(default)]
    #[schemars(length(max = 200))]
    pub description: String,
    /// The SQL that applies it.
    #[schemars(length(min = 1, max = 262144))]
    pub up: String,
    /// The SQL that reverts it (needed for downgrades).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 262144))]
    pub down: Option<String>,
}

/// Migration files inside an image.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageSource {
    /// The image reference, e.g. registry.example/orders-migrations:1.4.
    #[schemars(length(min = 1, max = 512))]
    pub reference: String,
    /// The directory holding the files in the image. Default: /migrations.
    #[serde(default = "default_image_path")]
    #[schemars(length(min = 1, max = 1024))]
    pub path: String,
}

fn default_image_path() -> String {
    "/migrations".into()
}

/// How the upgrade runs.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum MigrationMode {
    /// An init container injected into the app's labelled pods migrates.
    #[default]
    InitContainer,
    /// The controller runs a Job; injected init containers only wait for the version.
    Job,
}

/// Whether downgrades are allowed.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum DowngradePolicy {
    /// A target below the current version blocks the resource; nothing runs.
    #[default]
    Deny,
    /// A target below the current version reverts migrations with their down scripts.
    Allow,
}

/// How the migration runner runs.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunnerSpec {
    /// The schemagate image that runs migrations. Default: the controller's own image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    pub image: Option<String>,
    /// Service account of the runner pods (in this namespace). Default: the namespace's
    /// default; the runner needs no Kubernetes API access and mounts no token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub service_account_name: Option<String>,
    /// CPU and memory for the runner container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Node labels the runner pods must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Tolerations of the runner pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
    /// Secrets for pulling the runner (and migrations) images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_secrets: Option<Vec<LocalObjectReference>>,
    /// Job mode: how long a Job may run before it is stopped (seconds). Default: 1800.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub active_deadline_seconds: Option<i64>,
    /// Job mode: retries of a failed runner pod. Default: 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 10))]
    pub backoff_limit: Option<i32>,
    /// Job mode: delete finished Jobs after this many seconds. Default: keep them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub ttl_seconds_after_finished: Option<i32>,
}

/// What runners do with lint findings.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum LintPolicy {
    #[default]
    Warn,
    Deny,
    Off,
}

/// What runners do with migrations that lose data.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum DestructivePolicy {
    /// Refuse them unless their file records a permission (`allow-destructive <reason>`).
    #[default]
    Deny,
    /// Run them.
    Allow,
}

/// Engine settings passed to the runner (see the CLI reference).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigrationOptions {
    /// Session (default) or Lease; use Lease behind PgBouncer in transaction mode.
    #[serde(default)]
    pub lock: LockKind,
    /// Deny (default): a migration that loses data (DROP, TRUNCATE, narrowing type
    /// changes) runs only if its file says `-- schemagate:allow-destructive <reason>`.
    /// Allow: such migrations run without a recorded permission.
    #[serde(default)]
    pub destructive: DestructivePolicy,
    /// What lint findings of the migrations about to run do: Warn (default: logged),
    /// Deny (the run is refused until each is fixed or silenced with
    /// `-- schemagate:lint-ignore <rule> <reason>`), or Off.
    #[serde(default)]
    pub lint: LintPolicy,
    /// Deprecated and ignored: refusing is the default now (see `destructive`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deny_destructive: bool,
    /// The history table (`name` or `schema.name`). Default: schemagate_history.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 117),
        extend("x-kubernetes-validations" = [{
            "rule": "self.matches('^[A-Za-z_][A-Za-z0-9_]*(\\\\.[A-Za-z_][A-Za-z0-9_]*)?$')",
            "message": "historyTable must be name or schema.name (letters, digits, _)"
        }])
    )]
    pub history_table: Option<String>,
    /// How long each migration statement may wait for table locks held by other sessions
    /// (the app's queries wait behind it meanwhile), e.g. "2s" (the default); "0" waits
    /// forever. A step that times out is rolled back and retried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?(ms|s|m|h)?$"), length(max = 16))]
    pub migration_lock_timeout: Option<String>,
    /// How long a step that timed out on a table lock is retried before the run fails
    /// (reason LockBusy), e.g. "5m" (the default); "0" does not retry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?(ms|s|m|h)?$"), length(max = 16))]
    pub lock_retry_budget: Option<String>,
    /// How long each migration statement may run, e.g. "10m".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?(ms|s|m|h)?$"), length(max = 16))]
    pub migration_statement_timeout: Option<String>,
}

/// How runners exclude each other.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum LockKind {
    #[default]
    Session,
    Lease,
}

/// What the controller observed and did.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SchemaMigrationStatus {
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pending, Migrating, Ready, Failed or Blocked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// The database's current version, from its history table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_version: Option<String>,
    /// The version being migrated to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_version: Option<String>,
    /// Migrations not applied yet (the first 20).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<String>,
    /// Lint findings of the pending migrations (`schemagate migrate lint`), at most 20:
    /// `file:line rule: risk`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lint_findings: Vec<String>,
    /// The last applied migrations (at most 20, newest last).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub applied: Vec<AppliedMigration>,
    /// The last migration run (a Job, or an init container).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run: Option<LastRun>,
    /// A fleet (`spec.databases`): how many databases are at the target, pending and
    /// failed, the failed ones with why, the slowest. Each database's history table is the
    /// source of truth; this is a summary, bounded whatever the fleet's size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub databases: Option<FleetStatus>,
    /// Expand/contract: contract migrations held while older app versions run, those
    /// applied, and the oldest app version the schema still serves.
    #[serde(default, skip_serializing_if = "ContractStatus::is_empty")]
    pub contract: ContractStatus,
    /// The last live-schema drift check (with spec.drift).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_drift: Option<SchemaDriftStatus>,
    /// Ready, Reconciling and Stalled (kstatus), DatabaseReachable, and SchemaDrifted (with
    /// spec.drift).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// A fleet's progress.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FleetStatus {
    pub total: u32,
    pub at_target: u32,
    pub pending: u32,
    pub failed: u32,
    /// The failed databases by Secret name, with why (at most 20).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed_databases: Vec<FleetMember>,
    /// The databases whose migrations took longest (at most 5), the time in `reason`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub slowest: Vec<FleetMember>,
}

/// One database of a fleet, by its Secret.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FleetMember {
    pub secret: String,
    pub reason: String,
}

/// Contract migrations (`-- schemagate:phase contract`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContractStatus {
    /// Contract migrations waiting, each with why (the pods of older app versions still
    /// running, at most 20).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held: Vec<HeldContract>,
    /// The applied contract migrations (the last 20): when and by whom.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub applied: Vec<AppliedContract>,
    /// The oldest app version that can still run on the schema: the newest applied
    /// contract migration. Pods for older versions are refused at admission.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_compatible_version: Option<String>,
}

impl ContractStatus {
    pub fn is_empty(&self) -> bool {
        self.held.is_empty() && self.applied.is_empty() && self.oldest_compatible_version.is_none()
    }
}

/// A contract migration waiting for older app versions to go.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HeldContract {
    pub version: String,
    /// Why it waits, e.g. "pod web-7d9f-x2 runs version 1".
    pub reason: String,
}

/// An applied contract migration.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AppliedContract {
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_by: Option<String>,
}

/// The result of the last live-schema drift check.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SchemaDriftStatus {
    /// When it ran (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checked_at: Option<String>,
    /// The database's version then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Clean, Drifted, NoBaseline (no fingerprint recorded at that version: `schemagate
    /// migrate drift --accept` records one) or NotChecked (a migration was running, or the
    /// schema could not be read).
    pub result: String,
    /// How many objects differ.
    #[serde(default)]
    pub count: usize,
    /// The differences (at most 20), one line each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub differences: Vec<String>,
    /// One line for people.
    #[serde(default)]
    pub message: String,
}

/// The phase of a SchemaMigration.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum Phase {
    /// Waiting for something (inputs, the database, a pod to migrate, being unpaused).
    Pending,
    /// A migration is running.
    Migrating,
    /// The database is at the target version.
    Ready,
    /// A migration failed, or the database has a dirty step.
    Failed,
    /// Policy stops it: a denied downgrade, an invalid source.
    Blocked,
}

impl Phase {
    pub const ALL: [Phase; 5] = [
        Phase::Pending,
        Phase::Migrating,
        Phase::Ready,
        Phase::Failed,
        Phase::Blocked,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Migrating => "Migrating",
            Phase::Ready => "Ready",
            Phase::Failed => "Failed",
            Phase::Blocked => "Blocked",
        }
    }
}

/// One applied migration, from the history table.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AppliedMigration {
    pub version: String,
    #[serde(default)]
    pub description: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
    /// When it was applied (UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<i64>,
    /// The runner (pod name / pid).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_by: Option<String>,
}

/// The last migration run.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LastRun {
    /// Job or Pod.
    pub kind: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// Running, Succeeded or Failed.
    pub result: String,
    /// What the runner reported (its summary), or why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The CRD as YAML, as `schemagate crd` prints it and `crds/` holds it.
pub fn crd_yaml() -> String {
    let crd = SchemaMigration::crd();
    // Doc comments wrap at 100 columns; `kubectl explain` shows descriptions as written, so
    // lines are joined back into paragraphs.
    let mut value = serde_json::to_value(&crd).unwrap_or_default();
    unwrap_descriptions(&mut value);
    let body = serde_yaml::to_string(&value).unwrap_or_default();
    format!(
        "# Generated by `schemagate crd` from src/api; do not edit (a test fails when it is stale).\n{body}"
    )
}

/// Joins the hard-wrapped lines of every `description` into paragraphs (blank lines and
/// list items keep their breaks).
fn unwrap_descriptions(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, child) in map.iter_mut() {
                if k == "description"
                    && let serde_json::Value::String(text) = child
                {
                    *text = unwrap_text(text);
                } else {
                    unwrap_descriptions(child);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(unwrap_descriptions),
        _ => {}
    }
}

fn unwrap_text(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let t = line.trim();
        let list_item = t.starts_with("- ") || t.starts_with("* ");
        if t.is_empty() {
            out.push_str("\n\n");
        } else if out.is_empty() || out.ends_with('\n') {
            out.push_str(t);
        } else if list_item {
            out.push('\n');
            out.push_str(t);
        } else {
            out.push(' ');
            out.push_str(t);
        }
    }
    while out.contains("\n\n\n") {
        out = out.replace("\n\n\n", "\n\n");
    }
    out.trim().to_string()
}

#[cfg(test)]
mod tests;
