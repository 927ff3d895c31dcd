//! What the controller creates: migration Jobs, as pure functions of the resource and the
//! decision. The runner's pod and container spec come from the runner contract
//! (`crate::runner::pod`), shared with the init container the webhook injects.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{
    Job, JobSpec, PodFailurePolicy, PodFailurePolicyOnExitCodesRequirement,
    PodFailurePolicyOnPodConditionsPattern, PodFailurePolicyRule,
};
use k8s_openapi::api::core::v1::{
    KeyToPath, PodSpec, PodTemplateSpec, ProjectedVolumeSource, SecretProjection, Volume,
    VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::decide::JobPlan;
use crate::api::SchemaMigration;
use crate::model::digest::sha256_hex;
use crate::runner::command::{HEAD, RunCommand, job_args};
use crate::runner::exit::Exit;
use crate::runner::pod::{JOB_CONTAINERS, pod_security, runner_parts};
use crate::runner::source::{child_name, labels, owner_ref};

/// Annotation carrying the run hash of a Job.
pub const RUN_HASH_ANNOTATION: &str = "schemagate.dev/run-hash";
pub const TARGET_ANNOTATION: &str = "schemagate.dev/target";
pub const COMMAND_ANNOTATION: &str = "schemagate.dev/command";

/// What determines a run, hashed: the target, the command, the source, the Secret (a new
/// URL may be a new database), and the runner settings (a retry after a fix). Not the
/// controller's own image: upgrading the controller does not re-run migrations.
pub fn run_hash(
    sm: &SchemaMigration,
    target: Option<&str>,
    command: RunCommand,
    source_hash: &str,
    secret_version: &str,
) -> String {
    let spec = &sm.spec;
    let mut fingerprint = serde_json::json!({
        "target": target,
        "command": command.as_str(),
        "source": source_hash,
        "secret": spec.secret_ref().map(|r| serde_json::json!([&r.name, &r.key, secret_version])),
        "runner": &spec.runner,
        "options": &spec.options,
    });
    // Only with an approval policy (the names of every other resource's Jobs stay as they
    // were): a new approval is a new run.
    if !spec.approval.is_empty() {
        fingerprint["approval"] = serde_json::json!([&spec.approval, &spec.approved_plans]);
    }
    sha256_hex(fingerprint.to_string().as_bytes())[..10].to_string()
}

/// A runner stopped on request (its pod evicted or deleted: exit 18, or a disruption)
/// applied nothing halfway: the Job starts another pod without counting it as a failure.
fn stop_is_not_failure(container: &str) -> PodFailurePolicy {
    PodFailurePolicy {
        rules: vec![
            PodFailurePolicyRule {
                action: "Ignore".into(),
                on_exit_codes: Some(PodFailurePolicyOnExitCodesRequirement {
                    container_name: Some(container.into()),
                    operator: "In".into(),
                    values: vec![i32::from(Exit::Stopped.code())],
                }),
                on_pod_conditions: None,
            },
            PodFailurePolicyRule {
                action: "Ignore".into(),
                on_exit_codes: None,
                on_pod_conditions: Some(vec![PodFailurePolicyOnPodConditionsPattern {
                    type_: "DisruptionTarget".into(),
                    status: "True".into(),
                }]),
            },
        ],
    }
}

/// A Job's name: the resource's name and the run hash.
pub fn job_name(sm_name: &str, hash: &str) -> String {
    child_name(sm_name, hash)
}

/// A fleet batch's Job name: the run hash and the batch's members, hashed (the same batch
/// of the same run is the same Job: found again after a restart, never made twice).
pub fn batch_job_name(sm_name: &str, run_hash: &str, members: &[String]) -> String {
    let h = sha256_hex(format!("{run_hash}\n{}", members.join("\n")).as_bytes());
    child_name(sm_name, &h[..10])
}

/// Where a fleet Job's runner finds its databases: one file per Secret.
pub const DATABASES_DIR: &str = "/databases";
const DATABASES_VOLUME: &str = "databases";

/// The Secrets a fleet Job mounts (read back from its volume).
pub fn batch_members(job: &Job) -> Vec<String> {
    job.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|s| s.volumes.as_ref())
        .and_then(|v| v.iter().find(|v| v.name == DATABASES_VOLUME))
        .and_then(|v| v.projected.as_ref())
        .map(|p| {
            p.sources
                .iter()
                .flatten()
                .filter_map(|s| s.secret.as_ref().map(|s| s.name.clone()))
                .collect()
        })
        .unwrap_or_default()
}

/// A fleet Job's runner arguments: the fan-out over the mounted Secrets.
fn batch_args(sm: &SchemaMigration, target: Option<&str>) -> Vec<String> {
    let d = sm.spec.databases.clone().unwrap_or_default();
    vec![
        "migrate".into(),
        "upgrade".into(),
        target.unwrap_or(HEAD).into(),
        "--databases".into(),
        DATABASES_DIR.into(),
        // The controller runs the canary as a batch of its own, before the rest.
        "--canary".into(),
        "0".into(),
        "--max-parallel".into(),
        d.max_parallel.to_string(),
        "--on-failure".into(),
        match d.on_failure {
            crate::api::FleetFailurePolicy::Halt => "halt",
            crate::api::FleetFailurePolicy::Continue => "continue",
        }
        .into(),
        "--output".into(),
        "json".into(),
    ]
}

/// The migration Job for `plan`.
pub fn job(
    sm: &SchemaMigration,
    plan: &JobPlan,
    image: &str,
    inline_config_map: Option<&str>,
) -> Job {
    let spec = &sm.spec;
    let target = plan.target.clone().unwrap_or_else(|| HEAD.into());
    let fleet = !plan.members.is_empty();
    let args = if fleet {
        batch_args(sm, plan.target.as_deref())
    } else {
        job_args(plan.command, plan.target.as_deref())
    };
    let mut parts = runner_parts(sm, JOB_CONTAINERS, image, args, inline_config_map);
    if fleet {
        let key = sm
            .spec
            .databases
            .as_ref()
            .map(|d| d.key.clone())
            .unwrap_or_else(|| "url".into());
        parts.volumes.push(Volume {
            name: DATABASES_VOLUME.into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(
                    plan.members
                        .iter()
                        .map(|m| VolumeProjection {
                            secret: Some(SecretProjection {
                                name: m.clone(),
                                items: Some(vec![KeyToPath {
                                    key: key.clone(),
                                    path: m.clone(),
                                    mode: None,
                                }]),
                                optional: Some(false),
                            }),
                            ..Default::default()
                        })
                        .collect(),
                ),
                default_mode: Some(0o400),
            }),
            ..Default::default()
        });
        parts
            .runner
            .volume_mounts
            .get_or_insert_with(Vec::new)
            .push(VolumeMount {
                name: DATABASES_VOLUME.into(),
                mount_path: DATABASES_DIR.into(),
                read_only: Some(true),
                ..Default::default()
            });
    }
    let labels = labels(sm);
    let annotations = BTreeMap::from([
        (RUN_HASH_ANNOTATION.into(), plan.run_hash.clone()),
        (TARGET_ANNOTATION.into(), target),
        (COMMAND_ANNOTATION.into(), plan.command.as_str().into()),
    ]);
    Job {
        metadata: ObjectMeta {
            name: Some(plan.name.clone()),
            namespace: sm.metadata.namespace.clone(),
            labels: Some(labels.clone()),
            annotations: Some(annotations),
            owner_references: owner_ref(sm).map(|o| vec![o]),
            ..Default::default()
        },
        spec: Some(JobSpec {
            pod_failure_policy: Some(stop_is_not_failure(&parts.runner.name)),
            backoff_limit: Some(spec.runner.backoff_limit.unwrap_or(1)),
            // A batch runs its databases `maxParallel` at a time: each wave gets the time of
            // one run (at most a day in all).
            active_deadline_seconds: Some(spec.runner.active_deadline_seconds.unwrap_or_else(
                || {
                    let parallel =
                        spec.databases.as_ref().map_or(1, |d| d.max_parallel.max(1)) as i64;
                    let waves = ((plan.members.len() as i64 + parallel - 1) / parallel).max(1);
                    (1800 * waves).min(86_400)
                },
            )),
            ttl_seconds_after_finished: spec.runner.ttl_seconds_after_finished,
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    restart_policy: Some("Never".into()),
                    service_account_name: spec.runner.service_account_name.clone(),
                    // The runner talks to the database, never to the Kubernetes API.
                    automount_service_account_token: Some(false),
                    node_selector: spec.runner.node_selector.clone(),
                    tolerations: spec.runner.tolerations.clone(),
                    image_pull_secrets: spec.runner.image_pull_secrets.clone(),
                    security_context: Some(pod_security()),
                    init_containers: (!parts.init.is_empty()).then_some(parts.init),
                    containers: vec![parts.runner],
                    volumes: Some(parts.volumes),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests;
