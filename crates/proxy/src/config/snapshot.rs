//! A configuration snapshot: resources compiled into the tables the request path reads.
//! Built off the request path, then swapped in atomically; never mutated afterwards.

use crate::balance::{Balancer, Endpoint, EndpointStats};
use crate::config::rule_compile::RuleContext;
use crate::filter::{Filter, Filters};
use crate::resilience::policy::ServicePolicy;
use crate::route::rule::{RetryPolicy, RouteMatch, Rule, WeightedBackend};
use crate::telemetry::metrics::Metrics;
use crate::trace::Tracer;
use rustc_hash::FxHashMap;
use smesh_model::{GrpcRoute, HttpRoute, MtlsMode, Protocol, Resource, Service, Sourced};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

pub struct Snapshot {
    pub generation: u64,
    /// From the MeshConfig, if any.
    pub mtls: MtlsMode,
    pub authz: crate::config::authz::AuthzTable,
    /// The resources this snapshot was built from, for `/config`.
    pub resources: Vec<Resource>,
    services: Vec<ServiceTable>,
    by_name: FxHashMap<String, usize>,
    /// Host names are configuration, not request data: FxHash is safe and cheap here.
    by_host: FxHashMap<String, usize>,
    /// BackendPolicies by target Service (state carried over by the next build).
    policies: FxHashMap<String, Arc<ServicePolicy>>,
    /// RateLimit filters' buckets by "service/route/rule/filter" (kept by the next build
    /// when the filter is unchanged).
    pub(super) limiters: FxHashMap<String, Arc<crate::resilience::ratelimit::RateLimiter>>,
    /// The Service this proxy fronts (`--service` with `--inbound`/`--app`); carried from
    /// snapshot to snapshot.
    local_service: Option<Arc<str>>,
    /// This proxy's share of its Service's BackendPolicy `rateLimit`, checked on inbound
    /// requests (kept by the next build when the share is unchanged).
    pub inbound_limit: Option<Arc<crate::resilience::ratelimit::RateLimits>>,
    /// What this proxy's spans are named by (`service.name`): its workload's Service;
    /// carried from snapshot to snapshot.
    pub workload: Option<Arc<str>>,
    /// The MeshConfig's tracing, running (kept by the next build when unchanged).
    tracer: Option<Arc<Tracer>>,
    /// The filters this configuration installs on every request: the tracer, if any.
    pub filters: Option<Filters>,
}

/// Everything needed to route a request addressed to one Service.
pub struct ServiceTable {
    pub name: Arc<str>,
    ports: Vec<(u16, Option<Protocol>)>,
    /// All endpoints, for TCP and CONNECT.
    pub balancer: Arc<Balancer>,
    /// HTTPRoute matches in Gateway API precedence order, each pointing at its rule.
    matches: Vec<(RouteMatch, Arc<Rule>)>,
    /// GRPCRoute matches in GRPCRoute precedence order: tried first, for gRPC requests only.
    grpc_matches: Vec<(RouteMatch, Arc<Rule>)>,
}

impl ServiceTable {
    /// The protocol to speak to this service's endpoints: that of the addressed port if it
    /// says, else of the first port that says, else `None` (follow the client).
    pub fn protocol(&self, port: Option<u16>) -> Option<Protocol> {
        port.and_then(|p| self.ports.iter().find(|(q, _)| *q == p).and_then(|(_, proto)| *proto))
            .or_else(|| self.ports.iter().find_map(|(_, proto)| *proto))
    }

    /// The rule for a request: a gRPC request (`content-type: application/grpc...`) goes by
    /// the GRPCRoutes first, then like any request by the HTTPRoutes.
    pub fn route<B>(&self, req: &http::Request<B>) -> Option<&Arc<Rule>> {
        if !self.grpc_matches.is_empty() && crate::http::headers::is_grpc(req) {
            if let Some((_, rule)) = self.grpc_matches.iter().find(|(m, _)| m.matches(req)) {
                return Some(rule);
            }
        }
        self.matches.iter().find(|(m, _)| m.matches(req)).map(|(_, rule)| rule)
    }
}

impl Snapshot {
    pub fn empty() -> Self {
        Self::serving(None)
    }

    /// An empty snapshot for a proxy in front of `local_service`'s app: this and every
    /// snapshot built after it enforce that Service's BackendPolicy `rateLimit` inbound.
    pub fn serving(local_service: Option<&str>) -> Self {
        Snapshot {
            generation: 0,
            mtls: MtlsMode::default(),
            authz: Default::default(),
            resources: Vec::new(),
            services: Vec::new(),
            by_name: FxHashMap::default(),
            by_host: FxHashMap::default(),
            policies: FxHashMap::default(),
            limiters: FxHashMap::default(),
            local_service: local_service.map(Arc::from),
            inbound_limit: None,
            workload: None,
            tracer: None,
            filters: None,
        }
    }

    /// Every endpoint of every Service whose BackendPolicy has a `healthCheck`.
    pub fn health_targets(&self) -> Vec<crate::balance::health::Target> {
        let mut out = Vec::new();
        for (name, policy) in &self.policies {
            let (Some(spec), Some(table)) = (&policy.spec.health_check, self.service(name)) else {
                continue;
            };
            for e in table.balancer.endpoints() {
                out.push(crate::balance::health::Target {
                    service: table.name.clone(),
                    endpoint: e.clone(),
                    spec: (**spec).clone(),
                    protocol: table.protocol(None),
                });
            }
        }
        out
    }

    pub fn service(&self, name: &str) -> Option<&ServiceTable> {
        self.by_name.get(name).map(|&i| &self.services[i])
    }

    /// Finds the service a `Host` / `:authority` value addresses.
    pub fn service_for_host(&self, authority: &str) -> Option<&ServiceTable> {
        let host = authority.trim_end_matches('.');
        let found = self.by_host.get(host).or_else(|| {
            let (bare, _port) = host.rsplit_once(':')?;
            self.by_host.get(bare)
        });
        if let Some(&i) = found {
            return Some(&self.services[i]);
        }
        // Hosts are case-insensitive; only pay for lowercasing when the fast path missed.
        let lower = host.to_ascii_lowercase();
        if lower != host {
            return self.service_for_host(&lower);
        }
        None
    }

    /// Compiles validated resources. Endpoint statistics are carried over from `previous`
    /// for addresses present in both.
    pub fn build(items: &[Sourced], previous: &Snapshot, metrics: &Arc<Metrics>, direction: &str) -> Snapshot {
        let mut stats: HashMap<SocketAddr, Arc<EndpointStats>> = HashMap::new();
        for table in &previous.services {
            for e in table.balancer.endpoints() {
                stats.insert(e.addr, e.stats.clone());
            }
        }
        let services: Vec<&Service> = items
            .iter()
            .filter_map(|i| match &i.resource {
                Resource::Service(s) => Some(s),
                _ => None,
            })
            .collect();
        let routes: Vec<&HttpRoute> = items
            .iter()
            .filter_map(|i| match &i.resource {
                Resource::HttpRoute(r) => Some(r),
                _ => None,
            })
            .collect();
        let grpc_routes: Vec<&GrpcRoute> = items
            .iter()
            .filter_map(|i| match &i.resource {
                Resource::GrpcRoute(r) => Some(r),
                _ => None,
            })
            .collect();

        let endpoints: HashMap<&str, Vec<Arc<Endpoint>>> = services
            .iter()
            .map(|s| {
                let eps = s
                    .spec
                    .endpoints
                    .iter()
                    .filter_map(|e| {
                        let addr: SocketAddr = e.address.parse().ok()?;
                        Some(Arc::new(Endpoint {
                            addr,
                            weight: e.weight.unwrap_or(1),
                            labels: e.labels.clone(),
                            stats: stats.entry(addr).or_default().clone(),
                            server_name: e.identity.as_deref().and_then(crate::identity::server_name),
                        }))
                    })
                    .collect();
                (s.metadata.name.as_str(), eps)
            })
            .collect();
        let lb_of: HashMap<&str, &Service> = services.iter().map(|s| (s.metadata.name.as_str(), *s)).collect();
        let balancer_for = |service: &str, subset: &BTreeMap<String, String>| -> Arc<Balancer> {
            let eps = endpoints.get(service).cloned().unwrap_or_default();
            let eps = eps
                .into_iter()
                .filter(|e| subset.iter().all(|(k, v)| e.labels.get(k) == Some(v)))
                .collect();
            let algorithm = lb_of.get(service).map(|s| s.spec.load_balancer).unwrap_or_default();
            Arc::new(Balancer::new(eps, algorithm))
        };

        let protocol_of = |service: &str| -> Option<Protocol> {
            lb_of
                .get(service)
                .and_then(|s| s.spec.ports.iter().find_map(|p| p.protocol))
        };
        // BackendPolicies: if several target one Service, the first applies.
        let mut policies: FxHashMap<String, Arc<ServicePolicy>> = FxHashMap::default();
        for item in items {
            if let Resource::BackendPolicy(p) = &item.resource {
                let target = p.spec.target_ref.name.as_str();
                if !policies.contains_key(target) && lb_of.contains_key(target) {
                    let all = balancer_for(target, &BTreeMap::new());
                    let previous = previous.policies.get(target).map(|p| &**p);
                    let built = ServicePolicy::build(&p.spec, target, all, metrics, previous);
                    policies.insert(target.to_string(), Arc::new(built));
                }
            }
        }
        let inbound_limit = previous.local_service.as_deref().and_then(|local| {
            let spec = policies.get(local)?.spec.rate_limit.as_ref()?;
            let live = endpoints.get(local).map_or(0, Vec::len);
            Some(inbound_limit(spec, local, live, previous, metrics))
        });
        if let Some(local) = previous.local_service.as_deref() {
            let share = inbound_limit
                .as_ref()
                .map_or(0.0, |l| l.limiters[0].spec.requests_per_second);
            if inbound_limit.is_some() || previous.inbound_limit.is_some() {
                metrics
                    .resilience
                    .rate_limit_share
                    .with_label_values(&[local])
                    .set(share);
            }
        }
        let mut limiters: FxHashMap<String, Arc<crate::resilience::ratelimit::RateLimiter>> = FxHashMap::default();
        let mut tables = Vec::new();
        let mut by_name = FxHashMap::default();
        let mut by_host = FxHashMap::default();
        for (index, s) in services.iter().enumerate() {
            let name: Arc<str> = Arc::from(s.metadata.name.as_str());
            let balancer = balancer_for(&name, &BTreeMap::new());
            let own_protocol = protocol_of(&name);
            let mut matches = Vec::new();
            let mut grpc_matches = Vec::new();
            let cx = RuleContext {
                service: &name,
                balancer: &balancer,
                own_protocol,
                policies: &policies,
                balancer_for: &balancer_for,
                protocol_of: &protocol_of,
                metrics,
                previous,
            };
            for route in routes
                .iter()
                .filter(|r| r.spec.parent_refs.iter().any(|p| p.name == *name))
            {
                let route_metrics = Arc::new(metrics.route(direction, &name, &route.metadata.name));
                for (rule_index, rule) in route.spec.rules.iter().enumerate() {
                    let retry = rule.retry.as_ref().map(RetryPolicy::from);
                    let key = format!("{name}/{}/{rule_index}", route.metadata.name);
                    let compiled = cx.rule(rule, retry, &route.metadata.name, &key, &route_metrics, &mut limiters);
                    if rule.matches.is_empty() {
                        matches.push((RouteMatch::everything(), compiled));
                    } else {
                        for m in &rule.matches {
                            matches.push((RouteMatch::compile(m), compiled.clone()));
                        }
                    }
                }
                for host in &route.spec.hostnames {
                    by_host.entry(host.to_ascii_lowercase()).or_insert(index);
                }
            }
            for route in grpc_routes
                .iter()
                .filter(|r| r.spec.parent_refs.iter().any(|p| p.name == *name))
            {
                let route_metrics = Arc::new(metrics.route(direction, &name, &route.metadata.name));
                for (rule_index, rule) in route.spec.rules.iter().enumerate() {
                    // The same rule as an HTTPRoute's: method matches are path matches.
                    let lowered = rule.to_http();
                    let retry = rule.retry.as_ref().map(RetryPolicy::from);
                    let key = format!("{name}/GRPCRoute/{}/{rule_index}", route.metadata.name);
                    let compiled = cx.rule(
                        &lowered,
                        retry,
                        &route.metadata.name,
                        &key,
                        &route_metrics,
                        &mut limiters,
                    );
                    if rule.matches.is_empty() {
                        grpc_matches.push((RouteMatch::grpc_precedence(None), RouteMatch::everything(), compiled));
                    } else {
                        for (m, http) in rule.matches.iter().zip(&lowered.matches) {
                            let precedence = RouteMatch::grpc_precedence(Some(m));
                            grpc_matches.push((precedence, RouteMatch::compile(http), compiled.clone()));
                        }
                    }
                }
                for host in &route.spec.hostnames {
                    by_host.entry(host.to_ascii_lowercase()).or_insert(index);
                }
            }
            // Stable sort: equal precedence keeps file order.
            grpc_matches.sort_by_key(|(precedence, _, _)| *precedence);
            let grpc_matches: Vec<_> = grpc_matches.into_iter().map(|(_, m, rule)| (m, rule)).collect();
            if matches.is_empty() && grpc_matches.is_empty() {
                let rule = Rule::new(
                    "default",
                    vec![WeightedBackend {
                        weight: 1,
                        service: name.clone(),
                        balancer: balancer.clone(),
                        protocol: own_protocol,
                        policy: policies.get(&*name).cloned(),
                        subset: None,
                    }],
                    Default::default(),
                    None,
                    Arc::new(metrics.route(direction, &name, "default")),
                );
                matches.push((RouteMatch::everything(), Arc::new(rule)));
            }
            // Stable sort: equal precedence keeps file order.
            matches.sort_by_key(|(m, _)| m.precedence());

            by_host.insert(name.to_string(), index);
            for host in &s.spec.hostnames {
                by_host.insert(host.to_ascii_lowercase(), index);
            }
            for p in &s.spec.ports {
                by_host.insert(format!("{name}:{}", p.port), index);
                for host in &s.spec.hostnames {
                    by_host.insert(format!("{}:{}", host.to_ascii_lowercase(), p.port), index);
                }
            }
            by_name.insert(name.to_string(), index);
            tables.push(ServiceTable {
                name,
                ports: s.spec.ports.iter().map(|p| (p.port, p.protocol)).collect(),
                balancer,
                matches,
                grpc_matches,
            });
        }
        let mtls = items
            .iter()
            .find_map(|i| match &i.resource {
                Resource::MeshConfig(m) => Some(m.spec.mtls),
                _ => None,
            })
            .unwrap_or_default();
        let tracer = Self::tracer(items, previous, metrics);
        Snapshot {
            generation: previous.generation + 1,
            mtls,
            authz: crate::config::authz::AuthzTable::build(items),
            resources: items.iter().map(|i| i.resource.clone()).collect(),
            services: tables,
            by_name,
            by_host,
            policies,
            limiters,
            local_service: previous.local_service.clone(),
            inbound_limit,
            workload: previous.workload.clone(),
            filters: tracer.clone().map(|t| Arc::from([t as Arc<dyn Filter>])),
            tracer,
        }
    }

    /// The tracer the MeshConfig's `tracing` asks for: the previous one when unchanged, a
    /// new one (a new export thread; the old one ends when its last request is done) when
    /// changed, none without `tracing`.
    fn tracer(items: &[Sourced], previous: &Snapshot, metrics: &Arc<Metrics>) -> Option<Arc<Tracer>> {
        let spec = items.iter().find_map(|i| match &i.resource {
            Resource::MeshConfig(m) => m.spec.tracing.as_ref(),
            _ => None,
        })?;
        let service = previous.workload.as_deref().unwrap_or("smesh-proxy");
        if let Some(running) = previous.tracer.as_ref().filter(|t| t.is(spec, service)) {
            return Some(running.clone());
        }
        match Tracer::start(spec, service, metrics.clone()) {
            Ok(tracer) => {
                tracing::info!(collector = %spec.collector, sampling = spec.sampling(), "tracing on");
                Some(Arc::new(tracer))
            }
            Err(e) => {
                tracing::error!(error = %e, "tracing stays off");
                None
            }
        }
    }
}

/// This proxy's share of its own Service's `rateLimit` (the whole limit with `scope: local`,
/// divided by the Service's `live` endpoints with `scope: mesh`); the previous snapshot's
/// buckets when the share is unchanged.
fn inbound_limit(
    spec: &smesh_model::ServiceRateLimit,
    local: &str,
    live: usize,
    previous: &Snapshot,
    metrics: &Metrics,
) -> Arc<crate::resilience::ratelimit::RateLimits> {
    let share = spec.share(live);
    if let Some(same) = previous
        .inbound_limit
        .as_ref()
        .filter(|l| l.limiters.len() == 1 && l.limiters[0].spec == share)
    {
        return same.clone();
    }
    tracing::info!(
        service = local,
        endpoints = live,
        requests_per_second = share.requests_per_second,
        burst = share.burst,
        "inbound rate limit"
    );
    Arc::new(crate::resilience::ratelimit::RateLimits {
        limiters: vec![Arc::new(crate::resilience::ratelimit::RateLimiter::new(&share))],
        limited: metrics.resilience.rate_limited.with_label_values(&[local, "inbound"]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(endpoints: usize, limit: Option<&str>) -> Vec<Sourced> {
        let eps: Vec<String> = (0..endpoints)
            .map(|i| format!("{{address: 127.0.0.1:{}}}", 9001 + i))
            .collect();
        let mut text = format!(
            "apiVersion: smesh.io/v1\nkind: Service\nmetadata: {{name: api}}\nspec: {{endpoints: [{}]}}\n",
            eps.join(", ")
        );
        if let Some(limit) = limit {
            text.push_str(&format!("---\napiVersion: smesh.io/v1\nkind: BackendPolicy\nmetadata: {{name: p}}\nspec:\n  targetRef: {{name: api}}\n  rateLimit: {limit}\n"));
        }
        smesh_model::load("mesh.yaml", &text).expect("valid")
    }

    fn share(s: &Snapshot) -> Option<(f64, Option<u32>)> {
        s.inbound_limit.as_ref().map(|l| {
            let spec = &l.limiters[0].spec;
            (spec.requests_per_second, spec.burst)
        })
    }

    fn gauge(m: &Metrics) -> f64 {
        m.resilience.rate_limit_share.with_label_values(&["api"]).get()
    }

    #[test]
    fn the_mesh_config_turns_tracing_on_and_off_and_an_unchanged_reload_keeps_the_tracer() {
        let metrics = Metrics::new();
        let mesh = |sampling: &str| {
            let text = format!("apiVersion: smesh.io/v1\nkind: MeshConfig\nmetadata: {{name: mesh}}\nspec: {{tracing: {{collector: '127.0.0.1:9', sampling: {sampling}}}}}\n");
            smesh_model::load("mesh.yaml", &text).expect("valid")
        };
        let off = Snapshot::build(&items(1, None), &Snapshot::empty(), &metrics, "outbound");
        assert!(off.filters.is_none());
        let on = Snapshot::build(&mesh("0.5"), &off, &metrics, "outbound");
        let again = Snapshot::build(&mesh("0.5"), &on, &metrics, "outbound");
        let changed = Snapshot::build(&mesh("0.1"), &again, &metrics, "outbound");
        let tracer = |s: &Snapshot| s.tracer.clone().expect("tracing on");
        assert!(Arc::ptr_eq(&tracer(&on), &tracer(&again)));
        assert!(!Arc::ptr_eq(&tracer(&again), &tracer(&changed)));
        assert_eq!(changed.filters.as_ref().map(|f| f.len()), Some(1));
        assert!(Snapshot::build(&items(1, None), &changed, &metrics, "outbound")
            .filters
            .is_none());
    }

    #[test]
    fn mesh_limit_follows_the_live_endpoints_and_keeps_its_buckets() {
        let m = Metrics::new();
        let mesh = Some("{requestsPerSecond: 90, burst: 9, scope: mesh}");
        let s0 = Snapshot::serving(Some("api"));
        let s1 = Snapshot::build(&items(3, mesh), &s0, &m, "outbound");
        assert_eq!(share(&s1), Some((30.0, Some(3))));
        assert_eq!(gauge(&m), 30.0);
        // an unrelated change (or a repeated push) keeps the same buckets
        let s2 = Snapshot::build(&items(3, mesh), &s1, &m, "outbound");
        assert!(Arc::ptr_eq(
            s1.inbound_limit.as_ref().unwrap(),
            s2.inbound_limit.as_ref().unwrap()
        ));
        // a proxy leaves: the others' shares grow
        let s3 = Snapshot::build(&items(2, mesh), &s2, &m, "outbound");
        assert_eq!(share(&s3), Some((45.0, Some(4))));
        assert_eq!(gauge(&m), 45.0);
        assert!(!Arc::ptr_eq(
            s2.inbound_limit.as_ref().unwrap(),
            s3.inbound_limit.as_ref().unwrap()
        ));
        // not registered yet (no endpoints): the whole limit
        let s4 = Snapshot::build(&items(0, mesh), &s3, &m, "outbound");
        assert_eq!(share(&s4), Some((90.0, Some(9))));
        // local scope ignores the count
        let local = Some("{requestsPerSecond: 90}");
        let s5 = Snapshot::build(&items(3, local), &s4, &m, "outbound");
        assert_eq!(share(&s5), Some((90.0, Some(9))));
        // the policy goes: no limit, the gauge says 0
        let s6 = Snapshot::build(&items(3, None), &s5, &m, "outbound");
        assert!(s6.inbound_limit.is_none());
        assert_eq!(gauge(&m), 0.0);
    }

    #[test]
    fn only_the_services_own_proxies_enforce_it() {
        let m = Metrics::new();
        let mesh = Some("{requestsPerSecond: 90, scope: mesh}");
        let client = Snapshot::build(&items(3, mesh), &Snapshot::empty(), &m, "outbound");
        assert!(client.inbound_limit.is_none());
        let other = Snapshot::build(&items(3, mesh), &Snapshot::serving(Some("web")), &m, "outbound");
        assert!(other.inbound_limit.is_none());
    }

    #[test]
    fn inbound_share_refuses_above_the_split_rate() {
        let m = Metrics::new();
        let s = Snapshot::build(
            &items(2, Some("{requestsPerSecond: 4, burst: 2, scope: mesh}")),
            &Snapshot::serving(Some("api")),
            &m,
            "outbound",
        );
        let limits = s.inbound_limit.as_ref().unwrap();
        let h = http::HeaderMap::new();
        let ip = std::net::IpAddr::from([127, 0, 0, 1]);
        // burst 2 / 2 proxies = 1: the first passes, the next is refused with retry-after
        assert!(limits.check(&h, ip, None, false).is_none());
        let refused = limits.check(&h, ip, None, false).expect("over the share");
        assert_eq!(refused.status(), 429);
        assert_eq!(refused.headers()["retry-after"], "1");
        assert_eq!(limits.limited.get(), 1);
        let grpc = limits.check(&h, ip, None, true).expect("over the share");
        assert_eq!(grpc.headers()["grpc-status"], "8");
    }

    #[test]
    fn the_learned_concurrency_limit_survives_reloads_that_keep_its_settings() {
        let m = Metrics::new();
        let load = |extra: &str| {
            let text = format!("apiVersion: smesh.io/v1\nkind: Service\nmetadata: {{name: api}}\nspec: {{endpoints: [{{address: 127.0.0.1:9001}}]}}\n---\napiVersion: smesh.io/v1\nkind: BackendPolicy\nmetadata: {{name: p}}\nspec:\n  targetRef: {{name: api}}\n  adaptiveConcurrency: {{initialLimit: 8}}\n{extra}");
            smesh_model::load("mesh.yaml", &text).expect("valid")
        };
        let limiter = |s: &Snapshot| s.policies["api"].shed.clone().expect("a limiter");
        let s1 = Snapshot::build(&load(""), &Snapshot::empty(), &m, "outbound");
        // another part of the policy changes: the limiter (and what it learned) stays
        let s2 = Snapshot::build(&load("  circuitBreaker: {maxRequests: 100}\n"), &s1, &m, "outbound");
        assert!(Arc::ptr_eq(&limiter(&s1), &limiter(&s2)));
        assert_eq!(limiter(&s2).limit(), 8.0);
        let s3 = Snapshot::build(&load("").into_iter().take(1).collect::<Vec<_>>(), &s2, &m, "outbound");
        assert!(s3.policies.is_empty());
    }

    #[test]
    fn grpc_routes_take_grpc_requests_first_by_method_then_headers() {
        let text = "apiVersion: smesh.io/v1\nkind: Service\nmetadata: {name: api}\nspec:\n  endpoints:\n  - {address: 127.0.0.1:9001, labels: {version: v1}}\n  - {address: 127.0.0.1:9002, labels: {version: v2}}\n---\napiVersion: smesh.io/v1\nkind: HTTPRoute\nmetadata: {name: web}\nspec:\n  parentRefs: [{name: api}]\n  rules:\n  - matches: [{path: {type: Exact, value: /pkg.Svc/Get}}]\n  - matches: [{path: {value: /rest}}]\n---\napiVersion: smesh.io/v1\nkind: GRPCRoute\nmetadata: {name: rpc}\nspec:\n  parentRefs: [{name: api}]\n  rules:\n  - matches: [{method: {service: pkg.Svc}}]\n    backendRefs: [{name: api, subset: {version: v1}}]\n  - matches: [{method: {service: pkg.Svc, method: Get}}, {headers: [{name: x-canary, value: 'yes'}]}]\n    backendRefs: [{name: api, subset: {version: v2}}]\n  - matches: [{method: {method: Put}}]\n    backendRefs: [{name: api, subset: {version: v2}}]\n";
        let items = smesh_model::load("mesh.yaml", text).expect("valid");
        let s = Snapshot::build(&items, &Snapshot::empty(), &Metrics::new(), "outbound");
        let table = s.service("api").expect("api");
        // (route name, port of the picked backend's only endpoint), or None for no route
        let pick = |path: &str, grpc: bool, canary: bool| {
            let mut b = http::Request::builder().method("POST").uri(path);
            if grpc {
                b = b.header("content-type", "application/grpc+proto");
            }
            if canary {
                b = b.header("x-canary", "yes");
            }
            let req = b.body(()).unwrap();
            table.route(&req).map(|rule| {
                let eps = rule.backends[0].balancer.endpoints();
                let port = if eps.len() == 1 { eps[0].addr.port() } else { 0 };
                (rule.route.to_string(), port)
            })
        };
        let rpc = |port| Some(("rpc".to_string(), port));
        // exact service and method beats the service-wide rule written before it
        assert_eq!(pick("/pkg.Svc/Get", true, false), rpc(9002));
        assert_eq!(pick("/pkg.Svc/List", true, false), rpc(9001));
        // the service-only match beats a header-only match
        assert_eq!(pick("/pkg.Svc/List", true, true), rpc(9001));
        assert_eq!(pick("/other.Svc/List", true, true), rpc(9002));
        // a method-only match, in any service
        assert_eq!(pick("/other.Svc/Put", true, false), rpc(9002));
        assert_eq!(pick("/other.Svc/Putx", true, false), None);
        // gRPC requests no GRPCRoute rule takes fall through to the HTTPRoutes...
        assert_eq!(pick("/rest/x", true, false), Some(("web".to_string(), 0)));
        // ...and non-gRPC requests never see the GRPCRoutes
        assert_eq!(pick("/pkg.Svc/Get", false, false), Some(("web".to_string(), 0)));
        assert_eq!(pick("/pkg.Svc/List", false, true), None);
    }

    #[test]
    fn grpc_route_rate_limits_are_their_own_buckets() {
        let text = "apiVersion: smesh.io/v1\nkind: Service\nmetadata: {name: api}\nspec: {endpoints: [{address: 127.0.0.1:9001}]}\n---\napiVersion: smesh.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  parentRefs: [{name: api}]\n  rules: [{filters: [{type: RateLimit, rateLimit: {requestsPerSecond: 5}}]}]\n---\napiVersion: smesh.io/v1\nkind: GRPCRoute\nmetadata: {name: r}\nspec:\n  parentRefs: [{name: api}]\n  rules: [{filters: [{type: RateLimit, rateLimit: {requestsPerSecond: 5}}]}]\n";
        let items = smesh_model::load("mesh.yaml", text).expect("valid");
        let m = Metrics::new();
        let s1 = Snapshot::build(&items, &Snapshot::empty(), &m, "outbound");
        assert_eq!(s1.limiters.len(), 2);
        let s2 = Snapshot::build(&items, &s1, &m, "outbound");
        for (key, limiter) in &s1.limiters {
            assert!(Arc::ptr_eq(limiter, &s2.limiters[key]), "{key}");
        }
    }
}
