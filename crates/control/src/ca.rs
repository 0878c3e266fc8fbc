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
use std::time::{Duration, SystemTime};
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Certificates start a little in the past so small clock differences do not reject them.
const BACKDATE: Duration = Duration::from_secs(60);

#[derive(Serialize, Deserialize)]
struct StoredRoot {
    cert_pem: String,
    key_pem: String,
}

pub struct Ca {
    pub trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    pub root_pem: String,
    root_der: Vec<u8>,
}

pub fn spiffe_id(trust_domain: &str, service: &str) -> String {
    format!("spiffe://{trust_domain}/service/{service}")
}

pub fn dns_name(trust_domain: &str, service: &str) -> String {
    format!("{service}.service.{trust_domain}")
}

impl Ca {
    /// Uses the given root, else the one in the store, else makes one (two replicas starting
    /// at once agree through a compare-and-set).
    pub async fn load_or_create(
        store: &dyn Store,
        trust_domain: &str,
        given: Option<(String, String)>,
    ) -> Result<Ca, String> {
        if let Some((cert_pem, key_pem)) = given {
            return Ca::from_pem(trust_domain, &cert_pem, &key_pem);
        }
        for _ in 0..3 {
            if let Some(kv) = store
                .get(keys::CA_ROOT)
                .await
                .map_err(|e| format!("reading the CA root: {e}"))?
            {
                let root: StoredRoot =
                    serde_json::from_slice(&kv.value).map_err(|e| format!("stored CA root is unreadable: {e}"))?;
                return Ca::from_pem(trust_domain, &root.cert_pem, &root.key_pem);
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

    fn from_pem(trust_domain: &str, cert_pem: &str, key_pem: &str) -> Result<Ca, String> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| format!("CA key: {e}"))?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(|e| format!("CA certificate: {e}"))?;
        let root_der = pem_to_der(cert_pem).ok_or("CA certificate: not PEM")?;
        Ok(Ca {
            trust_domain: trust_domain.to_string(),
            issuer,
            root_pem: cert_pem.to_string(),
            root_der,
        })
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
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![
            SanType::URI(
                spiffe_id(&self.trust_domain, service)
                    .try_into()
                    .map_err(|e| format!("{e}"))?,
            ),
            SanType::DnsName(
                dns_name(&self.trust_domain, service)
                    .try_into()
                    .map_err(|e| format!("{e}"))?,
            ),
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
        let (_, root) = X509Certificate::from_der(&self.root_der).map_err(|e| format!("CA root: {e}"))?;
        cert.verify_signature(Some(root.public_key()))
            .map_err(|_| "current certificate was not issued by this CA".to_string())?;
        if !cert.validity().is_valid() {
            return Err("current certificate has expired; a new join token is needed".into());
        }
        let wanted = spiffe_id(&self.trust_domain, service);
        if !uri_sans(&cert).contains(&wanted) {
            return Err(format!("current certificate is not for {wanted}"));
        }
        if cert.public_key().subject_public_key.data.as_ref() != csr.public_key.der_bytes() {
            return Err("the CSR's key is not the current certificate's key".into());
        }
        Ok(())
    }
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

pub fn uri_sans(cert: &X509Certificate<'_>) -> Vec<String> {
    let mut out = Vec::new();
    for ext in cert.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
            for name in &san.general_names {
                if let GeneralName::URI(uri) = name {
                    out.push(uri.to_string());
                }
            }
        }
    }
    out
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
        let ca = Ca::from_pem("example.org", &cert_pem, &key_pem).unwrap();
        let key = KeyPair::generate().unwrap();
        let (leaf, _) = ca.issue(&csr(&key), "api", Duration::from_secs(60)).unwrap();
        let der = pem_to_der(&leaf).unwrap();
        let (_, parsed) = X509Certificate::from_der(&der).unwrap();
        assert_eq!(uri_sans(&parsed), vec!["spiffe://example.org/service/api".to_string()]);
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
        let other_ca = Ca::from_pem("example.org", &root2, &key2).unwrap();
        assert!(other_ca
            .verify_renewal(&leaf, &csr(&key), "api")
            .unwrap_err()
            .contains("not issued"));
    }
}
