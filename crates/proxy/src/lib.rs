//! smesh data plane.
//!
//! The request path, in order: [`listen::accept`] accepts on a worker, [`listen::server`]
//! handles the connection, [`listen::detect`] picks the protocol, [`listen::http`] routes
//! with the [`config::snapshot`]'s [`route::rule`] table, [`balance`] picks an endpoint,
//! [`http::pool`] sends on a worker-owned upstream connection; [`tcp`] handles opaque
//! streams. [`telemetry`] observes it; [`config::reload`], [`config::control`] and
//! [`app::admin`] run on the main thread.
//!
//! One folder per concern, layered so that no two folders import each other
//! (`scripts/check-imports crates/proxy/src folders`, run by `scripts/test`), highest first:
//!
//! - [`app`]: the deployment modes, wiring only: the workers (threads, runtimes, sockets,
//!   drain) apart from any mode, a [`app::workload::Workload`] (an app fronted inbound), the
//!   sidecar (`smesh proxy`, [`run`]: one workload); and what runs beside the listeners: the
//!   admin server, the active health checker.
//! - [`listen`]: sockets, accept and drain, connection handling, protocol detection, the HTTP
//!   handler (`forward`, the tries).
//! - [`config`]: the snapshot (lookups and builder), inbound authorization, the file and
//!   control-plane sources.
//! - [`route`]: rules, filters, faults, mirrors.
//! - [`resilience`]: retry policy, circuit breaking, retry budget, shedding, rate limits,
//!   deadlines.
//! - [`tcp`]: opaque forwarding and its connector.
//! - [`identity`]: mesh TLS, the identity table (by service and by TLS server name), the
//!   identity agent, the control-plane transport.
//! - [`balance`]: balancer, endpoint state (incl. health and outlier state), outlier detection.
//! - [`http`]: building blocks without policy: the one body type, headers, error responses,
//!   replay, the upstream connection pools and the HTTP/2 client, upstream request building.
//! - [`telemetry`]: metrics and the access log.
//! - [`shutdown`]: the stop signal every background loop watches.

pub mod app;
pub mod balance;
pub mod config;
#[cfg(test)]
mod fuzz_tests;
pub mod http;
pub mod identity;
pub mod listen;
pub mod resilience;
pub mod route;
pub mod shutdown;
pub mod tcp;
pub mod telemetry;

pub use app::options::ProxyOptions;
pub use app::sidecar::run;
pub use listen::server::Limits;
