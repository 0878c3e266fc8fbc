//! Multi-document YAML to resources, with errors that point at the document and field.

use crate::{validate, ConfigError, ConfigErrors, Resource, API_VERSION};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_norway::Value;
use std::sync::Arc;

/// Where a resource came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub file: Arc<str>,
    /// 1-based document index within the file.
    pub document: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Sourced {
    pub source: Source,
    pub resource: Resource,
}

impl Source {
    pub fn error(&self, resource: Option<&Resource>, field: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.to_string(),
            document: self.document,
            kind: resource.map(|r| r.kind().to_string()),
            name: resource.map(|r| r.name().to_string()),
            field: field.to_string(),
            reason: reason.into(),
        }
    }
}

/// Parses and validates one file's text: the resources, or every error found.
pub fn load(file: &str, text: &str) -> Result<Vec<Sourced>, ConfigErrors> {
    let items = parse(file, text)?;
    validate(&items)?;
    Ok(items)
}

/// Parses every YAML document in `text` (empty documents are skipped) without cross-checks.
pub fn parse(file: &str, text: &str) -> Result<Vec<Sourced>, ConfigErrors> {
    let file: Arc<str> = Arc::from(file);
    let mut items = Vec::new();
    let mut errors = Vec::new();
    for (index, document) in serde_norway::Deserializer::from_str(text).enumerate() {
        let source = Source {
            file: file.clone(),
            document: index + 1,
        };
        let value = match Value::deserialize(document) {
            Ok(Value::Null) => continue,
            Ok(value) => value,
            Err(e) => {
                errors.push(source.error(None, "", format!("invalid YAML: {e}")));
                // The parser cannot resynchronise after a syntax error.
                break;
            }
        };
        match parse_value(&source, value) {
            Ok(resource) => items.push(Sourced { source, resource }),
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(items)
    } else {
        Err(ConfigErrors(errors))
    }
}

fn parse_value(source: &Source, value: Value) -> Result<Resource, ConfigError> {
    let Value::Mapping(map) = &value else {
        return Err(source.error(
            None,
            "",
            "a resource must be a mapping with apiVersion, kind, metadata and spec",
        ));
    };
    let text_field = |key: &str| map.get(key).and_then(Value::as_str).map(str::to_string);
    let kind = text_field("kind");
    let name = map
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let error = |field: &str, reason: String| ConfigError {
        file: source.file.to_string(),
        document: source.document,
        kind: kind.clone(),
        name: name.clone(),
        field: field.to_string(),
        reason,
    };
    match text_field("apiVersion").as_deref() {
        Some(API_VERSION) => {}
        Some(other) => {
            return Err(error(
                "apiVersion",
                format!("unsupported apiVersion {other:?}, expected {API_VERSION:?}"),
            ))
        }
        None => {
            return Err(error(
                "apiVersion",
                format!("missing field `apiVersion` (expected {API_VERSION:?})"),
            ))
        }
    }
    match kind.as_deref() {
        Some("Service") => typed(value).map(Resource::Service),
        Some("HTTPRoute") => typed(value).map(Resource::HttpRoute),
        Some("GRPCRoute") => typed(value).map(Resource::GrpcRoute),
        Some("MeshConfig") => typed(value).map(Resource::MeshConfig),
        Some("AuthorizationPolicy") => typed(value).map(Resource::AuthorizationPolicy),
        Some("BackendPolicy") => typed(value).map(Resource::BackendPolicy),
        Some(other) => Err((
            "kind".to_string(),
            format!("unknown kind {other:?}, expected one of {:?}", Resource::KINDS),
        )),
        None => Err(("kind".to_string(), "missing field `kind`".to_string())),
    }
    .map_err(|(field, reason)| error(&field, reason))
}

fn typed<T: DeserializeOwned>(value: Value) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { String::new() } else { path };
        (field, e.into_inner().to_string())
    })
}

/// Renders resources back to multi-document YAML (for `/config` and `smesh get`).
pub fn to_yaml<'a>(resources: impl IntoIterator<Item = &'a Resource>) -> String {
    let mut out = String::new();
    for resource in resources {
        out.push_str("---\n");
        match serde_norway::to_string(resource) {
            Ok(text) => out.push_str(&text),
            Err(e) => out.push_str(&format!("# cannot render {}: {e}\n", resource.name())),
        }
    }
    out
}
