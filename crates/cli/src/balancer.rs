//! `ferry balancer`: check the flags, bind, read the gateway membership from Redis and proxy clients to their
//! gateways until SIGTERM/SIGINT, then drain (see `ferry_balancer`).

use std::sync::Arc;
use std::time::Duration;

use ferry_balancer::{Balancer, BalancerConfig, TlsFiles};

use crate::CliError;
use crate::args::BalancerArgs;

pub fn resolve(a: BalancerArgs) -> Result<BalancerConfig, CliError> {
    let urls = crate::redis_urls(&a.redis)?;
    let redis_options = crate::redis_options(&a.redis)?;
    let redis_tls = crate::redis_tls(&urls, a.redis.redis_ca_file.as_deref())?;
    let listen = crate::gateway::parse_listen(&a.listen)?;
    let admin_listen = crate::admin_listen(&a.admin_listen)?;
    if !(a.balance_epsilon.is_finite() && a.balance_epsilon > 0.0) {
        return Err(CliError::usage(
            "--balance-epsilon",
            format!("must be a number above 0, got {}", a.balance_epsilon),
        ));
    }
    crate::at_least_one(&[
        ("--header-timeout-ms", a.header_timeout_ms),
        ("--idle-timeout-ms", a.idle_timeout_ms),
    ])?;
    let mut config = BalancerConfig::new(listen, urls);
    config.redis_options = redis_options;
    config.redis_tls = redis_tls;
    config.admin_listen = admin_listen;
    config.epsilon = a.balance_epsilon;
    config.header_timeout = Duration::from_millis(a.header_timeout_ms);
    config.idle_timeout = Duration::from_millis(a.idle_timeout_ms);
    config.drain = Duration::from_millis(a.drain_ms);
    if let (Some(cert_pem), Some(key_pem)) = (a.tls_cert, a.tls_key) {
        for (flag, p) in [("--tls-cert", &cert_pem), ("--tls-key", &key_pem)] {
            if !p.is_file() {
                return Err(CliError::usage(
                    flag,
                    format!("{}: no such file", p.display()),
                ));
            }
        }
        config.tls = Some(TlsFiles { cert_pem, key_pem });
    }
    if let Some(ca) = &a.upstream_ca
        && !ca.is_file()
    {
        return Err(CliError::usage(
            "--upstream-ca",
            format!("{}: no such file", ca.display()),
        ));
    }
    config.upstream_ca = a.upstream_ca;
    Ok(config)
}

pub async fn run(cfg: BalancerConfig) -> Result<(), CliError> {
    // The balancer's drain keeps tunnels up to its drain time; past that and a margin, the process exits 70.
    let runner = crate::runner(cfg.drain + std::time::Duration::from_secs(5))?;
    let shutdown = runner.shutdown();
    let registry = Arc::new(runner.registry());
    let balancer = tokio::select! {
        b = Balancer::build(cfg, registry) => b.map_err(|e| match e {
            ferry_balancer::BalancerError::Tls(m) => CliError::Usage(m),
            ferry_balancer::BalancerError::Metrics(m) => CliError::Internal(m.to_string()),
            other => CliError::Unavailable(other.to_string()),
        })?,
        _ = shutdown.cancelled() => return Ok(()),
    };
    tracing::info!(
        addr = %balancer.local_addr(),
        admin = ?balancer.admin_addr(),
        "balancer listening"
    );
    balancer.run(shutdown).await;
    runner.finish(None).await;
    Ok(())
}
