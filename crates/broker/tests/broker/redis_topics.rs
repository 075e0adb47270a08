//! The controllable job event feed on Redis ([`EventFeed::job_feed`]): a feed gets the events of the partitions and
//! queues it watches and nothing else, jobs enqueued by an older ferry (no partition in `m`) still reach it
//! through the legacy topic, [`EventFeed::subscribe`] still gets every event exactly once, and a reconnect watches
//! everything again.

use std::sync::Arc;
use std::time::Duration;

use ferry_broker::placement::partition_of;
use ferry_broker::{Completion, EngineConfig, FedEvent, RedisBroker, Topic, Via, prelude::*};
use ferry_core::{Event, EventType, JobId, Kind, NewJob, QueueName};
use ferry_testkit::RedisServer;
use futures::{Stream, StreamExt};
use serde_json::json;

fn q(s: &str) -> QueueName {
    QueueName::parse(s).unwrap()
}

fn job_of(owner: &str) -> NewJob {
    let mut j = NewJob::new(Kind::parse("ferry.noop").unwrap(), json!({"n": 1}));
    j.owner = Some(owner.into());
    j
}

async fn broker(server: &RedisServer) -> Arc<RedisBroker> {
    Arc::new(
        RedisBroker::connect(&[server.url()], EngineConfig::default())
            .await
            .unwrap(),
    )
}

/// Two subjects in different partitions.
fn two_subjects() -> (&'static str, &'static str, u16, u16) {
    let (a, b) = ("alice", "bob");
    let (pa, pb) = (partition_of(None, a), partition_of(None, b));
    assert_ne!(pa, pb, "pick subjects of different partitions");
    (a, b, pa, pb)
}

/// Items of `s` up to and including the first for which `last` holds (within 10 s).
async fn until<T>(s: &mut (impl Stream<Item = T> + Unpin), last: impl Fn(&T) -> bool) -> Vec<T> {
    let mut out = Vec::new();
    loop {
        let item = tokio::time::timeout(Duration::from_secs(10), s.next())
            .await
            .expect("the marker in time")
            .expect("stream open");
        let done = last(&item);
        out.push(item);
        if done {
            return out;
        }
    }
}

fn numsub(server: &RedisServer, channel: &str) -> u64 {
    let out = server.cli(&["PUBSUB", "NUMSUB", channel]).unwrap();
    out.lines().nth(1).unwrap().trim().parse().unwrap()
}

/// `PUBLISH` calls the server has run so far.
fn publishes(server: &RedisServer) -> u64 {
    let out = server.cli(&["INFO", "commandstats"]).unwrap();
    out.lines()
        .find_map(|l| l.strip_prefix("cmdstat_publish:calls="))
        .map(|rest| rest.split(',').next().unwrap().parse().unwrap())
        .unwrap_or(0)
}

/// A script publishes an event message only on a channel someone subscribes to (with a pattern subscriber on the
/// server, on every channel): the others were never received, and building them cost Redis the most per enqueue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_published_only_where_someone_listens() {
    let server = RedisServer::start().unwrap();
    let b = broker(&server).await;
    let (alice, bob, pa, _) = two_subjects();
    let mail = q("mail");
    // Nobody listens: the log has the events, no channel gets one.
    b.enqueue_batch(&mail, vec![job_of(alice), job_of(bob)])
        .await
        .unwrap();
    assert_eq!(publishes(&server), 0);
    let logged = b
        .read_log(0, "check", "c", 100, Duration::ZERO, None)
        .await
        .unwrap();
    assert_eq!(logged.iter().map(|e| e.events.len()).sum::<usize>(), 2);

    // Alice's partition is watched: her event is published there, bob's and the queue's are not.
    let (control, mut feed) = b.job_feed().await.unwrap().into_parts();
    control.watch(&Topic::Partition(pa)).await.unwrap();
    let mixed = b
        .enqueue_batch(&mail, vec![job_of(bob), job_of(alice)])
        .await
        .unwrap();
    let got = until(&mut feed, |e: &FedEvent| e.event.job == mixed[1].id).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(publishes(&server), 1);

    // A pattern subscriber (the all-events feed) hears everything: every channel is published again.
    let mut every = b.subscribe().await.unwrap();
    let last = b.enqueue(&mail, job_of(bob)).await.unwrap().id;
    let all = until(&mut every, |e: &Event| e.job == last).await;
    assert_eq!(all.len(), 1, "{all:?}");
    // Bob's partition and the queue.
    assert_eq!(publishes(&server), 3);
}

/// One call's jobs of partitions whose numbers start alike (5 and 57) are told apart: each partition's feed
/// gets its own job only. (A call of one partition is recognised by the first job's `"pt":N,` text.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_whose_numbers_start_alike_are_told_apart() {
    let server = RedisServer::start().unwrap();
    let b = broker(&server).await;
    // The first subject of each partition, then a short partition number that starts a longer one.
    let mut by_partition = std::collections::BTreeMap::new();
    for i in 0..100_000 {
        let s = format!("s{i}");
        by_partition.entry(partition_of(None, &s)).or_insert(s);
    }
    let (short, long) = by_partition
        .keys()
        .flat_map(|&a| by_partition.keys().map(move |&c| (a, c)))
        .find(|(a, c)| a != c && c.to_string().starts_with(&a.to_string()))
        .expect("two such partitions");
    let (control, mut short_feed) = b.job_feed().await.unwrap().into_parts();
    control.watch(&Topic::Partition(short)).await.unwrap();
    let (control2, mut long_feed) = b.job_feed().await.unwrap().into_parts();
    control2.watch(&Topic::Partition(long)).await.unwrap();
    let mail = q("mail");
    for order in [[short, long], [long, short]] {
        let jobs = order.map(|p| job_of(&by_partition[&p]));
        let ids = b.enqueue_batch(&mail, jobs.into()).await.unwrap();
        let (short_id, long_id) = if order[0] == short {
            (ids[0].id, ids[1].id)
        } else {
            (ids[1].id, ids[0].id)
        };
        // A marker job of each partition in a call of its own: whatever the feed was sent before it arrives first.
        let short_marker = b
            .enqueue(&mail, job_of(&by_partition[&short]))
            .await
            .unwrap()
            .id;
        let long_marker = b
            .enqueue(&mail, job_of(&by_partition[&long]))
            .await
            .unwrap()
            .id;
        for (feed, id, marker, p) in [
            (&mut short_feed, short_id, short_marker, short),
            (&mut long_feed, long_id, long_marker, long),
        ] {
            let got = until(feed, |e: &FedEvent| e.event.job == marker).await;
            let jobs: Vec<JobId> = got.iter().map(|e| e.event.job).collect();
            assert_eq!(jobs, [id, marker], "partition {p}, calls {order:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feed_gets_the_partitions_and_queues_it_watches_and_nothing_else() {
    let server = RedisServer::start().unwrap();
    let b = broker(&server).await;
    let (alice, bob, pa, pb) = two_subjects();
    let (mail, other) = (q("mail"), q("other"));
    let mut every = b.subscribe().await.unwrap();
    let (control, mut feed) = b.job_feed().await.unwrap().into_parts();
    control.watch(&Topic::Partition(pa)).await.unwrap();
    assert_eq!(numsub(&server, &format!("ferry:ev:p:{pa}")), 1);
    assert_eq!(numsub(&server, &format!("ferry:ev:p:{pb}")), 0);

    // One call with both owners' jobs (published per partition), then bob alone, then alice elsewhere as the
    // marker: pub/sub keeps publish order on a connection, so anything of bob's would come before it.
    let mixed = b
        .enqueue_batch(&mail, vec![job_of(alice), job_of(bob), job_of(alice)])
        .await
        .unwrap();
    b.enqueue(&mail, job_of(bob)).await.unwrap();
    let marker = b.enqueue(&other, job_of(alice)).await.unwrap().id;
    let got = until(&mut feed, |e: &FedEvent| e.event.job == marker).await;
    let jobs: Vec<JobId> = got.iter().map(|e| e.event.job).collect();
    assert_eq!(jobs, vec![mixed[0].id, mixed[2].id, marker], "{got:?}");
    assert!(got.iter().all(|e| e.via == Via::Owner));
    assert!(got.iter().all(|e| e.event.ty == EventType::Queued));
    assert!(got.iter().all(|e| e.event.owner.as_deref() == Some(alice)));
    // Ids stay `<sid>/<n>` of the call's one log entry: alice's two jobs are 0 and 2 of the mixed call.
    let ns: Vec<&str> = got[..2]
        .iter()
        .map(|e| e.event.id.rsplit('/').next().unwrap())
        .collect();
    assert_eq!(ns, ["0", "2"]);
    // ... the same ids as the durable log's.
    let log: Vec<(String, JobId)> = b
        .read_log(0, "check", "c", 100, Duration::ZERO, None)
        .await
        .unwrap()
        .into_iter()
        .flat_map(|e| e.events)
        .map(|e| (e.id, e.job))
        .collect();
    for e in &got {
        assert!(
            log.contains(&(e.event.id.clone(), e.event.job)),
            "{e:?} in {log:?}"
        );
    }

    // Every event still reaches `subscribe()`, each once.
    let all = until(&mut every, |e: &Event| e.job == marker).await;
    assert_eq!(all.len(), 5, "{all:?}");
    let mut ids: Vec<&str> = all.iter().map(|e| e.id.as_str()).collect();
    ids.dedup();
    assert_eq!(ids.len(), 5);

    // Swap the partition for a queue: the queue's events, all owners, marked for queue subscribers. Another
    // feed keeps alice's partition, to see her share of calls that mix both owners, results included.
    control.unwatch(&Topic::Partition(pa));
    control.watch(&Topic::Queue(mail.clone())).await.unwrap();
    assert_eq!(numsub(&server, &format!("ferry:ev:p:{pa}")), 0);
    assert_eq!(numsub(&server, "ferry:ev:q:{mail}"), 1);
    let (keep, mut partition_feed) = b.job_feed().await.unwrap().into_parts();
    keep.watch(&Topic::Partition(pa)).await.unwrap();
    b.enqueue(&other, job_of(alice)).await.unwrap();
    let leased = b.claim(&mail, "w", 10, Duration::ZERO).await.unwrap();
    assert_eq!(leased.len(), 4);
    b.complete(
        leased
            .iter()
            .map(|l| Completion {
                lease: l.lease.clone(),
                result: json!({"of": l.job.id}),
            })
            .collect(),
    )
    .await
    .unwrap();
    let last = leased[3].job.id;
    let got = until(&mut feed, |e: &FedEvent| {
        e.event.job == last && e.event.ty == EventType::Completed
    })
    .await;
    assert_eq!(got.len(), 8, "active and completed of 4 jobs: {got:?}");
    assert!(
        got.iter()
            .all(|e| e.via == Via::Queue && e.event.queue == mail)
    );

    // Alice's share: her two jobs' active and completed, each result with its own job, ids as in the log.
    let alices = [mixed[0].id, mixed[2].id];
    let got = until(&mut partition_feed, |e: &FedEvent| {
        e.event.job == alices[1] && e.event.ty == EventType::Completed
    })
    .await;
    // (Her job in the other queue, enqueued first, comes too: it is hers.)
    assert_eq!(got[0].event.queue, other);
    let got = &got[1..];
    let seen: Vec<(JobId, EventType)> = got.iter().map(|e| (e.event.job, e.event.ty)).collect();
    assert_eq!(
        seen,
        vec![
            (alices[0], EventType::Active),
            (alices[1], EventType::Active),
            (alices[0], EventType::Completed),
            (alices[1], EventType::Completed),
        ]
    );
    for e in got.iter().filter(|e| e.event.ty == EventType::Completed) {
        assert_eq!(e.event.data, Some(json!({"of": e.event.job})), "{e:?}");
    }
    let log: Vec<(String, JobId, EventType)> = b
        .read_log(0, "check2", "c", 100, Duration::ZERO, None)
        .await
        .unwrap()
        .into_iter()
        .flat_map(|e| e.events)
        .map(|e| (e.id, e.job, e.ty))
        .collect();
    for e in got {
        let key = (e.event.id.clone(), e.event.job, e.event.ty);
        assert!(log.contains(&key), "{key:?} in the log");
    }
}

/// Rewrite a queued job as an older ferry wrote it: the same entry fields with no `pt` in `m`.
fn make_legacy(server: &RedisServer, queue: &QueueName) {
    let key = format!("ferry:{{{queue}}}:p1");
    let out = server.cli(&["XRANGE", &key, "-", "+"]).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 11, "one entry of five fields: {out}");
    let eid = lines[0];
    let ms = eid.split('-').next().unwrap();
    assert_eq!(lines[3], "m");
    let m = lines[4];
    let start = m.find(",\"pt\":").expect("m carries pt");
    let end = start + 1 + m[start + 1..].find(',').unwrap();
    let old = format!("{}{}", &m[..start], &m[end..]);
    assert!(!old.contains("\"pt\""), "{old}");
    server.cli(&["XDEL", &key, eid]).unwrap();
    let mut args = vec!["XADD", &key];
    let id = format!("{ms}-*");
    args.push(&id);
    for (k, v) in lines[1..].chunks(2).map(|c| (c[0], c[1])) {
        args.push(k);
        args.push(if k == "m" { &old } else { v });
    }
    server.cli(&args).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_of_an_older_ferry_reach_feeds_through_the_legacy_topic() {
    let server = RedisServer::start().unwrap();
    let b = broker(&server).await;
    let (alice, _, pa, _) = two_subjects();
    let mail = q("legacy");
    let id = b.enqueue(&mail, job_of(alice)).await.unwrap().id;
    make_legacy(&server, &mail);
    assert_eq!(b.job(id).await.unwrap().unwrap().id, id, "still found");

    let mut every = b.subscribe().await.unwrap();
    let (legacy, mut legacy_feed) = b.job_feed().await.unwrap().into_parts();
    legacy.watch(&Topic::Legacy).await.unwrap();
    let (partition, mut partition_feed) = b.job_feed().await.unwrap().into_parts();
    partition.watch(&Topic::Partition(pa)).await.unwrap();

    let leased = b.claim(&mail, "w", 10, Duration::ZERO).await.unwrap();
    assert_eq!(leased.len(), 1);
    // The worker's lease renders `m` anew, with the partition: later events go to it.
    b.complete(vec![Completion {
        lease: leased[0].lease.clone(),
        result: json!(null),
    }])
    .await
    .unwrap();
    // A marker on the partition, after both.
    let marker = b.enqueue(&mail, job_of(alice)).await.unwrap().id;

    let got = until(&mut legacy_feed, |e: &FedEvent| e.event.job == id).await;
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].event.ty, got[0].via, got[0].event.owner.as_deref()),
        (EventType::Active, Via::Owner, Some(alice))
    );
    let got = until(&mut partition_feed, |e: &FedEvent| e.event.job == marker).await;
    let seen: Vec<(JobId, EventType)> = got.iter().map(|e| (e.event.job, e.event.ty)).collect();
    assert_eq!(
        seen,
        vec![(id, EventType::Completed), (marker, EventType::Queued)]
    );
    let all = until(&mut every, |e: &Event| e.job == marker).await;
    let seen: Vec<(JobId, EventType)> = all.iter().map(|e| (e.job, e.ty)).collect();
    assert_eq!(
        seen,
        vec![
            (id, EventType::Active),
            (id, EventType::Completed),
            (marker, EventType::Queued)
        ]
    );
    // Nothing of the legacy feed's after the claim: the later events carry the partition.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), legacy_feed.next())
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feed_watches_everything_again_after_a_restart() {
    let mut server = RedisServer::start().unwrap();
    let b = broker(&server).await;
    let (alice, bob, pa, _) = two_subjects();
    let (mine, theirs) = (q("mine"), q("theirs"));
    let (control, mut feed) = b.job_feed().await.unwrap().into_parts();
    control.watch(&Topic::Partition(pa)).await.unwrap();
    control.watch(&Topic::Queue(theirs.clone())).await.unwrap();
    server.restart().unwrap();

    // Until the feed has reconnected, enqueues may fail or go unheard: retry until one is heard.
    async fn heard(
        b: &RedisBroker,
        feed: &mut ferry_broker::FedEventStream,
        queue: &QueueName,
        owner: &str,
        via: Via,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while tokio::time::Instant::now() < deadline {
            let Ok(e) = b.enqueue(queue, job_of(owner)).await else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            let until = tokio::time::Instant::now() + Duration::from_millis(500);
            while let Ok(Some(f)) = tokio::time::timeout_at(until, feed.next()).await {
                if f.event.job == e.id && f.via == via {
                    return true;
                }
            }
        }
        false
    }
    assert!(heard(&b, &mut feed, &mine, alice, Via::Owner).await);
    assert!(heard(&b, &mut feed, &theirs, bob, Via::Queue).await);
    assert_eq!(numsub(&server, &format!("ferry:ev:p:{pa}")), 1);
    assert_eq!(numsub(&server, "ferry:ev:q:{theirs}"), 1);
}
