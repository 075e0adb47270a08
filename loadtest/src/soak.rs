//! The `soak` scenario: a whole cluster (redis-server, PostgreSQL, one `ferry gateway` with the record, two
//! `ferry worker`s with recorders) under mixed load for a set time, sampled as it runs, then checked.
//!
//! Load, all through the gateway over HTTP and WebSocket on 127.0.0.1:
//! * submits of every kind: `ferry.noop`, `ferry.echo` with payloads up to `max_payload_kib`, `ferry.sleep`,
//!   `ferry.fail` (two attempts, then dead), delayed jobs, high and low priority, idempotent submits (keys
//!   repeat), batches of 10;
//! * cancels of a share of the submitted jobs shortly after their submit;
//! * WebSocket churn: clients that connect, subscribe to `queue:soak` and `app:soak`, read for a few seconds,
//!   close and connect again;
//! * publishes on `app:soak`.
//!
//! Every `sample_secs` it samples RSS and open files of the gateway, each worker and redis-server, Redis's
//! `used_memory`, PostgreSQL's memory (PSS of the postmaster and its children) and database size, and the live and
//! dead rows, autovacuum runs and size of each table of the record that holds rows. At the end
//! it waits for every accepted job to reach a final state in the record and counts what went wrong: jobs lost
//! (accepted, never final in the record), doubled (more than one `job.completed` row), in the wrong final state
//! (a cancel that answered 200 but the job completed, a `ferry.fail` job completed), WebSockets closed without a
//! close frame. Growth of RSS and open files between the first sample after warm-up and the last is reported
//! beside them, so a leak shows as a trend.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::{SinkExt, StreamExt};
use rand::Rng;
use serde::Serialize;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::ferry::BenchPostgres;
use crate::gw::{self, BENCH_SECRET, Server};
use crate::server::BenchRedis;

#[derive(Debug, Clone)]
pub struct Params {
    pub secs: u64,
    /// Submit requests per second (a batch counts as one request).
    pub rate: u64,
    pub ws_clients: usize,
    pub publish_rate: u64,
    /// Share of submitted jobs cancelled shortly after their submit, in percent.
    pub cancel_percent: u32,
    pub max_payload_kib: usize,
    pub sample_secs: u64,
    pub ferry_bin: PathBuf,
}

/// What a job must end as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Completed,
    Dead,
    /// A cancel answered 200: the job must end cancelled.
    Cancelled,
}

#[derive(Debug, Default)]
struct Tally {
    expect: Mutex<HashMap<String, Expect>>,
    submits: AtomicU64,
    refused: AtomicU64,
    duplicates: AtomicU64,
    cancels_ok: AtomicU64,
    cancels_late: AtomicU64,
    publishes: AtomicU64,
    ws_connects: AtomicU64,
    ws_frames: AtomicU64,
    ws_clean_closes: AtomicU64,
    ws_abrupt: AtomicU64,
    errors: Mutex<Vec<String>>,
}

impl Tally {
    fn error(&self, e: String) {
        let mut errors = self.errors.lock().unwrap();
        if errors.len() < 20 {
            errors.push(e);
        }
    }
}

#[derive(Debug, Clone, Serialize)]
struct Sample {
    t_secs: f64,
    /// Per process (`gateway`, `worker-a`, `worker-b`, `redis`): RSS in KiB and open files.
    rss_kib: HashMap<String, u64>,
    open_files: HashMap<String, u64>,
    redis_used_memory_kib: u64,
    postgres_pss_kib: u64,
    postgres_db_kib: u64,
    /// The record's tables that hold rows (each time slot's partitions, `jobs_open`): what autovacuum faces.
    record_tables: BTreeMap<String, TableHealth>,
    jobs_accepted: u64,
}

/// One table's rows and vacuuming from `pg_stat_user_tables`.
#[derive(Debug, Clone, Serialize)]
struct TableHealth {
    live: u64,
    dead: u64,
    autovacuums: u64,
    /// Table, indexes and TOAST.
    kib: u64,
}

pub async fn run(p: &Params) -> anyhow::Result<Value> {
    if p.secs == 0 || p.secs > 24 * 3600 {
        bail!("--secs must be 1..=86400");
    }
    if p.rate == 0 || p.rate > 5_000 || p.ws_clients > 2_000 || p.publish_rate > 1_000 {
        bail!("--rate must be 1..=5000, --ws-clients at most 2000, --publish-rate at most 1000");
    }
    let dir = tempfile::tempdir()?;
    let redis = BenchRedis::start().await?;
    let pg = BenchPostgres::start(&p.ferry_bin).await?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let port = gw::free_port()?;
    let gateway = spawn(
        &p.ferry_bin,
        &[
            "gateway",
            "--redis",
            &redis.url(),
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--jwt-secret",
            BENCH_SECRET,
            "--database-url",
            &pg.url,
        ],
        dir.path().join("gateway.log"),
    )?;
    let mut gateway = Server { port, ..gateway };
    gw::wait_healthy(
        &http,
        port,
        &mut gateway.child,
        &gateway.log,
        Duration::from_secs(30),
    )
    .await?;
    let mut workers = Vec::new();
    for name in ["worker-a", "worker-b"] {
        workers.push(spawn(
            &p.ferry_bin,
            &[
                "worker",
                "--redis",
                &redis.url(),
                "--queues",
                "soak",
                "--database-url",
                &pg.url,
                "--consumer",
                name,
                "--concurrency",
                "100",
                "--admin-listen",
                "127.0.0.1:0",
            ],
            dir.path().join(format!("{name}.log")),
        )?);
    }
    let base = format!("http://127.0.0.1:{port}");
    let tally = Arc::new(Tally::default());
    let started = Instant::now();
    let until = started + Duration::from_secs(p.secs);

    let mut tasks = Vec::new();
    // Submitters: requests spread over subjects so no subject passes the gateway's 100 requests/s.
    let subjects = p.rate.div_ceil(50).max(1);
    let per_subject_interval = Duration::from_secs_f64(subjects as f64 / p.rate as f64);
    let in_flight = Arc::new(tokio::sync::Semaphore::new(256));
    for s in 0..subjects {
        let token: Arc<str> = gw::token(&format!("soak-{s}"), &["admin"])?.into();
        let (http, base, tally, p) = (http.clone(), base.clone(), tally.clone(), p.clone());
        let in_flight = in_flight.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(per_subject_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while Instant::now() < until {
                tick.tick().await;
                // Requests overlap (the offered rate does not wait for answers), bounded in flight.
                let Ok(permit) = in_flight.clone().acquire_owned().await else {
                    break;
                };
                let (http, base, token, tally, p) = (
                    http.clone(),
                    base.clone(),
                    token.clone(),
                    tally.clone(),
                    p.clone(),
                );
                tokio::spawn(async move {
                    submit_one(&http, &base, &token, &tally, &p, s).await;
                    drop(permit);
                });
            }
        }));
    }
    // WebSocket churn.
    for c in 0..p.ws_clients {
        let token = gw::token(&format!("soak-ws-{c}"), &["admin"])?;
        let tally = tally.clone();
        tasks.push(tokio::spawn(async move {
            while Instant::now() < until {
                ws_session(port, &token, &tally, until).await;
            }
        }));
    }
    // Publishes.
    if p.publish_rate > 0 {
        let token = gw::token("soak-publisher", &["admin"])?;
        let (http, base, tally) = (http.clone(), base.clone(), tally.clone());
        let interval = Duration::from_secs_f64(1.0 / p.publish_rate as f64);
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            let mut n = 0u64;
            while Instant::now() < until {
                tick.tick().await;
                n += 1;
                let r = http
                    .post(format!("{base}/v1/channels/soak/publish"))
                    .bearer_auth(&token)
                    .json(&json!({ "n": n, "pad": "x".repeat(200) }))
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status().as_u16() == 202 => {
                        tally.publishes.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => tally.error(format!("publish answered {}", r.status())),
                    Err(e) => tally.error(format!("publish: {e}")),
                }
            }
        }));
    }

    // Sampling, until the load ends.
    let mut pids: Vec<(String, u32)> = vec![("gateway".into(), gateway.pid)];
    pids.extend(
        workers
            .iter()
            .zip(["worker-a", "worker-b"])
            .map(|(w, n)| (n.to_owned(), w.pid)),
    );
    pids.push(("redis".into(), redis.pid()));
    let redis_client = redis::Client::open(redis.url())?;
    let mut rconn = redis_client.get_multiplexed_async_connection().await?;
    let postmaster = Some(pg.postmaster());
    let mut samples = Vec::new();
    let redis_keys = loop {
        let s = sample(&pids, &mut rconn, postmaster, &pg.url, &tally, started).await?;
        eprintln!(
            "[soak] t={:.0}s accepted={} gateway rss={} KiB files={} redis used={} KiB",
            s.t_secs,
            s.jobs_accepted,
            s.rss_kib.get("gateway").copied().unwrap_or(0),
            s.open_files.get("gateway").copied().unwrap_or(0),
            s.redis_used_memory_kib
        );
        let tables: Vec<String> = s
            .record_tables
            .iter()
            .map(|(name, t)| {
                format!(
                    "{name} live={} dead={} autovacuums={}",
                    t.live, t.dead, t.autovacuums
                )
            })
            .collect();
        eprintln!("[soak]   record: {}", tables.join(", "));
        samples.push(s);
        if Instant::now() >= until {
            // What Redis holds at the end of the load, by kind of key.
            break redis_breakdown(&mut rconn).await?;
        }
        tokio::time::sleep(Duration::from_secs(p.sample_secs).min(until - Instant::now())).await;
    };
    for t in tasks {
        let _ = t.await;
    }
    // The submits still in flight.
    let _ = in_flight.acquire_many(256).await;

    // Every accepted job final in the record, as expected.
    let expect = tally.expect.lock().unwrap().clone();
    let drain_start = Instant::now();
    let (mut lost, mut wrong) = (Vec::new(), Vec::new());
    let doubled = loop {
        let record = record(&pg.url).await?;
        lost.clear();
        wrong.clear();
        let mut doubled = 0u64;
        for (id, want) in &expect {
            match record.get(id) {
                Some((state, completions)) => {
                    if *completions > 1 {
                        doubled += 1;
                    }
                    let ok = match (want, state.as_str()) {
                        (_, "queued" | "scheduled" | "active" | "retrying") => {
                            lost.push(id.clone());
                            continue;
                        }
                        (Expect::Completed, "completed" | "cancelled") => true,
                        (Expect::Dead, "dead" | "cancelled") => true,
                        (Expect::Cancelled, "cancelled") => true,
                        _ => false,
                    };
                    if !ok {
                        wrong.push(format!("{id}: expected {want:?}, ended {state}"));
                    }
                }
                None => lost.push(id.clone()),
            }
        }
        if lost.is_empty() || drain_start.elapsed() > Duration::from_secs(180) {
            break doubled;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let drain_secs = drain_start.elapsed().as_secs_f64();
    // Lookups through the gateway agree with the record: finished jobs answer whether Redis still holds them
    // or only the record does.
    let lookups = lookups(&http, &base, &expect, &pg.url).await?;
    // One more sample after the drain, then stop everything.
    samples.push(sample(&pids, &mut rconn, postmaster, &pg.url, &tally, started).await?);
    for w in &mut workers {
        w.stop().await?;
    }
    gateway.stop().await?;

    let growth = growth(&samples);
    let t = &tally;
    let summary = json!({
        "secs": p.secs,
        "jobs_accepted": expect.len(),
        "submit_requests": t.submits.load(Ordering::Relaxed),
        "submits_refused": t.refused.load(Ordering::Relaxed),
        "idempotent_duplicates": t.duplicates.load(Ordering::Relaxed),
        "cancels_ok": t.cancels_ok.load(Ordering::Relaxed),
        "cancels_of_finished_jobs": t.cancels_late.load(Ordering::Relaxed),
        "publishes": t.publishes.load(Ordering::Relaxed),
        "ws_connects": t.ws_connects.load(Ordering::Relaxed),
        "ws_frames_received": t.ws_frames.load(Ordering::Relaxed),
        "ws_closed_by_client": t.ws_clean_closes.load(Ordering::Relaxed),
        "ws_dropped_without_close": t.ws_abrupt.load(Ordering::Relaxed),
        "lost": lost.len(),
        "lost_examples": lost.iter().take(5).collect::<Vec<_>>(),
        "doubled": doubled,
        "wrong_final_state": wrong.len(),
        "wrong_examples": wrong.iter().take(5).collect::<Vec<_>>(),
        "drain_secs": (drain_secs * 10.0).round() / 10.0,
        "lookups": lookups,
        "redis_keys_at_end_of_load": redis_keys,
        "errors": *t.errors.lock().unwrap(),
        "growth_after_warmup": growth,
    });
    Ok(json!({
        "scenario": "soak",
        "params": {
            "secs": p.secs, "rate": p.rate, "ws_clients": p.ws_clients, "publish_rate": p.publish_rate,
            "cancel_percent": p.cancel_percent, "max_payload_kib": p.max_payload_kib,
        },
        "summary": summary,
        "samples": samples,
    }))
}

fn spawn(bin: &std::path::Path, args: &[&str], log: PathBuf) -> anyhow::Result<Server> {
    let f = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    let child = gw::raised_nofile(bin, &args)
        .env("FERRY_LOG", "warn")
        .env_remove("FERRY_DATABASE_URL")
        .stdout(f.try_clone()?)
        .stderr(f)
        .spawn()
        .with_context(|| format!("spawning ferry {}", args[0]))?;
    let pid = child.id().context("child pid")?;
    Ok(Server {
        child,
        pid,
        port: 0,
        log,
    })
}

/// One submit request of a random kind; records what each accepted job must end as, and sometimes cancels it.
async fn submit_one(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    tally: &Arc<Tally>,
    p: &Params,
    subject: u64,
) {
    let (body, expect, batch) = {
        let mut rng = rand::rng();
        let roll = rng.random_range(0..100);
        let job = |kind: &str, payload: Value| json!({ "kind": kind, "payload": payload });
        match roll {
            0..35 => (job("ferry.noop", json!({})), Expect::Completed, false),
            35..50 => {
                let kib = rng.random_range(0..=p.max_payload_kib);
                let pad = "p".repeat(kib * 1024);
                (
                    job("ferry.echo", json!({ "pad": pad })),
                    Expect::Completed,
                    false,
                )
            }
            50..60 => {
                let ms = rng.random_range(10..200);
                (
                    job("ferry.sleep", json!({ "ms": ms })),
                    Expect::Completed,
                    false,
                )
            }
            60..65 => {
                let mut j = job("ferry.fail", json!({ "error": "soak" }));
                j["max_attempts"] = json!(2);
                j["backoff"] = json!({ "base_ms": 100, "max_ms": 200 });
                (j, Expect::Dead, false)
            }
            65..75 => {
                let mut j = job("ferry.noop", json!({}));
                j["delay_ms"] = json!(rng.random_range(500..3000));
                (j, Expect::Completed, false)
            }
            75..85 => {
                let mut j = job("ferry.noop", json!({}));
                j["idempotency_key"] = json!(format!("k-{subject}-{}", rng.random_range(0..50)));
                (j, Expect::Completed, false)
            }
            85..95 => {
                let jobs: Vec<Value> = (0..10)
                    .map(|i| job("ferry.noop", json!({ "i": i })))
                    .collect();
                (json!({ "jobs": jobs }), Expect::Completed, true)
            }
            _ => {
                let mut j = job("ferry.noop", json!({}));
                j["priority"] = json!(if roll % 2 == 0 { "high" } else { "low" });
                (j, Expect::Completed, false)
            }
        }
    };
    let path = if batch { "jobs/batch" } else { "jobs" };
    tally.submits.fetch_add(1, Ordering::Relaxed);
    let r = http
        .post(format!("{base}/v1/queues/soak/{path}"))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await;
    let reply: Value = match r {
        Ok(r) if r.status().as_u16() == 202 || r.status().as_u16() == 200 => {
            r.json().await.unwrap_or(Value::Null)
        }
        Ok(r) => {
            tally.refused.fetch_add(1, Ordering::Relaxed);
            let status = r.status();
            tally.error(format!(
                "submit answered {status}: {}",
                r.text().await.unwrap_or_default()
            ));
            return;
        }
        Err(e) => {
            tally.refused.fetch_add(1, Ordering::Relaxed);
            tally.error(format!("submit: {e}"));
            return;
        }
    };
    // A batch answers `{"ids": [...]}`; a single submit `{"id", "state", "duplicate"?}`.
    let accepted: Vec<&Value> = if batch {
        reply["ids"]
            .as_array()
            .map(|a| a.iter().collect())
            .unwrap_or_default()
    } else {
        vec![&reply["id"]]
    };
    if reply["duplicate"] == true {
        tally.duplicates.fetch_add(1, Ordering::Relaxed);
    }
    let mut ids = Vec::new();
    for id in accepted {
        let Some(id) = id.as_str() else {
            tally.error(format!("a submit answered without an id: {reply}"));
            continue;
        };
        tally
            .expect
            .lock()
            .unwrap()
            .entry(id.to_owned())
            .or_insert(expect);
        ids.push(id.to_owned());
    }
    let cancel = rand::rng().random_range(0..100) < p.cancel_percent;
    if let (true, Some(id)) = (cancel, ids.first().cloned()) {
        let (http, base, token, tally) = (
            http.clone(),
            base.to_owned(),
            token.to_owned(),
            tally.clone(),
        );
        let wait = Duration::from_millis(rand::rng().random_range(0..500));
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            match http
                .delete(format!("{base}/v1/jobs/{id}"))
                .bearer_auth(&token)
                .send()
                .await
            {
                Ok(r) if r.status().as_u16() == 200 => {
                    tally.cancels_ok.fetch_add(1, Ordering::Relaxed);
                    tally.expect.lock().unwrap().insert(id, Expect::Cancelled);
                }
                Ok(r) if r.status().as_u16() == 409 => {
                    tally.cancels_late.fetch_add(1, Ordering::Relaxed);
                }
                Ok(r) => tally.error(format!("cancel answered {}", r.status())),
                Err(e) => tally.error(format!("cancel: {e}")),
            }
        });
    }
}

/// One WebSocket life: connect, subscribe to the queue and the app channel, read for 2–10 s, close.
async fn ws_session(port: u16, token: &str, tally: &Tally, until: Instant) {
    let url = format!("ws://127.0.0.1:{port}/v1/ws?token={token}");
    let Ok((mut ws, _)) = tokio_tungstenite::connect_async(url).await else {
        tally.error("websocket upgrade failed".into());
        tokio::time::sleep(Duration::from_millis(500)).await;
        return;
    };
    tally.ws_connects.fetch_add(1, Ordering::Relaxed);
    for (i, ch) in ["queue:soak", "app:soak"].iter().enumerate() {
        let frame = json!({ "id": i, "op": "subscribe", "channel": ch }).to_string();
        if ws.send(Message::text(frame)).await.is_err() {
            tally.ws_abrupt.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
    let life = Duration::from_millis(rand::rng().random_range(2_000..10_000));
    let end = (Instant::now() + life).min(until);
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, ws.next()).await {
            Err(_) => break,
            Ok(Some(Ok(Message::Text(_)))) => {
                tally.ws_frames.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Some(Ok(Message::Close(frame)))) => {
                tally.error(format!("the gateway closed a WebSocket: {frame:?}"));
                return;
            }
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(_)) | None) => {
                tally.ws_abrupt.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
    }
    let _ = ws.close(None).await;
    tally.ws_clean_closes.fetch_add(1, Ordering::Relaxed);
}

async fn sample(
    pids: &[(String, u32)],
    rconn: &mut redis::aio::MultiplexedConnection,
    postmaster: Option<u32>,
    pg_url: &str,
    tally: &Tally,
    started: Instant,
) -> anyhow::Result<Sample> {
    let mut rss = HashMap::new();
    let mut files = HashMap::new();
    for (name, pid) in pids {
        rss.insert(name.clone(), gw::rss_kib(*pid).unwrap_or(0));
        files.insert(name.clone(), open_files(*pid));
    }
    let info: String = redis::cmd("INFO").arg("memory").query_async(rconn).await?;
    let used = info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    let db_size = psql(pg_url, "select pg_database_size(current_database())")
        .await
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(0);
    let record_tables = record_tables(pg_url).await.unwrap_or_default();
    Ok(Sample {
        t_secs: (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        rss_kib: rss,
        open_files: files,
        redis_used_memory_kib: used / 1024,
        postgres_pss_kib: postmaster.map(family_pss_kib).unwrap_or(0),
        postgres_db_kib: db_size / 1024,
        record_tables,
        jobs_accepted: tally.expect.lock().unwrap().len() as u64,
    })
}

/// [`TableHealth`] of the record's tables that hold rows.
async fn record_tables(pg_url: &str) -> anyhow::Result<BTreeMap<String, TableHealth>> {
    let rows = psql(
        pg_url,
        "select relname, n_live_tup, n_dead_tup, autovacuum_count, pg_total_relation_size(relid) / 1024 \
         from pg_stat_user_tables where (relname ~ '^jobs_(p[0-9t]+|default|open)$' \
         or relname ~ '^job_events_(p[0-9t]+|default)$') and n_live_tup + n_dead_tup > 0 order by relname",
    )
    .await?;
    let mut out = BTreeMap::new();
    for line in rows.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split('|').map(str::trim).collect();
        let num = |i: usize| -> anyhow::Result<u64> {
            f.get(i)
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("pg_stat_user_tables row {line:?}"))
        };
        out.insert(
            f[0].to_owned(),
            TableHealth {
                live: num(1)?,
                dead: num(2)?,
                autovacuums: num(3)?,
                kib: num(4)?,
            },
        );
    }
    Ok(out)
}

fn open_files(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0)
}

/// Proportional set size of `pid` and its children in KiB (shared memory counted once in all, not per process).
fn family_pss_kib(pid: u32) -> u64 {
    let pss = |p: u32| -> u64 {
        std::fs::read_to_string(format!("/proc/{p}/smaps_rollup"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Pss:"))
                    .and_then(|v| v.split_whitespace().next())
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or(0)
    };
    pss(pid)
        + crate::redis_cpu::children(pid)
            .into_iter()
            .map(pss)
            .sum::<u64>()
}

/// `ferry_testkit::psql` off the runtime's threads, its answer trimmed.
pub(crate) async fn psql(url: &str, q: &str) -> anyhow::Result<String> {
    let (url, q) = (url.to_owned(), q.to_owned());
    tokio::task::spawn_blocking(move || ferry_testkit::psql(&url, &q))
        .await?
        .map(|s| s.trim().to_owned())
}

/// Per job in the record: its state and how many `job.completed` rows it has.
async fn record(url: &str) -> anyhow::Result<HashMap<String, (String, u64)>> {
    let out = psql(
        url,
        "select j.id, j.state, (select count(*) from job_events e
                                where e.job_id = j.id and e.type = 'job.completed')
         from jobs j where j.queue = 'soak'",
    )
    .await?;
    let mut m = HashMap::new();
    for line in out.lines() {
        let f: Vec<&str> = line.split('|').collect();
        if let [id, state, n] = f.as_slice() {
            m.insert(
                (*id).to_owned(),
                ((*state).to_owned(), n.parse().unwrap_or(0)),
            );
        }
    }
    Ok(m)
}

/// `GET /v1/jobs/{id}` of up to 500 accepted jobs spread over the run, against the record: how many answered
/// 200 with the record's state (and a payload), and examples of the others.
async fn lookups(
    http: &reqwest::Client,
    base: &str,
    expect: &HashMap<String, Expect>,
    pg_url: &str,
) -> anyhow::Result<Value> {
    let record = record(pg_url).await?;
    // Spread over subjects, each well under the gateway's per-subject request rate.
    let tokens: Vec<String> = (0..20)
        .map(|i| gw::token(&format!("soak-lookup-{i}"), &["admin"]))
        .collect::<anyhow::Result<_>>()?;
    let mut ids: Vec<&String> = expect.keys().collect();
    ids.sort();
    let step = (ids.len() / 500).max(1);
    let (mut ok, mut wrong) = (0u64, Vec::new());
    for (n, id) in ids.into_iter().step_by(step).enumerate() {
        let r = http
            .get(format!("{base}/v1/jobs/{id}"))
            .bearer_auth(&tokens[n % tokens.len()])
            .send()
            .await?;
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap_or_default();
        let want = record.get(id).map(|(state, _)| state.as_str());
        if status == 200 && body["state"].as_str() == want && body["payload"].is_object() {
            ok += 1;
        } else {
            wrong.push(format!(
                "{id}: {status} {} (record: {want:?})",
                body["state"]
            ));
        }
    }
    Ok(
        json!({ "ok": ok, "wrong": wrong.len(), "wrong_examples": wrong.iter().take(5).collect::<Vec<_>>() }),
    )
}

/// Redis's keys by kind (the queue's streams, records and indexes, the event log, idempotency keys, channel
/// histories, ...): count and bytes (`MEMORY USAGE`), largest first.
async fn redis_breakdown(conn: &mut redis::aio::MultiplexedConnection) -> anyhow::Result<Value> {
    let mut kinds: HashMap<String, (u64, u64)> = HashMap::new();
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await?;
        for key in keys {
            let bytes: Option<u64> = redis::cmd("MEMORY")
                .arg("USAGE")
                .arg(&key)
                .arg("SAMPLES")
                .arg(0)
                .query_async(conn)
                .await?;
            let k = kinds.entry(key_kind(&key)).or_default();
            k.0 += 1;
            k.1 += bytes.unwrap_or(0);
        }
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    let mut rows: Vec<(String, (u64, u64))> = kinds.into_iter().collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.1.1));
    Ok(Value::Array(
        rows.into_iter()
            .map(|(kind, (keys, bytes))| json!({ "kind": kind, "keys": keys, "kib": bytes / 1024 }))
            .collect(),
    ))
}

/// `ferry:{soak}:p1` → `queue p1`, `ferry:{soak}:idem2:…` → `queue idem2`, `ferry:app:{x}:h` → `app history`.
fn key_kind(key: &str) -> String {
    let rest = key.strip_prefix("ferry:").unwrap_or(key);
    if let Some(q) = rest.strip_prefix('{')
        && let Some((_, tail)) = q.split_once("}:")
    {
        return format!("queue {}", tail.split(':').next().unwrap_or(tail));
    }
    if rest.starts_with("app:") {
        return "app history".into();
    }
    rest.split(':').next().unwrap_or(rest).to_owned()
}

/// RSS and open files: the last sample against the first one after warm-up (a quarter of the run).
fn growth(samples: &[Sample]) -> Value {
    let Some(last) = samples.last() else {
        return Value::Null;
    };
    let warm = samples
        .iter()
        .find(|s| s.t_secs >= last.t_secs / 4.0)
        .unwrap_or(&samples[0]);
    let names: HashSet<&String> = last.rss_kib.keys().collect();
    let mut out = serde_json::Map::new();
    for n in names {
        out.insert(
            n.clone(),
            json!({
                "rss_kib": [warm.rss_kib.get(n), last.rss_kib.get(n)],
                "open_files": [warm.open_files.get(n), last.open_files.get(n)],
            }),
        );
    }
    out.insert(
        "redis_used_memory_kib".into(),
        json!([warm.redis_used_memory_kib, last.redis_used_memory_kib]),
    );
    out.insert(
        "postgres_pss_kib".into(),
        json!([warm.postgres_pss_kib, last.postgres_pss_kib]),
    );
    Value::Object(out)
}
