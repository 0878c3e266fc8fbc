//! Active health checks (`BackendPolicy.healthCheck`): one checker task per (Service,
//! endpoint) for the whole proxy, on the main runtime, started and stopped as snapshots
//! change. A checker publishes its verdict in the endpoint's `EndpointStats`
//! (`ActiveHealth`, an atomic count of checkers that find it unhealthy); workers only read
//! that atomic when they balance. Endpoints start healthy; `unhealthyThreshold` failed
//! checks in a row take one out of balancing (unless nothing else is left), and
//! `healthyThreshold` passes in a row bring it back.

use crate::balance::health::Target;
use crate::config::snapshot::Snapshot;
use crate::http::body::Body;
use crate::http::pool::{self, PoolSettings, SendError};
use crate::identity::upstream::{Carry, Upstream};
use crate::identity::TlsHandle;
use crate::telemetry::metrics::Metrics;
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Version};
use http_body_util::BodyExt;
use prometheus::{IntCounter, IntGauge};
use smesh_model::{HealthCheck, Protocol};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How often the checker looks for a new snapshot.
const RECONCILE_EVERY: Duration = Duration::from_millis(200);

type Key = (Arc<str>, SocketAddr, usize, HealthCheck);

struct Running(JoinHandle<()>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub struct HealthChecks {
    pub config: Arc<ArcSwap<Snapshot>>,
    pub metrics: Arc<Metrics>,
    pub tls: TlsHandle,
    pub connect_timeout: Duration,
}

impl HealthChecks {
    /// Runs until `stop`; every checker is stopped with it.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut running: HashMap<Key, Running> = HashMap::new();
        let mut generation = u64::MAX;
        loop {
            let snapshot = self.config.load();
            if snapshot.generation != generation {
                generation = snapshot.generation;
                let mut wanted: HashMap<Key, Target> = HashMap::new();
                for t in snapshot.health_targets() {
                    let key = (
                        t.service.clone(),
                        t.endpoint.addr,
                        Arc::as_ptr(&t.endpoint.stats) as usize,
                        t.spec.clone(),
                    );
                    wanted.insert(key, t);
                }
                running.retain(|k, _| wanted.contains_key(k));
                for (key, target) in wanted {
                    if running.contains_key(&key) {
                        continue;
                    }
                    let checker = Checker::new(target, &self);
                    running.insert(key, Running(tokio::spawn(checker.run())));
                }
            }
            drop(snapshot);
            tokio::select! {
                _ = tokio::time::sleep(RECONCILE_EVERY) => {}
                _ = stop.changed() => break,
            }
        }
    }
}

struct Checker {
    target: Target,
    tls: TlsHandle,
    connect_timeout: Duration,
    success: IntCounter,
    failure: IntCounter,
    unhealthy: IntGauge,
}

/// Marks the endpoint unhealthy while held; undone when the checker stops.
struct Verdict<'a> {
    checker: &'a Checker,
    unhealthy: bool,
}

impl Verdict<'_> {
    fn set(&mut self, unhealthy: bool) {
        if self.unhealthy == unhealthy {
            return;
        }
        self.unhealthy = unhealthy;
        let c = self.checker;
        let counter = &c.target.endpoint.stats.active.unhealthy;
        if unhealthy {
            counter.fetch_add(1, Relaxed);
            c.unhealthy.inc();
        } else {
            counter.fetch_sub(1, Relaxed);
            c.unhealthy.dec();
        }
    }
}

impl Drop for Verdict<'_> {
    fn drop(&mut self) {
        self.set(false);
    }
}

impl Checker {
    fn new(target: Target, hc: &HealthChecks) -> Self {
        let m = &hc.metrics.resilience;
        let service = &*target.service;
        Checker {
            success: m.health_checks.with_label_values(&[service, "success"]),
            failure: m.health_checks.with_label_values(&[service, "failure"]),
            unhealthy: m.unhealthy_endpoints.with_label_values(&[service]),
            tls: hc.tls.clone(),
            connect_timeout: hc.connect_timeout,
            target,
        }
    }

    async fn run(self) {
        let s = &self.target.spec;
        let interval = s.interval.unwrap_or(HealthCheck::DEFAULT_INTERVAL);
        let timeout = s.timeout.unwrap_or(HealthCheck::DEFAULT_TIMEOUT);
        let unhealthy_after = s
            .unhealthy_threshold
            .unwrap_or(HealthCheck::DEFAULT_UNHEALTHY_THRESHOLD);
        let healthy_after = s.healthy_threshold.unwrap_or(HealthCheck::DEFAULT_HEALTHY_THRESHOLD);
        // Spread the checks of many endpoints over the first interval.
        let jitter = interval.mul_f64(rand::random_range(0.0..0.1));
        tokio::time::sleep(jitter).await;
        let mut verdict = Verdict {
            checker: &self,
            unhealthy: false,
        };
        let (mut passes, mut fails) = (0u32, 0u32);
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let result = match tokio::time::timeout(timeout, self.probe()).await {
                Ok(r) => r,
                Err(_) => Err(format!("no answer within {}", humantime::format_duration(timeout))),
            };
            let addr = self.target.endpoint.addr;
            match result {
                Ok(()) => {
                    self.success.inc();
                    fails = 0;
                    passes = passes.saturating_add(1);
                    if verdict.unhealthy && passes >= healthy_after {
                        verdict.set(false);
                        tracing::info!(service = %self.target.service, endpoint = %addr, "health check passes: endpoint back in rotation");
                    }
                }
                Err(why) => {
                    self.failure.inc();
                    passes = 0;
                    fails = fails.saturating_add(1);
                    if !verdict.unhealthy && fails >= unhealthy_after {
                        verdict.set(true);
                        tracing::warn!(service = %self.target.service, endpoint = %addr, reason = %why, "health check fails: endpoint removed from rotation");
                    } else {
                        tracing::debug!(service = %self.target.service, endpoint = %addr, reason = %why, "health check failed");
                    }
                }
            }
        }
    }

    async fn probe(&self) -> Result<(), String> {
        let s = &self.target.spec;
        let addr = self.target.endpoint.addr;
        if s.tcp.is_some() {
            return tokio::net::TcpStream::connect(addr)
                .await
                .map(drop)
                .map_err(|e| format!("connect: {e}"));
        }
        if let Some(g) = &s.grpc {
            let body = grpc_frame(&health_request(&g.service));
            let mut req = self.request(Method::POST, "/grpc.health.v1.Health/Check", Version::HTTP_2, body);
            let h = req.headers_mut();
            h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            h.insert(http::header::TE, HeaderValue::from_static("trailers"));
            let resp = self.send(req, Version::HTTP_2).await?;
            if resp.status() != http::StatusCode::OK {
                return Err(format!("HTTP status {}", resp.status()));
            }
            let early = resp.headers().get("grpc-status").cloned();
            let collected = resp.into_body().collect().await.map_err(|e| format!("reading: {e}"))?;
            let status = early.or_else(|| collected.trailers().and_then(|t| t.get("grpc-status").cloned()));
            match status.as_ref().map(|v| v.as_bytes()) {
                Some(b"0") => {}
                Some(other) => return Err(format!("grpc-status {}", String::from_utf8_lossy(other))),
                None => return Err("no grpc-status".into()),
            }
            return match serving_status(&collected.to_bytes()) {
                Some(1) => Ok(()),
                other => Err(format!("serving status {other:?} (1 is SERVING)")),
            };
        }
        let Some(x) = &s.http else {
            return Ok(());
        };
        let version = match self.target.protocol {
            Some(Protocol::Http2 | Protocol::Grpc) => Version::HTTP_2,
            _ => Version::HTTP_11,
        };
        let req = self.request(Method::GET, &x.path, version, Bytes::new());
        let resp = self.send(req, version).await?;
        let status = resp.status().as_u16();
        // Read the body so the connection can be used again.
        let _ = http_body_util::Limited::new(resp.into_body(), 64 * 1024)
            .collect()
            .await;
        let expected: &[u16] = if x.expected_statuses.is_empty() {
            &[200]
        } else {
            &x.expected_statuses
        };
        if expected.contains(&status) {
            Ok(())
        } else {
            Err(format!("HTTP status {status}"))
        }
    }

    fn request(&self, method: Method, path: &str, version: Version, body: Bytes) -> Request<Body> {
        let mut req = Request::new(Body::full(body));
        *req.method_mut() = method;
        *req.version_mut() = version;
        *req.uri_mut() = path.parse().unwrap_or_else(|_| http::Uri::from_static("/"));
        if let Ok(host) = HeaderValue::from_str(&self.target.service) {
            req.headers_mut().insert(http::header::HOST, host);
        }
        req.headers_mut()
            .insert(http::header::USER_AGENT, HeaderValue::from_static("smesh-health-check"));
        req
    }

    /// Over mesh mTLS (HTTP/2) when the endpoint is a peer proxy, as requests are.
    async fn send(&self, req: Request<Body>, app_version: Version) -> Result<http::Response<Body>, String> {
        let tls = self.tls.load_full();
        let upstream = Upstream::new(&self.target.endpoint, tls.as_deref(), app_version, Carry::Http);
        let (mut parts, body) = req.into_parts();
        upstream.mark(&mut parts.headers);
        let req = crate::http::request::build_request(parts, upstream.version, body);
        let settings = PoolSettings::new(self.connect_timeout, None);
        match pool::send(upstream.addr, upstream.version, req, settings, false, upstream.mesh).await {
            Ok(resp) => Ok(resp),
            Err(SendError::Connect(e, _)) => Err(format!("connect: {e}")),
            Err(SendError::Upstream(e) | SendError::Refused(e)) => Err(format!("exchange: {e}")),
        }
    }
}

/// `grpc.health.v1.HealthCheckRequest { string service = 1; }`.
fn health_request(service: &str) -> Vec<u8> {
    if service.is_empty() {
        return Vec::new();
    }
    let mut out = vec![0x0a];
    let mut n = service.len();
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
    out.extend_from_slice(service.as_bytes());
    out
}

fn grpc_frame(message: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(5 + message.len());
    out.push(0);
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    Bytes::from(out)
}

/// `HealthCheckResponse.status` (field 1, an enum) from a length-prefixed message; a
/// message without the field is 0 (UNKNOWN).
fn serving_status(body: &[u8]) -> Option<u64> {
    let message = body.get(5..)?;
    let mut i = 0;
    let mut status = 0;
    while i < message.len() {
        let (tag, used) = varint(&message[i..])?;
        i += used;
        match tag & 7 {
            0 => {
                let (v, used) = varint(&message[i..])?;
                i += used;
                if tag >> 3 == 1 {
                    status = v;
                }
            }
            2 => {
                let (len, used) = varint(&message[i..])?;
                i += used + len as usize;
            }
            1 => i += 8,
            5 => i += 4,
            _ => return None,
        }
    }
    Some(status)
}

fn varint(b: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, byte) in b.iter().enumerate().take(10) {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_health_messages() {
        assert_eq!(health_request(""), Vec::<u8>::new());
        assert_eq!(health_request("api"), b"\x0a\x03api");
        let frame = grpc_frame(b"\x0a\x03api");
        assert_eq!(&frame[..5], &[0, 0, 0, 0, 5]);
        assert_eq!(serving_status(b"\0\0\0\0\x02\x08\x01"), Some(1));
        assert_eq!(serving_status(b"\0\0\0\0\x02\x08\x02"), Some(2));
        assert_eq!(serving_status(b"\0\0\0\0\0"), Some(0));
        assert_eq!(serving_status(b""), None);
    }
}
