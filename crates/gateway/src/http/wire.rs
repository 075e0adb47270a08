//! hyper's own error answers, as problem+json.
//!
//! hyper answers two request errors itself, before any router or middleware sees a request: 414 when the request
//! target is over 65,534 bytes (a fixed limit) and 431 when the head is over its read buffer or has more than 100
//! headers. It writes a bare head (`content-length: 0`) and closes. [`ProblemIo`] wraps a connection's stream
//! below hyper and replaces exactly those heads with the problem of the same status from the one table
//! ([`ApiError::UriTooLong`], [`ApiError::HeadersTooLarge`]), so that every error a client sees is
//! problem+json. Everything else passes through untouched: the check is a prefix comparison on writes that start
//! a `414`/`431` status line, which no handler of ours writes without a body.
//!
//! `crate::connection` wraps every accepted connection (plain and TLS) in it.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::error::ApiError;

/// A stream whose hyper-made 414 and 431 answers are rewritten as problem+json.
#[derive(Debug)]
pub struct ProblemIo<T> {
    inner: T,
    /// A rewritten answer and how much of it is written; drained before anything else is.
    pending: Option<(Vec<u8>, usize)>,
}

impl<T> ProblemIo<T> {
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            pending: None,
        }
    }
}

/// The problem+json answer replacing `head`, when `head` is hyper's bare 414 or 431.
fn rewrite(head: &[u8]) -> Option<Vec<u8>> {
    let status = head
        .strip_prefix(b"HTTP/1.1 ")
        .or_else(|| head.strip_prefix(b"HTTP/1.0 "))?;
    let e = if status.starts_with(b"414 ") {
        ApiError::UriTooLong
    } else if status.starts_with(b"431 ") {
        ApiError::HeadersTooLarge
    } else {
        return None;
    };
    let bare = head.ends_with(b"\r\n\r\n")
        && head
            .windows(b"\r\ncontent-length: 0\r\n".len())
            .any(|w| w.eq_ignore_ascii_case(b"\r\ncontent-length: 0\r\n"));
    if !bare {
        return None;
    }
    let code = e.status();
    let body = e.problem().to_string();
    Some(
        format!(
            "HTTP/1.1 {} {}\r\ncontent-type: application/problem+json\r\ncontent-length: {}\r\n\
             connection: close\r\n\r\n{body}",
            code.as_u16(),
            code.canonical_reason().unwrap_or(""),
            body.len()
        )
        .into_bytes(),
    )
}

impl<T: AsyncWrite + Unpin> ProblemIo<T> {
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, done)) = &mut self.pending {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &bytes[*done..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *done += n;
            if *done == bytes.len() {
                self.pending = None;
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Queue the replacement of `buf` (if it is one of hyper's bare answers) and start writing it; `buf` counts
    /// as written.
    fn replace(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Option<Poll<io::Result<usize>>> {
        let replacement = rewrite(buf)?;
        self.pending = Some((replacement, 0));
        Some(match self.drain(cx) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            // The rest goes out on flush, which hyper calls before it closes.
            _ => Poll::Ready(Ok(buf.len())),
        })
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ProblemIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ProblemIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.drain(cx))?;
        if let Some(done) = this.replace(cx, buf) {
            return done;
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.drain(cx))?;
        if let Some(first) = bufs.iter().find(|b| !b.is_empty())
            && let Some(done) = this.replace(cx, first)
        {
            return done;
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn bare_414_and_431_become_problems_and_the_rest_passes() {
        for (head, status) in [
            (
                &b"HTTP/1.1 414 URI Too Long\r\ncontent-length: 0\r\ndate: x\r\n\r\n"[..],
                414,
            ),
            (
                &b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\r\n"[..],
                431,
            ),
        ] {
            let (a, mut b) = tokio::io::duplex(64);
            let mut io = ProblemIo::new(a);
            // A small pipe: the replacement is written across several polls and finished by flush.
            let writer = tokio::spawn(async move {
                io.write_all(head).await.unwrap();
                io.flush().await.unwrap();
                io.shutdown().await.unwrap();
            });
            let mut out = String::new();
            b.read_to_string(&mut out).await.unwrap();
            writer.await.unwrap();
            assert!(out.starts_with(&format!("HTTP/1.1 {status} ")), "{out}");
            assert!(
                out.contains("content-type: application/problem+json"),
                "{out}"
            );
            let body: serde_json::Value =
                serde_json::from_str(out.split("\r\n\r\n").nth(1).unwrap()).unwrap();
            assert_eq!(body["status"], status);
        }
        // Our own 431 problem (it has a body) and any other answer are left alone.
        for head in [
            &b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 12\r\n\r\n"[..],
            &b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"[..],
        ] {
            assert!(rewrite(head).is_none());
        }
    }
}
