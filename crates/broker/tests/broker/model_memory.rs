//! The model-based property test (`tests/broker/model/`) against the in-process engine.

use std::sync::Arc;

use ferry_broker::MemoryBroker;

use crate::model;

#[test]
fn memory_engine_follows_the_model() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let broker = Arc::new(MemoryBroker::new(model::engine_config()));
    model::check(&rt, broker, 32);
}
