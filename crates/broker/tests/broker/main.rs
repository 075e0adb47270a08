//! The broker's integration tests: the contract every engine must meet (`contract`), run against the in-process
//! engine (`memory`) and Redis Streams (`redis`); the model-based property test (`model`) against both
//! (`model_memory`, `model_redis`); and what only the Redis engine has (`redis_*`: key layout and sharding,
//! refusals, TLS, the job event feed). Each Redis case starts its own redis-server (ferry-testkit).
//!
//! One test binary for the crate, so its dependencies link once rather than once per file.

mod contract;
mod memory;
mod model;
mod model_memory;
mod model_redis;
mod redis;
mod redis_cluster;
mod redis_engine;
mod redis_refusals;
mod redis_tls;
mod redis_topics;
