//! Property-based fuzzing of what the control plane's HTTP API parses (`cargo test -p
//! smesh-control fuzz`): apply bodies (JSON file lists and YAML text), token requests, and the
//! KV API's keys (arbitrary bytes, percent-encoded or not) and query strings (`?cas=`,
//! `?index=`, `?recurse`, `?raw`), the latter through the real router on an embedded store,
//! checked against a model of the KV contents. Case counts keep the set to a few seconds.

use crate::api::kv::{check_key, KvQuery, INDEX_HEADER};
use crate::api::resources::parse_apply_body;
use crate::api::tokens::{token_expiry, TokenRequest};
use crate::api::{routes, ApiError, ApiState};
use crate::store::KeyValue;
use axum::body::Body;
use axum::extract::{ConnectInfo, Query};
use axum::http::{Method, Request, StatusCode, Uri};
use axum::Router;
use base64::Engine as _;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tower_service::Service as _;

/// A bounded run; failures are reported (with the shrunk input), not written to files.
fn config(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

const SERVICE: &str = "apiVersion: smesh.io/v1\nkind: Service\nmetadata: {name: api}\nspec:\n  endpoints: [{address: 127.0.0.1:9001, labels: {version: v1}}]\n";
const ROUTE: &str = "apiVersion: smesh.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  parentRefs: [{name: api}]\n  rules:\n  - matches: [{path: {type: PathPrefix, value: /v2}, headers: [{name: x-a, value: \"1\"}]}]\n    timeouts: {request: 2s}\n    retry: {attempts: 2, codes: [503], perTryTimeout: 100ms}\n";

/// File texts: valid files, broken ones and arbitrary text.
fn file_text() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => prop::sample::select(vec![
            SERVICE.to_string(),
            ROUTE.to_string(),
            format!("{SERVICE}---\n{ROUTE}"),
            String::new(),
            "---\n".to_string(),
            SERVICE.replace("Service", "Servise"),
            SERVICE.replace("endpoints:", "endpionts:"),
            "kind: Service\n: : :\n".to_string(),
            "[1, 2".to_string(),
        ]),
        1 => any::<String>(),
        1 => (0..SERVICE.len(), any::<char>()).prop_map(|(at, c)| {
            let mut text = SERVICE.to_string();
            let at = (0..=at).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
            text.insert(at, c);
            text
        }),
    ]
}

/// File names as a client may send them (no line breaks, so each error line starts with one).
fn file_name() -> impl Strategy<Value = String> {
    prop_oneof!["[a-z./_-]{1,16}", "[^\r\n]{0,12}"]
}

/// JSON-ish bytes: apply bodies with the right shape and wrong ones.
fn json_soup() -> impl Strategy<Value = Vec<u8>> {
    let token = prop::sample::select(vec![
        "{",
        "}",
        "[",
        "]",
        ",",
        ":",
        "\"files\"",
        "\"name\"",
        "\"text\"",
        "\"service\"",
        "\"ttl\"",
        "\"a\"",
        "\"\"",
        "null",
        "true",
        "1",
        "-1",
        "1e999",
        "\"\\u0000\"",
        "\"\\ud800\"",
        "\"apiVersion: smesh.io/v1\\n\"",
        " ",
        "\"1h\"",
        "\"300000000000y\"",
        "\"web\"",
    ]);
    prop_oneof![
        prop::collection::vec(token, 0..30).prop_map(|t| t.concat().into_bytes()),
        any::<Vec<u8>>(),
    ]
}

fn check_api_error(e: &ApiError) -> Result<(), TestCaseError> {
    prop_assert_eq!(e.0, StatusCode::BAD_REQUEST);
    prop_assert!(!e.1.trim().is_empty());
    Ok(())
}

/// What the store holds after an apply, read back the way the control plane reads it.
fn stored_round_trip(items: &[smesh_model::Sourced]) -> Result<(), TestCaseError> {
    let kvs: Vec<KeyValue> = items
        .iter()
        .enumerate()
        .map(|(i, item)| KeyValue {
            key: crate::keys::resource(item.resource.kind(), item.resource.name()),
            value: serde_json::to_vec(&item.resource).expect("a resource serialises"),
            create_revision: i as u64 + 1,
            mod_revision: i as u64 + 1,
            lease: 0,
        })
        .collect();
    let back = crate::compose::stored_resources(&kvs);
    let sent: Vec<&smesh_model::Resource> = items.iter().map(|i| &i.resource).collect();
    prop_assert_eq!(back.iter().collect::<Vec<_>>(), sent);
    Ok(())
}

proptest! {
    #![proptest_config(config(1500))]

    /// Any body, JSON or not, gives resources or a 400 with a reason; never a panic.
    #[test]
    fn fuzz_apply_body_arbitrary(body in json_soup(), is_json in any::<bool>(), file in proptest::option::of(file_name())) {
        match parse_apply_body(is_json, file, &body) {
            Ok(items) => prop_assert!(!items.is_empty()),
            Err(e) => check_api_error(&e)?,
        }
    }

    /// Well-formed JSON file lists: the resources of every file, or errors each naming the
    /// file it is about; what parses reads back from the store unchanged.
    #[test]
    fn fuzz_apply_json_files(files in prop::collection::vec((file_name(), file_text()), 0..4)) {
        let body = serde_json::json!({
            "files": files.iter().map(|(name, text)| serde_json::json!({"name": name, "text": text})).collect::<Vec<_>>()
        });
        let body = serde_json::to_vec(&body).expect("JSON");
        match parse_apply_body(true, None, &body) {
            Ok(items) => {
                let expected: usize = files
                    .iter()
                    .map(|(name, text)| smesh_model::parse(name, text).map_or(0, |i| i.len()))
                    .sum();
                prop_assert_eq!(items.len(), expected);
                for item in &items {
                    prop_assert!(files.iter().any(|(name, _)| *name == *item.source.file));
                }
                stored_round_trip(&items)?;
            }
            Err(e) => {
                check_api_error(&e)?;
                if e.1 != "no resources to apply" {
                    for line in e.1.lines().filter(|l| !l.starts_with(' ')) {
                        prop_assert!(
                            files.iter().any(|(name, _)| line.starts_with(&format!("{name}: document "))),
                            "{line:?} names none of the files"
                        );
                    }
                }
            }
        }
    }

    /// `POST /api/v1/tokens` bodies: a service and a ttl, or a 400; the expiry is never
    /// before now.
    #[test]
    fn fuzz_token_request(body in prop_oneof![
        json_soup(),
        ("[a-z-]{0,8}|[^\"\\\\]{0,8}", proptest::option::of(prop_oneof![
            "[0-9]{1,21}(ns|ms|s|m|h|d|w|y)",
            (any::<u64>(), prop::sample::select(vec!["ns", "s", "m", "h", "d", "w", "y"])).prop_map(|(n, unit)| format!("{n}{unit}")),
            "[^\"\\\\]{0,10}",
        ])).prop_map(|(service, ttl)| serde_json::to_vec(&serde_json::json!({"service": service, "ttl": ttl})).expect("JSON")),
    ]) {
        let Ok(req) = serde_json::from_slice::<TokenRequest>(&body) else { return Ok(()) };
        let now = SystemTime::now();
        match token_expiry(&req, now) {
            Ok(expires) => {
                let now = now.duration_since(UNIX_EPOCH).expect("after 1970").as_secs();
                prop_assert!(expires >= now);
            }
            Err(e) => check_api_error(&e)?,
        }
    }
}

/// Found by fuzzing: a ttl humantime reads but SystemTime cannot hold panicked the handler.
#[test]
fn a_token_ttl_past_what_system_time_holds_is_a_400() {
    for ttl in ["300000000000y", "18446744073709551615s"] {
        let req: TokenRequest = serde_json::from_value(serde_json::json!({"service": "web", "ttl": ttl})).unwrap();
        let e = token_expiry(&req, SystemTime::now()).unwrap_err();
        assert_eq!(e.0, StatusCode::BAD_REQUEST, "{ttl}");
        assert!(e.1.starts_with("ttl: ") && e.1.ends_with("is too long"), "{}", e.1);
    }
    let req: TokenRequest = serde_json::from_value(serde_json::json!({"service": "web", "ttl": "100y"})).unwrap();
    assert!(token_expiry(&req, SystemTime::now()).is_ok());
}

// ---- the KV API, through the real router ----

const TOKEN: &str = "fuzz-token";

/// Key bytes: mostly a small alphabet (so keys repeat and prefix one another), then the
/// characters that need care in a URL, arbitrary bytes, and the 512-byte limit's neighbourhood.
fn key_bytes() -> impl Strategy<Value = Vec<u8>> {
    let odd = prop_oneof![
        3 => prop::sample::select(b"ab/.%?#&=+ ~-_:;@!$'()*,[]\"<>\\^`{|}".to_vec()),
        1 => prop::sample::select(vec![0u8, b'\t', b'\n', 0x7f, 0x80, 0xc3, 0xa9, 0xff]),
        1 => any::<u8>(),
    ];
    prop_oneof![
        6 => prop::collection::vec(prop::sample::select(b"ab/".to_vec()), 0..6),
        2 => prop::collection::vec(prop::sample::select("abé/.%?#&= ".as_bytes().to_vec()), 1..8),
        1 => prop::collection::vec(odd, 0..12),
        1 => (505..520usize).prop_map(|n| vec![b'k'; n]),
    ]
}

/// A query parameter as a client may write it: a known or unknown name, with or without a
/// value, the value numeric or not.
fn query_param() -> impl Strategy<Value = String> {
    let name = prop::sample::select(vec!["cas", "recurse", "raw", "other", "Cas", "cas[]"]);
    let value = prop_oneof![
        // The key's modify index (0: absent), or one off it.
        2 => prop::sample::select(vec!["{index}", "{index+1}"]).prop_map(str::to_string),
        1 => (0..12u64).prop_map(|n| n.to_string()),
        1 => prop::sample::select(vec![
            "", "0", "007", "+3", "-1", "1.0", "abc", "18446744073709551615", "18446744073709551616", "%31", "%zz",
            "1%00", "true", "false",
        ]).prop_map(str::to_string),
    ];
    (name, proptest::option::of(value)).prop_map(|(n, v)| match v {
        Some(v) => format!("{n}={v}"),
        None => n.to_string(),
    })
}

fn query() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => prop::collection::vec(query_param(), 0..3).prop_map(|p| p.join("&")),
        1 => "[ -~]{0,10}".prop_map(|q| q.replace('#', "")),
    ]
}

#[derive(Debug, Clone)]
enum KvOp {
    Put { value: Vec<u8> },
    Delete,
}

#[derive(Debug, Clone)]
struct KvCase {
    key: Vec<u8>,
    /// Percent-encode `/` too (else it is sent as is, as clients usually do).
    encode_slash: bool,
    op: KvOp,
    /// Query of the write.
    query: String,
    /// `?index=` of a blocking read (with a wait of zero).
    index: String,
}

fn kv_case() -> impl Strategy<Value = KvCase> {
    let op = prop_oneof![
        3 => prop::collection::vec(any::<u8>(), 0..16).prop_map(|value| KvOp::Put { value }),
        1 => Just(KvOp::Delete),
    ];
    let index = prop_oneof![
        (0..40u64).prop_map(|n| n.to_string()),
        prop::sample::select(vec!["", "-1", "x", "18446744073709551615", "99999999999999999999"])
            .prop_map(str::to_string),
    ];
    (key_bytes(), any::<bool>(), op, query(), index).prop_map(|(key, encode_slash, op, query, index)| KvCase {
        key,
        encode_slash,
        op,
        query,
        index,
    })
}

fn encode_key(key: &[u8], encode_slash: bool) -> String {
    let mut out = String::new();
    for &b in key {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (b == b'/' && !encode_slash) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

struct KvHarness {
    app: Router,
    /// What the store should hold: key -> (value, modify index).
    model: BTreeMap<String, (Vec<u8>, u64)>,
}

struct Answer {
    status: StatusCode,
    index: Option<u64>,
    body: Vec<u8>,
}

impl KvHarness {
    async fn send(&mut self, method: Method, uri: &str, body: Vec<u8>) -> Result<Answer, TestCaseError> {
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .header("authorization", format!("Bearer {TOKEN}"))
            .body(Body::from(body))
            .map_err(|e| TestCaseError::fail(format!("{uri}: {e}")))?;
        req.extensions_mut()
            .insert(ConnectInfo(SocketAddr::from(([127, 0, 0, 1], 40000))));
        let resp = self.app.call(req).await.expect("infallible");
        let status = resp.status();
        let index = resp
            .headers()
            .get(INDEX_HEADER)
            .and_then(|v| v.to_str().ok()?.parse().ok());
        let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(
            status != StatusCode::INTERNAL_SERVER_ERROR && status != StatusCode::SERVICE_UNAVAILABLE,
            "{uri}: {status} {:?}",
            String::from_utf8_lossy(&body)
        );
        Ok(Answer {
            status,
            index,
            body: body.to_vec(),
        })
    }

    async fn run(&mut self, case: KvCase) -> Result<(), TestCaseError> {
        let path = encode_key(&case.key, case.encode_slash);
        let key = String::from_utf8(case.key.clone()).ok();
        let valid = key.as_deref().is_some_and(|k| check_key(k).is_ok());
        if let Some(k) = &key {
            // check_key's rules, restated.
            let expected = !k.is_empty() && k.len() <= 512 && !k.starts_with('/') && !k.contains("//");
            prop_assert_eq!(valid, expected, "{:?}", k);
        }
        let current = key
            .as_deref()
            .and_then(|k| self.model.get(k))
            .map_or(0, |(_, index)| *index);
        let query = case
            .query
            .replace("{index}", &current.to_string())
            .replace("{index+1}", &(current + 1).to_string());
        // What axum makes of the query (the server's own parsing, so a 400 is predictable).
        let uri = format!("/v1/kv/{path}?{query}");
        let parsed = uri
            .parse::<Uri>()
            .ok()
            .map(|u| Query::<KvQuery>::try_from_uri(&u).map(|q| q.0));

        // The write.
        let (method, body) = match &case.op {
            KvOp::Put { value } => (Method::PUT, value.clone()),
            KvOp::Delete => (Method::DELETE, Vec::new()),
        };
        let Some(parsed) = parsed else {
            // Not a URI at all (`Request::builder` refuses it too): nothing reaches the server.
            prop_assert!(Request::builder().uri(&uri).body(()).is_err(), "{uri}");
            return Ok(());
        };
        let answer = self.send(method, &uri, body).await?;
        let Some(key) = key.filter(|_| valid) else {
            // Invalid UTF-8 (Path<String>) and check_key are 400s; an empty key matches no route.
            let expected: &[StatusCode] = if case.key.is_empty() {
                &[
                    StatusCode::NOT_FOUND,
                    StatusCode::BAD_REQUEST,
                    StatusCode::METHOD_NOT_ALLOWED,
                ]
            } else {
                &[StatusCode::BAD_REQUEST]
            };
            prop_assert!(expected.contains(&answer.status), "{uri}: {}", answer.status);
            return Ok(());
        };
        let q = match parsed {
            Ok(q) => q,
            Err(_) => {
                prop_assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{}", uri);
                return Ok(());
            }
        };
        prop_assert_eq!(
            answer.status,
            StatusCode::OK,
            "{}: {:?}",
            uri,
            String::from_utf8_lossy(&answer.body)
        );
        let revision = answer.index.ok_or_else(|| TestCaseError::fail("no index header"))?;
        let succeeded: bool = serde_json::from_slice(&answer.body).map_err(|e| TestCaseError::fail(e.to_string()))?;
        match &case.op {
            KvOp::Delete if q.recurse.is_some() => {
                prop_assert!(succeeded);
                self.model.retain(|k, _| !k.starts_with(&key));
            }
            op => {
                let expected = q.cas.is_none_or(|cas| cas == current);
                prop_assert_eq!(succeeded, expected, "{} with the key at index {}", uri, current);
                if succeeded {
                    match op {
                        KvOp::Put { value } => {
                            self.model.insert(key.clone(), (value.clone(), revision));
                        }
                        KvOp::Delete => {
                            self.model.remove(&key);
                        }
                    }
                }
            }
        }

        // Reads: raw, JSON, recursive, blocking.
        let raw = self
            .send(Method::GET, &format!("/v1/kv/{path}?raw"), Vec::new())
            .await?;
        match self.model.get(&key) {
            Some((value, index)) => {
                prop_assert_eq!(raw.status, StatusCode::OK);
                prop_assert_eq!(&raw.body, value);
                prop_assert_eq!(raw.index, Some(*index));
            }
            None => prop_assert_eq!(raw.status, StatusCode::NOT_FOUND),
        }
        for recurse in [false, true] {
            let uri = format!("/v1/kv/{path}{}", if recurse { "?recurse" } else { "" });
            let read = self.send(Method::GET, &uri, Vec::new()).await?;
            let expected: BTreeMap<&String, &(Vec<u8>, u64)> = self
                .model
                .iter()
                .filter(|(k, _)| if recurse { k.starts_with(&key) } else { **k == key })
                .collect();
            if expected.is_empty() {
                prop_assert_eq!(read.status, StatusCode::NOT_FOUND, "{}", uri);
                continue;
            }
            prop_assert_eq!(read.status, StatusCode::OK, "{}", uri);
            let entries: Vec<serde_json::Value> =
                serde_json::from_slice(&read.body).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(entries.len(), expected.len(), "{}", uri);
            for (entry, (k, (value, index))) in entries.iter().zip(&expected) {
                prop_assert_eq!(entry["Key"].as_str(), Some(k.as_str()));
                let encoded = base64::engine::general_purpose::STANDARD.encode(value);
                prop_assert_eq!(entry["Value"].as_str(), Some(encoded.as_str()));
                prop_assert_eq!(entry["ModifyIndex"].as_u64(), Some(*index));
            }
        }
        let uri = format!("/v1/kv/{path}?index={}&wait=0s", case.index);
        let blocking = self.send(Method::GET, &uri, Vec::new()).await?;
        let expected = if case.index.parse::<u64>().is_err() {
            StatusCode::BAD_REQUEST
        } else if self.model.contains_key(&key) {
            StatusCode::OK
        } else {
            StatusCode::NOT_FOUND
        };
        prop_assert_eq!(blocking.status, expected, "{}", uri);

        // A watch from an arbitrary index starts (or says why not) and is dropped at once.
        let uri = format!("/v1/watch/kv/{path}?index={}", case.index);
        let mut req = Request::get(&uri)
            .body(Body::empty())
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        req.extensions_mut()
            .insert(ConnectInfo(SocketAddr::from(([127, 0, 0, 1], 40000))));
        let watch = self.app.call(req).await.expect("infallible");
        let expected: &[StatusCode] = match case.index.parse::<u64>() {
            _ if case.key.is_empty() => &[StatusCode::NOT_FOUND, StatusCode::BAD_REQUEST],
            _ if key.is_empty() => &[StatusCode::BAD_REQUEST],
            Ok(_) => &[StatusCode::OK, StatusCode::GONE],
            Err(_) => &[StatusCode::BAD_REQUEST],
        };
        prop_assert!(expected.contains(&watch.status()), "{uri}: {}", watch.status());
        Ok(())
    }
}

#[test]
fn fuzz_kv_api() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // tmpfs when there is one: every write is an fsync.
    let dir = tempfile::Builder::new()
        .prefix("smesh-kv-fuzz")
        .tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .unwrap();
    let store = crate::store::embedded::EmbeddedStore::open(&dir.path().join("store.redb")).unwrap();
    let ca = runtime
        .block_on(crate::ca::Ca::load_or_create(store.as_ref(), "fuzz.test", None))
        .unwrap();
    let state = Arc::new(ApiState {
        store,
        token: TOKEN.into(),
        ca: Arc::new(arc_swap::ArcSwap::from_pointee(ca)),
        stats: Arc::new(crate::stats::Ring::new(1)),
    });
    let harness = std::cell::RefCell::new(KvHarness {
        app: routes(state),
        model: BTreeMap::new(),
    });
    let mut runner = TestRunner::new(config(1000));
    let result = runner.run(&kv_case(), |case| {
        let mut harness = harness.borrow_mut();
        runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), harness.run(case))
                .await
                .map_err(|_| TestCaseError::fail("a KV request hung"))?
        })
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}
