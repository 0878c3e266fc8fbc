//! The HTTP handler: a request's stages, in order (`HttpProxy::stages`), over one
//! [`RequestCtx`]. The tries themselves are [`crate::dispatch`]; the event that ends a
//! request is [`crate::listen::complete`].

use crate::balance::Balancer;
use crate::dispatch::Dispatch;
use crate::filter::{Filters, ReceivedHead, RequestFilters};
use crate::http::body::{Body, BodyError, ClientBody};
use crate::http::errors::{Failure, ProxyError};
use crate::http::headers::{authority, grpc_timeout, is_grpc, strip_hop_by_hop, tunnelled_upgrade};
use crate::listen::server::Shared;
use crate::resilience::ratelimit::RateLimits;
use crate::route::rule::Rule;
use crate::tcp;
use crate::telemetry::event::{ConnectionEvent, ConnectionKind, RequestCtx};
use crate::telemetry::window::Sample;
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

/// Where a listener's requests go.
#[derive(Clone)]
pub enum Target {
    /// By `Host` / `:authority` (or absolute-form URI).
    Outbound,
    /// Always to this service (a `--upstream` port).
    Upstream(Arc<str>),
    /// To the local application.
    Inbound(Arc<Rule>),
    /// To an application in this process (the embedded mesh's inbound side): the stages of
    /// `Inbound` (the rule: its Service, for authorization and metrics), then a call.
    Local(Arc<Rule>, Arc<dyn LocalApp>),
}

/// An application in this process, called with each request an inbound listener admitted.
pub trait LocalApp: Send + Sync {
    /// Its answer; an error is the proxy's `502 upstream failed`.
    fn call(&self, req: Request<ClientBody>) -> LocalFuture;
}

/// What a [`LocalApp`] call gives back.
pub type LocalFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Response<Body>, BodyError>> + Send>>;

#[derive(Clone)]
pub struct HttpProxy {
    pub shared: Arc<Shared>,
    pub target: Target,
    pub direction: &'static str,
    pub client: SocketAddr,
    /// The verified SPIFFE ID of the peer proxy, on mesh mTLS connections.
    pub peer: Option<Arc<str>>,
}

/// A stage's result: go on with `T`, or answer the client with this response now.
type Stage<T> = Result<T, Response<Body>>;

/// What routing found for an outbound request.
enum Routed {
    Rule(Arc<Rule>),
    /// `CONNECT service:port`: a TCP tunnel to one of the service's endpoints.
    Tunnel(Arc<Balancer>),
}

/// The client's side of a tunnelled upgrade, and the protocol it asked for.
type ClientUpgrade = Option<(hyper::upgrade::OnUpgrade, HeaderValue)>;

// A stage's early answer is the response itself (160 bytes): the common path returns `Ok`
// and pays nothing for the size, while boxing would allocate for every early answer.
#[allow(clippy::result_large_err)]
impl HttpProxy {
    /// The request path, stage by stage; each stage either hands the request on or
    /// answers it (`next!` takes the answer to `finish`). Written out in one function, not
    /// awaited as a second one: every level of futures copies the one below it once per
    /// request (callgrind). Generic over the request body: a server connection's
    /// (`Incoming`), or an embedded caller's ([`ClientBody`]), the same stages for both.
    pub async fn handle<B: Into<ClientBody>>(self, mut req: Request<B>) -> Result<Response<Body>, Infallible> {
        let mut ctx = RequestCtx::new(self.direction, self.client, self.peer.clone());
        // The snapshot's filters (tracing), taken where routing reads the snapshot anyway.
        let mut configured: Option<Filters> = None;
        let mut resp = 'stages: {
            macro_rules! next {
                ($stage:expr) => {
                    match $stage {
                        Ok(next) => next,
                        Err(answer) => break 'stages answer,
                    }
                };
            }
            next!(self.read_head(&mut ctx, &mut req));
            let (rule, inbound_limit) = match &self.target {
                Target::Inbound(rule) | Target::Local(rule, _) => {
                    (rule.clone(), next!(self.admit(&mut ctx, &req, rule, &mut configured)))
                }
                _ => match next!(self.route(&mut ctx, &req, &mut configured)) {
                    Routed::Rule(rule) => (rule, None),
                    // Rare and with a large future: boxed, it does not weigh on every request's.
                    Routed::Tunnel(balancer) => {
                        break 'stages Box::pin(self.tunnel(&mut ctx, &mut req, &balancer)).await
                    }
                },
            };
            ctx.route = Some(rule.metrics.clone());
            rule.metrics.requests.inc();
            next!(self.rate_limit(&mut ctx, &req, &rule, inbound_limit.as_deref()));
            ctx.deadline = [rule.request_timeout, grpc_timeout(req.headers())]
                .into_iter()
                .flatten()
                .min();
            let filters = RequestFilters::new(&self.shared.filters, &configured);
            let (mut parts, body, client_upgrade) = next!(self.request_filters(&mut ctx, req, &rule, filters));
            if let Some(filters) = &rule.filters {
                // The route's filters: a redirect or an injected fault answers here.
                if let Some(answer) = Box::pin(filters.on_request(&mut parts)).await {
                    break 'stages answer;
                }
            }
            let upgrade = client_upgrade.is_some();
            let sent = match &self.target {
                // Boxed already (a trait object's future): nothing added to this one's size.
                Target::Local(_, app) => app.call(Request::from_parts(parts, body.into())).await.map_err(|e| {
                    let detail = format!("the application failed: {e}");
                    Failure::said(ProxyError::UpstreamFailed, detail)
                }),
                _ => self.dispatch(&rule, filters).send(&mut ctx, parts, body, upgrade).await,
            };
            let mut resp = match sent {
                Ok(resp) => resp,
                Err(failure) => break 'stages self.fail(&mut ctx, failure),
            };
            self.response_filters(&mut ctx, &mut resp, &rule, client_upgrade);
            resp
        };
        self.finish(
            &mut ctx,
            &mut resp,
            RequestFilters::new(&self.shared.filters, &configured),
        );
        // Moved only when a consumer takes the event (most requests: none).
        if self.shared.want(&ctx, &configured) {
            resp = crate::listen::complete::watch(ctx, resp, &self.shared, configured);
        } else if let Some(stats) = &self.shared.stats {
            // Nobody watches the body: the window takes the request as its head leaves.
            let announced = http_body::Body::size_hint(resp.body()).exact();
            stats.record(&Sample::at_head(&ctx, resp.status().as_u16(), announced));
        }
        Ok(resp)
    }

    /// Head checks: `Host` (RFC 9112 3.2), gRPC-ness, the request line if a consumer wants it.
    fn read_head<B>(&self, ctx: &mut RequestCtx, req: &mut Request<B>) -> Stage<()> {
        ctx.grpc = is_grpc(req);
        if self.shared.want_head() {
            ctx.keep_head(req, authority(req));
        }
        check_host(req).map_err(|detail| self.fail(ctx, Failure::said(ProxyError::BadRequest, detail)))
    }

    /// Inbound: authorization with the verified peer identity; on success, this proxy's share
    /// of its Service's BackendPolicy `rateLimit`.
    fn admit<B>(
        &self,
        ctx: &mut RequestCtx,
        req: &Request<B>,
        rule: &Rule,
        configured: &mut Option<Filters>,
    ) -> Stage<Option<Arc<RateLimits>>> {
        use crate::config::authz::{decide_inbound, Decision};
        rule.metrics.inbound_tls(self.peer.is_some());
        let snapshot = self.shared.config.load();
        configured.clone_from(&snapshot.filters);
        self.received(ctx, req, configured);
        let (peer, method, path) = (self.peer.as_deref(), Some(req.method()), Some(req.uri().path()));
        match decide_inbound(&snapshot, &self.shared.metrics, rule, peer, method, path) {
            None | Some(Decision::Allow(_)) => Ok(snapshot.inbound_limit.clone()),
            Some(Decision::Deny(policy)) => {
                let by = policy.as_deref().unwrap_or("the default policy");
                let who = self.peer.as_deref().unwrap_or("an unauthenticated peer");
                let failure = Failure::said(ProxyError::Forbidden, format!("{who} denied by {by}"));
                Err(self.fail(ctx, failure))
            }
        }
    }

    /// Outbound: the Service (by authority, or the listener's), then its matching rule.
    fn route<B>(&self, ctx: &mut RequestCtx, req: &Request<B>, configured: &mut Option<Filters>) -> Stage<Routed> {
        let snapshot = self.shared.config.load();
        configured.clone_from(&snapshot.filters);
        self.received(ctx, req, configured);
        let service = match &self.target {
            Target::Upstream(name) => snapshot.service(name),
            _ => authority(req).and_then(|a| snapshot.service_for_host(a)),
        };
        let Some(service) = service else {
            let detail = authority(req).unwrap_or("(none)").to_string();
            return Err(self.fail(ctx, Failure::said(ProxyError::UnknownAuthority, detail)));
        };
        if req.method() == Method::CONNECT {
            ctx.destination = Some(service.name.clone());
            return Ok(Routed::Tunnel(service.balancer.clone()));
        }
        match service.route(req) {
            Some(rule) => Ok(Routed::Rule(rule.clone())),
            None => {
                let detail = format!("{} {}", req.method(), req.uri().path());
                Err(self.fail(ctx, Failure::said(ProxyError::NoRoute, detail)))
            }
        }
    }

    /// The filters' first look at the request, once the snapshot (and its filters) is read.
    fn received<B>(&self, ctx: &mut RequestCtx, req: &Request<B>, configured: &Option<Filters>) {
        let head = ReceivedHead::of(req);
        for filter in RequestFilters::new(&self.shared.filters, configured).iter() {
            filter.request_received(ctx, &head);
        }
    }

    /// The Service's inbound limit, then the route's RateLimit filters.
    fn rate_limit<B>(
        &self,
        ctx: &mut RequestCtx,
        req: &Request<B>,
        rule: &Rule,
        inbound: Option<&RateLimits>,
    ) -> Stage<()> {
        for rate_limits in [inbound, rule.rate_limits.as_deref()].into_iter().flatten() {
            let peer = self.peer.as_deref();
            if let Some(resp) = rate_limits.check(req.headers(), self.client.ip(), peer, ctx.grpc) {
                self.shared
                    .metrics
                    .proxy_error(self.direction, ProxyError::RateLimited.reason());
                ctx.error = Some(ProxyError::RateLimited.reason());
                return Err(resp);
            }
        }
        Ok(())
    }

    /// Hop-by-hop headers out, a permitted upgrade kept, then this proxy's filters
    /// (`crate::filter`).
    fn request_filters<B>(
        &self,
        ctx: &mut RequestCtx,
        mut req: Request<B>,
        rule: &Rule,
        filters: RequestFilters<'_>,
    ) -> Stage<(Parts, B, ClientUpgrade)> {
        let upgrade = tunnelled_upgrade(&req, &rule.upgrades, self.peer.is_some()).cloned();
        let client_upgrade = upgrade.map(|protocol| (hyper::upgrade::on(&mut req), protocol));
        let (mut parts, body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        if let Some((_, protocol)) = &client_upgrade {
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(header::UPGRADE, protocol.clone());
        }
        for filter in filters.iter() {
            if let Some(resp) = filter.request_head(ctx, &mut parts) {
                return Err(resp);
            }
        }
        Ok((parts, body, client_upgrade))
    }

    /// The tries (see [`Dispatch`]), with this proxy's settings and identity.
    fn dispatch<'a>(&'a self, rule: &'a Rule, filters: RequestFilters<'a>) -> Dispatch<'a> {
        Dispatch {
            rule,
            connect_timeout: self.shared.limits.connect_timeout,
            max_retry_body_bytes: self.shared.limits.max_retry_body_bytes,
            mesh_tls: self.shared.tls.load_full(),
            metrics: &self.shared.metrics,
            filters,
        }
    }

    /// The route's response filters, then the upgrade (a tunnel) or hop-by-hop headers out.
    fn response_filters(
        &self,
        ctx: &mut RequestCtx,
        resp: &mut Response<Body>,
        rule: &Rule,
        client_upgrade: ClientUpgrade,
    ) {
        if let Some(filters) = &rule.filters {
            filters.on_response(resp);
        }
        let asked = client_upgrade.as_ref().map(|(_, protocol)| protocol);
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS && !switched_as_asked(resp, asked) {
            // A switch nobody asked for (an upgrade the proxy stripped, or another protocol
            // than the one offered) would make the connection a tunnel the proxy cannot read.
            let detail = "101 Switching Protocols to a protocol the proxy did not ask for";
            *resp = self.fail(ctx, Failure::said(ProxyError::UpstreamFailed, detail));
            return;
        }
        match client_upgrade {
            Some((client, _)) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
                let upstream = hyper::upgrade::on(&mut *resp);
                let connection = self.connection(ctx, ConnectionKind::Upgrade);
                tokio::spawn(async move {
                    match tokio::try_join!(client, upstream) {
                        Ok((client, upstream)) => {
                            connection.splice(TokioIo::new(client), TokioIo::new(upstream)).await;
                        }
                        Err(e) => tracing::debug!(error = %e, "upgrade failed"),
                    }
                });
            }
            _ => strip_hop_by_hop(resp.headers_mut()),
        }
    }

    /// Counts the response and runs the filters' response phase; the caller then hands it to
    /// [`crate::listen::complete::watch`], which completes the request's event.
    fn finish(&self, ctx: &mut RequestCtx, resp: &mut Response<Body>, filters: RequestFilters<'_>) {
        if let Some(route) = &ctx.route {
            route.response(resp.status().as_u16());
            route.duration.observe(ctx.start.elapsed().as_secs_f64());
        }
        for filter in filters.iter() {
            filter.response_head(ctx, resp);
        }
    }

    /// The proxy's own answer: counted, noted in the request's context, worded.
    fn fail(&self, ctx: &mut RequestCtx, failure: Failure) -> Response<Body> {
        self.shared.metrics.proxy_error(self.direction, failure.error.reason());
        ctx.error = Some(failure.error.reason());
        failure.response(ctx.grpc)
    }

    /// `CONNECT service:port`: a TCP tunnel to one of the service's endpoints.
    async fn tunnel<B>(&self, ctx: &mut RequestCtx, req: &mut Request<B>, balancer: &Balancer) -> Response<Body> {
        let tls = self.shared.tls.load_full();
        let service = ctx.destination.clone().unwrap_or_default();
        let timeout = self.shared.limits.connect_timeout;
        let (upstream, addr) = match tcp::connect_any(&service, balancer, timeout, tls.as_deref()).await {
            Ok(connected) => connected,
            Err(failure) => {
                // CONNECT errors are plain HTTP, whatever the content type says.
                ctx.grpc = false;
                return self.fail(ctx, failure);
            }
        };
        ctx.endpoint = Some(addr);
        ctx.tries = 1;
        let on_upgrade = hyper::upgrade::on(req);
        let connection = self.connection(ctx, ConnectionKind::Connect);
        tokio::spawn(async move {
            match on_upgrade.await {
                Ok(client) => connection.splice(TokioIo::new(client), upstream).await,
                Err(e) => tracing::debug!(error = %e, "CONNECT upgrade failed"),
            }
        });
        Response::new(Body::Empty)
    }

    /// An opaque connection this request turns into, reported when it closes.
    fn connection(&self, ctx: &RequestCtx, kind: ConnectionKind) -> tcp::Connection {
        let mut event = ConnectionEvent::start(kind, self.direction, self.client, self.peer.clone());
        event.destination = ctx.destination.clone();
        event.upstream = ctx.endpoint;
        tcp::Connection {
            event,
            metrics: self.shared.metrics.tcp(self.direction, kind.as_str()),
            report: self.shared.clone(),
        }
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
