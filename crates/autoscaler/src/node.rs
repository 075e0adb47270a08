//! The autoscaler node `ferry autoscaler` runs: one [`RegionControl`] per region over the broker the caller
//! connected, the actuators the regions file names, the control loop, and what its admin listener serves
//! (`/readyz`: a complete round ended within three intervals). [`AutoscalerNode::run`] works until the token
//! is cancelled; local workers it started are drained before it returns.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use ferry_broker::Operations;
use ferry_telemetry::admin::{Admin, Check, Readiness};
use ferry_telemetry::prometheus::Registry;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::actuator::{Local, MetricsOnly};
use crate::config::{ActuatorConfig, Region};
use crate::{Actuator, ActuatorError, Autoscaler, Metrics, RegionControl};

/// A built autoscaler node.
#[derive(Debug)]
pub struct AutoscalerNode {
    autoscaler: Autoscaler,
    /// Actuators that started worker processes: drained when the node stops.
    locals: Vec<Arc<Local>>,
    interval: Duration,
    admin: Admin,
}

impl AutoscalerNode {
    /// One control per `(region, broker)`, its actuator made from the region's settings (the Kubernetes one
    /// reads its cluster configuration); metrics registered in `registry`. `dry_run` logs decisions only.
    pub async fn build(
        regions: Vec<(Region, Arc<dyn Operations>)>,
        interval: Duration,
        dry_run: bool,
        registry: Registry,
    ) -> Result<Self, ActuatorError> {
        let mut controls = Vec::new();
        let mut locals = Vec::new();
        for (region, broker) in regions {
            let actuator: Arc<dyn Actuator> = match &region.actuator {
                ActuatorConfig::Metrics(_) => Arc::new(MetricsOnly::default()),
                ActuatorConfig::Local(l) => {
                    let local = Arc::new(Local::new(region.clone(), l.clone())?);
                    locals.push(local.clone());
                    local
                }
                ActuatorConfig::Kubernetes(k) => {
                    Arc::new(crate::kubernetes::Kubernetes::new(region.clone(), k.clone()).await?)
                }
            };
            tracing::info!(region = %region.name, actuator = region.actuator.kind(), queues = ?region.queues, "region");
            controls.push(RegionControl::new(region, broker, actuator));
        }
        let metrics =
            Metrics::new(&registry).map_err(|e| ActuatorError::Failed(format!("metrics: {e}")))?;
        let autoscaler = Autoscaler::new(controls, dry_run, Some(metrics));
        let last = autoscaler.last_decisions();
        let decisions = axum::Router::new().route(
            "/decisions",
            axum::routing::get(move || {
                let last = last.lock().unwrap_or_else(|p| p.into_inner()).clone();
                async move {
                    axum::Json(last.unwrap_or_else(|| json!({"at": null, "regions": []})))
                }
            }),
        );
        let admin = Admin {
            registry,
            readiness: Arc::new(Rounds {
                last_round: autoscaler.last_round(),
                interval,
            }),
            profiling: false,
            role: "autoscaler",
            extra: Some(decisions),
        };
        Ok(Self {
            autoscaler,
            locals,
            interval,
            admin,
        })
    }

    /// What the node's admin listener serves (the caller binds and stops it).
    pub fn admin(&self) -> Admin {
        self.admin.clone()
    }

    /// Run rounds every interval until `shutdown`; then drain the local workers this node started (their jobs
    /// finish or are released).
    pub async fn run(self, shutdown: CancellationToken) {
        if self.autoscaler.dry_run {
            tracing::info!("dry run: decisions are logged, nothing is scaled");
        }
        self.autoscaler.run(self.interval, shutdown).await;
        for l in &self.locals {
            l.shutdown().await;
        }
        tracing::info!("autoscaler stopped");
    }
}

/// Ready while complete rounds keep ending: the last one within three intervals.
struct Rounds {
    last_round: Arc<Mutex<Option<Instant>>>,
    interval: Duration,
}

#[async_trait]
impl Readiness for Rounds {
    async fn checks(&self) -> Vec<Check> {
        let last = *self.last_round.lock().unwrap_or_else(|p| p.into_inner());
        let age = last.map(|t| t.elapsed());
        let ok = age.is_some_and(|a| a <= self.interval * 3);
        let report = json!({"ok": ok, "last_round_ms_ago": age.map(|a| a.as_millis() as u64)});
        vec![Check::state("rounds", ok, report)]
    }
}
