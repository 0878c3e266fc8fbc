//! Workload identities and the mesh TLS built on them.
//!
//! [`table`] holds the identities a process fronts (by service and by TLS server name) and the
//! mesh TLS server configuration. For each identity, an [`IdentityAgent`] makes a key pair (it
//! never leaves the process), asks the control plane's CA for a certificate with a join token,
//! and renews at two thirds of the lifetime by proving it holds the current certificate. Each
//! renewal swaps in new TLS configurations atomically; connections already open keep the ones
//! they started with.

pub mod control_tls;
pub mod table;
pub mod upstream;

use crate::telemetry::metrics::Metrics;
use arc_swap::ArcSwapOption;
use rcgen::{CertificateParams, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore};
use smesh_api::v1::identity_client::IdentityClient;
use smesh_api::v1::{certify_request, CertifyRequest};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use table::{Identities, Identity};
use tokio::sync::watch;

/// How long a starting proxy keeps asking for its first certificate before it goes on
/// without one (its configuration waits for this).
const FIRST_CERTIFICATE_PATIENCE: Duration = Duration::from_secs(30);

/// ALPN names on mesh connections: what the inbound side should do with the stream.
pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP1: &[u8] = b"http/1.1";
pub const ALPN_TCP: &[u8] = b"smesh-tcp";

pub struct MeshTls {
    pub spiffe_id: String,
    /// The TLS server name peers ask for (`<service>.service.<trust-domain>`); None if the
    /// SPIFFE ID is not a service identity.
    pub tls_name: Option<String>,
    pub not_after: SystemTime,
    /// The certificate chain and key, for other clients (the control-plane connection).
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// The CA roots this identity trusts, as received and parsed.
    pub bundle_pem: String,
    pub roots: Arc<RootCertStore>,
    /// What the mesh TLS server presents to a client naming this identity
    /// ([`table::Identities`] holds the server configuration).
    pub certified: Arc<CertifiedKey>,
    pub client_h2: Arc<ClientConfig>,
    pub client_http1: Arc<ClientConfig>,
    pub client_tcp: Arc<ClientConfig>,
}

/// One identity's current certificate, if any; swapped on renewal.
pub type TlsHandle = Arc<ArcSwapOption<MeshTls>>;

/// The TLS server name a peer with this SPIFFE ID presents (the CA puts it in a DNS SAN).
pub fn server_name(spiffe_id: &str) -> Option<ServerName<'static>> {
    ServerName::try_from(smesh_model::SpiffeId::parse(spiffe_id)?.tls_name()).ok()
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn build(
    spiffe_id: String,
    chain_pem: &str,
    bundle_pem: &str,
    key: &KeyPair,
    not_after: SystemTime,
) -> Result<MeshTls, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("certificate: {e}"))?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    build_from(spiffe_id, chain, bundle_pem, key, not_after)
}

fn build_from(
    spiffe_id: String,
    chain: Vec<CertificateDer<'static>>,
    bundle_pem: &str,
    key: PrivateKeyDer<'static>,
    not_after: SystemTime,
) -> Result<MeshTls, String> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(bundle_pem.as_bytes()) {
        roots
            .add(cert.map_err(|e| format!("trust bundle: {e}"))?)
            .map_err(|e| format!("trust bundle: {e}"))?;
    }
    if roots.is_empty() {
        return Err("trust bundle: no certificate".into());
    }
    let roots = Arc::new(roots);
    let certified = CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider())
        .map_err(|e| format!("server config: {e}"))?;
    let client = |alpn: &[u8]| -> Result<Arc<ClientConfig>, String> {
        let mut c = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .map_err(|e| format!("client config: {e}"))?;
        c.alpn_protocols = vec![alpn.to_vec()];
        Ok(Arc::new(c))
    };
    let (client_h2, client_http1, client_tcp) = (client(ALPN_H2)?, client(ALPN_HTTP1)?, client(ALPN_TCP)?);
    let tls_name = smesh_model::SpiffeId::parse(&spiffe_id).map(|id| id.tls_name());
    Ok(MeshTls {
        spiffe_id,
        tls_name,
        not_after,
        chain,
        key,
        bundle_pem: bundle_pem.to_string(),
        roots,
        certified: Arc::new(certified),
        client_h2,
        client_http1,
        client_tcp,
    })
}

impl MeshTls {
    /// The same identity trusting another set of roots (a CA rotation's bundle).
    pub fn with_bundle(&self, bundle_pem: &str) -> Result<MeshTls, String> {
        build_from(
            self.spiffe_id.clone(),
            self.chain.clone(),
            bundle_pem,
            self.key.clone_key(),
            self.not_after,
        )
    }
}

/// The SPIFFE ID in a peer's certificate (its URI SAN), once the handshake verified it.
pub fn peer_identity(cert: &CertificateDer<'_>) -> Option<String> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) = X509Certificate::from_der(cert.as_ref()).ok()?;
    smesh_model::certificate_spiffe_id(&cert).map(str::to_string)
}

/// Gets and renews one identity's certificate, installing each in the table.
pub struct IdentityAgent {
    pub urls: Vec<String>,
    /// For `https://` control planes.
    pub trust: Option<crate::identity::control_tls::ControlTrust>,
    pub identity: Arc<Identity>,
    pub identities: Arc<Identities>,
    pub join_token: Option<String>,
    pub metrics: Arc<Metrics>,
}

enum Proof {
    Token(String),
    Certificate(String),
}

impl IdentityAgent {
    /// Gets the first certificate (returns once it has one, or knows it cannot), then keeps
    /// renewing in the background until `stop`.
    pub async fn start(self, mut stop: watch::Receiver<bool>) -> Option<tokio::task::JoinHandle<()>> {
        let Some(token) = self.join_token.clone() else {
            tracing::warn!(service = %self.identity.service, "no join token (--token-file): this proxy has no identity, so it speaks plaintext to the mesh and cannot serve mesh mTLS");
            return None;
        };
        let key = match KeyPair::generate() {
            Ok(k) => k,
            Err(e) => {
                tracing::error!(error = %e, "cannot generate a key pair; no identity");
                return None;
            }
        };
        let mut proof = Proof::Token(token);
        let mut attempt = 0u32;
        let give_up = tokio::time::Instant::now() + FIRST_CERTIFICATE_PATIENCE;
        // The first certificate: retried while the control plane is unreachable (for a
        // bounded time, so the proxy still gets its configuration); a refusal (bad, used or
        // expired token) is final.
        loop {
            match self.certify(&key, &proof).await {
                Ok(cert_pem) => {
                    proof = Proof::Certificate(cert_pem);
                    break;
                }
                Err(Failure::Refused(why)) => {
                    tracing::error!(service = %self.identity.service, reason = %why, "the control plane refused a certificate; this proxy has no identity");
                    self.metrics.identity_renewals.with_label_values(&["refused"]).inc();
                    return None;
                }
                Err(Failure::Unavailable(why)) => {
                    attempt += 1;
                    tracing::warn!(reason = %why, attempt, "cannot get a certificate yet; retrying");
                    let wake = tokio::time::Instant::now() + backoff(attempt);
                    if wake > give_up {
                        tracing::error!(service = %self.identity.service, "no certificate after {FIRST_CERTIFICATE_PATIENCE:?}; running without an identity");
                        return None;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep_until(wake) => {}
                        _ = crate::shutdown::stopped(&mut stop) => return None,
                    }
                }
            }
        }
        Some(tokio::spawn(self.renew_forever(key, proof, stop)))
    }

    async fn renew_forever(self, key: KeyPair, mut proof: Proof, mut stop: watch::Receiver<bool>) {
        let mut failures = 0u32;
        loop {
            let wait = match self.identity.tls.load_full() {
                Some(tls) => renew_in(tls.not_after),
                None => Duration::from_secs(1),
            };
            let wait = if failures > 0 {
                backoff(failures).min(wait)
            } else {
                wait
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = crate::shutdown::stopped(&mut stop) => return,
            }
            match self.certify(&key, &proof).await {
                Ok(cert_pem) => {
                    failures = 0;
                    proof = Proof::Certificate(cert_pem);
                }
                Err(Failure::Refused(why) | Failure::Unavailable(why)) => {
                    failures += 1;
                    tracing::warn!(reason = %why, failures, "certificate renewal failed; retrying");
                    self.metrics.identity_renewals.with_label_values(&["failed"]).inc();
                }
            }
        }
    }

    /// One Certify call against the control replicas in turn; installs the result.
    async fn certify(&self, key: &KeyPair, proof: &Proof) -> Result<String, Failure> {
        let csr = CertificateParams::new(Vec::<String>::new())
            .and_then(|p| p.serialize_request(key))
            .and_then(|c| c.pem())
            .map_err(|e| Failure::Refused(format!("cannot make a CSR: {e}")))?;
        let request = CertifyRequest {
            service: self.identity.service.to_string(),
            csr_pem: csr,
            proof: Some(match proof {
                Proof::Token(t) => certify_request::Proof::JoinToken(t.clone()),
                Proof::Certificate(c) => certify_request::Proof::CurrentCertPem(c.clone()),
            }),
        };
        let mut last = String::from("no control plane configured");
        for url in &self.urls {
            let current = self.identity.tls.load_full();
            let mut client =
                match crate::identity::control_tls::grpc_channel(url, self.trust.as_ref(), current.as_deref()).await {
                    Ok(channel) => IdentityClient::new(channel),
                    Err(e) => {
                        last = format!("{url}: {e}");
                        continue;
                    }
                };
            match client.certify(request.clone()).await {
                Ok(resp) => {
                    let resp = resp.into_inner();
                    let not_after = UNIX_EPOCH + Duration::from_secs(resp.not_after_unix);
                    let tls = build(
                        resp.spiffe_id.clone(),
                        &resp.cert_chain_pem,
                        &resp.trust_bundle_pem,
                        key,
                        not_after,
                    )
                    .map_err(Failure::Refused)?;
                    self.identities.install(&self.identity, tls).map_err(Failure::Refused)?;
                    self.metrics.identity_expiry.set(resp.not_after_unix as i64);
                    self.metrics.identity_renewals.with_label_values(&["ok"]).inc();
                    tracing::info!(identity = %resp.spiffe_id, not_after = resp.not_after_unix, "certificate installed");
                    return Ok(resp.cert_chain_pem);
                }
                Err(status)
                    if matches!(
                        status.code(),
                        tonic::Code::PermissionDenied | tonic::Code::InvalidArgument | tonic::Code::Unauthenticated
                    ) =>
                {
                    return Err(Failure::Refused(status.message().to_string()));
                }
                Err(status) => last = format!("{url}: {}", status.message()),
            }
        }
        Err(Failure::Unavailable(last))
    }
}

enum Failure {
    Refused(String),
    Unavailable(String),
}

fn backoff(attempt: u32) -> Duration {
    let base = Duration::from_millis(200) * 2u32.saturating_pow(attempt.min(7));
    base.min(Duration::from_secs(30))
        .mul_f64(0.5 + rand::random::<f64>() / 2.0)
}

/// Renew at two thirds of the remaining lifetime (measured from now, so a late start still
/// leaves room for retries before expiry).
fn renew_in(not_after: SystemTime) -> Duration {
    let left = not_after.duration_since(SystemTime::now()).unwrap_or_default();
    (left * 2 / 3).max(Duration::from_millis(500))
}
