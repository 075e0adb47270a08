//! `Gateway::build(config, broker)` checks the configuration, binds the listener and prepares TLS; `local_addr()`
//! says where it listens (tests bind port 0); `run(shutdown)` serves until the token is cancelled, then stops
//! accepting and lets in-flight requests finish. `run` also polls the event-log backlog for load shedding
//! ([`crate::resilience`]) until the token is cancelled. The optional store is `GatewayConfig::store`.
//!
//! TLS is rustls with the ring provider passed explicitly, so the library installs nothing global; certificates
//! and keys are read from PEM files with `rustls::pki_types`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::connect_info::ConnectInfo;
use ferry_broker::Broker;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{AuthError, Authenticator};
use crate::config::TlsConfig;
use crate::resilience::Resilience;
use crate::state::AppState;
use crate::ws::Hub;
use crate::{GatewayConfig, http};

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("invalid TLS configuration: {0}")]
    Tls(String),
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
        let resilience = Resilience::new(config.resilience.clone());
        let state = AppState {
            broker,
            auth,
            config: Arc::new(config),
            hub,
            resilience,
        };
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

    /// Serve until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) -> std::io::Result<()> {
        let hub = tokio::spawn(self.state.hub.clone().run(shutdown.clone()));
        let backlog = tokio::spawn(
            self.state
                .resilience
                .clone()
                .poll_backlog(self.state.broker.clone(), shutdown.clone()),
        );
        let app = http::router(self.state.clone());
        let result = match self.tls {
            None => {
                axum::serve(
                    self.listener,
                    app.into_make_service_with_connect_info::<SocketAddr>(),
                )
                .with_graceful_shutdown(shutdown.clone().cancelled_owned())
                .await
            }
            Some(tls) => serve_tls(self.listener, tls, app, shutdown.clone()).await,
        };
        shutdown.cancel();
        let _ = hub.await;
        let _ = backlog.await;
        result
    }
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

async fn serve_tls(
    listener: TcpListener,
    tls: TlsAcceptor,
    app: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let connections = TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (tls, app, shutdown) = (tls.clone(), app.clone(), shutdown.clone());
        connections.spawn(async move {
            let stream =
                match tokio::time::timeout(std::time::Duration::from_secs(10), tls.accept(tcp))
                    .await
                {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
            let service = TowerToHyperService::new(app.layer(axum::Extension(ConnectInfo(peer))));
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    connections.close();
    connections.wait().await;
    Ok(())
}
