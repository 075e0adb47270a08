//! Choosing the upstream: the membership snapshot, what this balancer placed since, and gateways that recently
//! refused a connection.
//!
//! A WebSocket client with a subject goes where [`Placement::pick`] says, with loads = each gateway's
//! heartbeat count plus the upgrades this balancer sent it since that count changed (a count unchanged by a
//! new snapshot has not seen them yet). Then the rest of the partition's order. Anything else goes to the
//! least loaded eligible gateway. A gateway whose connect failed is tried last for [`Router::skip_for`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use ferry_broker::placement::{NodeInfo, Placement};

/// Why a gateway was chosen, the `reason` label of `ferry_balancer_picks_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The owner of the subject's partition.
    Owner,
    /// Another gateway of the partition's order: the owner is over the bound, or recently unreachable.
    Fallback,
    /// No subject (plain HTTP, no token, an unreadable token): the least loaded gateway.
    LeastLoaded,
    /// After a failed connect to an earlier choice.
    Retry,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Owner => "owner",
            Self::Fallback => "fallback",
            Self::LeastLoaded => "least_loaded",
            Self::Retry => "retry",
        }
    }
}

/// Where a gateway is reached: parsed from its advertised URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `host:port`, for connecting.
    pub authority: String,
    /// The host alone (no brackets), for TLS server names.
    pub host: String,
    pub tls: bool,
}

impl Target {
    /// `http://host[:port][/...]` or `https://...`; `None` for anything else.
    pub fn parse(url: &str) -> Option<Self> {
        let (scheme, rest) = url.split_once("://")?;
        let tls = match scheme.to_ascii_lowercase().as_str() {
            "http" => false,
            "https" => true,
            _ => return None,
        };
        let authority = rest.split(['/', '?', '#']).next()?;
        if authority.is_empty() || authority.contains('@') {
            return None;
        }
        let default_port = if tls { 443 } else { 80 };
        let (host, authority) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6.split_once(']')?;
            match after {
                "" => (host.to_owned(), format!("[{host}]:{default_port}")),
                p if p.starts_with(':') && p[1..].parse::<u16>().is_ok() => {
                    (host.to_owned(), authority.to_owned())
                }
                _ => return None,
            }
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) if p.parse::<u16>().is_ok() && !h.is_empty() => {
                    (h.to_owned(), authority.to_owned())
                }
                Some(_) => return None,
                None => (authority.to_owned(), format!("{authority}:{default_port}")),
            }
        };
        Some(Self {
            authority,
            host,
            tls,
        })
    }
}

/// One membership read.
#[derive(Debug)]
pub struct Snapshot {
    pub placement: Placement,
    /// Per node (same index), its target.
    pub targets: Vec<Target>,
    /// Per node, upgrades this balancer sent it that its heartbeat count does not include yet.
    placed: Mutex<Vec<u64>>,
    pub read_at: Instant,
}

impl Snapshot {
    fn loads(&self, placed: &[u64]) -> Vec<u64> {
        self.placement
            .nodes()
            .iter()
            .zip(placed)
            .map(|(n, p)| n.connections.saturating_add(*p))
            .collect()
    }

    /// The heartbeat counts plus this balancer's placements, by node index.
    pub fn current_loads(&self) -> Vec<u64> {
        let placed = lock(&self.placed);
        self.loads(&placed)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The gateways to try for one client, best first.
#[derive(Debug)]
pub struct Plan {
    pub snapshot: Arc<Snapshot>,
    /// Node indexes into the snapshot.
    pub order: Vec<usize>,
    /// Why the first was chosen.
    pub first: Reason,
    /// A WebSocket upgrade: counted in the loads.
    counted: bool,
    /// The node counted now, if any.
    holding: Option<usize>,
}

impl Plan {
    /// The reason for the `attempt`-th entry (0-based) of [`order`](Self::order).
    pub fn reason(&self, attempt: usize) -> Reason {
        if attempt == 0 {
            self.first
        } else {
            Reason::Retry
        }
    }

    /// Count a try of `node` in the loads (WebSocket upgrades only); a later call moves the count.
    pub fn hold(&mut self, node: usize) {
        if !self.counted {
            return;
        }
        let mut placed = lock(&self.snapshot.placed);
        if let Some(prev) = self.holding.take() {
            placed[prev] = placed[prev].saturating_sub(1);
        }
        placed[node] += 1;
        self.holding = Some(node);
    }

    /// The try of the held node failed: it no longer counts.
    pub fn release(&mut self) {
        if let Some(prev) = self.holding.take() {
            let mut placed = lock(&self.snapshot.placed);
            placed[prev] = placed[prev].saturating_sub(1);
        }
    }
}

/// The balancer's view of the gateways.
#[derive(Debug)]
pub struct Router {
    epsilon: f64,
    skip_for: Duration,
    snapshot: RwLock<Arc<Snapshot>>,
    /// Node id → until when it is tried last.
    skipped: Mutex<HashMap<String, Instant>>,
    /// Lookups are serialised so that two concurrent upgrades see each other's placement.
    pick: Mutex<()>,
    /// Nodes already warned about for an unusable URL (once each, not every read).
    warned: Mutex<std::collections::HashSet<String>>,
}

impl Router {
    pub fn new(epsilon: f64, skip_for: Duration) -> Self {
        Self {
            epsilon,
            skip_for,
            snapshot: RwLock::new(Arc::new(Snapshot {
                placement: Placement::new(Vec::new(), epsilon),
                targets: Vec::new(),
                placed: Mutex::new(Vec::new()),
                read_at: Instant::now(),
            })),
            skipped: Mutex::new(HashMap::new()),
            pick: Mutex::new(()),
            warned: Mutex::new(std::collections::HashSet::new()),
        }
    }

    /// How long a gateway whose connect failed is tried last.
    pub fn skip_for(&self) -> Duration {
        self.skip_for
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A new membership read. Nodes whose URL is not `http(s)://host[:port]` are left out (with a warning).
    /// This balancer's placements on a node are carried over while the node's heartbeat count is unchanged
    /// (it has not counted them yet), and dropped once it changes.
    pub fn update(&self, nodes: Vec<NodeInfo>) {
        let mut kept = Vec::with_capacity(nodes.len());
        let mut targets = Vec::with_capacity(nodes.len());
        for n in nodes {
            match Target::parse(&n.url) {
                Some(t) => {
                    kept.push(n);
                    targets.push(t);
                }
                None => {
                    if lock(&self.warned).insert(n.id.clone()) {
                        tracing::warn!(node = %n.id, url = %n.url, "gateway with an unusable URL (not http(s)://host[:port]) left out");
                    }
                }
            }
        }
        let _guard = lock(&self.pick);
        let old = self.snapshot();
        let old_placed = lock(&old.placed).clone();
        let carried: HashMap<&str, (u64, u64)> = old
            .placement
            .nodes()
            .iter()
            .zip(&old_placed)
            .map(|(n, p)| (n.id.as_str(), (n.connections, *p)))
            .collect();
        let placed: Vec<u64> = kept
            .iter()
            .map(|n| match carried.get(n.id.as_str()) {
                Some(&(count, p)) if count == n.connections => p,
                _ => 0,
            })
            .collect();
        let next = Arc::new(Snapshot {
            placement: Placement::new(kept, self.epsilon),
            targets,
            placed: Mutex::new(placed),
            read_at: Instant::now(),
        });
        *self.snapshot.write().unwrap_or_else(|p| p.into_inner()) = next;
        let now = Instant::now();
        lock(&self.skipped).retain(|_, until| *until > now);
    }

    /// A gateway refused a connection: try it last for a while.
    pub fn mark_failed(&self, id: &str) {
        lock(&self.skipped).insert(id.to_owned(), Instant::now() + self.skip_for);
    }

    fn is_skipped(&self, id: &str, now: Instant) -> bool {
        lock(&self.skipped)
            .get(id)
            .is_some_and(|until| *until > now)
    }

    /// The gateways to try for a client: of `partition` when its subject is known and it upgrades to a
    /// WebSocket, else the least loaded first. `None` when no gateway is eligible.
    pub fn plan(&self, partition: Option<u16>, websocket: bool) -> Option<Plan> {
        let _guard = lock(&self.pick);
        let snapshot = self.snapshot();
        let p = &snapshot.placement;
        let nodes = p.nodes();
        let loads = snapshot.current_loads();
        let now = Instant::now();
        let skipped: Vec<bool> = nodes.iter().map(|n| self.is_skipped(&n.id, now)).collect();
        let (order, first) = match partition {
            Some(part) => {
                let ranked = p.ranked(part);
                let owner = *ranked.first()?;
                let pick = if skipped.iter().any(|s| *s) {
                    let bound = p.bound(&loads, 1);
                    ranked
                        .iter()
                        .copied()
                        .find(|&i| !skipped[i] && loads[i] < bound)
                        .or_else(|| {
                            ranked
                                .iter()
                                .copied()
                                .filter(|&i| !skipped[i])
                                .min_by_key(|&i| (loads[i], i))
                        })
                        .unwrap_or(owner)
                } else {
                    p.pick(part, &loads)?
                };
                let mut order = vec![pick];
                order.extend(ranked.iter().copied().filter(|&i| i != pick && !skipped[i]));
                order.extend(ranked.iter().copied().filter(|&i| i != pick && skipped[i]));
                let reason = if pick == owner {
                    Reason::Owner
                } else {
                    Reason::Fallback
                };
                (order, reason)
            }
            None => {
                let mut order: Vec<usize> =
                    (0..nodes.len()).filter(|&i| nodes[i].eligible()).collect();
                if order.is_empty() {
                    return None;
                }
                order.sort_by_key(|&i| (skipped[i], loads[i], i));
                (order, Reason::LeastLoaded)
            }
        };
        let mut plan = Plan {
            snapshot,
            order,
            first,
            counted: websocket,
            holding: None,
        };
        let first = plan.order[0];
        plan.hold(first);
        Some(plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, connections: u64) -> NodeInfo {
        NodeInfo {
            connections,
            ..NodeInfo::new(id, format!("http://{id}:80"))
        }
    }

    #[test]
    fn placements_count_until_the_heartbeat_does() {
        let r = Router::new(0.1, Duration::from_secs(5));
        r.update(vec![node("a", 0), node("b", 0)]);
        for i in 0..10u16 {
            let _ = r.plan(Some(i), true).unwrap();
        }
        // Plain HTTP is not counted.
        let _ = r.plan(None, false).unwrap();
        assert_eq!(r.snapshot().current_loads().iter().sum::<u64>(), 10);
        // Same heartbeat counts: carried over.
        r.update(vec![node("b", 0), node("a", 0)]);
        assert_eq!(r.snapshot().current_loads().iter().sum::<u64>(), 10);
        // A's heartbeat counted its clients: A's own placements are dropped, B's kept.
        let before = r.snapshot();
        let a = before
            .placement
            .nodes()
            .iter()
            .position(|n| n.id == "a")
            .unwrap();
        let b_placed = before.current_loads()[1 - a];
        r.update(vec![node("a", 7), node("b", 0)]);
        assert_eq!(r.snapshot().current_loads(), vec![7, b_placed]);
        // A failed try gives its count back; the next one holds it.
        let mut plan = r.plan(Some(1), true).unwrap();
        let first = plan.order[0];
        plan.release();
        plan.hold(plan.order[1]);
        let loads = r.snapshot().current_loads();
        assert_eq!(loads[first], [7, b_placed][first]);
        assert_eq!(loads[plan.order[1]], [7, b_placed][plan.order[1]] + 1);
    }

    #[test]
    fn targets_parse_advertised_urls() {
        let t = Target::parse("http://10.0.0.1:8080").unwrap();
        assert_eq!(
            (t.authority.as_str(), t.host.as_str(), t.tls),
            ("10.0.0.1:8080", "10.0.0.1", false)
        );
        let t = Target::parse("https://gw.example/").unwrap();
        assert_eq!((t.authority.as_str(), t.tls), ("gw.example:443", true));
        let t = Target::parse("http://[::1]:9000").unwrap();
        assert_eq!(
            (t.authority.as_str(), t.host.as_str()),
            ("[::1]:9000", "::1")
        );
        for bad in [
            "ftp://x:1",
            "x:1",
            "http://",
            "http://h:port",
            "http://u@h:1",
        ] {
            assert_eq!(Target::parse(bad), None, "{bad}");
        }
    }
}
