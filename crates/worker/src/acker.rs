//! The acker: the one task that reports outcomes to the broker. Finished jobs arrive over a bounded channel and
//! leave in batches (`fail` and `release` one call each per batch, completions one call per queue), so a busy
//! worker costs the broker one round trip per hundred jobs rather than one per job.
//!
//! A completion carries its job's concurrency slot, and the call that completes a queue's batch also leases up
//! to as many new jobs of that queue (`complete_and_claim`), started here in the slots just freed: a busy queue
//! costs one call per batch instead of a completion and a claim. Slots the call could not fill (nothing ready,
//! or the worker draining) go back to the queue's claim loops.
//!
//! Batches size themselves to the load: the acker takes whatever outcomes are waiting (up to `ack_batch_size`)
//! and sends them at once, with up to `ack_concurrency` calls in flight (default 2); while those are out, the next batch
//! gathers. A quiet worker therefore acknowledges each job at once, and a busy one in large batches, with no
//! timer adding latency in either case.
//!
//! A batch is kept and retried while the broker is unreachable, up to `ack_retry_timeout`; after that its jobs
//! are given up loudly and left to be redelivered when their leases expire (at-least-once). Either way the
//! batch releases everything it held: the jobs leave the in-flight map (no more heartbeats).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Weak};
use std::time::Instant;

use ferry_broker::{BrokerError, Completion, FailOutcome, Failure, Lease, Leased, Retry};
use ferry_core::QueueName;
use serde_json::Value;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio_util::sync::CancellationToken;

use crate::handler::JobSlot;
use crate::retry::{Health, backoff};
use crate::runtime::{Core, RunCtx, start_jobs};

/// A finished job on its way to the broker. Outcomes in memory are bounded by the channel's capacity plus
/// `ack_concurrency` batches in flight: a job task hands its outcome over (waiting for room if the acker is
/// behind) before it gives back its concurrency slot.
#[derive(Debug)]
pub(crate) struct Ack {
    pub(crate) op: AckOp,
    pub(crate) slot: Arc<JobSlot>,
    /// The job's concurrency slot, carried by a completion: the call that completes the job leases the next
    /// one into it (`complete_and_claim`), and the slot is freed only if nothing was leased.
    pub(crate) permit: Option<OwnedSemaphorePermit>,
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
///
/// `run` is the worker's run, held weakly (it owns the senders of `rx`): the jobs a completion call leases are
/// started in it while it lasts.
pub(crate) async fn run(
    core: Arc<Core>,
    mut rx: mpsc::Receiver<Ack>,
    abort: CancellationToken,
    run: Weak<RunCtx>,
) {
    let cfg = core.config.clone();
    let mut flushes = tokio::task::JoinSet::new();
    loop {
        // Room first, then the batch: outcomes that arrive while the calls are out wait in the channel and all
        // leave in the next batch, so batches grow with the load instead of being fixed before the wait.
        while flushes.len() >= cfg.ack_concurrency {
            flushes.join_next().await;
        }
        let Some(first) = rx.recv().await else {
            break;
        };
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
        let (core, abort, run) = (core.clone(), abort.clone(), run.clone());
        flushes.spawn(async move { flush(&core, batch, &abort, &run).await });
    }
    while flushes.join_next().await.is_some() {}
}

async fn flush(core: &Arc<Core>, batch: Vec<Ack>, abort: &CancellationToken, run: &Weak<RunCtx>) {
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
    // Completions go per queue, each call also leasing the next jobs into the slots it frees.
    let mut by_queue: BTreeMap<QueueName, Vec<Ack>> = BTreeMap::new();
    for ack in completes {
        by_queue
            .entry(ack.slot.lease.queue.clone())
            .or_default()
            .push(ack);
    }
    let completes = futures::future::join_all(
        by_queue
            .into_iter()
            .map(|(queue, acks)| flush_completes(core, queue, acks, abort, run)),
    );
    // The calls touch disjoint jobs, so they go out together.
    tokio::join!(
        completes,
        flush_fails(core, fails, abort),
        flush_releases(core, releases, abort),
    );
}

async fn flush_completes(
    core: &Arc<Core>,
    queue: QueueName,
    mut acks: Vec<Ack>,
    abort: &CancellationToken,
    run: &Weak<RunCtx>,
) {
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
    // The slots these completions free, filled again by the same call, unless the worker is draining.
    let mut permits: Vec<OwnedSemaphorePermit> =
        acks.iter_mut().filter_map(|a| a.permit.take()).collect();
    let refill = if core.draining() { 0 } else { permits.len() };
    let outcome = with_retry(core, "complete", acks.len(), abort, || {
        core.broker
            .complete_and_claim(items.clone(), &queue, &core.consumer, refill)
    })
    .await;
    let draining = core.draining();
    let leased = match outcome {
        Some((results, leased)) if results.len() == acks.len() => {
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
            leased
        }
        Some((results, leased)) => {
            mismatch(core, "complete", acks.len(), results.len());
            leased
        }
        None => {
            core.counters.undelivered(acks.len());
            Vec::new()
        }
    };
    settle(core, acks);
    if !leased.is_empty() {
        start_leased(core, &queue, leased, &mut permits, run).await;
    }
    // Slots left unfilled go back to the queue's claim loops.
    drop(permits);
}

/// Start the jobs a completion call leased, in the slots it freed; hand back (uncharged) any the worker cannot
/// start because it is stopping.
async fn start_leased(
    core: &Arc<Core>,
    queue: &QueueName,
    leased: Vec<Leased>,
    permits: &mut Vec<OwnedSemaphorePermit>,
    run: &Weak<RunCtx>,
) {
    let stopped = match run.upgrade() {
        Some(run) => start_jobs(&run, queue, leased, permits).await,
        None => leased,
    };
    if stopped.is_empty() {
        return;
    }
    // Released here rather than through the acker's own channel, which this flush must not wait on.
    let leases: Vec<Lease> = stopped.into_iter().map(|l| l.lease).collect();
    match tokio::time::timeout(
        core.config.broker_call_timeout,
        core.broker.release(&leases),
    )
    .await
    {
        Ok(Ok(held)) => core.counters.released(held.iter().filter(|h| **h).count()),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, jobs = leases.len(), "releasing jobs leased as shutdown began failed; they will be reclaimed")
        }
        Err(_) => {
            tracing::warn!(
                jobs = leases.len(),
                "releasing jobs leased as shutdown began timed out; they will be reclaimed"
            )
        }
    }
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
