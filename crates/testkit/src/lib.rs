//! Real servers for integration tests: [`RedisServer`] starts a `redis-server` and [`PostgresServer`] a
//! PostgreSQL cluster (initdb + pg_ctl), each on a free ephemeral port of 127.0.0.1 and in its own temp dir, waits
//! until it answers, and tears it down on drop. Both can be stopped, killed and restarted in place so tests can
//! inject faults (a Redis restart under a running worker, a PostgreSQL outage under the recorder).
//!
//! * [`redis`]: the `redis-server` wrapper and a `redis-cli` helper.
//! * [`redis_cluster`]: a Redis Cluster of such servers ([`RedisCluster`]: masters, replicas, resharding).
//! * [`postgres`]: the PostgreSQL wrapper and a `psql` helper.
//! * [`netns`]: a private network namespace linked to the test's by a veth pair, for real partitions
//!   ([`Netns::cut`], [`Netns::heal`]); needs root and `ip`, and says so when they are missing.
//! * [`tls`]: throwaway certificates ([`TestCerts`]) for TLS servers ([`RedisServer::start_tls`],
//!   [`PostgresServer::start_tls`]).
//! * [`eventually`]: poll an async check until it holds, or fail naming what was awaited; the one such helper
//!   of the workspace's tests.
//! * [`free_port`]: an unused loopback port.
//! * `faulty` (feature `faults`): `FaultyBroker`, a real engine behind a switch per broker method, the one broker
//!   test double.
//! * `cluster` (feature `cluster`): an in-process ferry cluster — Redis shards, PostgreSQL, gateways, workers and
//!   a balancer built from the role libraries on port 0 — with typed clients, for multi-node tests.
//!
//! The servers' API is synchronous on purpose (the cluster harness, which runs async nodes, is async), so that sync tests and tokio tests use it alike (a start takes a few
//! hundred milliseconds; call it before entering the runtime or accept the brief block). This crate must never
//! touch the machine's own services (the system Redis on 6379 and PostgreSQL on 5432): every server it starts
//! is private to one test, and nothing here mocks a server.

#[cfg(feature = "cluster")]
pub mod cluster;
mod eventually;
#[cfg(feature = "faults")]
pub mod faulty;
mod guard;
pub mod netns;
pub mod postgres;
pub mod redis;
pub mod redis_cluster;
pub mod tls;

use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::Mutex;

pub use eventually::eventually;
pub use netns::{Netns, NetnsError};
pub use postgres::{PostgresServer, psql};
pub use redis::{RedisServer, redis_cli};
pub use redis_cluster::{ClusterNode, RedisCluster};
pub use tls::TestCerts;

/// Ports this process already handed out. A port is only free until someone binds it; remembering what we gave
/// away stops two servers started at the same moment in one test binary from racing for the same number.
static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A loopback TCP port that nothing listens on right now.
///
/// The port is found by binding `127.0.0.1:0` and dropping the listener, so another process can still take it
/// before the caller binds it: servers started by this crate retry with a fresh port when that happens.
pub fn free_port() -> u16 {
    for _ in 0..64 {
        let port = match TcpListener::bind(("127.0.0.1", 0)).and_then(|l| l.local_addr()) {
            Ok(addr) => addr.port(),
            Err(_) => continue,
        };
        let mut seen = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        if seen.get_or_insert_with(HashSet::new).insert(port) {
            return port;
        }
    }
    // Every attempt returned a port we already gave out: the ephemeral range is nearly exhausted, and a
    // duplicate is still better than a panic (the server start will fail and retry).
    TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("cannot bind any port on 127.0.0.1")
}

/// How many times a server start picks a new port after losing a race for the previous one.
const PORT_ATTEMPTS: usize = 5;
