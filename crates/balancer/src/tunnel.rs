//! One client connection: its head, its upstream, then bytes both ways until either side closes, the tunnel
//! idles past `idle_timeout`, or the drain ends.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use ferry_telemetry::prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::Shared;
use crate::head::{Head, HeadError, read_head};
use crate::router::{Plan, Target};
use crate::subject::subject_of;

/// Buffer of each direction of a tunnel.
pub const BUFFER_BYTES: usize = 16 * 1024;

/// A stream either side of a tunnel.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Serve one accepted client (after its TLS handshake, if any, which counts against the same deadline).
pub async fn serve<C: Io>(mut client: C, shared: Arc<Shared>, deadline: Instant) {
    let mut buf = Vec::with_capacity(4096);
    let head = match tokio::time::timeout_at(deadline, read_head(&mut client, &mut buf)).await {
        Ok(Ok(head)) => head,
        Ok(Err(HeadError::Closed)) => return,
        Ok(Err(e @ HeadError::TooLarge)) => {
            shared
                .metrics
                .rejected
                .with_label_values(&["head_too_large"])
                .inc();
            return answer(
                client,
                431,
                "headers-too-large",
                "Request headers too large",
                &e.to_string(),
                None,
            )
            .await;
        }
        Ok(Err(e @ HeadError::Malformed(_))) => {
            shared
                .metrics
                .rejected
                .with_label_values(&["bad_head"])
                .inc();
            return answer(
                client,
                400,
                "bad-request",
                "Bad request",
                &e.to_string(),
                None,
            )
            .await;
        }
        Err(_) => {
            shared
                .metrics
                .rejected
                .with_label_values(&["header_timeout"])
                .inc();
            let detail = format!(
                "the request head did not arrive within {} ms",
                shared.config.header_timeout.as_millis()
            );
            return answer(
                client,
                408,
                "request-timeout",
                "Request timeout",
                &detail,
                None,
            )
            .await;
        }
    };
    let Some((upstream, plan, node)) = connect(&shared, &head).await else {
        shared
            .metrics
            .rejected
            .with_label_values(&["no_upstream"])
            .inc();
        return answer(
            client,
            503,
            "unavailable",
            "Service unavailable",
            "no gateway can take this connection now; retry later",
            Some(1),
        )
        .await;
    };
    let url = plan.snapshot.placement.nodes()[node].url.clone();
    // The count stays in the snapshot; the tunnel does not keep old snapshots alive.
    drop(plan);
    tunnel(client, upstream, buf, &shared, &url).await;
}

/// Connect to the first gateway of the plan that answers; the plan keeps counting that one.
async fn connect(shared: &Shared, head: &Head) -> Option<(Box<dyn Io>, Plan, usize)> {
    let partition = if head.websocket {
        head.token
            .as_deref()
            .and_then(subject_of)
            .map(|s| s.partition())
    } else {
        None
    };
    let mut plan = shared.router.plan(partition, head.websocket)?;
    let tries = plan.order.len().min(shared.config.max_attempts.max(1));
    for attempt in 0..tries {
        let node = plan.order[attempt];
        plan.hold(node);
        let info = &plan.snapshot.placement.nodes()[node];
        let target = &plan.snapshot.targets[node];
        match open(shared, target).await {
            Ok(io) => {
                shared
                    .metrics
                    .picks
                    .with_label_values(&[plan.reason(attempt).as_str()])
                    .inc();
                return Some((io, plan, node));
            }
            Err(e) => {
                tracing::debug!(node = %info.id, url = %info.url, error = %e, "gateway connect failed");
                shared
                    .metrics
                    .connect_errors
                    .with_label_values(&[&info.url])
                    .inc();
                shared.router.mark_failed(&info.id);
                plan.release();
            }
        }
    }
    None
}

async fn open(shared: &Shared, target: &Target) -> std::io::Result<Box<dyn Io>> {
    let timeout = shared.config.connect_timeout;
    let timed_out = || std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out");
    let tcp = tokio::time::timeout(timeout, TcpStream::connect(&target.authority))
        .await
        .map_err(|_| timed_out())??;
    let _ = tcp.set_nodelay(true);
    if !target.tls {
        return Ok(Box::new(tcp));
    }
    let name = rustls::pki_types::ServerName::try_from(target.host.clone())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let tls = tokio::time::timeout(timeout, shared.upstream_tls.connect(name, tcp))
        .await
        .map_err(|_| timed_out())??;
    Ok(Box::new(tls))
}

/// Bytes both ways; the head (and whatever followed it) first.
async fn tunnel<C: Io>(
    client: C,
    mut upstream: Box<dyn Io>,
    buf: Vec<u8>,
    shared: &Shared,
    url: &str,
) {
    let m = &shared.metrics;
    shared.track_upstream(url);
    let gauge = m.connections.with_label_values(&[url]);
    gauge.inc();
    struct Open(ferry_telemetry::prometheus::IntGauge);
    impl Drop for Open {
        fn drop(&mut self) {
            self.0.dec();
        }
    }
    let _open = Open(gauge);
    let up_bytes = m.bytes.with_label_values(&["client_to_upstream"]);
    let down_bytes = m.bytes.with_label_values(&["upstream_to_client"]);
    let started = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let mut client = Metered {
        inner: client,
        started,
        last: last.clone(),
        read: up_bytes.clone(),
        written: down_bytes,
    };
    let idle = shared.config.idle_timeout;
    let stop = shared.kill.clone();
    let why = tokio::select! {
        r = async {
            upstream.write_all(&buf).await?;
            up_bytes.inc_by(buf.len() as u64);
            drop(buf);
            tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, BUFFER_BYTES, BUFFER_BYTES).await
        } => match r {
            Ok(_) => "closed",
            Err(e) => {
                tracing::debug!(error = %e, "tunnel ended with an error");
                "error"
            }
        },
        _ = idle_expired(started, &last, idle) => "idle_timeout",
        _ = stop.cancelled() => "drain",
    };
    m.closed.with_label_values(&[why]).inc();
    let _ = tokio::time::timeout(Duration::from_millis(200), upstream.shutdown()).await;
    let _ = tokio::time::timeout(Duration::from_millis(200), client.shutdown()).await;
}

/// Resolves once nothing moved either way for `idle`.
async fn idle_expired(started: Instant, last: &AtomicU64, idle: Duration) {
    loop {
        let at = started + Duration::from_millis(last.load(Ordering::Relaxed)) + idle;
        if at <= Instant::now() {
            return;
        }
        tokio::time::sleep_until(at).await;
    }
}

/// The client side, counted: bytes each way and the time of the last activity (ms after `started`).
struct Metered<S> {
    inner: S,
    started: Instant,
    last: Arc<AtomicU64>,
    read: IntCounter,
    written: IntCounter,
}

impl<S> Metered<S> {
    fn touch(&self) {
        self.last
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.read.inc_by(n as u64);
            self.touch();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r
            && n > 0
        {
            self.written.inc_by(n as u64);
            self.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Answer the client with a problem+json response and close.
async fn answer<C: Io>(
    mut client: C,
    status: u16,
    slug: &str,
    title: &str,
    detail: &str,
    retry_after: Option<u64>,
) {
    let body = serde_json::json!({
        "type": format!("urn:ferry:problem:{slug}"),
        "title": title,
        "status": status,
        "detail": detail,
    })
    .to_string();
    let reason = match status {
        400 => "Bad Request",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let retry = retry_after
        .map(|s| format!("Retry-After: {s}\r\n"))
        .unwrap_or_default();
    let text = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/problem+json\r\nContent-Length: {}\r\n\
         {retry}Connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        client.write_all(text.as_bytes()).await?;
        client.shutdown().await?;
        // A lingering close: what the client still sends is read and dropped, so that closing with unread
        // bytes does not reset the connection before the client has read the answer.
        let mut sink = [0u8; 4096];
        let mut left = 2 * crate::head::MAX_HEAD_BYTES;
        while left > 0 {
            match client.read(&mut sink).await? {
                0 => break,
                n => left = left.saturating_sub(n),
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
}
