//! `GET /v1/ws` end to end: a real gateway on 127.0.0.1:0, a real tokio-tungstenite client, real workers; the
//! cross-node cases run two gateways on one redis-server.

use std::sync::Arc;
use std::time::Duration;

use ferry_broker::{Broker, EngineConfig, MemoryBroker, RedisBroker};
use ferry_core::QueueName;
use ferry_gateway::auth::{AuthConfig, MintClaims, mint};
use ferry_gateway::config::LimitsConfig;
use ferry_gateway::{Gateway, GatewayConfig};
use ferry_testkit::RedisServer;
use ferry_worker::{HandlerRegistry, Worker, WorkerConfig};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

const SECRET: &[u8] = b"a-test-secret-that-is-long-enough-for-hs256!";
const PATIENCE: Duration = Duration::from_secs(15);

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

async fn gateway(broker: Arc<dyn Broker>, limits: LimitsConfig) -> Node {
    let auth = AuthConfig {
        hs_secret: Some(SECRET.to_vec()),
        ..AuthConfig::default()
    };
    let mut config = GatewayConfig::new("127.0.0.1:0".parse().unwrap(), auth);
    config.limits = limits;
    let gw = Gateway::build(config, broker)
        .await
        .expect("gateway builds");
    let addr = gw.local_addr();
    let stop = CancellationToken::new();
    tokio::spawn(gw.run(stop.clone()));
    Node { addr, stop }
}

fn token(sub: &str, scopes: &str, ttl: Duration) -> String {
    mint(
        SECRET,
        &MintClaims {
            sub: sub.into(),
            scopes: scopes.split_whitespace().map(String::from).collect(),
            tenant: None,
            ttl,
            issuer: None,
            audience: None,
        },
    )
    .expect("mints")
}

const ALL: &str = "jobs:submit jobs:read queues:read publish subscribe";

async fn connect(node: &Node, token: &str) -> Ws {
    let url = format!("ws://{}/v1/ws?token={token}", node.addr);
    let (ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("upgrade");
    ws
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).await.expect("send");
}

/// The next JSON text frame (pings and pongs skipped).
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

/// The reply to `id`, skipping pushed events.
async fn reply(ws: &mut Ws, id: &str) -> Value {
    loop {
        let v = next_json(ws).await;
        if v["id"] == id {
            return v;
        }
    }
}

/// The close code the server ends with.
async fn close_code(ws: &mut Ws) -> u16 {
    loop {
        match tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("closed in time")
        {
            Some(Ok(Message::Close(Some(f)))) => return f.code.into(),
            Some(Ok(_)) => {}
            other => panic!("no close frame: {other:?}"),
        }
    }
}

fn memory() -> Arc<dyn Broker> {
    Arc::new(MemoryBroker::new(EngineConfig::default()))
}

fn worker(broker: Arc<dyn Broker>, queue: &str) -> CancellationToken {
    let cfg = WorkerConfig::for_queues([QueueName::parse(queue).unwrap()]);
    let w = Worker::new(broker, HandlerRegistry::with_builtins(), cfg).expect("worker");
    let stop = CancellationToken::new();
    tokio::spawn(w.run(stop.clone()));
    stop
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_get_replies_and_errors() {
    let node = gateway(memory(), LimitsConfig::default()).await;
    let mut ws = connect(&node, &token("alice", "subscribe", Duration::from_secs(60))).await;
    send(&mut ws, json!({"id": "1", "op": "ping"})).await;
    assert_eq!(reply(&mut ws, "1").await["ok"], true);
    send(
        &mut ws,
        json!({"id": "2", "op": "subscribe", "channel": "app:chat"}),
    )
    .await;
    let r = reply(&mut ws, "2").await;
    assert_eq!(
        (r["ok"].clone(), r["channel"].clone()),
        (json!(true), json!("app:chat"))
    );
    ws.send(Message::text("not json")).await.unwrap();
    assert_eq!(next_json(&mut ws).await["error"]["code"], "bad_request");
    send(&mut ws, json!({"id": "3", "op": "dance"})).await;
    let r = reply(&mut ws, "3").await;
    assert_eq!(
        (r["ok"].clone(), r["error"]["code"].clone()),
        (json!(false), json!("bad_request"))
    );
    send(
        &mut ws,
        json!({"id": "4", "op": "subscribe", "channel": "queue:emails"}),
    )
    .await;
    assert_eq!(reply(&mut ws, "4").await["error"]["code"], "forbidden");
    send(
        &mut ws,
        json!({"id": "5", "op": "subscribe", "channel": "user:bob"}),
    )
    .await;
    assert_eq!(reply(&mut ws, "5").await["error"]["code"], "forbidden");
    send(&mut ws, json!({"id": "6", "op": "subscribe"})).await;
    assert_eq!(reply(&mut ws, "6").await["error"]["code"], "bad_request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_token_is_401_before_upgrade() {
    let node = gateway(memory(), LimitsConfig::default()).await;
    let req = format!("ws://{}/v1/ws?token=nope", node.addr)
        .into_client_request()
        .unwrap();
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => assert_eq!(res.status(), 401),
        other => panic!("expected 401, got {:?}", other.map(|_| ())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_then_job_completed_on_user_channel() {
    let broker = memory();
    let node = gateway(broker.clone(), LimitsConfig::default()).await;
    let _w = worker(broker, "ws-mem");
    let mut ws = connect(&node, &token("alice", ALL, Duration::from_secs(60))).await;
    send(
        &mut ws,
        json!({"id": "s", "op": "submit", "queue": "ws-mem",
        "job": {"kind": "ferry.echo", "payload": {"x": 1}}}),
    )
    .await;
    let r = reply(&mut ws, "s").await;
    assert_eq!(r["ok"], true, "{r}");
    let id = r["job"]["id"].clone();
    loop {
        let v = next_json(&mut ws).await;
        if v["event"] == "job.completed" {
            assert_eq!(v["channel"], "user:alice");
            assert_eq!(v["data"]["id"], id);
            assert_eq!(v["data"]["queue"], "ws-mem");
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_token_closes_4001() {
    let node = gateway(memory(), LimitsConfig::default()).await;
    let mut ws = connect(&node, &token("alice", ALL, Duration::from_secs(2))).await;
    assert_eq!(close_code(&mut ws).await, 4001);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_gets_rate_limited_then_4008() {
    let limits = LimitsConfig {
        ws_rate_per_sec: 1,
        ws_burst: 2,
        ws_sustained_violations: 3,
        ..LimitsConfig::default()
    };
    let node = gateway(memory(), limits).await;
    let mut ws = connect(&node, &token("alice", ALL, Duration::from_secs(60))).await;
    for i in 0..10 {
        let _ = ws
            .send(Message::text(json!({"id": i, "op": "ping"}).to_string()))
            .await;
    }
    let mut limited = 0;
    let code = loop {
        match tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("in time")
        {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                if v["error"]["code"] == "rate_limited" {
                    limited += 1;
                }
            }
            Some(Ok(Message::Close(Some(f)))) => break u16::from(f.code),
            Some(Ok(_)) => {}
            other => panic!("{other:?}"),
        }
    };
    assert!(limited >= 1);
    assert_eq!(code, 4008);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_closes_1013() {
    let limits = LimitsConfig {
        max_connections_per_subject: 1,
        ..LimitsConfig::default()
    };
    let node = gateway(memory(), limits).await;
    let t = token("alice", ALL, Duration::from_secs(60));
    let mut first = connect(&node, &t).await;
    let mut second = connect(&node, &t).await;
    assert_eq!(close_code(&mut second).await, 1013);
    send(&mut first, json!({"id": "p", "op": "ping"})).await;
    assert_eq!(reply(&mut first, "p").await["ok"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_node_app_messages_and_job_events() {
    let redis = RedisServer::start().expect("redis-server starts");
    let connect_broker = || async {
        Arc::new(
            RedisBroker::connect(&[redis.url()], EngineConfig::default())
                .await
                .expect("connects"),
        ) as Arc<dyn Broker>
    };
    let a = gateway(connect_broker().await, LimitsConfig::default()).await;
    let b = gateway(connect_broker().await, LimitsConfig::default()).await;
    let _w = worker(connect_broker().await, "ws-redis");
    let t = token("alice", ALL, Duration::from_secs(60));
    let mut on_a = connect(&a, &t).await;
    let mut on_b = connect(&b, &t).await;
    send(
        &mut on_b,
        json!({"id": "sub", "op": "subscribe", "channel": "app:chat"}),
    )
    .await;
    assert_eq!(reply(&mut on_b, "sub").await["ok"], true);
    send(
        &mut on_a,
        json!({"id": "pub", "op": "publish", "channel": "app:chat", "data": {"hi": 1}}),
    )
    .await;
    assert_eq!(reply(&mut on_a, "pub").await["ok"], true);
    let v = next_json(&mut on_b).await;
    assert_eq!(
        v,
        json!({"channel": "app:chat", "event": "message", "data": {"hi": 1}})
    );

    send(
        &mut on_a,
        json!({"id": "s", "op": "submit", "queue": "ws-redis",
        "job": {"kind": "ferry.noop"}}),
    )
    .await;
    let r = reply(&mut on_a, "s").await;
    assert_eq!(r["ok"], true, "{r}");
    loop {
        let v = next_json(&mut on_b).await;
        if v["event"] == "job.completed" {
            assert_eq!(v["data"]["id"], r["job"]["id"]);
            assert_eq!(v["channel"], "user:alice");
            break;
        }
    }
}
