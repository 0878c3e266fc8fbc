//! smesh data plane.
//!
//! A connection: [`listen::accept`] accepts it on a worker, [`listen::server`] handles it,
//! [`listen::detect`] picks the protocol (mesh mTLS, HTTP/1, HTTP/2, opaque), and an HTTP
//! request then goes through the stages of [`listen::http`], each over one
//! [`telemetry::event::RequestCtx`]:
//!
//! 1. `read_head`: `Host` rules, gRPC-ness, the request line for consumers that log it;
//! 2. `admit` (inbound: authorization with the peer's identity) or `route` (outbound: the
//!    Service by authority, then its rule in the [`config::snapshot`]; `CONNECT` tunnels);
//! 3. `rate_limit`: the Service's inbound share, the route's RateLimit filters;
//! 4. `request_filters`: hop-by-hop headers, a permitted upgrade, [`filter::Filter`]s,
//!    the route's filters ([`route::filters`]: redirects, header edits, faults);
//! 5. `dispatch`: [`dispatch::Dispatch`], the tries (shedding, circuit breaker, balancer
//!    pick, [`identity::upstream`] decision, send on a worker-owned pooled connection
//!    ([`http::pool`]), outlier detection, retry with budget and body replay);
//! 6. `response_filters`: the route's response filters, upgrades become tunnels;
//! 7. `finish`: response metrics, then [`listen::complete`] completes the request's
//!    [`telemetry::event::RequestEvent`] when the response body ends, for the metrics, the
//!    access log, the golden-metric window ([`telemetry::window`]) and the filters; a
//!    request no consumer watches goes into the window at its response head.
//!
//! Opaque streams ([`tcp`]) report one [`telemetry::event::ConnectionEvent`] each.
//! [`config::reload`], [`config::control`] and [`app::admin`] run on the main thread.
//!
//! One folder per concern, layered so that no two folders import each other
//! (`scripts/check-imports crates/proxy/src folders`, run by `scripts/test`), highest first:
//!
//! - [`embed`]: the mesh embedded in a program (the `smesh` library crate's one way in):
//!   the sidecar's snapshot source, identity and outbound stages without listeners.
//! - [`app`]: the deployment modes, wiring only: the workers (threads, runtimes, sockets,
//!   drain) apart from any mode, a [`app::workload::Workload`] (an app fronted inbound), the
//!   sidecar (`smesh proxy`, [`run`]: one workload); and what runs beside the listeners: the
//!   admin server, the active health checker.
//! - [`listen`]: sockets, accept and drain, connection handling, protocol detection, the HTTP
//!   handler's stages, the request's completion.
//! - [`config`]: the snapshot (lookups and builder), inbound authorization, the file and
//!   control-plane sources.
//! - [`dispatch`]: a routed request's tries, usable without a server.
//! - [`route`]: rules, filters, faults, mirrors.
//! - [`resilience`]: retry policy, circuit breaking, retry budget, shedding, rate limits,
//!   deadlines.
//! - [`tcp`]: opaque forwarding and its connect loop.
//! - [`identity`]: mesh TLS, the identity table (by service and by TLS server name), the
//!   identity agent, how an endpoint is reached ([`identity::upstream`]), the control-plane
//!   transport.
//! - [`balance`]: balancer, endpoint state (incl. health and outlier state), outlier detection.
//! - [`filter`]: the extension point (the [`filter::Filter`] trait's phases).
//! - [`http`]: building blocks without policy: the one body type, headers, error responses,
//!   replay, the upstream connection pools, the connector and the HTTP/2 client, upstream
//!   request building.
//! - [`trace`]: distributed tracing (W3C trace context, sampling, OTLP export), a
//!   [`filter::Filter`] the configuration snapshot installs when the MeshConfig asks.
//! - [`telemetry`]: request and connection events, metrics, the access log, the
//!   golden-metric windows [`config::control`] pushes to the control plane.
//! - [`shutdown`]: the stop signal every background loop watches.

pub mod app;
pub mod balance;
pub mod config;
pub mod dispatch;
pub mod embed;
pub mod filter;
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
pub mod trace;

pub use app::options::ProxyOptions;
pub use app::sidecar::run;
pub use listen::server::Limits;
