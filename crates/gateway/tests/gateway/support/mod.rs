//! What the resilience and query tests share: a real gateway on 127.0.0.1:0 driven over real HTTP (reqwest) and
//! WebSocket (tokio-tungstenite), real HS256 tokens, and a broker wrapper with switches (the event-log backlog it
//! reports, a stalled channel feed, stalled submissions).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use ferry_broker::{
    Broker, BrokerError, CancelOutcome, ChannelFeed, Completion, EngineConfig, Enqueued,
    EventStream, FailOutcome, Failure, JobFeed, Lease, Leased, LogEntry, LogPosition, MemoryBroker,
    QueueStats, Reclaimed, Rejected, RetryOutcome,
};
use ferry_core::{JobId, JobInfo, NewJob, QueueName};
use ferry_gateway::auth::{AuthConfig, MintClaims, mint};
use ferry_gateway::{Gateway, GatewayConfig};
use futures::{SinkExt, StreamExt};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

pub const SECRET: &[u8] = b"test-secret-test-secret-test-secret!";
pub const USER: &str = "jobs:submit jobs:read jobs:cancel subscribe";
pub const ADMIN: &str = "admin jobs:submit jobs:read jobs:cancel";

pub struct TestApp {
    pub base: String,
    pub addr: std::net::SocketAddr,
    pub client: reqwest::Client,
    shutdown: CancellationToken,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Reply {
    /// The `field` of the first entry of a problem's `errors`.
    pub fn field(&self) -> &str {
        self.body["errors"][0]["field"].as_str().unwrap_or("")
    }

    /// `Retry-After` in whole seconds.
    pub fn retry_after(&self) -> Option<u64> {
        self.headers.get("retry-after")?.to_str().ok()?.parse().ok()
    }
}

/// Asserts a problem+json answer with this status and problem type slug.
pub fn is_problem(r: &Reply, status: u16, slug: &str) {
    assert_eq!(r.status.as_u16(), status, "{:?}", r.body);
    assert_eq!(
        r.headers["content-type"], "application/problem+json",
        "{:?}",
        r.body
    );
    assert_eq!(r.body["status"], status);
    assert_eq!(
        r.body["type"],
        format!("urn:ferry:problem:{slug}"),
        "{:?}",
        r.body
    );
}

impl TestApp {
    pub async fn start(broker: Arc<dyn Broker>, tweak: impl FnOnce(&mut GatewayConfig)) -> Self {
        let auth = AuthConfig {
            hs_secret: Some(SECRET.to_vec()),
            ..AuthConfig::default()
        };
        let mut config = GatewayConfig::new("127.0.0.1:0".parse().unwrap(), auth);
        tweak(&mut config);
        let gateway = Gateway::build(config, broker)
            .await
            .expect("gateway builds");
        let addr = gateway.local_addr();
        let shutdown = CancellationToken::new();
        tokio::spawn(gateway.run(shutdown.clone()));
        let app = Self {
            base: format!("http://{addr}"),
            addr,
            // Bounded, so a gateway that hangs fails the test instead of blocking it.
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap(),
            shutdown,
        };
        app.settle().await;
        app
    }

    /// Give the node up to 5 s to become ready (its subscriptions start in the background), so tests begin
    /// from a settled node; one that never gets there is left to the test's own assertions.
    async fn settle(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while tokio::time::Instant::now() < deadline {
            if self.anon("/readyz").await.status == 200 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Reply {
        let mut req = self.client.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let res = req.send().await.expect("request answered");
        let (status, headers) = (res.status(), res.headers().clone());
        let text = res.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Reply {
            status,
            headers,
            body,
        }
    }

    /// A node on a fresh memory engine, and the engine.
    pub async fn memory() -> (Self, Arc<MemoryBroker>) {
        let broker = Arc::new(MemoryBroker::new(EngineConfig::default()));
        (Self::start(broker.clone(), |_| {}).await, broker)
    }

    /// POST a body as is (malformed JSON, oversized bodies).
    pub async fn raw_post(&self, path: &str, token: &str, body: impl Into<reqwest::Body>) -> Reply {
        let res = self
            .client
            .post(format!("{}{path}", self.base))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let (status, headers) = (res.status(), res.headers().clone());
        let body = res.json().await.unwrap_or(Value::Null);
        Reply {
            status,
            headers,
            body,
        }
    }

    pub async fn get(&self, path: &str, token: &str) -> Reply {
        self.send(Method::GET, path, Some(token), None).await
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> Reply {
        self.send(Method::POST, path, Some(token), Some(&body))
            .await
    }

    pub async fn delete(&self, path: &str, token: &str) -> Reply {
        self.send(Method::DELETE, path, Some(token), None).await
    }

    pub async fn anon(&self, path: &str) -> Reply {
        self.send(Method::GET, path, None, None).await
    }

    pub async fn metrics(&self) -> String {
        match self.anon("/metrics").await.body {
            Value::String(s) => s,
            other => panic!("metrics are text: {other:?}"),
        }
    }

    pub async fn ws(&self, token: &str) -> Ws {
        let url = format!("ws://{}/v1/ws?token={token}", self.addr);
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("upgrade");
        ws
    }
}

pub fn token(sub: &str, scopes: &str, tenant: Option<&str>) -> String {
    mint(
        SECRET,
        &MintClaims::new(sub, scopes, Duration::from_secs(3600)).in_tenant(tenant),
    )
    .expect("token minted")
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Send a frame and wait for the reply with the same `id` (pushed events skipped).
pub async fn ws_call(ws: &mut Ws, frame: Value) -> Value {
    let id = frame["id"].clone();
    ws.send(Message::text(frame.to_string()))
        .await
        .expect("send");
    loop {
        let m = tokio::time::timeout(Duration::from_secs(15), ws.next())
            .await
            .expect("a reply in time")
            .expect("stream open")
            .expect("frame ok");
        if let Message::Text(t) = m {
            let v: Value = serde_json::from_str(t.as_str()).expect("JSON");
            if v["id"] == id {
                return v;
            }
        }
    }
}

/// Poll `f` until it returns `Some`, for at most `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A real broker with switches: a stalled feed silently drops every channel message (a subscription that is
/// stuck while the connection still answers PING); stalled submissions hang. Publishes are recorded.
#[derive(Debug)]
pub struct Switches {
    pub inner: Arc<dyn Broker>,
    /// What `log_backlog` answers (the recorder's backlog, for shedding tests).
    pub backlog: AtomicU64,
    pub feed_stalled: Arc<AtomicBool>,
    pub enqueue_stalled: AtomicBool,
    /// When set, job lookups fail: 1 = the broker is unavailable, 2 = an internal broker error.
    pub lookups_fail: AtomicU64,
    pub published: Mutex<Vec<String>>,
    /// Channel feeds opened so far; feed number n ends at its next message once `feeds_ended >= n`.
    pub feeds_opened: AtomicU64,
    feeds_ended: Arc<AtomicU64>,
}

impl Switches {
    pub fn new(inner: Arc<dyn Broker>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            backlog: AtomicU64::new(0),
            feed_stalled: Arc::default(),
            enqueue_stalled: AtomicBool::new(false),
            lookups_fail: AtomicU64::new(0),
            published: Mutex::default(),
            feeds_opened: AtomicU64::new(0),
            feeds_ended: Arc::default(),
        })
    }

    /// End every channel feed opened so far, at its next message (as a feed whose engine task died would).
    pub fn end_feeds(&self) {
        self.feeds_ended
            .store(self.feeds_opened.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    /// Set the backlog `log_backlog` reports.
    pub fn set(&self, n: u64) {
        self.backlog.store(n, Ordering::SeqCst);
    }

    pub fn canary_publishes(&self) -> usize {
        self.published
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.starts_with("ferry.canary."))
            .count()
    }
}

#[async_trait]
impl Broker for Switches {
    async fn enqueue_batch(
        &self,
        q: &QueueName,
        jobs: Vec<NewJob>,
    ) -> Result<Vec<Enqueued>, BrokerError> {
        while self.enqueue_stalled.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.inner.enqueue_batch(q, jobs).await
    }
    async fn claim(
        &self,
        q: &QueueName,
        c: &str,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Leased>, BrokerError> {
        self.inner.claim(q, c, max, wait).await
    }
    async fn heartbeat(&self, leases: &[Lease]) -> Result<Vec<bool>, BrokerError> {
        self.inner.heartbeat(leases).await
    }
    async fn progress(&self, lease: &Lease, data: Value) -> Result<bool, BrokerError> {
        self.inner.progress(lease, data).await
    }
    async fn complete(
        &self,
        items: Vec<Completion>,
    ) -> Result<Vec<Result<(), Rejected>>, BrokerError> {
        self.inner.complete(items).await
    }
    async fn fail(
        &self,
        items: Vec<Failure>,
    ) -> Result<Vec<Result<FailOutcome, Rejected>>, BrokerError> {
        self.inner.fail(items).await
    }
    async fn release(&self, leases: &[Lease]) -> Result<Vec<bool>, BrokerError> {
        self.inner.release(leases).await
    }
    async fn cancel(&self, id: JobId, by: Option<&str>) -> Result<CancelOutcome, BrokerError> {
        self.inner.cancel(id, by).await
    }
    async fn promote_due(&self, q: &QueueName, max: usize) -> Result<usize, BrokerError> {
        self.inner.promote_due(q, max).await
    }
    async fn reclaim_expired(&self, q: &QueueName, max: usize) -> Result<Reclaimed, BrokerError> {
        self.inner.reclaim_expired(q, max).await
    }
    async fn dead_letters(&self, q: &QueueName, limit: usize) -> Result<Vec<JobInfo>, BrokerError> {
        self.inner.dead_letters(q, limit).await
    }
    async fn retry_dead(&self, id: JobId) -> Result<RetryOutcome, BrokerError> {
        self.inner.retry_dead(id).await
    }
    async fn stats(&self, q: &QueueName) -> Result<QueueStats, BrokerError> {
        self.inner.stats(q).await
    }
    async fn scheduled_due(
        &self,
        q: &QueueName,
        within: std::time::Duration,
    ) -> Result<u64, BrokerError> {
        self.inner.scheduled_due(q, within).await
    }
    async fn leases_by_consumer(
        &self,
        q: &QueueName,
    ) -> Result<std::collections::BTreeMap<String, u64>, BrokerError> {
        self.inner.leases_by_consumer(q).await
    }
    async fn queues(&self) -> Result<Vec<QueueName>, BrokerError> {
        self.inner.queues().await
    }
    async fn pause(&self, q: &QueueName) -> Result<(), BrokerError> {
        self.inner.pause(q).await
    }
    async fn resume(&self, q: &QueueName) -> Result<(), BrokerError> {
        self.inner.resume(q).await
    }
    async fn job(&self, id: JobId) -> Result<Option<JobInfo>, BrokerError> {
        match self.lookups_fail.load(Ordering::SeqCst) {
            1 => return Err(BrokerError::Unavailable("switched off".into())),
            2 => return Err(BrokerError::Internal("switched off".into())),
            _ => {}
        }
        self.inner.job(id).await
    }
    async fn subscribe(&self) -> Result<EventStream, BrokerError> {
        self.inner.subscribe().await
    }
    async fn job_feed(&self) -> Result<JobFeed, BrokerError> {
        self.inner.job_feed().await
    }
    async fn publish(&self, channel: &str, payload: String) -> Result<(), BrokerError> {
        self.published.lock().unwrap().push(channel.to_owned());
        self.inner.publish(channel, payload).await
    }
    async fn channels(&self) -> Result<ChannelFeed, BrokerError> {
        let (control, stream) = self.inner.channels().await?.into_parts();
        let stalled = self.feed_stalled.clone();
        let n = self.feeds_opened.fetch_add(1, Ordering::SeqCst) + 1;
        let ended = self.feeds_ended.clone();
        let stream = stream
            .take_while(move |_| std::future::ready(ended.load(Ordering::SeqCst) < n))
            .filter(move |_| std::future::ready(!stalled.load(Ordering::SeqCst)));
        Ok(ChannelFeed::new(control, Box::pin(stream)))
    }
    fn channel_shard(&self, channel: &str) -> Option<usize> {
        self.inner.channel_shard(channel)
    }
    fn channel_history(&self) -> ferry_broker::ChannelHistory {
        self.inner.channel_history()
    }
    async fn channel_missed(
        &self,
        channel: &str,
        since: &ferry_broker::StreamPos,
        max: usize,
    ) -> Result<ferry_broker::Missed<ferry_broker::HistoryEntry>, BrokerError> {
        self.inner.channel_missed(channel, since, max).await
    }
    async fn events_missed(
        &self,
        scope: ferry_broker::EventScope<'_>,
        since: &ferry_broker::StreamPos,
        scan: usize,
        keep: &ferry_broker::EventFilter<'_>,
    ) -> Result<ferry_broker::Missed<ferry_core::Event>, BrokerError> {
        self.inner.events_missed(scope, since, scan, keep).await
    }
    fn events_epoch(&self, q: &QueueName) -> Option<String> {
        self.inner.events_epoch(q)
    }
    fn membership(&self) -> Option<&dyn ferry_broker::Membership> {
        self.inner.membership()
    }
    async fn maintain(&self, q: &QueueName) -> Result<(), BrokerError> {
        self.inner.maintain(q).await
    }
    async fn ping(&self) -> Result<(), BrokerError> {
        self.inner.ping().await
    }
    fn log_shards(&self) -> usize {
        self.inner.log_shards()
    }
    async fn read_log(
        &self,
        shard: usize,
        group: &str,
        consumer: &str,
        max: usize,
        wait: Duration,
        reclaim_idle: Option<Duration>,
    ) -> Result<Vec<LogEntry>, BrokerError> {
        self.inner
            .read_log(shard, group, consumer, max, wait, reclaim_idle)
            .await
    }
    async fn ack_log(&self, group: &str, entries: &[LogPosition]) -> Result<(), BrokerError> {
        self.inner.ack_log(group, entries).await
    }
    async fn log_backlog(&self, _group: &str) -> Result<u64, BrokerError> {
        Ok(self.backlog.load(Ordering::SeqCst))
    }
}

/// The shedding tests' name for the same wrapper.
pub type Backlogged = Switches;
