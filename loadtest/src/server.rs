//! The Redis of one benchmark run: a throw-away redis-server (`ferry_testkit::RedisServer`: loopback, free
//! ephemeral port, own temp dir, killed on drop), or a Redis Cluster of `masters` such servers
//! (`ferry_testkit::RedisCluster`, no replicas), with persistence off (`--appendonly no`, no RDB snapshots), so
//! the figures measure the queue and not fsync.

use anyhow::{Context, bail};
use ferry_broker::{EngineConfig, RedisBroker, RedisOptions, ShardRing};
use ferry_testkit::{RedisCluster, RedisServer};
use serde::Serialize;

use crate::redis_cpu::Admin;

/// Arguments on top of the testkit defaults.
const BENCH_ARGS: &[&str] = &["--appendonly", "no", "--save", ""];

/// What a run's Redis is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Topology {
    /// One redis-server.
    Standalone,
    /// A Redis Cluster of `masters` masters (no replicas) with ferry's queues spread over `vshards` virtual
    /// shards.
    Cluster { masters: usize, vshards: usize },
}

impl Topology {
    pub fn label(&self) -> String {
        match self {
            Self::Standalone => "standalone".to_owned(),
            Self::Cluster { masters, .. } => format!("cluster of {masters} masters"),
        }
    }
}

/// One redis-server of the run (the server itself, or one master of the cluster).
#[derive(Debug, Clone, Serialize)]
pub struct Node {
    pub port: u16,
    pub pid: u32,
    #[serde(skip)]
    pub url: String,
}

#[derive(Debug)]
enum Servers {
    Standalone(RedisServer),
    Cluster(RedisCluster),
}

/// The running Redis owned by the benchmark.
#[derive(Debug)]
pub struct BenchRedis {
    servers: Servers,
    topology: Topology,
    nodes: Vec<Node>,
}

impl BenchRedis {
    /// A standalone server, started and answering (the testkit start blocks; it runs off the async threads).
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_topology(Topology::Standalone).await
    }

    /// A standalone server or a cluster, every node answering (and, for a cluster, every slot covered).
    pub async fn start_topology(topology: Topology) -> anyhow::Result<Self> {
        let mut servers = tokio::task::spawn_blocking(move || -> anyhow::Result<Servers> {
            Ok(match topology {
                Topology::Standalone => Servers::Standalone(RedisServer::start_with(BENCH_ARGS)?),
                Topology::Cluster { masters, .. } => {
                    Servers::Cluster(RedisCluster::start_with(masters, 0, BENCH_ARGS)?)
                }
            })
        })
        .await
        .context("redis-server start task")??;
        let nodes = match &mut servers {
            Servers::Standalone(s) => vec![node_of(s)?],
            Servers::Cluster(c) => {
                let Topology::Cluster { masters, .. } = topology else {
                    unreachable!("a cluster is started for a cluster topology")
                };
                // The first `masters` nodes began as the masters (there are no replicas to promote).
                (0..masters)
                    .map(|i| node_of(c.node(i)))
                    .collect::<anyhow::Result<_>>()?
            }
        };
        Ok(Self {
            servers,
            topology,
            nodes,
        })
    }

    pub fn topology(&self) -> Topology {
        self.topology
    }

    /// The standalone server's URL (for a cluster: its first node's).
    pub fn url(&self) -> String {
        self.nodes[0].url.clone()
    }

    pub fn port(&self) -> u16 {
        self.nodes[0].port
    }

    /// The standalone server's pid (for a cluster: its first node's).
    pub fn pid(&self) -> u32 {
        self.nodes[0].pid
    }

    /// Every server that holds data: the standalone server, or each master of the cluster.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The arguments that point a `ferry` process at this Redis: `--redis URL`, or `--redis-cluster URL,…` with
    /// the run's virtual shard count.
    pub fn ferry_args(&self) -> Vec<String> {
        match self.topology {
            Topology::Standalone => vec!["--redis".into(), self.url()],
            Topology::Cluster { vshards, .. } => vec![
                "--redis-cluster".into(),
                self.seeds().join(","),
                "--redis-cluster-vshards".into(),
                vshards.to_string(),
            ],
        }
    }

    fn seeds(&self) -> Vec<String> {
        match &self.servers {
            Servers::Standalone(s) => vec![s.url()],
            Servers::Cluster(c) => c.urls(),
        }
    }

    /// ferry's Redis engine on this Redis, with `config`.
    pub async fn broker(&self, config: EngineConfig) -> anyhow::Result<RedisBroker> {
        let broker = match self.topology {
            Topology::Standalone => RedisBroker::connect(&[self.url()], config).await,
            Topology::Cluster { vshards, .. } => {
                RedisBroker::connect_cluster(
                    &self.seeds(),
                    vshards,
                    config,
                    RedisOptions::default(),
                )
                .await
            }
        };
        broker.context("connecting the ferry broker")
    }

    /// A measuring connection to each of [`nodes`](Self::nodes), in the same order.
    pub async fn admins(&self) -> anyhow::Result<Vec<Admin>> {
        let mut out = Vec::with_capacity(self.nodes.len());
        for n in &self.nodes {
            out.push(Admin {
                con: crate::redis_cpu::connect(&n.url).await?,
                pid: n.pid,
                port: n.port,
            });
        }
        Ok(out)
    }

    /// For each queue, the index in [`nodes`](Self::nodes) of the server holding it: on a cluster, the master
    /// serving the slot of the virtual shard the broker's own ring places the queue on.
    pub async fn placement(&self, queues: &[String]) -> anyhow::Result<Vec<usize>> {
        let Topology::Cluster { vshards, .. } = self.topology else {
            return Ok(vec![0; queues.len()]);
        };
        let ring = ShardRing::with_ids(&RedisBroker::vshard_tags(vshards));
        let mut con = crate::redis_cpu::connect(&self.url()).await?;
        let slots: redis::Value = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut con)
            .await
            .context("CLUSTER SLOTS")?;
        let ranges = parse_cluster_slots(&slots)?;
        let mut out = Vec::with_capacity(queues.len());
        for q in queues {
            let tag = ring.shard_id_for(q).context("the ring has no shards")?;
            let slot: u16 = redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(tag)
                .query_async(&mut con)
                .await
                .context("CLUSTER KEYSLOT")?;
            let port = ranges
                .iter()
                .find(|(a, b, _)| (*a..=*b).contains(&slot))
                .map(|r| r.2)
                .with_context(|| format!("no master serves slot {slot}"))?;
            let i = self
                .nodes
                .iter()
                .position(|n| n.port == port)
                .with_context(|| {
                    format!("slot {slot} is served by {port}, not a master of the run")
                })?;
            out.push(i);
        }
        Ok(out)
    }
}

fn node_of(s: &RedisServer) -> anyhow::Result<Node> {
    Ok(Node {
        port: s.port(),
        pid: s.pid().context("redis-server has no pid")?,
        url: s.url(),
    })
}

/// `CLUSTER SLOTS` → (first slot, last slot, master port).
fn parse_cluster_slots(v: &redis::Value) -> anyhow::Result<Vec<(u16, u16, u16)>> {
    let int = |v: &redis::Value| -> Option<i64> {
        match v {
            redis::Value::Int(i) => Some(*i),
            _ => None,
        }
    };
    let redis::Value::Array(rows) = v else {
        bail!("CLUSTER SLOTS answered {v:?}");
    };
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let redis::Value::Array(f) = row else {
            bail!("CLUSTER SLOTS row {row:?}");
        };
        let master = match f.get(2) {
            Some(redis::Value::Array(m)) => m.get(1).and_then(int),
            _ => None,
        };
        match (f.first().and_then(int), f.get(1).and_then(int), master) {
            (Some(a), Some(b), Some(port)) => out.push((a as u16, b as u16, port as u16)),
            _ => bail!("CLUSTER SLOTS row {row:?}"),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::Value;

    #[test]
    fn parses_cluster_slots() {
        let node = |port: i64| {
            Value::Array(vec![
                Value::BulkString(b"127.0.0.1".to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let slots = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                node(7000),
                node(7003),
            ]),
            Value::Array(vec![Value::Int(5461), Value::Int(16383), node(7001)]),
        ]);
        assert_eq!(
            parse_cluster_slots(&slots).unwrap(),
            vec![(0, 5460, 7000), (5461, 16383, 7001)]
        );
        assert!(parse_cluster_slots(&Value::Int(1)).is_err());
        assert!(
            parse_cluster_slots(&Value::Array(vec![Value::Array(vec![Value::Int(0)])])).is_err()
        );
    }
}
