//! The `rebalance` scenario: N gateways on one redis-server, C WebSocket clients of C distinct subjects, then one
//! more gateway joins; connections per gateway are sampled from the membership over time into a CSV.
//!
//! Clients place themselves as a balancer would (design of issue 12, section 6): they read the membership
//! (`Membership::members`), add what they placed since the last read, and connect to
//! `Placement::pick(partition_of(sub))`. A client told `goaway` waits for its close and is placed again, so the
//! figures show what the gateways' own rebalancing does (paced by `--rebalance-rate`, never before
//! `--rebalance-cooldown-ms`), without `ferry balancer` in the loop.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use ferry_broker::placement::{Placement, partition_of};
use ferry_broker::{Broker, EngineConfig, NodeInfo, RedisBroker};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::gw;

#[derive(Debug, Clone)]
pub struct Params {
    pub gateways: usize,
    pub clients: usize,
    pub join_after: Duration,
    pub run_for: Duration,
    pub sample: Duration,
    pub epsilon: f64,
    pub rebalance_rate: u32,
    pub cooldown_ms: u64,
    pub close_spread_ms: u64,
}

/// Client-side placement: the membership read every 500 ms plus what was placed since.
struct Router {
    broker: RedisBroker,
    epsilon: f64,
    state: Mutex<Option<(Instant, Placement, Vec<u64>)>>,
}

impl Router {
    async fn pick(&self, sub: &str) -> Option<String> {
        let stale = self
            .state
            .lock()
            .unwrap()
            .as_ref()
            .is_none_or(|(at, _, _)| at.elapsed() > Duration::from_millis(500));
        if stale {
            let members = self.broker.membership()?.members().await.ok()?;
            let p = Placement::new(members, self.epsilon);
            let loads = p.loads();
            *self.state.lock().unwrap() = Some((Instant::now(), p, loads));
        }
        let mut g = self.state.lock().unwrap();
        let (_, p, loads) = g.as_mut()?;
        let at = p.pick(partition_of(None, sub), loads)?;
        loads[at] += 1;
        Some(p.nodes()[at].url.clone())
    }
}

async fn start_gateway(
    bin: &Path,
    redis: &str,
    dir: &Path,
    k: usize,
    p: &Params,
    http: &reqwest::Client,
) -> anyhow::Result<gw::Server> {
    let port = gw::free_port()?;
    let log = dir.join(format!("gateway-{k}.log"));
    let f = std::fs::File::create(&log)?;
    let args: Vec<String> = [
        "gateway",
        "--redis",
        redis,
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--jwt-secret",
        gw::BENCH_SECRET,
        "--balance-epsilon",
        &p.epsilon.to_string(),
        "--rebalance-rate",
        &p.rebalance_rate.to_string(),
        "--rebalance-cooldown-ms",
        &p.cooldown_ms.to_string(),
        "--ws-close-spread-ms",
        &p.close_spread_ms.to_string(),
        "--drain-delay-ms",
        "0",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let mut child = gw::raised_nofile(bin, &args)
        .env("FERRY_LOG", "warn")
        .stdout(f.try_clone()?)
        .stderr(f)
        .spawn()
        .context("spawning ferry gateway")?;
    let pid = child.id().context("gateway pid")?;
    gw::wait_healthy(http, port, &mut child, &log, Duration::from_secs(30)).await?;
    Ok(gw::Server {
        child,
        pid,
        port,
        log,
    })
}

/// One client for the whole run: connect where the router says, stay until told to go away, again.
async fn client(
    router: Arc<Router>,
    sub: String,
    moves: Arc<Mutex<Vec<f64>>>,
    t0: Instant,
    end: Instant,
) {
    let token = match gw::token(&sub, &["subscribe"]) {
        Ok(t) => t,
        Err(_) => return,
    };
    while Instant::now() < end {
        let Some(url) = router.pick(&sub).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let ws_url = format!("{}/v1/ws?token={token}", url.replacen("http", "ws", 1));
        let Ok((mut ws, _)) = tokio_tungstenite::connect_async(ws_url).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let left = end.saturating_duration_since(Instant::now());
        let _ = tokio::time::timeout(left, async {
            while let Some(Ok(m)) = ws.next().await {
                match m {
                    Message::Text(t) => {
                        let v: Value = serde_json::from_str(t.as_str()).unwrap_or_default();
                        if v["type"] == "goaway" && v["reason"] == "rebalance" {
                            moves.lock().unwrap().push(t0.elapsed().as_secs_f64());
                        }
                    }
                    Message::Close(_) => break,
                    _ => {}
                }
            }
        })
        .await;
    }
}

/// One sample: seconds since the first client, connections by node id, max/mean of the eligible nodes, how
/// many are eligible.
type Row = (f64, BTreeMap<String, u64>, Option<f64>, usize);

fn max_over_mean(nodes: &[NodeInfo]) -> Option<f64> {
    let loads: Vec<f64> = nodes
        .iter()
        .filter(|n| n.eligible())
        .map(|n| n.connections as f64)
        .collect();
    let total: f64 = loads.iter().sum();
    (total > 0.0).then(|| loads.iter().cloned().fold(0.0, f64::max) * loads.len() as f64 / total)
}

pub async fn run(bin: &Path, p: &Params, csv: &Path) -> anyhow::Result<Value> {
    let redis = crate::server::BenchRedis::start().await?;
    let dir = tempfile::tempdir()?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let mut servers = Vec::new();
    for k in 0..p.gateways {
        servers.push(start_gateway(bin, &redis.url(), dir.path(), k, p, &http).await?);
    }
    let watcher = RedisBroker::connect(&[redis.url()], EngineConfig::default()).await?;
    let members = || async {
        watcher
            .membership()
            .context("no membership")?
            .members()
            .await
            .context("reading the membership")
    };
    // Every gateway announced and ready before clients come.
    let ready_by = Instant::now() + Duration::from_secs(30);
    while members().await?.iter().filter(|n| n.eligible()).count() < p.gateways {
        anyhow::ensure!(Instant::now() < ready_by, "gateways not ready within 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let router = Arc::new(Router {
        broker: RedisBroker::connect(&[redis.url()], EngineConfig::default()).await?,
        epsilon: p.epsilon,
        state: Mutex::new(None),
    });
    let t0 = Instant::now();
    let end = t0 + p.run_for;
    let moves: Arc<Mutex<Vec<f64>>> = Arc::default();
    let mut tasks = Vec::new();
    for i in 0..p.clients {
        tasks.push(tokio::spawn(client(
            router.clone(),
            format!("rebalance-{i}"),
            moves.clone(),
            t0,
            end,
        )));
        if i % 50 == 49 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let mut rows: Vec<Row> = Vec::new();
    let mut order: Vec<String> = Vec::new();
    let mut joined_at = None;
    let samples = AtomicU64::new(0);
    while Instant::now() < end {
        if joined_at.is_none() && t0.elapsed() >= p.join_after {
            servers.push(start_gateway(bin, &redis.url(), dir.path(), p.gateways, p, &http).await?);
            joined_at = Some(t0.elapsed().as_secs_f64());
        }
        let nodes = members().await?;
        for n in &nodes {
            if !order.contains(&n.id) {
                order.push(n.id.clone());
            }
        }
        let by: BTreeMap<String, u64> = nodes
            .iter()
            .map(|n| (n.id.clone(), n.connections))
            .collect();
        let eligible = nodes.iter().filter(|n| n.eligible()).count();
        rows.push((
            t0.elapsed().as_secs_f64(),
            by,
            max_over_mean(&nodes),
            eligible,
        ));
        samples.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(p.sample).await;
    }
    for t in tasks {
        let _ = t.await;
    }
    // CSV: time, one column per gateway (in order of appearance), max/mean of the eligible ones.
    let mut out = String::from("t_s");
    for (k, _) in order.iter().enumerate() {
        out.push_str(&format!(",gw{k}"));
    }
    out.push_str(",max_over_mean\n");
    for (t, by, ratio, _) in &rows {
        out.push_str(&format!("{t:.2}"));
        for id in &order {
            out.push_str(&format!(",{}", by.get(id).copied().unwrap_or(0)));
        }
        out.push_str(&format!(
            ",{}\n",
            ratio.map_or(String::new(), |r| format!("{r:.3}"))
        ));
    }
    std::fs::write(csv, out).with_context(|| format!("writing {}", csv.display()))?;
    let moves = moves.lock().unwrap().clone();
    let mut per_sec: BTreeMap<u64, u64> = BTreeMap::new();
    for m in &moves {
        *per_sec.entry(*m as u64).or_default() += 1;
    }
    let joined = joined_at.unwrap_or(f64::MAX);
    let before = rows
        .iter()
        .rev()
        .find(|(t, _, _, _)| *t < joined)
        .and_then(|r| r.2);
    // From the join to the first sample where the newcomer takes clients and max/mean is within 1.2.
    let settled = rows
        .iter()
        .find(|(t, _, r, eligible)| {
            *t > joined && *eligible > p.gateways && r.is_some_and(|r| r <= 1.2)
        })
        .map(|(t, _, _, _)| t - joined);
    for s in &mut servers {
        let _ = s.stop().await;
    }
    Ok(json!({
        "scenario": "rebalance",
        "gateways": p.gateways,
        "clients": p.clients,
        "epsilon": p.epsilon,
        "rebalance_rate": p.rebalance_rate,
        "rebalance_cooldown_ms": p.cooldown_ms,
        "joined_at_s": joined_at,
        "max_over_mean_before_join": before,
        "max_over_mean_at_end": rows.last().and_then(|r| r.2),
        "secs_to_max_over_mean_1_2_after_join": settled,
        "rebalance_moves": moves.len(),
        "rebalance_moves_after_join": moves.iter().filter(|m| **m >= joined).count(),
        "max_moves_in_one_second": per_sec.values().max().copied().unwrap_or(0),
        "samples": samples.load(Ordering::Relaxed),
        "csv": csv.display().to_string(),
    }))
}

/// Where the CSV goes by default.
pub fn default_csv() -> PathBuf {
    PathBuf::from("rebalance.csv")
}
