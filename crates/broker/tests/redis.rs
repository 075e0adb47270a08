//! The shared contract suite against the Redis Streams engine, each case on its own redis-server.

mod contract;

use std::sync::Arc;

use ferry_broker::{Broker, EngineConfig, RedisBroker};
use ferry_testkit::RedisServer;

struct Redis {
    _server: RedisServer,
    broker: Arc<RedisBroker>,
}

#[async_trait::async_trait]
impl contract::Engine for Redis {
    async fn start(config: EngineConfig) -> Self {
        let server = RedisServer::start().expect("redis-server starts");
        let broker = RedisBroker::connect(&[server.url()], config)
            .await
            .expect("connects");
        Self {
            _server: server,
            broker: Arc::new(broker),
        }
    }

    fn broker(&self) -> Arc<dyn Broker> {
        self.broker.clone()
    }
}

contract_suite!(Redis);
