//! The mesh's certificate authority. It signs proxies' certificate requests with a
//! short-lived certificate whose URI SAN is the SPIFFE ID `spiffe://<trust-domain>/service/<name>`
//! (and a DNS SAN `<name>.service.<trust-domain>` that TLS clients verify as the server name).
//! The root key lives in the store (`/ca/root`, never served by any API) or in the files given.

use crate::keys;
use crate::store::{Compare, Op, Store};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use serde::{Deserialize, Serialize};
use smesh_model::{certificate_spiffe_id, SpiffeId};
use std::time::{Duration, SystemTime};
use x509_parser::prelude::{FromDer, X509Certificate};

const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Certificates start a little in the past so small clock differences do not reject them.
const BACKDATE: Duration = Duration::from_secs(60);

#[derive(Serialize, Deserialize)]
struct StoredRoot {
    cert_pem: String,
    key_pem: String,
}

/// The roots a rotation replaced: still trusted until they are retired.
#[derive(Serialize, Deserialize, Default)]
pub struct PreviousRoots {
    pub roots: Vec<String>,
    /// When the newest rotation happened; certificates issued before it come from an old root.
    pub rotated_unix: u64,
}

pub struct Ca {
    pub trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    /// The root that signs.
    pub root_pem: String,
    root_der: Vec<u8>,
    /// Roots still trusted after a rotation.
    pub previous: PreviousRoots,
    previous_der: Vec<Vec<u8>>,
    /// The root came from `--ca-cert`/`--ca-key`, so it is not rotated through the store.
    pub from_files: bool,
}

/// The SPIFFE ID of `service` (empty for a name no identity can have: empty, or with `/`).
pub fn spiffe_id(trust_domain: &str, service: &str) -> String {
    SpiffeId::new(trust_domain, service).map_or_else(String::new, |id| id.to_string())
}

impl Ca {
    /// Uses the given root, else the one in the store, else makes one (two replicas starting
    /// at once agree through a compare-and-set).
    pub async fn load_or_create(
        store: &dyn Store,
        trust_domain: &str,
        given: Option<(String, String)>,
    ) -> Result<Ca, String> {
        let ca = match given {
            Some((cert_pem, key_pem)) => {
                let mut ca = Ca::from_pem(trust_domain, &cert_pem, &key_pem, PreviousRoots::default())?;
                ca.from_files = true;
                ca
            }
            None => Ca::load_or_create_in_store(store, trust_domain).await?,
        };
        ca.publish_bundle(store).await?;
        Ok(ca)
    }

    async fn load_or_create_in_store(store: &dyn Store, trust_domain: &str) -> Result<Ca, String> {
        for _ in 0..3 {
            if let Some(ca) = Ca::load(store, trust_domain).await? {
                return Ok(ca);
            }
            let (cert_pem, key_pem) = make_root(trust_domain)?;
            let value = serde_json::to_vec(&StoredRoot { cert_pem, key_pem }).map_err(|e| e.to_string())?;
            let put = Op::Put {
                key: keys::CA_ROOT.to_string(),
                value,
                lease: 0,
            };
            let compare = Compare::ModRevision {
                key: keys::CA_ROOT.to_string(),
                equals: 0,
            };
            let outcome = store
                .txn(vec![compare], vec![put])
                .await
                .map_err(|e| format!("storing the CA root: {e}"))?;
            if outcome.succeeded {
                tracing::info!(trust_domain, "created a new root CA");
            }
        }
        Err("could not create or read the CA root".into())
    }

    /// The CA as the store has it now (`None` before a root was made).
    pub async fn load(store: &dyn Store, trust_domain: &str) -> Result<Option<Ca>, String> {
        let Some((_, root)) = stored_root(store).await? else {
            return Ok(None);
        };
        let previous = stored_previous(store).await?;
        Ca::from_pem(trust_domain, &root.cert_pem, &root.key_pem, previous).map(Some)
    }

    fn from_pem(trust_domain: &str, cert_pem: &str, key_pem: &str, previous: PreviousRoots) -> Result<Ca, String> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| format!("CA key: {e}"))?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(|e| format!("CA certificate: {e}"))?;
        let root_der = pem_to_der(cert_pem).ok_or("CA certificate: not PEM")?;
        let previous_der = previous
            .roots
            .iter()
            .map(|p| pem_to_der(p).ok_or_else(|| "a previous CA root is not PEM".to_string()))
            .collect::<Result<_, _>>()?;
        Ok(Ca {
            trust_domain: trust_domain.to_string(),
            issuer,
            root_pem: cert_pem.to_string(),
            root_der,
            previous,
            previous_der,
            from_files: false,
        })
    }

    /// The SHA-256 fingerprint of the signing root (`AB:CD:...`).
    pub fn root_fingerprint(&self) -> String {
        fingerprint(&self.root_der)
    }

    /// Every trusted root, the signing one first (PEM).
    pub fn bundle_pem(&self) -> String {
        let mut out = self.root_pem.trim_end().to_string();
        out.push('\n');
        for p in &self.previous.roots {
            out.push_str(p.trim_end());
            out.push('\n');
        }
        out
    }

    /// Makes sure the store's public trust bundle (what proxies get pushed) is this CA's.
    pub async fn publish_bundle(&self, store: &dyn Store) -> Result<(), String> {
        let bundle = self.bundle_pem();
        let current = store
            .get(keys::TRUST_BUNDLE)
            .await
            .map_err(|e| format!("reading the trust bundle: {e}"))?;
        if current.is_some_and(|kv| kv.value == bundle.as_bytes()) {
            return Ok(());
        }
        crate::store::put(store, keys::TRUST_BUNDLE, bundle.into_bytes(), 0)
            .await
            .map(|_| ())
            .map_err(|e| format!("writing the trust bundle: {e}"))
    }

    /// Unix time the root expires.
    pub fn root_not_after(&self) -> Option<u64> {
        let (_, root) = X509Certificate::from_der(&self.root_der).ok()?;
        u64::try_from(root.validity().not_after.timestamp()).ok()
    }

    /// Signs `csr_pem`'s public key into a certificate for `service`. Everything else in the
    /// request (names, extensions) is ignored: the CA decides what the certificate says.
    pub fn issue(&self, csr_pem: &str, service: &str, ttl: Duration) -> Result<(String, SystemTime), String> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| format!("invalid CSR: {e}"))?;
        let now = SystemTime::now();
        let not_after = now + ttl;
        let id = SpiffeId::new(&self.trust_domain, service)
            .ok_or_else(|| format!("no identity can be made for service {service:?}"))?;
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![
            SanType::URI(id.to_string().try_into().map_err(|e| format!("{e}"))?),
            SanType::DnsName(id.tls_name().try_into().map_err(|e| format!("{e}"))?),
        ];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, service);
        params.distinguished_name = dn;
        params.not_before = (now - BACKDATE).into();
        params.not_after = not_after.into();
        params.is_ca = IsCa::NoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.serial_number = Some(SerialNumber::from(rand::random::<[u8; 16]>().to_vec()));
        let request = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        };
        let cert = request.signed_by(&self.issuer).map_err(|e| format!("signing: {e}"))?;
        Ok((cert.pem(), not_after))
    }

    /// A serving certificate for the control plane itself, for `key`: the URI SAN
    /// `spiffe://<trust-domain>/control` and each of `names` as a DNS or IP SAN (what
    /// clients put in the control URL).
    pub fn issue_control(
        &self,
        key: &KeyPair,
        names: &[String],
        ttl: Duration,
    ) -> Result<(String, SystemTime), String> {
        let now = SystemTime::now();
        let not_after = now + ttl;
        let mut params = CertificateParams::default();
        let uri = format!("spiffe://{}/control", self.trust_domain);
        params.subject_alt_names = vec![SanType::URI(uri.try_into().map_err(|e| format!("{e}"))?)];
        for name in names {
            let san = match name.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(
                    name.clone()
                        .try_into()
                        .map_err(|e| format!("--tls-san {name:?}: {e}"))?,
                ),
            };
            params.subject_alt_names.push(san);
        }
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "smesh control plane");
        params.distinguished_name = dn;
        params.not_before = (now - BACKDATE).into();
        params.not_after = not_after.into();
        params.is_ca = IsCa::NoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.serial_number = Some(SerialNumber::from(rand::random::<[u8; 16]>().to_vec()));
        let cert = params
            .signed_by(key, &self.issuer)
            .map_err(|e| format!("signing: {e}"))?;
        Ok((cert.pem(), not_after))
    }

    /// Checks that `cert_pem` is a currently valid certificate from this CA for `service`
    /// whose key is the one in `csr_pem` (the CSR's signature proves the caller holds it).
    pub fn verify_renewal(&self, cert_pem: &str, csr_pem: &str, service: &str) -> Result<(), String> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| format!("invalid CSR: {e}"))?;
        let der = pem_to_der(cert_pem).ok_or("current certificate: not PEM")?;
        let (_, cert) = X509Certificate::from_der(&der).map_err(|e| format!("current certificate: {e}"))?;
        let signed_by_trusted = std::iter::once(&self.root_der)
            .chain(&self.previous_der)
            .filter_map(|der| X509Certificate::from_der(der).ok())
            .any(|(_, root)| cert.verify_signature(Some(root.public_key())).is_ok());
        if !signed_by_trusted {
            return Err("current certificate was not issued by this CA".into());
        }
        if !cert.validity().is_valid() {
            return Err("current certificate has expired; a new join token is needed".into());
        }
        let wanted = spiffe_id(&self.trust_domain, service);
        if certificate_spiffe_id(&cert) != Some(wanted.as_str()) {
            return Err(format!("current certificate is not for {wanted}"));
        }
        if cert.public_key().subject_public_key.data.as_ref() != csr.public_key.der_bytes() {
            return Err("the CSR's key is not the current certificate's key".into());
        }
        Ok(())
    }
}

/// The CA in use; replaced when the store's CA state changes (a rotation on any replica).
pub type CaHandle = std::sync::Arc<arc_swap::ArcSwap<Ca>>;

/// Follows the store's CA state into `handle` and calls `changed` after each swap; for as
/// long as the runtime lives.
pub fn follow(store: std::sync::Arc<dyn Store>, handle: CaHandle, changed: impl Fn(&Ca) + Send + Sync + 'static) {
    tokio::spawn(async move {
        // What `changed` last saw (the API may swap `handle` itself before the watch fires).
        let mut applied = {
            let ca = handle.load();
            (ca.root_pem.clone(), ca.previous.roots.clone())
        };
        loop {
            let result = async {
                let revision = store.revision().await.map_err(|e| e.to_string())?;
                // A change between the first load and the watch is caught by reloading once.
                reload(store.as_ref(), &handle, &mut applied, &changed).await?;
                let mut events = store.watch(keys::CA, revision).await.map_err(|e| e.to_string())?;
                while let Some(batch) = events.recv().await {
                    batch.map_err(|e| e.to_string())?;
                    reload(store.as_ref(), &handle, &mut applied, &changed).await?;
                }
                Err::<(), String>("watch ended".into())
            };
            if let Err(e) = result.await {
                tracing::warn!(error = %e, "following the CA state interrupted; retrying");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
}

async fn reload(
    store: &dyn Store,
    handle: &CaHandle,
    applied: &mut (String, Vec<String>),
    changed: &(impl Fn(&Ca) + Send + Sync),
) -> Result<(), String> {
    let trust_domain = handle.load().trust_domain.clone();
    let Some(next) = Ca::load(store, &trust_domain).await? else {
        return Ok(());
    };
    if next.root_pem == applied.0 && next.previous.roots == applied.1 {
        return Ok(());
    }
    *applied = (next.root_pem.clone(), next.previous.roots.clone());
    tracing::info!(trusted_roots = 1 + next.previous.roots.len(), "CA roots changed");
    let next = std::sync::Arc::new(next);
    handle.store(next.clone());
    changed(&next);
    Ok(())
}

/// Replaces the signing root with a new one; the old root stays trusted (in the bundle)
/// until [`retire`]. Fails if another rotation got there first.
pub async fn rotate(store: &dyn Store, trust_domain: &str) -> Result<Ca, String> {
    let (kv, old) = stored_root(store).await?.ok_or("there is no CA root in the store")?;
    let mut previous = stored_previous(store).await?;
    previous.roots.insert(0, old.cert_pem);
    previous.rotated_unix = unix_now();
    let (cert_pem, key_pem) = make_root(trust_domain)?;
    let next = Ca::from_pem(trust_domain, &cert_pem, &key_pem, previous)?;
    let ops = vec![
        Op::Put {
            key: keys::CA_ROOT.into(),
            value: serde_json::to_vec(&StoredRoot { cert_pem, key_pem }).map_err(|e| e.to_string())?,
            lease: 0,
        },
        Op::Put {
            key: keys::CA_PREVIOUS.into(),
            value: serde_json::to_vec(&next.previous).map_err(|e| e.to_string())?,
            lease: 0,
        },
        Op::Put {
            key: keys::TRUST_BUNDLE.into(),
            value: next.bundle_pem().into_bytes(),
            lease: 0,
        },
    ];
    let compare = Compare::ModRevision {
        key: keys::CA_ROOT.into(),
        equals: kv.mod_revision,
    };
    let outcome = store
        .txn(vec![compare], ops)
        .await
        .map_err(|e| format!("storing the new root: {e}"))?;
    if !outcome.succeeded {
        return Err("the CA root changed meanwhile (another rotation?); try again".into());
    }
    Ok(next)
}

/// Stops trusting the roots a rotation replaced.
pub async fn retire(store: &dyn Store, trust_domain: &str) -> Result<Ca, String> {
    let (_, root) = stored_root(store).await?.ok_or("there is no CA root in the store")?;
    let next = Ca::from_pem(trust_domain, &root.cert_pem, &root.key_pem, PreviousRoots::default())?;
    let ops = vec![
        Op::Delete {
            key: keys::CA_PREVIOUS.into(),
        },
        Op::Put {
            key: keys::TRUST_BUNDLE.into(),
            value: next.bundle_pem().into_bytes(),
            lease: 0,
        },
    ];
    store
        .txn(Vec::new(), ops)
        .await
        .map_err(|e| format!("retiring the previous roots: {e}"))?;
    Ok(next)
}

/// The signing root as stored, with its record (for compare-and-set).
async fn stored_root(store: &dyn Store) -> Result<Option<(crate::store::KeyValue, StoredRoot)>, String> {
    let Some(kv) = store
        .get(keys::CA_ROOT)
        .await
        .map_err(|e| format!("reading the CA root: {e}"))?
    else {
        return Ok(None);
    };
    let root = serde_json::from_slice(&kv.value).map_err(|e| format!("stored CA root is unreadable: {e}"))?;
    Ok(Some((kv, root)))
}

async fn stored_previous(store: &dyn Store) -> Result<PreviousRoots, String> {
    match store
        .get(keys::CA_PREVIOUS)
        .await
        .map_err(|e| format!("reading the previous CA roots: {e}"))?
    {
        Some(kv) => serde_json::from_slice(&kv.value).map_err(|e| format!("stored previous roots: {e}")),
        None => Ok(PreviousRoots::default()),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn make_root(trust_domain: &str) -> Result<(String, String), String> {
    let key = KeyPair::generate().map_err(|e| format!("generating the CA key: {e}"))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("smesh root CA {trust_domain}"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = SystemTime::now();
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + ROOT_VALIDITY).into();
    let cert = params
        .self_signed(&key)
        .map_err(|e| format!("signing the CA root: {e}"))?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A certificate's SHA-256 fingerprint, as `openssl x509 -fingerprint -sha256` prints it.
pub fn fingerprint(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    let hex: Vec<String> = digest.as_ref().iter().map(|b| format!("{b:02X}")).collect();
    hex.join(":")
}

pub fn pem_to_der(pem: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let body: String = pem
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    base64::engine::general_purpose::STANDARD.decode(body).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr(key: &KeyPair) -> String {
        CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .serialize_request(key)
            .unwrap()
            .pem()
            .unwrap()
    }

    #[test]
    fn issues_spiffe_certificates_and_checks_renewals() {
        let (cert_pem, key_pem) = make_root("example.org").unwrap();
        let ca = Ca::from_pem("example.org", &cert_pem, &key_pem, PreviousRoots::default()).unwrap();
        let key = KeyPair::generate().unwrap();
        let (leaf, _) = ca.issue(&csr(&key), "api", Duration::from_secs(60)).unwrap();
        let der = pem_to_der(&leaf).unwrap();
        let (_, parsed) = X509Certificate::from_der(&der).unwrap();
        assert_eq!(certificate_spiffe_id(&parsed), Some("spiffe://example.org/service/api"));
        ca.verify_renewal(&leaf, &csr(&key), "api").unwrap();
        assert!(ca
            .verify_renewal(&leaf, &csr(&key), "web")
            .unwrap_err()
            .contains("not for"));
        let other = KeyPair::generate().unwrap();
        assert!(ca
            .verify_renewal(&leaf, &csr(&other), "api")
            .unwrap_err()
            .contains("key"));
        let (root2, key2) = make_root("example.org").unwrap();
        let other_ca = Ca::from_pem("example.org", &root2, &key2, PreviousRoots::default()).unwrap();
        assert!(other_ca
            .verify_renewal(&leaf, &csr(&key), "api")
            .unwrap_err()
            .contains("not issued"));
    }
}
