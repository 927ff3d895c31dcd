//! What the controller creates: migration Jobs (and the ConfigMap that carries inline
//! migrations), as pure functions of the resource. The runner pod spec here is shared with
//! the init container the webhook injects: same image, Secret reference, security.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{
    Job, JobSpec, PodFailurePolicy, PodFailurePolicyOnExitCodesRequirement,
    PodFailurePolicyOnPodConditionsPattern, PodFailurePolicyRule,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, ObjectFieldSelector, PodSecurityContext, PodSpec, PodTemplateSpec,
    ResourceRequirements, SeccompProfile, SecretKeySelector, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;

use super::decide::{JobPlan, RunCommand};
use crate::api::{JOB_FOR_LABEL, LockKind, SchemaMigration, SourceSpec};
use crate::engine::script::sha256_hex;

/// Where the runner finds the migration files.
pub const MIGRATIONS_DIR: &str = "/migrations";
/// The volume holding them (prefixed: it joins the app's own volumes in gated pods).
pub const MIGRATIONS_VOLUME: &str = "schemagate-migrations";
/// The unprivileged user the runner runs as (distroless "nonroot").
pub const RUNNER_UID: i64 = 65532;
/// Annotation carrying the run hash of a Job.
pub const RUN_HASH_ANNOTATION: &str = "schemagate.dev/run-hash";
pub const TARGET_ANNOTATION: &str = "schemagate.dev/target";
pub const COMMAND_ANNOTATION: &str = "schemagate.dev/command";

/// The files of an inline source, named so that the engine reads them.
pub fn inline_files(source: &SourceSpec) -> Vec<(String, String)> {
    let mut files = Vec::new();
    for m in source.inline.iter().flatten() {
        let slug: String = m
            .description
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .collect::<String>()
            .trim_matches('_')
            .chars()
            .take(40)
            .collect();
        let stem = if slug.is_empty() {
            format!("{}_migration", m.version)
        } else {
            format!("{}_{slug}", m.version)
        };
        files.push((format!("{stem}.up.sql"), m.up.clone()));
        if let Some(down) = &m.down {
            files.push((format!("{stem}.down.sql"), down.clone()));
        }
    }
    files
}

/// A hash of migration files (names and contents, in name order).
pub fn files_hash(files: &[(String, String)]) -> String {
    let mut sorted: Vec<&(String, String)> = files.iter().collect();
    sorted.sort();
    let mut text = String::new();
    for (name, body) in sorted {
        text.push_str(&format!("{}\n{name}\n{}\n{body}\n", name.len(), body.len()));
    }
    sha256_hex(text.as_bytes())
}

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
    let fingerprint = serde_json::json!({
        "target": target,
        "command": command.as_str(),
        "source": source_hash,
        "secret": [&spec.database.url_secret_ref.name, &spec.database.url_secret_ref.key, secret_version],
        "runner": &spec.runner,
        "options": &spec.options,
    });
    sha256_hex(fingerprint.to_string().as_bytes())[..10].to_string()
}

/// A Job's name: the resource's name and the run hash, within the 63 characters a Job
/// name (it becomes a label value) may have.
pub fn job_name(sm_name: &str, hash: &str) -> String {
    let keep = 63 - hash.len() - 1;
    let base: String = sm_name.chars().take(keep).collect();
    format!("{}-{hash}", base.trim_end_matches('-'))
}

/// The ConfigMap holding an inline source for the runner.
pub fn inline_config_map_name(sm_name: &str, source_hash: &str) -> String {
    job_name(
        &format!("{sm_name}-inline"),
        &source_hash[..10.min(source_hash.len())],
    )
}

/// The owner reference that makes a child go with its SchemaMigration (never the
/// database).
pub fn owner_ref(sm: &SchemaMigration) -> Option<OwnerReference> {
    let mut o = sm.controller_owner_ref(&())?;
    o.block_owner_deletion = Some(true);
    Some(o)
}

fn labels(sm: &SchemaMigration) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "schemagate".into()),
        (
            "app.kubernetes.io/component".into(),
            "migration-runner".into(),
        ),
        ("app.kubernetes.io/managed-by".into(), "schemagate".into()),
        (
            JOB_FOR_LABEL.into(),
            sm.metadata.name.clone().unwrap_or_default(),
        ),
    ])
}

/// The ConfigMap of an inline source.
pub fn inline_config_map(
    sm: &SchemaMigration,
    name: &str,
    files: &[(String, String)],
) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: sm.metadata.namespace.clone(),
            labels: Some(labels(sm)),
            owner_references: owner_ref(sm).map(|o| vec![o]),
            ..Default::default()
        },
        data: Some(files.iter().cloned().collect()),
        immutable: Some(true),
        ..Default::default()
    }
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
                    values: vec![i32::from(crate::cli::exit::Exit::Stopped.code())],
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

/// The container security context of every runner (the `restricted` Pod Security Standard).
pub fn container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        run_as_user: Some(RUNNER_UID),
        run_as_group: Some(RUNNER_UID),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: None,
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            localhost_profile: None,
        }),
        ..Default::default()
    }
}

/// The pod security context of runner pods.
pub fn pod_security() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(RUNNER_UID),
        run_as_group: Some(RUNNER_UID),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            localhost_profile: None,
        }),
        ..Default::default()
    }
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    }
}

/// The runner's environment: the database URL by Secret reference (never a copied value),
/// where the files are, where the summary goes, and the resource's engine options.
pub fn runner_env(sm: &SchemaMigration) -> Vec<EnvVar> {
    let spec = &sm.spec;
    let mut out = vec![
        EnvVar {
            name: "DATABASE_URL".into(),
            value: None,
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: spec.database.url_secret_ref.name.clone(),
                    key: spec.database.url_secret_ref.key.clone(),
                    optional: Some(false),
                }),
                ..Default::default()
            }),
        },
        EnvVar {
            name: "POD_NAME".into(),
            value: None,
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "metadata.name".into(),
                    api_version: None,
                }),
                ..Default::default()
            }),
        },
        env("SCHEMAGATE_DIR", MIGRATIONS_DIR),
        env("SCHEMAGATE_SUMMARY_FILE", "/dev/termination-log"),
        env("SCHEMAGATE_LOG_FORMAT", "json"),
    ];
    let o = &spec.options;
    if o.lock == LockKind::Lease {
        out.push(env("SCHEMAGATE_LOCK", "lease"));
    }
    if o.deny_destructive {
        out.push(env("SCHEMAGATE_DENY_DESTRUCTIVE", "true"));
    }
    if let Some(t) = &o.history_table {
        out.push(env("SCHEMAGATE_HISTORY_TABLE", t));
    }
    if let Some(t) = &o.migration_lock_timeout {
        out.push(env("SCHEMAGATE_MIGRATION_LOCK_TIMEOUT", t));
    }
    if let Some(t) = &o.migration_statement_timeout {
        out.push(env("SCHEMAGATE_MIGRATION_STATEMENT_TIMEOUT", t));
    }
    out
}

/// The runner image: the resource's choice, else the controller's own.
pub fn runner_image<'a>(sm: &'a SchemaMigration, default_image: &'a str) -> &'a str {
    sm.spec.runner.image.as_deref().unwrap_or(default_image)
}

fn default_resources() -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".into(), Quantity("10m".into())),
            ("memory".into(), Quantity("32Mi".into())),
        ])),
        limits: Some(BTreeMap::from([(
            "memory".into(),
            Quantity("256Mi".into()),
        )])),
        ..Default::default()
    }
}

/// Volumes and extra init containers that put the migration files at `/migrations`.
/// `inline_config_map`: the ConfigMap made for an inline source.
pub fn migrations_volume(
    sm: &SchemaMigration,
    inline_config_map: Option<&str>,
) -> (Vec<Volume>, Vec<Container>) {
    let source = &sm.spec.source;
    let config_map = |name: &str| Volume {
        name: MIGRATIONS_VOLUME.into(),
        config_map: Some(ConfigMapVolumeSource {
            name: name.into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    if let Some(cm) = &source.config_map_ref {
        return (vec![config_map(&cm.name)], vec![]);
    }
    if let Some(name) = inline_config_map {
        return (vec![config_map(name)], vec![]);
    }
    let image = source
        .image
        .clone()
        .unwrap_or_else(|| crate::api::ImageSource {
            reference: String::new(),
            path: MIGRATIONS_DIR.into(),
        });
    let volume = Volume {
        name: MIGRATIONS_VOLUME.into(),
        empty_dir: Some(EmptyDirVolumeSource {
            size_limit: Some(Quantity("64Mi".into())),
            ..Default::default()
        }),
        ..Default::default()
    };
    // Copies the files out of the migrations image (it needs `cp`, as any base image has).
    let fetch = Container {
        name: "fetch-migrations".into(),
        image: Some(image.reference),
        command: Some(vec![
            "cp".into(),
            "-R".into(),
            format!("{}/.", image.path.trim_end_matches('/')),
            format!("{MIGRATIONS_DIR}/"),
        ]),
        volume_mounts: Some(vec![VolumeMount {
            name: MIGRATIONS_VOLUME.into(),
            mount_path: MIGRATIONS_DIR.into(),
            ..Default::default()
        }]),
        security_context: Some(container_security()),
        resources: Some(default_resources()),
        ..Default::default()
    };
    (vec![volume], vec![fetch])
}

/// The runner container: `schemagate migrate <args>` with the shared environment.
pub fn runner_container(
    sm: &SchemaMigration,
    name: &str,
    image: &str,
    args: Vec<String>,
) -> Container {
    Container {
        name: name.into(),
        image: Some(image.into()),
        args: Some(args),
        env: Some(runner_env(sm)),
        volume_mounts: Some(vec![
            VolumeMount {
                name: MIGRATIONS_VOLUME.into(),
                mount_path: MIGRATIONS_DIR.into(),
                read_only: Some(true),
                ..Default::default()
            },
            VolumeMount {
                name: "schemagate-tmp".into(),
                mount_path: "/tmp".into(),
                ..Default::default()
            },
        ]),
        resources: Some(
            sm.spec
                .runner
                .resources
                .clone()
                .unwrap_or_else(default_resources),
        ),
        security_context: Some(container_security()),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Default::default()
    }
}

/// Where a tool source's runner finds the schemagate binary (copied there by an init
/// container: the tool's image does not have it).
pub const BIN_DIR: &str = "/schemagate";
/// The volume holding it.
pub const BIN_VOLUME: &str = "schemagate-bin";
/// The init container that copies it.
pub const INSTALL_CONTAINER: &str = "schemagate-install";

/// The pieces of a runner: its volumes, the init containers that prepare them, and the
/// runner container itself.
pub struct RunnerParts {
    pub volumes: Vec<Volume>,
    pub init: Vec<Container>,
    pub runner: Container,
}

/// The runner of `sm` named `name`: `engine_args` (e.g. `migrate upgrade 3`) on the
/// engine from `image`; for a tool source, the tool's command from the tool's image under
/// `schemagate migrate exec` (the binary copied in from `image`).
pub fn runner_parts(
    sm: &SchemaMigration,
    name: &str,
    image: &str,
    engine_args: Vec<String>,
    inline_config_map: Option<&str>,
) -> RunnerParts {
    let Some(tool) = &sm.spec.source.tool else {
        let (mut volumes, init) = migrations_volume(sm, inline_config_map);
        volumes.push(tmp_volume());
        return RunnerParts {
            volumes,
            init,
            runner: runner_container(sm, name, image, engine_args),
        };
    };
    let bin = format!("{BIN_DIR}/schemagate");
    let bin_mount = |read_only| VolumeMount {
        name: BIN_VOLUME.into(),
        mount_path: BIN_DIR.into(),
        read_only: Some(read_only),
        ..Default::default()
    };
    let install = Container {
        name: INSTALL_CONTAINER.into(),
        image: Some(image.into()),
        args: Some(vec!["install".into(), bin.clone()]),
        volume_mounts: Some(vec![bin_mount(false)]),
        security_context: Some(container_security()),
        resources: Some(default_resources()),
        ..Default::default()
    };
    let mut args = vec![
        "migrate".to_string(),
        "--tool".into(),
        tool.name.tool().name().into(),
        "--output".into(),
        "json".into(),
        "exec".into(),
        "--".into(),
    ];
    args.extend(tool.command.iter().cloned());
    let mut runner = runner_container(sm, name, &tool.image, args);
    runner.command = Some(vec![bin]);
    runner.working_dir = tool.working_dir.clone();
    let env = runner.env.get_or_insert_with(Vec::new);
    env.retain(|e| e.name != "SCHEMAGATE_DIR");
    for e in &tool.env {
        env.push(EnvVar {
            name: e.name.clone(),
            value: Some(e.value.clone()),
            value_from: None,
        });
    }
    let mounts = runner.volume_mounts.get_or_insert_with(Vec::new);
    mounts.retain(|m| m.name != MIGRATIONS_VOLUME);
    mounts.push(bin_mount(true));
    RunnerParts {
        volumes: vec![
            Volume {
                name: BIN_VOLUME.into(),
                empty_dir: Some(EmptyDirVolumeSource {
                    size_limit: Some(Quantity("64Mi".into())),
                    ..Default::default()
                }),
                ..Default::default()
            },
            tmp_volume(),
        ],
        init: vec![install],
        runner,
    }
}

/// The small writable `/tmp` every runner gets (its root filesystem is read-only).
pub fn tmp_volume() -> Volume {
    Volume {
        name: "schemagate-tmp".into(),
        empty_dir: Some(EmptyDirVolumeSource {
            size_limit: Some(Quantity("16Mi".into())),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The migration Job for `plan`.
pub fn job(
    sm: &SchemaMigration,
    plan: &JobPlan,
    image: &str,
    inline_config_map: Option<&str>,
) -> Job {
    let spec = &sm.spec;
    let target = plan.target.clone().unwrap_or_else(|| "head".into());
    let args = vec![
        "migrate".into(),
        plan.command.as_str().into(),
        target.clone(),
        "--output".into(),
        "json".into(),
    ];
    let parts = runner_parts(sm, "migrate", image, args, inline_config_map);
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
