//! Queue → shard placement. (being written)

/// Maps a queue name to one of N shards.
#[derive(Debug, Clone)]
pub struct ShardRing {
    shards: usize,
}

impl ShardRing {
    pub fn new(shards: usize) -> Self {
        Self { shards }
    }

    /// Index of the shard that owns `queue`.
    pub fn shard_for(&self, queue: &str) -> usize {
        queue.len() % self.shards.max(1)
    }
}
