//! Key layout. Every key of a queue carries the `{queue}` hash tag so the whole queue lives in one slot and one
//! script can touch all of it. Per-shard keys (`ferry:events`, `ferry:queues`) sit outside any queue.

use ferry_core::{Priority, QueueName};

/// The durable per-shard event stream; the same name is the pub/sub channel for live fan-out.
pub const EVENTS: &str = "ferry:events";
/// Set of queue names that ever received a job on this shard.
pub const QUEUES: &str = "ferry:queues";
/// The consumer group every worker joins.
pub const GROUP: &str = "workers";

#[derive(Debug, Clone)]
pub struct QueueKeys {
    /// One stream per priority: high, normal, low.
    pub streams: [String; 3],
    /// job id → record (see lua/prelude.lua for the record forms).
    pub jobs: String,
    /// Scheduled and retrying job ids scored by run-at.
    pub sched: String,
    /// Cancelled job ids scored by cancel time, for retention.
    pub fin: String,
    /// Dead-letter stream.
    pub dead: String,
    pub paused: String,
    prefix: String,
}

impl QueueKeys {
    pub fn new(queue: &QueueName) -> Self {
        let prefix = format!("ferry:{{{queue}}}:");
        Self {
            streams: Priority::ALL.map(|p| format!("{prefix}p{}", p.index())),
            jobs: format!("{prefix}jobs"),
            sched: format!("{prefix}sched"),
            fin: format!("{prefix}fin"),
            dead: format!("{prefix}dead"),
            paused: format!("{prefix}paused"),
            prefix,
        }
    }

    /// Idempotency key for (tenant, key); the tenant is length-prefixed so no pair can collide with another.
    pub fn idempotency(&self, tenant: Option<&str>, key: &str) -> String {
        let t = tenant.unwrap_or("");
        format!("{}idem:{}:{t}:{key}", self.prefix, t.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_queue_key_shares_the_hash_tag() {
        let k = QueueKeys::new(&QueueName::parse("mail").unwrap());
        for key in k
            .streams
            .iter()
            .chain([&k.jobs, &k.sched, &k.fin, &k.dead, &k.paused])
        {
            assert!(key.starts_with("ferry:{mail}:"), "{key}");
        }
        assert_ne!(
            k.idempotency(Some("a:b"), "c"),
            k.idempotency(Some("a"), "b:c")
        );
    }
}
