//! The identities this process holds, one per workload it fronts: a sidecar holds one, a node
//! agent N (ztunnel's `SecretManager` keyed by identity is the model). Each is keyed by its
//! service and, once it has a certificate, by the TLS server name its peers ask for (SNI,
//! `<service>.service.<trust-domain>`).
//!
//! The mesh TLS server side is one rustls configuration for every identity: it requires a
//! client certificate from the trusted CA and presents the certificate of the identity the
//! client named ([`ResolvesServerCert`]); an unknown name ends the handshake. A client that
//! names nobody gets the one identity of a table that holds exactly one (a sidecar, as before
//! the table). The client side presents the identity of the workload a request comes from:
//! each [`Identity`] keeps its own client configurations in its [`MeshTls`].
//!
//! Lookups happen per TLS handshake, never per request; certificates are installed here (on
//! issue, renewal, or a new trust bundle) so the server configuration follows them.

use crate::identity::{provider, MeshTls, TlsHandle, ALPN_H2, ALPN_HTTP1, ALPN_TCP};
use arc_swap::{ArcSwap, ArcSwapOption};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use std::collections::HashMap;
use std::sync::Arc;

/// One workload's identity: its service, and its certificate once it has one.
pub struct Identity {
    pub service: Arc<str>,
    /// The current certificate and the TLS configurations built on it; swapped on renewal.
    pub tls: TlsHandle,
}

#[derive(Default)]
struct Table {
    by_service: HashMap<Arc<str>, Arc<Identity>>,
}

impl Table {
    /// The identity whose current certificate carries the TLS server name `sni`. Service names
    /// are DNS labels (no dots), so the name's first label is the service.
    fn by_sni(&self, sni: &str) -> Option<Arc<MeshTls>> {
        let service = sni.split('.').next()?;
        let tls = self.by_service.get(service)?.tls.load_full()?;
        (tls.tls_name.as_deref() == Some(sni)).then_some(tls)
    }

    /// The one identity of a table that holds exactly one.
    fn sole(&self) -> Option<Arc<MeshTls>> {
        match self.by_service.len() {
            1 => self.by_service.values().next()?.tls.load_full(),
            _ => None,
        }
    }
}

/// The table: identities by service and by TLS server name, and the mesh TLS server
/// configuration that serves them all.
#[derive(Default)]
pub struct Identities {
    table: Arc<ArcSwap<Table>>,
    /// None until an identity has a certificate.
    server: ArcSwapOption<ServerConfig>,
}

impl Identities {
    /// The identity of `service`, added without a certificate if the table has none yet.
    pub fn add(&self, service: &str) -> Arc<Identity> {
        if let Some(found) = self.get(service) {
            return found;
        }
        let identity = Arc::new(Identity {
            service: Arc::from(service),
            tls: TlsHandle::default(),
        });
        self.table.rcu(|table| {
            let mut by_service = table.by_service.clone();
            by_service
                .entry(identity.service.clone())
                .or_insert_with(|| identity.clone());
            Table { by_service }
        });
        self.get(service).unwrap_or(identity)
    }

    /// Takes `service`'s identity out: peers naming it are refused from now on.
    pub fn remove(&self, service: &str) -> Option<Arc<Identity>> {
        let removed = self.get(service)?;
        self.table.rcu(|table| {
            let mut by_service = table.by_service.clone();
            by_service.remove(service);
            Table { by_service }
        });
        Some(removed)
    }

    pub fn get(&self, service: &str) -> Option<Arc<Identity>> {
        self.table.load().by_service.get(service).cloned()
    }

    pub fn len(&self) -> usize {
        self.table.load().by_service.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The current certificate of the identity whose TLS server name is `sni`.
    pub fn by_sni(&self, sni: &str) -> Option<Arc<MeshTls>> {
        self.table.load().by_sni(sni)
    }

    /// The mesh TLS server configuration, once an identity has a certificate.
    pub fn server(&self) -> Option<Arc<ServerConfig>> {
        self.server.load_full()
    }

    /// Installs `identity`'s new certificate (or the same one trusting a new bundle). The
    /// server configuration is rebuilt with the bundle it trusts (a failure installs nothing).
    pub fn install(&self, identity: &Identity, tls: MeshTls) -> Result<(), String> {
        let server = self.server_config(&tls)?;
        identity.tls.store(Some(Arc::new(tls)));
        self.server.store(Some(server));
        Ok(())
    }

    /// Makes every identity trust `bundle_pem` (a CA rotation's roots). `Ok(true)`: at least
    /// one changed. An identity the bundle cannot be used with keeps its previous one; the
    /// first such error is returned.
    pub fn apply_bundle(&self, bundle_pem: &str) -> Result<bool, String> {
        let (mut changed, mut error) = (false, None);
        for identity in self.table.load().by_service.values() {
            let Some(current) = identity.tls.load_full() else {
                continue;
            };
            if current.bundle_pem == bundle_pem {
                continue;
            }
            match current
                .with_bundle(bundle_pem)
                .and_then(|next| self.install(identity, next))
            {
                Ok(()) => changed = true,
                Err(e) => {
                    error.get_or_insert(e);
                }
            }
        }
        error.map_or(Ok(changed), Err)
    }

    /// Whether a ClientHello (the first TLS record, as received) is a peer proxy's: mesh
    /// clients name one of these identities as the server. Anything else is an application's
    /// own TLS. `None`: the record is incomplete or not a ClientHello.
    pub fn is_mesh_hello(&self, record: &[u8]) -> Option<bool> {
        let mut acceptor = rustls::server::Acceptor::default();
        let mut reader = record;
        acceptor.read_tls(&mut reader).ok()?;
        let accepted = acceptor.accept().ok()??;
        let hello = accepted.client_hello();
        Some(hello.server_name().is_some_and(|sni| self.by_sni(sni).is_some()))
    }

    /// Requires a client certificate from the CA `tls` trusts; presents the certificate the
    /// client names.
    fn server_config(&self, tls: &MeshTls) -> Result<Arc<ServerConfig>, String> {
        let verifier = WebPkiClientVerifier::builder_with_provider(tls.roots.clone(), provider())
            .build()
            .map_err(|e| format!("client verifier: {e}"))?;
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(BySni(self.table.clone())));
        server.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec(), ALPN_TCP.to_vec()];
        Ok(Arc::new(server))
    }
}

/// The server side's certificate choice: by the name the client sent.
struct BySni(Arc<ArcSwap<Table>>);

impl std::fmt::Debug for BySni {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BySni").finish_non_exhaustive()
    }
}

impl ResolvesServerCert for BySni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let table = self.0.load();
        let tls = match hello.server_name() {
            Some(sni) => table.by_sni(sni),
            None => table.sole(),
        };
        tls.map(|tls| tls.certified.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::build_from;
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
    };
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use rustls::ClientConfig;
    use std::time::{Duration, SystemTime};

    const TD: &str = "test.local";

    struct Ca {
        pem: String,
        issuer: Issuer<'static, KeyPair>,
    }

    fn ca() -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let pem = params.self_signed(&key).unwrap().pem();
        Ca {
            pem,
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate as the control plane's CA issues it (URI and DNS SANs), trusting `ca`.
    fn issue(ca: &Ca, service: &str) -> MeshTls {
        issue_trusting(ca, service, &ca.pem)
    }

    fn issue_trusting(ca: &Ca, service: &str, bundle_pem: &str) -> MeshTls {
        let id = smesh_model::SpiffeId::new(TD, service).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![
            SanType::URI(id.to_string().try_into().unwrap()),
            SanType::DnsName(id.tls_name().try_into().unwrap()),
        ];
        params.is_ca = IsCa::NoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &ca.issuer).unwrap();
        let chain = vec![CertificateDer::from(cert.der().to_vec())];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let not_after = SystemTime::now() + Duration::from_secs(3600);
        build_from(id.to_string(), chain, bundle_pem, key, not_after).unwrap()
    }

    fn name(service: &str) -> String {
        format!("{service}.service.{TD}")
    }

    /// An in-memory handshake; the server's certificate chain as the client received it.
    fn handshake(
        client: Arc<ClientConfig>,
        server: Arc<ServerConfig>,
        server_name: &str,
    ) -> Result<Vec<CertificateDer<'static>>, rustls::Error> {
        let name = ServerName::try_from(server_name.to_string()).unwrap();
        let mut c = rustls::ClientConnection::new(client, name).unwrap();
        let mut s = rustls::ServerConnection::new(server).unwrap();
        for _ in 0..10 {
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok(c.peer_certificates().unwrap().to_vec());
            }
            let mut wire = Vec::new();
            c.write_tls(&mut wire).unwrap();
            s.read_tls(&mut wire.as_slice()).unwrap();
            s.process_new_packets()?;
            wire.clear();
            s.write_tls(&mut wire).unwrap();
            c.read_tls(&mut wire.as_slice()).unwrap();
            c.process_new_packets()?;
        }
        panic!("the handshake makes no progress");
    }

    fn client_hello(client: Arc<ClientConfig>, server_name: &str) -> Vec<u8> {
        let name = ServerName::try_from(server_name.to_string()).unwrap();
        let mut c = rustls::ClientConnection::new(client, name).unwrap();
        let mut wire = Vec::new();
        c.write_tls(&mut wire).unwrap();
        wire
    }

    fn without_sni(config: &ClientConfig) -> Arc<ClientConfig> {
        let mut config = config.clone();
        config.enable_sni = false;
        Arc::new(config)
    }

    #[test]
    fn looks_up_by_service() {
        let ids = Identities::default();
        assert!(ids.is_empty());
        let api = ids.add("api");
        let web = ids.add("web");
        assert_eq!(ids.len(), 2);
        assert!(Arc::ptr_eq(&ids.add("api"), &api), "adding again gives the same entry");
        assert!(Arc::ptr_eq(&ids.get("web").unwrap(), &web));
        assert_eq!(&*ids.get("api").unwrap().service, "api");
        assert!(ids.get("db").is_none());
        assert!(api.tls.load().is_none(), "no certificate until one is installed");
        assert!(ids.server().is_none(), "no server configuration without a certificate");
        assert!(Arc::ptr_eq(&ids.remove("web").unwrap(), &web));
        assert!(ids.get("web").is_none());
        assert!(ids.remove("web").is_none());
        assert_eq!(ids.len(), 1);
    }

    #[test]
    fn looks_up_by_tls_server_name() {
        let ca = ca();
        let ids = Identities::default();
        let api = ids.add("api");
        ids.add("web");
        assert!(ids.by_sni(&name("api")).is_none(), "not before its certificate");
        ids.install(&api, issue(&ca, "api")).unwrap();
        let found = ids.by_sni(&name("api")).unwrap();
        assert_eq!(found.spiffe_id, format!("spiffe://{TD}/service/api"));
        assert!(Arc::ptr_eq(&found, &api.tls.load_full().unwrap()));
        assert!(ids.by_sni(&name("web")).is_none(), "web has no certificate yet");
        assert!(ids.by_sni(&name("db")).is_none(), "unknown service");
        assert!(ids.by_sni("api.service.other.domain").is_none(), "another trust domain");
        assert!(ids.by_sni("api").is_none());
        assert!(ids.by_sni("").is_none());
        assert!(ids.server().is_some());
    }

    #[test]
    fn server_presents_the_identity_the_client_names() {
        let ca = ca();
        let ids = Identities::default();
        let (api, web) = (ids.add("api"), ids.add("web"));
        ids.install(&api, issue(&ca, "api")).unwrap();
        ids.install(&web, issue(&ca, "web")).unwrap();
        let (api_tls, web_tls) = (api.tls.load_full().unwrap(), web.tls.load_full().unwrap());
        let server = ids.server().unwrap();
        // api calls web: web's certificate is presented, api's verified as the client's.
        let chain = handshake(api_tls.client_h2.clone(), server.clone(), &name("web")).unwrap();
        assert_eq!(chain[0], web_tls.chain[0]);
        let chain = handshake(web_tls.client_tcp.clone(), server.clone(), &name("api")).unwrap();
        assert_eq!(chain[0], api_tls.chain[0]);
        assert_eq!(
            ids.is_mesh_hello(&client_hello(api_tls.client_h2.clone(), &name("web"))),
            Some(true)
        );
    }

    #[test]
    fn unknown_server_name_is_refused() {
        let ca = ca();
        let ids = Identities::default();
        let (api, web) = (ids.add("api"), ids.add("web"));
        ids.install(&api, issue(&ca, "api")).unwrap();
        ids.install(&web, issue(&ca, "web")).unwrap();
        let client = api.tls.load_full().unwrap().client_h2.clone();
        let server = ids.server().unwrap();
        assert!(handshake(client.clone(), server.clone(), &name("db")).is_err());
        assert_eq!(
            ids.is_mesh_hello(&client_hello(client.clone(), &name("db"))),
            Some(false)
        );
        // Nobody named: with two identities there is no telling which.
        assert!(handshake(without_sni(&client), server.clone(), &name("web")).is_err());
        assert_eq!(
            ids.is_mesh_hello(&client_hello(without_sni(&client), &name("web"))),
            Some(false)
        );
        // A removed identity is refused from then on.
        ids.remove("web");
        assert!(handshake(client.clone(), server, &name("web")).is_err());
        assert_eq!(ids.is_mesh_hello(b"\x16\x03\x01"), None, "an incomplete record");
    }

    #[test]
    fn a_sidecar_serves_its_one_identity_to_a_client_that_names_none() {
        let ca = ca();
        let ids = Identities::default();
        let api = ids.add("api");
        ids.install(&api, issue(&ca, "api")).unwrap();
        let tls = api.tls.load_full().unwrap();
        let chain = handshake(without_sni(&tls.client_h2), ids.server().unwrap(), &name("api")).unwrap();
        assert_eq!(chain[0], tls.chain[0]);
    }

    #[test]
    fn a_client_outside_the_trust_bundle_is_refused() {
        let (ca, other) = (ca(), ca());
        let ids = Identities::default();
        let api = ids.add("api");
        ids.install(&api, issue(&ca, "api")).unwrap();
        // It trusts this proxy's CA, but its own certificate is from another.
        let stranger = issue_trusting(&other, "web", &format!("{}{}", ca.pem, other.pem));
        assert!(handshake(stranger.client_h2.clone(), ids.server().unwrap(), &name("api")).is_err());
    }

    #[test]
    fn a_new_bundle_reaches_every_identity_and_the_server() {
        let (ca, next) = (ca(), ca());
        let ids = Identities::default();
        let (api, web) = (ids.add("api"), ids.add("web"));
        ids.install(&api, issue(&ca, "api")).unwrap();
        ids.install(&web, issue(&ca, "web")).unwrap();
        let both = format!("{}{}", ca.pem, next.pem);
        // A peer certified by the next CA, trusting both.
        let newcomer = issue_trusting(&next, "db", &both);
        assert!(handshake(newcomer.client_h2.clone(), ids.server().unwrap(), &name("api")).is_err());
        assert_eq!(ids.apply_bundle(&both), Ok(true));
        assert_eq!(ids.apply_bundle(&both), Ok(false), "nothing changes twice");
        assert_eq!(api.tls.load().as_ref().unwrap().bundle_pem, both);
        assert_eq!(web.tls.load().as_ref().unwrap().bundle_pem, both);
        assert!(handshake(newcomer.client_h2.clone(), ids.server().unwrap(), &name("api")).is_ok());
        assert!(ids.apply_bundle("not a bundle").is_err());
        assert_eq!(
            api.tls.load().as_ref().unwrap().bundle_pem,
            both,
            "a bad bundle keeps the previous one"
        );
    }
}
