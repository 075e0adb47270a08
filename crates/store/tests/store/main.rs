//! The store's integration tests: the contract every `Store` must meet (`contract`), run against the in-memory
//! store (`memory`) and PostgreSQL (`pg`), TLS to PostgreSQL (`pg_tls`), and the recorder against a real Redis
//! event log (`recorder`). PostgreSQL and redis-server are real processes from ferry-testkit.
//!
//! One test binary for the crate, so its dependencies link once rather than once per file.

mod contract;
mod memory;
mod pg;
mod pg_tls;
mod recorder;
