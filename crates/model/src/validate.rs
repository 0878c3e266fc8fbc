//! Checks that need more than the YAML shape: addresses, references between resources,
//! duplicates, regular expressions, ranges.

use crate::{ConfigError, ConfigErrors, HttpRoute, PathMatchType, Resource, Service, Source, Sourced, ValueMatchType};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;

const MAX_WEIGHT: u32 = 1_000_000;
const MAX_RETRY_ATTEMPTS: u32 = 10;

/// Validates a whole set of resources together; `Err` lists every problem.
pub fn validate(items: &[Sourced]) -> Result<(), ConfigErrors> {
    let mut errors = Vec::new();
    let mut seen: HashMap<(&str, &str), &Source> = HashMap::new();
    let services: HashSet<&str> = items
        .iter()
        .filter_map(|i| match &i.resource {
            Resource::Service(s) => Some(s.metadata.name.as_str()),
            _ => None,
        })
        .collect();
    let mut hostnames: HashMap<String, (&str, &Source)> = HashMap::new();
    let mut mesh_configs = 0;

    for item in items {
        let r = &item.resource;
        let mut check = Checker {
            source: &item.source,
            resource: r,
            errors: &mut errors,
        };
        check.name("metadata.name", r.name());
        if let Some(first) = seen.insert((r.kind(), r.name()), &item.source) {
            check.fail(
                "metadata.name",
                format!(
                    "duplicate {} name {:?}: already defined in {} document {}",
                    r.kind(),
                    r.name(),
                    first.file,
                    first.document
                ),
            );
        }
        match r {
            Resource::Service(s) => {
                check.service(s);
                for (i, host) in s.spec.hostnames.iter().enumerate() {
                    let owner = (s.metadata.name.as_str(), &item.source);
                    if let Some((other, _)) = hostnames.insert(host.to_ascii_lowercase(), owner) {
                        if other != s.metadata.name {
                            check.fail(
                                &format!("spec.hostnames[{i}]"),
                                format!("hostname {host:?} is already used by Service {other:?}"),
                            );
                        }
                    }
                }
            }
            Resource::HttpRoute(route) => {
                check.route(route, &services);
                crate::filters::validate_route_filters(route, &services, &mut |f, why| check.fail(f, why));
            }
            Resource::GrpcRoute(route) => {
                check.grpc_route(route, &services);
                crate::grpc::validate_grpc_rules(route, &services, &mut |f, why| check.fail(f, why));
            }
            Resource::MeshConfig(m) => {
                mesh_configs += 1;
                if mesh_configs > 1 {
                    check.fail("kind", "only one MeshConfig may exist");
                }
                check.mesh_config(m);
            }
            Resource::AuthorizationPolicy(p) => check.authorization(p, &services),
            Resource::BackendPolicy(p) => {
                crate::policy::validate_backend_policy(p, &services, &mut |f, why| check.fail(f, why))
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ConfigErrors(errors))
    }
}

struct Checker<'a> {
    source: &'a Source,
    resource: &'a Resource,
    errors: &'a mut Vec<ConfigError>,
}

impl Checker<'_> {
    fn fail(&mut self, field: &str, reason: impl Into<String>) {
        self.errors.push(self.source.error(Some(self.resource), field, reason));
    }

    fn name(&mut self, field: &str, name: &str) {
        let valid = !name.is_empty()
            && name.len() <= 63
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !name.starts_with('-')
            && !name.ends_with('-');
        if !valid {
            self.fail(
                field,
                format!("invalid name {name:?}: use 1-63 lowercase letters, digits and '-', starting and ending with a letter or digit"),
            );
        }
    }

    fn hostname(&mut self, field: &str, host: &str) {
        let valid = !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|label| {
                !label.is_empty() && label.len() <= 63 && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !valid {
            self.fail(field, format!("invalid hostname {host:?}"));
        }
    }

    fn weight(&mut self, field: &str, weight: Option<u32>, min: u32) {
        if let Some(w) = weight {
            if w < min || w > MAX_WEIGHT {
                self.fail(field, format!("weight {w} out of range {min}..={MAX_WEIGHT}"));
            }
        }
    }

    fn regex(&mut self, field: &str, pattern: &str) {
        if let Some(why) = regex_error(pattern) {
            self.fail(field, why);
        }
    }

    fn service(&mut self, s: &Service) {
        for (i, host) in s.spec.hostnames.iter().enumerate() {
            self.hostname(&format!("spec.hostnames[{i}]"), host);
        }
        let mut ports = HashSet::new();
        for (i, p) in s.spec.ports.iter().enumerate() {
            if p.port == 0 {
                self.fail(&format!("spec.ports[{i}].port"), "port must be 1-65535");
            } else if !ports.insert(p.port) {
                self.fail(&format!("spec.ports[{i}].port"), format!("duplicate port {}", p.port));
            }
        }
        let mut addresses = HashSet::new();
        for (i, e) in s.spec.endpoints.iter().enumerate() {
            let field = format!("spec.endpoints[{i}].address");
            match e.address.parse::<SocketAddr>() {
                Ok(addr) if addr.port() == 0 => self.fail(&field, format!("address {:?} has port 0", e.address)),
                Ok(addr) => {
                    if !addresses.insert(addr) {
                        self.fail(&field, format!("duplicate endpoint address {:?}", e.address));
                    }
                }
                Err(_) => self.fail(
                    &field,
                    format!(
                        "invalid address {:?}: expected IP:PORT such as 127.0.0.1:8080 or [::1]:8080",
                        e.address
                    ),
                ),
            }
            self.weight(&format!("spec.endpoints[{i}].weight"), e.weight, 1);
        }
    }

    fn route(&mut self, route: &HttpRoute, services: &HashSet<&str>) {
        let spec = &route.spec;
        self.parents_and_hostnames(&spec.parent_refs, &spec.hostnames, services);
        for (r, rule) in spec.rules.iter().enumerate() {
            let at = format!("spec.rules[{r}]");
            for (m, matcher) in rule.matches.iter().enumerate() {
                let at = format!("{at}.matches[{m}]");
                if let Some(path) = &matcher.path {
                    match path.kind {
                        PathMatchType::RegularExpression => self.regex(&format!("{at}.path.value"), &path.value),
                        _ if !path.value.starts_with('/') => self.fail(
                            &format!("{at}.path.value"),
                            format!("path {:?} must start with '/'", path.value),
                        ),
                        _ => {}
                    }
                }
                if let Some(method) = &matcher.method {
                    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
                        self.fail(
                            &format!("{at}.method"),
                            format!("invalid method {method:?}: expected e.g. GET or POST"),
                        );
                    }
                }
                self.value_matches(&at, "headers", &matcher.headers);
                self.value_matches(&at, "queryParams", &matcher.query_params);
                self.value_matches(&at, "cookies", &matcher.cookies);
            }
            self.backends(&at, &rule.backend_refs, services);
            self.timeouts(&at, rule.timeouts.as_ref());
            for (u, upgrade) in rule.upgrades.iter().enumerate() {
                let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~/".contains(&b);
                if upgrade.is_empty() || !upgrade.bytes().all(token) {
                    self.fail(
                        &format!("{at}.upgrades[{u}]"),
                        format!("{upgrade:?} is not an Upgrade protocol token (e.g. spdy/3.1)"),
                    );
                } else if upgrade.eq_ignore_ascii_case("h2c") {
                    self.fail(
                        &format!("{at}.upgrades[{u}]"),
                        "h2c cannot be tunnelled: its HTTP/2 requests would skip routes and policies \
                         (clients reach HTTP/2 upstreams through the proxy directly)"
                            .to_string(),
                    );
                }
            }
            if let Some(retry) = &rule.retry {
                self.retry(&at, retry.attempts, retry.per_try_timeout);
                for (c, code) in retry.codes.iter().enumerate() {
                    if !(400..=599).contains(code) {
                        self.fail(
                            &format!("{at}.retry.codes[{c}]"),
                            format!("status {code} is not a 4xx or 5xx"),
                        );
                    }
                }
            }
        }
    }

    /// What GRPCRoute rules share with HTTPRoute rules; the rest is in `crate::grpc`.
    fn grpc_route(&mut self, route: &crate::GrpcRoute, services: &HashSet<&str>) {
        let spec = &route.spec;
        self.parents_and_hostnames(&spec.parent_refs, &spec.hostnames, services);
        for (r, rule) in spec.rules.iter().enumerate() {
            let at = format!("spec.rules[{r}]");
            for (m, matcher) in rule.matches.iter().enumerate() {
                self.value_matches(&format!("{at}.matches[{m}]"), "headers", &matcher.headers);
            }
            self.backends(&at, &rule.backend_refs, services);
            self.timeouts(&at, rule.timeouts.as_ref());
            if let Some(retry) = &rule.retry {
                self.retry(&at, retry.attempts, retry.per_try_timeout);
            }
        }
    }

    fn parents_and_hostnames(&mut self, parents: &[crate::ParentRef], hostnames: &[String], services: &HashSet<&str>) {
        if parents.is_empty() {
            self.fail("spec.parentRefs", "at least one parent Service is required");
        }
        for (i, p) in parents.iter().enumerate() {
            if let Some(kind) = p.kind.as_deref().filter(|k| *k != "Service") {
                self.fail(
                    &format!("spec.parentRefs[{i}].kind"),
                    format!("unsupported parent kind {kind:?}, expected \"Service\""),
                );
            }
            if !services.contains(p.name.as_str()) {
                self.fail(
                    &format!("spec.parentRefs[{i}].name"),
                    format!("no Service named {:?}", p.name),
                );
            }
        }
        for (i, host) in hostnames.iter().enumerate() {
            self.hostname(&format!("spec.hostnames[{i}]"), host);
        }
    }

    /// `kind` is `headers`, `queryParams` or `cookies`, each a list under the match at `at`.
    fn value_matches(&mut self, at: &str, kind: &str, list: &[crate::ValueMatch]) {
        for (h, v) in list.iter().enumerate() {
            let at = format!("{at}.{kind}[{h}]");
            let bad_cookie_name = kind == "cookies"
                && v.name
                    .bytes()
                    .any(|b| !b.is_ascii_graphic() || b"()<>@,;:\\\"/[]?={}".contains(&b));
            if v.name.is_empty() || (kind == "headers" && http_header_name_invalid(&v.name)) || bad_cookie_name {
                self.fail(&format!("{at}.name"), format!("invalid name {:?}", v.name));
            }
            if v.kind == ValueMatchType::RegularExpression {
                self.regex(&format!("{at}.value"), &v.value);
            }
        }
    }

    fn backends(&mut self, at: &str, backends: &[crate::BackendRef], services: &HashSet<&str>) {
        let mut total_weight = 0u64;
        for (b, backend) in backends.iter().enumerate() {
            if !services.contains(backend.name.as_str()) {
                self.fail(
                    &format!("{at}.backendRefs[{b}].name"),
                    format!("no Service named {:?}", backend.name),
                );
            }
            self.weight(&format!("{at}.backendRefs[{b}].weight"), backend.weight, 0);
            total_weight += u64::from(backend.weight.unwrap_or(1));
        }
        if !backends.is_empty() && total_weight == 0 {
            self.fail(&format!("{at}.backendRefs"), "all backend weights are 0");
        }
    }

    fn timeouts(&mut self, at: &str, timeouts: Option<&crate::Timeouts>) {
        if let Some(t) = timeouts {
            for (name, d) in [("request", t.request), ("backendRequest", t.backend_request)] {
                if d.is_some_and(|d| d.is_zero()) {
                    self.fail(&format!("{at}.timeouts.{name}"), "timeout must be greater than 0");
                }
            }
        }
    }

    fn retry(&mut self, at: &str, attempts: Option<u32>, per_try_timeout: Option<std::time::Duration>) {
        if attempts.is_some_and(|a| a > MAX_RETRY_ATTEMPTS) {
            self.fail(
                &format!("{at}.retry.attempts"),
                format!("at most {MAX_RETRY_ATTEMPTS} retries"),
            );
        }
        if per_try_timeout.is_some_and(|d| d.is_zero()) {
            self.fail(&format!("{at}.retry.perTryTimeout"), "timeout must be greater than 0");
        }
    }
}

impl Checker<'_> {
    fn mesh_config(&mut self, m: &crate::MeshConfig) {
        if let Some(ttl) = m.spec.certificate_ttl {
            if ttl < crate::MeshConfigSpec::MIN_CERTIFICATE_TTL {
                self.fail("spec.certificateTtl", "certificate TTL must be at least 5s");
            }
        }
        for (field, why) in m.spec.tracing.iter().flat_map(|t| t.problems()) {
            self.fail(&format!("spec.tracing.{field}"), why);
        }
    }

    fn authorization(&mut self, p: &crate::AuthorizationPolicy, services: &HashSet<&str>) {
        if let Some(kind) = p.spec.target_ref.kind.as_deref().filter(|k| *k != "Service") {
            self.fail(
                "spec.targetRef.kind",
                format!("unsupported target kind {kind:?}, expected \"Service\""),
            );
        }
        if !services.contains(p.spec.target_ref.name.as_str()) {
            self.fail(
                "spec.targetRef.name",
                format!("no Service named {:?}", p.spec.target_ref.name),
            );
        }
        for (r, rule) in p.spec.rules.iter().enumerate() {
            for (i, from) in rule.from.iter().enumerate() {
                let at = format!("spec.rules[{r}].from[{i}]");
                match (&from.service, &from.identity) {
                    (Some(_), Some(_)) | (None, None) => self.fail(&at, "give exactly one of service or identity"),
                    (None, Some(id)) if !id.starts_with("spiffe://") => self.fail(
                        &format!("{at}.identity"),
                        format!("identity {id:?} must be a spiffe:// ID"),
                    ),
                    _ => {}
                }
            }
            for (i, to) in rule.to.iter().enumerate() {
                let at = format!("spec.rules[{r}].to[{i}]");
                for (m, method) in to.methods.iter().enumerate() {
                    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
                        self.fail(&format!("{at}.methods[{m}]"), format!("invalid method {method:?}"));
                    }
                }
                for (k, path) in to.paths.iter().enumerate() {
                    let star_inside = path.trim_end_matches('*').contains('*') || path.matches('*').count() > 1;
                    if !path.starts_with('/') || star_inside {
                        self.fail(
                            &format!("{at}.paths[{k}]"),
                            format!("path {path:?} must start with '/' and may only end in '*'"),
                        );
                    }
                }
                for (k, port) in to.ports.iter().enumerate() {
                    if *port == 0 {
                        self.fail(&format!("{at}.ports[{k}]"), "port must be 1-65535");
                    }
                }
            }
        }
    }
}

/// A resource or service name: what can appear in a Host, a store key and a SPIFFE ID.
pub fn validate_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "invalid name {name:?}: use 1-63 lowercase letters, digits and '-', starting and ending with a letter or digit"
        ))
    }
}

/// Why `pattern` cannot be a match's regular expression. The proxy matches whole values, as
/// `^(?:pattern)$` (a GRPCRoute's inside `/(?:service)/(?:method)`), so that form must compile
/// too: a pattern ending in a `#` comment of `(?x)` mode would comment out the rest, and the
/// match would never match.
pub(crate) fn regex_error(pattern: &str) -> Option<String> {
    if let Err(e) = regex::Regex::new(pattern) {
        return Some(format!("invalid regular expression {pattern:?}: {e}"));
    }
    regex::Regex::new(&format!("^(?:{pattern})$")).err().map(|_| {
        format!("invalid regular expression {pattern:?}: it must end outside a `#` comment (end the comment with a line break)")
    })
}

fn http_header_name_invalid(name: &str) -> bool {
    !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests {
    use crate::load;

    fn errors(text: &str) -> String {
        match load("mesh.yaml", text) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    }

    const SERVICE: &str = "apiVersion: smesh.io/v1\nkind: Service\nmetadata: {name: api}\nspec:\n  endpoints: [{address: 127.0.0.1:9001}]\n";

    #[test]
    fn accepts_a_service_and_route() {
        let text = format!(
            "{SERVICE}---\napiVersion: smesh.io/v1\nkind: HTTPRoute\nmetadata: {{name: r}}\nspec:\n  parentRefs: [{{name: api}}]\n  rules:\n  - matches: [{{path: {{type: PathPrefix, value: /v2}}}}]\n    retry: {{attempts: 2, codes: [503], perTryTimeout: 100ms}}\n"
        );
        let items = load("mesh.yaml", &text).expect("valid");
        assert_eq!(items.len(), 2);
        assert_eq!(items[1].source.document, 2);
    }

    #[test]
    fn names_file_document_field_and_reason() {
        let e = errors(&SERVICE.replace("127.0.0.1:9001", "nowhere"));
        assert!(
            e.starts_with(
                "mesh.yaml: document 1 (Service \"api\"): spec.endpoints[0].address: invalid address \"nowhere\""
            ),
            "{e}"
        );
        let e = errors(&SERVICE.replace("endpoints:", "endpionts:"));
        assert!(e.contains("spec") && e.contains("unknown field `endpionts`"), "{e}");
        let e = errors(&SERVICE.replace("metadata: {name: api}", "metadata: {}"));
        assert!(e.contains("metadata: missing field `name`"), "{e}");
        let e = errors("kind: Service\n: : :\n");
        assert!(e.contains("invalid YAML"), "{e}");
        let e = errors(&format!("{SERVICE}---\n{SERVICE}"));
        assert!(
            e.contains("document 2") && e.contains("duplicate Service name \"api\""),
            "{e}"
        );
        let e = errors(&SERVICE.replace("Service", "Servise"));
        assert!(e.contains("kind: unknown kind \"Servise\""), "{e}");
    }

    #[test]
    fn checks_security_resources() {
        let policy = "apiVersion: smesh.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  targetRef: {name: api}\n  rules:\n  - from: [{service: web}]\n    to: [{methods: [GET], paths: ['/api/*']}]\n";
        let mesh = "apiVersion: smesh.io/v1\nkind: MeshConfig\nmetadata: {name: mesh}\nspec: {mtls: strict, defaultPolicy: deny, certificateTtl: 10s}\n";
        assert_eq!(errors(&format!("{SERVICE}---\n{policy}---\n{mesh}")), "");
        let e = errors(&format!(
            "{SERVICE}---\n{}",
            policy
                .replace("'/api/*'", "'api*x'")
                .replace("service: web", "identity: web")
        ));
        assert!(
            e.contains("spec.rules[0].from[0].identity") && e.contains("spec.rules[0].to[0].paths[0]"),
            "{e}"
        );
        let e = errors(&format!("{mesh}---\n{}", mesh.replace("name: mesh", "name: other")));
        assert!(e.contains("only one MeshConfig"), "{e}");
        let e = errors(&mesh.replace("strict", "strikt"));
        assert!(e.contains("spec.mtls") && e.contains("unknown variant"), "{e}");
        let traced = |tracing: &str| errors(&mesh.replace("certificateTtl: 10s", &format!("tracing: {tracing}")));
        assert_eq!(
            traced("{collector: '127.0.0.1:4317', sampling: 0.5, slowThreshold: 200ms}"),
            ""
        );
        assert_eq!(traced("{collector: 'otel-collector.monitoring:4317'}"), "");
        let e = traced("{collector: 'http://c:4317', sampling: 2, slowThreshold: 0s}");
        assert!(
            e.contains("spec.tracing.collector: \"http://c:4317\" has a scheme"),
            "{e}"
        );
        assert!(
            e.contains("spec.tracing.sampling: 2 is not a share between 0 and 1"),
            "{e}"
        );
        assert!(e.contains("spec.tracing.slowThreshold: must be greater than 0"), "{e}");
        let e = traced("{collector: 'c'}");
        assert!(e.contains("spec.tracing.collector: \"c\" has no port"), "{e}");
        let e = traced("{collector: 'c:4317', rate: 1}");
        assert!(e.contains("spec.tracing") && e.contains("unknown field `rate`"), "{e}");
    }

    #[test]
    fn upgrades_are_tokens_and_never_h2c() {
        let e = errors(&format!("{SERVICE}---\napiVersion: smesh.io/v1\nkind: HTTPRoute\nmetadata: {{name: r}}\nspec:\n  parentRefs: [{{name: api}}]\n  rules: [{{upgrades: [spdy/3.1, H2C, 'a b']}}]\n"));
        assert!(e.contains("spec.rules[0].upgrades[1]: h2c cannot be tunnelled"), "{e}");
        assert!(e.contains("spec.rules[0].upgrades[2]"), "{e}");
        assert!(!e.contains("upgrades[0]"), "{e}");
    }

    #[test]
    fn checks_route_references() {
        let e = errors("apiVersion: smesh.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  parentRefs: [{name: nope}]\n  rules: [{matches: [{path: {type: RegularExpression, value: '('}}]}]\n");
        assert!(e.contains("spec.parentRefs[0].name: no Service named \"nope\""), "{e}");
        assert!(
            e.contains("spec.rules[0].matches[0].path.value: invalid regular expression"),
            "{e}"
        );
        let cookie = |name: &str, value: &str| {
            format!("{SERVICE}---\napiVersion: smesh.io/v1\nkind: HTTPRoute\nmetadata: {{name: r}}\nspec:\n  parentRefs: [{{name: api}}]\n  rules: [{{matches: [{{cookies: [{{name: '{name}', type: RegularExpression, value: '{value}'}}]}}]}}]\n")
        };
        assert_eq!(errors(&cookie("canary", "1|yes")), "");
        // Found by fuzzing: a trailing `(?x)` comment compiles alone, but comments out the
        // `)$` the proxy anchors it with, leaving a rule that never matches.
        let e = errors(&cookie("canary", "(?x)1|yes # on"));
        assert!(
            e.contains("spec.rules[0].matches[0].cookies[0].value: invalid regular expression")
                && e.contains("end the comment with a line break"),
            "{e}"
        );
        assert_eq!(crate::validate::regex_error("(?x)1|yes # on\n"), None);
        let e = errors(&cookie("can ary", "("));
        assert!(
            e.contains("spec.rules[0].matches[0].cookies[0].name: invalid name"),
            "{e}"
        );
        assert!(
            e.contains("spec.rules[0].matches[0].cookies[0].value: invalid regular expression"),
            "{e}"
        );
    }
}
