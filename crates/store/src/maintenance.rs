//! Upkeep of the record: partitions ahead of need, and retention.
//!
//! `jobs` and `job_events` are partitioned by time slot (the creation time inside the UUIDv7 job id; daily by
//! default; migrations/V3). Every worker with a store runs a [`Maintainer`]: a pass at start, then one every
//! `interval`. A pass asks [`Store::maintain`] to make sure the slots from now to `ahead` exist and, with a
//! retention, to drop the slots that ended more than the retention ago, keeping their jobs that are not finished
//! or finished less than the retention ago (they move to the default partitions). No leader: every node runs
//! passes, and the database lets one do the work at a time (an advisory lock; the others find nothing to do).
//! Each drop is a short transaction of its own that gives up after `lock_timeout` when it cannot take the
//! tables' locks at once (a long query holding them), so writers are never queued behind it for longer than
//! that; it is retried a few times and then at the next pass.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ferry_core::now_ms;
use tokio_util::sync::CancellationToken;

use crate::Store;

/// Settings of the record's upkeep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaintenanceConfig {
    /// Time between passes. Default 10 min.
    pub interval: Duration,
    /// Slots exist at least this far ahead of now. Default 3 days, so a record keeps its partitions through
    /// days with every worker down.
    pub ahead: Duration,
    /// A slot's length (slots are aligned to the Unix epoch: daily slots are UTC days). Default 1 day; at least
    /// an hour. Changing it applies to slots created from then on.
    pub width: Duration,
    /// Finished jobs and their events are kept this long after they finished; `None` keeps everything.
    pub retention: Option<Duration>,
    /// Longest a drop waits for the tables' locks before giving up (and being retried). Default 100 ms.
    pub lock_timeout: Duration,
}

impl Default for MaintenanceConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(600),
            ahead: Duration::from_secs(3 * 86_400),
            width: Duration::from_secs(86_400),
            retention: None,
            lock_timeout: Duration::from_millis(100),
        }
    }
}

impl MaintenanceConfig {
    /// The first broken rule, with the field (as named in this struct).
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if self.width < Duration::from_secs(3600) {
            return Err(("width", "must be at least an hour".into()));
        }
        if self
            .retention
            .is_some_and(|r| r < Duration::from_secs(3600))
        {
            return Err(("retention", "must be at least an hour".into()));
        }
        for (field, d) in [
            ("interval", self.interval),
            ("lock_timeout", self.lock_timeout),
        ] {
            if d.is_zero() {
                return Err((field, "must be longer than zero".into()));
            }
        }
        Ok(())
    }
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MaintenanceReport {
    /// Slots created (each a partition of `jobs` and one of `job_events`).
    pub created: u64,
    /// Slots dropped by retention.
    pub dropped: u64,
    /// Jobs of dropped slots kept (not finished, or finished within the retention), with their events.
    pub kept: u64,
    /// Finished jobs past the retention deleted one by one (those kept earlier, now expired; the memory store's).
    pub deleted: u64,
    /// Longest a drop held the tables' locks (its transaction, from its first statement to its commit).
    pub longest_drop: Duration,
}

/// What the maintainer has done, for metrics and tests.
#[derive(Debug, Default)]
pub struct MaintenanceStats {
    pub passes: AtomicU64,
    pub failures: AtomicU64,
    pub created: AtomicU64,
    pub dropped: AtomicU64,
    /// Milliseconds, longest drop transaction since start.
    pub longest_drop_ms: AtomicU64,
}

/// The upkeep task of one node. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Maintainer {
    store: Arc<dyn Store>,
    config: Arc<MaintenanceConfig>,
    stats: Arc<MaintenanceStats>,
}

impl Maintainer {
    pub fn new(store: Arc<dyn Store>, config: MaintenanceConfig) -> Self {
        Self {
            store,
            config: Arc::new(config),
            stats: Arc::default(),
        }
    }

    pub fn stats(&self) -> &Arc<MaintenanceStats> {
        &self.stats
    }

    /// Register `ferry_record_partitions_dropped_total`, `ferry_record_maintenance_failures_total` and
    /// `ferry_record_drop_seconds_max`, read at scrape time.
    pub fn register_metrics(
        &self,
        registry: &ferry_telemetry::prometheus::Registry,
    ) -> ferry_telemetry::prometheus::Result<()> {
        use ferry_telemetry::metrics::{FnCollector, FnKind};
        let s = self.stats.clone();
        registry.register(Box::new(FnCollector::single(
            "ferry_record_partitions_dropped_total",
            "Time slots of the record (a jobs and a job_events partition) dropped by retention on this node.",
            FnKind::Counter,
            move || s.dropped.load(Ordering::Relaxed) as f64,
        )?))?;
        let s = self.stats.clone();
        registry.register(Box::new(FnCollector::single(
            "ferry_record_maintenance_failures_total",
            "Passes of the record's upkeep that failed (retried at the next interval).",
            FnKind::Counter,
            move || s.failures.load(Ordering::Relaxed) as f64,
        )?))?;
        let s = self.stats.clone();
        registry.register(Box::new(FnCollector::single(
            "ferry_record_drop_seconds_max",
            "Longest a retention drop held the record's tables locked on this node since it started.",
            FnKind::Gauge,
            move || s.longest_drop_ms.load(Ordering::Relaxed) as f64 / 1000.0,
        )?))?;
        Ok(())
    }

    /// A pass now, then one every interval, until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        tracing::info!(
            interval_ms = self.config.interval.as_millis() as u64,
            retention_s = self.config.retention.map(|r| r.as_secs()),
            "record maintenance started"
        );
        loop {
            tokio::select! {
                _ = self.pass() => {}
                _ = shutdown.cancelled() => return,
            }
            tokio::select! {
                _ = tokio::time::sleep(self.config.interval) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// One pass, logged and counted.
    pub async fn pass(&self) -> Option<MaintenanceReport> {
        self.stats.passes.fetch_add(1, Ordering::Relaxed);
        match self.store.maintain(&self.config, now_ms()).await {
            Ok(r) => {
                let s = &self.stats;
                s.created.fetch_add(r.created, Ordering::Relaxed);
                s.dropped.fetch_add(r.dropped, Ordering::Relaxed);
                s.longest_drop_ms.fetch_max(
                    u64::try_from(r.longest_drop.as_millis()).unwrap_or(u64::MAX),
                    Ordering::Relaxed,
                );
                if r.created + r.dropped + r.deleted > 0 {
                    tracing::info!(
                        created = r.created,
                        dropped = r.dropped,
                        kept = r.kept,
                        deleted = r.deleted,
                        longest_drop_ms = r.longest_drop.as_millis() as u64,
                        "record maintenance pass"
                    );
                }
                Some(r)
            }
            Err(e) => {
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "record maintenance pass failed; retried at the next interval");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_name_the_field() {
        assert_eq!(MaintenanceConfig::default().check(), Ok(()));
        let c = MaintenanceConfig {
            width: Duration::from_secs(60),
            ..Default::default()
        };
        assert_eq!(c.check().unwrap_err().0, "width");
        let c = MaintenanceConfig {
            retention: Some(Duration::from_secs(59)),
            ..Default::default()
        };
        assert_eq!(c.check().unwrap_err().0, "retention");
        let c = MaintenanceConfig {
            lock_timeout: Duration::ZERO,
            ..Default::default()
        };
        assert_eq!(c.check().unwrap_err().0, "lock_timeout");
    }
}
