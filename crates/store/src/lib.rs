//! The durable record: every job's current state (`jobs`) and its append-only audit trail (`job_events`), kept
//! in PostgreSQL ([`pg`]) or, for `ferry dev`, in memory ([`memory`]), behind one [`Store`] trait and one
//! contract; the [`recorder`] that fills it from the engine's durable event log; the [`reconciler`] that
//! hands the engine back jobs it lost (Redis data loss) from this record; and its upkeep ([`maintenance`]:
//! time partitions ahead of need, retention).
//!
//! This crate owns the schema, its migrations and the rule that a job's record never moves backwards. It must
//! not change job state in the engine (Redis stays the source of truth for live work; the reconciler only asks
//! the engine's `restore`, which refuses any job it knows) and must not speak HTTP: the gateway answers queries
//! through [`Store`].

pub mod maintenance;
pub mod memory;
pub mod pg;
pub mod reconciler;
pub mod recorder;
pub mod tls;

pub use memory::MemoryStore;
pub use pg::{PgConfig, PgStore};

use async_trait::async_trait;
use ferry_core::{Event, EventType, JobId, JobInfo, JobState, Kind, QueueName};
use serde::Serialize;

/// The durable record of jobs and their events.
#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// Record a batch of events in one transaction: each event is appended to the audit log once (an event
    /// whose id is already there is skipped, so redelivery is harmless), and each job's record is moved to the
    /// newest of its events by [`Event::order_key`] (an older event never moves it backwards, but does fill in
    /// what the record lacks, such as the spec carried by `job.queued`). A completed record never moves again,
    /// and a `job.completed` of a job that already has one is stored as `job.duplicate_completion` (the job ran
    /// again after the engine lost its first completion). Returns how many events were new.
    async fn record(&self, events: &[Event]) -> Result<u64, StoreError>;

    /// How many `job.completed` events this store has recorded as `job.duplicate_completion` (the job already
    /// had a completion: it ran again after the engine lost the first one), for a metric.
    fn duplicate_completions(&self) -> u64 {
        0
    }

    /// The reconciler's candidates: jobs whose record is not final (scheduled, queued, active, retrying), has
    /// not moved since `updated_before` (ms since the epoch) and holds the spec, in id order after `after`, at
    /// most `limit`.
    async fn unfinished(
        &self,
        updated_before: u64,
        after: Option<JobId>,
        limit: usize,
    ) -> Result<Vec<JobInfo>, StoreError>;

    /// A job's record.
    async fn job(&self, id: JobId) -> Result<Option<JobInfo>, StoreError>;

    /// Jobs matching `query`, newest first (by id, i.e. creation time), one page.
    async fn jobs(&self, query: &JobQuery) -> Result<JobPage, StoreError>;

    /// A job's audit trail, in the order the events happened (by [`Event::order_key`]).
    async fn events(&self, id: JobId, limit: usize) -> Result<Vec<EventRecord>, StoreError>;

    /// One pass of upkeep at `now_ms` ([`maintenance`]): the time slots from now to `config.ahead` exist, and
    /// with a retention, finished jobs (and their events) that finished before `now_ms - retention` are gone,
    /// while every job not finished is kept. Several callers at once are safe.
    async fn maintain(
        &self,
        config: &maintenance::MaintenanceConfig,
        now_ms: u64,
    ) -> Result<maintenance::MaintenanceReport, StoreError>;

    /// A real round trip to the backing store.
    async fn ping(&self) -> Result<(), StoreError>;

    /// The connection pool's figures, for metrics; `None` for a store without a pool.
    fn pool_stats(&self) -> Option<PoolStats> {
        None
    }
}

/// A connection pool's figures (`ferry_db_pool_connections`, `ferry_db_pool_max`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Connections open.
    pub size: usize,
    /// Idle connections.
    pub available: usize,
    /// Callers waiting for a connection.
    pub waiting: usize,
    /// The configured pool size.
    pub max: usize,
}

/// Filters of a job listing. Every filter is optional; `owner` and `tenant` are set by the gateway from the
/// caller's token, never by the client.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobQuery {
    pub queue: Option<QueueName>,
    pub state: Option<JobState>,
    pub kind: Option<Kind>,
    /// Milliseconds since the Unix epoch, inclusive.
    pub created_after: Option<u64>,
    /// Milliseconds since the Unix epoch, exclusive.
    pub created_before: Option<u64>,
    /// Only this owner's jobs (a caller without the admin scope).
    pub owner: Option<String>,
    /// Only this tenant's jobs.
    pub tenant: Option<String>,
    /// Page size, at least 1 (callers clamp it).
    pub limit: usize,
    /// Continue after this job id (the `next` of the previous page): keyset pagination.
    pub after: Option<JobId>,
}

/// One page of a job listing.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobPage {
    pub jobs: Vec<JobInfo>,
    /// The cursor of the next page, when there may be one.
    pub next: Option<JobId>,
}

impl JobPage {
    /// The page of `limit` jobs out of `jobs`, fetched one over the limit: the extra one only says there is a next
    /// page, whose cursor is the page's last job.
    pub(crate) fn of(mut jobs: Vec<JobInfo>, limit: usize) -> Self {
        let next = if jobs.len() > limit {
            jobs.truncate(limit);
            jobs.last().map(|j| j.id)
        } else {
            None
        };
        Self { jobs, next }
    }
}

/// One row of the audit log.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventRecord {
    pub id: String,
    pub job_id: JobId,
    #[serde(rename = "type")]
    pub ty: EventType,
    pub state: JobState,
    pub attempt: u32,
    /// Milliseconds since the Unix epoch: when the transition happened.
    pub at: u64,
    /// Milliseconds since the Unix epoch: when the row was committed (`at` to `recorded_at` is recorder lag).
    pub recorded_at: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database did not answer or refused the connection; the call may be retried.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A bug, a schema mismatch or corrupted data; not retried.
    #[error("store internal error: {0}")]
    Internal(String),
}
