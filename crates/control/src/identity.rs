//! The Identity gRPC service (certificates for proxies) and join tokens: how they are stored
//! and spent (the admin API issues them, `POST /api/v1/tokens`).
//!
//! A join token is bound to one service, expires, and works once; only its SHA-256 is
//! stored. Renewals need no token: the proxy proves it holds a valid certificate of ours
//! for the same service and key.

use crate::ca::{Ca, CaHandle};
use crate::compose::stored_resources;
use crate::keys;
use crate::store::{Compare, Op, Store};
use serde::{Deserialize, Serialize};
use smesh_api::v1::identity_server::Identity;
use smesh_api::v1::{certify_request, CertifyRequest, CertifyResponse};
use smesh_model::{MeshConfigSpec, Resource};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tonic::{Request, Response, Status};

#[derive(Serialize, Deserialize)]
pub(crate) struct StoredToken {
    pub(crate) service: String,
    pub(crate) expires_unix: u64,
    pub(crate) used: bool,
}

#[derive(Serialize, Deserialize)]
pub struct IssuedCertificate {
    pub service: String,
    pub spiffe_id: String,
    pub serial: String,
    pub not_after_unix: u64,
    #[serde(default)]
    pub issued_unix: u64,
    pub renewal: bool,
    /// The fingerprint of the root that signed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_sha256: Option<String>,
}

pub(crate) fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

pub(crate) fn token_key(token: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.trim().as_bytes());
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("{}{hex}", keys::TOKENS)
}

pub struct IdentityService {
    pub store: Arc<dyn Store>,
    pub ca: CaHandle,
}

impl IdentityService {
    /// The certificate lifetime from the MeshConfig, if any.
    async fn certificate_ttl(&self) -> Duration {
        let ttl = match self.store.list(keys::RESOURCES).await {
            Ok((kvs, _)) => stored_resources(&kvs).into_iter().find_map(|r| match r {
                Resource::MeshConfig(m) => m.spec.certificate_ttl,
                _ => None,
            }),
            Err(_) => None,
        };
        ttl.unwrap_or(MeshConfigSpec::DEFAULT_CERTIFICATE_TTL)
    }

    /// Spends a join token for `service`; the error says why it cannot be used.
    async fn spend_token(&self, token: &str, service: &str) -> Result<(), Status> {
        let key = token_key(token);
        let unavailable = |e| Status::unavailable(format!("store: {e}"));
        let Some(kv) = self.store.get(&key).await.map_err(unavailable)? else {
            return Err(Status::permission_denied("unknown join token"));
        };
        let mut stored: StoredToken =
            serde_json::from_slice(&kv.value).map_err(|_| Status::internal("stored token is unreadable"))?;
        if stored.service != service {
            return Err(Status::permission_denied(format!(
                "join token is for service {:?}, not {service:?}",
                stored.service
            )));
        }
        if stored.used {
            return Err(Status::permission_denied("join token was already used"));
        }
        if unix(SystemTime::now()) >= stored.expires_unix {
            return Err(Status::permission_denied("join token has expired"));
        }
        stored.used = true;
        let value = serde_json::to_vec(&stored).map_err(|e| Status::internal(e.to_string()))?;
        let compare = Compare::ModRevision {
            key: key.clone(),
            equals: kv.mod_revision,
        };
        let outcome = self
            .store
            .txn(vec![compare], vec![Op::Put { key, value, lease: 0 }])
            .await
            .map_err(unavailable)?;
        if !outcome.succeeded {
            return Err(Status::permission_denied("join token was already used"));
        }
        Ok(())
    }

    async fn record(&self, ca: &Ca, cert_pem: &str, service: &str, not_after: SystemTime, renewal: bool) {
        use x509_parser::prelude::{FromDer, X509Certificate};
        let serial = crate::ca::pem_to_der(cert_pem)
            .and_then(|der| {
                X509Certificate::from_der(&der)
                    .ok()
                    .map(|(_, c)| c.raw_serial_as_string())
            })
            .unwrap_or_default();
        let issued = IssuedCertificate {
            service: service.to_string(),
            spiffe_id: crate::ca::spiffe_id(&ca.trust_domain, service),
            serial: serial.clone(),
            not_after_unix: unix(not_after),
            issued_unix: unix(SystemTime::now()),
            renewal,
            root_sha256: Some(ca.root_fingerprint()),
        };
        let ttl = not_after
            .duration_since(SystemTime::now())
            .unwrap_or_default()
            .max(Duration::from_secs(1));
        let result = async {
            let lease = self.store.grant_lease(ttl).await?;
            let key = format!("{}{service}/{}", keys::CERTIFICATES, serial.replace(':', ""));
            let value = serde_json::to_vec(&issued).unwrap_or_default();
            self.store.txn(Vec::new(), vec![Op::Put { key, value, lease }]).await
        };
        if let Err(e) = result.await {
            tracing::warn!(error = %e, "cannot record an issued certificate");
        }
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn certify(&self, request: Request<CertifyRequest>) -> Result<Response<CertifyResponse>, Status> {
        let req = request.into_inner();
        if smesh_model::validate_name(&req.service).is_err() {
            return Err(Status::invalid_argument(format!(
                "invalid service name {:?}",
                req.service
            )));
        }
        let ca = self.ca.load_full();
        let renewal = match &req.proof {
            Some(certify_request::Proof::JoinToken(token)) => {
                self.spend_token(token, &req.service).await?;
                false
            }
            Some(certify_request::Proof::CurrentCertPem(cert)) => {
                ca.verify_renewal(cert, &req.csr_pem, &req.service)
                    .map_err(Status::permission_denied)?;
                true
            }
            None => {
                return Err(Status::unauthenticated(
                    "a join token or the current certificate is required",
                ))
            }
        };
        let ttl = self.certificate_ttl().await;
        let (cert_pem, not_after) = ca
            .issue(&req.csr_pem, &req.service, ttl)
            .map_err(Status::invalid_argument)?;
        self.record(&ca, &cert_pem, &req.service, not_after, renewal).await;
        tracing::info!(service = %req.service, renewal, ttl = ?ttl, "certificate issued");
        Ok(Response::new(CertifyResponse {
            cert_chain_pem: cert_pem,
            trust_bundle_pem: ca.bundle_pem(),
            spiffe_id: crate::ca::spiffe_id(&ca.trust_domain, &req.service),
            not_after_unix: unix(not_after),
        }))
    }
}
