//! Prometheus metrics on `/metrics`. Labels are a few fixed strings (reasons, results,
//! phases): never a resource's name, never a Debug string.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::api::Phase;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    pub phase: String,
}

/// The controller's metrics.
pub struct Metrics {
    registry: Registry,
    pub reconciles: Counter,
    pub reconcile_errors: Family<ReasonLabel, Counter>,
    pub reconcile_duration: Histogram,
    pub runs: Family<ResultLabel, Counter>,
    pub run_duration: Histogram,
    phases: Family<PhaseLabel, Gauge>,
    /// Admission reviews answered, by outcome (injected, unchanged, denied, invalid).
    pub admissions: Family<ResultLabel, Counter>,
    pub admission_duration: Histogram,
    phase_of: Mutex<HashMap<String, Phase>>,
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
        let run_duration = Histogram::new(exponential_buckets(0.5, 2.0, 14));
        let phases = Family::<PhaseLabel, Gauge>::default();
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
            "How long migration runs take",
            run_duration.clone(),
        );
        registry.register("resources", "SchemaMigrations by phase", phases.clone());
        for p in Phase::ALL {
            phases
                .get_or_create(&PhaseLabel {
                    phase: p.as_str().into(),
                })
                .set(0);
        }
        Metrics {
            registry,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            runs,
            run_duration,
            phases,
            admissions,
            admission_duration,
            phase_of: Mutex::new(HashMap::new()),
        }
    }

    /// Records a failed reconciliation.
    pub fn error(&self, reason: &str) {
        self.reconcile_errors
            .get_or_create(&ReasonLabel {
                reason: reason.into(),
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

    /// Records a finished run.
    pub fn run_finished(&self, result: &str, took: Option<Duration>) {
        self.runs
            .get_or_create(&ResultLabel {
                result: result.into(),
            })
            .inc();
        if let Some(t) = took {
            self.run_duration.observe(t.as_secs_f64());
        }
    }

    /// Tracks a resource's phase (`None`: it was deleted) and keeps the gauge in step.
    pub fn set_phase(&self, key: &str, phase: Option<Phase>) {
        let Ok(mut map) = self.phase_of.lock() else {
            return;
        };
        let old = match phase {
            Some(p) => map.insert(key.to_string(), p),
            None => map.remove(key),
        };
        if old == phase {
            return;
        }
        if let Some(o) = old {
            self.phases
                .get_or_create(&PhaseLabel {
                    phase: o.as_str().into(),
                })
                .dec();
        }
        if let Some(p) = phase {
            self.phases
                .get_or_create(&PhaseLabel {
                    phase: p.as_str().into(),
                })
                .inc();
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

    #[test]
    fn phases_are_counted_without_per_object_labels() {
        let m = Metrics::new();
        m.set_phase("shop/orders", Some(Phase::Migrating));
        m.set_phase("shop/orders", Some(Phase::Ready));
        m.set_phase("shop/users", Some(Phase::Ready));
        m.set_phase("shop/users", None);
        m.error("kube");
        m.run_finished("succeeded", Some(Duration::from_secs(2)));
        let text = m.encode();
        assert!(
            text.contains("schemagate_resources{phase=\"Ready\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("schemagate_resources{phase=\"Migrating\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("schemagate_reconcile_errors_total{reason=\"kube\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("schemagate_migration_runs_total{result=\"succeeded\"} 1"),
            "{text}"
        );
        assert!(!text.contains("orders"), "no object names in labels");
    }
}
