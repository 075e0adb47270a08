//! The BullMQ peer: `loadtest/bullmq/bench.mjs` run as a child process against its own redis-server (same
//! binary and version as ferry's, persistence off), its JSON document parsed and returned as is.
//!
//! The node dependencies live in `loadtest/bullmq/node_modules` (git-ignored); they are installed on first use
//! with `npm ci` (or `npm install` when there is no lock file).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;
use tokio::io::AsyncReadExt;
use tokio::process::Command;

use crate::procs;
use crate::server::BenchRedis;

/// One BullMQ configuration to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// BullMQ's defaults: completed jobs are kept in Redis.
    Default,
    /// `removeOnComplete: true` on every job.
    RemoveOnComplete,
}

impl Variant {
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        match s {
            "default" => Ok(Self::Default),
            "remove-on-complete" => Ok(Self::RemoveOnComplete),
            _ => bail!("unknown BullMQ variant {s:?} (use default or remove-on-complete)"),
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::Default => "default",
            Self::RemoveOnComplete => "remove-on-complete",
        }
    }
}

/// Parameters shared with the ferry side.
#[derive(Debug, Clone)]
pub struct Params {
    pub jobs: u64,
    pub concurrency: u32,
    pub rates: Vec<u64>,
    pub latency_secs: u64,
    pub enqueue_chunk: usize,
    pub enqueue_tasks: usize,
}

/// The folder holding `bench.mjs` and `package.json`.
pub fn default_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("bullmq")
}

/// Install the node dependencies unless they are there already.
pub async fn ensure_deps(dir: &Path) -> anyhow::Result<()> {
    if dir.join("node_modules/bullmq/package.json").exists()
        && dir.join("node_modules/ioredis/package.json").exists()
    {
        return Ok(());
    }
    if !procs::exists("node").await {
        bail!("node is not installed (BullMQ peer needs Node.js 20 or newer)");
    }
    if !procs::exists("npm").await {
        bail!(
            "npm is not installed: install Node.js with npm, or run `npm ci` in {} yourself",
            dir.display()
        );
    }
    let args: &[&str] = if dir.join("package-lock.json").exists() {
        &["ci", "--no-audit", "--no-fund"]
    } else {
        &["install", "--no-audit", "--no-fund"]
    };
    eprintln!(
        "[loadtest] installing BullMQ dependencies: npm {} in {}",
        args.join(" "),
        dir.display()
    );
    procs::run_to_end("npm", args, dir, Duration::from_secs(600)).await
}

/// Run the three phases with BullMQ on a fresh redis-server and return `bench.mjs`'s JSON document.
pub async fn run(dir: &Path, params: &Params, variant: Variant) -> anyhow::Result<Value> {
    let redis = BenchRedis::start().await?;
    let mut cmd = Command::new("node");
    cmd.arg(dir.join("bench.mjs"))
        .args(["--redis", &redis.url()])
        .args(["--redis-pid", &redis.pid().to_string()])
        .args(["--jobs", &params.jobs.to_string()])
        .args(["--concurrency", &params.concurrency.to_string()])
        .args(["--latency-secs", &params.latency_secs.to_string()])
        .args(["--chunk", &params.enqueue_chunk.to_string()])
        .args(["--enqueue-tasks", &params.enqueue_tasks.to_string()])
        .args(["--rates", &join(&params.rates)]);
    if variant == Variant::RemoveOnComplete {
        cmd.arg("--remove-on-complete");
    }
    // Bounded: the bench gives up by itself after --max-secs; this is the backstop.
    let limit = Duration::from_secs(
        120 + params.jobs / 2_000 + params.latency_secs * 3 * params.rates.len() as u64,
    );
    cmd.args(["--max-secs", &limit.as_secs().to_string()]);
    let mut child = cmd
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("starting node bench.mjs")?;
    let mut stdout = child.stdout.take().context("bench stdout")?;
    let mut out = String::new();
    let finished = tokio::time::timeout(limit + Duration::from_secs(30), async {
        stdout.read_to_string(&mut out).await?;
        child.wait().await
    })
    .await;
    let status = match finished {
        Ok(status) => status.context("waiting for bench.mjs")?,
        Err(_) => {
            procs::stop(&mut child, Duration::from_secs(5)).await?;
            bail!("BullMQ bench took longer than {limit:?}");
        }
    };
    if !status.success() {
        bail!("BullMQ bench failed ({status}); its log is above");
    }
    let line = out
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .context("BullMQ bench printed no JSON")?;
    let mut doc: Value = serde_json::from_str(line).context("parsing BullMQ bench JSON")?;
    doc["variant_label"] = Value::from(variant.label());
    Ok(doc)
}

fn join(v: &[u64]) -> String {
    v.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
}
