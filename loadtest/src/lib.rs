//! ferry's load generator (scenarios `jobs`, `ws`, `api`). The `jobs` scenario measures the job engine on this machine and, side by side,
//! BullMQ doing the same work against a redis-server of the same version, so that the comparison is a ratio
//! taken in one run.
//!
//! * [`ferry`]: enqueue N `ferry.noop` jobs in batches (over one queue or several), process them with one
//!   `ferry worker` process, then measure enqueue→complete latency at fixed offered rates; on a standalone Redis
//!   or a Redis Cluster (Redis CPU per master).
//! * [`bullmq`]: runs `loadtest/bullmq/bench.mjs` (the same three phases with BullMQ) and parses its JSON.
//! * [`redis_cpu`]: Redis CPU per job from `/proc/<pid>/stat` and `INFO commandstats`, reusable by later
//!   scenarios.
//! * [`stats`]: latency percentiles; [`report`]: machine facts and the comparison against the targets.
//! * [`server`]: the private redis-server or Redis Cluster of a run (persistence off); [`procs`]: child-process
//!   helpers.
//! * [`wsbench`]: the `ws` scenario (idle connections → RSS per connection; broadcast fan-out at rising
//!   rates), ferry's gateway beside the Node `ws` peer, with the sockets in `ws-client` child processes;
//!   [`proxies`]: `ferry balancer` and HAProxy in front of the gateway (`ws --via`).
//! * [`api`]: the `api` scenario (HTTP submits, completion over WebSocket). [`gw`]: the gateway, worker and
//!   Node peer processes, tokens, RSS; [`hist`]: the latency histogram the client processes ship.
//! * [`autoscale`]: `ferry autoscaler` (local actuator) under a burst of jobs: backlog and workers over time,
//!   and their plot.
//! * [`soak`]: a whole cluster under mixed load for a set time (submits of every kind, cancels, WebSocket churn,
//!   publishes), sampled for RSS, open files and Redis/PostgreSQL memory, then checked for lost or doubled jobs.
//!
//! * [`submit`]: single-job HTTP submits with no worker (wrk at the maximum, then paced at half of it),
//!   ferry's gateway beside Fastify + JWT + BullMQ (`loadtest/submit-peer`).
//! * [`rebalance`]: N gateways and C WebSocket clients placed as a balancer would, one more gateway joins:
//!   connections per gateway over time (CSV) as the gateways rebalance.
//!
//! Every load loop here is bounded in count and time, and all traffic goes to 127.0.0.1.

pub mod api;
pub mod autoscale;
pub mod bullmq;
pub mod ferry;
pub mod gw;
pub mod hist;
pub mod paced;
pub mod procs;
pub mod proxies;
pub mod rebalance;
pub mod redis_cpu;
pub mod report;
pub mod server;
pub mod soak;
pub mod stats;
pub mod submit;
pub mod wsbench;
