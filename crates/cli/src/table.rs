//! `smesh get`'s tables: a line per resource with what a person looks for first, and
//! expiry times as dates with how far away they are.

use serde_json::Value;

/// What `smesh get` knows, for its help and its errors.
pub const KINDS: &str = "service, httproute, grpcroute, meshconfig, authorizationpolicy, backendpolicy \
                         (plurals and svc, route, authz work too), endpoints SERVICE, proxies, certificates";

/// Output formats of `smesh get`.
pub fn check_output(output: &str) -> Result<(), String> {
    match output {
        "table" | "wide" | "yaml" | "json" => Ok(()),
        other => Err(format!(
            "unknown output format {other:?}: use table, wide, yaml or json"
        )),
    }
}

/// kubectl's words, on stderr so that stdout stays empty for scripts.
pub fn none_found() {
    eprintln!("No resources found.");
}

/// Resources of one kind, a line each: NAME and a summary by kind (`wide` adds the labels).
pub fn resources(items: &[Value], wide: bool) {
    if items.is_empty() {
        return none_found();
    }
    println!("{:<32} {:<20} SUMMARY", "NAME", "KIND");
    for item in items {
        let kind = item["kind"].as_str().unwrap_or("");
        let mut summary = summary(kind, &item["spec"]);
        if wide {
            if let Some(labels) = item["metadata"]["labels"].as_object().filter(|l| !l.is_empty()) {
                summary.push_str(&format!("  labels={}", Value::Object(labels.clone())));
            }
        }
        println!(
            "{:<32} {:<20} {}",
            item["metadata"]["name"].as_str().unwrap_or("?"),
            kind,
            summary
        );
    }
}

fn count(v: &Value) -> usize {
    v.as_array().map_or(0, Vec::len)
}

fn names(v: &Value) -> String {
    let names: Vec<&str> = v
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["name"].as_str())
        .collect();
    names.join(",")
}

fn summary(kind: &str, spec: &Value) -> String {
    match kind {
        "Service" => {
            let ports: Vec<String> = spec["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| format!("{}/{}", p["port"], p["protocol"].as_str().unwrap_or("auto")))
                .collect();
            format!(
                "ports={} static-endpoints={}",
                ports.join(","),
                count(&spec["endpoints"])
            )
        }
        "HTTPRoute" | "GRPCRoute" => format!("parents={} rules={}", names(&spec["parentRefs"]), count(&spec["rules"])),
        "AuthorizationPolicy" => format!(
            "target={} action={} rules={}",
            spec["targetRef"]["name"].as_str().unwrap_or("?"),
            spec["action"].as_str().unwrap_or("Allow"),
            count(&spec["rules"])
        ),
        "MeshConfig" => format!(
            "mtls={} defaultPolicy={}",
            spec["mtls"].as_str().unwrap_or("permissive"),
            spec["defaultPolicy"].as_str().unwrap_or("allow")
        ),
        "BackendPolicy" => format!("target={}", spec["targetRef"]["name"].as_str().unwrap_or("?")),
        _ => String::new(),
    }
}

/// `2026-12-09T10:00:00Z (in 2 days)`, or `... (expired 3 hours ago)`.
pub fn expiry(unix: u64) -> String {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};
    let at = UNIX_EPOCH + Duration::from_secs(unix);
    let date = humantime::format_rfc3339_seconds(at);
    let now = SystemTime::now();
    match at.duration_since(now) {
        Ok(left) => format!("{date} (in {})", roughly(left)),
        Err(e) => format!("{date} (expired {} ago)", roughly(e.duration())),
    }
}

/// The largest whole unit: "2 days", "5 hours", "3 minutes".
fn roughly(d: std::time::Duration) -> String {
    let s = d.as_secs();
    let (n, unit) = match s {
        0..=119 => (s, "second"),
        120..=7199 => (s / 60, "minute"),
        7200..=172_799 => (s / 3600, "hour"),
        _ => (s / 86_400, "day"),
    };
    format!("{n} {unit}{}", if n == 1 { "" } else { "s" })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_reads_as_a_date_and_a_distance() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(
            expiry(now + 3 * 86_400 + 60).ends_with("(in 3 days)"),
            "{}",
            expiry(now + 3 * 86_400 + 60)
        );
        assert!(expiry(now + 5 * 3600 + 60).ends_with("(in 5 hours)"));
        assert!(expiry(now - 600).ends_with("(expired 10 minutes ago)"));
        assert!(expiry(0).starts_with("1970-01-01T00:00:00Z"));
    }

    #[test]
    fn outputs_and_summaries() {
        assert!(check_output("wide").is_ok());
        assert!(check_output("xml").unwrap_err().contains("table, wide, yaml or json"));
        let svc = serde_json::json!({"ports": [{"port": 80, "protocol": "http"}], "endpoints": [{}, {}]});
        assert_eq!(summary("Service", &svc), "ports=80/http static-endpoints=2");
        let route = serde_json::json!({"parentRefs": [{"name": "api"}], "rules": [{}, {}, {}]});
        assert_eq!(summary("HTTPRoute", &route), "parents=api rules=3");
    }
}
