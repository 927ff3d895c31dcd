//! Prometheus metrics on `/metrics`. Labels are a few fixed strings (reasons, results,
//! phases): never a resource's name, never a Debug string.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::api::Phase;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
    /// `transient` or `permanent`.
    pub class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    pub phase: String,
}

/// One SchemaMigration as the metrics show it (read from the controller's cache at every
/// scrape, so a deleted resource is gone from the next scrape).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceView {
    pub namespace: String,
    pub name: String,
    pub phase: Option<Phase>,
    pub current_version: Option<String>,
    pub target_version: Option<String>,
    /// Objects of the live schema that differ from the migrations' (with spec.drift; 0
    /// when clean or not known).
    pub schema_drift_objects: Option<usize>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResourceLabel {
    namespace: String,
    name: String,
}

/// Where the per-resource gauges come from: the operator plugs in its caches.
pub type ResourceSource = Box<dyn Fn() -> Vec<ResourceView> + Send + Sync>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InfoLabel {
    namespace: String,
    name: String,
    phase: String,
    current_version: String,
    target_version: String,
}

/// Computes `resources{phase}` and `resource_info{...}` at scrape time.
#[derive(Default)]
struct ResourceCollector {
    source: Mutex<Option<ResourceSource>>,
}

impl std::fmt::Debug for ResourceCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResourceCollector")
    }
}

impl Collector for ResourceCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let views = match self.source.lock() {
            Ok(source) => source.as_ref().map(|f| f()).unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        let phases = Family::<PhaseLabel, Gauge>::default();
        for p in Phase::ALL {
            phases
                .get_or_create(&PhaseLabel {
                    phase: p.as_str().into(),
                })
                .set(0);
        }
        let info = Family::<InfoLabel, Gauge>::default();
        let drift = Family::<ResourceLabel, Gauge>::default();
        for v in &views {
            if let Some(n) = v.schema_drift_objects {
                drift
                    .get_or_create(&ResourceLabel {
                        namespace: v.namespace.clone(),
                        name: v.name.clone(),
                    })
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
            let phase = v.phase.unwrap_or(Phase::Pending).as_str().to_string();
            phases
                .get_or_create(&PhaseLabel {
                    phase: phase.clone(),
                })
                .inc();
            info.get_or_create(&InfoLabel {
                namespace: v.namespace.clone(),
                name: v.name.clone(),
                phase,
                current_version: v.current_version.clone().unwrap_or_default(),
                target_version: v.target_version.clone().unwrap_or_default(),
            })
            .set(1);
        }
        let m = encoder.encode_descriptor(
            "resources",
            "SchemaMigrations by phase (from the controller's cache)",
            None,
            phases.metric_type(),
        )?;
        phases.encode(m)?;
        let m = encoder.encode_descriptor(
            "schema_drift_objects",
            "Objects of the live schema that differ from what the migrations left (SchemaMigrations with spec.drift)",
            None,
            drift.metric_type(),
        )?;
        drift.encode(m)?;
        let m = encoder.encode_descriptor(
            "resource_info",
            "One series per SchemaMigration: its phase and current and target versions",
            None,
            info.metric_type(),
        )?;
        info.encode(m)
    }
}

/// The controller's metrics.
pub struct Metrics {
    registry: Registry,
    pub reconciles: Counter,
    pub reconcile_errors: Family<ReasonLabel, Counter>,
    pub reconcile_duration: Histogram,
    pub runs: Family<ResultLabel, Counter>,
    pub run_duration: Family<ResultLabel, Histogram>,
    pub lock_wait: Family<ResultLabel, Histogram>,
    /// Errors of the controller's watches, by watched kind.
    pub watch_errors: Family<KindLabel, Counter>,
    /// 1 while this replica is ready (`/readyz`), else 0.
    pub ready: Gauge,
    /// 1 while this replica holds the leader lease (or runs without election), else 0.
    pub leader: Gauge,
    resources: Arc<ResourceCollector>,
    /// Admission reviews answered, by outcome (injected, unchanged, allowed, denied: a
    /// refusal by policy; error: the SchemaMigration could not be read; invalid).
    pub admissions: Family<ResultLabel, Counter>,
    pub admission_duration: Histogram,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("schemagate");
        let reconciles = Counter::default();
        let reconcile_errors = Family::<ReasonLabel, Counter>::default();
        let reconcile_duration = Histogram::new(exponential_buckets(0.005, 2.0, 12));
        let runs = Family::<ResultLabel, Counter>::default();
        let run_duration: Family<ResultLabel, Histogram> =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.5, 2.0, 14)));
        let lock_wait: Family<ResultLabel, Histogram> =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.01, 2.0, 16)));
        let watch_errors = Family::<KindLabel, Counter>::default();
        let resources = Arc::new(ResourceCollector::default());
        let ready = Gauge::default();
        let leader = Gauge::default();
        registry.register(
            "ready",
            "1 while this controller replica is ready (its /readyz)",
            ready.clone(),
        );
        registry.register(
            "leader",
            "1 while this controller replica leads (reconciles)",
            leader.clone(),
        );
        let admissions = Family::<ResultLabel, Counter>::default();
        let admission_duration = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        registry.register(
            "admissions",
            "Admission reviews of gated pods, by outcome",
            admissions.clone(),
        );
        registry.register(
            "admission_duration_seconds",
            "How long an admission review takes (including the SchemaMigration read)",
            admission_duration.clone(),
        );
        registry.register(
            "reconciles",
            "Reconciliations of SchemaMigrations",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Failed reconciliations, by reason",
            reconcile_errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "How long a reconciliation takes",
            reconcile_duration.clone(),
        );
        registry.register(
            "migration_runs",
            "Finished migration runs, by result",
            runs.clone(),
        );
        registry.register(
            "migration_run_duration_seconds",
            "How long finished migration runs took, by result",
            run_duration.clone(),
        );
        registry.register(
            "migration_lock_wait_seconds",
            "How long finished migration runs waited for the database lock, by result",
            lock_wait.clone(),
        );
        registry.register(
            "watch_errors",
            "Errors of the controller's watches, by watched kind",
            watch_errors.clone(),
        );
        registry.register_collector(Box::new(resources.clone()));
        Metrics {
            registry,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            runs,
            run_duration,
            lock_wait,
            watch_errors,
            ready,
            leader,
            resources,
            admissions,
            admission_duration,
        }
    }

    /// Records a failed reconciliation (`class`: transient or permanent).
    pub fn error(&self, reason: &str, class: &str) {
        self.reconcile_errors
            .get_or_create(&ReasonLabel {
                reason: reason.into(),
                class: class.into(),
            })
            .inc();
    }

    /// Records an answered admission review.
    pub fn admitted(&self, outcome: &str, took: Duration) {
        self.admissions
            .get_or_create(&ResultLabel {
                result: outcome.into(),
            })
            .inc();
        self.admission_duration.observe(took.as_secs_f64());
    }

    /// Records a finished run: its result, how long it took, how long it waited for the
    /// database lock.
    pub fn run_finished(&self, result: &str, took: Option<Duration>, lock_wait: Option<Duration>) {
        let label = ResultLabel {
            result: result.into(),
        };
        self.runs.get_or_create(&label).inc();
        if let Some(t) = took {
            self.run_duration
                .get_or_create(&label)
                .observe(t.as_secs_f64());
        }
        if let Some(w) = lock_wait {
            self.lock_wait
                .get_or_create(&label)
                .observe(w.as_secs_f64());
        }
    }

    /// Records an error of a watch (`kind`: the watched kind).
    pub fn watch_error(&self, kind: &str) {
        self.watch_errors
            .get_or_create(&KindLabel { kind: kind.into() })
            .inc();
    }

    /// Where `resources{phase}` and `resource_info` read the resources from at each scrape.
    pub fn set_resource_source(&self, source: ResourceSource) {
        if let Ok(mut s) = self.resources.source.lock() {
            *s = Some(source);
        }
    }

    /// The metrics in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(name: &str, phase: Phase) -> ResourceView {
        ResourceView {
            namespace: "shop".into(),
            name: name.into(),
            phase: Some(phase),
            current_version: Some("3".into()),
            target_version: Some("4".into()),
            schema_drift_objects: None,
        }
    }

    #[test]
    fn phases_come_from_the_cache_and_forget_deleted_resources() {
        let m = Metrics::new();
        let cache = Arc::new(Mutex::new(vec![
            view("orders", Phase::Migrating),
            view("users", Phase::Ready),
            view("billing", Phase::Ready),
        ]));
        let source = cache.clone();
        m.set_resource_source(Box::new(move || source.lock().unwrap().clone()));
        let text = m.encode();
        assert!(
            text.contains("schemagate_resources{phase=\"Ready\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("schemagate_resources{phase=\"Migrating\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "schemagate_resource_info{namespace=\"shop\",name=\"orders\",phase=\"Migrating\",current_version=\"3\",target_version=\"4\"} 1"
            ),
            "{text}"
        );
        // Two are deleted: the next scrape no longer counts or shows them.
        cache.lock().unwrap().retain(|v| v.name == "orders");
        let text = m.encode();
        assert!(
            text.contains("schemagate_resources{phase=\"Ready\"} 0"),
            "{text}"
        );
        assert!(!text.contains("name=\"users\""), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn errors_and_runs_have_fixed_labels() {
        let m = Metrics::new();
        m.error("kube", "transient");
        m.run_finished(
            "succeeded",
            Some(Duration::from_secs(2)),
            Some(Duration::from_millis(30)),
        );
        m.watch_error("Job");
        let text = m.encode();
        assert!(
            text.contains(
                "schemagate_reconcile_errors_total{reason=\"kube\",class=\"transient\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("schemagate_migration_runs_total{result=\"succeeded\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("schemagate_migration_lock_wait_seconds_count{result=\"succeeded\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("schemagate_watch_errors_total{kind=\"Job\"} 1"),
            "{text}"
        );
    }
}
