//! Multi-tenant safety: what runs passes the `restricted` Pod Security Standard, resources
//! can only name objects of their own namespace, and a failing run shows the database
//! password nowhere (the controller's surfaces are checked in `tests/controller.rs`).

mod support;

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, HostPathVolumeSource, Pod, PodSecurityContext, PodSpec,
    SecurityContext, Volume, VolumeMount,
};
use schemagate::api::{
    ImageSource, InlineMigration, MIGRATION_LABEL, MigrationMode, SchemaMigration,
    SchemaMigrationSpec, SourceSpec,
};
use schemagate::controller::decide::{JobPlan, RunCommand};
use schemagate::controller::job;
use schemagate::webhook::{FETCH_CONTAINER, INIT_CONTAINER, InjectSettings, Outcome, inject};
use support::postgres::{PASSWORD, server, urlencode};
use support::pss::restricted_violations;
use support::*;

const IMAGE: &str = "ghcr.io/schemagate/schemagate:test";

fn sources() -> Vec<(&'static str, SourceSpec)> {
    vec![
        ("configMap", SourceSpec::config_map("orders-migrations")),
        (
            "inline",
            SourceSpec {
                inline: Some(vec![InlineMigration {
                    version: "1".into(),
                    description: "init".into(),
                    up: "CREATE TABLE t (id INT);".into(),
                    down: None,
                }]),
                ..Default::default()
            },
        ),
        (
            "image",
            SourceSpec {
                image: Some(ImageSource {
                    reference: "registry.example/orders-migrations:4".into(),
                    path: "/migrations".into(),
                }),
                ..Default::default()
            },
        ),
    ]
}

fn resource(mode: MigrationMode, source: SourceSpec) -> SchemaMigration {
    let mut sm = SchemaMigration::new(
        "orders",
        SchemaMigrationSpec {
            mode,
            target_version: Some("1".into()),
            ..SchemaMigrationSpec::new("orders-db", "url", source)
        },
    );
    sm.metadata.namespace = Some("shop".into());
    sm.metadata.uid = Some("uid-1".into());
    sm
}

#[test]
fn the_checker_finds_what_restricted_forbids() {
    let bad = PodSpec {
        host_network: Some(true),
        security_context: Some(PodSecurityContext {
            run_as_user: Some(0),
            ..Default::default()
        }),
        containers: vec![Container {
            name: "app".into(),
            security_context: Some(SecurityContext {
                privileged: Some(true),
                capabilities: Some(Capabilities {
                    add: Some(vec!["SYS_ADMIN".into()]),
                    drop: None,
                }),
                ..Default::default()
            }),
            volume_mounts: Some(vec![VolumeMount {
                name: "host".into(),
                mount_path: "/host".into(),
                ..Default::default()
            }]),
            ..Default::default()
        }],
        volumes: Some(vec![Volume {
            name: "host".into(),
            host_path: Some(HostPathVolumeSource {
                path: "/".into(),
                type_: None,
            }),
            ..Default::default()
        }]),
        ..Default::default()
    };
    let v = restricted_violations(&bad, None).join("\n");
    for expected in [
        "hostNetwork",
        "runAsUser must not be 0",
        "privileged",
        "SYS_ADMIN",
        "drop ALL",
        "allowPrivilegeEscalation",
        "runAsNonRoot",
        "seccompProfile",
        "volume host",
    ] {
        assert!(v.contains(expected), "missing {expected}: {v}");
    }
}

#[test]
fn migration_jobs_pass_the_restricted_pod_security_standard() {
    for (name, source) in sources() {
        let sm = resource(MigrationMode::Job, source);
        let plan = JobPlan {
            name: "orders-1-abc".into(),
            target: Some("1".into()),
            command: RunCommand::Upgrade,
            run_hash: "abc".into(),
            members: Vec::new(),
        };
        let j = job::job(&sm, &plan, IMAGE, Some("orders-inline-abc"));
        let spec = j.spec.unwrap().template.spec.unwrap();
        let v = restricted_violations(&spec, None);
        assert!(v.is_empty(), "{name}: {v:#?}");
        // A fleet's batch Job too (its Secrets mounted read-only, owner-only files).
        let mut fleet = sm.clone();
        fleet.spec.database = None;
        fleet.spec.databases = Some(schemagate::api::DatabasesSpec {
            secret_selector: Default::default(),
            key: "url".into(),
            canary: 1,
            max_parallel: 4,
            on_failure: schemagate::api::FleetFailurePolicy::Halt,
        });
        let batch = JobPlan {
            members: vec!["tenant-a".into()],
            ..plan.clone()
        };
        let j = job::job(&fleet, &batch, IMAGE, Some("orders-inline-abc"));
        let spec = j.spec.unwrap().template.spec.unwrap();
        let v = restricted_violations(&spec, None);
        assert!(v.is_empty(), "{name} (fleet): {v:#?}");
        assert_eq!(spec.automount_service_account_token, Some(false));
    }
}

#[test]
fn injected_containers_pass_restricted_in_an_app_pod_that_sets_nothing() {
    // The app's pod has no security context at all: ours must pass on their own.
    let app = Pod {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some("web-1".into()),
            labels: Some(BTreeMap::from([(MIGRATION_LABEL.into(), "orders".into())])),
            ..Default::default()
        },
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "web".into(),
                image: Some("shop/web:2".into()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    let settings = InjectSettings {
        image: IMAGE.into(),
        allowed_images: vec![],
        wait_timeout: std::time::Duration::from_secs(600),
        ..Default::default()
    };
    for mode in [MigrationMode::InitContainer, MigrationMode::Job] {
        for (name, source) in sources() {
            let sm = resource(mode, source);
            let Outcome::Patched(pod) =
                inject(&app, "shop", "orders", Some(&sm), &settings).unwrap()
            else {
                panic!("not injected")
            };
            let spec = pod.spec.unwrap();
            let ours: Vec<&str> = if name == "image" {
                vec![FETCH_CONTAINER, INIT_CONTAINER]
            } else {
                vec![INIT_CONTAINER]
            };
            let v = restricted_violations(&spec, Some(&ours));
            assert!(v.is_empty(), "{mode:?}/{name}: {v:#?}");
        }
    }
}

#[test]
fn resources_can_only_name_objects_of_their_own_namespace() {
    let crd: serde_json::Value = serde_yaml::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("crds/schemagate.dev_schemamigrations.yaml"),
        )
        .unwrap(),
    )
    .unwrap();
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    fn walk(v: &serde_json::Value, path: &str, found: &mut Vec<String>) {
        if let Some(props) = v.get("properties").and_then(|p| p.as_object()) {
            for (k, sub) in props {
                // Tolerations and resources are Kubernetes types without references.
                if k.to_ascii_lowercase().contains("namespace") {
                    found.push(format!("{path}.{k}"));
                }
                walk(sub, &format!("{path}.{k}"), found);
            }
        }
        if let Some(items) = v.get("items") {
            walk(items, &format!("{path}[]"), found);
        }
    }
    let mut found = Vec::new();
    walk(spec, "spec", &mut found);
    assert!(
        found.is_empty(),
        "fields that could point elsewhere: {found:?}"
    );
    // References are plain names.
    for (path, r) in [
        (
            "urlSecretRef",
            &spec["properties"]["database"]["properties"]["urlSecretRef"],
        ),
        (
            "configMapRef",
            &spec["properties"]["source"]["properties"]["configMapRef"],
        ),
    ] {
        let keys: Vec<&String> = r["properties"].as_object().unwrap().keys().collect();
        assert!(
            keys.iter().all(|k| *k == "name" || *k == "key"),
            "{path}: {keys:?}"
        );
    }
}

#[test]
fn a_failing_run_shows_the_password_nowhere() {
    let url = server().fresh_db();
    let dir = MigDir::new();
    dir.pair("1", "ok", "CREATE TABLE t1 (id INT);\n", None);
    dir.pair(
        "2",
        "broken",
        "CREATE TABLE t2 (id INT);\nINSERT INTO nowhere VALUES (1);\n",
        None,
    );
    let secrets = [PASSWORD.to_string(), urlencode(PASSWORD)];
    let logs = tempfile::tempdir().unwrap();
    let mut surfaces: Vec<(String, String)> = Vec::new();
    // A wrong password too: the server's refusal must not echo it.
    let wrong = url.replace(&urlencode(PASSWORD), &urlencode("Wr0ng-Pa55&Secret"));
    for (label, db, expect) in [
        ("failing migration", &url, 12),
        ("wrong password", &wrong, 11),
    ] {
        for output in ["human", "json"] {
            for log in ["text", "json"] {
                let summary = logs.path().join(format!("{label}-{output}-{log}.json"));
                let mut c = migrate(db, dir.path());
                c.args([
                    "upgrade",
                    "--output",
                    output,
                    "--log-format",
                    log,
                    "--log-level",
                    "debug",
                ])
                .env("SCHEMAGATE_SUMMARY_FILE", &summary);
                let o = run(c);
                assert_code(&o, expect);
                let at = format!("{label} upgrade -o {output} --log-format {log}");
                surfaces.push((
                    format!("{at}: stdout"),
                    String::from_utf8_lossy(&o.stdout).into(),
                ));
                surfaces.push((
                    format!("{at}: stderr"),
                    String::from_utf8_lossy(&o.stderr).into(),
                ));
                surfaces.push((
                    format!("{at}: summary file"),
                    std::fs::read_to_string(&summary).unwrap_or_default(),
                ));
            }
        }
        for cmd in ["status", "current", "history", "plan", "verify"] {
            for output in ["human", "json"] {
                let mut c = migrate(db, dir.path());
                c.args([cmd, "--output", output, "--log-level", "debug"]);
                let o = run(c);
                let at = format!("{label} {cmd} -o {output}");
                surfaces.push((
                    format!("{at}: stdout"),
                    String::from_utf8_lossy(&o.stdout).into(),
                ));
                surfaces.push((
                    format!("{at}: stderr"),
                    String::from_utf8_lossy(&o.stderr).into(),
                ));
            }
        }
    }
    // The failure is really reported (the scan is of something).
    let json_failure = surfaces
        .iter()
        .find(|(at, _)| at == "failing migration upgrade -o json --log-format text: stdout")
        .unwrap();
    assert!(json_failure.1.contains("nowhere"), "{}", json_failure.1);
    for (at, text) in &surfaces {
        for s in secrets.iter().chain([&"Wr0ng-Pa55".to_string()]) {
            assert!(!text.contains(s.as_str()), "{at} shows a password:\n{text}");
        }
    }
}
