//! The testkit's wrappers against real servers: a PostgreSQL cluster (`postgres`) and redis-server (`redis`),
//! each on a private port.
//!
//! One test binary for the crate, so its dependencies link once rather than once per file.

mod postgres;
mod redis;
