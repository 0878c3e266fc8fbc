//! The mesh's workload identity: a SPIFFE ID `spiffe://<trust-domain>/service/<name>`, and the
//! DNS name the CA also puts in a certificate (`<name>.service.<trust-domain>`), which is what a
//! proxy verifies as the TLS server name of a peer. The one place that knows the format: the
//! CA builds it, discovery and authorization read the service back, the data plane turns it
//! into a TLS name.

use std::fmt;

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
}
