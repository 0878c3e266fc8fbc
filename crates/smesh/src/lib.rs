//! smesh linked into a Rust program: the mesh's client and server sides without a proxy hop.
//!
//! A [`Mesh`] is the code of the `smesh proxy` sidecar, run inside the program: the same
//! configuration resources (from a control plane or a file), the same SPIFFE identity from
//! a join token (renewed), the same request stages and the same metric names. It registers
//! with the control plane like a proxy (it is listed by `smesh get proxies`) and keeps
//! working on its last configuration while the control plane is away.
//!
//! ```no_run
//! # async fn run() -> Result<(), smesh::Error> {
//! let mesh = smesh::Mesh::builder()
//!     .control("http://127.0.0.1:4190")
//!     .service("orders")
//!     .token_file("orders.token")
//!     .connect()
//!     .await?;
//! let client = mesh.http_client();
//! let req = http::Request::get("http://inventory/items/7")
//!     .body(String::new())
//!     .expect("a valid request");
//! let resp = client.request(req).await?;
//! println!("{}", resp.status());
//! print!("{}", mesh.metrics_text());
//! # Ok(())
//! # }
//! ```
//!
//! # How a request goes
//!
//! [`HttpClient::request`] runs the outbound port's stages on the calling task: the Service
//! is found by the request's authority (`http://inventory/...` or its `Host`), then its
//! route's rule; rate limits, filters and the route's timeouts apply; then the tries, as
//! in the proxy: load shedding, the circuit breaker, a P2C EWMA pick (or the Service's
//! balancer), mTLS with this program's identity to endpoints fronted by smesh proxies,
//! outlier detection, retries with the BackendPolicy's budget. The application's answer is
//! returned whatever its status; an answer the mesh makes itself is an [`Error`]. Requests
//! are counted in the proxy's families with `direction="outbound"`
//! (`smesh_requests_total`, `smesh_request_duration_seconds`, ...): see
//! [`Mesh::metrics_text`] and [`Builder::admin`].
//!
//! # gRPC
//!
//! [`Mesh::grpc_channel`] gives a tonic-generated client its transport
//! (`InventoryClient::new(mesh.grpc_channel("inventory")?)`): calls take the same path,
//! with the call's deadline passed on (`grpc-timeout`, less the time spent in the mesh) and
//! the mesh's failures as gRPC statuses.
//!
//! # Runtimes and threads
//!
//! A mesh runs its background tasks (configuration, certificate renewal, active health
//! checks, the admin server) on the tokio runtime [`Builder::connect`] is called on; they
//! stop when the [`Mesh`] and every client of it are dropped. Requests may be sent from any
//! task of a multi-threaded runtime: configuration, balancer and breaker state are shared
//! by all threads, while upstream connections are pooled per runtime thread (the proxy's
//! worker-owned pools), without a lock on the request path. So a program with N runtime
//! threads keeps up to N sets of connections to each endpoint, one per thread that has
//! called it, and a connection is reused by the next request on the thread where the
//! previous response ended. Once a second a task of the mesh closes the expired idle
//! connections of the thread it runs on; elsewhere an expired one is skipped (and closed)
//! when next found, or closed by its endpoint.
//!
//! # Serving
//!
//! [`Mesh::serve`] puts a `tower::Service` of this program behind the inbound port's stages
//! (mTLS, authorization, rate limit, metrics) in this process: no proxy hop either way. With
//! [`Builder::advertise`], the program registers its endpoint like a sidecar does.
//!
//! # Not yet
//!
//! Not supported: upgrades (WebSocket) and `CONNECT` through the client, opaque TCP
//! inbound, labels on the registered endpoint (subsets of this program's Service).
//! Streaming gRPC calls through [`GrpcChannel`] are untested (unary calls with a deadline
//! are tested). Without [`Builder::advertise`] the program registers no endpoint, and its
//! `smesh get proxies` entry has no service, address or identity.

#![warn(missing_docs)]

mod body;
mod builder;
mod client;
mod error;
mod grpc;
mod serve;

pub use body::Body;
pub use builder::Builder;
pub use client::HttpClient;
pub use error::Error;
pub use grpc::GrpcChannel;

use bytes::Bytes;
use smesh_proxy::embed::Embedded;
use std::sync::{Arc, Mutex};

/// The mesh in this program: made by [`Mesh::builder`], used through its clients.
pub struct Mesh {
    inner: Arc<Embedded>,
}

impl Mesh {
    /// Options for [`Builder::connect`].
    pub fn builder() -> Builder {
        Builder::new()
    }

    /// A client that sends requests through the mesh (see [how a request
    /// goes](crate#how-a-request-goes)); as many as wanted, all sharing this mesh.
    pub fn http_client(&self) -> HttpClient {
        HttpClient {
            mesh: self.inner.clone(),
        }
    }

    /// A channel to `service` for tonic-generated gRPC clients (see [`GrpcChannel`]); an
    /// error if `service` cannot be a URI authority.
    pub fn grpc_channel(&self, service: &str) -> Result<GrpcChannel, Error> {
        GrpcChannel::new(self.http_client(), service)
    }

    /// Serves `app` on `listener` in the background until the mesh stops, behind the
    /// inbound port's stages: mesh mTLS (callers' SPIFFE IDs verified), the Service's
    /// AuthorizationPolicies (a denied caller gets 403 without reaching `app`) and inbound
    /// rate limit, inbound metrics (`direction="inbound"`). Plaintext callers are served too
    /// unless the mesh's mTLS mode is strict. HTTP/1.1 and HTTP/2 (no opaque TCP).
    ///
    /// Give the builder [`Builder::advertise`] with this listener's address so that the
    /// control plane lists the endpoint and other services' proxies call it.
    pub fn serve<S, B>(&self, listener: std::net::TcpListener, app: S) -> Result<(), Error>
    where
        S: tower::Service<http::Request<Body>, Response = http::Response<B>> + Clone + Send + 'static,
        S::Future: Send,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let app = Arc::new(serve::App(Mutex::new(app)));
        self.inner.serve(listener, app).map_err(Error::start)
    }

    /// The metrics in the Prometheus text format, with the proxy's names.
    pub fn metrics_text(&self) -> String {
        self.inner.metrics_text()
    }

    /// This program's SPIFFE ID (`spiffe://<trust domain>/service/<name>`), once the
    /// control plane has certified it; `None` without a certificate (then calls to mesh
    /// endpoints are plaintext, and strict ones refuse them).
    pub fn spiffe_id(&self) -> Option<String> {
        self.inner.spiffe_id()
    }
}
