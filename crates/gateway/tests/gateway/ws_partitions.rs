//! Job events only where they are needed, with real gateways on one redis-server: a gateway receives the events
//! of the partitions of its clients' subjects and of the jobs and queues they follow, and nothing else;
//! `job:` and `queue:` subscribers on another node get each event once; a job enqueued by an older ferry (no
//! partition in its `m`) still reaches its owner's `user:` channel.

use std::sync::Arc;
use std::time::Duration;

use ferry_broker::placement::partition_of;
use ferry_broker::{Broker, EngineConfig, RedisBroker};
use ferry_core::{Kind, NewJob, QueueName};
use ferry_gateway::auth::{AuthConfig, MintClaims, mint};
use ferry_gateway::{Gateway, GatewayConfig};
use ferry_testkit::RedisServer;
use ferry_worker::{HandlerRegistry, Worker, WorkerConfig};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

const SECRET: &[u8] = b"a-test-secret-that-is-long-enough-for-hs256!";
const PATIENCE: Duration = Duration::from_secs(15);
const ALL: &str = "jobs:submit jobs:read queues:read publish subscribe";

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

struct Node {
    addr: std::net::SocketAddr,
    stop: CancellationToken,
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn broker(redis: &RedisServer) -> Arc<dyn Broker> {
    Arc::new(
        RedisBroker::connect(&[redis.url()], EngineConfig::default())
            .await
            .expect("connects"),
    )
}

async fn gateway(redis: &RedisServer) -> Node {
    let auth = AuthConfig {
        hs_secret: Some(SECRET.to_vec()),
        ..AuthConfig::default()
    };
    let config = GatewayConfig::new("127.0.0.1:0".parse().unwrap(), auth);
    let gw = Gateway::build(config, broker(redis).await)
        .await
        .expect("gateway builds");
    let addr = gw.local_addr();
    let stop = CancellationToken::new();
    tokio::spawn(gw.run(stop.clone()));
    Node { addr, stop }
}

async fn worker(redis: &RedisServer, queue: &str) -> CancellationToken {
    let cfg = WorkerConfig::for_queues([QueueName::parse(queue).unwrap()]);
    let w =
        Worker::new(broker(redis).await, HandlerRegistry::with_builtins(), cfg).expect("worker");
    let stop = CancellationToken::new();
    tokio::spawn(w.run(stop.clone()));
    stop
}

fn token(sub: &str, scopes: &str) -> String {
    mint(
        SECRET,
        &MintClaims::new(sub, scopes, Duration::from_secs(300)),
    )
    .expect("mints")
}

/// Connected, with its own `user:` channel subscribed (answered after it is).
async fn connect(node: &Node, token: &str) -> Ws {
    let url = format!("ws://{}/v1/ws?token={token}", node.addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("upgrade");
    let r = ask(&mut ws, "hello", json!({"op": "ping"})).await;
    assert_eq!(r["ok"], true, "{r}");
    ws
}

async fn next_json(ws: &mut Ws) -> Value {
    loop {
        let m = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("a frame in time")
            .expect("stream open")
            .expect("frame ok");
        match m {
            Message::Text(t) => return serde_json::from_str(t.as_str()).expect("JSON"),
            Message::Close(c) => panic!("closed: {c:?}"),
            _ => {}
        }
    }
}

/// Send an op and return its reply, skipping pushed frames.
async fn ask(ws: &mut Ws, id: &str, mut frame: Value) -> Value {
    frame["id"] = json!(id);
    ws.send(Message::text(frame.to_string()))
        .await
        .expect("send");
    loop {
        let v = next_json(ws).await;
        if v["id"] == id {
            return v;
        }
    }
}

/// Pushed frames up to and including the first for which `last` holds.
async fn frames_until(ws: &mut Ws, last: impl Fn(&Value) -> bool) -> Vec<Value> {
    let mut out = Vec::new();
    loop {
        let v = next_json(ws).await;
        if v.get("id").is_some() {
            continue;
        }
        let done = last(&v);
        out.push(v);
        if done {
            return out;
        }
    }
}

async fn submit(ws: &mut Ws, queue: &str) -> String {
    let r = ask(
        ws,
        "submit",
        json!({"op": "submit", "queue": queue, "job": {"kind": "ferry.noop"}}),
    )
    .await;
    assert_eq!(r["ok"], true, "{r}");
    r["job"]["id"].as_str().unwrap().to_owned()
}

/// A sample's value in the node's `/metrics` (0 when absent).
async fn metric(node: &Node, name: &str) -> f64 {
    let text = reqwest::get(format!("http://{}/metrics", node.addr))
        .await
        .expect("metrics")
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// Waits (up to PATIENCE) until the node's `ferry_gateway_partitions` is `n`.
async fn partitions_become(node: &Node, n: f64) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let now = metric(node, "ferry_gateway_partitions").await;
        if now == n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "ferry_gateway_partitions stayed {now}, not {n}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn numsub(redis: &RedisServer, channel: &str) -> u64 {
    let out = redis.cli(&["PUBSUB", "NUMSUB", channel]).unwrap();
    out.lines().nth(1).unwrap().trim().parse().unwrap()
}

fn p(sub: &str) -> u16 {
    partition_of(None, sub)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_receives_only_the_partitions_of_its_clients() {
    let redis = RedisServer::start().expect("redis-server starts");
    let (a, b) = (gateway(&redis).await, gateway(&redis).await);
    let _w = worker(&redis, "ws-parts").await;
    assert_ne!(p("alice"), p("bob"));
    let mut alice = connect(&a, &token("alice", ALL)).await;
    let mut bob = connect(&b, &token("bob", ALL)).await;
    partitions_become(&a, 1.0).await;
    partitions_become(&b, 1.0).await;
    assert_eq!(numsub(&redis, &format!("ferry:ev:p:{}", p("alice"))), 1);
    assert_eq!(numsub(&redis, &format!("ferry:ev:p:{}", p("bob"))), 1);

    // Alice's job, then bob's: everything of alice's was published before bob's last event, on the one
    // connection B's feed holds, so once bob has his, B would have seen alice's too had it been sent to it.
    let mine = submit(&mut alice, "ws-parts").await;
    frames_until(&mut alice, |v| {
        v["event"] == "job.completed" && v["data"]["id"] == mine.as_str()
    })
    .await;
    let theirs = submit(&mut bob, "ws-parts").await;
    frames_until(&mut bob, |v| {
        v["event"] == "job.completed" && v["data"]["id"] == theirs.as_str()
    })
    .await;
    // Every job event a hub receives is observed once in its lag histogram: queued, active and completed of
    // its own client's job, none of the other's.
    assert_eq!(metric(&a, "ferry_pubsub_lag_seconds_count").await, 3.0);
    assert_eq!(metric(&b, "ferry_pubsub_lag_seconds_count").await, 3.0);

    // The last connection of a subject gives its partition up.
    drop(alice);
    partitions_become(&a, 0.0).await;
    assert_eq!(numsub(&redis, &format!("ferry:ev:p:{}", p("alice"))), 0);
    assert_eq!(numsub(&redis, &format!("ferry:ev:p:{}", p("bob"))), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_and_queue_subscribers_on_another_node_get_each_event_once() {
    let redis = RedisServer::start().expect("redis-server starts");
    let (a, b) = (gateway(&redis).await, gateway(&redis).await);
    assert_ne!(p("alice"), p("root"));
    let mut alice = connect(&a, &token("alice", ALL)).await;
    let mut root = connect(&b, &token("root", "admin")).await;
    partitions_become(&b, 1.0).await;

    // No worker yet: the job waits while root subscribes on B to it and to its queue.
    let id = submit(&mut alice, "ws-follow").await;
    let job = format!("job:{id}");
    let r = ask(&mut root, "j", json!({"op": "subscribe", "channel": job})).await;
    assert_eq!(r["ok"], true, "{r}");
    let r = ask(
        &mut root,
        "q",
        json!({"op": "subscribe", "channel": "queue:ws-follow"}),
    )
    .await;
    assert_eq!(r["ok"], true, "{r}");
    // root's own partition, and the job owner's.
    partitions_become(&b, 2.0).await;
    assert_eq!(numsub(&redis, "ferry:ev:q:{ws-follow}"), 1);

    let _w = worker(&redis, "ws-follow").await;
    frames_until(&mut alice, |v| {
        v["event"] == "job.completed" && v["data"]["id"] == id.as_str()
    })
    .await;
    // A second job's queued event marks the end: a duplicate of the first job's would come before it.
    let next = submit(&mut alice, "ws-follow").await;
    let got = frames_until(&mut root, |v| {
        v["channel"] == "queue:ws-follow" && v["data"]["id"] == next.as_str()
    })
    .await;
    let seen: Vec<(&str, &str)> = got
        .iter()
        .filter(|v| v["data"]["id"] == id.as_str())
        .map(|v| (v["channel"].as_str().unwrap(), v["event"].as_str().unwrap()))
        .collect();
    let count = |c: &str, e: &str| seen.iter().filter(|s| **s == (c, e)).count();
    for (c, e) in [
        (job.as_str(), "job.active"),
        (job.as_str(), "job.completed"),
        ("queue:ws-follow", "job.active"),
        ("queue:ws-follow", "job.completed"),
    ] {
        assert_eq!(count(c, e), 1, "{c} {e} once: {seen:?}");
    }
    assert_eq!(seen.len(), 4, "{seen:?}");

    // Unsubscribing gives both up.
    let r = ask(
        &mut root,
        "uj",
        json!({"op": "unsubscribe", "channel": job}),
    )
    .await;
    assert_eq!(r["ok"], true, "{r}");
    let r = ask(
        &mut root,
        "uq",
        json!({"op": "unsubscribe", "channel": "queue:ws-follow"}),
    )
    .await;
    assert_eq!(r["ok"], true, "{r}");
    partitions_become(&b, 1.0).await;
    assert_eq!(numsub(&redis, "ferry:ev:q:{ws-follow}"), 0);
}

/// Rewrite the one queued job of `queue` as an older ferry wrote it: the same entry with no `pt` in `m`.
fn make_legacy(redis: &RedisServer, queue: &str) {
    let key = format!("ferry:{{{queue}}}:p1");
    let out = redis.cli(&["XRANGE", &key, "-", "+"]).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 11, "one entry of five fields: {out}");
    let (eid, m) = (lines[0], lines[4]);
    assert_eq!(lines[3], "m");
    let start = m.find(",\"pt\":").expect("m carries pt");
    let end = start + 1 + m[start + 1..].find(',').unwrap();
    let old = format!("{}{}", &m[..start], &m[end..]);
    redis.cli(&["XDEL", &key, eid]).unwrap();
    let id = format!("{}-*", eid.split('-').next().unwrap());
    let mut args = vec!["XADD", key.as_str(), id.as_str()];
    for c in lines[1..].chunks(2) {
        args.push(c[0]);
        args.push(if c[0] == "m" { &old } else { c[1] });
    }
    redis.cli(&args).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_of_an_older_ferry_still_reaches_its_owner() {
    let redis = RedisServer::start().expect("redis-server starts");
    let b = gateway(&redis).await;
    let mut alice = connect(&b, &token("alice", ALL)).await;
    let mut job = NewJob::new(Kind::parse("ferry.noop").unwrap(), json!({}));
    job.owner = Some("alice".into());
    let id = broker(&redis)
        .await
        .enqueue(&QueueName::parse("ws-legacy").unwrap(), job)
        .await
        .unwrap()
        .id
        .to_string();
    make_legacy(&redis, "ws-legacy");
    let _w = worker(&redis, "ws-legacy").await;
    let got = frames_until(&mut alice, |v| {
        v["event"] == "job.completed" && v["data"]["id"] == id.as_str()
    })
    .await;
    // job.active comes from the claim, which copies the entry's old `m`: only the legacy channel carries it
    // (queued came before the rewrite, completed from the worker's lease, which renders `m` anew).
    let events: Vec<&str> = got
        .iter()
        .filter(|v| v["channel"] == "user:alice" && v["data"]["id"] == id.as_str())
        .map(|v| v["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        events,
        ["job.queued", "job.active", "job.completed"],
        "{got:?}"
    );
}
