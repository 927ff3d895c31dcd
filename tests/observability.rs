//! The chart's Grafana dashboard and PrometheusRule speak about metrics that exist: every
//! `schemagate_*` name they use appears in the controller's real `/metrics` output (the
//! health server's handler, with one of each kind of event recorded), and the dashboard
//! JSON parses. The chart rendering itself is checked by tests/packaging.rs.

use std::collections::BTreeSet;
use std::time::Duration;

use schemagate::api::Phase;
use schemagate::operator::health::{Health, handle};
use schemagate::telemetry::metrics::{Metrics, ResourceView};

fn root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `schemagate_...` names in `text`.
fn names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("schemagate_") {
        let tail = &rest[i..];
        let name: String = tail
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        // Not the tail of another identifier (`kube_schemagate_x`).
        let before = rest[..i].chars().last();
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            out.insert(name.clone());
        }
        rest = &tail[name.len().max(1)..];
    }
    out
}

/// The metric sample names the controller exposes, with every family populated.
fn exposed() -> BTreeSet<String> {
    let metrics = Metrics::new();
    metrics.set_resource_source(Box::new(|| {
        vec![ResourceView {
            namespace: "shop".into(),
            name: "orders".into(),
            phase: Some(Phase::Failed),
            current_version: Some("3".into()),
            target_version: Some("4".into()),
            schema_drift_objects: Some(2),
        }]
    }));
    metrics.reconciles.inc();
    metrics.reconcile_duration.observe(0.01);
    metrics.error("create_job", "permanent");
    metrics.run_finished(
        "failed",
        Some(Duration::from_secs(3)),
        Some(Duration::from_millis(40)),
    );
    metrics.admitted("error", Duration::from_millis(1));
    metrics.watch_error("Pod");
    let health = Health::new();
    let response = handle("/metrics", &health, &metrics);
    assert_eq!(response.status(), 200);
    let text = metrics.encode();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(String::from)
        .collect()
}

#[test]
fn the_dashboard_parses_and_uses_only_exposed_metrics() {
    let text = std::fs::read_to_string(root().join("charts/schemagate/dashboards/schemagate.json"))
        .unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 8, "{} panels", panels.len());
    let exprs: String = panels
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| t["expr"].as_str().unwrap_or_default().to_string())
        .collect::<Vec<_>>()
        .join("\n");
    let used = names(&exprs);
    assert!(used.len() >= 10, "{used:?}");
    let have = exposed();
    let missing: Vec<&String> = used.iter().filter(|n| !have.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "dashboard metrics not exposed: {missing:?}\nexposed: {have:?}"
    );
}

#[test]
fn the_alert_rules_use_only_exposed_metrics() {
    let text =
        std::fs::read_to_string(root().join("charts/schemagate/templates/prometheusrule.yaml"))
            .unwrap();
    let exprs: String = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr:"))
        .collect::<Vec<_>>()
        .join("\n");
    let used = names(&exprs);
    for expected in [
        "schemagate_resource_info",
        "schemagate_schema_drift_objects",
        "schemagate_ready",
        "schemagate_leader",
        "schemagate_admissions_total",
    ] {
        assert!(
            used.contains(expected),
            "{expected} not alerted on: {used:?}"
        );
    }
    let have = exposed();
    let missing: Vec<&String> = used.iter().filter(|n| !have.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "alerted metrics not exposed: {missing:?}\nexposed: {have:?}"
    );
    // Each alert says what it is about and how bad.
    for alert in [
        "SchemaMigrationFailed",
        "SchemaMigrationStuck",
        "SchemaMigrationSchemaDrifted",
        "SchemagateControllerNotReady",
        "SchemagateAdmissionErrors",
    ] {
        assert!(text.contains(&format!("alert: {alert}")), "{alert} missing");
    }
}

#[test]
fn the_name_scanner_ignores_other_prefixes() {
    let n = names("rate(schemagate_a_total[5m]) + kube_schemagate_b + schemagate_c_bucket");
    assert_eq!(
        n.into_iter().collect::<Vec<_>>(),
        ["schemagate_a_total", "schemagate_c_bucket"]
    );
}
