//! The control plane's own TLS (`--tls`, or `--tls-cert` and `--tls-key`).
//!
//! Clients verify the control plane with the mesh root (or the CA that signed the given
//! certificate). Client certificates are optional at the handshake, so a proxy can spend
//! its join token before it has one; the services that need a proxy's identity check the
//! [`PeerCertificate`] a verified handshake leaves on each request.

use crate::ca::{Ca, CaHandle};
use arc_swap::ArcSwap;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::ring::sign::any_supported_type;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// The control plane's own certificate lives this long and is reissued at a third of it.
const OWN_CERTIFICATE_TTL: Duration = Duration::from_secs(24 * 3600);

/// Where the serving certificate comes from.
#[derive(Debug, Clone)]
pub enum ServingCertificate {
    /// Issued by the mesh CA for these names (DNS names or IP addresses), and reissued
    /// before it expires.
    Own { names: Vec<String> },
    /// Given by the operator (PEM files, read once at start).
    Files { cert: PathBuf, key: PathBuf },
}

/// The verified identity of the client on a TLS connection that presented a mesh
/// certificate; put on every request of that connection.
#[derive(Debug, Clone)]
pub struct PeerCertificate {
    /// The URI SAN (`spiffe://<trust-domain>/service/<name>`).
    pub spiffe_id: String,
    pub not_after: SystemTime,
}

#[derive(Debug)]
struct Resolver(ArcSwap<CertifiedKey>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certified(chain_pem: &str, key: PrivateKeyDer<'_>) -> Result<CertifiedKey, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("certificate: {e}"))?;
    if chain.is_empty() {
        return Err("certificate: no PEM certificate found".into());
    }
    let key = any_supported_type(&key).map_err(|e| format!("key: {e}"))?;
    Ok(CertifiedKey::new(chain, key))
}

fn own_certificate(ca: &Ca, names: &[String]) -> Result<CertifiedKey, String> {
    let key = rcgen::KeyPair::generate().map_err(|e| format!("generating a key: {e}"))?;
    let (pem, _) = ca.issue_control(&key, names, OWN_CERTIFICATE_TTL)?;
    let der = PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| format!("key: {e}"))?;
    certified(&pem, der)
}

/// Client certificates are checked against every root the CA trusts; a rotation swaps them.
fn client_verifier(ca: &Ca) -> Result<Arc<dyn ClientCertVerifier>, String> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca.bundle_pem().as_bytes()) {
        roots
            .add(cert.map_err(|e| format!("CA root: {e}"))?)
            .map_err(|e| format!("CA root: {e}"))?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| format!("client verifier: {e}"))
}

/// The control plane's TLS: its configuration, and what a CA change must update in it.
pub struct ControlTls {
    pub config: Arc<ServerConfig>,
    resolver: Arc<Resolver>,
    verifier: Arc<SwappableVerifier>,
    serving: ServingCertificate,
}

impl ControlTls {
    pub fn new(ca: &Ca, serving: &ServingCertificate) -> Result<Arc<Self>, String> {
        let first = match serving {
            ServingCertificate::Own { names } => own_certificate(ca, names)?,
            ServingCertificate::Files { cert, key } => {
                let read = |p: &PathBuf| std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
                let chain = String::from_utf8(read(cert)?).map_err(|_| format!("{}: not PEM", cert.display()))?;
                let key_der = PrivateKeyDer::from_pem_slice(&read(key)?)
                    .map_err(|e| format!("{}: no private key: {e}", key.display()))?;
                certified(&chain, key_der).map_err(|e| format!("{}: {e}", cert.display()))?
            }
        };
        let resolver = Arc::new(Resolver(ArcSwap::from_pointee(first)));
        let verifier = Arc::new(SwappableVerifier(ArcSwap::from_pointee(client_verifier(ca)?)));
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(verifier.clone())
            .with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(ControlTls {
            config: Arc::new(config),
            resolver,
            verifier,
            serving: serving.clone(),
        }))
    }

    /// After a CA change: trust its roots, and serve a certificate from its signing root.
    pub fn ca_changed(&self, ca: &Ca) {
        match client_verifier(ca) {
            Ok(v) => self.verifier.0.store(Arc::new(v)),
            Err(e) => tracing::error!(error = %e, "cannot trust the new CA roots"),
        }
        self.reissue(ca);
    }

    fn reissue(&self, ca: &Ca) {
        if let ServingCertificate::Own { names } = &self.serving {
            match own_certificate(ca, names) {
                Ok(c) => self.resolver.0.store(Arc::new(c)),
                Err(e) => tracing::error!(error = %e, "cannot reissue the control plane's certificate"),
            }
        }
    }

    /// Reissues an own certificate before it expires, for as long as the runtime lives.
    pub fn keep_fresh(self: Arc<Self>, ca: CaHandle) {
        if !matches!(self.serving, ServingCertificate::Own { .. }) {
            return;
        }
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(OWN_CERTIFICATE_TTL / 3).await;
                self.reissue(&ca.load());
            }
        });
    }
}

/// A client-certificate verifier whose roots can change under a running listener.
#[derive(Debug)]
struct SwappableVerifier(ArcSwap<Arc<dyn ClientCertVerifier>>);

impl ClientCertVerifier for SwappableVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: a client sends the certificate it has.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0.load().verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.load().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.load().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.load().supported_verify_schemes()
    }
}

/// The SPIFFE ID and expiry of a verified client certificate.
pub fn peer_certificate(cert: &CertificateDer<'_>) -> Option<PeerCertificate> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, parsed) = X509Certificate::from_der(cert.as_ref()).ok()?;
    let spiffe_id = smesh_model::certificate_spiffe_id(&parsed)?.to_string();
    let not_after = u64::try_from(parsed.validity().not_after.timestamp()).ok()?;
    Some(PeerCertificate {
        spiffe_id,
        not_after: SystemTime::UNIX_EPOCH + Duration::from_secs(not_after),
    })
}
