//! The store contract (`tests/store/contract/`) run against the in-memory store.

use std::sync::Arc;

use ferry_store::{MemoryStore, Store};

use crate::{contract, contract_suite};

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
