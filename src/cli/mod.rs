//! The command line: `schemagate migrate ...` (Flask-Migrate/Alembic-like).

mod convert;
mod lint;
mod migrate;
mod output;
pub mod status;
mod stop;

use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::runner::exit;
use crate::telemetry::{self, LogFormat};

/// Versioned, locked, audited database schema migrations.
#[derive(Debug, Parser)]
#[command(name = "schemagate", version, about, long_about = None)]
pub struct Cli {
    /// Log filter (tracing syntax, e.g. `info`, `debug`, `schemagate=debug`).
    #[arg(long, env = "SCHEMAGATE_LOG", default_value = "info", global = true)]
    pub log_level: String,

    /// Log format on standard error.
    #[arg(
        long,
        env = "SCHEMAGATE_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Migrate a database: upgrade, downgrade, inspect, verify, adopt.
    Migrate(MigrateArgs),
    /// Print the SchemaMigration CustomResourceDefinition (YAML).
    Crd,
    /// Run the Kubernetes controller (in a cluster, or outside one with KUBECONFIG).
    Controller(crate::operator::ControllerArgs),
    /// List the SchemaMigrations of a namespace (or, with -A, the cluster): phase,
    /// current and target version, pending migrations, the last run and the reason of any
    /// failure. Installed as `kubectl-schemagate`, this is `kubectl schemagate status`.
    Status(status::StatusArgs),
    /// Copy this (static) binary to PATH: how an init container gives another image
    /// schemagate, to run its migration tool under `schemagate migrate exec`.
    Install {
        /// Where to put the binary, e.g. /schemagate/schemagate.
        path: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(subcommand)]
    pub command: MigrateCommand,
}

/// Settings every `migrate` command shares.
#[derive(Debug, Args, Clone)]
pub struct Common {
    /// Database URL: postgres://user:password@host:5432/db, mysql:// or mariadb://
    /// user:password@host:3306/db, or sqlite:path/to/file.db. Its password is never printed.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, global = true)]
    pub database_url: Option<String>,

    /// Directory holding the migration files.
    #[arg(
        long,
        env = "SCHEMAGATE_DIR",
        default_value = "migrations",
        global = true
    )]
    pub dir: PathBuf,

    /// Output format: human-readable text, or one JSON document on standard output.
    #[arg(
        long,
        short = 'o',
        env = "SCHEMAGATE_OUTPUT",
        value_enum,
        default_value = "human",
        global = true
    )]
    pub output: OutputFormat,

    /// Name of the history table (`name` or `schema.name`).
    #[arg(
        long,
        env = "SCHEMAGATE_HISTORY_TABLE",
        default_value = "schemagate_history",
        global = true
    )]
    pub history_table: String,

    /// How long to wait for another runner's migration lock (e.g. 30s, 5m; 0 = do not wait).
    #[arg(long, env = "SCHEMAGATE_LOCK_TIMEOUT", default_value = "5m", value_parser = parse_duration, global = true)]
    pub lock_timeout: Duration,

    /// How long to wait for the database server to answer a connection attempt.
    #[arg(long, env = "SCHEMAGATE_CONNECT_TIMEOUT", default_value = "10s", value_parser = parse_duration, global = true)]
    pub connect_timeout: Duration,

    /// How applied migrations are compared with their files: `strict` (every byte) or
    /// `normalized` (ignores line endings, trailing whitespace and a byte-order mark).
    #[arg(
        long,
        env = "SCHEMAGATE_CHECKSUM",
        value_enum,
        default_value = "strict",
        global = true
    )]
    pub checksum: ChecksumArg,

    /// Write a one-line JSON summary of the run here (e.g. /dev/termination-log).
    #[arg(long, env = "SCHEMAGATE_SUMMARY_FILE", global = true)]
    pub summary_file: Option<PathBuf>,

    /// Also apply pending migrations older than the current version (they are refused by
    /// default: a migration written against an older schema may not fit the current one).
    #[arg(long, env = "SCHEMAGATE_OUT_OF_ORDER", global = true)]
    pub out_of_order: bool,

    /// Go on although applied migrations have no file any more (by default that is drift).
    #[arg(long, env = "SCHEMAGATE_IGNORE_MISSING", global = true)]
    pub ignore_missing: bool,

    /// How runners exclude each other: `session` (the database's session lock: advisory
    /// lock, GET_LOCK, SQLite file lock) or `lease` (a lease row with heartbeats, for
    /// PgBouncer in transaction mode or clusters where GET_LOCK is node-local). A URL
    /// parameter `schemagate_lock=lease` overrides it per database.
    #[arg(
        long,
        env = "SCHEMAGATE_LOCK",
        value_enum,
        default_value = "session",
        global = true
    )]
    pub lock: LockArg,

    /// Lease lock: how often the holder renews its lease.
    #[arg(long, env = "SCHEMAGATE_LEASE_HEARTBEAT", default_value = "5s", value_parser = parse_duration, global = true)]
    pub lease_heartbeat: Duration,

    /// Lease lock: how long after its last renewal a lease may be taken over
    /// [default: 3 x --lease-heartbeat].
    #[arg(long, env = "SCHEMAGATE_LEASE_TTL", value_parser = parse_duration, global = true)]
    pub lease_ttl: Option<Duration>,

    /// How long each migration statement may wait for table locks held by other sessions
    /// (PostgreSQL lock_timeout, MySQL/MariaDB lock_wait_timeout), unless the file sets
    /// `-- schemagate:lock-timeout`. While a DDL statement waits, the app's queries on that
    /// table wait behind it: this bounds how long a migration can stall them. A step that
    /// times out is rolled back and retried (--lock-retry-budget). `0`: wait forever.
    #[arg(long, env = "SCHEMAGATE_MIGRATION_LOCK_TIMEOUT", default_value = "2s", value_parser = parse_duration, global = true)]
    pub migration_lock_timeout: Duration,

    /// How long a step that timed out waiting for a table lock is retried (rolled back,
    /// then tried again after 1 s, 2 s, 4 s ... up to 30 s, with jitter) before the run
    /// fails with exit 19; `-- schemagate:lock-retry-budget` sets it per file. `0`: no
    /// retries.
    #[arg(long, env = "SCHEMAGATE_LOCK_RETRY_BUDGET", default_value = "5m", value_parser = parse_duration, global = true)]
    pub lock_retry_budget: Duration,

    /// How long each migration statement may run, unless the file sets
    /// `-- schemagate:statement-timeout` [default: the server's].
    #[arg(long, env = "SCHEMAGATE_MIGRATION_STATEMENT_TIMEOUT", value_parser = parse_duration, global = true)]
    pub migration_statement_timeout: Option<Duration>,

    /// Migrations that lose data (DROP TABLE/COLUMN/SCHEMA, TRUNCATE, DELETE/UPDATE without
    /// WHERE, narrowing type changes): `deny` refuses an upgrade with one unless its file
    /// says `-- schemagate:allow-destructive <reason>` (the reason is recorded in the
    /// history); `allow` runs them without a recorded permission (the behaviour before
    /// schemagate 0.2). Downgrades are explicit already and never refused for this.
    #[arg(
        long,
        env = "SCHEMAGATE_DESTRUCTIVE",
        value_enum,
        default_value = "deny",
        global = true
    )]
    pub destructive: DestructiveArg,

    /// Before an upgrade, lint the steps about to run (see `migrate lint`): `warn` logs
    /// each finding, `deny` refuses the upgrade (exit 20) while a finding is not silenced
    /// by `-- schemagate:lint-ignore <rule> <reason>`, `off` skips it.
    #[arg(
        long,
        env = "SCHEMAGATE_LINT",
        value_enum,
        default_value = "warn",
        global = true
    )]
    pub lint: LintPolicyArg,

    /// Plans of this kind need a person's approval before they run: `Destructive` (any
    /// data-losing statement, even one its file allows), `Downgrade`, `LintFindings`.
    /// Repeatable (or comma-separated in the variable). `plan` prints each plan's hash; a
    /// plan that needs an approval runs only with `--approve <hash>` (exit 21 without).
    #[arg(long, env = "SCHEMAGATE_REQUIRE_APPROVAL", value_delimiter = ',', value_parser = crate::engine::approval::ApprovalKind::from_str, global = true)]
    pub require_approval: Vec<crate::engine::approval::ApprovalKind>,

    /// Approved plan hashes (from `plan`, or from the refusal): repeatable, or
    /// comma-separated in the variable. An approval is for that exact plan: another file,
    /// target or starting version is another plan.
    #[arg(
        long,
        env = "SCHEMAGATE_APPROVED_PLANS",
        value_delimiter = ',',
        global = true
    )]
    pub approve: Vec<String>,

    /// Which migrations `upgrade` (and `plan`) run, by their `-- schemagate:phase`:
    /// `all` (default), `expand` (contract migrations are held: the app's older versions
    /// still run), `contract` (the held contract migrations, once no older app version
    /// runs). `wait` with `expand` waits for the newest expand migration only.
    #[arg(
        long,
        env = "SCHEMAGATE_PHASE",
        value_enum,
        default_value = "all",
        global = true
    )]
    pub phase: PhaseArg,

    /// Record the schema's fingerprint after each step (what `drift` compares with): `on`
    /// or `off` (for very large schemas, where reading the catalogs is slow).
    #[arg(
        long,
        env = "SCHEMAGATE_SCHEMA_FINGERPRINTS",
        value_enum,
        default_value = "on",
        global = true
    )]
    pub schema_fingerprints: OnOff,

    /// Deprecated and ignored: refusing is the default now (see --destructive).
    #[arg(long, env = "SCHEMAGATE_DENY_DESTRUCTIVE", hide = true, global = true)]
    pub deny_destructive: bool,

    /// Who is running, as recorded in the history and shown to waiting runners
    /// [default: $POD_NAME or the host name, plus the process id].
    #[arg(long, env = "SCHEMAGATE_RUNNER_ID", global = true)]
    pub runner_id: Option<String>,

    /// Whose history `current`, `status`, `history` and `exec` read: `native`
    /// (schemagate's), `alembic` (also Flask-Migrate), `flyway`, `golang-migrate`, `sqlx`
    /// or `dbmate`, each in the table that tool creates.
    #[arg(long, env = "SCHEMAGATE_TOOL", default_value = "native", value_parser = crate::engine::tools::Tool::from_str, global = true)]
    pub tool: crate::engine::tools::Tool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Human,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LockArg {
    Session,
    Lease,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LintFormat {
    Human,
    Json,
    Sarif,
    Github,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DialectArg {
    Postgres,
    Mysql,
    Sqlite,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LintPolicyArg {
    /// Log the findings of the steps about to run; run them.
    Warn,
    /// Refuse to start an upgrade with a finding not silenced by `lint-ignore` (exit 20).
    Deny,
    /// Do not lint before running.
    Off,
}

fn parse_parallel(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=256).contains(&n) => Ok(n),
        _ => Err(format!("{s:?}: a number from 1 to 256")),
    }
}

/// `upgrade` over many databases.
#[derive(Debug, Args, Clone)]
pub struct FleetArgs {
    /// Upgrade every database this lists instead of DATABASE_URL: a file (one URL per line,
    /// optionally `NAME URL`; `#` comments) or a directory with one file per database
    /// holding its URL (as a projected Secret volume lays them out; the file names the
    /// database). Passwords are never printed.
    #[arg(long, env = "SCHEMAGATE_DATABASES")]
    pub databases: Option<PathBuf>,
    /// With --databases: how many databases go first, alone, and are verified before the
    /// rest start (a canary that fails stops the fleet).
    #[arg(
        long,
        env = "SCHEMAGATE_CANARY",
        default_value_t = 1,
        requires = "databases"
    )]
    pub canary: usize,
    /// With --databases: at most this many databases migrate at once.
    #[arg(long, env = "SCHEMAGATE_MAX_PARALLEL", default_value_t = 4, value_parser = parse_parallel, requires = "databases")]
    pub max_parallel: usize,
    /// With --databases: after a database fails, `halt` starts no new one (those running
    /// finish); `continue` goes on with the others.
    #[arg(
        long,
        env = "SCHEMAGATE_ON_FAILURE",
        value_enum,
        default_value = "halt",
        requires = "databases"
    )]
    pub on_failure: migrate::fanout::OnFailure,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PhaseArg {
    /// Every pending migration, in version order.
    All,
    /// Expand migrations only; contract migrations are held.
    Expand,
    /// The held contract migrations only.
    Contract,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DestructiveArg {
    /// Refuse data-losing migrations without `allow-destructive <reason>`.
    Deny,
    /// Run them.
    Allow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ChecksumArg {
    Strict,
    Normalized,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NewFormat {
    /// `<version>_<name>.up.sql` + `.down.sql`
    Native,
    /// `V<version>__<name>.sql` + `U<version>__<name>.sql`
    Flyway,
    /// `<version>_<name>.sql` with `-- migrate:up` / `-- migrate:down`
    Dbmate,
    /// `<version>_<name>.sql` (irreversible)
    Sqlx,
}

#[derive(Debug, Subcommand)]
pub enum MigrateCommand {
    /// Apply pending migrations up to TARGET (default: head). Waits for the lock when
    /// another runner is migrating; does nothing (and takes no lock) when up to date.
    Upgrade {
        /// `head`, a version, or `+N` (the next N migrations).
        #[arg(default_value = "head", allow_negative_numbers = true)]
        target: String,
        /// When the database is above TARGET (a version), revert down to it with the down
        /// scripts instead of doing nothing (how an injected runner follows a lowered
        /// `targetVersion` with `downgrade: Allow`). The decision is made against the
        /// database's own history, under the lock, never from a status written earlier.
        #[arg(long, env = "SCHEMAGATE_ALLOW_DOWNGRADE", conflicts_with = "databases")]
        allow_downgrade: bool,
        #[command(flatten)]
        fleet: FleetArgs,
    },
    /// Revert applied migrations with their down scripts, down to TARGET (default: -1).
    /// Refuses to start if any step lacks a down script.
    Downgrade {
        /// `-N` (the last N migrations), a version to end at, or `base` (revert everything).
        #[arg(default_value = "-1", allow_negative_numbers = true)]
        target: String,
    },
    /// Show the database's current version.
    Current,
    /// Show the history table: every applied, reverted, failed, stamped and resolved step.
    History {
        /// Show only the last N entries.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Show the newest migration in the files (no database needed).
    Heads,
    /// Compare the database with the files. Exit code: 0 up to date, 3 pending, 4 drift or
    /// a dirty step. Changes nothing.
    Status,
    /// Create the files of a new migration, named after the directory's existing format.
    New {
        /// What the migration does (becomes the file name).
        #[arg(short, long)]
        message: String,
        /// Version to use [default: next number, or a UTC timestamp YYYYMMDDHHMMSS].
        #[arg(long)]
        version: Option<String>,
        /// File format [default: the format most existing files use, else native].
        #[arg(long, value_enum)]
        format: Option<NewFormat>,
        /// Do not create a down script.
        #[arg(long)]
        no_down: bool,
    },
    /// Print the SQL and history writes an upgrade (or downgrade) to TARGET would run.
    /// Changes nothing.
    Plan {
        /// `head`, `+N`, a version (above current: upgrade; below: downgrade), `-N` or `base`.
        #[arg(default_value = "head", allow_negative_numbers = true)]
        target: String,
    },
    /// Check the checksums of applied migrations against the files. Exit code 4 on drift.
    Verify,
    /// Compare the live schema (tables, columns, indexes, constraints, views) with the one
    /// the migrations left at the current version, recorded after each step, and list each
    /// difference. Exit code: 0 none, 4 drift, 5 nothing recorded to compare with.
    Drift {
        /// Record the live schema as the expected one at the current version (a change
        /// made outside the migrations that is to stay), under the lock.
        #[arg(long)]
        accept: bool,
        /// Why the live schema is accepted (recorded with it).
        #[arg(long, requires = "accept")]
        reason: Option<String>,
    },
    /// Record every migration up to VERSION as applied without running it (adopt a
    /// database whose schema already has them).
    #[command(alias = "baseline")]
    Stamp {
        /// A version from the files, or `head`.
        version: String,
    },
    /// Record your verdict on a step that did not finish (a dirty non-transactional
    /// migration or down script), after inspecting the database. The verdict is about the
    /// version, whichever way the step was going: are its changes in the schema?
    Resolve {
        /// The unfinished step's version.
        version: String,
        /// The schema has all of the step's changes.
        #[arg(
            long,
            conflicts_with = "reverted",
            required_unless_present = "reverted"
        )]
        applied: bool,
        /// The schema has none of the step's changes (you undid them).
        #[arg(long)]
        reverted: bool,
        /// Why (recorded in the history).
        #[arg(short, long)]
        message: Option<String>,
    },
    /// Run another tool's migration command (e.g. `flask db upgrade`, `flyway migrate`)
    /// under schemagate's database lock, so concurrent runners never run it at once; reads
    /// the --tool's version before and after, and writes the summary.
    Exec {
        /// How often to check, while the command runs, that the lock is still held (a
        /// round trip on the locking session, or the lease's last renewal; with a lease at
        /// least every half heartbeat); a lost lock stops the command.
        #[arg(long, env = "SCHEMAGATE_EXEC_CHECK_EVERY", default_value = "5s", value_parser = parse_duration)]
        check_every: Duration,
        /// The command and its arguments (after `--`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true, num_args = 1..)]
        command: Vec<String>,
    },
    /// Record the versions another tool applied (sqlx, golang-migrate, flyway, dbmate, or
    /// alembic for files written by `convert`) in schemagate's history, with the checksums
    /// of the files in --dir, so schemagate can take over without running anything again.
    /// Changes nothing without --apply.
    Import {
        /// The tool whose history to read.
        #[arg(long, value_parser = crate::engine::tools::Tool::from_str)]
        from: crate::engine::tools::Tool,
        /// Write the history rows (default: only show what would be recorded).
        #[arg(long)]
        apply: bool,
    },
    /// Write another tool's migrations as schemagate's own SQL files, one migration per
    /// revision (Alembic, also for Flask-Migrate). Runs `COMMAND history --verbose`, then per
    /// revision R (after P, or `base`) `COMMAND upgrade P:R --sql` and `COMMAND downgrade
    /// R:P --sql`: Alembic's offline mode, which connects to no database. Leaves out
    /// Alembic's bookkeeping (its version table, BEGIN/COMMIT) and writes
    /// `<n>_<message>.up.sql` and `.down.sql` into --dir, numbered in chain order from 1,
    /// each with a header naming its revision. Refuses unmerged heads, and never overwrites
    /// a file without --force. The command inherits the environment: Alembic reads
    /// DATABASE_URL as usual, and its database decides the SQL dialect. Exit 10 when
    /// Alembic could not print a revision (its file is left to write by hand).
    Convert {
        /// The tool whose migrations to convert: `alembic` (or `flask-migrate`).
        #[arg(long, value_parser = crate::engine::tools::Tool::from_str)]
        from: crate::engine::tools::Tool,
        /// Replace files of the same name that an earlier conversion wrote.
        #[arg(long)]
        force: bool,
        /// The SQL dialect of Alembic's output [default: the database URL's].
        #[arg(long, value_enum)]
        dialect: Option<DialectArg>,
        /// The name of Alembic's version table, if env.py sets `version_table`.
        #[arg(long, default_value = crate::engine::alembic::VERSION_TABLE)]
        version_table: String,
        /// The Alembic command as you run it, after `--`: `flask db`, `alembic`, `alembic -c
        /// alembic.ini`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true, num_args = 1..)]
        command: Vec<String>,
    },
    /// Find statements that are correct but risky on a live database (locks on busy
    /// tables, table rewrites, renames and drops that break the running app), with the
    /// file, line, risk and safe alternative of each. Without a database URL (or with
    /// --all) every migration in --dir; with one, those not applied yet. Exit 20 when a
    /// finding is not silenced by `-- schemagate:lint-ignore <rule> <reason>`.
    Lint {
        /// Output: human, json, sarif (SARIF 2.1.0, for code scanning), or github (GitHub
        /// Actions annotations) [default: --output].
        #[arg(long, value_enum)]
        format: Option<LintFormat>,
        /// Lint every migration in --dir, applied or not.
        #[arg(long)]
        all: bool,
        /// The SQL dialect, when no database URL says it.
        #[arg(long, value_enum, default_value = "postgres")]
        dialect: DialectArg,
    },
    /// Block until the database reaches a version (for init containers in Job mode).
    Wait {
        /// Version to wait for [default: the newest migration in --dir].
        #[arg(long = "version", env = "SCHEMAGATE_WAIT_VERSION")]
        target: Option<String>,
        /// Give up after this long (0 = wait forever).
        #[arg(long, default_value = "10m", value_parser = parse_duration)]
        timeout: Duration,
        /// Require exactly this version, not this version or a later one.
        #[arg(long)]
        exact: bool,
    },
}

/// Parses `500ms`, `30s`, `5m`, `1h`, or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    crate::model::clock::parse_duration(s)
}

/// Parses arguments, sets up logging and runs the command; returns the exit code.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() {
                exit::Exit::Usage.code()
            } else {
                0
            };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    telemetry::init(&cli.log_level, cli.log_format);
    if let Command::Controller(args) = cli.command {
        return run_controller(args);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::Exit::Internal.code());
        }
    };
    let code = runtime.block_on(async move {
        match cli.command {
            Command::Migrate(args) => migrate::run(args).await,
            Command::Crd => {
                print!("{}", crate::api::crd_yaml());
                exit::Exit::Ok
            }
            Command::Controller(_) => exit::Exit::Internal,
            Command::Status(args) => status::run(args).await,
            Command::Install { path } => install(&path),
        }
    });
    ExitCode::from(code.code())
}

/// Copies the running executable to `path`, executable by everyone.
fn install(path: &std::path::Path) -> exit::Exit {
    use std::os::unix::fs::PermissionsExt;
    let copy = || -> std::io::Result<()> {
        let me = std::env::current_exe()?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::copy(&me, path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
    };
    match copy() {
        Ok(()) => {
            tracing::info!(path = %path.display(), "installed schemagate");
            exit::Exit::Ok
        }
        Err(e) => {
            eprintln!(
                "error: cannot install schemagate at {}: {e}\nhint: the directory must be writable (an emptyDir volume)",
                path.display()
            );
            exit::Exit::Internal
        }
    }
}

/// The controller runs on a multi-threaded runtime (the CLI needs only one thread).
fn run_controller(args: crate::operator::ControllerArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::Exit::Internal.code());
        }
    };
    match runtime.block_on(crate::operator::run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %crate::engine::redact::redact(&e.to_string()), "controller stopped");
            ExitCode::from(exit::Exit::Internal.code())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1.5h").unwrap(), Duration::from_secs(5400));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn negative_targets_are_values_not_flags() {
        let cli = Cli::try_parse_from(["schemagate", "migrate", "downgrade", "-2"]).unwrap();
        let Command::Migrate(m) = cli.command else {
            panic!("not migrate")
        };
        assert!(
            matches!(m.command, MigrateCommand::Downgrade { ref target, .. } if target == "-2")
        );
    }
}
