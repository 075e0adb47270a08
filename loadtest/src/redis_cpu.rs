//! What a workload costs Redis: CPU time of the redis-server process from `/proc`, and `INFO commandstats`.
//!
//! The single Redis thread bounds every queue on it, so the figure that matters is Redis CPU microseconds per
//! job. Two views, reported side by side:
//!
//! * [`proc_cpu_micros`]: user + system CPU of the whole redis-server process (`/proc/<pid>/stat`). This is the
//!   honest total: it includes reading and parsing requests, writing replies and the event loop, which
//!   `commandstats` does not see.
//! * [`commandstats`]: per command, calls and microseconds spent executing. Commands run *inside* a Lua script
//!   are counted twice — under their own name and inside `evalsha`'s time — so the plain sum over all
//!   commands is an upper bound of execution time; the breakdown shows where the time goes.
//!
//! [`Meter`] takes both over one phase of a benchmark.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::OnceLock;
use std::time::Instant;

use anyhow::Context;
use redis::aio::MultiplexedConnection;
use serde::Serialize;

/// Clock ticks per second of `/proc/<pid>/stat` times (`getconf CLK_TCK`, almost always 100).
pub fn clock_ticks() -> u64 {
    static TCK: OnceLock<u64> = OnceLock::new();
    *TCK.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .filter(|&t| t > 0)
            .unwrap_or(100)
    })
}

/// User + system CPU time consumed so far by process `pid`, in microseconds (resolution: one clock tick,
/// 10 ms at `CLK_TCK` = 100, so measure phases of a second or more).
pub fn proc_cpu_micros(pid: u32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat_cpu_ticks(&stat)
        .map(|ticks| ticks * 1_000_000 / clock_ticks())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unexpected /proc/<pid>/stat"))
}

/// CPU time of process `root` and everything it started, in microseconds: its own user + system time, that of
/// its children it has waited for (fields 16 and 17: processes that exited), and that of its live children
/// (those whose parent, field 4, is `root`). For a PostgreSQL postmaster that is the whole server: backends,
/// background processes, and autovacuum workers that came and went.
pub fn tree_cpu_micros(root: u32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{root}/stat"))?;
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "unexpected /proc/<pid>/stat");
    let (_, own, reaped) = parse_stat_tree_ticks(&stat).ok_or_else(bad)?;
    let mut ticks = own + reaped;
    for child in children(root) {
        // A child may exit between the listing and the read: it is then counted in `reaped` next time.
        if let Some((_, own, _)) = std::fs::read_to_string(format!("/proc/{child}/stat"))
            .ok()
            .and_then(|s| parse_stat_tree_ticks(&s))
        {
            ticks += own;
        }
    }
    Ok(ticks * 1_000_000 / clock_ticks())
}

/// The live children of `pid`: the processes whose parent (field 4 of `/proc/<pid>/stat`) is `pid`.
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|c| {
            std::fs::read_to_string(format!("/proc/{c}/stat"))
                .ok()
                .and_then(|s| parse_stat_tree_ticks(&s))
                .is_some_and(|(ppid, _, _)| ppid == pid)
        })
        .collect()
}

/// (parent pid, utime + stime, cutime + cstime) of a `/proc/<pid>/stat` line, times in clock ticks.
fn parse_stat_tree_ticks(stat: &str) -> Option<(u32, u64, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `fields[0]` is field 3 (state): ppid is field 4, utime..cstime are fields 14 to 17.
    let num = |i: usize| fields.get(i)?.parse::<u64>().ok();
    let ppid = u32::try_from(num(1)?).ok()?;
    Some((ppid, num(11)? + num(12)?, num(13)? + num(14)?))
}

/// utime + stime (fields 14 and 15) in clock ticks. The command name (field 2) is in parentheses and may
/// contain spaces, so fields are counted from the last `)`.
fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    parse_stat_tree_ticks(stat).map(|(_, own, _)| own)
}

/// Machine-wide CPU time so far from `/proc/stat`, in clock ticks: (busy, steal). Busy is every non-idle
/// state (user, nice, system, irq, softirq, steal); comparing it with the processes under test shows how much
/// else ran on the machine during a phase.
pub fn system_cpu_ticks() -> io::Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no cpu line in /proc/stat"))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let get = |i: usize| v.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal
    let busy = get(0) + get(1) + get(2) + get(5) + get(6) + get(7);
    Ok((busy, get(7)))
}

/// `INFO commandstats` of the server at `url`: command → (calls, microseconds).
pub async fn commandstats(url: &str) -> anyhow::Result<HashMap<String, (u64, u64)>> {
    let mut con = connect(url).await?;
    commandstats_on(&mut con).await
}

/// [`commandstats`] over an existing connection.
pub async fn commandstats_on(
    con: &mut MultiplexedConnection,
) -> anyhow::Result<HashMap<String, (u64, u64)>> {
    let text: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(con)
        .await
        .context("INFO commandstats")?;
    Ok(parse_commandstats(&text))
}

fn parse_commandstats(text: &str) -> HashMap<String, (u64, u64)> {
    let mut out = HashMap::new();
    for line in text.lines() {
        let Some(rest) = line.trim().strip_prefix("cmdstat_") else {
            continue;
        };
        let Some((name, fields)) = rest.split_once(':') else {
            continue;
        };
        let mut calls = None;
        let mut usec = None;
        for kv in fields.split(',') {
            match kv.split_once('=') {
                Some(("calls", v)) => calls = v.parse().ok(),
                Some(("usec", v)) => usec = v.parse().ok(),
                _ => {}
            }
        }
        if let (Some(c), Some(u)) = (calls, usec) {
            out.insert(name.to_owned(), (c, u));
        }
    }
    out
}

/// One field of `INFO <section>` (e.g. `server` / `redis_version`).
pub async fn info_field(
    con: &mut MultiplexedConnection,
    section: &str,
    field: &str,
) -> anyhow::Result<Option<String>> {
    let text: String = redis::cmd("INFO")
        .arg(section)
        .query_async(con)
        .await
        .with_context(|| format!("INFO {section}"))?;
    Ok(text.lines().find_map(|l| {
        l.strip_prefix(field)
            .and_then(|r| r.strip_prefix(':'))
            .map(|v| v.trim().to_owned())
    }))
}

/// A connection for measuring (not for the workload).
pub async fn connect(url: &str) -> anyhow::Result<MultiplexedConnection> {
    let client = redis::Client::open(url).with_context(|| format!("bad Redis URL {url}"))?;
    client
        .get_multiplexed_async_connection()
        .await
        .with_context(|| format!("connecting to {url}"))
}

/// Commands that are the measurement's own, not the workload's.
const OWN_COMMANDS: &[&str] = &[
    "config|resetstat",
    "info",
    "client|setinfo",
    "hello",
    "ping",
];

/// Lua entry points: their time includes the commands the script called.
const SCRIPT_COMMANDS: &[&str] = &[
    "eval",
    "evalsha",
    "eval_ro",
    "evalsha_ro",
    "fcall",
    "fcall_ro",
];

/// One command's share of a phase.
#[derive(Debug, Clone, Serialize)]
pub struct CommandCost {
    pub calls: u64,
    pub usec: u64,
    pub usec_per_job: f64,
}

/// A redis-server under measurement: a connection for `INFO` and `CONFIG RESETSTAT`, and its pid for `/proc`.
#[derive(Debug, Clone)]
pub struct Admin {
    pub con: MultiplexedConnection,
    pub pid: u32,
    pub port: u16,
}

/// One server's share of a phase, when the phase ran on several (the masters of a Redis Cluster).
#[derive(Debug, Clone, Serialize)]
pub struct ServerCost {
    pub port: u16,
    pub redis_cpu_usec: u64,
    /// This server's CPU over every job of the phase.
    pub redis_cpu_usec_per_job: f64,
    pub redis_cpu_utilisation: f64,
    pub commandstats_calls: u64,
    /// Jobs of the phase whose queue lives on this server, and their share of all (see [`PhaseCost::attribute`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jobs: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jobs_share: Option<f64>,
    /// This server's CPU over its own jobs (none when it held none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_cpu_usec_per_own_job: Option<f64>,
}

/// What one phase cost Redis (and optionally one more process, e.g. the worker).
#[derive(Debug, Clone, Serialize)]
pub struct PhaseCost {
    pub secs: f64,
    /// CPU of the redis-server process over the phase (`/proc`); of every server together when there are several.
    pub redis_cpu_usec: u64,
    pub redis_cpu_usec_per_job: f64,
    /// Cores Redis used over the phase (1.0 = one server saturated; all servers together).
    pub redis_cpu_utilisation: f64,
    /// Sum of `commandstats` usec over all commands per job (commands inside scripts counted twice).
    pub commandstats_usec_per_job: f64,
    /// `eval`/`evalsha`/`fcall` usec per job (includes the commands those scripts ran).
    pub commandstats_script_usec_per_job: f64,
    pub commandstats_calls_per_job: f64,
    pub commandstats: BTreeMap<String, CommandCost>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub other_cpu_usec: Option<u64>,
    /// Cores busy machine-wide over the phase (everything, not only the processes under test).
    pub system_busy_cores: f64,
    /// Cores stolen by the hypervisor over the phase.
    pub system_steal_cores: f64,
    /// Each server's share, when the phase ran on more than one.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub per_server: Vec<ServerCost>,
}

impl PhaseCost {
    /// Attribute the phase's jobs to the servers (`jobs[i]` to `per_server[i]`): each server's share of the jobs
    /// and its CPU per job of its own. Nothing to do for one server.
    pub fn attribute(&mut self, jobs: &[u64]) {
        let total: u64 = jobs.iter().sum();
        for (s, &n) in self.per_server.iter_mut().zip(jobs) {
            s.jobs = Some(n);
            s.jobs_share = Some(round(n as f64 / total.max(1) as f64, 3));
            s.redis_cpu_usec_per_own_job =
                (n > 0).then(|| round(s.redis_cpu_usec as f64 / n as f64, 3));
        }
    }
}

/// Measures one phase: start it, run the workload, [`Meter::stop`] with the number of jobs it handled.
#[derive(Debug)]
pub struct Meter {
    started: Instant,
    /// (pid, CPU at the start) of each server.
    servers: Vec<(u32, u64)>,
    other: Option<(u32, u64)>,
    system0: (u64, u64),
}

impl Meter {
    /// Reset `commandstats` and take the CPU counters of every server (and of `other`, when given).
    pub async fn start(admins: &mut [Admin], other: Option<u32>) -> anyhow::Result<Self> {
        let mut servers = Vec::with_capacity(admins.len());
        for a in admins.iter_mut() {
            let _: () = redis::cmd("CONFIG")
                .arg("RESETSTAT")
                .query_async(&mut a.con)
                .await
                .with_context(|| format!("CONFIG RESETSTAT on :{}", a.port))?;
            servers.push((a.pid, proc_cpu_micros(a.pid)?));
        }
        let other = match other {
            Some(pid) => Some((pid, proc_cpu_micros(pid)?)),
            None => None,
        };
        Ok(Self {
            started: Instant::now(),
            servers,
            other,
            system0: system_cpu_ticks()?,
        })
    }

    /// Like [`Meter::start`] for a process that does not exist yet: its CPU is counted from zero, so
    /// it must be started right after this (e.g. a worker spawned for the phase).
    pub fn count_from_zero(&mut self, pid: u32) {
        self.other = Some((pid, 0));
    }

    pub async fn stop(self, admins: &mut [Admin], jobs: u64) -> anyhow::Result<PhaseCost> {
        let secs = self.started.elapsed().as_secs_f64();
        let mut cpus = Vec::with_capacity(self.servers.len());
        for &(pid, cpu0) in &self.servers {
            cpus.push(proc_cpu_micros(pid)?.saturating_sub(cpu0));
        }
        let redis_cpu: u64 = cpus.iter().sum();
        let other_cpu_usec = match self.other {
            Some((pid, cpu0)) => Some(proc_cpu_micros(pid)?.saturating_sub(cpu0)),
            None => None,
        };
        let (busy, steal) = system_cpu_ticks()?;
        let cores = |ticks: u64| round(ticks as f64 / clock_ticks() as f64 / secs.max(1e-9), 2);
        let system_busy_cores = cores(busy.saturating_sub(self.system0.0));
        let system_steal_cores = cores(steal.saturating_sub(self.system0.1));
        let per_job = |x: u64| round(x as f64 / jobs.max(1) as f64, 3);
        let utilisation = |usec: u64| round(usec as f64 / 1e6 / secs.max(1e-9), 3);
        let mut all = 0;
        let mut scripts = 0;
        let mut calls = 0;
        let mut summed: HashMap<String, (u64, u64)> = HashMap::new();
        let mut per_server = Vec::new();
        for (a, &cpu) in admins.iter_mut().zip(&cpus) {
            let mut server_calls = 0;
            for (name, (c, u)) in commandstats_on(&mut a.con).await? {
                if OWN_COMMANDS.contains(&name.as_str()) {
                    continue;
                }
                server_calls += c;
                let e = summed.entry(name).or_default();
                e.0 += c;
                e.1 += u;
            }
            per_server.push(ServerCost {
                port: a.port,
                redis_cpu_usec: cpu,
                redis_cpu_usec_per_job: per_job(cpu),
                redis_cpu_utilisation: utilisation(cpu),
                commandstats_calls: server_calls,
                jobs: None,
                jobs_share: None,
                redis_cpu_usec_per_own_job: None,
            });
        }
        if per_server.len() < 2 {
            per_server.clear();
        }
        let mut breakdown = BTreeMap::new();
        for (name, (c, u)) in summed {
            all += u;
            calls += c;
            if SCRIPT_COMMANDS.contains(&name.as_str()) {
                scripts += u;
            }
            breakdown.insert(
                name,
                CommandCost {
                    calls: c,
                    usec: u,
                    usec_per_job: per_job(u),
                },
            );
        }
        Ok(PhaseCost {
            secs: round(secs, 4),
            redis_cpu_usec: redis_cpu,
            redis_cpu_usec_per_job: per_job(redis_cpu),
            redis_cpu_utilisation: utilisation(redis_cpu),
            commandstats_usec_per_job: per_job(all),
            commandstats_script_usec_per_job: per_job(scripts),
            commandstats_calls_per_job: per_job(calls),
            commandstats: breakdown,
            other_cpu_usec,
            system_busy_cores,
            system_steal_cores,
            per_server,
        })
    }
}

/// Round to `digits` decimals (for readable JSON).
pub fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_stat_with_spaces_in_the_name() {
        let stat = "4242 (redis server) S 1 4242 4242 0 -1 4194560 1050 0 0 0 37 12 0 0 20 0 5 0 \
                    123 456 789";
        assert_eq!(parse_stat_cpu_ticks(stat), Some(49));
        assert_eq!(parse_stat_cpu_ticks("garbage"), None);
        assert_eq!(parse_stat_tree_ticks(stat), Some((1, 49, 0)));
        assert_eq!(parse_stat_tree_ticks("garbage"), None);
    }

    #[test]
    fn a_process_tree_counts_children_live_and_exited() {
        let me = std::process::id();
        let before = tree_cpu_micros(me).unwrap();
        // A child that burns CPU and exits (reaped: its time moves into ours), then one still running.
        let spin = "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done";
        std::process::Command::new("sh")
            .args(["-c", spin])
            .status()
            .unwrap();
        let after_exited = tree_cpu_micros(me).unwrap();
        assert!(
            after_exited >= before + 100_000,
            "{before} -> {after_exited}"
        );
        let mut live = std::process::Command::new("sh")
            .args(["-c", spin])
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(500));
        let while_running = tree_cpu_micros(me).unwrap();
        live.wait().unwrap();
        assert!(
            while_running >= after_exited + 100_000,
            "{after_exited} -> {while_running}"
        );
    }

    #[test]
    fn own_process_cpu_is_readable() {
        let me = std::process::id();
        let a = proc_cpu_micros(me).unwrap();
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(proc_cpu_micros(me).unwrap() >= a);
        assert!(proc_cpu_micros(u32::MAX).is_err());
        let (busy, steal) = system_cpu_ticks().unwrap();
        assert!(busy > 0 && steal <= busy);
    }

    #[test]
    fn parses_commandstats() {
        let text = "# Commandstats\r\n\
            cmdstat_evalsha:calls=10,usec=500,usec_per_call=50.00,rejected_calls=0,failed_calls=0\r\n\
            cmdstat_config|resetstat:calls=1,usec=9,usec_per_call=9.00,rejected_calls=0,failed_calls=0\r\n";
        let m = parse_commandstats(text);
        assert_eq!(m["evalsha"], (10, 500));
        assert_eq!(m["config|resetstat"], (1, 9));
        assert_eq!(m.len(), 2);
    }
}
