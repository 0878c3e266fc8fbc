//! Property-based fuzzing of what the data plane parses from clients (`cargo test -p
//! smesh-proxy fuzz`): protocol detection of a connection's first bytes, hop-by-hop header
//! stripping, authority, `grpc-timeout`, route matching (paths, methods, headers, query
//! parameters, cookies) and the compiled form of what validation accepts. Case counts keep
//! the whole set to a few seconds.

use crate::http::headers::{
    authority, first_protocol, grpc_timeout, is_grpc, port_of, strip_hop_by_hop, tunnelled_upgrade,
};
use crate::listen::detect::{classify, complete_tls_record, detect, Detected, PrefixedIo};
use crate::route::rule::{anchored, RouteMatch};
use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Version};
use proptest::prelude::*;
use proptest::test_runner::Config;
use smesh_model::{HttpRouteMatch, PathMatch, PathMatchType, ValueMatch, ValueMatchType};
use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

/// A bounded run; failures are reported (with the shrunk input), not written to files.
fn config(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

// ---- protocol detection ----

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// First bytes of a connection: protocol openings (whole, cut short, or damaged) followed by
/// anything, or just anything.
fn first_bytes() -> impl Strategy<Value = Vec<u8>> {
    let opening = prop_oneof![
        prop::sample::select(METHODS.to_vec()).prop_map(|m| format!("{m} / HTTP/1.1\r\n").into_bytes()),
        prop::sample::select(METHODS.to_vec()).prop_map(|m| m.to_ascii_lowercase().into_bytes()),
        Just(PREFACE.to_vec()),
        Just(b"PRI * HTTP/1.1\r\n".to_vec()),
        Just(vec![0x16, 0x03, 0x01, 0x02, 0x00, 0x01]),
        Just(vec![0x16, 0x02]),
        Just(b"SSH-2.0-OpenSSH\r\n".to_vec()),
        Just(b"*1\r\n$4\r\nPING\r\n".to_vec()),
        Just(b"\r\nGET / HTTP/1.1\r\n".to_vec()),
        "[A-Z]{1,9}( |\t)?".prop_map(String::into_bytes),
        Just(Vec::new()),
    ];
    (
        opening,
        any::<Option<prop::sample::Index>>(),
        prop::collection::vec(any::<u8>(), 0..40),
    )
        .prop_map(|(mut opening, cut, rest)| {
            if let Some(cut) = cut {
                // Cut it short, or flip one byte of it.
                if !opening.is_empty() {
                    let i = cut.index(opening.len());
                    if rest.first().is_some_and(|b| b % 2 == 0) {
                        opening.truncate(i);
                    } else {
                        opening[i] ^= rest.first().copied().unwrap_or(1).max(1);
                    }
                }
            }
            opening.extend(rest);
            opening
        })
}

/// What `classify` should answer, from the protocols' own definitions: `None` while `buf` can
/// still become a TLS record, the HTTP/2 preface or `METHOD SP`.
fn expected_class(buf: &[u8]) -> Option<Detected> {
    if buf.is_empty() {
        return None;
    }
    if buf[0] == 0x16 {
        return match buf.get(1) {
            None => None,
            Some(3) => Some(Detected::Tls),
            Some(_) => Some(Detected::Opaque),
        };
    }
    if buf.starts_with(PREFACE) {
        return Some(Detected::Http2);
    }
    if PREFACE.starts_with(buf) {
        return None;
    }
    let requests: Vec<Vec<u8>> = METHODS.iter().map(|m| format!("{m} ").into_bytes()).collect();
    if requests.iter().any(|r| buf.starts_with(r)) {
        return Some(Detected::Http1);
    }
    if requests.iter().any(|r| r.starts_with(buf)) {
        return None;
    }
    Some(Detected::Opaque)
}

/// Returns its chunks one read at a time, then end of stream.
struct Chunks(VecDeque<Vec<u8>>);

impl AsyncRead for Chunks {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if let Some(mut chunk) = self.0.pop_front() {
            let n = chunk.len().min(buf.remaining());
            buf.put_slice(&chunk[..n]);
            if n < chunk.len() {
                self.0.push_front(chunk.split_off(n));
            }
        }
        Poll::Ready(Ok(()))
    }
}

fn split_into_chunks(data: &[u8], cuts: &[prop::sample::Index]) -> VecDeque<Vec<u8>> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c.index(data.len() + 1)).collect();
    points.extend([0, data.len()]);
    points.sort_unstable();
    points.dedup();
    points
        .windows(2)
        .map(|w| data[w[0]..w[1]].to_vec())
        .filter(|c| !c.is_empty())
        .collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a runtime")
}

proptest! {
    #![proptest_config(config(2000))]

    /// Every prefix is classified without panicking, as the protocols define it; once decided
    /// the answer never changes as bytes arrive, and it is decided within 24 bytes.
    #[test]
    fn fuzz_classify(buf in first_bytes()) {
        let mut decided: Option<Detected> = None;
        for k in 0..=buf.len() {
            let prefix = &buf[..k];
            let got = classify(prefix);
            let expected = expected_class(prefix);
            // Up to 7 capitals could be a method the proxy waits for no longer than needed.
            let waits_for_a_method = got.is_none()
                && expected == Some(Detected::Opaque)
                && k <= 7
                && prefix.iter().all(u8::is_ascii_uppercase);
            prop_assert!(got == expected || waits_for_a_method, "{:?}: {:?}, expected {:?}", String::from_utf8_lossy(prefix), got, expected);
            if let Some(d) = decided {
                prop_assert_eq!(got, Some(d), "changed its mind at {} bytes", k);
            }
            if got.is_none() {
                prop_assert!(k < PREFACE.len());
            }
            decided = decided.or(got);
        }
    }
}

proptest! {
    #![proptest_config(config(1000))]

    /// The protocols' openings followed by anything are classified as themselves.
    #[test]
    fn fuzz_classify_openings(method in prop::sample::select(METHODS.to_vec()), rest in prop::collection::vec(any::<u8>(), 0..30)) {
        let with = |opening: &[u8]| [opening, &rest].concat();
        prop_assert_eq!(classify(&with(format!("{method} ").as_bytes())), Some(Detected::Http1));
        prop_assert_eq!(classify(&with(PREFACE)), Some(Detected::Http2));
        prop_assert_eq!(classify(&with(&[0x16, 0x03])), Some(Detected::Tls));
        let lower = format!("{} ", method.to_ascii_lowercase());
        prop_assert_eq!(classify(&with(lower.as_bytes())), Some(Detected::Opaque));
    }
}

proptest! {
    #![proptest_config(config(500))]

    /// `detect` over the same bytes cut into arbitrary reads answers what `classify` says of
    /// the first read boundary that decides (opaque at end of stream), and hands back every
    /// byte it read; `PrefixedIo` then replays the stream whole.
    #[test]
    fn fuzz_detect_in_pieces(data in first_bytes(), cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..6)) {
        let chunks = split_into_chunks(&data, &cuts);
        let mut expected = None;
        let mut seen = 0;
        for chunk in &chunks {
            seen += chunk.len();
            if let Some(d) = classify(&data[..seen]) {
                expected = Some((d, seen));
                break;
            }
        }
        let expected = match expected {
            Some(e) => Some(e),
            None if data.is_empty() => None,
            None => Some((Detected::Opaque, data.len())),
        };
        runtime().block_on(async {
            let mut io = Chunks(chunks);
            let got = detect(&mut io, Duration::from_secs(5)).await.expect("in-memory reads do not fail");
            let got_kind = got.as_ref().map(|(d, prefix)| (*d, prefix.len()));
            prop_assert_eq!(got_kind, expected);
            let prefix = got.map(|(_, p)| p).unwrap_or_default();
            prop_assert_eq!(&prefix[..], &data[..prefix.len()]);
            let mut replayed = Vec::new();
            PrefixedIo::new(prefix, io).read_to_end(&mut replayed).await.expect("in memory");
            prop_assert_eq!(replayed, data);
            Ok(())
        })?;
    }
}

proptest! {
    #![proptest_config(config(500))]

    /// Completing a TLS record never panics, whatever the length field says, keeps what it
    /// was given, and stops at the record's end (or what arrived, or the TLS maximum).
    #[test]
    fn fuzz_complete_tls_record(data in prop::collection::vec(any::<u8>(), 0..300), given in any::<prop::sample::Index>(), cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..4)) {
        let given = given.index(data.len() + 1);
        let prefix = Bytes::copy_from_slice(&data[..given]);
        let chunks = split_into_chunks(&data[given..], &cuts);
        let record = runtime().block_on(async {
            let mut io = Chunks(chunks);
            complete_tls_record(&mut io, prefix, Duration::from_secs(5)).await
        });
        prop_assert!(record.starts_with(&data[..given]));
        prop_assert!(data.starts_with(&record));
        let wanted = match data.get(3..5) {
            Some(len) => 5 + usize::from(u16::from_be_bytes([len[0], len[1]])),
            None => 5,
        };
        prop_assert!(record.len() >= wanted.min(data.len()).max(given) || record.len() == data.len());
    }
}

// ---- headers ----

/// Header names: every hop-by-hop one, some end-to-end ones, and arbitrary tokens.
const NAMES: &[&str] = &[
    "connection",
    "Connection",
    "te",
    "transfer-encoding",
    "trailer",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
    "expect",
    "keep-alive",
    "proxy-connection",
    "http2-settings",
    "host",
    "content-type",
    "content-length",
    "x-a",
    "x-b",
    "x-private",
    "cookie",
    "grpc-timeout",
    "authorization",
];

/// May be removed as hop-by-hop without being listed (the proxy's list may grow).
const MAYBE_HOP_BY_HOP: &[&str] = &[
    "te",
    "connection",
    "transfer-encoding",
    "trailer",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
    "expect",
    "keep-alive",
    "proxy-connection",
    "http2-settings",
];

/// Always removed (RFC 9110 7.6.1 and the legacy connection headers).
const ALWAYS_HOP_BY_HOP: &[&str] = &[
    "connection",
    "transfer-encoding",
    "keep-alive",
    "proxy-connection",
    "upgrade",
];

fn header_name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(NAMES).prop_map(str::to_string),
        1 => "[a-z0-9-]{1,12}",
        1 => "[!#$%&'*+.^_`|~A-Za-z0-9-]{1,40}",
    ]
}

/// Header values: `Connection`-style lists of names, `te` values, text, and raw bytes.
fn header_value() -> impl Strategy<Value = Vec<u8>> {
    let token = prop_oneof![
        3 => prop::sample::select(NAMES).prop_map(str::to_string),
        1 => prop::sample::select(vec!["keep-alive", "Keep-Alive", "close", "CLOSE", "trailers", "Upgrade", "websocket", "h2c", "", " ", "x a", "é"]).prop_map(str::to_string),
    ];
    prop_oneof![
        3 => (prop::collection::vec(token, 1..4), prop::sample::select(vec![",", ", ", " ,", ",,"]))
            .prop_map(|(t, sep)| t.join(sep).into_bytes()),
        1 => "[ -~]{0,20}".prop_map(String::into_bytes),
        1 => prop::collection::vec(any::<u8>(), 0..20),
    ]
}

fn header_map() -> impl Strategy<Value = HeaderMap> {
    prop::collection::vec((header_name(), header_value()), 0..10).prop_map(|pairs| {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_bytes(&value)) {
                map.append(name, value);
            }
        }
        map
    })
}

fn values_of(map: &HeaderMap, name: &HeaderName) -> Vec<HeaderValue> {
    map.get_all(name).iter().cloned().collect()
}

/// Encodes a duration as `grpc-timeout` does, in one unit.
fn in_unit(n: u64, unit: char) -> Duration {
    match unit {
        'H' => Duration::from_secs(n * 3600),
        'M' => Duration::from_secs(n * 60),
        'S' => Duration::from_secs(n),
        'm' => Duration::from_millis(n),
        'u' => Duration::from_micros(n),
        _ => Duration::from_nanos(n),
    }
}

fn timeout_header(value: &[u8]) -> Option<HeaderMap> {
    let mut h = HeaderMap::new();
    h.insert("grpc-timeout", HeaderValue::from_bytes(value).ok()?);
    Some(h)
}

proptest! {
    #![proptest_config(config(1000))]

    /// Stripping never panics, only removes, is idempotent, removes what `Connection` lists
    /// and the always-hop-by-hop headers (a lone `te: trailers` stays), and keeps every
    /// end-to-end header as it was.
    #[test]
    fn fuzz_strip_hop_by_hop(original in header_map()) {
        let mut stripped = original.clone();
        strip_hop_by_hop(&mut stripped);
        let mut again = stripped.clone();
        strip_hop_by_hop(&mut again);
        prop_assert_eq!(&again, &stripped, "not idempotent");
        for name in stripped.keys() {
            prop_assert_eq!(values_of(&stripped, name), values_of(&original, name), "{} changed", name);
        }
        let connection: Vec<&HeaderValue> = original.get_all("connection").iter().collect();
        let mut listed: Vec<HeaderName> = Vec::new();
        if connection.iter().all(|v| v.to_str().is_ok()) {
            listed = connection
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .map(str::trim)
                .filter(|t| !t.eq_ignore_ascii_case("keep-alive") && !t.eq_ignore_ascii_case("close"))
                .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
                .collect();
            for name in &listed {
                prop_assert!(!stripped.contains_key(name), "{} is listed in Connection", name);
            }
        }
        for name in ALWAYS_HOP_BY_HOP {
            prop_assert!(!stripped.contains_key(*name), "{} kept", name);
        }
        // (A Connection value that is not visible ASCII lists nothing the check can follow.)
        if connection.iter().all(|v| v.to_str().is_ok()) {
            let te = values_of(&original, &http::header::TE);
            let lone_trailers = te.len() == 1 && te[0].as_bytes().eq_ignore_ascii_case(b"trailers");
            let te_listed = listed.contains(&http::header::TE);
            prop_assert_eq!(stripped.contains_key("te"), lone_trailers && !te_listed, "te");
            for name in original.keys() {
                if !MAYBE_HOP_BY_HOP.contains(&name.as_str()) && !listed.contains(name) {
                    prop_assert!(stripped.contains_key(name), "end-to-end {} removed", name);
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(config(600))]

    /// The request-inspecting helpers never panic on any headers, version or URI; the
    /// authority is the URI's, else a readable `Host`.
    #[test]
    fn fuzz_request_helpers(
        headers in header_map(),
        host in proptest::option::of(prop::collection::vec(any::<u8>(), 0..20)),
        uri in prop_oneof![
            Just("/".to_string()),
            "/[a-z/?=&%]{0,12}",
            "http://[a-z.]{1,10}(:[0-9]{1,6})?/[a-z]{0,4}",
            "[a-z.]{1,10}:[0-9]{1,5}",
        ],
        version in prop::sample::select(vec![Version::HTTP_10, Version::HTTP_11, Version::HTTP_2]),
        upgrade in proptest::option::of(header_value()),
    ) {
        let Ok(mut req) = Request::builder().uri(uri.as_str()).version(version).body(()) else { return Ok(()) };
        *req.headers_mut() = headers;
        if let Some(host) = host.and_then(|h| HeaderValue::from_bytes(&h).ok()) {
            req.headers_mut().insert(http::header::HOST, host);
        }
        if let Some(u) = upgrade.and_then(|u| HeaderValue::from_bytes(&u).ok()) {
            let _ = first_protocol(u.as_bytes());
            req.headers_mut().append(http::header::UPGRADE, u);
        }
        // Their meaning is the HTTP layer's business (and changing): here, no panic.
        let _ = tunnelled_upgrade(&req, &[Box::from("x")], false);
        let _ = tunnelled_upgrade(&req, &[], true);
        let _ = is_grpc(&req);
        let expected = req
            .uri()
            .authority()
            .map(|a| a.as_str())
            .or_else(|| req.headers().get(http::header::HOST).and_then(|h| h.to_str().ok()));
        prop_assert_eq!(authority(&req), expected);
        if let Some(a) = authority(&req) {
            let _ = port_of(a);
        }
    }
}

proptest! {
    #![proptest_config(config(300))]

    #[test]
    fn fuzz_port_of(host in "[a-z0-9.:\\[\\]-]{0,20}", port in any::<u16>(), junk in ".{0,12}") {
        prop_assert_eq!(port_of(&format!("{host}:{port}")), Some(port));
        let _ = port_of(&junk);
    }
}

proptest! {
    #![proptest_config(config(2000))]

    /// `grpc-timeout`: every unit round-trips up to 8 digits; 9 or more digits, other units
    /// and anything not `digits unit` are refused; no value panics.
    #[test]
    fn fuzz_grpc_timeout(
        n in prop_oneof![0..100u64, 0..=99_999_999u64],
        unit in prop::sample::select(vec!['H', 'M', 'S', 'm', 'u', 'n']),
        zeros in 0..8usize,
        long in 100_000_000..=u64::MAX,
        junk in prop::collection::vec(any::<u8>(), 0..12),
    ) {
        let text = format!("{n}{unit}");
        prop_assert_eq!(grpc_timeout(&timeout_header(text.as_bytes()).expect("ASCII")), Some(in_unit(n, unit)), "{}", text);
        // Leading zeros count as digits.
        let padded = format!("{}{n}{unit}", "0".repeat(zeros));
        let expected = (padded.len() <= 9).then(|| in_unit(n, unit));
        prop_assert_eq!(grpc_timeout(&timeout_header(padded.as_bytes()).expect("ASCII")), expected, "{}", padded);
        let too_long = format!("{long}{unit}");
        prop_assert_eq!(grpc_timeout(&timeout_header(too_long.as_bytes()).expect("ASCII")), None, "{}", too_long);
        prop_assert_eq!(grpc_timeout(&timeout_header(format!("{n}").as_bytes()).expect("ASCII")), None);
        prop_assert_eq!(grpc_timeout(&timeout_header(format!("{n}s").as_bytes()).expect("ASCII")), None);
        if let Some(h) = timeout_header(&junk) {
            let strict = junk.len() >= 2
                && junk.len() <= 9
                && junk[..junk.len() - 1].iter().all(u8::is_ascii_digit)
                && b"HMSmun".contains(&junk[junk.len() - 1]);
            prop_assert!(grpc_timeout(&h).is_some() == strict, "{:?}", String::from_utf8_lossy(&junk));
        }
    }
}

proptest! {
    #![proptest_config(config(1000))]

    /// What the proxy sends upstream as `grpc-timeout` is valid and never shorter than the
    /// time left.
    #[test]
    fn fuzz_grpc_timeout_encoding(secs in 0..400_000_000_000u64, nanos in 0..1_000_000_000u32) {
        let d = Duration::new(secs, nanos);
        let value = crate::resilience::deadline::encode_grpc_timeout(d);
        prop_assert!(value.len() <= 9, "{:?}", value);
        let back = grpc_timeout(&timeout_header(value.as_bytes()).expect("ASCII")).expect("parses back");
        let cap = Duration::from_secs(99_999_999 * 3600);
        prop_assert!(back >= d.min(cap).max(Duration::from_nanos(1)), "{:?} -> {:?}", d, value);
    }
}

/// `+5S` is not `1*8DIGIT unit`; grpc-go refuses it (`u64::from_str` alone would take it).
#[test]
fn grpc_timeout_refuses_a_sign() {
    for value in ["+5S", "+1234567m"] {
        assert_eq!(
            grpc_timeout(&timeout_header(value.as_bytes()).unwrap()),
            None,
            "{value}"
        );
    }
}

// ---- route matching ----

/// Path segments that matter to matching: prefixes of one another, empty, dots, escapes.
fn path() -> impl Strategy<Value = String> {
    let segment = prop::sample::select(vec![
        "a", "ab", "api", "api2", "v1", "", ".", "..", "%2F", "%20", "x-y", "é",
    ]);
    (prop::collection::vec(segment, 0..5), any::<bool>()).prop_map(|(segments, trailing)| {
        let mut p = format!("/{}", segments.join("/"));
        if trailing && !p.ends_with('/') {
            p.push('/');
        }
        p
    })
}

fn request(
    path: &str,
    method: &Method,
    query: &str,
    headers: &[(String, String)],
    cookies: &[String],
) -> Option<Request<()>> {
    let uri = if query.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{query}")
    };
    let mut b = Request::builder().method(method.clone()).uri(uri);
    for (name, value) in headers {
        b = b.header(name.as_str(), value.as_str());
    }
    for c in cookies {
        b = b.header("cookie", c.as_str());
    }
    b.body(()).ok()
}

fn value_match(kind: ValueMatchType, name: &str, value: &str) -> ValueMatch {
    ValueMatch {
        kind,
        name: name.into(),
        value: value.into(),
    }
}

fn method() -> impl Strategy<Value = Method> {
    prop_oneof![
        prop::sample::select(METHODS.to_vec()).prop_map(|m| Method::from_bytes(m.as_bytes()).expect("a method")),
        "[A-Z]{1,8}".prop_map(|m| Method::from_bytes(m.as_bytes()).expect("a token")),
    ]
}

/// `k=v` pairs (or a bare `k`, value empty) of a query string.
fn query_pairs() -> impl Strategy<Value = Vec<(String, Option<String>)>> {
    prop::collection::vec(("[a-c]{1,2}", proptest::option::of("[0-2a%+]{0,2}")), 0..4)
}

fn query_string(pairs: &[(String, Option<String>)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| match v {
            Some(v) => format!("{k}={v}"),
            None => k.clone(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

proptest! {
    #![proptest_config(config(800))]

    /// Path matches: an exact path matches only itself; a prefix matches whole segments
    /// (its trailing `/` ignored); an escaped literal as a regular expression behaves like
    /// the exact match; with the query string never part of the path.
    #[test]
    fn fuzz_path_matches(rule in path(), req_path in path(), same in any::<bool>(), query in "[a-z=&]{0,6}") {
        let req_path = if same { rule.clone() } else { req_path };
        let Some(req) = request(&req_path, &Method::GET, &query, &[], &[]) else { return Ok(()) };
        let compiled = |kind, value: &str| RouteMatch::compile(&HttpRouteMatch {
            path: Some(PathMatch { kind, value: value.to_string() }),
            ..Default::default()
        });
        let path = req.uri().path();
        prop_assert_eq!(compiled(PathMatchType::Exact, &rule).matches(&req), path == rule);
        let regex = regex::escape(&rule);
        prop_assert_eq!(compiled(PathMatchType::RegularExpression, &regex).matches(&req), path == rule);
        let prefix = rule.trim_end_matches('/');
        let expected = prefix.is_empty() || path == prefix || path.starts_with(&format!("{prefix}/"));
        prop_assert_eq!(compiled(PathMatchType::PathPrefix, &rule).matches(&req), expected, "prefix {} on {}", rule, path);
        prop_assert!(RouteMatch::everything().matches(&req));
    }
}

proptest! {
    #![proptest_config(config(600))]

    /// Every condition of a match must hold: method, each header, each query parameter and
    /// each cookie, compared exactly (or by an anchored regular expression).
    #[test]
    fn fuzz_match_conditions(
        rule_method in proptest::option::of(method()),
        req_method in method(),
        rule_headers in prop::collection::vec(("x-[ab]", "[0-2]{0,2}", any::<bool>()), 0..3),
        req_headers in prop::collection::vec(("x-[ab]", "[0-2]{0,2}"), 0..4),
        rule_query in prop::collection::vec(("[a-c]{1,2}", "[0-2a%+]{0,2}"), 0..3),
        req_query in query_pairs(),
        rule_cookies in prop::collection::vec(("[a-c]", "[0-2]{0,2}"), 0..2),
        req_cookies in prop::collection::vec((prop::collection::vec(("[a-c]", "[0-2]{0,2}", any::<bool>()), 0..3), " ?"), 0..3),
    ) {
        let cookie_lines: Vec<String> = req_cookies
            .iter()
            .map(|(pairs, space)| {
                pairs
                    .iter()
                    .map(|(k, v, quoted)| if *quoted { format!("{k}=\"{v}\"") } else { format!("{k}={v}") })
                    .collect::<Vec<_>>()
                    .join(&format!(";{space}"))
            })
            .filter(|l| !l.is_empty())
            .collect();
        let query = query_string(&req_query);
        let Some(req) = request("/", &req_method, &query, &req_headers, &cookie_lines) else { return Ok(()) };
        let m = HttpRouteMatch {
            path: None,
            method: rule_method.as_ref().map(|m| m.as_str().to_string()),
            headers: rule_headers
                .iter()
                .map(|(n, v, regex)| {
                    if *regex {
                        value_match(ValueMatchType::RegularExpression, n, &regex::escape(v))
                    } else {
                        value_match(ValueMatchType::Exact, n, v)
                    }
                })
                .collect(),
            query_params: rule_query.iter().map(|(n, v)| value_match(ValueMatchType::Exact, n, v)).collect(),
            cookies: rule_cookies.iter().map(|(n, v)| value_match(ValueMatchType::Exact, n, v)).collect(),
        };
        let method_ok = rule_method.as_ref().is_none_or(|m| *m == req_method);
        let headers_ok = rule_headers
            .iter()
            .all(|(n, v, _)| req_headers.iter().any(|(rn, rv)| rn == n && rv == v));
        let query_ok = rule_query
            .iter()
            .all(|(n, v)| req_query.iter().any(|(k, rv)| k == n && rv.as_deref().unwrap_or("") == v));
        let cookies_ok = rule_cookies.iter().all(|(n, v)| {
            req_cookies.iter().flat_map(|(pairs, _)| pairs).any(|(k, rv, _)| k == n && rv == v)
        });
        let compiled = RouteMatch::compile(&m);
        prop_assert_eq!(
            compiled.matches(&req),
            method_ok && headers_ok && query_ok && cookies_ok,
            "method {} headers {} query {} cookies {}: {:?} {:?}",
            method_ok, headers_ok, query_ok, cookies_ok, req, cookie_lines
        );
    }
}

proptest! {
    #![proptest_config(config(600))]

    /// Arbitrary request targets and rule values (patterns that may not compile, names that
    /// are not header names) never panic; precedence orders exact < prefix < regex < all.
    #[test]
    fn fuzz_route_matching_never_panics(
        uri in prop_oneof!["/[ -~]{0,20}", "[ -~]{0,20}", "http://a/[a-z?=&]{0,8}"],
        kind in prop::sample::select(vec![PathMatchType::Exact, PathMatchType::PathPrefix, PathMatchType::RegularExpression]),
        value in ".{0,12}",
        name in ".{0,6}",
        method_text in proptest::option::of(".{0,6}"),
        header_value in prop::collection::vec(any::<u8>(), 0..8),
    ) {
        let m = HttpRouteMatch {
            path: Some(PathMatch { kind, value: value.clone() }),
            method: method_text,
            headers: vec![value_match(ValueMatchType::RegularExpression, &name, &value)],
            query_params: vec![value_match(ValueMatchType::RegularExpression, &name, &value)],
            cookies: vec![value_match(ValueMatchType::Exact, &name, &value)],
        };
        let compiled = RouteMatch::compile(&m);
        if let Ok(mut req) = Request::builder().uri(uri.as_str()).body(()) {
            if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_bytes(&header_value)) {
                req.headers_mut().append(n, v.clone());
                req.headers_mut().append(http::header::COOKIE, v);
            }
            let _ = compiled.matches(&req);
        }
        let p = |kind, value: &str| RouteMatch::compile(&HttpRouteMatch {
            path: Some(PathMatch { kind, value: value.into() }),
            ..Default::default()
        }).precedence();
        let exact = p(PathMatchType::Exact, &value);
        let long = p(PathMatchType::PathPrefix, &format!("/{}", value.trim_matches('/')));
        let regex = p(PathMatchType::RegularExpression, &value);
        let all = RouteMatch::everything().precedence();
        prop_assert!(exact < regex && regex < all);
        if !value.trim_matches('/').is_empty() {
            prop_assert!(exact < long && long < regex);
            let longer = p(PathMatchType::PathPrefix, &format!("/{}/x", value.trim_matches('/')));
            prop_assert!(longer < long);
        }
    }
}

proptest! {
    #![proptest_config(config(500))]

    /// `retries` reads any `grpc-status` header value and any status without panicking.
    #[test]
    fn fuzz_retry_policy(status in any::<u16>(), value in prop::collection::vec(any::<u8>(), 0..6), codes in prop::collection::vec(any::<prop::sample::Index>(), 0..4)) {
        let policy = crate::route::rule::RetryPolicy::from(&smesh_model::GrpcRetry {
            codes: codes.iter().map(|c| smesh_model::GrpcCode::ALL[c.index(16)]).collect(),
            ..Default::default()
        });
        let mut h = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_bytes(&value) {
            h.insert("grpc-status", v);
        }
        let _ = policy.retries(status, Some(&h));
        let _ = policy.retries(status, None);
        let _ = crate::resilience::shed::request_priority(Some(&h), None);
    }
}

/// A service and one route rule with the given `matches` (a YAML flow mapping).
fn route_document(kind: &str, matches: &str) -> String {
    format!(
        "apiVersion: smesh.io/v1\nkind: Service\nmetadata: {{name: api}}\nspec: {{}}\n---\n\
         apiVersion: smesh.io/v1\nkind: {kind}\nmetadata: {{name: r}}\n\
         spec: {{parentRefs: [{{name: api}}], rules: [{{matches: [{matches}]}}]}}\n"
    )
}

/// An ASCII string as a YAML double-quoted scalar (Rust's escapes for ASCII are YAML's).
fn quoted(text: &str) -> String {
    assert!(text.is_ascii());
    format!("{text:?}")
}

/// Bits of regular expressions, flags and comments included.
fn pattern() -> impl Strategy<Value = String> {
    let token = prop::sample::select(vec![
        "a", "/", ".", "*", "+", "?", "|", "(", ")", "[", "]", "[a-z]", "{2}", "{1,3}", "^", "$", "\\", "\\d", "\\.",
        "(?x)", "(?i)", "(?m)", "(?s)", "(?-x)", "#", " ", "\n", "(?:", "(?P<n>", ")?", "\\#",
    ]);
    prop::collection::vec(token, 0..8).prop_map(|t| t.concat())
}

proptest! {
    #![proptest_config(config(400))]

    /// What validation accepts compiles in the proxy as meant: an HTTPRoute regular
    /// expression (path, header, query) and a GRPCRoute service/method pattern never end up
    /// as the never-matching fallback.
    #[test]
    fn fuzz_validated_patterns_compile(p in pattern(), method in pattern()) {
        let fallback = anchored("(").as_str().to_string();
        let http = route_document("HTTPRoute", &format!(
            "{{path: {{type: RegularExpression, value: {q}}}, headers: [{{type: RegularExpression, name: x-a, value: {q}}}]}}",
            q = quoted(&p),
        ));
        if let Ok(items) = smesh_model::load("fuzz.yaml", &http) {
            let compiled = anchored(&p);
            prop_assert_ne!(compiled.as_str(), fallback.as_str(), "{:?} passed validation", p);
            let smesh_model::Resource::HttpRoute(route) = &items[1].resource else { unreachable!() };
            let compiled = RouteMatch::compile(&route.spec.rules[0].matches[0]);
            prop_assert_eq!(compiled.precedence().0, 2);
        }
        let grpc = route_document("GRPCRoute", &format!(
            "{{method: {{type: RegularExpression, service: {}, method: {}}}}}",
            quoted(&p),
            quoted(&method),
        ));
        if let Ok(items) = smesh_model::load("fuzz.yaml", &grpc) {
            let smesh_model::Resource::GrpcRoute(route) = &items[1].resource else { unreachable!() };
            let m = route.spec.rules[0].matches[0].method.as_ref().expect("a method match");
            let path = m.path();
            let compiled = anchored(&path.value);
            prop_assert_ne!(compiled.as_str(), fallback.as_str(), "{:?} / {:?} passed validation", p, method);
        }
    }
}
