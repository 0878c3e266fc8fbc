//! The one error type of the crate.

use http::StatusCode;
use std::fmt;

/// Why the mesh could not start, or could not get an answer from the application called.
#[derive(Debug)]
pub struct Error {
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    /// A start-up error: bad options, an unreadable file, no configuration in time.
    Start(String),
    /// The mesh answered instead of the application: no such service, no route, no
    /// endpoint reachable, circuit open, timed out, denied (the proxy's `smesh-proxy-error`).
    Mesh {
        status: StatusCode,
        reason: String,
        detail: String,
    },
    /// A body failed while it streamed.
    Body(Box<dyn std::error::Error + Send + Sync>),
}

impl Error {
    pub(crate) fn start(message: impl Into<String>) -> Self {
        Error {
            kind: Kind::Start(message.into()),
        }
    }

    pub(crate) fn mesh(status: StatusCode, reason: String, detail: String) -> Self {
        Error {
            kind: Kind::Mesh { status, reason, detail },
        }
    }

    pub(crate) fn body(error: Box<dyn std::error::Error + Send + Sync>) -> Self {
        Error {
            kind: Kind::Body(error),
        }
    }

    /// The status a sidecar's outbound port would have answered with, when the mesh
    /// answered instead of the application (e.g. 503 for no endpoints, 504 for a timeout,
    /// 403 when the destination's authorization denied this service).
    pub fn status(&self) -> Option<StatusCode> {
        match &self.kind {
            Kind::Mesh { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The mesh's reason in the words of the proxy's `smesh-proxy-error` header and
    /// `smesh_proxy_errors_total{reason}` (e.g. `no endpoints`, `unknown authority`).
    pub fn reason(&self) -> Option<&str> {
        match &self.kind {
            Kind::Mesh { reason, .. } => Some(reason),
            _ => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Start(message) => write!(f, "smesh: {message}"),
            Kind::Mesh { status, reason, detail } if detail.is_empty() => {
                write!(f, "smesh: {reason} ({status})")
            }
            Kind::Mesh { status, reason, detail } => write!(f, "smesh: {reason} ({status}): {detail}"),
            Kind::Body(e) => write!(f, "smesh: body: {e}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            Kind::Body(e) => Some(&**e),
            _ => None,
        }
    }
}
