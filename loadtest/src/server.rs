//! A throw-away redis-server for one benchmark run: `ferry_testkit::RedisServer` (loopback, free ephemeral port,
//! own temp dir, killed on drop) with persistence off (`--appendonly no`, no RDB snapshots), so the figures
//! measure the queue and not fsync.

use anyhow::Context;
use ferry_testkit::RedisServer;

/// Arguments on top of the testkit defaults.
const BENCH_ARGS: &[&str] = &["--appendonly", "no", "--save", ""];

/// A running redis-server owned by the benchmark.
#[derive(Debug)]
pub struct BenchRedis {
    server: RedisServer,
    pid: u32,
}

impl BenchRedis {
    /// Start the server and wait until it answers (the testkit start blocks; it runs off the async threads).
    pub async fn start() -> anyhow::Result<Self> {
        let server = tokio::task::spawn_blocking(|| RedisServer::start_with(BENCH_ARGS))
            .await
            .context("redis-server start task")??;
        let pid = server.pid().context("redis-server has no pid")?;
        Ok(Self { server, pid })
    }

    pub fn url(&self) -> String {
        self.server.url()
    }

    pub fn port(&self) -> u16 {
        self.server.port()
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }
}
