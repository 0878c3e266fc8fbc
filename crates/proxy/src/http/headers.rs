//! Header handling between client and upstream: hop-by-hop removal, authority, gRPC bits.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Version};
use std::time::Duration;

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
const HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");

/// Hop-by-hop headers (RFC 9110 7.6.1, plus the legacy `keep-alive` and
/// `proxy-connection`, and `HTTP2-Settings`, which belongs to an h2c upgrade of one
/// connection and must never reach an upstream even when `Connection` does not list it);
/// `TE` must stay first (see below).
static HOP_BY_HOP: [HeaderName; 11] = [
    header::TE,
    header::CONNECTION,
    header::TRANSFER_ENCODING,
    header::TRAILER,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    header::EXPECT,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    HTTP2_SETTINGS,
];

/// Bit n is set when a name in [`HOP_BY_HOP`] is n bytes long.
const HOP_BY_HOP_LENGTHS: u32 = {
    let lengths = [2, 10, 17, 7, 7, 19, 18, 6, 10, 16, 14];
    let mut mask = 0u32;
    let mut i = 0;
    while i < lengths.len() {
        mask |= 1 << lengths[i];
        i += 1;
    }
    mask
};

/// Removes hop-by-hop headers (and those named in `Connection`). `te: trailers` is kept
/// because gRPC needs it end to end.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names finds which are present (most messages carry none, or only
    // `Connection: keep-alive`); only those are looked up and removed.
    let mut present = 0u16;
    for name in headers.keys() {
        // Most names are ruled out by their length alone.
        let len = name.as_str().len();
        if len >= 32 || HOP_BY_HOP_LENGTHS & (1 << len) == 0 {
            continue;
        }
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    let only_usual_tokens = || {
        headers.get_all(header::CONNECTION).iter().all(|v| {
            let v = v.as_bytes();
            v.eq_ignore_ascii_case(b"keep-alive") || v.eq_ignore_ascii_case(b"close")
        })
    };
    if present & (1 << 1) != 0 && !only_usual_tokens() {
        let listed: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            // The usual tokens name nothing to remove beyond the list above.
            .filter(|t| !t.eq_ignore_ascii_case("keep-alive") && !t.eq_ignore_ascii_case("close"))
            .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
            .collect();
        for name in listed {
            headers.remove(name);
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) == 0 {
            continue;
        }
        // `te: trailers` stays (gRPC needs it end to end); any other TE goes.
        if i == 0
            && headers
                .get(header::TE)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"))
            && headers.get_all(header::TE).iter().count() == 1
        {
            continue;
        }
        headers.remove(name);
    }
}

/// The authority a request is addressed to: the URI's (absolute form, HTTP/2) or `Host`.
pub fn authority<B>(req: &Request<B>) -> Option<&str> {
    req.uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers().get(header::HOST).and_then(|h| h.to_str().ok()))
}

pub fn port_of(authority: &str) -> Option<u16> {
    let (_, port) = authority.rsplit_once(':')?;
    port.parse().ok()
}

pub fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The `Upgrade` value of an HTTP/1.1 upgrade request the proxy tunnels: WebSocket always;
/// another protocol when the route lists it (`allowed`), or when a verified mesh peer sends it
/// (the peer's own route allowed it); never `h2c`. One `Upgrade` line, naming the protocol
/// first, with `upgrade` in `Connection`.
///
/// Any other upgrade is served as the plain HTTP/1.1 request it also is, its `Upgrade`
/// header stripped (as Envoy does). An `Upgrade: h2c` relayed to an upstream that agreed
/// would turn the client's connection into a raw tunnel, and every request sent inside it
/// would skip routes, filters, rate limits and authorization.
pub fn tunnelled_upgrade<'a, B>(
    req: &'a Request<B>,
    allowed: &[Box<str>],
    from_mesh_peer: bool,
) -> Option<&'a HeaderValue> {
    if req.version() != Version::HTTP_11 {
        return None;
    }
    let mut values = req.headers().get_all(header::UPGRADE).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    let protocol = first_protocol(value.as_bytes());
    let tunnelled = !protocol.eq_ignore_ascii_case(b"h2c")
        && (protocol.eq_ignore_ascii_case(b"websocket")
            || from_mesh_peer
            || allowed.iter().any(|a| protocol.eq_ignore_ascii_case(a.as_bytes())));
    let connection_upgrade = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")));
    (tunnelled && connection_upgrade).then_some(value)
}

/// The first protocol an `Upgrade` value names (a comma-separated list is accepted; RFC 6455
/// clients send WebSocket alone).
pub fn first_protocol(upgrade: &[u8]) -> &[u8] {
    upgrade.split(|&b| b == b',').next().unwrap_or_default().trim_ascii()
}

/// Parses `grpc-timeout` (e.g. `100m`, `5S`): a positive integer of at most 8 digits and a unit.
pub fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    static GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
    let v = headers.get(&GRPC_TIMEOUT)?.to_str().ok()?;
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    // Digits only (`u64::from_str` would also take a leading `+`, which gRPC does not).
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_grpc_timeout() {
        let mut h = HeaderMap::new();
        h.insert("grpc-timeout", "250m".parse().unwrap());
        assert_eq!(grpc_timeout(&h), Some(Duration::from_millis(250)));
        h.insert("grpc-timeout", "1x".parse().unwrap());
        assert_eq!(grpc_timeout(&h), None);
    }

    /// A WebSocket upgrade request, with no other protocol allowed.
    fn is_upgrade<B>(req: &Request<B>) -> bool {
        tunnelled_upgrade(req, &[], false).is_some()
    }

    #[test]
    fn only_websocket_upgrades_tunnel() {
        let req = |upgrade: &str| {
            Request::get("/")
                .header("upgrade", upgrade)
                .header("connection", "Upgrade, HTTP2-Settings")
                .body(())
                .unwrap()
        };
        assert!(is_upgrade(&req("websocket")));
        assert!(is_upgrade(&req("WebSocket")));
        assert!(!is_upgrade(&req("h2c")));
        assert!(!is_upgrade(&req("h2c, websocket")));
        assert!(!is_upgrade(&req("TLS/1.2")));
        let allowed: Vec<Box<str>> = vec!["spdy/3.1".into(), "h2c".into()];
        assert!(tunnelled_upgrade(&req("SPDY/3.1"), &allowed, false).is_some());
        assert!(
            tunnelled_upgrade(&req("TLS/1.2"), &allowed, true).is_some(),
            "a mesh peer decided"
        );
        assert!(tunnelled_upgrade(&req("h2c"), &allowed, true).is_none(), "never h2c");
        let two = Request::get("/")
            .header("upgrade", "h2c")
            .header("upgrade", "websocket")
            .header("connection", "upgrade")
            .body(())
            .unwrap();
        assert!(!is_upgrade(&two), "one Upgrade line only");
        let mut h = HeaderMap::new();
        h.insert("upgrade", "h2c".parse().unwrap());
        h.insert("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA".parse().unwrap());
        h.insert("x-keep", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
    }

    #[test]
    fn length_mask_matches_the_table() {
        for name in &HOP_BY_HOP {
            assert_ne!(HOP_BY_HOP_LENGTHS & (1 << name.as_str().len()), 0, "{name}");
        }
    }

    #[test]
    fn strips_connection_listed_headers() {
        let mut h = HeaderMap::new();
        h.insert("connection", "close, x-private".parse().unwrap());
        h.insert("x-private", "1".parse().unwrap());
        h.insert("te", "trailers".parse().unwrap());
        h.insert("x-keep", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert!(!h.contains_key("x-private") && !h.contains_key("connection"));
        assert!(h.contains_key("te") && h.contains_key("x-keep"));

        let mut h = HeaderMap::new();
        h.insert("connection", "keep-alive".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("proxy-connection", "keep-alive".parse().unwrap());
        h.insert("te", "gzip".parse().unwrap());
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        h.insert("content-type", "text/plain".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("content-type"));
    }
}
