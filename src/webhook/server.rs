//! The webhook over HTTPS: `POST /mutate` with an AdmissionReview v1 of a Pod CREATE,
//! answered with the same review's response (a JSON Patch when the runner is injected);
//! `POST /validate` with a review of a SchemaMigration CREATE/UPDATE (see `validate.rs`).
//!
//! Never panics on input: a body that is not an AdmissionReview gets an `invalid`
//! response; a wrong method, path, content type or size gets a plain HTTP error saying
//! what was expected.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::{TokioIo, TokioTimer};
use k8s_openapi::api::authentication::v1::UserInfo;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{DynamicObject, PostParams};
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube::{Api, Client};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::tls::{MUTATE_PATH, VALIDATE_PATH};
use super::validate::{Violation, requirements};
use super::{Outcome, Refusal, gated_by, inject, patch};
use crate::api::SchemaMigration;
use crate::model::redact;
use crate::runner::policy::RunnerPolicy;
use crate::runner::source::{inline_config_map, inline_config_map_of, inline_files};
use crate::telemetry::metrics::Metrics;

/// The largest request body accepted (the API server's own limit is 3 MiB).
pub const MAX_BODY: usize = 4 * 1024 * 1024;
/// How long a request body may take to arrive (the API server gives up after at most 30s).
pub const BODY_TIMEOUT: Duration = Duration::from_secs(15);
/// Connections served at once; more wait to be accepted (a flood cannot exhaust memory).
pub const MAX_CONNECTIONS: usize = 512;

/// What the webhook asks the API server.
pub trait Lookup: Send + Sync + 'static {
    /// The SchemaMigration a pod names: `Ok(None)` when it does not exist; `Err` (a
    /// message) when it cannot be read.
    fn get(
        &self,
        namespace: &str,
        name: &str,
    ) -> impl Future<Output = Result<Option<SchemaMigration>, String>> + Send;

    /// Whether `user` may do what `attributes` describe (a SubjectAccessReview): the
    /// verdict, or `Err` (a message) when it cannot be asked.
    fn authorized(
        &self,
        user: &UserInfo,
        attributes: ResourceAttributes,
    ) -> impl Future<Output = Result<bool, String>> + Send;

    /// The files of the ConfigMap `name` (its `data`): `Ok(None)` when it does not exist.
    fn config_map_files(
        &self,
        namespace: &str,
        name: &str,
    ) -> impl Future<Output = Result<Option<Vec<(String, String)>>, String>> + Send {
        let _ = (namespace, name);
        async { Ok(None) }
    }

    /// Creates the ConfigMap carrying an inline source's files (content-addressed: one that
    /// exists under the name already has them). `Err`: a message.
    fn create_config_map(
        &self,
        namespace: &str,
        config_map: ConfigMap,
    ) -> impl Future<Output = Result<(), String>> + Send {
        let _ = (namespace, config_map);
        async { Ok(()) }
    }
}

/// Reads SchemaMigrations from the API server, fresh for every pod (a paused or blocked
/// resource must refuse pods at once), and asks it about permissions.
pub struct KubeLookup {
    pub client: Client,
    pub timeout: Duration,
}

impl Lookup for KubeLookup {
    async fn get(&self, namespace: &str, name: &str) -> Result<Option<SchemaMigration>, String> {
        let api = Api::<SchemaMigration>::namespaced(self.client.clone(), namespace);
        match tokio::time::timeout(self.timeout, api.get_opt(name)).await {
            Ok(Ok(sm)) => Ok(sm),
            Ok(Err(e)) => Err(redact::redact(&e.to_string()).into_owned()),
            Err(_) => Err(format!("no answer within {}s", self.timeout.as_secs())),
        }
    }

    async fn authorized(
        &self,
        user: &UserInfo,
        attributes: ResourceAttributes,
    ) -> Result<bool, String> {
        let review = SubjectAccessReview {
            metadata: Default::default(),
            spec: SubjectAccessReviewSpec {
                user: user.username.clone(),
                groups: user.groups.clone(),
                uid: user.uid.clone(),
                extra: user.extra.clone(),
                resource_attributes: Some(attributes),
                non_resource_attributes: None,
            },
            status: None,
        };
        let api = Api::<SubjectAccessReview>::all(self.client.clone());
        match tokio::time::timeout(self.timeout, api.create(&PostParams::default(), &review)).await
        {
            Ok(Ok(r)) => Ok(r
                .status
                .is_some_and(|s| s.allowed && s.denied != Some(true))),
            Ok(Err(e)) => Err(redact::redact(&e.to_string()).into_owned()),
            Err(_) => Err(format!("no answer within {}s", self.timeout.as_secs())),
        }
    }

    async fn create_config_map(
        &self,
        namespace: &str,
        config_map: ConfigMap,
    ) -> Result<(), String> {
        self.create(namespace, &config_map).await
    }

    async fn config_map_files(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<Vec<(String, String)>>, String> {
        let api = Api::<ConfigMap>::namespaced(self.client.clone(), namespace);
        match tokio::time::timeout(self.timeout, api.get_opt(name)).await {
            Ok(Ok(cm)) => Ok(cm.map(|c| c.data.unwrap_or_default().into_iter().collect())),
            Ok(Err(e)) => Err(redact::redact(&e.to_string()).into_owned()),
            Err(_) => Err(format!("no answer within {}s", self.timeout.as_secs())),
        }
    }
}

/// The version a pod is for: the target, or the newest migration of the files it runs
/// with (the inline snapshot of its spec, the ConfigMap as it is now: what the kubelet
/// mounts). `None` for image and tool sources, or a ConfigMap that cannot be read.
async fn pod_version<L: Lookup>(
    lookup: &L,
    namespace: &str,
    sm: &SchemaMigration,
) -> Option<String> {
    let target = sm.spec.target_version.as_deref();
    let source = &sm.spec.source;
    if source.inline.is_some() {
        return crate::runner::source::version_of(inline_files(source), target);
    }
    let cm = source.config_map_ref.as_ref()?;
    match lookup.config_map_files(namespace, &cm.name).await {
        Ok(Some(files)) => crate::runner::source::version_of(files, target),
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(namespace, config_map = %cm.name, error = %e,
                "admission: cannot read the migrations' ConfigMap; the pod's version is not recorded");
            None
        }
    }
}

impl KubeLookup {
    async fn create(&self, namespace: &str, config_map: &ConfigMap) -> Result<(), String> {
        let api = Api::<ConfigMap>::namespaced(self.client.clone(), namespace);
        let pp = PostParams {
            field_manager: Some("schemagate-webhook".into()),
            ..Default::default()
        };
        match tokio::time::timeout(self.timeout, api.create(&pp, config_map)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(kube::Error::Api(s))) if s.code == 409 => Ok(()),
            Ok(Err(e)) => Err(redact::redact(&e.to_string()).into_owned()),
            Err(_) => Err(format!("no answer within {}s", self.timeout.as_secs())),
        }
    }
}

/// Everything the webhook needs to answer.
pub struct Webhook<L> {
    pub lookup: L,
    /// The runner policy (images, service accounts, how long an injected `wait` waits).
    pub policy: RunnerPolicy,
    pub metrics: Arc<Metrics>,
}

fn invalid(why: String) -> (serde_json::Value, &'static str) {
    let review = AdmissionResponse::invalid(why).into_review();
    (
        serde_json::to_value(review).unwrap_or(serde_json::Value::Null),
        "invalid",
    )
}

/// Answers one AdmissionReview (the request body) posted to `path`: the response review and
/// an outcome label (`injected`, `unchanged`, `allowed`, `denied`, `invalid`).
pub async fn review<L: Lookup>(
    wh: &Webhook<L>,
    path: &str,
    body: &[u8],
) -> (serde_json::Value, &'static str) {
    let review: AdmissionReview<DynamicObject> = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return invalid(format!("the request body is not an AdmissionReview: {e}")),
    };
    let req: AdmissionRequest<DynamicObject> = match review.try_into() {
        Ok(r) => r,
        Err(e) => return invalid(format!("the AdmissionReview has no usable request: {e}")),
    };
    let (response, outcome) = if path == VALIDATE_PATH {
        validate(wh, &req).await
    } else {
        decide(wh, &req).await
    };
    let review = response.into_review();
    match serde_json::to_value(review) {
        Ok(mut v) => {
            base64_patch(&mut v);
            (v, outcome)
        }
        Err(e) => invalid(format!("cannot encode the response: {e}")),
    }
}

/// The patch as the API server documents it: a base64 string (kube serializes the bytes
/// as a JSON array of numbers, which Go happens to accept too).
fn base64_patch(review: &mut serde_json::Value) {
    use base64::Engine;
    let Some(patch) = review.pointer_mut("/response/patch") else {
        return;
    };
    if let Some(bytes) = patch.as_array().map(|a| {
        a.iter()
            .filter_map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
            .collect::<Vec<u8>>()
    }) {
        *patch = serde_json::Value::String(base64::engine::general_purpose::STANDARD.encode(bytes));
    }
}

async fn decide<L: Lookup>(
    wh: &Webhook<L>,
    req: &AdmissionRequest<DynamicObject>,
) -> (AdmissionResponse, &'static str) {
    let response = AdmissionResponse::from(req);
    // The configuration sends only Pod CREATEs; anything else passes untouched.
    if req.operation != Operation::Create || req.kind.kind != "Pod" || !req.kind.group.is_empty() {
        return (response, "unchanged");
    }
    let Some(object) = &req.object else {
        return (response.deny("the review carries no pod"), "denied");
    };
    let pod: Pod = match serde_json::to_value(object).and_then(serde_json::from_value) {
        Ok(p) => p,
        Err(e) => {
            return (
                response.deny(format!("the pod cannot be read: {e}")),
                "denied",
            );
        }
    };
    let Some(name) = gated_by(&pod) else {
        return (response, "unchanged");
    };
    let namespace = req
        .namespace
        .clone()
        .or_else(|| pod.metadata.namespace.clone())
        .unwrap_or_else(|| "default".into());
    let pod_name = pod
        .metadata
        .name
        .clone()
        .or_else(|| pod.metadata.generate_name.clone().map(|g| format!("{g}*")))
        .unwrap_or_default();
    let sm = match wh.lookup.get(&namespace, name).await {
        Ok(sm) => sm,
        Err(e) => {
            let why = format!(
                "cannot read SchemaMigration {namespace}/{name}, which gates this pod: {e}; \
                 the pod is refused until it can be read (its controller retries)"
            );
            tracing::warn!(namespace, pod = pod_name, migration = name, error = %e, "admission: refused, lookup failed");
            return (response.deny(why), "error");
        }
    };
    let version = match sm.as_ref() {
        Some(sm) => pod_version(&wh.lookup, &namespace, sm).await,
        None => None,
    };
    if let Some(sm) = sm
        .as_ref()
        .filter(|s| s.spec.databases.is_some() && !s.spec.paused)
    {
        return match super::fleet_gate(sm, &namespace, version.as_deref()) {
            Ok(_) => (response, "allowed"),
            Err(Refusal(why)) => {
                tracing::info!(namespace, pod = pod_name, migration = name, reason = %why, "admission: refused");
                (response.deny(why), "denied")
            }
        };
    }
    // A lowered target with downgrades allowed: the runner reverts (from the history,
    // under the lock); refusing it here would leave nothing that can.
    let downgrading = sm.as_ref().is_some_and(|s| {
        s.spec.target_version.is_some() && s.spec.downgrade == crate::api::DowngradePolicy::Allow
    });
    if let (Some(sm), Some(v), false) = (sm.as_ref(), version.as_deref(), downgrading)
        && let Err(Refusal(why)) = super::below_contract(sm, &namespace, v)
    {
        tracing::info!(namespace, pod = pod_name, migration = name, reason = %why, "admission: refused");
        return (response.deny(why), "denied");
    }
    match inject(&pod, &namespace, name, sm.as_ref(), &wh.policy) {
        Err(Refusal(why)) => {
            tracing::info!(namespace, pod = pod_name, migration = name, reason = %why, "admission: refused");
            (response.deny(why), "denied")
        }
        Ok(Outcome::Unchanged(why)) => {
            tracing::debug!(
                namespace,
                pod = pod_name,
                migration = name,
                why,
                "admission: unchanged"
            );
            (response, "unchanged")
        }
        Ok(Outcome::Patched(mut patched)) => {
            // The version this pod is for: what the controller holds contract migrations for.
            if let Some(v) = &version {
                patched
                    .metadata
                    .annotations
                    .get_or_insert_with(Default::default)
                    .insert(crate::api::VERSION_ANNOTATION.into(), v.clone());
            }
            // An inline source changed in the same apply as the app: the pod mounts the
            // snapshot its spec names, which the controller may not have written yet (or
            // is down). Write it now, so the pod never waits on the controller; a dry run
            // writes nothing.
            if let Some(sm) = sm.as_ref()
                && let Some(cm_name) = inline_config_map_of(sm)
                && !req.dry_run
            {
                let files = inline_files(&sm.spec.source);
                let cm = inline_config_map(sm, &cm_name, &files);
                if let Err(e) = wh.lookup.create_config_map(&namespace, cm).await {
                    tracing::warn!(namespace, pod = pod_name, migration = name, config_map = cm_name, error = %e,
                        "admission: cannot create the inline source's ConfigMap; the pod waits for the controller to create it");
                }
            }
            let before = serde_json::to_value(&pod);
            let after = serde_json::to_value(&*patched);
            let (Ok(before), Ok(after)) = (before, after) else {
                return (response.deny("cannot encode the pod"), "denied");
            };
            match response.with_patch(patch::diff(&before, &after)) {
                Ok(r) => {
                    tracing::info!(
                        namespace,
                        pod = pod_name,
                        migration = name,
                        "admission: runner injected"
                    );
                    (r, "injected")
                }
                Err(e) => {
                    let r =
                        AdmissionResponse::from(req).deny(format!("cannot encode the patch: {e}"));
                    (r, "denied")
                }
            }
        }
    }
}

/// The validating check of a SchemaMigration write.
async fn validate<L: Lookup>(
    wh: &Webhook<L>,
    req: &AdmissionRequest<DynamicObject>,
) -> (AdmissionResponse, &'static str) {
    let response = AdmissionResponse::from(req);
    let writes = matches!(req.operation, Operation::Create | Operation::Update);
    if !writes || req.kind.kind != "SchemaMigration" || req.kind.group != crate::api::GROUP {
        return (response, "allowed");
    }
    let parse = |o: &Option<DynamicObject>| {
        o.as_ref()
            .map(|o| serde_json::to_value(o).and_then(serde_json::from_value::<SchemaMigration>))
    };
    let sm = match parse(&req.object) {
        Some(Ok(sm)) => sm,
        Some(Err(e)) => {
            return (
                response.deny(format!("not a valid SchemaMigration: {e}")),
                "denied",
            );
        }
        None => return (response.deny("the review carries no object"), "denied"),
    };
    // Changes that leave the spec alone (labels, finalizers, owner references) ask nothing.
    if let Some(Ok(old)) = parse(&req.old_object)
        && old.spec == sm.spec
    {
        return (response, "allowed");
    }
    let namespace = req.namespace.clone().unwrap_or_default();
    let needs = match requirements(&sm, &namespace, &wh.policy) {
        Ok(n) => n,
        Err(Violation(why)) => return (response.deny(why), "denied"),
    };
    let user = req.user_info.username.clone().unwrap_or_else(|| "?".into());
    for need in needs {
        match wh
            .lookup
            .authorized(&req.user_info, need.attributes(&namespace))
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                let why = format!(
                    "{user} may not {} in namespace {namespace}, which this SchemaMigration \
                     asks schemagate to do on their behalf ({}); a SchemaMigration may only \
                     ask for what its writer may do: grant that permission, or drop those fields",
                    need.describe(),
                    need.why
                );
                tracing::info!(
                    namespace,
                    user,
                    permission = need.describe(),
                    "admission: SchemaMigration refused"
                );
                return (response.deny(why), "denied");
            }
            Err(e) => {
                let why = format!(
                    "cannot check whether {user} may {} in namespace {namespace}: {e}; \
                     refused until it can be checked",
                    need.describe()
                );
                return (response.deny(why), "denied");
            }
        }
    }
    (response, "allowed")
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn is_json(content_type: Option<&header::HeaderValue>) -> bool {
    content_type
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"))
}

/// One HTTP request.
pub async fn handle<L: Lookup>(wh: &Webhook<L>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let started = Instant::now();
    let path = req.uri().path().to_string();
    if path != MUTATE_PATH && path != VALIDATE_PATH {
        return text(
            StatusCode::NOT_FOUND,
            format!("not found: the webhook serves POST {MUTATE_PATH} and POST {VALIDATE_PATH}\n"),
        );
    }
    if req.method() != Method::POST {
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "the webhook takes POST with an AdmissionReview\n".into(),
        );
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("POST"));
        return r;
    }
    if !is_json(req.headers().get(header::CONTENT_TYPE)) {
        let got = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none")
            .to_string();
        wh.metrics.admitted("invalid", started.elapsed());
        return text(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "unsupported Content-Type {got:?}: send an AdmissionReview v1 as application/json\n"
            ),
        );
    }
    let read = tokio::time::timeout(
        BODY_TIMEOUT,
        Limited::new(req.into_body(), MAX_BODY).collect(),
    );
    let body = match read.await {
        Err(_) => {
            wh.metrics.admitted("invalid", started.elapsed());
            return text(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {}s\n",
                    BODY_TIMEOUT.as_secs()
                ),
            );
        }
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) => {
            wh.metrics.admitted("invalid", started.elapsed());
            let too_big = e
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some();
            return if too_big {
                text(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("the request body is larger than {MAX_BODY} bytes\n"),
                )
            } else {
                text(
                    StatusCode::BAD_REQUEST,
                    format!("cannot read the request body: {e}\n"),
                )
            };
        }
    };
    let (answer, outcome) = review(wh, &path, &body).await;
    wh.metrics.admitted(outcome, started.elapsed());
    let mut r = Response::new(Full::new(Bytes::from(answer.to_string())));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

/// Serves HTTPS on `listener` until the task is dropped. A failed handshake or connection
/// only ends that connection.
pub async fn serve<L: Lookup>(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    wh: Arc<Webhook<L>>,
) -> std::io::Result<()> {
    let acceptor = TlsAcceptor::from(tls);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return Ok(());
        };
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Out of file descriptors and the like: keep serving once it passes.
                tracing::warn!(error = %e, "webhook: cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (acceptor, wh) = (acceptor.clone(), wh.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream))
                .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "webhook: TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let service = hyper::service::service_fn(move |req| {
                let wh = wh.clone();
                async move { Ok::<_, Infallible>(handle(&wh, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tls), service)
                .await;
        });
    }
}
