//! The shard's shared command connection, replaced after a call on it times out.
//!
//! The redis crate's `ConnectionManager` reconnects when the connection drops, not when a reply times out: after
//! a network partition the TCP connection stays open, every later request queues behind the lost ones, and when
//! the link heals Redis runs them all — long after their callers gave up (the ghost claims of issue 11), and only
//! once TCP's retransmission backoff, by then tens of seconds, lets them through. So a timed-out reply retires
//! the connection: later calls go through a new one, which connects as soon as the link is back. (Requests
//! already written to the old socket may still reach Redis; calls where that matters, claims, carry their own
//! protection: see `abandon.lua`.)
//!
//! On a Redis Cluster the connection is the redis crate's cluster connection (one multiplexed connection per
//! node, requests routed by key, MOVED and ASK followed, the topology refreshed), and a retired one is replaced by
//! a new cluster connection made in the background: calls keep using the old one until the new one is up.
//!
//! This module must not retry anything: a caller decides whether its call is safe to repeat.

use std::sync::{Arc, Mutex, PoisonError};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Client, Cmd, Pipeline, RedisFuture, Value};

/// Where replacement connections come from.
enum Source {
    Single {
        client: Client,
        config: ConnectionManagerConfig,
    },
    Cluster(ClusterClient),
}

/// A connection of either kind.
#[derive(Clone)]
pub(super) enum Link {
    Single(ConnectionManager),
    /// A plain connection: the blocking reads' on a standalone Redis.
    Plain(redis::aio::MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Link {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Link::Single(c) => c.req_packed_command(cmd),
            Link::Plain(c) => c.req_packed_command(cmd),
            Link::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Link::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Link::Plain(c) => c.req_packed_commands(pipeline, offset, count),
            Link::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Link::Single(c) => c.get_db(),
            Link::Plain(c) => c.get_db(),
            Link::Cluster(c) => c.get_db(),
        }
    }
}

/// A cloneable handle on the shard's current command connection (cheap to clone, like `ConnectionManager`).
#[derive(Clone)]
pub(super) struct Conn(Arc<Inner>);

struct Inner {
    /// Name of the shard (its URL without credentials), for the log.
    name: String,
    source: Source,
    /// The connection in use and its generation, which tells a late report about a connection already replaced
    /// from one about the current one. A std mutex: held only to clone or swap, never across an await.
    current: Mutex<(u64, Link)>,
}

impl Conn {
    /// Wrap a connected manager; replacements are made from `client` and `config`.
    pub(super) fn new(
        name: String,
        client: Client,
        config: ConnectionManagerConfig,
        first: ConnectionManager,
    ) -> Self {
        Self(Arc::new(Inner {
            name,
            source: Source::Single { client, config },
            current: Mutex::new((0, Link::Single(first))),
        }))
    }

    /// Wrap a connected cluster connection; replacements are made from `client`.
    pub(super) fn cluster(name: String, client: ClusterClient, first: ClusterConnection) -> Self {
        Self(Arc::new(Inner {
            name,
            source: Source::Cluster(client),
            current: Mutex::new((0, Link::Cluster(first))),
        }))
    }

    fn current(&self) -> (u64, Link) {
        let g = self
            .0
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        (g.0, g.1.clone())
    }

    /// The generation of the connection calls go through now; pass it to [`retire`](Self::retire).
    pub(super) fn generation(&self) -> u64 {
        self.current().0
    }

    /// Stop using connection `generation` for new calls (a call on it got no answer in time): the next call
    /// connects afresh. A no-op when that connection was already replaced.
    pub(super) fn retire(&self, generation: u64, why: &str) {
        let (client, config) = match &self.0.source {
            Source::Single { client, config } => (client, config),
            Source::Cluster(client) => {
                // A cluster connection connects to every master before it is returned: made off the caller's
                // path, swapped in once up, while calls keep going through the old one.
                let (client, this, why) = (client.clone(), self.clone(), why.to_owned());
                tokio::spawn(async move {
                    match client.get_async_connection().await {
                        Ok(c) => this.swap(generation, Link::Cluster(c), &why),
                        Err(e) => {
                            tracing::warn!(shard = %this.0.name, error = %e, "cannot make a new Redis Cluster connection; keeping the old one");
                        }
                    }
                });
                return;
            }
        };
        // Lazy: connects on first use, so this never blocks, and a partition costs no connection attempts
        // until someone needs the shard.
        let fresh = match ConnectionManager::new_lazy_with_config(client.clone(), config.clone()) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(shard = %self.0.name, error = %e, "cannot make a new Redis connection; keeping the old one");
                return;
            }
        };
        self.swap(generation, Link::Single(fresh), why);
    }

    /// Put `fresh` in place of connection `generation`, unless that one was already replaced.
    fn swap(&self, generation: u64, fresh: Link, why: &str) {
        let mut g = self
            .0
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if g.0 == generation {
            *g = (generation + 1, fresh);
            drop(g);
            tracing::info!(shard = %self.0.name, reason = why, "retired the Redis connection; later calls use a new one");
        }
    }
}

/// Whether a failed call leaves the connection suspect: no reply in time means requests may be stuck in it.
fn timed_out(r: &redis::RedisResult<impl Sized>) -> bool {
    matches!(r, Err(e) if e.is_timeout())
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        let (generation, mut conn) = self.current();
        Box::pin(async move {
            let r = conn.req_packed_command(cmd).await;
            if timed_out(&r) {
                self.retire(generation, "a reply timed out");
            }
            r
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        let (generation, mut conn) = self.current();
        Box::pin(async move {
            let r = conn.req_packed_commands(pipeline, offset, count).await;
            if timed_out(&r) {
                self.retire(generation, "a reply timed out");
            }
            r
        })
    }

    fn get_db(&self) -> i64 {
        self.current().1.get_db()
    }
}
