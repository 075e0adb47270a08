//! ferry on a Redis Cluster, as processes: a gateway, a worker with its recorder and `ferry enqueue`, all given
//! `--redis-cluster` (or `FERRY_REDIS_CLUSTER`) and nothing else about the cluster. Jobs of queues spread over
//! the virtual shards complete, their events reach a WebSocket client through sharded pub/sub, and the record
//! in PostgreSQL holds every one.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Result;
use ferry_testkit::{PostgresServer, RedisCluster, psql};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::support::{self, Proc, remaining, submit, token, until_completed, until_ready};

const SECRET: &str = "redis-cluster-test-secret-redis-cluster";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_worker_recorder_and_enqueue_run_on_a_redis_cluster() -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let cluster = RedisCluster::start(3, 0)?;
    let seeds = cluster.urls()[..2].join(",");
    let pg = PostgresServer::start()?;
    let db = support::migrated_database(&pg, "cluster")?;
    let env = [
        ("FERRY_REDIS_CLUSTER", seeds.as_str()),
        ("FERRY_DATABASE_URL", db.as_str()),
    ];
    let queues: Vec<String> = (0..8).map(|i| format!("q{i}")).collect();
    let (_gateway, line) = Proc::spawn_listening(
        &mut support::role(
            &[
                "gateway",
                "--listen",
                "127.0.0.1:0",
                "--drain-delay-ms",
                "0",
            ],
            &[env[0], env[1], ("FERRY_JWT_SECRET", SECRET)],
        ),
        "gateway listening",
    )
    .await?;
    let listen = support::announced(&line, "listen")?;
    let base = format!("http://{listen}");
    let http = reqwest::Client::new();
    until_ready(&http, &base, remaining(deadline)).await?;
    let _worker = Proc::spawn_logged(&mut support::role(
        &["worker", "--queues", &queues.join(",")],
        &env,
    ))?;

    let token = token(
        SECRET,
        "alice",
        &["jobs:submit", "jobs:read", "subscribe"],
        Duration::from_secs(600),
    );
    // Connect first, then submit: the `user:` channel carries every event of alice's jobs, from every shard.
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{listen}/v1/ws?token={token}")).await?;
    ws.send(Message::text(r#"{"id":1,"op":"ping"}"#)).await?;
    let mut ids = Vec::new();
    for (i, q) in queues.iter().enumerate() {
        let (id, _) = submit(
            &http,
            &base,
            &token,
            q,
            &json!({"kind": "ferry.echo", "payload": {"n": i}}),
            &[],
        )
        .await?;
        ids.push(id);
    }
    let mut pushed = std::collections::HashSet::new();
    while pushed.len() < ids.len() {
        let frame = tokio::time::timeout(remaining(deadline), ws.next())
            .await
            .expect("a job.completed frame for every job")
            .expect("the socket stays open")?;
        let Message::Text(text) = frame else { continue };
        let v: Value = serde_json::from_str(&text)?;
        if v["event"] == "job.completed" {
            pushed.insert(v["data"]["id"].as_str().unwrap_or_default().to_owned());
        }
    }
    for id in &ids {
        assert!(pushed.contains(id), "{id} pushed");
        until_completed(&http, &base, &token, id, remaining(deadline)).await?;
    }

    // `ferry enqueue` on the same cluster, by flag this time.
    let out = support::role(
        &[
            "enqueue",
            "--redis-cluster",
            &cluster.urls()[2],
            "--queue",
            "q3",
            "--kind",
            "ferry.echo",
        ],
        &[],
    )
    .stdout(Stdio::piped())
    .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8(out.stdout)?.trim().to_owned();
    // A job enqueued from the command line has no owner: an admin reads it.
    let admin = support::token(SECRET, "ops", &["admin"], Duration::from_secs(600));
    until_completed(&http, &base, &admin, &id, remaining(deadline)).await?;
    ids.push(id);

    // The cluster remembers how its queues are laid out: another count of virtual shards is refused, naming
    // the flag, and so is a seed list that mixes TLS and plain nodes.
    for (args, says) in [
        (
            vec!["--redis-cluster-vshards", "8"],
            "invalid --redis-cluster-vshards: this Redis Cluster holds ferry's queues laid out over 16 virtual \
             shards, not 8",
        ),
        (
            vec!["--redis-cluster-vshards", "0"],
            "invalid --redis-cluster-vshards: must be between 1 and 16384, got 0",
        ),
    ] {
        let seed = cluster.urls()[0].clone();
        let mut all = vec!["enqueue", "--queue", "q1", "--kind", "k"];
        all.extend(["--redis-cluster", seed.as_str()]);
        all.extend(args);
        let out = support::role(&all, &[]).output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{stderr}");
        assert!(stderr.contains(says), "{stderr}");
    }
    let tls = format!("rediss://{}", &cluster.urls()[0]["redis://".len()..]);
    let mixed = format!("{tls},{}", cluster.urls()[1]);
    let out = support::role(
        &[
            "enqueue",
            "--queue",
            "q1",
            "--kind",
            "k",
            "--redis-cluster",
            &mixed,
        ],
        &[],
    )
    .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains(
            "invalid --redis-cluster: either every node URL is rediss:// (TLS) or none is"
        ),
        "{stderr}"
    );

    // The recorder read every virtual shard's event log.
    let recorded = ferry_testkit::eventually(remaining(deadline), "every job recorded", || async {
        let n = psql(&db, "select count(*) from jobs where state = 'completed'")?;
        anyhow::ensure!(n.trim() == ids.len().to_string(), "{n} recorded");
        Ok(Some(n))
    })
    .await?;
    assert_eq!(recorded.trim(), ids.len().to_string());
    drop(cluster);
    Ok(())
}

/// Moving a ferry from a standalone Redis to a Redis Cluster, the documented way (docs/sharding.md): stop the
/// workers on the standalone Redis once the recorder has every job, start them on the cluster, and the
/// reconciler puts every unfinished job back from the record. Queued and scheduled jobs alike complete on the
/// cluster, each exactly once, and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_move_from_a_standalone_redis_to_a_redis_cluster_through_the_record() -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let standalone = ferry_testkit::RedisServer::start()?;
    let cluster = RedisCluster::start(3, 0)?;
    let pg = PostgresServer::start()?;
    let db = support::migrated_database(&pg, "migration")?;
    let recorded = |sql: &str| -> Result<u64> { Ok(psql(&db, sql)?.trim().parse()?) };

    // Before: jobs accepted on the standalone Redis and recorded, none worked yet (this worker only records).
    let mut old = Proc::spawn_logged(&mut support::role(
        &[
            "worker",
            "--redis",
            &standalone.url(),
            "--queues",
            "elsewhere",
            "--admin-listen",
            "127.0.0.1:0",
        ],
        &[("FERRY_DATABASE_URL", db.as_str())],
    ))?;
    let standalone_url = standalone.url();
    for delay in [None, Some("1500")] {
        let mut args = vec!["enqueue", "--redis", &standalone_url];
        args.extend([
            "--queue",
            "moving",
            "--kind",
            "ferry.echo",
            "--count",
            "100",
        ]);
        if let Some(ms) = delay {
            args.extend(["--delay-ms", ms]);
        }
        let out = support::role(&args, &[]).output()?;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    ferry_testkit::eventually(remaining(deadline), "200 jobs recorded", || async {
        let n = recorded("select count(*) from jobs")?;
        anyhow::ensure!(n == 200, "{n}");
        Ok(Some(()))
    })
    .await?;
    assert!(
        old.stop(Duration::from_secs(30)).await?.success(),
        "{}",
        old.log()
    );

    // After: a worker on the cluster; its reconciler finds the unfinished jobs missing there and restores them.
    let _new = Proc::spawn_logged(&mut support::role(
        &[
            "worker",
            "--redis-cluster",
            &cluster.urls().join(","),
            "--queues",
            "moving",
            "--reconcile-interval-ms",
            "500",
            "--reconcile-grace-ms",
            "1000",
            "--admin-listen",
            "127.0.0.1:0",
        ],
        &[("FERRY_DATABASE_URL", db.as_str())],
    ))?;
    ferry_testkit::eventually(remaining(deadline), "every job completed", || async {
        let n = recorded("select count(*) from jobs where state = 'completed'")?;
        anyhow::ensure!(n == 200, "{n} completed");
        Ok(Some(()))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let twice = recorded(
        "select count(*) from (select job_id from job_events where type = 'job.completed'
                               group by job_id having count(*) > 1) d",
    )?;
    assert_eq!(twice, 0, "no job completed twice");
    let restored =
        recorded("select count(distinct job_id) from job_events where actor = 'reconciler'")?;
    assert_eq!(restored, 200, "every job came over through the record");
    drop(cluster);
    Ok(())
}
