//! Protocol detection: read the first bytes of a connection and decide HTTP/2 (preface),
//! HTTP/1 (a method token) or opaque TCP. The bytes read are replayed by [`PrefixedIo`].

use bytes::{Buf, Bytes, BytesMut};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const METHODS: &[&[u8]] = &[
    b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH",
];
const LONGEST_METHOD: usize = 7;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    Http1,
    Http2,
    /// A TLS ClientHello: mesh mTLS on an inbound port, else passed through untouched.
    Tls,
    Opaque,
}

/// The protocol `buf` (the first bytes of a connection) starts, `None` while more bytes are
/// needed (never past the 24 bytes of the HTTP/2 preface).
pub(crate) fn classify(buf: &[u8]) -> Option<Detected> {
    let first = *buf.first()?;
    // A TLS handshake record: content type 22, major version 3.
    if first == 0x16 {
        return match buf.get(1) {
            Some(3) => Some(Detected::Tls),
            Some(_) => Some(Detected::Opaque),
            None => None,
        };
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Some(Detected::Http2)
        } else {
            None
        };
    }
    match buf.iter().position(|&b| b == b' ') {
        Some(i) if METHODS.contains(&&buf[..i]) => Some(Detected::Http1),
        Some(_) => Some(Detected::Opaque),
        None if buf.len() <= LONGEST_METHOD && buf.iter().all(u8::is_ascii_uppercase) => None,
        None => Some(Detected::Opaque),
    }
}

/// Reads the rest of the first TLS record (the whole ClientHello) into `prefix`, so it can
/// be looked at before deciding who terminates the TLS. Gives up quietly (leaving what it
/// has) at `timeout`, at end of stream, or past the largest record TLS allows.
pub async fn complete_tls_record<T: AsyncRead + Unpin>(io: &mut T, prefix: Bytes, timeout: Duration) -> Bytes {
    const MAX_RECORD: usize = 5 + (1 << 14);
    let wanted = |buf: &[u8]| match buf.get(3..5) {
        Some(len) => 5 + usize::from(u16::from_be_bytes([len[0], len[1]])),
        None => 5,
    };
    if prefix.len() >= wanted(&prefix) {
        return prefix;
    }
    let mut buf = BytesMut::from(prefix.as_ref());
    let deadline = tokio::time::Instant::now() + timeout;
    while buf.len() < wanted(&buf).min(MAX_RECORD) {
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => break,
        }
    }
    buf.freeze()
}

/// Reads until the protocol is known. A client that sends nothing within `timeout` is
/// treated as opaque TCP (server-speaks-first protocols). `Ok(None)`: closed before a byte.
pub async fn detect<T: AsyncRead + Unpin>(io: &mut T, timeout: Duration) -> io::Result<Option<(Detected, Bytes)>> {
    let mut buf = BytesMut::with_capacity(4096);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Err(_) => return Ok(Some((Detected::Opaque, buf.freeze()))),
            Ok(Ok(0)) if buf.is_empty() => return Ok(None),
            Ok(Ok(0)) => return Ok(Some((Detected::Opaque, buf.freeze()))),
            Ok(Ok(_)) => {
                if let Some(d) = classify(&buf) {
                    return Ok(Some((d, buf.freeze())));
                }
            }
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// An I/O stream whose first reads return bytes already taken from it.
pub struct PrefixedIo<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> PrefixedIo<T> {
    pub fn new(prefix: Bytes, inner: T) -> Self {
        PrefixedIo { prefix, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for PrefixedIo<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for PrefixedIo<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0"), Some(Detected::Http2));
        assert_eq!(classify(b"PRI * HT"), None);
        assert_eq!(classify(b"\x16\x03\x01\x02\x00"), Some(Detected::Tls));
        assert_eq!(classify(b"\x16"), None);
        assert_eq!(classify(b"*1\r\n$4\r\nPING\r\n"), Some(Detected::Opaque));
        assert_eq!(classify(b"HELLO WORLD"), Some(Detected::Opaque));
    }

    /// Found by fuzzing: no bytes yet indexed `buf[0]` and panicked (`detect` only calls it
    /// after a read of at least one byte, so it was latent).
    #[test]
    fn nothing_yet_is_undecided() {
        assert_eq!(classify(b""), None);
    }
}
