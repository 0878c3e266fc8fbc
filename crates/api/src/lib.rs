//! gRPC messages and services between the smesh control plane and its proxies.

#![allow(clippy::all)]

pub mod v1 {
    tonic::include_proto!("smesh.v1");
}
