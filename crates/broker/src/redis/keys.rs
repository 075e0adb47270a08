//! Key layout. Every key of a queue carries the `{queue}` hash tag so the whole queue lives in one slot and one
//! script can touch all of it. Per-shard keys (`ferry:events`, `ferry:queues`) sit outside any queue.

use ferry_core::{Priority, QueueName};

/// The durable per-shard event stream; the same name is the pub/sub channel for live fan-out.
pub const EVENTS: &str = "ferry:events";
/// Set of queue names that ever received a job on this shard.
pub const QUEUES: &str = "ferry:queues";
/// The consumer group every worker joins. The Lua scripts are given it when they are loaded (see `scripts.rs`),
/// so this is the one place the name is written.
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

    /// Idempotency key for (tenant, owner, key): one submitter's key, never shared by the subjects of a tenant.
    /// Tenant and owner are length-prefixed, so no triple can collide with another whatever `:` they hold.
    ///
    /// The segment is `idem2:`, not the `idem:` of the (tenant, key) keys written before keys were scoped per
    /// owner: an old key can never be read as a new one (its key part could spell out an owner's length and
    /// name). Old keys are left alone and expire within `idempotency_ttl`.
    pub fn idempotency(&self, tenant: Option<&str>, owner: Option<&str>, key: &str) -> String {
        let (t, o) = (tenant.unwrap_or(""), owner.unwrap_or(""));
        format!("{}idem2:{}:{t}:{}:{o}:{key}", self.prefix, t.len(), o.len())
    }
}

impl QueueKeys {
    /// The key of one claim call, named by the token the caller drew for it: what the call leased, then the
    /// mark of its abandonment (see lua/claim.lua and lua/abandon.lua).
    pub fn claim(&self, token: &str) -> String {
        format!("{}claim:{token}", self.prefix)
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
        assert!(k.idempotency(None, None, "k").starts_with("ferry:{mail}:"));
    }

    #[test]
    fn idempotency_keys_never_collide_across_tenants_and_owners() {
        let k = QueueKeys::new(&QueueName::parse("mail").unwrap());
        // Every way of splitting "a:b:c" over tenant, owner and key names a different Redis key.
        let triples = [
            (Some("a:b"), Some("c"), "k"),
            (Some("a"), Some("b:c"), "k"),
            (Some("a"), Some("b"), "c:k"),
            (Some("a:b:c"), None, "k"),
            (None, Some("a:b:c"), "k"),
            (None, None, "a:b:c:k"),
            (Some("a"), None, "b:c:k"),
            (None, Some("a"), "b:c:k"),
        ];
        let keys: std::collections::HashSet<String> = triples
            .iter()
            .map(|(t, o, key)| k.idempotency(*t, *o, key))
            .collect();
        assert_eq!(keys.len(), triples.len(), "{keys:?}");
        // The same key of two subjects of one tenant: two keys.
        assert_ne!(
            k.idempotency(Some("acme"), Some("alice"), "order-42"),
            k.idempotency(Some("acme"), Some("bob"), "order-42")
        );
        // A key written before keys were scoped per owner (`idem:<len>:<tenant>:<key>`) cannot be mistaken for
        // a new one, even when its key part spells out an owner.
        let old = "ferry:{mail}:idem:4:acme:5:alice:order-42";
        assert_ne!(k.idempotency(Some("acme"), Some("alice"), "order-42"), old);
    }
}
