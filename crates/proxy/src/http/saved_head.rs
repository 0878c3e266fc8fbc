//! A request head kept for a retry while the original goes to the first try.
//!
//! Cloning the `HeaderMap` would cost two allocations and rebuilding its hash index on
//! every request a retry policy covers, although a retry is rare. So the headers are kept
//! as a flat list (one allocation; names and values are reference-counted or static, so a
//! clone copies no bytes) and turned back into a map only when a retry actually happens.

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Uri, Version};

pub(crate) struct SavedHead {
    method: Method,
    uri: Uri,
    version: Version,
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl SavedHead {
    pub(crate) fn new(head: &Parts) -> SavedHead {
        let mut headers = Vec::with_capacity(head.headers.len());
        headers.extend(head.headers.iter().map(|(n, v)| (n.clone(), v.clone())));
        SavedHead {
            method: head.method.clone(),
            uri: head.uri.clone(),
            version: head.version,
            headers,
        }
    }

    /// A fresh head equal to the saved one (extensions are not kept).
    pub(crate) fn to_parts(&self) -> Parts {
        let (mut head, ()) = Request::new(()).into_parts();
        head.method = self.method.clone();
        head.uri = self.uri.clone();
        head.version = self.version;
        let mut headers = HeaderMap::with_capacity(self.headers.len());
        for (name, value) in &self.headers {
            headers.append(name.clone(), value.clone());
        }
        head.headers = headers;
        head
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_method_uri_version_and_repeated_headers_in_order() {
        let (mut head, ()) = Request::builder()
            .method(Method::PUT)
            .uri("http://svc.example:8080/a/b?q=1")
            .version(Version::HTTP_2)
            .header("x-multi", "one")
            .header("content-type", "text/plain")
            .header("x-multi", "two")
            .header("x-empty", "")
            .header("x-obs", HeaderValue::from_bytes(b"caf\xe9").unwrap())
            .body(())
            .unwrap()
            .into_parts();
        let mut secret = HeaderValue::from_static("Bearer t");
        secret.set_sensitive(true);
        head.headers.insert("authorization", secret);

        let copy = SavedHead::new(&head).to_parts();
        assert_eq!(copy.method, Method::PUT);
        assert_eq!(copy.uri, head.uri);
        assert_eq!(copy.version, Version::HTTP_2);
        assert_eq!(copy.headers, head.headers);
        let multi: Vec<_> = copy.headers.get_all("x-multi").iter().collect();
        assert_eq!(multi, ["one", "two"]);
        assert!(copy.headers["authorization"].is_sensitive());
        assert!(!copy.headers["content-type"].is_sensitive());
    }

    #[test]
    fn an_empty_head_stays_empty() {
        let (head, ()) = Request::new(()).into_parts();
        let copy = SavedHead::new(&head).to_parts();
        assert!(copy.headers.is_empty());
        assert_eq!(copy.method, Method::GET);
    }
}
