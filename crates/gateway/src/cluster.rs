//! This gateway in the gateway tier: its heartbeat in the membership ([`ferry_broker::Membership`]), the
//! rebalancing of its WebSocket clients, and `GET /v1/cluster`.
//!
//! # Heartbeat
//!
//! Every `heartbeat` (`--heartbeat-ms`, default 1 s) the node announces itself for `membership_ttl`
//! (`--membership-ttl-ms`, default 5 s) as a [`NodeInfo`]: its id (a UUIDv7 drawn at start), advertised URL,
//! region, WebSocket connections, partitions it is subscribed to (the `ferry_gateway_partitions` gauge when the
//! node has one, else 0), whether it is ready (not draining, and its pub/sub canary comes back, as `/readyz`
//! checks) and whether it is draining. The answer is the live membership. When shutdown starts the node
//! announces itself draining at once (not at the next tick), keeps announcing through the drain, and leaves
//! the membership when the drain is over. A node that dies without leaving drops out after its ttl.
//!
//! # Rebalancing
//!
//! After each heartbeat the node builds a [`Placement`] from the membership. A node within the bound
//! (⌈(1 + ε) × mean⌉ of the eligible nodes) moves nobody: arrivals fill nodes up to it, and moving clients
//! whenever loads shift inside it would move them back and forth. A node above it (a node joined, or one died and
//! its clients refilled the others) moves its excess and no more: for every partition it works out where
//! [`Placement::pick`] would put a client of it now, with the node's own load one lower (the client being
//! placed is taken out of it), and a local connection whose pick is another node, and that is older than
//! `rebalance_cooldown` (`--rebalance-cooldown-ms`, default 30 s, so no client moves twice within it), is moved
//! (those away from their partition's owner first, so a move also brings a client home):
//! `{"type": "goaway", "reason": "rebalance", "reconnect_after_ms": N}` and a 1001 close N ms later, N drawn
//! from `[0, ws_close_spread)` like the shutdown goaway. Moves are paced by a token bucket: the cluster's
//! budget `rebalance_rate` (`--rebalance-rate`, reconnects per second, default 100) divided by the number of
//! eligible nodes, per node, holding at most one heartbeat's worth (at least one move). Each move counts
//! against the loads before the next is decided, so one heartbeat never moves a node below its place. Since
//! every node decides on its own from the same snapshot, a node sends a target at most its share of the
//! target's room below the bound (room / other eligible nodes), and counts its moves still in flight (the close
//! spread plus two heartbeats) as the target's load and no longer as its own, so together the nodes do not
//! overshoot a newcomer and then move clients back. A node
//! that is draining, unready, or absent from the membership (its heartbeat failed) moves nobody: draining has
//! its own path (every client gets a goaway). A node whose last heartbeat is older than three heartbeats is
//! taken as gone for rebalancing (a killed node stays listed until its ttl passes): nobody is sent to it.
//!
//! Per-connection state is the handle's partition (2 bytes) and admission time (8 bytes) and one entry in the
//! hub's map of connections; the plan is per partition (1,024 picks per heartbeat), not per connection.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use ferry_broker::placement::{PARTITIONS, Placement};
use ferry_broker::{Member, NodeInfo, PubSub};
use ferry_telemetry::prometheus;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::auth::Scope;
use crate::config::ClusterConfig;
use crate::error::ApiError;
use crate::http::Api;
use crate::http::extract::Authed;
use crate::ws::Hub;

/// This node's membership and rebalancing.
pub struct Cluster {
    cfg: ClusterConfig,
    /// The advertised URL (resolved from the bound address when not configured).
    url: String,
    started_at_ms: u64,
    hub: Arc<Hub>,
    /// Only for its membership.
    broker: Arc<dyn PubSub>,
    /// Longest wait for one membership call.
    call_timeout: Duration,
    /// The pub/sub canary's budget (readiness).
    canary_budget: Duration,
    /// Token bucket of moves: tokens, and when it was last filled.
    bucket: Mutex<(f64, Instant)>,
    /// Moves made lately, by target node id: counted as the target's load until the target's own heartbeat
    /// surely shows them (the close spread plus two heartbeats), so the next round does not move them again.
    pending: Mutex<Vec<(Instant, String)>>,
    /// This node's connections at the previous round.
    previous: AtomicU64,
    /// The longest delay between a `goaway` and its close.
    close_spread: Duration,
    /// The last heartbeat failed (logged once per streak).
    failing: AtomicBool,
    nodes: prometheus::IntGaugeVec,
    rebalanced: prometheus::IntCounter,
    heartbeat_errors: prometheus::IntCounter,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("id", &self.cfg.node_id)
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Cluster {
    pub fn new(
        cfg: ClusterConfig,
        url: String,
        hub: Arc<Hub>,
        broker: Arc<dyn PubSub>,
        call_timeout: Duration,
        canary_budget: Duration,
        close_spread: Duration,
    ) -> Arc<Self> {
        use prometheus::{IntCounter, IntGaugeVec, Opts};
        Arc::new(Self {
            cfg,
            url,
            started_at_ms: now_ms(),
            hub,
            broker,
            call_timeout,
            canary_budget,
            bucket: Mutex::new((0.0, Instant::now())),
            pending: Mutex::new(Vec::new()),
            previous: AtomicU64::new(0),
            close_spread,
            failing: AtomicBool::new(false),
            nodes: IntGaugeVec::new(
                Opts::new(
                    "ferry_cluster_nodes",
                    "Gateways in the membership as this node last saw it, by state: ready (taking clients), \
                     draining, unready.",
                ),
                &["state"],
            )
            .expect("valid metric"),
            rebalanced: IntCounter::new(
                "ferry_ws_rebalanced_total",
                "WebSocket connections this node moved to another gateway (goaway with reason rebalance).",
            )
            .expect("valid metric"),
            heartbeat_errors: IntCounter::new(
                "ferry_cluster_heartbeat_errors_total",
                "Membership heartbeats that failed or timed out.",
            )
            .expect("valid metric"),
        })
    }

    pub fn node_id(&self) -> &str {
        &self.cfg.node_id
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.cfg
    }

    /// What this node announces now.
    async fn info(&self) -> NodeInfo {
        let draining = self.hub.is_draining();
        let ready = !draining && self.hub.probe_pubsub(self.canary_budget).await.ok;
        NodeInfo {
            id: self.cfg.node_id.clone(),
            url: self.url.clone(),
            region: self.cfg.region.clone(),
            connections: self.hub.connections() as u64,
            partitions: self.hub.partitions() as u64,
            // Shutdown may have started while the canary ran.
            draining: self.hub.is_draining(),
            ready: ready && !self.hub.is_draining(),
            started_at_ms: self.started_at_ms,
        }
    }

    /// Announce this node until `stop`, announcing it draining as soon as `draining` is cancelled; then leave
    /// the membership.
    pub async fn run(self: Arc<Self>, draining: CancellationToken, stop: CancellationToken) {
        if self.broker.membership().is_none() {
            tracing::info!("the engine keeps no gateway membership: no heartbeat, no rebalancing");
            return;
        }
        let mut ticker = tokio::time::interval(self.cfg.heartbeat);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut said_draining = false;
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                _ = draining.cancelled(), if !said_draining => said_draining = true,
                _ = ticker.tick() => {}
            }
            // Not raced against `stop`: a heartbeat in flight finishes (bounded by the call timeout) so the
            // leave below comes after it.
            self.beat().await;
        }
        if let Some(m) = self.broker.membership() {
            match tokio::time::timeout(self.call_timeout, m.leave(&self.cfg.node_id)).await {
                Ok(Ok(())) => {
                    tracing::info!(node = %self.cfg.node_id, "left the gateway membership")
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "could not leave the membership; it expires on its own")
                }
                Err(_) => tracing::warn!("leaving the membership timed out; it expires on its own"),
            }
        }
    }

    /// One heartbeat, then one round of rebalancing.
    async fn beat(&self) {
        let Some(m) = self.broker.membership() else {
            return;
        };
        let info = self.info().await;
        let call = m.heartbeat_members(&info, self.cfg.membership_ttl);
        let members = match tokio::time::timeout(self.call_timeout, call).await {
            Ok(Ok(members)) => members,
            failed => {
                self.heartbeat_errors.inc();
                let error = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no answer within {} ms", self.call_timeout.as_millis()),
                };
                if !self.failing.swap(true, Ordering::AcqRel) {
                    tracing::warn!(%error, "membership heartbeat failed; retrying every heartbeat");
                }
                return;
            }
        };
        if self.failing.swap(false, Ordering::AcqRel) {
            tracing::info!("membership heartbeat works again");
        }
        self.count_states(&members);
        if info.eligible() {
            // A node that missed three heartbeats is most likely dead (its entry lasts until its ttl): no
            // client is sent there and it does not count in the mean.
            let stale = 3 * self.cfg.heartbeat.as_millis() as u64;
            let nodes = members
                .into_iter()
                .map(|m| NodeInfo {
                    ready: m.info.ready && m.age_ms <= stale,
                    ..m.info
                })
                .collect();
            self.rebalance(nodes);
        } else {
            // Moves resume from an empty bucket.
            *self.bucket.lock().unwrap_or_else(|p| p.into_inner()) = (0.0, Instant::now());
        }
    }

    fn count_states(&self, members: &[Member]) {
        let (mut ready, mut draining, mut unready) = (0, 0, 0);
        for m in members {
            match (m.info.draining, m.info.ready) {
                (true, _) => draining += 1,
                (false, true) => ready += 1,
                (false, false) => unready += 1,
            }
        }
        for (state, n) in [
            ("ready", ready),
            ("draining", draining),
            ("unready", unready),
        ] {
            self.nodes.with_label_values(&[state]).set(n);
        }
    }

    /// Move up to this heartbeat's budget of connections whose place is now on another node.
    fn rebalance(&self, nodes: Vec<NodeInfo>) {
        if self.cfg.rebalance_rate == 0 {
            return;
        }
        let placement = Placement::new(nodes, self.cfg.balance_epsilon);
        let now = self.hub.connections() as u64;
        let previous = self.previous.swap(now, Ordering::AcqRel);
        let Some(me) = placement
            .nodes()
            .iter()
            .position(|n| n.id == self.cfg.node_id)
        else {
            return;
        };
        let eligible = placement.nodes().iter().filter(|n| n.eligible()).count();
        if eligible < 2 {
            *self.bucket.lock().unwrap_or_else(|p| p.into_inner()) = (0.0, Instant::now());
            return;
        }
        let budget = self.take_budget(eligible);
        if budget == 0 {
            return;
        }
        let mut loads = placement.loads();
        // Our own count without the connections already leaving. The others' counts are up to a heartbeat old,
        // so while clients pour in (a node died and they come back) our fresh count would look over a bound
        // computed from their stale ones: the lower of now and a round ago compares like with like.
        loads[me] = now.min(previous).saturating_sub(self.hub.moving() as u64);
        // Moves still in flight count at their target: its announced count may not show them yet.
        {
            let window = self.close_spread + 2 * self.cfg.heartbeat;
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            pending.retain(|(at, _)| at.elapsed() < window);
            for (_, id) in pending.iter() {
                if let Some(i) = placement.nodes().iter().position(|n| &n.id == id) {
                    loads[i] += 1;
                }
            }
        }
        // Hysteresis: a node within the bound moves nobody. Arrivals fill nodes up to the bound, so a node
        // below it holds what placement allows; moving its clients "home" whenever the loads shift would move
        // them back and forth. Above it (a node joined, or one left and the balancer refilled the others), the
        // excess moves, and no more.
        let over = placement.bound(&loads, 0);
        if loads[me] <= over {
            return;
        }
        // Every other eligible node may be moving clients to the same target in this round: each takes at
        // most its share of the target's room below the bound, so together they do not overshoot it.
        let bound = placement.bound(&loads, 1);
        let senders = (eligible - 1).max(1) as u64;
        let share: Vec<u64> = loads
            .iter()
            .map(|&l| bound.saturating_sub(l).div_ceil(senders))
            .collect();
        let mut sent = vec![0u64; loads.len()];
        let targets = plan(&placement, &loads, me);
        let owners: Vec<Option<usize>> = (0..PARTITIONS)
            .map(|p| placement.ranked(p).first().copied())
            .collect();
        let cooldown = self.cfg.rebalance_cooldown;
        let budget = budget.min((loads[me] - over) as usize);
        let mut moved = 0;
        // Clients away from their partition's owner go first (a move that also brings a client home), then
        // the others whose place is elsewhere.
        for away_first in [true, false] {
            let candidates = self.hub.movable(budget - moved, |partition, age| {
                let p = partition as usize;
                age >= cooldown
                    && targets[p].is_some_and(|t| t != me)
                    && (!away_first || owners[p] != Some(me))
            });
            for conn in candidates {
                if loads[me] <= over {
                    break;
                }
                // Decided again with the moves made so far counted.
                let mut without = loads.clone();
                without[me] = without[me].saturating_sub(1);
                let Some(to) = placement.pick(conn.partition, &without) else {
                    continue;
                };
                if to == me || sent[to] >= share[to] {
                    continue;
                }
                if self.hub.move_away(&conn) {
                    loads[me] = loads[me].saturating_sub(1);
                    loads[to] += 1;
                    sent[to] += 1;
                    moved += 1;
                    self.rebalanced.inc();
                    self.pending
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((Instant::now(), placement.nodes()[to].id.clone()));
                }
            }
            if moved >= budget || loads[me] <= over {
                break;
            }
        }
        if moved > 0 {
            self.spend(moved);
            tracing::debug!(
                moved,
                eligible,
                "rebalancing: connections told to reconnect elsewhere"
            );
        }
    }

    /// Refill the bucket for the time since the last refill and return how many whole moves it allows.
    fn take_budget(&self, eligible: usize) -> usize {
        let per_node = f64::from(self.cfg.rebalance_rate) / eligible.max(1) as f64;
        let cap = (per_node * self.cfg.heartbeat.as_secs_f64()).max(1.0);
        let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        b.0 = (b.0 + per_node * now.duration_since(b.1).as_secs_f64()).min(cap);
        b.1 = now;
        b.0.floor() as usize
    }

    fn spend(&self, moves: usize) {
        let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        b.0 = (b.0 - moves as f64).max(0.0);
    }

    /// The cluster's metrics (names in `docs/metrics.md`).
    pub fn metric_families(&self) -> Vec<prometheus::proto::MetricFamily> {
        use prometheus::core::Collector;
        let mut out = self.nodes.collect();
        out.extend(self.rebalanced.collect());
        out.extend(self.heartbeat_errors.collect());
        out
    }
}

/// For every partition, where a client of it goes now with `me`'s load one lower: `None` where nobody is
/// eligible.
fn plan(placement: &Placement, loads: &[u64], me: usize) -> Vec<Option<usize>> {
    let mut without = loads.to_vec();
    without[me] = without[me].saturating_sub(1);
    (0..PARTITIONS)
        .map(|p| placement.pick(p, &without))
        .collect()
}

/// `GET /v1/cluster` (scope `admin`): the membership as this node's store answers now, with what placement
/// makes of it.
pub async fn handler(
    State(api): State<Api>,
    Authed(p): Authed,
) -> Result<axum::Json<Value>, ApiError> {
    p.require(Scope::Admin)?;
    let cluster = api.app.cluster.clone();
    let Some(m) = api.app.broker.membership() else {
        return Err(ApiError::NotFound(
            "this engine keeps no gateway membership".into(),
        ));
    };
    let members = api.app.resilience.broker(m.live_members()).await?;
    Ok(axum::Json(view(&cluster, members)))
}

fn view(cluster: &Cluster, members: Vec<Member>) -> Value {
    let ages: Vec<u64> = members.iter().map(|m| m.age_ms).collect();
    let placement = Placement::new(
        members.into_iter().map(|m| m.info).collect(),
        cluster.cfg.balance_epsilon,
    );
    let nodes = placement.nodes();
    let loads = placement.loads();
    let mut owned: Vec<Vec<u16>> = vec![Vec::new(); nodes.len()];
    for p in 0..PARTITIONS {
        if let Some(&i) = placement.ranked(p).first() {
            owned[i].push(p);
        }
    }
    let eligible = nodes.iter().filter(|n| n.eligible()).count();
    let nodes: Vec<Value> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let mut v = serde_json::to_value(n).unwrap_or_default();
            v["region"] = json!(n.region);
            v["heartbeat_age_ms"] = json!(ages[i]);
            v["self"] = json!(n.id == cluster.cfg.node_id);
            v["eligible"] = json!(n.eligible());
            v["owned_partitions"] = json!(owned[i].len());
            v["owned"] = json!(owned[i]);
            v
        })
        .collect();
    json!({
        "self": cluster.cfg.node_id,
        "epsilon": cluster.cfg.balance_epsilon,
        "partitions": PARTITIONS,
        "eligible": eligible,
        "connections": loads.iter().zip(placement.nodes()).filter(|(_, n)| n.eligible()).map(|(l, _)| l).sum::<u64>(),
        "bound": if eligible == 0 { Value::Null } else { json!(placement.bound(&loads, 1)) },
        "nodes": nodes,
    })
}
