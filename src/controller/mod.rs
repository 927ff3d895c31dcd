//! `schemagate controller`: a kube-runtime Controller over SchemaMigrations that runs
//! migration Jobs, watches their results, reads each database's history, and reports it
//! in the resource's status (server-side apply, one field manager).
//!
//! Triggers: the SchemaMigrations (their lists and changes the status does not describe
//! yet, not the controller's own status writes), the Jobs they own and the ConfigMaps they
//! reference (watched as metadata only), both from their changes (not from their first
//! list), and their gated pods. Secrets are read with `get`, never listed or watched: a
//! periodic requeue picks up their changes.

pub mod decide;
pub mod events;
pub mod fleet;
pub mod job;
pub mod reads;
pub mod reconcile;

use std::sync::Arc;
use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::reflector::{self, reflector};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};

use crate::api::{JOB_FOR_LABEL, SchemaMigration};
use reconcile::Context;

/// The SchemaMigrations that reference a ConfigMap.
fn referencing(
    store: &kube::runtime::reflector::Store<SchemaMigration>,
    ns: Option<&str>,
    name: &str,
) -> Vec<ObjectRef<SchemaMigration>> {
    store
        .state()
        .into_iter()
        .filter(|sm| {
            sm.namespace().as_deref() == ns
                && sm
                    .spec
                    .source
                    .config_map_ref
                    .as_ref()
                    .is_some_and(|c| c.name == name)
        })
        .map(|sm| ObjectRef::from_obj(&*sm))
        .collect()
}

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>,
    <K as kube::Resource>::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Logs and counts the errors of one watch (the watcher retries by itself with backoff):
/// a warning naming the watched kind, never silent.
fn loud<S, T>(
    stream: S,
    kind: &'static str,
    metrics: Arc<crate::telemetry::metrics::Metrics>,
) -> impl futures_util::Stream<Item = Result<T, watcher::Error>> + Send + use<S, T>
where
    S: futures_util::Stream<Item = Result<T, watcher::Error>> + Send,
{
    stream.inspect_err(move |e| {
        tracing::warn!(kind, error = %crate::model::redact::redact(&e.to_string()), "watch failed; retrying with backoff");
        metrics.watch_error(kind);
    })
}

/// Whether a SchemaMigration watch event starts a reconcile: every object of a list (at
/// startup, after a relist), and changes its status does not describe yet: a new
/// generation, a status that is missing or was reset. The controller's own status writes
/// come back as watch events too; reconciling them found nothing to do, and at 10,000
/// resources they were a third of all reconciles (each reading the Secret and the
/// ConfigMap again).
pub fn resource_trigger(event: watcher::Event<SchemaMigration>) -> Option<SchemaMigration> {
    match event {
        watcher::Event::InitApply(sm) => Some(sm),
        watcher::Event::Apply(sm) => {
            let described = sm.status.as_ref().and_then(|s| s.observed_generation);
            (described != sm.metadata.generation).then_some(sm)
        }
        watcher::Event::Delete(_) | watcher::Event::Init | watcher::Event::InitDone => None,
    }
}

/// The objects of a watch as reconcile triggers, leaving out its first list: at startup
/// every SchemaMigration is reconciled from its own list (reading its Jobs and ConfigMap
/// from the API), and the ConfigMaps and Jobs listed then would each reconcile their
/// resource a second time. A later relist (the watch fell too far behind) passes
/// through: what changed meanwhile counts.
fn after_first_list<K, S>(
    stream: S,
) -> impl futures_util::Stream<Item = Result<K, watcher::Error>> + Send + use<K, S>
where
    K: Send,
    S: futures_util::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send,
{
    let mut listed = false;
    stream.try_filter_map(move |event| {
        let trigger = match event {
            watcher::Event::InitDone => {
                listed = true;
                None
            }
            watcher::Event::InitApply(o) => listed.then_some(o),
            watcher::Event::Apply(o) | watcher::Event::Delete(o) => Some(o),
            watcher::Event::Init => None,
        };
        futures_util::future::ready(Ok(trigger))
    })
}

/// Drops what the controller never reads from a cached SchemaMigration: managed fields,
/// labels and annotations (the last-applied one holds the whole spec again). Spec and
/// status stay: the decision reads both. At 10,000 resources the cache is the largest
/// part of the heap.
pub fn slim_resource(sm: &mut SchemaMigration) {
    let m = &mut sm.metadata;
    // `None`, not an emptied list: a cleared Vec keeps its allocation.
    m.managed_fields = None;
    m.labels = None;
    m.annotations = None;
}

/// The controller for one namespace (`None`: all): SchemaMigrations (cached, slimmed), the
/// Jobs they own, the ConfigMaps they reference (metadata only: a change triggers the
/// resources that reference it, which then read it with `get`) and the gated pods (kept
/// slimmed in the context's store through `pod_writer`: their init containers' results
/// are init-container mode's runs). Every watch's errors are logged and counted by kind.
/// Returns the loop and the resource store (ready after the first sync).
pub fn scoped_controller(
    client: &Client,
    namespace: Option<&str>,
    concurrency: u16,
    ctx: Arc<Context>,
    pod_writer: reflector::store::Writer<Pod>,
) -> (
    impl std::future::Future<Output = ()> + Send + use<>,
    kube::runtime::reflector::Store<SchemaMigration>,
) {
    let metrics = ctx.metrics.clone();
    let pod_stream = reflector(
        pod_writer,
        watcher(
            api::<Pod>(client, namespace),
            watcher::Config::default().labels(crate::api::MIGRATION_LABEL),
        )
        .modify(reconcile::slim_pod),
    )
    // Every pod event, the first list too: a resource reconciled before that list reached
    // the store has not seen its pods' runs (Jobs and ConfigMaps are read from the API).
    .touched_objects();
    let (store, writer) = reflector::store::<SchemaMigration>();
    let resources = reflector(
        writer,
        watcher(
            api::<SchemaMigration>(client, namespace),
            watcher::Config::default().any_semantic(),
        )
        .modify(slim_resource),
    )
    .try_filter_map(|event| futures_util::future::ready(Ok(resource_trigger(event))));
    let jobs = after_first_list(watcher(
        api::<Job>(client, namespace),
        watcher::Config::default().labels(JOB_FOR_LABEL),
    ));
    let cms: Api<PartialObjectMeta<ConfigMap>> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let cm_stream = after_first_list(watcher(cms, watcher::Config::default()));
    let cm_store = store.clone();
    let run = Controller::for_stream(
        loud(resources, "SchemaMigration", metrics.clone()),
        store.clone(),
    )
    .with_config(
        kube::runtime::controller::Config::default()
            .concurrency(concurrency.max(1))
            .debounce(Duration::from_millis(500)),
    )
    .owns_stream(loud(jobs, "Job", metrics.clone()))
    .watches_stream(loud(cm_stream, "ConfigMap", metrics.clone()), move |cm| {
        referencing(&cm_store, cm.namespace().as_deref(), &cm.name_any())
    })
    .watches_stream(loud(pod_stream, "Pod", metrics.clone()), |pod| {
        let ns = pod.namespace()?;
        let name = pod.labels().get(crate::api::MIGRATION_LABEL)?.clone();
        Some(ObjectRef::new(&name).within(&ns))
    })
    .shutdown_on_signal()
    .run(reconcile::reconcile, reconcile::error_policy, ctx)
    .for_each(|result| async move {
        use kube::runtime::controller::Error as E;
        match result {
            Ok(_) => {}
            // Reported by `reconcile` (log, metric, Event, status) and by `loud`.
            Err(E::ReconcilerFailed(..) | E::QueueError(_) | E::ObjectNotFound(_)) => {}
            Err(e) => {
                let e = crate::model::redact::redact(&e.to_string()).into_owned();
                tracing::error!(error = %e, "the controller loop failed");
            }
        }
    });
    (run, store)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{SchemaMigrationSpec, SchemaMigrationStatus, SourceSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;
    use kube::Resource;

    fn settled(generation: i64, observed: Option<i64>) -> SchemaMigration {
        let mut sm = SchemaMigration::new(
            "orders",
            SchemaMigrationSpec::new("orders-db", "url", SourceSpec::config_map("orders")),
        );
        sm.metadata.generation = Some(generation);
        sm.status = observed.map(|g| SchemaMigrationStatus {
            observed_generation: Some(g),
            ..Default::default()
        });
        sm
    }

    #[test]
    fn own_status_writes_do_not_trigger_a_reconcile_lists_and_new_generations_do() {
        let trigger = |e| resource_trigger(e).is_some();
        assert!(
            !trigger(watcher::Event::Apply(settled(2, Some(2)))),
            "a status write of ours"
        );
        assert!(
            trigger(watcher::Event::Apply(settled(3, Some(2)))),
            "a new spec"
        );
        assert!(
            trigger(watcher::Event::Apply(settled(1, None))),
            "new, or reset"
        );
        assert!(
            trigger(watcher::Event::InitApply(settled(2, Some(2)))),
            "every listed resource"
        );
        assert!(!trigger(watcher::Event::Delete(settled(2, Some(2)))));
        assert!(!trigger(watcher::Event::Init) && !trigger(watcher::Event::InitDone));
    }

    #[tokio::test]
    async fn the_first_list_of_a_watch_triggers_nothing_later_ones_and_changes_do() {
        use watcher::Event::*;
        let events = vec![
            Init,
            InitApply("a"),
            InitApply("b"),
            InitDone,
            Apply("c"),
            Delete("a"),
            Init,
            InitApply("b"),
            InitDone,
        ];
        let triggers: Vec<&str> =
            after_first_list(futures_util::stream::iter(events.into_iter().map(Ok)))
                .try_collect()
                .await
                .unwrap();
        assert_eq!(triggers, vec!["c", "a", "b"]);
    }

    #[test]
    fn a_slimmed_resource_keeps_what_reconcile_reads() {
        let mut sm = SchemaMigration::new(
            "orders",
            SchemaMigrationSpec::new("orders-db", "url", SourceSpec::config_map("orders")),
        );
        let m = &mut sm.metadata;
        m.namespace = Some("shop".into());
        m.uid = Some("uid-orders".into());
        m.generation = Some(3);
        m.resource_version = Some("42".into());
        m.labels = Some([("app".to_string(), "shop".to_string())].into());
        m.annotations = Some(
            [(
                "kubectl.kubernetes.io/last-applied-configuration".to_string(),
                "{...}".to_string(),
            )]
            .into(),
        );
        m.managed_fields = Some(vec![ManagedFieldsEntry::default(); 3]);
        sm.status = Some(SchemaMigrationStatus {
            current_version: Some("2".into()),
            ..Default::default()
        });
        let mut slim = sm.clone();
        slim_resource(&mut slim);
        assert_eq!(
            (
                &slim.metadata.managed_fields,
                &slim.metadata.labels,
                &slim.metadata.annotations
            ),
            (&None, &None, &None)
        );
        assert_eq!(slim.spec, sm.spec);
        assert_eq!(slim.status, sm.status);
        assert_eq!(ObjectRef::from_obj(&slim), ObjectRef::from_obj(&sm));
        assert_eq!(
            slim.object_ref(&()),
            sm.object_ref(&()),
            "Events name the same object"
        );
        assert_eq!(slim.metadata.generation, Some(3));
    }
}
