//! `ferry worker`: validate the flags into a [`WorkerConfig`] and a handler registry, connect to Redis, run the
//! worker until SIGTERM/SIGINT, drain, exit 0.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ferry_broker::EngineConfig;
use ferry_core::{Kind, QueueName};
use ferry_store::reconciler::{Reconciler, ReconcilerConfig};
use ferry_store::recorder::{Recorder, RecorderConfig};
use ferry_worker::{HandlerRegistry, WebhookConfig, Worker, WorkerConfig, WorkerError};

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
    pub worker: WorkerConfig,
    pub registry: HandlerRegistry,
    /// The durable record; the recorder runs when it is set.
    pub database: Option<crate::store::ResolvedDatabase>,
    /// The recorder's settings (its consumer name is the worker's, filled in at start).
    pub recorder: Option<RecorderConfig>,
    /// The reconciler's settings (its lease holder is the worker's consumer name); `None` when off.
    pub reconciler: Option<ReconcilerConfig>,
    /// Where the admin listener (`/metrics`, `/healthz`, `/readyz`) binds; `None` when `off`.
    pub admin_listen: Option<std::net::SocketAddr>,
    /// Whether the admin listener serves `/debug/pprof/profile` (`--profiling`).
    pub profiling: bool,
    /// Longest wait for each `/readyz` check of the admin listener.
    pub ready_budget: Duration,
    /// Longest the shutdown may take after the signal before the process exits 70, naming what it still held.
    pub shutdown_deadline: Duration,
    /// Drain and stop when the parent process goes away (`--exit-with-parent`).
    pub exit_with_parent: bool,
}

/// How long the exit at the shutdown deadline waits for the last spans to be sent.
const DEADLINE_FLUSH: Duration = Duration::from_secs(2);

/// The default shutdown deadline's room past the drain's own bounds (drain, cancel grace, outcome flush): for
/// the recorder's last batch and closing the pools.
const SHUTDOWN_MARGIN: Duration = Duration::from_secs(10);

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

/// Turn flags into configuration, naming the flag at fault. Connects to nothing.
pub fn resolve(a: WorkerArgs) -> Result<ResolvedWorker, CliError> {
    let urls = crate::check_redis_urls(&a.redis.redis)?;
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
    let engine = EngineConfig {
        visibility_timeout: ms(a.visibility_timeout_ms),
        finished_retention: ms(a.finished_retention_ms),
        ..crate::engine_config(&a.engine)?
    };
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
        WorkerError::Config { field, message } => CliError::usage(flag_of(field), message),
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
    let recorder = if a.no_recorder || database.is_none() {
        None
    } else {
        if a.recorder_batch == 0 {
            return Err(CliError::usage("--recorder-batch", "must be at least 1"));
        }
        if a.recorder_reclaim_idle_ms == 0 {
            return Err(CliError::usage(
                "--recorder-reclaim-idle-ms",
                "must be greater than zero",
            ));
        }
        let rt = &a.recorder_tuning;
        crate::at_least_one(&[
            ("--recorder-read-count", rt.recorder_read_count as u64),
            ("--recorder-writers", rt.recorder_writers as u64),
            ("--recorder-write-timeout-ms", rt.recorder_write_timeout_ms),
            (
                "--recorder-breaker-failures",
                u64::from(rt.recorder_breaker_failures),
            ),
            ("--recorder-breaker-open-ms", rt.recorder_breaker_open_ms),
        ])?;
        let mut r = RecorderConfig::new(String::new());
        r.batch_max = a.recorder_batch;
        r.max_delay = ms(a.recorder_max_delay_ms);
        r.reclaim_idle = ms(a.recorder_reclaim_idle_ms);
        r.read_count = rt.recorder_read_count;
        r.writers = rt.recorder_writers;
        r.write_timeout = ms(rt.recorder_write_timeout_ms);
        r.breaker.failure_threshold = rt.recorder_breaker_failures;
        r.breaker.open_for = ms(rt.recorder_breaker_open_ms);
        r.check()
            .map_err(|e| CliError::usage("--recorder-reclaim-idle-ms", e))?;
        Some(r)
    };
    let reconciler = (database.is_some() && a.reconcile_interval_ms > 0).then(|| {
        let mut r = ReconcilerConfig::new(String::new());
        r.interval = ms(a.reconcile_interval_ms);
        r.grace = ms(a.reconcile_grace_ms);
        r
    });
    Ok(ResolvedWorker {
        urls,
        redis_options,
        redis_tls,
        engine,
        worker,
        registry,
        database,
        recorder,
        reconciler,
        admin_listen,
        profiling: a.profiling,
        ready_budget,
        shutdown_deadline,
        exit_with_parent: a.exit_with_parent,
    })
}

/// The flag that sets a `WorkerConfig` field, for error messages.
fn flag_of(field: &str) -> &'static str {
    match field {
        "queues" => "--queues",
        "concurrency" => "--concurrency",
        "queue_concurrency" => "--queue-concurrency",
        "batch_size" => "--batch-size",
        "claim_wait" => "--claim-wait-ms",
        "default_job_timeout" => "--job-timeout-ms",
        "visibility_timeout" => "--visibility-timeout-ms",
        "heartbeat_interval" => "--heartbeat-interval-ms",
        "ack_batch_size" => "--ack-batch-size",
        "ack_max_delay" => "--ack-max-delay-ms",
        "scheduler_interval" => "--scheduler-interval-ms",
        "maintain_interval" => "--maintain-interval-ms",
        "drain_timeout" => "--drain-timeout-ms",
        "cancel_grace" => "--cancel-grace-ms",
        "flush_timeout" => "--flush-timeout-ms",
        "broker_call_timeout" => "--broker-call-timeout-ms",
        "retry_max_delay" => "--retry-max-delay-ms",
        "scheduler_batch" => "--scheduler-batch",
        "queue_metrics_interval" => "--queue-metrics-interval-ms",
        "ack_concurrency" => "--ack-concurrency",
        "consumer" => "--consumer",
        _ => "configuration",
    }
}

fn first(e: &ferry_core::ValidationError) -> String {
    e.errors
        .first()
        .map(|f| f.message.clone())
        .unwrap_or_else(|| e.to_string())
}

/// Connect, run until a signal, drain.
pub async fn run(cfg: ResolvedWorker) -> Result<(), CliError> {
    // Registered before connecting, so a SIGTERM during a slow connect is still a graceful stop.
    let shutdown =
        ferry_telemetry::shutdown_token().map_err(|e| CliError::Internal(e.to_string()))?;
    // First, so a taken address fails the start at once instead of after the connects.
    let listener = crate::bind_admin(cfg.admin_listen).await?;
    let broker = tokio::select! {
        b = crate::connect(&cfg.urls, cfg.engine.clone(), cfg.redis_options.clone(), cfg.redis_tls.clone()) => b?,
        _ = shutdown.cancelled() => return Ok(()),
    };
    let broker: Arc<dyn ferry_broker::Broker> = Arc::new(broker);
    let store = match &cfg.database {
        Some(db) => Some(tokio::select! {
            s = crate::store::connect(db) => s?,
            _ = shutdown.cancelled() => return Ok(()),
        }),
        None => None,
    };
    let worker = Worker::new(broker.clone(), cfg.registry, cfg.worker)
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let metrics = Arc::new(ferry_telemetry::metrics::registry());
    worker
        .register_metrics(&metrics)
        .map_err(|e| CliError::Internal(format!("metrics: {e}")))?;
    let mut ready_checks: Vec<(&'static str, ferry_worker::admin::ReadyCheck)> = Vec::new();
    // The reconciler stops with the signal: a pass cut short is simply run again by another node.
    let reconcile_task = match (&store, cfg.reconciler) {
        (Some(store), Some(mut rc)) => {
            rc.holder = worker.monitor().consumer().to_owned();
            let reconciler = Reconciler::new(broker.clone(), Arc::new(store.clone()), rc);
            reconciler
                .register_metrics(&metrics)
                .map_err(|e| CliError::Internal(format!("metrics: {e}")))?;
            Some(tokio::spawn(reconciler.run(shutdown.clone())))
        }
        _ => None,
    };
    // The recorder stops after the worker has drained (its own token), so the drain's events are recorded too.
    let recorder_stop = tokio_util::sync::CancellationToken::new();
    let recorder_task = match (store, cfg.recorder) {
        (Some(store), Some(mut rc)) => {
            rc.consumer = worker.monitor().consumer().to_owned();
            let store: Arc<dyn ferry_store::Store> = Arc::new(store);
            let recorder = Recorder::new(broker.clone(), store.clone(), rc);
            recorder
                .register_metrics(&metrics)
                .map_err(|e| CliError::Internal(format!("metrics: {e}")))?;
            let ping: ferry_worker::admin::ReadyCheck = Arc::new(move || {
                let store = store.clone();
                Box::pin(async move { store.ping().await.map_err(|e| e.to_string()) })
            });
            ready_checks.push(("postgres", ping));
            Some(tokio::spawn(recorder.run(recorder_stop.clone())))
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
    // A worker started by the autoscaler's local actuator drains when that parent is gone (killed, crashed):
    // it is re-parented, and its parent id changes.
    if cfg.exit_with_parent {
        let shutdown = shutdown.clone();
        let parent = std::os::unix::process::parent_id();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
                if std::os::unix::process::parent_id() != parent {
                    tracing::warn!(parent, "the parent process is gone: draining");
                    shutdown.cancel();
                    return;
                }
            }
        });
    }
    // The hard deadline: whatever hangs (a handler ignoring cancellation, a store that never answers), the
    // process ends, and says which jobs it still held (their leases expire and they are redelivered).
    {
        let shutdown = shutdown.clone();
        let monitor = worker.monitor();
        let deadline = cfg.shutdown_deadline;
        tokio::spawn(async move {
            shutdown.cancelled().await;
            tokio::time::sleep(deadline).await;
            let running = monitor.running();
            let shown: Vec<String> = running.iter().take(20).map(|j| j.to_string()).collect();
            tracing::error!(
                deadline_ms = deadline.as_millis() as u64,
                jobs_held = running.len(),
                jobs = %shown.join(", "),
                "shutdown deadline passed: exiting with work still open; these jobs are redelivered when their \
                 leases expire"
            );
            // The spans of the jobs that did finish, which the exit would otherwise lose.
            ferry_telemetry::otlp::flush(DEADLINE_FLUSH).await;
            std::process::exit(i32::from(crate::EXIT_SOFTWARE));
        });
    }
    // A second signal while draining means "now": exit without waiting for the drain.
    {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            if let Ok(again) = ferry_telemetry::shutdown_signal() {
                let sig = again.await;
                tracing::warn!(
                    signal = sig.name(),
                    "second signal: exiting without finishing the drain"
                );
                std::process::exit(i32::from(crate::EXIT_SOFTWARE));
            }
        });
    }
    // Stopped last: `/readyz` answers 503 (draining) while the worker drains.
    let admin_stop = tokio_util::sync::CancellationToken::new();
    let admin_task = listener.map(|listener| {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "admin listener (/metrics, /healthz, /readyz)");
            if cfg.profiling && !addr.ip().is_loopback() {
                tracing::warn!(%addr, "/debug/pprof/profile is served without authentication on a \
                    non-loopback address: keep the admin listener off public interfaces");
            }
        }
        let admin = ferry_worker::admin::Admin {
            registry: metrics.clone(),
            broker: broker.clone(),
            worker: worker.monitor(),
            checks: ready_checks,
            profiling: cfg.profiling,
            ready_budget: cfg.ready_budget,
        };
        tokio::spawn(ferry_worker::admin::serve(
            listener,
            admin,
            admin_stop.clone(),
        ))
    });
    let report = worker.run(shutdown).await;
    recorder_stop.cancel();
    if let Some(t) = recorder_task {
        let _ = t.await;
    }
    if let Some(t) = reconcile_task {
        let _ = t.await;
    }
    admin_stop.cancel();
    if let Some(t) = admin_task {
        let _ = t.await;
    }
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
