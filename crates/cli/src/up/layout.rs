//! Where the demo's processes listen: every port from --port.

use std::net::SocketAddr;

/// The highest offset from --port the demo listens on (db's proxy's admin port).
pub const LAST_OFFSET: u16 = 351;

#[derive(Clone, Copy)]
pub struct Proxy {
    pub outbound: SocketAddr,
    pub inbound: SocketAddr,
    pub admin: SocketAddr,
    pub app: SocketAddr,
}

/// Where everything listens, from --port.
#[derive(Clone, Copy)]
pub struct Layout {
    pub control: SocketAddr,
    pub web: Proxy,
    pub api_v1: Proxy,
    pub api_v2: Proxy,
    pub db: Proxy,
    /// api's proxies reach db through a local upstream port each.
    pub db_via_v1: SocketAddr,
    pub db_via_v2: SocketAddr,
}

impl Layout {
    /// None when a port would not fit in 16 bits.
    pub fn new(base: u16) -> Option<Layout> {
        base.checked_add(LAST_OFFSET)?;
        let at = |offset: u16| SocketAddr::from(([127, 0, 0, 1], base + offset));
        let proxy = |i: u16| Proxy {
            outbound: at(100 * i),
            inbound: at(100 * i + 3),
            admin: at(100 * i + 51),
            app: at(100 * i + 11),
        };
        Some(Layout {
            control: at(40),
            web: proxy(0),
            api_v1: proxy(1),
            api_v2: proxy(2),
            db: proxy(3),
            db_via_v1: at(100 + 20),
            db_via_v2: at(200 + 20),
        })
    }

    /// Every port the demo listens on, with what listens there.
    pub fn ports(&self) -> Vec<(SocketAddr, String)> {
        let mut ports = vec![(self.control, "the control plane".to_string())];
        let services = [
            ("web", &self.web),
            ("api v1", &self.api_v1),
            ("api v2", &self.api_v2),
            ("db", &self.db),
        ];
        for (service, p) in services {
            ports.push((p.outbound, format!("{service}'s proxy, outbound")));
            ports.push((p.inbound, format!("{service}'s proxy, inbound")));
            ports.push((p.admin, format!("{service}'s proxy, admin")));
            ports.push((p.app, format!("the {service} app")));
        }
        ports.push((self.db_via_v1, "api v1's proxy, upstream db".into()));
        ports.push((self.db_via_v2, "api v2's proxy, upstream db".into()));
        ports
    }
}
