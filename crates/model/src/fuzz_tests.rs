//! Property-based fuzzing of resource parsing (`cargo test -p smesh-model fuzz`): arbitrary
//! YAML text, and arbitrary mutations of a valid multi-document file (of its text and of its
//! parsed tree), never panic, and either load or give errors that name the file, a document
//! that exists and a reason. What loads renders back (YAML for `/config`, JSON for the control
//! plane's store) to the same resources. Case counts keep the whole set to a few seconds.

use crate::{duration, load, parse, to_yaml, validate_name, ConfigErrors, Resource};
use proptest::prelude::*;
use proptest::test_runner::Config;
use serde_norway::{Mapping, Value};

/// Every kind, with most optional fields set (the README's examples, which must load).
const VALID: &str = r#"apiVersion: smesh.io/v1
kind: Service
metadata:
  name: api
  labels: {team: core}
spec:
  hostnames: [api.internal]
  ports:
  - port: 80
    protocol: http
  endpoints:
  - address: 127.0.0.1:9001
    weight: 1
    labels: {version: v1}
  - {address: "[::1]:9002", labels: {version: v2}}
  loadBalancer: ewma
---
apiVersion: smesh.io/v1
kind: Service
metadata: {name: api-shadow}
spec:
  endpoints: [{address: 127.0.0.1:9003, labels: {version: v2}}]
---
apiVersion: smesh.io/v1
kind: HTTPRoute
metadata:
  name: api-route
spec:
  parentRefs: [{name: api}]
  hostnames: [api.example.com]
  rules:
  - matches:
    - path: {type: PathPrefix, value: /v2}
      method: GET
      headers: [{name: x-canary, value: "1"}]
      queryParams: [{name: debug, value: "1"}]
      cookies: [{name: canary, value: "1"}]
    - path: {type: RegularExpression, value: "/items/[0-9]+"}
    backendRefs:
    - {name: api, subset: {version: v1}, weight: 90}
    - {name: api, subset: {version: v2}, weight: 10}
    timeouts: {request: 10s, backendRequest: 2s}
    retry: {attempts: 2, codes: [503], backoff: 25ms, perTryTimeout: 1s}
    priority: normal
  - matches: [{path: {type: PathPrefix, value: /old}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: x-env, value: prod}]
        add: [{name: x-tag, value: a}]
        remove: [x-debug]
    - type: URLRewrite
      urlRewrite:
        hostname: api.internal
        path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}
    - type: RequestMirror
      requestMirror: {backendRef: {name: api-shadow, subset: {version: v2}}, percent: 10}
    - type: FaultInjection
      faultInjection:
        delay: {fixedDelay: 100ms, percent: 20}
        abort: {httpStatus: 503, percent: 50}
    - type: RateLimit
      rateLimit: {requestsPerSecond: 100, burst: 20, key: route, maxKeys: 10000}
  - matches: [{path: {type: Exact, value: /legacy}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {scheme: https, hostname: new.example, port: 8443, statusCode: 301,
                        path: {type: ReplaceFullPath, replaceFullPath: /}}
---
apiVersion: smesh.io/v1
kind: GRPCRoute
metadata:
  name: echo-route
spec:
  parentRefs: [{name: api}]
  hostnames: [echo.example.com]
  rules:
  - matches:
    - method: {service: pkg.v1.Echo, method: Unary}
      headers: [{name: x-canary, value: "yes"}]
    - method: {type: RegularExpression, service: "pkg\\..*"}
    backendRefs:
    - {name: api, subset: {version: v1}, weight: 90}
    - {name: api, subset: {version: v2}, weight: 10}
    filters:
    - type: FaultInjection
      faultInjection:
        abort: {grpcStatus: UNAVAILABLE, percent: 5}
    timeouts: {request: 2s, backendRequest: 500ms}
    retry: {attempts: 2, codes: [UNAVAILABLE], backoff: 25ms, perTryTimeout: 1s}
    priority: critical
---
apiVersion: smesh.io/v1
kind: BackendPolicy
metadata: {name: api-policy}
spec:
  targetRef: {name: api}
  circuitBreaker: {maxRequests: 100, maxConnections: 100, maxPendingRequests: 0, maxRetries: 3}
  outlierDetection:
    consecutive5xx: 5
    consecutiveGatewayErrors: 3
    baseEjectionTime: 30s
    interval: 10s
    maxEjectionPercent: 10
  retryBudget: {ratio: 0.2, minRetriesPerSecond: 10, ttl: 10s}
  healthCheck:
    http: {path: /healthz, expectedStatuses: [200]}
    interval: 1s
    timeout: 500ms
    unhealthyThreshold: 2
    healthyThreshold: 1
  rateLimit: {requestsPerSecond: 100, burst: 10, scope: mesh}
  adaptiveConcurrency:
    initialLimit: 20
    minLimit: 1
    maxLimit: 1000
    tolerance: 1.5
    sampleWindow: 100ms
    baselineInterval: 30s
---
apiVersion: smesh.io/v1
kind: MeshConfig
metadata: {name: mesh}
spec: {mtls: strict, defaultPolicy: allow, certificateTtl: 24h}
---
apiVersion: smesh.io/v1
kind: AuthorizationPolicy
metadata: {name: web-reads-api}
spec:
  targetRef: {name: api}
  action: Allow
  rules:
  - from: [{service: web}, {identity: "spiffe://example.org/service/web"}]
    to:
    - methods: [GET]
      paths: ["/api/*"]
      ports: [8080]
"#;

const FILE: &str = "fuzz.yaml";

/// A bounded run; failures are reported (with the shrunk input), not written to files.
fn config(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

/// Bits of YAML that arbitrary text is made of: structure, anchors, tags, block scalars, the
/// field names and values the resources use, and odd characters.
const TOKENS: &[&str] = &[
    "---\n",
    "...\n",
    "\n",
    "  ",
    "    ",
    "- ",
    ": ",
    ":",
    ",",
    "{",
    "}",
    "[",
    "]",
    "? ",
    "&a ",
    "*a",
    "<<: *a\n",
    "!!str ",
    "!!int ",
    "!!binary ",
    "!tag ",
    "|\n",
    ">-\n",
    "'",
    "\"",
    "\\",
    "#",
    "%YAML 1.2\n",
    "%TAG ! x\n",
    "~",
    "null",
    "true",
    "no",
    "0x1F",
    "-1",
    "1e400",
    "4294967296",
    "18446744073709551616",
    "1.5",
    ".nan",
    ".inf",
    "apiVersion: smesh.io/v1\n",
    "kind: ",
    "Service",
    "HTTPRoute",
    "GRPCRoute",
    "MeshConfig",
    "BackendPolicy",
    "AuthorizationPolicy",
    "metadata:",
    "metadata: {name: a}\n",
    "name: ",
    "api",
    "spec:",
    "spec: {}\n",
    "endpoints: ",
    "address: ",
    "127.0.0.1:80",
    "[::1]:80",
    "parentRefs: [{name: api}]\n",
    "rules:",
    "matches:",
    "path: ",
    "type: ",
    "RegularExpression",
    "value: ",
    "(",
    "a{99999}",
    "weight: ",
    "timeouts: ",
    "request: ",
    "10s",
    "99999999999999999h",
    "-5ms",
    "\t",
    "\r\n",
    "\u{feff}",
    "\u{1F600}",
    "é",
    "\0",
];

fn yaml_text() -> impl Strategy<Value = String> {
    prop_oneof![
        // Token soup: structured enough to reach the resource parsing.
        prop::collection::vec(prop::sample::select(TOKENS), 0..60).prop_map(|t| t.concat()),
        // Any characters at all.
        any::<String>(),
    ]
}

/// Checks what `parse`/`load` return for `text`: errors name this file, a document that
/// exists (1-based) and a reason; resources come in document order.
fn check_outcome(text: &str, outcome: &Result<Vec<crate::Sourced>, ConfigErrors>) -> Result<(), TestCaseError> {
    // A document starts at most once per `---` (or after a `...`), plus the first.
    let documents = text.matches("---").count() + text.matches("...").count() + 1;
    match outcome {
        Ok(items) => {
            for pair in items.windows(2) {
                prop_assert!(pair[0].source.document < pair[1].source.document);
            }
            for item in items {
                prop_assert!((1..=documents).contains(&item.source.document));
                prop_assert_eq!(&*item.source.file, FILE);
            }
        }
        Err(errors) => {
            prop_assert!(!errors.0.is_empty(), "an Err without errors");
            for e in &errors.0 {
                prop_assert_eq!(&e.file, FILE);
                // A syntax error right after a complete top-level scalar or flow collection
                // (`{}x`) is where YAML requires the next document to start: it names that one.
                let last = documents + usize::from(e.reason.starts_with("invalid YAML"));
                prop_assert!(
                    (1..=last).contains(&e.document),
                    "document {} of at most {last}: {e}",
                    e.document
                );
                prop_assert!(!e.reason.trim().is_empty(), "no reason: {e:?}");
                let shown = e.to_string();
                let document_prefix = format!("{FILE}: document {}", e.document);
                prop_assert!(shown.starts_with(&document_prefix), "{shown}");
                if !e.field.is_empty() {
                    let field_part = format!(": {}: ", e.field);
                    prop_assert!(shown.contains(&field_part), "{shown}");
                }
            }
        }
    }
    Ok(())
}

/// What loads renders back to the same resources: as YAML (`/config`, `smesh get -o yaml`)
/// and as the JSON the control plane stores and reads back with `parse`.
fn check_round_trips(items: &[crate::Sourced]) -> Result<(), TestCaseError> {
    let resources: Vec<&Resource> = items.iter().map(|i| &i.resource).collect();
    let yaml = to_yaml(resources.iter().copied());
    let back = parse("rendered.yaml", &yaml).map_err(|e| TestCaseError::fail(format!("{e}\n{yaml}")))?;
    let back: Vec<&Resource> = back.iter().map(|i| &i.resource).collect();
    prop_assert_eq!(&back, &resources, "YAML round trip:\n{}", yaml);
    for r in &resources {
        let json = serde_json::to_string(r).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let back = parse("stored", &json).map_err(|e| TestCaseError::fail(format!("{e}\n{json}")))?;
        prop_assert_eq!(back.len(), 1);
        prop_assert_eq!(&back[0].resource, *r, "JSON round trip: {}", json);
    }
    Ok(())
}

fn valid_documents() -> Vec<Value> {
    VALID
        .split("---\n")
        .map(|d| serde_norway::from_str::<Value>(d).expect("the corpus is YAML"))
        .collect()
}

fn render(documents: &[Value]) -> String {
    documents
        .iter()
        .map(|d| serde_norway::to_string(d).expect("a Value renders"))
        .collect::<Vec<_>>()
        .join("---\n")
}

fn odd_number() -> impl Strategy<Value = serde_norway::Number> {
    prop_oneof![
        1 => any::<i64>().prop_map(serde_norway::Number::from),
        1 => any::<u64>().prop_map(serde_norway::Number::from),
        3 => prop::sample::select(vec![0u64, 1, 2, 10, 63, 64, 100, 101, 599, 65535, 65536, 1_000_000, 1_000_001, 1 << 32])
            .prop_map(serde_norway::Number::from),
        2 => prop::sample::select(vec![0.0, -0.0, 0.5, 0.999, -1.0, 100.0, 101.0, 1e308, f64::NAN, f64::INFINITY, f64::MIN])
            .prop_map(serde_norway::Number::from),
    ]
}

fn odd_string() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec![
            "", " ", "-", "a", "API", "api", "api-shadow", "nope", "x-canary", "/", "//", "/a/../b", "*", "/api/*",
            "api*x", "(", "a{99999}", ".*", "[", "\\", "127.0.0.1:0", "127.0.0.1:99999", "::", "[::1]:80",
            "localhost:80", "0s", "1ns", "-1s", "1.5s", "99999999999999999999s", "584942417355y", "1000000000y",
            "10 parsecs", "UNAVAILABLE", "17", "Exact", "PathPrefix", "RegularExpression", "https", "ftp",
            "spiffe://", "spiffe://example.org/service/", "yes", "~", "null", "\u{e9}", "\u{1F600}", "\0", "a\nb",
            "{a: b}", "ReplaceFullPath", "ReplacePrefixMatch", "URLRewrite", "RequestRedirect", "RateLimit",
            "source", "mesh", "local", "deny", "permissive", "Deny", "round_robin", "tcp", "grpc", "GET", "get",
        ])
        .prop_map(str::to_string),
        1 => "[ -~]{0,12}",
    ]
}

/// Scalars and shapes that stress the typed fields: wrong types, extremes, odd strings.
fn odd_value() -> impl Strategy<Value = Value> {
    let scalar = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        odd_number().prop_map(Value::Number),
        odd_string().prop_map(Value::String),
    ];
    scalar.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Sequence),
            prop::collection::vec(("[a-zA-Z]{1,8}", inner), 0..3).prop_map(|pairs| {
                Value::Mapping(
                    pairs
                        .into_iter()
                        .map(|(k, v)| (Value::String(k), v))
                        .collect::<Mapping>(),
                )
            }),
        ]
    })
}

#[derive(Debug, Clone)]
enum TreeEdit {
    /// Keep the node's type, change its value: reaches validation rather than typing.
    Tweak(String, serde_norway::Number),
    /// Replace the node with another value.
    Replace(Value),
    /// Remove a key of a mapping (or an element of a sequence).
    Remove(usize),
    /// Add a key to a mapping (or an element to a sequence).
    Insert(String, Value),
    /// Repeat an element of a sequence.
    Duplicate(usize),
}

fn tree_edit() -> impl Strategy<Value = TreeEdit> {
    let key = prop::sample::select(vec![
        "name",
        "value",
        "type",
        "kind",
        "spec",
        "weight",
        "port",
        "address",
        "path",
        "rules",
        "matches",
        "filters",
        "unknown",
        "apiVersion",
        "metadata",
        "percent",
        "codes",
        "request",
        "labels",
    ]);
    prop_oneof![
        4 => (odd_string(), odd_number()).prop_map(|(s, n)| TreeEdit::Tweak(s, n)),
        2 => odd_value().prop_map(TreeEdit::Replace),
        1 => any::<usize>().prop_map(TreeEdit::Remove),
        1 => (key, odd_value()).prop_map(|(k, v)| TreeEdit::Insert(k.to_string(), v)),
        1 => any::<usize>().prop_map(TreeEdit::Duplicate),
    ]
}

fn count_nodes(v: &Value) -> usize {
    1 + match v {
        Value::Sequence(s) => s.iter().map(count_nodes).sum(),
        Value::Mapping(m) => m.values().map(count_nodes).sum(),
        Value::Tagged(t) => count_nodes(&t.value),
        _ => 0,
    }
}

/// Applies `edit` to the `n`th node in pre-order; returns false when `n` is past the end.
fn edit_nth(v: &mut Value, n: &mut usize, edit: &TreeEdit) -> bool {
    if *n == 0 {
        match (edit, &mut *v) {
            (TreeEdit::Tweak(new, _), Value::String(s)) => *s = new.clone(),
            (TreeEdit::Tweak(_, new), Value::Number(n)) => *n = new.clone(),
            (TreeEdit::Tweak(..), Value::Bool(b)) => *b = !*b,
            (TreeEdit::Tweak(new, _), node) => *node = Value::String(new.clone()),
            (TreeEdit::Replace(new), node) => *node = new.clone(),
            (TreeEdit::Remove(i), Value::Mapping(m)) if !m.is_empty() => {
                let key = m.keys().nth(i % m.len()).cloned();
                if let Some(key) = key {
                    m.remove(&key);
                }
            }
            (TreeEdit::Remove(i), Value::Sequence(s)) if !s.is_empty() => {
                s.remove(i % s.len());
            }
            (TreeEdit::Insert(k, new), Value::Mapping(m)) => {
                m.insert(Value::String(k.clone()), new.clone());
            }
            (TreeEdit::Insert(_, new), Value::Sequence(s)) => s.push(new.clone()),
            (TreeEdit::Duplicate(i), Value::Sequence(s)) if !s.is_empty() => {
                let copy = s[i % s.len()].clone();
                s.push(copy);
            }
            (_, node) => *node = Value::Null,
        }
        return true;
    }
    *n -= 1;
    match v {
        Value::Sequence(s) => s.iter_mut().any(|c| edit_nth(c, n, edit)),
        Value::Mapping(m) => m.values_mut().any(|c| edit_nth(c, n, edit)),
        Value::Tagged(t) => edit_nth(&mut t.value, n, edit),
        _ => false,
    }
}

#[derive(Debug, Clone)]
enum TextEdit {
    Delete { at: usize, len: usize },
    Insert { at: usize, text: String },
    SwapLines(usize, usize),
    DuplicateLine(usize),
    Indent { line: usize, by: usize },
    Dedent(usize),
}

fn text_edit() -> impl Strategy<Value = TextEdit> {
    prop_oneof![
        (any::<usize>(), 1..20usize).prop_map(|(at, len)| TextEdit::Delete { at, len }),
        (any::<usize>(), prop::sample::select(TOKENS)).prop_map(|(at, t)| TextEdit::Insert {
            at,
            text: t.to_string()
        }),
        (any::<usize>(), any::<String>()).prop_map(|(at, text)| TextEdit::Insert { at, text }),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| TextEdit::SwapLines(a, b)),
        any::<usize>().prop_map(TextEdit::DuplicateLine),
        (any::<usize>(), 1..5usize).prop_map(|(line, by)| TextEdit::Indent { line, by }),
        any::<usize>().prop_map(TextEdit::Dedent),
    ]
}

fn floor_char_boundary(s: &str, mut at: usize) -> usize {
    at = at.min(s.len());
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    at
}

fn apply_text_edit(text: &mut String, edit: &TextEdit) {
    match edit {
        TextEdit::Delete { at, len } => {
            let start = floor_char_boundary(text, at % (text.len() + 1));
            let end = floor_char_boundary(text, start + len);
            text.replace_range(start..end, "");
        }
        TextEdit::Insert { at, text: new } => {
            let at = floor_char_boundary(text, at % (text.len() + 1));
            text.insert_str(at, new);
        }
        TextEdit::SwapLines(..) | TextEdit::DuplicateLine(_) | TextEdit::Indent { .. } | TextEdit::Dedent(_) => {
            let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
            if lines.is_empty() {
                return;
            }
            let n = lines.len();
            match edit {
                TextEdit::SwapLines(a, b) => lines.swap(a % n, b % n),
                TextEdit::DuplicateLine(i) => {
                    let copy = lines[i % n].clone();
                    lines.insert(i % n, copy);
                }
                TextEdit::Indent { line, by } => lines[line % n].insert_str(0, &" ".repeat(*by)),
                TextEdit::Dedent(i) => {
                    let line = &mut lines[i % n];
                    if line.starts_with(' ') {
                        line.remove(0);
                    }
                }
                _ => {}
            }
            *text = lines.join("\n") + "\n";
        }
    }
}

#[test]
fn the_corpus_is_valid_and_round_trips() {
    let items = load(FILE, VALID).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(items.len(), 7);
    assert_eq!(valid_documents().len(), 7);
    check_round_trips(&items).unwrap();
    let rendered = render(&valid_documents());
    assert_eq!(load(FILE, &rendered).map(|i| i.len()), Ok(7));
}

proptest! {
    #![proptest_config(config(1500))]

    /// Arbitrary text never panics; errors name the file, an existing document and a reason.
    #[test]
    fn fuzz_arbitrary_yaml_text(text in yaml_text()) {
        let parsed = parse(FILE, &text);
        check_outcome(&text, &parsed)?;
        let loaded = load(FILE, &text);
        check_outcome(&text, &loaded)?;
        if let Ok(items) = loaded {
            check_round_trips(&items)?;
        }
    }
}

proptest! {
    // Each case loads the whole seven-document file (regular expressions compiled, in a debug
    // build): about 2.5 ms for a text edit, 10 ms for a tree edit with its round trips.
    #![proptest_config(config(600))]

    /// Text edits of a valid file (cut, pasted, re-indented, reordered) never panic.
    #[test]
    fn fuzz_text_mutations_of_a_valid_file(edits in prop::collection::vec(text_edit(), 1..4)) {
        let mut text = VALID.to_string();
        for edit in &edits {
            apply_text_edit(&mut text, edit);
        }
        let loaded = load(FILE, &text);
        check_outcome(&text, &loaded)?;
        if let Ok(items) = loaded {
            check_round_trips(&items)?;
        }
    }
}

proptest! {
    #![proptest_config(config(300))]

    /// Tree edits (wrong types, extreme numbers, odd strings, missing and unknown fields) of a
    /// valid file: every error names its document and, for a typed field, the field path.
    #[test]
    fn fuzz_tree_mutations_of_a_valid_file(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<prop::sample::Index>(), tree_edit()), 1..4)
    ) {
        let mut documents = valid_documents();
        for (doc, node, edit) in &edits {
            let d = doc.index(documents.len());
            let mut n = node.index(count_nodes(&documents[d]));
            edit_nth(&mut documents[d], &mut n, edit);
        }
        let text = render(&documents);
        let loaded = load(FILE, &text);
        check_outcome(&text, &loaded)?;
        match loaded {
            Ok(items) => check_round_trips(&items)?,
            Err(errors) => {
                for e in &errors.0 {
                    prop_assert!(e.document <= documents.len(), "{e}");
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(config(2000))]

    /// Names are checked, never panicking, and what passes is a DNS label.
    #[test]
    fn fuzz_names(name in prop_oneof!["[a-z0-9-]{0,70}", any::<String>()]) {
        if validate_name(&name).is_ok() {
            prop_assert!((1..=63).contains(&name.len()));
            prop_assert!(!name.starts_with('-') && !name.ends_with('-'));
        }
    }

    /// Durations: any text parses or fails without panicking, and whatever parses is
    /// rendered (by `to_yaml`) to text that parses back to the same duration.
    #[test]
    fn fuzz_durations(text in prop_oneof![
        any::<String>(),
        "[0-9]{1,22}(ns|us|ms|s|m|h|d|w|M|y|min|sec|hours|days)( ?[0-9]{1,3}(ms|s|m|h))?",
        (any::<u64>(), prop::sample::select(vec!["ns", "s", "m", "h", "d", "w", "y"])).prop_map(|(n, unit)| format!("{n}{unit}")),
    ]) {
        if let Ok(d) = duration::parse(&text) {
            // Usable as a deadline or an expiry (see duration::MAX).
            prop_assert!(std::time::Instant::now().checked_add(d).is_some(), "{:?}", text);
            prop_assert!(std::time::SystemTime::now().checked_add(d).is_some(), "{:?}", text);
            let shown = duration::format(d);
            prop_assert_eq!(duration::parse(&shown), Ok(d), "{:?} -> {:?}", text, shown);
        }
    }

    #[test]
    fn fuzz_duration_round_trip(secs in 0..=duration::MAX.as_secs(), nanos in 0..1_000_000_000u32) {
        let d = std::time::Duration::new(secs, nanos).min(duration::MAX);
        let shown = duration::format(d);
        prop_assert_eq!(duration::parse(&shown), Ok(d), "{}", shown);
    }
}
