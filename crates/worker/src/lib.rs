//! ferry's worker runtime: takes jobs from a [`Broker`](ferry_broker::Broker), runs them with the handler
//! registered for their kind, and reports their outcomes, under bounded concurrency and with a graceful drain.
//!
//! * [`runtime`]: [`Worker`] — claim loops, job tasks, heartbeats, the drain.
//! * `acker`: outcomes batched into `complete` / `fail` / `release` calls, retried through broker outages.
//! * `scheduler`: the leader-free scheduler (promote due jobs) and reaper (reclaim expired leases).
//! * [`handler`]: the [`Handler`] trait, [`JobContext`], [`JobError`], [`HandlerRegistry`].
//! * [`builtins`]: `ferry.noop`, `ferry.sleep`, `ferry.echo`, `ferry.fail`.
//! * [`webhook`]: the HTTP webhook executor.
//! * [`config`]: [`WorkerConfig`] and its defaults.
//! * [`metrics`]: the worker's Prometheus metrics.
//! * [`node`]: [`WorkerNode`], the whole node `ferry worker` runs: the worker, the recorder and reconciler
//!   beside it, and what its admin listener serves.
//!
//! This crate owns *when* jobs run and what is reported about them. It must not decide job state itself (the
//! broker does, atomically and fenced by leases), keep unbounded buffers, or read configuration from the
//! environment (the binary resolves that and passes a [`WorkerConfig`]).

pub mod builtins;
pub mod config;
pub mod handler;
pub mod metrics;
pub mod node;
pub mod runtime;
pub mod webhook;

mod acker;
mod retry;
mod scheduler;

pub use config::WorkerConfig;
pub use handler::{FnHandler, Handler, HandlerRegistry, JobContext, JobError, handler_fn};
pub use node::{WorkerDeps, WorkerNode, WorkerNodeConfig};
pub use runtime::{DrainReport, RunningJob, Worker, WorkerCounters, WorkerMonitor};
pub use webhook::{WebhookConfig, WebhookHandler};

/// Errors at the worker's boundary. A job's own failure is not one (that is a [`JobError`]), nor is a broker
/// outage (the worker retries through it).
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("invalid worker config: {field} {message}")]
    Config {
        field: &'static str,
        message: String,
    },
    #[error("invalid webhook for kind {kind}: {message}")]
    Webhook { kind: String, message: String },
    /// One of the worker's own tasks panicked: a bug.
    #[error("worker task failed: {0}")]
    Task(String),
}
