//! Values that cross the [`Broker`](crate::Broker) boundary.

use std::pin::Pin;
use std::sync::Arc;

use ferry_core::{Backoff, Event, Job, JobId, JobState, QueueName, ValidationError};
use futures::Stream;
use serde::Serialize;

/// Live events; see [`Broker::subscribe`](crate::Broker::subscribe).
pub type EventStream = Pin<Box<dyn Stream<Item = Event> + Send>>;

/// Proof that a consumer holds a job's current attempt. Every fenced call presents it; the engine applies the
/// call only if the lease is still current.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Lease {
    pub queue: QueueName,
    pub job: JobId,
    pub consumer: Arc<str>,
    /// Engine-specific fence (Redis: priority and stream entry id; memory: the lease epoch).
    pub token: String,
    /// The attempt this lease is for (1-based), with the job's retry settings, so a failure can be decided
    /// without another read.
    pub attempt: u32,
    pub max_attempts: u32,
    pub backoff: Backoff,
}

/// A job together with its lease.
#[derive(Debug, Clone)]
pub struct Leased {
    pub job: Job,
    pub lease: Lease,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Enqueued {
    pub id: JobId,
    /// `queued`, or `scheduled` for a delayed job.
    pub state: JobState,
    /// True when an idempotency key matched an earlier job: `id` is that job's.
    pub duplicate: bool,
}

#[derive(Debug, Clone)]
pub struct Completion {
    pub lease: Lease,
    pub result: serde_json::Value,
}

/// How a failed attempt should be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Use the job's backoff (exponential, full jitter).
    Backoff,
    /// Retry no sooner than this many milliseconds from now (a webhook's `Retry-After`).
    After(u64),
    /// A permanent error: dead-letter now, whatever attempts are left.
    Never,
}

impl Retry {
    /// What a failed attempt leads to, the one rule both engines apply: dead when the error is permanent or
    /// `attempt` was the last allowed, otherwise another attempt at `now` plus the backoff (or the asked) delay.
    pub fn outcome(
        self,
        attempt: u32,
        max_attempts: u32,
        backoff: &Backoff,
        now: u64,
    ) -> FailOutcome {
        let delay = match self {
            _ if attempt >= max_attempts => return FailOutcome::Dead,
            Retry::Never => return FailOutcome::Dead,
            Retry::Backoff => backoff.delay_ms(attempt),
            Retry::After(ms) => ms,
        };
        FailOutcome::Retrying {
            run_at: now.saturating_add(delay),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Failure {
    pub lease: Lease,
    pub error: String,
    pub retry: Retry,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailOutcome {
    /// Will run again at `run_at` (ms since the epoch).
    Retrying {
        run_at: u64,
    },
    Dead,
}

/// A fenced call whose lease is no longer held: the job was reclaimed after a missed heartbeat, or cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("lease no longer held")]
pub struct Rejected;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// Cancelled; the state it was in.
    Cancelled(JobState),
    /// Already completed, dead or cancelled.
    AlreadyFinal(JobState),
    NotFound,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryOutcome {
    Requeued,
    /// The job exists but is not dead.
    NotDead(JobState),
    NotFound,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reclaimed {
    pub requeued: usize,
    pub dead: usize,
}

/// A queue's figures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QueueStats {
    pub queue: QueueName,
    /// Jobs waiting to be claimed (the consumer-group lag, summed over priorities).
    pub depth: u64,
    /// Jobs leased to a worker (pending entries).
    pub active: u64,
    /// Delayed and retrying jobs not yet due.
    pub scheduled: u64,
    /// Jobs in the dead-letter list.
    pub dead: u64,
    /// Age of the oldest waiting job in milliseconds (0 when none waits).
    pub lag_ms: u64,
    pub paused: bool,
}

/// Errors of the engine itself (a job's own failure is not one).
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// The backing store did not answer; the call may be retried.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// A bug or corrupted data; not retried.
    #[error("broker internal error: {0}")]
    Internal(String),
}
