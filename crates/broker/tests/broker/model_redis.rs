//! The model-based property test (`tests/broker/model/`) against the Redis Streams engine, on its own redis-server.

use std::sync::Arc;

use ferry_broker::RedisBroker;
use ferry_testkit::RedisServer;

use crate::model;

#[test]
fn redis_engine_follows_the_model() {
    let server = RedisServer::start().expect("redis-server starts");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let broker = rt
        .block_on(RedisBroker::connect(
            &[server.url()],
            model::engine_config(),
        ))
        .expect("connects");
    model::check(&rt, Arc::new(broker), 16);
    drop(rt);
    drop(server);
}
