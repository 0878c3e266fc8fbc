//! The mesh's workload identity: a SPIFFE ID `spiffe://<trust-domain>/service/<name>`, and the
//! DNS name the CA also puts in a certificate (`<name>.service.<trust-domain>`), which is what a
//! proxy verifies as the TLS server name of a peer. The one place that knows the format: the
//! CA builds it, discovery and authorization read the service back, the data plane turns it
//! into a TLS name; and the one place that reads it from a certificate.

use std::fmt;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

const SCHEME: &str = "spiffe://";
const SERVICE_PATH: &str = "/service/";

/// A parsed mesh identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    trust_domain: String,
    service: String,
}

impl SpiffeId {
    /// The identity of `service` in `trust_domain`. Neither may be empty or contain `/`.
    pub fn new(trust_domain: &str, service: &str) -> Option<SpiffeId> {
        let valid = |s: &str| !s.is_empty() && !s.contains('/');
        (valid(trust_domain) && valid(service)).then(|| SpiffeId {
            trust_domain: trust_domain.to_string(),
            service: service.to_string(),
        })
    }

    /// Parses `spiffe://<trust-domain>/service/<name>`; anything else (another path, an
    /// empty part, a deeper path) is `None`.
    pub fn parse(id: &str) -> Option<SpiffeId> {
        let rest = id.strip_prefix(SCHEME)?;
        let slash = rest.find('/')?;
        let (trust_domain, path) = rest.split_at(slash);
        SpiffeId::new(trust_domain, path.strip_prefix(SERVICE_PATH)?)
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn service(&self) -> &str {
        &self.service
    }

    /// The DNS name a peer with this identity presents as its TLS server name.
    pub fn tls_name(&self) -> String {
        format!("{}.service.{}", self.service, self.trust_domain)
    }

    /// The service named by `id` if it is an identity of that form (any trust domain).
    pub fn service_of(id: &str) -> Option<String> {
        SpiffeId::parse(id).map(|s| s.service)
    }
}

/// The SPIFFE ID a certificate carries: its first URI SAN that is a `spiffe://` URI (the CA
/// puts exactly one there). Returned as written, whatever its path: the control plane's own
/// certificate names `spiffe://<trust-domain>/control`, which is not a service identity.
/// `None` without one, or when the SAN extension is malformed or repeated. Callers check the
/// certificate's signature first: this only reads it.
pub fn certificate_spiffe_id<'a>(cert: &'a X509Certificate<'_>) -> Option<&'a str> {
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        GeneralName::URI(uri) if uri.starts_with(SCHEME) => Some(*uri),
        _ => None,
    })
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}{SERVICE_PATH}{}", self.trust_domain, self.service)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_parses_and_names() {
        let id = SpiffeId::new("example.org", "web").unwrap();
        assert_eq!(id.to_string(), "spiffe://example.org/service/web");
        assert_eq!(SpiffeId::parse(&id.to_string()), Some(id.clone()));
        assert_eq!(id.tls_name(), "web.service.example.org");
        assert_eq!(id.service(), "web");
        assert_eq!(id.trust_domain(), "example.org");
        assert_eq!(SpiffeId::service_of("spiffe://td/service/api").as_deref(), Some("api"));
    }

    #[test]
    fn refuses_other_shapes() {
        for bad in [
            "",
            "spiffe://",
            "spiffe://td",
            "spiffe://td/",
            "spiffe://td/service/",
            "spiffe:///service/web",
            "spiffe://td/ns/default/sa/web",
            "spiffe://td/service/web/extra",
            "https://td/service/web",
            "SPIFFE://td/service/web",
        ] {
            assert_eq!(SpiffeId::parse(bad), None, "{bad:?}");
        }
        assert_eq!(SpiffeId::new("td", ""), None);
        assert_eq!(SpiffeId::new("a/b", "web"), None);
    }

    #[test]
    fn reads_the_spiffe_id_from_a_certificate() {
        use rcgen::{CertificateParams, KeyPair, SanType};
        use x509_parser::prelude::FromDer;
        let der = |sans: Vec<SanType>| {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.subject_alt_names = sans;
            params
                .self_signed(&KeyPair::generate().unwrap())
                .unwrap()
                .der()
                .to_vec()
        };
        let uri = |u: &str| SanType::URI(u.try_into().unwrap());
        let read = |der: &[u8]| {
            let (_, cert) = X509Certificate::from_der(der).unwrap();
            certificate_spiffe_id(&cert).map(str::to_string)
        };
        // a leaf as the CA issues it: the URI SAN beside the DNS name
        let leaf = der(vec![
            SanType::DnsName("web.service.td".try_into().unwrap()),
            uri("spiffe://td/service/web"),
        ]);
        assert_eq!(read(&leaf).as_deref(), Some("spiffe://td/service/web"));
        // other URIs are skipped; the first spiffe:// one counts, whatever its path
        let mixed = der(vec![
            uri("https://example.org/"),
            uri("spiffe://td/control"),
            uri("spiffe://td/service/web"),
        ]);
        assert_eq!(read(&mixed).as_deref(), Some("spiffe://td/control"));
        assert_eq!(read(&der(vec![uri("https://example.org/")])), None);
        assert_eq!(read(&der(Vec::new())), None);
    }
}
