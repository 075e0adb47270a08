//! `ferry autoscaler`: load and check the regions file, connect to every region's Redis, run the control loop
//! until SIGTERM/SIGINT; local workers it started are drained before it exits.

use std::sync::Arc;
use std::time::Duration;

use ferry_autoscaler::{AutoscalerNode, RegionsFile};

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
        crate::check_redis_urls(r.urls())
            .map_err(|e| CliError::usage("--regions", format!("region {:?}: {e}", r.name)))?;
    }
    let all_urls: Vec<String> = regions
        .regions
        .iter()
        .flat_map(|r| r.urls().iter().cloned())
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

/// Longest the autoscaler's shutdown may take: the local workers it started drain first.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(120);

pub async fn run(cfg: ResolvedAutoscaler) -> Result<(), CliError> {
    let runner = crate::runner(SHUTDOWN_DEADLINE)?;
    let shutdown = runner.shutdown();
    // First, so a taken address fails the start at once instead of after connecting to every region.
    let listener = crate::bind_admin(cfg.admin_listen).await?;
    let mut regions = Vec::new();
    for region in cfg.regions.regions {
        let options = ferry_broker::RedisOptions {
            cluster_vshards: (!region.redis_cluster.is_empty()).then(|| {
                region
                    .redis_cluster_vshards
                    .unwrap_or(ferry_broker::DEFAULT_VSHARDS)
            }),
            ..Default::default()
        };
        let broker = tokio::select! {
            b = crate::connect(region.urls(), cfg.engine.clone(), options, cfg.redis_tls.clone()) => b?,
            _ = shutdown.cancelled() => return Ok(()),
        };
        regions.push((
            region,
            Arc::new(broker) as Arc<dyn ferry_broker::Operations>,
        ));
    }
    let node = AutoscalerNode::build(regions, cfg.interval, cfg.dry_run, runner.registry())
        .await
        .map_err(|e| CliError::Unavailable(e.to_string()))?;
    let admin = listener.map(|l| runner.serve_admin(l, node.admin()));
    node.run(shutdown).await;
    runner.finish(admin).await;
    Ok(())
}
