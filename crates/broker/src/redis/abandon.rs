//! Claim calls given up before their reply was read, and the task that abandons them on their shard.
//!
//! A claim's caller that stops waiting (its reply timed out, its connection died, it dropped the call) cannot
//! know whether the script ran: after a partition, the request may still sit in a socket's buffers and run when
//! the link heals. Left alone, such a claim leases jobs to a worker that is not waiting for them: each job stays
//! leased a whole visibility timeout and its attempt is charged (a job on its last attempt would go dead without
//! running). So every such call is queued here, and `abandon.lua` runs for it as soon as the shard answers: it
//! hands back what the claim leased, without charging the attempt, and marks the claim so that a request still
//! on the way takes nothing when it arrives. The two scripts are atomic, so whichever runs first, no job stays
//! leased to nobody; see `lua/complete_claim.lua` and `lua/abandon.lua`.
//!
//! One task per shard at most, running only while something is queued; it never blocks a caller.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ferry_core::QueueName;
use tokio::time::Instant;

use super::conn::Conn;
use super::keys::Layout;
use super::scripts::{Abandon, Loaded, Scripts};

/// How long an abandoned claim's mark is kept: longer than a request can sit in a live TCP connection's buffers
/// (Linux gives up retransmitting after about 15 minutes with the default `tcp_retries2`).
const MARK_TTL: Duration = Duration::from_secs(3600);

/// How long the task keeps trying to reach the shard for one abandoned claim. Past the visibility timeout the
/// reaper has requeued any job the claim leased (charged); the mark still protects against a late request, so
/// the task keeps at it while such a request could still arrive on a connection that is retransmitting.
const RETRY_FOR: Duration = Duration::from_secs(15 * 60);

/// Most abandoned claims queued per shard; beyond it the oldest are dropped (their jobs, if any, come back after
/// the visibility timeout), so an outage that lasts cannot grow this without bound.
const MAX_PENDING: usize = 10_000;

/// One limit per script call of the task, over the connection's own response timeout and reconnects.
const CALL_LIMIT: Duration = Duration::from_secs(10);

/// A claim call given up by its caller.
#[derive(Debug)]
pub(super) struct Abandoned {
    pub queue: QueueName,
    /// The call's key (`QueueKeys::claim`).
    pub claim_key: String,
    /// The claiming consumer, as the scripts' actor argument (named by the `job.queued` events).
    pub actor: String,
}

/// The abandoned claims of one shard.
pub(super) struct Abandons {
    name: String,
    conn: Conn,
    /// The names of the shard's keys.
    layout: Layout,
    scripts: Arc<Scripts>,
    evmax: usize,
    /// A std mutex: only pushed to and swapped out, never held across an await.
    pending: Mutex<Vec<(Abandoned, Instant)>>,
    /// A task is draining `pending`.
    running: AtomicBool,
}

impl Abandons {
    pub(super) fn new(
        name: String,
        conn: Conn,
        layout: Layout,
        scripts: Arc<Scripts>,
        evmax: usize,
    ) -> Arc<Self> {
        Arc::new(Self {
            name,
            conn,
            layout,
            scripts,
            evmax,
            pending: Mutex::new(Vec::new()),
            running: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Abandoned, Instant)>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queue a claim for abandoning; called from a drop, so it never waits.
    pub(super) fn push(self: &Arc<Self>, item: Abandoned) {
        {
            let mut pending = self.lock();
            if pending.len() >= MAX_PENDING {
                pending.remove(0);
                tracing::warn!(shard = %self.name, "too many abandoned claims queued; dropping the oldest (its jobs, if any, come back after the visibility timeout)");
            }
            pending.push((item, Instant::now() + RETRY_FOR));
        }
        if self.running.swap(true, Ordering::AcqRel) {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(self.clone().drain());
            }
            Err(_) => {
                // Outside a runtime (a broker dropped at process exit): the leases expire as before.
                self.running.store(false, Ordering::Release);
            }
        }
    }

    /// Abandon everything queued, retrying while the shard does not answer; ends when nothing is left.
    async fn drain(self: Arc<Self>) {
        let mut delay = Duration::from_millis(50);
        loop {
            let batch = std::mem::take(&mut *self.lock());
            if batch.is_empty() {
                self.running.store(false, Ordering::Release);
                // A push between the take and the store saw `running` set and spawned nothing: look again.
                if self.lock().is_empty() || self.running.swap(true, Ordering::AcqRel) {
                    return;
                }
                continue;
            }
            let mut left = Vec::new();
            let mut failed = false;
            for (item, until) in batch {
                if failed {
                    // The shard did not answer a moment ago: keep the rest for the next round.
                    left.push((item, until));
                    continue;
                }
                match self.abandon(&item).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(
                        shard = %self.name,
                        queue = %item.queue,
                        jobs = n,
                        "a claim given up by its caller had leased jobs; handed them back without charging the attempt"
                    ),
                    Err(e) if Instant::now() < until => {
                        tracing::debug!(shard = %self.name, error = %e, "abandoning a claim failed; retrying");
                        failed = true;
                        left.push((item, until));
                    }
                    Err(e) => tracing::warn!(
                        shard = %self.name,
                        queue = %item.queue,
                        error = %e,
                        "gave up abandoning a claim; any job it leased comes back after the visibility timeout"
                    ),
                }
            }
            if left.is_empty() {
                delay = Duration::from_millis(50);
                continue;
            }
            self.lock().splice(0..0, left);
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }

    async fn abandon(&self, item: &Abandoned) -> Result<i64, String> {
        let keys = self.layout.queue(&item.queue);
        let inv = Abandon {
            streams: &keys.streams,
            jobs_key: &keys.jobs,
            events_key: self.layout.events(),
            claim_key: &item.claim_key,
            evmax: self.evmax,
            mark_ttl_ms: MARK_TTL.as_millis() as u64,
            actor: &item.actor,
        }
        .invoke(&self.scripts);
        let mut conn = self.conn.clone();
        match tokio::time::timeout(CALL_LIMIT, inv.invoke_async::<i64>(&mut conn)).await {
            Ok(Ok(n)) => Ok(n),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {} ms", CALL_LIMIT.as_millis())),
        }
    }
}
