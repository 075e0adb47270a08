//! Gateway settings, their defaults and the rules they must satisfy ([`GatewayConfig::validate`]), checked by
//! [`Gateway::build`](crate::server::Gateway::build) before anything binds.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ferry_core::breaker::BreakerConfig;

use crate::auth::AuthConfig;

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub listen: SocketAddr,
    pub tls: Option<TlsConfig>,
    pub auth: AuthConfig,
    pub limits: LimitsConfig,
    pub job_limits: ferry_core::Limits,
    /// Timeouts, circuit breakers and load shedding around the gateway's dependencies.
    pub resilience: ResilienceConfig,
    /// The durable record (PostgreSQL, or memory for `ferry dev`) that answers job listings, audit trails and
    /// lookups of jobs Redis no longer holds. `None` (the default): those routes answer 503 `no-store`.
    pub store: Option<Arc<dyn ferry_store::Store>>,
    /// How the gateway drains when its run token is cancelled (SIGTERM/SIGINT).
    pub shutdown: ShutdownConfig,
    /// What `/readyz` checks beyond the dependencies' pings.
    pub readiness: ReadinessConfig,
    /// Serve `GET /debug/pprof/profile` (CPU profiles, `admin` scope). Off by default: the route then answers 404.
    pub profiling: bool,
    /// Timeouts and budgets of client connections before and between requests ([`crate::connection`]).
    pub connections: ConnectionConfig,
    /// Membership of the gateway tier and rebalancing of WebSocket clients ([`crate::cluster`]).
    pub cluster: ClusterConfig,
    /// The process's metrics registry, shared with the other nodes of the process (`ferry dev`'s embedded
    /// worker): `/metrics` serves all of it. `None`: a registry of the gateway's own.
    pub registry: Option<ferry_telemetry::prometheus::Registry>,
    /// Origins allowed to call the HTTP API from a browser page of another origin (CORS): each an exact
    /// origin (`https://app.example.com`, scheme, host and port if not the default) or `*` alone (any origin).
    /// Empty (the default): no CORS headers at all, so browsers keep cross-origin pages out.
    pub cors_origin: Vec<String>,
    /// Admin listeners of `ferry autoscaler` (`http://host:9465`), read by `GET /v1/autoscaler` for the
    /// dashboard: each serves its last scaling decisions at `GET /decisions`. Empty (the default): none.
    pub autoscaler_url: Vec<String>,
}

/// This node in the gateway tier: what it announces in the membership, how often, and how it moves its
/// WebSocket clients to where placement puts them ([`crate::cluster`]), with defaults.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Unique per process: a UUIDv7 drawn at start.
    pub node_id: String,
    /// Where balancers send this node's clients (`--advertise-url`); `None`: `http://` (or `https://` with TLS)
    /// and the bound listen address.
    pub advertise_url: Option<String>,
    /// `--region`, announced as is.
    pub region: Option<String>,
    /// ε of the load bound: no node above ⌈(1 + ε) × mean⌉ connections (default 0.1).
    pub balance_epsilon: f64,
    /// How often the node announces itself and looks at where its clients belong (default 1 s).
    pub heartbeat: Duration,
    /// How long an announcement lasts: a node that stops announcing leaves the membership after it (default 5 s).
    pub membership_ttl: Duration,
    /// Rebalancing reconnects per second for the whole cluster, shared equally by the eligible nodes
    /// (default 100); 0 turns rebalancing off.
    pub rebalance_rate: u32,
    /// A connection younger than this is never moved, so no client moves twice within it (default 30 s).
    pub rebalance_cooldown: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            node_id: uuid::Uuid::now_v7().to_string(),
            advertise_url: None,
            region: None,
            balance_epsilon: ferry_broker::placement::DEFAULT_EPSILON,
            heartbeat: Duration::from_secs(1),
            membership_ttl: Duration::from_secs(5),
            rebalance_rate: 100,
            rebalance_cooldown: Duration::from_secs(30),
        }
    }
}

/// What a client connection may cost before it has shown a valid token, and how long it may stall, with
/// defaults operators know from nginx and HAProxy.
#[derive(Debug, Clone)]
pub struct ConnectionConfig {
    /// A new connection must deliver its first request's headers (and finish the TLS handshake) within this;
    /// a kept-alive one gets the same time from the first byte of each later request (default 10 s, HAProxy's
    /// usual `timeout http-request`; nginx's `client_header_timeout` is 60 s). Past it the connection is closed.
    pub header_timeout: Duration,
    /// The whole request body must arrive within this of the request's headers (default 60 s, nginx's
    /// `client_body_timeout`, which nginx counts between two reads). Past it: 408, and the connection closes.
    pub body_timeout: Duration,
    /// A kept-alive connection with no request in flight is closed after this (default 75 s, nginx's
    /// `keepalive_timeout`; longer than the 60 s idle timeout of the usual cloud load balancers, so the
    /// balancer, not the gateway, closes an idle pooled connection). WebSockets have their own pings instead.
    pub idle_timeout: Duration,
    /// Connections open on this node that have not yet completed an authenticated request or upgrade
    /// (default 4096). Keep it well under the process's open-file limit (`ulimit -n`).
    pub max_unauthenticated: usize,
    /// The same count per client address (default 256). Behind a proxy every client has the proxy's address:
    /// raise it there.
    pub max_unauthenticated_per_ip: usize,
}

impl Default for ConnectionConfig {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(75),
            max_unauthenticated: 4096,
            max_unauthenticated_per_ip: 256,
        }
    }
}

/// The drain sequence run when the gateway's token is cancelled (see [`crate::server`]), with defaults.
#[derive(Debug, Clone)]
pub struct ShutdownConfig {
    /// How long `/readyz` answers 503 `draining` while everything is still served, so load balancers stop
    /// sending new clients before the listener closes (default 5 s).
    pub drain_delay: Duration,
    /// WebSocket clients get a `goaway` frame when the listener closes, then each is closed with 1001 after its
    /// own delay, drawn uniformly from `[0, ws_close_spread)`, so they do not all reconnect at once (default
    /// 10 s).
    pub ws_close_spread: Duration,
    /// Longest the whole drain may take, from the signal: past it the gateway logs what was still open and
    /// returns an error (default 30 s). Should exceed `drain_delay + ws_close_spread`.
    pub hard_deadline: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            drain_delay: Duration::from_secs(5),
            ws_close_spread: Duration::from_secs(10),
            hard_deadline: Duration::from_secs(30),
        }
    }
}

/// Readiness checks, with defaults.
#[derive(Debug, Clone)]
pub struct ReadinessConfig {
    /// Longest wait for the pub/sub canary: a message published on this node's private application channel(s)
    /// must come back through the node's channel feed within it (default 2 s).
    pub pubsub_budget: Duration,
    /// The broker and the store run inside this process (`ferry dev`: the embedded engine and the in-memory
    /// record): `/readyz` names its checks `engine`, `pubsub` and `store` instead of `redis`, `pubsub` and
    /// `postgres`, and `ferry_dependency_up` (which counts external dependencies) is not set (default false).
    pub embedded: bool,
}

impl Default for ReadinessConfig {
    fn default() -> Self {
        Self {
            pubsub_budget: Duration::from_secs(2),
            embedded: false,
        }
    }
}

/// How the gateway protects itself and its dependencies, with defaults.
#[derive(Debug, Clone)]
pub struct ResilienceConfig {
    /// Longest wait for one broker (Redis) call made for a request (default 2 s); past it the request is answered
    /// 503 and the call counts as a failure of the Redis breaker.
    pub broker_timeout: Duration,
    /// Longest wait for one store (PostgreSQL) call (default 2 s).
    pub store_timeout: Duration,
    /// The circuit breaker around Redis (default: opens after 5 consecutive failures, for 5 s, 1 probe).
    pub broker_breaker: BreakerConfig,
    /// The circuit breaker around the store (same defaults).
    pub store_breaker: BreakerConfig,
    /// How often the recorder's event-log backlog is polled (default 1 s).
    pub backlog_poll: Duration,
    /// Above this many unrecorded event-log entries, new submissions are refused with 503 `overloaded`
    /// (default 200,000). `None` or `Some(0)` disables shedding (and the polling).
    pub backlog_high_water: Option<u64>,
}

impl Default for ResilienceConfig {
    fn default() -> Self {
        Self {
            broker_timeout: Duration::from_secs(2),
            store_timeout: Duration::from_secs(2),
            broker_breaker: BreakerConfig::default(),
            store_breaker: BreakerConfig::default(),
            backlog_poll: Duration::from_secs(1),
            backlog_high_water: Some(200_000),
        }
    }
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
    /// Failed authentications (HTTP requests and WebSocket upgrades alike) per second per IP (default 10);
    /// past it they are answered 429.
    pub unauth_upgrades_per_sec_per_ip: u32,
    /// Largest WebSocket frame accepted (default 64 KiB).
    pub max_frame_bytes: usize,
    /// Largest payload the gateway pushes to a WebSocket: a published message's `data` (compact JSON) is refused
    /// over it (413, `too_large`), and a job event leaves out a `result`, `error` or `progress` over it (saying
    /// so with `result_omitted` …). Default 64 KiB, the same as `max_frame_bytes`. Every connection's write
    /// buffer is sized to take the largest frame this allows, so a push never fails a subscriber's write.
    pub max_publish_bytes: usize,
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
            max_publish_bytes: 64 * 1024,
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
            resilience: ResilienceConfig::default(),
            store: None,
            shutdown: ShutdownConfig::default(),
            readiness: ReadinessConfig::default(),
            profiling: false,
            connections: ConnectionConfig::default(),
            cluster: ClusterConfig::default(),
            registry: None,
            cors_origin: Vec::new(),
            autoscaler_url: Vec::new(),
        }
    }
}

/// A setting that breaks a rule, named by its field (`max_connections`, `membership_ttl`, ...): a caller
/// names its own spelling of it (the cli, the flag whose id is the field).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {message}")]
pub struct ConfigError {
    pub field: &'static str,
    pub message: String,
}

fn bad(field: &'static str, message: impl Into<String>) -> Result<(), ConfigError> {
    Err(ConfigError {
        field,
        message: message.into(),
    })
}

/// The first of `values` that is zero: counts, rates and durations that must be at least 1.
fn at_least_one(values: &[(&'static str, u64)]) -> Result<(), ConfigError> {
    match values.iter().find(|(_, v)| *v == 0) {
        Some((field, _)) => bad(field, "must be at least 1"),
        None => Ok(()),
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl LimitsConfig {
    /// Every limit must be at least 1: a zero would refuse every request, frame or connection, which is
    /// never what a setting of 0 meant.
    pub fn validate(&self) -> Result<(), ConfigError> {
        at_least_one(&[
            ("max_body_bytes", self.max_body_bytes as u64),
            ("max_batch", self.max_batch as u64),
            ("http_rate_per_sec", u64::from(self.http_rate_per_sec)),
            ("http_burst", u64::from(self.http_burst)),
            ("ws_rate_per_sec", u64::from(self.ws_rate_per_sec)),
            ("ws_burst", u64::from(self.ws_burst)),
            (
                "ws_sustained_violations",
                u64::from(self.ws_sustained_violations),
            ),
            ("max_connections", self.max_connections as u64),
            (
                "max_connections_per_subject",
                self.max_connections_per_subject as u64,
            ),
            (
                "unauth_upgrades_per_sec_per_ip",
                u64::from(self.unauth_upgrades_per_sec_per_ip),
            ),
            ("max_frame_bytes", self.max_frame_bytes as u64),
            ("max_publish_bytes", self.max_publish_bytes as u64),
            ("send_queue", self.send_queue as u64),
            ("ping_interval", millis(self.ping_interval)),
            ("max_subscriptions", self.max_subscriptions as u64),
        ])
    }
}

impl ConnectionConfig {
    /// Every timeout and budget must be at least 1 (ms, connection): zero would close every connection.
    pub fn validate(&self) -> Result<(), ConfigError> {
        at_least_one(&[
            ("header_timeout", millis(self.header_timeout)),
            ("body_timeout", millis(self.body_timeout)),
            ("idle_timeout", millis(self.idle_timeout)),
            ("max_unauthenticated", self.max_unauthenticated as u64),
            (
                "max_unauthenticated_per_ip",
                self.max_unauthenticated_per_ip as u64,
            ),
        ])
    }
}

/// The largest ε of the load bound accepted: past it placement barely bounds anything.
pub const MAX_BALANCE_EPSILON: f64 = 10.0;

impl ClusterConfig {
    /// The advertised URL must be one a balancer can reach, ε a usable bound, and an announcement must outlive
    /// the heartbeat that renews it (else the node blinks out of the membership between two heartbeats).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(url) = &self.advertise_url {
            let rest = url
                .strip_prefix("http://")
                .or_else(|| url.strip_prefix("https://"));
            let ok = rest.is_some_and(|host| {
                !host.is_empty() && !host.starts_with('/') && !url.contains(char::is_whitespace)
            });
            if !ok {
                return bad(
                    "advertise_url",
                    format!("{url:?} is not an http:// or https:// URL with a host"),
                );
            }
        }
        if self.region.as_deref().is_some_and(|r| r.trim().is_empty()) {
            return bad("region", "must not be empty when given");
        }
        let e = self.balance_epsilon;
        if !e.is_finite() || e <= 0.0 || e > MAX_BALANCE_EPSILON {
            return bad(
                "balance_epsilon",
                format!(
                    "must be above 0 and at most {MAX_BALANCE_EPSILON} (0.1 allows 10 % above the mean), got {e}"
                ),
            );
        }
        at_least_one(&[
            ("heartbeat", millis(self.heartbeat)),
            ("membership_ttl", millis(self.membership_ttl)),
        ])?;
        if self.membership_ttl <= self.heartbeat {
            return bad(
                "membership_ttl",
                format!(
                    "must be greater than the heartbeat ({} ms; 5 heartbeats is usual), got {}",
                    self.heartbeat.as_millis(),
                    self.membership_ttl.as_millis()
                ),
            );
        }
        let max = ferry_broker::membership::MAX_TTL;
        if self.membership_ttl > max {
            return bad(
                "membership_ttl",
                format!(
                    "must be at most {} (a day), got {}",
                    max.as_millis(),
                    self.membership_ttl.as_millis()
                ),
            );
        }
        Ok(())
    }
}

impl GatewayConfig {
    /// Check the limits, the connection budgets and the cluster settings; the first broken rule is reported
    /// with its field name. [`Gateway::build`](crate::server::Gateway::build) calls it, so a gateway built in
    /// process fails the same way as `ferry gateway` with the same values.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.limits.validate()?;
        self.connections.validate()?;
        self.cluster.validate()?;
        validate_cors_origin(&self.cors_origin)?;
        validate_autoscaler_url(&self.autoscaler_url)
    }
}

/// `http://` or `https://` URLs with a host (the autoscaler's admin listener).
fn validate_autoscaler_url(urls: &[String]) -> Result<(), ConfigError> {
    for u in urls {
        let ok = reqwest::Url::parse(u)
            .is_ok_and(|p| matches!(p.scheme(), "http" | "https") && p.host().is_some());
        if !ok {
            return bad(
                "autoscaler_url",
                format!(
                    "{:?} is not an http:// or https:// URL of an autoscaler's admin listener",
                    ferry_core::redact_url(u)
                ),
            );
        }
    }
    Ok(())
}

/// `*` alone, or origins of the form `scheme://host[:port]` (no path, no trailing slash), as browsers send
/// them in `Origin`.
fn validate_cors_origin(origins: &[String]) -> Result<(), ConfigError> {
    if origins.iter().any(|o| o == "*") {
        if origins.len() > 1 {
            return bad("cors_origin", "`*` allows any origin: give it alone");
        }
        return Ok(());
    }
    for o in origins {
        let rest = o
            .strip_prefix("http://")
            .or_else(|| o.strip_prefix("https://"));
        let ok = rest.is_some_and(|r| {
            !r.is_empty()
                && !r.contains(['/', '?', '#', ' ', '@'])
                && axum::http::HeaderValue::from_str(o).is_ok()
        });
        if !ok {
            return bad(
                "cors_origin",
                format!(
                    "{o:?} is not an origin (http:// or https://, a host, an optional port, no path)"
                ),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        LimitsConfig::default().validate().unwrap();
        ConnectionConfig::default().validate().unwrap();
        ClusterConfig::default().validate().unwrap();
    }

    #[test]
    fn rules_name_the_field() {
        let mut limits = LimitsConfig {
            max_connections: 0,
            ..LimitsConfig::default()
        };
        assert_eq!(limits.validate().unwrap_err().field, "max_connections");
        limits.max_connections = 1;
        limits.ping_interval = Duration::ZERO;
        assert_eq!(limits.validate().unwrap_err().field, "ping_interval");
        let conns = ConnectionConfig {
            idle_timeout: Duration::ZERO,
            ..ConnectionConfig::default()
        };
        assert_eq!(conns.validate().unwrap_err().field, "idle_timeout");
        let mut cluster = ClusterConfig {
            membership_ttl: Duration::from_secs(1),
            ..ClusterConfig::default()
        };
        assert_eq!(cluster.validate().unwrap_err().field, "membership_ttl");
        cluster.membership_ttl = Duration::from_secs(5);
        cluster.balance_epsilon = 0.0;
        assert_eq!(cluster.validate().unwrap_err().field, "balance_epsilon");
        cluster.balance_epsilon = 0.1;
        cluster.advertise_url = Some("ftp://x".into());
        assert_eq!(cluster.validate().unwrap_err().field, "advertise_url");
    }

    #[test]
    fn cors_origins_are_exact_origins_or_a_lone_star() {
        let v =
            |o: &[&str]| validate_cors_origin(&o.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        v(&[]).unwrap();
        v(&["*"]).unwrap();
        v(&["http://127.0.0.1:5173", "https://app.example.com"]).unwrap();
        for bad in [
            &["*", "http://a"][..],
            &["app.example.com"],
            &["https://a/"],
            &["ftp://a"],
        ] {
            assert_eq!(v(bad).unwrap_err().field, "cors_origin", "{bad:?}");
        }
    }

    #[tokio::test]
    async fn an_in_process_gateway_with_a_bad_limit_is_refused_at_build() {
        let auth = AuthConfig {
            hs_secret: Some(b"0123456789abcdef0123456789abcdef".to_vec()),
            ..AuthConfig::default()
        };
        let mut config = GatewayConfig::new("127.0.0.1:0".parse().unwrap(), auth);
        config.limits.send_queue = 0;
        let broker = Arc::new(ferry_broker::MemoryBroker::new(
            ferry_broker::EngineConfig::default(),
        ));
        match crate::Gateway::build(config, broker).await {
            Err(crate::server::GatewayError::Config(e)) => assert_eq!(e.field, "send_queue"),
            other => panic!("expected a configuration error, got {other:?}"),
        }
    }
}
