//! The Redis Streams engine.
//!
//! Design, chosen for Redis CPU per job (the single Redis thread is the bottleneck):
//! * a job is one stream entry (its payload lives there) in one of three priority streams; workers read them
//!   through the consumer group `workers`;
//! * the lease **is** the pending entry: claiming is XREADGROUP inside one script per batch, and every fenced
//!   transition acknowledges the entry first — XACK answers 1 only while the entry is still pending, so a worker
//!   whose job was reclaimed, released or cancelled (each of which acknowledges atomically) is rejected;
//!   heartbeats are one `XCLAIM … JUSTID` per batch, which resets the idle time of entries still pending;
//! * one script per batch for enqueue, claim, complete and fail; the batch's events are packed into ONE entry of
//!   the per-shard event stream and published once;
//! * acknowledged entries are trimmed periodically by MINID, below both the oldest pending and the first
//!   undelivered entry, once older than the finished-job retention; a completed job's record points into its
//!   entry until then.
//!
//! Job events ([`EventFeed::subscribe`]): see [`events`]. Application channels ([`PubSub::publish`],
//! [`PubSub::channels`]): see [`pubsub`].
//!
//! Keys: see [`keys`]; record forms: `lua/prelude.lua`. Queues are placed on shards by [`ShardRing`]: standalone
//! Redis shards, or the virtual shards of a Redis Cluster ([`RedisBroker::connect_cluster`]), whose tags keep
//! every key a script touches in one slot (see `keys.rs` and `slots.rs`; pub/sub: `cluster_feed.rs`).

mod abandon;
mod cluster_feed;
mod coalesce;
mod codec;
mod conn;
mod events;
mod history;
mod keys;
mod log;
mod members;
mod pubsub;
mod refusal;
mod scripts;
mod slots;
mod subscriber;
mod topics;

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use ferry_core::{
    Event, JobId, JobInfo, JobState, Limits, NewJob, QueueName, Redactor, ValidationError, now_ms,
    redact_url,
};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::{AsyncConnectionConfig, Client, TlsCertificates, Value};

use self::abandon::{Abandoned, Abandons};
use self::codec::{Fields, Record, array, bad, int, text};
use self::conn::{Conn, Link};
use self::keys::{GROUP, Layout, QueueKeys};
use self::scripts::{
    Call, Cancel, CompleteClaim, CompleteJob, Enqueue, EnqueueJob, Fail, FailJob, HistoryReach,
    Loaded, Maintain, Progress, Promote, Publish, Reclaim, Release, ReleaseJob, Restore,
    RestoreJob, RetryDead, Scripts, Stats,
};
use crate::prelude::*;
use crate::{
    BrokerError, CancelOutcome, ChannelFeed, ChannelHistory, Completion, EngineConfig, Enqueued,
    EventFilter, EventScope, EventStream, FailOutcome, Failure, HistoryEntry, JobFeed, Lease,
    Leased, LogEntry, LogPosition, Missed, QueueStats, Reclaimed, Rejected, RetryOutcome,
    ShardRing, StreamPos,
};

/// Most jobs sent to one script call; bigger batches are split so one call never holds Redis for long.
const SCRIPT_CHUNK: usize = 500;

/// Jobs (or entries) one maintain.lua call handles per step, so one call holds Redis for a few milliseconds.
const MAINTAIN_BATCH: usize = 1000;
/// Calls of maintain.lua per [`Housekeeping::maintain`] while recorded jobs are left to drop: up to 200,000
/// jobs per pass (every 5 s on each worker by default).
const MAINTAIN_ROUNDS: usize = 200;

/// How often a claim waiting on a paused queue looks again.
const PAUSED_POLL: Duration = Duration::from_millis(250);

/// Connection settings of the Redis engine.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// Longest wait for any reply (blocking reads excepted). The redis crate's default of 500 ms is too short
    /// for a large batch script on a busy server.
    pub response_timeout: Duration,
    pub connection_timeout: Duration,
    /// `Some(n)`: the URLs are seeds of one Redis Cluster, whose queues are spread over `n` virtual shards
    /// ([`RedisBroker::connect_cluster`]); `None`: each URL is a standalone shard.
    pub cluster_vshards: Option<usize>,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            response_timeout: Duration::from_secs(5),
            connection_timeout: Duration::from_secs(2),
            cluster_vshards: None,
        }
    }
}

/// TLS of `rediss://` shards (plain `redis://` ones ignore it). The server certificate is always verified,
/// hostname included: against the system trust store by default, or against `ca_pem` alone when it is set.
#[derive(Clone, Default)]
pub struct RedisTls {
    /// CA certificates (PEM) to trust instead of the system's roots, e.g. a private CA's.
    pub ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for RedisTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTls")
            .field(
                "roots",
                &match &self.ca_pem {
                    Some(_) => "ca_pem",
                    None => "system",
                },
            )
            .finish()
    }
}

/// A client for one shard URL: `rediss://` with `tls.ca_pem` trusts that CA alone; other `rediss://` URLs
/// trust the system roots (the redis crate's default). Every connection of the shard (commands, blocking
/// reads, pub/sub) is made from this client, so all of them use TLS.
fn open_client(url: &str, tls: &RedisTls) -> redis::RedisResult<Client> {
    match &tls.ca_pem {
        Some(ca) if url.starts_with("rediss://") => Client::build_with_tls(
            url,
            TlsCertificates {
                client_tls: None,
                root_cert: Some(ca.clone()),
            },
        ),
        _ => Client::open(url),
    }
}

/// The CA must hold at least one readable PEM certificate: the redis crate would silently trust nothing and
/// every connection would then fail with an unknown-issuer error far from the cause.
fn check_ca_pem(ca: &[u8]) -> Result<(), BrokerError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(ca).collect();
    match certs {
        Ok(c) if !c.is_empty() => Ok(()),
        Ok(_) => Err(ValidationError::field(
            "redis-ca",
            "the CA certificate holds no PEM certificate",
        )
        .into()),
        Err(e) => Err(ValidationError::field(
            "redis-ca",
            format!("unreadable CA certificate: {e}"),
        )
        .into()),
    }
}

/// The shard's identity on the ring: its URL without credentials, and without TLS (`rediss://` counts as
/// `redis://`), so rotating a password or turning TLS on for a server does not move its queues.
///
/// Not [`redact_url`]: this is an identity, and must stay byte for byte what every earlier ferry computed, or
/// queues would move to other shards on upgrade. It is the display form ferry used before `redact_url` existed:
/// everything up to the first `@` became `scheme://***`.
fn ring_id(url: &str) -> String {
    let id = match url.split_once('@') {
        Some((scheme_creds, host)) => {
            let scheme = scheme_creds.split("://").next().unwrap_or("redis");
            format!("{scheme}://***@{host}")
        }
        None => url.to_owned(),
    };
    match id.strip_prefix("rediss://") {
        Some(rest) => format!("redis://{rest}"),
        None => id,
    }
}

struct Shard {
    /// The URL with its credentials redacted ([`redact_url`]), for messages.
    name: String,
    /// Scrubs the URL's password from driver messages.
    redactor: Redactor,
    /// Where the shard's own connections (blocking reads, pub/sub) are made.
    endpoint: Endpoint,
    /// Commands and scripts; replaced after a reply times out (see [`conn`]).
    conn: Conn,
    /// Claim calls given up before their reply was read, to be handed back (see [`abandon`]).
    abandons: Arc<Abandons>,
    /// Connections for blocking reads, kept apart from `conn`: a BLOCK on a multiplexed connection would stall
    /// every command queued behind it. Each is used by one waiter at a time and returned afterwards.
    blocking: Mutex<Vec<Link>>,
    /// Consumer groups of the event log known to exist on this shard.
    log_groups: Mutex<HashSet<String>>,
    /// The names of the shard's keys and channels.
    layout: Layout,
}

impl Shard {
    /// A connection for one blocking read: from the pool, or new. On a Redis Cluster it is a cluster connection
    /// of its own, so a BLOCK stalls nothing else; it routes the read to the master of the shard's slot.
    async fn blocking_conn(&self) -> Result<Link, BrokerError> {
        let pooled = self.blocking.lock().map(|mut p| p.pop()).unwrap_or(None);
        if let Some(c) = pooled {
            return Ok(c);
        }
        match &self.endpoint {
            Endpoint::Single(client) => client
                .get_multiplexed_async_connection_with_config(
                    // No response timeout of its own: the BLOCK bounds the wait, the caller's timeout guards it.
                    &AsyncConnectionConfig::new()
                        .set_response_timeout(None)
                        .set_connection_timeout(Some(Duration::from_secs(2))),
                )
                .await
                .map(Link::Plain)
                .map_err(redis_err),
            Endpoint::Cluster { blocking, .. } => blocking
                .get_async_connection()
                .await
                .map(Link::Cluster)
                .map_err(redis_err),
        }
    }

    /// The client of a standalone shard, for its pub/sub feeds; the feeds of a Redis Cluster are not built yet.
    fn feed_client(&self) -> Result<Client, BrokerError> {
        match &self.endpoint {
            Endpoint::Single(client) => Ok(Client::clone(client)),
            Endpoint::Cluster { .. } => Err(BrokerError::Unavailable(
                "pub/sub feeds on a Redis Cluster (sharded pub/sub) are not built yet".into(),
            )),
        }
    }

    /// Give back a connection whose blocking read completed (one that timed out is dropped instead: its
    /// reply may still be on the way).
    fn return_blocking(&self, conn: Link) {
        if let Ok(mut pool) = self.blocking.lock()
            && pool.len() < 64
        {
            pool.push(conn);
        }
    }
}

/// Where a shard's own connections come from.
enum Endpoint {
    /// A standalone Redis (boxed: a client is large next to the cluster variant's pointer).
    Single(Box<Client>),
    /// A virtual shard of a Redis Cluster: blocking reads get a cluster connection of their own, from a client
    /// without a response timeout (the BLOCK bounds the wait).
    Cluster { blocking: Arc<ClusterClient> },
}

/// How many virtual shards a Redis Cluster's queues are spread over unless told otherwise: with three masters
/// holding equal ranges of slots, five or six each.
pub const DEFAULT_VSHARDS: usize = 16;

/// Redis Streams broker over one or more standalone Redis shards, or over the virtual shards of a Redis Cluster
/// ([`RedisBroker::connect_cluster`]; see `slots.rs`).
pub struct RedisBroker {
    shards: Vec<Shard>,
    ring: ShardRing,
    config: EngineConfig,
    /// Shared with each shard's [`Abandons`].
    scripts: Arc<Scripts>,
    /// Application channel history and the recovery horizon (see [`history`]).
    history: ChannelHistory,
    /// Each shard's epoch as last read (see [`history`]).
    epochs: Arc<history::Epochs>,
    /// On a Redis Cluster: where its pub/sub feeds connect, and the tags of the virtual shards.
    cluster: Option<(cluster_feed::Seeds, Vec<String>)>,
    /// Concurrent single enqueues to one queue share a script call (see `coalesce.rs`).
    coalescer: Arc<coalesce::Coalescer>,
}

impl std::fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBroker")
            .field(
                "shards",
                &self.shards.iter().map(|s| &s.name).collect::<Vec<_>>(),
            )
            .field("config", &self.config)
            .finish()
    }
}

fn redis_err(e: redis::RedisError) -> BrokerError {
    // A refusal (OOM, MISCONF, a password…) lasts until an operator acts, and the message says how.
    if let Some(m) = refusal::explain(None, &e.to_string()) {
        return BrokerError::Unavailable(m);
    }
    let transient = e.is_io_error()
        || e.is_connection_dropped()
        || e.is_timeout()
        || e.is_connection_refusal()
        || e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::BusyLoading);
    if transient {
        BrokerError::Unavailable(e.to_string())
    } else {
        BrokerError::Internal(e.to_string())
    }
}

/// A failed connect or first PING to the shard `name`: unavailable, with the refusal named when Redis refused
/// the client ([`refusal::diagnose`]: protected mode, a missing or wrong password, …). The driver's text goes
/// through `redactor` (the shard URL's password), like every message that may quote it.
async fn refused(
    client: &Client,
    name: &str,
    redactor: &Redactor,
    e: redis::RedisError,
) -> BrokerError {
    let text = redactor.apply(&e.to_string());
    BrokerError::Unavailable(
        refusal::diagnose(client, name, &text)
            .await
            .unwrap_or_else(|| format!("{name}: {text}")),
    )
}

impl RedisBroker {
    /// Connect to every shard (`redis://host:port[/db]`, or `rediss://` for TLS verified against the system
    /// roots; see [`connect_with_tls`](Self::connect_with_tls) for a private CA) and check each answers.
    pub async fn connect(urls: &[String], config: EngineConfig) -> Result<Self, BrokerError> {
        Self::connect_with(urls, config, RedisOptions::default()).await
    }

    pub async fn connect_with(
        urls: &[String],
        config: EngineConfig,
        options: RedisOptions,
    ) -> Result<Self, BrokerError> {
        Self::connect_with_tls(urls, config, options, RedisTls::default()).await
    }

    /// [`connect_with`](Self::connect_with) with the TLS settings of `rediss://` shards.
    pub async fn connect_with_tls(
        urls: &[String],
        config: EngineConfig,
        options: RedisOptions,
        tls: RedisTls,
    ) -> Result<Self, BrokerError> {
        if urls.is_empty() {
            return Err(
                ValidationError::field("redis", "at least one Redis URL is required").into(),
            );
        }
        if let Some(ca) = &tls.ca_pem {
            check_ca_pem(ca)?;
        }
        if let Some(vshards) = options.cluster_vshards {
            return Self::connect_cluster_with_tls(urls, vshards, config, options, tls).await;
        }
        let scripts = Arc::new(Scripts::new());
        let mut shards = Vec::with_capacity(urls.len());
        for (i, url) in urls.iter().enumerate() {
            let name = redact_url(url);
            let redactor = Redactor::for_url(url);
            let client = open_client(url, &tls).map_err(|e| {
                let what = if tls.ca_pem.is_some() && url.starts_with("rediss://") {
                    "invalid Redis URL or CA certificate for"
                } else {
                    "invalid Redis URL"
                };
                let e = redactor.apply(&e.to_string());
                ValidationError::field(format!("redis[{i}]"), format!("{what} {name}: {e}"))
            })?;
            let cm_config = ConnectionManagerConfig::new()
                .set_response_timeout(Some(options.response_timeout))
                .set_connection_timeout(Some(options.connection_timeout))
                .set_number_of_retries(3)
                .set_max_delay(Duration::from_secs(2));
            let first =
                match ConnectionManager::new_with_config(client.clone(), cm_config.clone()).await {
                    Ok(conn) => conn,
                    Err(e) => return Err(refused(&client, &name, &redactor, e).await),
                };
            let conn = Conn::new(name.clone(), client.clone(), cm_config, first);
            let layout = Layout::standalone();
            let abandons = Abandons::new(
                name.clone(),
                conn.clone(),
                layout.clone(),
                scripts.clone(),
                config.event_stream_max,
            );
            shards.push(Shard {
                name,
                redactor,
                endpoint: Endpoint::Single(Box::new(client)),
                conn,
                abandons,
                blocking: Mutex::new(Vec::new()),
                log_groups: Mutex::new(HashSet::new()),
                layout,
            });
        }
        // Shards are identified by their URL without credentials (nor TLS): reordering the list, rotating a
        // password or turning TLS on does not move queues.
        let ids: Vec<String> = urls.iter().map(|u| ring_id(u)).collect();
        let ring = ShardRing::with_ids(&ids);
        let epochs = Arc::new(history::Epochs::new(shards.len()));
        let broker = Self {
            shards,
            ring,
            config,
            scripts,
            history: ChannelHistory::default(),
            epochs,
            cluster: None,
            coalescer: Default::default(),
        };
        for shard in &broker.shards {
            if let Err(e) = redis::cmd("PING")
                .query_async::<String>(&mut shard.conn.clone())
                .await
            {
                return Err(match &shard.endpoint {
                    Endpoint::Single(client) => {
                        refused(client, &shard.name, &shard.redactor, e).await
                    }
                    Endpoint::Cluster { .. } => BrokerError::Unavailable(format!(
                        "{}: {}",
                        shard.name,
                        shard.redactor.apply(&e.to_string())
                    )),
                });
            }
        }
        Ok(broker)
    }

    /// The tags of `n` virtual shards of a Redis Cluster, in ring order: a queue's keys carry the tag of the
    /// virtual shard the ring picks for it (`ferry:{<tag>}:{<queue>}:…`), and `CLUSTER KEYSLOT <tag>` says where
    /// they live.
    pub fn vshard_tags(n: usize) -> Vec<String> {
        slots::vshard_tags(n)
    }

    /// Connect to a Redis Cluster through `seeds` (any of its nodes, `redis://host:port`), with its queues spread
    /// over `vshards` virtual shards ([`DEFAULT_VSHARDS`]), each pinned to one slot by its tag (see `slots.rs`).
    /// The first ferry to use the cluster records `vshards` in it; a later one with another count is refused,
    /// since the count decides where every queue lives.
    pub async fn connect_cluster(
        seeds: &[String],
        vshards: usize,
        config: EngineConfig,
        options: RedisOptions,
    ) -> Result<Self, BrokerError> {
        Self::connect_cluster_with_tls(seeds, vshards, config, options, RedisTls::default()).await
    }

    /// [`connect_cluster`](Self::connect_cluster) with the TLS settings of `rediss://` seeds (every node is then
    /// reached over TLS, verified against `tls.ca_pem` or the system roots).
    pub async fn connect_cluster_with_tls(
        seeds: &[String],
        vshards: usize,
        config: EngineConfig,
        options: RedisOptions,
        tls: RedisTls,
    ) -> Result<Self, BrokerError> {
        if seeds.is_empty() {
            return Err(ValidationError::field(
                "redis-cluster",
                "at least one node URL of the Redis Cluster is required",
            )
            .into());
        }
        let tls_seeds = seeds.iter().filter(|u| u.starts_with("rediss://")).count();
        if tls_seeds != 0 && tls_seeds != seeds.len() {
            return Err(ValidationError::field(
                "redis-cluster",
                "either every node URL is rediss:// (TLS) or none is",
            )
            .into());
        }
        let ca = tls.ca_pem.clone().filter(|_| tls_seeds > 0);
        if !(1..=usize::from(slots::SLOTS)).contains(&vshards) {
            return Err(ValidationError::field(
                "redis-cluster-vshards",
                format!("must be between 1 and {}, not {vshards}", slots::SLOTS),
            )
            .into());
        }
        let redactor = seeds.iter().fold(Redactor::new(), |r, url| r.url(url));
        let name = format!(
            "Redis Cluster {}",
            seeds
                .iter()
                .map(|u| redact_url(u))
                .collect::<Vec<_>>()
                .join(",")
        );
        let builder = || {
            let b = ClusterClientBuilder::new(seeds.to_vec())
                .connection_timeout(options.connection_timeout)
                .retries(3);
            match &ca {
                Some(ca) => b.certs(TlsCertificates {
                    client_tls: None,
                    root_cert: Some(ca.clone()),
                }),
                None => b,
            }
        };
        let invalid = |e: redis::RedisError| {
            BrokerError::from(ValidationError::field(
                "redis-cluster",
                format!(
                    "invalid Redis Cluster URL: {}",
                    redactor.apply(&e.to_string())
                ),
            ))
        };
        let client = builder()
            .response_timeout(options.response_timeout)
            .build()
            .map_err(invalid)?;
        let blocking = Arc::new(builder().build().map_err(invalid)?);
        let first = client.get_async_connection().await.map_err(|e| {
            BrokerError::Unavailable(format!("{name}: {}", redactor.apply(&e.to_string())))
        })?;
        let conn = Conn::cluster(name.clone(), client, first);
        let scripts = Arc::new(Scripts::new());
        let tags = slots::vshard_tags(vshards);
        let shards = tags
            .iter()
            .map(|tag| {
                let layout = Layout::tagged(tag);
                let shard = format!("{name} {{{tag}}}");
                Shard {
                    abandons: Abandons::new(
                        shard.clone(),
                        conn.clone(),
                        layout.clone(),
                        scripts.clone(),
                        config.event_stream_max,
                    ),
                    name: shard,
                    redactor: redactor.clone(),
                    endpoint: Endpoint::Cluster {
                        blocking: blocking.clone(),
                    },
                    conn: conn.clone(),
                    blocking: Mutex::new(Vec::new()),
                    log_groups: Mutex::new(HashSet::new()),
                    layout,
                }
            })
            .collect::<Vec<_>>();
        // The count of virtual shards decides where every queue lives: recorded by the first ferry, checked by
        // every later one.
        let recorded: Option<usize> = redis::cmd("SET")
            .arg(format!("{}vshards", shards[0].layout.prefix()))
            .arg(vshards)
            .arg("NX")
            .arg("GET")
            .query_async(&mut conn.clone())
            .await
            .map_err(|e| {
                BrokerError::Unavailable(format!("{name}: {}", redactor.apply(&e.to_string())))
            })?;
        if let Some(n) = recorded.filter(|n| *n != vshards) {
            return Err(ValidationError::field(
                "redis-cluster-vshards",
                format!(
                    "this Redis Cluster holds ferry's queues laid out over {n} virtual shards, not {vshards}: \
                     start every ferry on it with {n}"
                ),
            )
            .into());
        }
        let epochs = Arc::new(history::Epochs::new(shards.len()));
        let seeds = cluster_feed::Seeds {
            name,
            urls: seeds.to_vec(),
            connection_timeout: options.connection_timeout,
            ca,
        };
        Ok(Self {
            shards,
            ring: ShardRing::with_ids(&tags),
            config,
            scripts,
            history: ChannelHistory::default(),
            epochs,
            cluster: Some((seeds, tags)),
            coalescer: Default::default(),
        })
    }

    /// The same broker with application channel history `history` (`--history-size`, `--history-ttl-ms`).
    pub fn with_channel_history(mut self, history: ChannelHistory) -> Self {
        self.history = ChannelHistory {
            size: history.size.max(1),
            ttl: history.ttl.max(Duration::from_millis(1)),
        };
        self
    }

    /// Read a history stream of shard `shard`: `max + 1` entries after `since` (so a cut read shows), then
    /// `lua/missed.lua`. Returns (entries, what the script said).
    async fn read_missed(
        &self,
        shard: usize,
        stream: &str,
        since: &StreamPos,
        max: usize,
    ) -> Result<(Value, Value), BrokerError> {
        let sh = &self.shards[shard];
        // A position that is no stream id is not recovered (see `reaches_back`); read from the start to learn
        // the epoch all the same.
        let from = match crate::parse_offset(&since.offset) {
            Some(_) => since.offset.as_str(),
            None => "0-0",
        };
        let mut pipe = redis::pipe();
        pipe.cmd("XRANGE")
            .arg(stream)
            .arg(format!("({from}"))
            .arg("+")
            .arg("COUNT")
            .arg(max.saturating_add(1));
        HistoryReach {
            stream_key: stream,
            epoch_key: sh.layout.epoch(),
            fresh_epoch: &history::fresh_epoch(),
        }
        .eval_in(&mut pipe);
        pipe.query_async(&mut sh.conn.clone())
            .await
            .map_err(redis_err)
    }

    fn shard(&self, queue: &QueueName) -> &Shard {
        &self.shards[self.ring.shard_for(queue.as_str())]
    }

    /// The keys of `queue` on its shard.
    fn keys(&self, queue: &QueueName) -> QueueKeys {
        self.shard(queue).layout.queue(queue)
    }

    fn conn(&self, queue: &QueueName) -> Conn {
        self.shard(queue).conn.clone()
    }

    fn evmax(&self) -> usize {
        self.config.event_stream_max
    }

    /// The scripts' `drop_recorded` argument.
    fn drop_recorded(&self) -> &'static str {
        if self.config.drop_recorded { "1" } else { "0" }
    }

    /// Wait until one of the streams gets an entry newer than `after`, or `wait` passes. Read-only: the caller
    /// claims afterwards through the claim script, so the wake-up needs no bookkeeping.
    async fn block_until_new(
        &self,
        shard: &Shard,
        streams: &[String; 3],
        after: &[String],
        wait: Duration,
    ) -> Result<(), BrokerError> {
        let mut conn = shard.blocking_conn().await?;
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT")
            .arg(1)
            .arg("BLOCK")
            .arg(wait.as_millis().max(1) as u64)
            .arg("STREAMS");
        cmd.arg(&streams[..]).arg(after);
        let r: Result<redis::RedisResult<Value>, _> =
            tokio::time::timeout(wait + Duration::from_secs(2), cmd.query_async(&mut conn)).await;
        match r {
            Ok(Ok(_)) => {
                shard.return_blocking(conn);
                Ok(())
            }
            Ok(Err(e)) => Err(redis_err(e)),
            Err(_) => Err(BrokerError::Unavailable(format!(
                "{}: blocking read timed out",
                shard.name
            ))),
        }
    }

    /// Find the queue (and shard) holding a job id: every queue of every shard is asked in one pipeline per
    /// shard. Lookups by id are rare next to the job cycle, so no global per-job index is paid for on the hot
    /// path. A job that has had no transition since it was enqueued has no record either: its id carries the
    /// millisecond of its stream entry, so the entries of that millisecond are read instead.
    async fn locate(&self, id: JobId) -> Result<Option<(QueueName, Record)>, BrokerError> {
        let field = id.to_string();
        let ms = codec::id_ms_of(id);
        let (from, to) = (format!("{ms}-0"), format!("{ms}-{}", u64::MAX));
        for shard in &self.shards {
            let mut conn = shard.conn.clone();
            let names: Vec<String> = redis::cmd("SMEMBERS")
                .arg(shard.layout.queues())
                .query_async(&mut conn)
                .await
                .map_err(redis_err)?;
            let queues: Vec<QueueName> = names
                .into_iter()
                .filter_map(|n| QueueName::parse(n).ok())
                .collect();
            if queues.is_empty() {
                continue;
            }
            let mut pipe = redis::pipe();
            for q in &queues {
                let keys = self.keys(q);
                pipe.cmd("HGET").arg(&keys.jobs).arg(&field);
                for stream in &keys.streams {
                    pipe.cmd("XRANGE").arg(stream).arg(&from).arg(&to);
                }
            }
            let replies: Vec<Value> = pipe.query_async(&mut conn).await.map_err(redis_err)?;
            let mut in_entry = None;
            for (q, r) in queues.into_iter().zip(replies.chunks(4)) {
                if let Value::BulkString(_) | Value::SimpleString(_) = &r[0] {
                    return Ok(Some((q, Record::parse(&text(&r[0])?)?)));
                }
                for (p, entries) in r[1..].iter().enumerate() {
                    for e in array(entries)? {
                        let (eid, f) = Fields::from_entry(e)?;
                        if f.id == field && in_entry.is_none() {
                            in_entry = Some((q.clone(), Record::Queued { p, eid }));
                        }
                    }
                }
            }
            if in_entry.is_some() {
                return Ok(in_entry);
            }
        }
        Ok(None)
    }

    async fn entry(
        &self,
        conn: &mut Conn,
        key: &str,
        eid: &str,
    ) -> Result<Option<Fields>, BrokerError> {
        let v: Value = redis::cmd("XRANGE")
            .arg(key)
            .arg(eid)
            .arg(eid)
            .query_async(conn)
            .await
            .map_err(redis_err)?;
        match array(&v)?.first() {
            Some(e) => Ok(Some(Fields::from_entry(e)?.1)),
            None => Ok(None),
        }
    }

    async fn info(
        &self,
        queue: &QueueName,
        record: Record,
    ) -> Result<Option<JobInfo>, BrokerError> {
        let keys = self.keys(queue);
        let mut conn = self.conn(queue);
        Ok(Some(match record {
            Record::Queued { p, eid } => {
                let key = &keys.streams[p.min(2)];
                let Some(f) = self.entry(&mut conn, key, &eid).await? else {
                    return Ok(None);
                };
                let pending: Value = redis::cmd("XPENDING")
                    .arg(key)
                    .arg(GROUP)
                    .arg(&eid)
                    .arg(&eid)
                    .arg(1)
                    .query_async(&mut conn)
                    .await
                    .map_err(redis_err)?;
                let active = !array(&pending)?.is_empty();
                let (state, attempts) = if active {
                    (JobState::Active, f.attempts() + 1)
                } else {
                    (JobState::Queued, f.attempts())
                };
                f.info(queue, state, attempts, codec::id_ms(&eid))?
            }
            Record::Waiting {
                retrying,
                run_at,
                attempts,
                pack,
                error,
            } => {
                let f = codec::unpack(&pack)?;
                let state = if retrying {
                    JobState::Retrying
                } else {
                    JobState::Scheduled
                };
                let mut info = f.info(queue, state, attempts, codec::id_ms(&f.id))?;
                info.updated_at = info
                    .spec
                    .created_at
                    .max(run_at.saturating_sub(1))
                    .min(now_ms());
                info.run_at = Some(run_at);
                info.error = error;
                info
            }
            Record::Completed {
                at,
                attempts,
                p,
                eid,
                result,
            } => {
                let Some(f) = self.entry(&mut conn, &keys.streams[p.min(2)], &eid).await? else {
                    return Ok(None);
                };
                let mut info = f.info(queue, JobState::Completed, attempts, at)?;
                info.result = Some(result);
                info
            }
            Record::Cancelled { at, attempts, pack } => {
                codec::unpack(&pack)?.info(queue, JobState::Cancelled, attempts, at)?
            }
            Record::Dead {
                at,
                attempts,
                eid,
                error,
            } => {
                let Some(f) = self.entry(&mut conn, &keys.dead, &eid).await? else {
                    return Ok(None);
                };
                let mut info = f.info(queue, JobState::Dead, attempts, at)?;
                info.error = Some(error);
                info
            }
        }))
    }

    async fn enqueue_chunk(
        &self,
        queue: &QueueName,
        jobs: Vec<NewJob>,
    ) -> Result<Vec<Enqueued>, BrokerError> {
        let replies = self.enqueue_call(queue).run(jobs).await?;
        let mut out = Vec::with_capacity(replies.len());
        for r in replies {
            out.push(self.enqueued(r).await?);
        }
        Ok(out)
    }

    /// One queue's enqueue call, owning what it needs (so the coalescer's task can run it).
    fn enqueue_call(&self, queue: &QueueName) -> EnqueueCall {
        let shard = self.shard(queue);
        EnqueueCall {
            scripts: self.scripts.clone(),
            conn: shard.conn.clone(),
            keys: shard.layout.queue(queue),
            events_key: shard.layout.events().to_owned(),
            queues_key: shard.layout.queues().to_owned(),
            queue: queue.clone(),
            evmax: self.evmax(),
            idem_ttl_ms: self.config.idempotency_ttl.as_millis() as u64,
        }
    }

    /// A job's answer: a duplicate (its idempotency key matched an earlier job) reports that job's state now.
    async fn enqueued(&self, r: EnqueueReply) -> Result<Enqueued, BrokerError> {
        if !r.duplicate {
            return Ok(Enqueued {
                id: r.id,
                state: r.state,
                duplicate: false,
            });
        }
        let state = match self.locate(r.id).await? {
            Some((q, rec)) => self
                .info(&q, rec)
                .await?
                .map(|i| i.state)
                .unwrap_or(r.state),
            None => r.state,
        };
        Ok(Enqueued {
            id: r.id,
            state,
            duplicate: true,
        })
    }
}

/// What the enqueue script answered for one job.
#[derive(Debug)]
struct EnqueueReply {
    id: JobId,
    /// The state the job was enqueued in (for a duplicate: the state this call would have given it).
    state: JobState,
    /// An idempotency key matched an earlier job: `id` is that job's.
    duplicate: bool,
}

/// One queue's enqueue script call with everything it needs owned: the coalescer runs it in a task of its own.
struct EnqueueCall {
    scripts: Arc<Scripts>,
    conn: Conn,
    keys: QueueKeys,
    events_key: String,
    queues_key: String,
    queue: QueueName,
    evmax: usize,
    idem_ttl_ms: u64,
}

impl EnqueueCall {
    /// Enqueue `jobs` (validated, at most one script chunk) in one script call.
    async fn run(&self, jobs: Vec<NewJob>) -> Result<Vec<EnqueueReply>, BrokerError> {
        let (queue, keys) = (&self.queue, &self.keys);
        let now = now_ms();
        let mut inv = Enqueue {
            streams: &keys.streams,
            jobs_key: &keys.jobs,
            sched_key: &keys.sched,
            events_key: &self.events_key,
            queues_key: &self.queues_key,
            queue: queue.as_str(),
            n: jobs.len(),
            evmax: self.evmax,
            idem_ttl_ms: self.idem_ttl_ms,
        }
        .invoke(&self.scripts);
        let mut states = Vec::with_capacity(jobs.len());
        let mut tails = codec::id_tails(jobs.len()).into_iter();
        for job in jobs {
            let delay = job.delay_ms.unwrap_or(0);
            let idem = job
                .idempotency_key
                .as_deref()
                .map(|k| keys.idempotency(job.tenant.as_deref(), job.owner.as_deref(), k))
                .unwrap_or_default();
            let spec = job.into_spec(now);
            let p = spec.priority.index();
            let x = spec.max_attempts.to_string();
            let j =
                serde_json::to_string(&spec).map_err(|e| BrokerError::Internal(e.to_string()))?;
            let tail = tails.next().unwrap_or_default();
            if delay > 0 {
                // A delayed job is not in a stream yet, so it gets its id here and a record at once.
                let run_at = now + delay;
                let id = JobId::new();
                let fields = Fields {
                    id: id.to_string(),
                    m: codec::meta(id, queue, &spec),
                    a: "0".into(),
                    x: x.clone(),
                    j: j.clone(),
                    ..Default::default()
                };
                let record = codec::scheduled_record(run_at, &fields, p);
                EnqueueJob {
                    mode: "s",
                    p,
                    run_at,
                    idem: &idem,
                    x: &x,
                    j: &j,
                    a1: &fields.id,
                    a2: &fields.m,
                    a3: &record,
                }
                .push(&mut inv);
                states.push(JobState::Scheduled);
            } else {
                EnqueueJob {
                    mode: "q",
                    p,
                    run_at: now,
                    idem: &idem,
                    x: &x,
                    j: &j,
                    a1: &tail,
                    a2: &codec::meta_rest(queue, &spec),
                    a3: "",
                }
                .push(&mut inv);
                states.push(JobState::Queued);
            }
        }
        let out: Vec<String> = inv
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(redis_err)?;
        if out.len() != states.len() * 2 {
            return Err(bad(format!("enqueue reply of {} values", out.len())));
        }
        states
            .into_iter()
            .zip(out.chunks(2))
            .map(|(state, pair)| {
                Ok(EnqueueReply {
                    id: JobId::parse(&pair[1]).map_err(bad)?,
                    state,
                    duplicate: pair[0] != "n",
                })
            })
            .collect()
    }
}

/// What the claim part of lua/complete_claim.lua answered.
enum ClaimPart {
    /// No claim was asked (`max` 0).
    None,
    Jobs(Vec<Leased>),
    Paused,
    /// Nothing to lease: with the newest entry id of each priority stream (to wait after) when the call had no
    /// completions, else without.
    Empty(Vec<String>),
    Abandoned,
}

/// A fresh claim key of `keys`' queue: one per claim call (see lua/complete_claim.lua).
fn new_claim_key(keys: &QueueKeys) -> String {
    keys.claim(&format!("{:032x}", rand::random::<u128>()))
}

impl RedisBroker {
    /// One call of lua/complete_claim.lua on `queue`'s shard (`keys` being its keys): the completions `items`
    /// (leases of `queue` held by `consumer`), then up to `max` new leases noted under `claim_key`. Returns
    /// the positions of the rejected completions and the claim part's answer. With `max` above 0 the call is
    /// guarded like any claim: if its reply is not read, whatever it leased is handed back uncharged.
    async fn settle(
        &self,
        queue: &QueueName,
        keys: &QueueKeys,
        consumer: &Arc<str>,
        items: &[&Completion],
        max: usize,
        claim_key: &str,
    ) -> Result<(HashSet<usize>, ClaimPart), BrokerError> {
        let shard = self.shard(queue);
        let actor = actor_arg(Some(consumer));
        let mut inv = CompleteClaim {
            streams: &keys.streams,
            jobs_key: &keys.jobs,
            paused_key: &keys.paused,
            events_key: shard.layout.events(),
            claim_key,
            done_key: &keys.done,
            n: items.len(),
            evmax: self.evmax(),
            actor: &actor,
            consumer,
            max,
            claim_ttl_ms: self.config.visibility_timeout.as_millis().max(1) as u64,
            drop_recorded: self.drop_recorded(),
        }
        .invoke(&self.scripts);
        for c in items {
            let (p, eid, m) = token(&c.lease)?;
            CompleteJob {
                p,
                eid,
                id: &c.lease.job.to_string(),
                att: c.lease.attempt,
                m,
                result: &c.result.to_string(),
            }
            .push(&mut inv);
        }
        let mut conn = shard.conn.clone();
        // Armed until the reply is read: if this future is dropped (the caller timed out) or the reply is lost
        // or unreadable, whatever the script leased is handed back uncharged.
        let guard = (max > 0).then(|| ClaimGuard {
            shard,
            generation: shard.conn.generation(),
            item: Some(Abandoned {
                queue: queue.clone(),
                claim_key: claim_key.to_owned(),
                actor: actor.clone(),
            }),
        });
        let v: Value = inv.invoke_async(&mut conn).await.map_err(redis_err)?;
        let [rejected, part] = array(&v)? else {
            return Err(bad("complete_claim reply"));
        };
        let rejected: Vec<i64> = array(rejected)?.iter().map(int).collect::<Result<_, _>>()?;
        let part = claim_part(part, queue, consumer)?;
        if let Some(g) = guard {
            g.settle();
        }
        Ok((positions(&rejected), part))
    }

    /// Complete `items` (any queues, in script-sized calls per queue and holder) and, with `refill`, lease up
    /// to its `max` jobs of its queue for its consumer, in the last call of that queue and holder when there is
    /// one (else in a call of its own, without waiting).
    async fn complete_then_claim(
        &self,
        items: &[Completion],
        refill: Option<(&QueueName, &str, usize)>,
    ) -> Result<(Vec<Result<(), Rejected>>, Vec<Leased>), BrokerError> {
        let mut out = vec![Ok(()); items.len()];
        let mut leased = Vec::new();
        let mut refill_pending = refill;
        for ((queue, consumer), idx) in by_queue(items, |c| &c.lease) {
            let holder: Arc<str> = Arc::from(consumer);
            let keys = self.keys(queue);
            let chunks: Vec<&[usize]> = idx.chunks(SCRIPT_CHUNK).collect();
            for (n, chunk) in chunks.iter().enumerate() {
                let max = match refill_pending {
                    Some((q, c, max)) if q == queue && c == consumer && n + 1 == chunks.len() => {
                        refill_pending = None;
                        max
                    }
                    _ => 0,
                };
                let claim_key = if max > 0 {
                    new_claim_key(&keys)
                } else {
                    // Not touched by a call that claims nothing; any key of the queue's slot will do.
                    keys.paused.clone()
                };
                let batch: Vec<&Completion> = chunk.iter().map(|&i| &items[i]).collect();
                let (rejected, part) = self
                    .settle(queue, &keys, &holder, &batch, max, &claim_key)
                    .await?;
                for k in rejected {
                    out[chunk[k]] = Err(Rejected);
                }
                if let ClaimPart::Jobs(jobs) = part {
                    leased = jobs;
                }
            }
        }
        if let Some((queue, consumer, max)) = refill_pending {
            leased = self.claim(queue, consumer, max, Duration::ZERO).await?;
        }
        Ok((out, leased))
    }
}

/// The claim part of a lua/complete_claim.lua reply: the leased jobs rebuilt (each `m` from its spec).
fn claim_part(v: &Value, queue: &QueueName, consumer: &Arc<str>) -> Result<ClaimPart, BrokerError> {
    let v = array(v)?;
    Ok(match v.first().map(text).transpose()?.as_deref() {
        Some("none") => ClaimPart::None,
        Some("paused") => ClaimPart::Paused,
        Some("abandoned") => ClaimPart::Abandoned,
        Some("empty") => ClaimPart::Empty(v[1..].iter().map(text).collect::<Result<_, _>>()?),
        Some("jobs") => {
            let mut out = Vec::with_capacity((v.len() - 1) / 5);
            for c in v[1..].chunks(5) {
                let [p, eid, id, a, j] = c else {
                    return Err(bad("claim reply"));
                };
                let (p, eid) = (int(p)? as usize, text(eid)?);
                let spec: ferry_core::JobSpec =
                    serde_json::from_str(&text(j)?).map_err(|e| bad(format!("job spec: {e}")))?;
                let attempt = int(a)? as u32 + 1;
                let id = JobId::parse(&text(id)?).map_err(bad)?;
                let m = codec::meta(id, queue, &spec);
                let lease = Lease {
                    queue: queue.clone(),
                    job: id,
                    consumer: consumer.clone(),
                    token: format!("{p}|{eid}|{m}"),
                    attempt,
                    max_attempts: spec.max_attempts,
                    backoff: spec.backoff,
                };
                let job = ferry_core::Job {
                    id,
                    queue: queue.clone(),
                    spec,
                    attempt,
                };
                out.push(Leased { job, lease });
            }
            ClaimPart::Jobs(out)
        }
        _ => return Err(bad("claim reply")),
    })
}

/// A claim script call whose reply has not been read yet. Dropped unsettled — the caller stopped waiting, the
/// reply timed out, was lost with its connection or could not be read — it retires the connection (requests may
/// be stuck in it) and queues the call for abandon.lua, which hands back whatever the script leased, without
/// charging the attempt, or keeps it from leasing anything should its request still arrive.
struct ClaimGuard<'a> {
    shard: &'a Shard,
    generation: u64,
    item: Option<Abandoned>,
}

impl ClaimGuard<'_> {
    /// The reply was read: whatever the script leased is the caller's.
    fn settle(mut self) {
        self.item = None;
    }
}

impl Drop for ClaimGuard<'_> {
    fn drop(&mut self) {
        if let Some(item) = self.item.take() {
            self.shard
                .conn
                .retire(self.generation, "a claim's reply did not arrive in time");
            self.shard.abandons.push(item);
        }
    }
}

/// The pieces of a Redis lease token: priority, stream entry id, and the job's event fragment.
fn token(lease: &Lease) -> Result<(usize, &str, &str), BrokerError> {
    let mut it = lease.token.splitn(3, '|');
    let p = it
        .next()
        .and_then(|p| p.parse::<usize>().ok())
        .filter(|p| *p < 3);
    match (p, it.next(), it.next()) {
        (Some(p), Some(eid), Some(m)) => Ok((p, eid, m)),
        _ => Err(BrokerError::Internal(format!(
            "not a redis lease token: {:?}",
            lease.token
        ))),
    }
}

/// Indices of `items` grouped by queue and lease holder, so each group goes to its shard in script-sized
/// chunks and its events name one actor. (A worker node holds its leases as one consumer, so a batch is
/// usually one group per queue.)
fn by_queue<'a, T>(
    items: &'a [T],
    lease: impl Fn(&T) -> &Lease,
) -> BTreeMap<(&'a QueueName, &'a str), Vec<usize>>
where
    T: 'a,
{
    let mut groups: BTreeMap<(&QueueName, &str), Vec<usize>> = BTreeMap::new();
    for (i, item) in items.iter().enumerate() {
        let l = lease(item);
        groups.entry((&l.queue, &*l.consumer)).or_default().push(i);
    }
    groups
}

/// One job of `restore.lua`, appended to `inv`: its id, the id's millisecond, mode (`q`, or `s` / `r` for a job
/// still waiting for its run_at), priority, attempts used, max attempts, spec, `m`, event data, run_at and record
/// (the last two empty when queued).
fn push_restore(
    inv: &mut redis::ScriptInvocation<'_>,
    job: &JobInfo,
    now: u64,
) -> Result<(), BrokerError> {
    let spec = &job.spec;
    let p = spec.priority.index();
    // An active job's attempt in flight never reported an outcome to the engine: it is given back.
    let attempts = match job.state {
        JobState::Active => job.attempts.saturating_sub(1),
        _ => job.attempts,
    };
    let j = serde_json::to_string(spec).map_err(|e| BrokerError::Internal(e.to_string()))?;
    let m = codec::meta(job.id, &job.queue, spec);
    let waiting = match (job.state, job.run_at) {
        (JobState::Scheduled, Some(t)) if t > now => Some(("s", t)),
        (JobState::Retrying, Some(t)) if t > now => Some(("r", t)),
        _ => None,
    };
    let (mode, data, run_at, record) = match waiting {
        None => (
            "q",
            r#"{"restored":true}"#.to_owned(),
            String::new(),
            String::new(),
        ),
        Some((letter, run_at)) => {
            let pack = serde_json::json!({
                "id": job.id.to_string(), "m": m, "a": attempts.to_string(),
                "x": spec.max_attempts.to_string(), "j": j, "p": p.to_string(),
            })
            .to_string();
            let error = match (letter, &job.error) {
                ("r", Some(e)) => serde_json::Value::String(e.clone()),
                _ => serde_json::Value::Null,
            };
            let data = if letter == "r" {
                serde_json::json!({"error": error, "run_at": run_at, "restored": true})
            } else {
                serde_json::json!({"run_at": run_at, "restored": true})
            };
            let record = serde_json::json!([letter, run_at, attempts, pack, error]).to_string();
            (letter, data.to_string(), run_at.to_string(), record)
        }
    };
    RestoreJob {
        id: &job.id.to_string(),
        ms: codec::id_ms_of(job.id),
        mode,
        p,
        a: attempts,
        x: spec.max_attempts,
        j: &j,
        m: &m,
        data: &data,
        run_at: &run_at,
        rec: &record,
    }
    .push(inv);
    Ok(())
}

/// The actor argument of a script: a JSON string, or empty for none.
fn actor_arg(actor: Option<&str>) -> String {
    actor
        .map(|a| serde_json::Value::String(a.to_owned()).to_string())
        .unwrap_or_default()
}

/// 1-based indices returned by a script, as a set of 0-based positions.
fn positions(v: &[i64]) -> HashSet<usize> {
    v.iter()
        .filter(|i| **i > 0)
        .map(|i| (*i - 1) as usize)
        .collect()
}

#[async_trait]
impl Jobs for RedisBroker {
    async fn enqueue(&self, queue: &QueueName, job: NewJob) -> Result<Enqueued, BrokerError> {
        // Checked before it joins others: one caller's bad job must not fail the rest of a coalesced call.
        job.validate(&Limits::default())?;
        let reply = self
            .coalescer
            .enqueue(queue, job, || self.enqueue_call(queue))
            .await?;
        self.enqueued(reply).await
    }

    async fn enqueue_batch(
        &self,
        queue: &QueueName,
        jobs: Vec<NewJob>,
    ) -> Result<Vec<Enqueued>, BrokerError> {
        let limits = Limits::default();
        let mut errors = Vec::new();
        for (i, j) in jobs.iter().enumerate() {
            if let Err(e) = j.validate(&limits) {
                errors.extend(e.within(&format!("jobs[{i}]")).errors);
            }
        }
        if !errors.is_empty() {
            return Err(ValidationError { errors }.into());
        }
        let mut out = Vec::with_capacity(jobs.len());
        let mut jobs = jobs.into_iter().peekable();
        while jobs.peek().is_some() {
            let chunk: Vec<NewJob> = jobs.by_ref().take(SCRIPT_CHUNK).collect();
            out.extend(self.enqueue_chunk(queue, chunk).await?);
        }
        Ok(out)
    }

    async fn cancel(&self, id: JobId, by: Option<&str>) -> Result<CancelOutcome, BrokerError> {
        let Some((queue, record)) = self.locate(id).await? else {
            return Ok(CancelOutcome::NotFound);
        };
        let (hint_p, hint_eid) = match record {
            Record::Queued { p, eid } => (p.to_string(), eid),
            _ => (String::new(), String::new()),
        };
        let keys = self.keys(&queue);
        let inv = Cancel {
            streams: &keys.streams,
            jobs_key: &keys.jobs,
            sched_key: &keys.sched,
            fin_key: &keys.fin,
            events_key: self.shard(&queue).layout.events(),
            done_key: &keys.done,
            acked_key: &keys.acked_deletes,
            id: &id.to_string(),
            evmax: self.evmax(),
            hint_p: &hint_p,
            hint_eid: &hint_eid,
            by: &actor_arg(by),
            drop_recorded: self.drop_recorded(),
        }
        .invoke(&self.scripts);
        let v: Vec<String> = inv
            .invoke_async(&mut self.conn(&queue))
            .await
            .map_err(redis_err)?;
        Ok(match v.first().map(String::as_str) {
            Some("ok") => CancelOutcome::Cancelled(match v.get(1).map(String::as_str) {
                Some("active") => JobState::Active,
                Some("scheduled") => JobState::Scheduled,
                Some("retrying") => JobState::Retrying,
                _ => JobState::Queued,
            }),
            Some("final") => CancelOutcome::AlreadyFinal(Record::state_from_letter(
                v.get(1).map(String::as_str).unwrap_or(""),
            )),
            _ => CancelOutcome::NotFound,
        })
    }

    async fn job(&self, id: JobId) -> Result<Option<JobInfo>, BrokerError> {
        match self.locate(id).await? {
            Some((queue, record)) => self.info(&queue, record).await,
            None => Ok(None),
        }
    }
}

#[async_trait]
impl Leasing for RedisBroker {
    async fn claim(
        &self,
        queue: &QueueName,
        consumer: &str,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Leased>, BrokerError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let keys = self.keys(queue);
        let shard = self.shard(queue);
        let consumer: Arc<str> = Arc::from(consumer);
        let deadline = tokio::time::Instant::now() + wait;
        // One token per call (its script runs are sequential, and only the last can take jobs): the key under
        // which the script notes what it leased, for abandon.lua should this call be given up.
        let claim_key = new_claim_key(&keys);
        loop {
            let (_, part) = self
                .settle(queue, &keys, &consumer, &[], max, &claim_key)
                .await?;
            match part {
                ClaimPart::Jobs(jobs) => return Ok(jobs),
                ClaimPart::Paused | ClaimPart::Empty(_) => {
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    if left.is_zero() {
                        return Ok(Vec::new());
                    }
                    match part {
                        // Resuming is rare and only needs to be noticed soon, so a paused queue is polled.
                        ClaimPart::Paused => tokio::time::sleep(left.min(PAUSED_POLL)).await,
                        ClaimPart::Empty(after) if after.len() == 3 => {
                            self.block_until_new(shard, &keys.streams, &after, left)
                                .await?
                        }
                        _ => return Err(bad("claim reply without the ids to wait after")),
                    }
                }
                // Only a call given up can meet its own abandoned mark, and this one is still waiting.
                ClaimPart::Abandoned => {
                    return Err(bad("claim refused as abandoned while still waiting"));
                }
                ClaimPart::None => return Err(bad("claim reply")),
            }
        }
    }

    async fn heartbeat(&self, leases: &[Lease]) -> Result<Vec<bool>, BrokerError> {
        let mut held = vec![false; leases.len()];
        for ((queue, _), idx) in by_queue(leases, |l| l) {
            let keys = self.keys(queue);
            // One XCLAIM per (priority, consumer): JUSTID resets the idle time without counting a delivery,
            // and skips entries no longer pending — exactly the leases that were lost.
            let mut groups: BTreeMap<(usize, &str), Vec<usize>> = BTreeMap::new();
            for &i in &idx {
                let (p, _, _) = token(&leases[i])?;
                groups.entry((p, &leases[i].consumer)).or_default().push(i);
            }
            let mut pipe = redis::pipe();
            for ((p, consumer), members) in &groups {
                let cmd = pipe
                    .cmd("XCLAIM")
                    .arg(&keys.streams[*p])
                    .arg(GROUP)
                    .arg(*consumer)
                    .arg(0);
                for &i in members {
                    cmd.arg(token(&leases[i])?.1);
                }
                cmd.arg("JUSTID");
            }
            let replies: Vec<Vec<String>> = pipe
                .query_async(&mut self.conn(queue))
                .await
                .map_err(redis_err)?;
            for (members, ids) in groups.values().zip(replies) {
                let ids: HashSet<String> = ids.into_iter().collect();
                for &i in members {
                    held[i] = ids.contains(token(&leases[i])?.1);
                }
            }
        }
        Ok(held)
    }

    async fn progress(&self, lease: &Lease, data: serde_json::Value) -> Result<bool, BrokerError> {
        let (p, eid, m) = token(lease)?;
        let keys = self.keys(&lease.queue);
        let inv = Progress {
            stream_key: &keys.streams[p],
            events_key: self.shard(&lease.queue).layout.events(),
            evmax: self.evmax(),
            eid,
            att: lease.attempt,
            m,
            data: &data.to_string(),
            actor: &actor_arg(Some(&lease.consumer)),
        }
        .invoke(&self.scripts);
        let r: i64 = inv
            .invoke_async(&mut self.conn(&lease.queue))
            .await
            .map_err(redis_err)?;
        Ok(r == 1)
    }

    async fn complete(
        &self,
        items: Vec<Completion>,
    ) -> Result<Vec<Result<(), Rejected>>, BrokerError> {
        let (out, _) = self.complete_then_claim(&items, None).await?;
        Ok(out)
    }

    async fn complete_and_claim(
        &self,
        items: Vec<Completion>,
        queue: &QueueName,
        consumer: &str,
        max: usize,
    ) -> Result<(Vec<Result<(), Rejected>>, Vec<Leased>), BrokerError> {
        let refill = (max > 0).then_some((queue, consumer, max));
        self.complete_then_claim(&items, refill).await
    }

    async fn fail(
        &self,
        items: Vec<Failure>,
    ) -> Result<Vec<Result<FailOutcome, Rejected>>, BrokerError> {
        let now = now_ms();
        let outcomes: Vec<FailOutcome> = items
            .iter()
            .map(|f| {
                let l = &f.lease;
                f.retry.outcome(l.attempt, l.max_attempts, &l.backoff, now)
            })
            .collect();
        let mut out: Vec<Result<FailOutcome, Rejected>> =
            outcomes.iter().copied().map(Ok).collect();
        for ((queue, consumer), idx) in by_queue(&items, |f| &f.lease) {
            let keys = self.keys(queue);
            for chunk in idx.chunks(SCRIPT_CHUNK) {
                let mut inv = Fail {
                    streams: &keys.streams,
                    jobs_key: &keys.jobs,
                    sched_key: &keys.sched,
                    events_key: self.shard(queue).layout.events(),
                    dead_key: &keys.dead,
                    n: chunk.len(),
                    evmax: self.evmax(),
                    deadmax: self.config.dead_letter_max,
                    actor: &actor_arg(Some(consumer)),
                }
                .invoke(&self.scripts);
                for &i in chunk {
                    let f = &items[i];
                    let (p, eid, m) = token(&f.lease)?;
                    let run_at = match outcomes[i] {
                        FailOutcome::Dead => 0,
                        // run_at 0 means dead-letter to the script; a due-now retry is 1 ms in.
                        FailOutcome::Retrying { run_at } => run_at.max(1),
                    };
                    FailJob {
                        p,
                        eid,
                        id: &f.lease.job.to_string(),
                        att: f.lease.attempt,
                        m,
                        err: &serde_json::Value::String(f.error.clone()).to_string(),
                        run_at,
                    }
                    .push(&mut inv);
                }
                let rejected: Vec<i64> = inv
                    .invoke_async(&mut self.conn(queue))
                    .await
                    .map_err(redis_err)?;
                for k in positions(&rejected) {
                    out[chunk[k]] = Err(Rejected);
                }
            }
        }
        Ok(out)
    }

    async fn release(&self, leases: &[Lease]) -> Result<Vec<bool>, BrokerError> {
        let mut out = vec![false; leases.len()];
        for ((queue, consumer), idx) in by_queue(leases, |l| l) {
            let keys = self.keys(queue);
            for chunk in idx.chunks(SCRIPT_CHUNK) {
                let mut inv = Release {
                    streams: &keys.streams,
                    jobs_key: &keys.jobs,
                    events_key: self.shard(queue).layout.events(),
                    n: chunk.len(),
                    evmax: self.evmax(),
                    actor: &actor_arg(Some(consumer)),
                }
                .invoke(&self.scripts);
                for &i in chunk {
                    let (p, eid, m) = token(&leases[i])?;
                    ReleaseJob {
                        p,
                        eid,
                        id: &leases[i].job.to_string(),
                        m,
                    }
                    .push(&mut inv);
                }
                let released: Vec<i64> = inv
                    .invoke_async(&mut self.conn(queue))
                    .await
                    .map_err(redis_err)?;
                for k in positions(&released) {
                    out[chunk[k]] = true;
                }
            }
        }
        Ok(out)
    }
}

#[async_trait]
impl Housekeeping for RedisBroker {
    async fn promote_due(&self, queue: &QueueName, max: usize) -> Result<usize, BrokerError> {
        let keys = self.keys(queue);
        let inv = Promote {
            streams: &keys.streams,
            jobs_key: &keys.jobs,
            sched_key: &keys.sched,
            events_key: self.shard(queue).layout.events(),
            max,
            evmax: self.evmax(),
        }
        .invoke(&self.scripts);
        let n: i64 = inv
            .invoke_async(&mut self.conn(queue))
            .await
            .map_err(redis_err)?;
        Ok(n as usize)
    }

    async fn reclaim_expired(
        &self,
        queue: &QueueName,
        max: usize,
    ) -> Result<Reclaimed, BrokerError> {
        let keys = self.keys(queue);
        let inv = Reclaim {
            streams: &keys.streams,
            jobs_key: &keys.jobs,
            events_key: self.shard(queue).layout.events(),
            dead_key: &keys.dead,
            min_idle_ms: self.config.visibility_timeout.as_millis() as u64,
            max,
            evmax: self.evmax(),
            deadmax: self.config.dead_letter_max,
        }
        .invoke(&self.scripts);
        let v: Vec<i64> = inv
            .invoke_async(&mut self.conn(queue))
            .await
            .map_err(redis_err)?;
        Ok(Reclaimed {
            requeued: v.first().copied().unwrap_or(0) as usize,
            dead: v.get(1).copied().unwrap_or(0) as usize,
        })
    }

    async fn restore(&self, jobs: Vec<JobInfo>) -> Result<Vec<bool>, BrokerError> {
        let mut out = vec![false; jobs.len()];
        let mut by_queue: BTreeMap<&QueueName, Vec<usize>> = BTreeMap::new();
        for (i, j) in jobs.iter().enumerate() {
            by_queue.entry(&j.queue).or_default().push(i);
        }
        let now = now_ms();
        for (queue, idx) in by_queue {
            let keys = self.keys(queue);
            for chunk in idx.chunks(SCRIPT_CHUNK) {
                let mut inv = Restore {
                    streams: &keys.streams,
                    jobs_key: &keys.jobs,
                    sched_key: &keys.sched,
                    events_key: self.shard(queue).layout.events(),
                    queues_key: self.shard(queue).layout.queues(),
                    queue: queue.as_str(),
                    evmax: self.evmax(),
                    n: chunk.len(),
                    actor: &actor_arg(Some(crate::RESTORE_ACTOR)),
                }
                .invoke(&self.scripts);
                for &i in chunk {
                    push_restore(&mut inv, &jobs[i], now)?;
                }
                let restored: Vec<i64> = inv
                    .invoke_async(&mut self.conn(queue))
                    .await
                    .map_err(redis_err)?;
                for (k, r) in restored.into_iter().enumerate() {
                    if let Some(&i) = chunk.get(k) {
                        out[i] = r == 1;
                    }
                }
            }
        }
        Ok(out)
    }

    async fn try_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, BrokerError> {
        let shard = &self.shards[self.ring.shard_for(name)];
        let set: Option<String> = redis::cmd("SET")
            .arg(shard.layout.lease(name))
            .arg(holder)
            .arg("NX")
            .arg("PX")
            .arg(ttl.as_millis().max(1) as u64)
            .query_async(&mut shard.conn.clone())
            .await
            .map_err(redis_err)?;
        Ok(set.is_some())
    }

    async fn maintain(&self, queue: &QueueName) -> Result<(), BrokerError> {
        let keys = self.keys(queue);
        let shard = self.shard(queue);
        // Everything below the recorder's floor is committed to the store: recorded jobs may leave (with
        // `drop_recorded`), and the event log is trimmed to it (the hard cap on every XADD still bounds the log
        // when nobody reads it).
        let floor = log::group_floor(shard, crate::RECORDER_GROUP).await?;
        for _ in 0..MAINTAIN_ROUNDS {
            let inv = Maintain {
                streams: &keys.streams,
                jobs_key: &keys.jobs,
                fin_key: &keys.fin,
                done_key: &keys.done,
                acked_key: &keys.acked_deletes,
                retention_ms: self.config.finished_retention.as_millis() as u64,
                batch: MAINTAIN_BATCH,
                recorded_below: floor.as_deref().unwrap_or(""),
            }
            .invoke(&self.scripts);
            let (_removed, more): (i64, i64) = inv
                .invoke_async(&mut self.conn(queue))
                .await
                .map_err(redis_err)?;
            if more == 0 {
                break;
            }
        }
        if let Some(floor) = floor {
            let _: i64 = redis::cmd("XTRIM")
                .arg(shard.layout.events())
                .arg("MINID")
                .arg("~")
                .arg(&floor)
                .query_async(&mut shard.conn.clone())
                .await
                .map_err(redis_err)?;
        }
        Ok(())
    }
}

#[async_trait]
impl Operations for RedisBroker {
    async fn dead_letters(
        &self,
        queue: &QueueName,
        limit: usize,
    ) -> Result<Vec<JobInfo>, BrokerError> {
        let keys = self.keys(queue);
        let v: Value = redis::cmd("XREVRANGE")
            .arg(&keys.dead)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(limit)
            .query_async(&mut self.conn(queue))
            .await
            .map_err(redis_err)?;
        let mut out = Vec::new();
        for e in array(&v)? {
            let (_, f) = Fields::from_entry(e)?;
            let at = f.at.as_deref().and_then(|a| a.parse().ok()).unwrap_or(0);
            let mut info = f.info(queue, JobState::Dead, f.attempts(), at)?;
            info.error = f
                .err
                .as_deref()
                .map(|e| serde_json::from_str(e).unwrap_or_else(|_| e.to_owned()));
            out.push(info);
        }
        Ok(out)
    }

    async fn retry_dead(&self, id: JobId) -> Result<RetryOutcome, BrokerError> {
        let Some((queue, record)) = self.locate(id).await? else {
            return Ok(RetryOutcome::NotFound);
        };
        if !matches!(record, Record::Dead { .. }) {
            return Ok(match self.info(&queue, record).await? {
                Some(info) => RetryOutcome::NotDead(info.state),
                None => RetryOutcome::NotFound,
            });
        }
        let keys = self.keys(&queue);
        let inv = RetryDead {
            streams: &keys.streams,
            jobs_key: &keys.jobs,
            dead_key: &keys.dead,
            events_key: self.shard(&queue).layout.events(),
            id: &id.to_string(),
            evmax: self.evmax(),
        }
        .invoke(&self.scripts);
        let v: Vec<String> = inv
            .invoke_async(&mut self.conn(&queue))
            .await
            .map_err(redis_err)?;
        Ok(match v.first().map(String::as_str) {
            Some("ok") => RetryOutcome::Requeued,
            Some("nd") => {
                let letter = v.get(1).map(String::as_str).unwrap_or("");
                let state = match letter {
                    "q" => match self.job(id).await? {
                        Some(info) => info.state,
                        None => JobState::Queued,
                    },
                    l => Record::state_from_letter(l),
                };
                RetryOutcome::NotDead(state)
            }
            _ => RetryOutcome::NotFound,
        })
    }

    async fn stats(&self, queue: &QueueName) -> Result<QueueStats, BrokerError> {
        let keys = self.keys(queue);
        let inv = Stats {
            streams: &keys.streams,
            sched_key: &keys.sched,
            dead_key: &keys.dead,
            paused_key: &keys.paused,
            acked_key: &keys.acked_deletes,
        }
        .invoke(&self.scripts);
        let v: Vec<i64> = inv
            .invoke_async(&mut self.conn(queue))
            .await
            .map_err(redis_err)?;
        let g = |i: usize| v.get(i).copied().unwrap_or(0).max(0) as u64;
        Ok(QueueStats {
            queue: queue.clone(),
            depth: g(0),
            active: g(1),
            lag_ms: g(2),
            scheduled: g(3),
            dead: g(4),
            paused: g(5) == 1,
            delivered: g(6),
        })
    }

    async fn scheduled_due(&self, queue: &QueueName, within: Duration) -> Result<u64, BrokerError> {
        let until = now_ms().saturating_add(within.as_millis() as u64);
        let n: u64 = redis::cmd("ZCOUNT")
            .arg(&self.keys(queue).sched)
            .arg("-inf")
            .arg(until)
            .query_async(&mut self.conn(queue))
            .await
            .map_err(redis_err)?;
        Ok(n)
    }

    async fn leases_by_consumer(
        &self,
        queue: &QueueName,
    ) -> Result<BTreeMap<String, u64>, BrokerError> {
        let mut conn = self.conn(queue);
        let mut out = BTreeMap::new();
        for key in &self.keys(queue).streams {
            // The summary form: [count, min id, max id, [[consumer, count], …]].
            let summary: Value = match redis::cmd("XPENDING")
                .arg(key)
                .arg(GROUP)
                .query_async(&mut conn)
                .await
            {
                Ok(v) => v,
                // This priority's stream (and so its group) does not exist yet: nothing leased from it.
                Err(e) if e.code() == Some("NOGROUP") => continue,
                Err(e) => return Err(redis_err(e)),
            };
            let Some(consumers) = array(&summary)?.get(3) else {
                continue;
            };
            for c in array(consumers)? {
                let c = array(c)?;
                let (Some(name), Some(n)) = (c.first(), c.get(1)) else {
                    continue;
                };
                *out.entry(text(name)?).or_insert(0) += int(n)?.max(0) as u64;
            }
        }
        out.retain(|_, n| *n > 0);
        Ok(out)
    }

    async fn queues(&self) -> Result<Vec<QueueName>, BrokerError> {
        let mut all = Vec::new();
        for shard in &self.shards {
            let names: Vec<String> = redis::cmd("SMEMBERS")
                .arg(shard.layout.queues())
                .query_async(&mut shard.conn.clone())
                .await
                .map_err(redis_err)?;
            all.extend(names.into_iter().filter_map(|n| QueueName::parse(n).ok()));
        }
        all.sort();
        all.dedup();
        Ok(all)
    }

    async fn pause(&self, queue: &QueueName) -> Result<(), BrokerError> {
        let keys = self.keys(queue);
        let _: () = redis::cmd("SET")
            .arg(&keys.paused)
            .arg(1)
            .query_async(&mut self.conn(queue))
            .await
            .map_err(redis_err)?;
        Ok(())
    }

    async fn resume(&self, queue: &QueueName) -> Result<(), BrokerError> {
        let keys = self.keys(queue);
        let _: () = redis::cmd("DEL")
            .arg(&keys.paused)
            .query_async(&mut self.conn(queue))
            .await
            .map_err(redis_err)?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), BrokerError> {
        for shard in &self.shards {
            let _: String = redis::cmd("PING")
                .query_async(&mut shard.conn.clone())
                .await
                .map_err(|e| {
                    let e = shard.redactor.apply(&e.to_string());
                    BrokerError::Unavailable(
                        refusal::explain(Some(&shard.name), &e)
                            .unwrap_or_else(|| format!("{}: {e}", shard.name)),
                    )
                })?;
        }
        Ok(())
    }
}

#[async_trait]
impl EventFeed for RedisBroker {
    async fn subscribe(&self) -> Result<EventStream, BrokerError> {
        if self.cluster.is_some() {
            // Sharded pub/sub has no patterns: every partition's channel on every virtual shard, through the
            // job event feed. Every job carries its owner's partition, so each event comes once.
            let (control, events) = self.job_feed().await?.into_parts();
            let watches: Vec<_> = (0..crate::placement::PARTITIONS)
                .map(|p| control.watch(&crate::Topic::Partition(p)))
                .collect();
            for w in futures::future::join_all(watches).await {
                w?;
            }
            return Ok(futures::StreamExt::boxed(futures::StreamExt::map(
                events,
                move |fed| {
                    // The feed's subscriptions live as long as its control.
                    let _keep = &control;
                    fed.event
                },
            )));
        }
        // One task per shard, each reconnecting on its own: a shard whose connection drops must not end (or
        // silently drop out of) the merged stream. See [`events`].
        let shards = self
            .shards
            .iter()
            .map(|s| Ok((s.name.clone(), s.feed_client()?, s.layout.clone())))
            .collect::<Result<_, BrokerError>>()?;
        events::subscribe(shards, self.epochs.clone()).await
    }

    async fn job_feed(&self) -> Result<JobFeed, BrokerError> {
        if let Some((seeds, tags)) = &self.cluster {
            return Ok(topics::cluster_feed(
                tags,
                seeds.clone(),
                self.ring.clone(),
                self.epochs.clone(),
            ));
        }
        let shards = self
            .shards
            .iter()
            .map(|s| Ok((s.name.clone(), s.feed_client()?, s.layout.clone())))
            .collect::<Result<_, BrokerError>>()?;
        Ok(topics::feed(shards, self.ring.clone(), self.epochs.clone()))
    }

    async fn events_missed(
        &self,
        scope: EventScope<'_>,
        since: &StreamPos,
        scan: usize,
        keep: &EventFilter<'_>,
    ) -> Result<Missed<Event>, BrokerError> {
        let shard = match scope {
            EventScope::Queue(q) => self.ring.shard_for(q.as_str()),
            EventScope::All if self.shards.len() == 1 => 0,
            // A subject's jobs may sit on any shard, and the shards' offsets are not one order.
            EventScope::All => return Ok(Missed::lost(None)),
        };
        let (entries, meta) = self
            .read_missed(shard, self.shards[shard].layout.events(), since, scan)
            .await?;
        let read = history::parse_read(&entries, &meta)?;
        self.epochs.set(shard, read.epoch.clone());
        // The event log is never absent while events are written to it: a missing one was lost.
        if !history::reaches_back(&read, since, self.history.ttl, false) {
            return Ok(Missed::lost(Some(read.epoch)));
        }
        let entries = log::parse_entries(shard, read.entries)?;
        if entries.len() > scan {
            return Ok(Missed::lost(Some(read.epoch)));
        }
        let mut events: Vec<Event> = entries
            .into_iter()
            .flat_map(|e| e.events)
            .filter(|e| keep(e))
            .collect();
        // Live subscribers never see the specs; neither do recovered ones.
        for e in &mut events {
            e.spec = None;
        }
        Ok(Missed {
            entries: events,
            recovered: true,
            epoch: Some(read.epoch),
        })
    }

    fn events_epoch(&self, queue: &QueueName) -> Option<String> {
        self.epochs.get(self.ring.shard_for(queue.as_str()))
    }
}

#[async_trait]
impl PubSub for RedisBroker {
    async fn publish(&self, channel: &str, payload: String) -> Result<(), BrokerError> {
        let shard = &self.shards[self.ring.shard_for(channel)];
        let inv = Publish {
            history_key: &shard.layout.app_history(channel),
            epoch_key: shard.layout.epoch(),
            channel: &pubsub::redis_channel(&shard.layout, channel),
            payload: &payload,
            size: self.history.size,
            ttl_ms: self.history.ttl.as_millis() as u64,
            fresh_epoch: &history::fresh_epoch(),
        }
        .invoke(&self.scripts);
        let _offset: String = inv
            .invoke_async(&mut shard.conn.clone())
            .await
            .map_err(redis_err)?;
        Ok(())
    }

    fn channel_history(&self) -> ChannelHistory {
        self.history
    }

    async fn channel_missed(
        &self,
        channel: &str,
        since: &StreamPos,
        max: usize,
    ) -> Result<Missed<HistoryEntry>, BrokerError> {
        let shard = self.ring.shard_for(channel);
        let (entries, meta) = self
            .read_missed(
                shard,
                &self.shards[shard].layout.app_history(channel),
                since,
                max,
            )
            .await?;
        let read = history::parse_read(&entries, &meta)?;
        self.epochs.set(shard, read.epoch.clone());
        if !history::reaches_back(&read, since, self.history.ttl, true) {
            return Ok(Missed::lost(Some(read.epoch)));
        }
        let entries = history::app_entries(read.entries)?;
        if entries.len() > max {
            return Ok(Missed::lost(Some(read.epoch)));
        }
        Ok(Missed {
            entries,
            recovered: true,
            epoch: Some(read.epoch),
        })
    }

    async fn channels(&self) -> Result<ChannelFeed, BrokerError> {
        if let Some((seeds, tags)) = &self.cluster {
            return Ok(pubsub::cluster_feed(tags, seeds.clone(), self.ring.clone()));
        }
        let shards = self
            .shards
            .iter()
            .map(|s| Ok((s.name.clone(), s.feed_client()?, s.layout.clone())))
            .collect::<Result<_, BrokerError>>()?;
        Ok(pubsub::feed(shards, self.ring.clone()))
    }

    fn channel_shard(&self, channel: &str) -> Option<usize> {
        Some(self.ring.shard_for(channel))
    }

    fn membership(&self) -> Option<&dyn crate::Membership> {
        Some(self)
    }
}

#[async_trait]
impl EventLog for RedisBroker {
    fn log_shards(&self) -> usize {
        self.shards.len()
    }

    async fn read_log(
        &self,
        shard: usize,
        group: &str,
        consumer: &str,
        max: usize,
        wait: Duration,
        reclaim_idle: Option<Duration>,
    ) -> Result<Vec<LogEntry>, BrokerError> {
        let sh = self
            .shards
            .get(shard)
            .ok_or_else(|| BrokerError::Internal(format!("no log shard {shard}")))?;
        log::read(sh, shard, group, consumer, max, wait, reclaim_idle).await
    }

    async fn ack_log(&self, group: &str, entries: &[LogPosition]) -> Result<(), BrokerError> {
        let mut by_shard: BTreeMap<usize, Vec<&str>> = BTreeMap::new();
        for e in entries {
            by_shard.entry(e.shard).or_default().push(&e.sid);
        }
        for (shard, ids) in by_shard {
            let sh = self
                .shards
                .get(shard)
                .ok_or_else(|| BrokerError::Internal(format!("no log shard {shard}")))?;
            log::ack(sh, group, &ids).await?;
        }
        Ok(())
    }

    async fn log_backlog(&self, group: &str) -> Result<u64, BrokerError> {
        let mut total = 0;
        for sh in &self.shards {
            total += log::backlog(sh, group).await?;
        }
        Ok(total)
    }
}

/// A published batch `{"sid": "<entry id>", "events": [groups]}` as events with ids `<sid>/<n>`.
pub fn parse_published(payload: &str) -> Vec<Event> {
    #[derive(serde::Deserialize)]
    struct Batch<'a> {
        sid: String,
        #[serde(borrow)]
        events: &'a serde_json::value::RawValue,
    }
    let parsed = serde_json::from_str::<Batch>(payload)
        .and_then(|b| codec::unpack_events(&b.sid, b.events.get()));
    match parsed {
        Ok(events) => events,
        Err(e) => {
            tracing::warn!(error = %e, "undecodable event batch");
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Leasing;
    use ferry_core::{Kind, Priority};

    /// A claim given up after it ran is handed back from the ranges it noted: every job it leased and still
    /// holds goes back uncharged (across priorities, several per stream), a job completed in between stays
    /// completed, and the claim's request arriving again takes nothing.
    #[tokio::test]
    async fn an_abandoned_claim_hands_back_exactly_the_leases_it_still_holds() {
        let server = ferry_testkit::RedisServer::start().unwrap();
        let b = RedisBroker::connect(&[server.url()], EngineConfig::default())
            .await
            .unwrap();
        let queue = QueueName::parse("ranges").unwrap();
        let job = |priority| NewJob {
            priority,
            ..NewJob::new(Kind::parse("ferry.noop").unwrap(), serde_json::json!({}))
        };
        let mut ids = Vec::new();
        for priority in [
            Priority::Normal,
            Priority::High,
            Priority::Normal,
            Priority::High,
            Priority::Normal,
        ] {
            ids.push(b.enqueue(&queue, job(priority)).await.unwrap().id);
        }
        let keys = b.keys(&queue);
        let consumer: Arc<str> = Arc::from("gone");
        let claim_key = new_claim_key(&keys);
        let (_, part) = b
            .settle(&queue, &keys, &consumer, &[], 10, &claim_key)
            .await
            .unwrap();
        let ClaimPart::Jobs(jobs) = part else {
            panic!("the claim leased nothing");
        };
        assert_eq!(jobs.len(), 5);
        // The middle of the normal stream's range is settled before the claim is given up.
        let done = jobs[3].lease.job;
        let settled = b
            .complete(vec![Completion {
                lease: jobs[3].lease.clone(),
                result: serde_json::json!(1),
            }])
            .await
            .unwrap();
        assert_eq!(settled, vec![Ok(())]);
        b.shard(&queue).abandons.push(Abandoned {
            queue: queue.clone(),
            claim_key: claim_key.clone(),
            actor: actor_arg(Some(&consumer)),
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while b
            .leases_by_consumer(&queue)
            .await
            .unwrap()
            .contains_key("gone")
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the leases stayed held"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for id in &ids {
            let info = b.job(*id).await.unwrap().unwrap();
            if *id == done {
                assert_eq!(info.state, JobState::Completed, "{info:?}");
            } else {
                assert_eq!(
                    (info.state, info.attempts),
                    (JobState::Queued, 0),
                    "{info:?}"
                );
            }
        }
        // The same request arriving late leases nothing.
        let (_, part) = b
            .settle(&queue, &keys, &consumer, &[], 10, &claim_key)
            .await
            .unwrap();
        assert!(matches!(part, ClaimPart::Abandoned));
        assert_eq!(b.stats(&queue).await.unwrap().depth, 4);
    }

    #[test]
    fn ring_ids_stay_what_they_were() {
        // Pinned: a change here moves queues between shards on upgrade.
        for (url, id) in [
            ("redis://10.0.0.1:6379", "redis://10.0.0.1:6379"),
            (
                "rediss://cache.example:6380/0",
                "redis://cache.example:6380/0",
            ),
            ("redis://:pw@10.0.0.1:6379", "redis://***@10.0.0.1:6379"),
            ("rediss://user:pw@h:1/2", "redis://***@h:1/2"),
            ("redis://user@h:1", "redis://***@h:1"),
            ("redis://u:p@ss@h:1", "redis://***@ss@h:1"),
        ] {
            assert_eq!(ring_id(url), id, "{url}");
        }
        // Rotating the password or turning TLS on keeps the id.
        assert_eq!(ring_id("redis://:old@h:1"), ring_id("rediss://:new@h:1"));
    }
}
