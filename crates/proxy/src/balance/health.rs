//! What active health checking keeps per endpoint, and what it checks: the state lives here,
//! below the balancer that reads it; the checker tasks are in `app::health`.

use crate::balance::Endpoint;
use smesh_model::{HealthCheck, Protocol};
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::sync::Arc;

/// Per endpoint address, kept in its `EndpointStats`.
#[derive(Debug, Default)]
pub struct ActiveHealth {
    /// Checkers that currently find the endpoint unhealthy.
    pub(crate) unhealthy: AtomicU32,
}

impl ActiveHealth {
    pub fn is_unhealthy(&self) -> bool {
        self.unhealthy.load(Relaxed) != 0
    }
}

/// One endpoint of a Service with a `healthCheck`.
pub struct Target {
    pub service: Arc<str>,
    pub endpoint: Arc<Endpoint>,
    pub spec: HealthCheck,
    /// The Service's protocol (HTTP checks use HTTP/2 for `http2` / `grpc` Services).
    pub protocol: Option<Protocol>,
}
