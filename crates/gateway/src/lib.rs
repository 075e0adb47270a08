//! The gateway role: what every client touches. It terminates TLS, authenticates each request and WebSocket with
//! a JWT, checks scopes and tenant, enforces rate and connection limits, submits and looks up jobs through the
//! [`ferry_broker::Broker`], and forwards events from the broker's pub/sub to the WebSocket connections that
//! subscribed. It holds no state another gateway needs: any gateway can serve any client.
//!
//! It must not run jobs (that is the worker) or decide job semantics (that is the broker).
//!
//! * [`auth`]: JWT verification and scopes → a [`auth::Principal`].
//! * [`error`]: the one table from errors to HTTP status, problem type and WebSocket error code / close code.
//! * [`http`]: the `/v1` JSON API, OpenAPI document, health and metrics routes, and `GET /v1/autoscaler` (the
//!   decisions of the autoscalers it is pointed at, read from their admin listeners).
//! * [`resilience`]: timeouts and circuit breakers around Redis and the store, shedding on event-log backlog.
//! * [`ws`]: `GET /v1/ws`, the per-node hub that fans events out to connections.
//! * [`ui`]: the web dashboard at `/ui`, static assets embedded in the binary (ES modules, no build step).
//! * [`connection`]: the accept loop; header, body and idle timeouts; budgets of unauthenticated connections.
//! * [`cluster`]: this node's heartbeat in the gateway membership, rebalancing of its WebSocket clients,
//!   `GET /v1/cluster`.
//! * [`server`]: `Gateway::build(config, broker)` (a store, if any, is `config.store`) binds (plain or TLS), `local_addr()`, `run(shutdown)`.

pub mod auth;
pub mod cluster;
pub mod config;
pub mod connection;
pub mod error;
pub mod http;
pub mod resilience;
pub mod server;
pub mod state;
pub mod ui;
pub mod ws;

pub use config::GatewayConfig;
pub use server::Gateway;
