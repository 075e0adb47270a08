//! Client connections, plain TCP and TLS alike: the accept loop, and what a connection may cost before it has
//! shown a valid token or while it stalls ([`crate::config::ConnectionConfig`]).
//!
//! * **Timeouts.** A new connection must deliver its first request's headers (TLS handshake included) within
//!   `header_timeout`; a kept-alive connection gets `idle_timeout` between requests, then `header_timeout` from
//!   the first byte of the next request; a request body must arrive within `body_timeout` of its headers, else
//!   the request is answered 408 and the connection closes. No timeout applies while a handler runs, and none
//!   after a WebSocket upgrade (the WebSocket has its own pings, [`crate::ws`]).
//! * **Budgets.** A connection counts as *unauthenticated* until one of its requests shows a valid token
//!   ([`Handle::authenticated`], called by [`crate::http::extract::Authed`]) or it is upgraded to a WebSocket
//!   (only a verified token gets a 101). At most `max_unauthenticated` such connections per node and
//!   `max_unauthenticated_per_ip` per client address. A connection over either budget is *limited*: it may send
//!   one request; `/healthz`, `/readyz` and `/metrics` are answered as usual (so probes and scrapes keep working
//!   while the budget is spent), anything else gets 429 `too-many-connections`, and the connection closes. At most [`LIMITED`]
//!   limited connections are open at once; past that a new connection is closed as soon as it is accepted.
//! * **Accept errors** (out of file descriptors and the like) back off, 10 ms doubling to 1 s, and are logged
//!   once per streak.
//! * A declared `Content-Length` over `max_body_bytes` is answered 413 before the request is routed: the body
//!   is never read.
//!
//! It must not look into what a request asks for beyond that: routing, authentication and limits per subject
//! are [`crate::http`]'s.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::connect_info::ConnectInfo;
use axum::http::{HeaderValue, Request, Response, StatusCode, Version, header};
use axum::response::IntoResponse;
use ferry_telemetry::prometheus::proto::MetricFamily;
use ferry_telemetry::prometheus::{IntCounter, IntCounterVec, Opts};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::config::ConnectionConfig;
use crate::error::ApiError;

/// Limited connections open at once: enough for health probes while the budgets are spent, few enough that a
/// flood of them cannot take the descriptors the rest need.
pub const LIMITED: usize = 64;

/// How long a connection told to close (timeout, node draining) may take to say goodbye before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// The node's connection budgets, and their metrics.
#[derive(Debug)]
pub struct Budget {
    cfg: ConnectionConfig,
    max_body_bytes: u64,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    unauthenticated: AtomicUsize,
    limited: AtomicUsize,
    /// By reason: `header_timeout`, `idle_timeout`, `body_timeout`, `no_slot` (closed on accept).
    closed: IntCounterVec,
    accept_errors: IntCounter,
}

impl Budget {
    pub fn new(cfg: ConnectionConfig, max_body_bytes: usize) -> Arc<Self> {
        Arc::new(Self {
            cfg,
            max_body_bytes: max_body_bytes as u64,
            per_ip: Mutex::new(HashMap::new()),
            unauthenticated: AtomicUsize::new(0),
            limited: AtomicUsize::new(0),
            closed: IntCounterVec::new(
                Opts::new(
                    "ferry_http_connections_closed_total",
                    "HTTP connections closed by the gateway, by reason: header_timeout, idle_timeout, \
                     body_timeout (after a 408), no_slot (over the budgets with no limited slot left).",
                ),
                &["reason"],
            )
            .expect("valid metric"),
            accept_errors: IntCounter::new(
                "ferry_http_accept_errors_total",
                "Failed accepts (out of file descriptors and the like), each followed by a back-off.",
            )
            .expect("valid metric"),
        })
    }

    /// The connection metrics, read at scrape time.
    pub fn metric_families(&self) -> Vec<MetricFamily> {
        use ferry_telemetry::metrics::{FnCollector, FnKind};
        use ferry_telemetry::prometheus::core::Collector;
        let states = [
            ("unauthenticated", self.unauthenticated() as f64),
            ("limited", self.limited() as f64),
        ];
        let mut out = Vec::new();
        let gauge = FnCollector::new(
            "ferry_http_connections",
            "Open HTTP connections not yet authenticated (unauthenticated), and over the budgets (limited).",
            FnKind::Gauge,
            &["state"],
            move |out| out.extend(states.iter().map(|(s, n)| (vec![(*s).to_owned()], *n))),
        );
        if let Ok(c) = gauge {
            out.extend(c.collect());
        }
        out.extend(self.closed.collect());
        out.extend(self.accept_errors.collect());
        out
    }

    fn count_close(&self, reason: &str) {
        self.closed.with_label_values(&[reason]).inc();
    }

    /// Warn when the budgets cannot protect anything: a process that runs out of file descriptors before the
    /// unauthenticated budget is spent cannot accept the health probes either.
    pub fn check_open_file_limit(&self) {
        let Some(limit) = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .as_deref()
            .and_then(soft_open_file_limit)
        else {
            return;
        };
        let wanted = (self.cfg.max_unauthenticated + LIMITED) as u64;
        if wanted >= limit {
            tracing::warn!(
                open_file_limit = limit,
                max_unauthenticated_connections = self.cfg.max_unauthenticated,
                "the open-file limit (ulimit -n) is not above max-unauthenticated-connections plus {LIMITED} \
                 limited slots: stalled connections can use every descriptor before the budget refuses them; \
                 raise the limit or lower the budget"
            );
        }
    }

    /// Unauthenticated connections open now.
    pub fn unauthenticated(&self) -> usize {
        self.unauthenticated.load(Ordering::Relaxed)
    }

    /// Limited connections open now.
    pub fn limited(&self) -> usize {
        self.limited.load(Ordering::Relaxed)
    }

    fn per_ip(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.per_ip.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Count a new connection from `ip`; `None` when it is over the budgets and no limited slot is left.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Arc<Conn>> {
        let limited = {
            let mut per_ip = self.per_ip();
            let n = per_ip.entry(ip).or_default();
            if *n >= self.cfg.max_unauthenticated_per_ip
                || self.unauthenticated.load(Ordering::Acquire) >= self.cfg.max_unauthenticated
            {
                if *n == 0 {
                    per_ip.remove(&ip);
                }
                true
            } else {
                *n += 1;
                self.unauthenticated.fetch_add(1, Ordering::AcqRel);
                false
            }
        };
        if limited && self.limited.fetch_add(1, Ordering::AcqRel) >= LIMITED {
            self.limited.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Arc::new(Conn {
            budget: self.clone(),
            ip,
            limited,
            counted: AtomicBool::new(!limited),
            opened: Instant::now(),
            in_flight: AtomicUsize::new(0),
            served: AtomicU64::new(0),
            idle_since_ms: AtomicU64::new(0),
            read_since_idle_ms: AtomicU64::new(0),
            upgraded: AtomicBool::new(false),
            h2: AtomicBool::new(false),
            changed: tokio::sync::Notify::new(),
        }))
    }

    fn release_unauthenticated(&self, ip: IpAddr) {
        let mut per_ip = self.per_ip();
        if let Some(n) = per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&ip);
            }
        }
        self.unauthenticated.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The soft "Max open files" of a `/proc/<pid>/limits` text; `None` when absent or unlimited.
fn soft_open_file_limit(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// One connection's state, shared by its socket, its requests and its watchdog. Dropped with the socket (the
/// socket wrapper holds it, through an upgrade too), which gives its budget back.
#[derive(Debug)]
struct Conn {
    budget: Arc<Budget>,
    ip: IpAddr,
    limited: bool,
    /// Still counted as unauthenticated.
    counted: AtomicBool,
    opened: Instant,
    in_flight: AtomicUsize,
    served: AtomicU64,
    /// Milliseconds after `opened`: when the last request ended, and (plus one, 0 for none) when the first
    /// byte after that arrived.
    idle_since_ms: AtomicU64,
    read_since_idle_ms: AtomicU64,
    upgraded: AtomicBool,
    /// HTTP/2: reads while idle are pings and settings, not a request's headers.
    h2: AtomicBool,
    /// Wakes the watchdog when its deadline may have moved earlier.
    changed: tokio::sync::Notify,
}

impl Drop for Conn {
    fn drop(&mut self) {
        if self.limited {
            self.budget.limited.fetch_sub(1, Ordering::AcqRel);
        } else if self.counted.swap(false, Ordering::AcqRel) {
            self.budget.release_unauthenticated(self.ip);
        }
    }
}

impl Conn {
    fn since_open(&self) -> u64 {
        self.opened.elapsed().as_millis() as u64
    }

    fn on_read(&self) {
        if self.in_flight.load(Ordering::Acquire) == 0
            && self.read_since_idle_ms.load(Ordering::Acquire) == 0
            && self.served.load(Ordering::Acquire) > 0
        {
            self.read_since_idle_ms
                .store(self.since_open() + 1, Ordering::Release);
            self.changed.notify_one();
        }
    }

    fn authenticated(&self) {
        if self.counted.swap(false, Ordering::AcqRel) {
            self.budget.release_unauthenticated(self.ip);
        }
    }

    /// When the connection must be closed if nothing changes, and why; `None` while a request is in flight or
    /// after an upgrade.
    fn deadline(&self) -> Option<(Instant, &'static str)> {
        if self.upgraded.load(Ordering::Acquire) || self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let cfg = &self.budget.cfg;
        let at = |ms: u64| self.opened + Duration::from_millis(ms);
        if self.served.load(Ordering::Acquire) == 0 {
            return Some((self.opened + cfg.header_timeout, "header_timeout"));
        }
        let idle = at(self.idle_since_ms.load(Ordering::Acquire));
        if self.limited {
            return Some((idle, "limited_served"));
        }
        match self.read_since_idle_ms.load(Ordering::Acquire) {
            0 => Some((idle + cfg.idle_timeout, "idle_timeout")),
            _ if self.h2.load(Ordering::Acquire) => Some((idle + cfg.idle_timeout, "idle_timeout")),
            n => Some((at(n - 1) + cfg.header_timeout, "header_timeout")),
        }
    }
}

/// What a request can do to its connection: mark it authenticated.
#[derive(Debug, Clone)]
pub struct Handle(Arc<Conn>);

impl Handle {
    /// The connection showed a valid token: it no longer counts against the unauthenticated budgets.
    pub fn authenticated(&self) {
        self.0.authenticated();
    }
}

/// Ends a request's time in flight when its response body is done (or dropped).
#[derive(Debug)]
struct InFlight(Arc<Conn>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let c = &self.0;
        c.idle_since_ms.store(c.since_open(), Ordering::Release);
        c.read_since_idle_ms.store(0, Ordering::Release);
        c.in_flight.fetch_sub(1, Ordering::AcqRel);
        c.changed.notify_one();
    }
}

/// The socket, watched: every read may start a request's header timer; holds the connection's budget.
struct Watched<S> {
    inner: S,
    conn: Arc<Conn>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.conn.on_read();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The body timeout's error, recognised by [`respond`] to answer 408.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive in time")]
struct BodyTimedOut;

/// A request body that fails once its deadline passes, and says so through `timed_out`.
struct TimedBody {
    inner: Incoming,
    deadline: Instant,
    sleep: Option<Pin<Box<Sleep>>>,
    timed_out: Arc<AtomicBool>,
}

impl HttpBody for TimedBody {
    type Data = axum::body::Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|r| r.map_err(Into::into)));
        }
        // Armed on the first wait only: a body already received costs no timer.
        let deadline = self.deadline;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        ready!(sleep.as_mut().poll(cx));
        self.timed_out.store(true, Ordering::Release);
        Poll::Ready(Some(Err(BodyTimedOut.into())))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Keeps the request in flight until the response body is done.
struct Tracked {
    inner: Body,
    _in_flight: InFlight,
}

impl HttpBody for Tracked {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Serve one request of `conn`.
async fn respond(
    conn: Arc<Conn>,
    peer: SocketAddr,
    app: Router,
    req: Request<Incoming>,
) -> Response<Tracked> {
    conn.in_flight.fetch_add(1, Ordering::AcqRel);
    conn.served.fetch_add(1, Ordering::AcqRel);
    let in_flight = InFlight(conn.clone());
    if req.version() == Version::HTTP_2 {
        conn.h2.store(true, Ordering::Release);
    }
    let http1 = req.version() < Version::HTTP_2;
    let cfg = &conn.budget.cfg;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    // Probes and scrapes keep working while the budgets are spent: that is when they matter.
    let health = matches!(req.uri().path(), "/healthz" | "/readyz" | "/metrics");
    let early = if conn.limited && !health {
        Some(ApiError::TooManyConnections {
            detail: "too many connections from this address, or on this node, have not \
                     authenticated yet; retry later"
                .into(),
            retry_after_secs: 1,
        })
    } else if declared.is_some_and(|n| n > conn.budget.max_body_bytes) {
        Some(ApiError::PayloadTooLarge(
            "the request body is over the configured limit".into(),
        ))
    } else {
        None
    };
    let timed_out = Arc::new(AtomicBool::new(false));
    let mut res = match early {
        Some(e) => close_after(e.into_response(), http1),
        None => {
            let deadline = Instant::now() + cfg.body_timeout;
            let mut req = req.map(|inner| {
                Body::new(TimedBody {
                    inner,
                    deadline,
                    sleep: None,
                    timed_out: timed_out.clone(),
                })
            });
            req.extensions_mut().insert(ConnectInfo(peer));
            req.extensions_mut().insert(Handle(conn.clone()));
            let res = match app.oneshot(req).await {
                Ok(res) => res,
                Err(never) => match never {},
            };
            if timed_out.load(Ordering::Acquire) {
                conn.budget.count_close("body_timeout");
                let e = ApiError::RequestTimeout(format!(
                    "the request body did not arrive within {} ms",
                    cfg.body_timeout.as_millis()
                ));
                close_after(e.into_response(), http1)
            } else {
                res
            }
        }
    };
    if res.status() == StatusCode::SWITCHING_PROTOCOLS {
        // Only a verified token gets a 101 (crate::ws::upgrade).
        conn.authenticated();
        conn.upgraded.store(true, Ordering::Release);
    }
    if conn.limited && http1 {
        res.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    res.map(|inner| Tracked {
        inner,
        _in_flight: in_flight,
    })
}

/// Ask an HTTP/1 client to close the connection after this response (HTTP/2 has no such header; the stream
/// ends on its own).
fn close_after(mut res: axum::response::Response, http1: bool) -> axum::response::Response {
    if http1 {
        res.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    res
}

/// Exponential back-off for failed accepts: 10 ms doubling to 1 s, reset by a successful accept.
#[derive(Debug, Default)]
pub struct AcceptBackoff {
    failures: u32,
}

impl AcceptBackoff {
    const FIRST: Duration = Duration::from_millis(10);
    const MAX: Duration = Duration::from_secs(1);

    /// Count a failure; how long to wait before the next accept.
    pub fn failed(&mut self) -> Duration {
        let wait = Self::FIRST.saturating_mul(1 << self.failures.min(16));
        self.failures = self.failures.saturating_add(1);
        wait.min(Self::MAX)
    }

    /// Count a success; the failures of the streak that ended, if any.
    pub fn succeeded(&mut self) -> u32 {
        std::mem::take(&mut self.failures)
    }
}

/// Errors about one connection that is already gone: nothing to back off from.
fn per_connection(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}

/// Accept and serve until `stop` is cancelled, then let every open connection finish its requests (idle ones
/// are closed at once) and return.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    app: Router,
    budget: Arc<Budget>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let connections = TaskTracker::new();
    let mut backoff = AcceptBackoff::default();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        let (tcp, peer) = match accepted {
            Ok(x) => {
                let streak = backoff.succeeded();
                if streak > 0 {
                    tracing::info!(failures = streak, "accepting connections again");
                }
                x
            }
            Err(e) if per_connection(&e) => continue,
            Err(e) => {
                budget.accept_errors.inc();
                let wait = backoff.failed();
                if wait == AcceptBackoff::FIRST {
                    // Once per streak: out of file descriptors repeats until something closes.
                    tracing::warn!(error = %e, "accept failed, backing off (up to 1 s between tries)");
                }
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(wait) => continue,
                }
            }
        };
        let Some(conn) = budget.admit(peer.ip()) else {
            budget.count_close("no_slot");
            tracing::debug!(%peer, "connection refused: connection budgets and limited slots spent");
            continue;
        };
        // Frames are small and each is written as soon as it is ready: with Nagle's algorithm a frame written
        // while the previous one is unacknowledged waits for the peer's delayed ACK (40 ms on Linux), which
        // made fan-out latency p50 ~45 ms at 25 pushes/s per connection.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY");
        }
        let io = Watched {
            inner: tcp,
            conn: conn.clone(),
        };
        let (tls, app, stop) = (tls.clone(), app.clone(), stop.clone());
        connections.spawn(async move {
            match tls {
                None => serve_one(io, conn, peer, app, stop).await,
                Some(tls) => {
                    let header_timeout = conn.budget.cfg.header_timeout;
                    let stream = match tokio::time::timeout(header_timeout, tls.accept(io)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    };
                    serve_one(stream, conn, peer, app, stop).await
                }
            }
        });
    }
    // Closed now, not when the last connection ends: new clients are refused while the rest drain.
    drop(listener);
    connections.close();
    connections.wait().await;
    Ok(())
}

/// One connection, HTTP/1.1 or HTTP/2, with its watchdog.
async fn serve_one<I>(
    io: I,
    conn: Arc<Conn>,
    peer: SocketAddr,
    app: Router,
    stop: CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn({
        let conn = conn.clone();
        move |req| {
            let (conn, app) = (conn.clone(), app.clone());
            async move { Ok::<_, Infallible>(respond(conn, peer, app, req).await) }
        }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    if conn.limited {
        builder.http1().keep_alive(false);
    }
    // hyper's own 414 and 431 answers leave as problem+json (http::wire), like every other error.
    let io = TokioIo::new(crate::http::wire::ProblemIo::new(io));
    let served = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(served);
    // Draining: asked to close once its requests are done (idle ones close at once); the deadlines still
    // apply, so a stalled one does not hold the drain until the shutdown's hard deadline.
    let mut draining = false;
    let why = loop {
        let deadline = conn.deadline();
        let expired = async {
            match deadline {
                Some((at, _)) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = served.as_mut() => return,
            _ = stop.cancelled(), if !draining => {
                draining = true;
                served.as_mut().graceful_shutdown();
            }
            _ = conn.changed.notified() => continue,
            _ = expired => {
                // The deadline may have moved while this task slept; only a deadline still past counts.
                if let Some((at, why)) = conn.deadline()
                    && at <= Instant::now()
                {
                    break why;
                }
            }
        }
    };
    tracing::debug!(%peer, reason = why, "closing connection");
    if why != "limited_served" {
        conn.budget.count_close(why);
    }
    if !draining {
        served.as_mut().graceful_shutdown();
    }
    let _ = tokio::time::timeout(CLOSE_GRACE, served).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_backoff_doubles_to_a_cap_and_resets() {
        let mut b = AcceptBackoff::default();
        let waits: Vec<u64> = (0..10).map(|_| b.failed().as_millis() as u64).collect();
        assert_eq!(waits, [10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000]);
        assert_eq!(b.succeeded(), 10);
        assert_eq!(b.failed(), Duration::from_millis(10));
        // Never overflows, however long the streak.
        for _ in 0..100 {
            assert!(b.failed() <= Duration::from_secs(1));
        }
    }

    #[test]
    fn the_open_file_limit_is_read_from_proc() {
        let text = "Limit                     Soft Limit           Hard Limit           Units     \n\
                    Max processes             63707                63707                processes \n\
                    Max open files            256                  524288               files     \n";
        assert_eq!(soft_open_file_limit(text), Some(256));
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(soft_open_file_limit(unlimited), None);
        assert_eq!(soft_open_file_limit(""), None);
    }

    #[test]
    fn connection_errors_are_not_backed_off() {
        use std::io::{Error, ErrorKind};
        assert!(per_connection(&Error::from(ErrorKind::ConnectionAborted)));
        // EMFILE surfaces as an uncategorised OS error: backed off.
        assert!(!per_connection(&Error::from_raw_os_error(24)));
    }

    #[tokio::test]
    async fn budgets_count_per_address_and_limit_the_rest() {
        let cfg = ConnectionConfig {
            max_unauthenticated: 3,
            max_unauthenticated_per_ip: 2,
            ..ConnectionConfig::default()
        };
        let budget = Budget::new(cfg, 1024);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let a1 = budget.admit(a).unwrap();
        let a2 = budget.admit(a).unwrap();
        let a3 = budget.admit(a).unwrap();
        assert!(
            !a1.limited && !a2.limited && a3.limited,
            "third from one address is limited"
        );
        let b1 = budget.admit(b).unwrap();
        let b2 = budget.admit(b).unwrap();
        assert!(!b1.limited && b2.limited, "node-wide budget of 3 spent");
        assert_eq!((budget.unauthenticated(), budget.limited()), (3, 2));
        // Authenticating gives the slot back, once.
        a1.authenticated();
        a1.authenticated();
        assert_eq!(budget.unauthenticated(), 2);
        assert!(!budget.admit(b).unwrap().limited);
        drop((a1, a2, a3, b1, b2));
        assert_eq!(budget.limited(), 0);
        assert_eq!(budget.unauthenticated(), 0);
        assert!(budget.per_ip().is_empty());
    }

    #[tokio::test]
    async fn limited_slots_run_out() {
        let cfg = ConnectionConfig {
            max_unauthenticated: 1,
            ..ConnectionConfig::default()
        };
        let budget = Budget::new(cfg, 1024);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let _first = budget.admit(ip).unwrap();
        let limited: Vec<_> = (0..LIMITED).map(|_| budget.admit(ip).unwrap()).collect();
        assert!(budget.admit(ip).is_none());
        drop(limited);
        assert!(budget.admit(ip).is_some());
    }
}
