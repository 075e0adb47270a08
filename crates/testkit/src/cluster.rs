//! An in-process ferry cluster for tests (feature `cluster`): real Redis shards and optionally a real
//! PostgreSQL (started by this crate), and the real nodes — gateways, workers (each with its recorder when there
//! is a database), a balancer — built from the role libraries on port 0 and run on the test's runtime, each
//! with a token of its own so a test can stop one gracefully or kill it. Typed clients mint tokens, submit
//! jobs, wait for them to finish and speak the WebSocket protocol.
//!
//! Multi-node tests use this; tests that are about the process itself (signals, exit codes, flags) spawn the
//! `ferry` binary instead.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use ferry_testkit::cluster::Cluster;
//! let cluster = Cluster::builder().gateways(2).worker(&["emails"]).start().await?;
//! let client = cluster.client(0, "alice", "jobs:submit jobs:read");
//! let id = client.submit("emails", "ferry.echo", serde_json::json!({"to": "bob"})).await?;
//! let job = client.until_finished(&id, std::time::Duration::from_secs(10)).await?;
//! assert_eq!(job["state"], "completed");
//! cluster.shutdown().await;
//! # Ok(()) }
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ferry_balancer::{Balancer, BalancerConfig};
use ferry_broker::{Broker, EngineConfig, RedisBroker};
use ferry_core::QueueName;
use ferry_gateway::auth::{AuthConfig, MintClaims, mint};
use ferry_gateway::{Gateway, GatewayConfig};
use ferry_store::Store;
use ferry_store::pg::{PgConfig, PgStore};
use ferry_store::recorder::RecorderConfig;
use ferry_worker::{
    DrainReport, HandlerRegistry, WorkerConfig, WorkerDeps, WorkerMonitor, WorkerNode,
    WorkerNodeConfig,
};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::{PostgresServer, RedisServer, eventually};

/// The HS256 secret every gateway of a test cluster verifies tokens with.
pub const SECRET: &[u8] = b"ferry-testkit-cluster-secret-0123456789";

type GatewayTweak = Box<dyn Fn(&mut GatewayConfig) + Send + Sync>;
type WorkerTweak = Box<dyn Fn(&mut WorkerNodeConfig) + Send + Sync>;

/// What [`Cluster::builder`] starts.
pub struct ClusterBuilder {
    shards: usize,
    postgres: bool,
    gateways: usize,
    workers: Vec<Vec<String>>,
    balancer: bool,
    gateway_tweak: Option<GatewayTweak>,
    worker_tweak: Option<WorkerTweak>,
}

impl std::fmt::Debug for ClusterBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterBuilder")
            .field("shards", &self.shards)
            .field("postgres", &self.postgres)
            .field("gateways", &self.gateways)
            .field("workers", &self.workers)
            .field("balancer", &self.balancer)
            .finish_non_exhaustive()
    }
}

impl ClusterBuilder {
    /// Redis shards (default 1).
    pub fn redis_shards(mut self, n: usize) -> Self {
        self.shards = n.max(1);
        self
    }

    /// A PostgreSQL for the record: migrated, given to every gateway, and to every worker with its recorder
    /// and reconciler.
    pub fn postgres(mut self) -> Self {
        self.postgres = true;
        self
    }

    /// Gateways started with the cluster (default 1).
    pub fn gateways(mut self, n: usize) -> Self {
        self.gateways = n;
        self
    }

    /// One more worker, on `queues`.
    pub fn worker(mut self, queues: &[&str]) -> Self {
        self.workers
            .push(queues.iter().map(|q| (*q).to_owned()).collect());
        self
    }

    /// A `ferry balancer` in front of the gateways.
    pub fn balancer(mut self) -> Self {
        self.balancer = true;
        self
    }

    /// Adjust every gateway's configuration (limits, drain timings...) before it is built.
    pub fn configure_gateways(
        mut self,
        f: impl Fn(&mut GatewayConfig) + Send + Sync + 'static,
    ) -> Self {
        self.gateway_tweak = Some(Box::new(f));
        self
    }

    /// Adjust every worker node's configuration before it is built.
    pub fn configure_workers(
        mut self,
        f: impl Fn(&mut WorkerNodeConfig) + Send + Sync + 'static,
    ) -> Self {
        self.worker_tweak = Some(Box::new(f));
        self
    }

    /// Start the servers, then the nodes; returns once every gateway listens and every worker runs.
    pub async fn start(self) -> Result<Cluster> {
        let redis = (0..self.shards)
            .map(|_| RedisServer::start())
            .collect::<Result<Vec<_>>>()?;
        let urls: Vec<String> = redis.iter().map(RedisServer::url).collect();
        let broker: Arc<dyn Broker> =
            Arc::new(RedisBroker::connect(&urls, EngineConfig::default()).await?);
        let (postgres, store) = if self.postgres {
            let pg = PostgresServer::start()?;
            let store = PgStore::connect(PgConfig::new(pg.url()))?;
            store.migrate().await?;
            (Some(pg), Some(Arc::new(store) as Arc<dyn Store>))
        } else {
            (None, None)
        };
        let mut cluster = Cluster {
            redis,
            postgres,
            broker,
            store,
            gateways: Vec::new(),
            workers: Vec::new(),
            balancer: None,
            gateway_tweak: self.gateway_tweak,
            worker_tweak: self.worker_tweak,
        };
        for _ in 0..self.gateways {
            cluster.add_gateway().await?;
        }
        for queues in self.workers {
            let queues: Vec<&str> = queues.iter().map(String::as_str).collect();
            cluster.add_worker(&queues).await?;
        }
        if self.balancer {
            let mut config = BalancerConfig::new("127.0.0.1:0".parse()?, cluster.redis_urls());
            config.admin_listen = Some("127.0.0.1:0".parse()?);
            let balancer =
                Balancer::build(config, Arc::new(ferry_telemetry::metrics::registry())).await?;
            let (addr, admin) = (balancer.local_addr(), balancer.admin_addr());
            let stop = CancellationToken::new();
            let task = tokio::spawn(balancer.run(stop.clone()));
            cluster.balancer = Some(Running {
                stop,
                task,
                info: (addr, admin),
            });
        }
        Ok(cluster)
    }
}

/// A node running on the test's runtime: its token, its task, and what the test reads of it.
struct Running<I, R> {
    stop: CancellationToken,
    task: JoinHandle<R>,
    info: I,
}

/// A running in-process cluster. Dropping it aborts every node and stops every server; [`Cluster::shutdown`]
/// drains the nodes first.
pub struct Cluster {
    /// The Redis shards, in placement order; restart or kill them to inject faults.
    pub redis: Vec<RedisServer>,
    pub postgres: Option<PostgresServer>,
    broker: Arc<dyn Broker>,
    store: Option<Arc<dyn Store>>,
    gateways: Vec<Option<Running<SocketAddr, std::io::Result<()>>>>,
    workers: Vec<Option<Running<WorkerMonitor, Result<DrainReport, ferry_worker::WorkerError>>>>,
    balancer: Option<Running<(SocketAddr, Option<SocketAddr>), ()>>,
    gateway_tweak: Option<GatewayTweak>,
    worker_tweak: Option<WorkerTweak>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("redis", &self.redis_urls())
            .field("gateways", &self.gateways.len())
            .field("workers", &self.workers.len())
            .finish_non_exhaustive()
    }
}

impl Cluster {
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder {
            shards: 1,
            postgres: false,
            gateways: 1,
            workers: Vec::new(),
            balancer: false,
            gateway_tweak: None,
            worker_tweak: None,
        }
    }

    pub fn redis_urls(&self) -> Vec<String> {
        self.redis.iter().map(RedisServer::url).collect()
    }

    /// The test's own connection to the shards (for setting up and checking state directly); every node has
    /// its own.
    pub fn broker(&self) -> Arc<dyn Broker> {
        self.broker.clone()
    }

    /// A new connection to the shards, for one node.
    async fn connect(&self) -> Result<Arc<dyn Broker>> {
        let urls = self.redis_urls();
        Ok(Arc::new(
            RedisBroker::connect(&urls, EngineConfig::default()).await?,
        ))
    }

    /// The record, when the cluster has a PostgreSQL.
    pub fn store(&self) -> Option<Arc<dyn Store>> {
        self.store.clone()
    }

    /// Start one more gateway on 127.0.0.1:0; returns its index.
    pub async fn add_gateway(&mut self) -> Result<usize> {
        self.add_gateway_with(|_| {}).await
    }

    /// [`Cluster::add_gateway`] with `tweak` applied to this node's configuration last (after
    /// [`ClusterBuilder::configure_gateways`]): its node id, region, or anything only this node has.
    pub async fn add_gateway_with(
        &mut self,
        tweak: impl FnOnce(&mut GatewayConfig),
    ) -> Result<usize> {
        let auth = AuthConfig {
            hs_secret: Some(SECRET.to_vec()),
            ..AuthConfig::default()
        };
        let mut config = GatewayConfig::new("127.0.0.1:0".parse()?, auth);
        config.store = self.store.clone();
        // Test drains are short: nobody is behind a load balancer that needs time to notice.
        config.shutdown.drain_delay = Duration::ZERO;
        config.shutdown.ws_close_spread = Duration::from_millis(100);
        if let Some(all) = &self.gateway_tweak {
            all(&mut config);
        }
        tweak(&mut config);
        // Each node its own connections, as separate processes have (two hubs sharing one broker's pub/sub
        // would each see the other's subscriptions).
        let gateway = Gateway::build(config, self.connect().await?).await?;
        let addr = gateway.local_addr();
        let stop = CancellationToken::new();
        let task = tokio::spawn(gateway.run(stop.clone()));
        self.gateways.push(Some(Running {
            stop,
            task,
            info: addr,
        }));
        Ok(self.gateways.len() - 1)
    }

    /// Start one more worker node on `queues`; returns its index.
    pub async fn add_worker(&mut self, queues: &[&str]) -> Result<usize> {
        let queues = queues
            .iter()
            .map(|q| QueueName::parse(*q).map_err(|e| anyhow::anyhow!("queue {q:?}: {e}")))
            .collect::<Result<Vec<_>>>()?;
        let mut config = WorkerNodeConfig::new(WorkerConfig {
            queues,
            consumer: Some(format!("testkit-worker-{}", self.workers.len())),
            ..WorkerConfig::default()
        });
        if self.store.is_some() {
            config.recorder = Some(RecorderConfig::new(String::new()));
        }
        if let Some(tweak) = &self.worker_tweak {
            tweak(&mut config);
        }
        let deps = WorkerDeps {
            broker: self.connect().await?,
            store: self.store.clone(),
            registry: ferry_telemetry::metrics::registry(),
        };
        let node = WorkerNode::build(config, HandlerRegistry::with_builtins(), deps)?;
        let monitor = node.monitor();
        let stop = CancellationToken::new();
        let task = tokio::spawn(node.run(stop.clone()));
        self.workers.push(Some(Running {
            stop,
            task,
            info: monitor,
        }));
        Ok(self.workers.len() - 1)
    }

    /// Gateway `i`'s address. Panics if it was stopped or killed.
    pub fn gateway_addr(&self, i: usize) -> SocketAddr {
        self.gateways[i].as_ref().expect("gateway is running").info
    }

    /// `http://` base URL of gateway `i`.
    pub fn gateway_url(&self, i: usize) -> String {
        format!("http://{}", self.gateway_addr(i))
    }

    /// The balancer's listener and admin listener. Panics without [`ClusterBuilder::balancer`].
    pub fn balancer_addr(&self) -> (SocketAddr, Option<SocketAddr>) {
        self.balancer.as_ref().expect("a balancer").info
    }

    /// Worker `i`'s monitor (its consumer name, running jobs, drain state).
    pub fn worker(&self, i: usize) -> &WorkerMonitor {
        &self.workers[i].as_ref().expect("worker is running").info
    }

    /// Drain gateway `i` and wait for it to end.
    pub async fn stop_gateway(&mut self, i: usize) -> Result<()> {
        let g = self.gateways[i].take().context("gateway already gone")?;
        g.stop.cancel();
        g.task.await??;
        Ok(())
    }

    /// Kill gateway `i`: its task is aborted at once, its connections drop, it never leaves the membership
    /// (as a killed process would not).
    pub async fn kill_gateway(&mut self, i: usize) {
        if let Some(g) = self.gateways[i].take() {
            g.task.abort();
            let _ = g.task.await;
        }
    }

    /// Drain worker `i` and return its report.
    pub async fn stop_worker(&mut self, i: usize) -> Result<DrainReport> {
        let w = self.workers[i].take().context("worker already gone")?;
        w.stop.cancel();
        Ok(w.task.await??)
    }

    /// Kill worker `i`: its jobs stay leased until their leases expire, as with a crashed process.
    pub async fn kill_worker(&mut self, i: usize) {
        if let Some(w) = self.workers[i].take() {
            w.task.abort();
            let _ = w.task.await;
        }
    }

    /// A token for `sub` with `scopes` (space-separated), valid for an hour.
    pub fn token(&self, sub: &str, scopes: &str) -> String {
        mint(
            SECRET,
            &MintClaims::new(sub, scopes, Duration::from_secs(3600)),
        )
        .expect("mint")
    }

    /// An HTTP and WebSocket client of gateway `i`, authenticated as `sub` with `scopes`.
    pub fn client(&self, i: usize, sub: &str, scopes: &str) -> Client {
        Client {
            base: self.gateway_url(i),
            token: self.token(sub, scopes),
            http: reqwest::Client::new(),
        }
    }

    /// Drain every node (gateways first, then workers, then the balancer) and stop the servers.
    pub async fn shutdown(mut self) {
        for i in 0..self.gateways.len() {
            let _ = self.stop_gateway(i).await;
        }
        for i in 0..self.workers.len() {
            let _ = self.stop_worker(i).await;
        }
        if let Some(b) = self.balancer.take() {
            b.stop.cancel();
            let _ = b.task.await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for g in self.gateways.iter().flatten() {
            g.task.abort();
        }
        for w in self.workers.iter().flatten() {
            w.task.abort();
        }
        if let Some(b) = &self.balancer {
            b.task.abort();
        }
    }
}

/// A client of one gateway with one token.
#[derive(Debug, Clone)]
pub struct Client {
    pub base: String,
    pub token: String,
    pub http: reqwest::Client,
}

impl Client {
    /// Submit one job; its id.
    pub async fn submit(&self, queue: &str, kind: &str, payload: Value) -> Result<String> {
        let res = self
            .http
            .post(format!("{}/v1/queues/{queue}/jobs", self.base))
            .bearer_auth(&self.token)
            .json(&json!({"kind": kind, "payload": payload}))
            .send()
            .await?;
        let status = res.status();
        let body: Value = res.json().await?;
        if !status.is_success() {
            bail!("submit answered {status}: {body}");
        }
        body["id"]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("no id in {body}"))
    }

    /// `GET /v1/jobs/{id}`: the status and the body.
    pub async fn job(&self, id: &str) -> Result<(u16, Value)> {
        let res = self
            .http
            .get(format!("{}/v1/jobs/{id}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await?;
        Ok((res.status().as_u16(), res.json().await?))
    }

    /// Poll the job until it is completed, dead or cancelled, for at most `within`.
    pub async fn until_finished(&self, id: &str, within: Duration) -> Result<Value> {
        let job = eventually(within, &format!("job {id} finished"), || async {
            let (status, job) = self.job(id).await?;
            let done = status == 200
                && matches!(
                    job["state"].as_str(),
                    Some("completed" | "dead" | "cancelled")
                );
            Ok(done.then_some(job))
        })
        .await?;
        Ok(job)
    }

    /// `GET /metrics` (no token): the Prometheus text; read one series with [`sample`].
    pub async fn metrics(&self) -> Result<String> {
        let res = self
            .http
            .get(format!("{}/metrics", self.base))
            .send()
            .await?;
        let status = res.status();
        let text = res.text().await?;
        if !status.is_success() {
            bail!("/metrics answered {status}: {text}");
        }
        Ok(text)
    }

    /// Open a WebSocket session (token in the query, as browsers do).
    pub async fn ws(&self) -> Result<Session> {
        let url = format!(
            "{}/v1/ws?token={}",
            self.base.replacen("http", "ws", 1),
            self.token
        );
        let (ws, _) = tokio_tungstenite::connect_async(url).await?;
        Ok(Session { ws, next_id: 0 })
    }
}

/// A WebSocket session with a gateway.
pub struct Session {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next_id: u64,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").finish_non_exhaustive()
    }
}

impl Session {
    /// Send `frame` (`{"op": ...}`) with a fresh `id` and wait (5 s) for the reply carrying it; pushed frames in between are
    /// dropped.
    pub async fn call(&mut self, mut frame: Value) -> Result<Value> {
        self.next_id += 1;
        let id = format!("c{}", self.next_id);
        frame["id"] = json!(id);
        self.ws.send(Message::text(frame.to_string())).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let reply = self.next_frame(deadline).await?;
            if reply["id"] == json!(id) {
                return Ok(reply);
            }
        }
    }

    /// Subscribe to `channel`; the reply.
    pub async fn subscribe(&mut self, channel: &str) -> Result<Value> {
        self.call(json!({"op": "subscribe", "channel": channel}))
            .await
    }

    /// The next frame the gateway pushes, within `within`.
    pub async fn next(&mut self, within: Duration) -> Result<Value> {
        self.next_frame(tokio::time::Instant::now() + within).await
    }

    /// Pushed frames (replies to calls skipped) up to and including the first for which `last` holds; an
    /// error, with the frames seen, when none does within `within`.
    pub async fn pushed_until(
        &mut self,
        within: Duration,
        last: impl Fn(&Value) -> bool,
    ) -> Result<Vec<Value>> {
        let deadline = tokio::time::Instant::now() + within;
        let mut out = Vec::new();
        loop {
            let frame = self
                .next_frame(deadline)
                .await
                .with_context(|| format!("pushed so far: {out:?}"))?;
            if frame.get("id").is_some() {
                continue;
            }
            let done = last(&frame);
            out.push(frame);
            if done {
                return Ok(out);
            }
        }
    }

    async fn next_frame(&mut self, deadline: tokio::time::Instant) -> Result<Value> {
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .context("no frame in time")?
                .context("the connection closed")??;
            match msg {
                Message::Text(t) => return Ok(serde_json::from_str(t.as_str())?),
                Message::Close(f) => bail!("closed: {f:?}"),
                _ => {}
            }
        }
    }
}

/// The value of one series in a Prometheus text exposition (`series` is the name with its labels as written,
/// e.g. `ferry_gateway_partitions` or `ferry_balancer_gateways{state="ready"}`), or `None` when it is absent.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}
