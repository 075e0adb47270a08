//! The Redis Streams engine. (being written)
use crate::{BrokerError, EngineConfig};

/// Redis Streams broker over one or more standalone Redis shards.
#[derive(Debug)]
pub struct RedisBroker {
    #[allow(dead_code)]
    config: EngineConfig,
}

impl RedisBroker {
    /// Connect to every shard (`redis://host:port[/db]` URLs) and check each answers.
    pub async fn connect(urls: &[String], config: EngineConfig) -> Result<Self, BrokerError> {
        let _ = urls;
        Ok(Self { config })
    }
}
