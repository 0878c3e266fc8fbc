//! The proxy's side of the control-plane transport (`smesh_api::transport`): its mesh
//! identity is the client certificate it presents to an `https://` control plane.

use crate::identity::MeshTls;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::RootCertStore;
use smesh_api::transport::ClientIdentity;

// Re-exported so that `crate::identity::control_tls::...` paths keep working in the modules
// that name them (lib.rs, identity/mod.rs); new code imports `smesh_api::transport`.
pub use smesh_api::transport::{grpc_channel, ControlTrust, ControlUrl};

impl ClientIdentity for MeshTls {
    fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    fn key(&self) -> &PrivateKeyDer<'static> {
        &self.key
    }

    fn roots(&self) -> &RootCertStore {
        &self.roots
    }
}
