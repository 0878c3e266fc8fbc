//! MeshConfig `tracing`: where proxies send their spans, and which requests they keep.

use crate::duration;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// `spec.tracing` of the MeshConfig: absent, proxies record no spans at all.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TracingSpec {
    /// The OTLP/gRPC collector, `host:port` (e.g. `127.0.0.1:4317`).
    pub collector: String,
    /// The share of traces kept whatever their outcome (head sampling), 0 to 1. Default 0.01.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling: Option<f64>,
    /// Requests slower than this are always kept (tail sampling). Default 500ms.
    #[serde(default, with = "duration::option", skip_serializing_if = "Option::is_none")]
    pub slow_threshold: Option<Duration>,
}

impl TracingSpec {
    pub const DEFAULT_SAMPLING: f64 = 0.01;
    pub const DEFAULT_SLOW_THRESHOLD: Duration = Duration::from_millis(500);

    pub fn sampling(&self) -> f64 {
        self.sampling.unwrap_or(Self::DEFAULT_SAMPLING)
    }

    pub fn slow_threshold(&self) -> Duration {
        self.slow_threshold.unwrap_or(Self::DEFAULT_SLOW_THRESHOLD)
    }

    /// Each problem as (field under `spec.tracing`, reason).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        if let Err(why) = check_collector(&self.collector) {
            problems.push(("collector", why));
        }
        if let Some(s) = self.sampling.filter(|s| !(0.0..=1.0).contains(s)) {
            problems.push((
                "sampling",
                format!("{s} is not a share between 0 and 1 (0.01 keeps 1% of traces)"),
            ));
        }
        if self.slow_threshold.is_some_and(|d| d.is_zero()) {
            problems.push(("slowThreshold", "must be greater than 0".to_string()));
        }
        problems
    }
}

/// `host:port`, with a port from 1 to 65535 (no scheme: the export is OTLP over gRPC).
fn check_collector(collector: &str) -> Result<(), String> {
    let hint = "give the collector's OTLP/gRPC address as host:port, e.g. 127.0.0.1:4317";
    if collector.contains("://") {
        return Err(format!("{collector:?} has a scheme: {hint}"));
    }
    let Some((host, port)) = collector.rsplit_once(':') else {
        return Err(format!("{collector:?} has no port: {hint}"));
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '/') {
        return Err(format!("{collector:?} has no valid host: {hint}"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("{collector:?} has no valid port: {hint}")),
    }
}
