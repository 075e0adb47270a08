//! Graceful shutdown and readiness, in-process: a real gateway on 127.0.0.1:0, real HTTP and WebSocket clients,
//! and a broker wrapper that can stall what a test needs stalled (the channel feed, submissions).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_broker::prelude::*;
use ferry_broker::{EngineConfig, MemoryBroker, RedisBroker};
use ferry_gateway::auth::{AuthConfig, MintClaims, mint};
use ferry_gateway::{Gateway, GatewayConfig};
use ferry_testkit::RedisServer;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::support::{canary_publishes, switched};
use ferry_testkit::faulty::{Fault, Method};

const SECRET: &[u8] = b"test-secret-test-secret-test-secret!";

fn token() -> String {
    mint(
        SECRET,
        &MintClaims::new(
            "alice",
            "jobs:submit jobs:read subscribe",
            Duration::from_secs(3600),
        ),
    )
    .unwrap()
}

struct Node {
    addr: std::net::SocketAddr,
    http: reqwest::Client,
    stop: CancellationToken,
    run: JoinHandle<std::io::Result<()>>,
    canary_channels: Vec<String>,
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Node {
    async fn start(broker: Arc<dyn Broker>, tweak: impl FnOnce(&mut GatewayConfig)) -> Self {
        let auth = AuthConfig {
            hs_secret: Some(SECRET.to_vec()),
            ..AuthConfig::default()
        };
        let mut config = GatewayConfig::new("127.0.0.1:0".parse().unwrap(), auth);
        tweak(&mut config);
        let gw = Gateway::build(config, broker).await.expect("builds");
        let addr = gw.local_addr();
        let canary_channels = gw.state().hub.canary_channels();
        let stop = CancellationToken::new();
        let run = tokio::spawn(gw.run(stop.clone()));
        Self {
            addr,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap(),
            stop,
            run,
            canary_channels,
        }
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let res = self
            .http
            .get(format!("http://{}{path}", self.addr))
            .send()
            .await
            .expect("answered");
        let status = res.status().as_u16();
        let text = res.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn submit(&self) -> u16 {
        self.http
            .post(format!("http://{}/v1/queues/q/jobs", self.addr))
            .bearer_auth(token())
            .json(&json!({"kind": "k"}))
            .send()
            .await
            .expect("answered")
            .status()
            .as_u16()
    }

    /// Ready (the canary needs the hub's feed to be open first).
    async fn until_ready(&self) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (status, body) = self.get("/readyz").await;
            if status == 200 {
                return body;
            }
            assert!(Instant::now() < deadline, "never ready: {body}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn shutdown(drain_ms: u64, spread_ms: u64, deadline_ms: u64) -> impl FnOnce(&mut GatewayConfig) {
    move |c| {
        c.shutdown.drain_delay = Duration::from_millis(drain_ms);
        c.shutdown.ws_close_spread = Duration::from_millis(spread_ms);
        c.shutdown.hard_deadline = Duration::from_millis(deadline_ms);
    }
}

fn memory() -> Arc<dyn Broker> {
    Arc::new(MemoryBroker::new(EngineConfig::default()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_flips_readiness_serves_through_the_delay_then_goaway_and_1001() {
    let mut node = Node::start(memory(), shutdown(600, 800, 10_000)).await;
    let ready = node.until_ready().await;
    assert_eq!(ready["checks"]["pubsub"]["ok"], true, "{ready}");
    assert!(ready["checks"]["pubsub"]["error"].is_null(), "{ready}");
    let url = format!("ws://{}/v1/ws?token={}", node.addr, token());
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("upgrade");

    let t0 = Instant::now();
    node.stop.cancel();
    // Readiness flips at once; the process is still alive; requests are still served during the delay.
    let (status, body) = node.get("/readyz").await;
    assert_eq!(
        (status, body["status"].as_str()),
        (503, Some("draining")),
        "{body}"
    );
    assert_eq!(node.get("/healthz").await.0, 200);
    assert_eq!(node.submit().await, 202);
    assert!(
        t0.elapsed() < Duration::from_millis(600),
        "checked within the delay"
    );

    // goaway, then 1001, within the delay + the spread (+ slack).
    let mut goaway = None;
    let code = loop {
        let m = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("a frame in time")
            .expect("open")
            .expect("frame");
        match m {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                if v["type"] == "goaway" {
                    assert!(
                        t0.elapsed() >= Duration::from_millis(550),
                        "not before the delay"
                    );
                    goaway = Some(v);
                }
            }
            Message::Close(Some(f)) => break u16::from(f.code),
            _ => {}
        }
    };
    let goaway = goaway.expect("a goaway frame before the close");
    assert_eq!(code, 1001);
    assert_eq!(goaway["reason"], "shutdown", "{goaway}");
    let after = goaway["reconnect_after_ms"].as_u64().expect("a delay");
    assert!(after < 800, "{goaway}");
    assert!(
        t0.elapsed() < Duration::from_millis(600 + 800 + 700),
        "{:?}",
        t0.elapsed()
    );

    // Clean drain: run returns Ok, and the listener is gone.
    let r = tokio::time::timeout(Duration::from_secs(5), &mut node.run)
        .await
        .expect("run returns")
        .unwrap();
    assert!(r.is_ok(), "{r:?}");
    assert!(tokio::net::TcpStream::connect(node.addr).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_requests_finish_after_the_listener_closes() {
    let broker = switched(memory());
    let mut node = Node::start(broker.clone(), shutdown(100, 100, 10_000)).await;
    node.until_ready().await;
    broker.set(Method::Enqueue, Fault::Stall);
    let slow = {
        let (http, addr) = (node.http.clone(), node.addr);
        tokio::spawn(async move {
            http.post(format!("http://{addr}/v1/queues/q/jobs"))
                .bearer_auth(token())
                .json(&json!({"kind": "k"}))
                .send()
                .await
                .map(|r| r.status().as_u16())
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    node.stop.cancel();
    // Past the delay: the listener is closed, the stalled request is still being handled.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(tokio::net::TcpStream::connect(node.addr).await.is_err());
    assert!(!node.run.is_finished(), "waits for the request in flight");
    broker.clear(Method::Enqueue);
    assert_eq!(slow.await.unwrap().expect("answered"), 202);
    let r = tokio::time::timeout(Duration::from_secs(5), &mut node.run)
        .await
        .expect("run returns")
        .unwrap();
    assert!(r.is_ok(), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hard_deadline_reports_what_was_still_open() {
    let broker = switched(memory());
    let mut node = Node::start(broker.clone(), |c| {
        shutdown(100, 100, 800)(c);
        // The request must outlive the deadline, not be cut by the broker timeout.
        c.resilience.broker_timeout = Duration::from_secs(30);
    })
    .await;
    node.until_ready().await;
    broker.set(Method::Enqueue, Fault::Stall);
    let _slow = {
        let (http, addr) = (node.http.clone(), node.addr);
        tokio::spawn(async move {
            http.post(format!("http://{addr}/v1/queues/q/jobs"))
                .bearer_auth(token())
                .json(&json!({"kind": "k"}))
                .send()
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t0 = Instant::now();
    node.stop.cancel();
    let r = tokio::time::timeout(Duration::from_secs(5), &mut node.run)
        .await
        .expect("run returns at the deadline")
        .unwrap();
    let e = r.expect_err("the drain did not finish");
    assert!(
        t0.elapsed() >= Duration::from_millis(750),
        "{:?}",
        t0.elapsed()
    );
    assert!(
        t0.elapsed() < Duration::from_millis(2_000),
        "{:?}",
        t0.elapsed()
    );
    let msg = e.to_string();
    assert!(msg.contains("1 HTTP request"), "{msg}");
    assert!(msg.contains("0 WebSocket"), "{msg}");
    broker.clear(Method::Enqueue);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_channel_feed_makes_the_node_unready_and_probes_are_shared() {
    let broker = switched(memory());
    let node = Node::start(broker.clone(), |c| {
        c.readiness.pubsub_budget = Duration::from_millis(400);
    })
    .await;
    node.until_ready().await;

    broker.stall_feeds(true);
    let (status, body) = node.get("/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "unready");
    assert_eq!(
        body["checks"]["redis"]["ok"], true,
        "PING still works: {body}"
    );
    assert_eq!(body["checks"]["pubsub"]["ok"], false, "{body}");
    let error = body["checks"]["pubsub"]["error"].as_str().unwrap();
    assert!(error.contains("no echo within 400 ms"), "{error}");
    assert!(
        body["checks"]["pubsub"]["ms"].as_u64().unwrap() >= 390,
        "{body}"
    );

    // Concurrent calls share one probe: one canary publish for all of them.
    let before = canary_publishes(&broker);
    let node = Arc::new(node);
    let calls: Vec<_> = (0..5)
        .map(|_| {
            let node = node.clone();
            tokio::spawn(async move { node.get("/readyz").await.0 })
        })
        .collect();
    for c in calls {
        assert_eq!(c.await.unwrap(), 503);
    }
    let probes = canary_publishes(&broker) - before;
    assert!((1..=2).contains(&probes), "{probes} probes for 5 calls");

    broker.stall_feeds(false);
    let ready = node.until_ready().await;
    assert_eq!(ready["checks"]["pubsub"]["ok"], true, "{ready}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_canary_covers_every_redis_shard() {
    let (a, b, c) = (
        RedisServer::start().unwrap(),
        RedisServer::start().unwrap(),
        RedisServer::start().unwrap(),
    );
    let redis = RedisBroker::connect(&[a.url(), b.url(), c.url()], EngineConfig::default())
        .await
        .unwrap();
    let broker = switched(Arc::new(redis));
    let node = Node::start(broker.clone(), |_| {}).await;
    let shards: BTreeSet<usize> = node
        .canary_channels
        .iter()
        .map(|ch| broker.channel_shard(ch).unwrap())
        .collect();
    assert_eq!(
        shards,
        BTreeSet::from([0, 1, 2]),
        "{:?}",
        node.canary_channels
    );
    let ready = node.until_ready().await;
    assert_eq!(ready["checks"]["pubsub"]["ok"], true, "{ready}");
    let published: BTreeSet<String> = broker
        .published()
        .iter()
        .filter(|c| c.starts_with("ferry.canary."))
        .cloned()
        .collect();
    let expected: BTreeSet<String> = node.canary_channels.iter().cloned().collect();
    assert_eq!(published, expected);

    // One shard's pub/sub silently stuck is enough to be unready, and the error names the shard.
    broker.stall_feeds(true);
    let (status, body) = node.get("/readyz").await;
    assert_eq!(status, 503, "{body}");
    let error = body["checks"]["pubsub"]["error"].as_str().unwrap();
    for s in 0..3 {
        assert!(error.contains(&format!("shard {s}: no echo")), "{error}");
    }
}
