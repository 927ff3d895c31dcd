//! The controller's plain-HTTP endpoints: `/metrics`, `/livez`, `/readyz`.
//!
//! `/livez` fails when the controller loop has died, or its watches made no progress for
//! the watchdog's limit (see `watchdog.rs`), so the kubelet restarts the pod;
//! `/readyz` only succeeds once this replica is useful: the leader after its first full
//! watch sync, a standby once it reached the API server.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::telemetry::metrics::Metrics;

/// What the probes report.
#[derive(Default)]
pub struct Health {
    /// Set when this replica can do its job (see the module docs).
    pub ready: AtomicBool,
    /// Cleared if the controller loop stops unexpectedly.
    pub alive: AtomicBool,
    /// Set while this replica leads (reconciles).
    pub leading: AtomicBool,
    /// A short reason for `/readyz` while not ready.
    pub waiting_for: std::sync::Mutex<String>,
    /// The watch watchdog (none: `/livez` only follows `alive`).
    pub watches: Option<Arc<super::watchdog::Progress>>,
}

impl Health {
    pub fn new() -> Arc<Self> {
        Self::with_watchdog(None)
    }

    /// Health whose `/livez` also fails when `watches` stalls.
    pub fn with_watchdog(watches: Option<Arc<super::watchdog::Progress>>) -> Arc<Self> {
        let h = Health {
            watches,
            ..Health::default()
        };
        h.alive.store(true, Ordering::SeqCst);
        if let Ok(mut w) = h.waiting_for.lock() {
            *w = "starting".into();
        }
        Arc::new(h)
    }

    pub fn set_waiting(&self, why: &str) {
        if let Ok(mut w) = self.waiting_for.lock() {
            *w = why.into();
        }
    }
}

fn text(status: StatusCode, body: String, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    r
}

/// Answers one request.
pub fn handle(path: &str, health: &Health, metrics: &Metrics) -> Response<Full<Bytes>> {
    match path {
        "/metrics" => text(
            StatusCode::OK,
            {
                metrics
                    .ready
                    .set(i64::from(health.ready.load(Ordering::SeqCst)));
                metrics
                    .leader
                    .set(i64::from(health.leading.load(Ordering::SeqCst)));
                metrics.encode()
            },
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
        "/livez" if !health.alive.load(Ordering::SeqCst) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "the controller loop stopped\n".into(),
            "text/plain",
        ),
        "/livez" => match health.watches.as_ref().and_then(|w| w.stalled()) {
            Some(silent) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the watches made no progress for {}s (limit {}s)\n",
                    silent.as_secs(),
                    health
                        .watches
                        .as_ref()
                        .map(|w| w.stall_after.as_secs())
                        .unwrap_or(0)
                ),
                "text/plain",
            ),
            None => text(StatusCode::OK, "ok\n".into(), "text/plain"),
        },
        "/readyz" if health.ready.load(Ordering::SeqCst) => {
            text(StatusCode::OK, "ok\n".into(), "text/plain")
        }
        "/readyz" => {
            let why = health
                .waiting_for
                .lock()
                .map(|w| w.clone())
                .unwrap_or_default();
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
                "text/plain",
            )
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".into(), "text/plain"),
    }
}

/// Serves the endpoints on `addr` until the process ends.
pub async fn serve(
    addr: SocketAddr,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /metrics, /livez and /readyz");
    loop {
        let (stream, _) = listener.accept().await?;
        let (health, metrics) = (health.clone(), metrics.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let response = handle(req.uri().path(), &health, &metrics);
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_tell_the_truth() {
        let h = Health::new();
        let m = Metrics::new();
        assert_eq!(handle("/livez", &h, &m).status(), StatusCode::OK);
        let not_ready = handle("/readyz", &h, &m);
        assert_eq!(not_ready.status(), StatusCode::SERVICE_UNAVAILABLE);
        h.ready.store(true, Ordering::SeqCst);
        assert_eq!(handle("/readyz", &h, &m).status(), StatusCode::OK);
        h.alive.store(false, Ordering::SeqCst);
        assert_eq!(
            handle("/livez", &h, &m).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(handle("/metrics", &h, &m).status(), StatusCode::OK);
        assert_eq!(handle("/nope", &h, &m).status(), StatusCode::NOT_FOUND);
    }
}
