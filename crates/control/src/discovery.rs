//! The Discovery gRPC service: one stream per proxy. It registers the proxy's endpoint under
//! a lease it keeps alive while the stream lives, pushes every new snapshot, and records
//! acks and nacks.

use crate::feed::Feed;
use crate::keys;
use crate::registry::{ProxyStatus, Registration};
use crate::stats::{Reporter, Ring};
use crate::store::{Compare, LeaseId, Op, Store, StoreError};
use crate::tls::PeerCertificate;
use smesh_api::v1::discovery_server::Discovery;
use smesh_api::v1::{proxy_message, ConfigSnapshot, Hello, ProxyMessage};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

pub struct DiscoveryService {
    pub store: Arc<dyn Store>,
    pub feed: Feed,
    pub default_ttl: Duration,
    /// This replica's address, shown in `smesh get proxies`.
    pub replica: String,
    /// With TLS: the trust domain whose proxy certificates a stream must present. The
    /// certificate, not the Hello, then says which service's endpoint a proxy may register.
    pub authenticate: Option<String>,
    /// Where the proxies' golden-metric windows go.
    pub stats: Arc<Ring>,
}

/// Checks the client certificate of a stream against what its Hello claims, and fills in
/// the endpoint's identity from it. Returns when the certificate expires.
fn authenticate(trust_domain: &str, peer: Option<&PeerCertificate>, hello: &mut Hello) -> Result<SystemTime, Status> {
    let Some(peer) = peer else {
        return Err(Status::unauthenticated(
            "this control plane requires the proxy's mesh certificate: start the proxy with --token-file \
             (a join token from `smesh token create`) and --service",
        ));
    };
    let id = smesh_model::SpiffeId::parse(&peer.spiffe_id).filter(|id| id.trust_domain() == trust_domain);
    let Some(service) = id.as_ref().map(|id| id.service()) else {
        return Err(Status::permission_denied(format!(
            "certificate {} is not a proxy identity of trust domain {trust_domain}",
            peer.spiffe_id
        )));
    };
    if let Some(endpoint) = hello.endpoint.as_mut().filter(|e| !e.service.is_empty()) {
        if endpoint.service != service {
            return Err(Status::permission_denied(format!(
                "certificate {} cannot register an endpoint of service {:?}",
                peer.spiffe_id, endpoint.service
            )));
        }
        endpoint.identity = peer.spiffe_id.clone();
    }
    Ok(peer.not_after)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn status_error(e: StoreError) -> Status {
    Status::unavailable(format!("store: {e}"))
}

#[tonic::async_trait]
impl Discovery for DiscoveryService {
    type StreamStream = ReceiverStream<Result<ConfigSnapshot, Status>>;

    async fn stream(&self, request: Request<Streaming<ProxyMessage>>) -> Result<Response<Self::StreamStream>, Status> {
        let peer = request.extensions().get::<PeerCertificate>().cloned();
        let mut inbound = request.into_inner();
        let mut hello = match inbound.message().await? {
            Some(ProxyMessage {
                kind: Some(proxy_message::Kind::Hello(hello)),
            }) => hello,
            _ => return Err(Status::invalid_argument("the first message on a stream must be Hello")),
        };
        if hello.proxy_id.is_empty() || hello.proxy_id.contains('/') {
            return Err(Status::invalid_argument(
                "Hello.proxy_id must be non-empty and contain no '/'",
            ));
        }
        let expires = match &self.authenticate {
            Some(trust_domain) => Some(authenticate(trust_domain, peer.as_ref(), &mut hello).inspect_err(|e| {
                tracing::warn!(proxy = %hello.proxy_id, reason = %e.message(), "proxy stream refused");
            })?),
            None => None,
        };
        let ttl = match hello.lease_ttl_ms {
            0 => self.default_ttl,
            ms => Duration::from_millis(ms).clamp(Duration::from_secs(1), Duration::from_secs(300)),
        };
        let session = Session::open(self.store.clone(), hello, ttl, self.replica.clone())
            .await
            .map_err(status_error)?;
        let (tx, rx) = mpsc::channel(4);
        let feed = self.feed.clone();
        tokio::spawn(session.run(inbound, feed, tx, expires, self.stats.clone()));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

struct Session {
    store: Arc<dyn Store>,
    hello: Hello,
    ttl: Duration,
    lease: LeaseId,
    status: ProxyStatus,
    /// The newest status write, taken by the session's status writer task.
    status_tx: watch::Sender<Option<Op>>,
}

/// Writes a session's status as it changes, newest first; stops when the session ends.
async fn write_statuses(store: Arc<dyn Store>, mut rx: watch::Receiver<Option<Op>>, proxy_id: String) {
    while rx.changed().await.is_ok() {
        let Some(op) = rx.borrow_and_update().clone() else {
            continue;
        };
        if let Err(e) = store.txn(Vec::new(), vec![op]).await {
            tracing::warn!(proxy = %proxy_id, error = %e, "cannot record proxy status");
        }
    }
}

impl Session {
    async fn open(store: Arc<dyn Store>, hello: Hello, ttl: Duration, replica: String) -> Result<Self, StoreError> {
        let endpoint = hello.endpoint.clone().unwrap_or_default();
        let status = ProxyStatus {
            proxy_id: hello.proxy_id.clone(),
            version: hello.version.clone(),
            service: endpoint.service.clone(),
            address: endpoint.address.clone(),
            identity: endpoint.identity.clone(),
            admin: hello.admin_address.clone(),
            control: replica,
            last_seen: now_secs(),
            ..Default::default()
        };
        let (status_tx, status_rx) = watch::channel(None);
        tokio::spawn(write_statuses(store.clone(), status_rx, hello.proxy_id.clone()));
        let mut session = Session {
            store,
            hello,
            ttl,
            lease: 0,
            status,
            status_tx,
        };
        session.register().await?;
        Ok(session)
    }

    /// Puts the proxy's status (and endpoint, if any) under a fresh lease.
    async fn register(&mut self) -> Result<(), StoreError> {
        self.lease = self.store.grant_lease(self.ttl).await?;
        let mut ops = vec![self.status_op()];
        if let Some(e) = self.hello.endpoint.as_ref().filter(|e| !e.service.is_empty()) {
            let reg = Registration {
                service: e.service.clone(),
                address: e.address.clone(),
                labels: e.labels.clone().into_iter().collect(),
                weight: e.weight,
                proxy_id: self.hello.proxy_id.clone(),
                identity: e.identity.clone(),
            };
            let value = serde_json::to_vec(&reg).map_err(|e| StoreError::Backend(e.to_string()))?;
            ops.push(Op::Put {
                key: keys::registration(&e.service, &self.hello.proxy_id),
                value,
                lease: self.lease,
            });
            tracing::info!(service = %e.service, address = %e.address, proxy = %self.hello.proxy_id, "endpoint registered");
        }
        self.store.txn(Vec::<Compare>::new(), ops).await?;
        Ok(())
    }

    fn status_op(&self) -> Op {
        Op::Put {
            key: keys::proxy(&self.hello.proxy_id),
            value: serde_json::to_vec(&self.status).unwrap_or_default(),
            lease: self.lease,
        }
    }

    /// Hands the status to this session's writer: the push loop never waits for the store,
    /// and a burst of acks collapses into one write of the newest status.
    fn save_status(&mut self) {
        self.status.last_seen = now_secs();
        let op = self.status_op();
        self.status_tx.send_replace(Some(op));
    }

    async fn run(
        mut self,
        mut inbound: Streaming<ProxyMessage>,
        mut feed: Feed,
        tx: mpsc::Sender<Result<ConfigSnapshot, Status>>,
        expires: Option<SystemTime>,
        stats: Arc<Ring>,
    ) {
        // The Hello (checked against the certificate with TLS) says whose windows these are.
        let endpoint = self.hello.endpoint.clone().unwrap_or_default();
        let reporter = Reporter {
            proxy_id: self.hello.proxy_id.clone(),
            service: endpoint.service,
            identity: endpoint.identity,
        };
        // A stream lives no longer than the certificate that opened it: the proxy comes
        // back with its renewed one.
        let expired = async {
            match expires {
                Some(at) => tokio::time::sleep(at.duration_since(SystemTime::now()).unwrap_or_default()).await,
                None => std::future::pending().await,
            }
        };
        let mut expired = std::pin::pin!(expired);
        let mut keep_alive = tokio::time::interval(self.ttl / 3);
        keep_alive.tick().await;
        // A reconnecting proxy says what it already has, so that is not sent again.
        let mut sent = (self.hello.applied_version != 0).then_some(self.hello.applied_version);
        let mut goodbye = false;
        loop {
            let current = feed.borrow_and_update().clone();
            if let Some(current) = current.filter(|c| sent != Some(c.version)) {
                let snapshot = ConfigSnapshot {
                    version: current.version,
                    resources_yaml: bytes::Bytes::new(),
                    resources_yaml_gzip: current.gzip.clone(),
                    trust_bundle_pem: current.trust_bundle.to_string(),
                };
                if tx.send(Ok(snapshot)).await.is_err() {
                    break;
                }
                sent = Some(current.version);
                self.status.sent_version = current.version;
            }
            tokio::select! {
                changed = feed.changed() => if changed.is_err() { break },
                _ = &mut expired => {
                    let _ = tx.send(Err(Status::unauthenticated("the client certificate has expired; reconnect with the renewed one"))).await;
                    break;
                }
                _ = keep_alive.tick() => {
                    if let Err(e) = self.store.keep_alive(self.lease).await {
                        tracing::warn!(proxy = %self.hello.proxy_id, error = %e, "lease lost; registering again");
                        if let Err(e) = self.register().await {
                            tracing::error!(proxy = %self.hello.proxy_id, error = %e, "cannot register again");
                        }
                    }
                }
                message = inbound.message() => match message {
                    Ok(Some(ProxyMessage { kind: Some(proxy_message::Kind::Ack(ack)) })) => {
                        if ack.accepted {
                            self.status.acked_version = ack.version;
                        } else {
                            self.status.nacked_version = ack.version;
                            self.status.last_error = ack.error.clone();
                            tracing::warn!(proxy = %self.hello.proxy_id, version = ack.version, error = %ack.error, "proxy rejected a snapshot");
                        }
                        self.save_status();
                    }
                    Ok(Some(ProxyMessage { kind: Some(proxy_message::Kind::Stats(window)) })) => {
                        stats.ingest(&reporter, window, crate::stats::now_ms());
                    }
                    Ok(Some(ProxyMessage { kind: Some(proxy_message::Kind::Goodbye(_)) })) => {
                        goodbye = true;
                        break;
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                },
            }
        }
        if goodbye {
            // A clean stop: the endpoint leaves at once.
            if let Err(e) = self.store.revoke_lease(self.lease).await {
                tracing::warn!(proxy = %self.hello.proxy_id, error = %e, "cannot revoke lease");
            }
            tracing::info!(proxy = %self.hello.proxy_id, "proxy said goodbye");
        } else {
            // Lost: the endpoint stays until the lease expires, unless the proxy comes back.
            tracing::info!(proxy = %self.hello.proxy_id, ttl = ?self.ttl, "proxy stream ended");
        }
    }
}
