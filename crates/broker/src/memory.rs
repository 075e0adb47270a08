//! The in-process engine. (being written)
use crate::EngineConfig;

/// In-process broker with the same semantics as the Redis engine.
#[derive(Debug)]
pub struct MemoryBroker {
    #[allow(dead_code)]
    config: EngineConfig,
}

impl MemoryBroker {
    pub fn new(config: EngineConfig) -> Self {
        Self { config }
    }
}
