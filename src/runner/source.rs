//! The migration files a runner reads, as the controller and the webhook both name them:
//! an inline source's files and the ConfigMap that carries them (named by a hash of their
//! content, so a pod mounts exactly the files it was admitted with), and the objects a
//! resource owns.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;

use crate::api::{JOB_FOR_LABEL, SchemaMigration, SourceSpec, ToolName};
use crate::engine::tools::Tool;
use crate::model::digest::sha256_hex;

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

/// The version a pod with these files is for: `target` when set, else the newest
/// migration of the files (`None`: the files are not readable).
pub fn version_of(files: Vec<(String, String)>, target: Option<&str>) -> Option<String> {
    if let Some(t) = target {
        return Some(t.to_string());
    }
    let set = crate::engine::source::load_files("the source", files).ok()?;
    set.head().map(|m| m.version.to_string())
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

/// A child object's name: the resource's name and a hash, within the 63 characters a name
/// that becomes a label value may have.
pub fn child_name(sm_name: &str, hash: &str) -> String {
    let keep = 63 - hash.len() - 1;
    let base: String = sm_name.chars().take(keep).collect();
    format!("{}-{hash}", base.trim_end_matches('-'))
}

/// The ConfigMap holding an inline source for the runner.
pub fn inline_config_map_name(sm_name: &str, source_hash: &str) -> String {
    child_name(
        &format!("{sm_name}-inline"),
        &source_hash[..10.min(source_hash.len())],
    )
}

/// The ConfigMap a resource's inline source is mounted from (`None`: not an inline source).
pub fn inline_config_map_of(sm: &SchemaMigration) -> Option<String> {
    sm.spec.source.inline.as_ref()?;
    let files = inline_files(&sm.spec.source);
    Some(inline_config_map_name(
        sm.metadata.name.as_deref().unwrap_or_default(),
        &files_hash(&files),
    ))
}

/// The owner reference that makes a child go with its SchemaMigration (never the
/// database).
pub fn owner_ref(sm: &SchemaMigration) -> Option<OwnerReference> {
    let mut o = sm.controller_owner_ref(&())?;
    o.block_owner_deletion = Some(true);
    Some(o)
}

/// The labels of everything schemagate creates for a resource (Jobs, their pods,
/// inline ConfigMaps).
pub fn labels(sm: &SchemaMigration) -> BTreeMap<String, String> {
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

/// The engine's reader of a tool source's history.
pub fn tool(name: ToolName) -> Tool {
    match name {
        ToolName::Alembic => Tool::Alembic,
        ToolName::Flyway => Tool::Flyway,
        ToolName::GolangMigrate => Tool::GolangMigrate,
        ToolName::Sqlx => Tool::Sqlx,
        ToolName::Dbmate => Tool::Dbmate,
    }
}
