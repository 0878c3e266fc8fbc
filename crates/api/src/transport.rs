//! Connections to the control plane: `http://` in the clear, `https://` over TLS 1.3 that
//! checks the control plane's certificate against `--control-ca` and, once the proxy has
//! one, presents its mesh certificate (the control plane authenticates proxies by it).
//! Used by the proxy (gRPC) and by the CLI (admin API); it lives here, beside the API, so
//! that the CLI's admin client does not need the data plane.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// A byte stream to the control plane, plain or TLS.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// A certificate a client presents to the control plane (a proxy's mesh identity), with the
/// CA roots it trusts. A trait so that this crate need not know the proxy's identity type.
pub trait ClientIdentity {
    /// The certificate chain, leaf first.
    fn chain(&self) -> &[CertificateDer<'static>];
    fn key(&self) -> &PrivateKeyDer<'static>;
    /// The mesh roots this identity trusts.
    fn roots(&self) -> &RootCertStore;
}

/// The CAs a control plane's certificate is checked against.
#[derive(Clone)]
pub struct ControlTrust {
    roots: Arc<RootCertStore>,
}

impl ControlTrust {
    /// Reads PEM certificates (the mesh's `ca.pem`, or the CA of the control plane's own
    /// certificate).
    pub fn load(path: &Path) -> Result<Self, String> {
        let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| format!("{}: {e}", path.display()))?;
            roots.add(cert).map_err(|e| format!("{}: {e}", path.display()))?;
        }
        if roots.is_empty() {
            return Err(format!("{}: no PEM certificate found", path.display()));
        }
        Ok(ControlTrust { roots: Arc::new(roots) })
    }

    /// A client configuration for the control plane, with this identity if any. The mesh
    /// roots the identity trusts count too: after a CA rotation the control plane's own
    /// certificate comes from a root `--control-ca` may not have.
    pub fn client_config(
        &self,
        identity: Option<&dyn ClientIdentity>,
        alpn: &[u8],
    ) -> Result<Arc<ClientConfig>, String> {
        let roots = match identity {
            Some(id) => {
                let mut all = (*self.roots).clone();
                all.roots.extend(id.roots().roots.iter().cloned());
                Arc::new(all)
            }
            None => self.roots.clone(),
        };
        let builder = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots);
        let mut config = match identity {
            Some(id) => builder
                .with_client_auth_cert(id.chain().to_vec(), id.key().clone_key())
                .map_err(|e| format!("client certificate: {e}"))?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![alpn.to_vec()];
        Ok(Arc::new(config))
    }
}

/// A control-plane URL taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlUrl {
    pub tls: bool,
    /// `host:port`, what is connected to.
    pub authority: String,
    /// The name the certificate must carry (a DNS name or an IP address).
    pub host: String,
}

impl ControlUrl {
    pub fn parse(url: &str) -> Result<Self, String> {
        let (tls, rest) = if let Some(rest) = url.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("http://") {
            (false, rest)
        } else {
            return Err(format!("control URL {url:?} must start with http:// or https://"));
        };
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains('/') {
            return Err(format!("control URL {url:?} must be scheme://host:port"));
        }
        let host = match authority.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or_default(),
            None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
        };
        Ok(ControlUrl {
            tls,
            authority: authority.to_string(),
            host: host.to_string(),
        })
    }

    /// Opens a connection: TCP, then TLS with `config` for an `https://` URL.
    pub async fn connect(&self, config: Option<Arc<ClientConfig>>, timeout: Duration) -> Result<Box<dyn Io>, String> {
        let tcp = tokio::time::timeout(timeout, TcpStream::connect(&self.authority))
            .await
            .map_err(|_| format!("connecting to {} timed out", self.authority))?
            .map_err(|e| format!("cannot reach {}: {e}", self.authority))?;
        let _ = tcp.set_nodelay(true);
        if !self.tls {
            return Ok(Box::new(tcp));
        }
        let config = config.ok_or_else(|| {
            format!(
                "https://{} needs the CA to check the control plane's certificate (--control-ca FILE, e.g. the \
                 control plane's DIR/ca.pem)",
                self.authority
            )
        })?;
        let name = ServerName::try_from(self.host.clone()).map_err(|e| format!("{:?}: {e}", self.host))?;
        let tls = tokio::time::timeout(timeout, tokio_rustls::TlsConnector::from(config).connect(name, tcp))
            .await
            .map_err(|_| format!("TLS handshake with {} timed out", self.authority))?
            .map_err(|e| format!("TLS handshake with {}: {e}", self.authority))?;
        Ok(Box::new(tls))
    }
}

/// A gRPC channel to the control plane at `url`, presenting `identity` over TLS.
pub async fn grpc_channel<I: ClientIdentity>(
    url: &str,
    trust: Option<&ControlTrust>,
    identity: Option<&I>,
) -> Result<tonic::transport::Channel, String> {
    let target = ControlUrl::parse(url)?;
    let config = match (target.tls, trust) {
        (true, Some(trust)) => Some(trust.client_config(identity.map(|i| i as &dyn ClientIdentity), b"h2")?),
        _ => None,
    };
    // tonic sees a plain URL; the connector below does the TLS.
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", target.authority))
        .map_err(|e| format!("invalid control URL {url:?}: {e}"))?
        .tcp_nodelay(true);
    let connector = tower::service_fn(move |_: http::Uri| {
        let (target, config) = (target.clone(), config.clone());
        async move {
            let io = target
                .connect(config, Duration::from_secs(2))
                .await
                .map_err(std::io::Error::other)?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(io))
        }
    });
    endpoint
        .connect_with_connector(connector)
        .await
        .map_err(|e| format!("connect: {}", error_chain(&e)))
}

/// An error with its sources (tonic's transport error alone says only "transport error").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_control_urls() {
        let u = ControlUrl::parse("https://control.example:4180/").unwrap();
        assert!(u.tls);
        assert_eq!(
            (u.authority.as_str(), u.host.as_str()),
            ("control.example:4180", "control.example")
        );
        let u = ControlUrl::parse("http://[::1]:4180").unwrap();
        assert!(!u.tls);
        assert_eq!(u.host, "::1");
        assert!(ControlUrl::parse("ftp://x:1").is_err());
        assert!(ControlUrl::parse("http://x:1/path").is_err());
    }
}
