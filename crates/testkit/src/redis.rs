//! A private `redis-server` per test: started on a free port in its own temp dir, with an append-only file so a
//! graceful stop and restart keeps the data (a kill keeps at most what the last fsync, one second ago, wrote).
//! It must not read any system config file: every setting it depends on is passed on the command line.

use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use tempfile::TempDir;

use crate::guard::{Watchdog, log_tail, run, wait_exit};
use crate::{PORT_ATTEMPTS, free_port};

/// How long a start (including replaying the append-only file) may take before it is reported as failed. Generous
/// because the test machine may be busy compiling on every core.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a graceful SHUTDOWN may take; it only has to fsync the AOF.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// A `redis-server` process owned by one test. Killed (SIGKILL) and its directory removed on drop.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    /// The cluster bus port of a cluster node ([`start_cluster_node`](Self::start_cluster_node)); `None` for a
    /// standalone server.
    bus_port: Option<u16>,
    extra: Vec<String>,
    /// Serves TLS only on `port` (plain TCP is off); the harness itself talks over a unix socket in `dir`.
    tls: bool,
    child: Option<Child>,
    watchdog: Option<Watchdog>,
    // Declared last so the directory outlives the process that writes into it.
    dir: TempDir,
}

/// What one launch attempt found.
enum Launch {
    Ready,
    /// The port was taken between [`free_port`] and the bind: worth another try on a new port.
    PortTaken(anyhow::Error),
}

impl RedisServer {
    /// Start a server with the defaults (AOF on with `appendfsync everysec`, no RDB snapshots) and wait until it
    /// answers PING.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(&[])
    }

    /// Like [`start`](Self::start) with extra `redis-server` arguments (`&["--maxmemory", "10mb"]`). They come after
    /// the defaults, so they override them; they are kept for [`restart`](Self::restart).
    pub fn start_with(args: &[&str]) -> anyhow::Result<Self> {
        Self::start_impl(args, false, false)
    }

    /// A node for a Redis Cluster (`--cluster-enabled yes`, its `nodes.conf` in its own directory, so a restart
    /// keeps its identity), with its cluster bus on a port of its own rather than `port + 10000`, which can fall
    /// outside the port range. It starts empty and alone: [`crate::RedisCluster`] joins nodes into a cluster.
    pub fn start_cluster_node(args: &[&str]) -> anyhow::Result<Self> {
        Self::start_impl(args, false, true)
    }

    /// A cluster node that speaks only TLS, to clients, to its replicas and on the cluster bus
    /// (`--tls-cluster yes --tls-replication yes`), with `certs`' server certificate, as
    /// [`start_tls`](Self::start_tls).
    pub fn start_tls_cluster_node(certs: &crate::TestCerts, args: &[&str]) -> anyhow::Result<Self> {
        let mut all = vec!["--tls-cluster", "yes", "--tls-replication", "yes"];
        all.extend_from_slice(args);
        Self::start_tls_impl(certs, &all, true)
    }

    /// A server that speaks only TLS on its port (`--port 0 --tls-port PORT`), with `certs`' server certificate
    /// and no client certificates required (`--tls-auth-clients no`); [`url`](Self::url) is `rediss://`. The
    /// harness (readiness, SHUTDOWN, [`cli`](Self::cli)) uses a unix socket in the server's directory instead.
    pub fn start_tls(certs: &crate::TestCerts, args: &[&str]) -> anyhow::Result<Self> {
        Self::start_tls_impl(certs, args, false)
    }

    fn start_tls_impl(
        certs: &crate::TestCerts,
        args: &[&str],
        cluster: bool,
    ) -> anyhow::Result<Self> {
        let path = |p: &Path| -> anyhow::Result<String> {
            Ok(p.to_str()
                .context("certificate path is not UTF-8")?
                .to_owned())
        };
        let (cert, key, ca) = (
            path(certs.cert_file())?,
            path(certs.key_file())?,
            path(certs.ca_file())?,
        );
        let mut all = vec![
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &ca,
            "--tls-auth-clients",
            "no",
        ];
        all.extend_from_slice(args);
        Self::start_impl(&all, true, cluster)
    }

    fn start_impl(args: &[&str], tls: bool, cluster: bool) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("ferry-redis-")
            .tempdir()
            .context("cannot create a temp dir for redis-server")?;
        let mut server = Self {
            port: 0,
            bus_port: None,
            extra: args.iter().map(|a| a.to_string()).collect(),
            tls,
            child: None,
            watchdog: None,
            dir,
        };
        let mut last = None;
        for _ in 0..PORT_ATTEMPTS {
            server.port = free_port();
            if cluster {
                server.bus_port = Some(free_port());
            }
            match server.launch()? {
                Launch::Ready => return Ok(server),
                Launch::PortTaken(e) => last = Some(e),
            }
        }
        Err(last
            .unwrap_or_else(|| anyhow!("no attempt made"))
            .context(format!(
                "redis-server found no free port in {PORT_ATTEMPTS} attempts"
            )))
    }

    /// `redis://127.0.0.1:PORT`, or `rediss://127.0.0.1:PORT` for a server started by
    /// [`start_tls`](Self::start_tls).
    pub fn url(&self) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Whether the server speaks TLS ([`start_tls`](Self::start_tls)).
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// The cluster bus port of a cluster node.
    pub fn bus_port(&self) -> Option<u16> {
        self.bus_port
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The pid of the process this wrapper started, `None` after [`stop`](Self::stop) or [`kill`](Self::kill).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The server's working directory (AOF, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The last lines of the server's log, for assertion messages.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log_path(), 40)
    }

    /// Run `redis-cli` against this server; see [`redis_cli`].
    /// A TLS server is reached through its unix socket.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        match self.endpoint() {
            Endpoint::Tcp(port) => redis_cli(port, args),
            Endpoint::Unix(sock) => {
                let out = run(Command::new("redis-cli").arg("-s").arg(&sock).args(args))?;
                Ok(String::from_utf8_lossy(&out.stdout)
                    .trim_end_matches('\n')
                    .to_string())
            }
        }
    }

    /// Where the harness talks to the server: its TCP port, or the unix socket of a TLS server.
    fn endpoint(&self) -> Endpoint {
        if self.tls {
            Endpoint::Unix(self.dir.path().join("redis.sock"))
        } else {
            Endpoint::Tcp(self.port)
        }
    }

    /// Graceful stop: SHUTDOWN (which fsyncs the append-only file), then wait for the process to exit.
    /// A no-op when the server is not running.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if child.try_wait().ok().flatten().is_none() {
            match shutdown(&self.endpoint()) {
                Ok(()) => {}
                // The server refused (e.g. it cannot write its AOF): it is still running, so keep owning it and
                // say why, rather than turning a graceful stop into a silent kill.
                Err(e) if e.downcast_ref::<ServerError>().is_some() => {
                    self.child = Some(child);
                    return Err(e.context(format!(
                        "SHUTDOWN on port {}\n{}",
                        self.port,
                        self.log_tail()
                    )));
                }
                // Could not even talk to it (hung, out of connections): SIGTERM is the same graceful shutdown.
                Err(_) => {
                    let _ = Command::new("kill")
                        .args(["-TERM", &child.id().to_string()])
                        .status();
                }
            }
            if !wait_exit(&mut child, STOP_TIMEOUT) {
                let _ = child.kill();
                let _ = child.wait();
                self.disarm();
                bail!(
                    "redis-server on port {} did not exit within {STOP_TIMEOUT:?} after SHUTDOWN; killed it\n{}",
                    self.port,
                    self.log_tail()
                );
            }
        }
        let _ = child.wait();
        self.disarm();
        Ok(())
    }

    /// SIGKILL the server and reap it: a crash, with no chance to fsync. A no-op when it is not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.disarm();
    }

    /// Start the server again on the same port and directory (so it replays its AOF) and wait until it answers.
    /// A running server is stopped gracefully first.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop()?;
        match self.launch()? {
            Launch::Ready => Ok(()),
            // Clients hold this port, so moving to another one would not be a restart.
            Launch::PortTaken(e) => Err(e.context(format!(
                "cannot restart redis-server: port {} was taken while it was down",
                self.port
            ))),
        }
    }

    /// Whether the process is still alive (it may have exited on its own, e.g. after a SHUTDOWN sent by a test).
    pub fn is_running(&mut self) -> bool {
        let exited = match self.child.as_mut() {
            None => return false,
            Some(child) => !matches!(child.try_wait(), Ok(None)),
        };
        if exited {
            self.child = None;
            self.disarm();
        }
        !exited
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    fn disarm(&mut self) {
        if let Some(mut w) = self.watchdog.take() {
            w.disarm();
        }
    }

    /// Spawn redis-server on `self.port` and wait until it is ready.
    fn launch(&mut self) -> anyhow::Result<Launch> {
        let log_path = self.log_path();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("cannot open {}", log_path.display()))?;
        // Only what this launch writes tells whether this launch lost the port race.
        let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        let dir = self
            .dir
            .path()
            .to_str()
            .context("temp dir path is not UTF-8")?;
        let port = self.port.to_string();
        let mut cmd = Command::new("redis-server");
        if self.tls {
            let sock = self.dir.path().join("redis.sock");
            let sock = sock.to_str().context("socket path is not UTF-8")?;
            cmd.args(["--port", "0", "--tls-port", &port]).args([
                "--unixsocket",
                sock,
                "--unixsocketperm",
                "700",
            ]);
        } else {
            cmd.args(["--port", &port]);
        }
        if let Some(bus) = self.bus_port {
            cmd.args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
            ])
            .args(["--cluster-port", &bus.to_string()])
            // Failure detection in seconds, not the default 15: failover tests wait for it.
            .args(["--cluster-node-timeout", "2000"]);
        }
        cmd.args(["--bind", "127.0.0.1", "--dir", dir])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--save",
                "",
            ])
            .args(["--daemonize", "no", "--logfile", ""])
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let mut child = cmd
            .spawn()
            .context("cannot run redis-server (is it installed? scripts/test.sh installs it)")?;
        let pid = child.id();
        self.watchdog = Some(Watchdog::spawn(
            "kill -9 \"$1\" 2>/dev/null; rm -rf \"$2\"",
            &[&pid.to_string(), dir],
        ));
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.disarm();
                let fresh = fs::read(&log_path)
                    .map(|b| {
                        String::from_utf8_lossy(&b[(log_start as usize).min(b.len())..])
                            .into_owned()
                    })
                    .unwrap_or_default();
                let err = anyhow!(
                    "redis-server on port {} exited during startup with {status}\n{}",
                    self.port,
                    log_tail(&log_path, 40)
                );
                if fresh.contains("Address already in use") {
                    return Ok(Launch::PortTaken(err));
                }
                return Err(err);
            }
            match probe(&self.endpoint()) {
                Probe::Ready(p) if p == pid => {
                    self.child = Some(child);
                    return Ok(Launch::Ready);
                }
                // Someone else's server answers on our port: ours cannot have bound it and is about to exit.
                Probe::Ready(other) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    self.disarm();
                    return Ok(Launch::PortTaken(anyhow!(
                        "port {} is served by another redis-server (pid {other})",
                        self.port
                    )));
                }
                Probe::NotYet => {}
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                self.disarm();
                bail!(
                    "redis-server on port {} did not answer PING within {READY_TIMEOUT:?}\n{}",
                    self.port,
                    log_tail(&log_path, 40)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // A kill, not a SHUTDOWN: nobody will read the data again and a test must not wait for an fsync.
        self.kill();
    }
}

/// Run `redis-cli -h 127.0.0.1 -p PORT ARGS…` and return its standard output without the trailing newline.
/// Error replies come back as text (`ERR …`), like redis-cli prints them when its output is not a terminal.
pub fn redis_cli(port: u16, args: &[&str]) -> anyhow::Result<String> {
    let out = run(Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .trim_end_matches('\n')
        .to_string())
}

enum Probe {
    /// The server answered PING, not loading; its pid.
    Ready(u32),
    NotYet,
}

/// Ask whatever listens on `port` for its pid and whether it serves commands. The pid matters: a free port can be
/// taken by another test's server between [`free_port`] and our bind, and that server answers PING too.
fn probe(endpoint: &Endpoint) -> Probe {
    let attempt = || -> anyhow::Result<Option<u32>> {
        let mut conn = Conn::open(endpoint)?;
        let info = conn.call(&["INFO", "server"])?;
        let pid = info
            .lines()
            .find_map(|l| l.strip_prefix("process_id:"))
            .and_then(|v| v.trim().parse().ok())
            .context("INFO without process_id")?;
        // INFO answers while the AOF is still loading; PING does not (-LOADING), so PING is the readiness test.
        Ok(match conn.call(&["PING"]) {
            Ok(pong) if pong == "PONG" => Some(pid),
            _ => None,
        })
    };
    match attempt() {
        Ok(Some(pid)) => Probe::Ready(pid),
        _ => Probe::NotYet,
    }
}

/// Send SHUTDOWN. Success is the server closing the connection without a reply.
fn shutdown(endpoint: &Endpoint) -> anyhow::Result<()> {
    let mut conn = Conn::open(endpoint)?;
    match conn.call(&["SHUTDOWN"]) {
        Err(e) if e.downcast_ref::<ServerError>().is_some() => Err(e),
        // EOF or reset: the server went away, which is what SHUTDOWN does.
        _ => Ok(()),
    }
}

/// An error reply from the server (as opposed to an I/O failure).
#[derive(Debug)]
struct ServerError(String);

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "redis replied {}", self.0)
    }
}

impl std::error::Error for ServerError {}

/// Just enough RESP for the harness (simple strings, errors, integers, bulk strings), so that probing readiness
/// does not fork a redis-cli every 20 ms. Tests use [`redis_cli`] or a real client.
struct Conn {
    reader: BufReader<Box<dyn Stream>>,
}

/// How the harness reaches a server.
enum Endpoint {
    Tcp(u16),
    /// The unix socket of a TLS-only server.
    Unix(PathBuf),
}

trait Stream: Read + Write {}

impl<T: Read + Write> Stream for T {}

impl Conn {
    fn open(endpoint: &Endpoint) -> anyhow::Result<Self> {
        let timeout = Some(Duration::from_secs(2));
        let stream: Box<dyn Stream> = match endpoint {
            Endpoint::Tcp(port) => {
                let addr = SocketAddr::from(([127, 0, 0, 1], *port));
                let stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
                stream.set_read_timeout(timeout)?;
                stream.set_write_timeout(timeout)?;
                Box::new(stream)
            }
            Endpoint::Unix(path) => {
                let stream = UnixStream::connect(path)?;
                stream.set_read_timeout(timeout)?;
                stream.set_write_timeout(timeout)?;
                Box::new(stream)
            }
        };
        Ok(Self {
            reader: BufReader::new(stream),
        })
    }

    fn call(&mut self, args: &[&str]) -> anyhow::Result<String> {
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        self.reader.get_mut().write_all(req.as_bytes())?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            bail!("connection closed");
        }
        let line = line.trim_end_matches("\r\n");
        let (kind, rest) = line.split_at(1.min(line.len()));
        match kind {
            "+" | ":" => Ok(rest.to_string()),
            "-" => Err(ServerError(rest.to_string()).into()),
            "$" => {
                let len: i64 = rest.parse().context("bad bulk length")?;
                if len < 0 {
                    return Ok(String::new());
                }
                let mut buf = vec![0; len as usize + 2];
                self.reader.read_exact(&mut buf)?;
                buf.truncate(len as usize);
                Ok(String::from_utf8_lossy(&buf).into_owned())
            }
            _ => bail!("unsupported reply {line:?}"),
        }
    }
}
