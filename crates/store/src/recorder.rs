//! The recorder: copies the engine's durable event log into the [`Store`], nothing lost, nothing twice.
//!
//! One task per log shard reads entries as a consumer of the [`RECORDER_GROUP`] consumer group, gathers them
//! into a batch (at most `batch_max` events and about `batch_max_bytes` of them, or whatever arrived within
//! `max_delay` of the batch's first entry), writes the batch in one store transaction, and only then
//! acknowledges the entries. So:
//!
//! * a crash between commit and acknowledgement redelivers the batch, which the store skips (event ids are
//!   unique): at least once on the wire, exactly once in the table;
//! * entries a dead recorder read and never acknowledged stay pending in the group; every `reclaim_idle / 4`
//!   each recorder asks for entries pending longer than `reclaim_idle` and takes them over, so a dead
//!   recorder's events reach the store at most `reclaim_idle × 1.25` after it read them (12.5 s by default, under
//!   the engine's 30 s visibility timeout: [`RecorderConfig::takeover_within`]);
//! * a live recorder acknowledges what it read within [`RecorderConfig::longest_hold`] while the store answers
//!   (gathering, waiting for a writer, one write, each write bounded by `write_timeout`), and `reclaim_idle` must
//!   exceed that ([`RecorderConfig::check`]), so entries are only taken from a recorder that died or whose store
//!   fails. Taking over from one whose store fails is harmless: the store skips events it already holds, and
//!   the recorder that took them cannot write them either until the store is back;
//! * several recorders (one per worker node) share the log; their batches can commit out of order, which the
//!   store's order-key rule makes harmless.
//!
//! PostgreSQL is wrapped in a circuit breaker: after repeated failures the recorder stops writing, holds its one
//! batch (reading no more: the log holds the backlog, and the gateway sheds submissions when it passes the
//! high-water mark) and probes again when the breaker half-opens.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ferry_broker::{EventLog, LogEntry, LogPosition, RECORDER_GROUP};
use ferry_core::breaker::{Breaker, BreakerConfig, BreakerState};
use ferry_core::{Event, now_ms};
use tokio_util::sync::CancellationToken;

use crate::{Store, StoreError};

/// Recorder settings.
#[derive(Debug, Clone)]
pub struct RecorderConfig {
    /// This recorder's consumer name in the group (the worker's consumer name): must be unique per process.
    pub consumer: String,
    /// Most events written in one transaction (default 2,000). Reads ask for as many log entries as fit this
    /// at the size of the largest entries seen lately (an entry holds a whole script call's events: up to 1,000
    /// for a batch enqueue), so a batch holds about this many events; one that holds more (entries grew
    /// suddenly) is written in several transactions of at most this many.
    pub batch_max: usize,
    /// Most bytes of events (their size in the log) a batch gathers (default 16 MiB), whatever their count:
    /// `job.queued` events carry their job's payload, so 2,000 of them can weigh 2,000 payloads. Reads are sized
    /// by this too, at the size of the largest entries seen lately, starting from one entry; a batch passes it
    /// by less than one entry unless entries grew suddenly. So a recorder holds at most about
    /// `(writers + 1) × batch_max_bytes` of events per shard.
    pub batch_max_bytes: usize,
    /// Longest an event waits in the batch before it is written (default 50 ms).
    pub max_delay: Duration,
    /// Log entries asked for per read (default 256).
    pub read_count: usize,
    /// Batches being written at once per shard (default 4): the next batches are read and folded while earlier
    /// ones commit. At most this many batches, plus the one being gathered, are held in memory, and each takes a
    /// pooled connection while it is written.
    ///
    /// Each transaction in flight is a PostgreSQL backend asking for the CPU (and a round trip, a commit's flush
    /// to wait for); with 4 instead of 2 the recorder keeps a larger share of a machine PostgreSQL shares with
    /// Redis and the worker. Measured draining a backlog of 200,000 jobs on two cores (loadtest/README.md,
    /// "The recorder's share of the machine"): the record trails the engine by 1.4–1.6 s at the median instead
    /// of 1.9–2.0 s.
    pub writers: usize,
    /// Entries pending (read, not acknowledged) this long belonged to a recorder that died; take them over
    /// (default 10 s; checked every quarter of it). Must exceed [`RecorderConfig::longest_hold`].
    pub reclaim_idle: Duration,
    /// Longest one store write may take before it counts as failed (default 4 s: a batch is two set-based
    /// statements, which take milliseconds; the bound keeps a live recorder's entries from looking abandoned).
    pub write_timeout: Duration,
    pub breaker: BreakerConfig,
}

impl RecorderConfig {
    pub fn new(consumer: impl Into<String>) -> Self {
        Self {
            consumer: consumer.into(),
            batch_max: 2000,
            batch_max_bytes: 16 << 20,
            max_delay: Duration::from_millis(50),
            read_count: 256,
            writers: 4,
            reclaim_idle: Duration::from_secs(10),
            write_timeout: Duration::from_secs(4),
            breaker: BreakerConfig::default(),
        }
    }

    /// How often a recorder looks for entries a dead recorder left: a quarter of `reclaim_idle`.
    pub fn reclaim_every(&self) -> Duration {
        self.reclaim_idle / 4
    }

    /// Longest after a recorder read entries and died before another running recorder takes them over: they
    /// must be `reclaim_idle` old, and are found at the next check.
    pub fn takeover_within(&self) -> Duration {
        self.reclaim_idle + self.reclaim_every()
    }

    /// Longest a live recorder holds entries before acknowledging them while its store answers: `max_delay`
    /// gathering them, one write of another batch to wait for (every writer busy), its own write (each bounded by
    /// `write_timeout`), and [`ACK_ALLOWANCE`] for the acknowledgement and its retries.
    ///
    /// One write is one transaction while entries stay the size reads are sized by. A batch read just before its
    /// entries grew (an enqueue call of many more jobs than the ones before) is written in several transactions
    /// of at most `batch_max` events, each bounded by `write_timeout`, and may be held longer than this: another
    /// recorder may then take its entries over, which only repeats writes the store skips.
    pub fn longest_hold(&self) -> Duration {
        self.max_delay + self.write_timeout * 2 + ACK_ALLOWANCE
    }

    /// Check every rule; the first broken one is reported with its field (as written in this struct,
    /// `breaker.` fields with their prefix). Counts and durations must be at least 1, and `reclaim_idle` must
    /// exceed [`longest_hold`](Self::longest_hold), or live recorders take each other's entries during ordinary
    /// slow writes; that error says which settings to change. [`Recorder::new`] does not check:
    /// `ferry_worker::WorkerNode::build` does, and so does the cli before it connects.
    pub fn check(&self) -> Result<(), ConfigError> {
        let at_least_one: [(&'static str, u128); 7] = [
            ("batch_max", self.batch_max as u128),
            ("batch_max_bytes", self.batch_max_bytes as u128),
            ("read_count", self.read_count as u128),
            ("writers", self.writers as u128),
            ("write_timeout", self.write_timeout.as_millis()),
            (
                "breaker.failure_threshold",
                u128::from(self.breaker.failure_threshold),
            ),
            ("breaker.open_for", self.breaker.open_for.as_millis()),
        ];
        if let Some((field, _)) = at_least_one.iter().find(|(_, v)| *v == 0) {
            return Err(ConfigError {
                field,
                message: "must be at least 1".into(),
            });
        }
        if self.reclaim_idle <= self.longest_hold() {
            return Err(ConfigError {
                field: "reclaim_idle",
                message: format!(
                    "must exceed max delay + 2 × write timeout + {} ms = {} ms, or recorders that are alive take \
                     each other's entries; raise it or lower the write timeout",
                    ACK_ALLOWANCE.as_millis(),
                    self.longest_hold().as_millis()
                ),
            });
        }
        Ok(())
    }
}

/// A [`RecorderConfig`] that breaks a rule: the field (as named in the struct) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("recorder {field}: {message}")]
pub struct ConfigError {
    pub field: &'static str,
    pub message: String,
}

/// What [`RecorderConfig::longest_hold`] allows for acknowledging a written batch (its call and up to four
/// retries 50–400 ms apart).
pub const ACK_ALLOWANCE: Duration = Duration::from_secs(1);

/// Register `ferry_db_pool_connections{state}` and `ferry_db_pool_max` for `store`, read at scrape time (nothing
/// is reported for a store without a pool).
pub fn register_pool_metrics(
    registry: &ferry_telemetry::prometheus::Registry,
    store: Arc<dyn Store>,
) -> ferry_telemetry::prometheus::Result<()> {
    use ferry_telemetry::metrics::{FnCollector, FnKind};
    let st = store.clone();
    registry.register(Box::new(FnCollector::new(
        "ferry_db_pool_connections",
        "PostgreSQL pool connections: size (open), available (idle), waiting (callers waiting for one).",
        FnKind::Gauge,
        &["state"],
        move |out| {
            if let Some(p) = st.pool_stats() {
                out.push((vec!["size".into()], p.size as f64));
                out.push((vec!["available".into()], p.available as f64));
                out.push((vec!["waiting".into()], p.waiting as f64));
            }
        },
    )?))?;
    registry.register(Box::new(FnCollector::new(
        "ferry_db_pool_max",
        "Configured PostgreSQL pool size.",
        FnKind::Gauge,
        &[],
        move |out| {
            if let Some(p) = store.pool_stats() {
                out.push((Vec::new(), p.max as f64));
            }
        },
    )?))?;
    Ok(())
}

/// What a recorder has done, for metrics and tests.
#[derive(Debug, Default)]
pub struct RecorderStats {
    /// Events written that were new to the store.
    pub recorded: AtomicU64,
    /// Events delivered again and skipped by the store.
    pub duplicates: AtomicU64,
    /// Transactions committed.
    pub batches: AtomicU64,
    /// Store writes that failed (each retried).
    pub write_failures: AtomicU64,
    /// Milliseconds from the oldest event of the last committed batch to its commit.
    pub last_lag_ms: AtomicU64,
}

/// The recorder of one process. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Recorder {
    broker: Arc<dyn EventLog>,
    store: Arc<dyn Store>,
    config: Arc<RecorderConfig>,
    breaker: Breaker,
    stats: Arc<RecorderStats>,
}

impl Recorder {
    pub fn new(broker: Arc<dyn EventLog>, store: Arc<dyn Store>, config: RecorderConfig) -> Self {
        let breaker = Breaker::new(config.breaker);
        Self {
            broker,
            store,
            config: Arc::new(config),
            breaker,
            stats: Arc::default(),
        }
    }

    pub fn stats(&self) -> &Arc<RecorderStats> {
        &self.stats
    }

    /// The breaker around the store (its state is a metric).
    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    /// Register the recorder's metrics in `registry`, read at scrape time: `ferry_recorder_lag_seconds`,
    /// `ferry_recorder_events_total`, `ferry_recorder_write_failures_total`,
    /// `ferry_jobs_duplicate_completions_total`, `ferry_breaker_state` and
    /// `ferry_breaker_opened_total` (`dependency="postgres"`), and the store's pool gauges.
    pub fn register_metrics(
        &self,
        registry: &ferry_telemetry::prometheus::Registry,
    ) -> ferry_telemetry::prometheus::Result<()> {
        use ferry_telemetry::metrics::{FnCollector, FnKind};
        let s = self.stats.clone();
        registry.register(Box::new(FnCollector::single(
            "ferry_recorder_lag_seconds",
            "Event time to commit, oldest event of the last committed batch.",
            FnKind::Gauge,
            move || s.last_lag_ms.load(Ordering::Relaxed) as f64 / 1000.0,
        )?))?;
        let s = self.stats.clone();
        registry.register(Box::new(FnCollector::single(
            "ferry_recorder_events_total",
            "Events recorded (new to the store).",
            FnKind::Counter,
            move || s.recorded.load(Ordering::Relaxed) as f64,
        )?))?;
        let s = self.stats.clone();
        registry.register(Box::new(FnCollector::single(
            "ferry_recorder_write_failures_total",
            "Failed batch writes (retried).",
            FnKind::Counter,
            move || s.write_failures.load(Ordering::Relaxed) as f64,
        )?))?;
        let st = self.store.clone();
        registry.register(Box::new(FnCollector::single(
            "ferry_jobs_duplicate_completions_total",
            "Completions of jobs already completed, recorded as job.duplicate_completion (a rerun after Redis lost the first).",
            FnKind::Counter,
            move || st.duplicate_completions() as f64,
        )?))?;
        let b = self.breaker.clone();
        registry.register(Box::new(FnCollector::new(
            "ferry_breaker_state",
            "Circuit breaker state by dependency: 0 closed, 1 half-open, 2 open.",
            FnKind::Gauge,
            &["dependency"],
            move |out| out.push((vec!["postgres".into()], f64::from(b.state_code()))),
        )?))?;
        let b = self.breaker.clone();
        registry.register(Box::new(FnCollector::new(
            "ferry_breaker_opened_total",
            "Times the circuit breaker opened, by dependency.",
            FnKind::Counter,
            &["dependency"],
            move |out| out.push((vec!["postgres".into()], b.opened_total() as f64)),
        )?))?;
        register_pool_metrics(registry, self.store.clone())
    }

    /// Record until `shutdown`; then write what was already read and return.
    pub async fn run(self, shutdown: CancellationToken) {
        let shards = self.broker.log_shards();
        tracing::info!(
            consumer = %self.config.consumer,
            shards,
            "recorder started"
        );
        let mut tasks = tokio::task::JoinSet::new();
        for shard in 0..shards {
            tasks.spawn(self.clone().run_shard(shard, shutdown.clone()));
        }
        while tasks.join_next().await.is_some() {}
        tracing::info!(consumer = %self.config.consumer, "recorder stopped");
    }

    async fn run_shard(self, shard: usize, shutdown: CancellationToken) {
        let mut batch = Batch::default();
        let mut writing = tokio::task::JoinSet::new();
        let mut next_reclaim = tokio::time::Instant::now();
        let mut read_backoff = Duration::from_millis(100);
        let mut per_entry = 1usize;
        // Bytes per entry: unknown before the first read, which therefore asks for one entry.
        let mut per_entry_bytes = self.config.batch_max_bytes.max(1);
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            let full = batch.events.len() >= self.config.batch_max
                || batch.bytes >= self.config.batch_max_bytes;
            let due = batch
                .started
                .is_some_and(|t| t.elapsed() >= self.config.max_delay);
            while writing.try_join_next().is_some() {}
            if !batch.is_empty() && (full || due) {
                // Wait for a free writer: while the store is down every writer holds its batch and reading
                // stops here, so memory stays bounded and the log keeps the backlog.
                while writing.len() >= self.config.writers.max(1) {
                    tokio::select! {
                        _ = writing.join_next() => {}
                        _ = shutdown.cancelled() => break,
                    }
                }
                if shutdown.is_cancelled() {
                    break;
                }
                let mut full = std::mem::take(&mut batch);
                let me = self.clone();
                let stop = shutdown.clone();
                writing.spawn(async move { me.flush(shard, &mut full, &stop).await });
                continue;
            }
            // Read until the batch is full or its first entry has waited `max_delay`.
            let wait = match batch.started {
                None => Duration::from_secs(1),
                Some(t) => self.config.max_delay.saturating_sub(t.elapsed()),
            };
            let reclaim = (tokio::time::Instant::now() >= next_reclaim).then(|| {
                next_reclaim = tokio::time::Instant::now() + self.config.reclaim_every();
                self.config.reclaim_idle
            });
            // An entry packs a whole script call's events (an enqueue of 1,000 jobs is one entry of 1,000): ask
            // for as many entries as fit the batch, in events and in bytes, at the size of the largest entries
            // seen lately.
            let count = read_size(
                self.config.read_count,
                self.config.batch_max.saturating_sub(batch.events.len()),
                per_entry,
            )
            .min(read_size(
                self.config.read_count,
                self.config.batch_max_bytes.saturating_sub(batch.bytes),
                per_entry_bytes,
            ));
            let read = self.broker.read_log(
                shard,
                RECORDER_GROUP,
                &self.config.consumer,
                count,
                wait,
                reclaim,
            );
            let got = tokio::select! {
                r = read => r,
                _ = shutdown.cancelled() => break,
            };
            match got {
                Ok(entries) => {
                    read_backoff = Duration::from_millis(100);
                    // The largest entry of this read, or the estimate halved: a burst of big entries shrinks the
                    // reads at once, and they grow back within a few reads after it. A read that found nothing
                    // (the wait ran out) leaves the estimates as they are, so an idle spell does not make the
                    // first read after it ask for `read_count` entries of a backlog.
                    if !entries.is_empty() {
                        let largest = entries.iter().map(|e| e.events.len()).max().unwrap_or(0);
                        let heaviest = entries.iter().map(|e| e.bytes).max().unwrap_or(0);
                        per_entry = largest.max(per_entry / 2).max(1);
                        per_entry_bytes = heaviest.max(per_entry_bytes / 2).max(1);
                    }
                    batch.add(entries);
                }
                Err(e) => {
                    tracing::warn!(shard, error = %e, "recorder cannot read the event log; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(read_backoff) => {}
                        _ = shutdown.cancelled() => break,
                    }
                    read_backoff = (read_backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        // Shutting down: batches being written get their last attempt cut short by the token (their entries stay
        // pending in the log for the next recorder); what was gathered is written once more here.
        while writing.join_next().await.is_some() {}
        if !batch.is_empty() {
            let grace = CancellationToken::new();
            let flush = self.flush(shard, &mut batch, &grace);
            if tokio::time::timeout(self.config.write_timeout, flush)
                .await
                .is_err()
            {
                tracing::warn!(
                    shard,
                    "recorder stopped with an unwritten batch; its entries stay in the event log for the next recorder"
                );
            }
        }
    }

    /// Write the batch and acknowledge it, retrying through the breaker until it is written or `shutdown`.
    async fn flush(&self, shard: usize, batch: &mut Batch, shutdown: &CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        let mut last_state = self.breaker.state();
        loop {
            let state = self.breaker.state();
            if state != last_state {
                tracing::warn!(
                    shard,
                    breaker = %state.as_str(),
                    "store circuit breaker changed state"
                );
                last_state = state;
            }
            let pause = match self.breaker.try_acquire() {
                Err(open) => open.retry_after.max(Duration::from_millis(50)),
                Ok(permit) => match self.write(&mut *batch).await {
                    Ok(()) => {
                        permit.success();
                        if last_state != BreakerState::Closed {
                            tracing::info!(shard, "store reachable again; circuit breaker closed");
                        }
                        break;
                    }
                    Err(e) => {
                        let counts = matches!(e, StoreError::Unavailable(_));
                        if counts {
                            permit.failure();
                        } else {
                            drop(permit);
                        }
                        self.stats.write_failures.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(shard, events = batch.events.len(), error = %e,
                            "recorder could not write a batch; it stays pending and is retried");
                        let b = backoff;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        b
                    }
                },
            };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.cancelled() => return,
            }
        }
        // Committed: acknowledge. A failed acknowledgement only means redelivery, which the store skips, so
        // it is retried a few times and then left to the group.
        let positions = std::mem::take(&mut batch.positions);
        let mut delay = Duration::from_millis(50);
        for attempt in 1..=5 {
            match self.broker.ack_log(RECORDER_GROUP, &positions).await {
                Ok(()) => break,
                Err(e) if attempt < 5 => {
                    tracing::debug!(shard, error = %e, "acknowledging recorded entries failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                Err(e) => {
                    tracing::warn!(shard, error = %e,
                        "recorded entries could not be acknowledged; they will be delivered again and skipped");
                }
            }
        }
        batch.clear();
    }

    /// Write what of the batch is not written yet, in transactions of at most `batch_max` events each (an
    /// entry larger than the rest of the batch makes one batch hold more), each bounded by `write_timeout`. A
    /// failure keeps what committed (`batch.written`): the retry goes on from there.
    async fn write(&self, batch: &mut Batch) -> Result<(), StoreError> {
        let per_write = self.config.batch_max.max(1);
        while batch.written < batch.events.len() {
            let end = (batch.written + per_write).min(batch.events.len());
            let chunk = &batch.events[batch.written..end];
            let r = tokio::time::timeout(self.config.write_timeout, self.store.record(chunk)).await;
            let new = match r {
                Ok(r) => r?,
                Err(_) => {
                    return Err(StoreError::Unavailable(format!(
                        "write of {} events took longer than {:?}",
                        chunk.len(),
                        self.config.write_timeout
                    )));
                }
            };
            let now = now_ms();
            let oldest = chunk.iter().map(|e| e.at).min().unwrap_or(now);
            let s = &self.stats;
            s.recorded.fetch_add(new, Ordering::Relaxed);
            s.duplicates.fetch_add(
                chunk.len() as u64 - new.min(chunk.len() as u64),
                Ordering::Relaxed,
            );
            s.batches.fetch_add(1, Ordering::Relaxed);
            s.last_lag_ms
                .store(now.saturating_sub(oldest), Ordering::Relaxed);
            batch.written = end;
        }
        Ok(())
    }
}

/// The entries read and not yet written.
#[derive(Debug, Default)]
struct Batch {
    positions: Vec<LogPosition>,
    events: Vec<Event>,
    /// The entries' size in the log.
    bytes: usize,
    /// Events before this index are committed (a write split in several transactions failed part way).
    written: usize,
    started: Option<tokio::time::Instant>,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    fn add(&mut self, entries: Vec<LogEntry>) {
        if entries.is_empty() {
            return;
        }
        self.started.get_or_insert_with(tokio::time::Instant::now);
        for e in entries {
            self.positions.push(e.position);
            self.events.extend(e.events);
            self.bytes += e.bytes;
        }
    }

    fn clear(&mut self) {
        self.positions.clear();
        self.events.clear();
        self.bytes = 0;
        self.written = 0;
        self.started = None;
    }
}

/// Entries to ask for: as many as fit `room` (events or bytes) at `per_entry` each, at least one and at most
/// `read_count`.
fn read_size(read_count: usize, room: usize, per_entry: usize) -> usize {
    (room / per_entry.max(1)).clamp(1, read_count.max(1))
}

#[cfg(test)]
mod tests {
    use ferry_broker::{EngineConfig, MemoryBroker};

    use super::*;
    use crate::MemoryStore;

    /// After a crash, a recorder's events reach the store before a job lease held by the same worker would be
    /// reclaimed (the engine's visibility timeout), and live recorders never look dead to each other.
    #[test]
    fn default_takeover_is_within_the_visibility_timeout() {
        let c = RecorderConfig::new("c");
        assert!(
            c.takeover_within() < EngineConfig::default().visibility_timeout,
            "{:?}",
            c.takeover_within()
        );
        assert!(c.longest_hold() < c.reclaim_idle);
        assert_eq!(c.check(), Ok(()));
        let slow = RecorderConfig {
            write_timeout: Duration::from_secs(30),
            ..RecorderConfig::new("c")
        };
        let e = slow.check().unwrap_err();
        assert_eq!(e.field, "reclaim_idle");
        assert!(e.message.contains("61050 ms"), "{e}");
        for (broken, field) in [
            (
                RecorderConfig {
                    batch_max: 0,
                    ..RecorderConfig::new("c")
                },
                "batch_max",
            ),
            (
                RecorderConfig {
                    writers: 0,
                    ..RecorderConfig::new("c")
                },
                "writers",
            ),
            (
                RecorderConfig {
                    read_count: 0,
                    ..RecorderConfig::new("c")
                },
                "read_count",
            ),
            (
                RecorderConfig {
                    write_timeout: Duration::ZERO,
                    ..RecorderConfig::new("c")
                },
                "write_timeout",
            ),
        ] {
            assert_eq!(broken.check().unwrap_err().field, field);
        }
    }

    #[test]
    fn reads_are_sized_to_the_room_left() {
        // Small entries: as many as the read count allows.
        assert_eq!(read_size(256, 2000, 1), 256);
        // Entries of 500 events: four fill the batch; one when it is nearly full, or full.
        assert_eq!(read_size(256, 2000, 500), 4);
        assert_eq!(read_size(256, 100, 500), 1);
        assert_eq!(read_size(256, 0, 500), 1);
        assert_eq!(read_size(256, 2000, 0), 256);
    }

    #[test]
    fn metrics_are_read_at_scrape_time() {
        let broker: Arc<dyn EventLog> = Arc::new(MemoryBroker::new(EngineConfig::default()));
        let r = Recorder::new(
            broker,
            Arc::new(MemoryStore::new()),
            RecorderConfig::new("c"),
        );
        let registry = ferry_telemetry::prometheus::Registry::new();
        r.register_metrics(&registry).unwrap();
        r.stats().recorded.fetch_add(5, Ordering::Relaxed);
        r.stats().write_failures.fetch_add(1, Ordering::Relaxed);
        r.stats().last_lag_ms.store(250, Ordering::Relaxed);
        let text = ferry_telemetry::metrics::render(&registry);
        for line in [
            "ferry_recorder_events_total 5",
            "ferry_recorder_write_failures_total 1",
            "ferry_recorder_lag_seconds 0.25",
            "ferry_breaker_state{dependency=\"postgres\"} 0",
            "ferry_breaker_opened_total{dependency=\"postgres\"} 0",
        ] {
            assert!(text.contains(line), "{line} missing:\n{text}");
        }
        // The memory store has no pool.
        assert!(!text.contains("ferry_db_pool"), "{text}");
    }
}
