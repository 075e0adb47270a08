//! The scheduler and the reaper, run inside every worker with no leader: every tick, per queue, promote due
//! scheduled/retrying jobs and reclaim expired leases; now and then run the engine's housekeeping. The broker
//! makes each of these calls atomic and safe to run on many nodes at once, so the only cost of running them
//! everywhere is a few cheap calls per tick. Errors are logged and retried on the next tick; they never stop
//! the worker.

use std::sync::Arc;

use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::retry::Health;
use crate::runtime::Core;

/// A call that hits its `max` is repeated within the same tick at most this many times, so a backlog of due
/// jobs drains quickly without one queue starving the others.
const CATCH_UP_ROUNDS: usize = 10;

pub(crate) async fn run(core: Arc<Core>, shutdown: CancellationToken) {
    let cfg = &core.config;
    let mut tick = tokio::time::interval(cfg.scheduler_interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut maintain = tokio::time::interval_at(
        Instant::now() + cfg.maintain_interval,
        cfg.maintain_interval,
    );
    maintain.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut health = Health::new("scheduler");
    loop {
        let housekeeping = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => false,
            _ = maintain.tick() => true,
        };
        let mut failed = None;
        for queue in &cfg.queues {
            if housekeeping {
                if let Err(e) = call(&core, core.broker.maintain(queue)).await {
                    failed = Some(format!("maintain {queue}: {e}"));
                }
                continue;
            }
            for _ in 0..CATCH_UP_ROUNDS {
                match call(&core, core.broker.promote_due(queue, cfg.scheduler_batch)).await {
                    Ok(n) => {
                        if n > 0 {
                            tracing::debug!(queue = %queue, promoted = n, "promoted due jobs");
                        }
                        if n < cfg.scheduler_batch {
                            break;
                        }
                    }
                    Err(e) => {
                        failed = Some(format!("promote_due {queue}: {e}"));
                        break;
                    }
                }
            }
            for _ in 0..CATCH_UP_ROUNDS {
                match call(
                    &core,
                    core.broker.reclaim_expired(queue, cfg.scheduler_batch),
                )
                .await
                {
                    Ok(r) => {
                        if r.requeued + r.dead > 0 {
                            tracing::info!(queue = %queue, requeued = r.requeued, dead = r.dead, "reclaimed expired leases");
                        }
                        if r.requeued + r.dead < cfg.scheduler_batch {
                            break;
                        }
                    }
                    Err(e) => {
                        failed = Some(format!("reclaim_expired {queue}: {e}"));
                        break;
                    }
                }
            }
        }
        match failed {
            Some(e) => health.failed(&e, cfg.scheduler_interval),
            None => health.ok(),
        }
    }
}

/// One broker call under the worker's client-side time limit.
async fn call<T>(
    core: &Core,
    fut: impl std::future::Future<Output = Result<T, ferry_broker::BrokerError>>,
) -> Result<T, String> {
    match tokio::time::timeout(core.config.broker_call_timeout, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "no answer within {} ms",
            core.config.broker_call_timeout.as_millis()
        )),
    }
}
