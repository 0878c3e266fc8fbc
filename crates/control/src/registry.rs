//! Endpoints registered by proxies, and what the control plane knows about each proxy.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The value stored at `/mesh/registry/<service>/<proxy id>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Registration {
    pub service: String,
    pub address: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub weight: u32,
    pub proxy_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub identity: String,
}

/// The value stored at `/status/proxies/<proxy id>`: shown by `smesh get proxies`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProxyStatus {
    pub proxy_id: String,
    pub version: String,
    #[serde(default)]
    pub service: String,
    #[serde(default)]
    pub address: String,
    /// The control replica the proxy is connected to.
    pub control: String,
    /// The last snapshot version sent to it.
    pub sent_version: u64,
    /// The last snapshot version it accepted.
    pub acked_version: u64,
    /// The last snapshot version it rejected, and why.
    #[serde(default)]
    pub nacked_version: u64,
    #[serde(default)]
    pub last_error: String,
    /// Unix seconds of the last message from the proxy.
    pub last_seen: u64,
    /// The SPIFFE ID the proxy announced (empty: it has no certificate).
    #[serde(default)]
    pub identity: String,
    /// Where the proxy serves /metrics (empty: unknown, an older proxy or none).
    #[serde(default)]
    pub admin: String,
}
