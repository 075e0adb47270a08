//! `ferry enqueue`: validate one job, connect, submit it (or `--count` copies, in batches of up to 500), print
//! the ids or a summary line.

use std::io::Write;
use std::time::Instant;

use ferry_broker::{BrokerError, EngineConfig, Jobs};
use ferry_core::{Kind, Limits, NewJob, Priority, QueueName};

use crate::CliError;
use crate::args::{EnqueueArgs, PriorityArg};

/// Jobs per `enqueue_batch` call: large enough to amortise the round trip, small enough that one call never
/// holds Redis for long.
pub const BATCH: usize = 500;

/// A validated `ferry enqueue`.
#[derive(Debug)]
pub struct ResolvedEnqueue {
    pub urls: Vec<String>,
    /// The Redis client's timeouts.
    pub redis_options: ferry_broker::RedisOptions,
    pub redis_tls: ferry_broker::RedisTls,
    pub queue: QueueName,
    pub job: NewJob,
    /// `Some` when `--count` was given: print a summary instead of ids.
    pub count: Option<u64>,
}

pub fn resolve(a: EnqueueArgs) -> Result<ResolvedEnqueue, CliError> {
    let urls = crate::redis_urls(&a.redis)?;
    let redis_options = crate::redis_options(&a.redis)?;
    let redis_tls = crate::redis_tls(&urls, a.redis.redis_ca_file.as_deref())?;
    let queue = QueueName::parse(a.queue.trim())
        .map_err(|e| CliError::usage("--queue", &e.errors[0].message))?;
    let kind =
        Kind::parse(a.kind.trim()).map_err(|e| CliError::usage("--kind", &e.errors[0].message))?;
    let payload: serde_json::Value = serde_json::from_str(&a.payload)
        .map_err(|e| CliError::usage("--payload", format!("expected JSON: {e}")))?;
    if a.count == Some(0) {
        return Err(CliError::usage("--count", "must be at least 1"));
    }
    if a.count.is_some_and(|n| n > 1) && a.idempotency_key.is_some() {
        return Err(CliError::usage(
            "--idempotency-key",
            "cannot be combined with --count above 1 (every copy would be the same job)",
        ));
    }
    let mut job = NewJob::new(kind, payload);
    job.priority = match a.priority {
        PriorityArg::High => Priority::High,
        PriorityArg::Normal => Priority::Normal,
        PriorityArg::Low => Priority::Low,
    };
    job.delay_ms = a.delay_ms;
    job.max_attempts = a.max_attempts;
    job.timeout_ms = a.timeout_ms;
    job.idempotency_key = a.idempotency_key;
    job.validate(&Limits::default()).map_err(|e| {
        let f = &e.errors[0];
        // `NewJob`'s fields are named as `ferry enqueue`'s flags are.
        CliError::usage(&crate::flag_of("enqueue", &f.field), &f.message)
    })?;
    Ok(ResolvedEnqueue {
        urls,
        redis_options,
        redis_tls,
        queue,
        job,
        count: a.count,
    })
}

pub async fn run(cfg: ResolvedEnqueue) -> Result<(), CliError> {
    let broker = crate::connect(
        &cfg.urls,
        EngineConfig::default(),
        cfg.redis_options.clone(),
        cfg.redis_tls.clone(),
    )
    .await?;
    let total = cfg.count.unwrap_or(1);
    let started = Instant::now();
    let mut sent: u64 = 0;
    let mut duplicates: u64 = 0;
    let stdout = std::io::stdout();
    while sent < total {
        let n = (total - sent).min(BATCH as u64) as usize;
        let jobs = vec![cfg.job.clone(); n];
        let done = broker
            .enqueue_batch(&cfg.queue, jobs)
            .await
            .map_err(|e| match e {
                BrokerError::Unavailable(_) => CliError::Unavailable(format!(
                    "enqueued {sent} of {total} jobs before redis became unreachable: {e}"
                )),
                BrokerError::Invalid(v) => CliError::Usage(format!("invalid job: {v}")),
                BrokerError::Internal(_) => CliError::Internal(e.to_string()),
            })?;
        sent += done.len() as u64;
        duplicates += done.iter().filter(|d| d.duplicate).count() as u64;
        if cfg.count.is_none() {
            let mut out = stdout.lock();
            for d in &done {
                // stdout closed early (`| head`) is not an error worth a message.
                let _ = writeln!(out, "{}", d.id);
            }
        }
    }
    if cfg.count.is_some() {
        let secs = started.elapsed().as_secs_f64();
        println!(
            "enqueued {sent} jobs to queue {} in {:.0} ms ({:.0} jobs/s)",
            cfg.queue,
            secs * 1000.0,
            sent as f64 / secs.max(1e-9)
        );
    } else if duplicates > 0 {
        eprintln!("ferry: idempotency key already used: printed the existing job's id");
    }
    Ok(())
}
