//! The HTTP request path: pick the route, then try backends with retries and timeouts.
//!
//! Per request: route lookup in the snapshot's prebuilt table, a balancer pick, a send on a
//! worker-owned upstream connection. Metric handles were resolved when the snapshot was built.

use crate::balance::{mark_failed, Balancer, InFlight};
use crate::http::body::Body;
use crate::http::errors::ProxyError;
use crate::http::headers::{authority, grpc_timeout, is_grpc, strip_hop_by_hop, tunnelled_upgrade};
use crate::http::pool::{self, SendError};
use crate::http::request::{build_request, upstream_version, ORIG_PROTO};
use crate::http::tee::Tee;
use crate::listen::server::Shared;
use crate::route::mirror::MirrorBody;
use crate::route::rule::Rule;
use crate::tcp;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::Body as _;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

/// Connection failures are retried on other endpoints this many times per request.
const MAX_CONNECT_ATTEMPTS: usize = 3;

/// Where a listener's requests go.
#[derive(Clone)]
pub enum Target {
    /// By `Host` / `:authority` (or absolute-form URI).
    Outbound,
    /// Always to this service (a `--upstream` port).
    Upstream(Arc<str>),
    /// To the local application.
    Inbound(Arc<Rule>),
}

#[derive(Clone)]
pub struct HttpProxy {
    pub shared: Arc<Shared>,
    pub target: Target,
    pub direction: &'static str,
    pub client: SocketAddr,
    /// The verified SPIFFE ID of the peer proxy, on mesh mTLS connections.
    pub peer: Option<Arc<str>>,
}

type Failure = (ProxyError, String);

impl HttpProxy {
    pub async fn handle(self, mut req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
        let start = Instant::now();
        let grpc = is_grpc(&req);
        if let Err(detail) = check_host(&mut req) {
            return Ok(self.fail(ProxyError::BadRequest, detail, grpc));
        }
        let (rule, service_limit) = match &self.target {
            Target::Inbound(rule) => {
                rule.metrics.inbound_tls(self.peer.is_some());
                let snapshot = self.shared.config.load();
                if let Some(denied) = self.authorize(&snapshot, &req, rule, grpc) {
                    return Ok(denied);
                }
                (rule.clone(), snapshot.inbound_limit.clone())
            }
            target => {
                let snapshot = self.shared.config.load();
                let service = match target {
                    Target::Upstream(name) => snapshot.service(name),
                    _ => authority(&req).and_then(|a| snapshot.service_for_host(a)),
                };
                let Some(service) = service else {
                    let detail = authority(&req).unwrap_or("(none)").to_string();
                    return Ok(self.fail(ProxyError::UnknownAuthority, &detail, grpc));
                };
                if req.method() == Method::CONNECT {
                    let balancer = service.balancer.clone();
                    drop(snapshot);
                    // Rare and with a large future: boxed, it does not weigh on every request's.
                    return Ok(Box::pin(self.tunnel(&mut req, &balancer)).await);
                }
                match service.route(&req) {
                    Some(rule) => (rule.clone(), None),
                    None => {
                        let detail = format!("{} {}", req.method(), req.uri().path());
                        return Ok(self.fail(ProxyError::NoRoute, &detail, grpc));
                    }
                }
            }
        };
        rule.metrics.requests.inc();
        let summary = self.shared.access_log.as_ref().map(|_| {
            format!(
                "\"{} {}{} {:?}\"",
                req.method(),
                authority(&req).unwrap_or(""),
                req.uri().path(),
                req.version()
            )
        });
        let resp = match self.forward(req, &rule, service_limit.as_deref(), start).await {
            Ok(resp) => resp,
            Err((error, detail)) => self.fail(error, &detail, grpc),
        };
        rule.metrics.response(resp.status().as_u16());
        rule.metrics.duration.observe(start.elapsed().as_secs_f64());
        if let (Some(log), Some(summary)) = (&self.shared.access_log, summary) {
            log.record(format!(
                "{} {} {} {} {} {:.3}ms route={}",
                humantime::format_rfc3339_millis(std::time::SystemTime::now()),
                self.direction,
                self.client,
                summary,
                resp.status().as_u16(),
                start.elapsed().as_secs_f64() * 1e3,
                rule.route,
            ));
        }
        Ok(resp)
    }

    /// Inbound authorization with the verified peer identity; `Some` is the denial to send.
    fn authorize(
        &self,
        snapshot: &crate::config::snapshot::Snapshot,
        req: &Request<Incoming>,
        rule: &Rule,
        grpc: bool,
    ) -> Option<Response<Body>> {
        let (peer, method, path) = (self.peer.as_deref(), Some(req.method()), Some(req.uri().path()));
        match crate::config::authz::decide_inbound(snapshot, &self.shared.metrics, rule, peer, method, path)? {
            crate::config::authz::Decision::Allow(_) => None,
            crate::config::authz::Decision::Deny(policy) => {
                let by = policy.as_deref().unwrap_or("the default policy");
                let who = self.peer.as_deref().unwrap_or("an unauthenticated peer");
                Some(self.fail(ProxyError::Forbidden, &format!("{who} denied by {by}"), grpc))
            }
        }
    }

    fn fail(&self, error: ProxyError, detail: &str, grpc: bool) -> Response<Body> {
        self.shared.metrics.proxy_error(self.direction, error.reason());
        error.response(detail, grpc)
    }

    /// `service_limit`: on the inbound side, this proxy's share of its Service's BackendPolicy
    /// `rateLimit`.
    async fn forward(
        &self,
        mut req: Request<Incoming>,
        rule: &Rule,
        service_limit: Option<&crate::resilience::ratelimit::RateLimits>,
        start: Instant,
    ) -> Result<Response<Body>, Failure> {
        let grpc = is_grpc(&req);
        for rate_limits in [service_limit, rule.rate_limits.as_deref()].into_iter().flatten() {
            let peer = self.peer.as_deref();
            if let Some(resp) = rate_limits.check(req.headers(), self.client.ip(), peer, grpc) {
                self.shared
                    .metrics
                    .proxy_error(self.direction, ProxyError::RateLimited.reason());
                return Ok(resp);
            }
        }
        let limits = &self.shared.limits;
        let deadline = [rule.request_timeout, grpc_timeout(req.headers())]
            .into_iter()
            .flatten()
            .min();
        let upgrade_header = tunnelled_upgrade(&req, &rule.upgrades, self.peer.is_some()).cloned();
        let upgrade = upgrade_header.is_some();
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, incoming) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        if let Some(value) = upgrade_header.clone() {
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(header::UPGRADE, value);
        }
        // HTTPRoute filters: a redirect or an injected abort answers here.
        if let Some(filters) = &rule.filters {
            if let Some(resp) = Box::pin(filters.on_request(&mut parts)).await {
                return Ok(resp);
            }
        }

        // A body kept in memory can be sent again; a streamed one only once, unless a copy
        // of it is kept as it streams (its length unknown up front, e.g. gRPC).
        let retry = rule.retry.as_ref().filter(|_| !upgrade);
        let mut replay: Option<Bytes> = None;
        let mut source: Option<Incoming> = None;
        if incoming.is_end_stream() {
            // Nothing to keep: a try refused unprocessed, or a retry, sends it again.
            replay = Some(Bytes::new());
        } else if retry.is_some()
            && incoming
                .size_hint()
                .upper()
                .is_some_and(|n| n <= limits.max_retry_body_bytes)
        {
            match Box::pin(Limited::new(incoming, limits.max_retry_body_bytes as usize).collect()).await {
                Ok(collected) => replay = Some(collected.to_bytes()),
                Err(e) => return Err((ProxyError::BadRequest, format!("reading request body: {e}"))),
            }
        } else {
            source = Some(incoming);
        }

        let mesh_tls = self.shared.tls.load_full();
        // Mirrors get the kept body, or a copy of the streamed one frame by frame.
        let taps = match &rule.filters {
            Some(filters) => {
                let body = match (&replay, &source) {
                    (Some(kept), _) => MirrorBody::Kept(kept),
                    (None, Some(incoming)) => MirrorBody::Streamed(incoming.size_hint()),
                    (None, None) => MirrorBody::Streamed(http_body::SizeHint::with_exact(0)),
                };
                filters.mirror(&parts, &body, limits.connect_timeout, mesh_tls.as_ref())
            }
            None => Vec::new(),
        };
        let mut replayable: Option<crate::http::replay::Replay<Tee>> = None;
        let mut streamed: Option<Body> = None;
        if let Some(incoming) = source {
            if retry.is_some() && incoming.size_hint().upper().is_none() {
                let body = Tee::new(incoming, taps);
                replayable = Some(crate::http::replay::Replay::new(
                    body,
                    limits.max_retry_body_bytes as usize,
                ));
            } else {
                if retry.is_some() {
                    self.shared
                        .metrics
                        .retries_skipped
                        .with_label_values(&["body_too_large"])
                        .inc();
                }
                streamed = Some(if taps.is_empty() {
                    Body::Streaming(incoming)
                } else {
                    Body::Tee(Box::new(Tee::new(incoming, taps)))
                });
            }
        }
        // An inbound request that crossed the mesh as HTTP/2 says what its client spoke.
        let client_version = match parts.headers.remove(&ORIG_PROTO) {
            Some(v) if v.as_bytes() == b"HTTP/1.1" => Version::HTTP_11,
            _ => parts.version,
        };
        // The request head is moved into the first try; it is saved only when a retry may
        // need it again, and handed back by a failed connect.
        let mut head = Some(parts);
        let mut saved: Option<crate::http::saved_head::SavedHead> = None;
        // Pinned in place: the timeout below wraps a pointer to it, not a second copy.
        let tries = std::pin::pin!(async {
            let mut tried: Vec<SocketAddr> = Vec::new();
            let mut retries = 0u32;
            // Tries an HTTP/2 upstream refused unprocessed.
            let mut refused = 0usize;
            // A retry avoids the endpoint that just failed when another one is left.
            let mut avoid: Option<SocketAddr> = None;
            let mut _retry_permit = None;
            // The body was streamed to a try: it cannot be sent again.
            let mut streamed_once = false;
            let mut priority = None;
            loop {
                let backend = rule.backend();
                let version = upstream_version(backend.protocol, client_version, upgrade);
                // BackendPolicy adaptive concurrency: room for this request's priority, or a
                // fast 503 (load shedding).
                let mut shed_permit = match backend.policy.as_ref().filter(|p| p.shed.is_some()) {
                    Some(p) => {
                        let priority = *priority.get_or_insert_with(|| {
                            crate::resilience::shed::request_priority(head.as_ref().map(|h| &h.headers), rule.priority)
                        });
                        p.shed(priority).map_err(|detail| (ProxyError::LoadShed, detail))?
                    }
                    None => None,
                };
                // BackendPolicy circuit breaker: a slot for this try, or 503 at once.
                let _permit = match &backend.policy {
                    Some(p) => p
                        .admit(version == Version::HTTP_11, retries == 0 && tried.is_empty())
                        .await
                        .map_err(|detail| (ProxyError::CircuitOpen, detail))?,
                    None => None,
                };
                let picked = match avoid.take() {
                    Some(prev) if backend.balancer.len() > 1 => {
                        let mut exclude = tried.clone();
                        exclude.push(prev);
                        backend
                            .balancer
                            .pick(&exclude)
                            .or_else(|| backend.balancer.pick(&tried))
                    }
                    _ => backend.balancer.pick(&tried),
                };
                let Some(endpoint) = picked else {
                    return Err(if backend.balancer.is_empty() {
                        (
                            ProxyError::NoEndpoints,
                            format!("service {:?} has no endpoints", backend.service),
                        )
                    } else {
                        (
                            ProxyError::ConnectFailed,
                            format!("no reachable endpoint of {:?}", backend.service),
                        )
                    });
                };
                let endpoint = endpoint.clone();
                let have_head = head.is_some() || saved.is_some();
                let body = match (&replay, &replayable, streamed.take(), have_head) {
                    (Some(bytes), _, _, true) => Some(Body::full(bytes.clone())),
                    (None, Some(kept), _, true) => Some(Body::Replay(kept.body())),
                    (None, None, Some(body), true) => {
                        streamed_once = true;
                        Some(body)
                    }
                    _ => None,
                };
                let Some(body) = body else {
                    return Err((ProxyError::UpstreamFailed, "request body already sent".into()));
                };
                // The head goes to this try; a copy stays for the next one when the body can
                // be sent again. (The first try gets the original: hyper parses the response
                // into its header map's allocation, already sized for this traffic.)
                let parts = match head.take() {
                    Some(parts) => parts,
                    None => saved.as_ref().expect("checked above").to_parts(),
                };
                // A peer smesh proxy is reached over mesh mTLS (HTTP/2 unless upgrading).
                let mesh = mesh_tls
                    .as_ref()
                    .zip(endpoint.server_name.clone())
                    .map(|(tls, name)| pool::Mesh {
                        client: if upgrade {
                            tls.client_http1.clone()
                        } else {
                            tls.client_h2.clone()
                        },
                        name,
                    });
                // `version` is what the destination app speaks; the inbound proxy restores it.
                let app_version = version;
                let version = if mesh.is_some() && !upgrade {
                    Version::HTTP_2
                } else {
                    app_version
                };
                // Kept for a retry, or for an HTTP/2 stream refused unprocessed.
                if !streamed_once && saved.is_none() && (retry.is_some() || version == Version::HTTP_2) {
                    saved = Some(crate::http::saved_head::SavedHead::new(&parts));
                }
                let mut upstream_req = build_request(parts, version, body);
                // The upstream gets what is left of the deadline (gRPC: `grpc-timeout`).
                if let Some(d) = deadline.filter(|_| grpc) {
                    crate::resilience::deadline::propagate(upstream_req.headers_mut(), start + d);
                }
                if mesh.is_some() && app_version != Version::HTTP_2 && !upgrade {
                    upstream_req
                        .headers_mut()
                        .insert(ORIG_PROTO, HeaderValue::from_static("HTTP/1.1"));
                }
                let in_flight = InFlight::start(&endpoint);
                let settings = pool::PoolSettings::new(
                    limits.connect_timeout,
                    backend.policy.as_ref().and_then(|p| p.spec.connection_pool.as_deref()),
                );
                let send = std::pin::pin!(pool::send(
                    endpoint.addr,
                    version,
                    upstream_req,
                    settings,
                    upgrade,
                    mesh
                ));
                let outcome = match rule.try_timeout {
                    Some(t) => tokio::time::timeout(t, send).await.ok(),
                    None => Some(send.await),
                };
                if let Some(p) = &backend.policy {
                    if let Some(status) = crate::resilience::policy::outcome_status(&outcome) {
                        p.observe(&endpoint, status);
                    }
                }
                // An answer or a per-try timeout tells the concurrency limit the latency.
                if let Some(permit) = shed_permit.take().filter(|_| matches!(outcome, Some(Ok(_)) | None)) {
                    permit.answered();
                }
                // Whether the route's retry policy and the BackendPolicy allow another try.
                let mut may_retry = |status: u16, headers: Option<&HeaderMap>| {
                    if !can_retry(retry, retries, status, headers, true) {
                        return false;
                    }
                    if replay.is_none() {
                        match &replayable {
                            Some(kept) if kept.can_replay() => {}
                            // Grew past --max-retry-body-bytes while it streamed.
                            Some(_) => {
                                self.shared
                                    .metrics
                                    .retries_skipped
                                    .with_label_values(&["body_too_large"])
                                    .inc();
                                return false;
                            }
                            // Streamed (counted when it started).
                            None => return false,
                        }
                    }
                    match backend.policy.as_ref().map(|p| p.retry()) {
                        Some(None) => false,
                        Some(grant) => {
                            _retry_permit = grant;
                            true
                        }
                        None => true,
                    }
                };
                let status = match outcome {
                    Some(Ok(resp)) => {
                        in_flight.answered();
                        let status = resp.status().as_u16();
                        if !may_retry(status, Some(resp.headers())) {
                            return Ok(resp);
                        }
                        status
                    }
                    Some(Err(SendError::Connect(e, req))) => {
                        mark_failed(&endpoint);
                        tried.push(endpoint.addr);
                        let (parts, body) = req.into_parts();
                        head = Some(parts);
                        streamed = Some(body);
                        if tried.len() >= MAX_CONNECT_ATTEMPTS.min(backend.balancer.len().max(1)) {
                            return Err((ProxyError::ConnectFailed, format!("{}: {e}", endpoint.addr)));
                        }
                        continue;
                    }
                    Some(Err(SendError::Refused(e))) => {
                        // Nothing was processed: sent again (a new connection if that one
                        // is going away), like a failed connect, not counted as a retry.
                        refused += 1;
                        let body_kept = replay.is_some() || replayable.as_ref().is_some_and(|kept| kept.can_replay());
                        if refused > MAX_CONNECT_ATTEMPTS || saved.is_none() || streamed_once || !body_kept {
                            return Err((ProxyError::UpstreamFailed, format!("{}: {e}", endpoint.addr)));
                        }
                        tracing::debug!(endpoint = %endpoint.addr, error = %e, "stream refused: sending again");
                        continue;
                    }
                    Some(Err(SendError::Upstream(e))) if crate::http::body::is_client_body_error(&*e) => {
                        return Err((ProxyError::BadRequest, e.to_string()));
                    }
                    Some(Err(SendError::Upstream(e))) => {
                        if !may_retry(502, None) {
                            return Err((ProxyError::UpstreamFailed, format!("{}: {e}", endpoint.addr)));
                        }
                        502
                    }
                    None => {
                        if !may_retry(504, None) {
                            return Err((
                                ProxyError::Timeout,
                                format!("no response from {} in time", endpoint.addr),
                            ));
                        }
                        504
                    }
                };
                retries += 1;
                avoid = Some(endpoint.addr);
                rule.metrics.retries.inc();
                tracing::debug!(status, retries, endpoint = %endpoint.addr, "retrying");
                if let Some(policy) = retry {
                    tokio::time::sleep(policy.backoff.saturating_mul(1 << (retries - 1).min(6))).await;
                }
            }
        });
        let mut resp = match deadline {
            Some(d) => match tokio::time::timeout_at((start + d).into(), tries).await {
                Ok(r) => r?,
                Err(_) => {
                    return Err((
                        ProxyError::Timeout,
                        format!("request timeout {}", humantime::format_duration(d)),
                    ))
                }
            },
            None => tries.await?,
        };
        if let Some(filters) = &rule.filters {
            filters.on_response(&mut resp);
        }
        Ok(self.respond(resp, client_upgrade.zip(upgrade_header)))
    }

    /// `client_upgrade`: the client's side of a tunnelled upgrade, and the protocol it asked for.
    fn respond(
        &self,
        mut resp: Response<Body>,
        client_upgrade: Option<(hyper::upgrade::OnUpgrade, HeaderValue)>,
    ) -> Response<Body> {
        let asked = client_upgrade.as_ref().map(|(_, protocol)| protocol);
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS && !switched_as_asked(&resp, asked) {
            // A switch nobody asked for (an upgrade the proxy stripped, or another protocol
            // than the one offered) would make the connection a tunnel the proxy cannot read.
            return self.fail(
                ProxyError::UpstreamFailed,
                "101 Switching Protocols to a protocol the proxy did not ask for",
                false,
            );
        }
        match client_upgrade {
            Some((client, _)) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
                let upstream = hyper::upgrade::on(&mut resp);
                let metrics = self.shared.metrics.tcp(self.direction, "upgrade");
                tokio::spawn(async move {
                    match tokio::try_join!(client, upstream) {
                        Ok((client, upstream)) => {
                            tcp::splice(TokioIo::new(client), TokioIo::new(upstream), &metrics).await;
                        }
                        Err(e) => tracing::debug!(error = %e, "upgrade failed"),
                    }
                });
            }
            _ => strip_hop_by_hop(resp.headers_mut()),
        }
        resp
    }

    /// `CONNECT service:port`: a TCP tunnel to one of the service's endpoints.
    async fn tunnel(&self, req: &mut Request<Incoming>, balancer: &Balancer) -> Response<Body> {
        let tls = self.shared.tls.load_full();
        let upstream = match tcp::connect_any(balancer, self.shared.limits.connect_timeout, tls.as_deref()).await {
            Ok((stream, _)) => stream,
            Err(error) => return self.fail(error.0, &error.1, false),
        };
        let on_upgrade = hyper::upgrade::on(req);
        let metrics = self.shared.metrics.tcp(self.direction, "connect");
        tokio::spawn(async move {
            match on_upgrade.await {
                Ok(client) => tcp::splice(TokioIo::new(client), upstream, &metrics).await,
                Err(e) => tracing::debug!(error = %e, "CONNECT upgrade failed"),
            }
        });
        Response::new(Body::Empty)
    }
}

/// Whether a 101 switches to the protocol of the upgrade the proxy forwarded.
fn switched_as_asked(resp: &Response<Body>, asked: Option<&HeaderValue>) -> bool {
    use crate::http::headers::first_protocol;
    let (Some(asked), Some(switched)) = (asked, resp.headers().get(header::UPGRADE)) else {
        return false;
    };
    first_protocol(switched.as_bytes()).eq_ignore_ascii_case(first_protocol(asked.as_bytes()))
}

/// RFC 9112 3.2: a request has at most one `Host`, and an HTTP/1.1 one exactly one. A proxy
/// given an absolute-form target (or an HTTP/2 `:authority`) replaces a `Host` that says
/// otherwise with that authority, so the upstream sees the authority the request was routed
/// by (RFC 9112 3.2.2, RFC 9113 8.3.1). Without a `Host`, [`build_request`] adds one.
fn check_host<B>(req: &mut Request<B>) -> Result<(), &'static str> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let first = hosts.next();
    if hosts.next().is_some() {
        return Err("more than one Host header");
    }
    match (req.uri().authority(), first) {
        (Some(authority), Some(host)) if host.as_bytes() != authority.as_str().as_bytes() => {
            let value = HeaderValue::from_str(authority.as_str()).map_err(|_| "invalid authority")?;
            req.headers_mut().insert(header::HOST, value);
            Ok(())
        }
        (None, None) if req.version() == Version::HTTP_11 => Err("no Host header"),
        _ => Ok(()),
    }
}

fn can_retry(
    policy: Option<&crate::route::rule::RetryPolicy>,
    retries: u32,
    status: u16,
    headers: Option<&HeaderMap>,
    replayable: bool,
) -> bool {
    policy.is_some_and(|p| replayable && retries < p.attempts && p.retries(status, headers))
}
