//! Admission latency over loopback HTTPS: p50/p99 of the webhook answering a real Pod
//! CREATE review (parse, look up the SchemaMigration in memory, inject, diff, encode),
//! against a baseline measured in the same run: an HTTPS server with the same TLS setup
//! that echoes the body back (TLS, HTTP and the transfer, with no admission work).
//! Requests alternate between the two servers so machine noise hits both alike; each
//! uses one kept-alive connection, as the API server does.
//!
//! In a cluster the webhook also reads the SchemaMigration from the API server (a GET of
//! one object); that round trip is the API server's latency and is not measured here.
//!
//! Usage: cargo bench --bench webhook [-- --requests 3000]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use k8s_openapi::jiff::Timestamp;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use schemagate::api::{MigrationMode, SchemaMigration, SchemaMigrationSpec, SourceSpec};
use schemagate::telemetry::metrics::Metrics;
use schemagate::webhook::InjectSettings;
use schemagate::webhook::server::{Lookup, Webhook, serve};
use schemagate::webhook::tls::{Bundle, Lifetimes, Resolver, server_config};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

struct Memory(HashMap<String, SchemaMigration>);

impl Lookup for Memory {
    async fn get(&self, _ns: &str, name: &str) -> Result<Option<SchemaMigration>, String> {
        Ok(self.0.get(name).cloned())
    }

    async fn authorized(
        &self,
        _user: &k8s_openapi::api::authentication::v1::UserInfo,
        _attributes: k8s_openapi::api::authorization::v1::ResourceAttributes,
    ) -> Result<bool, String> {
        Ok(true)
    }
}

/// The echo baseline: same TLS configuration, body back as JSON.
async fn echo(listener: TcpListener, tls: Arc<rustls::ServerConfig>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(stream).await else {
                return;
            };
            let service = hyper::service::service_fn(
                |req: http::Request<hyper::body::Incoming>| async move {
                    let body = req
                        .into_body()
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    let mut r = http::Response::new(Full::new(body));
                    r.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("application/json"),
                    );
                    Ok::<_, Infallible>(r)
                },
            );
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .await;
        });
    }
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

async fn connect(addr: SocketAddr, ca_pem: &str) -> BufReader<Tls> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.expect("CA")).expect("CA");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
        .expect("handshake");
    BufReader::new(tls)
}

/// One request on a kept-alive connection; returns the response body.
async fn post(conn: &mut BufReader<Tls>, body: &[u8]) -> Vec<u8> {
    let head = format!(
        "POST /mutate HTTP/1.1\r\nHost: webhook\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let stream = conn.get_mut();
    stream.write_all(head.as_bytes()).await.expect("write");
    stream.write_all(body).await.expect("write");
    stream.flush().await.expect("flush");
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        conn.read_line(&mut line).await.expect("read");
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().expect("length");
        }
    }
    let mut out = vec![0; length];
    conn.read_exact(&mut out).await.expect("body");
    out
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn main() {
    let requests: usize = std::env::args()
        .skip_while(|a| a != "--requests")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(3000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let bundle = Bundle::generate(&["127.0.0.1".into()], Timestamp::now(), &Lifetimes::default())
            .expect("certificate");
        let tls = server_config(Resolver::new(bundle.certified_key().expect("key"))).expect("tls");

        let mut sm = SchemaMigration::new(
            "orders",
            SchemaMigrationSpec {
                target_version: Some("20251101".into()),
                mode: MigrationMode::InitContainer,
                ..SchemaMigrationSpec::new("orders-db", "url", SourceSpec::config_map("orders-migrations"))
            },
        );
        sm.metadata.namespace = Some("shop".into());
        let webhook = Arc::new(Webhook {
            lookup: Memory(HashMap::from([("orders".to_string(), sm)])),
            policy: InjectSettings {
                image: "ghcr.io/schemagate/schemagate:bench".into(),
                allowed_images: vec![],
                wait_timeout: Duration::from_secs(600),
                ..Default::default()
            },
            metrics: Arc::new(Metrics::new()),
        });
        let wh_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let echo_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let (wh_addr, echo_addr) = (
            wh_listener.local_addr().expect("addr"),
            echo_listener.local_addr().expect("addr"),
        );
        tokio::spawn(serve(wh_listener, tls.clone(), webhook));
        tokio::spawn(echo(echo_listener, tls));

        let review = json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "0f0e5c53-0d5a-4c56-9d1d-9f3b1b1c2a77",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "shop",
                "operation": "CREATE",
                "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
                "object": {
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"generateName": "web-7f9c6d-", "namespace": "shop",
                                 "labels": {"app": "web", "schemagate.dev/migration": "orders"}},
                    "spec": {
                        "volumes": [{"name": "kube-api-access", "projected": {"sources": []}}],
                        "initContainers": [{"name": "app-init", "image": "shop/web:2"}],
                        "containers": [{"name": "web", "image": "shop/web:2",
                                        "ports": [{"containerPort": 8080}]}]
                    }
                },
                "dryRun": false
            }
        })
        .to_string();
        let body = review.as_bytes();

        let mut wh = connect(wh_addr, &bundle.ca_bundle_pem).await;
        let mut base = connect(echo_addr, &bundle.ca_bundle_pem).await;
        // Warm up both paths.
        for _ in 0..200 {
            let answer = post(&mut wh, body).await;
            assert!(
                String::from_utf8_lossy(&answer).contains("\"patchType\":\"JSONPatch\""),
                "the webhook must inject"
            );
            post(&mut base, body).await;
        }
        let (mut t_wh, mut t_base) = (Vec::new(), Vec::new());
        for i in 0..requests {
            let order: [bool; 2] = if i % 2 == 0 { [true, false] } else { [false, true] };
            for is_wh in order {
                let started = Instant::now();
                if is_wh {
                    post(&mut wh, body).await;
                    t_wh.push(started.elapsed());
                } else {
                    post(&mut base, body).await;
                    t_base.push(started.elapsed());
                }
            }
        }
        t_wh.sort();
        t_base.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "admission over loopback HTTPS, {requests} requests each, one kept-alive connection, review {} bytes",
            body.len()
        );
        println!("{:<10}{:>14}{:>14}{:>9}", "", "echo [ms]", "webhook [ms]", "ratio");
        for (name, p) in [("p50", 0.5), ("p99", 0.99)] {
            let (b, w) = (percentile(&t_base, p), percentile(&t_wh, p));
            println!("{name:<10}{:>14.3}{:>14.3}{:>9.2}", ms(b), ms(w), ms(w) / ms(b));
        }
        println!(
            "webhook work per review (p50 difference): {:.3} ms",
            ms(percentile(&t_wh, 0.5)) - ms(percentile(&t_base, 0.5))
        );
    });
}
