//! Queue → shard placement: rendezvous (highest-random-weight) hashing of the queue name over the shard ids.
//!
//! A queue lives wholly on one shard: every Redis key of a queue carries the `{queue}` hash tag, and this module
//! picks the one standalone Redis that holds all of them. Each shard scores every queue name, and the queue goes to
//! the shard with the highest score. Adding a shard therefore moves only the queues the new shard now wins (about
//! 1/(n+1) of them), removing one moves only the queues it owned, and no table has to be stored or agreed on: any
//! process with the same shard ids computes the same placement.
//!
//! The hash is defined here, not borrowed from `std` (whose `Hash` impls and `DefaultHasher` may change between
//! Rust versions and differ between platforms) or from a crate: 64-bit FNV-1a over the UTF-8 bytes, finished with
//! the MurmurHash3 `fmix64` mixer. A queue's shard must never change because a binary was rebuilt, so the unit
//! tests pin concrete assignments. docs/sharding.md records the measurements behind this choice.
//!
//! This module only decides placement; it must not move data. When the shard list changes, moving the queues
//! whose owner changed is an operator's task.

/// Maps a queue name to one of N shards by rendezvous hashing.
///
/// Shards are identified by stable ids (the engine uses each shard's URL), not by their position, so reordering
/// the configured list does not move a single queue; [`shard_for`](Self::shard_for) returns the position of the
/// owner in the list as given.
#[derive(Debug, Clone)]
pub struct ShardRing {
    ids: Vec<String>,
    /// `stable_hash(id)` per shard, in list order, so a lookup hashes only the queue name.
    seeds: Vec<u64>,
}

impl ShardRing {
    /// `shards` shards with ids `"0"`, `"1"`, … `"n-1"`.
    pub fn new(shards: usize) -> Self {
        let ids: Vec<String> = (0..shards).map(|i| i.to_string()).collect();
        Self::with_ids(&ids)
    }

    /// Shards identified by `ids`. Ids should be unique: of two equal ids, only the first ever owns a queue.
    pub fn with_ids(ids: &[String]) -> Self {
        Self {
            seeds: ids.iter().map(|id| stable_hash(id.as_bytes())).collect(),
            ids: ids.to_vec(),
        }
    }

    /// Index (in the list given to [`with_ids`](Self::with_ids)) of the shard that owns `queue`.
    /// An empty ring answers 0; the engine never builds one (it requires at least one Redis URL).
    pub fn shard_for(&self, queue: &str) -> usize {
        let key = stable_hash(queue.as_bytes());
        let mut best = 0;
        let mut best_score = 0;
        for (i, seed) in self.seeds.iter().enumerate() {
            // fmix64 is a bijection, so distinct shard seeds give distinct scores for the same key: a tie needs
            // equal ids. `>` keeps the first of equals, so ties resolve the same way everywhere.
            let score = fmix64(key ^ seed);
            if i == 0 || score > best_score {
                best = i;
                best_score = score;
            }
        }
        best
    }

    /// Every index, best first: the owner of `key`, then the one that would own it without the owner, and so
    /// on. Bounded-load placement walks this order (see [`crate::placement`]).
    pub fn ranked(&self, key: &str) -> Vec<usize> {
        let key = stable_hash(key.as_bytes());
        let mut scored: Vec<(u64, usize)> = self
            .seeds
            .iter()
            .enumerate()
            .map(|(i, seed)| (fmix64(key ^ seed), i))
            .collect();
        // Highest score first; equal scores (equal ids) keep list order, as `shard_for` does.
        scored.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        scored.into_iter().map(|(_, i)| i).collect()
    }

    /// The id of the shard that owns `queue`, or `None` for an empty ring.
    pub fn shard_id_for(&self, queue: &str) -> Option<&str> {
        self.ids.get(self.shard_for(queue)).map(String::as_str)
    }

    /// The shard ids, in the order given.
    pub fn ids(&self) -> &[String] {
        &self.ids
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// The placement hash: `fmix64(FNV-1a-64(bytes))`. FNV-1a is a fixed, byte-at-a-time definition that any language
/// can reproduce; on its own it mixes the last bytes of a string poorly, which `fmix64` (a full-avalanche
/// bijection) repairs, so names such as `queue-1` and `queue-2` land independently. Also the workspace's one
/// stable content hash elsewhere (the dashboard's `ETag`s).
pub fn stable_hash(bytes: &[u8]) -> u64 {
    fmix64(fnv1a64(bytes))
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes
        .iter()
        .fold(OFFSET_BASIS, |h, &b| (h ^ u64::from(b)).wrapping_mul(PRIME))
}

/// The 64-bit finaliser of MurmurHash3.
fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("queue-{i}")).collect()
    }

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("redis://10.0.0.{i}:6379")).collect()
    }

    #[test]
    fn hash_matches_its_definition() {
        // Published FNV-1a 64 test vectors: a different FNV would move every queue.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
        assert_eq!(fmix64(0), 0);
        assert_eq!(stable_hash(b"default"), EXPECTED_DEFAULT_HASH);
    }

    const EXPECTED_DEFAULT_HASH: u64 = 0xd470_84e0_f7c5_d5ad;

    #[test]
    fn placement_is_pinned() {
        // Fixed expectations: if any of these change, a deploy would move live queues to other shards.
        let by_index = ShardRing::new(5);
        let got: Vec<usize> = [
            "default",
            "emails",
            "reports",
            "queue-1",
            "queue-2",
            "tenant-a:billing",
        ]
        .iter()
        .map(|q| by_index.shard_for(q))
        .collect();
        assert_eq!(got, EXPECTED_NEW5);

        let by_url = ShardRing::with_ids(&ids(3));
        let got: Vec<usize> = [
            "default",
            "emails",
            "reports",
            "queue-1",
            "queue-2",
            "tenant-a:billing",
        ]
        .iter()
        .map(|q| by_url.shard_for(q))
        .collect();
        assert_eq!(got, EXPECTED_URL3);
    }

    const EXPECTED_NEW5: [usize; 6] = [2, 1, 2, 0, 3, 4];
    const EXPECTED_URL3: [usize; 6] = [0, 2, 0, 1, 2, 2];

    #[test]
    fn every_shard_gets_a_fair_share() {
        for n in [2, 3, 5, 10] {
            let ring = ShardRing::with_ids(&ids(n));
            let keys = 20_000;
            let mut counts = vec![0usize; n];
            for q in names(keys) {
                counts[ring.shard_for(&q)] += 1;
            }
            let mean = keys as f64 / n as f64;
            for (shard, &c) in counts.iter().enumerate() {
                // The binomial standard deviation here is at most ~71 keys, so ±10% of the mean (≥ 5σ for
                // n ≤ 10) fails only for a biased hash, never by bad luck.
                let off = (c as f64 - mean).abs() / mean;
                assert!(
                    off < 0.10,
                    "n={n}: shard {shard} has {c} keys, mean {mean}: {counts:?}"
                );
            }
        }
    }

    #[test]
    fn adding_a_shard_moves_only_what_it_takes() {
        for n in [1, 3, 5, 10] {
            let before = ShardRing::with_ids(&ids(n));
            let after = ShardRing::with_ids(&ids(n + 1));
            let keys = names(20_000);
            let mut moved = 0;
            for q in &keys {
                let (a, b) = (before.shard_for(q), after.shard_for(q));
                if a != b {
                    assert_eq!(b, n, "{q} moved between two old shards");
                    moved += 1;
                }
            }
            let ideal = 1.0 / (n + 1) as f64;
            let frac = moved as f64 / keys.len() as f64;
            assert!(
                (frac - ideal).abs() < 0.02,
                "n={n}: moved {frac}, ideal {ideal}"
            );
        }
    }

    #[test]
    fn removing_a_shard_moves_only_its_queues() {
        let all = ids(5);
        let before = ShardRing::with_ids(&all);
        // Remove a shard from the middle of the list: positions shift, placement by id must not.
        let mut rest = all.clone();
        rest.remove(2);
        let after = ShardRing::with_ids(&rest);
        for q in names(20_000) {
            let was = before.shard_id_for(&q).unwrap();
            let now = after.shard_id_for(&q).unwrap();
            if was != all[2] {
                assert_eq!(was, now, "{q} moved although its shard stayed");
            }
        }
    }

    #[test]
    fn reordering_the_list_moves_nothing() {
        let forward = ids(7);
        let mut backward = forward.clone();
        backward.reverse();
        let (a, b) = (
            ShardRing::with_ids(&forward),
            ShardRing::with_ids(&backward),
        );
        for q in names(5_000) {
            assert_eq!(a.shard_id_for(&q), b.shard_id_for(&q));
        }
    }

    #[test]
    fn ranked_starts_with_the_owner_and_lists_everyone_once() {
        let ring = ShardRing::with_ids(&ids(6));
        for q in names(2_000) {
            let order = ring.ranked(&q);
            assert_eq!(order[0], ring.shard_for(&q));
            let mut sorted = order.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..6).collect::<Vec<_>>());
            // Without the owner, the runner-up owns the key: the order is the fallback order.
            let rest: Vec<String> = ids(6)
                .into_iter()
                .enumerate()
                .filter(|(i, _)| *i != order[0])
                .map(|(_, id)| id)
                .collect();
            let smaller = ShardRing::with_ids(&rest);
            assert_eq!(smaller.shard_id_for(&q), Some(ids(6)[order[1]].as_str()));
        }
    }

    #[test]
    fn degenerate_rings() {
        assert_eq!(ShardRing::new(1).shard_for("anything"), 0);
        let empty = ShardRing::new(0);
        assert!(empty.is_empty());
        assert_eq!(empty.shard_for("anything"), 0);
        assert_eq!(empty.shard_id_for("anything"), None);
        // Duplicate ids: the first one wins every tie, the second never owns a queue.
        let dup = ShardRing::with_ids(&["a".to_string(), "a".to_string()]);
        assert!(names(1_000).iter().all(|q| dup.shard_for(q) == 0));
    }
}
