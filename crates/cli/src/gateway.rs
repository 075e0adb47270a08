//! `ferry gateway`: the HTTPS/WebSocket API against Redis, until SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ferry_gateway::GatewayConfig;
use ferry_gateway::auth::AuthConfig;
use ferry_gateway::config::TlsConfig;

use crate::CliError;
use crate::args::{GatewayArgs, JwtArgs, ShutdownArgs};

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
    let public_key_pems = a
        .jwt_public_keys
        .iter()
        .map(|p| read("--jwt-public-key", p))
        .collect::<Result<Vec<_>, _>>()?;
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
        public_key_pems,
        jwks_json,
        jwks_url: a.jwks_url,
        jwks_refresh: Duration::ZERO,
        issuer: a.jwt_issuer,
        audience: a.jwt_audience,
        leeway: Duration::from_secs(30),
    })
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

#[derive(Debug)]
pub struct ResolvedGateway {
    pub urls: Vec<String>,
    pub engine: ferry_broker::EngineConfig,
    pub config: GatewayConfig,
    pub database: Option<crate::store::ResolvedDatabase>,
}

pub fn resolve(a: GatewayArgs) -> Result<ResolvedGateway, CliError> {
    let urls = crate::check_redis_urls(&a.redis.redis)?;
    let listen = parse_listen(&a.listen)?;
    let auth = auth_config(a.jwt)?;
    // Refuse bad key material now, before anything connects.
    ferry_gateway::auth::Authenticator::new(auth.clone())
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let mut config = GatewayConfig::new(listen, auth);
    config.shutdown = shutdown_config(&a.shutdown)?;
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
    config.resilience.broker_timeout = Duration::from_millis(a.broker_timeout_ms);
    config.resilience.store_timeout = Duration::from_millis(a.broker_timeout_ms);
    config.resilience.backlog_high_water = Some(a.backlog_high_water).filter(|&n| n > 0);
    let l = &a.limits;
    for (flag, v) in [
        ("--max-body-bytes", l.max_body_bytes),
        ("--max-batch", l.max_batch),
        ("--http-rate", l.http_rate as usize),
        ("--http-burst", l.http_burst as usize),
        ("--ws-rate", l.ws_rate as usize),
        ("--ws-burst", l.ws_burst as usize),
        ("--max-connections", l.max_connections),
        (
            "--max-connections-per-subject",
            l.max_connections_per_subject,
        ),
        ("--max-frame-bytes", l.max_frame_bytes),
        ("--send-queue", l.send_queue),
    ] {
        if v == 0 {
            return Err(CliError::usage(flag, "must be at least 1"));
        }
    }
    config.limits.max_body_bytes = l.max_body_bytes;
    config.limits.max_batch = l.max_batch;
    config.limits.http_rate_per_sec = l.http_rate;
    config.limits.http_burst = l.http_burst;
    config.limits.ws_rate_per_sec = l.ws_rate;
    config.limits.ws_burst = l.ws_burst;
    config.limits.max_connections = l.max_connections;
    config.limits.max_connections_per_subject = l.max_connections_per_subject;
    config.limits.max_frame_bytes = l.max_frame_bytes;
    config.limits.send_queue = l.send_queue;
    let engine = crate::engine_config(&a.engine)?;
    let database = crate::store::resolve(a.database)?;
    Ok(ResolvedGateway {
        urls,
        engine,
        config,
        database,
    })
}

pub async fn run(cfg: ResolvedGateway) -> Result<(), CliError> {
    let shutdown =
        ferry_telemetry::shutdown_token().map_err(|e| CliError::Internal(e.to_string()))?;
    let broker = crate::connect(&cfg.urls, cfg.engine.clone()).await?;
    let mut config = cfg.config;
    if let Some(db) = &cfg.database {
        let store: Arc<dyn ferry_store::Store> = Arc::new(crate::store::connect(db).await?);
        config.store = Some(store);
    }
    serve(config, Arc::new(broker), shutdown).await
}

/// Bind and serve until `shutdown`; shared with `ferry dev`.
pub async fn serve(
    config: GatewayConfig,
    broker: Arc<dyn ferry_broker::Broker>,
    shutdown: tokio_util::sync::CancellationToken,
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
    fn without_any_key_source_the_message_lists_jwks_url() {
        // The flags read the environment too; a key source set there would make this case moot.
        let sources = [
            "FERRY_JWT_SECRET",
            "FERRY_JWT_PUBLIC_KEYS",
            "FERRY_JWKS_FILE",
            "FERRY_JWKS_URL",
        ];
        if sources.iter().any(|v| std::env::var_os(v).is_some()) {
            return;
        }
        let err = auth_config(jwt_args(&[])).expect_err("no keys");
        assert!(err.to_string().contains("--jwks-url"), "{err}");
    }
}
