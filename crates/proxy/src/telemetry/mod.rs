//! Telemetry: the request and connection events the request path reports, and their
//! built-in consumers: Prometheus metrics and the access log.

pub mod access_log;
pub mod event;
pub mod metrics;
pub mod trace_context;
