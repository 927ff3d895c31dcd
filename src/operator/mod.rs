//! The operator process (`schemagate controller`): wires the controller loops, the
//! admission webhook, leader election and the health/metrics server together. Nothing
//! below it knows the others exist: the controller never imports the webhook, the webhook
//! never imports the controller.

pub mod health;
pub mod leader;
pub mod watchdog;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::runtime::events::Reporter;
use kube::runtime::reflector;

use crate::controller::events::EventRecorder;
use crate::controller::reconcile::{Context, Settings};
use crate::controller::scoped_controller;
use crate::runner::policy::RunnerPolicy;
use crate::telemetry::metrics::{Metrics, ResourceView};
use health::Health;

/// How the controller process runs.
#[derive(Debug, Clone, clap::Args)]
pub struct ControllerArgs {
    /// The runner image for Jobs and injected init containers (normally the controller's
    /// own image, set by the chart).
    #[arg(long, env = "SCHEMAGATE_IMAGE", default_value = concat!("ghcr.io/schemagate/schemagate:", env!("CARGO_PKG_VERSION")))]
    pub image: String,

    /// Further runner images a SchemaMigration may choose (repeatable; `*` at the end
    /// matches any suffix, e.g. registry.example/team/*).
    #[arg(
        long = "allowed-image",
        env = "SCHEMAGATE_ALLOWED_IMAGES",
        value_delimiter = ','
    )]
    pub allowed_images: Vec<String>,

    /// Watch only these namespaces (repeatable, or comma-separated) [default: all
    /// namespaces]. With a list, the controller needs Roles in those namespaces only.
    #[arg(
        long = "watch-namespace",
        env = "SCHEMAGATE_WATCH_NAMESPACES",
        value_delimiter = ','
    )]
    pub watch_namespace: Vec<String>,

    /// Where /metrics, /livez and /readyz are served.
    #[arg(long, env = "SCHEMAGATE_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,

    /// Elect a leader among replicas (only the leader acts).
    #[arg(long, env = "SCHEMAGATE_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,

    /// Namespace of the leader-election Lease [default: $POD_NAMESPACE, else "default"].
    #[arg(long, env = "SCHEMAGATE_LEADER_ELECTION_NAMESPACE")]
    pub leader_election_namespace: Option<String>,

    /// Name of the leader-election Lease.
    #[arg(
        long,
        env = "SCHEMAGATE_LEADER_ELECTION_LEASE",
        default_value = "schemagate-controller"
    )]
    pub leader_election_lease: String,

    /// Read each database's history table to report its version in the status.
    #[arg(long, env = "SCHEMAGATE_OBSERVE_DATABASE", default_value_t = true, action = clap::ArgAction::Set)]
    pub observe_database: bool,

    /// How many resources are reconciled at once (each may hold one database connection).
    #[arg(long, env = "SCHEMAGATE_CONCURRENCY", default_value_t = 8)]
    pub concurrency: u16,

    /// How often every resource is looked at again when nothing triggers it (picks up
    /// Secret changes and changes made to databases outside schemagate).
    #[arg(long, env = "SCHEMAGATE_RESYNC", default_value = "5m", value_parser = crate::model::clock::parse_duration)]
    pub resync: Duration,

    /// How long one read of a database's history table answers for every SchemaMigration
    /// naming the same database, history table and source (at most a quarter of
    /// --resync). A resource that sees a migration run finish reads afresh. 0: only reads
    /// in flight are shared.
    #[arg(long, env = "SCHEMAGATE_DATABASE_READ_TTL", default_value = "10s", value_parser = crate::model::clock::parse_duration)]
    pub database_read_ttl: Duration,

    /// `/livez` fails when the controller's watches received nothing (no event, no
    /// bookmark, no new watch) for this long while it leads: a stuck watch restarts the
    /// pod. Keep it well above the API server's watch timeout (kube: at most 290 s).
    #[arg(long, env = "SCHEMAGATE_WATCH_STALL_TIMEOUT", default_value = "10m", value_parser = crate::model::clock::parse_duration)]
    pub watch_stall_timeout: Duration,

    /// The controller's own namespace (leader-election Lease, webhook certificate Secret;
    /// excluded from the webhook). In a cluster the chart sets it from the pod.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub namespace: String,

    /// The controller's own service account (in --namespace), which no SchemaMigration
    /// may use for its runner. In a cluster the chart sets it from the pod.
    #[arg(long, env = "SCHEMAGATE_SERVICE_ACCOUNT")]
    pub service_account: Option<String>,

    #[command(flatten)]
    pub webhook: crate::webhook::runtime::WebhookArgs,
}

/// Why the controller stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot build a Kubernetes client (in a cluster, or from KUBECONFIG): {0}")]
    Client(#[source] kube::Error),
    #[error("cannot serve the health endpoints on {addr}: {source}")]
    Serve {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("lost leadership")]
    LostLeadership,
    #[error("cannot start the admission webhook: {0}")]
    Webhook(#[from] crate::webhook::runtime::StartError),
}

/// SIGTERM (Kubernetes stopping the pod) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        },
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn identity() -> String {
    std::env::var("POD_NAME")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            format!("{}-{}", host.trim(), std::process::id())
        })
}

/// Runs the controller until a shutdown signal (or, with leader election, losing the lead).
pub async fn run(args: ControllerArgs) -> Result<(), RunError> {
    // Every watch response passes the watchdog's layer: its bytes are the watches' progress.
    let progress = watchdog::Progress::new(args.watch_stall_timeout);
    let config = kube::Config::infer()
        .await
        .map_err(|e| RunError::Client(kube::Error::InferConfig(e)))?;
    let client = kube::client::ClientBuilder::try_from(config)
        .map_err(RunError::Client)?
        .with_layer(&watchdog::WatchProgressLayer {
            progress: progress.clone(),
        })
        .build();
    // One runner policy for the controller, injection and the validating check.
    let policy = RunnerPolicy {
        image: args.image.clone(),
        allowed_images: args.allowed_images.clone(),
        controller_namespace: args.namespace.clone(),
        controller_service_account: args.service_account.clone(),
        wait_timeout: args.webhook.webhook_wait_timeout,
    };
    let metrics = Arc::new(Metrics::new());
    let health = Health::with_watchdog(Some(progress.clone()));
    let server = tokio::spawn(health::serve(
        args.metrics_addr,
        health.clone(),
        metrics.clone(),
    ));

    // Every replica serves the webhook, leader or not: pods must never wait on an election.
    let webhook_tasks = if args.webhook.enabled {
        crate::webhook::runtime::start(
            &args.webhook,
            client.clone(),
            &args.namespace,
            &args.watch_namespace,
            policy.clone(),
            metrics.clone(),
        )
        .await?
    } else {
        Vec::new()
    };

    let identity = identity();
    let elector = args.leader_election.then(|| {
        let ns = args
            .leader_election_namespace
            .clone()
            .unwrap_or_else(|| args.namespace.clone());
        leader::Elector::new(
            client.clone(),
            &ns,
            &args.leader_election_lease,
            &identity,
            Duration::from_secs(15),
        )
    });
    // Readiness routes admission reviews (the webhook Service): a replica serving the
    // webhook is ready as soon as it serves, and stays so through a leader change, so a
    // failover never leaves labelled pods without a webhook. Without the webhook, ready
    // means the controller's first watch sync.
    let serving_webhook = !webhook_tasks.is_empty();
    if serving_webhook {
        health.ready.store(true, Ordering::SeqCst);
    }
    if let Some(e) = &elector {
        health.set_waiting("standing by for the leader lease");
        if !serving_webhook && e.api.get_opt(&e.name).await.is_ok() {
            health.ready.store(true, Ordering::SeqCst);
        }
        tokio::select! {
            _ = e.acquire() => {}
            _ = shutdown_signal() => return Ok(()),
        }
        if !serving_webhook {
            health.ready.store(false, Ordering::SeqCst);
        }
    }
    health.set_waiting("waiting for the first watch sync");

    let settings = Settings {
        runner: policy,
        observe_database: args.observe_database,
        requeue: args.resync,
        database_read_ttl: args.database_read_ttl.min(args.resync / 4),
        ..Settings::default()
    };
    let recorder = EventRecorder::new(
        client.clone(),
        Reporter {
            controller: "schemagate-controller".into(),
            instance: Some(identity.clone()),
        },
    );
    // One controller per watched namespace (or one over all): with a namespace list the
    // chart grants Roles in those namespaces only, and nothing is listed cluster-wide.
    let scopes: Vec<Option<String>> = if args.watch_namespace.is_empty() {
        vec![None]
    } else {
        args.watch_namespace.iter().cloned().map(Some).collect()
    };
    let mut runs = Vec::new();
    let mut stores = Vec::new();
    for scope in scopes {
        let (pods, pod_writer) = reflector::store::<Pod>();
        let ctx = Arc::new(Context {
            client: client.clone(),
            settings: settings.clone(),
            metrics: metrics.clone(),
            recorder: recorder.clone(),
            failures: Default::default(),
            pods,
            reads: Default::default(),
        });
        let (run, store) =
            scoped_controller(&client, scope.as_deref(), args.concurrency, ctx, pod_writer);
        runs.push(run);
        stores.push(store);
    }
    // Per-resource gauges come from the caches at each scrape: a deleted resource is gone.
    let caches = stores.clone();
    metrics.set_resource_source(Box::new(move || {
        caches
            .iter()
            .flat_map(|store| store.state())
            .map(|sm| ResourceView {
                namespace: sm.metadata.namespace.clone().unwrap_or_default(),
                name: sm.metadata.name.clone().unwrap_or_default(),
                phase: sm.status.as_ref().and_then(|s| s.phase),
                current_version: sm.status.as_ref().and_then(|s| s.current_version.clone()),
                target_version: sm.status.as_ref().and_then(|s| s.target_version.clone()),
                schema_drift_objects: sm.spec.drift.as_ref().map(|_| {
                    sm.status
                        .as_ref()
                        .and_then(|s| s.schema_drift.as_ref())
                        .filter(|d| d.result == crate::controller::decide::DRIFTED)
                        .map_or(0, |d| d.count)
                }),
            })
            .collect()
    }));
    let ready_health = health.clone();
    tokio::spawn(async move {
        for store in stores {
            if store.wait_until_ready().await.is_err() {
                return;
            }
        }
        ready_health.ready.store(true, Ordering::SeqCst);
        tracing::info!("first watch sync done: ready");
    });
    let run = futures_util::future::join_all(runs);
    progress.arm(true);
    health.leading.store(true, Ordering::SeqCst);

    // On SIGTERM the controllers stop taking work and finish what they run
    // (`shutdown_on_signal`); then the lease is released so a standby leads at once.
    let outcome = match &elector {
        Some(e) => tokio::select! {
            _ = run => Ok(()),
            _ = e.keep() => Err(RunError::LostLeadership),
        },
        None => {
            run.await;
            Ok(())
        }
    };
    progress.arm(false);
    health.leading.store(false, Ordering::SeqCst);
    if let Some(e) = &elector
        && outcome.is_ok()
    {
        match e.release().await {
            Ok(true) => tracing::info!(lease = %e.name, "released the leader lease"),
            Ok(false) => {}
            Err(err) => {
                tracing::warn!(error = %err, "could not release the leader lease; it expires by itself")
            }
        }
    }
    health.alive.store(false, Ordering::SeqCst);
    for t in webhook_tasks {
        t.abort();
    }
    if server.is_finished()
        && let Ok(Err(source)) = server.await
    {
        return Err(RunError::Serve {
            addr: args.metrics_addr,
            source,
        });
    }
    outcome
}
