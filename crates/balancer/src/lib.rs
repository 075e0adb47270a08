//! The balancer role (`ferry balancer`): a stateless, WebSocket-aware TCP/TLS proxy in front of the gateways.
//! It owns the client side of a connection until an upstream is chosen: the accept loop, TLS termination
//! (rustls on ring), the request head (bounded in size and time, parsed with `httparse`), the choice of gateway,
//! and then the tunnel, which copies bytes both ways with bounded buffers under an idle timeout; plus the
//! membership read every 500 ms ([`membership`]), the graceful drain on shutdown, and its admin listener
//! (`/healthz`, `/readyz`, `/metrics`).
//!
//! A WebSocket upgrade goes to the gateway that [`ferry_broker::placement::Placement::pick`] names for its
//! subject's partition (the subject read from the token WITHOUT verifying it: placement only); anything else to
//! the least loaded gateway. It must not do more than that: it never verifies tokens, never rewrites or answers a
//! request a gateway could answer (only heads it cannot route: 400, 408, 431, 503), keeps no state that another
//! balancer would need (any number run side by side), and uses no placement hash of its own.

pub mod admin;
pub mod head;
pub mod membership;
pub mod metrics;
pub mod router;
pub mod subject;
pub mod tunnel;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ferry_broker::{RedisOptions, RedisTls};
use ferry_telemetry::prometheus::Registry;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::membership::MemberReader;
use crate::metrics::Metrics;
use crate::router::Router;

/// How often the membership is read.
pub const REFRESH: Duration = Duration::from_millis(500);

/// TLS termination: PEM files.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert_pem: PathBuf,
    pub key_pem: PathBuf,
}

#[derive(Debug, Clone)]
pub struct BalancerConfig {
    pub listen: SocketAddr,
    /// `off` is `None`.
    pub admin_listen: Option<SocketAddr>,
    pub redis: Vec<String>,
    pub redis_options: RedisOptions,
    pub redis_tls: RedisTls,
    pub tls: Option<TlsFiles>,
    /// PEM CA(s) trusted for `https://` gateways instead of the system roots.
    pub upstream_ca: Option<PathBuf>,
    /// ε of the load bound (`--balance-epsilon`).
    pub epsilon: f64,
    /// A new connection's TLS handshake and request head must arrive within this.
    pub header_timeout: Duration,
    /// A tunnel with no byte either way for this long is closed.
    pub idle_timeout: Duration,
    /// After shutdown, how long open tunnels are kept before they are closed.
    pub drain: Duration,
    pub refresh: Duration,
    pub connect_timeout: Duration,
    /// A gateway whose connect failed is tried last for this long.
    pub skip_for: Duration,
    /// Gateways tried per client.
    pub max_attempts: usize,
}

impl BalancerConfig {
    pub fn new(listen: SocketAddr, redis: Vec<String>) -> Self {
        Self {
            listen,
            admin_listen: None,
            redis,
            redis_options: RedisOptions::default(),
            redis_tls: RedisTls::default(),
            tls: None,
            upstream_ca: None,
            epsilon: ferry_broker::placement::DEFAULT_EPSILON,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            drain: Duration::from_secs(30),
            refresh: REFRESH,
            connect_timeout: Duration::from_secs(2),
            skip_for: Duration::from_secs(5),
            max_attempts: 3,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BalancerError {
    #[error("{0}")]
    Tls(String),
    #[error("cannot listen on {addr} ({flag}): {source}")]
    Listen {
        addr: SocketAddr,
        flag: &'static str,
        source: std::io::Error,
    },
    #[error("cannot reach redis ({shard}): {source}")]
    Redis {
        shard: String,
        source: ferry_broker::BrokerError,
    },
    #[error("metrics: {0}")]
    Metrics(#[from] ferry_telemetry::prometheus::Error),
}

/// What every connection task shares.
pub struct Shared {
    pub config: BalancerConfig,
    pub router: Arc<Router>,
    pub metrics: Metrics,
    upstream_tls: TlsConnector,
    /// Cancelled at the end of the drain: open tunnels close.
    kill: CancellationToken,
    draining: AtomicBool,
    /// When the membership was last read successfully.
    last_read: std::sync::Mutex<Option<Instant>>,
    /// Upstream URLs with a `ferry_balancer_connections` series, so that those of departed gateways are
    /// removed once they reach 0.
    upstreams: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("config", &self.config)
            .field("draining", &self.draining)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// A tunnel to `url` opens: its series exists from now on.
    fn track_upstream(&self, url: &str) {
        let mut seen = self.upstreams.lock().unwrap_or_else(|p| p.into_inner());
        if !seen.contains(url) {
            seen.insert(url.to_owned());
        }
    }

    /// Drop the connection series of gateways that left the membership and hold no tunnel of ours.
    fn forget_departed(&self, members: &[ferry_broker::placement::NodeInfo]) {
        let mut seen = self.upstreams.lock().unwrap_or_else(|p| p.into_inner());
        seen.retain(|url| {
            if members.iter().any(|n| &n.url == url) {
                return true;
            }
            let g = self.metrics.connections.with_label_values(&[url]);
            if g.get() > 0 {
                return true;
            }
            let _ = self.metrics.connections.remove_label_values(&[url]);
            false
        });
    }

    /// Taking connections, with a fresh membership read and at least one eligible gateway.
    /// The readiness checks' reports: the membership read is fresh, some gateway is eligible.
    pub fn ready(&self) -> (serde_json::Value, serde_json::Value) {
        let age = self
            .last_read
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|t| t.elapsed());
        let fresh =
            age.is_some_and(|a| a <= (self.config.refresh * 10).max(Duration::from_secs(5)));
        let snapshot = self.router.snapshot();
        let eligible = snapshot
            .placement
            .nodes()
            .iter()
            .filter(|n| n.eligible())
            .count();
        (
            serde_json::json!({"ok": fresh, "last_read_ms_ago": age.map(|a| a.as_millis() as u64)}),
            serde_json::json!({"ok": eligible > 0, "eligible": eligible, "known": snapshot.placement.nodes().len()}),
        )
    }
}

/// A bound balancer, connected to Redis with a first membership read done.
pub struct Balancer {
    listener: TcpListener,
    admin: Option<TcpListener>,
    tls: Option<TlsAcceptor>,
    reader: MemberReader,
    shared: Arc<Shared>,
    registry: Arc<Registry>,
}

impl std::fmt::Debug for Balancer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balancer")
            .field("listen", &self.listener.local_addr().ok())
            .field("tls", &self.tls.is_some())
            .field("reader", &self.reader)
            .finish_non_exhaustive()
    }
}

impl Balancer {
    /// Check TLS material, bind both listeners, connect to the membership's shard and read it once.
    pub async fn build(
        config: BalancerConfig,
        registry: Arc<Registry>,
    ) -> Result<Self, BalancerError> {
        let tls = config.tls.as_ref().map(tls_acceptor).transpose()?;
        let upstream_tls = tls_connector(config.upstream_ca.as_deref())?;
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| BalancerError::Listen {
                    addr: config.listen,
                    flag: "--listen",
                    source,
                })?;
        let admin = match config.admin_listen {
            Some(addr) => {
                Some(
                    TcpListener::bind(addr)
                        .await
                        .map_err(|source| BalancerError::Listen {
                            addr,
                            flag: "--admin-listen",
                            source,
                        })?,
                )
            }
            None => None,
        };
        let reader = MemberReader::connect(&config.redis, &config.redis_options, &config.redis_tls)
            .await
            .map_err(|source| BalancerError::Redis {
                shard: "membership shard".into(),
                source,
            })?;
        let metrics = Metrics::new(&registry)?;
        let router = Arc::new(Router::new(config.epsilon, config.skip_for));
        let shared = Arc::new(Shared {
            config,
            router,
            metrics,
            upstream_tls,
            kill: CancellationToken::new(),
            draining: AtomicBool::new(false),
            last_read: std::sync::Mutex::new(None),
            upstreams: std::sync::Mutex::new(std::collections::HashSet::new()),
        });
        let balancer = Self {
            listener,
            admin,
            tls,
            reader,
            shared,
            registry,
        };
        balancer
            .refresh()
            .await
            .map_err(|source| BalancerError::Redis {
                shard: "membership shard".into(),
                source,
            })?;
        Ok(balancer)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or(self.shared.config.listen)
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    async fn refresh(&self) -> Result<(), ferry_broker::BrokerError> {
        refresh(&self.reader, &self.shared).await
    }

    /// Serve until `shutdown`; then drain: stop accepting, answer `/readyz` 503, keep open tunnels up to the
    /// drain time, close the rest and return.
    pub async fn run(self, shutdown: CancellationToken) {
        let Self {
            listener,
            admin,
            tls,
            reader,
            shared,
            registry,
        } = self;
        let admin_stop = CancellationToken::new();
        let admin_task = admin.map(|l| {
            tokio::spawn(admin::serve(
                l,
                shared.clone(),
                registry.clone(),
                admin_stop.clone(),
            ))
        });
        let refresher = tokio::spawn({
            let (shared, stop) = (shared.clone(), admin_stop.clone());
            async move {
                let mut failing = false;
                let mut tick = tokio::time::interval(shared.config.refresh);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    match refresh(&reader, &shared).await {
                        Ok(()) if failing => {
                            failing = false;
                            tracing::info!("membership readable again");
                        }
                        Ok(()) => {}
                        Err(e) => {
                            shared.metrics.membership_errors.inc();
                            if !failing {
                                failing = true;
                                tracing::warn!(error = %e, "cannot read the gateway membership; the last read stays in use");
                            }
                        }
                    }
                }
            }
        });
        let connections = TaskTracker::new();
        let mut backoff = Duration::ZERO;
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = listener.accept() => r,
            };
            let (tcp, peer) = match accepted {
                Ok(x) => {
                    backoff = Duration::ZERO;
                    x
                }
                Err(e) => {
                    use std::io::ErrorKind::*;
                    if matches!(
                        e.kind(),
                        ConnectionAborted | ConnectionReset | ConnectionRefused
                    ) {
                        continue;
                    }
                    backoff =
                        (backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
                    if backoff == Duration::from_millis(10) {
                        tracing::warn!(error = %e, "accept failed, backing off (up to 1 s between tries)");
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => continue,
                    }
                }
            };
            let _ = tcp.set_nodelay(true);
            let deadline = tokio::time::Instant::now() + shared.config.header_timeout;
            let (shared, tls) = (shared.clone(), tls.clone());
            connections.spawn(async move {
                match tls {
                    None => tunnel::serve(tcp, shared, deadline).await,
                    Some(tls) => match tokio::time::timeout_at(deadline, tls.accept(tcp)).await {
                        Ok(Ok(stream)) => tunnel::serve(stream, shared, deadline).await,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            shared
                                .metrics
                                .rejected
                                .with_label_values(&["tls_handshake"])
                                .inc();
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            shared
                                .metrics
                                .rejected
                                .with_label_values(&["tls_handshake"])
                                .inc();
                        }
                    },
                }
            });
        }
        // Draining: new clients are refused at once (the listener closes), the open ones keep going.
        shared.draining.store(true, Ordering::Release);
        shared.metrics.draining.set(1);
        drop(listener);
        connections.close();
        let open = connections.len();
        tracing::info!(
            open,
            drain_ms = shared.config.drain.as_millis() as u64,
            "draining"
        );
        if tokio::time::timeout(shared.config.drain, connections.wait())
            .await
            .is_err()
        {
            tracing::info!(
                open = connections.len(),
                "drain time over: closing the connections still open"
            );
            shared.kill.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(2), connections.wait()).await;
        }
        admin_stop.cancel();
        let _ = refresher.await;
        if let Some(t) = admin_task {
            let _ = t.await;
        }
        tracing::info!("balancer stopped");
    }
}

async fn refresh(reader: &MemberReader, shared: &Shared) -> Result<(), ferry_broker::BrokerError> {
    let nodes = reader.members().await?;
    shared.forget_departed(&nodes);
    shared.router.update(nodes);
    // Counted from what the router kept (entries with an unusable URL are left out).
    let snapshot = shared.router.snapshot();
    let (mut ready, mut draining, mut unready) = (0, 0, 0);
    for n in snapshot.placement.nodes() {
        match (n.draining, n.ready) {
            (true, _) => draining += 1,
            (false, true) => ready += 1,
            (false, false) => unready += 1,
        }
    }
    let m = &shared.metrics.members;
    m.with_label_values(&["ready"]).set(ready);
    m.with_label_values(&["draining"]).set(draining);
    m.with_label_values(&["unready"]).set(unready);
    *shared.last_read.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    Ok(())
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_acceptor(cfg: &TlsFiles) -> Result<TlsAcceptor, BalancerError> {
    let bad = |what: String, e: &dyn std::fmt::Display| BalancerError::Tls(format!("{what}: {e}"));
    let cert_flag = format!("--tls-cert {}", cfg.cert_pem.display());
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cfg.cert_pem)
        .map_err(|e| bad(cert_flag.clone(), &e))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(cert_flag.clone(), &e))?;
    if certs.is_empty() {
        return Err(BalancerError::Tls(format!(
            "{cert_flag}: no certificate in the file"
        )));
    }
    let key = PrivateKeyDer::from_pem_file(&cfg.key_pem)
        .map_err(|e| bad(format!("--tls-key {}", cfg.key_pem.display()), &e))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("protocol versions".into(), &e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| bad("certificate and key".into(), &e))?;
    // HTTP/1.1 only: the head is read as HTTP/1 to find the upgrade and its token.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The client TLS of `https://` gateways: `--upstream-ca`, else the system roots.
fn tls_connector(ca: Option<&std::path::Path>) -> Result<TlsConnector, BalancerError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            let flag = format!("--upstream-ca {}", path.display());
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .map_err(|e| BalancerError::Tls(format!("{flag}: {e}")))?
                .collect::<Result<_, _>>()
                .map_err(|e| BalancerError::Tls(format!("{flag}: {e}")))?;
            if certs.is_empty() {
                return Err(BalancerError::Tls(format!(
                    "{flag}: no certificate in the file"
                )));
            }
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| BalancerError::Tls(format!("{flag}: {e}")))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                tracing::debug!(
                    "no system root certificates: https:// gateways need --upstream-ca"
                );
            }
        }
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| BalancerError::Tls(format!("protocol versions: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}
