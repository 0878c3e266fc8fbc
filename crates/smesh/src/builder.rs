//! [`Builder`]: what a [`Mesh`] is told before it connects, in the words of `smesh proxy`'s
//! flags.

use crate::{Error, Mesh};
use smesh_proxy::embed::{Embedded, Limits, ProxyOptions};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// How long [`Builder::connect`] waits for the first configuration unless told otherwise.
const FIRST_CONFIG_TIMEOUT: Duration = Duration::from_secs(30);

/// Options of a [`Mesh`]; made by [`Mesh::builder`], used by [`Builder::connect`].
#[derive(Debug, Clone)]
pub struct Builder {
    control: Vec<String>,
    config_file: Option<PathBuf>,
    service: Option<String>,
    token_file: Option<PathBuf>,
    control_ca: Option<PathBuf>,
    admin: Option<SocketAddr>,
    advertise: Option<SocketAddr>,
    first_config_timeout: Duration,
}

impl Builder {
    pub(crate) fn new() -> Self {
        Builder {
            control: Vec::new(),
            config_file: None,
            service: None,
            token_file: None,
            control_ca: None,
            admin: None,
            advertise: None,
            first_config_timeout: FIRST_CONFIG_TIMEOUT,
        }
    }

    /// A control-plane URL (`http://host:port`, or `https://` with [`Builder::control_ca`]);
    /// call again for more replicas, tried in turn. Not with [`Builder::config_file`].
    pub fn control(mut self, url: impl Into<String>) -> Self {
        self.control.push(url.into());
        self
    }

    /// A static resource file instead of a control plane (watched: edits apply while the
    /// mesh runs, as `smesh proxy --config` does).
    pub fn config_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.config_file = Some(path.into());
        self
    }

    /// The Service this program is: its SPIFFE identity
    /// (`spiffe://<trust domain>/service/<name>`) and the name it registers under.
    pub fn service(mut self, name: impl Into<String>) -> Self {
        self.service = Some(name.into());
        self
    }

    /// A file holding a join token (`smesh token create --service NAME`): used once, for the
    /// first certificate of [`Builder::service`]; later ones are renewals.
    pub fn token_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.token_file = Some(path.into());
        self
    }

    /// The CA certificates (PEM) an `https://` control plane is checked against.
    pub fn control_ca(mut self, path: impl Into<PathBuf>) -> Self {
        self.control_ca = Some(path.into());
        self
    }

    /// Serve the proxy's admin endpoints (`/metrics`, `/ready`, `/live`, `/config`) on this
    /// address, and announce it to the control plane (as `smesh prometheus-config` uses).
    pub fn admin(mut self, addr: SocketAddr) -> Self {
        self.admin = Some(addr);
        self
    }

    /// The address other services' proxies reach this program's [`Mesh::serve`] listener
    /// at: registered with the control plane as an endpoint of [`Builder::service`] (with
    /// its SPIFFE ID) from [`Builder::connect`] on, under a lease it keeps renewing.
    pub fn advertise(mut self, addr: SocketAddr) -> Self {
        self.advertise = Some(addr);
        self
    }

    /// How long [`Builder::connect`] waits for the control plane's first configuration
    /// (default 30 s).
    pub fn first_config_timeout(mut self, timeout: Duration) -> Self {
        self.first_config_timeout = timeout;
        self
    }

    /// Starts the mesh on the current tokio runtime: reads the file, or gets the service's
    /// certificate with the join token and then its configuration from the control plane.
    /// Returns once the first configuration is in place; an error if the options are wrong
    /// or no configuration came within [`Builder::first_config_timeout`]. With a join
    /// token, the certificate comes first: asked for for up to 30 s while the control plane
    /// is unreachable (a refused token is not asked again), so that the endpoint is
    /// registered with its SPIFFE ID; without one, calls to mesh endpoints are plaintext.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub async fn connect(self) -> Result<Mesh, Error> {
        let join_token = match &self.token_file {
            Some(path) => match std::fs::read_to_string(path) {
                Ok(token) => Some(token.trim().to_string()),
                Err(e) => return Err(Error::start(format!("cannot read token file {}: {e}", path.display()))),
            },
            None => None,
        };
        let admin = match self.admin {
            Some(addr) => Some(
                std::net::TcpListener::bind(addr)
                    .map_err(|e| Error::start(format!("cannot listen on admin address {addr}: {e}")))?,
            ),
            None => None,
        };
        let wait = self.first_config_timeout;
        let options = self.options(join_token);
        let embedded = Embedded::start(options, admin).await.map_err(Error::start)?;
        if !embedded.configured(wait).await {
            return Err(Error::start(format!(
                "no configuration from the control plane within {wait:?}"
            )));
        }
        Ok(Mesh {
            inner: Arc::new(embedded),
        })
    }

    /// `smesh proxy`'s options for a proxy without listeners.
    fn options(self, join_token: Option<String>) -> ProxyOptions {
        ProxyOptions {
            config: self.config_file,
            control: self.control,
            labels: Default::default(),
            advertise: self.advertise,
            lease_ttl: None,
            max_config_bytes: 16 << 20,
            join_token,
            control_ca: self.control_ca,
            outbound: None,
            // The embedded mesh registers `inbound` as `service`'s endpoint; the app is in
            // this process (`Mesh::serve`), so `app` is only there to say there is one.
            inbound: self.advertise,
            app: self.advertise,
            app_protocol: None,
            service: self.service,
            upstreams: Vec::new(),
            // Not used without listeners: the admin socket is bound above.
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
            workers: 1,
            access_log: None,
            drain_timeout: Duration::ZERO,
            limits: Limits::default(),
        }
    }
}
