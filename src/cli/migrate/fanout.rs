//! `migrate upgrade --databases PATH`: one upgrade over many databases (one per tenant).
//!
//! The databases come from a file (one URL per line, optionally preceded by a name:
//! `tenant-a postgres://...`; `#` comments) or a directory with one file per database
//! holding its URL (how a projected Secret volume lays them out: the file name names the
//! database). The first `--canary` databases (in name order for a directory, file order
//! for a file) are migrated first and verified (their history read back at the target);
//! a canary that fails stops the fleet. The rest run with at most `--max-parallel` at once.
//! After a failure, `--on-failure halt` starts no new database (those running finish);
//! `continue` goes on. Every database keeps its own lock and history table, so running
//! the command again after a fix resumes where it stopped (the migrated ones are no-ops).
//!
//! Passwords are never printed: a database is named by its file or its given name, else
//! by its URL with the password masked.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use futures_util::StreamExt;
use serde::Serialize;
use serde_json::json;

use super::{Ctx, Outcome};
use crate::engine::dialect::Backend;
use crate::engine::runner::{self, Mode};
use crate::engine::{Db, MigrationSet, Target, Version, redact};
use crate::runner::exit::{CliError, Exit};

/// What to do with the rest of the fleet after a database failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "camelCase")]
pub enum OnFailure {
    /// Start no new database; those running finish.
    Halt,
    /// Go on with the others.
    Continue,
}

/// The fleet's rollout settings.
#[derive(Clone, Copy, Debug)]
pub struct Rollout {
    pub canary: usize,
    pub max_parallel: usize,
    pub on_failure: OnFailure,
}

/// One database of the fleet.
#[derive(Clone, Debug)]
pub struct Tenant {
    pub name: String,
    pub url: String,
}

/// What happened to one database.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TenantResult {
    pub name: String,
    /// `applied`, `noop`, `failed` or `skipped`.
    pub result: &'static str,
    pub canary: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub applied: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<serde_json::Value>,
    pub duration_ms: u64,
}

/// The databases `path` lists (see the module documentation).
pub fn read_tenants(path: &Path) -> Result<Vec<Tenant>, CliError> {
    let unreadable = |e: std::io::Error| {
        CliError::new(
            Exit::Usage,
            "usage",
            format!("cannot read --databases {}: {e}", path.display()),
        )
    };
    let mut out = Vec::new();
    if path.is_dir() {
        let mut names: Vec<String> = std::fs::read_dir(path)
            .map_err(unreadable)?
            .filter_map(|e| e.ok())
            // Projected volumes keep their data in hidden `..data` directories.
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .filter(|e| e.path().is_file())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        for name in names {
            let text = std::fs::read_to_string(path.join(&name)).map_err(unreadable)?;
            let url = text.trim().to_string();
            if url.is_empty() {
                return Err(CliError::new(
                    Exit::Usage,
                    "usage",
                    format!(
                        "{}: the file holds no database URL",
                        path.join(&name).display()
                    ),
                ));
            }
            out.push(Tenant { name, url });
        }
    } else {
        let text = std::fs::read_to_string(path).map_err(unreadable)?;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut parts = line.split_whitespace();
            let (name, url) = match (parts.next(), parts.next(), parts.next()) {
                (Some(url), None, _) => (redact::redact_url(url), url.to_string()),
                (Some(name), Some(url), None) => (name.to_string(), url.to_string()),
                _ => {
                    return Err(CliError::new(
                        Exit::Usage,
                        "usage",
                        format!(
                            "{} line {}: expected `URL` or `NAME URL`",
                            path.display(),
                            n + 1
                        ),
                    ));
                }
            };
            out.push(Tenant { name, url });
        }
    }
    for t in &out {
        // Registered, so that no message ever shows the password.
        redact::redact_url(&t.url);
    }
    if out.is_empty() {
        return Err(CliError::new(
            Exit::Usage,
            "usage",
            format!("--databases {} lists no database", path.display()),
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    if let Some(dup) = out.iter().find(|t| !seen.insert(t.name.clone())) {
        return Err(CliError::new(
            Exit::Usage,
            "usage",
            format!(
                "--databases {}: {} is listed twice",
                path.display(),
                dup.name
            ),
        ));
    }
    Ok(out)
}

/// Upgrades one database; never fails as a whole: the failure is in the result.
async fn upgrade_one(
    ctx: &Ctx,
    set: &MigrationSet,
    target: &Target,
    tenant: &Tenant,
    canary: bool,
) -> TenantResult {
    let started = Instant::now();
    let result = async {
        let cfg = ctx.connect_config_for(&tenant.url)?;
        let settings = ctx.settings_for(&cfg)?;
        let mut db = Db::connect(&cfg).await.map_err(CliError::from)?;
        let report = runner::run(&mut db, set, &Mode::Upgrade(target.clone()), &settings).await;
        // A canary is verified: its history, read back, says it is at the plan's end.
        let verified = match (&report, canary) {
            (Ok(r), true) => runner::read_state(&mut db)
                .await
                .map(|s| s.current().map(Version::to_string) == r.to)
                .unwrap_or(false),
            _ => true,
        };
        db.close().await;
        let report = report.map_err(super::run_error)?;
        if !verified {
            return Err(CliError::new(
                Exit::MigrationFailed,
                "canary_unverified",
                "the canary's history does not show the version its run reported",
            ));
        }
        Ok(report)
    }
    .await;
    let duration_ms = started.elapsed().as_millis() as u64;
    match result {
        Ok(r) => TenantResult {
            name: tenant.name.clone(),
            result: if r.steps.is_empty() {
                "noop"
            } else {
                "applied"
            },
            canary,
            from: r.from,
            to: r.to,
            applied: r.steps.iter().map(|s| s.version.clone()).collect(),
            error: None,
            duration_ms,
        },
        Err(e) => TenantResult {
            name: tenant.name.clone(),
            result: "failed",
            canary,
            from: None,
            to: None,
            applied: Vec::new(),
            error: Some(json!({
                "kind": e.kind,
                "exitCode": e.exit.code(),
                "message": redact::redact(&e.message).into_owned(),
            })),
            duration_ms,
        },
    }
}

fn skipped(tenant: &Tenant, canary: bool) -> TenantResult {
    TenantResult {
        name: tenant.name.clone(),
        result: "skipped",
        canary,
        from: None,
        to: None,
        applied: Vec::new(),
        error: None,
        duration_ms: 0,
    }
}

/// What every database of a fleet runs.
struct Run<'a> {
    ctx: &'a Ctx,
    set: &'a MigrationSet,
    target: &'a Target,
}

/// Runs `tenants` with at most `parallel` at once; after a failure, with `halt_on_failure`,
/// the ones not started yet are skipped (`halt` is shared with the caller).
async fn wave(
    run: &Run<'_>,
    tenants: &[Tenant],
    canary: bool,
    parallel: usize,
    halt: &AtomicBool,
    halt_on_failure: bool,
) -> Vec<TenantResult> {
    futures_util::stream::iter(tenants)
        .map(|t| async move {
            // Checked when the database's turn comes (a free slot), not when queued.
            if halt.load(Ordering::SeqCst) {
                return skipped(t, canary);
            }
            let r = upgrade_one(run.ctx, run.set, run.target, t, canary).await;
            if r.result == "failed" && halt_on_failure {
                halt.store(true, Ordering::SeqCst);
            }
            r
        })
        .buffer_unordered(parallel.max(1))
        .collect()
        .await
}

/// The fleet's upgrade (see the module documentation).
pub(super) async fn upgrade(
    ctx: &Ctx,
    path: &Path,
    target: Target,
    rollout: Rollout,
) -> Result<Outcome, CliError> {
    let tenants = read_tenants(path)?;
    let set = ctx.load()?;
    let started = Instant::now();
    let canaries = rollout.canary.min(tenants.len());
    let (first, rest) = tenants.split_at(canaries);
    let halt = AtomicBool::new(false);
    let run = Run {
        ctx,
        set: &set,
        target: &target,
    };
    // A canary's failure stops the fleet, whatever --on-failure says.
    let mut results = wave(&run, first, true, rollout.max_parallel, &halt, true).await;
    if halt.load(Ordering::SeqCst) {
        results.extend(rest.iter().map(|t| skipped(t, false)));
    } else {
        results.extend(
            wave(
                &run,
                rest,
                false,
                rollout.max_parallel,
                &halt,
                rollout.on_failure == OnFailure::Halt,
            )
            .await,
        );
    }
    let order: std::collections::HashMap<&str, usize> = tenants
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.as_str(), i))
        .collect();
    results.sort_by_key(|r| order.get(r.name.as_str()).copied().unwrap_or(usize::MAX));
    Ok(report(
        &results,
        rollout,
        started.elapsed().as_millis() as u64,
    ))
}

fn report(results: &[TenantResult], rollout: Rollout, duration_ms: u64) -> Outcome {
    let count = |what: &str| results.iter().filter(|r| r.result == what).count();
    let (applied, noop, failed, skipped) = (
        count("applied"),
        count("noop"),
        count("failed"),
        count("skipped"),
    );
    let mut slowest: Vec<&TenantResult> =
        results.iter().filter(|r| r.result == "applied").collect();
    slowest.sort_by_key(|r| std::cmp::Reverse(r.duration_ms));
    slowest.truncate(5);
    let canary_failed = results.iter().any(|r| r.canary && r.result == "failed");
    let mut human = format!(
        "{} database(s): {} migrated, {} already at the target, {} failed, {} not started ({} ms; canary {}, at most {} at once, on failure: {})\n",
        results.len(),
        applied,
        noop,
        failed,
        skipped,
        duration_ms,
        rollout.canary,
        rollout.max_parallel,
        match rollout.on_failure {
            OnFailure::Halt => "halt",
            OnFailure::Continue => "continue",
        }
    );
    for r in results {
        let what = match (r.result, &r.error) {
            (_, Some(e)) => format!("FAILED  {}", e["message"].as_str().unwrap_or("failed")),
            ("skipped", _) => "skipped (not started: the fleet halted after a failure)".into(),
            ("noop", _) => format!("ok      already at {}", r.to.as_deref().unwrap_or("none")),
            _ => format!(
                "ok      {} -> {} (applied {})",
                r.from.as_deref().unwrap_or("none"),
                r.to.as_deref().unwrap_or("none"),
                r.applied.join(", ")
            ),
        };
        human.push_str(&format!(
            "  {}{} {what} [{} ms]\n",
            r.name,
            if r.canary { " (canary)" } else { "" },
            r.duration_ms
        ));
    }
    if failed + skipped > 0 {
        human.push_str(
            "Fix the failed databases (each message says why), then run the same command \
             again: the migrated ones are no-ops, the rest resume.\n",
        );
    }
    let json = json!({
        "databases": {
            "total": results.len(),
            "atTarget": applied + noop,
            "applied": applied,
            "noop": noop,
            "failed": failed,
            "skipped": skipped,
        },
        "canaryFailed": canary_failed,
        "results": results,
        "slowest": slowest.iter().map(|r| json!({"name": r.name, "durationMs": r.duration_ms})).collect::<Vec<_>>(),
        "durationMs": duration_ms,
        "noop": applied == 0 && failed == 0 && skipped == 0,
        "applied": results.iter().flat_map(|r| r.applied.iter().map(move |v| format!("{}:{v}", r.name))).collect::<Vec<_>>(),
    });
    Outcome {
        exit: if failed + skipped > 0 {
            Exit::FanOutIncomplete
        } else {
            Exit::Ok
        },
        json,
        human,
    }
}
