//! The webhook's TLS: a CA and serving certificate the controller makes itself (kept in a
//! Secret so every replica serves the same one; the CA bundle written into the
//! MutatingWebhookConfiguration), or files mounted by cert-manager. Either way the serving
//! certificate is swapped in place when it changes, without a restart.
//!
//! Rotation: the serving certificate is valid for a year and renewed 90 days before it
//! expires; the CA is valid for ten years and renewed one year before. A renewed CA is
//! published next to the old one (the bundle holds both while the old one is valid), so
//! replicas still serving a certificate of the old CA stay trusted.

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations, ServiceReference,
    ValidatingWebhook, ValidatingWebhookConfiguration, WebhookClientConfig,
};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta,
};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::api::{FIELD_MANAGER, MIGRATION_LABEL};

/// The one webhook of the configuration.
pub const WEBHOOK_NAME: &str = "pods.schemagate.dev";
/// The path the API server posts pod AdmissionReviews to.
pub const MUTATE_PATH: &str = "/mutate";
/// The path the API server posts SchemaMigration AdmissionReviews to.
pub const VALIDATE_PATH: &str = "/validate";
/// The one webhook of the validating configuration.
pub const VALIDATING_WEBHOOK_NAME: &str = "schemamigrations.schemagate.dev";

const ANN_NOT_AFTER: &str = "schemagate.dev/not-after";
const ANN_CA_NOT_AFTER: &str = "schemagate.dev/ca-not-after";
const ANN_CA_NAME: &str = "schemagate.dev/ca-name";
const ANN_HOSTS: &str = "schemagate.dev/hosts";

/// Why the webhook cannot serve.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot generate a certificate: {0}")]
    Generate(String),
    #[error("the certificate or key is not usable: {0}")]
    Load(String),
    #[error("cannot read the certificate files in {dir}: {message}")]
    Files { dir: PathBuf, message: String },
    #[error(
        "{op} the webhook certificate Secret {namespace}/{name}: {source}; the controller needs \
         get/create/update on it (see the chart's Role)"
    )]
    Secret {
        op: &'static str,
        namespace: String,
        name: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error(
        "the webhook certificate Secret {namespace}/{name} kept changing while it was being \
         renewed; retrying later"
    )]
    Contended { namespace: String, name: String },
    #[error(
        "{kind} {name} does not exist, so the webhook is not called; install it with the \
         chart (or run with --webhook-url outside a cluster)"
    )]
    NotInstalled { kind: String, name: String },
    #[error(
        "cannot write the CA bundle into {kind} {name}: {source}; the controller needs \
         get/patch on it"
    )]
    Register {
        kind: String,
        name: String,
        #[source]
        source: Box<kube::Error>,
    },
}

/// How long certificates live and when they are renewed.
#[derive(Clone, Copy, Debug)]
pub struct Lifetimes {
    pub ca_valid: Duration,
    pub ca_renew_before: Duration,
    pub cert_valid: Duration,
    pub cert_renew_before: Duration,
}

const DAY: u64 = 24 * 3600;

impl Default for Lifetimes {
    fn default() -> Self {
        Lifetimes {
            ca_valid: Duration::from_secs(3650 * DAY),
            ca_renew_before: Duration::from_secs(365 * DAY),
            cert_valid: Duration::from_secs(365 * DAY),
            cert_renew_before: Duration::from_secs(90 * DAY),
        }
    }
}

/// A CA and the serving certificate it signed, as PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct Bundle {
    /// Trusted CAs: the current one first, then the previous one while it is valid.
    pub ca_bundle_pem: String,
    pub ca_key_pem: String,
    /// The current CA's subject common name (re-creates its issuer for renewals).
    pub ca_name: String,
    pub ca_not_after: Timestamp,
    pub cert_pem: String,
    pub key_pem: String,
    pub not_after: Timestamp,
    /// The serving certificate's names (DNS names or IP addresses).
    pub hosts: Vec<String>,
}

impl fmt::Debug for Bundle {
    // Never prints the keys.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bundle")
            .field("ca_name", &self.ca_name)
            .field("ca_not_after", &self.ca_not_after)
            .field("not_after", &self.not_after)
            .field("hosts", &self.hosts)
            .finish_non_exhaustive()
    }
}

/// What a bundle needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Renewal {
    None,
    /// A new serving certificate (expiring, or for other names).
    Serving,
    /// A new CA and serving certificate.
    Ca,
}

fn gen_err(e: rcgen::Error) -> TlsError {
    TlsError::Generate(e.to_string())
}

fn offset(t: Timestamp) -> Result<time::OffsetDateTime, TlsError> {
    time::OffsetDateTime::from_unix_timestamp(t.as_second())
        .map_err(|e| TlsError::Generate(e.to_string()))
}

fn later(now: Timestamp, d: Duration) -> Result<Timestamp, TlsError> {
    let d = SignedDuration::try_from(d).map_err(|e| TlsError::Generate(e.to_string()))?;
    now.checked_add(d)
        .map_err(|e| TlsError::Generate(e.to_string()))
}

fn ca_params(name: &str) -> rcgen::CertificateParams {
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name
        .push(rcgen::DnType::OrganizationName, "schemagate");
    p.distinguished_name.push(rcgen::DnType::CommonName, name);
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    p
}

fn normalized(hosts: &[String]) -> Vec<String> {
    let mut h: Vec<String> = hosts.iter().map(|s| s.to_ascii_lowercase()).collect();
    h.sort();
    h.dedup();
    h
}

/// A serving certificate for `hosts`, signed by the CA `ca_name`/`ca_key_pem`.
fn issue(
    ca_name: &str,
    ca_key_pem: &str,
    hosts: &[String],
    now: Timestamp,
    valid: Duration,
) -> Result<(String, String, Timestamp), TlsError> {
    let ca_key = rcgen::KeyPair::from_pem(ca_key_pem).map_err(gen_err)?;
    let issuer = rcgen::Issuer::new(ca_params(ca_name), ca_key);
    let mut params = rcgen::CertificateParams::new(hosts.to_vec()).map_err(gen_err)?;
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        hosts.first().cloned().unwrap_or_default(),
    );
    let not_after = later(now, valid)?;
    // A little slack for clocks that run behind.
    params.not_before = offset(now)? - time::Duration::minutes(5);
    params.not_after = offset(not_after)?;
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::DigitalSignature,
        rcgen::KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let key = rcgen::KeyPair::generate().map_err(gen_err)?;
    let cert = params.signed_by(&key, &issuer).map_err(gen_err)?;
    Ok((cert.pem(), key.serialize_pem(), not_after))
}

/// A new CA: (name, certificate PEM, key PEM, not after).
fn new_ca(
    now: Timestamp,
    valid: Duration,
) -> Result<(String, String, String, Timestamp), TlsError> {
    let name = format!("schemagate webhook CA {}", now.strftime("%Y%m%dT%H%M%S"));
    let mut params = ca_params(&name);
    let not_after = later(now, valid)?;
    params.not_before = offset(now)? - time::Duration::minutes(5);
    params.not_after = offset(not_after)?;
    let key = rcgen::KeyPair::generate().map_err(gen_err)?;
    let cert = params.self_signed(&key).map_err(gen_err)?;
    Ok((name, cert.pem(), key.serialize_pem(), not_after))
}

/// The first PEM certificate of a bundle.
fn first_cert(pem: &str) -> Option<String> {
    let end = "-----END CERTIFICATE-----";
    let start = pem.find("-----BEGIN CERTIFICATE-----")?;
    let stop = pem[start..].find(end)? + start + end.len();
    Some(format!("{}\n", &pem[start..stop]))
}

impl Bundle {
    /// A new CA and a serving certificate for `hosts`.
    pub fn generate(hosts: &[String], now: Timestamp, life: &Lifetimes) -> Result<Self, TlsError> {
        let hosts = normalized(hosts);
        let (ca_name, ca_pem, ca_key_pem, ca_not_after) = new_ca(now, life.ca_valid)?;
        let (cert_pem, key_pem, not_after) =
            issue(&ca_name, &ca_key_pem, &hosts, now, life.cert_valid)?;
        Ok(Bundle {
            ca_bundle_pem: ca_pem,
            ca_key_pem,
            ca_name,
            ca_not_after,
            cert_pem,
            key_pem,
            not_after,
            hosts,
        })
    }

    /// What this bundle needs to serve `hosts` at `now`.
    pub fn renewal(&self, hosts: &[String], now: Timestamp, life: &Lifetimes) -> Renewal {
        let left = |t: Timestamp| Duration::try_from(t.duration_since(now)).unwrap_or_default();
        if left(self.ca_not_after) <= life.ca_renew_before {
            Renewal::Ca
        } else if left(self.not_after) <= life.cert_renew_before || normalized(hosts) != self.hosts
        {
            Renewal::Serving
        } else {
            Renewal::None
        }
    }

    /// This bundle renewed as `what` says.
    pub fn renew(
        &self,
        what: Renewal,
        hosts: &[String],
        now: Timestamp,
        life: &Lifetimes,
    ) -> Result<Self, TlsError> {
        let hosts = normalized(hosts);
        match what {
            Renewal::None => Ok(self.clone()),
            Renewal::Serving => {
                let (cert_pem, key_pem, not_after) = issue(
                    &self.ca_name,
                    &self.ca_key_pem,
                    &hosts,
                    now,
                    life.cert_valid,
                )?;
                Ok(Bundle {
                    cert_pem,
                    key_pem,
                    not_after,
                    hosts,
                    ..self.clone()
                })
            }
            Renewal::Ca => {
                let mut next = Bundle::generate(&hosts, now, life)?;
                // The old CA stays trusted while it is valid: replicas that have not picked
                // up the new certificate yet still serve one it signed.
                if self.ca_not_after > now
                    && let Some(old) = first_cert(&self.ca_bundle_pem)
                {
                    next.ca_bundle_pem.push_str(&old);
                }
                Ok(next)
            }
        }
    }

    /// The serving certificate (with its chain) and key, for rustls.
    pub fn certified_key(&self) -> Result<Arc<CertifiedKey>, TlsError> {
        certified_key(self.cert_pem.as_bytes(), self.key_pem.as_bytes())
    }

    /// As Secret data and annotations.
    pub fn to_secret(&self, namespace: &str, name: &str) -> Secret {
        let data = [
            ("ca.crt", &self.ca_bundle_pem),
            ("ca.key", &self.ca_key_pem),
            ("tls.crt", &self.cert_pem),
            ("tls.key", &self.key_pem),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
        .collect();
        let annotations = [
            (ANN_NOT_AFTER, self.not_after.to_string()),
            (ANN_CA_NOT_AFTER, self.ca_not_after.to_string()),
            (ANN_CA_NAME, self.ca_name.clone()),
            (ANN_HOSTS, self.hosts.join(",")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(namespace.into()),
                annotations: Some(annotations),
                labels: Some(
                    [(
                        "app.kubernetes.io/managed-by".to_string(),
                        "schemagate".to_string(),
                    )]
                    .into(),
                ),
                ..Default::default()
            },
            type_: Some("kubernetes.io/tls".into()),
            data: Some(data),
            ..Default::default()
        }
    }

    /// From a Secret written by `to_secret`; the error says what is wrong with it.
    pub fn from_secret(secret: &Secret) -> Result<Self, String> {
        let data = secret.data.clone().unwrap_or_default();
        let text = |k: &str| -> Result<String, String> {
            let v = data.get(k).ok_or_else(|| format!("no key {k}"))?;
            String::from_utf8(v.0.clone()).map_err(|_| format!("key {k} is not PEM text"))
        };
        let ann = secret.annotations();
        let note = |k: &str| {
            ann.get(k)
                .cloned()
                .ok_or_else(|| format!("no annotation {k}"))
        };
        let time = |k: &str| -> Result<Timestamp, String> {
            note(k)?
                .parse()
                .map_err(|e| format!("annotation {k} is not a time: {e}"))
        };
        let bundle = Bundle {
            ca_bundle_pem: text("ca.crt")?,
            ca_key_pem: text("ca.key")?,
            ca_name: note(ANN_CA_NAME)?,
            ca_not_after: time(ANN_CA_NOT_AFTER)?,
            cert_pem: text("tls.crt")?,
            key_pem: text("tls.key")?,
            not_after: time(ANN_NOT_AFTER)?,
            hosts: note(ANN_HOSTS)?
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect(),
        };
        bundle.certified_key().map_err(|e| e.to_string())?;
        rcgen::KeyPair::from_pem(&bundle.ca_key_pem).map_err(|e| format!("ca.key: {e}"))?;
        Ok(bundle)
    }
}

/// A certificate chain and key from PEM, checked to belong together.
pub fn certified_key(cert_pem: &[u8], key_pem: &[u8]) -> Result<Arc<CertifiedKey>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Load(format!("certificate: {e}")))?;
    if certs.is_empty() {
        return Err(TlsError::Load("no certificate in the PEM".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| TlsError::Load(format!("private key: {e}")))?;
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::Load(format!("private key: {e}")))?;
    let ck = CertifiedKey::new(certs, signing);
    ck.keys_match()
        .map_err(|e| TlsError::Load(format!("the key does not match the certificate: {e}")))?;
    Ok(Arc::new(ck))
}

/// The serving certificate, swapped in place on renewal.
#[derive(Debug)]
pub struct Resolver {
    current: RwLock<Arc<CertifiedKey>>,
}

impl Resolver {
    pub fn new(key: Arc<CertifiedKey>) -> Arc<Self> {
        Arc::new(Resolver {
            current: RwLock::new(key),
        })
    }

    /// Serves `key` from the next handshake on.
    pub fn set(&self, key: Arc<CertifiedKey>) {
        if let Ok(mut c) = self.current.write() {
            *c = key;
        }
    }

    /// The certificate (DER, leaf first) served now.
    pub fn current_leaf(&self) -> Option<Vec<u8>> {
        self.current
            .read()
            .ok()
            .and_then(|c| c.cert.first().map(|c| c.to_vec()))
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|c| c.clone())
    }
}

/// A TLS server configuration serving the resolver's certificate (HTTP/1.1 only).
pub fn server_config(resolver: Arc<Resolver>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| TlsError::Load(e.to_string()))?
    .with_no_client_auth()
    .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Reads, creates or renews the certificate Secret, safely against other replicas doing the
/// same (every write carries the resourceVersion it read; a conflict re-reads).
pub async fn ensure_secret(
    api: &Api<Secret>,
    namespace: &str,
    name: &str,
    hosts: &[String],
    life: &Lifetimes,
) -> Result<Bundle, TlsError> {
    let secret_err = |op: &'static str| {
        move |source| TlsError::Secret {
            op,
            namespace: namespace.to_string(),
            name: name.to_string(),
            source: Box::new(source),
        }
    };
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    for _ in 0..5 {
        let now = Timestamp::now();
        let existing = api.get_opt(name).await.map_err(secret_err("cannot read"))?;
        let Some(existing) = existing else {
            let bundle = Bundle::generate(hosts, now, life)?;
            match api
                .create(&params, &bundle.to_secret(namespace, name))
                .await
            {
                Ok(_) => {
                    tracing::info!(secret = name, "created the webhook CA and certificate");
                    return Ok(bundle);
                }
                Err(kube::Error::Api(e)) if e.code == 409 => continue,
                Err(e) => return Err(secret_err("cannot create")(e)),
            }
        };
        let next = match Bundle::from_secret(&existing) {
            Ok(b) => match b.renewal(hosts, now, life) {
                Renewal::None => return Ok(b),
                what => {
                    tracing::info!(secret = name, renewal = ?what, "renewing the webhook certificate");
                    b.renew(what, hosts, now, life)?
                }
            },
            Err(why) => {
                tracing::warn!(secret = name, problem = %why, "the webhook certificate Secret is not usable; replacing it");
                Bundle::generate(hosts, now, life)?
            }
        };
        let mut secret = next.to_secret(namespace, name);
        secret.metadata.resource_version = existing.resource_version();
        match api.replace(name, &params, &secret).await {
            Ok(_) => return Ok(next),
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(secret_err("cannot update")(e)),
        }
    }
    Err(TlsError::Contended {
        namespace: namespace.into(),
        name: name.into(),
    })
}

/// How the API server reaches the webhook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// In a cluster, through a Service (the chart installs the configuration).
    Service { namespace: String, name: String },
    /// Outside one, at a URL (the controller registers the configuration itself).
    Url(String),
}

impl Endpoint {
    /// The names the serving certificate must carry.
    pub fn hosts(&self) -> Vec<String> {
        match self {
            Endpoint::Service { namespace, name } => vec![
                format!("{name}.{namespace}.svc"),
                format!("{name}.{namespace}.svc.cluster.local"),
                format!("{name}.{namespace}"),
                name.clone(),
            ],
            Endpoint::Url(url) => {
                let rest = url.split_once("://").map_or(url.as_str(), |(_, r)| r);
                let authority = rest.split('/').next().unwrap_or_default();
                let host = if let Some(v6) = authority.strip_prefix('[') {
                    v6.split(']').next().unwrap_or_default()
                } else {
                    authority.rsplit_once(':').map_or(authority, |(h, _)| h)
                };
                vec![host.to_string()]
            }
        }
    }

    fn client_config(&self, ca_bundle: &str, path: &str) -> WebhookClientConfig {
        let ca = Some(ByteString(ca_bundle.as_bytes().to_vec()));
        match self {
            Endpoint::Service { namespace, name } => WebhookClientConfig {
                ca_bundle: ca,
                service: Some(ServiceReference {
                    namespace: namespace.clone(),
                    name: name.clone(),
                    path: Some(path.into()),
                    port: Some(443),
                }),
                url: None,
            },
            Endpoint::Url(url) => WebhookClientConfig {
                ca_bundle: ca,
                service: None,
                url: Some(format!("{}{path}", url.trim_end_matches('/'))),
            },
        }
    }
}

/// The MutatingWebhookConfiguration: Pod CREATE only, only pods with the label, never in
/// `kube-system` or the controller's own namespace (and, when the controller watches a
/// list of namespaces, only in those), failing closed within 10 seconds.
pub fn webhook_configuration(
    name: &str,
    endpoint: &Endpoint,
    ca_bundle: &str,
    own_namespace: &str,
    watched: &[String],
) -> MutatingWebhookConfiguration {
    let mut excluded = vec!["kube-system".to_string()];
    if own_namespace != "kube-system" {
        excluded.push(own_namespace.to_string());
    }
    let (operator, values) = if watched.is_empty() {
        ("NotIn", excluded)
    } else {
        let only = watched
            .iter()
            .filter(|n| !excluded.contains(n))
            .cloned()
            .collect();
        ("In", only)
    };
    MutatingWebhookConfiguration {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(
                [(
                    "app.kubernetes.io/managed-by".to_string(),
                    "schemagate".to_string(),
                )]
                .into(),
            ),
            ..Default::default()
        },
        webhooks: Some(vec![MutatingWebhook {
            name: WEBHOOK_NAME.into(),
            admission_review_versions: vec!["v1".into()],
            client_config: endpoint.client_config(ca_bundle, MUTATE_PATH),
            failure_policy: Some("Fail".into()),
            match_policy: Some("Equivalent".into()),
            side_effects: "None".into(),
            timeout_seconds: Some(10),
            reinvocation_policy: Some("Never".into()),
            object_selector: Some(LabelSelector {
                match_expressions: Some(vec![LabelSelectorRequirement {
                    key: MIGRATION_LABEL.into(),
                    operator: "Exists".into(),
                    values: None,
                }]),
                match_labels: None,
            }),
            namespace_selector: Some(LabelSelector {
                match_expressions: Some(vec![LabelSelectorRequirement {
                    key: "kubernetes.io/metadata.name".into(),
                    operator: operator.into(),
                    values: Some(values),
                }]),
                match_labels: None,
            }),
            rules: Some(vec![RuleWithOperations {
                api_groups: Some(vec![String::new()]),
                api_versions: Some(vec!["v1".into()]),
                operations: Some(vec!["CREATE".into()]),
                resources: Some(vec!["pods".into()]),
                scope: Some("Namespaced".into()),
            }]),
            match_conditions: None,
        }]),
    }
}

/// The ValidatingWebhookConfiguration: SchemaMigration CREATE and UPDATE, in every
/// namespace, failing closed (see `validate.rs`).
pub fn validating_configuration(
    name: &str,
    endpoint: &Endpoint,
    ca_bundle: &str,
) -> ValidatingWebhookConfiguration {
    ValidatingWebhookConfiguration {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(managed_by()),
            ..Default::default()
        },
        webhooks: Some(vec![ValidatingWebhook {
            name: VALIDATING_WEBHOOK_NAME.into(),
            admission_review_versions: vec!["v1".into()],
            client_config: endpoint.client_config(ca_bundle, VALIDATE_PATH),
            failure_policy: Some("Fail".into()),
            match_policy: Some("Equivalent".into()),
            side_effects: "None".into(),
            timeout_seconds: Some(10),
            // As the API server defaults them, so a comparison with what it returns holds.
            object_selector: Some(LabelSelector::default()),
            namespace_selector: Some(LabelSelector::default()),
            rules: Some(vec![RuleWithOperations {
                api_groups: Some(vec![crate::api::GROUP.into()]),
                api_versions: Some(vec!["*".into()]),
                operations: Some(vec!["CREATE".into(), "UPDATE".into()]),
                resources: Some(vec!["schemamigrations".into()]),
                scope: Some("Namespaced".into()),
            }]),
            match_conditions: None,
        }]),
    }
}

fn managed_by() -> std::collections::BTreeMap<String, String> {
    [(
        "app.kubernetes.io/managed-by".to_string(),
        "schemagate".to_string(),
    )]
    .into()
}

/// Makes the API server trust `ca_bundle` for both webhook configurations (named `name`):
/// with a URL endpoint they are applied whole (server-side apply); with a Service endpoint
/// the chart owns them and only the CA bundles are patched. Writes only what differs;
/// returns whether anything was written.
pub async fn register(
    client: &kube::Client,
    name: &str,
    endpoint: &Endpoint,
    ca_bundle: &str,
    own_namespace: &str,
    watched: &[String],
) -> Result<bool, TlsError> {
    let mutating = webhook_configuration(name, endpoint, ca_bundle, own_namespace, watched);
    let validating = validating_configuration(name, endpoint, ca_bundle);
    let a = ensure(
        &Api::all(client.clone()),
        name,
        endpoint,
        ca_bundle,
        &mutating,
    )
    .await?;
    let b = ensure(
        &Api::all(client.clone()),
        name,
        endpoint,
        ca_bundle,
        &validating,
    )
    .await?;
    Ok(a || b)
}

/// One configuration: applied whole (URL endpoint) or its CA bundles patched.
async fn ensure<K>(
    api: &Api<K>,
    name: &str,
    endpoint: &Endpoint,
    ca_bundle: &str,
    wanted: &K,
) -> Result<bool, TlsError>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let kind = K::kind(&()).to_string();
    let err = |source| TlsError::Register {
        kind: kind.clone(),
        name: name.to_string(),
        source: Box::new(source),
    };
    let existing = api.get_opt(name).await.map_err(err)?;
    let value = |k: &K| serde_json::to_value(k).unwrap_or_default();
    let want = value(wanted);
    match endpoint {
        Endpoint::Url(_) => {
            let same = existing.as_ref().is_some_and(|e| {
                let e = value(e);
                e["webhooks"] == want["webhooks"]
                    && e["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "schemagate"
            });
            if same {
                return Ok(false);
            }
            let body = serde_json::json!({
                "apiVersion": K::api_version(&()),
                "kind": kind,
                "metadata": want["metadata"],
                "webhooks": want["webhooks"],
            });
            api.patch(
                name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(body),
            )
            .await
            .map_err(err)?;
            Ok(true)
        }
        Endpoint::Service { .. } => {
            let Some(existing) = existing else {
                return Err(TlsError::NotInstalled {
                    kind: kind.clone(),
                    name: name.into(),
                });
            };
            let ca =
                serde_json::to_value(ByteString(ca_bundle.as_bytes().to_vec())).unwrap_or_default();
            let stale: Vec<serde_json::Value> = value(&existing)["webhooks"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|w| w["clientConfig"]["caBundle"] != ca)
                .map(|w| w["name"].clone())
                .collect();
            if stale.is_empty() {
                return Ok(false);
            }
            // Strategic merge: webhooks merge by name, so only their CA bundles change.
            let patch = serde_json::json!({
                "webhooks": stale.iter().map(|n| serde_json::json!({
                    "name": n,
                    "clientConfig": { "caBundle": ca },
                })).collect::<Vec<_>>(),
            });
            api.patch(
                name,
                &PatchParams {
                    field_manager: Some(FIELD_MANAGER.into()),
                    ..Default::default()
                },
                &Patch::Strategic(patch),
            )
            .await
            .map_err(err)?;
            Ok(true)
        }
    }
}

/// Certificate files from a directory (cert-manager's `tls.crt`/`tls.key`).
pub fn load_dir(dir: &std::path::Path) -> Result<(Vec<u8>, Vec<u8>), TlsError> {
    let read = |f: &str| {
        std::fs::read(dir.join(f)).map_err(|e| TlsError::Files {
            dir: dir.to_path_buf(),
            message: format!("{f}: {e}"),
        })
    };
    Ok((read("tls.crt")?, read("tls.key")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts() -> Vec<String> {
        vec!["schemagate-webhook.ops.svc".into(), "127.0.0.1".into()]
    }

    #[test]
    fn generated_bundle_round_trips_through_its_secret() {
        let now = Timestamp::now();
        let b = Bundle::generate(&hosts(), now, &Lifetimes::default()).unwrap();
        assert!(b.certified_key().is_ok());
        let secret = b.to_secret("ops", "tls");
        assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
        let back = Bundle::from_secret(&secret).unwrap();
        assert_eq!(back, b);
        assert_eq!(
            b.renewal(&hosts(), now, &Lifetimes::default()),
            Renewal::None
        );
        let dbg = format!("{b:?}");
        assert!(!dbg.contains("PRIVATE KEY"), "{dbg}");
    }

    #[test]
    fn renewal_is_due_before_expiry_and_for_new_names() {
        let life = Lifetimes::default();
        let now = Timestamp::now();
        let b = Bundle::generate(&hosts(), now, &life).unwrap();
        let day = SignedDuration::from_hours(24);
        let at = |days: i32| now.checked_add(day * days).unwrap();
        assert_eq!(b.renewal(&hosts(), at(200), &life), Renewal::None);
        assert_eq!(b.renewal(&hosts(), at(280), &life), Renewal::Serving);
        assert_eq!(b.renewal(&hosts(), at(3300), &life), Renewal::Ca);
        assert_eq!(
            b.renewal(&["other.ops.svc".to_string()], now, &life),
            Renewal::Serving
        );
        // Names compare case- and order-insensitively.
        let mut shuffled = hosts();
        shuffled.reverse();
        shuffled[0] = shuffled[0].to_uppercase();
        assert_eq!(b.renewal(&shuffled, now, &life), Renewal::None);
    }

    #[test]
    fn serving_renewal_keeps_the_ca_and_ca_renewal_keeps_the_old_ca_trusted() {
        let life = Lifetimes::default();
        let now = Timestamp::now();
        let b = Bundle::generate(&hosts(), now, &life).unwrap();
        let s = b.renew(Renewal::Serving, &hosts(), now, &life).unwrap();
        assert_eq!(s.ca_bundle_pem, b.ca_bundle_pem);
        assert_ne!(s.cert_pem, b.cert_pem);
        assert!(s.certified_key().is_ok());
        let c = b.renew(Renewal::Ca, &hosts(), now, &life).unwrap();
        assert_ne!(c.ca_key_pem, b.ca_key_pem);
        assert_eq!(c.ca_bundle_pem.matches("BEGIN CERTIFICATE").count(), 2);
        assert!(
            c.ca_bundle_pem
                .ends_with(&first_cert(&b.ca_bundle_pem).unwrap())
        );
    }

    #[test]
    fn a_damaged_secret_is_reported() {
        let b = Bundle::generate(&hosts(), Timestamp::now(), &Lifetimes::default()).unwrap();
        let mut secret = b.to_secret("ops", "tls");
        let other = Bundle::generate(&hosts(), Timestamp::now(), &Lifetimes::default()).unwrap();
        secret.data.as_mut().unwrap().insert(
            "tls.key".into(),
            ByteString(other.key_pem.as_bytes().to_vec()),
        );
        let err = Bundle::from_secret(&secret).unwrap_err();
        assert!(err.contains("does not match"), "{err}");
        secret.data.as_mut().unwrap().remove("ca.key");
        assert_eq!(Bundle::from_secret(&secret).unwrap_err(), "no key ca.key");
    }

    #[test]
    fn endpoint_hosts() {
        let svc = Endpoint::Service {
            namespace: "ops".into(),
            name: "schemagate-webhook".into(),
        };
        assert!(
            svc.hosts()
                .contains(&"schemagate-webhook.ops.svc".to_string())
        );
        assert_eq!(
            Endpoint::Url("https://127.0.0.1:9443".into()).hosts(),
            vec!["127.0.0.1"]
        );
        assert_eq!(
            Endpoint::Url("https://[::1]:9443/".into()).hosts(),
            vec!["::1"]
        );
        assert_eq!(
            Endpoint::Url("https://dev.example:9443".into()).hosts(),
            vec!["dev.example"]
        );
    }

    #[test]
    fn configuration_is_narrow_and_fails_closed() {
        let c = webhook_configuration(
            "schemagate",
            &Endpoint::Url("https://127.0.0.1:9443".into()),
            "CA",
            "ops",
            &[],
        );
        let w = &c.webhooks.unwrap()[0];
        assert_eq!(w.failure_policy.as_deref(), Some("Fail"));
        assert_eq!(w.side_effects, "None");
        assert!(w.timeout_seconds.unwrap() <= 30);
        assert_eq!(
            w.client_config.url.as_deref(),
            Some("https://127.0.0.1:9443/mutate")
        );
        let ns = w
            .namespace_selector
            .as_ref()
            .unwrap()
            .match_expressions
            .as_ref()
            .unwrap();
        assert_eq!(
            ns[0].values.as_deref(),
            Some(&["kube-system".to_string(), "ops".to_string()][..])
        );
        let obj = w
            .object_selector
            .as_ref()
            .unwrap()
            .match_expressions
            .as_ref()
            .unwrap();
        assert_eq!(obj[0].key, MIGRATION_LABEL);
        let rule = &w.rules.as_ref().unwrap()[0];
        assert_eq!(
            rule.operations.as_deref(),
            Some(&["CREATE".to_string()][..])
        );
        assert_eq!(rule.resources.as_deref(), Some(&["pods".to_string()][..]));
    }
}
