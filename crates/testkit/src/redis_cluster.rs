//! A private Redis Cluster per test: `masters` cluster nodes (and `replicas` replicas of each) started by
//! [`RedisServer::start_cluster_node`] on ephemeral ports, joined with `redis-cli --cluster create`, with the
//! 16,384 slots spread evenly over the masters. Nodes can be killed, paused and restarted like any
//! [`RedisServer`], and slots moved with `redis-cli --cluster reshard`, so tests can fail over a master or
//! reshard under load. Like the rest of this crate it is synchronous and never mocks a server.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::guard::run;
use crate::redis::RedisServer;

/// How long the cluster may take to agree on its configuration after a change (create, failover, reshard).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);

/// One line of `CLUSTER NODES`, as seen by the node that answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterNode {
    pub id: String,
    pub port: u16,
    /// `master` or `slave` (Redis's words), from the flags.
    pub master: bool,
    /// The node's master id, for a replica.
    pub master_id: Option<String>,
    /// Flagged `fail` or `fail?`.
    pub failing: bool,
    /// How many slots the node serves.
    pub slots: usize,
}

/// A Redis Cluster owned by one test; every node is killed and removed on drop.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
    /// The CA file `redis-cli --cluster` verifies TLS nodes with; `None` for plain TCP.
    tls_ca: Option<std::path::PathBuf>,
}

impl RedisCluster {
    /// Start `masters` (at least 3, as `redis-cli --cluster create` asks) nodes with `replicas` replicas each,
    /// create the cluster and wait until every node reports `cluster_state:ok` and every replica is in sync.
    pub fn start(masters: usize, replicas: usize) -> anyhow::Result<Self> {
        Self::start_with(masters, replicas, &[])
    }

    /// [`start`](Self::start) with extra `redis-server` arguments for every node.
    pub fn start_with(masters: usize, replicas: usize, args: &[&str]) -> anyhow::Result<Self> {
        Self::create(masters, replicas, None, || {
            RedisServer::start_cluster_node(args)
        })
    }

    /// A cluster whose nodes speak only TLS (clients, replication and the cluster bus), with `certs`' server
    /// certificate ([`RedisServer::start_tls_cluster_node`]); [`urls`](Self::urls) are `rediss://`.
    pub fn start_tls(
        certs: &crate::TestCerts,
        masters: usize,
        replicas: usize,
    ) -> anyhow::Result<Self> {
        Self::create(
            masters,
            replicas,
            Some(certs.ca_file().to_path_buf()),
            || RedisServer::start_tls_cluster_node(certs, &[]),
        )
    }

    fn create(
        masters: usize,
        replicas: usize,
        tls_ca: Option<std::path::PathBuf>,
        start: impl Fn() -> anyhow::Result<RedisServer>,
    ) -> anyhow::Result<Self> {
        if masters < 3 {
            bail!("a Redis Cluster needs at least 3 masters, not {masters}");
        }
        let nodes = (0..masters * (1 + replicas))
            .map(|_| start())
            .collect::<anyhow::Result<Vec<_>>>()?;
        let cluster = Self { nodes, tls_ca };
        let addrs: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        let replicas = replicas.to_string();
        let mut create = cluster.redis_cli();
        create.args(["--cluster", "create"]).args(&addrs).args([
            "--cluster-replicas",
            &replicas,
            "--cluster-yes",
        ]);
        let out = run(&mut create).context("redis-cli --cluster create")?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !text.contains("[OK] All 16384 slots covered") {
            bail!("redis-cli --cluster create did not cover every slot:\n{text}");
        }
        cluster.wait_settled()?;
        Ok(cluster)
    }

    /// Every node's URL, `redis://127.0.0.1:PORT`, in start order (the first `masters` began as masters).
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The node at `i` (in start order), to kill, pause or restart.
    pub fn node(&mut self, i: usize) -> &mut RedisServer {
        &mut self.nodes[i]
    }

    /// The index of the node listening on `port`.
    pub fn index_of(&self, port: u16) -> Option<usize> {
        self.nodes.iter().position(|n| n.port() == port)
    }

    /// `redis-cli` with the TLS flags of a TLS cluster, for `--cluster` commands.
    fn redis_cli(&self) -> std::process::Command {
        let mut cmd = std::process::Command::new("redis-cli");
        if let Some(ca) = &self.tls_ca {
            cmd.arg("--tls").arg("--cacert").arg(ca);
        }
        cmd
    }

    /// The cluster as the first running node sees it.
    pub fn topology(&mut self) -> anyhow::Result<Vec<ClusterNode>> {
        let i = self.running()?;
        parse_nodes(&self.nodes[i].cli(&["CLUSTER", "NODES"])?)
    }

    /// The port of the master serving `slot`, as the first running node sees it.
    pub fn master_of_slot(&mut self, slot: u16) -> anyhow::Result<u16> {
        let i = self.running()?;
        let shards = self.nodes[i].cli(&["CLUSTER", "NODES"])?;
        for line in shards.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            if f.len() < 9 || !f[2].contains("master") {
                continue;
            }
            for range in &f[8..] {
                if range.starts_with('[') {
                    continue; // a slot being migrated or imported
                }
                let (a, b) = range.split_once('-').unwrap_or((range, range));
                let (a, b): (u16, u16) = (a.parse()?, b.parse()?);
                if (a..=b).contains(&slot) {
                    return node_port(f[1]);
                }
            }
        }
        bail!("no master serves slot {slot}:\n{shards}")
    }

    /// The hash slot of `key` (`CLUSTER KEYSLOT`, so the server's own CRC16 and hash-tag rules).
    pub fn slot_of(&mut self, key: &str) -> anyhow::Result<u16> {
        let i = self.running()?;
        self.nodes[i]
            .cli(&["CLUSTER", "KEYSLOT", key])?
            .trim()
            .parse()
            .with_context(|| format!("CLUSTER KEYSLOT {key}"))
    }

    /// Move `slots` slots from the master `from` to the master `to` (node ids) with `redis-cli --cluster
    /// reshard`, keys included (MIGRATE, so clients see ASK and MOVED meanwhile), then wait until the cluster
    /// agrees.
    pub fn reshard(&mut self, from: &str, to: &str, slots: usize) -> anyhow::Result<()> {
        let i = self.running()?;
        let addr = format!("127.0.0.1:{}", self.nodes[i].port());
        let n = slots.to_string();
        let out = run(self
            .redis_cli()
            .args(["--cluster", "reshard", &addr])
            .args(["--cluster-from", from, "--cluster-to", to])
            .args(["--cluster-slots", &n, "--cluster-yes"])
            .args(["--cluster-pipeline", "100"]))
        .context("redis-cli --cluster reshard")?;
        let text = String::from_utf8_lossy(&out.stdout);
        if text.contains("[ERR]") {
            bail!("redis-cli --cluster reshard failed:\n{text}");
        }
        self.wait_settled()
    }

    /// Wait until every running node reports `cluster_state:ok` with all slots assigned and sees the same
    /// masters, and every running replica's link to its master is up.
    pub fn wait_settled(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            let state = self.settled();
            match state {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    return Err(e.context(format!("cluster not settled within {SETTLE_TIMEOUT:?}")));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    fn settled(&self) -> anyhow::Result<()> {
        let mut views = Vec::new();
        for n in &self.nodes {
            let info = match n.cli(&["CLUSTER", "INFO"]) {
                Ok(i) if !i.is_empty() => i,
                // Killed or paused: it has no say.
                _ => continue,
            };
            if !info.contains("cluster_state:ok") || !info.contains("cluster_slots_assigned:16384")
            {
                bail!("node {} reports:\n{info}", n.port());
            }
            let repl = n.cli(&["INFO", "replication"])?;
            if repl.contains("role:slave") && !repl.contains("master_link_status:up") {
                bail!("replica {} is not in sync:\n{repl}", n.port());
            }
            let mut masters: Vec<(u16, usize)> = parse_nodes(&n.cli(&["CLUSTER", "NODES"])?)?
                .into_iter()
                .filter(|m| m.master && !m.failing && m.slots > 0)
                .map(|m| (m.port, m.slots))
                .collect();
            masters.sort_unstable();
            views.push(masters);
        }
        if views.is_empty() {
            bail!("no node is running");
        }
        if views.windows(2).any(|w| w[0] != w[1]) {
            bail!("nodes disagree on the masters: {views:?}");
        }
        Ok(())
    }

    /// The index of the first running node.
    fn running(&mut self) -> anyhow::Result<usize> {
        self.nodes
            .iter_mut()
            .position(|n| n.is_running())
            .context("no node of the cluster is running")
    }
}

/// `ip:port@bus[,hostname]` → port.
fn node_port(addr: &str) -> anyhow::Result<u16> {
    let hostport = addr.split('@').next().unwrap_or(addr);
    let port = hostport.rsplit(':').next().unwrap_or(hostport);
    port.parse()
        .with_context(|| format!("no port in node address {addr:?}"))
}

/// Parse `CLUSTER NODES`: `<id> <ip:port@cport> <flags> <master> <ping-sent> <pong-recv> <epoch> <link>
/// <slot> <slot> …`.
fn parse_nodes(text: &str) -> anyhow::Result<Vec<ClusterNode>> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split(' ').collect();
        if f.len() < 8 {
            bail!("unexpected CLUSTER NODES line {line:?}");
        }
        let flags: Vec<&str> = f[2].split(',').collect();
        let mut slots = 0;
        for range in f.get(8..).unwrap_or_default() {
            if range.starts_with('[') {
                continue;
            }
            let (a, b) = range.split_once('-').unwrap_or((range, range));
            let (a, b): (usize, usize) = (a.parse()?, b.parse()?);
            slots += b - a + 1;
        }
        out.push(ClusterNode {
            id: f[0].to_owned(),
            port: node_port(f[1])?,
            master: flags.contains(&"master"),
            master_id: (f[3] != "-").then(|| f[3].to_owned()),
            failing: flags.iter().any(|x| *x == "fail" || *x == "fail?"),
            slots,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_nodes_lines_parse() {
        let text = "07c3 127.0.0.1:30004@31004 slave e7d1 0 1426238317239 4 connected\n\
                    e7d1 127.0.0.1:30001@31001 myself,master - 0 0 1 connected 0-5460 [5461->-292f]\n\
                    292f 127.0.0.1:30002@31002,host master,fail - 0 0 2 disconnected 5461-10922 12000";
        let nodes = parse_nodes(text).unwrap();
        assert_eq!(nodes.len(), 3);
        assert_eq!(
            nodes[0],
            ClusterNode {
                id: "07c3".into(),
                port: 30004,
                master: false,
                master_id: Some("e7d1".into()),
                failing: false,
                slots: 0,
            }
        );
        assert_eq!(
            (nodes[1].port, nodes[1].master, nodes[1].slots),
            (30001, true, 5461)
        );
        assert_eq!(
            (nodes[2].port, nodes[2].failing, nodes[2].slots),
            (30002, true, 5463)
        );
    }
}
