//! The `api` scenario: jobs submitted over HTTP to a `ferry gateway` and processed by one `ferry worker` on
//! the same redis-server; completion observed the way an application would, over a WebSocket per subject
//! (auto-subscribed to `user:<sub>`, `job.completed` frames).
//!
//! * latency phases: single POSTs at fixed offered rates for N seconds → achieved jobs/s and
//!   submit→`job.completed` p50/p99 (the first tenth, at most 1 s, is warm-up and not counted);
//! * throughput phases: as many single POSTs (then batch POSTs) as a fixed number of in-flight requests can
//!   push for N seconds → accepted jobs/s.
//!
//! `ferry gateway` has no flag for its HTTP rate limit (100 requests/s per subject, burst 200): the load is
//! spread round-robin over many subjects (`--subjects`, default 200, so at most 20,000 requests/s are allowed
//! in all); 429 answers are counted and reported.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::gw;
use crate::redis_cpu::round;
use crate::server::BenchRedis;
use crate::stats::Latency;

#[derive(Debug, Clone)]
pub struct Params {
    pub subjects: usize,
    pub rates: Vec<u64>,
    pub latency_secs: u64,
    pub throughput_secs: u64,
    pub batch_size: usize,
    pub in_flight: usize,
    pub worker_concurrency: u32,
    pub worker_batch: u32,
    pub queue: String,
    pub ferry_bin: PathBuf,
}

type Completions = Arc<Mutex<HashMap<String, Instant>>>;

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn watch_user_channel(
    port: u16,
    token: &str,
    done: Completions,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    tcp.set_nodelay(true)?;
    let url = format!("ws://127.0.0.1:{port}/v1/ws?token={token}");
    let (mut ws, _) = tokio_tungstenite::client_async(url, tcp).await?;
    Ok(tokio::spawn(async move {
        while let Some(Ok(m)) = ws.next().await {
            let Message::Text(t) = m else { continue };
            if !t.as_str().contains("\"job.completed\"") {
                continue;
            }
            let now = Instant::now();
            if let Ok(v) = serde_json::from_str::<Value>(t.as_str())
                && let Some(id) = v["data"]["id"].as_str()
            {
                lock(&done).insert(id.to_owned(), now);
            }
        }
    }))
}

#[derive(Debug, Default)]
pub(crate) struct Tally {
    pub(crate) accepted: AtomicU64,
    pub(crate) rate_limited: AtomicU64,
    pub(crate) errors: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Tally {
    pub(crate) fn error(&self, e: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        lock(&self.first_error).get_or_insert(e);
    }

    pub(crate) fn json(&self) -> Value {
        json!({
            "accepted_requests": self.accepted.load(Ordering::Relaxed),
            "rate_limited_429": self.rate_limited.load(Ordering::Relaxed),
            "errors": self.errors.load(Ordering::Relaxed),
            "first_error": lock(&self.first_error).clone(),
        })
    }
}

/// POST one body; on 202 returns the JSON answer.
pub(crate) async fn post(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    body: &'static str,
    tally: &Tally,
) -> Option<Value> {
    match http
        .post(url)
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
    {
        Ok(r) if r.status().as_u16() == 202 => match r.json::<Value>().await {
            Ok(v) => {
                tally.accepted.fetch_add(1, Ordering::Relaxed);
                Some(v)
            }
            Err(e) => {
                tally.error(format!("reading the answer: {e}"));
                None
            }
        },
        Ok(r) if r.status().as_u16() == 429 => {
            tally.rate_limited.fetch_add(1, Ordering::Relaxed);
            None
        }
        Ok(r) => {
            tally.error(format!("HTTP {}", r.status()));
            None
        }
        Err(e) => {
            tally.error(e.to_string());
            None
        }
    }
}

pub(crate) const SINGLE_BODY: &str = r#"{"kind":"ferry.noop","payload":{}}"#;

async fn latency_phase(
    http: &reqwest::Client,
    url: &str,
    tokens: &Arc<Vec<String>>,
    done: &Completions,
    rate: u64,
    secs: u64,
    in_flight: usize,
) -> anyhow::Result<Value> {
    let total = rate * secs;
    let warm = (total / 10).min(rate);
    let sent: Arc<Mutex<Vec<(String, Instant, bool)>>> =
        Arc::new(Mutex::new(Vec::with_capacity(total as usize)));
    let tally = Arc::new(Tally::default());
    let sem = Arc::new(Semaphore::new(in_flight));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut i = 0u64;
    let hard_stop = start + Duration::from_secs(secs * 3 + 10);
    while i < total && Instant::now() < hard_stop {
        tick.tick().await;
        let due = ((start.elapsed().as_secs_f64() * rate as f64) as u64 + 1).min(total);
        while i < due {
            let permit = sem.clone().acquire_owned().await?;
            let (http, url, tokens, sent, tally) = (
                http.clone(),
                url.to_owned(),
                tokens.clone(),
                sent.clone(),
                tally.clone(),
            );
            let measured = i >= warm;
            let token_i = i as usize % tokens.len();
            tasks.spawn(async move {
                let t = Instant::now();
                if let Some(v) = post(&http, &url, &tokens[token_i], SINGLE_BODY, &tally).await
                    && let Some(id) = v["id"].as_str()
                {
                    lock(&sent).push((id.to_owned(), t, measured));
                }
                drop(permit);
            });
            i += 1;
        }
        while tasks.try_join_next().is_some() {}
    }
    let send_secs = start.elapsed().as_secs_f64();
    while tasks.join_next().await.is_some() {}
    // Wait (up to 15 s) for the completions.
    let wait_until = Instant::now() + Duration::from_secs(15);
    loop {
        let missing = {
            let d = lock(done);
            lock(&sent)
                .iter()
                .filter(|(id, _, _)| !d.contains_key(id))
                .count()
        };
        if missing == 0 || Instant::now() >= wait_until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let d = lock(done);
    let sent = lock(&sent);
    let mut lat = Vec::new();
    let mut missing = 0u64;
    let mut last_done = start;
    let mut completed = 0u64;
    for (id, t, measured) in sent.iter() {
        match d.get(id) {
            Some(&c) => {
                completed += 1;
                last_done = last_done.max(c);
                if *measured {
                    lat.push(c.saturating_duration_since(*t));
                }
            }
            None => missing += 1,
        }
    }
    let span = last_done.saturating_duration_since(start).as_secs_f64();
    Ok(json!({
        "offered_jobs_per_sec": rate,
        "secs": secs,
        "submitted": i,
        "achieved_submit_per_sec": round(i as f64 / send_secs, 1),
        "completed": completed,
        "achieved_jobs_per_sec": round(if span > 0.0 { completed as f64 / span } else { 0.0 }, 1),
        "missing": missing,
        "http": tally.json(),
        "latency": Latency::from_samples(lat),
    }))
}

async fn throughput_phase(
    http: &reqwest::Client,
    url: &str,
    tokens: &Arc<Vec<String>>,
    body: &'static str,
    jobs_per_request: u64,
    secs: u64,
    in_flight: usize,
) -> Value {
    let tally = Arc::new(Tally::default());
    let next = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..in_flight {
        let (http, url, tokens, tally, next) = (
            http.clone(),
            url.to_owned(),
            tokens.clone(),
            tally.clone(),
            next.clone(),
        );
        tasks.spawn(async move {
            // Bounded by time and by a generous request count.
            for _ in 0..10_000_000u64 {
                if Instant::now() >= end {
                    break;
                }
                let k = next.fetch_add(1, Ordering::Relaxed) as usize % tokens.len();
                let _ = post(&http, &url, &tokens[k], body, &tally).await;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = start.elapsed().as_secs_f64();
    let accepted = tally.accepted.load(Ordering::Relaxed);
    let mut v = tally.json();
    v["jobs_per_request"] = json!(jobs_per_request);
    v["in_flight"] = json!(in_flight);
    v["secs"] = json!(round(elapsed, 3));
    v["accepted_jobs_per_sec"] = json!(round((accepted * jobs_per_request) as f64 / elapsed, 1));
    v["requests_per_sec"] = json!(round(accepted as f64 / elapsed, 1));
    v
}

pub async fn run(p: &Params) -> anyhow::Result<Value> {
    if p.batch_size == 0 || p.batch_size > 1000 {
        bail!("--batch-size must be 1..=1000 (the gateway's max_batch)");
    }
    let logdir = tempfile::tempdir()?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(p.in_flight.max(64))
        .timeout(Duration::from_secs(30))
        .build()?;
    let redis = BenchRedis::start().await?;
    let mut gateway =
        gw::start_gateway(&p.ferry_bin, &redis.ferry_args(), logdir.path(), &http).await?;
    let mut worker = gw::start_worker(
        &p.ferry_bin,
        &redis.url(),
        &p.queue,
        p.worker_concurrency,
        p.worker_batch,
        logdir.path(),
    )?;
    let r = async {
        let tokens: Arc<Vec<String>> = Arc::new(
            (0..p.subjects)
                .map(|i| gw::token(&format!("api-{i}"), &["jobs:submit"]))
                .collect::<anyhow::Result<_>>()?,
        );
        let done: Completions = Arc::new(Mutex::new(HashMap::new()));
        let mut watchers = Vec::new();
        for t in tokens.iter() {
            watchers.push(
                watch_user_channel(gateway.port, t, done.clone())
                    .await
                    .context("opening a user-channel WebSocket")?,
            );
        }
        let single = format!("http://127.0.0.1:{}/v1/queues/{}/jobs", gateway.port, p.queue);
        let batch_url = format!(
            "http://127.0.0.1:{}/v1/queues/{}/jobs/batch",
            gateway.port, p.queue
        );
        // A short warm-up (connection pool, worker start-up).
        let _ = latency_phase(&http, &single, &tokens, &done, 500, 1, p.in_flight).await?;
        let mut latency = Vec::new();
        for &rate in &p.rates {
            eprintln!(
                "[loadtest] api: {rate} jobs/s for {}s (single POSTs, {} subjects)",
                p.latency_secs, p.subjects
            );
            let cpu0 = (
                crate::redis_cpu::proc_cpu_micros(gateway.pid).unwrap_or(0),
                crate::redis_cpu::proc_cpu_micros(worker.pid).unwrap_or(0),
                crate::redis_cpu::proc_cpu_micros(redis.pid()).unwrap_or(0),
            );
            let t0 = Instant::now();
            let mut v =
                latency_phase(&http, &single, &tokens, &done, rate, p.latency_secs, p.in_flight)
                    .await?;
            let wall = t0.elapsed().as_secs_f64();
            let cores = |pid: u32, before: u64| {
                round(
                    crate::redis_cpu::proc_cpu_micros(pid)
                        .unwrap_or(0)
                        .saturating_sub(before) as f64
                        / 1e6
                        / wall,
                    3,
                )
            };
            v["cpu_cores"] = json!({
                "gateway": cores(gateway.pid, cpu0.0),
                "worker": cores(worker.pid, cpu0.1),
                "redis": cores(redis.pid(), cpu0.2),
                "note": "over the phase including the wait for the last completions",
            });
            eprintln!(
                "[loadtest] api: {rate}/s → {} jobs/s, p50 {:?} ms, p99 {:?} ms, missing {}, 429s {}",
                v["achieved_jobs_per_sec"],
                v["latency"]["p50_ms"],
                v["latency"]["p99_ms"],
                v["missing"],
                v["http"]["rate_limited_429"]
            );
            latency.push(v);
        }
        for w in watchers {
            w.abort();
        }
        eprintln!(
            "[loadtest] api: max submit throughput, single POSTs, {}s",
            p.throughput_secs
        );
        let single_max = throughput_phase(
            &http,
            &single,
            &tokens,
            SINGLE_BODY,
            1,
            p.throughput_secs,
            p.in_flight.min(128),
        )
        .await;
        eprintln!("[loadtest] api: {single_max}");
        let body: &'static str = Box::leak(
            json!({"jobs": vec![json!({"kind": "ferry.noop", "payload": {}}); p.batch_size]})
                .to_string()
                .into_boxed_str(),
        );
        eprintln!(
            "[loadtest] api: max submit throughput, batch POSTs of {}, {}s",
            p.batch_size, p.throughput_secs
        );
        let batch_max = throughput_phase(
            &http,
            &batch_url,
            &tokens,
            body,
            p.batch_size as u64,
            p.throughput_secs,
            16,
        )
        .await;
        eprintln!("[loadtest] api: {batch_max}");
        anyhow::Ok(json!({
            "latency": latency,
            "max_submit": {"single": single_max, "batch": batch_max},
        }))
    }
    .await;
    gateway.stop().await?;
    worker.stop().await?;
    match r {
        Ok(mut v) => {
            v["params"] = json!({
                "subjects": p.subjects,
                "rates": p.rates,
                "latency_secs": p.latency_secs,
                "throughput_secs": p.throughput_secs,
                "batch_size": p.batch_size,
                "in_flight": p.in_flight,
                "worker": format!("ferry worker --concurrency {} --batch-size {}", p.worker_concurrency, p.worker_batch),
                "rate_limit_note": "ferry gateway has no rate-limit flag (100 req/s per subject, burst 200): requests are spread round-robin over `subjects` tokens",
            });
            Ok(v)
        }
        Err(e) => Err(e.context(format!(
            "gateway log tail:\n{}\nworker log tail:\n{}",
            crate::procs::tail(&gateway.log, 1500),
            crate::procs::tail(&worker.log, 1500)
        ))),
    }
}
