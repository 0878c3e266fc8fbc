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
    if version != Version::HTTP_2 {
        keep_body_of_bodiless_method(&mut parts, &body);
    }
    parts.version = version;
    Request::from_parts(parts, body)
}

/// hyper's HTTP/1 client sends no body for a GET, HEAD or CONNECT whose length it does not
/// know unless the head frames one: a client's chunked GET body (or an HTTP/2 GET with DATA
/// frames) would be dropped on the way. Framed here as chunked, it arrives as it was sent.
fn keep_body_of_bodiless_method(parts: &mut Parts, body: &Body) {
    use http_body::Body as _;
    if !matches!(parts.method, http::Method::GET | http::Method::HEAD)
        || body.is_end_stream()
        || body.size_hint().exact().is_some()
        || parts.headers.contains_key(header::TRANSFER_ENCODING)
        || parts.headers.contains_key(header::CONTENT_LENGTH)
    {
        return;
    }
    parts
        .headers
        .insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::body::ClientBody;
    use bytes::Bytes;
    use http_body_util::StreamBody;

    fn unsized_body() -> Body {
        let frames = vec![Ok::<_, crate::http::body::BodyError>(http_body::Frame::data(
            Bytes::from("hi"),
        ))];
        ClientBody::new(StreamBody::new(tokio_stream::iter(frames))).into_streaming()
    }

    fn head(method: http::Method) -> Parts {
        let mut req = Request::new(());
        *req.method_mut() = method;
        req.into_parts().0
    }

    #[test]
    fn a_get_with_a_body_of_unknown_length_is_framed_as_chunked_for_http1() {
        let req = build_request(head(http::Method::GET), Version::HTTP_11, unsized_body());
        assert_eq!(req.headers()[header::TRANSFER_ENCODING], "chunked");
        // HTTP/2 frames bodies itself; an empty GET or a POST needs nothing (hyper frames a POST).
        for (method, version, body) in [
            (http::Method::GET, Version::HTTP_2, unsized_body()),
            (http::Method::GET, Version::HTTP_11, Body::Empty),
            (http::Method::POST, Version::HTTP_11, unsized_body()),
        ] {
            let req = build_request(head(method), version, body);
            assert!(!req.headers().contains_key(header::TRANSFER_ENCODING));
        }
    }
}
