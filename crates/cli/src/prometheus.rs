//! `smesh prometheus-config`: what Prometheus should scrape, from the proxies the control
//! plane knows (each announces its admin address, where it serves `/metrics`).
//!
//! `file-sd` (default) prints a `file_sd_configs` target list: point a scrape job at the
//! file and Prometheus follows proxies as they come and go when the command is re-run (e.g.
//! every minute from cron). `static` prints a whole `prometheus.yml` with one scrape job.

use crate::client::Control;
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// One proxy as a scrape target.
#[derive(Debug, PartialEq)]
struct Target {
    address: String,
    labels: BTreeMap<&'static str, String>,
}

pub async fn run(control: &Control, format: &str, job: &str, interval: &str) -> Result<(), String> {
    let proxies = control.get("/api/v1/proxies").await?.json()?;
    let targets = targets(&proxies);
    if targets.is_empty() {
        eprintln!("no proxy announced a metrics address (proxies older than this control plane do not)");
    }
    let out = match format {
        "file-sd" | "file_sd" | "json" => file_sd(&targets),
        "static" | "yaml" => static_config(&targets, job, interval)?,
        other => return Err(format!("unknown format {other:?}: use file-sd or static")),
    };
    println!("{out}");
    Ok(())
}

fn targets(proxies: &Value) -> Vec<Target> {
    let items = proxies["items"].as_array().map(Vec::as_slice).unwrap_or_default();
    let mut targets: Vec<Target> = items
        .iter()
        .filter_map(|p| {
            let address = p["admin"].as_str().filter(|a| !a.is_empty())?.to_string();
            let mut labels = BTreeMap::new();
            for (label, field) in [
                ("proxy_id", "proxy_id"),
                ("service", "service"),
                ("identity", "identity"),
            ] {
                if let Some(v) = p[field].as_str().filter(|v| !v.is_empty()) {
                    labels.insert(label, v.to_string());
                }
            }
            Some(Target { address, labels })
        })
        .collect();
    targets.sort_by(|a, b| a.address.cmp(&b.address));
    targets
}

fn file_sd(targets: &[Target]) -> String {
    let groups: Vec<Value> = targets
        .iter()
        .map(|t| json!({"targets": [t.address], "labels": t.labels}))
        .collect();
    serde_json::to_string_pretty(&groups).unwrap_or_default()
}

fn static_config(targets: &[Target], job: &str, interval: &str) -> Result<String, String> {
    let groups: Vec<Value> = targets
        .iter()
        .map(|t| json!({"targets": [t.address], "labels": t.labels}))
        .collect();
    let config = json!({
        "global": {"scrape_interval": interval},
        "scrape_configs": [{"job_name": job, "metrics_path": "/metrics", "static_configs": groups}],
    });
    serde_norway::to_string(&config).map_err(|e| format!("cannot write YAML: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxies() -> Value {
        json!({"items": [
            {"proxy_id": "web-1", "service": "web", "admin": "127.0.0.1:9902", "identity": ""},
            {"proxy_id": "old-1", "service": "api", "admin": ""},
            {"proxy_id": "api-1", "service": "api", "admin": "127.0.0.1:9901",
             "identity": "spiffe://smesh.local/ns/default/sa/api"},
        ]})
    }

    #[test]
    fn proxies_without_a_metrics_address_are_left_out_and_the_rest_sorted() {
        let t = targets(&proxies());
        assert_eq!(
            t.iter().map(|t| t.address.as_str()).collect::<Vec<_>>(),
            ["127.0.0.1:9901", "127.0.0.1:9902"]
        );
        assert_eq!(t[0].labels["service"], "api");
        assert!(!t[1].labels.contains_key("identity"));
    }

    #[test]
    fn both_formats_parse_back() {
        let t = targets(&proxies());
        let sd: Value = serde_json::from_str(&file_sd(&t)).unwrap();
        assert_eq!(sd[1]["targets"][0], "127.0.0.1:9902");
        let yaml: Value = serde_norway::from_str(&static_config(&t, "smesh", "5s").unwrap()).unwrap();
        assert_eq!(
            yaml["scrape_configs"][0]["static_configs"][0]["labels"]["proxy_id"],
            "api-1"
        );
    }
}
