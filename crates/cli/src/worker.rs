//! `ferry worker`: validate the flags into a [`WorkerConfig`] and a handler registry, connect to Redis, run the
//! worker until SIGTERM/SIGINT, drain, exit 0.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ferry_broker::EngineConfig;
use ferry_core::{Kind, QueueName};
use ferry_store::maintenance::MaintenanceConfig;
use ferry_store::reconciler::ReconcilerConfig;
use ferry_store::recorder::RecorderConfig;
use ferry_worker::{
    HandlerRegistry, WebhookConfig, WorkerConfig, WorkerDeps, WorkerError, WorkerNode,
    WorkerNodeConfig,
};

use crate::CliError;
use crate::args::WorkerArgs;

/// Everything `ferry worker` needs, validated.
#[derive(Debug)]
pub struct ResolvedWorker {
    pub urls: Vec<String>,
    /// The Redis client's timeouts.
    pub redis_options: ferry_broker::RedisOptions,
    pub redis_tls: ferry_broker::RedisTls,
    pub engine: EngineConfig,
    /// The node: worker, recorder and reconciler settings, profiling, readiness budget.
    pub node: WorkerNodeConfig,
    pub handlers: HandlerRegistry,
    /// The durable record; the recorder and the reconciler run when it is set.
    pub database: Option<crate::store::ResolvedDatabase>,
    /// Where the admin listener (`/metrics`, `/healthz`, `/readyz`) binds; `None` when `off`.
    pub admin_listen: Option<std::net::SocketAddr>,
    /// Longest the shutdown may take after the signal before the process exits 70, naming what it still held.
    pub shutdown_deadline: Duration,
    /// Drain and stop when the parent process goes away (`--exit-with-parent`).
    pub exit_with_parent: bool,
}

/// The default shutdown deadline's room past the drain's own bounds (drain, cancel grace, outcome flush): for
/// the recorder's last batch and closing the pools.
const SHUTDOWN_MARGIN: Duration = Duration::from_secs(10);

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

/// Turn flags into configuration, naming the flag at fault. Connects to nothing.
pub fn resolve(a: WorkerArgs) -> Result<ResolvedWorker, CliError> {
    let urls = crate::redis_urls(&a.redis)?;
    let redis_options = crate::redis_options(&a.redis)?;
    let redis_tls = crate::redis_tls(&urls, a.redis.redis_ca_file.as_deref())?;
    let queues = a
        .queues
        .iter()
        .map(|q| q.trim())
        .filter(|q| !q.is_empty())
        .map(|q| QueueName::parse(q).map_err(|e| CliError::usage("--queues", first(&e))))
        .collect::<Result<Vec<_>, _>>()?;
    if queues.is_empty() {
        return Err(CliError::usage("--queues", "name at least one queue"));
    }
    let mut queue_concurrency = HashMap::new();
    for item in a.queue_concurrency.iter().filter(|s| !s.trim().is_empty()) {
        let bad = || {
            CliError::usage(
                "--queue-concurrency",
                format!("expected QUEUE=N, got {item:?}"),
            )
        };
        let (q, n) = item.split_once('=').ok_or_else(bad)?;
        let q = QueueName::parse(q.trim())
            .map_err(|e| CliError::usage("--queue-concurrency", first(&e)))?;
        let n: usize = n.trim().parse().map_err(|_| bad())?;
        if !queues.contains(&q) {
            return Err(CliError::usage(
                "--queue-concurrency",
                format!("{q} is not one of --queues"),
            ));
        }
        queue_concurrency.insert(q, n);
    }
    if a.visibility_timeout_ms == 0 {
        return Err(CliError::usage(
            "--visibility-timeout-ms",
            "must be greater than zero",
        ));
    }
    let t = &a.tuning;
    crate::at_least_one(&[
        ("--ready-budget-ms", t.ready_budget_ms),
        (
            "--ack-retry-timeout-ms",
            t.ack_retry_timeout_ms.unwrap_or(1),
        ),
    ])?;
    let worker = WorkerConfig {
        queues,
        concurrency: a.concurrency,
        queue_concurrency,
        batch_size: a.batch_size,
        claim_wait: ms(a.claim_wait_ms),
        default_job_timeout: ms(a.job_timeout_ms),
        visibility_timeout: ms(a.visibility_timeout_ms),
        heartbeat_interval: a.heartbeat_interval_ms.map(ms),
        ack_batch_size: a.ack_batch_size,
        ack_max_delay: ms(a.ack_max_delay_ms),
        ack_concurrency: a.ack_concurrency,
        scheduler_interval: ms(a.scheduler_interval_ms),
        maintain_interval: ms(a.maintain_interval_ms),
        drain_timeout: ms(a.drain_timeout_ms),
        cancel_grace: ms(t.cancel_grace_ms),
        flush_timeout: ms(t.flush_timeout_ms),
        broker_call_timeout: ms(t.broker_call_timeout_ms),
        retry_max_delay: ms(t.retry_max_delay_ms),
        ack_retry_timeout: t.ack_retry_timeout_ms.map(ms),
        scheduler_batch: t.scheduler_batch,
        queue_metrics_interval: ms(t.queue_metrics_interval_ms),
        consumer: a.consumer,
        ..WorkerConfig::default()
    };
    worker.validate().map_err(|e| match e {
        WorkerError::Config { field, message } => {
            CliError::usage(&crate::flag_of("worker", field), message)
        }
        other => CliError::Usage(other.to_string()),
    })?;

    // Past the drain's own bounds, with room for the recorder's last batch and closing the pools.
    let shutdown_deadline = match t.shutdown_deadline_ms.map(ms) {
        Some(d) => {
            let floor = worker.drain_timeout + worker.cancel_grace + worker.flush_timeout;
            if d <= floor {
                return Err(CliError::usage(
                    "--shutdown-deadline-ms",
                    format!(
                        "must exceed --drain-timeout-ms + --cancel-grace-ms + --flush-timeout-ms ({} ms)",
                        floor.as_millis()
                    ),
                ));
            }
            d
        }
        None => worker.drain_timeout + worker.cancel_grace + worker.flush_timeout + SHUTDOWN_MARGIN,
    };
    let ready_budget = ms(t.ready_budget_ms);

    let mut headers = Vec::new();
    for h in &a.webhook_header {
        let (name, value) = h
            .split_once(':')
            .ok_or_else(|| CliError::usage("--webhook-header", "expected \"Name: value\""))?;
        headers.push((name.trim().to_owned(), value.trim().to_owned()));
    }
    if a.webhook_timeout_ms == 0 {
        return Err(CliError::usage(
            "--webhook-timeout-ms",
            "must be greater than zero",
        ));
    }
    let mut registry = HandlerRegistry::with_builtins();
    for item in a.webhook.iter().filter(|s| !s.trim().is_empty()) {
        let (kind, url) = item.split_once('=').ok_or_else(|| {
            CliError::usage("--webhook", format!("expected KIND=URL, got {item:?}"))
        })?;
        let kind = Kind::parse(kind.trim()).map_err(|e| CliError::usage("--webhook", first(&e)))?;
        let config = WebhookConfig {
            url: url.trim().to_owned(),
            timeout: ms(a.webhook_timeout_ms),
            headers: headers.clone(),
        };
        registry
            .register_webhook(kind, config)
            .map_err(|e| CliError::usage("--webhook", e))?;
    }
    let admin_listen = crate::admin_listen(&a.admin_listen)?;
    let database = crate::store::resolve(a.database)?;
    // With the record, finished jobs leave Redis as soon as the recorder has committed them: the gateways'
    // lookups find them in the store.
    let engine = EngineConfig {
        visibility_timeout: ms(a.visibility_timeout_ms),
        finished_retention: ms(a.finished_retention_ms),
        drop_recorded: database.is_some(),
        ..crate::engine_config(&a.engine)?
    };
    let recorder = if a.no_recorder || database.is_none() {
        None
    } else {
        let rt = &a.recorder_tuning;
        let mut r = RecorderConfig::new(String::new());
        r.batch_max = a.recorder_batch;
        r.batch_max_bytes = a.recorder_batch_bytes;
        r.max_delay = ms(a.recorder_max_delay_ms);
        r.reclaim_idle = ms(a.recorder_reclaim_idle_ms);
        r.read_count = rt.recorder_read_count;
        r.writers = rt.recorder_writers;
        r.write_timeout = ms(rt.recorder_write_timeout_ms);
        r.breaker.failure_threshold = rt.recorder_breaker_failures;
        r.breaker.open_for = ms(rt.recorder_breaker_open_ms);
        r.check()
            .map_err(|e| CliError::usage(recorder_flag(e.field), e.message))?;
        Some(r)
    };
    let reconciler = (database.is_some() && a.reconcile_interval_ms > 0).then(|| {
        let mut r = ReconcilerConfig::new(String::new());
        r.interval = ms(a.reconcile_interval_ms);
        r.grace = ms(a.reconcile_grace_ms);
        r
    });
    let maintenance = MaintenanceConfig {
        retention: a
            .record_retention
            .as_deref()
            .map(|r| crate::token::parse_duration("--record-retention", r))
            .transpose()?,
        width: crate::token::parse_duration("--record-partition-width", &a.record_partition_width)?,
        ..MaintenanceConfig::default()
    };
    maintenance.check().map_err(|(field, message)| {
        let flag = match field {
            "retention" => "--record-retention",
            "width" => "--record-partition-width",
            _ => "configuration",
        };
        CliError::usage(flag, message)
    })?;
    Ok(ResolvedWorker {
        urls,
        redis_options,
        redis_tls,
        engine,
        node: WorkerNodeConfig {
            worker,
            recorder,
            reconciler,
            maintenance: Some(maintenance),
            profiling: a.profiling,
            ready_budget,
        },
        handlers: registry,
        database,
        admin_listen,
        shutdown_deadline,
        exit_with_parent: a.exit_with_parent,
    })
}

/// The flag of a field [`RecorderConfig::check`] names.
pub(crate) fn recorder_flag(field: &str) -> &'static str {
    match field {
        "batch_max" => "--recorder-batch",
        "batch_max_bytes" => "--recorder-batch-bytes",
        "max_delay" => "--recorder-max-delay-ms",
        "read_count" => "--recorder-read-count",
        "writers" => "--recorder-writers",
        "write_timeout" => "--recorder-write-timeout-ms",
        "breaker.failure_threshold" => "--recorder-breaker-failures",
        "breaker.open_for" => "--recorder-breaker-open-ms",
        "reclaim_idle" => "--recorder-reclaim-idle-ms",
        _ => "configuration",
    }
}

fn first(e: &ferry_core::ValidationError) -> String {
    e.errors
        .first()
        .map(|f| f.message.clone())
        .unwrap_or_else(|| e.to_string())
}

/// Connect, run the node until a signal, drain.
pub async fn run(cfg: ResolvedWorker) -> Result<(), CliError> {
    let runner = crate::runner(cfg.shutdown_deadline)?;
    if cfg.exit_with_parent {
        runner.exit_with_parent();
    }
    let shutdown = runner.shutdown();
    // First, so a taken address fails the start at once instead of after the connects.
    let listener = crate::bind_admin(cfg.admin_listen).await?;
    let connect = async {
        let broker =
            crate::connect(&cfg.urls, cfg.engine, cfg.redis_options, cfg.redis_tls).await?;
        let store: Option<Arc<dyn ferry_store::Store>> = match &cfg.database {
            Some(db) => Some(Arc::new(crate::store::connect(db).await?)),
            None => None,
        };
        Ok::<_, CliError>((Arc::new(broker) as Arc<dyn ferry_broker::Broker>, store))
    };
    let (broker, store) = tokio::select! {
        c = connect => c?,
        _ = shutdown.cancelled() => return Ok(()),
    };
    let registry = runner.registry();
    let deps = WorkerDeps {
        broker,
        store,
        registry,
    };
    let node = WorkerNode::build(cfg.node, cfg.handlers, deps)
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let monitor = node.monitor();
    runner.on_deadline(move |deadline| ferry_worker::node::report_held(&monitor, deadline));
    let admin = listener.map(|l| runner.serve_admin(l, node.admin()));
    let report = node.run(shutdown).await;
    runner.finish(admin).await;
    let report = report.map_err(|e| CliError::Internal(e.to_string()))?;
    tracing::info!(
        completed = report.completed_during_drain,
        failed = report.failed_during_drain,
        released = report.released,
        undelivered = report.undelivered,
        timed_out = report.timed_out,
        "drained"
    );
    Ok(())
}
