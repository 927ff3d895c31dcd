//! Pod in -> patched pod out, for both modes and every refusal.

use super::*;
use crate::api::{
    DowngradePolicy, ImageSource, MigrationMode, SchemaMigrationSpec, SchemaMigrationStatus,
    SourceSpec,
};
use k8s_openapi::api::core::v1::{Container, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time};
use std::collections::BTreeMap;
use std::time::Duration;

fn settings() -> InjectSettings {
    InjectSettings {
        image: "ghcr.io/schemagate/schemagate:0.1.0".into(),
        allowed_images: vec![],
        wait_timeout: Duration::from_secs(3600),
        ..Default::default()
    }
}

fn sm(mode: MigrationMode) -> SchemaMigration {
    let mut sm = SchemaMigration::new(
        "orders",
        SchemaMigrationSpec {
            target_version: Some("20251101".into()),
            mode,
            ..SchemaMigrationSpec::new(
                "orders-db",
                "url",
                SourceSpec::config_map("orders-migrations"),
            )
        },
    );
    sm.metadata.namespace = Some("shop".into());
    sm
}

fn pod(init: &[&str]) -> Pod {
    Pod {
        metadata: ObjectMeta {
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
            init_containers: (!init.is_empty()).then(|| {
                init.iter()
                    .map(|n| Container {
                        name: n.to_string(),
                        image: Some("busybox".into()),
                        ..Default::default()
                    })
                    .collect()
            }),
            volumes: Some(vec![Volume {
                name: "data".into(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    }
}

fn patched(o: Outcome) -> Pod {
    match o {
        Outcome::Patched(p) => *p,
        other => panic!("expected a patch: {other:?}"),
    }
}

fn init_names(p: &Pod) -> Vec<String> {
    p.spec
        .as_ref()
        .unwrap()
        .init_containers
        .iter()
        .flatten()
        .map(|c| c.name.clone())
        .collect()
}

#[test]
fn init_container_mode_prepends_the_migrating_runner_and_keeps_the_pods_own() {
    let p = patched(
        inject(
            &pod(&["app-init"]),
            "shop",
            "orders",
            Some(&sm(MigrationMode::InitContainer)),
            &settings(),
        )
        .unwrap(),
    );
    assert_eq!(init_names(&p), [INIT_CONTAINER, "app-init"]);
    let c = &p.spec.as_ref().unwrap().init_containers.as_ref().unwrap()[0];
    assert_eq!(
        c.image.as_deref(),
        Some("ghcr.io/schemagate/schemagate:0.1.0")
    );
    assert_eq!(
        c.args.as_ref().unwrap(),
        &[
            "migrate", "upgrade", "20251101", "--phase", "expand", "--output", "json"
        ]
    );
    let env = c.env.as_ref().unwrap();
    let url = env.iter().find(|e| e.name == "DATABASE_URL").unwrap();
    assert!(url.value.is_none(), "secretKeyRef, never a copied value");
    assert_eq!(
        url.value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap()
            .name,
        "orders-db"
    );
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(
        (
            sc.run_as_non_root,
            sc.read_only_root_filesystem,
            sc.allow_privilege_escalation
        ),
        (Some(true), Some(true), Some(false))
    );
    assert_eq!(
        c.termination_message_policy.as_deref(),
        Some("FallbackToLogsOnError")
    );
    assert!(c.resources.as_ref().unwrap().requests.is_some());
    let volumes: Vec<&str> = p
        .spec
        .as_ref()
        .unwrap()
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .collect();
    assert_eq!(volumes, ["data", "schemagate-migrations", "schemagate-tmp"]);
    // The app's containers are untouched.
    assert_eq!(
        p.spec.as_ref().unwrap().containers,
        pod(&[]).spec.unwrap().containers
    );
}

#[test]
fn native_sidecars_the_pod_starts_first_stay_before_the_runner() {
    let mut input = pod(&["db-proxy", "app-init"]);
    let init = input
        .spec
        .as_mut()
        .unwrap()
        .init_containers
        .as_mut()
        .unwrap();
    init[0].restart_policy = Some("Always".into());
    let p = patched(
        inject(
            &input,
            "shop",
            "orders",
            Some(&sm(MigrationMode::InitContainer)),
            &settings(),
        )
        .unwrap(),
    );
    assert_eq!(init_names(&p), ["db-proxy", INIT_CONTAINER, "app-init"]);
}

#[test]
fn job_mode_prepends_a_runner_that_only_waits() {
    let p = patched(
        inject(
            &pod(&[]),
            "shop",
            "orders",
            Some(&sm(MigrationMode::Job)),
            &settings(),
        )
        .unwrap(),
    );
    let c = &p.spec.as_ref().unwrap().init_containers.as_ref().unwrap()[0];
    assert_eq!(c.name, INIT_CONTAINER);
    assert_eq!(
        c.args.as_ref().unwrap(),
        &[
            "migrate",
            "wait",
            "--phase",
            "expand",
            "--version",
            "20251101",
            "--timeout",
            "3600s",
            "--output",
            "json"
        ]
    );
}

#[test]
fn an_injected_pod_is_never_injected_twice() {
    let s = sm(MigrationMode::InitContainer);
    let once = patched(inject(&pod(&[]), "shop", "orders", Some(&s), &settings()).unwrap());
    assert_eq!(
        inject(&once, "shop", "orders", Some(&s), &settings()).unwrap(),
        Outcome::Unchanged("already injected")
    );
}

#[test]
fn missing_paused_and_blocked_resources_refuse_the_pod_naming_why() {
    let e = inject(&pod(&[]), "shop", "orders", None, &settings()).unwrap_err();
    assert!(
        e.0.contains("shop/orders") && e.0.contains("does not exist"),
        "{}",
        e.0
    );

    let mut paused = sm(MigrationMode::InitContainer);
    paused.spec.paused = true;
    let e = inject(&pod(&[]), "shop", "orders", Some(&paused), &settings()).unwrap_err();
    assert!(e.0.contains("paused"), "{}", e.0);

    let mut blocked = sm(MigrationMode::InitContainer);
    blocked.status = Some(SchemaMigrationStatus {
        phase: Some(Phase::Blocked),
        conditions: vec![Condition {
            type_: conditions::STALLED.into(),
            status: "True".into(),
            reason: reason::DOWNGRADE_DENIED.into(),
            message: "the database is at 3, above the target 1".into(),
            observed_generation: None,
            last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
        }],
        ..Default::default()
    });
    // A verdict about an earlier generation of the spec does not refuse (the resource
    // changed in the same apply as the pod; its runner checks for itself) ...
    blocked.metadata.generation = Some(2);
    blocked.status.as_mut().unwrap().observed_generation = Some(1);
    assert!(inject(&pod(&[]), "shop", "orders", Some(&blocked), &settings()).is_ok());
    // ... a verdict about this very spec does.
    blocked.status.as_mut().unwrap().observed_generation = Some(2);
    let e = inject(&pod(&[]), "shop", "orders", Some(&blocked), &settings()).unwrap_err();
    assert!(
        e.0.contains("DowngradeDenied") && e.0.contains("above the target"),
        "{}",
        e.0
    );

    let mut foreign = sm(MigrationMode::InitContainer);
    foreign.spec.runner.image = Some("evil.example/runner:1".into());
    let e = inject(&pod(&[]), "shop", "orders", Some(&foreign), &settings()).unwrap_err();
    assert!(e.0.contains("does not allow"), "{}", e.0);
}

#[test]
fn image_sources_get_their_copy_container_first() {
    let mut s = sm(MigrationMode::InitContainer);
    s.spec.source = SourceSpec {
        image: Some(ImageSource {
            reference: "registry.example/orders-migrations:1.4".into(),
            path: "/migrations".into(),
        }),
        ..Default::default()
    };
    let p = patched(inject(&pod(&["app-init"]), "shop", "orders", Some(&s), &settings()).unwrap());
    assert_eq!(
        init_names(&p),
        [FETCH_CONTAINER, INIT_CONTAINER, "app-init"]
    );
}

#[test]
fn a_lower_target_with_downgrades_allowed_lets_the_runner_revert_whatever_the_status_says() {
    let mut s = sm(MigrationMode::InitContainer);
    s.spec.target_version = Some("1".into());
    s.spec.downgrade = DowngradePolicy::Allow;
    // A stale status (the database has moved since) must not matter: the runner decides
    // from the history table, under the lock.
    for current in ["3", "1", "0"] {
        s.status = Some(SchemaMigrationStatus {
            current_version: Some(current.into()),
            ..Default::default()
        });
        let p = patched(inject(&pod(&[]), "shop", "orders", Some(&s), &settings()).unwrap());
        let c = &p.spec.as_ref().unwrap().init_containers.as_ref().unwrap()[0];
        assert_eq!(
            c.args.as_ref().unwrap()[..6],
            [
                "migrate",
                "upgrade",
                "1",
                "--phase",
                "expand",
                "--allow-downgrade"
            ]
        );
    }
}

#[test]
fn the_label_names_the_resource() {
    assert_eq!(gated_by(&pod(&[])), Some("orders"));
    let mut p = pod(&[]);
    p.metadata.labels = None;
    assert_eq!(gated_by(&p), None);
}

#[test]
fn a_tool_source_injects_the_installer_and_the_tools_command_in_both_modes() {
    for mode in [MigrationMode::InitContainer, MigrationMode::Job] {
        let mut sm = sm(mode);
        sm.spec.target_version = None;
        sm.spec.source = SourceSpec {
            tool: Some(crate::api::ToolSource {
                name: crate::api::ToolName::Flyway,
                image: "shop/api:7".into(),
                command: vec!["flyway".into(), "migrate".into()],
                working_dir: None,
                env: vec![],
            }),
            ..Default::default()
        };
        let p = patched(
            inject(
                &pod(&["app-init"]),
                "shop",
                "orders",
                Some(&sm),
                &settings(),
            )
            .unwrap(),
        );
        assert_eq!(
            init_names(&p),
            [pod::INSTALL_CONTAINER, INIT_CONTAINER, "app-init"],
            "{mode:?}"
        );
        let init = p.spec.as_ref().unwrap().init_containers.as_ref().unwrap();
        assert_eq!(init[1].image.as_deref(), Some("shop/api:7"));
        let args = init[1].args.clone().unwrap();
        assert_eq!(
            args,
            [
                "migrate", "--tool", "flyway", "--output", "json", "exec", "--", "flyway",
                "migrate"
            ],
            "{mode:?}: the pod's copy runs the command too (a no-op after the Job)"
        );
        let volumes: Vec<&str> = p
            .spec
            .as_ref()
            .unwrap()
            .volumes
            .iter()
            .flatten()
            .map(|v| v.name.as_str())
            .collect();
        assert!(volumes.contains(&pod::BIN_VOLUME), "{volumes:?}");
    }
}

#[test]
fn a_plan_waiting_for_approval_refuses_pods_with_its_hash_and_an_approval_reaches_the_runner() {
    let hash = "5b0d9449d32bb146c117b19ef1d6b7817e5ed4ac66ade02e6423a48e933e57fe";
    let mut s = sm(MigrationMode::InitContainer);
    s.spec.approval.required = vec![crate::api::ApprovalKind::Destructive];
    s.metadata.generation = Some(4);
    s.status = Some(SchemaMigrationStatus {
        observed_generation: Some(4),
        phase: Some(Phase::Blocked),
        conditions: vec![Condition {
            type_: conditions::STALLED.into(),
            status: "True".into(),
            reason: reason::APPROVAL_REQUIRED.into(),
            message: format!(
                "pod web-0: refused: this plan needs an approval: approve plan hash {hash}"
            ),
            observed_generation: Some(4),
            last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
        }],
        ..Default::default()
    });
    let e = inject(&pod(&[]), "shop", "orders", Some(&s), &settings()).unwrap_err();
    assert!(
        e.0.contains("ApprovalRequired") && e.0.contains(hash),
        "{}",
        e.0
    );
    // Approving changes the spec: the next pod is admitted, its runner carries the policy
    // and the approval.
    s.metadata.generation = Some(5);
    s.spec.approved_plans = vec![crate::api::ApprovedPlan {
        plan_hash: hash.into(),
        approved_by: "dba".into(),
        reason: None,
    }];
    let p = patched(inject(&pod(&[]), "shop", "orders", Some(&s), &settings()).unwrap());
    let runner = p.spec.unwrap().init_containers.unwrap().remove(0);
    let env: Vec<(String, String)> = runner
        .env
        .unwrap()
        .into_iter()
        .filter_map(|e| e.value.map(|v| (e.name, v)))
        .collect();
    assert!(env.contains(&("SCHEMAGATE_REQUIRE_APPROVAL".into(), "Destructive".into())));
    assert!(env.contains(&("SCHEMAGATE_APPROVED_PLANS".into(), hash.into())));
}

#[test]
fn pods_of_a_fleet_start_once_every_database_is_at_their_version() {
    let mut s = sm(MigrationMode::Job);
    s.spec.database = None;
    s.spec.databases = Some(crate::api::DatabasesSpec {
        secret_selector: Default::default(),
        key: "url".into(),
        canary: 1,
        max_parallel: 4,
        on_failure: crate::api::FleetFailurePolicy::Halt,
    });
    s.metadata.generation = Some(2);
    let status = |at: u32, target: &str, generation: i64| SchemaMigrationStatus {
        observed_generation: Some(generation),
        target_version: Some(target.into()),
        databases: Some(crate::api::FleetStatus {
            total: 10,
            at_target: at,
            pending: 10 - at,
            ..Default::default()
        }),
        ..Default::default()
    };
    s.status = Some(status(7, "3", 2));
    let e = inject(&pod(&[]), "shop", "orders", Some(&s), &settings()).unwrap_err();
    assert!(e.0.contains("7 of 10 at 3"), "{}", e.0);
    s.status = Some(status(10, "3", 2));
    assert!(matches!(
        inject(&pod(&[]), "shop", "orders", Some(&s), &settings()),
        Ok(Outcome::Unchanged(_))
    ));
    // Its own files are newer than what the fleet reached: it waits.
    let e = fleet_gate(&s, "shop", Some("4")).unwrap_err();
    assert!(e.0.contains("every database is at 4"), "{}", e.0);
    // A restart of the version the whole fleet has reached starts while a newer rolls out.
    let mut rolling = status(7, "4", 2);
    rolling.current_version = Some("3".into());
    s.status = Some(rolling);
    assert!(fleet_gate(&s, "shop", Some("3")).is_ok());
    assert!(fleet_gate(&s, "shop", Some("4")).is_err());
    // A status about an earlier generation is not trusted.
    s.status = Some(status(10, "3", 1));
    assert!(inject(&pod(&[]), "shop", "orders", Some(&s), &settings()).is_err());
}
