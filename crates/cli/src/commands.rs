//! `smesh apply / get / delete / kv`: the control plane's API from the command line.

use crate::client::{Control, Reply};
use base64::Engine as _;
use bytes::Bytes;
use hyper::Method;
use std::path::{Path, PathBuf};

pub fn block_on<T>(f: impl std::future::Future<Output = Result<T, String>>) -> Result<T, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start runtime: {e}"))?
        .block_on(f)
}

/// Files to apply: a file, every .yaml/.yml/.json in a directory (sorted), or `-` (stdin).
fn read_inputs(path: &Path) -> Result<Vec<(String, String)>, String> {
    use std::io::Read;
    if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| format!("cannot read standard input: {e}"))?;
        return Ok(vec![("<stdin>".into(), text)]);
    }
    let files: Vec<PathBuf> = if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml" || x == "json"))
            .collect();
        files.sort();
        files
    } else {
        vec![path.to_path_buf()]
    };
    files
        .into_iter()
        .map(|f| {
            let text = std::fs::read_to_string(&f).map_err(|e| format!("cannot read {}: {e}", f.display()))?;
            Ok((f.display().to_string(), text))
        })
        .collect()
}

pub async fn apply(control: &Control, path: &Path) -> Result<(), String> {
    let files = read_inputs(path)?;
    if files.is_empty() {
        return Err(format!("{}: no .yaml, .yml or .json files", path.display()));
    }
    let body = serde_json::json!({
        "files": files.iter().map(|(name, text)| serde_json::json!({"name": name, "text": text})).collect::<Vec<_>>()
    });
    let reply = control
        .call(
            Method::POST,
            "/api/v1/apply",
            "application/json",
            Bytes::from(body.to_string()),
        )
        .await?
        .json()?;
    for item in reply["applied"].as_array().into_iter().flatten() {
        println!(
            "{}/{} {}",
            item["kind"].as_str().unwrap_or("?"),
            item["name"].as_str().unwrap_or("?"),
            item["result"].as_str().unwrap_or("?")
        );
    }
    for warning in reply["warnings"].as_array().into_iter().flatten() {
        eprintln!("warning: {}", warning.as_str().unwrap_or("?"));
    }
    Ok(())
}

fn render(value: &serde_json::Value, output: &str) -> Result<String, String> {
    match output {
        "json" => serde_json::to_string_pretty(value).map_err(|e| e.to_string()),
        "yaml" => {
            let mut out = String::new();
            let items = match value.as_array() {
                Some(items) => items.clone(),
                None => vec![value.clone()],
            };
            for item in items {
                out.push_str("---\n");
                out.push_str(&serde_norway::to_string(&item).map_err(|e| e.to_string())?);
            }
            Ok(out)
        }
        other => Err(format!("unknown output format {other:?}: use yaml or json")),
    }
}

pub async fn get(control: &Control, kind: &str, name: Option<&str>, output: &str) -> Result<(), String> {
    crate::table::check_output(output)?;
    let table = output == "table" || output == "wide";
    let value = match (kind.to_ascii_lowercase().as_str(), name) {
        ("endpoints" | "endpoint" | "ep", Some(service)) => {
            let v = control.get(&format!("/api/v1/endpoints/{service}")).await?.json()?;
            if table {
                if v["endpoints"].as_array().is_none_or(Vec::is_empty) {
                    crate::table::none_found();
                    return Ok(());
                }
                println!("{:<24} {:<12} {:<8} LABELS", "ADDRESS", "SOURCE", "WEIGHT");
                for e in v["endpoints"].as_array().into_iter().flatten() {
                    println!(
                        "{:<24} {:<12} {:<8} {}",
                        e["address"].as_str().unwrap_or(""),
                        e["source"].as_str().unwrap_or(""),
                        e["weight"].as_u64().unwrap_or(1),
                        e["labels"]
                    );
                }
                return Ok(());
            }
            v["endpoints"].clone()
        }
        ("endpoints" | "endpoint" | "ep", None) => {
            return Err("usage: smesh get endpoints SERVICE (the endpoints of one service)".into())
        }
        ("proxies" | "proxy", _) => {
            let v = control.get("/api/v1/proxies").await?.json()?;
            if table {
                if v["items"].as_array().is_none_or(Vec::is_empty) {
                    crate::table::none_found();
                    return Ok(());
                }
                println!(
                    "{:<32} {:<10} {:<22} {:>8} {:>8} {:>8}  ERROR",
                    "PROXY", "SERVICE", "ADDRESS", "SENT", "ACKED", "NACKED"
                );
                for p in v["items"].as_array().into_iter().flatten() {
                    println!(
                        "{:<32} {:<10} {:<22} {:>8} {:>8} {:>8}  {}",
                        p["proxy_id"].as_str().unwrap_or(""),
                        p["service"].as_str().unwrap_or(""),
                        p["address"].as_str().unwrap_or(""),
                        p["sent_version"].as_u64().unwrap_or(0),
                        p["acked_version"].as_u64().unwrap_or(0),
                        p["nacked_version"].as_u64().unwrap_or(0),
                        p["last_error"].as_str().unwrap_or("")
                    );
                }
                return Ok(());
            }
            v["items"].clone()
        }
        ("certificates" | "certificate" | "certs", _) => {
            let v = control.get("/api/v1/certificates").await?.json()?;
            if table {
                if v["items"].as_array().is_none_or(Vec::is_empty) {
                    crate::table::none_found();
                    return Ok(());
                }
                println!("{:<16} {:<48} {:<40} EXPIRES", "SERVICE", "IDENTITY", "SERIAL");
                for c in v["items"].as_array().into_iter().flatten() {
                    println!(
                        "{:<16} {:<48} {:<40} {}",
                        c["service"].as_str().unwrap_or(""),
                        c["spiffe_id"].as_str().unwrap_or(""),
                        c["serial"].as_str().unwrap_or(""),
                        c["not_after_unix"]
                            .as_u64()
                            .map_or("?".to_string(), crate::table::expiry)
                    );
                }
                return Ok(());
            }
            v["items"].clone()
        }
        (other, _) if smesh_control::keys::canonical_kind(other).is_none() => {
            return Err(format!(
                "unknown kind {kind:?}; smesh get knows {}",
                crate::table::KINDS
            ))
        }
        (_, Some(name)) => control.get(&format!("/api/v1/resources/{kind}/{name}")).await?.json()?,
        (_, None) => {
            let items = control.get(&format!("/api/v1/resources/{kind}")).await?.json()?["items"].clone();
            if table {
                crate::table::resources(items.as_array().map_or(&[], Vec::as_slice), output == "wide");
                return Ok(());
            }
            if items.as_array().is_some_and(Vec::is_empty) && output == "yaml" {
                crate::table::none_found();
            }
            items
        }
    };
    // One named resource has no table: its whole text.
    let output = if table { "yaml" } else { output };
    print!("{}", render(&value, output)?);
    Ok(())
}

/// Prints each check; fails (non-zero exit) if any did.
pub async fn check(control: &Control) -> Result<(), String> {
    let v = control.get("/api/v1/check").await?.json()?;
    for c in v["checks"].as_array().into_iter().flatten() {
        let mark = if c["ok"].as_bool() == Some(true) {
            "ok  "
        } else {
            "FAIL"
        };
        println!(
            "{mark} {:<14} {}",
            c["name"].as_str().unwrap_or("?"),
            c["detail"].as_str().unwrap_or("")
        );
    }
    if v["ok"].as_bool() == Some(true) {
        Ok(())
    } else {
        Err("some checks failed".into())
    }
}

pub async fn token_create(control: &Control, service: &str, ttl: &str) -> Result<(), String> {
    let body = serde_json::json!({"service": service, "ttl": ttl}).to_string();
    let v = control
        .call(Method::POST, "/api/v1/tokens", "application/json", Bytes::from(body))
        .await?
        .json()?;
    println!("{}", v["token"].as_str().unwrap_or(""));
    Ok(())
}

fn print_ca(v: &serde_json::Value) {
    let root = |r: &serde_json::Value| {
        let expires = r["not_after_unix"]
            .as_u64()
            .map(|t| {
                humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(t)).to_string()
            })
            .unwrap_or_else(|| "?".into());
        format!("{}  expires {expires}", r["sha256"].as_str().unwrap_or("?"))
    };
    println!("trust domain  {}", v["trust_domain"].as_str().unwrap_or(""));
    println!("signing root  {}", root(&v["root"]));
    for p in v["previous"].as_array().into_iter().flatten() {
        println!("also trusted  {}", root(p));
    }
}

pub async fn ca_show(control: &Control, bundle: bool) -> Result<(), String> {
    let v = control.get("/api/v1/ca").await?.json()?;
    if bundle {
        print!("{}", v["bundle_pem"].as_str().unwrap_or(""));
    } else {
        print_ca(&v);
    }
    Ok(())
}

pub async fn ca_change(control: &Control, path: &str) -> Result<(), String> {
    let v = control
        .call(Method::POST, path, "application/json", Bytes::new())
        .await?
        .json()?;
    print_ca(&v);
    Ok(())
}

pub async fn delete(control: &Control, kind: &str, name: &str) -> Result<(), String> {
    let v = control
        .call(
            Method::DELETE,
            &format!("/api/v1/resources/{kind}/{name}"),
            "text/plain",
            Bytes::new(),
        )
        .await?
        .json()?;
    println!("{}/{} deleted", v["deleted"]["kind"].as_str().unwrap_or(kind), name);
    Ok(())
}

fn index_of(reply: &Reply) -> u64 {
    reply
        .headers
        .get("x-smesh-index")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

pub async fn kv_put(control: &Control, key: &str, value: &str, cas: Option<u64>) -> Result<(), String> {
    let path = match cas {
        Some(i) => format!("/v1/kv/{key}?cas={i}"),
        None => format!("/v1/kv/{key}"),
    };
    let reply = control
        .call(
            Method::PUT,
            &path,
            "application/octet-stream",
            Bytes::from(value.to_string()),
        )
        .await?;
    let index = index_of(&reply);
    match reply.json()? {
        serde_json::Value::Bool(true) => {
            println!("ok (index {index})");
            Ok(())
        }
        _ => Err(format!(
            "check-and-set failed: {key} is not at index {}",
            cas.unwrap_or(0)
        )),
    }
}

pub async fn kv_get(control: &Control, key: &str) -> Result<(), String> {
    let reply = control.get(&format!("/v1/kv/{key}")).await?;
    if reply.status == hyper::StatusCode::NOT_FOUND {
        return Err(format!("{key}: not found"));
    }
    let index = index_of(&reply);
    let v = reply.json()?;
    let entry = &v[0];
    let value = base64::engine::general_purpose::STANDARD
        .decode(entry["Value"].as_str().unwrap_or(""))
        .map_err(|e| format!("bad value encoding: {e}"))?;
    println!("{}", String::from_utf8_lossy(&value));
    eprintln!("(index {index})");
    Ok(())
}

pub async fn kv_delete(control: &Control, key: &str) -> Result<(), String> {
    control
        .call(Method::DELETE, &format!("/v1/kv/{key}"), "text/plain", Bytes::new())
        .await?
        .json()?;
    println!("deleted {key}");
    Ok(())
}

/// Prints each change under the prefix as `INDEX put|delete KEY [VALUE]`, in order, until
/// interrupted.
pub async fn kv_watch(control: &Control, prefix: &str, index: Option<u64>) -> Result<(), String> {
    use std::io::Write;
    let path = match index {
        Some(i) => format!("/v1/watch/kv/{prefix}?index={i}"),
        None => format!("/v1/watch/kv/{prefix}"),
    };
    control
        .stream_lines(&path, |line| {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                return;
            };
            if let Some(err) = v["Error"].as_str() {
                eprintln!("watch ended: {err}");
                return;
            }
            let value = v["Value"]
                .as_str()
                .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                .map(|b| String::from_utf8_lossy(&b).to_string())
                .unwrap_or_default();
            println!(
                "{} {} {} {}",
                v["ModifyIndex"],
                v["Event"].as_str().unwrap_or("?"),
                v["Key"].as_str().unwrap_or("?"),
                value
            );
            let _ = std::io::stdout().flush();
        })
        .await
}
