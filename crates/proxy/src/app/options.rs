//! What `smesh proxy` is told on its command line.

use crate::listen::server::Limits;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Everything `smesh proxy` is told on its command line.
#[derive(Debug, Clone)]
pub struct ProxyOptions {
    /// A static configuration file (watched); or
    pub config: Option<PathBuf>,
    /// control-plane URLs to get configuration and endpoints from.
    pub control: Vec<String>,
    /// Labels of the endpoint this proxy registers (with `service` and `app`).
    pub labels: std::collections::BTreeMap<String, String>,
    /// The address other proxies reach this one's inbound listener at; default: the inbound
    /// address, with an unspecified IP replaced by 127.0.0.1.
    pub advertise: Option<SocketAddr>,
    /// Lease TTL asked for the registered endpoint (None: the control plane's default).
    pub lease_ttl: Option<Duration>,
    /// Configuration snapshots larger than this are refused.
    pub max_config_bytes: usize,
    /// Join token for this proxy's first certificate (with `control` and `service`).
    pub join_token: Option<String>,
    /// CA certificates (PEM) that an `https://` control plane's certificate is checked against.
    pub control_ca: Option<PathBuf>,
    pub outbound: Option<SocketAddr>,
    pub inbound: Option<SocketAddr>,
    pub app: Option<SocketAddr>,
    /// What the local app speaks (`http` = HTTP/1.1, `http2`, `grpc`); `None`: what the
    /// client spoke.
    pub app_protocol: Option<smesh_model::Protocol>,
    /// The name inbound traffic is labelled with in metrics.
    pub service: Option<String>,
    pub upstreams: Vec<(String, SocketAddr)>,
    pub admin: SocketAddr,
    pub workers: usize,
    pub access_log: Option<String>,
    pub drain_timeout: Duration,
    pub limits: Limits,
}
