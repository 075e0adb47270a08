//! `ferry autoscaler`: load and check the regions file, connect to every region's Redis, run the control loop
//! until SIGTERM/SIGINT; local workers it started are drained before it exits.

use std::sync::Arc;
use std::time::Duration;

use ferry_autoscaler::actuator::{Local, MetricsOnly};
use ferry_autoscaler::config::ActuatorConfig;
use ferry_autoscaler::{Actuator, Autoscaler, RegionControl, RegionsFile};

use crate::CliError;
use crate::args::AutoscalerArgs;

#[derive(Debug)]
pub struct ResolvedAutoscaler {
    pub regions: RegionsFile,
    pub interval: Duration,
    pub dry_run: bool,
    pub admin_listen: Option<std::net::SocketAddr>,
    pub engine: ferry_broker::EngineConfig,
    /// `--redis-ca-file`, for every region's `rediss://` shards.
    pub redis_tls: ferry_broker::RedisTls,
}

pub fn resolve(a: AutoscalerArgs) -> Result<ResolvedAutoscaler, CliError> {
    let regions = RegionsFile::load(&a.regions).map_err(|e| CliError::usage("--regions", e))?;
    for r in &regions.regions {
        crate::check_redis_urls(&r.redis)
            .map_err(|e| CliError::usage("--regions", format!("region {:?}: {e}", r.name)))?;
    }
    let all_urls: Vec<String> = regions
        .regions
        .iter()
        .flat_map(|r| r.redis.iter().cloned())
        .collect();
    let redis_tls = crate::redis_tls(&all_urls, a.redis_ca_file.as_deref())?;
    crate::at_least_one(&[("--interval-ms", a.interval_ms)])?;
    let admin_listen = crate::admin_listen(&a.admin_listen)?;
    Ok(ResolvedAutoscaler {
        regions,
        interval: Duration::from_millis(a.interval_ms),
        dry_run: a.dry_run,
        admin_listen,
        engine: crate::engine_config(&a.engine)?,
        redis_tls,
    })
}

pub async fn run(cfg: ResolvedAutoscaler) -> Result<(), CliError> {
    let shutdown =
        ferry_telemetry::shutdown_token().map_err(|e| CliError::Internal(e.to_string()))?;
    // First, so a taken address fails the start at once instead of after connecting to every region.
    let listener = crate::bind_admin(cfg.admin_listen).await?;
    let mut controls = Vec::new();
    let mut locals: Vec<Arc<Local>> = Vec::new();
    for region in cfg.regions.regions {
        let broker = tokio::select! {
            b = crate::connect(&region.redis, cfg.engine.clone(), ferry_broker::RedisOptions::default(), cfg.redis_tls.clone()) => b?,
            _ = shutdown.cancelled() => return Ok(()),
        };
        let actuator: Arc<dyn Actuator> = match &region.actuator {
            ActuatorConfig::Metrics(_) => Arc::new(MetricsOnly::default()),
            ActuatorConfig::Local(l) => {
                let local = Arc::new(
                    Local::new(region.clone(), l.clone())
                        .map_err(|e| CliError::Internal(e.to_string()))?,
                );
                locals.push(local.clone());
                local
            }
            ActuatorConfig::Kubernetes(k) => Arc::new(
                ferry_autoscaler::kubernetes::Kubernetes::new(region.clone(), k.clone())
                    .await
                    .map_err(|e| CliError::Unavailable(e.to_string()))?,
            ),
        };
        tracing::info!(region = %region.name, actuator = region.actuator.kind(), queues = ?region.queues, "region");
        controls.push(RegionControl::new(region, Arc::new(broker), actuator));
    }
    let registry = Arc::new(ferry_telemetry::metrics::registry());
    let metrics = ferry_autoscaler::Metrics::new(&registry)
        .map_err(|e| CliError::Internal(format!("metrics: {e}")))?;
    let autoscaler = Autoscaler::new(controls, cfg.dry_run, Some(metrics));
    let admin_stop = tokio_util::sync::CancellationToken::new();
    let admin_task = match listener {
        Some(listener) => {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, "admin listener (/metrics, /healthz, /readyz)");
            }
            let admin = ferry_autoscaler::admin::Admin {
                registry,
                last_round: autoscaler.last_round(),
                interval: cfg.interval,
            };
            Some(tokio::spawn(ferry_autoscaler::admin::serve(
                listener,
                admin,
                admin_stop.clone(),
            )))
        }
        None => None,
    };
    if cfg.dry_run {
        tracing::info!("dry run: decisions are logged, nothing is scaled");
    }
    autoscaler.run(cfg.interval, shutdown).await;
    // Workers this process started drain before it exits (their jobs finish or are released).
    for l in &locals {
        l.shutdown().await;
    }
    admin_stop.cancel();
    if let Some(t) = admin_task {
        let _ = t.await;
    }
    tracing::info!("autoscaler stopped");
    Ok(())
}
