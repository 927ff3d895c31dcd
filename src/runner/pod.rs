//! The runner's pod and container spec, shared by the controller's migration Jobs and the
//! init container the webhook injects into gated pods: same image, Secret reference,
//! security context, volumes and environment.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    ObjectFieldSelector, PodSecurityContext, ResourceRequirements, SeccompProfile,
    SecretKeySelector, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use crate::api::{DestructivePolicy, LintPolicy, LockKind, SchemaMigration};

/// Where the runner finds the migration files.
pub const MIGRATIONS_DIR: &str = "/migrations";
/// The volume holding them (prefixed: it joins the app's own volumes in gated pods).
pub const MIGRATIONS_VOLUME: &str = "schemagate-migrations";
/// The unprivileged user the runner runs as (distroless "nonroot").
pub const RUNNER_UID: i64 = 65532;

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
    let mut out: Vec<EnvVar> = spec
        .secret_ref()
        .map(|r| EnvVar {
            name: "DATABASE_URL".into(),
            value: None,
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: r.name.clone(),
                    key: r.key.clone(),
                    optional: Some(false),
                }),
                ..Default::default()
            }),
        })
        .into_iter()
        .collect();
    out.extend([
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
    ]);
    let o = &spec.options;
    if o.lock == LockKind::Lease {
        out.push(env("SCHEMAGATE_LOCK", "lease"));
    }
    match o.lint {
        LintPolicy::Warn => {}
        LintPolicy::Deny => out.push(env("SCHEMAGATE_LINT", "deny")),
        LintPolicy::Off => out.push(env("SCHEMAGATE_LINT", "off")),
    }
    if o.destructive == DestructivePolicy::Allow {
        out.push(env("SCHEMAGATE_DESTRUCTIVE", "allow"));
    }
    if let Some(t) = &o.history_table {
        out.push(env("SCHEMAGATE_HISTORY_TABLE", t));
    }
    if let Some(t) = &o.migration_lock_timeout {
        out.push(env("SCHEMAGATE_MIGRATION_LOCK_TIMEOUT", t));
    }
    if let Some(t) = &o.lock_retry_budget {
        out.push(env("SCHEMAGATE_LOCK_RETRY_BUDGET", t));
    }
    if let Some(t) = &o.migration_statement_timeout {
        out.push(env("SCHEMAGATE_MIGRATION_STATEMENT_TIMEOUT", t));
    }
    // Approvals: what needs one, and the approved plan hashes (as of this pod's admission
    // or this Job's creation: a later approval reaches the runs started after it).
    if !spec.approval.required.is_empty() {
        let kinds: Vec<&str> = spec.approval.required.iter().map(|k| k.as_str()).collect();
        out.push(env("SCHEMAGATE_REQUIRE_APPROVAL", &kinds.join(",")));
        if !spec.approved_plans.is_empty() {
            let hashes: Vec<&str> = spec
                .approved_plans
                .iter()
                .map(|a| a.plan_hash.as_str())
                .collect();
            out.push(env("SCHEMAGATE_APPROVED_PLANS", &hashes.join(",")));
        }
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
    fetch_name: &str,
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
        name: fetch_name.into(),
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

/// What a runner's containers are called: in a Job's own pod, or in an app pod they join
/// (prefixed there, beside the app's own containers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ContainerNames {
    /// The runner itself.
    pub runner: &'static str,
    /// The init container that copies an image source's files.
    pub fetch: &'static str,
    /// The init container that copies the schemagate binary into a tool's image.
    pub install: &'static str,
}

/// The containers of a migration Job's pod.
pub const JOB_CONTAINERS: ContainerNames = ContainerNames {
    runner: "migrate",
    fetch: "fetch-migrations",
    install: INSTALL_CONTAINER,
};

/// The containers the webhook injects into a gated app pod.
pub const INJECTED_CONTAINERS: ContainerNames = ContainerNames {
    runner: "schemagate-migrate",
    fetch: "schemagate-fetch-migrations",
    install: INSTALL_CONTAINER,
};

/// The runner of `sm` named by `names`: `engine_args` (e.g. `migrate upgrade 3`) on the
/// engine from `image`; for a tool source, the tool's command from the tool's image under
/// `schemagate migrate exec` (the binary copied in from `image`).
pub fn runner_parts(
    sm: &SchemaMigration,
    names: ContainerNames,
    image: &str,
    engine_args: Vec<String>,
    inline_config_map: Option<&str>,
) -> RunnerParts {
    let Some(tool) = &sm.spec.source.tool else {
        let (mut volumes, init) = migrations_volume(sm, inline_config_map, names.fetch);
        volumes.push(tmp_volume());
        return RunnerParts {
            volumes,
            init,
            runner: runner_container(sm, names.runner, image, engine_args),
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
        name: names.install.into(),
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
        super::source::tool(tool.name).name().into(),
        "--output".into(),
        "json".into(),
        "exec".into(),
        "--".into(),
    ];
    args.extend(tool.command.iter().cloned());
    let mut runner = runner_container(sm, names.runner, &tool.image, args);
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
