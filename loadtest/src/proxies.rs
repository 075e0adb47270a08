//! Proxies in front of the gateway under test, for `loadtest ws --via`: `ferry balancer` (with the gateway
//! announced in the membership through `Membership::heartbeat`) and HAProxy (Debian's `/usr/sbin/haproxy`, HTTP
//! mode, WebSocket tunnels), each a child process on a free loopback port.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::ValueEnum;
use ferry_broker::{EngineConfig, NodeInfo, PubSub, RedisBroker};

use crate::gw::{Server, free_port, raised_nofile};
use crate::procs;

/// How clients reach the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Via {
    /// Straight to the gateway's port.
    Direct,
    /// Through `ferry balancer`.
    Balancer,
    /// Through HAProxy.
    Haproxy,
}

impl Via {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Balancer => "balancer",
            Self::Haproxy => "haproxy",
        }
    }
}

pub const HAPROXY: &str = "/usr/sbin/haproxy";

/// Announce the gateway in the membership as its own heartbeat would, valid for an hour.
async fn register(redis_url: &str, gateway_port: u16) -> anyhow::Result<()> {
    let info = NodeInfo::new(
        "loadtest-gateway",
        format!("http://127.0.0.1:{gateway_port}"),
    );
    let broker = RedisBroker::connect(&[redis_url.to_owned()], EngineConfig::default()).await?;
    broker
        .membership()
        .context("the Redis engine keeps a membership")?
        .heartbeat(&info, Duration::from_secs(3_600))
        .await?;
    Ok(())
}

/// Wait until `GET http://127.0.0.1:port/healthz` (the gateway's, through the proxy) answers 200.
async fn until_through(
    http: &reqwest::Client,
    server: &mut Server,
    limit: Duration,
) -> anyhow::Result<()> {
    let url = format!("http://127.0.0.1:{}/healthz", server.port);
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(status) = server.child.try_wait()? {
            bail!(
                "proxy exited ({status}); log tail:\n{}",
                procs::tail(&server.log, 2000)
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
        "no answer through the proxy at {url} within {limit:?}; log tail:\n{}",
        procs::tail(&server.log, 2000)
    )
}

/// Start `via` in front of the gateway on `gateway_port`; `None` for [`Via::Direct`].
pub async fn start(
    via: Via,
    ferry_bin: &Path,
    redis_url: &str,
    gateway_port: u16,
    logdir: &Path,
    http: &reqwest::Client,
) -> anyhow::Result<Option<Server>> {
    let port = free_port()?;
    let log = logdir.join(format!("{}.log", via.as_str()));
    let f = std::fs::File::create(&log)?;
    let (out, err) = (f.try_clone()?, f);
    let child = match via {
        Via::Direct => return Ok(None),
        Via::Balancer => {
            register(redis_url, gateway_port).await?;
            let args: Vec<String> = [
                "balancer",
                "--redis",
                redis_url,
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--admin-listen",
                "off",
                "--drain-ms",
                "1000",
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
            raised_nofile(ferry_bin, &args)
                .env("FERRY_LOG", "warn")
                .stdout(out)
                .stderr(err)
                .spawn()
                .context("spawning ferry balancer")?
        }
        Via::Haproxy => {
            let cfg = logdir.join("haproxy.cfg");
            std::fs::write(
                &cfg,
                format!(
                    "global\n  maxconn 9500\n\ndefaults\n  mode http\n  timeout connect 2s\n  \
                     timeout client 120s\n  timeout server 120s\n  timeout tunnel 1h\n  \
                     timeout http-request 10s\n\nfrontend fe\n  bind 127.0.0.1:{port}\n  \
                     default_backend gw\n\nbackend gw\n  server g1 127.0.0.1:{gateway_port}\n"
                ),
            )?;
            let args: Vec<String> = vec!["-db".into(), "-f".into(), cfg.display().to_string()];
            raised_nofile(Path::new(HAPROXY), &args)
                .stdout(out)
                .stderr(err)
                .spawn()
                .context("spawning haproxy")?
        }
    };
    let pid = child.id().context("proxy pid")?;
    let mut server = Server {
        child,
        pid,
        port,
        log,
    };
    until_through(http, &mut server, Duration::from_secs(30)).await?;
    Ok(Some(server))
}
