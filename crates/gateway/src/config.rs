//! Gateway settings, resolved and validated before anything binds.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::auth::AuthConfig;

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub listen: SocketAddr,
    pub tls: Option<TlsConfig>,
    pub auth: AuthConfig,
    pub limits: LimitsConfig,
    pub job_limits: ferry_core::Limits,
}

#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub cert_pem: PathBuf,
    pub key_pem: PathBuf,
}

/// Every limit the gateway enforces, with its default.
#[derive(Debug, Clone)]
pub struct LimitsConfig {
    /// Largest request body (default 1 MiB).
    pub max_body_bytes: usize,
    /// Most jobs in one batch submit (default 1000).
    pub max_batch: usize,
    /// HTTP requests per second per subject, sustained (default 100) and burst (default 200).
    pub http_rate_per_sec: u32,
    pub http_burst: u32,
    /// WebSocket frames per second per connection (default 50) and burst (default 100).
    pub ws_rate_per_sec: u32,
    pub ws_burst: u32,
    /// Rate-limited frames in a row before the connection is closed with 4008 (default 20).
    pub ws_sustained_violations: u32,
    /// Connections per node (default 100,000) and per subject (default 100).
    pub max_connections: usize,
    pub max_connections_per_subject: usize,
    /// Failed (unauthenticated) upgrades per second per IP (default 10).
    pub unauth_upgrades_per_sec_per_ip: u32,
    /// Largest WebSocket frame accepted (default 64 KiB).
    pub max_frame_bytes: usize,
    /// Messages queued for one connection before it is a slow consumer, closed with 4009 (default 256).
    pub send_queue: usize,
    /// Server ping interval; a peer that does not answer within two is dropped (default 20 s).
    pub ping_interval: Duration,
    /// Channels one connection may subscribe to (default 100).
    pub max_subscriptions: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 1024 * 1024,
            max_batch: 1000,
            http_rate_per_sec: 100,
            http_burst: 200,
            ws_rate_per_sec: 50,
            ws_burst: 100,
            ws_sustained_violations: 20,
            max_connections: 100_000,
            max_connections_per_subject: 100,
            unauth_upgrades_per_sec_per_ip: 10,
            max_frame_bytes: 64 * 1024,
            send_queue: 256,
            ping_interval: Duration::from_secs(20),
            max_subscriptions: 100,
        }
    }
}

impl GatewayConfig {
    pub fn new(listen: SocketAddr, auth: AuthConfig) -> Self {
        Self {
            listen,
            tls: None,
            auth,
            limits: LimitsConfig::default(),
            job_limits: ferry_core::Limits::default(),
        }
    }
}
