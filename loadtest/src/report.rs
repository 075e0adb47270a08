//! The report's frame: the machine the figures were taken on, and the ferry/BullMQ comparison against the
//! targets of the foundation issue.

use serde::Serialize;
use serde_json::{Value, json};

use crate::redis_cpu::round;

/// Targets from the issue.
pub const TARGET_THROUGHPUT_RATIO: f64 = 1.5;
pub const TARGET_REDIS_CPU_USEC_PER_JOB: f64 = 15.0;
pub const TARGET_P99_RATIO: f64 = 0.2;
/// The offered rate at which the p99 target applies.
pub const TARGET_P99_RATE: u64 = 5000;

/// What the machine was and how busy it was.
#[derive(Debug, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu_model: Option<String>,
    pub kernel: Option<String>,
    pub mem_total_kb: Option<u64>,
    /// 1, 5, 15-minute load averages: other work on the machine skews the figures.
    pub loadavg: Option<String>,
    pub redis_server: String,
    pub redis_version: Option<String>,
    pub git_commit: Option<String>,
}

impl Machine {
    pub fn probe() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        Self {
            nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model: cpuinfo
                .lines()
                .find_map(|l| l.strip_prefix("model name"))
                .and_then(|r| r.split_once(':'))
                .map(|(_, v)| v.trim().to_owned()),
            kernel: read_trim("/proc/sys/kernel/osrelease"),
            mem_total_kb: meminfo
                .lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()),
            loadavg: loadavg(),
            redis_server: "redis-server (PATH), started by ferry-testkit".to_owned(),
            redis_version: command_output("redis-server", &["--version"]).and_then(|v| {
                v.split_whitespace()
                    .find_map(|w| w.strip_prefix("v="))
                    .map(str::to_owned)
            }),
            git_commit: command_output("git", &["rev-parse", "--short", "HEAD"]),
        }
    }
}

/// `/proc/loadavg`'s first three fields.
pub fn loadavg() -> Option<String> {
    read_trim("/proc/loadavg").map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
}

fn read_trim(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(program)
        .args(args)
        .current_dir(crate::procs::workspace_root())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn f(v: &Value, path: &[&str]) -> Option<f64> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_f64()
}

fn p99_at(run: &Value, rate: u64) -> Option<f64> {
    run.get("latency")?
        .as_array()?
        .iter()
        .find(|l| l.get("offered_rate").and_then(Value::as_u64) == Some(rate))
        .and_then(|l| f(l, &["latency", "p99_ms"]))
}

/// Cores that other work may use during a phase before the figures are flagged as suspect.
const OTHER_CORES_ALLOWED: f64 = 0.35;

/// What makes a run's figures doubtful: jobs not completed, an offered rate not reached, other work on the
/// machine during the measured phases. Works on either system's JSON.
pub fn problems(run: &Value) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(e) = run.get("error").and_then(Value::as_str) {
        out.push(format!("run failed: {e}"));
        return out;
    }
    for key in ["dead", "failed", "scheduled"] {
        if let Some(n) = f(run, &["processing", key]).filter(|&n| n > 0.0) {
            out.push(format!("processing: {n} jobs {key}"));
        }
    }
    if let (Some(busy), Some(redis), Some(worker)) = (
        f(run, &["processing", "redis", "system_busy_cores"]),
        f(run, &["processing", "redis", "redis_cpu_utilisation"]),
        f(run, &["processing", "worker_cpu_utilisation"]),
    ) {
        let other = busy - redis - worker;
        if other > OTHER_CORES_ALLOWED {
            out.push(format!(
                "processing: {other:.2} cores of other work on the machine (busy {busy}, Redis {redis}, \
                 worker {worker})"
            ));
        }
    }
    for l in run
        .get("latency")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let rate = f(l, &["offered_rate"]).unwrap_or(0.0);
        if let Some(m) = f(l, &["missing"]).filter(|&m| m > 0.0) {
            out.push(format!("latency at {rate}: {m} jobs never seen completed"));
        }
        if let Some(a) = f(l, &["achieved_send_rate"]).filter(|&a| a < 0.97 * rate) {
            out.push(format!(
                "latency at {rate}: the producer only offered {a} jobs/s"
            ));
        }
        if let (Some(busy), Some(redis), Some(worker), Some(producer)) = (
            f(l, &["redis", "system_busy_cores"]),
            f(l, &["redis", "redis_cpu_utilisation"]),
            f(l, &["worker_cpu_utilisation"]),
            f(l, &["producer_cpu_utilisation"]),
        ) {
            let other = busy - redis - worker - producer;
            if other > OTHER_CORES_ALLOWED {
                out.push(format!(
                    "latency at {rate}: {other:.2} cores of other work on the machine"
                ));
            }
        }
    }
    out
}

/// ferry's run (first batch size) against BullMQ's default run, with each target met or not.
pub fn compare(ferry: &Value, bullmq: &Value) -> Value {
    let ft = f(ferry, &["processing", "jobs_per_sec"]);
    let bt = f(bullmq, &["processing", "jobs_per_sec"]);
    let throughput_ratio = ft.zip(bt).map(|(a, b)| round(a / b, 3));
    let cpu = f(ferry, &["processing", "redis", "redis_cpu_usec_per_job"]);
    let fp = p99_at(ferry, TARGET_P99_RATE);
    let bp = p99_at(bullmq, TARGET_P99_RATE);
    let p99_ratio = fp.zip(bp).map(|(a, b)| round(a / b, 3));
    let suspect: Vec<String> = problems(ferry)
        .into_iter()
        .map(|p| format!("ferry: {p}"))
        .chain(problems(bullmq).into_iter().map(|p| format!("bullmq: {p}")))
        .collect();
    json!({
        "valid": suspect.is_empty(),
        "problems": suspect,
        "ferry_batch_size": ferry.get("batch_size"),
        "bullmq_variant": bullmq.get("variant_label"),
        "processing_jobs_per_sec": { "ferry": ft, "bullmq": bt },
        "throughput_ratio": throughput_ratio,
        "redis_cpu_usec_per_job": {
            "ferry": cpu,
            "bullmq": f(bullmq, &["processing", "redis", "redis_cpu_usec_per_job"]),
        },
        "p99_ms_at_5000": { "ferry": fp, "bullmq": bp },
        "p99_ratio": p99_ratio,
        "targets": {
            "throughput_ratio_at_least_1_5": throughput_ratio.map(|r| r >= TARGET_THROUGHPUT_RATIO),
            "redis_cpu_at_most_15_usec_per_job": cpu.map(|c| c <= TARGET_REDIS_CPU_USEC_PER_JOB),
            "p99_at_5000_at_most_a_fifth": p99_ratio.map(|r| r <= TARGET_P99_RATIO),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compares_against_targets() {
        let ferry = json!({
            "batch_size": 100,
            "processing": {"jobs_per_sec": 48000.0, "redis": {"redis_cpu_usec_per_job": 12.0}},
            "latency": [{"offered_rate": 5000, "latency": {"p99_ms": 2.0}}],
        });
        let bullmq = json!({
            "variant_label": "default",
            "processing": {"jobs_per_sec": 24000.0, "redis": {"redis_cpu_usec_per_job": 40.0}},
            "latency": [{"offered_rate": 5000, "latency": {"p99_ms": 20.0}}],
        });
        let c = compare(&ferry, &bullmq);
        assert_eq!(c["throughput_ratio"], json!(2.0));
        assert_eq!(c["p99_ratio"], json!(0.1));
        assert_eq!(c["targets"]["throughput_ratio_at_least_1_5"], json!(true));
        assert_eq!(
            c["targets"]["redis_cpu_at_most_15_usec_per_job"],
            json!(true)
        );
        assert_eq!(c["targets"]["p99_at_5000_at_most_a_fifth"], json!(true));
        assert_eq!(c["valid"], json!(true));
        let bad = json!({
            "processing": {"dead": 3, "worker_cpu_utilisation": 0.5,
                           "redis": {"system_busy_cores": 2.0, "redis_cpu_utilisation": 0.5}},
            "latency": [{"offered_rate": 5000, "achieved_send_rate": 4000, "missing": 2}],
        });
        let p = problems(&bad);
        assert_eq!(p.len(), 4, "{p:?}");
        let c = compare(&json!({}), &bullmq);
        assert_eq!(c["throughput_ratio"], Value::Null);
    }
}
