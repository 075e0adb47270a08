//! A whole worker node: the [`Worker`], and beside it the recorder, the reconciler and the record's upkeep
//! ([`ferry_store::maintenance`]: partitions ahead, retention) when a store is given, and
//! the admin listener (`/metrics`, `/healthz`, `/readyz`, `/debug/pprof/profile`) when one is given.
//! `ferry worker` is this node under the process runner ([`ferry_telemetry::runner`]); a test runs the same node
//! in-process with a token of its own.
//!
//! [`WorkerNode::build`] checks the configuration, registers every metric in the registry it is handed and
//! connects nothing; [`WorkerNode::run`] works until the token is cancelled, then drains in order: the worker
//! first (its last outcomes are events too), then the recorder (so the drain's events are recorded) and the
//! reconciler. The admin listener is the caller's to stop after `run` returns, so `/readyz` answers 503 while the
//! node drains.
//!
//! `/readyz`: Redis must answer a ping within the budget and the worker must not be draining; the store (while a
//! recorder runs) is checked too, but jobs run without it (the event log keeps what the recorder has not
//! written), so a store that does not answer leaves the node ready and `degraded` (see
//! [`ferry_telemetry::health`]).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use ferry_broker::{Broker, Operations};
use ferry_store::Store;
use ferry_store::maintenance::{Maintainer, MaintenanceConfig};
use ferry_store::reconciler::{Reconciler, ReconcilerConfig};
use ferry_store::recorder::{Recorder, RecorderConfig};
use ferry_telemetry::admin::{Admin, Check, Readiness};
use ferry_telemetry::health::Need;
use ferry_telemetry::prometheus::Registry;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::{DrainReport, HandlerRegistry, Worker, WorkerConfig, WorkerError, WorkerMonitor};

/// Longest a readiness ping may take unless configured (`--ready-budget-ms`).
pub const DEFAULT_READY_BUDGET: Duration = Duration::from_secs(2);

/// A worker node's settings (the handlers come separately: they are code, not configuration).
#[derive(Debug, Clone)]
pub struct WorkerNodeConfig {
    pub worker: WorkerConfig,
    /// The recorder's settings (its consumer name is the worker's, filled in by [`WorkerNode::build`]); it
    /// runs when this and [`WorkerDeps::store`] are both set.
    pub recorder: Option<RecorderConfig>,
    /// The reconciler's settings (its lease holder is the worker's consumer name); runs with a store.
    pub reconciler: Option<ReconcilerConfig>,
    /// The record's upkeep; runs with a store (default settings when `None`: partitions ahead, no retention).
    pub maintenance: Option<MaintenanceConfig>,
    /// Serve `/debug/pprof/profile` on the admin listener.
    pub profiling: bool,
    /// Longest each readiness ping may take.
    pub ready_budget: Duration,
}

impl WorkerNodeConfig {
    /// A node of `worker` alone: no recorder, no reconciler, no profiling.
    pub fn new(worker: WorkerConfig) -> Self {
        Self {
            worker,
            recorder: None,
            reconciler: None,
            maintenance: None,
            profiling: false,
            ready_budget: DEFAULT_READY_BUDGET,
        }
    }
}

/// What a worker node runs on, made by the caller.
#[derive(Clone)]
pub struct WorkerDeps {
    pub broker: Arc<dyn Broker>,
    /// The durable record, for the recorder and the reconciler.
    pub store: Option<Arc<dyn Store>>,
    /// Where every metric of the node is registered (the process's one registry).
    pub registry: Registry,
}

impl std::fmt::Debug for WorkerDeps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerDeps")
            .field("store", &self.store.is_some())
            .finish_non_exhaustive()
    }
}

/// A built worker node. See the module documentation.
pub struct WorkerNode {
    worker: Worker,
    recorder: Option<Recorder>,
    reconciler: Option<Reconciler>,
    maintainer: Option<Maintainer>,
    admin: Admin,
}

impl std::fmt::Debug for WorkerNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerNode")
            .field("consumer", &self.worker.monitor().consumer())
            .field("recorder", &self.recorder.is_some())
            .field("reconciler", &self.reconciler.is_some())
            .finish_non_exhaustive()
    }
}

fn metrics_err(e: ferry_telemetry::prometheus::Error) -> WorkerError {
    WorkerError::Config {
        field: "metrics",
        message: e.to_string(),
    }
}

impl WorkerNode {
    /// Check the configuration and assemble the node; registers its metrics in `deps.registry`. Connects
    /// nothing.
    pub fn build(
        config: WorkerNodeConfig,
        handlers: HandlerRegistry,
        deps: WorkerDeps,
    ) -> Result<Self, WorkerError> {
        let WorkerDeps {
            broker,
            store,
            registry,
        } = deps;
        if let Some(rc) = &config.recorder {
            rc.check().map_err(|e| WorkerError::Config {
                field: "recorder",
                message: format!("{}: {}", e.field, e.message),
            })?;
        }
        let worker = Worker::new(broker.clone(), handlers, config.worker)?;
        worker.register_metrics(&registry).map_err(metrics_err)?;
        let consumer = worker.monitor().consumer().to_owned();
        let reconciler = match (&store, config.reconciler) {
            (Some(store), Some(mut rc)) => {
                rc.holder = consumer.clone();
                let r = Reconciler::new(broker.clone(), store.clone(), rc);
                r.register_metrics(&registry).map_err(metrics_err)?;
                Some(r)
            }
            _ => None,
        };
        let maintainer = match &store {
            Some(store) => {
                let mc = config.maintenance.unwrap_or_default();
                mc.check().map_err(|(field, message)| WorkerError::Config {
                    field: "maintenance",
                    message: format!("{field}: {message}"),
                })?;
                let m = Maintainer::new(store.clone(), mc);
                m.register_metrics(&registry).map_err(metrics_err)?;
                Some(m)
            }
            None => None,
        };
        let recorder = match (&store, config.recorder) {
            (Some(store), Some(mut rc)) => {
                rc.consumer = consumer;
                let r = Recorder::new(broker.clone(), store.clone(), rc);
                r.register_metrics(&registry).map_err(metrics_err)?;
                Some(r)
            }
            (None, _) => {
                tracing::warn!("no --database-url: job events are not recorded in PostgreSQL");
                None
            }
            (Some(_), None) => {
                tracing::info!("recorder off (--no-recorder)");
                None
            }
        };
        // The store is checked while the recorder writes to it: that is when its outage matters here.
        let readiness = WorkerReadiness {
            broker,
            store: recorder.as_ref().and(store),
            worker: worker.monitor(),
            budget: config.ready_budget,
        };
        let admin = Admin {
            registry,
            readiness: Arc::new(readiness),
            profiling: config.profiling,
            role: "worker",
            extra: None,
        };
        Ok(Self {
            worker,
            recorder,
            reconciler,
            maintainer,
            admin,
        })
    }

    /// What the node's admin listener serves (the caller binds and stops it).
    pub fn admin(&self) -> Admin {
        self.admin.clone()
    }

    pub fn monitor(&self) -> WorkerMonitor {
        self.worker.monitor()
    }

    /// Work until `shutdown`, then drain the worker, then stop the recorder and the reconciler.
    pub async fn run(self, shutdown: CancellationToken) -> Result<DrainReport, WorkerError> {
        // The reconciler stops with the signal: a pass cut short is simply run again by another node.
        let reconcile = self
            .reconciler
            .map(|r| tokio::spawn(r.run(shutdown.clone())));
        let maintain = self
            .maintainer
            .map(|m| tokio::spawn(m.run(shutdown.clone())));
        // The recorder stops after the worker has drained (its own token), so the drain's events are recorded.
        let recorder_stop = CancellationToken::new();
        let record = self
            .recorder
            .map(|r| tokio::spawn(r.run(recorder_stop.clone())));
        let report = self.worker.run(shutdown).await;
        recorder_stop.cancel();
        for task in [record, reconcile, maintain].into_iter().flatten() {
            task.await.map_err(|e| WorkerError::Task(e.to_string()))?;
        }
        report
    }
}

/// Log the jobs a node still holds when the process gives up on its drain (their leases expire and they are
/// redelivered); for [`ferry_telemetry::runner::Runner::on_deadline`].
pub fn report_held(monitor: &WorkerMonitor, deadline: Duration) {
    let running = monitor.running();
    let shown: Vec<String> = running.iter().take(20).map(|j| j.to_string()).collect();
    tracing::error!(
        deadline_ms = deadline.as_millis() as u64,
        jobs_held = running.len(),
        jobs = %shown.join(", "),
        "shutdown deadline passed: exiting with work still open; these jobs are redelivered when their \
         leases expire"
    );
}

struct WorkerReadiness {
    broker: Arc<dyn Operations>,
    store: Option<Arc<dyn Store>>,
    worker: WorkerMonitor,
    budget: Duration,
}

#[async_trait]
impl Readiness for WorkerReadiness {
    async fn checks(&self) -> Vec<Check> {
        use ferry_telemetry::health::check;
        let redis = check(self.budget, self.broker.ping());
        let store = async {
            match &self.store {
                Some(s) => Some(check(self.budget, s.ping()).await),
                None => None,
            }
        };
        let (redis, store) = tokio::join!(redis, store);
        let mut checks = vec![Check::dependency("redis", Need::Required, redis)];
        if let Some(pg) = store {
            checks.push(Check::dependency("postgres", Need::Degraded, pg));
        }
        let draining = self.worker.draining();
        checks.push(Check::state(
            "worker",
            !draining,
            json!({"ok": !draining, "error": draining.then_some("draining")}),
        ));
        checks
    }

    fn draining(&self) -> bool {
        self.worker.draining()
    }
}
