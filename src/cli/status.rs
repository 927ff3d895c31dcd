//! `schemagate status` (also `kubectl schemagate status` when the binary is installed as
//! `kubectl-schemagate`): the SchemaMigrations of a namespace or the cluster, one line
//! each, with what a person needs at 3 a.m.: phase, current and target version, how many
//! are pending, the last run, and the reason of any failure.

use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};
use serde::Serialize;
use serde_json::json;

use super::OutputFormat;
use crate::api::conditions;
use crate::api::{Phase, SchemaMigration};
use crate::runner::exit::Exit;

/// Which SchemaMigrations to show.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The namespace [default: the kubeconfig context's].
    #[arg(long, short = 'n', env = "SCHEMAGATE_NAMESPACE")]
    pub namespace: Option<String>,
    /// Every namespace.
    #[arg(long, short = 'A', conflicts_with = "namespace")]
    pub all_namespaces: bool,
    /// Only resources with these labels (`app=shop,tier!=batch`).
    #[arg(long, short = 'l')]
    pub selector: Option<String>,
    /// Human-readable table, or one JSON document.
    #[arg(long, short = 'o', value_enum, default_value = "human")]
    pub output: OutputFormat,
}

/// One resource's line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Row {
    pub namespace: String,
    pub name: String,
    pub phase: String,
    pub ready: bool,
    pub current_version: Option<String>,
    pub target_version: Option<String>,
    pub pending: usize,
    /// `Job orders-1a2b3c Succeeded 2026-12-06T05:00:09Z`.
    pub last_run: Option<String>,
    /// Why it is not Ready, when something is wrong or in progress: `reason: message`.
    pub reason: Option<String>,
    /// The status describes an older generation of the spec (the controller has not
    /// caught up yet).
    pub stale: bool,
}

/// The line of one resource.
pub fn row(sm: &SchemaMigration) -> Row {
    let status = sm.status.clone().unwrap_or_default();
    let find = |kind: &str| {
        status
            .conditions
            .iter()
            .find(|c| c.type_ == kind && c.status == "True")
    };
    let reason = find(conditions::STALLED)
        .or_else(|| find(conditions::RECONCILING))
        .or_else(|| find(conditions::SCHEMA_DRIFTED))
        .map(|c| format!("{}: {}", c.reason, c.message));
    let last_run = status.last_run.as_ref().map(|r| {
        let when = r.finished_at.as_deref().or(r.started_at.as_deref());
        match when {
            Some(t) => format!("{} {} {} {t}", r.kind, r.name, r.result),
            None => format!("{} {} {}", r.kind, r.name, r.result),
        }
    });
    Row {
        namespace: sm.namespace().unwrap_or_default(),
        name: sm.name_any(),
        phase: status.phase.map(Phase::as_str).unwrap_or("Unknown").into(),
        ready: status.phase == Some(Phase::Ready),
        current_version: status.current_version.clone(),
        target_version: status
            .target_version
            .clone()
            .or_else(|| sm.spec.target_version.clone()),
        // A fleet's pending databases; one database's pending migrations.
        pending: status
            .databases
            .as_ref()
            .map(|d| d.pending as usize)
            .unwrap_or(status.pending.len()),
        last_run,
        reason,
        stale: status.observed_generation.is_some()
            && status.observed_generation != sm.metadata.generation,
    }
}

/// The table people read: aligned columns, the reason last (it is the long one).
pub fn table(rows: &[Row], all_namespaces: bool) -> String {
    let mut lines: Vec<Vec<String>> = vec![];
    let mut head = vec![];
    if all_namespaces {
        head.push("NAMESPACE".to_string());
    }
    head.extend(
        [
            "NAME", "PHASE", "CURRENT", "TARGET", "PENDING", "LAST RUN", "REASON",
        ]
        .map(String::from),
    );
    lines.push(head);
    for r in rows {
        let mut l = vec![];
        if all_namespaces {
            l.push(r.namespace.clone());
        }
        let phase = if r.stale {
            format!("{} (stale)", r.phase)
        } else {
            r.phase.clone()
        };
        l.extend([
            r.name.clone(),
            phase,
            r.current_version.clone().unwrap_or_else(|| "-".into()),
            r.target_version.clone().unwrap_or_else(|| "head".into()),
            r.pending.to_string(),
            r.last_run.clone().unwrap_or_else(|| "-".into()),
            r.reason
                .as_deref()
                .map(|m| crate::engine::runner::clip(m, 160))
                .unwrap_or_else(|| "-".into()),
        ]);
        lines.push(l);
    }
    let columns = lines[0].len();
    let widths: Vec<usize> = (0..columns)
        .map(|i| {
            lines
                .iter()
                .map(|l| l[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for l in &lines {
        let mut line = String::new();
        for (i, cell) in l.iter().enumerate() {
            if i + 1 == columns {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}   ", w = widths[i]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Lists the resources (sorted by namespace and name).
pub async fn list(
    client: Client,
    namespace: Option<&str>,
    selector: Option<&str>,
) -> Result<Vec<Row>, kube::Error> {
    let api: Api<SchemaMigration> = match namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    let mut params = ListParams::default();
    if let Some(s) = selector {
        params = params.labels(s);
    }
    let mut rows: Vec<Row> = api.list(&params).await?.items.iter().map(row).collect();
    rows.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    Ok(rows)
}

/// Runs `schemagate status`; returns the exit code (0 listed, 11 the cluster cannot be
/// reached or refuses, 2 a bad argument).
pub async fn run(args: StatusArgs) -> Exit {
    let fail = |what: String, hint: &str| {
        match args.output {
            OutputFormat::Json => println!(
                "{}",
                json!({"error": {"kind": "kubernetes", "message": what, "hint": hint}})
            ),
            OutputFormat::Human => eprintln!("error: {what}\nhint: {hint}"),
        }
        Exit::Connect
    };
    let config = match kube::Config::infer().await {
        Ok(c) => c,
        Err(e) => {
            return fail(
                format!("no Kubernetes configuration: {e}"),
                "set KUBECONFIG or run inside a cluster",
            );
        }
    };
    let default_ns = config.default_namespace.clone();
    let client = match Client::try_from(config) {
        Ok(c) => c,
        Err(e) => {
            return fail(
                format!("cannot build a Kubernetes client: {e}"),
                "check the kubeconfig",
            );
        }
    };
    let namespace = if args.all_namespaces {
        None
    } else {
        Some(args.namespace.clone().unwrap_or(default_ns))
    };
    match list(client, namespace.as_deref(), args.selector.as_deref()).await {
        Ok(rows) => {
            match args.output {
                OutputFormat::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({ "items": rows })).unwrap_or_default()
                ),
                OutputFormat::Human if rows.is_empty() => {
                    println!(
                        "No SchemaMigrations in {}.",
                        namespace
                            .map(|n| format!("namespace {n}"))
                            .unwrap_or_else(|| "the cluster".into())
                    )
                }
                OutputFormat::Human => print!("{}", table(&rows, args.all_namespaces)),
            }
            Exit::Ok
        }
        Err(e) => fail(
            format!(
                "cannot list SchemaMigrations: {}",
                crate::model::redact::redact(&e.to_string())
            ),
            "check that the cluster is reachable, the CRD is installed and you may list schemamigrations.schemagate.dev",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{LastRun, SchemaMigrationSpec, SchemaMigrationStatus, SourceSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

    fn sm(name: &str, phase: Phase, stalled: Option<(&str, &str)>) -> SchemaMigration {
        let mut sm = SchemaMigration::new(
            name,
            SchemaMigrationSpec::new("db", "url", SourceSpec::config_map("m")),
        );
        sm.metadata.namespace = Some("shop".into());
        sm.metadata.generation = Some(2);
        let condition = |t: &str, on: bool, reason: &str, message: &str| Condition {
            type_: t.into(),
            status: if on { "True" } else { "False" }.into(),
            reason: reason.into(),
            message: message.into(),
            observed_generation: Some(2),
            last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
        };
        sm.status = Some(SchemaMigrationStatus {
            observed_generation: Some(2),
            phase: Some(phase),
            current_version: Some("3".into()),
            target_version: Some("4".into()),
            pending: vec!["4".into()],
            last_run: Some(LastRun {
                kind: "Job".into(),
                name: format!("{name}-1a2b3c4d5e"),
                started_at: Some("2026-12-06T05:00:00Z".into()),
                finished_at: Some("2026-12-06T05:00:09Z".into()),
                result: "Failed".into(),
                message: None,
            }),
            conditions: vec![
                condition("Ready", phase == Phase::Ready, "UpToDate", "ok"),
                match stalled {
                    Some((r, m)) => condition("Stalled", true, r, m),
                    None => condition("Stalled", false, "UpToDate", "ok"),
                },
            ],
            ..Default::default()
        });
        sm
    }

    #[test]
    fn a_failed_resource_shows_its_reason_and_last_run() {
        let r = row(&sm(
            "orders",
            Phase::Failed,
            Some((
                "MigrationFailed",
                "Job orders-1a2b failed: syntax error at line 4",
            )),
        ));
        assert_eq!(r.phase, "Failed");
        assert_eq!(r.pending, 1);
        assert_eq!(
            r.reason.as_deref(),
            Some("MigrationFailed: Job orders-1a2b failed: syntax error at line 4")
        );
        assert_eq!(
            r.last_run.as_deref(),
            Some("Job orders-1a2b3c4d5e Failed 2026-12-06T05:00:09Z")
        );
        let text = table(std::slice::from_ref(&r), true);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("NAMESPACE   NAME     PHASE"), "{text}");
        assert!(
            lines[1].contains("shop") && lines[1].contains("syntax error"),
            "{text}"
        );
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["currentVersion"], "3");
        assert_eq!(v["reason"], r.reason.clone().unwrap());
    }

    #[test]
    fn a_status_about_an_older_generation_is_marked_stale() {
        let mut s = sm("orders", Phase::Ready, None);
        assert!(!row(&s).stale);
        s.metadata.generation = Some(3);
        let r = row(&s);
        assert!(r.stale && r.reason.is_none());
        assert!(table(&[r], false).contains("Ready (stale)"));
    }
}
