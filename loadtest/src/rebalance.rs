//! The `rebalance` scenario: N gateways on one redis-server behind a front, C WebSocket clients of C distinct
//! subjects, then one more gateway joins; connections per gateway (each gateway's own `ferry_ws_connections`)
//! are sampled over time into a CSV and a plot, for each front in one run:
//!
//! - `balancer`: `ferry balancer` placing by the subject's partition with bounded loads, the gateways
//!   rebalancing (`goaway` reason `rebalance`, paced by `--rebalance-rate`, never before
//!   `--rebalance-cooldown-ms`);
//! - `haproxy`: the peer, HAProxy `balance leastconn` over the same gateways (the fourth listed from the start,
//!   down until its health check passes), gateways not rebalancing (`--rebalance-rate 0`).
//!
//! Clients reconnect through the front when told to go away or closed, and leave on their own at `--churn`
//! per second for the whole population (each reconnects at once), as real clients do: that churn is all that
//! moves load to a newcomer behind leastconn.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use rand::Rng;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::autoscale::{fetch_metrics, metric_value};
use crate::gw;
use crate::procs;
use crate::proxies::{HAPROXY, Via};

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
    /// Clients leaving on their own per second, for the whole population.
    pub churn_per_sec: f64,
    pub fronts: Vec<Via>,
}

/// One sample: seconds since the first client, connections per gateway (in start order; the joiner last).
#[derive(Debug, Clone)]
pub struct Sample {
    pub t: f64,
    pub per_gateway: Vec<u64>,
}

/// One front's run.
#[derive(Debug, Clone)]
pub struct FrontRun {
    pub front: Via,
    pub joined_at: f64,
    pub samples: Vec<Sample>,
    pub summary: Value,
}

fn max_over_mean(loads: &[u64]) -> Option<f64> {
    let total: u64 = loads.iter().sum();
    (total > 0)
        .then(|| *loads.iter().max().unwrap_or(&0) as f64 * loads.len() as f64 / total as f64)
}

async fn start_gateway(
    bin: &Path,
    redis: &str,
    dir: &Path,
    port: u16,
    rate: u32,
    p: &Params,
    http: &reqwest::Client,
) -> anyhow::Result<gw::Server> {
    let log = dir.join(format!("gateway-{port}.log"));
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
        &rate.to_string(),
        "--rebalance-cooldown-ms",
        &p.cooldown_ms.to_string(),
        "--ws-close-spread-ms",
        &p.close_spread_ms.to_string(),
        "--drain-delay-ms",
        "0",
        // Every client comes from the front's address.
        "--max-unauthenticated-per-ip",
        "100000",
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

/// Start the front on a free port, over the gateways on `ports` (all of them, the joiner included).
async fn start_front(
    front: Via,
    epsilon: f64,
    bin: &Path,
    redis: &str,
    ports: &[u16],
    dir: &Path,
    http: &reqwest::Client,
) -> anyhow::Result<gw::Server> {
    let port = gw::free_port()?;
    let log = dir.join(format!("{}.log", front.as_str()));
    let f = std::fs::File::create(&log)?;
    let (out, err) = (f.try_clone()?, f);
    let child = match front {
        Via::Balancer => {
            let args: Vec<String> = [
                "balancer",
                "--redis",
                redis,
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--admin-listen",
                "off",
                "--drain-ms",
                "1000",
                "--balance-epsilon",
                &epsilon.to_string(),
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
            gw::raised_nofile(bin, &args)
                .env("FERRY_LOG", "warn")
                .stdout(out)
                .stderr(err)
                .spawn()
                .context("spawning ferry balancer")?
        }
        Via::Haproxy => {
            let mut servers = String::new();
            for (k, p) in ports.iter().enumerate() {
                servers.push_str(&format!("  server g{k} 127.0.0.1:{p}\n"));
            }
            let cfg = dir.join("haproxy.cfg");
            std::fs::write(
                &cfg,
                format!(
                    "global\n  maxconn 9500\n\ndefaults\n  mode http\n  timeout connect 2s\n  \
                     timeout client 120s\n  timeout server 120s\n  timeout tunnel 1h\n  \
                     timeout http-request 10s\n\nfrontend fe\n  bind 127.0.0.1:{port}\n  \
                     default_backend gw\n\nbackend gw\n  balance leastconn\n  \
                     option httpchk GET /readyz\n  default-server check inter 500ms fall 2 rise 1\n{servers}"
                ),
            )?;
            let args: Vec<String> = vec!["-db".into(), "-f".into(), cfg.display().to_string()];
            gw::raised_nofile(Path::new(HAPROXY), &args)
                .stdout(out)
                .stderr(err)
                .spawn()
                .context("spawning haproxy")?
        }
        Via::Direct => anyhow::bail!("the rebalance scenario needs a front: balancer or haproxy"),
    };
    let pid = child.id().context("front pid")?;
    let mut server = gw::Server {
        child,
        pid,
        port,
        log,
    };
    let url = format!("http://127.0.0.1:{port}/healthz");
    let start = Instant::now();
    loop {
        if let Some(status) = server.child.try_wait()? {
            anyhow::bail!(
                "{} exited ({status}); log tail:\n{}",
                front.as_str(),
                procs::tail(&server.log, 2000)
            );
        }
        if let Ok(r) = http.get(&url).send().await
            && r.status().is_success()
        {
            break;
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(30),
            "no answer through {} within 30 s",
            front.as_str()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(server)
}

/// One client for the whole run: connect through the front, stay until told to go away, closed, or its own
/// time to leave comes; again.
async fn client(
    front: String,
    sub: String,
    mean_life: Option<Duration>,
    moves: Arc<Mutex<Vec<f64>>>,
    t0: Instant,
    end: Instant,
) {
    let Ok(token) = gw::token(&sub, &["subscribe"]) else {
        return;
    };
    let url = format!("ws://{front}/v1/ws?token={token}");
    while Instant::now() < end {
        let Ok((mut ws, _)) = tokio_tungstenite::connect_async(&url).await else {
            let ms = rand::rng().random_range(50..500);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            continue;
        };
        // Exponential lifetimes: `churn` leaves per second over the population.
        let life = mean_life.map_or(end.saturating_duration_since(Instant::now()), |m| {
            let u: f64 = rand::rng().random_range(f64::EPSILON..1.0);
            m.mul_f64(-u.ln())
        });
        let left = end.saturating_duration_since(Instant::now()).min(life);
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
        let _ = ws.close(None).await;
    }
}

/// `ferry_ws_connections` of each gateway port (0 when it does not answer).
async fn connections(http: &reqwest::Client, ports: &[u16], up: usize) -> Vec<u64> {
    let mut out = Vec::with_capacity(ports.len());
    for (k, &p) in ports.iter().enumerate() {
        let text = if k < up {
            fetch_metrics(http, p).await
        } else {
            None
        };
        let v = text.and_then(|t| metric_value(&t, "ferry_ws_connections", &[]));
        out.push(v.unwrap_or(0.0) as u64);
    }
    out
}

async fn run_front(bin: &Path, p: &Params, front: Via) -> anyhow::Result<FrontRun> {
    let redis = crate::server::BenchRedis::start().await?;
    let dir = tempfile::tempdir()?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let ports: Vec<u16> = (0..=p.gateways)
        .map(|_| gw::free_port())
        .collect::<anyhow::Result<_>>()?;
    let rate = match front {
        Via::Balancer => p.rebalance_rate,
        _ => 0,
    };
    let mut servers = Vec::new();
    for &port in &ports[..p.gateways] {
        servers.push(start_gateway(bin, &redis.url(), dir.path(), port, rate, p, &http).await?);
    }
    // Every gateway announced and ready before the front and the clients come.
    let watcher =
        ferry_broker::RedisBroker::connect(&[redis.url()], ferry_broker::EngineConfig::default())
            .await?;
    let ready_by = Instant::now() + Duration::from_secs(30);
    loop {
        let m = ferry_broker::Membership::members(&watcher).await?;
        if m.iter().filter(|n| n.eligible()).count() >= p.gateways {
            break;
        }
        anyhow::ensure!(Instant::now() < ready_by, "gateways not ready within 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut front_proc = start_front(
        front,
        p.epsilon,
        bin,
        &redis.url(),
        &ports,
        dir.path(),
        &http,
    )
    .await?;
    if front == Via::Haproxy {
        // HAProxy takes a server as up until its first checks fail: the joiner is not there yet.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let front_addr = format!("127.0.0.1:{}", front_proc.port);
    let mean_life = (p.churn_per_sec > 0.0)
        .then(|| Duration::from_secs_f64(p.clients as f64 / p.churn_per_sec));

    let t0 = Instant::now();
    let end = t0 + p.run_for;
    let moves: Arc<Mutex<Vec<f64>>> = Arc::default();
    let mut tasks = Vec::new();
    for i in 0..p.clients {
        tasks.push(tokio::spawn(client(
            front_addr.clone(),
            format!("rebalance-{i}"),
            mean_life,
            moves.clone(),
            t0,
            end,
        )));
        if i % 50 == 49 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let mut samples = Vec::new();
    let mut up = p.gateways;
    let mut joined_at = None;
    while Instant::now() < end {
        if joined_at.is_none() && t0.elapsed() >= p.join_after {
            let port = ports[p.gateways];
            servers.push(start_gateway(bin, &redis.url(), dir.path(), port, rate, p, &http).await?);
            up += 1;
            joined_at = Some(t0.elapsed().as_secs_f64());
        }
        samples.push(Sample {
            t: t0.elapsed().as_secs_f64(),
            per_gateway: connections(&http, &ports, up).await,
        });
        tokio::time::sleep(p.sample).await;
    }
    for t in tasks {
        let _ = t.await;
    }
    let joined = joined_at.unwrap_or(f64::MAX);
    let before = samples
        .iter()
        .rev()
        .find(|s| s.t < joined)
        .and_then(|s| max_over_mean(&s.per_gateway[..p.gateways]));
    // From the join to the first sample where the newcomer holds clients and max/mean over all is within 1.2.
    let settled = samples
        .iter()
        .find(|s| {
            s.t > joined
                && s.per_gateway[p.gateways] > 0
                && max_over_mean(&s.per_gateway).is_some_and(|r| r <= 1.2)
        })
        .map(|s| s.t - joined);
    let last = samples
        .last()
        .map(|s| s.per_gateway.clone())
        .unwrap_or_default();
    let moves = moves.lock().unwrap().clone();
    let mut per_sec = std::collections::BTreeMap::<u64, u64>::new();
    for m in &moves {
        *per_sec.entry(*m as u64).or_default() += 1;
    }
    let _ = front_proc.stop().await;
    for s in &mut servers {
        let _ = s.stop().await;
    }
    let summary = json!({
        "front": front.as_str(),
        "gateway_rebalance_rate": rate,
        "joined_at_s": joined_at,
        "max_over_mean_before_join": before,
        "connections_at_end": last,
        "max_over_mean_at_end": max_over_mean(&last),
        "secs_to_max_over_mean_1_2_after_join": settled,
        "rebalance_moves": moves.len(),
        "max_moves_in_one_second": per_sec.values().max().copied().unwrap_or(0),
        "samples": samples.len(),
    });
    Ok(FrontRun {
        front,
        joined_at: joined,
        samples,
        summary,
    })
}

pub async fn run(bin: &Path, p: &Params, csv: &Path, png: Option<&Path>) -> anyhow::Result<Value> {
    let mut runs = Vec::new();
    for &front in &p.fronts {
        runs.push(run_front(bin, p, front).await?);
    }
    // CSV: front, time, one column per gateway (start order, the joiner last), max/mean.
    let mut out = String::from("front,t_s");
    for k in 0..=p.gateways {
        out.push_str(&format!(",gw{k}"));
    }
    out.push_str(",max_over_mean\n");
    for r in &runs {
        for s in &r.samples {
            out.push_str(&format!("{},{:.2}", r.front.as_str(), s.t));
            for c in &s.per_gateway {
                out.push_str(&format!(",{c}"));
            }
            let ratio = max_over_mean(
                &s.per_gateway[..if s.t >= r.joined_at {
                    p.gateways + 1
                } else {
                    p.gateways
                }],
            );
            out.push_str(&format!(
                ",{}\n",
                ratio.map_or(String::new(), |r| format!("{r:.3}"))
            ));
        }
    }
    std::fs::write(csv, out).with_context(|| format!("writing {}", csv.display()))?;
    if let Some(png) = png {
        plot::draw(p, &runs, png)?;
    }
    Ok(json!({
        "scenario": "rebalance",
        "gateways": p.gateways,
        "clients": p.clients,
        "epsilon": p.epsilon,
        "rebalance_rate": p.rebalance_rate,
        "rebalance_cooldown_ms": p.cooldown_ms,
        "churn_per_sec": p.churn_per_sec,
        "join_after_s": p.join_after.as_secs_f64(),
        "run_s": p.run_for.as_secs_f64(),
        "fronts": runs.iter().map(|r| r.summary.clone()).collect::<Vec<_>>(),
        "csv": csv.display().to_string(),
        "plot": png.map(|p| p.display().to_string()),
    }))
}

/// Where the CSV goes by default.
pub fn default_csv() -> PathBuf {
    PathBuf::from("rebalance.csv")
}

mod plot {
    use std::path::Path;

    use anyhow::anyhow;
    use plotters::prelude::*;

    use super::{FrontRun, Params};
    use crate::autoscale::plot::load_font;

    const FONT: &str = "sans-serif";
    const COLORS: [RGBColor; 6] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
    ];

    /// One panel per front, connections per gateway over time (PNG, 1400 × 450 per panel).
    pub fn draw(p: &Params, runs: &[FrontRun], path: &Path) -> anyhow::Result<()> {
        load_font()?;
        draw_inner(p, runs, path).map_err(|e| anyhow!("drawing {}: {e}", path.display()))
    }

    fn draw_inner(
        p: &Params,
        runs: &[FrontRun],
        path: &Path,
    ) -> Result<(), Box<dyn std::error::Error>> {
        let h = 120 + 420 * runs.len() as u32;
        let root = BitMapBackend::new(path, (1400, h)).into_drawing_area();
        root.fill(&WHITE)?;
        let title = format!(
            "{} WebSocket clients on {} gateways, a gateway joins at {:.0} s; clients leave on their own at {}/s",
            p.clients,
            p.gateways,
            p.join_after.as_secs_f64(),
            p.churn_per_sec
        );
        let root = root.titled(&title, (FONT, 22))?;
        let panels = root.split_evenly((runs.len(), 1));
        let x_max = p.run_for.as_secs_f64();
        let y_max = runs
            .iter()
            .flat_map(|r| r.samples.iter().flat_map(|s| s.per_gateway.iter().copied()))
            .max()
            .unwrap_or(1) as f64
            * 1.1;
        let label = (FONT, 16);
        for (panel, r) in panels.iter().zip(runs) {
            let caption = match r.front.as_str() {
                "balancer" => format!(
                    "ferry balancer (bounded-load consistent hash, ε {}), gateways rebalancing at {}/s",
                    p.epsilon, p.rebalance_rate
                ),
                _ => "HAProxy balance leastconn, no rebalancing".to_owned(),
            };
            let mut c = ChartBuilder::on(panel)
                .margin(14)
                .x_label_area_size(44)
                .y_label_area_size(72)
                .caption(caption, (FONT, 18))
                .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
            c.configure_mesh()
                .x_desc("seconds since the first client")
                .y_desc("connections")
                .label_style(label)
                .axis_desc_style(label)
                .light_line_style(WHITE.mix(0.0))
                .x_label_formatter(&|v| format!("{v:.0}"))
                .y_label_formatter(&|v| format!("{v:.0}"))
                .draw()?;
            for k in 0..=p.gateways {
                let color = COLORS[k % COLORS.len()];
                let name = if k == p.gateways {
                    "joining gateway".to_owned()
                } else {
                    format!("gateway {}", k + 1)
                };
                c.draw_series(LineSeries::new(
                    r.samples.iter().map(|s| (s.t, s.per_gateway[k] as f64)),
                    color.stroke_width(2),
                ))?
                .label(name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(2))
                });
            }
            let grey = RGBColor(120, 120, 120);
            c.draw_series(LineSeries::new(
                vec![(r.joined_at, 0.0), (r.joined_at, y_max)],
                grey.stroke_width(1),
            ))?;
            c.configure_series_labels()
                .label_font(label)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .position(SeriesLabelPosition::LowerRight)
                .draw()?;
        }
        root.present()?;
        Ok(())
    }
}
