//! Redis CPU per job of the engine's own cycle (enqueue in batches, claim a batch, complete it), without a
//! worker runtime: the number to watch when changing a script. Starts its own redis-server.
//!
//! `cargo run --release -p ferry-broker --example engine_cycle -- [jobs] [batch] [claimers]`, or `-- --bare
//! [jobs] [batch]` for the plain XADD / XREADGROUP / XACK cycle on the same machine, as the floor to compare with.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_broker::{Completion, EngineConfig, RedisBroker, prelude::*};
use ferry_core::{Kind, NewJob, QueueName};
use ferry_testkit::RedisServer;

fn cpu_micros(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|s| s.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|s| s.parse().ok()).unwrap_or(0);
    ticks * 10_000 // CLK_TCK = 100 on Linux
}

/// Microseconds Redis spent in scripts (EVALSHA/EVAL, nested calls included) and in plain commands, with
/// nested calls excluded from the latter (commandstats counts a script's inner calls again under their own
/// names, so a plain sum double-counts).
fn commandstats_usec(server: &RedisServer) -> (u64, String) {
    let out = server.cli(&["INFO", "commandstats"]).unwrap_or_default();
    let mut total = 0;
    let mut lines = Vec::new();
    for l in out
        .lines()
        .filter(|l| l.starts_with("cmdstat_eval") || l.starts_with("cmdstat_xread:"))
    {
        let usec: u64 = l
            .split("usec=")
            .nth(1)
            .and_then(|s| s.split(',').next())
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        total += usec;
        lines.push(l.to_owned());
    }
    (total, lines.join("\n"))
}

/// The bare cycle the issue calls the floor: pipelined XADD, XREADGROUP COUNT batch, one XACK per batch; no
/// scripts, no events, no fencing, no index. Same sizes, same server settings.
async fn bare(jobs: usize, batch: usize) {
    let server = RedisServer::start_with(&["--appendonly", "no"]).unwrap();
    let pid = server.pid().unwrap();
    let client = redis::Client::open(server.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg("s")
        .arg("g")
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut c)
        .await
        .unwrap();
    let payload = r#"{"kind":"ferry.noop","payload":{},"priority":"normal","max_attempts":3,"backoff":{"base_ms":1000,"max_ms":30000},"created_at":1764460000000}"#;
    let p0 = cpu_micros(pid);
    let mut left = jobs;
    while left > 0 {
        let n = left.min(1000);
        let mut pipe = redis::pipe();
        for _ in 0..n {
            pipe.cmd("XADD")
                .arg("s")
                .arg("*")
                .arg("j")
                .arg(payload)
                .ignore();
        }
        let _: () = pipe.query_async(&mut c).await.unwrap();
        left -= n;
    }
    let p1 = cpu_micros(pid);
    loop {
        let v: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("g")
            .arg("c")
            .arg("COUNT")
            .arg(batch)
            .arg("STREAMS")
            .arg("s")
            .arg(">")
            .query_async(&mut c)
            .await
            .unwrap_or_default();
        let ids: Vec<String> = v
            .keys
            .iter()
            .flat_map(|k| k.ids.iter().map(|i| i.id.clone()))
            .collect();
        if ids.is_empty() {
            break;
        }
        let _: i64 = redis::cmd("XACK")
            .arg("s")
            .arg("g")
            .arg(&ids)
            .query_async(&mut c)
            .await
            .unwrap();
    }
    let p2 = cpu_micros(pid);
    let per = |a: u64, b: u64| (b - a) as f64 / jobs as f64;
    println!(
        "{{\"bare\":true,\"jobs\":{jobs},\"batch\":{batch},\"enqueue_proc_cpu_us_per_job\":{:.2},\"process_proc_cpu_us_per_job\":{:.2}}}",
        per(p0, p1),
        per(p1, p2)
    );
}

/// With `SPLIT` set: claim everything first, then complete it, so the two scripts' costs show apart.
async fn split(b: &RedisBroker, q: &QueueName, pid: u32, jobs: usize, batch: usize) {
    let p1 = cpu_micros(pid);
    let mut leases = Vec::new();
    loop {
        let leased = b.claim(q, "c", batch, Duration::ZERO).await.unwrap();
        if leased.is_empty() {
            break;
        }
        leases.extend(leased.into_iter().map(|l| l.lease));
    }
    let p2 = cpu_micros(pid);
    for chunk in leases.chunks(batch) {
        let items = chunk
            .iter()
            .map(|l| Completion {
                lease: l.clone(),
                result: serde_json::Value::Null,
            })
            .collect();
        b.complete(items).await.unwrap();
    }
    let p3 = cpu_micros(pid);
    let per = |a: u64, b: u64| (b - a) as f64 / jobs as f64;
    println!(
        "{{\"split\":true,\"jobs\":{jobs},\"batch\":{batch},\"claim_proc_cpu_us_per_job\":{:.2},\"complete_proc_cpu_us_per_job\":{:.2}}}",
        per(p1, p2),
        per(p2, p3)
    );
}

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "--bare") {
        let args: Vec<usize> = std::env::args().filter_map(|a| a.parse().ok()).collect();
        let jobs = args.first().copied().unwrap_or(100_000);
        bare(jobs, args.get(1).copied().unwrap_or(100)).await;
        return;
    }
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let jobs = args.first().copied().unwrap_or(100_000);
    let batch = args.get(1).copied().unwrap_or(100);
    let claimers = args.get(2).copied().unwrap_or(4);
    let server = RedisServer::start_with(&["--appendonly", "no"]).unwrap();
    let pid = server.pid().unwrap();
    let b = Arc::new(
        RedisBroker::connect(&[server.url()], EngineConfig::default())
            .await
            .unwrap(),
    );
    let q = QueueName::parse("bench").unwrap();
    let kind = Kind::parse("ferry.noop").unwrap();

    let (c0, _) = commandstats_usec(&server);
    let p0 = cpu_micros(pid);
    let t0 = Instant::now();
    let mut left = jobs;
    while left > 0 {
        let n = left.min(1000);
        let v = (0..n)
            .map(|_| NewJob::new(kind.clone(), serde_json::json!({})))
            .collect();
        b.enqueue_batch(&q, v).await.unwrap();
        left -= n;
    }
    let enq = t0.elapsed();
    let (c1, _) = commandstats_usec(&server);
    let p1 = cpu_micros(pid);

    if std::env::var_os("SPLIT").is_some() {
        split(&b, &q, pid, jobs, batch).await;
        return;
    }
    let t1 = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..claimers {
        let b = b.clone();
        let q = q.clone();
        tasks.push(tokio::spawn(async move {
            let name = format!("c{c}");
            let mut done = 0;
            loop {
                let leased = b.claim(&q, &name, batch, Duration::ZERO).await.unwrap();
                if leased.is_empty() {
                    break done;
                }
                done += leased.len();
                let items = leased
                    .into_iter()
                    .map(|l| Completion {
                        lease: l.lease,
                        result: serde_json::Value::Null,
                    })
                    .collect();
                b.complete(items).await.unwrap();
            }
        }));
    }
    let mut done = 0;
    for t in tasks {
        done += t.await.unwrap();
    }
    let proc_ = t1.elapsed();
    let (c2, lines) = commandstats_usec(&server);
    let p2 = cpu_micros(pid);
    let per = |a: u64, b: u64| (b - a) as f64 / jobs as f64;
    println!(
        "{{\"jobs\":{jobs},\"batch\":{batch},\"claimers\":{claimers},\"processed\":{done},\
         \"enqueue_jobs_per_s\":{:.0},\"process_jobs_per_s\":{:.0},\
         \"enqueue_cmd_us_per_job\":{:.2},\"process_cmd_us_per_job\":{:.2},\
         \"enqueue_proc_cpu_us_per_job\":{:.2},\"process_proc_cpu_us_per_job\":{:.2}}}",
        jobs as f64 / enq.as_secs_f64(),
        jobs as f64 / proc_.as_secs_f64(),
        per(c0, c1),
        per(c1, c2),
        per(p0, p1),
        per(p1, p2),
    );
    eprintln!("{lines}");
}
