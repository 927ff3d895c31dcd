//! Leader election on a `coordination.k8s.io/v1` Lease, so two replicas never both act.
//!
//! Writes use the Lease's resourceVersion (optimistic concurrency): of two replicas racing
//! to take an expired lease, exactly one update succeeds. A leader that cannot renew
//! before its lease would expire stops acting (the process exits, and is restarted).
//!
//! Hand-over: a leader that shuts down (SIGTERM) releases the lease (clears the holder),
//! and a standby watches the Lease, so it takes over within moments instead of waiting
//! for the lease to expire.

use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{ObjectMeta, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};

/// Who we are and which Lease we compete for.
#[derive(Clone, Debug)]
pub struct Elector {
    pub api: Api<Lease>,
    pub name: String,
    pub identity: String,
    /// How long a lease lasts without renewal.
    pub duration: Duration,
}

/// What one attempt found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// We hold the lease (took it or renewed it).
    Leader,
    /// Another live replica holds it.
    Follower { holder: String },
}

/// Whether a lease with this spec has expired at `now`.
pub fn expired(spec: &LeaseSpec, now: Timestamp) -> bool {
    let Some(renewed) = spec.renew_time.as_ref().or(spec.acquire_time.as_ref()) else {
        return true;
    };
    let secs = i64::from(spec.lease_duration_seconds.unwrap_or(15));
    renewed.0 + SignedDuration::from_secs(secs) < now
}

impl Elector {
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> Self {
        Elector {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            duration,
        }
    }

    fn spec(&self, now: Timestamp, acquired: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration.as_secs().max(1) as i32),
            acquire_time: Some(acquired.unwrap_or(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// One attempt to become (or stay) the leader.
    pub async fn try_acquire(&self) -> Result<Outcome, kube::Error> {
        let now = Timestamp::now();
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(self.spec(now, None, 0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Outcome::Leader),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(Outcome::Follower {
                    holder: "another replica".into(),
                }),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let ours = holder == self.identity;
        if !ours && !holder.is_empty() && !expired(&spec, now) {
            return Ok(Outcome::Follower { holder });
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!ours);
        let acquired = if ours {
            spec.acquire_time.clone()
        } else {
            None
        };
        lease.spec = Some(self.spec(now, acquired, transitions));
        // `replace` sends the resourceVersion we read: a concurrent writer makes it fail.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(Outcome::Leader),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(Outcome::Follower { holder }),
            Err(e) => Err(e),
        }
    }

    /// Waits until this replica leads: tries at every retry period, and at once when the
    /// Lease changes (a leader that releases it on shutdown hands over immediately).
    pub async fn acquire(&self) {
        let mut announced = false;
        let changes = watcher(
            self.api.clone(),
            watcher::Config::default().fields(&format!("metadata.name={}", self.name)),
        )
        .default_backoff();
        let mut changes = std::pin::pin!(changes);
        loop {
            match self.try_acquire().await {
                Ok(Outcome::Leader) => {
                    tracing::info!(lease = %self.name, identity = %self.identity, "leading");
                    return;
                }
                Ok(Outcome::Follower { holder }) => {
                    if !announced {
                        tracing::info!(lease = %self.name, %holder, "standing by: another replica leads");
                        announced = true;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "leader election: cannot read or write the Lease")
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.duration / 3) => {}
                _ = changes.next() => {}
            }
        }
    }

    /// Gives the lease up (clears the holder), so a standby takes over at once instead of
    /// after the lease expires. Only a lease this replica holds is touched, and the write
    /// carries the resourceVersion read. Returns whether it released one.
    pub async fn release(&self) -> Result<bool, kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Ok(false);
        };
        let mut spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(false);
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        lease.spec = Some(spec);
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            // Somebody wrote it since: it is not ours to release any more.
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Renews the lease until it cannot; returns when leadership is lost.
    pub async fn keep(&self) {
        let mut last_renewal = std::time::Instant::now();
        loop {
            tokio::time::sleep(self.duration / 3).await;
            match self.try_acquire().await {
                Ok(Outcome::Leader) => last_renewal = std::time::Instant::now(),
                Ok(Outcome::Follower { holder }) => {
                    tracing::error!(%holder, "lost the leader lease");
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not renew the leader lease");
                    if last_renewal.elapsed() >= self.duration {
                        tracing::error!("the leader lease expired before it could be renewed");
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll};

    use http::{Request, Response, StatusCode};
    use http_body_util::combinators::BoxBody;
    use http_body_util::{BodyExt, Full, StreamBody};
    use hyper::body::Bytes;
    use hyper::body::Frame;

    #[test]
    fn expiry_uses_the_renewal_and_the_duration() {
        let now = Timestamp::from_second(1_000_000).unwrap();
        let spec = |renewed: i64| LeaseSpec {
            renew_time: Some(MicroTime(Timestamp::from_second(renewed).unwrap())),
            lease_duration_seconds: Some(15),
            ..Default::default()
        };
        assert!(!expired(&spec(999_990), now));
        assert!(expired(&spec(999_980), now));
        assert!(expired(&LeaseSpec::default(), now));
    }

    /// An API server holding Leases, with resourceVersions, conflicts and watches.
    #[derive(Clone)]
    struct FakeLeases {
        state: Arc<Mutex<(Option<Lease>, u64)>>,
        changes: tokio::sync::broadcast::Sender<Lease>,
        watches: Arc<std::sync::atomic::AtomicUsize>,
    }

    type Body = BoxBody<Bytes, Infallible>;

    fn json(status: StatusCode, v: serde_json::Value) -> Response<Body> {
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(v.to_string())).boxed())
            .unwrap()
    }

    fn failure(code: u16, reason: &str) -> Response<Body> {
        json(
            StatusCode::from_u16(code).unwrap(),
            serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                               "reason": reason, "code": code, "message": reason}),
        )
    }

    impl FakeLeases {
        fn new() -> Self {
            FakeLeases {
                state: Arc::default(),
                changes: tokio::sync::broadcast::channel(64).0,
                watches: Arc::default(),
            }
        }

        fn store(&self, mut lease: Lease) -> Lease {
            let mut st = self.state.lock().unwrap();
            st.1 += 1;
            lease.metadata.resource_version = Some(st.1.to_string());
            st.0 = Some(lease.clone());
            let _ = self.changes.send(lease.clone());
            lease
        }

        fn holder(&self) -> Option<String> {
            let st = self.state.lock().unwrap();
            st.0.as_ref()?.spec.as_ref()?.holder_identity.clone()
        }

        async fn answer(&self, req: Request<kube::client::Body>) -> Response<Body> {
            let (parts, body) = req.into_parts();
            let bytes = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let query = parts.uri.query().unwrap_or_default().to_string();
            let by_name = !parts.uri.path().ends_with("/leases");
            let current = self.state.lock().unwrap().clone();
            match (parts.method.as_str(), by_name) {
                ("GET", true) => match current.0 {
                    Some(l) => json(StatusCode::OK, serde_json::to_value(l).unwrap()),
                    None => failure(404, "NotFound"),
                },
                ("GET", false) if query.contains("watch=true") => {
                    self.watches
                        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let events = tokio_stream_of(self.changes.subscribe());
                    Response::builder()
                        .status(StatusCode::OK)
                        .header("content-type", "application/json")
                        .body(BodyExt::boxed(StreamBody::new(events)))
                        .unwrap()
                }
                ("GET", false) => json(
                    StatusCode::OK,
                    serde_json::json!({"apiVersion": "coordination.k8s.io/v1", "kind": "LeaseList",
                        "metadata": {"resourceVersion": current.1.to_string()},
                        "items": current.0.into_iter().collect::<Vec<_>>()}),
                ),
                ("POST", false) => {
                    if current.0.is_some() {
                        return failure(409, "AlreadyExists");
                    }
                    let lease: Lease = serde_json::from_slice(&bytes).unwrap();
                    json(
                        StatusCode::CREATED,
                        serde_json::to_value(self.store(lease)).unwrap(),
                    )
                }
                ("PUT", true) => {
                    let lease: Lease = serde_json::from_slice(&bytes).unwrap();
                    if lease.metadata.resource_version != Some(current.1.to_string()) {
                        return failure(409, "Conflict");
                    }
                    json(
                        StatusCode::OK,
                        serde_json::to_value(self.store(lease)).unwrap(),
                    )
                }
                _ => failure(404, "NotFound"),
            }
        }
    }

    /// Watch events as the API server streams them: one JSON object per line.
    fn tokio_stream_of(
        mut rx: tokio::sync::broadcast::Receiver<Lease>,
    ) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send + Sync + 'static
    {
        let (tx, out) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(lease) = rx.recv().await {
                let line =
                    serde_json::json!({"type": "MODIFIED", "object": lease}).to_string() + "\n";
                if tx.send(Ok(Frame::data(Bytes::from(line)))).is_err() {
                    return;
                }
            }
        });
        futures_util::stream::unfold(out, |mut out| async move {
            out.recv().await.map(|item| (item, out))
        })
    }

    impl tower::Service<Request<kube::client::Body>> for FakeLeases {
        type Response = Response<Body>;
        type Error = Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: Request<kube::client::Body>) -> Self::Future {
            let me = self.clone();
            Box::pin(async move { Ok(me.answer(req).await) })
        }
    }

    fn elector(api: &FakeLeases, who: &str) -> Elector {
        Elector::new(
            Client::new(api.clone(), "schemagate"),
            "schemagate",
            "schemagate-controller",
            who,
            Duration::from_secs(15),
        )
    }

    #[tokio::test]
    async fn a_released_lease_is_taken_over_by_the_standby_at_once() {
        let api = FakeLeases::new();
        let (a, b) = (elector(&api, "replica-a"), elector(&api, "replica-b"));
        assert_eq!(a.try_acquire().await.unwrap(), Outcome::Leader);
        let standby = tokio::spawn(async move {
            b.acquire().await;
            std::time::Instant::now()
        });
        // The standby is watching the Lease (and still standing by: A holds it).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while api.watches.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the standby never watched"
            );
            tokio::task::yield_now().await;
        }
        assert_eq!(api.holder().as_deref(), Some("replica-a"));
        assert!(!standby.is_finished());

        // A shuts down: it releases; B takes over long before the 15 s lease could expire.
        let released = std::time::Instant::now();
        assert!(a.release().await.unwrap());
        let took_over = tokio::time::timeout(Duration::from_secs(5), standby)
            .await
            .expect("the standby takes over within 5s, not after the lease expires")
            .unwrap();
        eprintln!(
            "leader hand-over: the standby led {:?} after the release",
            took_over - released
        );
        assert_eq!(api.holder().as_deref(), Some("replica-b"));
        // A released only its own lease: asked again, it touches nothing.
        assert!(!a.release().await.unwrap());
        assert_eq!(api.holder().as_deref(), Some("replica-b"));
    }
}
