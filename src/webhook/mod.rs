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

use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Volume};

use crate::api::conditions::{self, reason};
use crate::api::{MIGRATION_LABEL, MigrationMode, Phase, SchemaMigration};
use crate::controller::job;
use crate::engine::Version;

/// The injected init container (both modes: it migrates, or waits for the version).
pub const INIT_CONTAINER: &str = "schemagate-migrate";
/// The init container that copies an image source's files (runs before ours).
pub const FETCH_CONTAINER: &str = "schemagate-fetch-migrations";

/// How injection behaves.
#[derive(Clone, Debug)]
pub struct InjectSettings {
    /// The default runner image (the controller's own).
    pub image: String,
    /// Further allowed runner images (`*` suffix patterns).
    pub allowed_images: Vec<String>,
    /// Job mode: how long the injected init container waits for the version before it
    /// fails (and the kubelet restarts it).
    pub wait_timeout: Duration,
}

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

/// The runner's arguments for this resource.
fn runner_args(sm: &SchemaMigration, settings: &InjectSettings) -> Vec<String> {
    let status = sm.status.clone().unwrap_or_default();
    let target = sm
        .spec
        .target_version
        .clone()
        .or_else(|| status.target_version.clone());
    let mut args = vec!["migrate".to_string()];
    match sm.spec.mode {
        MigrationMode::InitContainer => {
            // A lower target with downgrades allowed reverts; anything else upgrades (an
            // upgrade to a lower target changes nothing).
            let ahead = match (status.current_version.as_deref(), target.as_deref()) {
                (Some(c), Some(t)) => match (Version::parse(c), Version::parse(t)) {
                    (Ok(c), Ok(t)) => c > t,
                    _ => false,
                },
                _ => false,
            };
            let downgrade = ahead && sm.spec.downgrade == crate::api::DowngradePolicy::Allow;
            args.push(if downgrade { "downgrade" } else { "upgrade" }.into());
            args.push(target.unwrap_or_else(|| "head".into()));
        }
        MigrationMode::Job => {
            args.push("wait".into());
            if let Some(t) = target {
                args.push("--version".into());
                args.push(t);
            }
            args.push("--timeout".into());
            args.push(format!("{}s", settings.wait_timeout.as_secs()));
        }
    }
    args.extend(["--output".into(), "json".into()]);
    args
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
    let status = sm.status.clone().unwrap_or_default();
    if status.phase == Some(Phase::Blocked) {
        let why = status
            .conditions
            .iter()
            .find(|c| c.type_ == conditions::STALLED)
            .map(|c| format!("{}: {}", c.reason, c.message))
            .unwrap_or_else(|| reason::DOWNGRADE_DENIED.into());
        return Err(refuse(ns, name, format!("is blocked ({why})")));
    }
    let image = job::runner_image(sm, &settings.image);
    if !crate::controller::reconcile::image_allowed(
        image,
        &settings.image,
        &settings.allowed_images,
    ) {
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

    let inline_cm = sm.spec.source.inline.as_ref().map(|_| {
        let files = job::inline_files(&sm.spec.source);
        job::inline_config_map_name(
            &sm.metadata.name.clone().unwrap_or_default(),
            &job::files_hash(&files),
        )
    });
    // A tool source runs the tool's command under `migrate exec` in both modes: in Job
    // mode the pod's copy waits on the lock while the Job runs, then finds nothing to do.
    let job::RunnerParts {
        volumes,
        init: mut fetch,
        runner,
    } = job::runner_parts(
        sm,
        INIT_CONTAINER,
        image,
        runner_args(sm, settings),
        inline_cm.as_deref(),
    );
    for f in fetch.iter_mut().filter(|f| f.name == "fetch-migrations") {
        f.name = FETCH_CONTAINER.into();
    }

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
