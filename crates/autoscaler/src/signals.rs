//! Reading a queue's signals from its broker, and measuring how fast one worker drains it.

use std::time::{Duration, Instant};

use ferry_broker::{BrokerError, Operations};
use ferry_core::QueueName;

use crate::policy::Signals;

/// Read what the policy needs about `queue`: waiting, active, oldest wait, and scheduled jobs coming due within
/// `horizon`; plus the delivery counter the rate is measured from.
pub async fn read(
    broker: &dyn Operations,
    queue: &QueueName,
    horizon: Duration,
) -> Result<(Signals, u64), BrokerError> {
    let stats = broker.stats(queue).await?;
    let due_soon = broker.scheduled_due(queue, horizon).await?;
    Ok((
        Signals {
            waiting: stats.depth,
            active: stats.active,
            due_soon,
            oldest_wait_seconds: stats.lag_ms as f64 / 1000.0,
            rate_per_worker: None,
        },
        stats.delivered,
    ))
}

/// Jobs one worker takes per second, measured only over intervals when work was waiting at both ends (the
/// workers were saturated: an idle pool's throughput says nothing about its capacity), smoothed, and kept when
/// the queue goes quiet.
#[derive(Debug, Default, Clone)]
pub struct RateMeter {
    last: Option<(Instant, u64, bool)>,
    rate: Option<f64>,
}

/// Weight of the newest measurement.
const SMOOTHING: f64 = 0.5;

impl RateMeter {
    /// Feed one reading: the queue's delivery counter, whether jobs were waiting, and the workers serving it.
    pub fn observe(
        &mut self,
        now: Instant,
        delivered: u64,
        busy: bool,
        workers: u32,
    ) -> Option<f64> {
        if let Some((at, before, was_busy)) = self.last {
            let secs = now.duration_since(at).as_secs_f64();
            if was_busy && busy && workers > 0 && secs > 0.0 && delivered >= before {
                let measured = (delivered - before) as f64 / secs / f64::from(workers);
                if measured > 0.0 {
                    self.rate = Some(match self.rate {
                        Some(r) => r * (1.0 - SMOOTHING) + measured * SMOOTHING,
                        None => measured,
                    });
                }
            }
        }
        self.last = Some((now, delivered, busy));
        self.rate
    }

    pub fn rate(&self) -> Option<f64> {
        self.rate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_come_from_busy_intervals_only() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut m = RateMeter::default();
        assert_eq!(m.observe(t0, 0, true, 2), None);
        // 200 jobs in 10 s by 2 workers: 10 per worker per second.
        assert_eq!(m.observe(t0 + s(10), 200, true, 2), Some(10.0));
        // An interval that ended idle is not a capacity measurement.
        assert_eq!(m.observe(t0 + s(20), 250, false, 2), Some(10.0));
        assert_eq!(m.observe(t0 + s(30), 260, true, 2), Some(10.0));
        // The next busy one is smoothed in: 20/s per worker measured → 15.
        assert_eq!(m.observe(t0 + s(40), 660, true, 2), Some(15.0));
        // No workers, no measurement.
        assert_eq!(m.observe(t0 + s(50), 700, true, 0), Some(15.0));
    }
}
