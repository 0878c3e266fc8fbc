//! `smesh stat` and `smesh edges`: the mesh's golden metrics from the control plane
//! (`GET /api/v1/stats/...`), as a table or the API's JSON.

use crate::client::Control;
use serde_json::Value;

/// Requests the proxies refused themselves, by `smesh-proxy-error` reason, that `wide`
/// shows in their own columns.
const SHED: &str = "load shed";
const BREAKER: &str = "circuit open";
const RATE_LIMITED: &str = "rate limited";

pub struct StatArgs<'a> {
    pub view: &'a str,
    pub name: Option<&'a str>,
    pub window: &'a str,
    pub output: &'a str,
}

pub async fn stat(control: &Control, a: StatArgs<'_>) -> Result<(), String> {
    if !matches!(a.output, "table" | "wide" | "json") {
        return Err(format!("unknown output {:?}: table, wide or json", a.output));
    }
    let mut path = format!("/api/v1/stats/{}?window={}", encode(a.view), encode(a.window));
    if let Some(name) = a.name {
        path.push_str(&format!("&name={}", encode(name)));
    }
    let report = control.get(&path).await?.json()?;
    if a.output == "json" {
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        println!("{text}");
        return Ok(());
    }
    print_header(&report);
    let wide = a.output == "wide";
    let view = report["view"].as_str().unwrap_or_default();
    let rows = report["rows"].as_array().cloned().unwrap_or_default();
    if view == "edges" {
        print_edges(&rows, wide);
        return Ok(());
    }
    let first = match view {
        "routes" => "ROUTE",
        "proxies" => "PROXY",
        _ => "SERVICE",
    };
    let mut header = format!(
        "{first:<32} {:<6} {:>9} {:>8} {:>9} {:>9} {:>9} {:>8} {:>10} {:>6}",
        "SIDE", "RPS", "SUCCESS", "P50", "P95", "P99", "TCP_CONN", "TCP_BYTES", "MTLS"
    );
    if wide {
        header.push_str(&format!(
            " {:>9} {:>8} {:>6} {:>8} {:>8} {:>8}",
            "REQUESTS", "RETRIES", "SHED", "BREAKER", "LIMITED", "PROXYERR"
        ));
    }
    println!("{header}");
    for r in &rows {
        let name = match view {
            "proxies" => format!("{} ({})", text(&r["name"]), text(&r["service"])),
            _ => text(&r["name"]),
        };
        let mut line = format!(
            "{name:<32} {:<6} {:>9} {:>8} {:>9} {:>9} {:>9} {:>8} {:>10} {:>6}",
            text(&r["side"]),
            number(&r["rps"], ""),
            number(&r["success_rate"], "%"),
            number(&r["p50_ms"], "ms"),
            number(&r["p95_ms"], "ms"),
            number(&r["p99_ms"], "ms"),
            r["tcp_connections"].as_u64().unwrap_or(0),
            r["tcp_bytes"].as_u64().unwrap_or(0),
            number(&r["mtls_percent"], "%"),
        );
        if wide {
            let errors = &r["proxy_errors"];
            let reason = |k: &str| errors[k].as_u64().unwrap_or(0);
            let all: u64 = errors
                .as_object()
                .map_or(0, |m| m.values().filter_map(Value::as_u64).sum());
            line.push_str(&format!(
                " {:>9} {:>8} {:>6} {:>8} {:>8} {:>8}",
                r["requests"].as_u64().unwrap_or(0),
                r["retries"].as_u64().unwrap_or(0),
                reason(SHED),
                reason(BREAKER),
                reason(RATE_LIMITED),
                all
            ));
        }
        println!("{line}");
    }
    Ok(())
}

/// `smesh edges [SERVICE]`: who calls whom, with the identities the servers verified.
pub async fn edges(control: &Control, service: Option<&str>, window: &str, output: &str) -> Result<(), String> {
    let args = StatArgs {
        view: "edges",
        name: service,
        window,
        output,
    };
    stat(control, args).await
}

fn print_edges(rows: &[Value], wide: bool) {
    println!(
        "{:<16} {:<16} {:<6} {:>9} {:>8} {:>9}  {:<40} DST_IDENTITY",
        "SRC", "DST", "SIDE", "RPS", "SUCCESS", "P99", "SRC_IDENTITY"
    );
    for r in rows {
        let ids = |k: &str| {
            let list: Vec<String> = r[k].as_array().into_iter().flatten().map(text).collect();
            if list.is_empty() {
                "-".to_string()
            } else {
                list.join(",")
            }
        };
        let mut line = format!(
            "{:<16} {:<16} {:<6} {:>9} {:>8} {:>9}  {:<40} {}",
            text(&r["source"]),
            text(&r["destination"]),
            text(&r["side"]),
            number(&r["rps"], ""),
            number(&r["success_rate"], "%"),
            number(&r["p99_ms"], "ms"),
            ids("source_identities"),
            ids("destination_identities"),
        );
        if wide {
            line.push_str(&format!(
                "  requests={} retries={} tcp_connections={}",
                r["requests"].as_u64().unwrap_or(0),
                r["retries"].as_u64().unwrap_or(0),
                r["tcp_connections"].as_u64().unwrap_or(0)
            ));
        }
        println!("{line}");
    }
}

fn print_header(report: &Value) {
    let seconds = report["window_seconds"].as_f64().unwrap_or(0.0);
    let to = report["to_unix_ms"].as_u64().unwrap_or(0) / 1000;
    println!(
        "# {} over the {seconds:.0}s before {} UTC ({} windows of 10s reported). {}",
        text(&report["view"]),
        clock(to),
        report["windows"].as_u64().unwrap_or(0),
        text(&report["note"])
    );
    let overflow = report["overflow"].as_u64().unwrap_or(0);
    if overflow > 0 {
        println!("# {overflow} requests or connections are not in the rows: proxies were over their series cap");
    }
}

/// HH:MM:SS of a Unix time.
fn clock(unix: u64) -> String {
    let s = unix % 86_400;
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

fn text(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

/// Two decimals and a unit, or `-` when there is no value (no requests).
fn number(v: &Value, unit: &str) -> String {
    v.as_f64().map_or_else(|| "-".to_string(), |x| format!("{x:.2}{unit}"))
}

/// Percent-encodes a query value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
