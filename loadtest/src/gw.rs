//! Processes of the `ws` and `api` scenarios: the `ferry gateway` (and `ferry worker`) under test, the Node
//! `ws` peer, tokens, RSS and a raised open-file limit.
//!
//! Every child is started through `sh -c 'ulimit -n "$(ulimit -Hn)"; exec …'`, so its soft open-file limit is
//! raised to the hard limit (~20,000 here) without any unsafe code or extra crate; the loadtest process itself
//! keeps few sockets open (the client sockets live in `ws-client` child processes, 2,500 each by default).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ferry_gateway::auth::{MintClaims, mint};
use tokio::process::{Child, Command};

use crate::procs;

/// Shared secret of the gateway under test (≥ 32 bytes); a benchmark-only value.
pub const BENCH_SECRET: &str = "loadtest-only-secret-0123456789abcdef-0123456789";

/// Environment variable through which `ws-client` processes get the secret to mint their own tokens.
pub const SECRET_ENV: &str = "LOADTEST_JWT_SECRET";

/// `program args…` run through a shell that first raises the soft open-file limit to the hard one.
pub fn raised_nofile(program: &Path, args: &[String]) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(r#"ulimit -n "$(ulimit -Hn)" 2>/dev/null; exec "$@""#)
        .arg("sh")
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    c
}

/// A free loopback port (bound, then released: the child binds it right after).
pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("binding a free port")?;
    Ok(l.local_addr()?.port())
}

/// VmRSS of a process in KiB, from `/proc/<pid>/status`.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS line")
}

/// An HS256 token for the bench gateway.
pub fn token(sub: &str, scopes: &[&str]) -> anyhow::Result<String> {
    token_with(BENCH_SECRET.as_bytes(), sub, scopes)
}

pub fn token_with(secret: &[u8], sub: &str, scopes: &[&str]) -> anyhow::Result<String> {
    mint(
        secret,
        &MintClaims::new(sub, &scopes.join(" "), Duration::from_secs(4 * 3600)),
    )
    .map_err(|e| anyhow::anyhow!("minting a token: {e}"))
}

/// Poll `GET http://addr/healthz` until it answers 200 (every 50 ms, at most `limit`).
pub async fn wait_healthy(
    http: &reqwest::Client,
    port: u16,
    child: &mut Child,
    log: &Path,
    limit: Duration,
) -> anyhow::Result<()> {
    let url = format!("http://127.0.0.1:{port}/healthz");
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(status) = child.try_wait()? {
            bail!(
                "server exited ({status}) before answering; log tail:\n{}",
                procs::tail(log, 2000)
            );
        }
        if let Ok(r) = http.get(&url).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!(
        "server did not answer {url} within {limit:?}; log tail:\n{}",
        procs::tail(log, 2000)
    )
}

/// A server child with its log file and listen port.
#[derive(Debug)]
pub struct Server {
    pub child: Child,
    pub pid: u32,
    pub port: u16,
    pub log: PathBuf,
}

impl Server {
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        procs::stop(&mut self.child, Duration::from_secs(10)).await
    }
}

fn log_files(log: &Path) -> anyhow::Result<(Stdio, Stdio)> {
    let f = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    Ok((f.try_clone()?.into(), f.into()))
}

/// `ferry gateway <redis> --listen 127.0.0.1:PORT --jwt-secret S --max-unauthenticated-per-ip 4096`, logging at
/// `warn`; `redis` points it at the run's Redis ([`crate::server::BenchRedis::ferry_args`]: `--redis URL` or
/// `--redis-cluster URL,…`).
pub async fn start_gateway(
    ferry_bin: &Path,
    redis: &[String],
    logdir: &Path,
    http: &reqwest::Client,
) -> anyhow::Result<Server> {
    let port = free_port()?;
    let log = logdir.join("gateway.log");
    let (out, err) = log_files(&log)?;
    let mut args = vec!["gateway".to_owned()];
    args.extend_from_slice(redis);
    args.extend(
        [
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--jwt-secret",
            BENCH_SECRET,
            // Every benchmark client comes from 127.0.0.1: the per-address budget for connections that have
            // not yet shown a token (256) would answer 429 to connect bursts from several client processes.
            "--max-unauthenticated-per-ip",
            "4096",
        ]
        .map(str::to_owned),
    );
    let mut child = raised_nofile(ferry_bin, &args)
        .env("FERRY_LOG", "warn")
        .stdout(out)
        .stderr(err)
        .spawn()
        .context("spawning ferry gateway")?;
    let pid = child.id().context("gateway pid")?;
    wait_healthy(http, port, &mut child, &log, Duration::from_secs(30)).await?;
    Ok(Server {
        child,
        pid,
        port,
        log,
    })
}

/// `ferry worker --redis URL --queues Q --concurrency C --batch-size B`.
pub fn start_worker(
    ferry_bin: &Path,
    redis_url: &str,
    queue: &str,
    concurrency: u32,
    batch_size: u32,
    logdir: &Path,
) -> anyhow::Result<Server> {
    let log = logdir.join("worker.log");
    let (out, err) = log_files(&log)?;
    let args: Vec<String> = vec![
        "worker".into(),
        "--redis".into(),
        redis_url.into(),
        "--queues".into(),
        queue.into(),
        "--concurrency".into(),
        concurrency.to_string(),
        "--batch-size".into(),
        batch_size.to_string(),
    ];
    let child = raised_nofile(ferry_bin, &args)
        .env("FERRY_LOG", "warn")
        // Nothing here reads the worker's admin listener, and a taken default port would stop the worker.
        .env("FERRY_ADMIN_LISTEN", "off")
        .stdout(out)
        .stderr(err)
        .spawn()
        .context("spawning ferry worker")?;
    let pid = child.id().context("worker pid")?;
    Ok(Server {
        child,
        pid,
        port: 0,
        log,
    })
}

/// The folder of the Node `ws` peer (`server.mjs`, `package.json`).
pub fn ws_peer_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("ws-peer")
}

/// Install the peer's node dependencies (`npm ci` from the committed lock file) unless present.
pub async fn ensure_ws_peer_deps(dir: &Path) -> anyhow::Result<()> {
    if dir.join("node_modules/ws/package.json").exists() {
        return Ok(());
    }
    if !procs::exists("node").await || !procs::exists("npm").await {
        bail!("node and npm are needed for the Node ws peer (Node.js 20 or newer)");
    }
    eprintln!(
        "[loadtest] installing the ws peer: npm ci in {}",
        dir.display()
    );
    procs::run_to_end(
        "npm",
        &["ci", "--no-audit", "--no-fund"],
        dir,
        Duration::from_secs(600),
    )
    .await
}

/// `node server.mjs PORT` in the peer folder.
pub async fn start_node_peer(
    dir: &Path,
    logdir: &Path,
    http: &reqwest::Client,
) -> anyhow::Result<Server> {
    let port = free_port()?;
    let log = logdir.join("node-ws.log");
    let (out, err) = log_files(&log)?;
    let args = vec![
        dir.join("server.mjs").display().to_string(),
        port.to_string(),
    ];
    let mut child = raised_nofile(Path::new("node"), &args)
        .current_dir(dir)
        .stdout(out)
        .stderr(err)
        .spawn()
        .context("spawning node server.mjs")?;
    // `sh` execs node, so the child's pid is node's.
    let pid = child.id().context("node pid")?;
    wait_healthy(http, port, &mut child, &log, Duration::from_secs(30)).await?;
    Ok(Server {
        child,
        pid,
        port,
        log,
    })
}
