//! Key layout. Every key of a shard starts with the shard's prefix ([`Layout`]), and every key of a queue also
//! carries the `{queue}` hash tag, so one script can touch all of a queue's keys and its shard's event log.
//!
//! * On a standalone Redis (one server, or one of the client-side shards of docs/sharding.md) the prefix is
//!   `ferry:`: `ferry:{mail}:p1`, `ferry:events`. These are the names ferry has always used.
//! * On a virtual shard of a Redis Cluster the prefix is `ferry:{<tag>}:` ([`Layout::tagged`]): Redis hashes only
//!   the first `{…}` of a key, so every key of the shard (`ferry:{<tag>}:{mail}:p1`, `ferry:{<tag>}:events`)
//!   lies in the tag's slot, and a script that touches a queue and its shard's event log stays in one slot.
//!   Its pub/sub channels carry the same prefix and are published with `SPUBLISH` (sharded pub/sub), which a
//!   script may only do within its own slot; `lua/prelude.lua` tells the two layouts apart by the event log's
//!   name.

use ferry_core::{Priority, QueueName};

/// The consumer group every worker joins. The Lua scripts are given it when they are loaded (see `scripts.rs`),
/// so this is the one place the name is written.
pub const GROUP: &str = "workers";

/// The names of one shard's keys and channels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// `ferry:` or `ferry:{<tag>}:`.
    prefix: String,
    /// The durable event stream; also the pub/sub channel of events of jobs an older ferry enqueued.
    events: String,
    /// Set of queue names that ever received a job on this shard.
    queues: String,
    /// The shard's history epoch (see `history.rs`).
    epoch: String,
}

impl Layout {
    /// A standalone Redis: the `ferry:` prefix.
    pub fn standalone() -> Self {
        Self::with_prefix("ferry:".to_owned())
    }

    /// A virtual shard of a Redis Cluster whose keys all hash to the slot of `tag`.
    pub fn tagged(tag: &str) -> Self {
        debug_assert!(!tag.is_empty() && !tag.contains(['{', '}']), "{tag:?}");
        Self::with_prefix(format!("ferry:{{{tag}}}:"))
    }

    fn with_prefix(prefix: String) -> Self {
        Self {
            events: format!("{prefix}events"),
            queues: format!("{prefix}queues"),
            epoch: format!("{prefix}epoch"),
            prefix,
        }
    }

    /// True for a virtual shard of a Redis Cluster: its channels are sharded (`SPUBLISH`, `SSUBSCRIBE`).
    pub fn is_tagged(&self) -> bool {
        self.prefix.len() > "ferry:".len()
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn events(&self) -> &str {
        &self.events
    }

    pub fn queues(&self) -> &str {
        &self.queues
    }

    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    /// The keys of `queue` on this shard.
    pub fn queue(&self, queue: &QueueName) -> QueueKeys {
        QueueKeys::new(&self.prefix, queue)
    }

    /// The history stream of the application channel `channel`.
    pub fn app_history(&self, channel: &str) -> String {
        format!("{}app:{{{channel}}}:h", self.prefix)
    }

    /// A leader lease named `name`.
    pub fn lease(&self, name: &str) -> String {
        format!("{}lease:{name}", self.prefix)
    }

    /// The gateway membership: the ZSET of live nodes and the HASH of their info (see `members.rs`).
    pub fn members(&self) -> (String, String) {
        (
            format!("{}gw", self.prefix),
            format!("{}gw:info", self.prefix),
        )
    }
}

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
    /// With [`crate::EngineConfig::drop_recorded`]: a list of notes "<log entry id> <job id> ..." of finished
    /// jobs, to drop once the recorder has committed their entry (lua/maintain.lua).
    pub done: String,
    /// The priorities (`0`..`2`) whose stream had only acknowledged entries deleted from it: Redis's group lag
    /// still holds there (lua/stats.lua).
    pub acked_deletes: String,
    /// Dead-letter stream.
    pub dead: String,
    pub paused: String,
    prefix: String,
}

impl QueueKeys {
    /// The keys of `queue` on the shard whose keys start with `shard` (see [`Layout`]).
    fn new(shard: &str, queue: &QueueName) -> Self {
        let prefix = format!("{shard}{{{queue}}}:");
        Self {
            streams: Priority::ALL.map(|p| format!("{prefix}p{}", p.index())),
            jobs: format!("{prefix}jobs"),
            sched: format!("{prefix}sched"),
            fin: format!("{prefix}fin"),
            done: format!("{prefix}done"),
            acked_deletes: format!("{prefix}acked-deletes"),
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
    /// mark of its abandonment (see lua/complete_claim.lua and lua/abandon.lua).
    pub fn claim(&self, token: &str) -> String {
        format!("{}claim:{token}", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_queue_key_shares_the_hash_tag() {
        let k = Layout::standalone().queue(&QueueName::parse("mail").unwrap());
        for key in k.streams.iter().chain([
            &k.jobs,
            &k.sched,
            &k.fin,
            &k.done,
            &k.acked_deletes,
            &k.dead,
            &k.paused,
        ]) {
            assert!(key.starts_with("ferry:{mail}:"), "{key}");
        }
        assert!(k.idempotency(None, None, "k").starts_with("ferry:{mail}:"));
    }

    #[test]
    fn idempotency_keys_never_collide_across_tenants_and_owners() {
        let k = Layout::standalone().queue(&QueueName::parse("mail").unwrap());
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

    #[test]
    fn the_standalone_layout_keeps_the_names_ferry_always_used() {
        let l = Layout::standalone();
        assert!(!l.is_tagged());
        assert_eq!(
            (l.events(), l.queues(), l.epoch()),
            ("ferry:events", "ferry:queues", "ferry:epoch")
        );
        let q = l.queue(&QueueName::parse("mail").unwrap());
        assert_eq!(q.streams[1], "ferry:{mail}:p1");
        assert_eq!(q.jobs, "ferry:{mail}:jobs");
        assert_eq!(l.app_history("chat"), "ferry:app:{chat}:h");
        assert_eq!(l.lease("scheduler"), "ferry:lease:scheduler");
        assert_eq!(
            l.members(),
            ("ferry:gw".to_owned(), "ferry:gw:info".to_owned())
        );
        assert_eq!(crate::membership::MEMBERSHIP_KEY, l.members().0);
    }

    #[test]
    fn a_tagged_layout_puts_every_key_behind_its_tag() {
        let l = Layout::tagged("f07");
        assert!(l.is_tagged());
        let q = l.queue(&QueueName::parse("mail").unwrap());
        let mut all: Vec<String> = vec![
            l.events().into(),
            l.queues().into(),
            l.epoch().into(),
            l.app_history("chat"),
            l.lease("scheduler"),
            l.members().0,
            l.members().1,
            q.jobs.clone(),
            q.sched.clone(),
            q.fin.clone(),
            q.dead.clone(),
            q.paused.clone(),
            q.idempotency(Some("t"), Some("o"), "k"),
            q.claim("token"),
        ];
        all.extend(q.streams.iter().cloned());
        for key in &all {
            // Redis hashes the first `{…}` of a key: the shard's tag.
            assert!(key.starts_with("ferry:{f07}:"), "{key}");
        }
        assert_eq!(q.streams[0], "ferry:{f07}:{mail}:p0");
    }
}
