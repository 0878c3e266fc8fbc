//! A workload: one application instance this proxy fronts on its inbound side. A sidecar has
//! one ([`Workload::sidecar`]); a node agent will have one per application on its host. A
//! workload gives its inbound listener, the inbound route to its app, its identity and the
//! endpoint it registers with the control plane.

use crate::app::options::ProxyOptions;
use crate::app::workers::Listener;
use crate::balance::{Balancer, Endpoint};
use crate::identity::table::{Identities, Identity};
use crate::listen::http::Target;
use crate::listen::server::ListenerSpec;
use crate::route::rule::{Rule, WeightedBackend};
use crate::telemetry::metrics::Metrics;
use smesh_model::{LoadBalancer, Protocol};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

pub struct Workload {
    /// The Service it serves; `None` for a proxy told only `--inbound` and `--app` (its
    /// traffic is labelled `app`; it has no identity and registers nothing).
    pub service: Option<Arc<str>>,
    /// Where its application listens.
    pub app: SocketAddr,
    /// What the application speaks; `None`: what the client spoke.
    pub app_protocol: Option<Protocol>,
    /// The inbound listener address peers and local clients reach it at.
    pub inbound: SocketAddr,
    /// The address other proxies are told to reach it at (its registered endpoint).
    pub advertise: SocketAddr,
    /// Labels of its registered endpoint.
    pub labels: BTreeMap<String, String>,
    /// Its mesh identity (an entry of the process's identity table), with its service.
    pub identity: Option<Arc<Identity>>,
    /// Whether its Service's BackendPolicy `rateLimit` is enforced on its inbound side (the
    /// snapshot compiles the limit, see `Snapshot::serving`).
    pub inbound_limit: bool,
}

impl Workload {
    /// The sidecar's one workload, when it is given `--inbound` and `--app`; its identity is
    /// `--service`'s entry in `identities`.
    pub fn sidecar(options: &ProxyOptions, identities: &Identities) -> Option<Workload> {
        let (app, inbound) = (options.app?, options.inbound?);
        let mut advertise = options.advertise.unwrap_or(inbound);
        if advertise.ip().is_unspecified() {
            advertise.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        let service: Option<Arc<str>> = options.service.as_deref().map(Arc::from);
        Some(Workload {
            identity: service.as_deref().and_then(|s| identities.get(s)),
            inbound_limit: service.is_some(),
            service,
            app,
            app_protocol: options.app_protocol,
            inbound,
            advertise,
            labels: options.labels.clone(),
        })
    }

    /// The name its inbound traffic is labelled with in metrics.
    pub fn label(&self) -> &str {
        self.service.as_deref().unwrap_or("app")
    }

    /// The Service whose BackendPolicy `rateLimit` applies to its inbound side, if any.
    pub fn limited_service(&self) -> Option<&str> {
        self.service.as_deref().filter(|_| self.inbound_limit)
    }

    /// Its inbound listener: everything to the app, by [`Workload::inbound_rule`].
    pub fn listener(&self, metrics: &Arc<Metrics>) -> Listener {
        Listener {
            addr: self.inbound,
            spec: Arc::new(ListenerSpec {
                name: "inbound".into(),
                direction: "inbound",
                target: Target::Inbound(self.inbound_rule(metrics)),
                tcp_only: false,
            }),
        }
    }

    /// The inbound side's one "route": everything to the app.
    pub fn inbound_rule(&self, metrics: &Arc<Metrics>) -> Arc<Rule> {
        let label = self.label();
        let endpoint = Arc::new(Endpoint {
            addr: self.app,
            weight: 1,
            labels: Default::default(),
            stats: Arc::default(),
            server_name: None,
        });
        let balancer = Arc::new(Balancer::new(vec![endpoint], LoadBalancer::RoundRobin));
        Arc::new(Rule::new(
            "inbound",
            vec![WeightedBackend {
                weight: 1,
                service: Arc::from(label),
                balancer,
                protocol: self.app_protocol,
                policy: None,
                subset: None,
            }],
            Default::default(),
            None,
            Arc::new(metrics.route("inbound", label, "inbound")),
        ))
    }

    /// The endpoint it registers with the control plane (a workload without a service
    /// registers nothing), presenting `identity` (its SPIFFE ID, or empty without one).
    pub fn endpoint(&self, identity: String) -> Option<smesh_api::v1::Endpoint> {
        let service = self.service.as_deref().filter(|s| !s.is_empty())?;
        Some(smesh_api::v1::Endpoint {
            service: service.to_string(),
            address: self.advertise.to_string(),
            labels: self.labels.clone().into_iter().collect(),
            weight: 0,
            identity,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn options(service: Option<&str>, inbound: Option<&str>, app: Option<&str>) -> ProxyOptions {
        ProxyOptions {
            config: None,
            control: vec!["http://127.0.0.1:4190".into()],
            labels: [("zone".to_string(), "a".to_string())].into(),
            advertise: None,
            lease_ttl: None,
            max_config_bytes: 1 << 20,
            join_token: None,
            control_ca: None,
            outbound: Some("127.0.0.1:4140".parse().unwrap()),
            inbound: inbound.map(|a| a.parse().unwrap()),
            app: app.map(|a| a.parse().unwrap()),
            app_protocol: Some(Protocol::Http2),
            service: service.map(String::from),
            upstreams: Vec::new(),
            admin: "127.0.0.1:4191".parse().unwrap(),
            workers: 1,
            access_log: None,
            drain_timeout: Duration::from_secs(1),
            limits: Default::default(),
        }
    }

    #[test]
    fn a_sidecar_has_one_workload_with_its_identity() {
        let identities = Identities::default();
        let api = identities.add("api");
        let options = options(Some("api"), Some("0.0.0.0:4143"), Some("127.0.0.1:8080"));
        let w = Workload::sidecar(&options, &identities).unwrap();
        assert_eq!(w.service.as_deref(), Some("api"));
        assert_eq!(w.label(), "api");
        assert_eq!(w.app, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(w.app_protocol, Some(Protocol::Http2));
        assert_eq!(w.inbound, "0.0.0.0:4143".parse().unwrap());
        assert_eq!(
            w.advertise,
            "127.0.0.1:4143".parse().unwrap(),
            "an unspecified IP is advertised as loopback"
        );
        assert!(Arc::ptr_eq(w.identity.as_ref().unwrap(), &api));
        assert!(w.inbound_limit);
        assert_eq!(w.limited_service(), Some("api"));
        let endpoint = w.endpoint("spiffe://td/service/api".into()).unwrap();
        assert_eq!(endpoint.service, "api");
        assert_eq!(endpoint.address, "127.0.0.1:4143");
        assert_eq!(endpoint.identity, "spiffe://td/service/api");
        assert_eq!(endpoint.labels.get("zone").map(String::as_str), Some("a"));
    }

    #[test]
    fn the_inbound_listener_sends_everything_to_the_app() {
        let identities = Identities::default();
        let mut options = options(Some("api"), Some("127.0.0.1:4143"), Some("127.0.0.1:8080"));
        options.advertise = Some("10.0.0.5:4143".parse().unwrap());
        let w = Workload::sidecar(&options, &identities).unwrap();
        assert!(w.identity.is_none(), "no identity entry: none is made up");
        assert_eq!(w.endpoint(String::new()).unwrap().address, "10.0.0.5:4143");
        let listener = w.listener(&Metrics::new());
        assert_eq!(listener.addr, "127.0.0.1:4143".parse().unwrap());
        assert_eq!(listener.spec.name, "inbound");
        assert_eq!(listener.spec.direction, "inbound");
        let Target::Inbound(rule) = &listener.spec.target else {
            panic!("not an inbound target");
        };
        let backend = &rule.backends[0];
        assert_eq!(&*backend.service, "api");
        assert_eq!(backend.protocol, Some(Protocol::Http2));
        assert_eq!(backend.balancer.endpoints()[0].addr, "127.0.0.1:8080".parse().unwrap());
    }

    #[test]
    fn without_a_service_the_workload_is_anonymous() {
        let identities = Identities::default();
        let w = Workload::sidecar(
            &options(None, Some("127.0.0.1:4143"), Some("127.0.0.1:8080")),
            &identities,
        )
        .unwrap();
        assert_eq!(w.label(), "app");
        assert!(w.identity.is_none());
        assert_eq!(w.limited_service(), None);
        assert!(w.endpoint(String::new()).is_none(), "nothing to register");
    }

    #[test]
    fn no_workload_without_inbound_and_app() {
        let identities = Identities::default();
        assert!(Workload::sidecar(&options(Some("api"), None, Some("127.0.0.1:8080")), &identities).is_none());
        assert!(Workload::sidecar(&options(Some("api"), Some("127.0.0.1:4143"), None), &identities).is_none());
    }
}
