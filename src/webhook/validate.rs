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
use crate::controller::reconcile::image_allowed;

/// Policy the check enforces.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    /// The controller's own image (always allowed as a runner).
    pub image: String,
    /// Further allowed runner images (`*` suffix patterns).
    pub allowed_images: Vec<String>,
    /// The controller's namespace and service account: never usable by a resource.
    pub controller_namespace: String,
    pub controller_service_account: Option<String>,
}

/// A permission the writer must hold, and why the resource needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Permission {
    pub verb: &'static str,
    pub group: &'static str,
    pub resource: &'static str,
    pub why: String,
}

impl Permission {
    /// `create jobs.batch`, as RBAC spells it.
    pub fn describe(&self) -> String {
        if self.group.is_empty() {
            format!("{} {}", self.verb, self.resource)
        } else {
            format!("{} {}.{}", self.verb, self.resource, self.group)
        }
    }

    /// The attributes of a SubjectAccessReview for this permission in `namespace`.
    pub fn attributes(&self, namespace: &str) -> ResourceAttributes {
        ResourceAttributes {
            namespace: Some(namespace.into()),
            verb: Some(self.verb.into()),
            group: Some(self.group.into()),
            resource: Some(self.resource.into()),
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
        && !image_allowed(image, &policy.image, &policy.allowed_images)
    {
        let mut allowed = vec![policy.image.clone()];
        allowed.extend(policy.allowed_images.iter().cloned());
        return Err(Violation(format!(
            "spec.runner.image {image} is not allowed by the schemagate controller; allowed: \
             {} (a platform administrator extends the list with --allowed-image)",
            allowed.join(", ")
        )));
    }
    if let (Some(sa), Some(own)) = (
        &runner.service_account_name,
        &policy.controller_service_account,
    ) && namespace == policy.controller_namespace
        && sa == own
    {
        return Err(Violation(format!(
            "spec.runner.serviceAccountName {sa} is the schemagate controller's own service \
             account, which no SchemaMigration may use; create a service account for the runner"
        )));
    }
    let mut needs = Vec::new();
    match spec.mode {
        MigrationMode::Job => {
            let mut why = vec!["mode: Job (the controller creates migration Jobs)".to_string()];
            if let Some(image) = &runner.image {
                why.push(format!("spec.runner.image {image}"));
            }
            if let Some(sa) = &runner.service_account_name {
                why.push(format!("spec.runner.serviceAccountName {sa}"));
            }
            if let Some(img) = &spec.source.image {
                why.push(format!("spec.source.image {}", img.reference));
            }
            if let Some(t) = &spec.source.tool {
                why.push(format!(
                    "spec.source.tool image {} running {}",
                    t.image,
                    t.command.join(" ")
                ));
            }
            needs.push(Permission {
                verb: "create",
                group: "batch",
                resource: "jobs",
                why: why.join(", "),
            });
        }
        MigrationMode::InitContainer => {
            // Gated pods are created by their owners (who need pod creation anyway); what
            // the resource chooses runs inside them.
            let mut why = Vec::new();
            if let Some(image) = &runner.image {
                why.push(format!("spec.runner.image {image}"));
            }
            if let Some(img) = &spec.source.image {
                why.push(format!("spec.source.image {}", img.reference));
            }
            if let Some(t) = &spec.source.tool {
                why.push(format!(
                    "spec.source.tool image {} running {}",
                    t.image,
                    t.command.join(" ")
                ));
            }
            if !why.is_empty() {
                needs.push(Permission {
                    verb: "create",
                    group: "",
                    resource: "pods",
                    why: why.join(", "),
                });
            }
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
    fn init_container_mode_with_defaults_needs_nothing() {
        assert_eq!(
            requirements(&sm(MigrationMode::InitContainer), "shop", &policy()),
            Ok(vec![])
        );
    }

    #[test]
    fn job_mode_needs_job_creation_and_says_why() {
        let mut s = sm(MigrationMode::Job);
        s.spec.runner.service_account_name = Some("migrator".into());
        let needs = requirements(&s, "shop", &policy()).unwrap();
        assert_eq!(needs.len(), 1);
        assert_eq!(needs[0].describe(), "create jobs.batch");
        assert!(
            needs[0].why.contains("serviceAccountName migrator"),
            "{:?}",
            needs[0]
        );
        let attrs = needs[0].attributes("shop");
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
    fn a_chosen_image_in_init_container_mode_needs_pod_creation() {
        let mut s = sm(MigrationMode::InitContainer);
        s.spec.runner.image = Some("registry.example/db/runner:2".into());
        s.spec.source = SourceSpec {
            image: Some(ImageSource {
                reference: "registry.example/db/migrations:7".into(),
                path: "/migrations".into(),
            }),
            ..Default::default()
        };
        let needs = requirements(&s, "shop", &policy()).unwrap();
        assert_eq!(needs[0].describe(), "create pods");
        assert!(needs[0].why.contains("migrations:7"));
    }

    #[test]
    fn a_tool_source_needs_what_running_its_image_needs() {
        for (mode, resource) in [
            (MigrationMode::InitContainer, "pods"),
            (MigrationMode::Job, "jobs"),
        ] {
            let mut s = sm(mode);
            s.spec.source = SourceSpec {
                tool: Some(crate::api::ToolSource {
                    name: crate::api::ToolName::Alembic,
                    image: "shop/web:2".into(),
                    command: vec!["flask".into(), "db".into(), "upgrade".into()],
                    working_dir: None,
                    env: vec![],
                }),
                ..Default::default()
            };
            let needs = requirements(&s, "shop", &policy()).unwrap();
            assert_eq!(needs.len(), 1);
            assert_eq!(needs[0].resource, resource);
            assert!(
                needs[0].why.contains("shop/web:2 running flask db upgrade"),
                "{:?}",
                needs[0]
            );
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
