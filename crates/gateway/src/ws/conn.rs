//! One WebSocket connection: the upgrade (authentication before the handshake, limits, tuned buffers) and the
//! connection task that reads client frames, answers them, and writes what the [`Hub`](super::Hub) queued.
//!
//! Memory per idle connection is what the benchmark watches, so: tungstenite gets a small read buffer and no
//! write buffer (each frame is flushed as it is written), and the connection runs in a task of its own spawned
//! after the handshake, so nothing of the HTTP request stays alive beside it. The socket lives in the
//! connection's [`Outbox`](super::outbox::Outbox): the hub writes pushes straight to it when nothing is ahead
//! of them, and this one task does the rest of the reading and writing (no split halves, no second task); a
//! write blocked by a peer that does not read is abandoned when the hub declares the connection a slow
//! consumer.
//!
//! The token (header or `?token=`) is never logged.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use ferry_core::{JobId, NewJob, ValidationError};
use futures::future::BoxFuture;
use futures::{FutureExt, Sink, SinkExt, Stream, StreamExt};
use governor::clock::MonotonicClock;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use serde_json::{Value, json};
use tokio::time::Instant;

use super::outbox::{Next, Socket};
use super::{ConnSlot, Hub, Signal, View, close, job_topic, key_topic, user_key, write_buffer_cap};
use crate::auth::{AuthError, Principal, Scope};
use crate::error::ApiError;
use crate::http::{channels, tenancy};
use crate::state::AppState;

/// `GET /v1/ws`.
/// tungstenite's read buffer, allocated up front on every connection: client frames are small JSON (bigger
/// ones are read in several chunks), so a small buffer keeps idle connections small.
const READ_BUFFER: usize = 128;

pub async fn upgrade(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let hub = state.hub.clone();
    if hub.closing() {
        // Draining: the client should connect to another node.
        return ApiError::Unavailable {
            detail: "this node is shutting down, connect again".into(),
            retry_after_secs: 1,
        }
        .into_response();
    }
    let token = bearer(&headers).or_else(|| query_token(query.as_deref()));
    let verified = match token.as_deref() {
        Some(t) => Some(state.auth.verify_or_refresh(t).await),
        None => None,
    };
    let principal = match verified {
        Some(Ok(p)) => p,
        failed => {
            // Counted by reason in `unauth_allowed` (whether the address is over its failure budget decides it).
            if !hub.unauth_allowed(peer.ip()) {
                return ApiError::RateLimited {
                    retry_after_secs: 1,
                }
                .into_response();
            }
            let e = match failed {
                Some(Err(e)) => e,
                _ => AuthError::Missing,
            };
            return ApiError::from(e).into_response();
        }
    };
    // `since_offset` / `since_epoch`: recover the automatic `user:` channel (400 naming the field when malformed).
    let since = match super::replay::since_from_query(query.as_deref()) {
        Ok(s) => s.map(Box::new),
        Err(e) => return e.into_response(),
    };
    // Authentication first (401 without a token, as on every /v1 route), then the handshake's own headers.
    let ws = match ws {
        Ok(ws) => ws,
        Err(r) => return upgrade_problem(&r).into_response(),
    };
    let limits = hub.limits();
    let max = limits.max_frame_bytes;
    // Bounded so a peer that stops reading cannot make tungstenite buffer without limit, and large enough for
    // any frame the server writes (pushes are bounded by `max_publish_bytes`).
    let max_write = write_buffer_cap(limits);
    let partition =
        ferry_broker::placement::partition_of(principal.tenant.as_deref(), &principal.sub);
    let mut slot = hub.admit(subject_key(&principal), partition);
    // Every connection hears about its own jobs without asking, from the moment its handshake is answered: a
    // client that submits as soon as it sees the connection open must get every event of that job. So the
    // `user:` channel is subscribed before the 101; its first frames wait in the outbox for the socket.
    if let Some(slot) = slot.as_mut() {
        let key = subject_key(&principal);
        let own = own_view(&principal);
        let topic = key_topic(&key);
        if hub
            .subscribe(&slot.handle, &key, own, topic, since.is_some())
            .await
            .is_ok()
        {
            slot.keys.push(key);
        }
    }
    ws.read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_write_buffer_size(max_write)
        .max_frame_size(max)
        .max_message_size(max)
        .on_upgrade(move |socket| async move {
            // A fresh task: the upgrade future (and the request it came from) ends here.
            match slot {
                Some(slot) => {
                    slot.handle.outbox.attach(socket);
                    let mut conn = Conn::new(state, principal, slot);
                    conn.since = since;
                    tokio::spawn(run(conn));
                }
                None => {
                    tokio::spawn(refuse(hub, socket));
                }
            }
        })
}

/// A handshake that cannot be upgraded, as problem+json: 426 when it is no upgrade at all (a plain GET), 400
/// naming the header otherwise.
fn upgrade_problem(r: &WebSocketUpgradeRejection) -> ApiError {
    use WebSocketUpgradeRejection as R;
    let field = |name: &str, message: &str| ApiError::from(ValidationError::field(name, message));
    match r {
        R::InvalidConnectionHeader(_)
        | R::InvalidUpgradeHeader(_)
        | R::InvalidProtocolPseudoheader(_)
        | R::ConnectionNotUpgradable(_) => ApiError::UpgradeRequired(
            "this route speaks WebSocket only: send Connection: Upgrade and Upgrade: websocket"
                .into(),
        ),
        R::InvalidWebSocketVersionHeader(_) => field("Sec-WebSocket-Version", "must be 13"),
        R::WebSocketKeyHeaderMissing(_) => field("Sec-WebSocket-Key", "is required"),
        _ => ApiError::bad_request("not a WebSocket handshake"),
    }
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_owned())
}

fn query_token(query: Option<&str>) -> Option<String> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == "token").then(|| percent_decode(v))
    })
}

/// JWTs are base64url and dots, so a token needs no decoding unless a client escaped it anyway.
pub(super) fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Some(x) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(x);
            i += 3;
        } else {
            out.push(if b[i] == b'+' { b' ' } else { b[i] });
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// How the connection's own `user:` channel is shown to it.
fn own_view(p: &Principal) -> View {
    View {
        channel: format!("user:{}", p.sub),
        tenant: p.tenant.clone(),
    }
}

fn subject_key(p: &Principal) -> String {
    user_key(p.tenant.as_deref(), &p.sub)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// When the token expires, as an instant: not before it, as whole seconds from now are counted from the start
/// of the current second.
fn expiry(exp: u64) -> Instant {
    Instant::now() + Duration::from_secs(exp.saturating_sub(now_secs()))
}

/// What the closing handshake needs of a socket: the connection's [`Socket`], or a bare one being refused.
trait Wire:
    Sink<Message, Error = axum::Error> + Stream<Item = Result<Message, axum::Error>> + Unpin + Send
{
}

impl<T> Wire for T where
    T: Sink<Message, Error = axum::Error>
        + Stream<Item = Result<Message, axum::Error>>
        + Unpin
        + Send
{
}

/// Boxed for the same reason as [`send`]: it runs once, at the end, and should not size every connection's task.
fn close_with<'a, S: Wire + 'a>(
    socket: &'a mut S,
    code: u16,
    reason: &'static str,
) -> BoxFuture<'a, ()> {
    close_inline(socket, code, reason).boxed()
}

async fn close_inline<S: Wire>(socket: &mut S, code: u16, reason: &'static str) {
    let frame = CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    };
    // The closing handshake (RFC 6455 §7.1.1): send Close, then read and discard until the peer's Close or the
    // end of the stream. Closing the socket with the peer's frames still unread would make the kernel answer
    // with a reset, and the peer would never see the close code (a flooding client, typically). Both steps
    // together are bounded so a silent peer cannot hold the connection.
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        if socket.send(Message::Close(Some(frame))).await.is_err() {
            return;
        }
        while let Some(Ok(msg)) = socket.next().await {
            if matches!(msg, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

/// How long a closing handshake may take.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Why the loop ended: a close frame to send, or nothing (the peer is gone).
type Ending = Option<(u16, &'static str)>;

struct Conn {
    /// The hub is `state.hub`.
    state: AppState,
    principal: Principal,
    slot: ConnSlot,
    /// On std's clock: governor's default (quanta) clock is 40 bytes of every connection's task, this one none.
    limiter:
        RateLimiter<NotKeyed, InMemoryState, MonotonicClock, NoOpMiddleware<std::time::Instant>>,
    violations: u32,
    /// The connect URL's `since` for the automatic `user:` channel, taken when it is subscribed.
    since: Option<Box<ferry_broker::StreamPos>>,
}

impl Conn {
    fn new(state: AppState, principal: Principal, slot: ConnSlot) -> Self {
        let limits = state.hub.limits();
        let rate = std::num::NonZeroU32::new(limits.ws_rate_per_sec.max(1))
            .unwrap_or(std::num::NonZeroU32::MIN);
        let burst =
            std::num::NonZeroU32::new(limits.ws_burst.max(1)).unwrap_or(std::num::NonZeroU32::MIN);
        Self {
            limiter: RateLimiter::direct_with_clock(
                Quota::per_second(rate).allow_burst(burst),
                MonotonicClock,
            ),
            violations: 0,
            since: None,
            state,
            principal,
            slot,
        }
    }
}

/// The connection limit was reached: say so and close.
async fn refuse(hub: Arc<Hub>, mut socket: WebSocket) {
    hub.count_close(close::TRY_AGAIN_LATER);
    close_with(
        &mut socket,
        close::TRY_AGAIN_LATER,
        "connection limit reached",
    )
    .await;
}

/// Serve one admitted connection until it ends.
///
/// Sized with care: a tokio task is as large as its future, and every idle connection is one task. The two
/// arguments are captured by an async block and used in place, never moved into new locals (each move is a
/// second copy in the future), and everything awaited only now and then is boxed.
#[allow(clippy::manual_async_fn)] // On purpose, see inside.
fn run(mut c: Conn) -> impl Future<Output = ()> + Send {
    // Not an `async fn`: an async fn moves its arguments into new locals and so stores them twice (rust-lang
    // issue 62958); an async block uses its captures in place.
    async move {
        // The `user:` channel was subscribed at the upgrade (see there); recovered here.
        if let Some(since) = c.since.take() {
            let key = subject_key(&c.principal);
            if c.slot.keys.contains(&key) {
                let view = own_view(&c.principal);
                // Boxed: awaited once, it should not size every connection's task.
                Box::pin(
                    c.state
                        .hub
                        .recover(&c.slot.handle, &key, &view, &since, true),
                )
                .await;
            }
        }
        // The hub is reached as `c.state.hub` throughout, the ping interval and the token's expiry read where
        // they are used: each local that lives across the loop's wait is part of every idle connection's task.
        let handle = c.slot.handle.clone();
        let mut socket = handle.outbox.socket();
        // One timer serves both the ping schedule and the token's expiry (an `Interval` would be a second, boxed
        // timer on every idle connection).
        let mut next_ping =
            Instant::now() + first_ping(handle.id, c.state.hub.limits().ping_interval);
        let mut last_seen = Instant::now();
        // Set when the node drains (see `Hub::goaway`) or moves this connection away (`Hub::move_away`): when
        // it closes with 1001.
        let mut closing: Option<Instant> = None;
        // Each turn waits for one thing, then writes at most one frame at the loop's single write (so the task
        // holds one write's state, not one per place that writes).
        let ending: Ending = loop {
            // The write of this turn: a frame (or, `None`, only a flush). The outbox is held for it: by
            // `take_next` for the hub's frames, here for the connection's own.
            let msg: Option<Message> = tokio::select! {
                // Shutdown (1001) or slow consumer (4009): see `ConnHandle::ending`. Moved away by rebalancing,
                // or the node drains: say goodbye, and close after a delay. Or a frame to write.
                s = handle.signal(&c.state.hub, closing.is_none()) => match s {
                    Signal::Kill => break Some(handle.ending()),
                    Signal::Move | Signal::Goaway => {
                        let delay = c.state.hub.close_delay();
                        closing = Some(Instant::now() + delay);
                        let reason = if matches!(s, Signal::Move) { "rebalance" } else { "shutdown" };
                        handle.outbox.hold();
                        Some(goaway(reason, delay))
                    }
                    Signal::Write(Next::Frame(frame)) => Some(Message::Text(frame)),
                    Signal::Write(Next::Flush) => None,
                },
                // The next ping, the token's expiry or the close time, whichever comes first (computed in place: a
                // local would be kept across the wait).
                _ = tokio::time::sleep_until(wake_at(next_ping, c.principal.exp, closing)) => {
                    if closing.is_some_and(|t| Instant::now() >= t) {
                        break Some(handle.going_away());
                    }
                    // The wake for the expiry comes at or after it (see `expiry`).
                    if now_secs() >= c.principal.exp {
                        break Some((close::TOKEN_EXPIRED, "token expired"));
                    }
                    let ping_interval = c.state.hub.limits().ping_interval;
                    next_ping += ping_interval;
                    if last_seen.elapsed() > ping_interval * 2 {
                        // Dead peer: nobody to say goodbye to.
                        break None;
                    }
                    handle.outbox.hold();
                    Some(Message::Ping(Default::default()))
                }
                msg = socket.next() => {
                    last_seen = Instant::now();
                    let text = match msg {
                        None => break None,
                        Some(Err(e)) => {
                            if is_capacity(&e) {
                                break Some((close::TOO_BIG, "frame too big"));
                            }
                            break None;
                        }
                        Some(Ok(Message::Text(t))) => t,
                        Some(Ok(Message::Binary(_))) => {
                            break Some((close::POLICY, "frames must be JSON text"));
                        }
                        Some(Ok(Message::Close(_))) => break None,
                        // tungstenite answers a ping by itself, so control frames cost the server a write
                        // each like any request: they count against the frame rate, and a ping flood ends in
                        // 4008 like a text flood (no reply frame: a ping has no id).
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => match c.charge() {
                            Err(ending) => break Some(ending),
                            Ok(_) => continue,
                        },
                    };
                    c.state.hub.count_frame_in();
                    // The hub queues meanwhile, so the answer goes out before anything the request causes (a
                    // subscription's first message after its `ok`).
                    handle.outbox.hold();
                    // Boxed: the frame handler's state would otherwise be part of every idle connection's task.
                    match Box::pin(c.frame(text.as_str())).await {
                        Ok(Some(reply)) => {
                            c.state.hub.count_frame_out();
                            Some(Message::Text(reply.into()))
                        }
                        Ok(None) => {
                            handle.outbox.done();
                            continue;
                        }
                        Err(ending) => {
                            handle.outbox.done();
                            break Some(ending);
                        }
                    }
                }
            };
            let sent = send(&mut socket, &c.state.hub, &handle, msg, closing).await;
            handle.outbox.done();
            if let Err(ending) = sent {
                break ending;
            }
        };
        handle.outbox.hold();
        if let Some((code, reason)) = ending {
            c.state.hub.count_close(code);
            close_with(&mut socket, code, reason).await;
        }
        drop(handle.outbox.detach());
    }
}

/// When the connection's timer must fire: the next ping, the token's expiry or the close time (if closing).
fn wake_at(next_ping: Instant, exp: u64, closing: Option<Instant>) -> Instant {
    let t = next_ping.min(expiry(exp));
    closing.map_or(t, |c| c.min(t))
}

/// When a connection's first ping is due: somewhere in the second half of the interval, spread by its id, then
/// every interval. Connections opened together (a reconnect wave after a restart, a load test) would otherwise
/// be pinged together, and answer together, every interval for as long as they live.
fn first_ping(id: u64, interval: Duration) -> Duration {
    // Fibonacci hashing: consecutive ids land far apart in [0, 1024).
    let spread = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 54;
    interval / 2 + interval.mul_f64(spread as f64 / 2048.0)
}

/// A frame over `max_frame_bytes`. axum hides tungstenite's error type, and this crate does not depend on
/// tungstenite itself, so the capacity error is recognised by its message.
fn is_capacity(e: &axum::Error) -> bool {
    e.to_string().contains("Space limit exceeded")
}

/// tungstenite refused a frame because its write buffer would exceed `max_write_buffer_size` (recognised by its
/// message, as [`is_capacity`] is). The frame was not queued and the connection is still usable.
fn is_write_buffer_full(e: &axum::Error) -> bool {
    e.to_string().contains("Write buffer is full")
}

/// Write one frame, giving up if the hub closes the connection meanwhile (a peer that does not read, or
/// shutdown). On failure, the ending: the hub's close frame when it killed the connection (a write blocked by a
/// slow consumer is exactly when the hub does, and the peer must still learn why: tungstenite keeps the
/// half-written frame and sends it before the close frame); 4009 when the write buffer is full (the peer left
/// that much unread; the buffer is sized for every frame the server writes, see [`write_buffer_cap`], and a
/// close frame still fits); nothing when the write itself failed (the peer is gone; counted). A write still
/// blocked when a draining connection's close time (`closing`) comes is abandoned for the 1001 close.
///
/// A frame the socket takes at once (nearly every one) is written in the first poll, with nothing allocated;
/// only a blocked write goes on to [`send_blocked`]. A hand-written future rather than an `async fn`: the
/// connection task stores it at each of its call sites, and an async fn's state was twice as large.
fn send<'a, 's>(
    socket: &'a mut Socket<'s>,
    hub: &'a Hub,
    handle: &'a super::ConnHandle,
    msg: Option<Message>,
    closing: Option<Instant>,
) -> SendFrame<'a, 's> {
    SendFrame {
        socket: Some(socket),
        hub,
        handle,
        msg,
        closing,
        blocked: None,
    }
}

/// See [`send`].
struct SendFrame<'a, 's> {
    /// Until the first poll, which writes or hands it to `blocked`.
    socket: Option<&'a mut Socket<'s>>,
    hub: &'a Hub,
    handle: &'a super::ConnHandle,
    msg: Option<Message>,
    closing: Option<Instant>,
    blocked: Option<BoxFuture<'a, Result<(), Ending>>>,
}

impl Future for SendFrame<'_, '_> {
    type Output = Result<(), Ending>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // Every field is Unpin (references, a message, a boxed future).
        let this = self.get_mut();
        if let Some(socket) = this.socket.take() {
            match try_send(socket, cx, &mut this.msg) {
                Ok(true) => return Poll::Ready(Ok(())),
                Err(e) => return Poll::Ready(Err(write_failed(this.hub, &e))),
                Ok(false) => {
                    this.blocked = Some(send_blocked(
                        socket,
                        this.hub,
                        this.handle,
                        this.msg.take(),
                        this.closing,
                    ));
                }
            }
        }
        match &mut this.blocked {
            Some(blocked) => blocked.as_mut().poll(cx),
            // Polled again after it finished: a bug in the caller, answered as a failed write.
            None => Poll::Ready(Err(None)),
        }
    }
}

/// One attempt at writing `msg` (taken once the sink accepts it) and flushing it: `true` when it went out,
/// `false` when the sink is not ready for it or its flush is pending (the task is registered for either).
fn try_send(
    socket: &mut Socket<'_>,
    cx: &mut Context<'_>,
    msg: &mut Option<Message>,
) -> Result<bool, axum::Error> {
    let mut sink = Pin::new(socket);
    if let Some(m) = msg.take() {
        match sink.as_mut().poll_ready(cx) {
            Poll::Ready(r) => r?,
            Poll::Pending => {
                *msg = Some(m);
                return Ok(false);
            }
        }
        sink.as_mut().start_send(m)?;
    }
    match sink.poll_flush(cx) {
        Poll::Ready(r) => r.map(|()| true),
        Poll::Pending => Ok(false),
    }
}

/// A failed write as the connection's ending (see [`send`]).
fn write_failed(hub: &Hub, e: &axum::Error) -> Ending {
    if is_write_buffer_full(e) {
        Some((close::SLOW_CONSUMER, "slow consumer"))
    } else {
        hub.count_write_error();
        None
    }
}

/// The rest of a write the socket did not take at once: `msg` still to send, or (`None`) only the flush.
///
/// Boxed: the write's state (the frame, a timer, the kill wait: about 600 bytes) would otherwise be part of
/// every idle connection's task, which is sized for its largest await.
fn send_blocked<'a>(
    socket: &'a mut Socket<'_>,
    hub: &'a Hub,
    handle: &'a super::ConnHandle,
    msg: Option<Message>,
    closing: Option<Instant>,
) -> BoxFuture<'a, Result<(), Ending>> {
    send_inline(socket, hub, handle, msg, closing).boxed()
}

async fn send_inline(
    socket: &mut Socket<'_>,
    hub: &Hub,
    handle: &super::ConnHandle,
    msg: Option<Message>,
    closing: Option<Instant>,
) -> Result<(), Ending> {
    let closed = async {
        match closing {
            Some(t) => tokio::time::sleep_until(t).await,
            None => std::future::pending().await,
        }
    };
    let write = async {
        match msg {
            Some(m) => socket.send(m).await,
            None => socket.flush().await,
        }
    };
    tokio::select! {
        // The write first: a frame that can go out at once does, even at the close time (a goaway frame with
        // no delay).
        biased;
        r = write => r.map_err(|e| write_failed(hub, &e)),
        _ = handle.killed(hub) => Err(Some(handle.ending())),
        _ = closed => Err(Some(handle.going_away())),
    }
}

/// `{"type": "goaway", "reason", "reconnect_after_ms"}`: connect again (elsewhere) after the delay.
fn goaway(reason: &str, delay: Duration) -> Message {
    let frame =
        json!({"type": "goaway", "reason": reason, "reconnect_after_ms": delay.as_millis() as u64});
    Message::Text(frame.to_string().into())
}

fn reply_ok(id: &Value, mut extra: Value) -> String {
    extra["id"] = id.clone();
    extra["ok"] = Value::Bool(true);
    extra.to_string()
}

fn reply_err(id: &Value, e: &ApiError) -> String {
    json!({"id": id, "ok": false, "error": e.ws_error()}).to_string()
}

impl Conn {
    /// Take one frame (text, ping or pong) from the connection's rate budget: `Ok(true)` within it, `Ok(false)`
    /// over it (counted), the 4008 close once it has been over it `ws_sustained_violations` frames in a row.
    fn charge(&mut self) -> Result<bool, (u16, &'static str)> {
        if self.limiter.check().is_ok() {
            self.violations = 0;
            return Ok(true);
        }
        self.state.hub.count_rate_limited_frame();
        self.violations += 1;
        if self.violations > self.state.hub.limits().ws_sustained_violations {
            return Err((close::RATE_LIMITED, "rate limited"));
        }
        Ok(false)
    }

    /// Handle one client frame: the reply to send, or the close code that ends the connection.
    async fn frame(&mut self, text: &str) -> Result<Option<String>, (u16, &'static str)> {
        let parsed: Result<Value, _> = serde_json::from_str(text);
        let id = parsed
            .as_ref()
            .ok()
            .and_then(|v| v.get("id").cloned())
            .unwrap_or(Value::Null);
        if !self.charge()? {
            let e = ApiError::RateLimited {
                retry_after_secs: 1,
            };
            return Ok(Some(reply_err(&id, &e)));
        }
        let v = match parsed {
            Ok(v @ Value::Object(_)) => v,
            _ => {
                let e = ApiError::bad_request("a frame must be a JSON object");
                return Ok(Some(reply_err(&id, &e)));
            }
        };
        let r = self.op(&v).await;
        Ok(match r {
            Ok(extra) if !id.is_null() => Some(reply_ok(&id, extra)),
            Ok(_) => None,
            Err(e) => Some(reply_err(&id, &e)),
        })
    }

    async fn op(&mut self, v: &Value) -> Result<Value, ApiError> {
        let str_field = |name: &str| -> Result<&str, ApiError> {
            v.get(name).and_then(Value::as_str).ok_or_else(|| {
                ferry_core::ValidationError::field(name, "is required and must be a string").into()
            })
        };
        match str_field("op")? {
            "ping" => Ok(json!({"pong": true})),
            "subscribe" => {
                let channel = str_field("channel")?;
                let since = super::replay::parse_since(v)?;
                let (key, topic) = self.authorize(channel, false).await?;
                if self.slot.keys.contains(&key) {
                    // Already live: nothing was missed on this connection, and a replay would double frames.
                    return Ok(json!({"channel": channel}));
                }
                if self.slot.keys.len() >= self.state.hub.limits().max_subscriptions {
                    return Err(ApiError::bad_request(format!(
                        "at most {} subscriptions per connection",
                        self.state.hub.limits().max_subscriptions
                    )));
                }
                let view = View {
                    channel: channel.to_owned(),
                    tenant: self.principal.tenant.clone(),
                };
                let recovering = since.as_ref().map(|_| View {
                    channel: channel.to_owned(),
                    tenant: self.principal.tenant.clone(),
                });
                self.state
                    .hub
                    .subscribe(&self.slot.handle, &key, view, topic, since.is_some())
                    .await?;
                let mut out = json!({"channel": channel});
                if let (Some(since), Some(view)) = (since, recovering) {
                    let r = self
                        .state
                        .hub
                        .recover(&self.slot.handle, &key, &view, &since, false)
                        .await;
                    r.fill(&mut out);
                }
                self.slot.keys.push(key);
                Ok(out)
            }
            "unsubscribe" => {
                let channel = str_field("channel")?;
                let key = self.key(channel)?;
                if let Some(i) = self.slot.keys.iter().position(|k| *k == key) {
                    self.slot.keys.swap_remove(i);
                    self.state.hub.unsubscribe(self.slot.handle.id, &key);
                }
                Ok(json!({"channel": channel}))
            }
            "publish" => {
                let channel = str_field("channel")?;
                let (key, _) = self.authorize(channel, true).await?;
                let data = v.get("data").unwrap_or(&Value::Null);
                let message = self.state.hub.prepare_publish(&key, data)?;
                self.state
                    .resilience
                    .broker(self.state.hub.publish(message))
                    .await?;
                Ok(json!({"channel": channel}))
            }
            "submit" => {
                self.principal.require(Scope::JobsSubmit)?;
                self.state.resilience.admit_submission()?;
                let queue = str_field("queue")?;
                let q = tenancy::broker_queue(&self.principal, queue)?;
                let body = v.get("job").cloned().unwrap_or(Value::Null);
                let mut job: NewJob = serde_json::from_value(body)
                    .map_err(|e| ApiError::bad_request(format!("job: {e}")))?;
                job.owner = Some(self.principal.sub.clone());
                job.tenant = self.principal.tenant.clone();
                job.validate(&self.state.config.job_limits)?;
                let e = self
                    .state
                    .resilience
                    .broker(self.state.broker.enqueue(&q, job))
                    .await?;
                let mut out = json!({"job": {"id": e.id, "queue": queue, "state": e.state}});
                if e.duplicate {
                    out["job"]["duplicate"] = Value::Bool(true);
                }
                Ok(out)
            }
            "refresh" => {
                let token = str_field("token")?;
                let p = self.state.auth.verify_or_refresh(token).await?;
                if p.sub != self.principal.sub || p.tenant != self.principal.tenant {
                    return Err(ApiError::Forbidden(
                        "a refresh token must be for the same subject and tenant".into(),
                    ));
                }
                let exp = p.exp;
                self.principal = p;
                Ok(json!({"exp": exp}))
            }
            other => Err(ApiError::bad_request(format!("unknown op {other:?}"))),
        }
    }

    /// The hub key of a client channel name, checked for shape only.
    fn key(&self, channel: &str) -> Result<String, ApiError> {
        let p = &self.principal;
        let bad = || {
            ApiError::bad_request(format!(
                "unknown channel {channel:?}: use user:<sub>, job:<id>, queue:<name> or app:<name>"
            ))
        };
        let (kind, name) = channel.split_once(':').ok_or_else(bad)?;
        Ok(match kind {
            "user" => user_key(p.tenant.as_deref(), name),
            "job" => format!("job:{}", JobId::parse(name)?),
            "queue" => format!("queue:{}", tenancy::broker_queue(p, name)?),
            "app" => channels::app_channel(p, name)?,
            _ => return Err(bad()),
        })
    }

    /// The hub key of a channel this principal may subscribe to (or publish on), with the job feed topic a
    /// subscription to it needs (see [`Hub::subscribe`]).
    async fn authorize(
        &self,
        channel: &str,
        publish: bool,
    ) -> Result<(String, Option<ferry_broker::Topic>), ApiError> {
        let p = &self.principal;
        let key = self.key(channel)?;
        let (kind, name) = channel.split_once(':').unwrap_or_default();
        if publish && kind != "app" {
            return Err(ApiError::bad_request(
                "only app: channels can be published to",
            ));
        }
        match kind {
            "user" if name != p.sub && !p.is_admin() => {
                Err(ApiError::Forbidden("only your own user channel".into()))
            }
            "job" => {
                let id = JobId::parse(name)?;
                // A finished job may be only in the record (it leaves the broker once recorded).
                match self.state.find_job(id).await? {
                    Some(j) if p.owns(j.spec.owner.as_deref(), j.spec.tenant.as_deref()) => {
                        // The job's events come through its owner's partition.
                        let topic = job_topic(j.spec.owner.as_deref(), j.spec.tenant.as_deref());
                        Ok((key, Some(topic)))
                    }
                    // Someone else's job is not found, as on the HTTP API.
                    _ => Err(ApiError::NotFound(format!("no job {id}"))),
                }
            }
            "queue" => p.require(Scope::QueuesRead).map(|_| {
                let topic = key_topic(&key);
                (key, topic)
            }),
            "app" => p
                .require(if publish {
                    Scope::Publish
                } else {
                    Scope::Subscribe
                })
                .map(|_| (key, None)),
            _ => {
                let topic = key_topic(&key);
                Ok((key, topic))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of what `f` returns, without calling it.
    fn returned_size<A, R>(_: fn(A) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    #[cfg(target_pointer_width = "64")]
    #[test]
    fn a_connection_task_fits_640_bytes() {
        // Every idle connection is one task: tokio allocates the future with a 32-byte header, 24 bytes of
        // scheduler and id beside it and a 48-byte trailer, aligned to 128 bytes. 537 bytes of future would make
        // every connection's task 768 bytes.
        let future = returned_size(run);
        assert!(future <= 536, "the connection's future is {future} bytes");
    }

    #[test]
    fn first_pings_of_consecutive_connections_spread_over_the_second_half_of_the_interval() {
        let interval = Duration::from_secs(20);
        let mut tenths = [0u32; 10];
        for id in 0..1000 {
            let at = first_ping(id, interval);
            assert!(at >= interval / 2 && at < interval, "{id}: {at:?}");
            let tenth =
                ((at - interval / 2).as_secs_f64() / (interval.as_secs_f64() / 20.0)) as usize;
            tenths[tenth] += 1;
        }
        assert!(
            tenths.iter().all(|&n| (70..=130).contains(&n)),
            "{tenths:?}"
        );
    }
}
