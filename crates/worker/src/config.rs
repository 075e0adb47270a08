//! The worker's settings, their defaults and the rules they must satisfy. Validated once, in
//! [`Worker::new`](crate::Worker::new), so the runtime never meets a zero batch size or a heartbeat slower than
//! the visibility timeout.

use std::collections::HashMap;
use std::time::Duration;

use ferry_core::QueueName;

use crate::WorkerError;

/// Worker settings. Every field has a default (see [`Default`]) except `queues`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerConfig {
    /// Queues to take jobs from (required).
    pub queues: Vec<QueueName>,
    /// Most jobs of one queue running at once in this worker (default 10). A job holds its slot from claim
    /// until its outcome is acknowledged by the broker, so this also bounds outcomes waiting to be sent.
    pub concurrency: usize,
    /// Per-queue overrides of `concurrency`.
    pub queue_concurrency: HashMap<QueueName, usize>,
    /// Most jobs claimed in one broker call (default 10, as in the original application). Never more than the
    /// free slots.
    pub batch_size: usize,
    /// How long one claim call may wait for work (default 1 s). Bounded so that shutdown stays prompt.
    pub claim_wait: Duration,
    /// Time limit of an attempt whose job sets no `timeout_ms` (default 30 s). A timed-out attempt is a
    /// retryable failure.
    pub default_job_timeout: Duration,
    /// The engine's visibility timeout (default 30 s): must match the broker's `EngineConfig`, since the worker
    /// heartbeats and gives up undeliverable outcomes relative to it.
    pub visibility_timeout: Duration,
    /// How often every in-flight lease is heartbeated, in one batched call. Default: a third of
    /// `visibility_timeout`, so two heartbeats can fail before a lease expires.
    pub heartbeat_interval: Option<Duration>,
    /// Outcomes sent to the broker in one call (default 100).
    pub ack_batch_size: usize,
    /// Extra time an outcome may wait for its batch to fill (default 0: send whatever is waiting; batches grow
    /// by themselves while earlier calls are in flight).
    pub ack_max_delay: Duration,
    /// Acknowledgement calls in flight at once (default 2): more overlap round trips, fewer make larger
    /// batches (fewer Redis wake-ups per job).
    pub ack_concurrency: usize,
    /// How long a batch of outcomes is retried while the broker is unreachable before it is given up (its jobs
    /// are then redelivered once their leases expire). Default: `visibility_timeout`, after which the leases
    /// are gone and the broker would reject the outcomes anyway.
    pub ack_retry_timeout: Option<Duration>,
    /// How often due scheduled/retrying jobs are promoted and expired leases reclaimed (default 250 ms).
    pub scheduler_interval: Duration,
    /// Most jobs promoted or reclaimed per queue in one call (default 1000).
    pub scheduler_batch: usize,
    /// How often `maintain` (stream trimming, retention) runs per queue (default 5 s).
    pub maintain_interval: Duration,
    /// Run the scheduler and reaper loops in this worker (default true). They are leader-free and safe on every
    /// node; turning them off only makes sense when another process runs them.
    pub run_scheduler: bool,
    /// On shutdown, how long in-flight jobs may run to completion (default 30 s) before they are cancelled and
    /// their leases released.
    pub drain_timeout: Duration,
    /// How long a cancelled handler gets to return before it is dropped (default 1 s).
    pub cancel_grace: Duration,
    /// After the drain, how long outcomes still unsent may be retried (default 5 s).
    pub flush_timeout: Duration,
    /// Client-side limit of one broker call (default 10 s), so a hung connection cannot stall a loop.
    pub broker_call_timeout: Duration,
    /// Cap of the exponential backoff between retries of a failing broker call (default 2 s).
    pub retry_max_delay: Duration,
    /// Consumer name in the broker. Default: `<hostname>-<pid>-<random>`, unique per process.
    pub consumer: Option<String>,
    /// How often the queue gauges (`ferry_queue_*`) are refreshed from the broker when metrics are registered
    /// (default 5 s).
    pub queue_metrics_interval: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            queues: Vec::new(),
            concurrency: 10,
            queue_concurrency: HashMap::new(),
            batch_size: 10,
            claim_wait: Duration::from_secs(1),
            default_job_timeout: Duration::from_secs(30),
            visibility_timeout: Duration::from_secs(30),
            heartbeat_interval: None,
            ack_batch_size: 100,
            ack_max_delay: Duration::ZERO,
            ack_concurrency: 2,
            ack_retry_timeout: None,
            scheduler_interval: Duration::from_millis(250),
            scheduler_batch: 1000,
            maintain_interval: Duration::from_secs(5),
            run_scheduler: true,
            drain_timeout: Duration::from_secs(30),
            cancel_grace: Duration::from_secs(1),
            flush_timeout: Duration::from_secs(5),
            broker_call_timeout: Duration::from_secs(10),
            retry_max_delay: Duration::from_secs(2),
            consumer: None,
            queue_metrics_interval: Duration::from_secs(5),
        }
    }
}

impl WorkerConfig {
    /// Defaults, working on `queues`.
    pub fn for_queues(queues: impl IntoIterator<Item = QueueName>) -> Self {
        Self {
            queues: queues.into_iter().collect(),
            ..Self::default()
        }
    }

    /// The concurrency of `queue`: its override, else the default.
    pub fn concurrency_of(&self, queue: &QueueName) -> usize {
        self.queue_concurrency
            .get(queue)
            .copied()
            .unwrap_or(self.concurrency)
    }

    pub fn effective_heartbeat_interval(&self) -> Duration {
        self.heartbeat_interval
            .unwrap_or(self.visibility_timeout / 3)
    }

    pub fn effective_ack_retry_timeout(&self) -> Duration {
        self.ack_retry_timeout.unwrap_or(self.visibility_timeout)
    }

    /// Check every rule; the first broken one is reported with its field name.
    pub fn validate(&self) -> Result<(), WorkerError> {
        let bad = |field: &'static str, message: &str| {
            Err(WorkerError::Config {
                field,
                message: message.to_owned(),
            })
        };
        if self.queues.is_empty() {
            return bad("queues", "must name at least one queue");
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(q) = self.queues.iter().find(|q| !seen.insert(*q)) {
            return Err(WorkerError::Config {
                field: "queues",
                message: format!("lists {q} twice"),
            });
        }
        if self.concurrency == 0 {
            return bad("concurrency", "must be at least 1");
        }
        if let Some((q, _)) = self.queue_concurrency.iter().find(|(_, n)| **n == 0) {
            return Err(WorkerError::Config {
                field: "queue_concurrency",
                message: format!("{q} must be at least 1"),
            });
        }
        if self.batch_size == 0 {
            return bad("batch_size", "must be at least 1");
        }
        if self.ack_concurrency == 0 {
            return bad("ack_concurrency", "must be at least 1");
        }
        if self.ack_batch_size == 0 {
            return bad("ack_batch_size", "must be at least 1");
        }
        if self.scheduler_batch == 0 {
            return bad("scheduler_batch", "must be at least 1");
        }
        for (field, d) in [
            ("visibility_timeout", self.visibility_timeout),
            ("default_job_timeout", self.default_job_timeout),
            ("scheduler_interval", self.scheduler_interval),
            ("maintain_interval", self.maintain_interval),
            ("broker_call_timeout", self.broker_call_timeout),
            ("retry_max_delay", self.retry_max_delay),
            ("queue_metrics_interval", self.queue_metrics_interval),
        ] {
            if d.is_zero() {
                return bad(field, "must be greater than zero");
            }
        }
        let hb = self.effective_heartbeat_interval();
        if hb.is_zero() || hb >= self.visibility_timeout {
            return bad(
                "heartbeat_interval",
                "must be greater than zero and shorter than visibility_timeout",
            );
        }
        if let Some(c) = &self.consumer
            && (c.is_empty() || c.len() > 200)
        {
            return bad("consumer", "must be 1 to 200 characters");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str) -> QueueName {
        QueueName::parse(s).unwrap()
    }

    #[test]
    fn defaults_are_valid_once_queues_are_given() {
        assert!(WorkerConfig::default().validate().is_err());
        let c = WorkerConfig::for_queues([q("a")]);
        c.validate().unwrap();
        assert_eq!(c.effective_heartbeat_interval(), Duration::from_secs(10));
        assert_eq!(c.batch_size, 10);
    }

    #[test]
    fn rules_name_the_field() {
        let mut c = WorkerConfig::for_queues([q("a"), q("a")]);
        assert!(matches!(
            c.validate(),
            Err(WorkerError::Config {
                field: "queues",
                ..
            })
        ));
        c.queues = vec![q("a")];
        c.heartbeat_interval = Some(Duration::from_secs(30));
        assert!(matches!(
            c.validate(),
            Err(WorkerError::Config {
                field: "heartbeat_interval",
                ..
            })
        ));
        c.heartbeat_interval = None;
        c.queue_concurrency.insert(q("a"), 0);
        assert!(matches!(
            c.validate(),
            Err(WorkerError::Config {
                field: "queue_concurrency",
                ..
            })
        ));
        c.queue_concurrency.insert(q("a"), 3);
        assert_eq!(c.concurrency_of(&q("a")), 3);
        assert_eq!(c.concurrency_of(&q("b")), 10);
    }
}
