//! The shared contract suite against the Redis Streams engine on a Redis Cluster (three masters, each case on
//! its own cluster), its queues spread over the default number of virtual shards.

use std::sync::Arc;

use ferry_broker::{
    Broker, ChannelHistory, DEFAULT_VSHARDS, EngineConfig, RedisBroker, RedisOptions,
};
use ferry_testkit::RedisCluster;

use crate::{contract, contract_suite};

struct Cluster {
    _cluster: RedisCluster,
    broker: Arc<RedisBroker>,
}

#[async_trait::async_trait]
impl contract::Engine for Cluster {
    const ONE_LOG: bool = false;

    async fn start(config: EngineConfig) -> Self {
        let cluster = RedisCluster::start(3, 0).expect("a Redis Cluster starts");
        let broker = RedisBroker::connect_cluster(
            &cluster.urls(),
            DEFAULT_VSHARDS,
            config,
            RedisOptions::default(),
        )
        .await
        .expect("connects");
        Self {
            _cluster: cluster,
            broker: Arc::new(broker),
        }
    }

    async fn start_with_history(config: EngineConfig, history: ChannelHistory) -> Self {
        let mut e = Self::start(config).await;
        let b = Arc::try_unwrap(e.broker).expect("not shared yet");
        e.broker = Arc::new(b.with_channel_history(history));
        e
    }

    fn broker(&self) -> Arc<dyn Broker> {
        self.broker.clone()
    }
}

contract_suite!(Cluster);

/// The virtual shards' tags spread evenly over three masters holding equal ranges of slots, as the server
/// itself hashes them.
#[test]
fn virtual_shards_spread_evenly_over_three_masters() {
    let mut cluster = RedisCluster::start(3, 0).expect("a Redis Cluster starts");
    let mut per_master = std::collections::HashMap::new();
    for tag in RedisBroker::vshard_tags(DEFAULT_VSHARDS) {
        let slot = cluster.slot_of(&format!("ferry:{{{tag}}}:events")).unwrap();
        assert_eq!(slot, cluster.slot_of(&tag).unwrap());
        *per_master
            .entry(cluster.master_of_slot(slot).unwrap())
            .or_insert(0) += 1;
    }
    let mut counts: Vec<usize> = per_master.into_values().collect();
    counts.sort_unstable();
    assert_eq!(counts, vec![5, 5, 6], "16 virtual shards over 3 masters");
}

/// Issue 15: a third of the slots move from one master to another while 20,000 jobs over 20 queues are enqueued
/// and worked: every accepted job completes, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reshard_under_load_loses_and_doubles_nothing() {
    use std::collections::{HashMap, HashSet};
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    use ferry_broker::{Completion, Jobs, Leasing};
    use ferry_core::{Kind, NewJob, QueueName};

    const QUEUES: usize = 20;
    const JOBS: usize = 20_000;
    const BATCH: usize = 100;
    let mut cluster = RedisCluster::start(3, 0).expect("a Redis Cluster starts");
    let config = EngineConfig {
        // No job is handed out twice by a lease running out: any double would be the reshard's.
        visibility_timeout: Duration::from_secs(120),
        event_stream_max: 100_000,
        ..contract::cfg()
    };
    let broker = Arc::new(
        RedisBroker::connect_cluster(
            &cluster.urls(),
            DEFAULT_VSHARDS,
            config,
            RedisOptions::default(),
        )
        .await
        .expect("connects"),
    );
    let queues: Vec<QueueName> = (0..QUEUES)
        .map(|i| QueueName::parse(format!("load-{i}")).unwrap())
        .collect();
    let accepted = Arc::new(Mutex::new(HashSet::new()));
    let enqueued = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let errors = Arc::new(std::sync::atomic::AtomicUsize::new(0));

    // The producer: batches round the queues, paced over about 12 s so that the reshard runs under load; a failed
    // batch is sent again, its idempotency keys make that safe.
    let producer = {
        let (b, queues, accepted, enqueued, errors) = (
            broker.clone(),
            queues.clone(),
            accepted.clone(),
            enqueued.clone(),
            errors.clone(),
        );
        tokio::spawn(async move {
            let mut pace = tokio::time::interval(Duration::from_millis(60));
            for n in 0..JOBS / BATCH {
                pace.tick().await;
                let q = &queues[n % QUEUES];
                let jobs = || -> Vec<NewJob> {
                    (0..BATCH)
                        .map(|i| NewJob {
                            idempotency_key: Some(format!("job-{}", n * BATCH + i)),
                            ..NewJob::new(Kind::parse("k").unwrap(), serde_json::json!(null))
                        })
                        .collect()
                };
                loop {
                    match b.enqueue_batch(q, jobs()).await {
                        Ok(out) => {
                            accepted.lock().unwrap().extend(out.iter().map(|e| e.id));
                            enqueued.fetch_add(BATCH, std::sync::atomic::Ordering::SeqCst);
                            break;
                        }
                        Err(_) => {
                            errors.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            }
        })
    };

    // Workers: claim from every queue in turn and complete; failed calls are tried again.
    let claims: Arc<Mutex<HashMap<ferry_core::JobId, usize>>> = Arc::default();
    let completed: Arc<Mutex<HashMap<ferry_core::JobId, usize>>> = Arc::default();
    let mut workers = Vec::new();
    for w in 0..4 {
        let (b, queues, claims, completed, errors) = (
            broker.clone(),
            queues.clone(),
            claims.clone(),
            completed.clone(),
            errors.clone(),
        );
        workers.push(tokio::spawn(async move {
            let consumer = format!("worker-{w}");
            let until = Instant::now() + Duration::from_secs(240);
            let mut turn = w;
            while completed.lock().unwrap().len() < JOBS && Instant::now() < until {
                turn += 1;
                let q = &queues[turn % QUEUES];
                let leased = match b.claim(q, &consumer, 50, Duration::from_millis(5)).await {
                    Ok(l) => l,
                    Err(_) => {
                        errors.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                for l in &leased {
                    *claims.lock().unwrap().entry(l.job.id).or_insert(0) += 1;
                }
                let items = || -> Vec<Completion> {
                    leased
                        .iter()
                        .map(|l| Completion {
                            lease: l.lease.clone(),
                            result: serde_json::json!(null),
                        })
                        .collect()
                };
                let results = loop {
                    match b.complete(items()).await {
                        Ok(r) => break r,
                        Err(_) => {
                            errors.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                };
                for (l, r) in leased.iter().zip(results) {
                    if r.is_ok() {
                        *completed.lock().unwrap().entry(l.job.id).or_insert(0) += 1;
                    }
                }
            }
        }));
    }

    // Once a quarter of the jobs are in, a third of the slots (one master's) move to another master.
    while enqueued.load(std::sync::atomic::Ordering::SeqCst) < JOBS / 4 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let nodes = cluster.topology().unwrap();
    let from = nodes.iter().find(|n| n.master).unwrap().clone();
    let to = nodes
        .iter()
        .find(|n| n.master && n.id != from.id)
        .unwrap()
        .clone();
    let moved = from.slots;
    let started = Instant::now();
    let before = completed.lock().unwrap().len();
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.reshard(&from.id, &to.id, moved).map(|()| cluster)
    })
    .await
    .unwrap()
    .expect("the reshard completes");
    let took = started.elapsed();
    let (enqueued_after, completed_after) = (
        enqueued.load(std::sync::atomic::Ordering::SeqCst),
        completed.lock().unwrap().len(),
    );
    assert!(
        completed_after - before >= JOBS / 4,
        "the reshard ran under load: {before}..{completed_after} completed meanwhile ({enqueued_after} enqueued)"
    );

    producer.await.unwrap();
    for w in workers {
        w.await.unwrap();
    }
    let accepted = accepted.lock().unwrap().clone();
    let claims = claims.lock().unwrap().clone();
    let completed = completed.lock().unwrap().clone();
    let twice: Vec<_> = claims.iter().filter(|(_, n)| **n > 1).collect();
    let done: HashSet<_> = completed.keys().copied().collect();
    eprintln!(
        "moved {moved} slots in {took:?}, while {before}..{completed_after} of {JOBS} jobs completed; \
         {} calls failed and were retried",
        errors.load(std::sync::atomic::Ordering::SeqCst)
    );
    assert_eq!(accepted.len(), JOBS, "every job accepted once");
    assert_eq!(done, accepted, "every accepted job completed");
    assert!(completed.values().all(|n| *n == 1), "none completed twice");
    assert!(twice.is_empty(), "{} jobs handed out twice", twice.len());
    drop(cluster);
}

/// Channels on every virtual shard reach their subscriber (sharded pub/sub routed by each shard's slot).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_on_every_shard_reach_their_subscriber() {
    use ferry_broker::PubSub;
    use futures::StreamExt;
    let e = <Cluster as contract::Engine>::start(contract::cfg()).await;
    let b = e.broker.clone();
    let mut feed = b.channels().await.unwrap();
    let names: Vec<String> = (0..48).map(|i| format!("room-{i}")).collect();
    let shards: std::collections::HashSet<_> =
        names.iter().filter_map(|n| b.channel_shard(n)).collect();
    assert!(
        shards.len() > 8,
        "the channels spread over the shards: {shards:?}"
    );
    for n in &names {
        feed.control().subscribe(n).await.unwrap();
    }
    for n in &names {
        b.publish(n, format!("\"{n}\"")).await.unwrap();
    }
    let mut got = std::collections::HashSet::new();
    while got.len() < names.len() {
        let m = tokio::time::timeout(std::time::Duration::from_secs(10), feed.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {} arrived: {got:?}", got.len(), names.len()))
            .unwrap();
        got.insert(m.channel);
    }
}

/// A Redis Cluster that speaks only TLS (clients, replication, cluster bus), reached through `rediss://` seeds and
/// a private CA: jobs run, and channel messages reach their subscriber through sharded pub/sub over TLS. A
/// client that does not trust the CA is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cluster_runs_jobs_and_channels() {
    use ferry_broker::{Completion, Jobs, Leasing, PubSub, RedisTls};
    use ferry_core::{Kind, NewJob, QueueName};
    use futures::StreamExt;

    let certs = ferry_testkit::TestCerts::generate().unwrap();
    let cluster = RedisCluster::start_tls(&certs, 3, 0).expect("a TLS Redis Cluster starts");
    let seeds = cluster.urls();
    assert!(
        seeds.iter().all(|u| u.starts_with("rediss://")),
        "{seeds:?}"
    );
    let tls = RedisTls {
        ca_pem: Some(certs.ca_pem().unwrap()),
    };
    let b = RedisBroker::connect_cluster_with_tls(
        &seeds,
        DEFAULT_VSHARDS,
        contract::cfg(),
        RedisOptions::default(),
        tls,
    )
    .await
    .expect("connects over TLS");
    let q = QueueName::parse("secure").unwrap();
    let id = b
        .enqueue(
            &q,
            NewJob::new(Kind::parse("k").unwrap(), serde_json::json!(1)),
        )
        .await
        .unwrap()
        .id;
    let leased = b
        .claim(&q, "w", 1, std::time::Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(leased[0].job.id, id);
    let done = b
        .complete(vec![Completion {
            lease: leased[0].lease.clone(),
            result: serde_json::json!(null),
        }])
        .await
        .unwrap();
    assert!(done[0].is_ok());

    let mut feed = b.channels().await.unwrap();
    feed.control().subscribe("room").await.unwrap();
    b.publish("room", "\"hi\"".into()).await.unwrap();
    let m = tokio::time::timeout(std::time::Duration::from_secs(10), feed.next())
        .await
        .expect("the message arrives")
        .unwrap();
    assert_eq!(m.payload, "\"hi\"");

    // Without the private CA, the system roots do not vouch for the nodes.
    let untrusted = RedisBroker::connect_cluster(
        &seeds,
        DEFAULT_VSHARDS,
        contract::cfg(),
        RedisOptions::default(),
    )
    .await;
    assert!(
        untrusted.is_err(),
        "a node the client cannot verify is refused"
    );
    drop(cluster);
}
