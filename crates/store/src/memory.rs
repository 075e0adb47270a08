//! The in-memory store, for `ferry dev` and tests: the same semantics as [`PgStore`](crate::PgStore), kept in
//! maps behind one std `Mutex` (every operation is a short, synchronous critical section; the lock is never
//! held across an `.await`).
//!
//! This module also holds the rules both stores share ([`fold`], [`JobFold`], [`Outcome`], [`created_ms`],
//! [`id_floor`]): how a batch of events collapses into one change per job, and what a job's record takes from
//! its newest event. PostgreSQL applies the same [`JobFold`] in one set-based upsert.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;
use ferry_core::{
    Backoff, DEFAULT_MAX_ATTEMPTS, Event, EventType, JobId, JobInfo, JobSpec, JobState, Kind,
    Priority, QueueName, now_ms,
};
use serde_json::Value;
use uuid::Uuid;

use crate::{EventRecord, JobPage, JobQuery, Store, StoreError};

/// An event's position in its shard's log, `(ms, seq, n)`. An id that does not parse (never written by an
/// engine) sorts first, so it can fill in a record but never move it.
pub(crate) type OrderKey = (u64, u64, u32);

pub(crate) fn order_key(e: &Event) -> OrderKey {
    e.order_key().unwrap_or_else(|| {
        tracing::warn!(event = %e.id, job = %e.job, "event id has no order key; ordered first");
        (0, 0, 0)
    })
}

/// The creation time of a job: the millisecond timestamp in the top 48 bits of its UUIDv7 id.
pub(crate) fn created_ms(id: JobId) -> u64 {
    (id.0.as_u128() >> 80) as u64
}

/// The smallest UUIDv7 of millisecond `ms` (ms in the top 48 bits, every other bit 0): `id >= id_floor(t)` is
/// "created at or after t", `id < id_floor(t)` is "created before t".
pub(crate) fn id_floor(ms: u64) -> Uuid {
    Uuid::from_u128(u128::from(ms.min((1 << 48) - 1)) << 80)
}

/// What a job's record takes from its newest event besides state, attempts and time.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Outcome {
    /// `job.completed` data.
    pub result: Option<Value>,
    /// `job.retrying` / `job.dead` error text.
    pub error: Option<String>,
    /// `job.scheduled` / `job.retrying` due time.
    pub run_at: Option<u64>,
}

impl Outcome {
    pub(crate) fn of(e: &Event) -> Self {
        let data = e.data.as_ref();
        let run_at = || data.and_then(|d| d.get("run_at")).and_then(Value::as_u64);
        match e.ty {
            EventType::Completed => Self {
                result: e.data.clone(),
                ..Self::default()
            },
            EventType::Scheduled => Self {
                run_at: run_at(),
                ..Self::default()
            },
            EventType::Retrying => Self {
                error: data.map(error_text),
                run_at: run_at(),
                ..Self::default()
            },
            EventType::Dead => Self {
                error: data.map(error_text),
                ..Self::default()
            },
            _ => Self::default(),
        }
    }
}

/// The error text of retrying/dead data. The engines write `{"error": <string>, "run_at": ms}` (retrying) and
/// `{"error": <string>}` (dead); a bare value is accepted too. A string is taken as is, anything else as JSON.
fn error_text(data: &Value) -> String {
    let v = data.get("error").unwrap_or(data);
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// One job's share of a recorded batch: its newest event and what the batch knows of its spec.
#[derive(Debug)]
pub(crate) struct JobFold<'a> {
    /// The newest event of the job in the batch (the first of equal keys).
    pub newest: &'a Event,
    pub key: OrderKey,
    /// The first spec the batch carries for the job.
    pub spec: Option<&'a JobSpec>,
    /// From the spec when there is one, else from the first event that names them.
    pub owner: Option<&'a str>,
    pub tenant: Option<&'a str>,
    pub correlation_id: Option<&'a str>,
}

impl JobFold<'_> {
    pub fn outcome(&self) -> Outcome {
        Outcome::of(self.newest)
    }

    /// `at` of the newest event when it leaves the job in a final state.
    pub fn finished_at(&self) -> Option<u64> {
        self.newest.state.is_final().then_some(self.newest.at)
    }
}

/// Collapse a batch into one [`JobFold`] per job, sorted by job id (so concurrent writers lock rows in the same
/// order and cannot deadlock each other). A job's first completion (by order key) is its newest event whatever
/// follows it: nothing legitimately leaves `completed`, so later events are a rerun after the engine lost the
/// completion (see [`duplicate_completions`]) and must not move the record.
pub(crate) fn fold(events: &[Event]) -> Vec<JobFold<'_>> {
    let mut by_job: BTreeMap<JobId, JobFold<'_>> = BTreeMap::new();
    let mut first_done: BTreeMap<JobId, (&Event, OrderKey)> = BTreeMap::new();
    for e in events {
        let key = order_key(e);
        if e.ty == EventType::Completed {
            let done = first_done.entry(e.job).or_insert((e, key));
            if key < done.1 {
                *done = (e, key);
            }
        }
        let f = by_job.entry(e.job).or_insert_with(|| JobFold {
            newest: e,
            key,
            spec: None,
            owner: None,
            tenant: None,
            correlation_id: None,
        });
        if key > f.key {
            f.newest = e;
            f.key = key;
        }
        if f.spec.is_none()
            && let Some(spec) = e.spec.as_deref()
        {
            f.spec = Some(spec);
            f.owner = spec.owner.as_deref();
            f.tenant = spec.tenant.as_deref();
            f.correlation_id = spec.correlation_id.as_deref();
        } else if f.spec.is_none() {
            f.owner = f.owner.or(e.owner.as_deref());
            f.tenant = f.tenant.or(e.tenant.as_deref());
            f.correlation_id = f.correlation_id.or(e.correlation_id.as_deref());
        }
    }
    for (job, (e, key)) in first_done {
        if let Some(f) = by_job.get_mut(&job) {
            f.newest = e;
            f.key = key;
        }
    }
    by_job.into_values().collect()
}

/// The completions of a batch to record as `job.duplicate_completion`: each `job.completed` of a job that
/// already has one, recorded before (`recorded`: per job, the ids of its recorded `job.completed` and
/// `job.duplicate_completion` events, and whether one is a `job.completed`) or earlier in the batch by order
/// key. An event already recorded (same id: a redelivery) is not a duplicate; the store skips it anyway.
pub(crate) fn duplicate_completions<'a>(
    events: &[&'a Event],
    recorded: &HashMap<JobId, (HashSet<String>, bool)>,
) -> HashSet<(JobId, &'a str)> {
    let mut done: Vec<&Event> = events
        .iter()
        .copied()
        .filter(|e| e.ty == EventType::Completed)
        .collect();
    done.sort_by_key(|e| (e.job, order_key(e)));
    let mut completed: HashSet<JobId> = recorded
        .iter()
        .filter(|(_, (_, any))| *any)
        .map(|(id, _)| *id)
        .collect();
    let mut out = HashSet::new();
    for e in done {
        if recorded
            .get(&e.job)
            .is_some_and(|(ids, _)| ids.contains(&e.id))
        {
            continue;
        }
        if !completed.insert(e.job) {
            out.insert((e.job, e.id.as_str()));
        }
    }
    out
}

/// The spec fields of a record: unknown until an event carrying the spec is recorded.
#[derive(Debug, Clone)]
struct SpecFields {
    payload: Value,
    priority: Priority,
    max_attempts: u32,
    timeout_ms: Option<u64>,
    backoff: Backoff,
}

/// A job's record (the `jobs` row).
#[derive(Debug, Clone)]
struct Rec {
    queue: QueueName,
    kind: Kind,
    state: JobState,
    attempts: u32,
    spec: Option<SpecFields>,
    owner: Option<String>,
    tenant: Option<String>,
    correlation_id: Option<String>,
    outcome: Outcome,
    updated_at: u64,
    key: OrderKey,
}

impl Rec {
    fn info(&self, id: JobId) -> JobInfo {
        let spec = self.spec.clone().unwrap_or_else(|| SpecFields {
            payload: Value::Null,
            priority: Priority::Normal,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            timeout_ms: None,
            backoff: Backoff::default(),
        });
        JobInfo {
            id,
            queue: self.queue.clone(),
            state: self.state,
            attempts: self.attempts,
            spec: JobSpec {
                kind: self.kind.clone(),
                payload: spec.payload,
                priority: spec.priority,
                max_attempts: spec.max_attempts,
                timeout_ms: spec.timeout_ms,
                backoff: spec.backoff,
                owner: self.owner.clone(),
                tenant: self.tenant.clone(),
                correlation_id: self.correlation_id.clone(),
                // Not kept in the record (yet): the trace id is in the job's log lines.
                traceparent: None,
                created_at: created_ms(id),
            },
            result: self.outcome.result.clone(),
            error: self.outcome.error.clone(),
            run_at: self.outcome.run_at,
            updated_at: self.updated_at,
        }
    }

    /// Apply one job's fold: move to its newest event if that is newer, fill in the spec if it is missing. The
    /// same rules as the `ON CONFLICT` clause of the PostgreSQL upsert.
    fn apply(&mut self, f: &JobFold<'_>) {
        // A completed record stays as its first completion recorded it (see `fold`).
        if f.key > self.key && self.state != JobState::Completed {
            self.state = f.newest.state;
            self.attempts = f.newest.attempt;
            self.outcome = f.outcome();
            self.updated_at = f.newest.at;
            self.key = f.key;
        }
        let own = |s: Option<&str>| s.map(str::to_owned);
        if self.spec.is_none() && f.spec.is_some() {
            self.spec = f.spec.map(spec_fields);
            self.owner = own(f.owner);
            self.tenant = own(f.tenant);
            self.correlation_id = own(f.correlation_id);
        } else {
            self.owner = self.owner.take().or_else(|| own(f.owner));
            self.tenant = self.tenant.take().or_else(|| own(f.tenant));
            self.correlation_id = self.correlation_id.take().or_else(|| own(f.correlation_id));
        }
    }

    fn new(f: &JobFold<'_>) -> Self {
        let e = f.newest;
        Self {
            queue: e.queue.clone(),
            kind: e.kind.clone(),
            state: e.state,
            attempts: e.attempt,
            spec: f.spec.map(spec_fields),
            owner: f.owner.map(str::to_owned),
            tenant: f.tenant.map(str::to_owned),
            correlation_id: f.correlation_id.map(str::to_owned),
            outcome: f.outcome(),
            updated_at: e.at,
            key: f.key,
        }
    }
}

fn spec_fields(s: &JobSpec) -> SpecFields {
    SpecFields {
        payload: s.payload.clone(),
        priority: s.priority,
        max_attempts: s.max_attempts,
        timeout_ms: s.timeout_ms,
        backoff: s.backoff,
    }
}

#[derive(Debug, Default)]
struct State {
    jobs: BTreeMap<JobId, Rec>,
    /// Each job's trail by (order key, event id): the id makes equal keys distinct and finds duplicates.
    trails: HashMap<JobId, BTreeMap<(OrderKey, String), EventRecord>>,
}

/// The in-memory [`Store`].
#[derive(Debug, Default)]
pub struct MemoryStore {
    state: Mutex<State>,
    duplicate_completions: AtomicU64,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>, StoreError> {
        self.state
            .lock()
            .map_err(|_| StoreError::Internal("memory store poisoned by a panic".into()))
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn record(&self, events: &[Event]) -> Result<u64, StoreError> {
        let recorded_at = now_ms();
        let mut st = self.lock()?;
        let distinct = distinct_events(events);
        let mut recorded: HashMap<JobId, (HashSet<String>, bool)> = HashMap::new();
        for e in distinct.iter().filter(|e| e.ty == EventType::Completed) {
            if recorded.contains_key(&e.job) {
                continue;
            }
            let mut seen = (HashSet::new(), false);
            for r in st.trails.get(&e.job).into_iter().flat_map(|t| t.values()) {
                if matches!(r.ty, EventType::Completed | EventType::DuplicateCompletion) {
                    seen.0.insert(r.id.clone());
                    seen.1 |= r.ty == EventType::Completed;
                }
            }
            recorded.insert(e.job, seen);
        }
        let duplicates = duplicate_completions(&distinct, &recorded);
        let mut new = 0;
        for e in distinct {
            let trail = st.trails.entry(e.job).or_default();
            let slot = (order_key(e), e.id.clone());
            if trail.contains_key(&slot) {
                continue;
            }
            let ty = if duplicates.contains(&(e.job, e.id.as_str())) {
                EventType::DuplicateCompletion
            } else {
                e.ty
            };
            trail.insert(
                slot,
                EventRecord {
                    id: e.id.clone(),
                    job_id: e.job,
                    ty,
                    state: e.state,
                    attempt: e.attempt,
                    at: e.at,
                    recorded_at,
                    correlation_id: e.correlation_id.clone(),
                    actor: e.actor.clone(),
                    data: e.data.clone(),
                },
            );
            new += 1;
        }
        for f in fold(events) {
            match st.jobs.get_mut(&f.newest.job) {
                Some(rec) => rec.apply(&f),
                None => {
                    st.jobs.insert(f.newest.job, Rec::new(&f));
                }
            }
        }
        self.duplicate_completions
            .fetch_add(duplicates.len() as u64, Ordering::Relaxed);
        Ok(new)
    }

    fn duplicate_completions(&self) -> u64 {
        self.duplicate_completions.load(Ordering::Relaxed)
    }

    async fn unfinished(
        &self,
        updated_before: u64,
        after: Option<JobId>,
        limit: usize,
    ) -> Result<Vec<JobInfo>, StoreError> {
        let st = self.lock()?;
        let range = match after {
            Some(a) => st
                .jobs
                .range((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded)),
            None => st.jobs.range(..),
        };
        Ok(range
            .filter(|(_, r)| {
                !r.state.is_final() && r.spec.is_some() && r.updated_at < updated_before
            })
            .take(limit)
            .map(|(id, r)| r.info(*id))
            .collect())
    }

    async fn job(&self, id: JobId) -> Result<Option<JobInfo>, StoreError> {
        Ok(self.lock()?.jobs.get(&id).map(|r| r.info(id)))
    }

    async fn jobs(&self, q: &JobQuery) -> Result<JobPage, StoreError> {
        let limit = q.limit.max(1);
        // The same id bounds the PostgreSQL query uses.
        let lower = JobId(id_floor(q.created_after.unwrap_or(0)));
        let upper = [q.after, q.created_before.map(|t| JobId(id_floor(t)))]
            .into_iter()
            .flatten()
            .min();
        if upper.is_some_and(|u| u <= lower) {
            return Ok(JobPage {
                jobs: Vec::new(),
                next: None,
            });
        }
        let st = self.lock()?;
        let range = match upper {
            Some(u) => st.jobs.range(lower..u),
            None => st.jobs.range(lower..),
        };
        let jobs: Vec<JobInfo> = range
            .rev()
            .filter(|(_, r)| {
                q.queue.as_ref().is_none_or(|x| *x == r.queue)
                    && q.state.is_none_or(|x| x == r.state)
                    && q.kind.as_ref().is_none_or(|x| *x == r.kind)
                    && q.owner.as_ref().is_none_or(|x| r.owner.as_ref() == Some(x))
                    && q.tenant
                        .as_ref()
                        .is_none_or(|x| r.tenant.as_ref() == Some(x))
            })
            .take(limit + 1)
            .map(|(id, r)| r.info(*id))
            .collect();
        Ok(JobPage::of(jobs, limit))
    }

    async fn events(&self, id: JobId, limit: usize) -> Result<Vec<EventRecord>, StoreError> {
        let st = self.lock()?;
        Ok(st
            .trails
            .get(&id)
            .map(|t| t.values().take(limit).cloned().collect())
            .unwrap_or_default())
    }

    /// No partitions here; retention deletes the finished jobs (and their trails) that finished before the
    /// cutoff.
    async fn maintain(
        &self,
        config: &crate::maintenance::MaintenanceConfig,
        now_ms: u64,
    ) -> Result<crate::maintenance::MaintenanceReport, StoreError> {
        let mut report = crate::maintenance::MaintenanceReport::default();
        let Some(retention) = config.retention else {
            return Ok(report);
        };
        let cutoff =
            now_ms.saturating_sub(u64::try_from(retention.as_millis()).unwrap_or(u64::MAX));
        let mut st = self.lock()?;
        let st = &mut *st;
        st.jobs.retain(|id, r| {
            // A final record's `updated_at` is `at` of the event that finished it.
            let expired = r.state.is_final() && r.updated_at < cutoff;
            if expired {
                st.trails.remove(id);
                report.deleted += 1;
            }
            !expired
        });
        Ok(report)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.lock().map(drop)
    }
}

/// Used by both stores: every distinct (job, event id) of a batch once, in batch order.
pub(crate) fn distinct_events(events: &[Event]) -> Vec<&Event> {
    let mut seen = HashSet::new();
    events
        .iter()
        .filter(|e| seen.insert((e.job, e.id.as_str())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn id_bounds_follow_uuid_v7() {
        let id = JobId::new();
        let ms = created_ms(id);
        assert!(ms.abs_diff(now_ms()) < 60_000);
        assert!(JobId(id_floor(ms)) <= id);
        assert!(id < JobId(id_floor(ms + 1)));
    }

    #[test]
    fn error_text_handles_both_shapes() {
        assert_eq!(error_text(&json!({"error": "boom", "run_at": 5})), "boom");
        assert_eq!(error_text(&json!({"error": {"code": 1}})), r#"{"code":1}"#);
        assert_eq!(error_text(&json!("bare")), "bare");
        assert_eq!(error_text(&json!(42)), "42");
    }
}
