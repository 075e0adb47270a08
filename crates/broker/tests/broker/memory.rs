//! The broker contract (`tests/broker/contract/`) run against the in-process engine.

use std::sync::Arc;

use ferry_broker::{Broker, ChannelHistory, EngineConfig, MemoryBroker};

use crate::{contract, contract_suite};

struct Mem(Arc<MemoryBroker>);

#[async_trait::async_trait]
impl contract::Engine for Mem {
    async fn start(config: EngineConfig) -> Self {
        Mem(Arc::new(MemoryBroker::new(config)))
    }

    async fn start_with_history(config: EngineConfig, history: ChannelHistory) -> Self {
        Mem(Arc::new(
            MemoryBroker::new(config).with_channel_history(history),
        ))
    }

    fn broker(&self) -> Arc<dyn Broker> {
        self.0.clone()
    }
}

contract_suite!(Mem);
