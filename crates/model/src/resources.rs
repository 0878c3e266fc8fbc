//! The resource kinds, in the shape users write them (Kubernetes style; routes follow the
//! Gateway API so people who know it recognise them).

use crate::duration;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

pub const API_VERSION: &str = "smesh.io/v1";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Object<S> {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: S,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

pub type Service = Object<ServiceSpec>;
pub type HttpRoute = Object<HttpRouteSpec>;

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Resource {
    Service(Service),
    HttpRoute(HttpRoute),
    GrpcRoute(crate::GrpcRoute),
    MeshConfig(crate::MeshConfig),
    AuthorizationPolicy(crate::AuthorizationPolicy),
    BackendPolicy(crate::BackendPolicy),
}

impl Resource {
    pub const KINDS: &'static [&'static str] = &[
        "Service",
        "HTTPRoute",
        "GRPCRoute",
        "MeshConfig",
        "AuthorizationPolicy",
        "BackendPolicy",
    ];

    pub fn kind(&self) -> &'static str {
        match self {
            Resource::Service(_) => "Service",
            Resource::HttpRoute(_) => "HTTPRoute",
            Resource::GrpcRoute(_) => "GRPCRoute",
            Resource::MeshConfig(_) => "MeshConfig",
            Resource::AuthorizationPolicy(_) => "AuthorizationPolicy",
            Resource::BackendPolicy(_) => "BackendPolicy",
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Resource::Service(s) => &s.metadata.name,
            Resource::HttpRoute(r) => &r.metadata.name,
            Resource::GrpcRoute(r) => &r.metadata.name,
            Resource::MeshConfig(m) => &m.metadata.name,
            Resource::AuthorizationPolicy(p) => &p.metadata.name,
            Resource::BackendPolicy(p) => &p.metadata.name,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceSpec {
    /// Extra Host names; the service always answers to its name and `name:port`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ServicePort>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<Endpoint>,
    #[serde(default)]
    pub load_balancer: LoadBalancer,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicePort {
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// None means: speak what the client spoke (HTTP), detect otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Http,
    Http2,
    Grpc,
    Tcp,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// `ip:port`; checked by validation so the error can quote the bad value.
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The SPIFFE ID of the proxy in front of this endpoint: set for endpoints registered by
    /// smesh proxies, whose traffic then goes over mesh mTLS. None: a plain endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadBalancer {
    /// Power of two choices over peak-EWMA latency times outstanding requests.
    #[default]
    Ewma,
    RoundRobin,
    LeastRequest,
    Random,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteSpec {
    pub parent_refs: Vec<ParentRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<HttpRouteRule>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ParentRef {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<HttpRouteMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backend_refs: Vec<BackendRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<Retry>,
    /// Applied in order (see `crate::filters`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<crate::HttpRouteFilter>,
    /// The priority of the rule's requests when an upstream sheds load (see
    /// `crate::AdaptiveConcurrency`); also the highest an `smesh-priority` header may claim.
    /// Unset: the header decides, default `normal`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<crate::Priority>,
    /// `Upgrade` protocols (by token, e.g. `spdy/3.1`) this rule's requests may switch to
    /// besides WebSocket, which always may: the connection then becomes a tunnel the proxy
    /// no longer reads. Any other upgrade is stripped and the request served as HTTP/1.1.
    /// `h2c` is refused (a tunnel of HTTP/2 requests would skip every route and policy).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upgrades: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<ValueMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<ValueMatch>,
    /// smesh's own (Gateway API has none): matches a cookie of the `Cookie` header(s) by
    /// name, exactly or by regular expression, e.g. sticky canaries by a `canary=1` cookie.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cookies: Vec<ValueMatch>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathMatch {
    #[serde(rename = "type", default)]
    pub kind: PathMatchType,
    pub value: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum PathMatchType {
    Exact,
    #[default]
    PathPrefix,
    RegularExpression,
}

/// A header or query-parameter match.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValueMatch {
    #[serde(rename = "type", default)]
    pub kind: ValueMatchType,
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ValueMatchType {
    #[default]
    Exact,
    RegularExpression,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendRef {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// Only the service's endpoints carrying all these labels (e.g. `version: v2`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub subset: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Timeouts {
    /// The whole request, retries included.
    #[serde(default, with = "duration::option", skip_serializing_if = "Option::is_none")]
    pub request: Option<Duration>,
    /// Each try to a backend.
    #[serde(default, with = "duration::option", skip_serializing_if = "Option::is_none")]
    pub backend_request: Option<Duration>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Retry {
    /// Maximum number of retries after the first try (Gateway API semantics). Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// Response statuses that are retried. Default `[503]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub codes: Vec<u16>,
    /// Wait before the first retry; doubles with each further retry.
    #[serde(default, with = "duration::option", skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Duration>,
    #[serde(default, with = "duration::option", skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<Duration>,
}

impl Retry {
    pub const DEFAULT_CODES: &'static [u16] = &[503];
    pub const DEFAULT_ATTEMPTS: u32 = 1;
    pub const DEFAULT_BACKOFF: Duration = Duration::from_millis(25);
}
