//! The `ws` scenario: C idle authenticated WebSocket connections subscribed to `app:bench` (gateway RSS per
//! connection), then broadcasts on `app:bench` at rising rates (deliveries/s and latency), against `ferry
//! gateway` and, with the same client processes, the Node `ws` peer (`loadtest/ws-peer/server.mjs`).
//!
//! The sockets live in `ws-client` child processes (this binary re-executed with a hidden subcommand, 2,500
//! sockets each by default), each started through `sh -c 'ulimit -n "$(ulimit -Hn)"; exec …'`. A client
//! process talks to the coordinator over its stdin/stdout, one line each way:
//!
//! * it prints `READY {"connected", "failed", …}` once every socket is open and subscribed;
//! * `MEASURE` resets its counters and histogram; `REPORT` prints `REPORT {…}` (deliveries, latency histogram,
//!   first/last receive time, closed sockets; cumulative since `MEASURE`); `COUNT` prints `COUNT <deliveries>`;
//!   `EXIT` (or end of stdin, or `--max-secs`) ends it.
//!
//! The publisher embeds `{"t": <send time, µs since the epoch>, "w": 0|1, "s": seq}` in each message (`w: 1` for
//! warm-up messages, not counted); a client takes receive − send with the same machine clock.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::gw::{self, Server};
use crate::hist::{AtomicHist, Hist};
use crate::proxies::{self, Via};
use crate::redis_cpu::round;
use crate::server::BenchRedis;

pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------------------
// Client process (`loadtest ws-client`)
// ---------------------------------------------------------------------------------------------------------

/// Arguments of one client process.
#[derive(Debug, Clone)]
pub struct ClientArgs {
    /// `ws://127.0.0.1:PORT/v1/ws`
    pub url: String,
    pub count: usize,
    /// Global index of this process's first socket (subjects are `bench-<index / per_subject>`).
    pub first: usize,
    pub per_subject: usize,
    pub channel: String,
    /// Connections being opened at once.
    pub connect_concurrency: usize,
    pub max_secs: u64,
}

#[derive(Debug, Default)]
struct Counters {
    received: AtomicU64,
    warmup: AtomicU64,
    other: AtomicU64,
    closed: AtomicU64,
    first_recv_us: AtomicU64,
    last_recv_us: AtomicU64,
    hist: AtomicHist,
}

/// What a client process reports after a measured phase.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ClientReport {
    pub received: u64,
    pub warmup: u64,
    pub other: u64,
    pub closed: u64,
    pub first_recv_us: u64,
    pub last_recv_us: u64,
    pub hist: Hist,
}

fn client_config() -> WebSocketConfig {
    // Small buffers: 2,500+ sockets per process; frames here are ~100 bytes.
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_write_buffer_size(64 * 1024)
}

/// Value of `"t":<digits>` and whether `"w":1` is present, without a full JSON parse.
fn parse_stamp(text: &str) -> Option<(u64, bool)> {
    let i = text.find("\"t\":")? + 4;
    let digits: &str = &text[i..];
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    let t = digits[..end].parse().ok()?;
    Some((t, text.contains("\"w\":1")))
}

async fn open_one(
    args: &ClientArgs,
    index: usize,
    tokens: &[Option<String>],
) -> anyhow::Result<tokio_tungstenite::WebSocketStream<TcpStream>> {
    let subject = index / args.per_subject.max(1);
    let url = match tokens.get(subject - args.first / args.per_subject.max(1)) {
        Some(Some(t)) => format!("{}?token={t}", args.url),
        _ => args.url.clone(),
    };
    let addr = args
        .url
        .strip_prefix("ws://")
        .and_then(|r| r.split('/').next())
        .context("url must be ws://host:port/…")?;
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (mut ws, _) =
        tokio_tungstenite::client_async_with_config(url, tcp, Some(client_config())).await?;
    let frame = json!({"id": 1, "op": "subscribe", "channel": args.channel}).to_string();
    ws.send(Message::text(frame)).await?;
    let reply = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(m) = ws.next().await {
            if let Message::Text(t) = m? {
                return Ok(t.to_string());
            }
        }
        bail!("closed before the subscribe reply")
    })
    .await
    .context("no subscribe reply within 30 s")??;
    let v: Value = serde_json::from_str(&reply).context("subscribe reply is not JSON")?;
    if v.get("ok") != Some(&Value::Bool(true)) {
        bail!("subscribe refused: {reply}");
    }
    Ok(ws)
}

async fn read_loop(mut ws: tokio_tungstenite::WebSocketStream<TcpStream>, c: Arc<Counters>) {
    while let Some(m) = ws.next().await {
        match m {
            Ok(Message::Text(t)) => {
                let now = now_us();
                match parse_stamp(t.as_str()) {
                    Some((_, true)) => {
                        c.warmup.fetch_add(1, Ordering::Relaxed);
                    }
                    Some((sent, false)) => {
                        c.received.fetch_add(1, Ordering::Relaxed);
                        c.hist.record(now.saturating_sub(sent));
                        let _ = c.first_recv_us.compare_exchange(
                            0,
                            now,
                            Ordering::Relaxed,
                            Ordering::Relaxed,
                        );
                        c.last_recv_us.fetch_max(now, Ordering::Relaxed);
                    }
                    None => {
                        c.other.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => {}
        }
    }
    c.closed.fetch_add(1, Ordering::Relaxed);
}

/// Body of `loadtest ws-client`: open the sockets, then obey stdin.
pub async fn client_main(args: ClientArgs) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(args.max_secs);
    let secret = std::env::var(gw::SECRET_ENV).ok();
    let per = args.per_subject.max(1);
    let first_subject = args.first / per;
    let last_subject = (args.first + args.count.max(1) - 1) / per;
    let mut tokens = Vec::new();
    for s in first_subject..=last_subject {
        tokens.push(match &secret {
            Some(sec) => Some(gw::token_with(
                sec.as_bytes(),
                &format!("bench-{s}"),
                &["subscribe"],
            )?),
            None => None,
        });
    }
    let tokens = Arc::new(tokens);
    let counters = Arc::new(Counters::default());
    let started = Instant::now();
    let sem = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let failed = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let mut opening = tokio::task::JoinSet::new();
    let args = Arc::new(args);
    for i in 0..args.count {
        let permit = sem.clone().acquire_owned().await?;
        let (args, tokens, counters, failed, first_error) = (
            args.clone(),
            tokens.clone(),
            counters.clone(),
            failed.clone(),
            first_error.clone(),
        );
        opening.spawn(async move {
            let r = tokio::time::timeout(
                Duration::from_secs(60),
                open_one(&args, args.first + i, &tokens),
            )
            .await;
            drop(permit);
            match r {
                Ok(Ok(ws)) => {
                    tokio::spawn(read_loop(ws, counters));
                }
                Ok(Err(e)) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    first_error
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get_or_insert(format!("{e:#}"));
                }
                Err(_) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    first_error
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get_or_insert("connect+subscribe timed out (60 s)".into());
                }
            }
        });
        // Reap finished opener tasks so the set stays small.
        while opening.try_join_next().is_some() {}
    }
    while opening.join_next().await.is_some() {}
    let failed = failed.load(Ordering::Relaxed);
    let ready = json!({
        "connected": args.count as u64 - failed,
        "failed": failed,
        "first_error": first_error.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        "connect_ms": started.elapsed().as_millis() as u64,
    });
    let mut out = tokio::io::stdout();
    out.write_all(format!("READY {ready}\n").as_bytes()).await?;
    out.flush().await?;

    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match tokio::time::timeout(left, lines.next_line()).await {
            Ok(Ok(Some(l))) => l,
            _ => break,
        };
        match line.trim() {
            "MEASURE" => {
                let _ = counters.hist.take();
                for a in [
                    &counters.received,
                    &counters.warmup,
                    &counters.other,
                    &counters.first_recv_us,
                    &counters.last_recv_us,
                ] {
                    a.store(0, Ordering::Relaxed);
                }
                out.write_all(b"OK\n").await?;
            }
            "COUNT" => {
                let n = counters.received.load(Ordering::Relaxed);
                out.write_all(format!("COUNT {n}\n").as_bytes()).await?;
            }
            "REPORT" => {
                let r = ClientReport {
                    received: counters.received.load(Ordering::Relaxed),
                    warmup: counters.warmup.load(Ordering::Relaxed),
                    other: counters.other.load(Ordering::Relaxed),
                    closed: counters.closed.load(Ordering::Relaxed),
                    first_recv_us: counters.first_recv_us.load(Ordering::Relaxed),
                    last_recv_us: counters.last_recv_us.load(Ordering::Relaxed),
                    hist: counters.hist.take(),
                };
                out.write_all(format!("REPORT {}\n", serde_json::to_string(&r)?).as_bytes())
                    .await?;
            }
            "EXIT" => break,
            _ => {}
        }
        out.flush().await?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------
// Coordinator
// ---------------------------------------------------------------------------------------------------------

/// Parameters of a `ws` run.
#[derive(Debug, Clone)]
pub struct Params {
    pub connections: usize,
    pub per_process: usize,
    pub per_subject: usize,
    /// Target deliveries/s of the broadcast phases (messages/s = rate / connections).
    pub rates: Vec<u64>,
    pub phase_secs: u64,
    pub settle_secs: u64,
    pub ferry_bin: PathBuf,
    pub peer_dir: PathBuf,
    /// Stop rising after this many rates in a row that were not sustained.
    pub stop_after_failures: usize,
    /// How the clients reach the ferry gateway, each in turn (the publisher always posts to the gateway).
    pub via: Vec<Via>,
    /// Open the connections in two halves, reading the RSS after each (see [`run_system`]).
    pub halves: bool,
}

struct ClientProc {
    child: Child,
    stdin: ChildStdin,
    lines: tokio::io::Lines<BufReader<ChildStdout>>,
}

impl ClientProc {
    async fn send(&mut self, cmd: &str) -> anyhow::Result<()> {
        self.stdin.write_all(format!("{cmd}\n").as_bytes()).await?;
        self.stdin.flush().await?;
        Ok(())
    }

    async fn expect(&mut self, prefix: &str, limit: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.lines.next_line()).await {
                Ok(Ok(Some(l))) => {
                    if let Some(rest) = l.strip_prefix(prefix) {
                        return Ok(rest.trim().to_owned());
                    }
                }
                Ok(Ok(None)) => bail!("client process ended before {prefix}"),
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => bail!("client process: no {prefix} within {limit:?}"),
            }
        }
    }
}

/// Client processes for the connections numbered `from..to`, once all have connected (or failed to).
async fn spawn_clients(
    p: &Params,
    ws_url: &str,
    with_tokens: bool,
    from: usize,
    to: usize,
) -> anyhow::Result<(Vec<ClientProc>, Value)> {
    let exe = std::env::current_exe().context("locating the loadtest binary")?;
    let mut procs = Vec::new();
    let mut first = from;
    while first < to {
        let count = p.per_process.min(to - first);
        let args: Vec<String> = vec![
            "ws-client".into(),
            "--url".into(),
            ws_url.into(),
            "--count".into(),
            count.to_string(),
            "--first".into(),
            first.to_string(),
            "--per-subject".into(),
            p.per_subject.to_string(),
            "--max-secs".into(),
            "3600".into(),
        ];
        let mut cmd = gw::raised_nofile(&exe, &args);
        if with_tokens {
            cmd.env(gw::SECRET_ENV, gw::BENCH_SECRET);
        } else {
            cmd.env_remove(gw::SECRET_ENV);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawning a ws-client process")?;
        let stdin = child.stdin.take().context("client stdin")?;
        let stdout = child.stdout.take().context("client stdout")?;
        procs.push(ClientProc {
            child,
            stdin,
            lines: BufReader::new(stdout).lines(),
        });
        first += count;
    }
    let mut connected = 0u64;
    let mut failed = 0u64;
    let mut connect_ms = 0u64;
    let mut first_error = Value::Null;
    for c in &mut procs {
        let r: Value = serde_json::from_str(&c.expect("READY", Duration::from_secs(300)).await?)?;
        connected += r["connected"].as_u64().unwrap_or(0);
        failed += r["failed"].as_u64().unwrap_or(0);
        connect_ms = connect_ms.max(r["connect_ms"].as_u64().unwrap_or(0));
        if first_error.is_null() && !r["first_error"].is_null() {
            first_error = r["first_error"].clone();
        }
    }
    let n = procs.len();
    Ok((
        procs,
        json!({"processes": n, "connected": connected, "failed": failed,
               "connect_ms": connect_ms, "first_error": first_error}),
    ))
}

/// CPU (user+system, µs) of all client processes so far.
fn clients_cpu(clients: &[ClientProc]) -> u64 {
    clients
        .iter()
        .filter_map(|c| c.child.id())
        .filter_map(|pid| crate::redis_cpu::proc_cpu_micros(pid).ok())
        .sum()
}

async fn stop_clients(procs: &mut Vec<ClientProc>) {
    for c in procs.iter_mut() {
        let _ = c.send("EXIT").await;
    }
    for c in procs.iter_mut() {
        if tokio::time::timeout(Duration::from_secs(10), c.child.wait())
            .await
            .is_err()
        {
            let _ = c.child.kill().await;
        }
    }
    procs.clear();
}

/// Where and how to publish.
#[derive(Debug, Clone)]
struct Publisher {
    url: String,
    /// Bearer tokens used in turn (ferry: `publish`-scoped subjects, each under the 100/s HTTP limit).
    tokens: Vec<String>,
}

#[derive(Debug, Default)]
struct PublishOutcome {
    sent: u64,
    measured: u64,
    errors: u64,
    first_error: Option<String>,
    first_measured_us: u64,
    last_send_us: u64,
}

/// Publish `msgs_per_sec` for `secs` (the first tenth, at most 2 s, flagged as warm-up). Paced from the start:
/// message i leaves at start + i/rate; at most 64 requests in flight.
async fn publish_phase(
    http: &reqwest::Client,
    p: &Publisher,
    msgs_per_sec: f64,
    secs: u64,
) -> PublishOutcome {
    let total = (msgs_per_sec * secs as f64).round().max(1.0) as u64;
    let warm = ((total as f64 * 0.1).round() as u64).min((msgs_per_sec * 2.0) as u64);
    let sem = Arc::new(Semaphore::new(64));
    let errors = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let start = tokio::time::Instant::now();
    let mut out = PublishOutcome::default();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..total {
        let at = start + Duration::from_secs_f64(i as f64 / msgs_per_sec);
        tokio::time::sleep_until(at).await;
        let Ok(permit) = sem.clone().acquire_owned().await else {
            break;
        };
        let t = now_us();
        let w = u8::from(i < warm);
        if w == 0 && out.first_measured_us == 0 {
            out.first_measured_us = t;
        }
        out.last_send_us = t;
        let body = format!("{{\"t\":{t},\"w\":{w},\"s\":{i}}}");
        let mut req = http
            .post(&p.url)
            .header("content-type", "application/json")
            .body(body);
        if !p.tokens.is_empty() {
            req = req.bearer_auth(&p.tokens[i as usize % p.tokens.len()]);
        }
        let (errors, first_error) = (errors.clone(), first_error.clone());
        tasks.spawn(async move {
            let r = req.send().await;
            drop(permit);
            let e = match r {
                Ok(r) if r.status().as_u16() == 202 => return,
                Ok(r) => format!("HTTP {}", r.status()),
                Err(e) => e.to_string(),
            };
            errors.fetch_add(1, Ordering::Relaxed);
            first_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert(e);
        });
        while tasks.try_join_next().is_some() {}
        out.sent += 1;
        if w == 0 {
            out.measured += 1;
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    out.errors = errors.load(Ordering::Relaxed);
    out.first_error = first_error
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    out
}

/// Where the clients connect: a proxy's port (and its pid, whose CPU is reported), else the server's.
#[derive(Debug, Clone, Copy, Default)]
struct Front {
    port: Option<u16>,
    pid: Option<u32>,
}

/// One system (ferry or node) through both phases.
async fn run_system(
    system: &'static str,
    server: &mut Server,
    front: Front,
    publisher: &Publisher,
    with_tokens: bool,
    p: &Params,
    http: &reqwest::Client,
) -> anyhow::Result<Value> {
    let ws_url = format!("ws://127.0.0.1:{}/v1/ws", front.port.unwrap_or(server.port));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = gw::rss_kib(server.pid)?;
    eprintln!(
        "[loadtest] ws/{system}: RSS {rss_before} KiB; opening {} connections",
        p.connections
    );
    // With `halves`, the first half is opened and measured on its own: what the second half adds is the
    // marginal cost of a connection, without what does not grow with them (the process's first connections, the
    // allocator's keep from the first connect burst), which makes the average move from run to run.
    let split = if p.halves { p.connections / 2 } else { 0 };
    let mut clients = Vec::new();
    let mut half: Option<(u64, u64, u64)> = None;
    if split > 0 {
        let (procs, connect) = spawn_clients(p, &ws_url, with_tokens, 0, split).await?;
        clients = procs;
        eprintln!("[loadtest] ws/{system}: first half: {connect}");
        tokio::time::sleep(Duration::from_secs(p.settle_secs)).await;
        half = Some((
            connect["connected"].as_u64().unwrap_or(0),
            gw::rss_kib(server.pid)?,
            connect["connect_ms"].as_u64().unwrap_or(0),
        ));
    }
    let (procs, rest) = spawn_clients(p, &ws_url, with_tokens, split, p.connections).await?;
    clients.extend(procs);
    let connect = match half {
        None => rest,
        Some((n, _, ms)) => json!({
            "processes": clients.len(),
            "connect_ms": ms + rest["connect_ms"].as_u64().unwrap_or(0),
            "connected": n + rest["connected"].as_u64().unwrap_or(0),
            "failed": (split as u64).saturating_sub(n) + rest["failed"].as_u64().unwrap_or(0),
            "first_error": rest["first_error"],
            "halves": true,
        }),
    };
    let connected = connect["connected"].as_u64().unwrap_or(0);
    eprintln!("[loadtest] ws/{system}: {connect}");
    if connected == 0 {
        stop_clients(&mut clients).await;
        bail!("no connection could be opened: {connect}");
    }
    tokio::time::sleep(Duration::from_secs(p.settle_secs)).await;
    let rss_idle = gw::rss_kib(server.pid)?;
    let per_conn = (rss_idle as f64 - rss_before as f64) / connected as f64;
    eprintln!(
        "[loadtest] ws/{system}: RSS {rss_idle} KiB with {connected} idle connections: {:.2} KiB/connection",
        per_conn
    );
    let marginal = half.and_then(|(n, rss_half, _)| {
        let added = connected.checked_sub(n).filter(|&a| a > 0)?;
        let m = (rss_idle as f64 - rss_half as f64) / added as f64;
        eprintln!(
            "[loadtest] ws/{system}: RSS {rss_half} KiB with the first {n}: the second {added} added {m:.2} KiB each"
        );
        Some(json!({"connected_first_half": n, "rss_kib_first_half": rss_half,
                    "rss_kib_per_connection_second_half": round(m, 3)}))
    });

    let mut phases = Vec::new();
    let mut max_sustained: Option<f64> = None;
    let mut failures_in_row = 0;
    let mut max_achieved = 0f64;
    let cpu_ticks = crate::redis_cpu::clock_ticks();
    for &rate in &p.rates {
        let msgs = rate as f64 / connected as f64;
        for c in &mut clients {
            c.send("MEASURE").await?;
        }
        for c in &mut clients {
            c.expect("OK", Duration::from_secs(30)).await?;
        }
        let cpu0 = crate::redis_cpu::proc_cpu_micros(server.pid).unwrap_or(0);
        let proxy_cpu0 = front
            .pid
            .and_then(|pid| crate::redis_cpu::proc_cpu_micros(pid).ok());
        let client_cpu0 = clients_cpu(&clients);
        let sys0 = crate::redis_cpu::system_cpu_ticks().ok();
        let t0 = Instant::now();
        let out = publish_phase(http, publisher, msgs, p.phase_secs).await;
        // Let the tail arrive: up to 3 s, ending early once every expected delivery is in.
        let expected = out.measured * connected;
        let grace_end = Instant::now() + Duration::from_secs(3);
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let mut got = 0u64;
            for c in &mut clients {
                c.send("COUNT").await?;
            }
            for c in &mut clients {
                got += c
                    .expect("COUNT", Duration::from_secs(30))
                    .await?
                    .parse::<u64>()
                    .unwrap_or(0);
            }
            if got >= expected || Instant::now() >= grace_end {
                break;
            }
        }
        let mut reports: Vec<ClientReport> = Vec::new();
        for c in &mut clients {
            c.send("REPORT").await?;
        }
        for c in &mut clients {
            reports.push(serde_json::from_str(
                &c.expect("REPORT", Duration::from_secs(30)).await?,
            )?);
        }
        let wall = t0.elapsed();
        let cpu1 = crate::redis_cpu::proc_cpu_micros(server.pid).unwrap_or(0);
        let proxy_cores = match (front.pid, proxy_cpu0) {
            (Some(pid), Some(c0)) => crate::redis_cpu::proc_cpu_micros(pid)
                .ok()
                .map(|c1| round(c1.saturating_sub(c0) as f64 / 1e6 / wall.as_secs_f64(), 3)),
            _ => None,
        };
        let client_cores =
            clients_cpu(&clients).saturating_sub(client_cpu0) as f64 / 1e6 / wall.as_secs_f64();
        let busy_cores = match (sys0, crate::redis_cpu::system_cpu_ticks().ok()) {
            (Some((b0, _)), Some((b1, _))) => Some(round(
                b1.saturating_sub(b0) as f64 / cpu_ticks as f64 / wall.as_secs_f64(),
                3,
            )),
            _ => None,
        };
        let mut hist = Hist::default();
        let mut delivered = 0;
        let mut closed = 0;
        let mut other = 0;
        let mut last_recv = 0;
        for r in &reports {
            hist.merge(&r.hist);
            delivered += r.received;
            closed += r.closed;
            other += r.other;
            last_recv = last_recv.max(r.last_recv_us);
        }
        let span_s = last_recv.saturating_sub(out.first_measured_us) as f64 / 1e6;
        let send_span_s = out.last_send_us.saturating_sub(out.first_measured_us) as f64 / 1e6
            + 1.0 / msgs.max(1e-9);
        let achieved = if span_s > 0.0 {
            delivered as f64 / span_s.max(send_span_s)
        } else {
            0.0
        };
        let lat = hist.summary();
        let ratio = if expected > 0 {
            delivered as f64 / expected as f64
        } else {
            0.0
        };
        // Kept up: (nearly) every delivery arrived, at (nearly) the offered rate, nothing dropped.
        let sustained =
            ratio >= 0.99 && achieved >= 0.97 * rate as f64 && out.errors == 0 && closed == 0;
        max_achieved = max_achieved.max(achieved);
        if sustained {
            max_sustained = Some(max_sustained.unwrap_or(0.0).max(achieved));
            failures_in_row = 0;
        } else {
            failures_in_row += 1;
        }
        let server_cpu = (cpu1.saturating_sub(cpu0)) as f64 / 1e6 / wall.as_secs_f64();
        eprintln!(
            "[loadtest] ws/{system}: offered {rate} deliveries/s ({msgs:.2} msg/s): achieved {:.0}/s, delivered {:.4} of expected, p50 {:?} ms, p99 {:?} ms, CPU server {:.2} proxy {:?} clients {:.2} machine {:?} cores{}",
            achieved,
            ratio,
            lat.p50_ms,
            lat.p99_ms,
            server_cpu,
            proxy_cores,
            client_cores,
            busy_cores,
            if sustained { "" } else { " — NOT sustained" }
        );
        phases.push(json!({
            "offered_deliveries_per_sec": rate,
            "messages_per_sec": round(msgs, 3),
            "messages_sent": out.sent,
            "messages_measured": out.measured,
            "publish_errors": out.errors,
            "publish_first_error": out.first_error,
            "expected_deliveries": expected,
            "delivered": delivered,
            "delivered_ratio": round(ratio, 5),
            "achieved_deliveries_per_sec": round(achieved, 0),
            "latency": lat,
            "closed_connections": closed,
            "unparsed_frames": other,
            "server_cpu_cores": round(server_cpu, 3),
            "proxy_cpu_cores": proxy_cores,
            "client_processes_cpu_cores": round(client_cores, 3),
            "system_busy_cores": busy_cores,
            "clock_ticks_per_sec": cpu_ticks,
            "sustained": sustained,
        }));
        if failures_in_row >= p.stop_after_failures.max(1) {
            eprintln!(
                "[loadtest] ws/{system}: {failures_in_row} rates in a row not sustained: stop rising"
            );
            break;
        }
    }
    let rss_after = gw::rss_kib(server.pid).ok();
    stop_clients(&mut clients).await;
    Ok(json!({
        "system": system,
        "connect": connect,
        "rss_kib_before": rss_before,
        "rss_kib_idle": rss_idle,
        "rss_kib_per_connection": round(per_conn, 3),
        "halves": marginal,
        "rss_kib_after_broadcast": rss_after,
        "broadcast": phases,
        "max_sustained_deliveries_per_sec": max_sustained.map(|v| round(v, 0)),
        "max_achieved_deliveries_per_sec": round(max_achieved, 0),
    }))
}

/// The whole `ws` scenario: ferry, then (unless skipped) the Node peer.
pub async fn run(p: &Params, ferry: bool, node: bool) -> anyhow::Result<Value> {
    let logdir = tempfile::tempdir()?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .timeout(Duration::from_secs(30))
        .build()?;
    let mut out = json!({});
    if ferry {
        let redis = BenchRedis::start().await?;
        let mut gateway =
            gw::start_gateway(&p.ferry_bin, &redis.ferry_args(), logdir.path(), &http).await?;
        let tokens = (0..16)
            .map(|i| gw::token(&format!("bench-publisher-{i}"), &["publish"]))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let publisher = Publisher {
            url: format!(
                "http://127.0.0.1:{}/v1/channels/bench/publish",
                gateway.port
            ),
            tokens,
        };
        for &via in &p.via {
            let (system, key) = match via {
                Via::Direct => ("ferry", "ferry".to_owned()),
                Via::Balancer => ("ferry-via-balancer", "ferry_via_balancer".to_owned()),
                Via::Haproxy => ("ferry-via-haproxy", "ferry_via_haproxy".to_owned()),
            };
            let r = async {
                let mut proxy = proxies::start(
                    via,
                    &p.ferry_bin,
                    &redis.url(),
                    gateway.port,
                    logdir.path(),
                    &http,
                )
                .await?;
                let front = Front {
                    port: proxy.as_ref().map(|s| s.port),
                    pid: proxy.as_ref().map(|s| s.pid),
                };
                let r = run_system(system, &mut gateway, front, &publisher, true, p, &http).await;
                if let Some(s) = proxy.as_mut() {
                    s.stop().await?;
                }
                r
            }
            .await;
            out[key] = match r {
                Ok(v) => v,
                Err(e) => json!({"system": system, "error": format!("{e:#}"),
                                "gateway_log_tail": crate::procs::tail(&gateway.log, 2000)}),
            };
        }
        gateway.stop().await?;
    }
    if node {
        let r = async {
            gw::ensure_ws_peer_deps(&p.peer_dir).await?;
            let mut server = gw::start_node_peer(&p.peer_dir, logdir.path(), &http).await?;
            let publisher = Publisher {
                url: format!("http://127.0.0.1:{}/v1/channels/bench/publish", server.port),
                tokens: Vec::new(),
            };
            let r = run_system(
                "node-ws",
                &mut server,
                Front::default(),
                &publisher,
                false,
                p,
                &http,
            )
            .await;
            server.stop().await?;
            r
        }
        .await;
        out["node_ws"] = match r {
            Ok(v) => v,
            Err(e) => json!({"system": "node-ws", "error": format!("{e:#}")}),
        };
    }
    out["comparison"] = compare(&out);
    if p.via.len() > 1 {
        out["proxy_overhead"] = proxy_overhead(&out);
    }
    Ok(out)
}

/// Per offered rate, each way in: p50/p99 and deliveries/s achieved, and the proxy's CPU.
fn proxy_overhead(out: &Value) -> Value {
    let ways = [
        ("direct", &out["ferry"]),
        ("balancer", &out["ferry_via_balancer"]),
        ("haproxy", &out["ferry_via_haproxy"]),
    ];
    let mut rates: Vec<u64> = ways
        .iter()
        .filter_map(|(_, v)| v["broadcast"].as_array())
        .flatten()
        .filter_map(|x| x["offered_deliveries_per_sec"].as_u64())
        .collect();
    rates.sort_unstable();
    rates.dedup();
    let rows: Vec<Value> = rates
        .iter()
        .map(|&rate| {
            let mut row = json!({"offered_deliveries_per_sec": rate});
            for (name, v) in &ways {
                if let Some(x) = v["broadcast"].as_array().and_then(|a| {
                    a.iter()
                        .find(|x| x["offered_deliveries_per_sec"].as_u64() == Some(rate))
                }) {
                    row[*name] = json!({
                        "p50_ms": x["latency"]["p50_ms"],
                        "p99_ms": x["latency"]["p99_ms"],
                        "achieved_deliveries_per_sec": x["achieved_deliveries_per_sec"],
                        "sustained": x["sustained"],
                        "proxy_cpu_cores": x["proxy_cpu_cores"],
                    });
                }
            }
            row
        })
        .collect();
    let max: Value = ways
        .iter()
        .map(|(name, v)| {
            (
                (*name).to_owned(),
                v["max_sustained_deliveries_per_sec"].clone(),
            )
        })
        .collect::<serde_json::Map<_, _>>()
        .into();
    json!({"by_rate": rows, "max_sustained_deliveries_per_sec": max})
}

fn compare(out: &Value) -> Value {
    let f = &out["ferry"];
    let n = &out["node_ws"];
    let rss = f["rss_kib_per_connection"].as_f64();
    let fmax = f["max_sustained_deliveries_per_sec"].as_f64();
    let nmax = n["max_sustained_deliveries_per_sec"].as_f64();
    let fach = f["max_achieved_deliveries_per_sec"].as_f64();
    let nach = n["max_achieved_deliveries_per_sec"].as_f64();
    let p99_at_50k = f["broadcast"].as_array().and_then(|a| {
        a.iter()
            .find(|x| x["offered_deliveries_per_sec"].as_u64() == Some(50_000))
            .and_then(|x| x["latency"]["p99_ms"].as_f64())
    });
    json!({
        "rss_kib_per_connection": {"ferry": rss, "node_ws": n["rss_kib_per_connection"].as_f64(),
                                   "target_max": 4.0, "met": rss.map(|r| r <= 4.0)},
        "max_sustained_deliveries_per_sec": {"ferry": fmax, "node_ws": nmax,
            "ratio": match (fmax, nmax) { (Some(a), Some(b)) if b > 0.0 => Some(round(a / b, 3)), _ => None },
            "target_ratio_min": 1.5,
            "met": match (fmax, nmax) { (Some(a), Some(b)) => Some(a >= 1.5 * b), _ => None }},
        "max_achieved_deliveries_per_sec": {"ferry": fach, "node_ws": nach,
            "ratio": match (fach, nach) { (Some(a), Some(b)) if b > 0.0 => Some(round(a / b, 3)), _ => None }},
        "ferry_p99_ms_at_50000": {"value": p99_at_50k, "target_max": 10.0, "met": p99_at_50k.map(|v| v < 10.0)},
    })
}

/// Whether `path` looks like the peer folder.
pub fn peer_dir_ok(path: &Path) -> bool {
    path.join("server.mjs").exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps() {
        let f = r#"{"channel":"app:bench","data":{"s":3,"t":1764464000000123,"w":0},"event":"message"}"#;
        assert_eq!(parse_stamp(f), Some((1_764_464_000_000_123, false)));
        let f = r#"{"channel":"app:bench","event":"message","data":{"t":5,"w":1,"s":0}}"#;
        assert_eq!(parse_stamp(f), Some((5, true)));
        assert_eq!(parse_stamp(r#"{"id":1,"ok":true}"#), None);
    }
}
