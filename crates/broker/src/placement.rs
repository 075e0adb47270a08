//! Gateway placement: which gateway holds a WebSocket client, decided the same way by every gateway and every
//! balancer from the membership alone.
//!
//! A subject (a token's `sub` within its tenant) hashes to one of [`PARTITIONS`] partitions. A partition is
//! owned by the live, ready, non-draining gateway that ranks it highest under the rendezvous hash of
//! [`crate::shard`] (the workspace's one placement hash), and the rest of that ranking is its fallback order. A
//! client goes to the first gateway in its partition's order that is below the bound of consistent hashing
//! with bounded loads (Mirrokni, Thorup and Zadimoghaddam, SODA 2018): no gateway above
//! ⌈(1 + ε) × mean⌉ connections, the mean counting the client being placed.
//!
//! A job's events are published on its owner's partition (see `docs/architecture.md`, "Gateway tier"), so a
//! gateway needs the events of only the partitions of the subjects it holds.
//!
//! This module only computes; it must not talk to Redis or hold state between calls.

use serde::{Deserialize, Serialize};

use crate::shard::{ShardRing, stable_hash};

/// How many partitions subjects hash to. Fixed for good: a job carries its owner's partition from enqueue to
/// its last event, so changing this would send the events of jobs already queued to the wrong gateways.
pub const PARTITIONS: u16 = 1024;

/// Default ε of the load bound.
pub const DEFAULT_EPSILON: f64 = 0.1;

/// The partition of `sub` within `tenant` (`None` and `Some("")` are the same: no tenant).
pub fn partition_of(tenant: Option<&str>, sub: &str) -> u16 {
    let tenant = tenant.unwrap_or("");
    // Length-prefixed, so ("a/b", "c") and ("a", "b/c") never collide by construction.
    let mut key = Vec::with_capacity(tenant.len() + sub.len() + 8);
    key.extend_from_slice(tenant.len().to_string().as_bytes());
    key.push(b':');
    key.extend_from_slice(tenant.as_bytes());
    key.extend_from_slice(sub.as_bytes());
    (stable_hash(&key) % u64::from(PARTITIONS)) as u16
}

/// What a gateway says about itself in the membership (Redis: `ferry:gw`, see `redis::members`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Unique per process (a UUIDv7 drawn at start).
    pub id: String,
    /// Where balancers send its clients: `--advertise-url`, by default the listen address.
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// WebSocket connections it holds now.
    pub connections: u64,
    /// Partitions whose job events it is subscribed to.
    #[serde(default)]
    pub partitions: u64,
    /// Shutting down: takes no new clients, moves its own away.
    #[serde(default)]
    pub draining: bool,
    /// Its `/readyz` answer.
    #[serde(default = "yes")]
    pub ready: bool,
    /// Milliseconds since the epoch, its own clock.
    #[serde(default)]
    pub started_at_ms: u64,
}

fn yes() -> bool {
    true
}

impl NodeInfo {
    /// A node as it announces itself at start: ready, not draining, no connections or partitions yet, no
    /// region, start time unknown (0). Callers set the rest with struct update syntax.
    pub fn new(id: impl Into<String>, url: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            url: url.into(),
            region: None,
            connections: 0,
            partitions: 0,
            draining: false,
            ready: true,
            started_at_ms: 0,
        }
    }

    /// Takes new clients.
    pub fn eligible(&self) -> bool {
        self.ready && !self.draining
    }
}

/// A snapshot of the membership, ready to place clients. Only eligible nodes take clients.
#[derive(Debug, Clone)]
pub struct Placement {
    nodes: Vec<NodeInfo>,
    /// Over the ids of the eligible nodes, in `eligible` order.
    ring: ShardRing,
    eligible: Vec<usize>,
    epsilon: f64,
}

impl Placement {
    pub fn new(nodes: Vec<NodeInfo>, epsilon: f64) -> Self {
        let eligible: Vec<usize> = (0..nodes.len()).filter(|&i| nodes[i].eligible()).collect();
        let ids: Vec<String> = eligible.iter().map(|&i| nodes[i].id.clone()).collect();
        Self {
            ring: ShardRing::with_ids(&ids),
            nodes,
            eligible,
            epsilon: epsilon.max(0.0),
        }
    }

    /// Every node of the snapshot, eligible or not.
    pub fn nodes(&self) -> &[NodeInfo] {
        &self.nodes
    }

    pub fn epsilon(&self) -> f64 {
        self.epsilon
    }

    /// Indexes (into [`nodes`](Self::nodes)) of the eligible nodes in `partition`'s order: owner first.
    pub fn ranked(&self, partition: u16) -> Vec<usize> {
        if self.eligible.is_empty() {
            return Vec::new();
        }
        self.ring
            .ranked(&partition.to_string())
            .into_iter()
            .map(|k| self.eligible[k])
            .collect()
    }

    /// The eligible node that owns `partition`.
    pub fn owner(&self, partition: u16) -> Option<&NodeInfo> {
        self.ranked(partition).first().map(|&i| &self.nodes[i])
    }

    /// The most connections an eligible node may hold once `incoming` more are placed:
    /// ⌈(1 + ε) × (total + incoming) / eligible⌉, at least 1. `loads[i]` is node `i`'s count (callers pass the
    /// heartbeat's counts plus what they placed since).
    pub fn bound(&self, loads: &[u64], incoming: u64) -> u64 {
        let n = self.eligible.len().max(1) as f64;
        let total: u64 = self.eligible.iter().map(|&i| loads[i]).sum::<u64>() + incoming;
        (((1.0 + self.epsilon) * total as f64 / n).ceil() as u64).max(1)
    }

    /// Where a new client of `partition` goes: the first node in the partition's order below the bound; `None`
    /// when no node is eligible.
    pub fn pick(&self, partition: u16, loads: &[u64]) -> Option<usize> {
        let bound = self.bound(loads, 1);
        let order = self.ranked(partition);
        // The bound admits at least one node: the mean (with the newcomer) is at most ⌈mean⌉ ≤ bound, so some
        // node is below it unless rounding bites; then the least loaded takes it.
        order
            .iter()
            .copied()
            .find(|&i| loads[i] < bound)
            .or_else(|| self.least_loaded(loads))
    }

    /// The eligible node with the fewest connections (first in list order among equals).
    pub fn least_loaded(&self, loads: &[u64]) -> Option<usize> {
        self.eligible.iter().copied().min_by_key(|&i| loads[i])
    }

    /// The heartbeat's connection counts, by index.
    pub fn loads(&self) -> Vec<u64> {
        self.nodes.iter().map(|n| n.connections).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, connections: u64) -> NodeInfo {
        NodeInfo {
            connections,
            ..NodeInfo::new(id, format!("http://{id}"))
        }
    }

    #[test]
    fn partitions_are_pinned_and_spread() {
        // Pinned: a change moves every subject's events to other gateways mid-flight.
        assert_eq!(partition_of(None, "alice"), partition_of(Some(""), "alice"));
        assert_ne!(
            partition_of(Some("a/b"), "c"),
            partition_of(Some("a"), "b/c")
        );
        let got: Vec<u16> = ["alice", "bob", "carol"]
            .iter()
            .map(|s| partition_of(Some("acme"), s))
            .collect();
        assert_eq!(got, PINNED);
        let mut counts = vec![0u32; PARTITIONS as usize];
        for i in 0..102_400 {
            counts[partition_of(None, &format!("user-{i}")) as usize] += 1;
        }
        // Mean 100, σ 10: every partition within ±50 % fails only for a biased hash.
        assert!(counts.iter().all(|&c| (50..150).contains(&c)), "{counts:?}");
    }

    const PINNED: [u16; 3] = [607, 23, 680];

    #[test]
    fn clients_are_bounded_and_go_home_when_there_is_room() {
        let eps = 0.1;
        let mut nodes: Vec<NodeInfo> = (0..3).map(|i| node(&format!("g{i}"), 0)).collect();
        nodes.push(NodeInfo {
            draining: true,
            ..node("g-draining", 0)
        });
        let p = Placement::new(nodes, eps);
        let mut loads = p.loads();
        for i in 0..3_000 {
            let part = partition_of(None, &format!("s{i}"));
            let at = p.pick(part, &loads).unwrap();
            assert_ne!(p.nodes()[at].id, "g-draining");
            loads[at] += 1;
            let bound = (((1.0 + eps) * (i + 1) as f64) / 3.0).ceil() as u64;
            assert!(loads[at] <= bound.max(1), "{loads:?} over {bound}");
        }
        let max = *loads.iter().max().unwrap() as f64;
        assert!(max / 1_000.0 <= 1.1 + 1e-9, "{loads:?}");
        // With room everywhere, a client goes to its partition's owner.
        let empty = p.loads();
        for part in 0..PARTITIONS {
            let owner = p.owner(part).unwrap().id.clone();
            assert_eq!(p.nodes()[p.pick(part, &empty).unwrap()].id, owner);
        }
    }

    #[test]
    fn nobody_eligible_places_nowhere() {
        let p = Placement::new(
            vec![NodeInfo {
                ready: false,
                ..node("g", 0)
            }],
            0.1,
        );
        assert_eq!(p.pick(3, &p.loads()), None);
        assert!(p.owner(3).is_none());
    }
}
