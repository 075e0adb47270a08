//! The `autoscale` scenario: `ferry autoscaler` with the `local` actuator under a burst.
//!
//! A private redis-server, a regions file with one region (`local`, one queue, the `local` actuator starting
//! `ferry worker` processes on this machine), the release `ferry autoscaler` with its admin listener. Once the
//! pool is at its minimum, N `ferry.sleep` jobs are enqueued at once; every `sample_ms` the backlog and active
//! jobs (the broker's `QueueStats`) and the pool (`ferry_autoscaler_current_workers`, and the decision
//! `ferry_autoscaler_desired_workers{queue="all"}` from `/metrics`) are sampled, until the backlog is drained
//! and the pool is back at its minimum — bounded by `max_secs`. The autoscaler is then stopped with SIGTERM
//! and must exit 0 (it drains its workers first).
//!
//! Output: the samples as JSON and CSV, a summary (time to drain, peak workers, time back to the minimum,
//! drain time against the target), and optionally a PNG of backlog and workers over time ([`plot`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use ferry_broker::{EngineConfig, Jobs, Operations, RedisBroker};
use ferry_core::{Kind, NewJob, QueueName};
use serde::Serialize;
use serde_json::json;
use tokio::process::{Child, Command};

use crate::redis_cpu::round;
use crate::server::BenchRedis;
use crate::{gw, procs};

/// The region's name in the regions file and in the metrics' `region` label.
pub const REGION: &str = "local";

/// Where the plot's font is read from at run time (Debian/Ubuntu package `fonts-dejavu-core`).
pub const FONT_PATH: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Parameters of one run.
#[derive(Debug, Clone, Serialize)]
pub struct Params {
    pub jobs: u64,
    pub job_ms: u64,
    pub queue: String,
    pub min_workers: u32,
    pub max_workers: u32,
    pub target_drain_seconds: f64,
    pub scale_down_stabilization_seconds: f64,
    /// Arguments of every `ferry worker` the local actuator starts.
    pub worker_args: Vec<String>,
    /// The autoscaler's decision interval.
    pub interval_ms: u64,
    pub sample_ms: u64,
    pub max_secs: u64,
    pub enqueue_chunk: usize,
    pub ferry_bin: PathBuf,
}

/// One observation.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Seconds since the burst started (the first enqueue call).
    pub t: f64,
    /// Jobs waiting (`QueueStats.depth`).
    pub backlog: u64,
    /// Jobs leased to workers (`QueueStats.active`).
    pub active: u64,
    /// `ferry_autoscaler_current_workers{region}`: the pool when the last decision was made.
    pub workers: Option<f64>,
    /// `ferry_autoscaler_desired_workers{queue="all",region}`: the last decision.
    pub desired: Option<f64>,
}

/// The figures of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub enqueue_secs: Option<f64>,
    /// First sample with more workers than the minimum.
    pub first_scale_up_secs: Option<f64>,
    pub peak_workers: f64,
    pub peak_workers_at_secs: Option<f64>,
    pub peak_desired: f64,
    /// First sample with nothing waiting or running (after the whole burst was enqueued).
    pub drained_secs: Option<f64>,
    /// `drained_secs / target_drain_seconds`.
    pub drain_vs_target: Option<f64>,
    /// Jobs / drained_secs.
    pub jobs_per_sec: Option<f64>,
    /// First sample after the drain with the pool and the decision back at the minimum.
    pub back_to_min_secs: Option<f64>,
    pub back_to_min_after_drain_secs: Option<f64>,
    /// `ferry_autoscaler_decisions_total` at the end, by direction.
    pub decisions_up: Option<f64>,
    pub decisions_down: Option<f64>,
    /// The queue at the end.
    pub delivered: u64,
    pub dead: u64,
    pub left_waiting: u64,
    pub left_active: u64,
    /// The autoscaler's exit code after SIGTERM (0 expected).
    pub autoscaler_exit_code: Option<i32>,
}

/// What a run produced; `error` is set when it did not complete (the samples so far are kept).
#[derive(Debug, Serialize)]
pub struct RunResult {
    pub params: Params,
    pub summary: Summary,
    pub samples: Vec<Sample>,
    pub error: Option<String>,
}

/// The regions file for one region on `redis_url`.
pub fn regions_toml(p: &Params, redis_url: &str) -> String {
    let args: Vec<String> = p.worker_args.iter().map(|a| format!("{a:?}")).collect();
    format!(
        r#"[[regions]]
name = "{REGION}"
redis = ["{redis_url}"]
queues = ["{queue}"]

[regions.policy]
min-workers = {min}
max-workers = {max}
target-drain-seconds = {target:?}
scale-down-stabilization-seconds = {stab:?}

[regions.actuator]
kind = "local"
worker-args = [{args}]
"#,
        queue = p.queue,
        min = p.min_workers,
        max = p.max_workers,
        target = p.target_drain_seconds,
        stab = p.scale_down_stabilization_seconds,
        args = args.join(", "),
    )
}

/// The value of one series in Prometheus text, labels compared as a set (`{"region": "local"}`).
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        let (labels_text, value) = match rest.strip_prefix('{') {
            Some(r) => r.split_once('}')?,
            None => ("", rest),
        };
        if !value.starts_with(' ') {
            return None; // a longer name with this prefix
        }
        let got: BTreeMap<&str, &str> = labels_text
            .split(',')
            .filter(|kv| !kv.is_empty())
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.trim(), v.trim().trim_matches('"')))
            .collect();
        let want: BTreeMap<&str, &str> = labels.iter().copied().collect();
        (got == want).then(|| value.trim().parse().ok()).flatten()
    })
}

/// The autoscaler process; killed on drop if still running.
struct Scaler {
    child: Child,
    log: PathBuf,
}

impl Scaler {
    fn log_tail(&self) -> String {
        procs::tail(&self.log, 3000)
    }

    /// SIGTERM, then wait up to `grace` for the exit code.
    async fn stop(&mut self, grace: Duration) -> anyhow::Result<i32> {
        if let Some(s) = self.child.try_wait()? {
            return Ok(s.code().unwrap_or(-1));
        }
        let pid = self.child.id().context("autoscaler has no pid")?;
        Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .stdin(Stdio::null())
            .status()
            .await
            .context("kill -TERM")?;
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(s) => Ok(s?.code().unwrap_or(-1)),
            Err(_) => {
                self.child.kill().await.ok();
                bail!(
                    "the autoscaler did not exit within {grace:?} of SIGTERM (killed); log:\n{}",
                    self.log_tail()
                )
            }
        }
    }
}

/// `GET http://127.0.0.1:<port>/metrics`, `None` when it does not answer with a success.
pub async fn fetch_metrics(http: &reqwest::Client, port: u16) -> Option<String> {
    http.get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .ok()?
        .error_for_status()
        .ok()?
        .text()
        .await
        .ok()
}

/// Run the scenario. Errors before the burst are returned; errors after it come back in `RunResult.error`
/// with the samples taken so far.
pub async fn run(p: &Params, work_dir: &Path) -> anyhow::Result<RunResult> {
    let redis = BenchRedis::start().await?;
    let url = redis.url();
    let broker = std::sync::Arc::new(
        RedisBroker::connect(std::slice::from_ref(&url), EngineConfig::default())
            .await
            .context("connecting to the private redis-server")?,
    );
    let queue = QueueName::parse(&p.queue).map_err(|e| anyhow!("--queue: {e}"))?;
    let regions = work_dir.join("regions.toml");
    std::fs::write(&regions, regions_toml(p, &url))
        .with_context(|| format!("writing {}", regions.display()))?;
    let port = gw::free_port()?;
    let log = work_dir.join("autoscaler.log");
    let log_file =
        std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let child = Command::new(&p.ferry_bin)
        .arg("autoscaler")
        .arg("--regions")
        .arg(&regions)
        .args(["--interval-ms", &p.interval_ms.to_string()])
        .args(["--admin-listen", &format!("127.0.0.1:{port}")])
        .env("FERRY_LOG", "warn,ferry_autoscaler=info")
        .env_remove("FERRY_CONFIG")
        .env_remove("FERRY_LOG_FORMAT")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {} autoscaler", p.ferry_bin.display()))?;
    let mut scaler = Scaler { child, log };
    eprintln!(
        "[loadtest] autoscaler started (admin 127.0.0.1:{port}, regions {}), waiting for {} worker(s)",
        regions.display(),
        p.min_workers
    );
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let region = [("region", REGION)];
    let all = [("queue", "all"), ("region", REGION)];

    // The pool at its minimum before the burst.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(s) = scaler.child.try_wait()? {
            bail!(
                "the autoscaler exited early ({s}); log:\n{}",
                scaler.log_tail()
            );
        }
        let text = fetch_metrics(&http, port).await.unwrap_or_default();
        if metric_value(&text, "ferry_autoscaler_current_workers", &region)
            == Some(f64::from(p.min_workers))
        {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "the pool never reached {} worker(s) within 60 s; log:\n{}",
                p.min_workers,
                scaler.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "[loadtest] pool at {} worker(s): enqueueing {} ferry.sleep jobs of {} ms",
        p.min_workers, p.jobs, p.job_ms
    );

    // The burst, enqueued by a task while sampling starts at once.
    let t0 = Instant::now();
    let enqueue = {
        let broker = broker.clone();
        let queue = queue.clone();
        let (jobs, chunk, ms) = (p.jobs, p.enqueue_chunk as u64, p.job_ms);
        tokio::spawn(async move {
            let job = NewJob::new(Kind::parse("ferry.sleep")?, json!({ "ms": ms }));
            let mut left = jobs;
            while left > 0 {
                let n = left.min(chunk);
                broker
                    .enqueue_batch(&queue, vec![job.clone(); n as usize])
                    .await?;
                left -= n;
            }
            Ok::<f64, anyhow::Error>(t0.elapsed().as_secs_f64())
        })
    };
    let mut enqueue = Some(enqueue);
    let mut enqueue_secs = None;

    let mut samples: Vec<Sample> = Vec::new();
    let mut drained_at: Option<f64> = None;
    let mut back_at: Option<f64> = None;
    let mut error: Option<String> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(p.sample_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let limit = Duration::from_secs(p.max_secs);
    let mut last_metrics = String::new();
    loop {
        tick.tick().await;
        if enqueue.as_ref().is_some_and(|h| h.is_finished())
            && let Some(h) = enqueue.take()
        {
            match h.await {
                Ok(Ok(secs)) => enqueue_secs = Some(round(secs, 3)),
                Ok(Err(e)) => {
                    error = Some(format!("enqueueing the burst failed: {e:#}"));
                    break;
                }
                Err(e) => {
                    error = Some(format!("enqueue task: {e}"));
                    break;
                }
            }
        }
        let stats = match broker.stats(&queue).await {
            Ok(s) => s,
            Err(e) => {
                error = Some(format!("reading the queue's stats: {e}"));
                break;
            }
        };
        let text = fetch_metrics(&http, port).await.unwrap_or_default();
        let t = t0.elapsed().as_secs_f64();
        let s = Sample {
            t: round(t, 3),
            backlog: stats.depth,
            active: stats.active,
            workers: metric_value(&text, "ferry_autoscaler_current_workers", &region),
            desired: metric_value(&text, "ferry_autoscaler_desired_workers", &all),
        };
        if !text.is_empty() {
            last_metrics = text;
        }
        if drained_at.is_none() && enqueue_secs.is_some() && s.backlog == 0 && s.active == 0 {
            drained_at = Some(s.t);
            eprintln!(
                "[loadtest] drained at {:.1} s; waiting for the pool to return to {}",
                s.t, p.min_workers
            );
        }
        // `current_workers` is the pool when the last decision was made: back at the minimum once that and
        // the decision itself are the minimum.
        let min = Some(f64::from(p.min_workers));
        let at_min = s.workers == min && s.desired == min;
        samples.push(s);
        if drained_at.is_some() && at_min {
            back_at = samples.last().map(|s| s.t);
            break;
        }
        if t0.elapsed() >= limit {
            error = Some(match drained_at {
                None => format!(
                    "the backlog was not drained within --max-secs {} (last sample: {:?})",
                    p.max_secs,
                    samples.last()
                ),
                Some(d) => format!(
                    "drained at {d:.1} s but the pool was not back at {} worker(s) within --max-secs {} \
                     (last sample: {:?})",
                    p.min_workers,
                    p.max_secs,
                    samples.last()
                ),
            });
            break;
        }
        if let Some(s) = scaler.child.try_wait()? {
            error = Some(format!(
                "the autoscaler exited during the run ({s}); log:\n{}",
                scaler.log_tail()
            ));
            break;
        }
    }
    if let Some(h) = enqueue.take() {
        h.abort();
    }

    let decisions = |dir: &str| {
        metric_value(
            &last_metrics,
            "ferry_autoscaler_decisions_total",
            &[("direction", dir), ("region", REGION)],
        )
    };
    let (decisions_up, decisions_down) = (decisions("up"), decisions("down"));
    let exit = match scaler.stop(Duration::from_secs(90)).await {
        Ok(code) => {
            if code != 0 && error.is_none() {
                error = Some(format!(
                    "the autoscaler exited with {code} after SIGTERM; log:\n{}",
                    scaler.log_tail()
                ));
            }
            Some(code)
        }
        Err(e) => {
            error.get_or_insert(format!("{e:#}"));
            None
        }
    };
    let end = broker.stats(&queue).await.ok();

    let peak = samples
        .iter()
        .filter_map(|s| s.workers)
        .fold(0.0_f64, f64::max);
    let summary = Summary {
        enqueue_secs,
        first_scale_up_secs: samples
            .iter()
            .find(|s| s.workers.is_some_and(|w| w > f64::from(p.min_workers)))
            .map(|s| s.t),
        peak_workers: peak,
        peak_workers_at_secs: samples
            .iter()
            .find(|s| s.workers == Some(peak))
            .map(|s| s.t),
        peak_desired: samples
            .iter()
            .filter_map(|s| s.desired)
            .fold(0.0_f64, f64::max),
        drained_secs: drained_at,
        drain_vs_target: drained_at.map(|d| round(d / p.target_drain_seconds, 2)),
        jobs_per_sec: drained_at.map(|d| round(p.jobs as f64 / d, 0)),
        back_to_min_secs: back_at,
        back_to_min_after_drain_secs: back_at.zip(drained_at).map(|(b, d)| round(b - d, 3)),
        decisions_up,
        decisions_down,
        delivered: end.as_ref().map_or(0, |s| s.delivered),
        dead: end.as_ref().map_or(0, |s| s.dead),
        left_waiting: end.as_ref().map_or(0, |s| s.depth),
        left_active: end.as_ref().map_or(0, |s| s.active),
        autoscaler_exit_code: exit,
    };
    Ok(RunResult {
        params: p.clone(),
        summary,
        samples,
        error,
    })
}

/// The samples as CSV: `t_secs,backlog,active,workers,desired` (empty cells before the first decision).
pub fn csv(samples: &[Sample]) -> String {
    let mut out = String::from("t_secs,backlog,active,workers,desired\n");
    let opt = |v: Option<f64>| v.map_or(String::new(), |v| v.to_string());
    for s in samples {
        let _ = writeln!(
            out,
            "{},{},{},{},{}",
            s.t,
            s.backlog,
            s.active,
            opt(s.workers),
            opt(s.desired)
        );
    }
    out
}

/// The summary in a few lines for a person.
pub fn summary_text(r: &RunResult) -> String {
    let p = &r.params;
    let s = &r.summary;
    let secs = |v: Option<f64>| v.map_or("—".to_owned(), |v| format!("{v:.1} s"));
    let mut out = String::new();
    let _ = writeln!(
        out,
        "burst: {} ferry.sleep jobs of {} ms on queue {:?} (enqueued in {}); workers {} with {}",
        p.jobs,
        p.job_ms,
        p.queue,
        secs(s.enqueue_secs),
        format_args!("{}..={}", p.min_workers, p.max_workers),
        p.worker_args.join(" ")
    );
    let _ = writeln!(
        out,
        "first scale-up at {}; peak {} workers at {} (peak desired {})",
        secs(s.first_scale_up_secs),
        s.peak_workers,
        secs(s.peak_workers_at_secs),
        s.peak_desired
    );
    let _ = writeln!(
        out,
        "drained at {} (target {} s: {}), {} jobs/s on average",
        secs(s.drained_secs),
        p.target_drain_seconds,
        s.drain_vs_target
            .map_or("—".to_owned(), |r| format!("{r:.2}× the target")),
        s.jobs_per_sec.map_or("—".to_owned(), |v| v.to_string())
    );
    let _ = writeln!(
        out,
        "back to {} worker(s) at {} ({} after the drain; scale-down window {} s); decisions up {} / down {}",
        p.min_workers,
        secs(s.back_to_min_secs),
        secs(s.back_to_min_after_drain_secs),
        p.scale_down_stabilization_seconds,
        s.decisions_up.unwrap_or(0.0),
        s.decisions_down.unwrap_or(0.0)
    );
    let _ = writeln!(
        out,
        "queue at the end: delivered {}, dead {}, waiting {}, active {}; autoscaler exit code {}",
        s.delivered,
        s.dead,
        s.left_waiting,
        s.left_active,
        s.autoscaler_exit_code
            .map_or("—".to_owned(), |c| c.to_string())
    );
    out
}

/// The PNG of backlog and workers over time: two stacked panels sharing the time axis.
pub mod plot {
    use std::path::Path;

    use anyhow::{Context, anyhow, bail};
    use plotters::prelude::*;
    use plotters::style::{FontStyle, register_font};

    use super::{FONT_PATH, RunResult};

    const FONT: &str = "sans-serif";

    /// Read DejaVu Sans and register it as the plots' `sans-serif` (once per process).
    pub fn load_font() -> anyhow::Result<()> {
        static DONE: std::sync::OnceLock<()> = std::sync::OnceLock::new();
        if DONE.get().is_some() {
            return Ok(());
        }
        let bytes = std::fs::read(FONT_PATH).map_err(|e| {
            anyhow!(
                "cannot read the plot font {FONT_PATH} ({e}): install the Debian package fonts-dejavu-core \
                 (apt-get install fonts-dejavu-core), or run without --plot"
            )
        })?;
        // plotters keeps fonts for the life of the process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        register_font(FONT, FontStyle::Normal, bytes)
            .map_err(|_| anyhow!("{FONT_PATH} is not a usable TrueType font"))?;
        let _ = DONE.set(());
        Ok(())
    }

    fn step(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
        let mut out = Vec::with_capacity(points.len() * 2);
        for (i, &(x, y)) in points.iter().enumerate() {
            if i > 0 {
                out.push((x, points[i - 1].1));
            }
            out.push((x, y));
        }
        out
    }

    /// Draw `r` to `path` (PNG, 1400×900).
    pub fn draw(r: &RunResult, path: &Path) -> anyhow::Result<()> {
        load_font()?;
        if r.samples.is_empty() {
            bail!("no samples to plot");
        }
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        draw_inner(r, path).map_err(|e| anyhow!("drawing {}: {e}", path.display()))
    }

    fn draw_inner(r: &RunResult, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
        let p = &r.params;
        let s = &r.summary;
        let x_max = r.samples.last().map_or(1.0, |s| s.t).max(1.0) * 1.02;
        let backlog_max = r
            .samples
            .iter()
            .map(|s| s.backlog)
            .max()
            .unwrap_or(0)
            .max(1) as f64
            * 1.1;
        let workers_max = f64::from(p.max_workers) + 1.0;

        let root = BitMapBackend::new(path, (1400, 900)).into_drawing_area();
        root.fill(&WHITE)?;
        let title = format!(
            "ferry autoscaler, local actuator: a burst of {} ferry.sleep jobs of {} ms",
            p.jobs, p.job_ms
        );
        let subtitle = format!(
            "workers {}–{} ({}), target drain {} s, scale-down window {} s, decision every {} ms; \
             drained in {}, peak {} workers, back to {} at {}",
            p.min_workers,
            p.max_workers,
            p.worker_args.join(" "),
            p.target_drain_seconds,
            p.scale_down_stabilization_seconds,
            p.interval_ms,
            s.drained_secs
                .map_or("—".to_owned(), |d| format!("{d:.1} s")),
            s.peak_workers,
            p.min_workers,
            s.back_to_min_secs
                .map_or("—".to_owned(), |d| format!("{d:.1} s")),
        );
        let root = root.titled(&title, (FONT, 22))?;
        let root = root.titled(&subtitle, (FONT, 16))?;
        let (top, bottom) = root.split_vertically(420);

        let label = (FONT, 16);
        let drain_marker = s.drained_secs;

        // Backlog.
        let mut c = ChartBuilder::on(&top)
            .margin(14)
            .x_label_area_size(44)
            .y_label_area_size(84)
            .caption("Backlog", (FONT, 18))
            .build_cartesian_2d(0.0..x_max, 0.0..backlog_max)?;
        c.configure_mesh()
            .x_desc("seconds since the burst")
            .y_desc("jobs")
            .label_style(label)
            .axis_desc_style(label)
            .light_line_style(WHITE.mix(0.0))
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| format!("{v:.0}"))
            .draw()?;
        let blue = RGBColor(31, 119, 180);
        let orange = RGBColor(255, 127, 14);
        let green = RGBColor(44, 160, 44);
        let grey = RGBColor(120, 120, 120);
        c.draw_series(LineSeries::new(
            r.samples.iter().map(|s| (s.t, s.backlog as f64)),
            blue.stroke_width(2),
        ))?
        .label("waiting (QueueStats.depth)")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], blue.stroke_width(2)));
        c.draw_series(LineSeries::new(
            r.samples.iter().map(|s| (s.t, s.active as f64)),
            orange.stroke_width(2),
        ))?
        .label("running (QueueStats.active)")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], orange.stroke_width(2)));
        if let Some(d) = drain_marker {
            c.draw_series(LineSeries::new(
                vec![(d, 0.0), (d, backlog_max)],
                grey.stroke_width(1),
            ))?
            .label(format!("drained at {d:.1} s"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], grey.stroke_width(1))
            });
        }
        c.configure_series_labels()
            .label_font(label)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()?;

        // Workers.
        let mut c = ChartBuilder::on(&bottom)
            .margin(14)
            .x_label_area_size(44)
            .y_label_area_size(84)
            .caption("Workers", (FONT, 18))
            .build_cartesian_2d(0.0..x_max, 0.0..workers_max)?;
        c.configure_mesh()
            .x_desc("seconds since the burst")
            .y_desc("workers")
            .label_style(label)
            .axis_desc_style(label)
            .light_line_style(WHITE.mix(0.0))
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| format!("{v:.0}"))
            .draw()?;
        let current: Vec<(f64, f64)> = r
            .samples
            .iter()
            .filter_map(|s| s.workers.map(|w| (s.t, w)))
            .collect();
        let desired: Vec<(f64, f64)> = r
            .samples
            .iter()
            .filter_map(|s| s.desired.map(|w| (s.t, w)))
            .collect();
        c.draw_series(LineSeries::new(step(&desired), orange.stroke_width(2)))?
            .label("desired (ferry_autoscaler_desired_workers, queue=\"all\")")
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], orange.stroke_width(2))
            });
        c.draw_series(LineSeries::new(step(&current), green.stroke_width(3)))?
            .label("workers (ferry_autoscaler_current_workers)")
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], green.stroke_width(3))
            });
        for (v, name) in [(p.min_workers, "min"), (p.max_workers, "max")] {
            let v = f64::from(v);
            c.draw_series(LineSeries::new(
                vec![(0.0, v), (x_max, v)],
                grey.stroke_width(1),
            ))?;
            c.draw_series(std::iter::once(Text::new(
                format!("{name} {v:.0}"),
                (x_max * 0.005, v + 0.4),
                (FONT, 14).into_font().color(&grey),
            )))?;
        }
        if let Some(d) = drain_marker {
            c.draw_series(LineSeries::new(
                vec![(d, 0.0), (d, workers_max)],
                grey.stroke_width(1),
            ))?;
        }
        c.configure_series_labels()
            .label_font(label)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()?;
        root.present()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_values_match_name_and_label_set() {
        let text = "# HELP x\n\
            ferry_autoscaler_current_workers{region=\"local\"} 5\n\
            ferry_autoscaler_current_workers_extra{region=\"local\"} 9\n\
            ferry_autoscaler_desired_workers{queue=\"burst\",region=\"local\"} 3\n\
            ferry_autoscaler_desired_workers{queue=\"all\",region=\"local\"} 4\n";
        let region = [("region", "local")];
        assert_eq!(
            metric_value(text, "ferry_autoscaler_current_workers", &region),
            Some(5.0)
        );
        assert_eq!(
            metric_value(
                text,
                "ferry_autoscaler_desired_workers",
                &[("region", "local"), ("queue", "all")]
            ),
            Some(4.0)
        );
        assert_eq!(
            metric_value(text, "ferry_autoscaler_desired_workers", &region),
            None
        );
    }

    #[test]
    fn samples_become_csv_with_empty_cells_before_a_decision() {
        let s = [
            Sample {
                t: 0.0,
                backlog: 10,
                active: 2,
                workers: None,
                desired: None,
            },
            Sample {
                t: 0.25,
                backlog: 5,
                active: 3,
                workers: Some(1.0),
                desired: Some(4.0),
            },
        ];
        assert_eq!(
            csv(&s),
            "t_secs,backlog,active,workers,desired\n0,10,2,,\n0.25,5,3,1,4\n"
        );
    }
}
