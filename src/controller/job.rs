//! What the controller creates: migration Jobs, as pure functions of the resource and the
//! decision. The runner's pod and container spec come from the runner contract
//! (`crate::runner::pod`), shared with the init container the webhook injects.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{
    Job, JobSpec, PodFailurePolicy, PodFailurePolicyOnExitCodesRequirement,
    PodFailurePolicyOnPodConditionsPattern, PodFailurePolicyRule,
};
use k8s_openapi::api::core::v1::{PodSpec, PodTemplateSpec};
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
        "secret": [&spec.database.url_secret_ref.name, &spec.database.url_secret_ref.key, secret_version],
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

/// The migration Job for `plan`.
pub fn job(
    sm: &SchemaMigration,
    plan: &JobPlan,
    image: &str,
    inline_config_map: Option<&str>,
) -> Job {
    let spec = &sm.spec;
    let target = plan.target.clone().unwrap_or_else(|| HEAD.into());
    let args = job_args(plan.command, plan.target.as_deref());
    let parts = runner_parts(sm, JOB_CONTAINERS, image, args, inline_config_map);
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
            active_deadline_seconds: Some(spec.runner.active_deadline_seconds.unwrap_or(1800)),
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
