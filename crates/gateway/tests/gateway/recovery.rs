//! Recovery of missed frames end to end: real redis-servers (testkit), real gateways (support; two of
//! `ferry_testkit::cluster::Cluster` for the test across gateways), a real WebSocket
//! client that disconnects, misses `app:` messages and its own jobs' events, and comes back with `since`.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ferry_broker::{Broker, ChannelHistory, Completion, EngineConfig, RedisBroker};
use ferry_core::{Kind, NewJob, QueueName};
use ferry_testkit::RedisServer;
use ferry_testkit::cluster::Cluster;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::support::{SECRET, TestApp, Ws, token, ws_call};

const SCOPES: &str = "subscribe publish jobs:read";
const PATIENCE: Duration = Duration::from_secs(15);

async fn redis_broker(redis: &RedisServer, history: ChannelHistory) -> Arc<RedisBroker> {
    Arc::new(
        RedisBroker::connect(&[redis.url()], EngineConfig::default())
            .await
            .expect("connects")
            .with_channel_history(history),
    )
}

/// Publishers here send hundreds of frames: no frame rate limit in the way.
fn fast(c: &mut ferry_gateway::GatewayConfig) {
    c.limits.ws_rate_per_sec = 100_000;
    c.limits.ws_burst = 100_000;
}

/// A WebSocket on the gateway at `addr`, with `since` for the automatic `user:` channel as URL parameters.
async fn connect(addr: SocketAddr, tok: &str, since: Option<(&str, &str)>) -> Ws {
    let mut url = format!("ws://{addr}/v1/ws?token={tok}");
    if let Some((offset, epoch)) = since {
        url.push_str(&format!("&since_offset={offset}&since_epoch={epoch}"));
    }
    tokio_tungstenite::connect_async(url)
        .await
        .expect("upgrade")
        .0
}

/// The next text frame as JSON, or `None` after `wait`.
async fn next(ws: &mut Ws, wait: Duration) -> Option<Value> {
    loop {
        let m = tokio::time::timeout(wait, ws.next()).await.ok()??.ok()?;
        if let Message::Text(t) = m {
            return Some(serde_json::from_str(t.as_str()).expect("JSON"));
        }
    }
}

/// Send a frame and wait for its answer, keeping the pushed frames that come before it in `pushed`.
async fn call(ws: &mut Ws, frame: Value, pushed: &mut Vec<Value>) -> Value {
    let id = frame["id"].clone();
    ws.send(Message::text(frame.to_string()))
        .await
        .expect("send");
    loop {
        let v = next(ws, PATIENCE).await.expect("an answer in time");
        if v.get("ok").is_some() && v["id"] == id {
            return v;
        }
        pushed.push(v);
    }
}

/// Pushed frames until `done` says enough (or PATIENCE passes), then whatever else comes within 300 ms (a
/// duplicate would).
async fn frames_until(ws: &mut Ws, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    frames_after(ws, Vec::new(), done).await
}

/// [`frames_until`], counting `out` (frames already read) in.
async fn frames_after(
    ws: &mut Ws,
    mut out: Vec<Value>,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !done(&out) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match next(ws, left).await {
            Some(v) => out.push(v),
            None => panic!("not all frames came: {out:#?}"),
        }
    }
    while let Some(v) = next(ws, Duration::from_millis(300)).await {
        out.push(v);
    }
    out
}

fn app_numbers(frames: &[Value], channel: &str) -> Vec<u64> {
    frames
        .iter()
        .filter(|f| f["channel"] == channel && f["event"] == "message")
        .map(|f| f["data"]["n"].as_u64().expect("n"))
        .collect()
}

/// (job id, event) of the `user:` frames, in order.
fn user_events(frames: &[Value], sub: &str) -> Vec<(String, String)> {
    let channel = format!("user:{sub}");
    frames
        .iter()
        .filter(|f| f["channel"] == channel.as_str() && f.get("event").is_some())
        .map(|f| {
            (
                f["data"]["id"].as_str().unwrap().to_owned(),
                f["event"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// The position of the last frame of `channel`.
fn last_pos(frames: &[Value], channel: &str) -> (String, String) {
    let f = frames
        .iter()
        .rev()
        .find(|f| f["channel"] == channel && f.get("event").is_some())
        .expect("a frame of the channel");
    (
        f["offset"].as_str().expect("offset").to_owned(),
        f["epoch"].as_str().expect("epoch").to_owned(),
    )
}

/// Every pushed frame of a channel carries an offset that rises and one epoch.
fn assert_positions(frames: &[Value], channel: &str) {
    let pos: Vec<((u64, u64), &str)> = frames
        .iter()
        .filter(|f| f["channel"] == channel && f.get("event").is_some())
        .map(|f| {
            let o = f["offset"].as_str().expect("every frame has an offset");
            (
                ferry_broker::parse_offset(o).expect("a stream id"),
                f["epoch"].as_str().expect("every frame has an epoch"),
            )
        })
        .collect();
    assert!(
        pos.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 == w[1].1),
        "{channel}: {pos:?}"
    );
}

/// Run one job of `owner` through queued, active and completed; its id.
async fn run_job(b: &dyn Broker, q: &QueueName, owner: &str) -> String {
    let mut job = NewJob::new(Kind::parse("k").unwrap(), json!({}));
    job.owner = Some(owner.into());
    let id = b.enqueue(q, job).await.unwrap().id;
    let leased = b.claim(q, "w", 1, Duration::from_secs(5)).await.unwrap();
    assert_eq!(leased.len(), 1);
    b.complete(vec![Completion {
        lease: leased[0].lease.clone(),
        result: json!({"ok": owner}),
    }])
    .await
    .unwrap();
    id.to_string()
}

/// Publish `{"n": i}` for each i on `app:<channel>` through a gateway's own WebSocket `publish`.
async fn publish(ws: &mut Ws, channel: &str, ns: impl IntoIterator<Item = u64>) {
    for n in ns {
        let r = ws_call(
            ws,
            json!({"id": n, "op": "publish", "channel": format!("app:{channel}"), "data": {"n": n}}),
        )
        .await;
        assert_eq!(r["ok"], true, "{r}");
    }
}

fn lifecycle(id: &str) -> Vec<(String, String)> {
    ["job.queued", "job.active", "job.completed"]
        .iter()
        .map(|e| (id.to_owned(), (*e).to_owned()))
        .collect()
}

/// The scenario of both recovery tests: `alice` listens on `app:room` and her `user:` channel through `first`,
/// disconnects, misses messages and jobs (and bob's job, which is not hers), and comes back through `second`
/// with `since` while a publisher keeps publishing on `first` — every message and event exactly once, in order.
async fn disconnect_and_recover(b: &dyn Broker, first: SocketAddr, second: SocketAddr) {
    let q = QueueName::parse("rq").unwrap();
    let alice = token("alice", SCOPES, None);
    let mut publisher = connect(first, &token("pub", SCOPES, None), None).await;

    let mut ws = connect(first, &alice, None).await;
    let r = ws_call(
        &mut ws,
        json!({"id": 1, "op": "subscribe", "channel": "app:room"}),
    )
    .await;
    assert_eq!(r["ok"], true, "{r}");
    assert!(r.get("recovered").is_none(), "no since, no recovery: {r}");
    publish(&mut publisher, "room", 0..3).await;
    let j0 = run_job(b, &q, "alice").await;
    let seen = frames_until(&mut ws, |f| {
        app_numbers(f, "app:room").len() == 3 && user_events(f, "alice").len() == 3
    })
    .await;
    assert_eq!(app_numbers(&seen, "app:room"), vec![0, 1, 2]);
    assert_eq!(user_events(&seen, "alice"), lifecycle(&j0));
    assert_positions(&seen, "app:room");
    assert_positions(&seen, "user:alice");
    let (app_off, app_epoch) = last_pos(&seen, "app:room");
    let (user_off, user_epoch) = last_pos(&seen, "user:alice");
    ws.close(None).await.unwrap();
    drop(ws);

    // Missed while away.
    publish(&mut publisher, "room", 3..8).await;
    let j1 = run_job(b, &q, "alice").await;
    let _bob = run_job(b, &q, "bob").await;
    let j2 = run_job(b, &q, "alice").await;

    // Back, with a publisher still going: live frames race the replay.
    let live = tokio::spawn(async move {
        publish(&mut publisher, "room", 8..28).await;
        publisher
    });
    let mut ws = connect(second, &alice, Some((&user_off, &user_epoch))).await;
    let lead = next(&mut ws, PATIENCE).await.expect("the recovery frame");
    assert_eq!(lead["type"], "recovery", "{lead}");
    assert_eq!(lead["channel"], "user:alice");
    assert_eq!(lead["recovered"], true, "{lead}");
    assert_eq!(lead["epoch"], user_epoch.as_str());
    let mut pushed = Vec::new();
    let r = call(
        &mut ws,
        json!({"id": 2, "op": "subscribe", "channel": "app:room",
               "since": {"offset": app_off, "epoch": app_epoch}}),
        &mut pushed,
    )
    .await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["recovered"], true, "{r}");
    assert_eq!(r["epoch"], app_epoch.as_str());
    let mut publisher = live.await.unwrap();
    let j3 = run_job(b, &q, "alice").await;
    publish(&mut publisher, "room", 28..29).await;
    let got = frames_after(&mut ws, pushed, |f| {
        app_numbers(f, "app:room").last() == Some(&28) && user_events(f, "alice").len() == 9
    })
    .await;
    assert_eq!(
        app_numbers(&got, "app:room"),
        (3..29).collect::<Vec<_>>(),
        "every message once, in order"
    );
    let want: Vec<_> = [&j1, &j2, &j3].iter().flat_map(|j| lifecycle(j)).collect();
    assert_eq!(
        user_events(&got, "alice"),
        want,
        "alice's events once, in order"
    );
    assert_positions(&got, "app:room");
    assert_positions(&got, "user:alice");
    let distinct: BTreeSet<&str> = got
        .iter()
        .filter(|f| f["channel"] == "app:room")
        .map(|f| f["offset"].as_str().unwrap())
        .collect();
    assert_eq!(distinct.len(), 26, "no offset twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_comes_back_gets_exactly_what_it_missed() {
    let redis = RedisServer::start().expect("redis-server starts");
    let b = redis_broker(&redis, ChannelHistory::default()).await;
    let app = TestApp::start(b.clone(), fast).await;
    disconnect_and_recover(b.as_ref(), app.addr, app.addr).await;
}

/// `ferry dev`'s engine: the same, in one process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_engine_recovers_too() {
    let b = Arc::new(ferry_broker::MemoryBroker::new(EngineConfig::default()));
    let app = TestApp::start(b.clone(), fast).await;
    disconnect_and_recover(b.as_ref(), app.addr, app.addr).await;
}

/// Two gateways of an in-process cluster (each its own connections, the default channel history): gone from
/// one, back through the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_works_across_gateways() {
    let cluster = Cluster::builder()
        .gateways(2)
        .configure_gateways(|c| {
            fast(c);
            // The scenario's tokens are support's.
            c.auth.hs_secret = Some(SECRET.to_vec());
        })
        .start()
        .await
        .expect("the cluster starts");
    let (first, second) = (cluster.gateway_addr(0), cluster.gateway_addr(1));
    disconnect_and_recover(cluster.broker().as_ref(), first, second).await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_that_does_not_reach_back_is_not_recovered() {
    let redis = RedisServer::start().expect("redis-server starts");
    let history = ChannelHistory {
        size: 3,
        ttl: Duration::from_millis(300_000),
    };
    let b = redis_broker(&redis, history).await;
    let app = TestApp::start(b.clone(), fast).await;
    let q = QueueName::parse("rq").unwrap();
    let alice = token("alice", SCOPES, None);
    let mut publisher = connect(app.addr, &token("pub", SCOPES, None), None).await;
    let mut ws = connect(app.addr, &alice, None).await;
    ws_call(
        &mut ws,
        json!({"id": 1, "op": "subscribe", "channel": "app:room"}),
    )
    .await;
    publish(&mut publisher, "room", 0..1).await;
    let j0 = run_job(b.as_ref(), &q, "alice").await;
    let seen = frames_until(&mut ws, |f| {
        app_numbers(f, "app:room").len() == 1 && user_events(f, "alice").len() == 3
    })
    .await;
    assert_eq!(user_events(&seen, "alice"), lifecycle(&j0));
    let (app_off, epoch) = last_pos(&seen, "app:room");
    let (user_off, user_epoch) = last_pos(&seen, "user:alice");
    assert_eq!(epoch, user_epoch, "one epoch per shard");
    drop(ws);
    // Far more than the history holds (`MAXLEN ~` trims whole stream nodes of 100).
    publish(&mut publisher, "room", 1..260).await;

    let mut ws = connect(app.addr, &alice, None).await;
    let r = ws_call(
        &mut ws,
        json!({"id": 2, "op": "subscribe", "channel": "app:room",
               "since": {"offset": app_off, "epoch": epoch}}),
    )
    .await;
    assert_eq!(
        (r["ok"].clone(), r["recovered"].clone()),
        (json!(true), json!(false)),
        "{r}"
    );
    assert_eq!(r["epoch"], epoch.as_str());
    assert!(r.get("offset").is_none(), "{r}");
    // Nothing replayed, and live frames flow.
    publish(&mut publisher, "room", 260..261).await;
    let got = frames_until(&mut ws, |f| !app_numbers(f, "app:room").is_empty()).await;
    assert_eq!(app_numbers(&got, "app:room"), vec![260]);
    drop(ws);

    // Another epoch (another Redis, or one that lost its data), on both kinds of channel.
    let mut ws = connect(app.addr, &alice, Some((&user_off, "another-epoch"))).await;
    let lead = next(&mut ws, PATIENCE).await.unwrap();
    assert_eq!(
        (lead["type"].as_str(), lead["recovered"].as_bool()),
        (Some("recovery"), Some(false))
    );
    assert_eq!(
        lead["epoch"],
        epoch.as_str(),
        "the current epoch, to start over from"
    );
    let r = ws_call(
        &mut ws,
        json!({"id": 3, "op": "subscribe", "channel": "app:room",
               "since": {"offset": "1-0", "epoch": "another-epoch"}}),
    )
    .await;
    assert_eq!(r["recovered"], false, "{r}");
    // Older than the ttl, with the right epoch.
    let r = ws_call(
        &mut ws,
        json!({"id": 4, "op": "subscribe", "channel": "app:other",
               "since": {"offset": "1-0", "epoch": epoch}}),
    )
    .await;
    assert_eq!(r["recovered"], false, "{r}");
    // The job channel of a job whose events were all seen: recovered, nothing replayed.
    let r = ws_call(
        &mut ws,
        json!({"id": 5, "op": "subscribe", "channel": format!("job:{j0}"),
               "since": {"offset": user_off, "epoch": epoch}}),
    )
    .await;
    assert_eq!(
        (r["recovered"].clone(), r["offset"].clone()),
        (json!(true), json!(user_off)),
        "{r}"
    );
    assert!(
        next(&mut ws, Duration::from_millis(300)).await.is_none(),
        "nothing to replay"
    );

    // Malformed positions are refused naming the field.
    let r = ws_call(
        &mut ws,
        json!({"id": 6, "op": "subscribe", "channel": "app:x", "since": {"offset": "yesterday", "epoch": "e"}}),
    )
    .await;
    assert_eq!(r["ok"], false);
    assert_eq!(r["error"]["errors"][0]["field"], "since.offset", "{r}");
    let r = ws_call(
        &mut ws,
        json!({"id": 7, "op": "subscribe", "channel": "app:x", "since": {"offset": "1-1"}}),
    )
    .await;
    assert_eq!(r["error"]["errors"][0]["field"], "since.epoch", "{r}");
    let bad = app
        .client
        .get(format!(
            "{}/v1/ws?since_offset=soon&since_epoch=e",
            app.base
        ))
        .bearer_auth(&alice)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let body: Value = bad.json().await.unwrap();
    assert_eq!(body["errors"][0]["field"], "since_offset", "{body}");
}

/// A `user:` channel over several Redis shards has no single order: never recovered, said so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_channel_over_several_shards_is_not_recovered() {
    let r1 = RedisServer::start().expect("redis-server starts");
    let r2 = RedisServer::start().expect("redis-server starts");
    let b = Arc::new(
        RedisBroker::connect(&[r1.url(), r2.url()], EngineConfig::default())
            .await
            .unwrap(),
    );
    let app = TestApp::start(b.clone(), fast).await;
    let alice = token("alice", SCOPES, None);
    let mut ws = connect(app.addr, &alice, Some(("1-0", "e"))).await;
    let lead = next(&mut ws, PATIENCE).await.unwrap();
    assert_eq!(lead["type"], "recovery");
    assert_eq!(lead["recovered"], false, "{lead}");
    assert_eq!(lead["epoch"], Value::Null);
    // Its live frames still carry the position of their shard.
    let q = QueueName::parse("sharded").unwrap();
    run_job(b.as_ref(), &q, "alice").await;
    let got = frames_until(&mut ws, |f| user_events(f, "alice").len() == 3).await;
    assert_positions(&got, "user:alice");
    ws.send(Message::Close(None)).await.ok();
}
