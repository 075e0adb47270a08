//! The acker: the one task that reports outcomes to the broker. Finished jobs arrive over a bounded channel and
//! leave in batches (`complete`, `fail` and `release`, one call each per batch), so a busy worker costs the
//! broker one round trip per hundred jobs rather than one per job.
//!
//! Batches size themselves to the load: the acker takes whatever outcomes are waiting (up to `ack_batch_size`)
//! and sends them at once, with up to `ack_concurrency` calls in flight (default 2); while those are out, the next batch
//! gathers. A quiet worker therefore acknowledges each job at once, and a busy one in large batches, with no
//! timer adding latency in either case.
//!
//! A batch is kept and retried while the broker is unreachable, up to `ack_retry_timeout`; after that its jobs
//! are given up loudly and left to be redelivered when their leases expire (at-least-once). Either way the
//! batch releases everything it held: the jobs leave the in-flight map (no more heartbeats).

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use ferry_broker::{BrokerError, Completion, FailOutcome, Failure, Lease, Retry};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::handler::JobSlot;
use crate::retry::{Health, backoff};
use crate::runtime::Core;

/// A finished job on its way to the broker. Outcomes in memory are bounded by the channel's capacity plus
/// `ack_concurrency` batches in flight: a job task hands its outcome over (waiting for room if the acker is
/// behind) before it gives back its concurrency slot.
#[derive(Debug)]
pub(crate) struct Ack {
    pub(crate) op: AckOp,
    pub(crate) slot: Arc<JobSlot>,
}

#[derive(Debug)]
pub(crate) enum AckOp {
    Complete(Value),
    Fail {
        error: String,
        retry: Retry,
    },
    /// Hand the lease back without counting the attempt (drain, or claimed after shutdown began).
    Release,
}

/// Run until every sender is gone and the last batch is flushed. `abort` makes it give up at once on whatever
/// it still holds (the shutdown deadline passed).
pub(crate) async fn run(core: Arc<Core>, mut rx: mpsc::Receiver<Ack>, abort: CancellationToken) {
    let cfg = core.config.clone();
    let mut flushes = tokio::task::JoinSet::new();
    while let Some(first) = rx.recv().await {
        let mut batch = Vec::with_capacity(cfg.ack_batch_size);
        batch.push(first);
        let deadline = tokio::time::Instant::now() + cfg.ack_max_delay;
        while batch.len() < cfg.ack_batch_size {
            match rx.try_recv() {
                Ok(ack) => batch.push(ack),
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                // Nothing waiting: send now, unless an extra wait was configured.
                Err(mpsc::error::TryRecvError::Empty) if cfg.ack_max_delay.is_zero() => break,
                Err(mpsc::error::TryRecvError::Empty) => {
                    match tokio::time::timeout_at(deadline, rx.recv()).await {
                        Ok(Some(ack)) => batch.push(ack),
                        Ok(None) | Err(_) => break,
                    }
                }
            }
        }
        while flushes.len() >= cfg.ack_concurrency {
            flushes.join_next().await;
        }
        let (core, abort) = (core.clone(), abort.clone());
        flushes.spawn(async move { flush(&core, batch, &abort).await });
    }
    while flushes.join_next().await.is_some() {}
}

async fn flush(core: &Arc<Core>, batch: Vec<Ack>, abort: &CancellationToken) {
    let mut completes = Vec::new();
    let mut fails = Vec::new();
    let mut releases = Vec::new();
    for ack in batch {
        match ack.op {
            AckOp::Complete(_) => completes.push(ack),
            AckOp::Fail { .. } => fails.push(ack),
            AckOp::Release => releases.push(ack),
        }
    }
    // The three calls touch disjoint jobs, so they go out together.
    tokio::join!(
        flush_completes(core, completes, abort),
        flush_fails(core, fails, abort),
        flush_releases(core, releases, abort),
    );
}

async fn flush_completes(core: &Arc<Core>, acks: Vec<Ack>, abort: &CancellationToken) {
    if acks.is_empty() {
        return;
    }
    let items: Vec<Completion> = acks
        .iter()
        .map(|a| Completion {
            lease: a.slot.lease.clone(),
            result: match &a.op {
                AckOp::Complete(v) => v.clone(),
                _ => Value::Null,
            },
        })
        .collect();
    let outcome = with_retry(core, "complete", acks.len(), abort, || {
        core.broker.complete(items.clone())
    })
    .await;
    let draining = core.draining();
    match outcome {
        Some(results) if results.len() == acks.len() => {
            for (ack, r) in acks.iter().zip(results) {
                match r {
                    Ok(()) => {
                        core.counters.completed(draining);
                        ack.slot.metrics.completed.inc();
                    }
                    Err(_) => {
                        tracing::debug!(job = %ack.slot.lease.job, "completion rejected: lease no longer held");
                        core.counters.lost(1);
                        crate::metrics::lease_gone(core, &ack.slot.lease, &ack.slot.metrics);
                    }
                }
            }
        }
        Some(results) => mismatch(core, "complete", acks.len(), results.len()),
        None => core.counters.undelivered(acks.len()),
    }
    settle(core, acks);
}

async fn flush_fails(core: &Arc<Core>, acks: Vec<Ack>, abort: &CancellationToken) {
    if acks.is_empty() {
        return;
    }
    let items: Vec<Failure> = acks
        .iter()
        .map(|a| {
            let (error, retry) = match &a.op {
                AckOp::Fail { error, retry } => (error.clone(), *retry),
                _ => (String::new(), Retry::Backoff),
            };
            Failure {
                lease: a.slot.lease.clone(),
                error,
                retry,
            }
        })
        .collect();
    let outcome = with_retry(core, "fail", acks.len(), abort, || {
        core.broker.fail(items.clone())
    })
    .await;
    let draining = core.draining();
    match outcome {
        Some(results) if results.len() == acks.len() => {
            for ((ack, item), r) in acks.iter().zip(&items).zip(results) {
                let lease = &ack.slot.lease;
                match r {
                    Ok(FailOutcome::Retrying { run_at }) => {
                        tracing::info!(job = %lease.job, queue = %lease.queue, attempt = lease.attempt, run_at, error = %item.error, "attempt failed, will retry");
                        core.counters.failed(draining);
                        ack.slot.metrics.retried.inc();
                    }
                    Ok(FailOutcome::Dead) => {
                        tracing::warn!(job = %lease.job, queue = %lease.queue, attempt = lease.attempt, error = %item.error, "job is dead");
                        core.counters.failed(draining);
                        ack.slot.metrics.dead.inc();
                    }
                    Err(_) => {
                        tracing::debug!(job = %lease.job, "failure rejected: lease no longer held");
                        core.counters.lost(1);
                        crate::metrics::lease_gone(core, &ack.slot.lease, &ack.slot.metrics);
                    }
                }
            }
        }
        Some(results) => mismatch(core, "fail", acks.len(), results.len()),
        None => core.counters.undelivered(acks.len()),
    }
    settle(core, acks);
}

async fn flush_releases(core: &Arc<Core>, acks: Vec<Ack>, abort: &CancellationToken) {
    if acks.is_empty() {
        return;
    }
    let leases: Vec<Lease> = acks.iter().map(|a| a.slot.lease.clone()).collect();
    let outcome = with_retry(core, "release", acks.len(), abort, || {
        core.broker.release(&leases)
    })
    .await;
    match outcome {
        Some(results) if results.len() == acks.len() => {
            let released = results.iter().filter(|r| **r).count();
            for (ack, held) in acks.iter().zip(&results) {
                if !held {
                    crate::metrics::lease_gone(core, &ack.slot.lease, &ack.slot.metrics);
                }
            }
            core.counters.released(released);
            core.counters.lost(acks.len() - released);
        }
        Some(results) => mismatch(core, "release", acks.len(), results.len()),
        None => core.counters.undelivered(acks.len()),
    }
    settle(core, acks);
}

fn mismatch(core: &Core, what: &str, sent: usize, got: usize) {
    tracing::error!(
        what,
        sent,
        got,
        "broker answered a batch with the wrong number of results; its jobs will be redelivered"
    );
    core.counters.undelivered(sent);
}

/// The batch is done with, delivered or not: its jobs stop being heartbeated, and dropping each ack returns
/// its concurrency slot.
fn settle(core: &Core, acks: Vec<Ack>) {
    for ack in &acks {
        core.inflight.remove(&ack.slot.lease);
    }
    drop(acks);
}

/// Call `f` until it succeeds, the error is not worth retrying, `ack_retry_timeout` has passed, or `abort`
/// fires. `None` means the batch is given up, which is logged as an error.
async fn with_retry<T, F, Fut>(
    core: &Core,
    what: &'static str,
    jobs: usize,
    abort: &CancellationToken,
    mut f: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, BrokerError>>,
{
    let cfg = &core.config;
    let give_up_after = cfg.effective_ack_retry_timeout();
    let started = Instant::now();
    let mut delays = backoff(cfg.retry_max_delay);
    let mut health = Health::new(format!("acker {what}"));
    loop {
        if abort.is_cancelled() {
            tracing::error!(
                what,
                jobs,
                "shutdown deadline passed: giving up outcomes not yet delivered; their jobs will be redelivered when their leases expire"
            );
            return None;
        }
        let error = match tokio::time::timeout(cfg.broker_call_timeout, f()).await {
            Ok(Ok(v)) => {
                health.ok();
                return Some(v);
            }
            Ok(Err(e @ BrokerError::Unavailable(_))) => e.to_string(),
            Err(_) => format!(
                "no answer within {} ms",
                cfg.broker_call_timeout.as_millis()
            ),
            Ok(Err(e)) => {
                tracing::error!(what, jobs, error = %e, "broker refused a batch of outcomes; its jobs will be redelivered when their leases expire");
                return None;
            }
        };
        if started.elapsed() >= give_up_after {
            tracing::error!(
                what,
                jobs,
                error,
                waited_ms = started.elapsed().as_millis() as u64,
                "giving up a batch of outcomes; its jobs will be redelivered when their leases expire"
            );
            return None;
        }
        let delay = delays.next().unwrap_or(cfg.retry_max_delay);
        health.failed(&error, delay);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = abort.cancelled() => {}
        }
    }
}
