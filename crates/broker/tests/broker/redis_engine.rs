//! Redis-specific behaviour beyond the shared contract: key layout, trimming, the packed event stream, sharding.

use std::sync::Arc;
use std::time::Duration;

use ferry_broker::{Completion, EngineConfig, RedisBroker, prelude::*};
use ferry_core::{JobState, Kind, NewJob, QueueName};
use ferry_testkit::RedisServer;
use serde_json::json;

fn q(s: &str) -> QueueName {
    QueueName::parse(s).unwrap()
}

fn noop() -> NewJob {
    NewJob::new(Kind::parse("ferry.noop").unwrap(), json!({"n": 1}))
}

async fn broker(server: &RedisServer, cfg: EngineConfig) -> Arc<RedisBroker> {
    Arc::new(RedisBroker::connect(&[server.url()], cfg).await.unwrap())
}

/// Completes every job of `leased` with `result`; each completion must be accepted.
async fn complete_all(b: &RedisBroker, leased: &[ferry_broker::Leased], result: serde_json::Value) {
    let done = b
        .complete(
            leased
                .iter()
                .map(|l| Completion {
                    lease: l.lease.clone(),
                    result: result.clone(),
                })
                .collect(),
        )
        .await
        .unwrap();
    assert!(done.iter().all(Result::is_ok), "{done:?}");
}

#[tokio::test]
async fn full_cycle_smoke() {
    let server = RedisServer::start().unwrap();
    let b = broker(&server, EngineConfig::default()).await;
    let queue = q("smoke");
    let ids = b
        .enqueue_batch(&queue, vec![noop(), noop(), noop()])
        .await
        .unwrap();
    assert_eq!(ids.len(), 3);
    let stats = b.stats(&queue).await.unwrap();
    assert_eq!((stats.depth, stats.active), (3, 0));
    let leased = b.claim(&queue, "c1", 10, Duration::ZERO).await.unwrap();
    assert_eq!(leased.len(), 3);
    assert_eq!(
        b.job(ids[0].id).await.unwrap().unwrap().state,
        JobState::Active
    );
    let stats = b.stats(&queue).await.unwrap();
    assert_eq!((stats.depth, stats.active), (0, 3));
    complete_all(&b, &leased, json!({"ok": true})).await;
    let again = b
        .complete(vec![Completion {
            lease: leased[0].lease.clone(),
            result: json!(1),
        }])
        .await
        .unwrap();
    assert!(again[0].is_err(), "a second completion is rejected");
    let info = b.job(ids[0].id).await.unwrap().unwrap();
    assert_eq!(info.state, JobState::Completed);
    assert_eq!(info.result, Some(json!({"ok": true})));
    assert_eq!(info.spec.payload, json!({"n": 1}));
}

/// Trimming by MINID removes acknowledged entries past retention and never a pending or undelivered one.
#[tokio::test]
async fn trimming_keeps_pending_and_undelivered_entries() {
    let server = RedisServer::start().unwrap();
    let cfg = EngineConfig {
        finished_retention: Duration::ZERO,
        ..EngineConfig::default()
    };
    let b = broker(&server, cfg).await;
    let queue = q("trim");
    b.enqueue_batch(&queue, (0..10).map(|_| noop()).collect())
        .await
        .unwrap();
    let first = b.claim(&queue, "c", 3, Duration::ZERO).await.unwrap(); // stays pending
    let second = b.claim(&queue, "c", 4, Duration::ZERO).await.unwrap();
    complete_all(&b, &second, json!(null)).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    b.maintain(&queue).await.unwrap();
    // 3 pending + 4 acknowledged (newer than the oldest pending, so kept) + 3 undelivered.
    let len: u64 = server
        .cli(&["XLEN", "ferry:{trim}:p1"])
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(len, 10);
    complete_all(&b, &first, json!(null)).await;
    b.maintain(&queue).await.unwrap();
    let len: u64 = server
        .cli(&["XLEN", "ferry:{trim}:p1"])
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(len, 3, "only the undelivered entries remain");
    assert_eq!(b.stats(&queue).await.unwrap().depth, 3);
    let rest = b.claim(&queue, "c", 10, Duration::ZERO).await.unwrap();
    assert_eq!(rest.len(), 3);
    // Completed records pointing at trimmed entries are gone too.
    assert!(b.job(second[0].job.id).await.unwrap().is_none());
}

/// A batch's events are packed into one entry of the per-shard stream.
#[tokio::test]
async fn events_are_packed_per_batch() {
    let server = RedisServer::start().unwrap();
    let b = broker(&server, EngineConfig::default()).await;
    let queue = q("packed");
    b.enqueue_batch(&queue, (0..50).map(|_| noop()).collect())
        .await
        .unwrap();
    let len: u64 = server
        .cli(&["XLEN", "ferry:events"])
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(len, 1);
    let leased = b.claim(&queue, "c", 50, Duration::ZERO).await.unwrap();
    complete_all(&b, &leased, json!(null)).await;
    let len: u64 = server
        .cli(&["XLEN", "ferry:events"])
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(len, 3, "enqueue, claim and complete: one entry each");
}

/// Cancelling queued jobs deletes entries ahead of the group; depth must still be right.
#[tokio::test]
async fn depth_survives_deleted_entries() {
    let server = RedisServer::start().unwrap();
    let b = broker(&server, EngineConfig::default()).await;
    let queue = q("tomb");
    let ids = b
        .enqueue_batch(&queue, (0..5).map(|_| noop()).collect())
        .await
        .unwrap();
    b.cancel(ids[2].id, None).await.unwrap();
    assert_eq!(b.stats(&queue).await.unwrap().depth, 4);
    let leased = b.claim(&queue, "c", 10, Duration::ZERO).await.unwrap();
    assert_eq!(leased.len(), 4);
    assert!(leased.iter().all(|l| l.job.id != ids[2].id));
}

/// Past the 1,000 entries `stats` counts per stream, a backlog with cancelled jobs is Redis's own figure when it
/// has one (never below the jobs waiting, too high by at most the jobs cancelled), counted on when it has none;
/// back under the bound it is exact again.
#[tokio::test]
async fn depth_of_a_long_backlog_with_cancels_stays_close_and_bounded() {
    let server = RedisServer::start().unwrap();
    let b = broker(&server, EngineConfig::default()).await;
    let queue = q("long");
    let mut ids = Vec::new();
    for _ in 0..3 {
        let batch = b
            .enqueue_batch(&queue, (0..400).map(|_| noop()).collect())
            .await
            .unwrap();
        ids.extend(batch.into_iter().map(|e| e.id));
    }
    let claim = |n: usize| {
        let (b, queue) = (b.clone(), queue.clone());
        async move {
            let mut claimed = 0;
            while claimed < n {
                let want = (n - claimed).min(100);
                claimed += b
                    .claim(&queue, "c", want, Duration::ZERO)
                    .await
                    .unwrap()
                    .len();
            }
        }
    };
    claim(50).await;
    for id in &ids[100..105] {
        b.cancel(*id, None).await.unwrap();
    }
    // 1,145 wait; Redis's figure (entries added - entries read) still counts the 5 cancelled.
    let depth = b.stats(&queue).await.unwrap().depth;
    assert!((1145..=1150).contains(&depth), "{depth}");
    // Read with a deletion ahead, Redis 7.0 loses its read counter: counted.
    claim(10).await;
    let depth = b.stats(&queue).await.unwrap().depth;
    assert!((1135..=1140).contains(&depth), "{depth}");
    claim(300).await;
    assert_eq!(b.stats(&queue).await.unwrap().depth, 835);
}

/// Queues spread over three shards; every queue's keys live on exactly one of them.
#[tokio::test]
async fn queues_spread_over_three_shards() {
    let servers: Vec<RedisServer> = (0..3).map(|_| RedisServer::start().unwrap()).collect();
    let urls: Vec<String> = servers.iter().map(RedisServer::url).collect();
    let b = RedisBroker::connect(&urls, EngineConfig::default())
        .await
        .unwrap();
    let names: Vec<QueueName> = (0..30).map(|i| q(&format!("q{i}"))).collect();
    let mut ids = Vec::new();
    for name in &names {
        ids.push(b.enqueue(name, noop()).await.unwrap().id);
    }
    let mut per_shard = Vec::new();
    for s in &servers {
        let members = s.cli(&["SMEMBERS", "ferry:queues"]).unwrap();
        per_shard.push(members.lines().filter(|l| !l.trim().is_empty()).count());
    }
    assert_eq!(per_shard.iter().sum::<usize>(), 30, "{per_shard:?}");
    assert!(
        per_shard.iter().all(|&n| n > 0),
        "every shard got queues: {per_shard:?}"
    );
    // Lookups and claims find each job on its own shard.
    for (name, id) in names.iter().zip(&ids) {
        assert_eq!(b.job(*id).await.unwrap().unwrap().queue, *name);
        assert_eq!(
            b.claim(name, "c", 1, Duration::ZERO).await.unwrap()[0]
                .job
                .id,
            *id
        );
    }
    assert_eq!(b.queues().await.unwrap().len(), 30);
}

/// A queued job's id is made by the enqueue script from its entry's millisecond, so enqueue writes no lookup
/// record; lookups and cancel still find the job through its entry.
#[tokio::test]
async fn queued_jobs_are_found_through_their_entry() {
    let server = RedisServer::start().unwrap();
    let b = broker(&server, EngineConfig::default()).await;
    let queue = q("ids");
    let ids: Vec<_> = b
        .enqueue_batch(&queue, (0..20).map(|_| noop()).collect())
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids keep input order");
    assert!(ids.iter().all(|id| id.0.get_version_num() == 7));
    let hlen = server.cli(&["HLEN", "ferry:{ids}:jobs"]).unwrap();
    assert_eq!(hlen.trim(), "0", "no record written at enqueue");
    let first = server
        .cli(&["XRANGE", "ferry:{ids}:p1", "-", "+", "COUNT", "1"])
        .unwrap();
    let eid_ms: u64 = first
        .lines()
        .next()
        .unwrap()
        .split('-')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let id_ms = ids[0].0.get_timestamp().unwrap().to_unix();
    assert_eq!(eid_ms, id_ms.0 * 1000 + u64::from(id_ms.1) / 1_000_000);
    assert_eq!(
        b.job(ids[7]).await.unwrap().unwrap().state,
        JobState::Queued
    );
    assert_eq!(
        b.cancel(ids[7], None).await.unwrap(),
        ferry_broker::CancelOutcome::Cancelled(JobState::Queued)
    );
    assert_eq!(
        b.job(ids[7]).await.unwrap().unwrap().state,
        JobState::Cancelled
    );
    assert_eq!(b.stats(&queue).await.unwrap().depth, 19);
    assert!(b.job(ferry_core::JobId::new()).await.unwrap().is_none());
}

/// The merged event feed survives one shard's restart: that shard's events resume after it reconnects, and the
/// other shard's keep flowing meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_feed_resumes_after_a_shard_restarts() {
    use futures::StreamExt;

    let mut servers: Vec<RedisServer> = (0..2).map(|_| RedisServer::start().unwrap()).collect();
    let urls: Vec<String> = servers.iter().map(RedisServer::url).collect();
    let b = RedisBroker::connect(&urls, EngineConfig::default())
        .await
        .unwrap();
    // Find one queue per shard: each queue is registered in `ferry:queues` on its own shard only.
    let mut on_shard: [Option<QueueName>; 2] = [None, None];
    for i in 0..40 {
        let name = q(&format!("feed{i}"));
        b.enqueue(&name, noop()).await.unwrap();
        for (s, server) in servers.iter().enumerate() {
            let members = server.cli(&["SMEMBERS", "ferry:queues"]).unwrap();
            if on_shard[s].is_none() && members.lines().any(|l| l.trim() == name.as_str()) {
                on_shard[s] = Some(name.clone());
            }
        }
        if on_shard.iter().all(Option::is_some) {
            break;
        }
    }
    let [Some(stays), Some(restarted)] = on_shard else {
        panic!("no queue found on each shard: {on_shard:?}");
    };
    let mut events = b.subscribe().await.unwrap();

    // Wait until an enqueue on `queue` shows up on the feed, enqueuing again while it does not (the shard may
    // still be reconnecting: pub/sub loses what is published meanwhile).
    async fn arrives(
        b: &RedisBroker,
        events: &mut ferry_broker::EventStream,
        queue: &QueueName,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while tokio::time::Instant::now() < deadline {
            let id = match b.enqueue(queue, noop()).await {
                Ok(e) => e.id,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let until = tokio::time::Instant::now() + Duration::from_millis(500);
            while let Ok(Some(e)) = tokio::time::timeout_at(until, events.next()).await {
                if e.job == id {
                    return true;
                }
            }
        }
        false
    }

    assert!(arrives(&b, &mut events, &stays).await);
    assert!(arrives(&b, &mut events, &restarted).await);
    servers[1].restart().unwrap();
    assert!(
        arrives(&b, &mut events, &stays).await,
        "the other shard keeps flowing"
    );
    assert!(
        arrives(&b, &mut events, &restarted).await,
        "the restarted shard's events resume"
    );
}

#[tokio::test]
async fn event_log_is_trimmed_below_what_the_recorder_has_not_acknowledged() {
    let server = RedisServer::start().unwrap();
    let b = broker(&server, EngineConfig::default()).await;
    let queue = q("logtrim");
    let xlen = || -> u64 {
        server
            .cli(&["XLEN", "ferry:events"])
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    // Without a recorder group, housekeeping leaves the log to its hard cap.
    for _ in 0..5 {
        b.enqueue(&queue, noop()).await.unwrap();
    }
    b.maintain(&queue).await.unwrap();
    assert_eq!(xlen(), 5);
    // The recorder reads all five and acknowledges the first three.
    let read = b
        .read_log(
            0,
            ferry_broker::RECORDER_GROUP,
            "r",
            100,
            Duration::ZERO,
            None,
        )
        .await
        .unwrap();
    assert_eq!(read.len(), 5);
    let acked: Vec<_> = read[..3].iter().map(|e| e.position.clone()).collect();
    b.ack_log(ferry_broker::RECORDER_GROUP, &acked)
        .await
        .unwrap();
    assert_eq!(
        b.log_backlog(ferry_broker::RECORDER_GROUP).await.unwrap(),
        2
    );
    // Exact trimming (MINID ~ may keep a whole node) would leave 2; at least nothing unacknowledged goes.
    b.maintain(&queue).await.unwrap();
    let ids = server.cli(&["XRANGE", "ferry:events", "-", "+"]).unwrap();
    for e in &read[3..] {
        assert!(ids.contains(&e.position.sid), "unacknowledged entry kept");
    }
    b.ack_log(
        ferry_broker::RECORDER_GROUP,
        &read[3..]
            .iter()
            .map(|e| e.position.clone())
            .collect::<Vec<_>>(),
    )
    .await
    .unwrap();
    assert_eq!(
        b.log_backlog(ferry_broker::RECORDER_GROUP).await.unwrap(),
        0
    );
    // One more entry after everything was acknowledged: the log never grows past what is unrecorded (plus the
    // approximate trim's slack of at most one radix node, 100 entries).
    b.enqueue(&queue, noop()).await.unwrap();
    b.maintain(&queue).await.unwrap();
    assert!(xlen() <= 6);
}

/// `total_connections_received` of a server: how many connections it has accepted so far.
fn connections_received(server: &RedisServer) -> u64 {
    let info = server.cli(&["INFO", "stats"]).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("total_connections_received:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("INFO stats without total_connections_received")
}

/// A claim's events are dated by Redis's clock when the script runs, not by the client's when it sent the call:
/// a request held up on the way (here the server is paused for 1.5 s, as a partition holds requests in a socket)
/// used to carry the time it was sent, up to the whole delay before it took effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_events_are_dated_when_redis_runs_the_claim() {
    let server = RedisServer::start().unwrap();
    let b = broker(&server, EngineConfig::default()).await;
    let queue = q("dated");
    b.enqueue(&queue, noop()).await.unwrap();
    let sent = ferry_core::now_ms();
    server.cli(&["CLIENT", "PAUSE", "1500", "ALL"]).unwrap();
    let leased = b.claim(&queue, "c", 1, Duration::ZERO).await.unwrap();
    assert_eq!(leased.len(), 1);
    let entries = b
        .read_log(0, "dating", "t", 100, Duration::ZERO, None)
        .await
        .unwrap();
    let active = entries
        .iter()
        .flat_map(|e| &e.events)
        .find(|e| e.ty == ferry_core::EventType::Active)
        .expect("a job.active event");
    // Redis's clock and this process's are the same machine clock here; the pause ended 1.5 s after `sent`.
    assert!(
        active.at >= sent + 1_400,
        "job.active dated {} ms after the call was sent, before the claim could run (paused 1500 ms)",
        active.at as i64 - sent as i64
    );
}

/// A claim whose caller gave up before Redis ran it (held up by a paused server, as a partition holds requests
/// in a socket) takes nothing for good: once it runs, the job is handed back at once with its attempt uncharged,
/// instead of staying leased to a worker that is no longer waiting for it until the visibility timeout (30 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_given_up_before_it_ran_leaves_the_job_free_and_uncharged() {
    let server = RedisServer::start().unwrap();
    let b = broker(&server, EngineConfig::default()).await;
    let queue = q("ghost");
    let id = b.enqueue(&queue, noop()).await.unwrap().id;
    // Load the claim script first, so the held-up request is the claim itself (EVALSHA), not a NOSCRIPT miss.
    b.claim(&q("warm-up"), "gone", 1, Duration::ZERO)
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    server.cli(&["CLIENT", "PAUSE", "1000", "ALL"]).unwrap();
    let gave_up = tokio::time::timeout(
        Duration::from_millis(200),
        b.claim(&queue, "gone", 1, Duration::ZERO),
    )
    .await;
    assert!(
        gave_up.is_err(),
        "the claim returned while Redis was paused"
    );
    tokio::time::sleep_until(started + Duration::from_millis(1_200)).await;
    // Far below the visibility timeout: nothing may stay leased to the consumer that gave up.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let held = b.leases_by_consumer(&queue).await.unwrap();
        let info = b.job(id).await.unwrap().unwrap();
        if !held.contains_key("gone") && info.state == JobState::Queued {
            assert_eq!(info.attempts, 0, "the abandoned claim charged an attempt");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the job stayed {:?}, leased to the consumer that gave up ({held:?})",
            info.state
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let leased = b
        .claim(&queue, "live", 1, Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(leased.len(), 1, "the job is claimable again");
    assert_eq!((leased[0].job.id, leased[0].job.attempt), (id, 1));
}

/// A reply that timed out retires its connection: later calls go through a new one instead of queueing behind
/// requests that may be stuck in it (after a partition they would wait for TCP's retransmission backoff, and the
/// stuck ones would run long after their callers gave up).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_that_timed_out_retires_its_connection() {
    let server = RedisServer::start().unwrap();
    let b = RedisBroker::connect_with(
        &[server.url()],
        EngineConfig::default(),
        ferry_broker::RedisOptions {
            response_timeout: Duration::from_millis(200),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    b.ping().await.unwrap();
    let before = connections_received(&server);
    server.cli(&["CLIENT", "PAUSE", "600", "ALL"]).unwrap();
    assert!(
        b.ping().await.is_err(),
        "PING answered while Redis was paused"
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    b.ping().await.unwrap();
    // redis-cli's own connection (INFO) counts too: one for PAUSE, one for this INFO, one new broker connection.
    assert_eq!(
        connections_received(&server) - before,
        3,
        "the call after the timeout did not open a new connection"
    );
}

/// Concurrent single enqueues to one queue share script calls (group commit), and each job still carries its
/// own submitter: its `job.queued` event names its owner as the actor, though several owners' jobs went in one
/// call.
#[tokio::test]
async fn concurrent_single_enqueues_share_calls_and_keep_their_submitters() {
    use futures::StreamExt;
    let server = RedisServer::start().unwrap();
    let b = broker(&server, EngineConfig::default()).await;
    let queue = q("coalesced");
    b.enqueue(&queue, noop()).await.unwrap(); // scripts loaded, groups created
    let mut events = b.subscribe().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.cli(&["CONFIG", "RESETSTAT"]).unwrap();
    let n = 300;
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (b, queue) = (b.clone(), queue.clone());
            tokio::spawn(async move {
                let mut job = noop();
                job.owner = Some(format!("user-{i}"));
                let e = b.enqueue(&queue, job).await.unwrap();
                (e.id, format!("user-{i}"))
            })
        })
        .collect();
    let mut owners = std::collections::HashMap::new();
    for t in tasks {
        let (id, owner) = t.await.unwrap();
        assert!(owners.insert(id, owner).is_none(), "ids are distinct");
    }
    assert_eq!(b.stats(&queue).await.unwrap().depth, n + 1);
    let stats = server.cli(&["INFO", "commandstats"]).unwrap();
    let calls: u64 = stats
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|r| r.split(',').next())
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    assert!(
        (1..n / 2).contains(&calls),
        "{n} concurrent enqueues took {calls} script calls"
    );
    let mut seen = 0;
    while seen < n {
        let ev = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("every job.queued event arrives")
            .unwrap();
        if let Some(owner) = owners.get(&ev.job) {
            assert_eq!(ev.actor.as_deref(), Some(owner.as_str()), "{ev:?}");
            seen += 1;
        }
    }
}

/// A caller that stops waiting for a coalesced enqueue cancels nothing: its call runs in the queue's own task,
/// so the callers behind it are answered, its job is enqueued all the same, and the queue takes enqueues after.
#[tokio::test]
async fn an_enqueue_whose_caller_stopped_waiting_still_goes_out() {
    let server = RedisServer::start().unwrap();
    let b = broker(&server, EngineConfig::default()).await;
    let queue = q("handoff");
    b.enqueue(&queue, noop()).await.unwrap();
    // Every client waits for 700 ms: the first call hangs, and the others queue behind it.
    server.cli(&["CLIENT", "PAUSE", "700", "ALL"]).unwrap();
    let spawn = || {
        let (b, queue) = (b.clone(), queue.clone());
        tokio::spawn(async move { b.enqueue(&queue, noop()).await })
    };
    let first = spawn();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let waiters: Vec<_> = (0..3).map(|_| spawn()).collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    first.abort();
    for w in waiters {
        let r = tokio::time::timeout(Duration::from_secs(10), w)
            .await
            .expect("a waiter is answered")
            .unwrap();
        assert!(r.is_ok(), "{r:?}");
    }
    tokio::time::timeout(Duration::from_secs(5), b.enqueue(&queue, noop()))
        .await
        .expect("the lane is free again")
        .unwrap();
    assert_eq!(
        b.stats(&queue).await.unwrap().depth,
        6,
        "the abandoned caller's job went out too"
    );
}

/// With `drop_recorded`, a job the recorder has acknowledged leaves Redis whole: its record, its stream entry
/// (spec and payload) and its note. The priority stream is marked as having lost only acknowledged entries, so
/// stats take Redis's group lag for the depth; deleting an undelivered entry (a cancel) takes the mark away.
#[tokio::test]
async fn recorded_jobs_leave_whole_and_the_lag_mark_follows_deletions() {
    let server = RedisServer::start().unwrap();
    let cfg = EngineConfig {
        drop_recorded: true,
        ..EngineConfig::default()
    };
    let b = broker(&server, cfg).await;
    let queue = q("drop");
    let read = || async {
        b.read_log(
            0,
            ferry_broker::RECORDER_GROUP,
            "r",
            1000,
            Duration::ZERO,
            None,
        )
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.position)
        .collect::<Vec<_>>()
    };
    // The recorder commits everything logged so far; then a maintenance pass.
    let record_and_maintain = || async {
        let positions = read().await;
        b.ack_log(ferry_broker::RECORDER_GROUP, &positions)
            .await
            .unwrap();
        b.maintain(&queue).await.unwrap();
    };
    read().await;
    let ids = b
        .enqueue_batch(&queue, (0..5).map(|_| noop()).collect())
        .await
        .unwrap();
    let leased = b.claim(&queue, "c", 2, Duration::ZERO).await.unwrap();
    complete_all(&b, &leased, json!({"big": "x".repeat(1000)})).await;
    let cli = |args: &[&str]| server.cli(args).unwrap().trim().to_owned();
    assert_eq!(
        cli(&["LLEN", "ferry:{drop}:done"]),
        "1",
        "one note per call"
    );
    record_and_maintain().await;
    assert_eq!(cli(&["XLEN", "ferry:{drop}:p1"]), "3");
    assert_eq!(cli(&["HLEN", "ferry:{drop}:jobs"]), "0");
    assert_eq!(cli(&["LLEN", "ferry:{drop}:done"]), "0");
    assert_eq!(cli(&["HGET", "ferry:{drop}:acked-deletes", "1"]), "1");
    assert_eq!(b.stats(&queue).await.unwrap().depth, 3);
    for l in &leased {
        assert!(b.job(l.job.id).await.unwrap().is_none());
    }
    // A queued job cancelled: its undelivered entry is deleted, and the lag cannot be trusted any more.
    b.cancel(ids[4].id, None).await.unwrap();
    assert_eq!(cli(&["HEXISTS", "ferry:{drop}:acked-deletes", "1"]), "0");
    assert_eq!(b.stats(&queue).await.unwrap().depth, 2);
    record_and_maintain().await;
    assert!(b.job(ids[4].id).await.unwrap().is_none());
    assert_eq!(cli(&["ZCARD", "ferry:{drop}:fin"]), "0");
    // The mark is not set again over a stream with an undelivered deletion in its past.
    let leased = b.claim(&queue, "c", 2, Duration::ZERO).await.unwrap();
    complete_all(&b, &leased, json!(1)).await;
    record_and_maintain().await;
    assert_eq!(cli(&["XLEN", "ferry:{drop}:p1"]), "0");
    assert_eq!(cli(&["HEXISTS", "ferry:{drop}:acked-deletes", "1"]), "0");
    assert_eq!(b.stats(&queue).await.unwrap().depth, 0);

    // A dead job's entry is trimmed at once (its dead-letter entry holds the spec), while a completion not yet
    // recorded holds the trim at its entry.
    let dead = b.enqueue(&queue, noop()).await.unwrap().id;
    let unrecorded = b.enqueue(&queue, noop()).await.unwrap().id;
    let leased = b.claim(&queue, "c", 2, Duration::ZERO).await.unwrap();
    b.fail(vec![ferry_broker::Failure {
        lease: leased[0].lease.clone(),
        error: "no".into(),
        retry: ferry_broker::Retry::Never,
    }])
    .await
    .unwrap();
    b.complete(vec![Completion {
        lease: leased[1].lease.clone(),
        result: json!(1),
    }])
    .await
    .unwrap();
    b.maintain(&queue).await.unwrap();
    assert_eq!(
        cli(&["XLEN", "ferry:{drop}:p1"]),
        "1",
        "the unrecorded completion's entry"
    );
    let info = b.job(dead).await.unwrap().unwrap();
    assert_eq!(
        (info.state, info.spec.payload),
        (JobState::Dead, json!({"n": 1}))
    );
    assert_eq!(
        b.job(unrecorded).await.unwrap().unwrap().state,
        JobState::Completed
    );
}
