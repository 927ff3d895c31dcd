//! Packaging checked by real tools: the Helm chart rendered and linted by Helm's engine,
//! every manifest validated against the Kubernetes schemas, the Argo CD health check run
//! by a Lua interpreter, the Dockerfile linted (all in `tests/k8s/validate.py`, with tools
//! from PyPI installed into `target/pyenv` on first use); and the example SchemaMigrations
//! evaluated against the CRD's CEL rules and the API types here.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(c: &mut Command) -> std::process::Output {
    let out = c
        .output()
        .unwrap_or_else(|e| panic!("cannot run {c:?}: {e}"));
    assert!(
        out.status.success(),
        "{c:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn python() -> PathBuf {
    support::python::venv("pyenv", &root().join("tests/k8s/requirements.txt")).join("python")
}

#[test]
fn chart_manifests_examples_and_dockerfile_pass_the_real_tools() {
    let out = run(Command::new(python())
        .arg(root().join("tests/k8s/validate.py"))
        .current_dir(root()));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("ok:"), "{text}");
}

fn yaml_docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| {
            serde_yaml::from_value::<Value>(serde_yaml::Value::deserialize(d).unwrap()).unwrap()
        })
        .filter(|v| !v.is_null())
        .collect()
}

#[test]
fn example_schema_migrations_pass_the_crd_cel_rules_and_the_types() {
    let crd = yaml_docs(&root().join("crds/schemagate.dev_schemamigrations.yaml"))
        .pop()
        .unwrap();
    let schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone();
    let mut seen = 0;
    for entry in std::fs::read_dir(root().join("examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        for doc in yaml_docs(&path) {
            if doc["kind"] != "SchemaMigration" {
                continue;
            }
            seen += 1;
            kube::core::cel::Validator::new()
                .validate(&schema, &doc, None)
                .unwrap_or_else(|e| panic!("{}: CEL: {e:?}", path.display()));
            let typed: schemagate::api::SchemaMigration = serde_json::from_value(doc.clone())
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            // Nothing the types do not know (a typo would be silently dropped otherwise):
            // everything written survives the round trip (defaults may be added).
            let back = serde_json::to_value(&typed).unwrap();
            assert_within(
                &doc["spec"],
                &back["spec"],
                &format!("{}: spec", path.display()),
            );
        }
    }
    assert!(
        seen >= 2,
        "the examples hold SchemaMigrations of both modes"
    );
}

/// Every field of `written` is in `read`, with the same value.
fn assert_within(written: &Value, read: &Value, at: &str) {
    match (written, read) {
        (Value::Object(w), Value::Object(r)) => {
            for (k, v) in w {
                let Some(rv) = r.get(k) else {
                    panic!("{at}.{k} is not a field of the API types");
                };
                assert_within(v, rv, &format!("{at}.{k}"));
            }
        }
        (Value::Array(w), Value::Array(r)) if w.len() == r.len() => {
            for (i, (a, b)) in w.iter().zip(r).enumerate() {
                assert_within(a, b, &format!("{at}[{i}]"));
            }
        }
        _ => assert_eq!(written, read, "{at}"),
    }
}
