//! Helpers shared by the `ferry` binary's integration tests (`use crate::support::...` in each test module).
//!
//! - [`ferry`]: a `Command` for the binary under test; each test sets its own environment and stdio on it.
//! - [`Proc`]: a spawned `ferry` child: SIGTERM ([`Proc::sigterm`]), a bounded wait for its exit
//!   ([`Proc::wait_exit`]; both: [`Proc::stop`]), SIGKILLed and reaped when dropped. [`Proc::spawn_logged`] sends its stderr to a
//!   file of its own ([`Proc::log`]), printed when the test panics.
//! - [`Proc::spawn_listening`]: a role started on port 0 (`--listen 127.0.0.1:0`), returned once it logged the
//!   address it bound ([`announced`] reads it from the line), so no other process can take the port between a
//!   pick and the bind.
//! - Waits are `ferry_testkit::eventually`, the workspace's one poll-until-it-holds helper.
//! - [`repo`] / [`read`]: the repository's root and its files.
//! - [`token`]: a signed bearer token; [`sample`]: one series of a `/metrics` text. `ferry_testkit::free_port`
//!   is left for listeners whose process does not log what it bound: a worker's or an autoscaler's
//!   `--admin-listen`, and other programs (HAProxy, Prometheus).
//! - HTTP: [`until_healthy`] (`/healthz` answers), [`readyz`] and [`until_ready`] (`/readyz` is 200),
//!   [`submit`] (POST a job, 202) and [`poll_json`] / [`until_completed`] (GET until a condition holds);
//!   [`until_balancer_sees`] (a `ferry balancer` counts N ready gateways).
//! - Broker: [`redis_and_broker`], [`enqueue_many`], [`states`] (jobs by state), [`until_drained`] (a queue is empty),
//!   [`count_completions`] (`job.completed` per job), [`completions_total`] and
//!   [`assert_completed_once`].

pub mod manifests;

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use ferry_broker::{Broker, EngineConfig, RedisBroker};
use ferry_core::{EventType, JobId, JobState, NewJob, QueueName};
use ferry_gateway::auth::{MintClaims, mint};
use ferry_testkit::RedisServer;
pub use ferry_testkit::cluster::sample;
use ferry_testkit::eventually;
use futures::StreamExt;
use serde_json::Value;

/// The repository's root directory.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// The `promtool` to run: see [`prometheus_tool`].
pub fn promtool() -> PathBuf {
    prometheus_tool("promtool")
}

/// `promtool` or `prometheus`: the one on PATH, else the one `scripts/test.sh` unpacks (without installing the
/// Debian package) into `$FERRY_TOOLS_DIR/prometheus/bin`, by default target/tools/prometheus/bin. Neither is a
/// failure naming both places.
pub fn prometheus_tool(name: &str) -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).find(|d| d.join(name).is_file()));
    if let Some(dir) = on_path {
        return dir.join(name);
    }
    let tools = std::env::var_os("FERRY_TOOLS_DIR")
        .filter(|d| !d.is_empty())
        .map_or_else(|| repo().join("target/tools"), PathBuf::from);
    let unpacked = tools.join("prometheus/bin").join(name);
    assert!(
        unpacked.is_file(),
        "{name} is neither on PATH nor at {}: run scripts/test.sh, which unpacks it there",
        unpacked.display()
    );
    unpacked
}

/// A file of the repository (`rel` from its root), as text.
pub fn read(rel: &str) -> String {
    let path = repo().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The `ferry` binary under test, with nothing set: callers add arguments, environment and stdio.
pub fn ferry() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
}

/// `ferry ARGS` as a role of a test cluster: logging at `warn,ferry_cli=info`, none of the machine's
/// `FERRY_CONFIG`, `FERRY_REDIS_URLS` or `FERRY_LOG_FORMAT` (so a test's flags and `env` are all it gets), no
/// stdin, stdout discarded.
pub fn role(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = ferry();
    cmd.args(args)
        .env("FERRY_LOG", "warn,ferry_cli=info")
        .env_remove("FERRY_CONFIG")
        .env_remove("FERRY_REDIS_URLS")
        .env_remove("FERRY_LOG_FORMAT")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    cmd
}

/// A running `ferry` child process, SIGKILLed (and reaped) if the test ends without stopping it.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    /// Where its stderr goes, when [`Proc::spawn_logged`] captured it; printed if the test panics.
    log: Option<PathBuf>,
    /// Its stderr so far, when [`Proc::spawn_listening`] reads it, and the thread reading it.
    lines: Option<Arc<Mutex<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
    _dir: Option<tempfile::TempDir>,
}

impl Proc {
    /// Spawns `cmd` exactly as configured (environment, stdio).
    pub fn spawn(cmd: &mut Command) -> Result<Self> {
        let child = cmd.spawn().with_context(|| format!("spawn {cmd:?}"))?;
        Ok(Self {
            child,
            log: None,
            lines: None,
            reader: None,
            _dir: None,
        })
    }

    /// Spawns `cmd`, which binds its listeners to port 0, and waits (30 s) until it logs the INFO line that
    /// contains `announce` (`"gateway listening"`, `"balancer listening"`): the process and that line, whose
    /// addresses [`announced`] reads. No port is chosen before the process binds it, so none can be taken in
    /// between.
    ///
    /// Its stderr is read line by line: each line goes on to the test's stderr (the test runner shows it with a
    /// failure) and is kept for [`Proc::log`], which has all of it once [`Proc::wait_exit`] returned.
    pub async fn spawn_listening(cmd: &mut Command, announce: &str) -> Result<(Self, String)> {
        let mut proc = Self::spawn(cmd.stderr(Stdio::piped()))?;
        let stderr = proc.child.stderr.take().context("a piped stderr")?;
        let lines = Arc::new(Mutex::new(String::new()));
        proc.lines = Some(lines.clone());
        let pid = proc.pid();
        proc.reader = Some(std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("[ferry {pid}] {line}");
                let mut all = lines.lock().unwrap();
                all.push_str(&line);
                all.push('\n');
            }
        }));
        let line = eventually(
            Duration::from_secs(30),
            &format!("ferry {pid} to log {announce:?}"),
            || {
                let exited = proc.child.try_wait();
                let line = proc
                    .log()
                    .lines()
                    .find(|l| l.contains(announce))
                    .map(str::to_owned);
                async move {
                    if let Some(line) = line {
                        return Ok(Some(Ok(line)));
                    }
                    match exited? {
                        Some(status) => Ok(Some(Err(anyhow::anyhow!(
                            "ferry {pid} exited ({status}) before it logged {announce:?}"
                        )))),
                        None => Ok(None),
                    }
                }
            },
        )
        .await??;
        Ok((proc, line))
    }

    /// Spawns `cmd`, a `ferry gateway` or `ferry dev` command, with `--listen 127.0.0.1:0` added, once it listens:
    /// the process and the address it bound (see [`Proc::spawn_listening`]).
    pub async fn spawn_gateway(cmd: &mut Command) -> Result<(Self, String)> {
        let (proc, line) =
            Self::spawn_listening(cmd.args(["--listen", "127.0.0.1:0"]), "gateway listening")
                .await?;
        Ok((proc, announced(&line, "listen")?))
    }

    /// Spawns `cmd` with its stderr going to a file in a temporary directory of its own: read it with
    /// [`Proc::log`]; it is printed if the test panics while the process is alive.
    pub fn spawn_logged(cmd: &mut Command) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let log = dir.path().join("stderr.log");
        let mut proc = Self::spawn(cmd.stderr(Stdio::from(File::create(&log)?)))?;
        proc.log = Some(log);
        proc._dir = Some(dir);
        Ok(proc)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// What it wrote to stderr so far, when spawned with [`Proc::spawn_logged`] or [`Proc::spawn_listening`];
    /// empty otherwise.
    pub fn log(&self) -> String {
        if let Some(lines) = &self.lines {
            return lines.lock().unwrap().clone();
        }
        self.log
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// SIGKILL, and reap it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, as an orchestrator or an operator sends it (`kill -TERM`).
    pub fn sigterm(&self) -> Result<()> {
        let pid = self.pid().to_string();
        if !Command::new("kill")
            .args(["-TERM", &pid])
            .status()?
            .success()
        {
            bail!("kill -TERM {pid} failed");
        }
        Ok(())
    }

    /// SIGTERM, then [`Proc::wait_exit`].
    pub async fn stop(&mut self, within: Duration) -> Result<ExitStatus> {
        self.sigterm()?;
        self.wait_exit(within).await
    }

    /// Its exit status, once it exits; an error when it is still running after `within`.
    pub async fn wait_exit(&mut self, within: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait()? {
                // Its stderr ends with it: read to the end, so the log is whole.
                if let Some(reader) = self.reader.take() {
                    let _ = tokio::task::spawn_blocking(move || reader.join()).await;
                }
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!("ferry {} did not exit within {within:?}", self.pid());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
        if self.log.is_some() && std::thread::panicking() {
            eprintln!("--- log of ferry {} ---\n{}", self.pid(), self.log());
        }
    }
}

/// The address `key` names in an announcing log line ([`Proc::spawn_listening`]), as `HOST:PORT`: from
/// `key=127.0.0.1:4000` or `key=Some(127.0.0.1:4000)` in a text line, `"key":"127.0.0.1:4000"` in a JSON one.
pub fn announced(line: &str, key: &str) -> Result<String> {
    let value = if let Some((_, rest)) = line.split_once(&format!("{key}=")) {
        rest.split_whitespace().next().unwrap_or_default()
    } else if let Some((_, rest)) = line.split_once(&format!("\"{key}\":\"")) {
        rest.split('"').next().unwrap_or_default()
    } else {
        bail!("no {key} in {line:?}");
    };
    let value = value
        .strip_prefix("Some(")
        .and_then(|v| v.strip_suffix(')'))
        .unwrap_or(value);
    let addr: std::net::SocketAddr = value
        .parse()
        .with_context(|| format!("{key} in {line:?} is not HOST:PORT"))?;
    ensure!(addr.port() != 0, "{key} in {line:?} is port 0");
    Ok(addr.to_string())
}

/// What is left of `within` counted from a `deadline`: for a wait that shares one deadline with others.
pub fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// A bearer token signed with `secret` (HS256), for `sub` with `scopes`, valid for `ttl`.
pub fn token(secret: &str, sub: &str, scopes: &[&str], ttl: Duration) -> String {
    mint(
        secret.as_bytes(),
        &MintClaims::new(sub, &scopes.join(" "), ttl),
    )
    .expect("mint a token")
}

/// Waits until `{base}/healthz` answers with a success; an error after `within`.
pub async fn until_healthy(http: &reqwest::Client, base: &str, within: Duration) -> Result<()> {
    eventually(within, &format!("{base}/healthz"), || {
        let r = http.get(format!("{base}/healthz")).send();
        async move { Ok(r.await?.status().is_success().then_some(())) }
    })
    .await
}

/// Waits until the balancer whose admin listener is `admin` (`HOST:PORT`) counts `n` ready gateways in its
/// membership (`ferry_balancer_gateways{state="ready"}`); an error after `within`.
pub async fn until_balancer_sees(
    http: &reqwest::Client,
    admin: &str,
    n: usize,
    within: Duration,
) -> Result<()> {
    eventually(
        within,
        &format!("the balancer at {admin} sees {n} ready gateways"),
        || async {
            let text = http
                .get(format!("http://{admin}/metrics"))
                .send()
                .await?
                .text()
                .await?;
            let ready = sample(&text, r#"ferry_balancer_gateways{state="ready"}"#);
            ensure!(ready == Some(n as f64), "it counts {ready:?}");
            Ok(Some(()))
        },
    )
    .await
}

/// One `GET {base}/readyz`: the status and the JSON body (`null` when it is not JSON).
pub async fn readyz(http: &reqwest::Client, base: &str) -> reqwest::Result<(u16, Value)> {
    let res = http.get(format!("{base}/readyz")).send().await?;
    let status = res.status().as_u16();
    Ok((status, res.json().await.unwrap_or(Value::Null)))
}

/// Waits until `{base}/readyz` answers 200: its body; an error with the last answer after `within`.
pub async fn until_ready(http: &reqwest::Client, base: &str, within: Duration) -> Result<Value> {
    eventually(within, &format!("{base}/readyz 200"), || async {
        let (status, body) = readyz(http, base).await?;
        ensure!(status == 200, "{status}: {body}");
        Ok(Some(body))
    })
    .await
}

/// Submits `job` (`{"kind": …, "payload": …}`) to `queue` with `headers`; asserts 202. The job's id and the
/// response's headers.
pub async fn submit(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    queue: &str,
    job: &Value,
    headers: &[(&str, &str)],
) -> Result<(String, reqwest::header::HeaderMap)> {
    let mut req = http
        .post(format!("{base}/v1/queues/{queue}/jobs"))
        .bearer_auth(token)
        .json(job);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = req.send().await?;
    assert_eq!(res.status(), 202);
    let headers = res.headers().clone();
    let body: Value = res.json().await?;
    let id = body["id"].as_str().context("an id")?.to_owned();
    Ok((id, headers))
}

/// GETs `url` with `token` until `done` holds for its JSON body, and returns that body; an error naming `what`
/// with the last body after `within`.
pub async fn poll_json(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    within: Duration,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Result<Value> {
    eventually(within, what, || async {
        let v: Value = http
            .get(url)
            .bearer_auth(token)
            .send()
            .await?
            .json()
            .await?;
        ensure!(done(&v), "{v}");
        Ok(Some(v))
    })
    .await
}

/// Polls `GET {base}/v1/jobs/{id}` until the job is completed: the job.
pub async fn until_completed(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    id: &str,
    within: Duration,
) -> Result<Value> {
    let url = format!("{base}/v1/jobs/{id}");
    poll_json(http, &url, token, within, "job never completed", |j| {
        j["state"] == "completed"
    })
    .await
}

/// A new database `name` on `pg` with ferry's schema applied by `ferry migrate`: its URL.
pub fn migrated_database(pg: &ferry_testkit::PostgresServer, name: &str) -> Result<String> {
    let db = pg.create_database(name)?;
    let out = ferry().args(["migrate", "--database-url", &db]).output()?;
    if !out.status.success() {
        bail!("ferry migrate: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(db)
}

/// A private `redis-server` (ferry-testkit), its URL, and a broker on it with the default engine settings.
pub async fn redis_and_broker() -> Result<(RedisServer, String, RedisBroker)> {
    let redis = RedisServer::start()?;
    let url = redis.url();
    Ok((redis, url.clone(), test_broker(&url).await?))
}

/// The test's own connection to `url`. Its calls wait up to 10 s, not the client's default 500 ms: it is not
/// under test, and on a loaded machine a burst of lookups (see [`states`]) can take longer than that.
pub async fn test_broker(url: &str) -> Result<RedisBroker> {
    let options = ferry_broker::RedisOptions {
        response_timeout: Duration::from_secs(10),
        connection_timeout: Duration::from_secs(5),
        cluster_vshards: None,
    };
    Ok(RedisBroker::connect_with(&[url.to_owned()], EngineConfig::default(), options).await?)
}

/// `n` copies of `job` in `q`, enqueued in batches of at most 500: their ids.
pub async fn enqueue_many(
    broker: &dyn Broker,
    q: &QueueName,
    n: usize,
    job: NewJob,
) -> Result<Vec<JobId>> {
    let mut ids = Vec::with_capacity(n);
    while ids.len() < n {
        let batch = (n - ids.len()).min(500);
        let done = broker.enqueue_batch(q, vec![job.clone(); batch]).await?;
        ids.extend(done.into_iter().map(|e| e.id));
    }
    Ok(ids)
}

/// How many of `ids` are in each state (many lookups at once: one at a time, 2,000 of them take a minute on a
/// debug build).
pub async fn states(broker: &dyn Broker, ids: &[JobId]) -> Result<HashMap<JobState, usize>> {
    let infos: Vec<_> = futures::stream::iter(ids)
        .map(|id| async move { (id, broker.job(*id).await) })
        .buffer_unordered(64)
        .collect()
        .await;
    let mut out = HashMap::new();
    for (id, info) in infos {
        let info = info?.with_context(|| format!("job {id} exists"))?;
        *out.entry(info.state).or_default() += 1;
    }
    Ok(out)
}

/// `job.completed` events seen per job.
pub type Completions = Arc<Mutex<HashMap<JobId, u32>>>;

/// `job.completed` events per job from the live feed, counted from now on.
pub async fn count_completions(broker: &dyn Broker) -> Result<Completions> {
    let completed: Completions = Arc::default();
    let mut events = broker.subscribe().await?;
    let counts = completed.clone();
    tokio::spawn(async move {
        while let Some(e) = events.next().await {
            if e.ty == EventType::Completed {
                *counts.lock().unwrap().entry(e.job).or_default() += 1;
            }
        }
    });
    Ok(completed)
}

/// How many `job.completed` events were seen in all.
pub fn completions_total(completed: &Completions) -> u64 {
    completed
        .lock()
        .unwrap()
        .values()
        .map(|n| u64::from(*n))
        .sum()
}

/// Waits (up to 10 s) until `ids.len()` jobs have a `job.completed`, gives anything late `settle` to show up as
/// a second completion, then asserts every one of `ids` completed exactly once: none lost, none twice.
pub async fn assert_completed_once(
    completed: &Completions,
    ids: &[JobId],
    settle: Duration,
) -> Result<()> {
    eventually(
        Duration::from_secs(10),
        &format!("{} completion events", ids.len()),
        || async {
            let seen = completed.lock().unwrap().len();
            ensure!(seen == ids.len(), "{seen} jobs completed");
            Ok(Some(()))
        },
    )
    .await?;
    tokio::time::sleep(settle).await;
    let counts = completed.lock().unwrap().clone();
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "completed more than once: {twice:?}");
    assert!(ids.iter().all(|id| counts.contains_key(id)));
    Ok(())
}

/// Waits (up to `within`) until `q` is empty: nothing queued, active, scheduled or dead.
pub async fn until_drained(
    broker: &dyn Broker,
    q: &QueueName,
    within: Duration,
    what: &str,
) -> Result<()> {
    eventually(within, what, || async {
        let s = broker.stats(q).await?;
        ensure!(
            s.depth == 0 && s.active == 0 && s.scheduled == 0 && s.dead == 0,
            "{s:?}"
        );
        Ok(Some(()))
    })
    .await
}

#[test]
fn announced_reads_the_bound_address_from_text_and_json_lines() {
    let gateway = "2026-01-01T00:00:00.000Z  INFO ferry_cli::gateway: gateway listening listen=127.0.0.1:4100";
    assert_eq!(announced(gateway, "listen").unwrap(), "127.0.0.1:4100");
    let balancer = "2026-01-01T00:00:00.000Z  INFO ferry_cli::balancer: balancer listening \
                    addr=127.0.0.1:4101 admin=Some(127.0.0.1:4102)";
    assert_eq!(announced(balancer, "addr").unwrap(), "127.0.0.1:4101");
    assert_eq!(announced(balancer, "admin").unwrap(), "127.0.0.1:4102");
    let json = r#"{"timestamp":"2026-01-01T00:00:00.000Z","level":"INFO","message":"gateway listening","listen":"127.0.0.1:4103","target":"ferry_cli::gateway"}"#;
    assert_eq!(announced(json, "listen").unwrap(), "127.0.0.1:4103");
    // No admin listener, an unbound port, no such field: errors, not a made-up address.
    assert!(announced("balancer listening addr=127.0.0.1:4101 admin=None", "admin").is_err());
    assert!(announced("gateway listening listen=127.0.0.1:0", "listen").is_err());
    assert!(announced("gateway listening", "listen").is_err());
}
