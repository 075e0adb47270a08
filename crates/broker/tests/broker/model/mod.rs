//! Model-based property test of the engine, shared by both engines (`model_memory.rs`,
//! `model_redis.rs` beside this directory).
//!
//! proptest generates random sequences of enqueue, claim, heartbeat, complete, fail (retry or permanent), release,
//! cancel, promote, lease expiry with reclaim, and completions with stale leases. Each step runs against the engine
//! and against a small model of what the contract promises; after every step the engine's answer must be the one
//! the model predicts. At the end the case drains every job to a final state and checks the invariants:
//!
//! * every accepted job ends in exactly one final state, and the engine's lookup agrees with the model;
//! * at most one fenced completion per job: every completion or heartbeat with a stale lease is refused;
//! * no event out of order: each job's lifecycle events, as a subscriber saw them, are exactly the transitions the
//!   model made, in that order, with the attempt the model counted.
//!
//! The model does not look inside an engine; where the contract leaves an order open (jobs promoted or reclaimed
//! together), it only requires that what a claim takes comes from the oldest group of ready jobs.
//!
//! Cases: `PROPTEST_CASES` (default 32 on memory, 16 on Redis); a failure prints the shrunk sequence of steps.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ferry_broker::{
    Broker, CancelOutcome, Completion, EngineConfig, FailOutcome, Failure, Lease, Reclaimed, Retry,
};
use ferry_core::{EventType, JobId, JobState, Kind, NewJob, QueueName};
use futures::StreamExt;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::json;

/// Short, so that an expiry step costs well under a second; a lease is only ever reclaimed by [`Op::Expire`],
/// so a slow machine cannot make a lease expire behind the model's back (completing or heartbeating a lease
/// whose deadline passed but which nobody reclaimed is still allowed by the contract).
const VISIBILITY: Duration = Duration::from_millis(500);

pub fn engine_config() -> EngineConfig {
    EngineConfig {
        visibility_timeout: VISIBILITY,
        finished_retention: Duration::from_secs(3600),
        dead_letter_max: 10_000,
        event_stream_max: 100_000,
        idempotency_ttl: Duration::from_secs(3600),
        drop_recorded: false,
    }
}

/// One step. Indexes (`pick`) are taken modulo whatever the model holds at that point, so every generated
/// sequence is meaningful and shrinks well.
#[derive(Debug, Clone)]
pub enum Op {
    Enqueue {
        n: u8,
        max_attempts: u8,
    },
    Claim {
        consumer: u8,
        max: u8,
    },
    Heartbeat,
    Complete {
        pick: u8,
    },
    Fail {
        pick: u8,
        permanent: bool,
    },
    Release {
        pick: u8,
    },
    Cancel {
        pick: u8,
    },
    Promote,
    /// Wait past the visibility timeout, then reclaim: every held lease is lost.
    Expire,
    /// Complete and heartbeat with a lease that is no longer current: both must be refused.
    Stale {
        pick: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1u8..=4, 1u8..=3).prop_map(|(n, max_attempts)| Op::Enqueue { n, max_attempts }),
        4 => (0u8..2, 1u8..=4).prop_map(|(consumer, max)| Op::Claim { consumer, max }),
        1 => Just(Op::Heartbeat),
        3 => any::<u8>().prop_map(|pick| Op::Complete { pick }),
        3 => (any::<u8>(), proptest::bool::weighted(0.25))
            .prop_map(|(pick, permanent)| Op::Fail { pick, permanent }),
        1 => any::<u8>().prop_map(|pick| Op::Release { pick }),
        2 => any::<u8>().prop_map(|pick| Op::Cancel { pick }),
        2 => Just(Op::Promote),
        1 => Just(Op::Expire),
        2 => any::<u8>().prop_map(|pick| Op::Stale { pick }),
    ]
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    proptest::collection::vec(op(), 1..40)
}

/// What the model knows of one job.
#[derive(Debug)]
struct MJob {
    id: JobId,
    state: JobState,
    attempts: u32,
    max_attempts: u32,
    /// The transitions made so far, with the attempt each event must carry.
    events: Vec<(EventType, u32)>,
}

impl MJob {
    fn enter(&mut self, state: JobState, ty: EventType) {
        self.state = state;
        self.events.push((ty, self.attempts));
    }
}

#[derive(Debug, Default)]
struct Model {
    jobs: Vec<MJob>,
    by_id: HashMap<JobId, usize>,
    /// Ready jobs, oldest group first. A group is one enqueue batch or a single requeue (in order), or the jobs
    /// one promote or reclaim moved together (order within the group left open).
    ready: Vec<Vec<usize>>,
    held: Vec<(usize, Lease)>,
    stale: Vec<Lease>,
}

impl Model {
    fn ready_count(&self) -> usize {
        self.ready.iter().map(Vec::len).sum()
    }

    fn remove_ready(&mut self, job: usize) {
        for group in &mut self.ready {
            group.retain(|&j| j != job);
        }
        self.ready.retain(|g| !g.is_empty());
    }

    fn take_held(&mut self, pick: u8) -> Option<(usize, Lease)> {
        if self.held.is_empty() {
            return None;
        }
        let i = pick as usize % self.held.len();
        Some(self.held.remove(i))
    }
}

macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(TestCaseError::fail(format!($($msg)+)));
        }
    };
}

fn fail<E: std::fmt::Debug>(what: &str) -> impl FnOnce(E) -> TestCaseError + '_ {
    move |e| TestCaseError::fail(format!("{what}: {e:?}"))
}

/// Run `cases` random sequences against `broker` (a fresh queue each).
pub fn check(rt: &tokio::runtime::Runtime, broker: Arc<dyn Broker>, default_cases: u32) {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_cases);
    let mut runner = TestRunner::new(Config {
        cases,
        // Shrinking replays cases against a live engine; bound it so a failure reports in reasonable time.
        max_shrink_iters: 200,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&ops(), |ops| rt.block_on(run_case(broker.clone(), ops)));
    if let Err(e) = result {
        panic!("{e}");
    }
}

async fn run_case(b: Arc<dyn Broker>, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let suffix = JobId::new().0.simple().to_string();
    let q = QueueName::parse(format!("model.{}", &suffix[suffix.len() - 12..])).unwrap();
    let mut events = b.subscribe().await.map_err(fail("subscribe"))?;
    let mut m = Model::default();
    for op in ops {
        step(&*b, &q, &mut m, op).await?;
    }
    drain(&*b, &q, &mut m).await?;

    // Every job is final, once, and the engine agrees.
    for j in &m.jobs {
        ensure!(
            matches!(
                j.state,
                JobState::Completed | JobState::Dead | JobState::Cancelled
            ),
            "job {} left in {:?} after the drain",
            j.id,
            j.state
        );
        let info = b.job(j.id).await.map_err(fail("job lookup"))?;
        let state = info.map(|i| i.state);
        ensure!(
            state == Some(j.state),
            "job {}: engine says {state:?}, model {:?}",
            j.id,
            j.state
        );
        let finals = j
            .events
            .iter()
            .filter(|(t, _)| {
                matches!(
                    t,
                    EventType::Completed | EventType::Dead | EventType::Cancelled
                )
            })
            .count();
        ensure!(finals == 1, "job {} has {finals} final transitions", j.id);
    }

    // Every event, in order per job, exactly as the model made them.
    let expected: usize = m.jobs.iter().map(|j| j.events.len()).sum();
    let mut seen: HashMap<JobId, Vec<(EventType, u32)>> = HashMap::new();
    let mut got = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while got < expected {
        let next = tokio::time::timeout_at(deadline, events.next()).await;
        let Ok(Some(event)) = next else {
            return Err(TestCaseError::fail(format!(
                "saw {got} of {expected} events before the stream ended or 10 s passed"
            )));
        };
        if event.queue != q || event.ty == EventType::Progress {
            continue;
        }
        got += 1;
        seen.entry(event.job)
            .or_default()
            .push((event.ty, event.attempt));
    }
    for j in &m.jobs {
        let saw = seen.remove(&j.id).unwrap_or_default();
        ensure!(
            saw == j.events,
            "job {}: events {saw:?}, expected {:?}",
            j.id,
            j.events
        );
    }
    ensure!(seen.is_empty(), "events of unknown jobs: {seen:?}");
    Ok(())
}

async fn step(b: &dyn Broker, q: &QueueName, m: &mut Model, op: Op) -> Result<(), TestCaseError> {
    match op {
        Op::Enqueue { n, max_attempts } => {
            let jobs = (0..n)
                .map(|i| NewJob {
                    max_attempts: Some(max_attempts.into()),
                    ..NewJob::new(Kind::parse("model.job").unwrap(), json!({ "i": i }))
                })
                .collect();
            let out = b.enqueue_batch(q, jobs).await.map_err(fail("enqueue"))?;
            ensure!(
                out.len() == n as usize,
                "enqueue answered {} of {n}",
                out.len()
            );
            let mut group = Vec::new();
            for e in out {
                ensure!(
                    e.state == JobState::Queued && !e.duplicate,
                    "enqueue answered {e:?}"
                );
                ensure!(!m.by_id.contains_key(&e.id), "id {} handed out twice", e.id);
                let idx = m.jobs.len();
                m.by_id.insert(e.id, idx);
                m.jobs.push(MJob {
                    id: e.id,
                    state: JobState::Queued,
                    attempts: 0,
                    max_attempts: max_attempts.into(),
                    events: vec![(EventType::Queued, 0)],
                });
                group.push(idx);
            }
            m.ready.push(group);
        }
        Op::Claim { consumer, max } => {
            let name = format!("consumer-{consumer}");
            let leased = b
                .claim(q, &name, max.into(), Duration::ZERO)
                .await
                .map_err(fail("claim"))?;
            let want = (max as usize).min(m.ready_count());
            ensure!(
                leased.len() == want,
                "claim of {max} with {} ready took {}",
                m.ready_count(),
                leased.len()
            );
            // FIFO: whole older groups first, then part of the next one.
            let mut taken: Vec<usize> = Vec::new();
            for l in &leased {
                let idx = *m.by_id.get(&l.job.id).ok_or_else(|| {
                    TestCaseError::fail(format!("claimed unknown job {}", l.job.id))
                })?;
                taken.push(idx);
            }
            let mut left: Vec<usize> = taken.clone();
            for group in &m.ready {
                if left.is_empty() {
                    break;
                }
                if left.len() >= group.len() {
                    for j in group {
                        ensure!(
                            left.contains(j),
                            "claim skipped older ready job {} (took {:?})",
                            m.jobs[*j].id,
                            taken
                        );
                    }
                    left.retain(|j| !group.contains(j));
                } else {
                    for j in &left {
                        ensure!(
                            group.contains(j),
                            "claim took job {} ahead of older ready jobs",
                            m.jobs[*j].id
                        );
                    }
                    left.clear();
                }
            }
            for (l, idx) in leased.into_iter().zip(taken) {
                m.remove_ready(idx);
                let j = &mut m.jobs[idx];
                ensure!(
                    j.state == JobState::Queued,
                    "claimed job {} the model has {:?}",
                    j.id,
                    j.state
                );
                j.attempts += 1;
                ensure!(
                    l.lease.attempt == j.attempts && l.job.attempt == j.attempts,
                    "job {}: lease for attempt {}, model counts {}",
                    j.id,
                    l.lease.attempt,
                    j.attempts
                );
                j.enter(JobState::Active, EventType::Active);
                m.held.push((idx, l.lease));
            }
        }
        Op::Heartbeat => {
            let leases: Vec<Lease> = m.held.iter().map(|(_, l)| l.clone()).collect();
            let out = b.heartbeat(&leases).await.map_err(fail("heartbeat"))?;
            ensure!(
                out.iter().all(|&ok| ok) && out.len() == leases.len(),
                "heartbeat of current leases answered {out:?}"
            );
        }
        Op::Complete { pick } => {
            let Some((idx, lease)) = m.take_held(pick) else {
                return Ok(());
            };
            let out = b
                .complete(vec![Completion {
                    lease: lease.clone(),
                    result: json!({ "ok": true }),
                }])
                .await
                .map_err(fail("complete"))?;
            ensure!(
                matches!(out.as_slice(), [Ok(())]),
                "completion with a current lease answered {out:?}"
            );
            m.jobs[idx].enter(JobState::Completed, EventType::Completed);
            m.stale.push(lease);
        }
        Op::Fail { pick, permanent } => {
            let Some((idx, lease)) = m.take_held(pick) else {
                return Ok(());
            };
            let retry = if permanent {
                Retry::Never
            } else {
                Retry::After(0)
            };
            let out = b
                .fail(vec![Failure {
                    lease: lease.clone(),
                    error: "model failure".into(),
                    retry,
                }])
                .await
                .map_err(fail("fail"))?;
            let j = &mut m.jobs[idx];
            let dead = permanent || j.attempts >= j.max_attempts;
            match out.as_slice() {
                [Ok(FailOutcome::Dead)] if dead => j.enter(JobState::Dead, EventType::Dead),
                [Ok(FailOutcome::Retrying { .. })] if !dead => {
                    j.enter(JobState::Retrying, EventType::Retrying)
                }
                other => {
                    return Err(TestCaseError::fail(format!(
                        "fail of job {} (attempt {} of {}, permanent {permanent}) answered {other:?}",
                        j.id, j.attempts, j.max_attempts
                    )));
                }
            }
            m.stale.push(lease);
        }
        Op::Release { pick } => {
            let Some((idx, lease)) = m.take_held(pick) else {
                return Ok(());
            };
            let out = b
                .release(std::slice::from_ref(&lease))
                .await
                .map_err(fail("release"))?;
            ensure!(out == [true], "release of a current lease answered {out:?}");
            let j = &mut m.jobs[idx];
            // A released attempt is not counted.
            j.attempts -= 1;
            j.enter(JobState::Queued, EventType::Queued);
            m.ready.push(vec![idx]);
            m.stale.push(lease);
        }
        Op::Cancel { pick } => {
            if m.jobs.is_empty() {
                return Ok(());
            }
            let idx = pick as usize % m.jobs.len();
            let (id, before) = (m.jobs[idx].id, m.jobs[idx].state);
            let out = b.cancel(id, Some("model")).await.map_err(fail("cancel"))?;
            let is_final = matches!(
                before,
                JobState::Completed | JobState::Dead | JobState::Cancelled
            );
            if is_final {
                ensure!(
                    out == CancelOutcome::AlreadyFinal(before),
                    "cancel of a {before:?} job answered {out:?}"
                );
                return Ok(());
            }
            ensure!(
                out == CancelOutcome::Cancelled(before),
                "cancel of a {before:?} job answered {out:?}"
            );
            match before {
                JobState::Queued => m.remove_ready(idx),
                JobState::Active => {
                    let at = m.held.iter().position(|(j, _)| *j == idx).unwrap();
                    let (_, lease) = m.held.remove(at);
                    m.stale.push(lease);
                }
                _ => {}
            }
            m.jobs[idx].enter(JobState::Cancelled, EventType::Cancelled);
        }
        Op::Promote => promote(b, q, m).await?,
        Op::Expire => {
            tokio::time::sleep(VISIBILITY + VISIBILITY / 2).await;
            let held = std::mem::take(&mut m.held);
            let (mut want, mut group) = (Reclaimed::default(), Vec::new());
            for (idx, lease) in held {
                let j = &mut m.jobs[idx];
                if j.attempts >= j.max_attempts {
                    want.dead += 1;
                    j.enter(JobState::Dead, EventType::Dead);
                } else {
                    want.requeued += 1;
                    j.enter(JobState::Queued, EventType::Queued);
                    group.push(idx);
                }
                m.stale.push(lease);
            }
            let mut got = Reclaimed::default();
            // One call may stop at its batch size; the reaper calls again until nothing is left.
            loop {
                let r = b.reclaim_expired(q, 1000).await.map_err(fail("reclaim"))?;
                if r.requeued + r.dead == 0 {
                    break;
                }
                got.requeued += r.requeued;
                got.dead += r.dead;
            }
            ensure!(
                got == want,
                "reclaim after expiry did {got:?}, model {want:?}"
            );
            if !group.is_empty() {
                m.ready.push(group);
            }
        }
        Op::Stale { pick } => {
            if m.stale.is_empty() {
                return Ok(());
            }
            let lease = m.stale[pick as usize % m.stale.len()].clone();
            let hb = b
                .heartbeat(std::slice::from_ref(&lease))
                .await
                .map_err(fail("heartbeat"))?;
            ensure!(hb == [false], "heartbeat of a stale lease answered {hb:?}");
            let out = b
                .complete(vec![Completion {
                    lease: lease.clone(),
                    result: json!({ "stale": true }),
                }])
                .await
                .map_err(fail("complete"))?;
            ensure!(
                matches!(out.as_slice(), [Err(_)]),
                "completion with a stale lease of job {} answered {out:?}",
                lease.job
            );
        }
    }
    Ok(())
}

/// Promote every retrying job (all are due: they failed with `Retry::After(0)`).
async fn promote(b: &dyn Broker, q: &QueueName, m: &mut Model) -> Result<(), TestCaseError> {
    let due: Vec<usize> = (0..m.jobs.len())
        .filter(|&i| m.jobs[i].state == JobState::Retrying)
        .collect();
    let mut moved = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    // A job retried in this very millisecond may be due only in the next one.
    while moved < due.len() && tokio::time::Instant::now() < deadline {
        let n = b.promote_due(q, 1000).await.map_err(fail("promote"))?;
        moved += n;
        if moved < due.len() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    ensure!(
        moved == due.len(),
        "promote moved {moved} of {} due jobs",
        due.len()
    );
    for &idx in &due {
        m.jobs[idx].enter(JobState::Queued, EventType::Queued);
    }
    if !due.is_empty() {
        m.ready.push(due);
    }
    Ok(())
}

/// Finish every job: promote what is retrying, claim what is ready and complete everything held.
async fn drain(b: &dyn Broker, q: &QueueName, m: &mut Model) -> Result<(), TestCaseError> {
    for _ in 0..4 {
        promote(b, q, m).await?;
        while m.ready_count() > 0 {
            let max = m.ready_count().min(50) as u8;
            step(b, q, m, Op::Claim { consumer: 0, max }).await?;
        }
        while !m.held.is_empty() {
            step(b, q, m, Op::Complete { pick: 0 }).await?;
        }
    }
    Ok(())
}
