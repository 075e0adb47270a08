//! `ferry gateway`: the HTTPS/WebSocket API against Redis, until SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ferry_gateway::GatewayConfig;
use ferry_gateway::auth::AuthConfig;
use ferry_gateway::config::{ClusterConfig, TlsConfig};

use crate::CliError;
use crate::args::{ClusterArgs, GatewayArgs, JwtArgs, ShutdownArgs};

/// Shortest shared secret accepted: HS256 with less than 256 bits of key is guessable offline.
pub const MIN_SECRET_BYTES: usize = 32;

pub fn check_secret(flag: &str, secret: &[u8]) -> Result<(), CliError> {
    if secret.len() < MIN_SECRET_BYTES {
        return Err(CliError::usage(
            flag,
            format!(
                "the secret must be at least {MIN_SECRET_BYTES} bytes, got {}",
                secret.len()
            ),
        ));
    }
    Ok(())
}

pub fn parse_listen(s: &str) -> Result<SocketAddr, CliError> {
    s.parse().map_err(|_| {
        CliError::usage(
            "--listen",
            format!("{s:?} is not an address like 127.0.0.1:8080"),
        )
    })
}

fn read(flag: &str, path: &std::path::Path) -> Result<String, CliError> {
    std::fs::read_to_string(path)
        .map_err(|e| CliError::usage(flag, format!("{}: {e}", path.display())))
}

pub fn auth_config(a: JwtArgs) -> Result<AuthConfig, CliError> {
    if let Some(s) = &a.jwt_secret {
        check_secret("--jwt-secret", s.as_bytes())?;
    }
    let (public_key_kids, public_key_pems): (Vec<_>, Vec<_>) = a
        .jwt_public_keys
        .iter()
        .map(|p| {
            let (kid, path) = key_id(p);
            read("--jwt-public-key", &path).map(|pem| (kid, pem))
        })
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .unzip();
    if a.jwt_secret_kid.as_deref() == Some("") {
        return Err(CliError::usage("--jwt-secret-kid", "must not be empty"));
    }
    let jwks_json = a
        .jwks_file
        .as_deref()
        .map(|p| read("--jwks-file", p))
        .transpose()?;
    if let Some(url) = &a.jwks_url {
        check_jwks_url(url)?;
    }
    if a.jwt_secret.is_none()
        && public_key_pems.is_empty()
        && jwks_json.is_none()
        && a.jwks_url.is_none()
    {
        return Err(CliError::usage(
            "--jwt-secret",
            "the gateway needs a way to verify tokens: --jwt-secret, --jwt-public-key, --jwks-file or --jwks-url",
        ));
    }
    Ok(AuthConfig {
        hs_secret: a.jwt_secret.map(String::into_bytes),
        hs_secret_kid: a.jwt_secret_kid,
        public_key_pems,
        public_key_kids,
        jwks_json,
        jwks_url: a.jwks_url,
        jwks_refresh: Duration::ZERO,
        issuer: a.jwt_issuer,
        audience: a.jwt_audience,
        leeway: Duration::from_secs(30),
    })
}

/// `KID=FILE` → the kid and the file; a `=` after the first `/` is part of the path (write `./a=b.pem` for a
/// file whose name holds one).
fn key_id(value: &std::path::Path) -> (Option<String>, std::path::PathBuf) {
    let text = value.to_string_lossy();
    match text.split_once('=') {
        Some((kid, path)) if !kid.is_empty() && !kid.contains('/') => {
            (Some(kid.to_owned()), std::path::PathBuf::from(path))
        }
        _ => (None, value.to_owned()),
    }
}

/// Only http(s): the URL is fetched by the gateway, and any other scheme is a typo or a file path that belongs
/// in --jwks-file. The gateway checks the rest of the URL when it starts.
fn check_jwks_url(url: &str) -> Result<(), CliError> {
    let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
    match scheme.as_deref() {
        Some("http" | "https") if url.len() > scheme.as_deref().map_or(0, str::len) + 3 => Ok(()),
        _ => Err(CliError::usage(
            "--jwks-url",
            format!("{url:?} is not an http:// or https:// URL"),
        )),
    }
}

/// The drain settings, checked: the deadline must leave room for the drain delay and the close spread.
pub fn shutdown_config(
    a: &ShutdownArgs,
) -> Result<ferry_gateway::config::ShutdownConfig, CliError> {
    let room = a.drain_delay_ms.saturating_add(a.ws_close_spread_ms);
    if a.shutdown_deadline_ms <= room {
        return Err(CliError::usage(
            "--shutdown-deadline-ms",
            format!(
                "must be greater than --drain-delay-ms + --ws-close-spread-ms ({} + {} = {room} ms), got {}",
                a.drain_delay_ms, a.ws_close_spread_ms, a.shutdown_deadline_ms
            ),
        ));
    }
    Ok(ferry_gateway::config::ShutdownConfig {
        drain_delay: Duration::from_millis(a.drain_delay_ms),
        ws_close_spread: Duration::from_millis(a.ws_close_spread_ms),
        hard_deadline: Duration::from_millis(a.shutdown_deadline_ms),
    })
}

/// The membership and rebalancing settings; their rules are the gateway's own ([`ClusterConfig::validate`],
/// run with the rest in [`resolve`]).
pub fn cluster_config(a: &ClusterArgs, tls: bool) -> ClusterConfig {
    if let Some(url) = &a.advertise_url
        && tls
        && url.starts_with("http://")
    {
        tracing::warn!(%url, "--advertise-url is http:// while the gateway serves TLS");
    }
    ClusterConfig {
        advertise_url: a.advertise_url.clone(),
        region: a.region.clone(),
        balance_epsilon: a.balance_epsilon,
        heartbeat: Duration::from_millis(a.heartbeat_ms),
        membership_ttl: Duration::from_millis(a.membership_ttl_ms),
        rebalance_rate: a.rebalance_rate,
        rebalance_cooldown: Duration::from_millis(a.rebalance_cooldown_ms),
        ..ClusterConfig::default()
    }
}

#[derive(Debug)]
pub struct ResolvedGateway {
    pub urls: Vec<String>,
    /// The Redis client's timeouts.
    pub redis_options: ferry_broker::RedisOptions,
    pub redis_tls: ferry_broker::RedisTls,
    pub engine: ferry_broker::EngineConfig,
    /// `--history-size`, `--history-ttl-ms`.
    pub history: ferry_broker::ChannelHistory,
    pub config: GatewayConfig,
    pub database: Option<crate::store::ResolvedDatabase>,
}

pub fn resolve(a: GatewayArgs) -> Result<ResolvedGateway, CliError> {
    let urls = crate::redis_urls(&a.redis)?;
    let redis_options = crate::redis_options(&a.redis)?;
    let redis_tls = crate::redis_tls(&urls, a.redis.redis_ca_file.as_deref())?;
    let listen = parse_listen(&a.listen)?;
    let auth = auth_config(a.jwt)?;
    // Refuse bad key material now, before anything connects.
    ferry_gateway::auth::Authenticator::new(auth.clone())
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let mut config = GatewayConfig::new(listen, auth);
    config.shutdown = shutdown_config(&a.shutdown)?;
    config.profiling = a.profiling;
    config.cors_origin = a.cors_origin;
    config.autoscaler_url = a.autoscaler_url;
    if let (Some(cert_pem), Some(key_pem)) = (a.tls_cert, a.tls_key) {
        for (flag, p) in [("--tls-cert", &cert_pem), ("--tls-key", &key_pem)] {
            if !p.is_file() {
                return Err(CliError::usage(
                    flag,
                    format!("{}: no such file", p.display()),
                ));
            }
        }
        config.tls = Some(TlsConfig { cert_pem, key_pem });
    }
    if a.broker_timeout_ms == 0 {
        return Err(CliError::usage(
            "--broker-timeout-ms",
            "must be greater than zero",
        ));
    }
    let t = &a.tuning;
    crate::at_least_one(&[
        ("--store-timeout-ms", t.store_timeout_ms),
        ("--breaker-failures", u64::from(t.breaker_failures)),
        ("--breaker-open-ms", t.breaker_open_ms),
        ("--backlog-poll-ms", t.backlog_poll_ms),
        ("--canary-budget-ms", t.canary_budget_ms),
    ])?;
    let r = &mut config.resilience;
    r.broker_timeout = Duration::from_millis(a.broker_timeout_ms);
    r.store_timeout = Duration::from_millis(t.store_timeout_ms);
    for breaker in [&mut r.broker_breaker, &mut r.store_breaker] {
        breaker.failure_threshold = t.breaker_failures;
        breaker.open_for = Duration::from_millis(t.breaker_open_ms);
    }
    r.backlog_poll = Duration::from_millis(t.backlog_poll_ms);
    config.readiness.pubsub_budget = Duration::from_millis(t.canary_budget_ms);
    config.limits.ping_interval = Duration::from_millis(t.ws_ping_interval_ms);
    config.limits.max_subscriptions = t.max_subscriptions;
    config.limits.ws_sustained_violations = t.ws_rate_violations;
    config.limits.unauth_upgrades_per_sec_per_ip = t.unauth_upgrade_rate;
    config.connections = ferry_gateway::config::ConnectionConfig {
        header_timeout: Duration::from_millis(t.header_timeout_ms),
        body_timeout: Duration::from_millis(t.body_timeout_ms),
        idle_timeout: Duration::from_millis(t.idle_timeout_ms),
        max_unauthenticated: t.max_unauthenticated_connections,
        max_unauthenticated_per_ip: t.max_unauthenticated_per_ip,
    };
    config.resilience.backlog_high_water = Some(a.backlog_high_water).filter(|&n| n > 0);
    let l = &a.limits;
    config.limits.max_body_bytes = l.max_body_bytes;
    config.limits.max_batch = l.max_batch;
    config.limits.http_rate_per_sec = l.http_rate;
    config.limits.http_burst = l.http_burst;
    config.limits.ws_rate_per_sec = l.ws_rate;
    config.limits.ws_burst = l.ws_burst;
    config.limits.max_connections = l.max_connections;
    config.limits.max_connections_per_subject = l.max_connections_per_subject;
    config.limits.max_frame_bytes = l.max_frame_bytes;
    config.limits.max_publish_bytes = l.max_publish_bytes;
    config.limits.send_queue = l.send_queue;
    config.cluster = cluster_config(&a.cluster, config.tls.is_some());
    // The limits', connections' and cluster's rules are the gateway's own, so an in-process gateway built with
    // the same values fails the same way; the error names the field, mapped here to its flag.
    config
        .validate()
        .map_err(|e| crate::gateway_config_error("gateway", e))?;
    let database = crate::store::resolve(a.database)?;
    // With the record, a cancelled job leaves Redis once recorded: lookups find it in the store.
    let engine = ferry_broker::EngineConfig {
        drop_recorded: database.is_some(),
        ..crate::engine_config(&a.engine)?
    };
    let history = crate::channel_history(&a.history)?;
    Ok(ResolvedGateway {
        history,
        urls,
        redis_options,
        redis_tls,
        engine,
        config,
        database,
    })
}

pub async fn run(cfg: ResolvedGateway) -> Result<(), CliError> {
    // The gateway's own drain ends at its hard deadline; the process exits 70 shortly after if it has not.
    let runner = crate::runner(cfg.config.shutdown.hard_deadline + DEADLINE_MARGIN)?;
    let connect = async {
        let broker =
            crate::connect(&cfg.urls, cfg.engine, cfg.redis_options, cfg.redis_tls).await?;
        let store: Option<Arc<dyn ferry_store::Store>> = match &cfg.database {
            Some(db) => Some(Arc::new(crate::store::connect(db).await?)),
            None => None,
        };
        Ok::<_, CliError>((broker.with_channel_history(cfg.history), store))
    };
    let shutdown = runner.shutdown();
    let (broker, store) = tokio::select! {
        c = connect => c?,
        _ = shutdown.cancelled() => return Ok(()),
    };
    let mut config = cfg.config;
    config.store = store;
    config.registry = Some(runner.registry());
    let served = serve(config, Arc::new(broker), shutdown).await;
    runner.finish(None).await;
    served
}

/// The room the process deadline leaves past the gateway's own hard deadline (closing the pools, last spans).
const DEADLINE_MARGIN: std::time::Duration = std::time::Duration::from_secs(5);

/// Bind and serve until `shutdown`; shared with `ferry dev`.
pub async fn serve(
    config: GatewayConfig,
    broker: Arc<dyn ferry_broker::Broker>,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<(), CliError> {
    serve_then(config, broker, shutdown, |_| Ok(())).await
}

/// [`serve`], calling `bound` with the address the gateway bound (the real port when asked for port 0) before
/// it announces `gateway listening` and serves.
pub async fn serve_then(
    config: GatewayConfig,
    broker: Arc<dyn ferry_broker::Broker>,
    shutdown: tokio_util::sync::CancellationToken,
    bound: impl FnOnce(std::net::SocketAddr) -> Result<(), CliError>,
) -> Result<(), CliError> {
    let gateway = ferry_gateway::Gateway::build(config, broker)
        .await
        .map_err(|e| match e {
            ferry_gateway::server::GatewayError::Bind { .. }
            // The --jwks-url endpoint did not answer: the same kind of failure as a port in use.
            | ferry_gateway::server::GatewayError::Auth(
                ferry_gateway::auth::AuthError::Unavailable(_),
            ) => CliError::Unavailable(e.to_string()),
            other => CliError::Usage(other.to_string()),
        })?;
    bound(gateway.local_addr())?;
    tracing::info!(listen = %gateway.local_addr(), "gateway listening");
    gateway
        .run(shutdown)
        .await
        .map_err(|e| CliError::Internal(e.to_string()))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::args::{Cli, Command};

    fn jwt_args(extra: &[&str]) -> JwtArgs {
        let mut argv = vec!["ferry", "gateway", "--redis", "redis://127.0.0.1:6379"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).expect("parses").command {
            Command::Gateway(g) => g.jwt,
            other => panic!("expected gateway, got {other:?}"),
        }
    }

    #[test]
    fn jwks_url_alone_is_a_way_to_verify_tokens() {
        let auth = auth_config(jwt_args(&["--jwks-url", "https://id.example/jwks.json"]))
            .expect("accepted");
        assert_eq!(
            auth.jwks_url.as_deref(),
            Some("https://id.example/jwks.json")
        );
        assert!(auth.hs_secret.is_none() && auth.jwks_json.is_none());
        // The gateway's own checks accept it too (no fetch happens here).
        ferry_gateway::auth::Authenticator::new(auth).expect("valid config");
    }

    #[test]
    fn jwks_url_must_be_http_or_https() {
        for bad in [
            "ftp://id.example/jwks",
            "/etc/jwks.json",
            "id.example/jwks",
            "https://",
        ] {
            let err = auth_config(jwt_args(&["--jwks-url", bad])).expect_err(bad);
            assert!(err.to_string().contains("--jwks-url"), "{err}");
        }
        auth_config(jwt_args(&["--jwks-url", "HTTP://127.0.0.1:9/jwks"])).expect("http");
    }

    #[test]
    fn keys_may_be_given_a_kid() {
        let dir = tempfile::tempdir().unwrap();
        let pem = "-----BEGIN PUBLIC KEY-----\nAA==\n-----END PUBLIC KEY-----\n";
        let (a, b) = (dir.path().join("a.pem"), dir.path().join("k=b.pem"));
        std::fs::write(&a, pem).unwrap();
        std::fs::write(&b, pem).unwrap();
        let auth = auth_config(jwt_args(&[
            "--jwt-secret",
            "0123456789abcdef0123456789abcdef",
            "--jwt-secret-kid",
            "hs-1",
            "--jwt-public-key",
            &format!("rsa-1={}", a.display()),
            "--jwt-public-key",
            &b.display().to_string(),
        ]))
        .expect("accepted");
        assert_eq!(auth.hs_secret_kid.as_deref(), Some("hs-1"));
        assert_eq!(auth.public_key_kids, vec![Some("rsa-1".to_owned()), None]);
        assert_eq!(auth.public_key_pems, vec![pem.to_owned(), pem.to_owned()]);
        let err = auth_config(jwt_args(&["--jwt-public-key", "k1=/nonexistent/key.pem"]))
            .expect_err("missing file");
        assert!(err.to_string().contains("/nonexistent/key.pem"), "{err}");
    }

    #[test]
    fn without_any_key_source_the_message_lists_jwks_url() {
        // The flags read the environment too: clear every key source a `FERRY_JWT*`/`FERRY_JWKS*` variable may
        // have set, so the case runs whatever the environment holds.
        let mut args = jwt_args(&[]);
        args.jwt_secret = None;
        args.jwt_public_keys.clear();
        args.jwks_file = None;
        args.jwks_url = None;
        let err = auth_config(args).expect_err("no keys");
        assert!(err.to_string().contains("--jwks-url"), "{err}");
    }
}
