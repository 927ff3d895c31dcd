//! The init-container gate: an admission webhook that injects the migration runner as the
//! first init container of pods labelled `schemagate.dev/migration: <name>`, so no pod of
//! the app starts before its schema is at the target version.
//!
//! `inject` is a pure function (pod and resource in, patched pod out); the HTTPS server
//! (`server.rs`) turns the difference into a JSON Patch. Injecting twice is impossible: a
//! pod that already has the runner is returned unchanged.

pub mod patch;
pub mod runtime;
pub mod server;
pub mod tls;
pub mod validate;

use k8s_openapi::api::core::v1::{Pod, Volume};

use crate::api::conditions::{self, reason};
use crate::api::{MIGRATION_LABEL, Phase, SchemaMigration};
use crate::runner::command::gate_args;
use crate::runner::pod::{self, INJECTED_CONTAINERS};
use crate::runner::policy::RunnerPolicy;
use crate::runner::source::inline_config_map_of;

/// The injected init container (both modes: it migrates, or waits for the version).
pub const INIT_CONTAINER: &str = INJECTED_CONTAINERS.runner;
/// The init container that copies an image source's files (runs before ours).
pub const FETCH_CONTAINER: &str = INJECTED_CONTAINERS.fetch;

/// How injection behaves: the runner policy (images, and how long an injected `wait`
/// waits), shared with the controller and the validating check.
pub type InjectSettings = RunnerPolicy;

/// Why a pod may not start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal(pub String);

/// What admission does with a pod.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Admit as it is (not labelled, or already injected); the string says why.
    Unchanged(&'static str),
    /// Admit with the runner injected.
    Patched(Box<Pod>),
}

/// The SchemaMigration a pod names, if it carries the label.
pub fn gated_by(pod: &Pod) -> Option<&str> {
    pod.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(MIGRATION_LABEL))
        .map(String::as_str)
        .filter(|s| !s.is_empty())
}

fn refuse(ns: &str, name: &str, why: String) -> Refusal {
    Refusal(format!(
        "pods labelled {MIGRATION_LABEL}={name} may only start once the database is migrated, \
         and SchemaMigration {ns}/{name} {why}"
    ))
}

/// A fleet's gate (`spec.databases`): a pod of a multi-tenant app starts only once every
/// selected database is at the target, as the controller's status says for the
/// resource's current generation, and that target is not below the pod's own version
/// (`version`, when the webhook could read it). No runner is injected: the controller's
/// Jobs migrate the fleet; a refused pod is retried by its ReplicaSet.
pub fn fleet_gate(
    sm: &SchemaMigration,
    ns: &str,
    version: Option<&str>,
) -> Result<Outcome, Refusal> {
    let name = sm.metadata.name.as_deref().unwrap_or_default();
    let status = sm.status.clone().unwrap_or_default();
    let fleet = status.databases.clone().unwrap_or_default();
    let current = status.observed_generation.is_some()
        && status.observed_generation == sm.metadata.generation;
    let parse = |v: &str| crate::model::Version::parse(v).ok();
    let target = status.target_version.as_deref().and_then(parse);
    let covers = match version.and_then(parse) {
        Some(v) => target.as_ref().is_some_and(|t| *t >= v),
        None => true,
    };
    if current && fleet.total > 0 && fleet.at_target == fleet.total && covers {
        return Ok(Outcome::Unchanged(
            "every database of the fleet is at the target",
        ));
    }
    // A pod of a version every database has already reached (a restart, a scale-up of the
    // version running) starts whatever the rollout of a newer one is doing.
    let lowest = status.current_version.as_deref().and_then(parse);
    if let (Some(v), Some(l)) = (version.and_then(parse), lowest)
        && v <= l
        && fleet.total > 0
    {
        return Ok(Outcome::Unchanged(
            "every database is at this pod's version",
        ));
    }
    Err(refuse(
        ns,
        name,
        format!(
            "migrates a fleet of databases: {} of {} at {}{}; pods of this app start once every \
             database is at {} (the ReplicaSet retries)",
            fleet.at_target,
            fleet.total,
            status.target_version.as_deref().unwrap_or("the target"),
            if fleet.failed > 0 {
                format!(", {} failed (see the resource's status)", fleet.failed)
            } else {
                String::new()
            },
            version.unwrap_or("the target")
        ),
    ))
}

/// Refuses a pod for an app version below the newest applied contract migration: the
/// schema no longer has what that version reads (a rollback past the contract).
pub fn below_contract(sm: &SchemaMigration, ns: &str, version: &str) -> Result<(), Refusal> {
    let name = sm.metadata.name.as_deref().unwrap_or_default();
    let Some(oldest) = sm
        .status
        .as_ref()
        .and_then(|s| s.contract.oldest_compatible_version.as_deref())
    else {
        return Ok(());
    };
    let parse = |v: &str| crate::model::Version::parse(v).ok();
    match (parse(version), parse(oldest)) {
        (Some(v), Some(o)) if v < o => {
            let applied = sm
                .status
                .as_ref()
                .and_then(|s| s.contract.applied.iter().find(|a| a.version == oldest))
                .map(|a| {
                    format!(
                        "{}{}",
                        a.applied_at
                            .as_deref()
                            .map(|t| format!(" at {t}"))
                            .unwrap_or_default(),
                        a.applied_by
                            .as_deref()
                            .map(|b| format!(" by {b}"))
                            .unwrap_or_default()
                    )
                })
                .unwrap_or_default();
            Err(refuse(
                ns,
                name,
                format!(
                    "has applied contract migration {oldest}{applied}, which removed what app \
                     versions below {oldest} read; this pod is for version {version}. Roll the \
                     app forward to {oldest} or later (going back below a contract migration \
                     takes a new migration that restores what it removed)"
                ),
            ))
        }
        _ => Ok(()),
    }
}

/// Decides admission for a pod that names `name` in namespace `ns`; `sm` is that
/// SchemaMigration if it exists.
pub fn inject(
    pod: &Pod,
    ns: &str,
    name: &str,
    sm: Option<&SchemaMigration>,
    settings: &InjectSettings,
) -> Result<Outcome, Refusal> {
    let Some(sm) = sm else {
        return Err(refuse(
            ns,
            name,
            "does not exist: create it (or remove the label)".into(),
        ));
    };
    if sm.spec.paused {
        return Err(refuse(ns, name, "is paused (spec.paused: true)".into()));
    }
    if sm.spec.databases.is_some() {
        return fleet_gate(sm, ns, None);
    }
    // The controller's verdict counts only while it is about this very spec: a resource
    // changed in the same apply as the pod (a fixed target, a new source) is not refused
    // for what was wrong with its previous generation; its runner checks for itself.
    let status = sm.status.clone().unwrap_or_default();
    let current_verdict = status.observed_generation.is_some()
        && status.observed_generation == sm.metadata.generation;
    if status.phase == Some(Phase::Blocked) && current_verdict {
        let why = status
            .conditions
            .iter()
            .find(|c| c.type_ == conditions::STALLED)
            .map(|c| format!("{}: {}", c.reason, c.message))
            .unwrap_or_else(|| reason::DOWNGRADE_DENIED.into());
        return Err(refuse(ns, name, format!("is blocked ({why})")));
    }
    let image = settings.runner_image(sm);
    if !settings.image_allowed(image) {
        return Err(refuse(
            ns,
            name,
            format!("asks for runner image {image}, which the controller does not allow"),
        ));
    }
    let spec = pod.spec.clone().unwrap_or_default();
    let already = spec
        .init_containers
        .iter()
        .flatten()
        .any(|c| c.name == INIT_CONTAINER);
    if already {
        return Ok(Outcome::Unchanged("already injected"));
    }

    // The runner's files: the ConfigMap as the kubelet mounts it, the inline snapshot this
    // spec names (content-addressed: exactly the migrations admitted with the pod), or the
    // image's files. A tool source runs the tool's command under `migrate exec` in both
    // modes: in Job mode the pod's copy waits on the lock while the Job runs.
    let inline_cm = inline_config_map_of(sm);
    let pod::RunnerParts {
        volumes,
        init: fetch,
        runner,
    } = pod::runner_parts(
        sm,
        INJECTED_CONTAINERS,
        image,
        gate_args(sm, settings.wait_timeout),
        inline_cm.as_deref(),
    );

    let mut patched = pod.clone();
    let mut pod_spec = spec;
    // Ours run before the pod's own init containers, except native sidecars the pod starts
    // first (restartPolicy: Always, e.g. a database proxy): the runner may need them to
    // reach the database, so it goes right after them.
    let mut init = pod_spec.init_containers.take().unwrap_or_default();
    let sidecars = init
        .iter()
        .take_while(|c| c.restart_policy.as_deref() == Some("Always"))
        .count();
    let ours: Vec<_> = fetch.into_iter().chain([runner]).collect();
    init.splice(sidecars..sidecars, ours);
    pod_spec.init_containers = Some(init);
    let mut all_volumes: Vec<Volume> = pod_spec.volumes.take().unwrap_or_default();
    for v in volumes {
        if !all_volumes.iter().any(|existing| existing.name == v.name) {
            all_volumes.push(v);
        }
    }
    pod_spec.volumes = Some(all_volumes);
    // The runner reads the image pull secrets of the resource too (private runner or
    // migrations images).
    if let Some(secrets) = &sm.spec.runner.image_pull_secrets {
        let mut list = pod_spec.image_pull_secrets.take().unwrap_or_default();
        for s in secrets {
            if !list.contains(s) {
                list.push(s.clone());
            }
        }
        pod_spec.image_pull_secrets = Some(list);
    }
    patched.spec = Some(pod_spec);
    Ok(Outcome::Patched(Box::new(patched)))
}

#[cfg(test)]
mod tests;
