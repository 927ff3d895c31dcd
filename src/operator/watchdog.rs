//! The watch watchdog behind `/livez`: a stuck watch (a connection that stays open and
//! delivers nothing) is invisible to the watcher, so the controller would silently stop
//! seeing changes. Every byte that arrives on a watch response (an event, a bookmark, the
//! start of a new watch after the server's timeout) counts as progress; `/livez` fails
//! when none arrived for the configured time while the controller runs its watches.
//!
//! An idle but healthy controller keeps making progress: the API server ends every watch
//! after its timeout (at most 290 s for kube's watcher) and sends bookmarks, and each new
//! watch is progress, so a quiet cluster never trips the watchdog.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};

/// When watches last made progress.
#[derive(Debug)]
pub struct Progress {
    start: Instant,
    /// Milliseconds since `start` of the last progress.
    last_ms: AtomicU64,
    /// Set while this replica runs its watches (a standby watches nothing).
    armed: AtomicBool,
    /// How long without progress counts as stuck.
    pub stall_after: Duration,
}

impl Progress {
    pub fn new(stall_after: Duration) -> Arc<Self> {
        Arc::new(Progress {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            armed: AtomicBool::new(false),
            stall_after,
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Something arrived on a watch.
    pub fn stamp(&self) {
        self.last_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// The watches start (leader) or stop (standby, shutdown): only running watches are
    /// judged. Arming counts as progress, so the first watch has the full time to start.
    pub fn arm(&self, on: bool) {
        if on {
            self.stamp();
        }
        self.armed.store(on, Ordering::SeqCst);
    }

    /// How long the watches have been silent, if they are stuck (silent for longer than
    /// `stall_after` while armed).
    pub fn stalled(&self) -> Option<Duration> {
        if !self.armed.load(Ordering::SeqCst) {
            return None;
        }
        let silent = Duration::from_millis(
            self.now_ms()
                .saturating_sub(self.last_ms.load(Ordering::Relaxed)),
        );
        (silent > self.stall_after).then_some(silent)
    }
}

/// A tower layer for the Kubernetes client that stamps [`Progress`] for watch responses.
#[derive(Clone, Debug)]
pub struct WatchProgressLayer {
    pub progress: Arc<Progress>,
}

impl<S> tower::Layer<S> for WatchProgressLayer {
    type Service = WatchProgress<S>;

    fn layer(&self, inner: S) -> Self::Service {
        WatchProgress {
            inner,
            progress: self.progress.clone(),
        }
    }
}

/// The service of [`WatchProgressLayer`].
#[derive(Clone, Debug)]
pub struct WatchProgress<S> {
    inner: S,
    progress: Arc<Progress>,
}

fn is_watch<B>(req: &Request<B>) -> bool {
    req.uri()
        .query()
        .is_some_and(|q| q.split('&').any(|p| p == "watch=true" || p == "watch=1"))
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, ReqBody, ResBody> tower::Service<Request<ReqBody>> for WatchProgress<S>
where
    S: tower::Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = Response<Stamped<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let watch = is_watch(&req).then(|| self.progress.clone());
        let future = self.inner.call(req);
        Box::pin(async move {
            let response = future.await?;
            if let Some(p) = &watch {
                p.stamp();
            }
            Ok(response.map(|inner| Stamped {
                inner,
                progress: watch,
            }))
        })
    }
}

/// A response body that stamps progress on every frame (watch responses only).
#[derive(Debug)]
pub struct Stamped<B> {
    inner: B,
    progress: Option<Arc<Progress>>,
}

impl<B: Body + Unpin> Body for Stamped<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let (Poll::Ready(Some(Ok(_))), Some(p)) = (&polled, &self.progress) {
            p.stamp();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_armed_silence_past_the_limit_is_a_stall() {
        let p = Progress::new(Duration::from_millis(0));
        assert_eq!(p.stalled(), None, "a standby watches nothing");
        p.arm(true);
        // Any silence is too long with a zero limit: it shows within a deadline.
        let deadline = Instant::now() + Duration::from_secs(5);
        while p.stalled().is_none() {
            assert!(Instant::now() < deadline, "never stalled");
            std::thread::yield_now();
        }
        let p = Progress::new(Duration::from_secs(600));
        p.arm(true);
        assert_eq!(p.stalled(), None);
        p.arm(false);
        assert_eq!(p.stalled(), None);
    }

    #[test]
    fn watch_requests_are_told_from_others() {
        let r = |uri: &str| Request::get(uri).body(()).unwrap();
        assert!(is_watch(&r(
            "/api/v1/pods?labelSelector=a&watch=true&timeoutSeconds=290"
        )));
        assert!(!is_watch(&r("/api/v1/pods?labelSelector=a")));
        assert!(!is_watch(&r("/api/v1/namespaces/shop/pods/watch-me")));
    }

    /// A watch whose server sends what the test says, through the layer, judged by the
    /// real `/livez`.
    #[tokio::test]
    async fn livez_stays_up_through_bookmarks_and_fails_on_a_stuck_watch() {
        use futures_util::StreamExt;
        use http_body_util::{BodyExt, Full, StreamBody};
        use hyper::body::Bytes;
        use k8s_openapi::api::coordination::v1::Lease;
        use std::convert::Infallible;

        type Out = http_body_util::combinators::BoxBody<Bytes, Infallible>;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
        let rx = Arc::new(tokio::sync::Mutex::new(Some(rx)));
        let inner = tower::service_fn(move |req: Request<kube::client::Body>| {
            let rx = rx.clone();
            async move {
                let watch = is_watch(&req);
                let body: Out = if watch {
                    // One watch, fed by the test, never ended by the server.
                    let rx = rx.lock().await.take();
                    let frames = futures_util::stream::unfold(rx, |rx| async move {
                        let mut rx = rx?;
                        let b = rx.recv().await?;
                        Some((Ok::<_, Infallible>(Frame::data(b)), Some(rx)))
                    });
                    BodyExt::boxed(StreamBody::new(frames))
                } else {
                    let list = r#"{"apiVersion":"coordination.k8s.io/v1","kind":"LeaseList","metadata":{"resourceVersion":"1"},"items":[]}"#;
                    BodyExt::boxed(Full::new(Bytes::from(list)))
                };
                Ok::<_, Infallible>(Response::new(body))
            }
        });
        let progress = Progress::new(Duration::from_millis(300));
        let layer = WatchProgressLayer {
            progress: progress.clone(),
        };
        let client = kube::Client::new(tower::Layer::layer(&layer, inner), "default");
        let api = kube::Api::<Lease>::namespaced(client, "default");
        let watch = tokio::spawn(
            kube::runtime::watcher(api, kube::runtime::watcher::Config::default())
                .for_each(|_| async {}),
        );
        let health = crate::operator::health::Health::with_watchdog(Some(progress.clone()));
        let metrics = crate::telemetry::metrics::Metrics::new();
        let livez = || {
            crate::operator::health::handle("/livez", &health, &metrics)
                .status()
                .as_u16()
        };
        progress.arm(true);

        // Idle but healthy: only bookmarks arrive, for more than three stall limits.
        let bookmark = r#"{"type":"BOOKMARK","object":{"apiVersion":"coordination.k8s.io/v1","kind":"Lease","metadata":{"resourceVersion":"7"}}}"#;
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        for _ in 0..25 {
            tick.tick().await;
            tx.send(Bytes::from(format!("{bookmark}\n"))).unwrap();
            assert_eq!(livez(), 200, "a watch that sends bookmarks is alive");
        }

        // Stuck: the connection stays open and nothing arrives.
        let deadline = Instant::now() + Duration::from_secs(10);
        while livez() == 200 {
            assert!(
                Instant::now() < deadline,
                "a stuck watch never failed /livez"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(livez(), 503);
        // A standby (watches stopped) is never judged.
        progress.arm(false);
        assert_eq!(livez(), 200);
        watch.abort();
        drop(tx);
    }
}
