//! What carries a region's decision out: the [`Actuator`] trait, and the `metrics` and `local` actuators (the
//! `kubernetes` one is in [`crate::kubernetes`]).

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Mutex;

use async_trait::async_trait;
use tokio::process::{Child, Command};

use crate::config::{LocalActuator, Region};

#[derive(Debug, thiserror::Error)]
pub enum ActuatorError {
    #[error("{0}")]
    Failed(String),
}

/// Sets the size of one region's worker pool.
#[async_trait]
pub trait Actuator: Send + Sync + std::fmt::Debug {
    /// Workers of the pool now (counting only those not already draining).
    async fn current(&self) -> Result<u32, ActuatorError>;

    /// Make the pool `desired` workers. A scale-down drains: removed workers get SIGTERM and finish or release
    /// their jobs.
    async fn scale(&self, desired: u32) -> Result<(), ActuatorError>;

    /// Run `workers` extra workers that consume `from`'s queues on `from`'s Redis (spill-over; 0 stops them).
    async fn spill(&self, from: &Region, workers: u32) -> Result<(), ActuatorError>;
}

/// Exports the decision only: `current` is the last decision (what an HPA reading the metric was told).
#[derive(Debug, Default)]
pub struct MetricsOnly {
    desired: Mutex<Option<u32>>,
}

#[async_trait]
impl Actuator for MetricsOnly {
    async fn current(&self) -> Result<u32, ActuatorError> {
        Ok(self
            .desired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .unwrap_or(0))
    }

    async fn scale(&self, desired: u32) -> Result<(), ActuatorError> {
        *self.desired.lock().unwrap_or_else(|p| p.into_inner()) = Some(desired);
        Ok(())
    }

    async fn spill(&self, _from: &Region, _workers: u32) -> Result<(), ActuatorError> {
        Ok(())
    }
}

/// `ferry worker` processes on this machine, children of the autoscaler.
#[derive(Debug)]
pub struct Local {
    bin: PathBuf,
    region: Region,
    config: LocalActuator,
    pools: Mutex<Pools>,
}

#[derive(Debug, Default)]
struct Pools {
    /// The region's own workers, oldest first.
    own: Vec<Child>,
    /// Spill-over workers per helped region.
    spill: std::collections::BTreeMap<String, Vec<Child>>,
    /// Workers told to stop, until they have exited.
    draining: Vec<Child>,
    next: u64,
}

impl Local {
    pub fn new(region: Region, config: LocalActuator) -> Result<Self, ActuatorError> {
        let bin = match &config.ferry_bin {
            Some(b) => b.clone(),
            None => std::env::current_exe()
                .map_err(|e| ActuatorError::Failed(format!("cannot find the ferry binary: {e}")))?,
        };
        Ok(Self {
            bin,
            region,
            config,
            pools: Mutex::new(Pools::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pools> {
        self.pools.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn spawn(&self, target: &Region, n: u64) -> Result<Child, ActuatorError> {
        let consumer = format!("{}-local-{}-{}", self.region.name, std::process::id(), n);
        let mut cmd = Command::new(&self.bin);
        cmd.arg("worker")
            .arg("--redis")
            .arg(target.redis.join(","))
            .arg("--queues")
            .arg(target.queues.join(","))
            .arg("--consumer")
            .arg(&consumer)
            .arg("--admin-listen")
            .arg("off")
            // Workers do not outlive the autoscaler, even when it is killed.
            .arg("--exit-with-parent")
            .args(&self.config.worker_args)
            // The autoscaler's own settings are not the worker's.
            .env_remove("FERRY_CONFIG")
            .env_remove("FERRY_REDIS_URLS")
            .env_remove("FERRY_QUEUES")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true);
        cmd.spawn()
            .map_err(|e| ActuatorError::Failed(format!("cannot start {}: {e}", self.bin.display())))
    }

    /// Ask `child` to drain and stop (SIGTERM), keeping it until it exits.
    fn retire(pools: &mut Pools, child: Child) {
        if let Some(pid) = child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        pools.draining.push(child);
    }

    fn resize(
        &self,
        pools: &mut Pools,
        target: &Region,
        spill: Option<&str>,
        desired: u32,
    ) -> Result<(), ActuatorError> {
        let desired = desired as usize;
        loop {
            let len = match spill {
                None => pools.own.len(),
                Some(k) => pools.spill.get(k).map_or(0, Vec::len),
            };
            if len == desired {
                return Ok(());
            }
            if len < desired {
                pools.next += 1;
                let child = self.spawn(target, pools.next)?;
                match spill {
                    None => pools.own.push(child),
                    Some(k) => pools.spill.entry(k.to_owned()).or_default().push(child),
                }
            } else {
                // The newest first: the oldest have warmed up.
                let child = match spill {
                    None => pools.own.pop(),
                    Some(k) => pools.spill.get_mut(k).and_then(Vec::pop),
                };
                if let Some(child) = child {
                    Self::retire(pools, child);
                }
            }
        }
    }

    /// Forget workers that have exited (drained, or died: a dead one is replaced at the next decision).
    fn reap(pools: &mut Pools) {
        let alive = |c: &mut Child| matches!(c.try_wait(), Ok(None));
        pools.draining.retain_mut(alive);
        pools.own.retain_mut(alive);
        for v in pools.spill.values_mut() {
            v.retain_mut(alive);
        }
    }

    /// Stop every worker (SIGTERM) and wait for them to drain.
    pub async fn shutdown(&self) {
        let mut children = {
            let mut p = self.lock();
            let mut all: Vec<Child> = p.own.drain(..).collect();
            for (_, v) in std::mem::take(&mut p.spill) {
                all.extend(v);
            }
            for c in all {
                Self::retire(&mut p, c);
            }
            std::mem::take(&mut p.draining)
        };
        for c in &mut children {
            let _ = c.wait().await;
        }
    }
}

#[async_trait]
impl Actuator for Local {
    async fn current(&self) -> Result<u32, ActuatorError> {
        let mut p = self.lock();
        Self::reap(&mut p);
        Ok(p.own.len() as u32)
    }

    async fn scale(&self, desired: u32) -> Result<(), ActuatorError> {
        let mut p = self.lock();
        Self::reap(&mut p);
        self.resize(&mut p, &self.region, None, desired)
    }

    async fn spill(&self, from: &Region, workers: u32) -> Result<(), ActuatorError> {
        let mut p = self.lock();
        Self::reap(&mut p);
        self.resize(&mut p, from, Some(&from.name), workers)
    }
}
