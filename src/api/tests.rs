//! The CRD: `crds/` is current, the schema is structural, and the CEL rules refuse what
//! they should (evaluated by a real CEL interpreter, kube's).

use super::*;
use serde_json::{Value, json};

const CRD_FILE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/crds/schemagate.dev_schemamigrations.yaml"
);

#[test]
fn crds_directory_matches_the_code() {
    let on_disk = std::fs::read_to_string(CRD_FILE).unwrap_or_default();
    if on_disk != crd_yaml() {
        if std::env::var("SCHEMAGATE_UPDATE_CRDS").is_ok() {
            std::fs::write(CRD_FILE, crd_yaml()).expect("write crds/");
        } else {
            panic!(
                "crds/schemagate.dev_schemamigrations.yaml is stale: run \
                 `cargo run -- crd > crds/schemagate.dev_schemamigrations.yaml` \
                 (or SCHEMAGATE_UPDATE_CRDS=1 cargo test)"
            );
        }
    }
}

fn schema() -> Value {
    let crd = serde_json::to_value(SchemaMigration::crd()).unwrap();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

/// What Kubernetes allows inside allOf/anyOf/oneOf/not of a structural schema.
const VALIDATION_ONLY: &[&str] = &[
    "allOf",
    "anyOf",
    "oneOf",
    "not",
    "enum",
    "pattern",
    "minLength",
    "maxLength",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "minItems",
    "maxItems",
    "uniqueItems",
    "minProperties",
    "maxProperties",
    "required",
    "items",
    "format",
];

fn check_structural(s: &Value, path: &str, in_junction: bool, problems: &mut Vec<String>) {
    let Some(obj) = s.as_object() else { return };
    if in_junction {
        for k in obj.keys() {
            if !VALIDATION_ONLY.contains(&k.as_str()) && k != "properties" {
                problems.push(format!("{path}: `{k}` inside allOf/anyOf/oneOf/not"));
            }
        }
    }
    let special = obj.contains_key("x-kubernetes-int-or-string")
        || obj.contains_key("x-kubernetes-preserve-unknown-fields");
    if !in_junction && !special && !obj.contains_key("type") {
        problems.push(format!("{path}: no type"));
    }
    if obj.contains_key("properties") && obj.contains_key("additionalProperties") {
        problems.push(format!("{path}: both properties and additionalProperties"));
    }
    if obj.contains_key("properties") && obj.get("type") != Some(&json!("object")) && !in_junction {
        problems.push(format!("{path}: properties on a non-object"));
    }
    if let Some(props) = obj.get("properties").and_then(Value::as_object) {
        for (k, v) in props {
            check_structural(v, &format!("{path}.{k}"), in_junction, problems);
        }
    }
    if let Some(items) = obj.get("items") {
        check_structural(items, &format!("{path}[]"), in_junction, problems);
    }
    if let Some(ap) = obj.get("additionalProperties").filter(|v| v.is_object()) {
        check_structural(ap, &format!("{path}{{}}"), in_junction, problems);
    }
    for j in ["allOf", "anyOf", "oneOf"] {
        if let Some(list) = obj.get(j).and_then(Value::as_array) {
            // int-or-string is the one allowed use of types under anyOf.
            let int_or_string = obj.contains_key("x-kubernetes-int-or-string");
            for (i, v) in list.iter().enumerate() {
                if !int_or_string {
                    check_structural(v, &format!("{path}.{j}[{i}]"), true, problems);
                }
            }
        }
    }
    if let Some(v) = obj.get("not") {
        check_structural(v, &format!("{path}.not"), true, problems);
    }
}

#[test]
fn schema_is_structural() {
    let s = schema();
    let mut problems = Vec::new();
    check_structural(&s, "", false, &mut problems);
    assert!(problems.is_empty(), "{problems:#?}");
    // metadata may only constrain name/generateName: the derive leaves it untyped-free.
    let meta = &s["properties"]["metadata"];
    assert!(meta.get("properties").is_none(), "{meta}");
}

#[test]
fn every_string_a_cel_rule_reads_is_bounded() {
    // The API server estimates rule cost; unbounded strings and lists are rejected.
    let s = schema();
    let spec = &s["properties"]["spec"]["properties"];
    assert_eq!(spec["targetVersion"]["maxLength"], 64);
    assert_eq!(spec["source"]["properties"]["inline"]["maxItems"], 200);
    assert_eq!(
        spec["source"]["properties"]["inline"]["items"]["properties"]["version"]["maxLength"],
        64
    );
    assert_eq!(
        spec["options"]["properties"]["historyTable"]["maxLength"],
        117
    );
}

#[test]
fn names_columns_and_subresources() {
    let crd = serde_json::to_value(SchemaMigration::crd()).unwrap();
    assert_eq!(crd["metadata"]["name"], "schemamigrations.schemagate.dev");
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    assert_eq!(crd["spec"]["names"]["shortNames"], json!(["smig"]));
    let v = &crd["spec"]["versions"][0];
    assert_eq!(v["name"], "v1alpha1");
    assert!(v["subresources"]["status"].is_object());
    let columns: Vec<&str> = v["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(columns, ["Current", "Target", "Phase", "Ready", "Age"]);
    for c in v["additionalPrinterColumns"].as_array().unwrap() {
        let path = c["jsonPath"].as_str().unwrap();
        assert!(path.starts_with('.') && !path.contains('{'), "{path}");
    }
}

fn object(spec: Value) -> Value {
    json!({
        "apiVersion": "schemagate.dev/v1alpha1",
        "kind": "SchemaMigration",
        "metadata": { "name": "orders", "namespace": "shop" },
        "spec": spec,
    })
}

fn cel(spec: Value) -> Result<(), String> {
    kube::core::cel::Validator::new()
        .validate(&schema(), &object(spec), None)
        .map_err(|e| format!("{e:?}"))
}

fn db() -> Value {
    json!({ "urlSecretRef": { "name": "orders-db", "key": "url" } })
}

#[test]
fn cel_rules_refuse_invalid_combinations_with_messages_that_say_what_to_fix() {
    let ok = json!({ "database": db(), "source": { "configMapRef": { "name": "m" } } });
    assert_eq!(cel(ok), Ok(()));
    let ok_inline = json!({
        "database": db(),
        "source": { "inline": [{ "version": "1", "up": "CREATE TABLE t (x int)" }] },
        "targetVersion": "1",
    });
    assert_eq!(cel(ok_inline), Ok(()));

    let two = json!({
        "database": db(),
        "source": { "configMapRef": { "name": "m" }, "image": { "reference": "r/m:1", "path": "/m" } },
    });
    let e = cel(two).unwrap_err();
    assert!(e.contains("exactly one of source"), "{e}");

    let none = json!({ "database": db(), "source": {} });
    assert!(cel(none).unwrap_err().contains("exactly one of source"));

    let tool =
        json!({ "name": "Alembic", "image": "shop/web:2", "command": ["flask", "db", "upgrade"] });
    assert_eq!(
        cel(json!({ "database": db(), "source": { "tool": tool } })),
        Ok(())
    );
    let tool_and_files = json!({
        "database": db(),
        "source": { "tool": tool, "configMapRef": { "name": "m" } },
    });
    assert!(cel(tool_and_files).unwrap_err().contains("source.tool"));
    let tool_with_target = json!({
        "database": db(),
        "source": { "tool": tool },
        "targetVersion": "3",
    });
    let e = cel(tool_with_target).unwrap_err();
    assert!(
        e.contains("targetVersion does not apply to source.tool"),
        "{e}"
    );

    let bad_version = json!({
        "database": db(),
        "source": { "configMapRef": { "name": "m" } },
        "targetVersion": "v1.2",
    });
    assert!(
        cel(bad_version)
            .unwrap_err()
            .contains("targetVersion must be digits")
    );

    let bad_inline = json!({
        "database": db(),
        "source": { "inline": [{ "version": "one", "up": "x" }] },
    });
    assert!(
        cel(bad_inline)
            .unwrap_err()
            .contains("inline migration versions")
    );

    let bad_table = json!({
        "database": db(),
        "source": { "configMapRef": { "name": "m" } },
        "options": { "historyTable": "x; drop table y" },
    });
    assert!(cel(bad_table).unwrap_err().contains("historyTable"));
}

#[test]
fn defaults_and_round_trip() {
    let sm: SchemaMigration = serde_json::from_value(object(json!({
        "database": { "urlSecretRef": { "name": "orders-db" } },
        "source": { "image": { "reference": "r/m:1" } },
    })))
    .unwrap();
    assert_eq!(sm.spec.secret_ref().unwrap().key, "url");
    assert_eq!(sm.spec.mode, MigrationMode::InitContainer);
    assert_eq!(sm.spec.downgrade, DowngradePolicy::Deny);
    assert_eq!(sm.spec.source.image.as_ref().unwrap().path, "/migrations");
    assert!(!sm.spec.paused);
    let back: SchemaMigration = serde_json::from_value(serde_json::to_value(&sm).unwrap()).unwrap();
    assert_eq!(back.spec, sm.spec);
}

#[test]
fn crd_descriptions_are_paragraphs_not_source_lines() {
    assert_eq!(
        super::unwrap_text(
            "one runner at a time, every\nstep versioned.\n\nSecond - no list\n- item a\n- item b"
        ),
        "one runner at a time, every step versioned.\n\nSecond - no list\n- item a\n- item b"
    );
    let yaml = super::crd_yaml();
    let crd: serde_json::Value = serde_yaml::from_str(&yaml).unwrap();
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let d = spec["properties"]["targetVersion"]["description"]
        .as_str()
        .unwrap();
    assert!(!d.contains('\n') || d.contains("\n\n"), "{d:?}");
}
