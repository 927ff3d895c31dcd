//! The validating check of SchemaMigration CREATE/UPDATE: whoever writes a SchemaMigration
//! gains nothing they could not already do in its namespace.
//!
//! `requirements` is pure: from the resource, what the controller would do on the
//! writer's behalf (run a Job, run a chosen image, run as a chosen service account), as
//! permissions the writer must hold, plus the policy checks that need no API call (the
//! runner image allowlist, the controller's own service account). `server.rs` asks the API
//! server about each permission with a SubjectAccessReview for the requesting user.

use k8s_openapi::api::authorization::v1::ResourceAttributes;

use crate::api::{MigrationMode, SchemaMigration};
use crate::runner::policy::RunnerPolicy;

/// The policy the check enforces: the runner policy the controller and injection use.
pub type Policy = RunnerPolicy;

/// A permission the writer must hold, and why the resource needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Permission {
    pub verb: &'static str,
    pub group: &'static str,
    pub resource: &'static str,
    /// One object (a Secret, a ConfigMap), or every one.
    pub name: Option<String>,
    pub why: String,
}

impl Permission {
    /// `create jobs.batch`, as RBAC spells it.
    pub fn describe(&self) -> String {
        let what = if self.group.is_empty() {
            self.resource.to_string()
        } else {
            format!("{}.{}", self.resource, self.group)
        };
        match &self.name {
            Some(n) => format!("{} {what} {n}", self.verb),
            None => format!("{} {what}", self.verb),
        }
    }

    /// The attributes of a SubjectAccessReview for this permission in `namespace`.
    pub fn attributes(&self, namespace: &str) -> ResourceAttributes {
        ResourceAttributes {
            namespace: Some(namespace.into()),
            verb: Some(self.verb.into()),
            group: Some(self.group.into()),
            resource: Some(self.resource.into()),
            name: self.name.clone(),
            ..Default::default()
        }
    }
}

/// A refusal that needs no API call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation(pub String);

/// What writing `sm` in `namespace` asks of its writer.
pub fn requirements(
    sm: &SchemaMigration,
    namespace: &str,
    policy: &Policy,
) -> Result<Vec<Permission>, Violation> {
    let spec = &sm.spec;
    let runner = &spec.runner;
    if let Some(image) = &runner.image
        && !policy.image_allowed(image)
    {
        let allowed = policy.allowed_list();
        return Err(Violation(format!(
            "spec.runner.image {image} is not allowed by the schemagate controller; allowed: \
             {} (a platform administrator extends the list with --allowed-image)",
            allowed.join(", ")
        )));
    }
    if let Some(sa) = &runner.service_account_name
        && !policy.service_account_allowed(namespace, Some(sa))
    {
        return Err(Violation(format!(
            "spec.runner.serviceAccountName {sa} is the schemagate controller's own service \
             account, which no SchemaMigration may use; create a service account for the runner"
        )));
    }
    // What the resource makes others read and run: the database URL goes into runners,
    // the migrations (SQL, or a tool's command) run with it.
    let mut needs = vec![match spec.secret_ref() {
        Some(db) => Permission {
            verb: "get",
            group: "",
            resource: "secrets",
            name: Some(db.name.clone()),
            why: format!(
                "spec.database.urlSecretRef names Secret {}: its URL is handed to the runner",
                db.name
            ),
        },
        None => Permission {
            verb: "list",
            group: "",
            resource: "secrets",
            name: None,
            why: "spec.databases selects Secrets by label: their URLs are handed to the runners"
                .into(),
        },
    }];
    if let Some(cm) = &spec.source.config_map_ref {
        needs.push(Permission {
            verb: "get",
            group: "",
            resource: "configmaps",
            name: Some(cm.name.clone()),
            why: format!(
                "spec.source.configMapRef names ConfigMap {}: its SQL runs",
                cm.name
            ),
        });
    }
    let mut chosen = Vec::new();
    if let Some(image) = &runner.image {
        chosen.push(format!("spec.runner.image {image}"));
    }
    if let Some(img) = &spec.source.image {
        chosen.push(format!("spec.source.image {}", img.reference));
    }
    if let Some(t) = &spec.source.tool {
        chosen.push(format!(
            "spec.source.tool image {} running {}",
            t.image,
            t.command.join(" ")
        ));
    }
    match spec.mode {
        MigrationMode::Job => {
            let mut why = vec!["mode: Job (the controller creates migration Jobs)".to_string()];
            if let Some(sa) = &runner.service_account_name {
                why.push(format!("spec.runner.serviceAccountName {sa}"));
            }
            why.extend(chosen);
            needs.push(Permission {
                verb: "create",
                group: "batch",
                resource: "jobs",
                name: None,
                why: why.join(", "),
            });
        }
        MigrationMode::InitContainer => {
            // The migration runs inside gated pods: in effect the writer runs a container.
            let mut why =
                vec!["mode: InitContainer (the migration runs in gated pods)".to_string()];
            why.extend(chosen);
            needs.push(Permission {
                verb: "create",
                group: "",
                resource: "pods",
                name: None,
                why: why.join(", "),
            });
        }
    }
    Ok(needs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ImageSource, SchemaMigrationSpec, SourceSpec};

    fn policy() -> Policy {
        Policy {
            image: "ghcr.io/schemagate/schemagate:1".into(),
            allowed_images: vec!["registry.example/db/*".into()],
            controller_namespace: "schemagate-system".into(),
            controller_service_account: Some("schemagate".into()),
            ..Default::default()
        }
    }

    fn sm(mode: MigrationMode) -> SchemaMigration {
        SchemaMigration::new(
            "orders",
            SchemaMigrationSpec {
                mode,
                ..SchemaMigrationSpec::new("db", "url", SourceSpec::config_map("m"))
            },
        )
    }

    #[test]
    fn the_secret_and_configmap_a_resource_names_must_be_readable_by_its_writer() {
        let needs = requirements(&sm(MigrationMode::InitContainer), "shop", &policy()).unwrap();
        let described: Vec<String> = needs.iter().map(Permission::describe).collect();
        assert_eq!(
            described,
            ["get secrets db", "get configmaps m", "create pods"]
        );
        assert_eq!(needs[0].attributes("shop").name.as_deref(), Some("db"));
    }

    #[test]
    fn job_mode_needs_job_creation_and_says_why() {
        let mut s = sm(MigrationMode::Job);
        s.spec.runner.service_account_name = Some("migrator".into());
        let needs = requirements(&s, "shop", &policy()).unwrap();
        let job = needs.last().unwrap();
        assert_eq!(job.describe(), "create jobs.batch");
        assert!(job.why.contains("serviceAccountName migrator"), "{job:?}");
        let attrs = job.attributes("shop");
        assert_eq!(
            (
                attrs.namespace.as_deref(),
                attrs.verb.as_deref(),
                attrs.group.as_deref()
            ),
            (Some("shop"), Some("create"), Some("batch"))
        );
    }

    #[test]
    fn chosen_images_and_tools_are_named_in_the_pod_or_job_permission() {
        let tool = SourceSpec {
            tool: Some(crate::api::ToolSource {
                name: crate::api::ToolName::Alembic,
                image: "shop/web:2".into(),
                command: vec!["flask".into(), "db".into(), "upgrade".into()],
                working_dir: None,
                env: vec![],
            }),
            ..Default::default()
        };
        let image = SourceSpec {
            image: Some(ImageSource {
                reference: "registry.example/db/migrations:7".into(),
                path: "/migrations".into(),
            }),
            ..Default::default()
        };
        for (mode, resource) in [
            (MigrationMode::InitContainer, "pods"),
            (MigrationMode::Job, "jobs"),
        ] {
            for (source, named) in [
                (tool.clone(), "shop/web:2 running flask db upgrade"),
                (image.clone(), "migrations:7"),
            ] {
                let mut s = sm(mode);
                s.spec.runner.image = Some("registry.example/db/runner:2".into());
                s.spec.source = source;
                let needs = requirements(&s, "shop", &policy()).unwrap();
                let run = needs.last().unwrap();
                assert_eq!(run.resource, resource);
                assert!(
                    run.why.contains(named) && run.why.contains("runner:2"),
                    "{run:?}"
                );
            }
        }
    }

    #[test]
    fn images_outside_the_allowlist_are_refused_naming_the_list() {
        let mut s = sm(MigrationMode::Job);
        s.spec.runner.image = Some("evil.example/miner:latest".into());
        let Violation(why) = requirements(&s, "shop", &policy()).unwrap_err();
        assert!(
            why.contains("evil.example/miner:latest") && why.contains("registry.example/db/*"),
            "{why}"
        );
    }

    #[test]
    fn the_controllers_own_service_account_is_never_usable() {
        let mut s = sm(MigrationMode::Job);
        s.spec.runner.service_account_name = Some("schemagate".into());
        let Violation(why) = requirements(&s, "schemagate-system", &policy()).unwrap_err();
        assert!(why.contains("own service account"), "{why}");
        // The same name elsewhere is another account.
        assert!(requirements(&s, "shop", &policy()).is_ok());
    }
}
