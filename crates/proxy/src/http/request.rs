//! The request an upstream sees: its HTTP version, its URI form and `Host`, and the header
//! that tells an inbound proxy which version the client spoke.

use crate::http::body::Body;
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Uri, Version};
use smesh_model::Protocol;

/// Set by the outbound proxy on requests it carries over the mesh's HTTP/2 when the client
/// spoke HTTP/1, so the inbound proxy speaks HTTP/1 to its app again.
pub(crate) const ORIG_PROTO: header::HeaderName = header::HeaderName::from_static("smesh-orig-proto");

pub(crate) fn upstream_version(protocol: Option<Protocol>, client: Version, upgrade: bool) -> Version {
    match protocol {
        _ if upgrade => Version::HTTP_11,
        Some(Protocol::Http2 | Protocol::Grpc) => Version::HTTP_2,
        Some(Protocol::Http) => Version::HTTP_11,
        _ if client == Version::HTTP_2 => Version::HTTP_2,
        _ => Version::HTTP_11,
    }
}

/// The request as the upstream should see it: HTTP/2 wants an absolute URI (`:authority`),
/// HTTP/1.1 an origin-form one and a `Host` header. Works on either form, so a head handed
/// back by a failed connect can be rebuilt for another endpoint.
pub(crate) fn build_request(mut parts: Parts, version: Version, body: Body) -> Request<Body> {
    if version == Version::HTTP_2 {
        if parts.uri.scheme().is_none() || parts.uri.authority().is_none() {
            let authority = parts.uri.authority().cloned().or_else(|| {
                parts
                    .headers
                    .get(header::HOST)
                    .and_then(|h| Authority::try_from(h.as_bytes()).ok())
            });
            let path = parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/"));
            let mut uri = Uri::builder().scheme(Scheme::HTTP).path_and_query(path.clone());
            if let Some(a) = authority {
                uri = uri.authority(a);
            }
            parts.uri = uri.build().unwrap_or_else(|_| Uri::from(path));
        }
        parts.headers.remove(header::HOST);
    } else if parts.uri.authority().is_some() {
        if !parts.headers.contains_key(header::HOST) {
            if let Some(v) = parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            {
                parts.headers.insert(header::HOST, v);
            }
        }
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        parts.uri = Uri::from(path);
    }
    parts.version = version;
    Request::from_parts(parts, body)
}
