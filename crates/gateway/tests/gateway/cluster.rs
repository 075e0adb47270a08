//! The gateway tier on one real Redis (the multi-node tests on `ferry_testkit::cluster::Cluster`): gateways announce themselves in the membership, `GET /v1/cluster` shows
//! it, a node joining makes the node above the load bound move its excess to it (paced, never before the
//! cooldown, clients away from their owner first), and a node that shuts down is announced draining at once and leaves at the end.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_broker::placement::{Placement, partition_of};
use ferry_broker::{Broker, EngineConfig, NodeInfo, RedisBroker};
use ferry_gateway::{Gateway, GatewayConfig};
use ferry_testkit::cluster::Cluster;
use ferry_testkit::{RedisServer, eventually};
use futures::StreamExt;
use serde_json::Value;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::support::{self, ADMIN, Reply, USER, is_problem};

async fn broker(redis: &RedisServer) -> Arc<dyn Broker> {
    Arc::new(
        RedisBroker::connect(&[redis.url()], EngineConfig::default())
            .await
            .expect("connects"),
    )
}

/// Fast heartbeats and a short cooldown, so a test sees several rounds in a few seconds.
fn clustered(id: &'static str, epsilon: f64) -> impl FnOnce(&mut GatewayConfig) {
    move |c| {
        c.cluster.node_id = id.into();
        c.cluster.region = Some("test-1".into());
        c.cluster.heartbeat = Duration::from_millis(100);
        c.cluster.membership_ttl = Duration::from_millis(3_000);
        c.cluster.balance_epsilon = epsilon;
        c.cluster.rebalance_rate = 10;
        c.cluster.rebalance_cooldown = Duration::from_millis(1_500);
        c.shutdown.ws_close_spread = Duration::from_millis(300);
    }
}

/// `GET /v1/cluster` of gateway `i`, as `sub` with `scopes` (no token when `scopes` is `None`).
async fn get_cluster(cluster: &Cluster, i: usize, who: Option<(&str, &str)>) -> Reply {
    let mut req = reqwest::Client::new().get(format!("{}/v1/cluster", cluster.gateway_url(i)));
    if let Some((sub, scopes)) = who {
        req = req.bearer_auth(cluster.token(sub, scopes));
    }
    Reply::read(req.send().await.expect("request answered")).await
}

/// `GET /v1/cluster` of gateway `i` as an admin.
async fn view(cluster: &Cluster, i: usize) -> Value {
    let r = get_cluster(cluster, i, Some(("ops", ADMIN))).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    r.body
}

/// Gateway `i`'s `/metrics`.
async fn metrics(cluster: &Cluster, i: usize) -> String {
    cluster
        .client(i, "ops", ADMIN)
        .metrics()
        .await
        .expect("metrics")
}

/// Ids of the nodes `/v1/cluster` lists, with their `self` flag.
fn ids(v: &Value) -> BTreeMap<String, bool> {
    v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["id"].as_str().unwrap().to_owned(), n["self"] == true))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_lists_every_live_gateway_for_admins_only() {
    let mut c = Cluster::builder().gateways(0).start().await.unwrap();
    let a = c.add_gateway_with(clustered("gw-a", 0.1)).await.unwrap();
    let b = c.add_gateway_with(clustered("gw-b", 0.1)).await.unwrap();
    let v = eventually(
        Duration::from_secs(15),
        "both nodes ready in the membership",
        || async {
            let v = view(&c, a).await;
            let n = v["nodes"].as_array().unwrap();
            Ok((n.len() == 2 && n.iter().all(|n| n["ready"] == true)).then_some(v))
        },
    )
    .await
    .unwrap();
    assert_eq!(
        ids(&v),
        BTreeMap::from([("gw-a".into(), true), ("gw-b".into(), false)])
    );
    assert_eq!(v["self"], "gw-a");
    assert_eq!(v["epsilon"], 0.1);
    assert_eq!(v["partitions"], 1024);
    assert_eq!(v["eligible"], 2);
    // No connections: the bound for the next client is ⌈1.1 × 1 / 2⌉ = 1.
    assert_eq!(v["bound"], 1, "{v}");
    let mut owned = BTreeSet::new();
    for n in v["nodes"].as_array().unwrap() {
        let list: Vec<u64> = serde_json::from_value(n["owned"].clone()).unwrap();
        assert_eq!(n["owned_partitions"], list.len(), "{n}");
        // Rendezvous spreads 1024 partitions evenly: each of two nodes owns far more than a quarter.
        assert!(list.len() > 256, "{n}");
        owned.extend(list);
        assert_eq!(n["region"], "test-1");
        assert_eq!(n["draining"], false);
        assert!(n["heartbeat_age_ms"].as_u64().unwrap() < 3_000, "{n}");
        assert!(n["started_at_ms"].as_u64().unwrap() > 0, "{n}");
        let url = n["url"].as_str().unwrap();
        let addr = c.gateway_addr(if n["id"] == "gw-a" { a } else { b });
        assert_eq!(url, format!("http://{addr}"));
    }
    assert_eq!(owned.len(), 1024, "every partition has one owner");
    // The other node sees the same membership, itself as self.
    assert_eq!(
        ids(&view(&c, b).await),
        BTreeMap::from([("gw-a".into(), false), ("gw-b".into(), true)])
    );
    // A connection shows in the count at the next heartbeat.
    let _ws = c.client(a, "alice", USER).ws().await.unwrap();
    eventually(
        Duration::from_secs(10),
        "the connection counted",
        || async {
            let v = view(&c, b).await;
            let n = v["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|n| n["id"] == "gw-a")
                .cloned();
            Ok(n.filter(|n| n["connections"] == 1).map(|_| ()))
        },
    )
    .await
    .unwrap();
    let metrics = metrics(&c, a).await;
    assert!(
        metrics.contains("ferry_cluster_nodes{state=\"ready\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ferry_cluster_heartbeat_errors_total 0"),
        "{metrics}"
    );
    assert!(metrics.contains("ferry_ws_rebalanced_total 0"), "{metrics}");

    // Admin only, as problem+json.
    let r = get_cluster(&c, a, Some(("alice", USER))).await;
    is_problem(&r, 403, "forbidden");
    let r = get_cluster(&c, a, None).await;
    is_problem(&r, 401, "unauthorized");
    c.shutdown().await;
}

/// What one test client saw.
#[derive(Debug, Default, Clone)]
struct Seen {
    connected: Option<Instant>,
    goaway: Option<(Instant, Value)>,
    closed: Option<(Instant, u16)>,
}

/// Where a moved client reconnects: set once that node exists.
type Then = Arc<Mutex<Option<std::net::SocketAddr>>>;

/// A client with token `tok` on `addr` that records its goaway and its close and, once closed, reconnects to
/// `then` (as a balancer would send it) and stays there.
async fn client(addr: std::net::SocketAddr, then: Then, tok: String, seen: Arc<Mutex<Seen>>) {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/v1/ws?token={tok}"))
        .await
        .expect("upgrade");
    seen.lock().unwrap().connected = Some(Instant::now());
    tokio::spawn(async move {
        while let Some(Ok(m)) = ws.next().await {
            match m {
                Message::Text(t) => {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap();
                    if v["type"] == "goaway" {
                        seen.lock().unwrap().goaway = Some((Instant::now(), v));
                    }
                }
                Message::Close(f) => {
                    let code = f.map_or(0, |f| u16::from(f.code));
                    seen.lock().unwrap().closed = Some((Instant::now(), code));
                    break;
                }
                _ => {}
            }
        }
        let to = then.lock().unwrap().expect("a node to reconnect to");
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{to}/v1/ws?token={tok}"))
            .await
            .expect("upgrade at the new place");
        while let Some(Ok(_)) = ws.next().await {}
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_node_gets_the_excess_over_the_bound_paced_after_the_cooldown() {
    let mut c = Cluster::builder().gateways(0).start().await.unwrap();
    let a = c.add_gateway_with(clustered("gw-a", 0.1)).await.unwrap();
    let a_addr = c.gateway_addr(a);
    let both = Placement::new(
        vec![NodeInfo::new("gw-a", ""), NodeInfo::new("gw-b", "")],
        0.1,
    );
    let owner = |sub: &str| both.owner(partition_of(None, sub)).unwrap().id.clone();
    let subjects: Vec<String> = (0..).map(|i| format!("s-{i}")).take(200).collect();
    // Clients whose partition gw-b owns: away from their owner while on gw-a, so they are the ones to move.
    let movers: Vec<&String> = subjects
        .iter()
        .filter(|s| owner(s) == "gw-b")
        .take(16)
        .collect();
    let stayers: Vec<&String> = subjects
        .iter()
        .filter(|s| owner(s) == "gw-a")
        .take(8)
        .collect();
    let (old_movers, young_movers) = movers.split_at(12);
    // gw-b's address, once it starts.
    let b_addr = Then::default();

    let mut seen: BTreeMap<String, Arc<Mutex<Seen>>> = BTreeMap::new();
    for s in old_movers.iter().chain(&stayers) {
        let rec = Arc::new(Mutex::new(Seen::default()));
        client(a_addr, b_addr.clone(), c.token(s, USER), rec.clone()).await;
        seen.insert(s.to_string(), rec);
    }
    // Alone, the node moves nobody, however old its connections.
    tokio::time::sleep(Duration::from_millis(1_800)).await;
    assert!(seen.values().all(|s| s.lock().unwrap().goaway.is_none()));

    // While gw-b is not listed, nobody moves; 20 old connections on gw-a already, 4 young ones to come: 24
    // over two nodes, a bound of ⌈1.1 × 12⌉ = 14, so gw-a moves exactly 10.
    let b = c.add_gateway_with(clustered("gw-b", 0.1)).await.unwrap();
    *b_addr.lock().unwrap() = Some(c.gateway_addr(b));
    // Connections made now are younger than the cooldown: they move only once they are old enough.
    for s in young_movers {
        let rec = Arc::new(Mutex::new(Seen::default()));
        client(a_addr, b_addr.clone(), c.token(s, USER), rec.clone()).await;
        seen.insert(s.to_string(), rec);
    }
    let snapshot = || -> BTreeMap<String, Seen> {
        seen.iter()
            .map(|(k, v)| (k.clone(), v.lock().unwrap().clone()))
            .collect()
    };
    eventually(
        Duration::from_secs(30),
        "ten clients told to go away and closed",
        || async {
            let s = snapshot();
            Ok((s
                .values()
                .filter(|c| c.goaway.is_some() && c.closed.is_some())
                .count()
                >= 10)
                .then_some(()))
        },
    )
    .await
    .unwrap();
    // Rounds keep running; with gw-a at the bound, nothing else moves.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let s = snapshot();
    for st in &stayers {
        assert!(
            s[st.as_str()].goaway.is_none() && s[st.as_str()].closed.is_none(),
            "{st} stays on its owner: {:?}",
            s[st.as_str()]
        );
    }
    let moved: Vec<&String> = movers
        .iter()
        .copied()
        .filter(|m| s[m.as_str()].goaway.is_some())
        .collect();
    assert_eq!(moved.len(), 10, "{s:?}");
    let mut times = Vec::new();
    for m in &moved {
        let seen = &s[m.as_str()];
        let (at, frame) = seen.goaway.clone().unwrap();
        assert_eq!(frame["reason"], "rebalance", "{frame}");
        let after = frame["reconnect_after_ms"].as_u64().expect("a delay");
        assert!(after < 300, "within the close spread: {frame}");
        let (closed_at, code) = seen.closed.unwrap();
        assert_eq!(code, 1001, "{m}");
        assert!(closed_at >= at);
        // Never before the cooldown.
        let age = at - seen.connected.unwrap();
        assert!(
            age >= Duration::from_millis(1_500),
            "{m} moved at age {age:?}"
        );
        times.push(at);
    }
    // Paced: 10/s for the cluster, 2 eligible nodes, so at most 5/s from gw-a, plus a bucket of at most one
    // move and slack for delivery.
    times.sort();
    for i in 0..times.len() {
        for j in i..times.len() {
            let secs = (times[j] - times[i]).as_secs_f64();
            let n = (j - i + 1) as f64;
            assert!(
                n <= 5.0 * secs + 3.0,
                "{n} moves within {secs:.2} s: {times:?}"
            );
        }
    }
    let from_a = metrics(&c, a).await;
    assert!(from_a.contains("ferry_ws_rebalanced_total 10"), "{from_a}");
    let from_b = metrics(&c, b).await;
    assert!(from_b.contains("ferry_ws_rebalanced_total 0"), "{from_b}");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_announces_draining_at_once_and_leaves_at_the_end() {
    let redis = RedisServer::start().unwrap();
    let watcher = broker(&redis).await;
    let mut config = GatewayConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        ferry_gateway::auth::AuthConfig {
            hs_secret: Some(support::SECRET.to_vec()),
            ..Default::default()
        },
    );
    clustered("gw-drain", 0.1)(&mut config);
    // A long heartbeat: the draining announcement must not wait for the next tick.
    config.cluster.heartbeat = Duration::from_secs(2);
    config.cluster.membership_ttl = Duration::from_secs(60);
    config.shutdown.drain_delay = Duration::from_millis(1_500);
    config.shutdown.hard_deadline = Duration::from_secs(10);
    let gw = Gateway::build(config, broker(&redis).await).await.unwrap();
    let stop = CancellationToken::new();
    let run = tokio::spawn(gw.run(stop.clone()));
    let m = watcher.membership().unwrap();
    let members = eventually(Duration::from_secs(10), "the node announced", || async {
        let v = m.members().await.unwrap();
        Ok((!v.is_empty()).then_some(v))
    })
    .await
    .unwrap();
    assert_eq!(members[0].id, "gw-drain");
    assert!(!members[0].draining);
    // Past the first tick, so the next regular one is ~2 s away.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = Instant::now();
    stop.cancel();
    eventually(Duration::from_secs(10), "announced draining", || async {
        let v = m.members().await.unwrap();
        Ok(v.iter().any(|n| n.draining && !n.ready).then_some(()))
    })
    .await
    .unwrap();
    assert!(
        t0.elapsed() < Duration::from_millis(1_500),
        "draining shows within the drain delay, before the next heartbeat: {:?}",
        t0.elapsed()
    );
    // Still listed through the drain, then gone although the ttl (60 s) is far off.
    assert_eq!(m.members().await.unwrap().len(), 1);
    tokio::time::timeout(Duration::from_secs(15), run)
        .await
        .expect("run returns")
        .unwrap()
        .expect("clean drain");
    assert!(m.members().await.unwrap().is_empty(), "left the membership");
}
