//! gRPC messages and services between the smesh control plane and its proxies, and the
//! transport both the proxy and the CLI use to reach the control plane.

pub mod latency;
pub mod transport;

// Generated code: its lints are tonic-prost-build's business.
#[allow(clippy::all)]
pub mod v1 {
    tonic::include_proto!("smesh.v1");
}
