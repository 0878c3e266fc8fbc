//! Prometheus metrics. Families are registered once; the request path uses handles that were
//! resolved when a configuration snapshot was built, so it only increments atomics.

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use std::sync::{Arc, OnceLock};

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

pub struct Metrics {
    pub registry: Registry,
    requests: IntCounterVec,
    responses: IntCounterVec,
    grpc_responses: IntCounterVec,
    duration: HistogramVec,
    retries: IntCounterVec,
    pub retries_skipped: IntCounterVec,
    pub proxy_errors: IntCounterVec,
    tcp_opened: IntCounterVec,
    tcp_closed: IntCounterVec,
    tcp_read: IntCounterVec,
    tcp_write: IntCounterVec,
    pub config_reloads: IntCounterVec,
    pub config_generation: IntGauge,
    pub access_log_dropped: IntCounter,
    /// Spans sent to the trace collector, and spans lost (`queue_full`, `export_failed`).
    pub trace_spans_exported: IntCounter,
    pub trace_spans_dropped: IntCounterVec,
    /// Traced requests by whether they continued their caller's trace (an app that does
    /// not pass `traceparent` on starts a new trace with each outbound call).
    pub trace_requests: IntCounterVec,
    pub connections_refused: IntCounterVec,
    pub connections_active: IntGauge,
    pub resilience: ResilienceMetrics,
    pub identity_renewals: IntCounterVec,
    pub identity_expiry: IntGauge,
    pub authz_decisions: IntCounterVec,
    /// Inbound connections by TLS status: [mesh mTLS, plaintext].
    pub inbound_connections: [IntCounter; 2],
    inbound_tls_requests: IntCounterVec,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    registry.register(Box::new(c.clone())).expect("metric registered once");
    c
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let r = Registry::new();
        let route = &["direction", "service", "route"];
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "smesh_request_duration_seconds",
                "Time from receiving a request to sending the response headers.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            route,
        )
        .expect("valid metric definition");
        r.register(Box::new(duration.clone())).expect("metric registered once");
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric definition");
            r.register(Box::new(g.clone())).expect("metric registered once");
            g
        };
        let config_generation = gauge(
            "smesh_config_generation",
            "Generation of the active configuration snapshot.",
        );
        let connections_active = gauge("smesh_connections_active", "Client connections currently open.");
        let identity_expiry = gauge(
            "smesh_identity_cert_expiry_timestamp_seconds",
            "When this proxy's current certificate expires (Unix time; 0: no identity).",
        );
        let trace_spans_exported = IntCounter::new(
            "smesh_trace_spans_exported_total",
            "Spans the trace collector accepted.",
        )
        .expect("valid metric definition");
        r.register(Box::new(trace_spans_exported.clone()))
            .expect("metric registered once");
        let access_log_dropped = IntCounter::new(
            "smesh_access_log_dropped_total",
            "Access log lines dropped because the log buffer was full.",
        )
        .expect("valid metric definition");
        r.register(Box::new(access_log_dropped.clone()))
            .expect("metric registered once");
        let conn = &["direction", "service"];
        Arc::new(Metrics {
            requests: counter(&r, "smesh_requests_total", "HTTP requests received.", route),
            responses: counter(
                &r,
                "smesh_responses_total",
                "HTTP responses sent, by status code and class.",
                &["direction", "service", "route", "status_code", "class"],
            ),
            grpc_responses: counter(
                &r,
                "smesh_grpc_responses_total",
                "gRPC calls answered, by gRPC status (from the trailers, or a trailers-only response; \
                 \"none\": the response ended without one). A failed call usually has HTTP status 200.",
                &["direction", "service", "route", "grpc_status"],
            ),
            duration,
            retries: counter(
                &r,
                "smesh_retries_total",
                "Requests retried (each retry counts once).",
                route,
            ),
            retries_skipped: counter(
                &r,
                "smesh_retries_skipped_total",
                "Retries a policy asked for but that were not made.",
                &["reason"],
            ),
            trace_spans_exported,
            trace_requests: counter(
                &r,
                "smesh_trace_requests_total",
                "Traced requests; trace=started: the request came without a valid traceparent.",
                &["direction", "trace"],
            ),
            trace_spans_dropped: counter(
                &r,
                "smesh_trace_spans_dropped_total",
                "Spans kept for export but lost: the export queue was full, or the collector failed.",
                &["reason"],
            ),
            proxy_errors: counter(
                &r,
                "smesh_proxy_errors_total",
                "Responses or closed connections generated by the proxy itself.",
                &["direction", "reason"],
            ),
            tcp_opened: counter(
                &r,
                "smesh_tcp_connections_opened_total",
                "TCP connections forwarded.",
                conn,
            ),
            tcp_closed: counter(
                &r,
                "smesh_tcp_connections_closed_total",
                "Forwarded TCP connections closed.",
                conn,
            ),
            tcp_read: counter(
                &r,
                "smesh_tcp_read_bytes_total",
                "Bytes read from clients of forwarded TCP connections.",
                conn,
            ),
            tcp_write: counter(
                &r,
                "smesh_tcp_write_bytes_total",
                "Bytes written to clients of forwarded TCP connections.",
                conn,
            ),
            config_reloads: counter(
                &r,
                "smesh_config_reloads_total",
                "Configuration loads, by result.",
                &["result"],
            ),
            connections_refused: counter(
                &r,
                "smesh_connections_refused_total",
                "Client connections closed at once because a limit was reached.",
                &["listener"],
            ),
            identity_renewals: counter(
                &r,
                "smesh_identity_certifications_total",
                "Certificate requests to the control plane's CA, by result.",
                &["result"],
            ),
            identity_expiry,
            authz_decisions: counter(
                &r,
                "smesh_authz_decisions_total",
                "Inbound authorization decisions, by target service, deciding policy and verdict.",
                &["service", "policy", "decision"],
            ),
            inbound_connections: {
                let c = counter(
                    &r,
                    "smesh_inbound_connections_total",
                    "Connections accepted on the inbound port, by TLS status: tls=\"true\" is mesh mTLS \
                     from a peer proxy (permissive mode also takes plaintext, for migration).",
                    &["tls"],
                );
                [c.with_label_values(&["true"]), c.with_label_values(&["false"])]
            },
            inbound_tls_requests: counter(
                &r,
                "smesh_inbound_requests_by_tls_total",
                "Requests received on the inbound port, by TLS status (tls=\"true\": over mesh mTLS).",
                &["service", "tls"],
            ),
            config_generation,
            access_log_dropped,
            connections_active,
            resilience: ResilienceMetrics::register(&r),
            registry: r,
        })
    }

    pub fn route(self: &Arc<Self>, direction: &str, service: &str, route: &str) -> RouteMetrics {
        let labels = [direction, service, route];
        RouteMetrics {
            requests: self.requests.with_label_values(&labels),
            duration: self.duration.with_label_values(&labels),
            retries: self.retries.with_label_values(&labels),
            common: Default::default(),
            grpc: Default::default(),
            by_tls: Default::default(),
            labels: [direction.to_string(), service.to_string(), route.to_string()],
            metrics: self.clone(),
        }
    }

    pub fn tcp(&self, direction: &str, service: &str) -> TcpMetrics {
        let labels = [direction, service];
        TcpMetrics {
            opened: self.tcp_opened.with_label_values(&labels),
            closed: self.tcp_closed.with_label_values(&labels),
            read: self.tcp_read.with_label_values(&labels),
            write: self.tcp_write.with_label_values(&labels),
        }
    }

    pub fn proxy_error(&self, direction: &str, reason: &str) {
        self.proxy_errors.with_label_values(&[direction, reason]).inc();
    }

    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            return format!("# error encoding metrics: {e}\n");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Status codes whose response counters are resolved once and kept; others are looked up.
const COMMON_STATUS: [u16; 16] = [
    200, 201, 204, 301, 302, 304, 400, 401, 403, 404, 429, 431, 500, 502, 503, 504,
];

/// gRPC status codes defined by the gRPC spec (0 OK .. 16 UNAUTHENTICATED).
const GRPC_STATUSES: usize = 17;

/// Handles for one (direction, service, route).
pub struct RouteMetrics {
    pub requests: IntCounter,
    pub duration: Histogram,
    pub retries: IntCounter,
    common: [OnceLock<IntCounter>; COMMON_STATUS.len()],
    /// gRPC statuses 0..=16, then "none" (a response without one).
    grpc: [OnceLock<IntCounter>; GRPC_STATUSES + 1],
    /// Inbound requests over mesh mTLS and in plaintext.
    by_tls: [OnceLock<IntCounter>; 2],
    labels: [String; 3],
    metrics: Arc<Metrics>,
}

impl RouteMetrics {
    /// Counts an inbound request by whether it came over mesh mTLS.
    pub fn inbound_tls(&self, tls: bool) {
        let i = usize::from(!tls);
        self.by_tls[i]
            .get_or_init(|| {
                let tls = if tls { "true" } else { "false" };
                self.metrics
                    .inbound_tls_requests
                    .with_label_values(&[&self.labels[1], tls])
            })
            .inc();
    }

    /// The route's Service.
    pub fn service_name(&self) -> &str {
        &self.labels[1]
    }

    /// The route's name.
    pub fn route_name(&self) -> &str {
        &self.labels[2]
    }

    /// Counts a finished gRPC call by its gRPC status (`None`: it ended without one).
    pub fn grpc_response(&self, grpc_status: Option<u16>) {
        let index = match grpc_status {
            Some(code) if usize::from(code) < GRPC_STATUSES => usize::from(code),
            Some(code) => {
                // Outside the spec's codes: counted, but not kept as a handle.
                let [d, s, r] = &self.labels;
                let code = code.to_string();
                return self.metrics.grpc_responses.with_label_values(&[d, s, r, &code]).inc();
            }
            None => GRPC_STATUSES,
        };
        self.grpc[index]
            .get_or_init(|| {
                let [d, s, r] = &self.labels;
                let code = grpc_status.map_or_else(|| "none".to_string(), |c| c.to_string());
                self.metrics.grpc_responses.with_label_values(&[d, s, r, &code])
            })
            .inc();
    }

    pub fn response(&self, status: u16) {
        let lookup = || {
            let code = status.to_string();
            let class = format!("{}xx", status / 100);
            let [d, s, r] = &self.labels;
            self.metrics.responses.with_label_values(&[d, s, r, &code, &class])
        };
        match COMMON_STATUS.iter().position(|c| *c == status) {
            Some(i) => self.common[i].get_or_init(lookup).inc(),
            None => lookup().inc(),
        }
    }
}

#[derive(Clone)]
pub struct TcpMetrics {
    pub opened: IntCounter,
    pub closed: IntCounter,
    pub read: IntCounter,
    pub write: IntCounter,
}

impl TcpMetrics {
    /// Counts a finished connection (its opening was counted when it started).
    pub fn record(&self, event: &crate::telemetry::event::ConnectionEvent) {
        self.read.inc_by(event.bytes_from_client);
        self.write.inc_by(event.bytes_to_client);
        self.closed.inc();
    }
}

/// Families for the resilience layers, registered with the proxy's other metrics.
pub struct ResilienceMetrics {
    pub circuit_overflows: IntCounterVec,
    pub outlier_ejections: IntCounterVec,
    pub mirrors: IntCounterVec,
    pub faults: IntCounterVec,
    pub rate_limited: IntCounterVec,
    pub rate_limit_share: GaugeVec,
    pub load_shed: IntCounterVec,
    pub concurrency_limit: GaugeVec,
    pub concurrency_baseline: GaugeVec,
    pub health_checks: IntCounterVec,
    pub unhealthy_endpoints: IntGaugeVec,
}

impl ResilienceMetrics {
    pub fn register(r: &Registry) -> Self {
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition");
            r.register(Box::new(c.clone())).expect("metric registered once");
            c
        };
        let unhealthy_endpoints = IntGaugeVec::new(
            Opts::new(
                "smesh_health_unhealthy_endpoints",
                "Endpoints currently failing their active health checks.",
            ),
            &["service"],
        )
        .expect("valid metric definition");
        r.register(Box::new(unhealthy_endpoints.clone()))
            .expect("metric registered once");
        let rate_limit_share = GaugeVec::new(
            Opts::new(
                "smesh_rate_limit_share_requests_per_second",
                "Requests per second this proxy lets into its Service under the Service's BackendPolicy rateLimit (scope mesh: the limit divided by the Service's live endpoints).",
            ),
            &["service"],
        )
        .expect("valid metric definition");
        r.register(Box::new(rate_limit_share.clone()))
            .expect("metric registered once");
        let gauge = |name: &str, help: &str| {
            let g = GaugeVec::new(Opts::new(name, help), &["service"]).expect("valid metric definition");
            r.register(Box::new(g.clone())).expect("metric registered once");
            g
        };
        ResilienceMetrics {
            unhealthy_endpoints,
            rate_limit_share,
            load_shed: counter(
                "smesh_load_shed_total",
                "Requests refused at once because the upstream's adaptive concurrency limit had no room for their priority.",
                &["service", "priority"],
            ),
            concurrency_limit: gauge(
                "smesh_adaptive_concurrency_limit",
                "The adaptive concurrency limit this proxy holds for the service (tries in flight).",
            ),
            concurrency_baseline: gauge(
                "smesh_adaptive_concurrency_baseline_seconds",
                "The service's no-load latency as the adaptive concurrency limit measures it.",
            ),
            rate_limited: counter(
                "smesh_rate_limited_total",
                "Requests refused by a RateLimit filter (route: the filter's route) or by the Service's BackendPolicy rateLimit (route=\"inbound\").",
                &["service", "route"],
            ),
            health_checks: counter(
                "smesh_health_checks_total",
                "Active health checks by result (success, failure).",
                &["service", "result"],
            ),
            circuit_overflows: counter(
                "smesh_circuit_breaker_overflows_total",
                "Requests or retries refused by a circuit breaker, by the limit that was reached.",
                &["service", "kind"],
            ),
            outlier_ejections: counter(
                "smesh_outlier_ejections_total",
                "Endpoints ejected by outlier detection.",
                &["service"],
            ),
            mirrors: counter(
                "smesh_mirror_requests_total",
                "Mirrored requests by result (sent, failed, dropped, skipped).",
                &["service", "result"],
            ),
            faults: counter(
                "smesh_faults_injected_total",
                "Requests delayed or aborted by a FaultInjection filter.",
                &["service", "route", "kind"],
            ),
        }
    }
}
