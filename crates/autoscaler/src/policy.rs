//! The scaling policy: a pure function from what a queue looks like now (and what was recommended lately) to
//! how many workers it should have. No I/O, no clock: the caller passes `now`, so every rule is table-tested.
//!
//! The rules, in order (the Kubernetes HPA's where it has one):
//!
//! 1. **Need.** With a measured per-worker rate, enough workers to drain the backlog (waiting jobs plus
//!    scheduled jobs coming due) within `target_drain`: `ceil(backlog / (rate × target_drain))`, and at least
//!    one while jobs run. Before any rate is known, `ceil((backlog + active) / backlog_per_worker)`.
//! 2. **Tolerance.** When the need is within `tolerance` of the current count (ratio need/current in
//!    `[1 − t, 1 + t]`), nothing changes (the HPA's 10 %).
//! 3. **Wake from zero.** A queue at zero workers with one waiting job gets at least one worker at once
//!    (KEDA needs two events for that: activation, then scaling).
//! 4. **Bounds.** Clamped to `[min_workers, max_workers]`; zero is allowed when `min_workers` is 0 and nothing
//!    waits, runs or is coming due.
//! 5. **Up at once, by bounded steps.** At most `max(current + up_step_workers, current × (1 + up_step_percent))`
//!    in one decision (the HPA's default: 4 pods or 100 %).
//! 6. **Down only after a window.** The recommendation used for a scale-down is the highest one made within
//!    `down_stabilization` (the HPA's default: 300 s), so a dip does not shed workers that the next burst needs.

use std::collections::VecDeque;
use std::time::Duration;

use serde::Deserialize;

/// How one region scales its workers. Every field has a default (see [`Default`]).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Policy {
    /// Fewest workers (0 allows scaling to zero).
    pub min_workers: u32,
    /// Most workers.
    pub max_workers: u32,
    /// Drain the backlog within this long, at the measured per-worker rate (seconds).
    pub target_drain_seconds: f64,
    /// Before a rate is measured: this many waiting or running jobs per worker.
    pub backlog_per_worker: u64,
    /// No change while the need is within this fraction of the current count (0.1 = 10 %).
    pub tolerance: f64,
    /// One scale-up adds at most this many workers...
    pub up_step_workers: u32,
    /// ...or this percentage of the current count, whichever is more.
    pub up_step_percent: f64,
    /// A scale-down uses the highest recommendation of this window (seconds).
    pub scale_down_stabilization_seconds: f64,
    /// Scheduled jobs due within this horizon count as backlog (seconds).
    pub scheduled_horizon_seconds: f64,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            min_workers: 1,
            max_workers: 10,
            target_drain_seconds: 60.0,
            backlog_per_worker: 100,
            tolerance: 0.1,
            up_step_workers: 4,
            up_step_percent: 100.0,
            scale_down_stabilization_seconds: 300.0,
            scheduled_horizon_seconds: 30.0,
        }
    }
}

impl Policy {
    /// The rule a bad value breaks, naming the key.
    pub fn validate(&self) -> Result<(), String> {
        let positive = |key: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(format!("{key} must be a positive number, got {v}"))
            }
        };
        if self.max_workers == 0 {
            return Err("max-workers must be at least 1".into());
        }
        if self.min_workers > self.max_workers {
            return Err(format!(
                "min-workers ({}) must not exceed max-workers ({})",
                self.min_workers, self.max_workers
            ));
        }
        positive("target-drain-seconds", self.target_drain_seconds)?;
        if self.backlog_per_worker == 0 {
            return Err("backlog-per-worker must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.tolerance) {
            return Err(format!(
                "tolerance must be at least 0 and below 1, got {}",
                self.tolerance
            ));
        }
        if self.up_step_workers == 0 && self.up_step_percent <= 0.0 {
            return Err("up-step-workers or up-step-percent must allow some growth".into());
        }
        if !(self.up_step_percent.is_finite() && self.up_step_percent >= 0.0) {
            return Err("up-step-percent must be 0 or more".into());
        }
        for (key, v) in [
            (
                "scale-down-stabilization-seconds",
                self.scale_down_stabilization_seconds,
            ),
            ("scheduled-horizon-seconds", self.scheduled_horizon_seconds),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!("{key} must be 0 or more, got {v}"));
            }
        }
        Ok(())
    }

    pub fn down_stabilization(&self) -> Duration {
        Duration::from_secs_f64(self.scale_down_stabilization_seconds)
    }

    pub fn scheduled_horizon(&self) -> Duration {
        Duration::from_secs_f64(self.scheduled_horizon_seconds)
    }
}

/// What a queue looks like now.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Signals {
    /// Jobs waiting to be claimed (consumer-group lag).
    pub waiting: u64,
    /// Jobs being run (pending entries).
    pub active: u64,
    /// Scheduled or retrying jobs due within the policy's horizon.
    pub due_soon: u64,
    /// Age of the oldest waiting job, seconds.
    pub oldest_wait_seconds: f64,
    /// Jobs one worker completes per second, as measured while workers were busy; `None` before that.
    pub rate_per_worker: Option<f64>,
}

impl Signals {
    /// Work that needs a worker: waiting now or due soon.
    pub fn backlog(&self) -> u64 {
        self.waiting + self.due_soon
    }
}

/// Why the decision came out as it did (logged and exported with it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The need, unchanged by any other rule.
    Need,
    /// Within the tolerance band: the current count stays.
    Tolerance,
    /// A waiting job woke the queue from zero.
    Wake,
    /// Held at `min_workers` or `max_workers`.
    Bound,
    /// The scale-up was cut to the step limit.
    Step,
    /// A scale-down held back by a higher recommendation within the stabilization window.
    Stabilized,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Need => "need",
            Self::Tolerance => "tolerance",
            Self::Wake => "wake",
            Self::Bound => "bound",
            Self::Step => "step",
            Self::Stabilized => "stabilized",
        }
    }
}

/// One decision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    /// Workers wanted from now.
    pub desired: u32,
    /// What the need alone asked for, before tolerance, bounds, steps and the window.
    pub need: u32,
    /// Seconds the backlog takes to drain with `desired` workers at the measured rate (`None` before a rate is
    /// known, or with no worker).
    pub drain_seconds: Option<f64>,
    pub reason: Reason,
}

/// The recommendations of the last stabilization window, per queue (the policy's only memory).
#[derive(Debug, Clone, Default)]
pub struct History {
    /// (when, recommendation), oldest first.
    recent: VecDeque<(Duration, u32)>,
}

impl History {
    /// Record `recommendation` at `now` and return the highest of the last `window`.
    pub(crate) fn record(&mut self, now: Duration, window: Duration, recommendation: u32) -> u32 {
        while let Some(&(at, _)) = self.recent.front() {
            if now.saturating_sub(at) > window {
                self.recent.pop_front();
            } else {
                break;
            }
        }
        self.recent.push_back((now, recommendation));
        self.recent
            .iter()
            .map(|&(_, r)| r)
            .max()
            .unwrap_or(recommendation)
    }
}

/// The raw need of rule 1.
pub fn need(policy: &Policy, s: &Signals) -> u32 {
    let backlog = s.backlog();
    let n = match s.rate_per_worker.filter(|r| r.is_finite() && *r > 0.0) {
        Some(rate) => {
            let n = (backlog as f64 / (rate * policy.target_drain_seconds)).ceil();
            if s.active > 0 { n.max(1.0) } else { n }
        }
        None => ((backlog + s.active) as f64 / policy.backlog_per_worker as f64).ceil(),
    };
    n.min(u32::MAX as f64) as u32
}

/// Decide the worker count of one queue. `now` is any monotonic clock (the caller's elapsed time);
/// `history` is this queue's, kept between calls.
pub fn decide(
    policy: &Policy,
    signals: &Signals,
    current: u32,
    now: Duration,
    history: &mut History,
) -> Decision {
    let need = need(policy, signals);
    let mut reason = Reason::Need;
    let mut target = need;
    // 2. Tolerance band around the current count.
    if current > 0 && target != current {
        let ratio = target as f64 / current as f64;
        if (ratio - 1.0).abs() <= policy.tolerance {
            target = current;
            reason = Reason::Tolerance;
        }
    }
    // 3. Wake from zero: one waiting job is enough.
    if current == 0 && signals.backlog() > 0 {
        target = target.max(1);
        reason = Reason::Wake;
    }
    // 4. Bounds.
    let bounded = target.clamp(policy.min_workers, policy.max_workers);
    if bounded != target {
        target = bounded;
        reason = Reason::Bound;
    }
    // 6. The window: remember this recommendation; a scale-down goes only as low as the window's highest.
    let highest = history.record(now, policy.down_stabilization(), target);
    if target < current {
        let floor = highest.min(current);
        if floor > target {
            target = floor;
            reason = Reason::Stabilized;
        }
    }
    // 5. Up by bounded steps.
    if target > current {
        let by_percent = (current as f64 * (1.0 + policy.up_step_percent / 100.0)).floor() as u32;
        let limit = current
            .saturating_add(policy.up_step_workers)
            .max(by_percent)
            .max(1);
        if target > limit {
            target = limit;
            reason = Reason::Step;
        }
    }
    let drain_seconds = signals
        .rate_per_worker
        .filter(|r| r.is_finite() && *r > 0.0 && target > 0)
        .map(|rate| signals.backlog() as f64 / (rate * target as f64));
    Decision {
        desired: target,
        need,
        drain_seconds,
        reason,
    }
}

#[cfg(test)]
mod tests;
