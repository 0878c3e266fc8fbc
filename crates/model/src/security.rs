//! Mesh-wide security settings and authorization policies.

use crate::duration;
use serde::{Deserialize, Serialize};
use std::time::Duration;

pub type MeshConfig = crate::Object<MeshConfigSpec>;
pub type AuthorizationPolicy = crate::Object<AuthorizationPolicySpec>;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MeshConfigSpec {
    /// `strict`: the inbound port accepts only mesh mTLS. `permissive` (default): plaintext
    /// too, for migration. Proxies talk mTLS to each other in both modes.
    #[serde(default)]
    pub mtls: MtlsMode,
    /// `deny`: what no AuthorizationPolicy allows is denied. Default `allow`.
    #[serde(default)]
    pub default_policy: DefaultPolicy,
    /// Lifetime of the certificates the CA issues to proxies. Default 24h.
    #[serde(default, with = "duration::option", skip_serializing_if = "Option::is_none")]
    pub certificate_ttl: Option<Duration>,
    /// Span export and sampling; absent, proxies trace nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<crate::TracingSpec>,
}

impl MeshConfigSpec {
    pub const DEFAULT_CERTIFICATE_TTL: Duration = Duration::from_secs(24 * 3600);
    pub const MIN_CERTIFICATE_TTL: Duration = Duration::from_secs(5);
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MtlsMode {
    Strict,
    #[default]
    Permissive,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DefaultPolicy {
    #[default]
    Allow,
    Deny,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    /// The Service whose inbound traffic this policy governs.
    pub target_ref: TargetRef,
    #[serde(default)]
    pub action: PolicyAction,
    /// A request matches the policy if it matches any rule.
    #[serde(default)]
    pub rules: Vec<AuthorizationRule>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub name: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum PolicyAction {
    #[default]
    Allow,
    Deny,
}

/// Matches when any `from` entry matches the peer (none: any peer) and any `to` entry matches
/// the request (none: any request).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationRule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<PeerSource>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<Operation>,
}

/// The verified peer: by service name (its SPIFFE ID in this trust domain) or full identity.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Operation {
    /// HTTP methods; none: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Exact paths, or prefixes ending in `*` (`/api/*`). gRPC methods are paths too:
    /// `/pkg.Service/Method`, `/pkg.Service/*`. None: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// Service ports; none: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
}

impl Operation {
    pub fn path_matches(pattern: &str, path: &str) -> bool {
        match pattern.strip_suffix('*') {
            Some(prefix) => path.starts_with(prefix),
            None => pattern == path,
        }
    }
}
