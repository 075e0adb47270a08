//! The broker contract (`tests/contract/`) run against the in-process engine.

mod contract;

use std::sync::Arc;

use ferry_broker::{Broker, EngineConfig, MemoryBroker};

struct Mem(Arc<MemoryBroker>);

#[async_trait::async_trait]
impl contract::Engine for Mem {
    async fn start(config: EngineConfig) -> Self {
        Mem(Arc::new(MemoryBroker::new(config)))
    }

    fn broker(&self) -> Arc<dyn Broker> {
        self.0.clone()
    }
}

contract_suite!(Mem);
