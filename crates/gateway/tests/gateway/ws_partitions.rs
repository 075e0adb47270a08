//! Job events only where they are needed, with real gateways on one redis-server (the in-process cluster of
//! `ferry_testkit::cluster`): a gateway receives the events of the partitions of its clients' subjects and of
//! the jobs and queues they follow, and nothing else; `job:` and `queue:` subscribers on another node get each
//! event once; a job enqueued by an older ferry (no partition in its `m`) still reaches its owner's `user:`
//! channel.

use std::time::Duration;

use anyhow::{Result, ensure};
use ferry_broker::placement::partition_of;
use ferry_core::{Kind, NewJob, QueueName};
use ferry_testkit::RedisServer;
use ferry_testkit::cluster::{Client, Cluster, Session, sample};
use ferry_testkit::eventually;
use serde_json::{Value, json};

const PATIENCE: Duration = Duration::from_secs(15);
const ALL: &str = "jobs:submit jobs:read queues:read publish subscribe";

/// Connected, with its own `user:` channel subscribed (answered after it is).
async fn connect(client: &Client) -> Result<Session> {
    let mut ws = client.ws().await?;
    let r = ws.call(json!({"op": "ping"})).await?;
    ensure!(r["ok"] == true, "{r}");
    Ok(ws)
}

async fn submit(ws: &mut Session, queue: &str) -> Result<String> {
    let r = ws
        .call(json!({"op": "submit", "queue": queue, "job": {"kind": "ferry.noop"}}))
        .await?;
    ensure!(r["ok"] == true, "{r}");
    Ok(r["job"]["id"].as_str().unwrap_or_default().to_owned())
}

/// Pushed frames up to and including `id`'s `job.completed`.
async fn until_completed(ws: &mut Session, id: &str) -> Result<Vec<Value>> {
    ws.pushed_until(PATIENCE, |v| {
        v["event"] == "job.completed" && v["data"]["id"] == id
    })
    .await
}

/// A sample's value in the node's `/metrics` (0 when absent).
async fn metric(client: &Client, name: &str) -> Result<f64> {
    Ok(sample(&client.metrics().await?, name).unwrap_or(0.0))
}

/// Waits (up to PATIENCE) until the node's `ferry_gateway_partitions` is `n`.
async fn partitions_become(client: &Client, n: f64) -> Result<()> {
    eventually(
        PATIENCE,
        &format!("ferry_gateway_partitions {n}"),
        || async {
            let now = metric(client, "ferry_gateway_partitions").await?;
            ensure!(now == n, "ferry_gateway_partitions is {now}");
            Ok(Some(()))
        },
    )
    .await
}

fn numsub(redis: &RedisServer, channel: &str) -> Result<u64> {
    let out = redis.cli(&["PUBSUB", "NUMSUB", channel])?;
    Ok(out.lines().nth(1).unwrap_or_default().trim().parse()?)
}

fn p(sub: &str) -> u16 {
    partition_of(None, sub)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_receives_only_the_partitions_of_its_clients() -> Result<()> {
    let cluster = Cluster::builder()
        .gateways(2)
        .worker(&["ws-parts"])
        .start()
        .await?;
    let redis = &cluster.redis[0];
    let (a, b) = (
        cluster.client(0, "alice", ALL),
        cluster.client(1, "bob", ALL),
    );
    assert_ne!(p("alice"), p("bob"));
    let mut alice = connect(&a).await?;
    let mut bob = connect(&b).await?;
    partitions_become(&a, 1.0).await?;
    partitions_become(&b, 1.0).await?;
    assert_eq!(numsub(redis, &format!("ferry:ev:p:{}", p("alice")))?, 1);
    assert_eq!(numsub(redis, &format!("ferry:ev:p:{}", p("bob")))?, 1);

    // Alice's job, then bob's: everything of alice's was published before bob's last event, on the one
    // connection B's feed holds, so once bob has his, B would have seen alice's too had it been sent to it.
    let mine = submit(&mut alice, "ws-parts").await?;
    until_completed(&mut alice, &mine).await?;
    let theirs = submit(&mut bob, "ws-parts").await?;
    until_completed(&mut bob, &theirs).await?;
    // Every job event a hub receives is observed once in its lag histogram: queued, active and completed of
    // its own client's job, none of the other's.
    assert_eq!(metric(&a, "ferry_pubsub_lag_seconds_count").await?, 3.0);
    assert_eq!(metric(&b, "ferry_pubsub_lag_seconds_count").await?, 3.0);

    // The last connection of a subject gives its partition up.
    drop(alice);
    partitions_become(&a, 0.0).await?;
    assert_eq!(numsub(redis, &format!("ferry:ev:p:{}", p("alice")))?, 0);
    assert_eq!(numsub(redis, &format!("ferry:ev:p:{}", p("bob")))?, 1);
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_and_queue_subscribers_on_another_node_get_each_event_once() -> Result<()> {
    let mut cluster = Cluster::builder().gateways(2).start().await?;
    let (a, b) = (
        cluster.client(0, "alice", ALL),
        cluster.client(1, "root", "admin"),
    );
    assert_ne!(p("alice"), p("root"));
    let mut alice = connect(&a).await?;
    let mut root = connect(&b).await?;
    partitions_become(&b, 1.0).await?;

    // No worker yet: the job waits while root subscribes on B to it and to its queue.
    let id = submit(&mut alice, "ws-follow").await?;
    let job = format!("job:{id}");
    let r = root.subscribe(&job).await?;
    assert_eq!(r["ok"], true, "{r}");
    let r = root.subscribe("queue:ws-follow").await?;
    assert_eq!(r["ok"], true, "{r}");
    // root's own partition, and the job owner's.
    partitions_become(&b, 2.0).await?;
    assert_eq!(numsub(&cluster.redis[0], "ferry:ev:q:{ws-follow}")?, 1);

    cluster.add_worker(&["ws-follow"]).await?;
    until_completed(&mut alice, &id).await?;
    // A second job's queued event marks the end: a duplicate of the first job's would come before it.
    let next = submit(&mut alice, "ws-follow").await?;
    let got = root
        .pushed_until(PATIENCE, |v| {
            v["channel"] == "queue:ws-follow" && v["data"]["id"] == next.as_str()
        })
        .await?;
    let seen: Vec<(&str, &str)> = got
        .iter()
        .filter(|v| v["data"]["id"] == id.as_str())
        .map(|v| {
            (
                v["channel"].as_str().unwrap_or_default(),
                v["event"].as_str().unwrap_or_default(),
            )
        })
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
    let r = root
        .call(json!({"op": "unsubscribe", "channel": job}))
        .await?;
    assert_eq!(r["ok"], true, "{r}");
    let r = root
        .call(json!({"op": "unsubscribe", "channel": "queue:ws-follow"}))
        .await?;
    assert_eq!(r["ok"], true, "{r}");
    partitions_become(&b, 1.0).await?;
    assert_eq!(numsub(&cluster.redis[0], "ferry:ev:q:{ws-follow}")?, 0);
    cluster.shutdown().await;
    Ok(())
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
async fn a_job_of_an_older_ferry_still_reaches_its_owner() -> Result<()> {
    let mut cluster = Cluster::builder().start().await?;
    let mut alice = connect(&cluster.client(0, "alice", ALL)).await?;
    let mut job = NewJob::new(Kind::parse("ferry.noop")?, json!({}));
    job.owner = Some("alice".into());
    let id = cluster
        .broker()
        .enqueue(&QueueName::parse("ws-legacy")?, job)
        .await?
        .id
        .to_string();
    make_legacy(&cluster.redis[0], "ws-legacy");
    cluster.add_worker(&["ws-legacy"]).await?;
    let got = until_completed(&mut alice, &id).await?;
    // job.active comes from the claim, which copies the entry's old `m`: only the legacy channel carries it
    // (queued came before the rewrite, completed from the worker's lease, which renders `m` anew).
    let events: Vec<&str> = got
        .iter()
        .filter(|v| v["channel"] == "user:alice" && v["data"]["id"] == id.as_str())
        .map(|v| v["event"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        events,
        ["job.queued", "job.active", "job.completed"],
        "{got:?}"
    );
    cluster.shutdown().await;
    Ok(())
}
