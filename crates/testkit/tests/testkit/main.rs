//! The testkit's wrappers against real servers: a PostgreSQL cluster (`postgres`), redis-server (`redis`) and a
//! Redis Cluster (`redis_cluster`),
//! each on a private port.
//!
//! One test binary for the crate, so its dependencies link once rather than once per file.

mod postgres;
mod redis;
mod redis_cluster;
