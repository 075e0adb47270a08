//! Group commit of single-job enqueues: concurrent `enqueue` calls for the same queue share one script call.
//!
//! One call per queue is in flight at a time, made by a task of its own. The first caller of an idle queue
//! starts that task with its own job at once: nothing added, no timer. Callers arriving while the call is out
//! wait in the queue's lane; when it returns, the task answers each job of the call and takes everything waiting
//! (up to [`MAX_BATCH`]) as the next call, until the lane is empty. So a request never waits longer than one
//! call already in flight, a lone request goes out alone, and under load the batches grow by themselves: Redis
//! pays one round trip and one script call per batch instead of per job.
//!
//! The calls run in the task, not in any caller, so a caller that stops waiting (a client that hung up) cancels
//! nothing: its job goes out with the others and only its answer is dropped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ferry_core::{NewJob, QueueName};
use tokio::sync::oneshot;

use super::{EnqueueCall, EnqueueReply};
use crate::BrokerError;

/// Most jobs one coalesced call carries.
pub(super) const MAX_BATCH: usize = 256;

type Answer = Result<EnqueueReply, BrokerError>;

/// A job waiting for its call, with where its answer goes.
struct Waiter {
    job: NewJob,
    tx: oneshot::Sender<Answer>,
}

/// The lanes of every queue with a call in flight (a queue without one has no entry).
#[derive(Default)]
pub(super) struct Coalescer {
    lanes: Mutex<HashMap<QueueName, Vec<Waiter>>>,
}

impl std::fmt::Debug for Coalescer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coalescer").finish_non_exhaustive()
    }
}

impl Coalescer {
    fn lanes(&self) -> std::sync::MutexGuard<'_, HashMap<QueueName, Vec<Waiter>>> {
        self.lanes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Enqueue `job` on `queue` in one call with whatever else is submitted to it meanwhile. `call` makes the
    /// queue's calls; it is asked for only when this job starts the queue's task.
    pub(super) async fn enqueue(
        self: &Arc<Self>,
        queue: &QueueName,
        job: NewJob,
        call: impl FnOnce() -> EnqueueCall,
    ) -> Answer {
        let (tx, rx) = oneshot::channel();
        let waiter = Waiter { job, tx };
        let start = {
            let mut lanes = self.lanes();
            match lanes.get_mut(queue) {
                Some(waiting) => {
                    waiting.push(waiter);
                    None
                }
                None => {
                    lanes.insert(queue.clone(), Vec::new());
                    Some(waiter)
                }
            }
        };
        if let Some(first) = start {
            tokio::spawn(self.clone().drain(call(), vec![first]));
        }
        rx.await.map_err(|_| {
            BrokerError::Internal("the enqueue task of this queue stopped without answering".into())
        })?
    }

    /// The queue's task: one call per batch until nobody waits.
    async fn drain(self: Arc<Self>, call: EnqueueCall, mut batch: Vec<Waiter>) {
        // Should the task unwind, the lane is freed (and its waiters answered with an error by their dropped
        // senders) rather than left taken forever.
        let _free = Free {
            coalescer: &self,
            queue: &call.queue,
        };
        loop {
            let n = batch.len();
            let (jobs, txs): (Vec<NewJob>, Vec<_>) =
                batch.into_iter().map(|w| (w.job, w.tx)).unzip();
            match call.run(jobs).await {
                Ok(replies) if replies.len() == n => {
                    for (tx, r) in txs.into_iter().zip(replies) {
                        let _ = tx.send(Ok(r));
                    }
                }
                Ok(replies) => {
                    for tx in txs {
                        let _ = tx.send(Err(BrokerError::Internal(format!(
                            "enqueue answered {} jobs of {n}",
                            replies.len()
                        ))));
                    }
                }
                Err(e) => {
                    for tx in txs {
                        let _ = tx.send(Err(e.clone()));
                    }
                }
            }
            let mut lanes = self.lanes();
            let Some(waiting) = lanes.get_mut(&call.queue) else {
                return;
            };
            if waiting.is_empty() {
                lanes.remove(&call.queue);
                return;
            }
            let take = waiting.len().min(MAX_BATCH);
            batch = waiting.drain(..take).collect();
        }
    }
}

/// Frees a queue's lane when its task ends without doing so (it unwound).
struct Free<'a> {
    coalescer: &'a Coalescer,
    queue: &'a QueueName,
}

impl Drop for Free<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.coalescer.lanes().remove(self.queue);
        }
    }
}
