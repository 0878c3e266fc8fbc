//! Sending a routed request upstream: the tries. Usable without a server (a library caller
//! gives it a request head and any body).
//!
//! Each try, in order: load shedding (adaptive concurrency), the circuit breaker, the
//! balancer's pick (avoiding the endpoint that just failed), the upstream decision (mesh
//! peer or not, wire version), the send under the per-try timeout, outlier detection's
//! observation, then the retry decision: the route's policy, the body's replayability, the
//! BackendPolicy's retry budget and `maxRetries`, and the backoff. A failed connect moves to
//! another endpoint, and a stream an HTTP/2 upstream refused unprocessed is sent again,
//! neither counted as a retry. The whole request is bounded by `ctx.deadline`.

pub mod request_body;
#[cfg(test)]
mod tests;

use crate::balance::{InFlight, Unreachable};
use crate::filter::RequestFilters;
use crate::http::body::{Body, ClientBody};
pub use crate::http::errors::Failure;
use crate::http::errors::{Cause, ProxyError};
use crate::http::pool::{self, RetryClass};
use crate::http::request::{build_request, upstream_version, ORIG_PROTO};
use crate::http::saved_head::SavedHead;
use crate::identity::upstream::{Carry, Upstream};
use crate::identity::MeshTls;
use crate::route::rule::{RetryPolicy, Rule};
use crate::telemetry::event::RequestCtx;
use crate::telemetry::metrics::Metrics;
use crate::telemetry::trace_context::TryOutcome;
use http::request::Parts;
use http::{HeaderMap, Response, Version};
use request_body::{NoReplay, RequestBody};
use std::sync::Arc;
use std::time::Duration;

/// An HTTP/2 upstream's refusals of a stream, sent again each time, at most this many.
const MAX_REFUSED: usize = 3;

/// What the tries of one request need besides the request.
pub struct Dispatch<'a> {
    pub rule: &'a Rule,
    pub connect_timeout: Duration,
    /// Bodies up to this size are kept for a retry.
    pub max_retry_body_bytes: u64,
    /// This proxy's mesh identity, if it has one.
    pub mesh_tls: Option<Arc<MeshTls>>,
    pub metrics: &'a Metrics,
    pub filters: RequestFilters<'a>,
}

impl Dispatch<'_> {
    /// Sends the request to the rule's backends, retrying as its policies allow. `upgrade`:
    /// the head asks for a protocol upgrade the route lets through (never retried). Each
    /// try is reported into `ctx` (tries, endpoint, destination).
    pub async fn send<B: Into<ClientBody>>(
        &self,
        ctx: &mut RequestCtx,
        mut parts: Parts,
        body: B,
        upgrade: bool,
    ) -> Result<Response<Body>, Failure> {
        let rule = self.rule;
        // A body kept in memory can be sent again; a streamed one only once, unless a copy
        // of it is kept as it streams (its length unknown up front, e.g. gRPC).
        let retry = rule.retry.as_ref().filter(|_| !upgrade);
        let mesh_tls = self.mesh_tls.as_ref();
        let mirrors = |body: crate::route::mirror::MirrorBody<'_>| match &rule.filters {
            Some(filters) => filters.mirror(&parts, &body, self.connect_timeout, mesh_tls),
            None => Vec::new(),
        };
        let too_large = || self.skipped_body_too_large();
        // Most requests have no body: kept as it is, without another future to wait on.
        let mut body = match RequestBody::ended(body.into()) {
            Ok(kept) => {
                // Their mirrors have nothing to copy.
                if let RequestBody::Kept(bytes) = &kept {
                    mirrors(crate::route::mirror::MirrorBody::Kept(bytes));
                }
                kept
            }
            Err(body) => {
                let limit = self.max_retry_body_bytes;
                Box::pin(RequestBody::prepare(body, retry.is_some(), limit, mirrors, too_large)).await?
            }
        };
        // An inbound request that crossed the mesh as HTTP/2 says what its client spoke.
        let client_version = match parts.headers.remove(&ORIG_PROTO) {
            Some(v) if v.as_bytes() == b"HTTP/1.1" => Version::HTTP_11,
            _ => parts.version,
        };
        let (start, deadline) = (ctx.start, ctx.deadline);
        let tries = Tries {
            dispatch: self,
            retry,
            client_version,
            upgrade,
            head: Some(parts),
            saved: None,
        };
        // Pinned in place: the timeout below wraps a pointer to it, not a second copy.
        let tries = std::pin::pin!(tries.run(ctx, &mut body));
        match deadline {
            Some(d) => match tokio::time::timeout_at((start + d).into(), tries).await {
                Ok(r) => r,
                Err(_) => Err(Failure::new(ProxyError::Timeout, Cause::RequestTimeout(d))),
            },
            None => tries.await,
        }
    }

    fn skipped_body_too_large(&self) {
        self.metrics
            .retries_skipped
            .with_label_values(&["body_too_large"])
            .inc();
    }
}

/// The state the tries of one request share.
struct Tries<'a, 'd> {
    dispatch: &'a Dispatch<'d>,
    retry: Option<&'a RetryPolicy>,
    client_version: Version,
    upgrade: bool,
    /// The request head is moved into the first try; it is saved only when a retry may
    /// need it again, and handed back by a failed connect.
    head: Option<Parts>,
    saved: Option<SavedHead>,
}

impl Tries<'_, '_> {
    async fn run(mut self, ctx: &mut RequestCtx, body: &mut RequestBody) -> Result<Response<Body>, Failure> {
        let rule = self.dispatch.rule;
        let upgrade = self.upgrade;
        let mut unreachable = Unreachable::default();
        let mut retries = 0u32;
        // Tries an HTTP/2 upstream refused unprocessed.
        let mut refused = 0usize;
        // A retry avoids the endpoint that just failed when another one is left.
        let mut avoid: Option<std::net::SocketAddr> = None;
        let mut _retry_permit = None;
        let mut priority = None;
        loop {
            let backend = rule.backend();
            let version = upstream_version(backend.protocol, self.client_version, upgrade);
            // BackendPolicy adaptive concurrency: room for this request's priority, or a
            // fast 503 (load shedding).
            let mut shed_permit = match backend.policy.as_ref().filter(|p| p.shed.is_some()) {
                Some(p) => {
                    let priority = *priority.get_or_insert_with(|| {
                        let headers = self.head.as_ref().map(|h| &h.headers);
                        crate::resilience::shed::request_priority(headers, rule.priority)
                    });
                    p.shed(priority)
                        .map_err(|detail| Failure::said(ProxyError::LoadShed, detail))?
                }
                None => None,
            };
            // BackendPolicy circuit breaker: a slot for this try, or 503 at once.
            let _permit = match &backend.policy {
                Some(p) => p
                    .admit(version == Version::HTTP_11, retries == 0 && unreachable.is_empty())
                    .await
                    .map_err(|detail| Failure::said(ProxyError::CircuitOpen, detail))?,
                None => None,
            };
            let tried = unreachable.addrs();
            let picked = match avoid.take() {
                Some(prev) if backend.balancer.len() > 1 => {
                    let mut exclude = tried.to_vec();
                    exclude.push(prev);
                    backend.balancer.pick(&exclude).or_else(|| backend.balancer.pick(tried))
                }
                _ => backend.balancer.pick(tried),
            };
            let Some(endpoint) = picked else {
                return Err(if backend.balancer.is_empty() {
                    let service = backend.service.clone();
                    let cause = match &backend.subset {
                        // A subset's balancer is empty when no endpoint has its labels,
                        // however many the service has: say which subset.
                        Some(subset) => Cause::NoneInSubset(service, subset.clone()),
                        None => Cause::NoEndpoints(service),
                    };
                    Failure::new(ProxyError::NoEndpoints, cause)
                } else {
                    let cause = Cause::NoReachableEndpoint(backend.service.clone());
                    Failure::new(ProxyError::ConnectFailed, cause)
                });
            };
            let endpoint = endpoint.clone();
            let have_head = self.head.is_some() || self.saved.is_some();
            let Some(try_body) = body.for_try().filter(|_| have_head) else {
                return Err(Failure::new(ProxyError::UpstreamFailed, Cause::BodyAlreadySent));
            };
            // The head goes to this try; a copy stays for the next one when the body can
            // be sent again. (The first try gets the original: hyper parses the response
            // into its header map's allocation, already sized for this traffic.)
            let parts = match self.head.take() {
                Some(parts) => parts,
                None => self.saved.as_ref().expect("checked above").to_parts(),
            };
            // `version` is what the destination app speaks; a peer proxy restores it.
            let carry = if upgrade { Carry::Upgrade } else { Carry::Http };
            let upstream = Upstream::new(&endpoint, self.dispatch.mesh_tls.as_deref(), version, carry);
            // Kept for a retry, or for an HTTP/2 stream refused unprocessed.
            if !body.streamed_once()
                && self.saved.is_none()
                && (self.retry.is_some() || upstream.version == Version::HTTP_2)
            {
                self.saved = Some(SavedHead::new(&parts));
            }
            let mut upstream_req = build_request(parts, upstream.version, try_body);
            // The upstream gets what is left of the deadline (gRPC: `grpc-timeout`).
            if let Some(d) = ctx.deadline.filter(|_| ctx.grpc) {
                crate::resilience::deadline::propagate(upstream_req.headers_mut(), ctx.start + d);
            }
            upstream.mark(upstream_req.headers_mut());
            ctx.tries += 1;
            ctx.endpoint = Some(endpoint.addr);
            if !ctx
                .destination
                .as_ref()
                .is_some_and(|d| Arc::ptr_eq(d, &backend.service))
            {
                ctx.destination = Some(backend.service.clone());
            }
            for filter in self.dispatch.filters.iter() {
                filter.upstream_request(ctx, &mut upstream_req);
            }
            let in_flight = InFlight::start(&endpoint);
            let settings = pool::PoolSettings::new(
                self.dispatch.connect_timeout,
                backend.policy.as_ref().and_then(|p| p.spec.connection_pool.as_deref()),
            );
            let send = std::pin::pin!(pool::send(
                upstream.addr,
                upstream.version,
                upstream_req,
                settings,
                upgrade,
                upstream.mesh
            ));
            let outcome = match rule.try_timeout {
                Some(t) => tokio::time::timeout(t, send).await.ok(),
                None => Some(send.await),
            };
            ctx.try_ended(|| try_outcome(&outcome));
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
                if !can_retry(self.retry, retries, status, headers) {
                    return false;
                }
                match body.replay() {
                    Ok(()) => {}
                    Err(NoReplay::TooLarge) => {
                        self.dispatch.skipped_body_too_large();
                        return false;
                    }
                    // Counted when it started.
                    Err(NoReplay::Streamed) => return false,
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
                Some(Err(e)) => {
                    let class = e.retry_class();
                    let (error, unsent) = e.into_parts();
                    match class {
                        RetryClass::Elsewhere => {
                            if let Some(req) = unsent {
                                let (parts, unsent_body) = req.into_parts();
                                self.head = Some(parts);
                                body.give_back(unsent_body);
                            }
                            if !unreachable.connect_failed(&endpoint, &backend.balancer) {
                                let cause = Cause::Connect(endpoint.addr, error);
                                return Err(Failure::new(ProxyError::ConnectFailed, cause));
                            }
                            continue;
                        }
                        RetryClass::Resend => {
                            // Sent again (a new connection if that one is going away).
                            refused += 1;
                            let body_kept = body.replay().is_ok();
                            if refused > MAX_REFUSED || self.saved.is_none() || !body_kept {
                                let cause = Cause::Upstream(endpoint.addr, error);
                                return Err(Failure::new(ProxyError::UpstreamFailed, cause));
                            }
                            tracing::debug!(endpoint = %endpoint.addr, %error, "stream refused: sending again");
                            continue;
                        }
                        RetryClass::Never => {
                            return Err(Failure::new(ProxyError::BadRequest, Cause::ClientBody(error)));
                        }
                        RetryClass::ByPolicy(status) => {
                            if !may_retry(status, None) {
                                let cause = Cause::Upstream(endpoint.addr, error);
                                return Err(Failure::new(ProxyError::UpstreamFailed, cause));
                            }
                            status
                        }
                    }
                }
                None => {
                    if !may_retry(504, None) {
                        let cause = Cause::NoAnswerInTime(endpoint.addr);
                        return Err(Failure::new(ProxyError::Timeout, cause));
                    }
                    504
                }
            };
            retries += 1;
            avoid = Some(endpoint.addr);
            rule.metrics.retries.inc();
            tracing::debug!(status, retries, endpoint = %endpoint.addr, "retrying");
            if let Some(policy) = self.retry {
                tokio::time::sleep(policy.backoff.saturating_mul(1 << (retries - 1).min(6))).await;
            }
        }
    }
}

/// A try's end as its trace span reports it.
fn try_outcome(outcome: &Option<Result<Response<Body>, pool::SendError>>) -> TryOutcome {
    match outcome {
        Some(Ok(resp)) => TryOutcome::Answered(resp.status().as_u16()),
        Some(Err(e)) => TryOutcome::Failed(match e.retry_class() {
            RetryClass::Elsewhere => "connect_failed",
            RetryClass::Resend => "stream_refused",
            RetryClass::Never => "client_body_failed",
            RetryClass::ByPolicy(_) => "upstream_failed",
        }),
        None => TryOutcome::TimedOut,
    }
}

fn can_retry(policy: Option<&RetryPolicy>, retries: u32, status: u16, headers: Option<&HeaderMap>) -> bool {
    policy.is_some_and(|p| retries < p.attempts && p.retries(status, headers))
}
