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
/// Targets of the gateway tier (issue 12): Redis CPU per job with 8 gateways attached at most this many times
/// that with 1, and processing with 4 attached at least this many times BullMQ's.
pub const TARGET_GATEWAYS_8_CPU_RATIO: f64 = 1.15;
pub const TARGET_GATEWAYS_4_THROUGHPUT_RATIO: f64 = 2.5;

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
        // Gateways attached to the run are part of it, not other work.
        let gateways = f(run, &["gateways", "cpu_usec_per_job_processing"])
            .zip(f(run, &["processing", "jobs"]))
            .zip(f(run, &["processing", "secs"]))
            .map_or(0.0, |((c, n), s)| c * n / 1e6 / s.max(1e-6));
        let other = busy - redis - worker - gateways;
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

/// The gateways-attached runs side by side: Redis CPU per job and throughput per gateway count, against the
/// run with the fewest gateways and against BullMQ's default run, with the targets of issue 12.
pub fn compare_gateways(runs: &[Value], bullmq: Option<&Value>) -> Value {
    let count = |r: &Value| f(r, &["gateways", "count"]);
    let ok: Vec<&Value> = runs.iter().filter(|r| r.get("error").is_none()).collect();
    let cpu = |r: &Value| f(r, &["processing", "redis", "redis_cpu_usec_per_job"]);
    let base = ok
        .iter()
        .min_by(|a, b| count(a).unwrap_or(0.0).total_cmp(&count(b).unwrap_or(0.0)))
        .copied();
    let base_cpu = base.and_then(cpu);
    let bt = bullmq.and_then(|b| f(b, &["processing", "jobs_per_sec"]));
    let rows: Vec<Value> = ok
        .iter()
        .map(|r| {
            let t = f(r, &["processing", "jobs_per_sec"]);
            let c = cpu(r);
            let e = f(r, &["enqueue", "redis", "redis_cpu_usec_per_job"]);
            json!({
                "gateways": count(r),
                "processing_jobs_per_sec": t,
                "redis_cpu_usec_per_job_processing": c,
                "redis_cpu_usec_per_job_enqueue": e,
                "redis_cpu_usec_per_job_total": c.zip(e).map(|(c, e)| round(c + e, 2)),
                "gateways_cpu_usec_per_job_processing": f(r, &["gateways", "cpu_usec_per_job_processing"]),
                "cpu_ratio_to_fewest_gateways": c.zip(base_cpu).map(|(c, b)| round(c / b, 3)),
                "throughput_ratio_to_bullmq": t.zip(bt).map(|(t, b)| round(t / b, 3)),
                "problems": problems(r),
            })
        })
        .collect();
    let at = |n: f64, field: &str| {
        rows.iter()
            .find(|r| r["gateways"].as_f64() == Some(n))
            .and_then(|r| r[field].as_f64())
    };
    let one = at(1.0, "redis_cpu_usec_per_job_processing");
    let eight = at(8.0, "redis_cpu_usec_per_job_processing");
    let cpu_8_over_1 = eight.zip(one).map(|(e, o)| round(e / o, 3));
    let four_vs_bullmq = at(4.0, "throughput_ratio_to_bullmq");
    json!({
        "bullmq_processing_jobs_per_sec": bt,
        "bullmq_variant": bullmq.and_then(|b| b.get("variant_label")),
        "runs": rows,
        "cpu_8_over_1": cpu_8_over_1,
        "throughput_4_over_bullmq": four_vs_bullmq,
        "targets": {
            "cpu_8_over_1_at_most_1_15": cpu_8_over_1.map(|r| r <= TARGET_GATEWAYS_8_CPU_RATIO),
            "throughput_4_at_least_2_5_bullmq": four_vs_bullmq.map(|r| r >= TARGET_GATEWAYS_4_THROUGHPUT_RATIO),
        },
    })
}

/// ferry's runs side by side by Redis topology (standalone, cluster): throughput, Redis CPU per job in total
/// and per server, and how evenly the jobs and the Redis CPU fell on the servers (`balance`: the busiest
/// server's share over an even share; 1.0 is perfectly even).
pub fn compare_topologies(runs: &[Value]) -> Value {
    let rows: Vec<Value> = runs
        .iter()
        .filter(|r| r.get("error").is_none() && r.get("redis").is_some())
        .map(|r| {
            let per_server = |phase: &str| -> Vec<Value> {
                r.get(phase)
                    .and_then(|p| p.get("redis"))
                    .and_then(|c| c.get("per_server"))
                    .and_then(Value::as_array)
                    .map(|servers| {
                        servers
                            .iter()
                            .map(|s| {
                                json!({
                                    "port": s.get("port"),
                                    "jobs_share": s.get("jobs_share"),
                                    "redis_cpu_usec_per_job": s.get("redis_cpu_usec_per_job"),
                                    "redis_cpu_usec_per_own_job": s.get("redis_cpu_usec_per_own_job"),
                                    "redis_cpu_utilisation": s.get("redis_cpu_utilisation"),
                                })
                            })
                            .collect()
                    })
                    .unwrap_or_default()
            };
            let balance = |servers: &[Value], field: &str| -> Option<f64> {
                let v: Vec<f64> = servers.iter().filter_map(|s| s[field].as_f64()).collect();
                let sum: f64 = v.iter().sum();
                (v.len() > 1 && sum > 0.0).then(|| {
                    let max = v.iter().copied().fold(0.0, f64::max);
                    round(max / (sum / v.len() as f64), 3)
                })
            };
            let processing = per_server("processing");
            let enqueue = f(r, &["enqueue", "redis", "redis_cpu_usec_per_job"]);
            let proc_cpu = f(r, &["processing", "redis", "redis_cpu_usec_per_job"]);
            json!({
                "redis": r.get("redis"),
                "queues": r.get("queues"),
                "batch_size": r.get("batch_size"),
                "gateways": f(r, &["gateways", "count"]).unwrap_or(0.0),
                "enqueue_jobs_per_sec": f(r, &["enqueue", "jobs_per_sec"]),
                "processing_jobs_per_sec": f(r, &["processing", "jobs_per_sec"]),
                "redis_cpu_usec_per_job_enqueue": enqueue,
                "redis_cpu_usec_per_job_processing": proc_cpu,
                "redis_cpu_usec_per_job_total": enqueue.zip(proc_cpu).map(|(e, p)| round(e + p, 2)),
                "per_server_processing": processing,
                "per_server_enqueue": per_server("enqueue"),
                "balance_jobs": balance(&processing, "jobs_share"),
                "balance_redis_cpu": balance(&processing, "redis_cpu_utilisation"),
                "problems": problems(r),
            })
        })
        .collect();
    json!({ "runs": rows })
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
    fn compares_topologies_with_balance_across_masters() {
        let server = |port: u64, share: f64, util: f64| {
            json!({"port": port, "jobs_share": share, "redis_cpu_usec_per_job": 10.0,
                   "redis_cpu_usec_per_own_job": 30.0, "redis_cpu_utilisation": util})
        };
        let standalone = json!({
            "system": "ferry", "redis": {"kind": "standalone"}, "queues": 12, "batch_size": 10,
            "enqueue": {"jobs_per_sec": 90000.0, "redis": {"redis_cpu_usec_per_job": 8.0}},
            "processing": {"jobs": 1000, "secs": 1.0, "jobs_per_sec": 40000.0,
                           "redis": {"redis_cpu_usec_per_job": 20.0}},
        });
        let cluster = json!({
            "system": "ferry", "redis": {"kind": "cluster", "masters": 3, "vshards": 16}, "queues": 12,
            "batch_size": 10,
            "enqueue": {"jobs_per_sec": 80000.0, "redis": {"redis_cpu_usec_per_job": 10.0}},
            "processing": {"jobs": 1000, "secs": 1.0, "jobs_per_sec": 30000.0,
                           "redis": {"redis_cpu_usec_per_job": 30.0, "per_server": [
                               server(1, 0.25, 0.2), server(2, 0.25, 0.3), server(3, 0.5, 0.4)]}},
        });
        let failed = json!({"system": "ferry", "redis": {"kind": "cluster"}, "error": "boom"});
        let c = compare_topologies(&[standalone, cluster, failed]);
        let rows = c["runs"].as_array().unwrap();
        assert_eq!(rows.len(), 2, "a failed run has no row");
        assert_eq!(rows[0]["redis_cpu_usec_per_job_total"], 28.0);
        assert_eq!(
            rows[0]["balance_jobs"],
            Value::Null,
            "one server: no balance"
        );
        assert_eq!(rows[1]["redis_cpu_usec_per_job_total"], 40.0);
        assert_eq!(
            rows[1]["per_server_processing"].as_array().unwrap().len(),
            3
        );
        assert_eq!(rows[1]["balance_jobs"], 1.5);
        assert_eq!(rows[1]["balance_redis_cpu"], 1.333);
    }

    #[test]
    fn compares_gateway_counts_against_the_targets() {
        let run = |g: u64, cpu: f64, jobs_per_sec: f64| {
            json!({
                "system": "ferry",
                "gateways": {"count": g, "cpu_usec_per_job_processing": 1.0},
                "enqueue": {"redis": {"redis_cpu_usec_per_job": 5.0}},
                "processing": {"jobs": 1000, "secs": 1.0, "jobs_per_sec": jobs_per_sec,
                               "redis": {"redis_cpu_usec_per_job": cpu}},
            })
        };
        let bullmq = json!({"variant_label": "default", "processing": {"jobs_per_sec": 10000.0}});
        let runs = [
            run(1, 20.0, 40000.0),
            run(4, 21.0, 26000.0),
            run(8, 23.0, 30000.0),
        ];
        let c = compare_gateways(&runs, Some(&bullmq));
        assert_eq!(c["cpu_8_over_1"], 1.15);
        assert_eq!(c["throughput_4_over_bullmq"], 2.6);
        assert_eq!(c["targets"]["cpu_8_over_1_at_most_1_15"], true);
        assert_eq!(c["targets"]["throughput_4_at_least_2_5_bullmq"], true);
        assert_eq!(c["runs"][1]["redis_cpu_usec_per_job_total"], 26.0);
        let runs = [
            run(1, 20.0, 40000.0),
            run(4, 21.0, 24000.0),
            run(8, 23.2, 30000.0),
        ];
        let c = compare_gateways(&runs, Some(&bullmq));
        assert_eq!(c["targets"]["cpu_8_over_1_at_most_1_15"], false);
        assert_eq!(c["targets"]["throughput_4_at_least_2_5_bullmq"], false);
        // Without the peer the throughput target is unknown, not met.
        assert!(
            compare_gateways(&runs, None)["targets"]["throughput_4_at_least_2_5_bullmq"].is_null()
        );
    }

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
