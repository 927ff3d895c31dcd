//! The `migrate` commands: each turns its arguments into engine calls and one report.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;
use tokio::signal::unix::SignalKind;

use super::stop::{recv, stop_signal};

pub mod fanout;

use super::output::{self, Outcome};
use super::{ChecksumArg, Common, LockArg, MigrateArgs, MigrateCommand, NewFormat};
use crate::engine::alembic;
use crate::engine::approval;
use crate::engine::dialect::{self, Backend, LockHolder, StepTimeouts, sql};
use crate::engine::lock::{self, LockMode};
use crate::engine::plan::{self, Plan};
use crate::engine::runner::{self, Mode, Verdict};
use crate::engine::schema;
use crate::engine::sent;
use crate::engine::source::{self, Format, SourceError};
use crate::engine::status;
use crate::engine::tools::{self, Tool};
use crate::engine::{
    ChecksumMode, ConnectConfig, Db, HistoryTable, MigrationSet, PlanOptions, RunSettings, Target,
    Version, clock, redact,
};
use crate::runner::exit::{CliError, Exit};

/// Runs one `migrate` command and prints its result; returns the exit code.
pub async fn run(args: MigrateArgs) -> Exit {
    let format = args.common.output;
    let summary_file = args.common.summary_file.clone();
    let command_name = command_name(&args.command);
    let started = Instant::now();
    let stopper = super::stop::listen();
    let result = match Ctx::new(args.common) {
        Ok(ctx) => tokio::select! {
            result = dispatch(&ctx, args.command) => result,
            () = stopper.now() => Err(stopped_at_once(&stopper)),
        },
        Err(e) => Err(e),
    };
    if let Some(path) = summary_file
        && matches!(
            command_name,
            "upgrade" | "downgrade" | "wait" | "stamp" | "exec" | "import"
        )
    {
        let line = output::summary_line(command_name, &result, started.elapsed());
        if let Err(e) = write_summary(&path, &line) {
            tracing::warn!(path = %path.display(), error = %e, "could not write the run summary");
        }
    }
    match result {
        Ok(outcome) => {
            output::print_outcome(format, &outcome);
            outcome.exit
        }
        Err(e) => {
            output::print_error(format, &e);
            e.exit
        }
    }
}

/// The command was dropped mid-way: its connections closed, so the server rolled back
/// what was not committed and released the session lock.
fn stopped_at_once(stopper: &super::stop::Stopper) -> CliError {
    let during_steps = stopper.cut_a_run();
    let done = stopper.request.done();
    let mut message = format!("stopped at once on request ({})", stopper.signal());
    if !done.is_empty() {
        message.push_str(&format!(
            "; {} step(s) of this run completed ({})",
            done.len(),
            done.join(", ")
        ));
    }
    if during_steps {
        message.push_str(
            "; the server rolls the running step back once it notices the closed connection \
             (a step outside a transaction stays recorded as unfinished)",
        );
    }
    let completed: Vec<_> = done.iter().map(|v| json!({ "version": v })).collect();
    CliError::new(Exit::Stopped, "stopped", message)
        .hint(if during_steps || !done.is_empty() {
            "`schemagate migrate status` shows where the database stands; run again to go on"
        } else {
            "nothing was changed; run again to go on"
        })
        .details(json!({ "completedSteps": completed }))
}

fn command_name(c: &MigrateCommand) -> &'static str {
    match c {
        MigrateCommand::Upgrade { .. } => "upgrade",
        MigrateCommand::Downgrade { .. } => "downgrade",
        MigrateCommand::Current => "current",
        MigrateCommand::History { .. } => "history",
        MigrateCommand::Heads => "heads",
        MigrateCommand::Status => "status",
        MigrateCommand::New { .. } => "new",
        MigrateCommand::Plan { .. } => "plan",
        MigrateCommand::Verify => "verify",
        MigrateCommand::Drift { .. } => "drift",
        MigrateCommand::Stamp { .. } => "stamp",
        MigrateCommand::Resolve { .. } => "resolve",
        MigrateCommand::Wait { .. } => "wait",
        MigrateCommand::Lint { .. } => "lint",
        MigrateCommand::Exec { .. } => "exec",
        MigrateCommand::Import { .. } => "import",
        MigrateCommand::Convert { .. } => "convert",
    }
}

fn write_summary(path: &Path, line: &str) -> std::io::Result<()> {
    std::fs::write(path, format!("{line}\n"))
}

/// Everything a command needs besides its own arguments.
struct Ctx {
    common: Common,
    /// The URL for the driver (schemagate's own parameters removed).
    url: Option<String>,
    shown_url: String,
    table: HistoryTable,
    runner_id: String,
    lease: bool,
}

/// `$POD_NAME` (set by the Downward API in schemagate's pods) or the host name.
fn host_identity() -> String {
    std::env::var("POD_NAME")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .or_else(|| std::env::var("HOSTNAME").ok())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown-host".into())
}

impl Ctx {
    fn new(common: Common) -> Result<Self, CliError> {
        let raw = common.database_url.clone().filter(|u| !u.trim().is_empty());
        // Mask (and register) the secrets before anything else can print the URL.
        let shown_url = raw.as_deref().map(redact::redact_url).unwrap_or_default();
        let (url, lock_param) = match raw {
            Some(u) => {
                let (u, lock) = dialect::split_url_params(&u);
                // The forms SQLAlchemy, Django, Rails, sqlx and JDBC write, relative SQLite
                // paths resolved against the working directory.
                let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
                let u = dialect::url::normalize(&u, &cwd).map_err(CliError::from)?;
                (Some(u), lock)
            }
            None => (None, None),
        };
        let lease = match lock_param.as_deref() {
            None => common.lock == LockArg::Lease,
            Some("lease") => true,
            Some("session") => false,
            Some(other) => {
                return Err(CliError::new(
                    Exit::Usage,
                    "usage",
                    format!(
                        "{}={other} in the database URL: use session or lease",
                        dialect::LOCK_URL_PARAM
                    ),
                ));
            }
        };
        let table = HistoryTable::parse(&common.history_table)
            .map_err(|m| CliError::new(Exit::Usage, "usage", m))?;
        let runner_id = common
            .runner_id
            .clone()
            .unwrap_or_else(|| format!("{}/{}", host_identity(), std::process::id()));
        Ok(Ctx {
            common,
            url,
            shown_url,
            table,
            runner_id,
            lease,
        })
    }

    fn connect_config(&self) -> Result<ConnectConfig, CliError> {
        let Some(url) = self.url.clone() else {
            return Err(CliError::new(Exit::Connect, "connection_failed", "no database URL given")
                .hint("pass --database-url or set DATABASE_URL, e.g. sqlite:dev.db or postgres://user:password@localhost:5432/app"));
        };
        Ok(ConnectConfig {
            url,
            ..self.base_connect_config()
        })
    }

    /// Everything of a connection but its URL.
    fn base_connect_config(&self) -> ConnectConfig {
        let name = format!("schemagate {}", self.runner_id);
        ConnectConfig {
            url: String::new(),
            table: self.table.clone(),
            connect_timeout: self.common.connect_timeout,
            busy_timeout: self.common.lock_timeout,
            application_name: runner::prefix(&name, 63).to_string(),
        }
    }

    /// The SQLite file the URL names, when it does not exist.
    fn missing_sqlite_file(&self) -> Option<PathBuf> {
        self.url
            .as_deref()
            .and_then(dialect::url::sqlite_file)
            .filter(|p| !p.exists())
    }

    async fn connect(&self) -> Result<Db, CliError> {
        let cfg = self.connect_config()?;
        Db::connect(&cfg).await.map_err(|e| {
            let err = CliError::from(e);
            CliError {
                message: format!("{} ({})", err.message, self.shown_url),
                ..err
            }
        })
    }

    /// Loads the migrations while the connection is being made, on this thread (a second
    /// one would cost more than reading them): the reading steps aside every few files.
    async fn load_and_connect(&self) -> Result<(MigrationSet, Db), CliError> {
        let load = async {
            source::load_dir_async(&self.common.dir)
                .await
                .map_err(CliError::from)
        };
        let (db, set) = tokio::join!(biased; self.connect(), load);
        match (set, db) {
            (Ok(set), Ok(db)) => Ok((set, db)),
            (Err(e), Ok(db)) => {
                db.close().await;
                Err(e)
            }
            // Without a URL that is the first thing to fix, whatever the directory says.
            (Err(e), Err(c)) => Err(if self.url.is_none() { c } else { e }),
            (Ok(_), Err(e)) => Err(e),
        }
    }

    fn load(&self) -> Result<MigrationSet, CliError> {
        Ok(source::load_dir(&self.common.dir)?)
    }

    fn lock_mode(&self) -> Result<LockMode, CliError> {
        self.lock_mode_with(self.lease, || self.connect_config())
    }

    /// The lock mode, the lease's connection made with `connect`.
    fn lock_mode_with(
        &self,
        lease: bool,
        connect: impl FnOnce() -> Result<ConnectConfig, CliError>,
    ) -> Result<LockMode, CliError> {
        if !lease {
            return Ok(LockMode::Session);
        }
        let heartbeat = self
            .common
            .lease_heartbeat
            .max(std::time::Duration::from_millis(100));
        let ttl = self.common.lease_ttl.unwrap_or(heartbeat * 3);
        if ttl < heartbeat * 2 {
            return Err(CliError::new(
                Exit::Usage,
                "usage",
                format!(
                    "--lease-ttl ({}ms) must be at least twice --lease-heartbeat ({}ms), or a \
                     single late renewal would let another runner take the lease over",
                    ttl.as_millis(),
                    heartbeat.as_millis()
                ),
            ));
        }
        Ok(LockMode::Lease {
            heartbeat,
            ttl,
            connect: Box::new(connect()?),
        })
    }

    /// One database of a fleet (`upgrade --databases`): its URL as the driver takes it.
    fn connect_config_for(&self, raw: &str) -> Result<ConnectConfig, CliError> {
        let (url, _) = dialect::split_url_params(raw);
        let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
        let url = dialect::url::normalize(&url, &cwd).map_err(CliError::from)?;
        Ok(ConnectConfig {
            url,
            ..self.base_connect_config()
        })
    }

    /// The settings of a run on the database `cfg` connects to (its own lease, if any).
    fn settings_for(&self, cfg: &ConnectConfig) -> Result<RunSettings, CliError> {
        Ok(RunSettings {
            lock: self.lock_mode_with(self.lease, || Ok(cfg.clone()))?,
            ..self.settings_with(LockMode::Session)?
        })
    }

    fn settings(&self) -> Result<RunSettings, CliError> {
        self.settings_with(self.lock_mode()?)
    }

    fn settings_with(&self, lock: LockMode) -> Result<RunSettings, CliError> {
        Ok(RunSettings {
            runner_id: self.runner_id.clone(),
            lock_timeout: self.common.lock_timeout,
            lock,
            timeouts: StepTimeouts {
                lock: Some(self.common.migration_lock_timeout),
                statement: self.common.migration_statement_timeout,
            },
            deny_destructive: self.common.destructive == super::DestructiveArg::Deny,
            lint: match self.common.lint {
                super::LintPolicyArg::Warn => crate::engine::runner::LintPolicy::Warn,
                super::LintPolicyArg::Deny => crate::engine::runner::LintPolicy::Deny,
                super::LintPolicyArg::Off => crate::engine::runner::LintPolicy::Off,
            },
            approval: crate::engine::approval::ApprovalPolicy {
                required: self.common.require_approval.clone(),
                approved: self.common.approve.clone(),
            },
            fingerprints: self.common.schema_fingerprints == super::OnOff::On,
            lock_retry: crate::engine::lockwait::LockRetry {
                budget: self.common.lock_retry_budget,
                ..Default::default()
            },
            plan: PlanOptions {
                out_of_order: self.common.out_of_order,
                ignore_missing: self.common.ignore_missing,
                checksum: self.checksum_mode(),
                phase: match self.common.phase {
                    super::PhaseArg::All => plan::PhaseFilter::All,
                    super::PhaseArg::Expand => plan::PhaseFilter::Expand,
                    super::PhaseArg::Contract => plan::PhaseFilter::Contract,
                },
            },
            stop: super::stop::current().map(|s| s.request.clone()),
        })
    }

    fn checksum_mode(&self) -> ChecksumMode {
        match self.common.checksum {
            ChecksumArg::Strict => ChecksumMode::Strict,
            ChecksumArg::Normalized => ChecksumMode::Normalized,
        }
    }
}

fn parse_target(s: &str) -> Result<Target, CliError> {
    s.parse::<Target>().map_err(|e| {
        CliError::new(Exit::Usage, "usage", format!("invalid target: {e}"))
            .hint("use head, base, a version such as 20251101 or 1.2, +N or -N")
    })
}

fn to_json(v: &impl Serialize) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

async fn dispatch(ctx: &Ctx, command: MigrateCommand) -> Result<Outcome, CliError> {
    match command {
        MigrateCommand::Upgrade {
            target,
            allow_downgrade: _,
            fleet:
                super::FleetArgs {
                    databases: Some(path),
                    canary,
                    max_parallel,
                    on_failure,
                },
        } => {
            let rollout = fanout::Rollout {
                canary,
                max_parallel,
                on_failure,
            };
            fanout::upgrade(ctx, &path, parse_target(&target)?, rollout).await
        }
        MigrateCommand::Upgrade {
            target,
            allow_downgrade,
            ..
        } => {
            let target = parse_target(&target)?;
            let outcome = migrate(ctx, Mode::Upgrade(target.clone())).await?;
            // The upgrade read the version under the lock and found the database above a
            // version target: revert to it (the downgrade plans again under the lock).
            let ahead = outcome.json.get("ahead").and_then(|a| a.as_bool()) == Some(true);
            if allow_downgrade && ahead && matches!(target, Target::Version(_)) {
                return migrate(ctx, Mode::Downgrade(target)).await;
            }
            Ok(outcome)
        }
        MigrateCommand::Downgrade { target } => {
            migrate(ctx, Mode::Downgrade(parse_target(&target)?)).await
        }
        MigrateCommand::Current | MigrateCommand::Status | MigrateCommand::History { .. }
            if ctx.common.tool != Tool::Native =>
        {
            tool_state(ctx, &command).await
        }
        MigrateCommand::Current => current(ctx).await,
        MigrateCommand::History { limit } => history(ctx, limit).await,
        MigrateCommand::Heads => heads(ctx),
        MigrateCommand::Status => status_cmd(ctx).await,
        MigrateCommand::Exec {
            command,
            check_every,
        } => exec(ctx, &command, check_every).await,
        MigrateCommand::Import { from, apply } => import(ctx, from, apply).await,
        MigrateCommand::Convert {
            from,
            force,
            dialect,
            version_table,
            command,
        } => convert(ctx, from, force, dialect, &version_table, &command).await,
        MigrateCommand::New {
            message,
            version,
            format,
            no_down,
        } => new(ctx, &message, version.as_deref(), format, no_down),
        MigrateCommand::Plan { target } => plan_cmd(ctx, &target).await,
        MigrateCommand::Lint {
            format,
            all,
            dialect,
        } => lint_cmd(ctx, format, all, dialect).await,
        MigrateCommand::Verify => verify(ctx).await,
        MigrateCommand::Drift { accept, reason } => drift_cmd(ctx, accept, reason).await,
        MigrateCommand::Stamp { version } => stamp(ctx, &version).await,
        MigrateCommand::Resolve {
            version,
            applied,
            reverted: _,
            message,
        } => resolve(ctx, &version, applied, message).await,
        MigrateCommand::Wait {
            target,
            timeout,
            exact,
        } => wait(ctx, target.as_deref(), timeout, exact).await,
    }
}

async fn migrate(ctx: &Ctx, mode: Mode) -> Result<Outcome, CliError> {
    let (set, mut db) = ctx.load_and_connect().await?;
    let result = runner::run(&mut db, &set, &mode, &ctx.settings()?).await;
    // The run is over (the lock released): its result is reported, not cut short.
    let stopper = super::stop::current();
    let _shield = stopper.as_deref().map(super::stop::Stopper::shield);
    db.close().await;
    let report = result.map_err(run_error)?;
    Ok(Outcome::ok(to_json(&report), output::human_run(&report)))
}

/// The CLI form of a run's error, with the engine's own advice where it has one.
fn run_error(e: crate::engine::RunError) -> CliError {
    let hint = e.hint();
    let err = CliError::from(e);
    match hint {
        Some(h) => err.hint(h),
        None => err,
    }
}

/// `current`, `status` and `history` of another tool's table.
async fn tool_state(ctx: &Ctx, command: &MigrateCommand) -> Result<Outcome, CliError> {
    let tool = ctx.common.tool;
    let mut db = ctx.connect().await?;
    let state = tools::read(&mut db, tool).await;
    db.close().await;
    let state = state.map_err(|e| tool_read_error(tool, e))?;
    let mut human = match (&state.current, state.initialized) {
        (_, false) => format!(
            "{tool}: no {} table: the database was never migrated by {tool}\n",
            tool.table()
        ),
        (None, true) => format!("{tool}: no version applied yet\n"),
        (Some(v), true) => format!("{tool}: current version {v}\n"),
    };
    if let MigrateCommand::History { limit } = command {
        let skip = state
            .applied
            .len()
            .saturating_sub(limit.unwrap_or(usize::MAX));
        for r in &state.applied[skip..] {
            human.push_str(&format!(
                "  {:<24} {:<8} {} {}\n",
                r.version,
                if r.success { "applied" } else { "FAILED" },
                r.applied_at.as_deref().unwrap_or(""),
                r.description.as_deref().unwrap_or("")
            ));
        }
    }
    if let Some(p) = &state.problem {
        human.push_str(&format!("problem: {p}\n"));
    }
    let exit = match command {
        MigrateCommand::Status if state.problem.is_some() => Exit::Drift,
        _ => Exit::Ok,
    };
    let mut json = to_json(&state);
    json["tool"] = json!(tool.name());
    Ok(Outcome { exit, json, human })
}

/// A failed read of a tool's table: the server refusing the query means the table is
/// not the one that tool creates (another tool's, or a different version).
fn tool_read_error(tool: Tool, e: crate::engine::DbError) -> CliError {
    if e.kind == crate::engine::DbErrorKind::Statement {
        return CliError::new(Exit::Refused, "wrong_tool", e.message).hint(format!(
            "is --tool {tool} right for this database? golang-migrate and dbmate both use \
             schema_migrations, with different columns"
        ));
    }
    CliError::from(crate::engine::RunError::Db {
        during: "reading the tool's history",
        source: e,
    })
}

/// Runs another tool's command under the lock, reading its version around it.
async fn exec(ctx: &Ctx, command: &[String], check_every: Duration) -> Result<Outcome, CliError> {
    let tool = ctx.common.tool;
    let settings = ctx.settings()?;
    let mut db = ctx.connect().await?;
    // Resolves the history table (and the lease table) on this connection; creates nothing.
    runner::read_state(&mut db).await.map_err(CliError::from)?;
    let held = match lock::acquire(
        &mut db,
        &settings.lock,
        &settings.runner_id,
        settings.lock_timeout,
    )
    .await
    {
        Ok(h) => h,
        Err(e) => {
            db.close().await;
            return Err(crate::engine::RunError::from(e).into());
        }
    };
    let result = exec_locked(&mut db, &held, tool, command, check_every).await;
    lock::release(&mut db, held).await;
    db.close().await;
    result
}

/// Copies a child's output lines to standard error, scrubbed of secrets (standard output
/// stays schemagate's own, so `--output json` stays parseable).
fn pump<R>(from: Option<R>) -> tokio::task::JoinHandle<()>
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        use tokio::io::AsyncBufReadExt;
        let Some(from) = from else { return };
        let mut lines = tokio::io::BufReader::new(from).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("{}", crate::engine::redact::redact(&line));
        }
    })
}

/// The process group `exec` runs its command in (the command's pid is its id). Dropped
/// before `finish` (an early return, a cancelled future), it kills the whole group.
struct ProcessGroup(Option<u32>);

impl ProcessGroup {
    /// Sends `signal` to every process in the group; a group already gone is no error.
    fn signal(&self, signal: libc::c_int) {
        let Some(id) = self.0.and_then(|id| libc::pid_t::try_from(id).ok()) else {
            return;
        };
        // SAFETY: kill(2) takes plain integers and touches no memory of ours; a negative
        // pid addresses the process group created for the command (never 0 or -1, which
        // would address our own group or every process).
        if id > 1 {
            unsafe { libc::kill(-id, signal) };
        }
    }

    /// Kills what is left in the group once the command has ended; the group is done.
    fn finish(&mut self) {
        self.signal(libc::SIGKILL);
        self.0 = None;
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        self.signal(libc::SIGKILL);
    }
}

/// The command is killed if schemagate itself dies (even by `kill -9`), so it never runs on
/// without the lock.
fn die_with_parent(command: &mut tokio::process::Command) {
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls (prctl, getppid, _exit).
    let parent = std::process::id();
    unsafe {
        command.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            // The parent may have died before prctl took effect.
            if u32::try_from(libc::getppid()).ok() != Some(parent) {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

/// Whether `exec` may let its command run on: the lease is fresh, or the locking
/// session answers within a bounded time (a dead network must not stall the checks).
async fn lock_still_held(db: &mut crate::engine::Db, held: &lock::Held, every: Duration) -> bool {
    if !held.lease_fresh() {
        return false;
    }
    if held.heartbeat().is_some() {
        return true;
    }
    let patience = every.clamp(Duration::from_secs(1), Duration::from_secs(5));
    matches!(tokio::time::timeout(patience, db.ping()).await, Ok(Ok(())))
}

async fn exec_locked(
    db: &mut crate::engine::Db,
    held: &lock::Held,
    tool: Tool,
    command: &[String],
    check_every: Duration,
) -> Result<Outcome, CliError> {
    let read_err = |e| tool_read_error(tool, e);
    let before = tools::read(db, tool).await.map_err(read_err)?;
    if let Some(p) = &before.problem {
        return Err(crate::engine::RunError::ToolProblem {
            tool: tool.to_string(),
            problem: p.clone(),
        }
        .into());
    }
    let shown = command.join(" ");
    tracing::info!(command = %shown, tool = %tool, from = ?before.current, "running the migration command under the lock");
    let started = std::time::Instant::now();
    // Signals are watched before the command starts, so none is missed; while it runs the
    // global listener leaves them to this loop, which passes them on to the command.
    let (mut term, mut int, mut hup) = (
        stop_signal(SignalKind::terminate()),
        stop_signal(SignalKind::interrupt()),
        stop_signal(SignalKind::hangup()),
    );
    let stopper = super::stop::current();
    let shield = stopper.as_deref().map(super::stop::Stopper::shield);
    let mut spawn = tokio::process::Command::new(&command[0]);
    spawn
        .args(&command[1..])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        // In a process group of its own, so that stopping it stops whatever it started
        // too (`sh -c` wrappers, tools that fork workers).
        .process_group(0)
        .kill_on_drop(true);
    die_with_parent(&mut spawn);
    let mut child = spawn.spawn().map_err(|e| {
        CliError::new(
            Exit::MigrationFailed,
            "command_failed",
            format!("cannot start `{shown}`: {e}"),
        )
        .hint("check that the command exists in this image and is on PATH")
    })?;
    // From here on, every way out of this function stops the whole group.
    let mut group = ProcessGroup(child.id());
    let output = [pump(child.stdout.take()), pump(child.stderr.take())];
    // The lock must hold for as long as the command runs: the session lock lives on this
    // connection (kept busy, so no idle timeout ends it), the lease in its heartbeat.
    let every = held
        .heartbeat()
        .map_or(check_every, |hb| check_every.min(hb / 2))
        .max(Duration::from_millis(10));
    let mut check = tokio::time::interval(every);
    check.tick().await;
    let mut stopping: Option<&'static str> = None;
    let status = loop {
        let asked = tokio::select! {
            status = child.wait() => break status,
            _ = recv(&mut term) => (libc::SIGTERM, "SIGTERM"),
            _ = recv(&mut int) => (libc::SIGINT, "SIGINT"),
            _ = recv(&mut hup) => (libc::SIGHUP, "SIGHUP"),
            _ = check.tick() => {
                if lock_still_held(db, held, every).await {
                    tracing::debug!(command = %shown, "the migration lock is still held");
                    continue;
                }
                group.finish();
                let _ = child.wait().await;
                return Err(CliError::new(
                    Exit::LockUnusable,
                    "lock_unusable",
                    format!("lost the migration lock while `{shown}` ran; it was stopped so that two runners never run it at once"),
                )
                .hint("run again: the tool's own history says how far it got"));
            }
        };
        if stopping.is_some() {
            // Asked again: the command had its chance to stop cleanly.
            tracing::warn!(signal = asked.1, "asked to stop again: killing the command");
            group.signal(libc::SIGKILL);
        } else {
            tracing::warn!(
                signal = asked.1,
                "asked to stop: passing it on to the command and waiting for it to end (ask \
                 again to kill it)"
            );
            group.signal(asked.0);
        }
        stopping = Some(asked.1);
    }
    .map_err(|e| {
        CliError::new(
            Exit::Internal,
            "command_failed",
            format!("cannot wait for `{shown}`: {e}"),
        )
    })?;
    // Whatever the command left running in its group (background jobs) ends with it: nothing
    // it started may outlive the lock, nor hold its output open.
    group.finish();
    drop(shield);
    // A process that left the group may still hold the output open: not for long.
    for o in output {
        let abort = o.abort_handle();
        if tokio::time::timeout(Duration::from_secs(5), o)
            .await
            .is_err()
        {
            abort.abort();
        }
    }
    let after = tools::read(db, tool).await.map_err(read_err)?;
    let changed = before.current != after.current;
    let json = json!({
        "tool": tool.name(),
        "command": command,
        "from": before.current,
        "to": after.current,
        "noop": !changed && status.success(),
        "applied": if changed { after.current.iter().cloned().collect::<Vec<_>>() } else { vec![] },
        "durationMs": started.elapsed().as_millis() as u64,
    });
    if !status.success() {
        let how = match status.code() {
            Some(c) => format!("exited with status {c}"),
            None => "was killed by a signal".into(),
        };
        let mut message = format!("`{shown}` {how}");
        if let Some(signal) = stopping {
            message.push_str(&format!(
                " after schemagate was asked to stop ({signal}, passed on)"
            ));
        }
        if let Some(p) = &after.problem {
            message.push_str(&format!("; {p}"));
        }
        let error = match stopping {
            Some(_) => CliError::new(Exit::Stopped, "stopped", message)
                .hint("run again: the tool's own history says how far it got"),
            None => CliError::new(Exit::MigrationFailed, "command_failed", message).hint(
                "its output above says why; the lock was released, so the next runner tries again",
            ),
        };
        return Err(error.details(json));
    }
    let human = match (&before.current, &after.current, changed) {
        (_, to, false) => format!(
            "`{shown}` changed nothing: {tool} is at {}\n",
            to.as_deref().unwrap_or("no version")
        ),
        (from, to, true) => format!(
            "`{shown}` migrated {tool} from {} to {}\n",
            from.as_deref().unwrap_or("nothing"),
            to.as_deref().unwrap_or("no version")
        ),
    };
    Ok(Outcome::ok(json, human))
}

/// Records another tool's applied versions in schemagate's history.
async fn import(ctx: &Ctx, from: Tool, apply: bool) -> Result<Outcome, CliError> {
    if from == Tool::Native {
        return Err(CliError::new(
            Exit::Usage,
            "usage",
            "--from must name another tool (sqlx, golang-migrate, flyway, dbmate, alembic)",
        ));
    }
    let (set, mut db) = ctx.load_and_connect().await?;
    let result = async {
        let state = tools::read(&mut db, from)
            .await
            .map_err(|e| tool_read_error(from, e))?;
        if let Some(p) = &state.problem {
            return Err(CliError::from(crate::engine::RunError::ToolProblem {
                tool: from.to_string(),
                problem: p.clone(),
            }));
        }
        let mut versions = Vec::new();
        let mut missing = Vec::new();
        if from == Tool::Alembic {
            let versions = alembic_applied(&set, &state, &ctx.common.dir, db.dialect())?;
            return runner::import(
                &mut db,
                &set,
                from.name(),
                &versions,
                apply,
                &ctx.settings()?,
            )
            .await
            .map_err(CliError::from);
        }
        // golang-migrate records only its current version: it applies in order, so every
        // file up to it was applied.
        let rows: Vec<tools::ToolRow> = if from == Tool::GolangMigrate {
            let current = state.current.as_deref().map(Version::parse).transpose();
            match current {
                Ok(Some(cur)) => set
                    .migrations
                    .iter()
                    .filter(|m| m.version <= cur)
                    .map(|m| tools::ToolRow {
                        version: m.version.to_string(),
                        description: None,
                        applied_at: None,
                        success: true,
                    })
                    .chain(set.get(&cur).is_none().then(|| tools::ToolRow {
                        version: cur.to_string(),
                        description: None,
                        applied_at: None,
                        success: true,
                    }))
                    .collect(),
                _ => Vec::new(),
            }
        } else {
            state
                .versions
                .iter()
                .map(|v| tools::ToolRow {
                    version: v.clone(),
                    description: None,
                    applied_at: None,
                    success: true,
                })
                .collect()
        };
        for row in rows.iter().filter(|r| r.success) {
            match Version::parse(&row.version) {
                Ok(v) if set.get(&v).is_some() => versions.push(v),
                _ => missing.push(row.version.clone()),
            }
        }
        if !missing.is_empty() {
            return Err(crate::engine::RunError::ImportWithoutFiles {
                tool: from.to_string(),
                versions: missing,
            }
            .into());
        }
        runner::import(
            &mut db,
            &set,
            from.name(),
            &versions,
            apply,
            &ctx.settings()?,
        )
        .await
        .map_err(CliError::from)
    }
    .await;
    db.close().await;
    let report = result?;
    let human = match (report.versions.is_empty(), report.applied) {
        (true, _) => format!("{from} records no applied version: nothing to import\n"),
        (false, false) => format!(
            "Would record as applied (from {from}): {}\nNothing was written: run again with --apply.\n",
            report.versions.join(", ")
        ),
        (false, true) => format!(
            "Recorded as applied (from {from}, nothing was run): {}; current version: {}\n",
            report.versions.join(", "),
            report.current.as_deref().unwrap_or("none")
        ),
    };
    let mut json = to_json(&report);
    json["noop"] = json!(!report.applied);
    json["stamped"] = json!(if report.applied {
        report.versions.clone()
    } else {
        vec![]
    });
    Ok(Outcome::ok(json, human))
}

/// A reading command on a SQLite file that does not exist: it says so, naming the file it
/// looked for (never "connected"), and creates nothing.
fn missing_file_outcome(path: &Path, mut json: serde_json::Value) -> Outcome {
    if let Some(obj) = json.as_object_mut() {
        obj.insert(
            "databaseFile".into(),
            json!({ "path": path.display().to_string(), "exists": false }),
        );
    }
    let cwd = std::env::current_dir()
        .map(|d| d.display().to_string())
        .unwrap_or_default();
    Outcome::ok(
        json,
        format!(
            "The SQLite database {} does not exist yet; `schemagate migrate upgrade` creates it \
             (a relative path in the URL is relative to the working directory, {cwd}).\n",
            path.display()
        ),
    )
}

/// The versions of the files `convert` wrote for the revisions a database Alembic migrated
/// has applied: its revision's file and those of all its ancestors (the files' headers name
/// their revisions and down revisions).
fn alembic_applied(
    set: &MigrationSet,
    state: &tools::ToolState,
    dir: &Path,
    dialect: crate::engine::script::Dialect,
) -> Result<Vec<Version>, CliError> {
    // More than one head is a problem the caller refused already.
    let Some(head) = state.heads.first() else {
        return Ok(Vec::new());
    };
    let files: Vec<(Version, alembic::Origin)> = set
        .migrations
        .iter()
        .filter_map(|m| alembic::origin(&m.up.sql).map(|o| (m.version.clone(), o)))
        .collect();
    let versions = alembic::applied_versions(&files, head).map_err(|e| {
        CliError::new(Exit::Refused, "refused", e.to_string()).hint(format!(
            "convert the Alembic revisions first (`schemagate migrate --dir {} convert --from \
             alembic -- flask db`: each file's header names its revision), or record a version \
             by hand with `schemagate migrate stamp <version>`",
            dir.display()
        ))
    })?;
    // A file Alembic could not print holds no SQL yet: recording its checksum now would make
    // the finished file drift.
    let unwritten: Vec<&str> = versions
        .iter()
        .filter_map(|v| set.get(v))
        .filter(|m| {
            m.up.directives.empty.is_none()
                && crate::engine::script::split(&m.up.sql, dialect).is_empty()
        })
        .map(|m| m.up.file.as_str())
        .collect();
    if !unwritten.is_empty() {
        return Err(CliError::new(
            Exit::Refused,
            "refused",
            format!(
                "{} hold(s) no SQL yet (Alembic could not print it)",
                unwritten.join(", ")
            ),
        )
        .hint("write the SQL into the file first: import records each file's checksum"));
    }
    Ok(versions)
}

/// `convert`: another tool's migrations as schemagate's files.
async fn convert(
    ctx: &Ctx,
    from: Tool,
    force: bool,
    dialect: Option<super::DialectArg>,
    version_table: &str,
    command: &[String],
) -> Result<Outcome, CliError> {
    if from != Tool::Alembic {
        return Err(CliError::new(
            Exit::Usage,
            "usage",
            format!("convert reads Alembic (and Flask-Migrate) projects, not {from}"),
        )
        .hint(
            "sqlx, golang-migrate, flyway and dbmate files need no conversion: --dir reads them \
             as they are, and `import --from <tool>` adopts their databases",
        ));
    }
    let dialect = match (dialect, ctx.url.as_deref()) {
        (Some(d), _) => super::lint::dialect_of(d),
        (None, Some(url)) => dialect::dialect_of(url)?,
        (None, None) => {
            return Err(CliError::new(
                Exit::Usage,
                "usage",
                "convert needs the database's SQL dialect: Alembic prints different SQL for \
                 each database",
            )
            .hint(
                "set DATABASE_URL as the app has it (Alembic reads it too), or pass --dialect \
                 postgres|mysql|sqlite",
            ));
        }
    };
    super::convert::alembic(super::convert::Request {
        dir: &ctx.common.dir,
        dialect,
        command,
        database_url: ctx.common.database_url.as_deref(),
        force,
        version_table,
    })
    .await
}

async fn current(ctx: &Ctx) -> Result<Outcome, CliError> {
    if let Some(path) = ctx.missing_sqlite_file() {
        return Ok(missing_file_outcome(
            &path,
            json!({ "current": null, "initialized": false }),
        ));
    }
    let mut db = ctx.connect().await?;
    let state = runner::read_state(&mut db).await;
    db.close().await;
    let state = state?;
    let current = state.current().map(|v| {
        let a = &state.applied[v];
        (a.version.clone(), a.description.clone())
    });
    let json = json!({
        "current": current.as_ref().map(|c| &c.0),
        "description": current.as_ref().map(|c| &c.1),
        "initialized": state.initialized,
        "unfinished": state.unfinished,
    });
    Ok(Outcome::ok(json, output::human_current(&state)))
}

async fn history(ctx: &Ctx, limit: Option<usize>) -> Result<Outcome, CliError> {
    if let Some(path) = ctx.missing_sqlite_file() {
        return Ok(missing_file_outcome(
            &path,
            json!({ "initialized": false, "entries": [] }),
        ));
    }
    let mut db = ctx.connect().await?;
    let rows = db.read_history().await;
    db.close().await;
    let rows = rows.map_err(|e| {
        CliError::from(crate::engine::RunError::Db {
            during: "reading the history table",
            source: e,
        })
    })?;
    let initialized = rows.is_some();
    let mut rows = rows.unwrap_or_default();
    if let Some(n) = limit {
        let skip = rows.len().saturating_sub(n);
        rows.drain(..skip);
    }
    let human = output::human_history(&rows, initialized);
    Ok(Outcome::ok(
        json!({ "initialized": initialized, "entries": rows }),
        human,
    ))
}

fn heads(ctx: &Ctx) -> Result<Outcome, CliError> {
    let set = ctx.load()?;
    let heads: Vec<serde_json::Value> = set
        .head()
        .map(|m| json!({ "version": m.version.to_string(), "description": m.description, "file": m.up.file }))
        .into_iter()
        .collect();
    let human = match set.head() {
        Some(m) => format!("{} {} ({}) (head)\n", m.version, m.description, m.up.file),
        None => "no migrations\n".into(),
    };
    Ok(Outcome::ok(json!({ "heads": heads }), human))
}

async fn status_cmd(ctx: &Ctx) -> Result<Outcome, CliError> {
    let (set, mut db) = ctx.load_and_connect().await?;
    // A SQLite file that does not exist is said so (never "connected"), naming the path.
    let missing = ctx.missing_sqlite_file();
    let dialect = db.dialect();
    let state = runner::read_state(&mut db).await;
    let mode = ctx.lock_mode()?;
    let holder: Option<LockHolder> = lock::holder(&mut db, &mode).await;
    // The live schema, separately from the files' checksums (see `drift`).
    let schema_drift = match &state {
        Ok(st) if st.initialized && ctx.common.schema_fingerprints == super::OnOff::On => Some(
            schema::check(&mut db, st)
                .await
                .unwrap_or_else(|e| schema::DriftCheck::Busy {
                    reason: format!("cannot read the schema: {e}"),
                }),
        ),
        _ => None,
    };
    db.close().await;
    let state = state?;
    let report = status::status(
        &set,
        &state,
        &ctx.settings()?.plan,
        ctx.shown_url.clone(),
        dialect,
        holder,
    );
    let exit = match report.verdict {
        status::Verdict::UpToDate => Exit::Ok,
        status::Verdict::Pending => Exit::Pending,
        status::Verdict::Drift | status::Verdict::Dirty => Exit::Drift,
    };
    let mut json = to_json(&report);
    let mut human = output::human_status(&report);
    if let Some(check) = &schema_drift {
        json["schemaDrift"] = to_json(check);
        human.push_str(&format!("live schema: {}\n", check.summary()));
    }
    if let Some(path) = missing {
        if let Some(obj) = json.as_object_mut() {
            obj.insert(
                "databaseFile".into(),
                json!({ "path": path.display().to_string(), "exists": false }),
            );
        }
        let first = human.find('\n').map(|i| i + 1).unwrap_or(0);
        human.replace_range(
            ..first,
            &format!(
                "database: {} (sqlite): the file does not exist yet; `upgrade` creates it \
                 (relative paths in the URL are relative to the working directory)\n",
                path.display()
            ),
        );
    }
    Ok(Outcome { exit, json, human })
}

async fn verify(ctx: &Ctx) -> Result<Outcome, CliError> {
    let (set, mut db) = ctx.load_and_connect().await?;
    let dialect = db.dialect();
    let state = runner::read_state(&mut db).await;
    db.close().await;
    let state = state?;
    let mut drift = plan::drift(&set, &state, ctx.checksum_mode());
    let verified = state.applied.len() - drift.changed.len() - drift.missing.len();
    if ctx.common.ignore_missing {
        drift.missing.clear();
    }
    let empty = plan::empty_scripts(&set, &state, dialect);
    // Drift is about the database and wins; an empty script is a file to fix.
    let exit = if !drift.is_empty() {
        Exit::Drift
    } else if !empty.is_empty() {
        Exit::Source
    } else {
        Exit::Ok
    };
    let human = output::human_verify(verified, &drift, &empty);
    Ok(Outcome {
        exit,
        json: json!({
            "ok": exit == Exit::Ok,
            "verified": verified,
            "drift": drift,
            "emptyScripts": empty,
        }),
        human,
    })
}

async fn stamp(ctx: &Ctx, version: &str) -> Result<Outcome, CliError> {
    let target = parse_target(version)?;
    let (set, mut db) = ctx.load_and_connect().await?;
    let result = runner::stamp(&mut db, &set, &target, &ctx.settings()?).await;
    db.close().await;
    let report = result?;
    let human = if report.stamped.is_empty() {
        format!("Nothing to stamp: every migration up to {version} is already recorded.\n")
    } else {
        format!(
            "Stamped {} as applied (nothing was run); current version: {}\n",
            report.stamped.join(", "),
            report.current.as_deref().unwrap_or("none")
        )
    };
    Ok(Outcome::ok(to_json(&report), human))
}

async fn resolve(
    ctx: &Ctx,
    version: &str,
    applied: bool,
    reason: Option<String>,
) -> Result<Outcome, CliError> {
    let v = Version::parse(version)
        .map_err(|e| CliError::new(Exit::Usage, "usage", format!("invalid version: {e}")))?;
    let verdict = if applied {
        Verdict::Applied
    } else {
        Verdict::Reverted
    };
    let (set, mut db) = ctx.load_and_connect().await?;
    let result = runner::resolve(&mut db, &set, &v, verdict, reason, &ctx.settings()?).await;
    db.close().await;
    let report = result?;
    let human = format!(
        "Recorded {} as {}; current version: {}\n",
        report.version,
        if applied { "applied" } else { "reverted" },
        report.current.as_deref().unwrap_or("none")
    );
    Ok(Outcome::ok(to_json(&report), human))
}

/// The direction a `plan` target implies, given the current version. With --out-of-order a
/// version below the current one means "apply the older pending ones up to it".
fn plan_mode(target: Target, current: Option<&Version>, out_of_order: bool) -> Mode {
    match &target {
        Target::Base => Mode::Downgrade(target),
        Target::Relative(n) if *n < 0 => Mode::Downgrade(target),
        Target::Version(v) if !out_of_order && current.is_some_and(|c| v < c) => {
            Mode::Downgrade(target)
        }
        _ => Mode::Upgrade(target),
    }
}

async fn plan_cmd(ctx: &Ctx, target: &str) -> Result<Outcome, CliError> {
    let target = parse_target(target)?;
    let (set, mut db) = ctx.load_and_connect().await?;
    let result = plan_with(ctx, target, &set, &mut db).await;
    db.close().await;
    result
}

async fn plan_with(
    ctx: &Ctx,
    target: Target,
    set: &MigrationSet,
    db: &mut Db,
) -> Result<Outcome, CliError> {
    let dialect = db.dialect();
    let state = runner::read_state(db).await?;
    let settings = ctx.settings()?;
    let mode = plan_mode(target, state.current(), settings.plan.out_of_order);
    let plan: Plan<'_> = match &mode {
        Mode::Upgrade(t) => plan::plan_upgrade(set, &state, t, &settings.plan),
        Mode::Downgrade(t) => plan::plan_downgrade(set, &state, t, &settings.plan),
    }
    .map_err(|e| CliError::from(crate::engine::RunError::Plan(e)))?;
    let prepared = runner::prepare(&plan, dialect).map_err(run_error)?;
    let destructive = runner::destructive(db, &prepared).await;
    // The lint findings of the steps this plan would run (see `migrate lint`).
    let ups: Vec<_> = prepared
        .iter()
        .filter(|p| p.step.direction == plan::Direction::Up)
        .map(|p| p.step.migration)
        .collect();
    let findings =
        crate::engine::lint::lint(dialect, &ups, crate::engine::lint::NewTables::SameRun);
    let unsilenced: Vec<_> = findings
        .iter()
        .filter(|f| f.ignored.is_none())
        .cloned()
        .collect();
    let approval = approval::judge(
        &settings.approval,
        approval::plan_hash(&plan, &prepared),
        approval::marks(&plan, &destructive, &unsilenced),
    );
    // What `upgrade` would record once approved.
    let note = approval
        .approved
        .then(|| runner::approval_note(&approval))
        .flatten();
    // What the runner would know once it holds the lock: the server's flavour, the
    // resolved history table, the lock's guard. A lease's token is random per run, and the
    // runner's id defaults to this host and the runner's process id.
    let session = db.session().await.map_err(|e| {
        CliError::from(crate::engine::RunError::Db {
            during: "asking the server its version",
            source: e,
        })
    })?;
    let table = db.table().clone();
    let guard = lock::guard(db, &settings.lock, sql::Slot::LeaseToken.marker());
    let runner_id = ctx
        .common
        .runner_id
        .clone()
        .unwrap_or_else(|| sql::Slot::RunnerId.marker().to_string());
    let cx = sent::Context {
        session: &session,
        table: &table,
        guard: &guard,
        runner_id: &runner_id,
        note: note.as_deref(),
    };
    let scripts = sent::steps(&prepared, &settings.timeouts, &cx);
    let rendered = output::render_plan(
        &plan,
        &prepared,
        &scripts,
        &output::PlanContext {
            flavor: session.flavor,
            table: &table,
            create_table: !state.initialized,
            destructive: &destructive,
        },
    );
    let mut json = rendered.json;
    let mut human = rendered.human;
    for f in findings.iter().filter(|f| f.ignored.is_none()) {
        human.push_str(&format!(
            "lint: {}:{} [{}] {}{}\n",
            f.file,
            f.line,
            f.rule,
            f.message,
            f.help
                .as_deref()
                .map(|h| format!(" (help: {h})"))
                .unwrap_or_default()
        ));
    }
    if !plan.steps.is_empty() {
        human.push_str(&output::human_approval(&approval));
    }
    if let Some(obj) = json.as_object_mut() {
        obj.insert(
            "lint".into(),
            serde_json::to_value(&findings).unwrap_or_default(),
        );
        if !plan.steps.is_empty() {
            obj.insert("planHash".into(), json!(approval.plan_hash));
            obj.insert("approval".into(), to_json(&approval));
        }
    }
    Ok(Outcome::ok(json, human))
}

/// `lint`: every migration (no database, or --all) or those not applied yet.
async fn lint_cmd(
    ctx: &Ctx,
    format: Option<super::LintFormat>,
    all: bool,
    dialect: super::DialectArg,
) -> Result<Outcome, CliError> {
    let set = ctx.load()?;
    let (dialect, pending) = match (&ctx.url, all) {
        (Some(url), false) => {
            let dialect = dialect::dialect_of(url)?;
            let mut db = ctx.connect().await?;
            let state = runner::read_state(&mut db).await;
            db.close().await;
            let state = state?;
            let pending: Vec<_> = plan::pending(&set, &state)
                .into_iter()
                .map(|m| m.version.clone())
                .collect();
            (dialect, Some(pending))
        }
        (Some(url), true) => (dialect::dialect_of(url)?, None),
        (None, _) => (super::lint::dialect_of(dialect), None),
    };
    let migrations: Vec<_> = set
        .migrations
        .iter()
        .filter(|m| pending.as_ref().is_none_or(|p| p.contains(&m.version)))
        .collect();
    // With a database the pending set runs together; without one each file is judged as
    // if the earlier ones were applied.
    let scope = if pending.is_some() {
        crate::engine::lint::NewTables::SameRun
    } else {
        crate::engine::lint::NewTables::SameFile
    };
    let findings = crate::engine::lint::lint(dialect, &migrations, scope);
    Ok(super::lint::outcome(
        findings,
        migrations.len(),
        format,
        ctx.common.output,
        &ctx.common.dir.display().to_string(),
    ))
}

/// Polls the database until it reaches `target` (or passes it, unless `exact`).
async fn wait(
    ctx: &Ctx,
    target: Option<&str>,
    timeout: Duration,
    exact: bool,
) -> Result<Outcome, CliError> {
    // The files are needed for the default target; with --version they only add the
    // check against applied contract migrations (a runner may wait without any files).
    let set = match target {
        Some(_) => ctx.load().ok(),
        None => Some(ctx.load()?),
    };
    // With --phase expand, the app waits for what it needs before it starts: its contract
    // migrations wait for older app versions to go, and must not hold it up.
    let newest = set.as_ref().and_then(|set| match ctx.common.phase {
        super::PhaseArg::Expand => set.expand_head(),
        _ => set.head(),
    });
    let target = match target {
        Some(t) => Version::parse(t)
            .map_err(|e| CliError::new(Exit::Usage, "usage", format!("invalid --version: {e}")))?,
        None => newest.map(|m| m.version.clone()).ok_or_else(|| {
            CliError::new(Exit::Source, "invalid_source", "no migrations to wait for")
        })?,
    };
    let cfg = ctx.connect_config()?;
    let mode = ctx.lock_mode()?;
    let started = Instant::now();
    let mut delay = Duration::from_millis(200);
    let mut db: Option<Db> = None;
    let mut last: String = "not connected yet".into();
    let mut announced = false;
    loop {
        if db.is_none() {
            match Db::connect(&cfg).await {
                Ok(d) => db = Some(d),
                // Wrong credentials or URL will not fix themselves: fail now, loudly.
                Err(e) if !matches!(e.kind, crate::engine::DbErrorKind::Unreachable) => {
                    return Err(CliError::from(e));
                }
                Err(e) => last = format!("database unreachable: {e}"),
            }
        }
        if let Some(conn) = db.as_mut() {
            match runner::read_state(conn).await {
                Ok(state) => {
                    if let Some(u) = &state.unfinished {
                        // A step with no outcome is only alive while its runner holds the lock.
                        let dead = u.failed || lock::holder(conn, &mode).await.is_none();
                        if dead {
                            return Err(CliError::from(crate::engine::RunError::Plan(
                                plan::PlanError::Unfinished(Box::new(u.clone())),
                            )));
                        }
                    }
                    if let Some(Err(e)) = set.as_ref().map(|s| runner::below_contract(s, &state)) {
                        if let Some(d) = db.take() {
                            d.close().await;
                        }
                        return Err(e.into());
                    }
                    let current = state.current().cloned();
                    let reached = current
                        .as_ref()
                        .is_some_and(|c| if exact { *c == target } else { *c >= target });
                    if reached {
                        if let Some(d) = db.take() {
                            d.close().await;
                        }
                        let waited = started.elapsed();
                        let cur = current.map(|v| v.to_string());
                        return Ok(Outcome::ok(
                            json!({ "current": cur, "target": target.to_string(), "waitedMs": waited.as_millis() as u64 }),
                            format!(
                                "Database is at {} (waited for {target}, {} ms)\n",
                                cur.as_deref().unwrap_or("none"),
                                waited.as_millis()
                            ),
                        ));
                    }
                    last = format!(
                        "current version is {}",
                        current
                            .map(|v| v.to_string())
                            .unwrap_or_else(|| "none".into())
                    );
                    if !state.initialized
                        && conn.dialect() == crate::engine::script::Dialect::Sqlite
                    {
                        // The file may not exist yet; reconnect to see it appear.
                        if let Some(d) = db.take() {
                            d.close().await;
                        }
                    }
                }
                Err(e) => {
                    last = e.to_string();
                    if let Some(d) = db.take() {
                        d.close().await;
                    }
                }
            }
        }
        if !announced {
            tracing::info!(target = %target, status = %last, "waiting for the database to reach the version");
            announced = true;
        }
        let elapsed = started.elapsed();
        if !timeout.is_zero() && elapsed >= timeout {
            return Err(CliError::new(
                Exit::WaitTimeout,
                "wait_timeout",
                format!("the database did not reach version {target} within {}s: {last}", timeout.as_secs()),
            )
            .hint("check the migration Job or the runner that should upgrade it (`schemagate migrate status`)"));
        }
        let mut sleep = delay;
        if !timeout.is_zero() {
            sleep = sleep.min(timeout - elapsed);
        }
        tokio::time::sleep(sleep).await;
        delay = (delay * 3 / 2).min(Duration::from_secs(2));
    }
}

/// `new`: the version to give the next migration.
fn next_version(set: Option<&MigrationSet>, now_ms: i64) -> String {
    let stamp: String = clock::iso_from_millis(now_ms)
        .chars()
        .filter(char::is_ascii_digit)
        .take(14)
        .collect();
    let Some(head) = set.and_then(|s| s.head()) else {
        return stamp;
    };
    let text = head.version.as_str();
    let sequential = head.version.is_single_segment() && text.len() < 14;
    let bump = |t: &str| -> String {
        // Add one to a digit string, keeping its width (0009 -> 0010).
        let mut digits: Vec<u8> = t.bytes().collect();
        let mut i = digits.len();
        loop {
            if i == 0 {
                digits.insert(0, b'1');
                break;
            }
            i -= 1;
            if digits[i] == b'9' {
                digits[i] = b'0';
            } else {
                digits[i] += 1;
                break;
            }
        }
        String::from_utf8(digits).unwrap_or_else(|_| t.to_string())
    };
    if sequential {
        return bump(text);
    }
    if Version::parse(&stamp).is_ok_and(|s| s > head.version) {
        stamp
    } else if let Some(next) = next_second(text) {
        // A timestamp head in this second (or the future): one real second later, never
        // `...59` + 1 = `...60`.
        next
    } else if head.version.is_single_segment() {
        bump(text)
    } else {
        // Dotted versions: bump the first segment.
        let first = text.split('.').next().unwrap_or("0");
        bump(first)
    }
}

/// `YYYYMMDDHHMMSS` one second later, if `text` is such a timestamp.
fn next_second(text: &str) -> Option<String> {
    if text.len() != 14 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let iso = format!(
        "{}-{}-{}T{}:{}:{}Z",
        &text[0..4],
        &text[4..6],
        &text[6..8],
        &text[8..10],
        &text[10..12],
        &text[12..14]
    );
    let ms = clock::millis_from_iso(&iso)?;
    // Round-trips only for a real time (month 13 or second 60 would not).
    let back: String = clock::iso_from_millis(ms)
        .chars()
        .filter(char::is_ascii_digit)
        .take(14)
        .collect();
    if back != text {
        return None;
    }
    Some(
        clock::iso_from_millis(ms + 1000)
            .chars()
            .filter(char::is_ascii_digit)
            .take(14)
            .collect(),
    )
}

pub(super) fn slug(message: &str) -> String {
    let mut s = String::new();
    for c in message.trim().chars() {
        if c.is_alphanumeric() {
            s.extend(c.to_lowercase());
        } else if !s.ends_with('_') && !s.is_empty() {
            s.push('_');
        }
    }
    let s = s.trim_end_matches('_');
    s.chars()
        .take(60)
        .collect::<String>()
        .trim_end_matches('_')
        .to_string()
}

/// What `new` tells the user in an up script. (No line may start with `-- schemagate:`:
/// that would be a directive.)
const UP_HELP: &str = "\
-- Write this migration's SQL below. `schemagate migrate upgrade` refuses a script
-- without any statement; if this step is meant to change nothing, add the line
-- `-- schemagate:empty <reason>` at the top (the reason is recorded in the history).";

/// What `new` tells the user in a down script.
const DOWN_HELP: &str = "\
-- Write the SQL that undoes the up script below. `schemagate migrate downgrade` refuses
-- a script without any statement; if undoing needs no SQL, add the line
-- `-- schemagate:empty <reason>` at the top; if the change cannot be undone, delete
-- this file (downgrade then refuses to go below this version).";

fn new(
    ctx: &Ctx,
    message: &str,
    version: Option<&str>,
    format: Option<NewFormat>,
    no_down: bool,
) -> Result<Outcome, CliError> {
    let dir: &PathBuf = &ctx.common.dir;
    let existing = match source::load_dir(dir) {
        Ok(set) => Some(set),
        Err(SourceError::Empty { .. } | SourceError::DirMissing { .. }) => None,
        Err(e) => return Err(e.into()),
    };
    let slug = slug(message);
    if slug.is_empty() {
        return Err(CliError::new(
            Exit::Usage,
            "usage",
            "the message must contain letters or digits",
        )
        .hint("e.g. schemagate migrate new -m \"add users table\""));
    }
    let version = match version {
        Some(v) => Version::parse(v)
            .map_err(|e| CliError::new(Exit::Usage, "usage", format!("invalid --version: {e}")))?
            .to_string(),
        None => next_version(existing.as_ref(), clock::now_millis()),
    };
    if let Some(set) = &existing {
        let v = Version::parse(&version)
            .map_err(|e| CliError::new(Exit::Usage, "usage", e.to_string()))?;
        if let Some(m) = set.get(&v) {
            return Err(CliError::new(
                Exit::Refused,
                "refused",
                format!("version {version} already exists ({})", m.up.file),
            ));
        }
    }
    let format =
        format.unwrap_or_else(
            || match existing.as_ref().and_then(MigrationSet::dominant_format) {
                Some(Format::Flyway) => NewFormat::Flyway,
                Some(Format::Dbmate) => NewFormat::Dbmate,
                Some(Format::SqlxSimple) => NewFormat::Sqlx,
                _ => NewFormat::Native,
            },
        );
    let message = message.trim().replace('\n', " ");
    let up = format!("-- {message}\n--\n{UP_HELP}\n");
    let down = format!("-- revert: {message}\n--\n{DOWN_HELP}\n");
    let mut files: Vec<(String, String)> = match format {
        NewFormat::Native => {
            let mut f = vec![(format!("{version}_{slug}.up.sql"), up)];
            if !no_down {
                f.push((format!("{version}_{slug}.down.sql"), down));
            }
            f
        }
        NewFormat::Flyway => {
            let fv = version.replace('.', "_");
            let mut f = vec![(format!("V{fv}__{slug}.sql"), up)];
            if !no_down {
                f.push((format!("U{fv}__{slug}.sql"), down));
            }
            f
        }
        NewFormat::Dbmate => vec![(
            format!("{version}_{slug}.sql"),
            if no_down {
                format!("-- migrate:up\n{up}\n")
            } else {
                format!("-- migrate:up\n{up}\n\n-- migrate:down\n{down}\n")
            },
        )],
        NewFormat::Sqlx => vec![(format!("{version}_{slug}.sql"), up)],
    };
    std::fs::create_dir_all(dir).map_err(|e| {
        CliError::new(
            Exit::Internal,
            "io",
            format!("cannot create {}: {e}", dir.display()),
        )
    })?;
    let mut created = Vec::new();
    for (name, text) in files.drain(..) {
        let path = dir.join(&name);
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()));
        if let Err(e) = written {
            return Err(CliError::new(
                Exit::Internal,
                "io",
                format!("cannot create {}: {e}", path.display()),
            ));
        }
        created.push(path.display().to_string());
    }
    let human = created
        .iter()
        .map(|p| format!("Created {p}\n"))
        .collect::<String>();
    Ok(Outcome::ok(
        json!({ "version": version, "files": created }),
        human,
    ))
}

/// `drift`: the live schema against the fingerprint recorded at the current version; with
/// `--accept`, records the live schema as the expected one (under the lock, audited).
async fn drift_cmd(ctx: &Ctx, accept: bool, reason: Option<String>) -> Result<Outcome, CliError> {
    if ctx.common.tool != Tool::Native {
        return Err(CliError::new(
            Exit::Usage,
            "usage",
            "drift compares schemas migrated by schemagate: its fingerprints are recorded by \
             schemagate's runs",
        )
        .hint("adopt the database first (`import --from <tool>`), then `drift --accept`"));
    }
    if let Some(path) = ctx.missing_sqlite_file() {
        return Err(CliError::new(
            Exit::NoBaseline,
            "no_database",
            format!("the SQLite database {} does not exist", path.display()),
        )
        .hint("`schemagate migrate upgrade` creates it"));
    }
    let mut db = ctx.connect().await?;
    let result = if accept {
        accept_live(ctx, &mut db, reason).await
    } else {
        match runner::read_state(&mut db).await {
            Ok(state) => schema::check(&mut db, &state)
                .await
                .map_err(|e| {
                    CliError::from(crate::engine::RunError::Db {
                        during: "reading the schema",
                        source: e,
                    })
                })
                .map(|c| drift_outcome(&c)),
            Err(e) => Err(e.into()),
        }
    };
    db.close().await;
    result
}

fn drift_outcome(check: &schema::DriftCheck) -> Outcome {
    let exit = match check {
        schema::DriftCheck::Clean { .. } => Exit::Ok,
        schema::DriftCheck::Drifted { .. } => Exit::Drift,
        _ => Exit::NoBaseline,
    };
    Outcome {
        exit,
        json: to_json(check),
        human: output::human_schema_drift(check),
    }
}

/// `drift --accept`: the live schema becomes the expected one at the current version.
async fn accept_live(ctx: &Ctx, db: &mut Db, reason: Option<String>) -> Result<Outcome, CliError> {
    let settings = ctx.settings()?;
    runner::read_state(db).await?;
    let held = lock::acquire(
        db,
        &settings.lock,
        &settings.runner_id,
        settings.lock_timeout,
    )
    .await
    .map_err(|e| CliError::from(crate::engine::RunError::from(e)))?;
    let result = async {
        let state = runner::read_state(db).await?;
        if let Some(u) = &state.unfinished {
            return Err(CliError::from(crate::engine::RunError::Plan(
                plan::PlanError::Unfinished(Box::new(u.clone())),
            )));
        }
        let db_err =
            |during| move |e| CliError::from(crate::engine::RunError::Db { during, source: e });
        let before = schema::newest(db)
            .await
            .map_err(db_err("reading the fingerprint"))?;
        let live = schema::read_live(db)
            .await
            .map_err(db_err("reading the schema"))?;
        let version = state.current().map(Version::to_string);
        let accepted = before
            .filter(|b| b.version == version.clone().unwrap_or_default())
            .map(|b| schema::diff(&b.fingerprint, &live))
            .unwrap_or_default();
        let note = format!(
            "accepted with drift --accept: {}",
            reason.as_deref().unwrap_or("no reason given")
        );
        let digest = schema::record(
            db,
            version.as_deref(),
            &live,
            &settings.runner_id,
            Some(&note),
            true,
        )
        .await
        .map_err(db_err("recording the fingerprint"))?;
        let human = format!(
            "Recorded the live schema as the expected one at {} ({} objects, digest {}){}\n",
            version
                .as_deref()
                .map(|v| format!("version {v}"))
                .unwrap_or_else(|| "no version".into()),
            live.objects.len(),
            &digest[..12],
            if accepted.is_empty() {
                String::new()
            } else {
                format!(
                    "; accepted {} difference(s):\n{}",
                    accepted.len(),
                    accepted
                        .iter()
                        .map(|d| format!("  {d}"))
                        .collect::<Vec<_>>()
                        .join("\n")
                )
            }
        );
        Ok(Outcome::ok(
            json!({
                "result": "accepted",
                "version": version,
                "digest": digest,
                "objects": live.objects.len(),
                "accepted": accepted,
                "note": note,
            }),
            human,
        ))
    }
    .await;
    lock::release(db, held).await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::source::load_files;

    fn set(names: &[&str]) -> MigrationSet {
        load_files(
            "t",
            names
                .iter()
                .map(|n| (n.to_string(), "select 1;".to_string())),
        )
        .unwrap()
    }

    // 2026-11-25T07:32:40Z
    const NOW: i64 = 1_795_591_960_000;

    #[test]
    fn next_version_follows_the_existing_scheme() {
        assert_eq!(next_version(None, NOW), "20261125073240");
        assert_eq!(next_version(Some(&set(&["0009_a.up.sql"])), NOW), "0010");
        assert_eq!(
            next_version(Some(&set(&["1_a.up.sql", "2_b.up.sql"])), NOW),
            "3"
        );
        assert_eq!(
            next_version(Some(&set(&["20240101000000_a.sql"])), NOW),
            "20261125073240"
        );
        // A head in the future (clock skew): stay above it.
        assert_eq!(
            next_version(Some(&set(&["29990101000000_a.sql"])), NOW),
            "29990101000001"
        );
        // Twice in one second: a real timestamp one second later, across minute and year.
        assert_eq!(
            next_version(Some(&set(&["20261125073240_a.sql"])), NOW),
            "20261125073241"
        );
        assert_eq!(
            next_version(Some(&set(&["29991231235959_a.sql"])), NOW),
            "30000101000000"
        );
        assert_eq!(
            next_version(Some(&set(&["V1.2__a.sql"])), NOW),
            "20261125073240"
        );
    }

    #[test]
    fn new_files_say_what_to_write_but_are_neither_sql_nor_directives() {
        use crate::engine::script::{Dialect, Directives, parse_directives, split};
        for help in [UP_HELP, DOWN_HELP] {
            let text = format!("-- a message\n--\n{help}\n");
            assert_eq!(parse_directives(&text).unwrap(), Directives::default());
            for d in [Dialect::Postgres, Dialect::MySql, Dialect::Sqlite] {
                assert!(split(&text, d).is_empty(), "{d:?}");
            }
            assert!(help.contains("`-- schemagate:empty <reason>`"));
        }
    }

    #[test]
    fn slugs() {
        assert_eq!(slug("Add users table!"), "add_users_table");
        assert_eq!(slug("  --  "), "");
        assert_eq!(slug("Ünïcode ok"), "ünïcode_ok");
    }

    #[test]
    fn plan_direction_follows_the_target() {
        let v = |s: &str| Version::parse(s).unwrap();
        assert!(matches!(
            plan_mode(Target::Head, Some(&v("3")), false),
            Mode::Upgrade(_)
        ));
        assert!(matches!(
            plan_mode(Target::Version(v("2")), Some(&v("3")), false),
            Mode::Downgrade(_)
        ));
        assert!(matches!(
            plan_mode(Target::Version(v("4")), Some(&v("3")), false),
            Mode::Upgrade(_)
        ));
        assert!(matches!(
            plan_mode(Target::Relative(-1), None, false),
            Mode::Downgrade(_)
        ));
        assert!(matches!(
            plan_mode(Target::Base, None, false),
            Mode::Downgrade(_)
        ));
        assert!(matches!(
            plan_mode(Target::Version(v("2")), Some(&v("3")), true),
            Mode::Upgrade(_)
        ));
    }

    #[test]
    fn identity_is_never_empty() {
        assert!(!host_identity().is_empty());
    }
}
