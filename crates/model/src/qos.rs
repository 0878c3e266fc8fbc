//! QoS: request priorities and a BackendPolicy's `adaptiveConcurrency` (a concurrency limit
//! per upstream Service learned from its latency; under overload the lowest priority is shed
//! first).

use crate::duration;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// How much a request matters when an upstream is overloaded. Ordered: `sheddable` <
/// `normal` < `critical`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// Refused first (e.g. batch jobs, prefetches).
    Sheddable,
    #[default]
    Normal,
    /// Admitted up to the whole limit.
    Critical,
}

impl Priority {
    pub const ALL: [Priority; 3] = [Priority::Critical, Priority::Normal, Priority::Sheddable];

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Sheddable => "sheddable",
            Priority::Normal => "normal",
            Priority::Critical => "critical",
        }
    }

    pub fn parse(text: &[u8]) -> Option<Priority> {
        Priority::ALL
            .into_iter()
            .find(|p| text.eq_ignore_ascii_case(p.as_str().as_bytes()))
    }
}

/// `adaptiveConcurrency` in a BackendPolicy: each proxy sending to the Service keeps a
/// concurrency limit for it, moved by the gradient between the Service's no-load latency and
/// its latency now (in the spirit of Netflix's Gradient2 and Envoy's adaptive concurrency).
/// A request is admitted while the tries in flight stay below its priority's share of the
/// limit; others get a fast 503.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AdaptiveConcurrency {
    /// Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_limit: Option<u32>,
    /// Default 1000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_limit: Option<u32>,
    /// The limit before anything is learned. Default 20.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_limit: Option<u32>,
    /// The limit settles where the average latency is this many times the no-load latency.
    /// Default 1.5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerance: Option<f64>,
    /// How often the limit is recomputed (a window also waits for a few responses).
    /// Default 100ms.
    #[serde(default, with = "duration::option", skip_serializing_if = "Option::is_none")]
    pub sample_window: Option<Duration>,
    /// When the no-load latency has not been seen for this long (a long overload, or the
    /// Service got slower), it is measured again: for a moment only critical requests go
    /// beyond `minLimit`. Default 30s.
    #[serde(default, with = "duration::option", skip_serializing_if = "Option::is_none")]
    pub baseline_interval: Option<Duration>,
    /// Normal requests are admitted while the tries in flight are below this percentage of
    /// the limit. Default 90.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub normal_percent: Option<u32>,
    /// Sheddable requests likewise. Default 50.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sheddable_percent: Option<u32>,
}

impl AdaptiveConcurrency {
    pub const DEFAULT_MIN_LIMIT: u32 = 1;
    pub const DEFAULT_MAX_LIMIT: u32 = 1000;
    pub const DEFAULT_INITIAL_LIMIT: u32 = 20;
    pub const DEFAULT_TOLERANCE: f64 = 1.5;
    pub const DEFAULT_SAMPLE_WINDOW: Duration = Duration::from_millis(100);
    pub const DEFAULT_BASELINE_INTERVAL: Duration = Duration::from_secs(30);
    pub const DEFAULT_NORMAL_PERCENT: u32 = 90;
    pub const DEFAULT_SHEDDABLE_PERCENT: u32 = 50;
    const MAX_LIMIT: u32 = 1_000_000;

    pub fn min_limit(&self) -> u32 {
        self.min_limit.unwrap_or(Self::DEFAULT_MIN_LIMIT)
    }

    pub fn max_limit(&self) -> u32 {
        self.max_limit.unwrap_or(Self::DEFAULT_MAX_LIMIT)
    }

    /// The initial limit, within the bounds.
    pub fn initial_limit(&self) -> u32 {
        self.initial_limit
            .unwrap_or(Self::DEFAULT_INITIAL_LIMIT)
            .clamp(self.min_limit(), self.max_limit().max(self.min_limit()))
    }
}

pub(crate) fn validate_adaptive_concurrency(at: &str, a: &AdaptiveConcurrency, fail: &mut dyn FnMut(&str, String)) {
    let max = AdaptiveConcurrency::MAX_LIMIT;
    for (name, v) in [
        ("minLimit", a.min_limit),
        ("maxLimit", a.max_limit),
        ("initialLimit", a.initial_limit),
    ] {
        if let Some(v) = v.filter(|v| *v == 0 || *v > max) {
            fail(&format!("{at}.{name}"), format!("{v} out of range 1-{max}"));
        }
    }
    if a.min_limit() > a.max_limit() {
        fail(
            &format!("{at}.minLimit"),
            format!("minLimit {} is above maxLimit {}", a.min_limit(), a.max_limit()),
        );
    } else if let Some(i) = a
        .initial_limit
        .filter(|i| *i != 0 && !(a.min_limit()..=a.max_limit()).contains(i))
    {
        fail(
            &format!("{at}.initialLimit"),
            format!(
                "{i} must be between minLimit {} and maxLimit {}",
                a.min_limit(),
                a.max_limit()
            ),
        );
    }
    if let Some(t) = a.tolerance.filter(|t| !(*t > 1.0 && *t <= 10.0)) {
        fail(
            &format!("{at}.tolerance"),
            format!("{t} must be greater than 1 (a latency increase the limit accepts) and at most 10"),
        );
    }
    if a.sample_window
        .is_some_and(|w| w < Duration::from_millis(10) || w > Duration::from_secs(10))
    {
        fail(&format!("{at}.sampleWindow"), "must be between 10ms and 10s".into());
    }
    if a.baseline_interval.is_some_and(|d| d < Duration::from_secs(1)) {
        fail(&format!("{at}.baselineInterval"), "must be at least 1s".into());
    }
    for (name, v) in [
        ("normalPercent", a.normal_percent),
        ("sheddablePercent", a.sheddable_percent),
    ] {
        if let Some(p) = v.filter(|p| !(1..=100).contains(p)) {
            fail(&format!("{at}.{name}"), format!("percent {p} out of range 1-100"));
        }
    }
    let normal = a.normal_percent.unwrap_or(AdaptiveConcurrency::DEFAULT_NORMAL_PERCENT);
    let sheddable = a
        .sheddable_percent
        .unwrap_or(AdaptiveConcurrency::DEFAULT_SHEDDABLE_PERCENT);
    if sheddable > normal {
        fail(
            &format!("{at}.sheddablePercent"),
            format!("{sheddable} is above normalPercent {normal}: sheddable requests must be refused first"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{load, Resource};

    fn policy(spec: &str) -> Result<Vec<crate::Sourced>, String> {
        let text = format!(
            "apiVersion: smesh.io/v1\nkind: Service\nmetadata: {{name: api}}\nspec: {{}}\n---\napiVersion: smesh.io/v1\nkind: BackendPolicy\nmetadata: {{name: p}}\nspec:\n  targetRef: {{name: api}}\n  adaptiveConcurrency: {spec}\n"
        );
        load("qos.yaml", &text).map_err(|e| e.to_string())
    }

    #[test]
    fn parses_round_trips_and_defaults() {
        let items = policy("{minLimit: 2, maxLimit: 200, initialLimit: 8, tolerance: 1.25, sampleWindow: 50ms, baselineInterval: 20s, normalPercent: 80, sheddablePercent: 40}").expect("valid");
        let Resource::BackendPolicy(p) = &items[1].resource else {
            panic!()
        };
        let a = p.spec.adaptive_concurrency.as_ref().unwrap();
        assert_eq!((a.min_limit(), a.max_limit(), a.initial_limit()), (2, 200, 8));
        assert_eq!(a.sample_window, Some(Duration::from_millis(50)));
        let yaml = crate::to_yaml([&items[1].resource]);
        let again = crate::parse("again.yaml", &yaml).expect("round trip");
        assert_eq!(again[0].resource, items[1].resource);
        let items = policy("{}").expect("all defaults");
        let Resource::BackendPolicy(p) = &items[1].resource else {
            panic!()
        };
        let a = p.spec.adaptive_concurrency.as_ref().unwrap();
        assert_eq!((a.min_limit(), a.max_limit(), a.initial_limit()), (1, 1000, 20));
        // an initial limit defaulting outside the bounds is clamped, not an error
        let items = policy("{maxLimit: 10}").expect("valid");
        let Resource::BackendPolicy(p) = &items[1].resource else {
            panic!()
        };
        assert_eq!(p.spec.adaptive_concurrency.as_ref().unwrap().initial_limit(), 10);
    }

    #[test]
    fn rejects_bad_settings_naming_file_and_field() {
        let e = policy("{minLimit: 0, maxLimit: 2000000, tolerance: 1.0, sampleWindow: 1ms, baselineInterval: 100ms, normalPercent: 0, sheddablePercent: 101}").unwrap_err();
        for want in [
            "qos.yaml: document 2 (BackendPolicy \"p\"): spec.adaptiveConcurrency.minLimit: 0 out of range 1-1000000",
            "spec.adaptiveConcurrency.maxLimit: 2000000 out of range",
            "spec.adaptiveConcurrency.tolerance: 1 must be greater than 1",
            "spec.adaptiveConcurrency.sampleWindow: must be between 10ms and 10s",
            "spec.adaptiveConcurrency.baselineInterval: must be at least 1s",
            "spec.adaptiveConcurrency.normalPercent: percent 0 out of range 1-100",
            "spec.adaptiveConcurrency.sheddablePercent: percent 101 out of range 1-100",
        ] {
            assert!(e.contains(want), "{want} missing in {e}");
        }
        let e = policy("{minLimit: 10, maxLimit: 5}").unwrap_err();
        assert!(
            e.contains("spec.adaptiveConcurrency.minLimit: minLimit 10 is above maxLimit 5"),
            "{e}"
        );
        let e = policy("{initialLimit: 50, maxLimit: 40}").unwrap_err();
        assert!(
            e.contains("spec.adaptiveConcurrency.initialLimit: 50 must be between minLimit 1 and maxLimit 40"),
            "{e}"
        );
        let e = policy("{normalPercent: 30}").unwrap_err();
        assert!(
            e.contains("spec.adaptiveConcurrency.sheddablePercent: 50 is above normalPercent 30"),
            "{e}"
        );
        let e = policy("{maxLimt: 3}").unwrap_err();
        assert!(e.contains("unknown field `maxLimt`"), "{e}");
    }

    #[test]
    fn route_priority_parses_and_rejects_unknown_values() {
        let route = |p: &str| {
            let text = format!("apiVersion: smesh.io/v1\nkind: Service\nmetadata: {{name: api}}\nspec: {{}}\n---\napiVersion: smesh.io/v1\nkind: HTTPRoute\nmetadata: {{name: r}}\nspec:\n  parentRefs: [{{name: api}}]\n  rules:\n  - priority: {p}\n");
            load("route.yaml", &text).map_err(|e| e.to_string())
        };
        let items = route("critical").expect("valid");
        let Resource::HttpRoute(r) = &items[1].resource else {
            panic!()
        };
        assert_eq!(r.spec.rules[0].priority, Some(Priority::Critical));
        let e = route("urgent").unwrap_err();
        assert!(
            e.contains("route.yaml") && e.contains("unknown variant `urgent`"),
            "{e}"
        );
        assert!(Priority::Sheddable < Priority::Normal && Priority::Normal < Priority::Critical);
        assert_eq!(Priority::parse(b"Critical"), Some(Priority::Critical));
        assert_eq!(Priority::parse(b"sheddable"), Some(Priority::Sheddable));
        assert_eq!(Priority::parse(b"high"), None);
    }
}
