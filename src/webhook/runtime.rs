//! Starting the webhook inside `schemagate controller`: certificate, registration, the
//! HTTPS server, and a loop that keeps the certificate fresh. Every replica serves (the
//! webhook does not need the leader lease).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::server::{KubeLookup, Webhook};
use super::tls::{self, Endpoint, Lifetimes, Resolver, TlsError};
use crate::runner::policy::RunnerPolicy;
use crate::telemetry::metrics::Metrics;

/// The webhook's flags (part of `schemagate controller`).
#[derive(Debug, Clone, clap::Args)]
pub struct WebhookArgs {
    /// Serve the init-container admission webhook.
    #[arg(long = "webhook", env = "SCHEMAGATE_WEBHOOK", default_value_t = true, action = clap::ArgAction::Set)]
    pub enabled: bool,

    /// Where the webhook listens (HTTPS).
    #[arg(long, env = "SCHEMAGATE_WEBHOOK_ADDR", default_value = "0.0.0.0:9443")]
    pub webhook_addr: SocketAddr,

    /// Outside a cluster: the https:// URL the API server reaches this process at (e.g.
    /// https://127.0.0.1:9443). The controller then registers its
    /// MutatingWebhookConfiguration itself, with this URL and its own CA bundle.
    /// [default: in a cluster, through the Service --webhook-service]
    #[arg(long, env = "SCHEMAGATE_WEBHOOK_URL")]
    pub webhook_url: Option<String>,

    /// The Service in front of the webhook (its DNS names go into the certificate).
    #[arg(
        long,
        env = "SCHEMAGATE_WEBHOOK_SERVICE",
        default_value = "schemagate-webhook"
    )]
    pub webhook_service: String,

    /// The MutatingWebhookConfiguration whose CA bundle the controller keeps current.
    #[arg(
        long,
        env = "SCHEMAGATE_WEBHOOK_CONFIGURATION",
        default_value = "schemagate"
    )]
    pub webhook_configuration: String,

    /// The Secret (in the controller's namespace) holding the self-managed CA and serving
    /// certificate, shared by every replica.
    #[arg(
        long,
        env = "SCHEMAGATE_WEBHOOK_SECRET",
        default_value = "schemagate-webhook-tls"
    )]
    pub webhook_secret: String,

    /// Serve tls.crt/tls.key from this directory instead (e.g. a cert-manager Certificate's
    /// Secret mounted there; cert-manager's CA injector then fills the CA bundle). Reloaded
    /// when the files change.
    #[arg(long, env = "SCHEMAGATE_WEBHOOK_CERT_DIR")]
    pub webhook_cert_dir: Option<PathBuf>,

    /// Job mode: how long an injected init container waits for the target version before
    /// it fails (the kubelet then restarts it).
    #[arg(long, env = "SCHEMAGATE_WEBHOOK_WAIT_TIMEOUT", default_value = "10m", value_parser = crate::model::clock::parse_duration)]
    pub webhook_wait_timeout: Duration,

    /// How often the certificate is checked (renewal, other replicas' renewals, the CA
    /// bundle in the configuration).
    #[arg(long, env = "SCHEMAGATE_WEBHOOK_CERT_CHECK", default_value = "10m", value_parser = crate::model::clock::parse_duration)]
    pub webhook_cert_check: Duration,
}

/// Why the webhook cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(
        "--webhook-url must be an https:// URL (the API server calls webhooks over HTTPS only), got {0:?}"
    )]
    Url(String),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot listen for the webhook on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Where the certificate comes from.
enum Source {
    Dir(PathBuf),
    Secret(Box<SelfManaged>),
}

/// The controller's own CA, in a Secret, registered in the configuration.
struct SelfManaged {
    api: Api<Secret>,
    namespace: String,
    name: String,
    client: Client,
    configuration: String,
    endpoint: Endpoint,
    watched: Vec<String>,
}

impl Source {
    /// The current certificate (PEM chain, PEM key), and whether the API server trusts
    /// its CA: registers the CA bundle as a side effect for the self-managed kind.
    async fn load(&self) -> Result<(Vec<u8>, Vec<u8>, bool), TlsError> {
        match self {
            Source::Dir(dir) => tls::load_dir(dir).map(|(c, k)| (c, k, true)),
            Source::Secret(sm) => {
                let SelfManaged {
                    api,
                    namespace,
                    name,
                    client,
                    configuration,
                    endpoint,
                    watched,
                } = &**sm;
                let bundle = tls::ensure_secret(
                    api,
                    namespace,
                    name,
                    &endpoint.hosts(),
                    &Lifetimes::default(),
                )
                .await?;
                let trusted = match tls::register(
                    client,
                    configuration,
                    endpoint,
                    &bundle.ca_bundle_pem,
                    namespace,
                    watched,
                )
                .await
                {
                    Ok(wrote) => {
                        if wrote {
                            tracing::info!(configuration, "wrote the webhook CA bundle");
                        }
                        true
                    }
                    // Serving still helps (a configuration installed later finds a ready
                    // server); the error is repeated on every check until fixed.
                    Err(e) => {
                        tracing::error!(error = %e, "webhook registration");
                        false
                    }
                };
                // The chain includes nothing but the leaf: the CA is in the bundle.
                Ok((
                    bundle.cert_pem.into_bytes(),
                    bundle.key_pem.into_bytes(),
                    trusted,
                ))
            }
        }
    }
}

/// Starts the webhook: returns once it listens; the server and the certificate loop run
/// as tasks.
pub async fn start(
    args: &WebhookArgs,
    client: Client,
    own_namespace: &str,
    watched: &[String],
    policy: RunnerPolicy,
    metrics: Arc<Metrics>,
) -> Result<Vec<JoinHandle<()>>, StartError> {
    let source = match (&args.webhook_cert_dir, &args.webhook_url) {
        (Some(dir), _) => Source::Dir(dir.clone()),
        (None, url) => {
            let endpoint = match url {
                Some(u) if u.starts_with("https://") => Endpoint::Url(u.clone()),
                Some(u) => return Err(StartError::Url(u.clone())),
                None => Endpoint::Service {
                    namespace: own_namespace.into(),
                    name: args.webhook_service.clone(),
                },
            };
            Source::Secret(Box::new(SelfManaged {
                api: Api::namespaced(client.clone(), own_namespace),
                namespace: own_namespace.into(),
                name: args.webhook_secret.clone(),
                client: client.clone(),
                configuration: args.webhook_configuration.clone(),
                endpoint,
                watched: watched.to_vec(),
            }))
        }
    };
    let (cert, key, _) = source.load().await?;
    let resolver = Resolver::new(tls::certified_key(&cert, &key)?);
    let config = tls::server_config(resolver.clone())?;
    let listener = TcpListener::bind(args.webhook_addr)
        .await
        .map_err(|source| StartError::Bind {
            addr: args.webhook_addr,
            source,
        })?;
    tracing::info!(addr = %args.webhook_addr, "serving the admission webhook (HTTPS {})", tls::MUTATE_PATH);
    let webhook = Arc::new(Webhook {
        lookup: KubeLookup {
            client,
            timeout: Duration::from_secs(5),
        },
        policy,
        metrics,
    });
    let server = tokio::spawn(async move {
        if let Err(e) = super::server::serve(listener, config, webhook).await {
            tracing::error!(error = %e, "the webhook server stopped");
        }
    });
    let every = args.webhook_cert_check.max(Duration::from_secs(1));
    let refresh = tokio::spawn(async move {
        let mut served = cert;
        loop {
            tokio::time::sleep(every).await;
            match source.load().await {
                // A renewed certificate is served only once the API server trusts its CA.
                Ok((cert, key, true)) if cert != served => match tls::certified_key(&cert, &key) {
                    Ok(k) => {
                        resolver.set(k);
                        served = cert;
                        tracing::info!("the webhook now serves a renewed certificate");
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "the renewed webhook certificate is not usable; keeping the current one")
                    }
                },
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(error = %e, "cannot check the webhook certificate; retrying")
                }
            }
        }
    });
    Ok(vec![server, refresh])
}
