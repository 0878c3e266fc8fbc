//! How an endpoint is reached: the one place that decides whether it is a mesh peer (a
//! smesh proxy with an identity, reached over mesh mTLS and verified against that identity),
//! which HTTP version goes on the wire, and whether the peer must be told its app speaks
//! HTTP/1. The HTTP path, mirrors, health checks and TCP forwarding all ask here.

use crate::balance::Endpoint;
use crate::http::pool::Mesh;
use crate::http::request::ORIG_PROTO;
use crate::identity::MeshTls;
use http::{HeaderMap, HeaderValue, Version};
use std::net::SocketAddr;

/// What is carried to the endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carry {
    /// HTTP requests: to a mesh peer over one multiplexed HTTP/2 connection.
    Http,
    /// An HTTP upgrade (it becomes a tunnel): HTTP/1.1 on the wire, always.
    Upgrade,
    /// Opaque bytes.
    Tcp,
}

/// An endpoint, as this proxy reaches it.
pub struct Upstream {
    pub addr: SocketAddr,
    /// The HTTP version on the wire.
    pub version: Version,
    /// Mesh mTLS and the identity the peer must present; `None`: plain TCP.
    pub mesh: Option<Mesh>,
    /// The peer proxy speaks HTTP/1.1 to its app although the wire is HTTP/2.
    marks_http1: bool,
}

impl Upstream {
    /// `app_version`: what the endpoint's app speaks (HTTP/1.1 for an upgrade).
    pub fn new(endpoint: &Endpoint, tls: Option<&MeshTls>, app_version: Version, carry: Carry) -> Self {
        let mesh = tls.zip(endpoint.server_name.clone()).map(|(tls, name)| Mesh {
            client: match carry {
                Carry::Http => tls.client_h2.clone(),
                Carry::Upgrade => tls.client_http1.clone(),
                Carry::Tcp => tls.client_tcp.clone(),
            },
            name,
        });
        let over_h2 = mesh.is_some() && carry == Carry::Http;
        Upstream {
            addr: endpoint.addr,
            version: if over_h2 { Version::HTTP_2 } else { app_version },
            marks_http1: over_h2 && app_version != Version::HTTP_2,
            mesh,
        }
    }

    /// Adds the header that tells the peer proxy which version its app speaks, if needed.
    pub fn mark(&self, headers: &mut HeaderMap) {
        if self.marks_http1 {
            headers.insert(ORIG_PROTO, HeaderValue::from_static("HTTP/1.1"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(peer: bool) -> Endpoint {
        Endpoint {
            addr: "127.0.0.1:1".parse().unwrap(),
            weight: 1,
            labels: Default::default(),
            stats: Default::default(),
            server_name: peer.then(|| rustls::pki_types::ServerName::try_from("api.svc").unwrap()),
        }
    }

    #[test]
    fn without_mesh_tls_the_app_version_goes_on_the_wire_unmarked() {
        for peer in [false, true] {
            let up = Upstream::new(&endpoint(peer), None, Version::HTTP_11, Carry::Http);
            assert_eq!(up.version, Version::HTTP_11);
            assert!(up.mesh.is_none());
            let mut headers = HeaderMap::new();
            up.mark(&mut headers);
            assert!(headers.is_empty());
        }
    }
}
