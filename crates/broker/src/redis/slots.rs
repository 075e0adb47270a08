//! Redis Cluster hash slots, and the tags of ferry's virtual shards on a cluster.
//!
//! A cluster splits its keys over 16,384 slots by CRC16 (XMODEM) of the key, or of its hash tag: the part between
//! the first `{` and the next `}`, when that part is not empty. ferry spreads its queues over a fixed number of
//! virtual shards ([`vshard_tags`]), each with its own event log and a tag that pins all of its keys to one slot
//! (see `keys.rs`, [`super::keys::Layout::tagged`]). The tags are chosen so that virtual shard `k` of `n` lies in
//! the `k`-th `n`-th of the slot range: a cluster whose masters hold equal ranges of slots (what `redis-cli
//! --cluster create` makes) then holds equal numbers of virtual shards, and moving slots moves whole virtual
//! shards.

/// How many hash slots a Redis Cluster has.
pub const SLOTS: u16 = 16384;

/// The hash slot of `key`, as Redis computes it.
pub fn key_slot(key: &[u8]) -> u16 {
    crc16(hash_tag(key)) % SLOTS
}

/// The part of `key` that is hashed: its hash tag, or the whole key when it has none.
fn hash_tag(key: &[u8]) -> &[u8] {
    if let Some(open) = key.iter().position(|&b| b == b'{')
        && let Some(len) = key[open + 1..].iter().position(|&b| b == b'}')
        && len > 0
    {
        return &key[open + 1..open + 1 + len];
    }
    key
}

/// CRC16-CCITT (XMODEM): polynomial 0x1021, initial value 0, no reflection, as Redis Cluster uses.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in bytes {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The tags of `n` virtual shards: tag `k` is `v<k>.<salt>` with the smallest salt that puts it in slots
/// `[k × 16384 / n, (k + 1) × 16384 / n)`. The same `n` always gives the same tags, on every node and version.
pub fn vshard_tags(n: usize) -> Vec<String> {
    let n = n.clamp(1, usize::from(SLOTS));
    (0..n)
        .map(|k| {
            let (lo, hi) = (k * usize::from(SLOTS) / n, (k + 1) * usize::from(SLOTS) / n);
            (0u64..)
                .map(|salt| format!("v{k}.{salt}"))
                .find(|tag| (lo..hi).contains(&usize::from(key_slot(tag.as_bytes()))))
                .expect("every range of slots is hit by some salt")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_the_redis_cluster_specification() {
        // The specification's check value, and slots `CLUSTER KEYSLOT` gives for these keys.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"foo{}{bar}"), key_slot(b"foo{}{bar}"));
        assert_eq!(hash_tag(b"foo{}{bar}"), b"foo{}{bar}");
        assert_eq!(hash_tag(b"foo{{bar}}zap"), b"{bar");
        assert_eq!(hash_tag(b"foo{bar}{zap}"), b"bar");
        assert_eq!(hash_tag(b"no{close"), b"no{close");
    }

    #[test]
    fn virtual_shards_spread_evenly_over_the_slots() {
        for n in [1, 3, 16, 64, 256] {
            let tags = vshard_tags(n);
            assert_eq!(tags.len(), n);
            for (k, tag) in tags.iter().enumerate() {
                let slot = usize::from(key_slot(tag.as_bytes()));
                assert!(
                    slot * n / usize::from(SLOTS) == k,
                    "{n}: {tag} in slot {slot}"
                );
                assert!(!tag.contains(['{', '}']), "{tag}");
            }
        }
        assert_eq!(vshard_tags(16), vshard_tags(16), "deterministic");
    }
}
