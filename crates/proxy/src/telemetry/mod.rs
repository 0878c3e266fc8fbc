//! Telemetry: the request and connection events the request path reports, and their
//! built-in consumers: Prometheus metrics, the access log and the golden-metric windows
//! pushed to the control plane.

pub mod access_log;
pub mod event;
pub mod metrics;
pub mod trace_context;
pub mod window;
