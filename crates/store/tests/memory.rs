//! The store contract (`tests/contract/`) run against the in-memory store.

mod contract;

use std::sync::Arc;

use ferry_store::{MemoryStore, Store};

struct Mem(Arc<MemoryStore>);

#[async_trait::async_trait]
impl contract::Backend for Mem {
    async fn start() -> Self {
        Mem(Arc::new(MemoryStore::new()))
    }

    fn store(&self) -> Arc<dyn Store> {
        self.0.clone()
    }
}

contract_suite!(Mem);
