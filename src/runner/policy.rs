//! The runner policy: which images a runner may use and which service account it may not,
//! and how long an injected `wait` waits. One struct, read by the controller (before it
//! creates a Job), the mutating webhook (before it injects a runner) and the validating
//! webhook (before it admits a SchemaMigration).

use std::time::Duration;

use kube::ResourceExt;

use crate::api::SchemaMigration;

/// The policy every runner is held to.
#[derive(Clone, Debug)]
pub struct RunnerPolicy {
    /// The default runner image (the controller's own), always allowed.
    pub image: String,
    /// Further allowed runner images (`*` at the end matches any suffix).
    pub allowed_images: Vec<String>,
    /// The controller's own namespace and service account, which no resource may use.
    pub controller_namespace: String,
    pub controller_service_account: Option<String>,
    /// Job mode: how long the injected init container waits for the version before it
    /// fails (and the kubelet restarts it).
    pub wait_timeout: Duration,
}

impl Default for RunnerPolicy {
    fn default() -> Self {
        RunnerPolicy {
            image: "ghcr.io/schemagate/schemagate:latest".into(),
            allowed_images: Vec::new(),
            controller_namespace: "default".into(),
            controller_service_account: None,
            wait_timeout: Duration::from_secs(600),
        }
    }
}

impl RunnerPolicy {
    /// The runner image of `sm`: its own choice, else the default.
    pub fn runner_image<'a>(&'a self, sm: &'a SchemaMigration) -> &'a str {
        sm.spec.runner.image.as_deref().unwrap_or(&self.image)
    }

    /// `*`-suffix patterns: `registry.example/team/*` allows every image under it.
    pub fn image_allowed(&self, image: &str) -> bool {
        image == self.image
            || self
                .allowed_images
                .iter()
                .any(|p| match p.strip_suffix('*') {
                    Some(prefix) => image.starts_with(prefix),
                    None => image == p,
                })
    }

    /// The images a resource may choose, for messages.
    pub fn allowed_list(&self) -> Vec<String> {
        let mut all = vec![self.image.clone()];
        all.extend(self.allowed_images.iter().cloned());
        all
    }

    /// Whether a resource in `namespace` may run as `service_account` (never the
    /// controller's own).
    pub fn service_account_allowed(&self, namespace: &str, service_account: Option<&str>) -> bool {
        let own = self.controller_service_account.as_deref();
        !(own.is_some() && service_account == own && namespace == self.controller_namespace)
    }

    /// [`Self::service_account_allowed`] for a resource.
    pub fn resource_service_account_allowed(&self, sm: &SchemaMigration) -> bool {
        self.service_account_allowed(
            sm.namespace().as_deref().unwrap_or_default(),
            sm.spec.runner.service_account_name.as_deref(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffix_patterns_and_the_default_image_are_allowed() {
        let p = RunnerPolicy {
            image: "ghcr.io/schemagate/schemagate:1".into(),
            allowed_images: vec!["registry.example/team/*".into(), "exact:2".into()],
            ..Default::default()
        };
        assert!(p.image_allowed("ghcr.io/schemagate/schemagate:1"));
        assert!(p.image_allowed("registry.example/team/runner:9"));
        assert!(p.image_allowed("exact:2"));
        assert!(!p.image_allowed("exact:3"));
        assert!(!p.image_allowed("registry.example/other/runner:9"));
    }

    #[test]
    fn only_the_controllers_own_service_account_in_its_namespace_is_refused() {
        let p = RunnerPolicy {
            controller_namespace: "schemagate".into(),
            controller_service_account: Some("schemagate".into()),
            ..Default::default()
        };
        assert!(!p.service_account_allowed("schemagate", Some("schemagate")));
        assert!(p.service_account_allowed("shop", Some("schemagate")));
        assert!(p.service_account_allowed("schemagate", None));
    }
}
