//! The layering of the crate, checked: imports point down only.
//!
//! ```text
//! cli -> operator -> controller, webhook -> runner, api, telemetry -> engine -> model
//! ```
//!
//! - `model` (pure values) imports nothing of the crate; the engine only `model`.
//! - The API types import nothing from the engine (only `model`).
//! - The runner contract sits below both the controller and the webhook.
//! - The controller never imports the webhook, the webhook neither the controller nor the
//!   engine; only `operator` wires them together, and nothing imports `cli`.
//!
//! A reference is any `crate::<module>` path in code (comments are ignored), including
//! `use crate::{a, b}` groups and `super::<module>` from a layer's root file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// What each layer may import directly.
fn allowed() -> BTreeMap<&'static str, BTreeSet<&'static str>> {
    let rules: [(&str, &[&str]); 9] = [
        ("model", &[]),
        ("engine", &["model"]),
        ("api", &["model"]),
        ("telemetry", &["model", "api"]),
        ("runner", &["model", "engine", "api"]),
        (
            "controller",
            &["model", "engine", "api", "runner", "telemetry"],
        ),
        ("webhook", &["model", "api", "runner", "telemetry"]),
        (
            "operator",
            &[
                "model",
                "api",
                "runner",
                "telemetry",
                "controller",
                "webhook",
            ],
        ),
        (
            "cli",
            &["model", "engine", "api", "runner", "telemetry", "operator"],
        ),
    ];
    rules
        .into_iter()
        .map(|(layer, deps)| (layer, deps.iter().copied().collect()))
        .collect()
}

/// The crate-level modules `code` refers to. `layer_root`: the file is a layer's root
/// (`src/x.rs` or `src/x/mod.rs`), where `super::` is the crate.
fn references(code: &str, layer_root: bool) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    for line in code.lines() {
        let line = match line.find("//") {
            Some(i) => &line[..i],
            None => line,
        };
        let mut prefixes = vec!["crate::"];
        if layer_root {
            prefixes.push("super::");
        }
        for prefix in prefixes {
            let mut rest = line;
            while let Some(i) = rest.find(prefix) {
                // Not the tail of a longer path (`foo_crate::`).
                let before = rest[..i].chars().last();
                rest = &rest[i + prefix.len()..];
                if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                    continue;
                }
                if let Some(group) = rest.strip_prefix('{') {
                    let end = group.find('}').unwrap_or(group.len());
                    for item in group[..end].split(',') {
                        let name = ident(item.trim());
                        if !name.is_empty() && name != "self" {
                            out.insert(name);
                        }
                    }
                } else {
                    let name = ident(rest);
                    if !name.is_empty() {
                        out.insert(name);
                    }
                }
            }
        }
    }
    out
}

/// Every file's layer-rule violations: (file, layer, module it may not import).
fn violations(src: &Path) -> Vec<(String, String, String)> {
    let rules = allowed();
    let mut out = Vec::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().and_then(|e| e.to_str()) != Some("rs") {
                continue;
            }
            let rel = path.strip_prefix(src).unwrap();
            let parts: Vec<&str> = rel.iter().map(|p| p.to_str().unwrap()).collect();
            let layer = parts[0].trim_end_matches(".rs");
            if layer == "lib" || layer == "main" {
                continue;
            }
            let Some(may) = rules.get(layer) else {
                out.push((rel.display().to_string(), layer.into(), "(no rule)".into()));
                continue;
            };
            let root = parts.len() == 1 || (parts.len() == 2 && parts[1] == "mod.rs");
            let code = std::fs::read_to_string(&path).unwrap();
            for r in references(&code, root) {
                let known = rules.contains_key(r.as_str());
                if known && r != layer && !may.contains(r.as_str()) {
                    out.push((rel.display().to_string(), layer.into(), r));
                }
            }
        }
    }
    out.sort();
    out
}

#[test]
fn imports_point_down_only() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let found = violations(&src);
    assert!(
        found.is_empty(),
        "layering violations (file, layer, imported module):\n{}",
        found
            .iter()
            .map(|(f, l, m)| format!("  {f}: {l} may not import {m}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn every_layer_has_a_rule_and_nothing_imports_cli() {
    let rules = allowed();
    for (layer, deps) in &rules {
        assert!(!deps.contains("cli"), "{layer} may not import cli");
        assert!(!deps.contains(layer), "{layer} lists itself");
    }
    assert!(!rules["controller"].contains("webhook"));
    assert!(!rules["webhook"].contains("controller"));
    assert!(!rules["webhook"].contains("engine"));
    assert!(!rules["api"].contains("engine"));
}

#[test]
fn the_checker_sees_every_form_of_import() {
    let code = "use crate::{engine::Version, model};\n\
                use crate::controller::job;\n\
                let x = crate::webhook::INIT_CONTAINER; // crate::cli in a comment\n\
                use super::telemetry;\n\
                fn f() -> my_crate::Thing {}\n";
    let root: Vec<String> = references(code, true).into_iter().collect();
    assert_eq!(
        root,
        ["controller", "engine", "model", "telemetry", "webhook"]
    );
    let nested: Vec<String> = references(code, false).into_iter().collect();
    assert_eq!(nested, ["controller", "engine", "model", "webhook"]);

    // A file that breaks the rules is reported.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("webhook")).unwrap();
    std::fs::write(
        dir.path().join("webhook/mod.rs"),
        "use crate::controller::reconcile;\nuse crate::runner::pod;\n",
    )
    .unwrap();
    assert_eq!(
        violations(dir.path()),
        [(
            "webhook/mod.rs".to_string(),
            "webhook".to_string(),
            "controller".to_string()
        )]
    );
}
