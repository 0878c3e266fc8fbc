//! Where things live in the store. Everything a proxy's configuration is built from sits
//! under [`MESH`], so one list and one watch of that prefix give a consistent view.

pub const MESH: &str = "/mesh/";
pub const RESOURCES: &str = "/mesh/resources/";
pub const REGISTRY: &str = "/mesh/registry/";
pub const PROXIES: &str = "/status/proxies/";
pub const KV: &str = "/kv/";
/// The CA's state. Nothing serves this prefix.
pub const CA: &str = "/ca/";
/// The CA root (certificate and key) that signs.
pub const CA_ROOT: &str = "/ca/root";
/// Roots replaced by a rotation and still trusted (certificates only).
pub const CA_PREVIOUS: &str = "/ca/previous";
/// The public trust bundle (every trusted root), pushed to proxies with their configuration.
pub const TRUST_BUNDLE: &str = "/mesh/trust-bundle";
/// Join tokens, by the SHA-256 of the token (the token itself is never stored).
pub const TOKENS: &str = "/tokens/";
/// Certificates issued, for `smesh get certificates`.
pub const CERTIFICATES: &str = "/status/certificates/";

pub fn resource(kind: &str, name: &str) -> String {
    format!("{RESOURCES}{kind}/{name}")
}

pub fn registration(service: &str, proxy_id: &str) -> String {
    format!("{REGISTRY}{service}/{proxy_id}")
}

pub fn proxy(proxy_id: &str) -> String {
    format!("{PROXIES}{proxy_id}")
}

pub fn kv(key: &str) -> String {
    format!("{KV}{key}")
}

/// The canonical kind for a user's spelling (`svc`, `services`, `httproute`, `grpcroutes`...).
pub fn canonical_kind(kind: &str) -> Option<&'static str> {
    match kind.to_ascii_lowercase().as_str() {
        "service" | "services" | "svc" => Some("Service"),
        "httproute" | "httproutes" | "route" | "routes" => Some("HTTPRoute"),
        "grpcroute" | "grpcroutes" => Some("GRPCRoute"),
        "meshconfig" | "meshconfigs" => Some("MeshConfig"),
        "authorizationpolicy" | "authorizationpolicies" | "authz" => Some("AuthorizationPolicy"),
        "backendpolicy" | "backendpolicies" => Some("BackendPolicy"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::canonical_kind;

    #[test]
    fn every_kind_has_its_own_spelling_and_plurals() {
        for kind in smesh_model::Resource::KINDS {
            assert_eq!(canonical_kind(kind), Some(*kind));
            assert_eq!(canonical_kind(&kind.to_ascii_lowercase()), Some(*kind));
        }
        assert_eq!(canonical_kind("grpcroutes"), Some("GRPCRoute"));
        assert_eq!(canonical_kind("httproutes"), Some("HTTPRoute"));
        assert_eq!(canonical_kind("tcproute"), None);
    }
}
