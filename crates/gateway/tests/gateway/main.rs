//! The gateway's integration tests: real gateways on 127.0.0.1:0 driven over real HTTP and WebSocket clients, on
//! the in-process engine or on real redis-servers (ferry-testkit). One module per concern (attacks, cluster,
//! connections, errors, HTTP, JWKS URL, profiling, queries, recovery, resilience, shutdown, TLS, tracing,
//! WebSocket); `support` holds what they share (a test gateway, tokens, a broker with switches).
//!
//! One test binary for the crate, so its dependencies link once rather than once per file.

mod attacks;
mod cluster;
mod connections;
mod errors;
mod fd_exhaustion;
mod http;
mod jwks_url;
mod profile;
mod queries;
mod recovery;
mod resilience;
mod shutdown;
mod support;
mod tls;
mod trace;
mod ws;
mod ws_partitions;
