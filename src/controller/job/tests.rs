use super::*;
use crate::api::JOB_FOR_LABEL;
use crate::api::{ImageSource, InlineMigration, MigrationMode, SchemaMigrationSpec, SourceSpec};
use crate::runner::pod::*;
use crate::runner::source::*;

fn sm(source: SourceSpec) -> SchemaMigration {
    let mut sm = SchemaMigration::new(
        "orders",
        SchemaMigrationSpec {
            mode: MigrationMode::Job,
            ..SchemaMigrationSpec::new("orders-db", "url", source)
        },
    );
    sm.metadata.namespace = Some("shop".into());
    sm.metadata.uid = Some("uid-1".into());
    sm
}

fn cm_source() -> SourceSpec {
    SourceSpec::config_map("orders-migrations")
}

fn plan() -> JobPlan {
    JobPlan {
        name: "orders-0123456789".into(),
        target: Some("3".into()),
        command: RunCommand::Upgrade,
        run_hash: "0123456789".into(),
        members: Vec::new(),
    }
}

#[test]
fn names_are_deterministic_and_fit_label_values() {
    let s = sm(cm_source());
    let a = run_hash(&s, Some("3"), RunCommand::Upgrade, "src", "7");
    assert_eq!(a, run_hash(&s, Some("3"), RunCommand::Upgrade, "src", "7"));
    assert_ne!(a, run_hash(&s, Some("4"), RunCommand::Upgrade, "src", "7"));
    assert_ne!(a, run_hash(&s, Some("3"), RunCommand::Upgrade, "src2", "7"));
    assert_ne!(
        a,
        run_hash(&s, Some("3"), RunCommand::Downgrade, "src", "7")
    );
    assert_ne!(a, run_hash(&s, Some("3"), RunCommand::Upgrade, "src", "8"));
    let long = "x".repeat(80);
    let name = job_name(&long, &a);
    assert!(name.len() <= 63, "{}", name.len());
    assert!(name.ends_with(&a));
}

#[test]
fn the_job_runs_the_engine_with_the_secret_by_reference_and_hardened_security() {
    let s = sm(cm_source());
    let job = job(&s, &plan(), "ghcr.io/schemagate/schemagate:0.1.0", None);
    let meta = &job.metadata;
    assert_eq!(meta.name.as_deref(), Some("orders-0123456789"));
    assert_eq!(meta.namespace.as_deref(), Some("shop"));
    let owner = &meta.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()),
        ("SchemaMigration", "orders", "uid-1")
    );
    assert_eq!(owner.controller, Some(true));
    assert_eq!(owner.block_owner_deletion, Some(true));
    assert_eq!(
        meta.annotations.as_ref().unwrap()[RUN_HASH_ANNOTATION],
        "0123456789"
    );

    let spec = job.spec.as_ref().unwrap();
    assert_eq!(spec.backoff_limit, Some(1));
    assert_eq!(spec.active_deadline_seconds, Some(1800));
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
    assert_eq!(pod.automount_service_account_token, Some(false));
    let labels = spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .as_ref()
        .unwrap();
    assert_eq!(labels[JOB_FOR_LABEL], "orders");
    assert!(
        !labels.contains_key(crate::api::MIGRATION_LABEL),
        "runner pods are never gated"
    );

    let c = &pod.containers[0];
    assert_eq!(
        c.image.as_deref(),
        Some("ghcr.io/schemagate/schemagate:0.1.0")
    );
    assert_eq!(
        c.args.as_ref().unwrap(),
        &[
            "migrate", "upgrade", "3", "--phase", "expand", "--output", "json"
        ]
    );
    assert_eq!(
        c.termination_message_policy.as_deref(),
        Some("FallbackToLogsOnError")
    );
    let env = c.env.as_ref().unwrap();
    let url = env.iter().find(|e| e.name == "DATABASE_URL").unwrap();
    assert!(url.value.is_none(), "never a copied value");
    let key = url
        .value_from
        .as_ref()
        .unwrap()
        .secret_key_ref
        .as_ref()
        .unwrap();
    assert_eq!((key.name.as_str(), key.key.as_str()), ("orders-db", "url"));
    assert!(env.iter().any(|e| e.name == "SCHEMAGATE_SUMMARY_FILE"
        && e.value.as_deref() == Some("/dev/termination-log")));

    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(
        sc.capabilities.as_ref().unwrap().drop.as_ref().unwrap(),
        &["ALL"]
    );
    assert_eq!(sc.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
    let psc = pod.security_context.as_ref().unwrap();
    assert_eq!(psc.run_as_non_root, Some(true));

    let vols = pod.volumes.as_ref().unwrap();
    let mig = vols
        .iter()
        .find(|v| v.name == "schemagate-migrations")
        .unwrap();
    assert_eq!(mig.config_map.as_ref().unwrap().name, "orders-migrations");
    let mount = c
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.name == "schemagate-migrations")
        .unwrap();
    assert_eq!(
        (mount.mount_path.as_str(), mount.read_only),
        ("/migrations", Some(true))
    );
}

#[test]
fn inline_sources_become_an_owned_immutable_config_map() {
    let s = sm(SourceSpec {
        inline: Some(vec![
            InlineMigration {
                version: "1".into(),
                description: "Create orders!".into(),
                up: "CREATE TABLE orders (id int);".into(),
                down: Some("DROP TABLE orders;".into()),
            },
            InlineMigration {
                version: "2".into(),
                description: String::new(),
                up: "SELECT 1;".into(),
                down: None,
            },
        ]),
        ..Default::default()
    });
    let files = inline_files(&s.spec.source);
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "1_create_orders.up.sql",
            "1_create_orders.down.sql",
            "2_migration.up.sql"
        ]
    );
    let set = crate::engine::source::load_files("inline", files.clone()).unwrap();
    assert_eq!(
        set.migrations.len(),
        2,
        "the engine reads what the controller writes"
    );
    let hash = files_hash(&files);
    let name = inline_config_map_name("orders", &hash);
    let cm = inline_config_map(&s, &name, &files);
    assert_eq!(cm.immutable, Some(true));
    assert_eq!(cm.data.as_ref().unwrap().len(), 3);
    assert!(cm.metadata.owner_references.is_some());
    let job = job(&s, &plan(), "img", Some(&name));
    let pod = job.spec.unwrap().template.spec.unwrap();
    let mig = pod
        .volumes
        .unwrap()
        .into_iter()
        .find(|v| v.name == "schemagate-migrations")
        .unwrap();
    assert_eq!(mig.config_map.unwrap().name, name);
}

#[test]
fn image_sources_are_copied_by_a_hardened_init_container() {
    let s = sm(SourceSpec {
        image: Some(ImageSource {
            reference: "registry.example/orders-migrations:1.4".into(),
            path: "/sql/".into(),
        }),
        ..Default::default()
    });
    let job = job(&s, &plan(), "img", None);
    let pod = job.spec.unwrap().template.spec.unwrap();
    let init = &pod.init_containers.unwrap()[0];
    assert_eq!(
        init.image.as_deref(),
        Some("registry.example/orders-migrations:1.4")
    );
    assert_eq!(
        init.command.as_ref().unwrap(),
        &["cp", "-R", "/sql/.", "/migrations/"]
    );
    assert_eq!(
        init.security_context.as_ref().unwrap().run_as_non_root,
        Some(true)
    );
    let mig = pod
        .volumes
        .unwrap()
        .into_iter()
        .find(|v| v.name == "schemagate-migrations")
        .unwrap();
    assert!(mig.empty_dir.is_some());
}

#[test]
fn engine_options_reach_the_runner() {
    let mut s = sm(cm_source());
    s.spec.options.lock = crate::api::LockKind::Lease;
    s.spec.options.destructive = crate::api::DestructivePolicy::Allow;
    s.spec.options.migration_lock_timeout = Some("5s".into());
    let env = runner_env(&s);
    let get = |n: &str| {
        env.iter()
            .find(|e| e.name == n)
            .and_then(|e| e.value.clone())
    };
    assert_eq!(get("SCHEMAGATE_LOCK").as_deref(), Some("lease"));
    assert_eq!(get("SCHEMAGATE_DESTRUCTIVE").as_deref(), Some("allow"));
    assert_eq!(
        get("SCHEMAGATE_MIGRATION_LOCK_TIMEOUT").as_deref(),
        Some("5s")
    );
    let p = JobPlan {
        command: RunCommand::Downgrade,
        target: Some("1".into()),
        ..plan()
    };
    let job = job(&s, &p, "img", None);
    let args = job.spec.unwrap().template.spec.unwrap().containers[0]
        .args
        .clone()
        .unwrap();
    assert_eq!(&args[..3], ["migrate", "downgrade", "1"]);
}

fn tool_source() -> SourceSpec {
    SourceSpec {
        tool: Some(crate::api::ToolSource {
            name: crate::api::ToolName::Alembic,
            image: "shop/web:2.4".into(),
            command: vec!["flask".into(), "db".into(), "upgrade".into()],
            working_dir: Some("/app".into()),
            env: vec![crate::api::ToolEnv {
                name: "FLASK_APP".into(),
                value: "app.py".into(),
            }],
        }),
        ..Default::default()
    }
}

#[test]
fn a_tool_source_runs_the_tools_command_from_its_image_under_exec() {
    let sm = sm(tool_source());
    let job = job(&sm, &plan(), "ghcr.io/schemagate/schemagate:1", None);
    let pod = job.spec.unwrap().template.spec.unwrap();
    let init = pod.init_containers.unwrap();
    assert_eq!(init.len(), 1);
    assert_eq!(init[0].name, INSTALL_CONTAINER);
    assert_eq!(
        init[0].image.as_deref(),
        Some("ghcr.io/schemagate/schemagate:1")
    );
    assert_eq!(
        init[0].args.as_deref(),
        Some(&["install".to_string(), "/schemagate/schemagate".to_string()][..])
    );
    let c = &pod.containers[0];
    assert_eq!(c.image.as_deref(), Some("shop/web:2.4"));
    assert_eq!(
        c.command.as_deref(),
        Some(&["/schemagate/schemagate".to_string()][..])
    );
    let args = c.args.clone().unwrap();
    assert_eq!(
        args,
        [
            "migrate", "--tool", "alembic", "--output", "json", "exec", "--", "flask", "db",
            "upgrade"
        ]
    );
    assert_eq!(c.working_dir.as_deref(), Some("/app"));
    let env = c.env.clone().unwrap();
    assert!(
        env.iter()
            .any(|e| e.name == "FLASK_APP" && e.value.as_deref() == Some("app.py"))
    );
    let url = env.iter().find(|e| e.name == "DATABASE_URL").unwrap();
    assert!(url.value.is_none() && url.value_from.is_some());
    assert!(!env.iter().any(|e| e.name == "SCHEMAGATE_DIR"));
    let mounts: Vec<&str> = c
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| m.name.as_str())
        .collect();
    assert_eq!(mounts, ["schemagate-tmp", BIN_VOLUME]);
    let volumes: Vec<&str> = pod
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .collect();
    assert_eq!(volumes, [BIN_VOLUME, "schemagate-tmp"]);
    assert_eq!(c.security_context, Some(container_security()));
}

#[test]
fn a_fleet_batch_mounts_its_secrets_and_fans_out() {
    let mut s = sm(cm_source());
    s.spec.database = None;
    s.spec.databases = Some(crate::api::DatabasesSpec {
        secret_selector: Default::default(),
        key: "dsn".into(),
        canary: 1,
        max_parallel: 7,
        on_failure: crate::api::FleetFailurePolicy::Continue,
    });
    let members = vec!["tenant-a".to_string(), "tenant-b".to_string()];
    let name = batch_job_name("tenants", "base", &members);
    assert_eq!(
        name,
        batch_job_name("tenants", "base", &members),
        "deterministic"
    );
    assert_ne!(name, batch_job_name("tenants", "base", &members[..1]));
    let plan = JobPlan {
        name,
        members: members.clone(),
        ..plan()
    };
    let j = job(&s, &plan, "img", None);
    assert_eq!(batch_members(&j), members);
    let pod = j.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let c = &pod.containers[0];
    let args = c.args.as_ref().unwrap().join(" ");
    assert_eq!(
        args,
        "migrate upgrade 3 --databases /databases --canary 0 --max-parallel 7 --on-failure continue --output json"
    );
    assert!(
        c.env.iter().flatten().all(|e| e.name != "DATABASE_URL"),
        "no single database URL"
    );
    let vol = pod
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "databases")
        .unwrap();
    let sources = vol.projected.as_ref().unwrap().sources.as_ref().unwrap();
    let items = sources[1].secret.as_ref().unwrap().items.as_ref().unwrap();
    assert_eq!(
        (items[0].key.as_str(), items[0].path.as_str()),
        ("dsn", "tenant-b")
    );
    assert!(
        c.volume_mounts
            .iter()
            .flatten()
            .any(|m| m.mount_path == "/databases" && m.read_only == Some(true))
    );
}
