//! `Gateway::build(config, broker)` checks the configuration, binds the listener and prepares TLS; `local_addr()`
//! says where it listens (tests bind port 0); `run(shutdown)` serves until the token is cancelled, then drains.
//! `run` also polls the event-log backlog for load shedding ([`crate::resilience`]) until it returns. The
//! optional store is `GatewayConfig::store`.
//!
//! # Shutdown
//!
//! One tree hangs off the `shutdown` token (SIGTERM/SIGINT in the binary). When it is cancelled, in this order
//! ([`crate::config::ShutdownConfig`]):
//!
//! 1. `/readyz` answers 503 `draining` at once; everything is still served for `drain_delay`, so load balancers
//!    take the node out of rotation before anything is refused;
//! 2. the listener closes (new connections are refused, idle keep-alive connections are closed) and new
//!    WebSocket upgrades get 503; every WebSocket client gets a `goaway` frame and is closed with 1001 after its
//!    own delay within `ws_close_spread` ([`crate::ws::Hub::goaway`]);
//! 3. in-flight HTTP requests finish;
//! 4. `run` returns `Ok` once no HTTP connection and no WebSocket is left, or, at `hard_deadline` after the
//!    signal, logs at error level what was still open, closes the rest and returns an error saying so.
//!
//! Plain TCP and TLS share one accept loop, [`crate::connection::serve`], which also enforces the header, body
//! and idle timeouts and the budgets of unauthenticated connections.
//!
//! TLS is rustls with the ring provider passed explicitly, so the library installs nothing global; certificates
//! and keys are read from PEM files with `rustls::pki_types`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use ferry_broker::Broker;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::auth::{AuthError, Authenticator};
use crate::cluster::Cluster;
use crate::config::TlsConfig;
use crate::connection::{self, Budget};
use crate::resilience::Resilience;
use crate::state::{AppState, Shared};
use crate::ws::Hub;
use crate::{GatewayConfig, http};

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("invalid TLS configuration: {0}")]
    Tls(String),
    /// A setting breaks a rule of [`GatewayConfig::validate`].
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A bound gateway, ready to run.
pub struct Gateway {
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    state: AppState,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("listener", &self.listener)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl Gateway {
    pub async fn build(
        config: GatewayConfig,
        broker: Arc<dyn Broker>,
    ) -> Result<Self, GatewayError> {
        // First: a bad limit fails here, in process as under `ferry gateway`, before anything is fetched or bound.
        config.validate()?;
        let auth = Arc::new(Authenticator::start(config.auth.clone()).await?);
        let tls = config.tls.as_ref().map(tls_acceptor).transpose()?;
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| GatewayError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let hub = Hub::new(broker.clone(), config.limits.clone());
        hub.set_close_spread(config.shutdown.ws_close_spread);
        let url = match &config.cluster.advertise_url {
            Some(url) => url.clone(),
            None => {
                let addr = listener.local_addr().map_err(|source| GatewayError::Bind {
                    addr: config.listen,
                    source,
                })?;
                let scheme = if tls.is_some() { "https" } else { "http" };
                format!("{scheme}://{addr}")
            }
        };
        let cluster = Cluster::new(
            config.cluster.clone(),
            url,
            hub.clone(),
            broker.clone(),
            config.resilience.broker_timeout,
            config.readiness.pubsub_budget,
            config.shutdown.ws_close_spread,
        );
        let resilience = Resilience::new(config.resilience.clone());
        let connections = Budget::new(config.connections.clone(), config.limits.max_body_bytes);
        connections.check_open_file_limit();
        let state = AppState::new(Shared {
            connections,
            broker,
            auth,
            config: Arc::new(config),
            hub,
            resilience,
            cluster,
        });
        Ok(Self {
            listener,
            tls,
            state,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serve until `shutdown` is cancelled, then drain (see the module documentation). `Err` when serving
    /// failed, or when the drain did not finish within `ShutdownConfig::hard_deadline`.
    pub async fn run(self, shutdown: CancellationToken) -> std::io::Result<()> {
        let cfg = self.state.config.shutdown.clone();
        let hub = self.state.hub.clone();
        // Readiness flips the moment the token is cancelled, not when this task gets to run.
        hub.drain_on(shutdown.clone());
        // Ends the hub (closing any WebSocket left) and the backlog polling: the last step, not the first.
        let stop = CancellationToken::new();
        let hub_task = tokio::spawn(hub.clone().run(stop.clone()));
        let backlog = tokio::spawn(
            self.state
                .resilience
                .clone()
                .poll_backlog(self.state.broker.clone(), stop.clone()),
        );
        // Announces the node (draining as soon as `shutdown` is cancelled) and leaves at the very end.
        let cluster_task = tokio::spawn(
            self.state
                .cluster
                .clone()
                .run(shutdown.clone(), stop.clone()),
        );
        let in_flight = Arc::new(AtomicUsize::new(0));
        let app = http::router(self.state.clone()).layer(axum::middleware::from_fn_with_state(
            in_flight.clone(),
            count_in_flight,
        ));
        // Cancelled once the drain delay is over: stop accepting, finish what is in flight.
        let stop_accepting = CancellationToken::new();
        let mut serving = tokio::spawn(connection::serve(
            self.listener,
            self.tls,
            app,
            self.state.connections.clone(),
            stop_accepting.clone(),
        ));
        let finish = async |result: std::io::Result<()>| {
            stop.cancel();
            let _ = hub_task.await;
            let _ = backlog.await;
            let _ = cluster_task.await;
            result
        };

        let served_early = tokio::select! {
            _ = shutdown.cancelled() => None,
            r = &mut serving => Some(r),
        };
        if let Some(r) = served_early {
            // The listener failed before any shutdown was asked for.
            return finish(r.unwrap_or_else(|e| Err(std::io::Error::other(e)))).await;
        }
        let deadline = tokio::time::Instant::now() + cfg.hard_deadline;
        hub.start_draining();
        tracing::info!(
            drain_delay_ms = cfg.drain_delay.as_millis() as u64,
            "draining: /readyz answers 503, still serving"
        );
        tokio::time::sleep_until((tokio::time::Instant::now() + cfg.drain_delay).min(deadline))
            .await;
        tracing::info!(
            websockets = hub.connections(),
            http_requests = in_flight.load(Ordering::Relaxed),
            ws_close_spread_ms = cfg.ws_close_spread.as_millis() as u64,
            "draining: listener closed, WebSocket clients told to go away"
        );
        stop_accepting.cancel();
        hub.goaway(cfg.ws_close_spread);
        let drained = async {
            let r = (&mut serving).await;
            while hub.connections() > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            r
        };
        match tokio::time::timeout_at(deadline, drained).await {
            Ok(r) => {
                tracing::info!("drained");
                finish(r.unwrap_or_else(|e| Err(std::io::Error::other(e)))).await
            }
            Err(_) => {
                let (ws, requests) = (hub.connections(), in_flight.load(Ordering::Relaxed));
                tracing::error!(
                    open_websockets = ws,
                    in_flight_http_requests = requests,
                    deadline_ms = cfg.hard_deadline.as_millis() as u64,
                    "shutdown deadline passed, exiting with work still open"
                );
                serving.abort();
                finish(Err(std::io::Error::other(format!(
                    "shutdown deadline ({} ms) passed with {ws} WebSocket connection(s) and {requests} HTTP \
                     request(s) still open",
                    cfg.hard_deadline.as_millis()
                ))))
                .await
            }
        }
    }
}

/// Counts requests being handled, for the shutdown deadline's report.
async fn count_in_flight(State(n): State<Arc<AtomicUsize>>, req: Request, next: Next) -> Response {
    struct Guard(Arc<AtomicUsize>);
    impl Drop for Guard {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::AcqRel);
        }
    }
    n.fetch_add(1, Ordering::AcqRel);
    let _guard = Guard(n);
    next.run(req).await
}

fn tls_acceptor(cfg: &TlsConfig) -> Result<TlsAcceptor, GatewayError> {
    let bad = |what: &str, e: &dyn std::fmt::Display| GatewayError::Tls(format!("{what}: {e}"));
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cfg.cert_pem)
        .map_err(|e| bad(&format!("--tls-cert {}", cfg.cert_pem.display()), &e))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(&format!("--tls-cert {}", cfg.cert_pem.display()), &e))?;
    if certs.is_empty() {
        return Err(GatewayError::Tls(format!(
            "--tls-cert {}: no certificate in the file",
            cfg.cert_pem.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(&cfg.key_pem)
        .map_err(|e| bad(&format!("--tls-key {}", cfg.key_pem.display()), &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("protocol versions", &e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| bad("certificate and key", &e))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
