//! What carries a region's decision out: the [`Actuator`] trait, and the `metrics` and `local` actuators (the
//! `kubernetes` one is in [`crate::kubernetes`]).

use std::collections::BTreeMap;
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

/// Jobs each worker holds now: consumer name → jobs leased to it and not yet finished (a worker holding none is
/// absent). Read from the broker before a scale-down, so that the idlest workers are the ones stopped.
pub type Held = BTreeMap<String, u64>;

/// Sets the size of one region's worker pool.
#[async_trait]
pub trait Actuator: Send + Sync + std::fmt::Debug {
    /// Workers of the pool now (counting only those not already draining).
    async fn current(&self) -> Result<u32, ActuatorError>;

    /// Make the pool `desired` workers. A scale-down stops the workers holding the fewest jobs (`held`), and
    /// drains: removed workers get SIGTERM and finish or release their jobs.
    async fn scale(&self, desired: u32, held: &Held) -> Result<(), ActuatorError>;

    /// Run `workers` extra workers that consume `from`'s queues on `from`'s Redis (spill-over; 0 stops them);
    /// `held` as for [`Actuator::scale`], read from `from`'s broker.
    async fn spill(&self, from: &Region, workers: u32, held: &Held) -> Result<(), ActuatorError>;
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

    async fn scale(&self, desired: u32, _held: &Held) -> Result<(), ActuatorError> {
        *self.desired.lock().unwrap_or_else(|p| p.into_inner()) = Some(desired);
        Ok(())
    }

    async fn spill(
        &self,
        _from: &Region,
        _workers: u32,
        _held: &Held,
    ) -> Result<(), ActuatorError> {
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

/// A running worker and its consumer name (which the broker's leases name).
#[derive(Debug)]
struct Worker {
    child: Child,
    consumer: String,
}

#[derive(Debug, Default)]
struct Pools {
    /// The region's own workers, oldest first.
    own: Vec<Worker>,
    /// Spill-over workers per helped region.
    spill: BTreeMap<String, Vec<Worker>>,
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

    /// The consumer names of the region's own workers, oldest first.
    pub fn consumers(&self) -> Vec<String> {
        let mut p = self.lock();
        Self::reap(&mut p);
        p.own.iter().map(|w| w.consumer.clone()).collect()
    }

    fn spawn(&self, target: &Region, n: u64) -> Result<Worker, ActuatorError> {
        let consumer = format!("{}-local-{}-{}", self.region.name, std::process::id(), n);
        let mut cmd = Command::new(&self.bin);
        cmd.arg("worker")
            .args(target.worker_redis_args())
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
            .env_remove("FERRY_REDIS_CLUSTER")
            .env_remove("FERRY_REDIS_CLUSTER_VSHARDS")
            .env_remove("FERRY_QUEUES")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true);
        let child = cmd.spawn().map_err(|e| {
            ActuatorError::Failed(format!("cannot start {}: {e}", self.bin.display()))
        })?;
        Ok(Worker { child, consumer })
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
        held: &Held,
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
                let worker = self.spawn(target, pools.next)?;
                match spill {
                    None => pools.own.push(worker),
                    Some(k) => pools.spill.entry(k.to_owned()).or_default().push(worker),
                }
            } else {
                let pool = match spill {
                    None => Some(&mut pools.own),
                    Some(k) => pools.spill.get_mut(k),
                };
                let worker = pool.and_then(|pool| {
                    let names: Vec<&str> = pool.iter().map(|w| w.consumer.as_str()).collect();
                    idlest(&names, held).map(|i| pool.remove(i))
                });
                if let Some(worker) = worker {
                    Self::retire(pools, worker.child);
                }
            }
        }
    }

    /// Forget workers that have exited (drained, or died: a dead one is replaced at the next decision).
    fn reap(pools: &mut Pools) {
        let alive = |c: &mut Child| matches!(c.try_wait(), Ok(None));
        pools.draining.retain_mut(alive);
        pools.own.retain_mut(|w| alive(&mut w.child));
        for v in pools.spill.values_mut() {
            v.retain_mut(|w| alive(&mut w.child));
        }
    }

    /// Stop every worker (SIGTERM) and wait for them to drain.
    pub async fn shutdown(&self) {
        let mut children = {
            let mut p = self.lock();
            let mut all: Vec<Child> = p.own.drain(..).map(|w| w.child).collect();
            for (_, v) in std::mem::take(&mut p.spill) {
                all.extend(v.into_iter().map(|w| w.child));
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

    async fn scale(&self, desired: u32, held: &Held) -> Result<(), ActuatorError> {
        let mut p = self.lock();
        Self::reap(&mut p);
        self.resize(&mut p, &self.region, None, desired, held)
    }

    async fn spill(&self, from: &Region, workers: u32, held: &Held) -> Result<(), ActuatorError> {
        let mut p = self.lock();
        Self::reap(&mut p);
        self.resize(&mut p, from, Some(&from.name), workers, held)
    }
}

/// Which of `consumers` (a pool, oldest first) to stop: the one holding the fewest jobs, and of those the newest
/// (the older ones have warmed up). `None` for an empty pool.
pub fn idlest(consumers: &[&str], held: &Held) -> Option<usize> {
    consumers
        .iter()
        .enumerate()
        .rev()
        .min_by_key(|(_, c)| held.get(**c).copied().unwrap_or(0))
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(pairs: &[(&str, u64)]) -> Held {
        pairs.iter().map(|(c, n)| ((*c).to_owned(), *n)).collect()
    }

    #[test]
    fn the_worker_holding_the_fewest_jobs_goes_first() {
        let pool = ["a", "b", "c"];
        assert_eq!(
            idlest(&pool, &held(&[("a", 2), ("b", 0), ("c", 5)])),
            Some(1)
        );
        // Absent from the leases: holds none.
        assert_eq!(idlest(&pool, &held(&[("b", 1), ("c", 5)])), Some(0));
        // Leases of consumers outside the pool change nothing.
        assert_eq!(
            idlest(&pool, &held(&[("a", 1), ("b", 1), ("c", 1), ("zz", 0)])),
            Some(2)
        );
    }

    #[test]
    fn among_equally_idle_workers_the_newest_goes_first() {
        assert_eq!(idlest(&["a", "b", "c"], &Held::new()), Some(2));
        assert_eq!(idlest(&["a", "b", "c"], &held(&[("c", 3)])), Some(1));
        assert_eq!(idlest(&[], &Held::new()), None);
    }
}
