//! A fleet: one SchemaMigration over many tenant databases (`spec.databases`).
//!
//! How it runs (and why): the controller plans batches and runs each batch in one Job,
//! one Job at a time. The Job mounts the batch's Secrets as files (a projected volume:
//! one file per Secret, named after it) and runs `migrate upgrade --databases`, the same
//! fan-out the CLI offers, with `maxParallel` databases at once. A Job per batch keeps the
//! URLs out of the controller's hands at run time, keeps each pod spec small (a batch is
//! at most [`BATCH_MAX`] Secrets, whatever the fleet's size), and makes every step visible
//! and restartable: Job names are derived from the run and the batch's members, so a
//! controller restarted mid-run finds (adopts) the Job it created instead of making
//! another, and the database lock makes two runners on one database impossible anyway.
//!
//! The order: the canary databases (the first `canary` by Secret name) form the first
//! batch; the rest start only once every canary is at the target (read back from its
//! history). Then batches of the pending databases, in name order. A failed database
//! (its Job failed and it is still behind, or its history is dirty, or its Secret has no
//! URL) halts the fleet (`onFailure: Halt`: no new batch) or is left out of the next
//! batches (`Continue`); a failed canary always halts. After a fix, deleting the failed
//! Job (or changing the source) lets the rollout resume where it stopped. Each database's
//! history table is the source of truth: what is at the target is read from it.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use super::decide::{
    Action, DbView, Decision, EventNote, JobPlan, JobState, JobView, RunCommand, SourceState,
};
use crate::api::conditions::{self as cond, reason};
use crate::api::{
    FleetFailurePolicy, FleetMember, FleetStatus, Phase, STATUS_LIST_MAX, SchemaMigration,
    SchemaMigrationStatus,
};
use crate::model::Version;

/// The most databases one Job migrates.
pub const BATCH_MAX: usize = 50;

/// One database of the fleet, as observed.
#[derive(Clone, Debug, PartialEq)]
pub struct Member {
    /// The Secret's name.
    pub secret: String,
    /// `None`: the Secret has no URL under the key.
    pub database: Option<DbView>,
}

/// A Job of this fleet: its state and the Secrets it migrates.
#[derive(Clone, Debug, PartialEq)]
pub struct FleetJob {
    pub view: JobView,
    pub members: Vec<String>,
    /// It ran the current migrations and settings (its run hash is the current one).
    pub current: bool,
}

/// Names a batch's Job: (name, run hash).
pub type BatchNamer<'a> = dyn Fn(&[String]) -> (String, String) + Sync + 'a;

/// Everything observed about a fleet.
pub struct FleetInputs<'a> {
    pub sm: &'a SchemaMigration,
    pub now: Time,
    pub source: SourceState,
    /// The selected Secrets, in name order.
    pub members: Vec<Member>,
    pub jobs: Vec<FleetJob>,
    pub namer: &'a BatchNamer<'a>,
    pub image_allowed: bool,
    pub service_account_allowed: bool,
}

/// Where one database stands.
#[derive(Clone, Debug, PartialEq)]
enum Standing {
    AtTarget,
    Pending,
    Failed(String),
}

fn ver(s: &str) -> Option<Version> {
    Version::parse(s).ok()
}

fn standing(m: &Member, target: Option<&str>, jobs: &[FleetJob]) -> Standing {
    let key =
        || "the Secret has no database URL under the key spec.databases.key names".to_string();
    let Some(db) = &m.database else {
        return Standing::Failed(key());
    };
    let behind = match db {
        DbView::Failed(f) if f.kind.permanent() => return Standing::Failed(f.message.clone()),
        DbView::Read(r) => {
            if let Some(u) = &r.unfinished {
                return Standing::Failed(u.message.clone());
            }
            if let Some(d) = &r.drift {
                return Standing::Failed(d.message.clone());
            }
            match (r.current.as_deref().and_then(ver), target.and_then(ver)) {
                (Some(c), Some(t)) if c >= t => return Standing::AtTarget,
                _ => true,
            }
        }
        _ => true,
    };
    // Behind after a Job of the current run that included it failed: failed, with the
    // runner's words where they name it.
    if behind
        && let Some(j) = jobs.iter().find(|j| {
            j.current && j.view.state == JobState::Failed && j.members.contains(&m.secret)
        })
    {
        let said = j
            .view
            .summary
            .as_ref()
            .and_then(|s| s.error.as_ref())
            .and_then(|e| {
                e.message
                    .split("; ")
                    .find(|p| p.starts_with(&format!("{}: ", m.secret)))
                    .map(|p| p[m.secret.len() + 2..].to_string())
            });
        // A complete list (a cut one ends with `…`: who is missing is unknown).
        let listed = j
            .view
            .summary
            .as_ref()
            .and_then(|s| s.error.as_ref())
            .is_some_and(|e| e.kind == "fleet_incomplete" && !e.message.ends_with('…'));
        return match said {
            Some(why) => Standing::Failed(why),
            // The runner listed its failed databases and this one is not among them: it
            // was not started (the batch halted). It goes in a later batch.
            None if listed => Standing::Pending,
            None => Standing::Failed(format!("its migration failed in Job {}", j.view.name)),
        };
    }
    Standing::Pending
}

fn condition(i: &FleetInputs<'_>, kind: &str, status: bool, why: &str, message: &str) -> Condition {
    let previous =
        i.sm.status
            .as_ref()
            .map(|s| s.conditions.as_slice())
            .unwrap_or_default();
    cond::condition(
        previous,
        kind,
        status,
        why,
        message.to_string(),
        i.sm.metadata.generation,
        &i.now,
    )
}

/// The decision for a fleet.
pub fn decide(i: &FleetInputs<'_>) -> Decision {
    let spec = i.sm.spec.databases.clone().unwrap_or_default();
    let target =
        i.sm.spec
            .target_version
            .clone()
            .or_else(|| match &i.source {
                SourceState::Loaded { versions, .. } => versions.last().cloned(),
                _ => None,
            });
    let standings: Vec<(&Member, Standing)> = i
        .members
        .iter()
        .map(|m| (m, standing(m, target.as_deref(), &i.jobs)))
        .collect();
    let canaries = &standings[..(spec.canary as usize).min(standings.len())];
    let failed: Vec<FleetMember> = standings
        .iter()
        .filter_map(|(m, s)| match s {
            Standing::Failed(why) => Some(FleetMember {
                secret: m.secret.clone(),
                reason: crate::engine::runner::clip(why, 300),
            }),
            _ => None,
        })
        .collect();
    let pending: Vec<&String> = standings
        .iter()
        .filter(|(_, s)| *s == Standing::Pending)
        .map(|(m, _)| &m.secret)
        .collect();
    let at_target = standings
        .iter()
        .filter(|(_, s)| *s == Standing::AtTarget)
        .count();
    let active = i.jobs.iter().find(|j| j.view.state == JobState::Active);
    let canary_failed = canaries
        .iter()
        .any(|(_, s)| matches!(s, Standing::Failed(_)));
    let canary_pending: Vec<&String> = canaries
        .iter()
        .filter(|(_, s)| *s == Standing::Pending)
        .map(|(m, _)| &m.secret)
        .collect();
    let halted =
        canary_failed || (!failed.is_empty() && spec.on_failure == FleetFailurePolicy::Halt);
    let mut action = Action::Nothing;
    let mut events = Vec::new();
    let failed_text = || {
        let shown: Vec<String> = failed
            .iter()
            .take(3)
            .map(|f| format!("{}: {}", f.secret, f.reason))
            .collect();
        format!(
            "{} database(s) failed ({}{})",
            failed.len(),
            shown.join("; "),
            if failed.len() > 3 { "; ..." } else { "" }
        )
    };
    let (phase, why, message) = if let SourceState::Missing | SourceState::Invalid(_) = &i.source {
        let m = match &i.source {
            SourceState::Invalid(m) => m.clone(),
            _ => "the migrations' ConfigMap does not exist".into(),
        };
        (Phase::Blocked, reason::INVALID_SOURCE, m)
    } else if !i.image_allowed || !i.service_account_allowed {
        (
            Phase::Blocked,
            if i.image_allowed {
                reason::SERVICE_ACCOUNT_NOT_ALLOWED
            } else {
                reason::IMAGE_NOT_ALLOWED
            },
            "the runner image or service account is not allowed by the controller".into(),
        )
    } else if i.sm.spec.paused {
        (
            Phase::Pending,
            reason::PAUSED,
            "paused: nothing runs until spec.paused is false".into(),
        )
    } else if i.members.is_empty() {
        (
            Phase::Pending,
            reason::SECRET_NOT_FOUND,
            "no Secret matches spec.databases.secretSelector in this namespace".into(),
        )
    } else if let Some(j) = active {
        (
            Phase::Migrating,
            reason::JOB_RUNNING,
            format!(
                "Job {} is migrating {} database(s); {at_target} of {} at {}",
                j.view.name,
                j.members.len(),
                i.members.len(),
                target.as_deref().unwrap_or("the target")
            ),
        )
    } else if halted {
        (
            Phase::Failed,
            reason::MIGRATION_FAILED,
            format!(
                "{}; the rollout halted{}: fix them, then delete the failed Job (or change the \
                 source) and it resumes where it stopped",
                failed_text(),
                if canary_failed {
                    " (a canary failed)"
                } else {
                    ""
                }
            ),
        )
    } else if !pending.is_empty() {
        let batch: Vec<String> = if canary_pending.is_empty() {
            pending
                .iter()
                .take(BATCH_MAX)
                .map(|s| s.to_string())
                .collect()
        } else {
            canary_pending
                .iter()
                .take(BATCH_MAX)
                .map(|s| s.to_string())
                .collect()
        };
        let (name, hash) = (i.namer)(&batch);
        match i.jobs.iter().find(|j| j.view.name == name) {
            // Its databases' reads do not show its work yet: wait for them.
            Some(j) if j.view.state == JobState::Succeeded => (
                Phase::Migrating,
                reason::JOB_RUNNING,
                format!("Job {} finished; reading its databases", j.view.name),
            ),
            _ => {
                let what = if canary_pending.is_empty() {
                    format!("{} database(s)", batch.len())
                } else {
                    format!("the canary ({})", batch.join(", "))
                };
                events.push(EventNote {
                    warning: false,
                    reason: reason::JOB_CREATED,
                    note: format!(
                        "created Job {name} to migrate {what} to {}",
                        target.as_deref().unwrap_or("the newest migration")
                    ),
                });
                let message = format!(
                    "Job {name} created for {what}; {at_target} of {} at {}",
                    i.members.len(),
                    target.as_deref().unwrap_or("the target")
                );
                action = Action::CreateJob(JobPlan {
                    name,
                    target: target.clone(),
                    command: RunCommand::Upgrade,
                    run_hash: hash,
                    members: batch,
                });
                (Phase::Migrating, reason::JOB_CREATED, message)
            }
        }
    } else if !failed.is_empty() {
        (
            Phase::Failed,
            reason::MIGRATION_FAILED,
            format!("{}; every other database is at the target", failed_text()),
        )
    } else {
        (
            Phase::Ready,
            reason::UP_TO_DATE,
            format!(
                "all {} databases are at {}",
                i.members.len(),
                target.as_deref().unwrap_or("the target")
            ),
        )
    };
    let (reconciling, stalled) = match phase {
        Phase::Ready => (false, false),
        Phase::Migrating => (true, false),
        Phase::Pending => (false, true),
        Phase::Failed | Phase::Blocked => (false, true),
    };
    let previous = i.sm.status.clone().unwrap_or_default();
    if previous.phase != Some(phase) {
        events.push(EventNote {
            warning: stalled,
            reason: why,
            note: format!("{}: {message}", phase.as_str()),
        });
    }
    let mut slowest: Vec<(u64, &String)> = standings
        .iter()
        .filter_map(|(m, _)| match &m.database {
            Some(DbView::Read(r)) => Some((
                r.applied
                    .iter()
                    .filter_map(|a| a.duration_ms)
                    .map(|d| d.max(0) as u64)
                    .sum(),
                &m.secret,
            )),
            _ => None,
        })
        .filter(|(ms, _)| *ms > 0)
        .collect();
    slowest.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
    let lowest = standings
        .iter()
        .filter_map(|(m, _)| match &m.database {
            Some(DbView::Read(r)) => Some(r.current.clone()),
            _ => None,
        })
        .min_by(|a, b| a.as_deref().and_then(ver).cmp(&b.as_deref().and_then(ver)))
        .flatten();
    let status = SchemaMigrationStatus {
        observed_generation: i.sm.metadata.generation,
        phase: Some(phase),
        // The fleet is at least at this version.
        current_version: lowest,
        target_version: target.clone(),
        databases: Some(FleetStatus {
            total: i.members.len() as u32,
            at_target: at_target as u32,
            pending: pending.len() as u32,
            failed: failed.len() as u32,
            failed_databases: failed.iter().take(STATUS_LIST_MAX).cloned().collect(),
            slowest: slowest
                .iter()
                .take(5)
                .map(|(ms, s)| FleetMember {
                    secret: s.to_string(),
                    reason: format!("{ms} ms of migrations"),
                })
                .collect(),
        }),
        last_run: i
            .jobs
            .first()
            .map(|j| super::decide::last_run_of(&j.view))
            .or(previous.last_run.clone()),
        conditions: vec![
            condition(i, cond::READY, phase == Phase::Ready, why, &message),
            condition(i, cond::RECONCILING, reconciling, why, &message),
            condition(i, cond::STALLED, stalled, why, &message),
        ],
        ..Default::default()
    };
    Decision {
        status,
        action,
        events,
    }
}

#[cfg(test)]
mod tests;
