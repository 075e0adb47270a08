//! The control loop: every interval, for every region, read each queue's signals, decide per queue, size the
//! region's pool for its neediest queue, assign spill-over, act (unless dry-run), log and export.
//!
//! Spill-over: a region whose need is above its maximum, and whose predicted drain time with its maximum breaks
//! its target, borrows workers from another region that allows it (`helps-others`) and has headroom under its
//! own maximum. The helper runs that many extra workers on the busy region's Redis and queues until the busy
//! region's need is back under its maximum and the helper's scale-down stabilization window has passed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_broker::Operations;
use ferry_core::QueueName;
use ferry_telemetry::prometheus::{GaugeVec, IntCounterVec, Opts, Registry};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::actuator::{Actuator, Held};
use crate::config::Region;
use crate::policy::{self, Decision, History};
use crate::signals::{self, RateMeter};

/// One region being controlled.
#[derive(Debug)]
pub struct RegionControl {
    pub config: Region,
    /// What the region's queues are read from (stats, jobs coming due, leases per consumer).
    pub broker: Arc<dyn Operations>,
    pub actuator: Arc<dyn Actuator>,
    queues: Vec<QueueControl>,
    /// Workers this region lends, per helped region.
    lending: std::collections::BTreeMap<String, u32>,
    /// The loans asked for within the stabilization window, per helped region.
    loans: std::collections::BTreeMap<String, History>,
    /// Workers other regions lend this one (they take its jobs too, so they count in its measured rate).
    borrowed: u32,
}

#[derive(Debug)]
struct QueueControl {
    name: QueueName,
    meter: RateMeter,
    history: History,
}

impl RegionControl {
    pub fn new(config: Region, broker: Arc<dyn Operations>, actuator: Arc<dyn Actuator>) -> Self {
        let queues = config
            .queue_names()
            .into_iter()
            .map(|name| QueueControl {
                name,
                meter: RateMeter::default(),
                history: History::default(),
            })
            .collect();
        Self {
            config,
            broker,
            actuator,
            queues,
            lending: Default::default(),
            loans: Default::default(),
            borrowed: 0,
        }
    }
}

/// What one region decided in one round.
#[derive(Debug, Clone)]
pub struct RegionDecision {
    pub region: String,
    pub current: u32,
    /// The pool's size from now: the largest of its queues' decisions.
    pub desired: u32,
    /// What the neediest queue asked for before the bounds (above `desired` when the region is at its maximum).
    pub need: u32,
    pub queues: Vec<(QueueName, policy::Signals, Decision)>,
    /// Workers borrowed from other regions (helper → count).
    pub borrowed: Vec<(String, u32)>,
}

impl RegionDecision {
    /// As `GET /decisions` shows it (and the dashboard, through the gateway's `GET /v1/autoscaler`).
    pub fn to_json(&self) -> Value {
        let queues: Vec<Value> = self
            .queues
            .iter()
            .map(|(q, s, d)| {
                json!({
                    "queue": q.as_str(),
                    "waiting": s.waiting,
                    "due_soon": s.due_soon,
                    "active": s.active,
                    "oldest_wait_seconds": s.oldest_wait_seconds,
                    "rate_per_worker": s.rate_per_worker,
                    "need": d.need,
                    "desired": d.desired,
                    "drain_seconds": d.drain_seconds,
                    "reason": d.reason.as_str(),
                })
            })
            .collect();
        let borrowed: Vec<Value> = self
            .borrowed
            .iter()
            .map(|(from, n)| json!({"from": from, "workers": n}))
            .collect();
        json!({
            "region": self.region,
            "current": self.current,
            "desired": self.desired,
            "need": self.need,
            "borrowed": borrowed,
            "queues": queues,
        })
    }
}

/// The last complete round, as JSON: `{"at" (Unix ms), "dry_run", "regions": [...]}`, a region whose queues could
/// not be read as `{"region", "error"}`. `None` before the first round.
pub type LastDecisions = Arc<std::sync::Mutex<Option<Value>>>;

/// The `ferry_autoscaler_*` series.
#[derive(Debug, Clone)]
pub struct Metrics {
    desired: GaugeVec,
    current: GaugeVec,
    backlog: GaugeVec,
    active: GaugeVec,
    oldest: GaugeVec,
    rate: GaugeVec,
    drain: GaugeVec,
    spill: GaugeVec,
    decisions: IntCounterVec,
    errors: IntCounterVec,
}

impl Metrics {
    pub fn new(registry: &Registry) -> Result<Self, ferry_telemetry::prometheus::Error> {
        let gauge = |name: &str, help: &str, labels: &[&str]| -> Result<GaugeVec, _> {
            let g = GaugeVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(g.clone()))?;
            Ok::<_, ferry_telemetry::prometheus::Error>(g)
        };
        let counter = |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, _> {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok::<_, ferry_telemetry::prometheus::Error>(c)
        };
        let rq = &["region", "queue"];
        Ok(Self {
            desired: gauge(
                "ferry_autoscaler_desired_workers",
                "Workers wanted: per queue, and for the region's pool as queue=\"all\"",
                rq,
            )?,
            current: gauge(
                "ferry_autoscaler_current_workers",
                "Workers of the region's pool when the decision was made",
                &["region"],
            )?,
            backlog: gauge(
                "ferry_autoscaler_backlog",
                "Jobs waiting plus scheduled jobs coming due within the horizon",
                rq,
            )?,
            active: gauge("ferry_autoscaler_active_jobs", "Jobs being run", rq)?,
            oldest: gauge(
                "ferry_autoscaler_oldest_wait_seconds",
                "Age of the oldest waiting job",
                rq,
            )?,
            rate: gauge(
                "ferry_autoscaler_rate_per_worker",
                "Jobs one worker takes per second, measured while work waited",
                rq,
            )?,
            drain: gauge(
                "ferry_autoscaler_drain_seconds",
                "Predicted time to drain the backlog with the desired workers",
                rq,
            )?,
            spill: gauge(
                "ferry_autoscaler_spillover_workers",
                "Workers of region `from` lent to region `to`",
                &["from", "to"],
            )?,
            decisions: counter(
                "ferry_autoscaler_decisions_total",
                "Pool size changes, by direction (up, down)",
                &["region", "direction"],
            )?,
            errors: counter(
                "ferry_autoscaler_errors_total",
                "Failed rounds, by stage (signals, actuator)",
                &["region", "stage"],
            )?,
        })
    }
}

/// The autoscaler: its regions, the loop settings, the metrics.
#[derive(Debug)]
pub struct Autoscaler {
    pub regions: Vec<RegionControl>,
    pub dry_run: bool,
    metrics: Option<Metrics>,
    started: Instant,
    /// Set after every complete round (for readiness).
    last_round: Arc<std::sync::Mutex<Option<Instant>>>,
    /// What the last round decided (for `GET /decisions`).
    last_decisions: LastDecisions,
}

impl Autoscaler {
    pub fn new(regions: Vec<RegionControl>, dry_run: bool, metrics: Option<Metrics>) -> Self {
        Self {
            regions,
            dry_run,
            metrics,
            started: Instant::now(),
            last_round: Arc::default(),
            last_decisions: Arc::default(),
        }
    }

    /// What the last complete round decided, as JSON (see [`LastDecisions`]).
    pub fn last_decisions(&self) -> LastDecisions {
        self.last_decisions.clone()
    }

    /// When the last complete round ended.
    pub fn last_round(&self) -> Arc<std::sync::Mutex<Option<Instant>>> {
        self.last_round.clone()
    }

    /// Every `interval` until `shutdown`.
    pub async fn run(mut self, interval: Duration, shutdown: CancellationToken) -> Self {
        loop {
            self.round().await;
            tokio::select! {
                _ = shutdown.cancelled() => return self,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }

    /// One round over every region. Returns the decisions (also logged and exported).
    pub async fn round(&mut self) -> Vec<RegionDecision> {
        let now = Instant::now();
        let elapsed = now.duration_since(self.started);
        let mut decisions = Vec::with_capacity(self.regions.len());
        let mut unread = Vec::new();
        for r in &mut self.regions {
            match decide_region(r, now, elapsed).await {
                Ok(d) => decisions.push(d),
                Err(e) => {
                    unread.push(json!({"region": r.config.name, "error": e.to_string()}));
                    tracing::warn!(region = %r.config.name, error = %e, "cannot read the region's queues; keeping its workers as they are");
                    if let Some(m) = &self.metrics {
                        m.errors
                            .with_label_values(&[&r.config.name, "signals"])
                            .inc();
                    }
                }
            }
        }
        self.assign_spillover(&mut decisions, elapsed);
        for d in &decisions {
            self.act(d).await;
        }
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let regions: Vec<Value> = decisions
            .iter()
            .map(RegionDecision::to_json)
            .chain(unread)
            .collect();
        *self
            .last_decisions
            .lock()
            .unwrap_or_else(|p| p.into_inner()) =
            Some(json!({"at": at, "dry_run": self.dry_run, "regions": regions}));
        *self.last_round.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        decisions
    }

    /// Lend workers from regions with headroom to regions at their maximum whose drain time breaks the target.
    ///
    /// A loan shrinks only as the helper's own pool does: to the highest loan of the helper's scale-down
    /// stabilization window, so a backlog that dips and returns does not start and stop spill workers every
    /// round. The helper's own need comes first: a loan never exceeds its headroom now.
    fn assign_spillover(&mut self, decisions: &mut [RegionDecision], elapsed: Duration) {
        let helps = |name: &str, regions: &[RegionControl]| {
            regions
                .iter()
                .any(|r| r.config.name == name && r.config.helps_others)
        };
        let mut headroom: Vec<(String, u32)> = decisions
            .iter()
            .filter(|d| helps(&d.region, &self.regions))
            .map(|d| {
                let max = self.policy_of(&d.region).max_workers;
                (d.region.clone(), max.saturating_sub(d.desired))
            })
            .collect();
        // What this round's signals ask for: (helper, helped) → workers.
        let mut asked: std::collections::BTreeMap<(String, String), u32> = Default::default();
        for d in decisions.iter() {
            let policy = self.policy_of(&d.region).clone();
            let at_max = d.desired >= policy.max_workers;
            let breaks_target = d.queues.iter().any(|(_, _, q)| {
                q.drain_seconds
                    .is_some_and(|s| s > policy.target_drain_seconds)
                    || (q.drain_seconds.is_none() && q.need > q.desired)
            });
            let mut short = if at_max && breaks_target {
                d.need.saturating_sub(d.desired)
            } else {
                0
            };
            for (helper, room) in headroom.iter_mut() {
                if short == 0 {
                    break;
                }
                if *helper == d.region || *room == 0 {
                    continue;
                }
                let n = short.min(*room);
                *room -= n;
                short -= n;
                asked.insert((helper.clone(), d.region.clone()), n);
            }
        }
        // Stabilized per helper, within its headroom.
        for r in &mut self.regions {
            let name = r.config.name.clone();
            let mut room = match decisions.iter().find(|d| d.region == name) {
                Some(d) if r.config.helps_others => {
                    r.config.policy.max_workers.saturating_sub(d.desired)
                }
                _ => 0,
            };
            let window = r.config.policy.down_stabilization();
            let mut helped: Vec<String> = r.loans.keys().cloned().collect();
            for (helper, to) in asked.keys() {
                if *helper == name && !helped.contains(to) {
                    helped.push(to.clone());
                }
            }
            let mut now_lending = std::collections::BTreeMap::new();
            for to in helped {
                let ask = asked.get(&(name.clone(), to.clone())).copied().unwrap_or(0);
                let kept = r
                    .loans
                    .entry(to.clone())
                    .or_default()
                    .record(elapsed, window, ask);
                let n = kept.min(room);
                room -= n;
                // Regions no longer helped stay listed at zero (their spill workers drain).
                now_lending.insert(to, n);
            }
            r.lending = now_lending;
        }
        for d in decisions.iter_mut() {
            d.borrowed = self
                .regions
                .iter()
                .filter_map(|r| {
                    let n = r.lending.get(&d.region).copied().unwrap_or(0);
                    (n > 0).then(|| (r.config.name.clone(), n))
                })
                .collect();
        }
        for r in &mut self.regions {
            r.borrowed = decisions
                .iter()
                .filter(|d| d.region == r.config.name)
                .flat_map(|d| d.borrowed.iter().map(|(_, n)| *n))
                .sum();
        }
    }

    fn policy_of(&self, region: &str) -> &policy::Policy {
        &self
            .regions
            .iter()
            .find(|r| r.config.name == region)
            .expect("a decision's region is one of ours")
            .config
            .policy
    }

    async fn act(&self, d: &RegionDecision) {
        let Some(r) = self.regions.iter().find(|r| r.config.name == d.region) else {
            return;
        };
        let changed = d.desired != d.current;
        let queues: Vec<String> = d
            .queues
            .iter()
            .map(|(q, s, dec)| {
                format!(
                    "{q}: waiting={} due={} active={} oldest={:.1}s rate={} need={} -> {} ({})",
                    s.waiting,
                    s.due_soon,
                    s.active,
                    s.oldest_wait_seconds,
                    s.rate_per_worker
                        .map_or("unknown".to_owned(), |r| format!("{r:.1}/s")),
                    dec.need,
                    dec.desired,
                    dec.reason.as_str()
                )
            })
            .collect();
        let borrowed = format!("{:?}", d.borrowed);
        if changed || !d.borrowed.is_empty() {
            tracing::info!(region = %d.region, current = d.current, desired = d.desired, need = d.need,
                borrowed = %borrowed, dry_run = self.dry_run, queues = %queues.join("; "), "scaling decision");
        } else {
            tracing::debug!(region = %d.region, current = d.current, desired = d.desired,
                queues = %queues.join("; "), "no change");
        }
        if let Some(m) = &self.metrics {
            m.current
                .with_label_values(&[&d.region])
                .set(f64::from(d.current));
            m.desired
                .with_label_values(&[&d.region, "all"])
                .set(f64::from(d.desired));
            for (q, s, dec) in &d.queues {
                let l = [d.region.as_str(), q.as_str()];
                m.desired.with_label_values(&l).set(f64::from(dec.desired));
                m.backlog.with_label_values(&l).set(s.backlog() as f64);
                m.active.with_label_values(&l).set(s.active as f64);
                m.oldest.with_label_values(&l).set(s.oldest_wait_seconds);
                m.rate
                    .with_label_values(&l)
                    .set(s.rate_per_worker.unwrap_or(0.0));
                m.drain
                    .with_label_values(&l)
                    .set(dec.drain_seconds.unwrap_or(0.0));
            }
            for (to, n) in &r.lending {
                m.spill
                    .with_label_values(&[&d.region, to])
                    .set(f64::from(*n));
            }
            if changed {
                let dir = if d.desired > d.current { "up" } else { "down" };
                m.decisions.with_label_values(&[&d.region, dir]).inc();
            }
        }
        if self.dry_run {
            return;
        }
        // Only a scale-down chooses workers to stop.
        let held = if d.desired < d.current {
            held_jobs(&r.config, r.broker.as_ref()).await
        } else {
            Held::new()
        };
        if let Err(e) = r.actuator.scale(d.desired, &held).await {
            tracing::warn!(region = %d.region, error = %e, "cannot scale the region's workers");
            if let Some(m) = &self.metrics {
                m.errors.with_label_values(&[&d.region, "actuator"]).inc();
            }
        }
        for (to, n) in &r.lending {
            let Some(helped) = self.regions.iter().find(|x| x.config.name == *to) else {
                continue;
            };
            let held = if *n > 0 {
                held_jobs(&helped.config, helped.broker.as_ref()).await
            } else {
                Held::new()
            };
            if let Err(e) = r.actuator.spill(&helped.config, *n, &held).await {
                tracing::warn!(region = %d.region, helped = %to, error = %e, "cannot run spill-over workers");
                if let Some(m) = &self.metrics {
                    m.errors.with_label_values(&[&d.region, "actuator"]).inc();
                }
            }
        }
    }
}

/// The jobs each consumer holds over `region`'s queues, read from its broker. Empty, with a warning, when the
/// broker cannot say: the actuator then stops workers by its own choice (the newest, or the ReplicaSet's pick).
async fn held_jobs(region: &Region, broker: &dyn Operations) -> Held {
    let mut held = Held::new();
    for q in region.queue_names() {
        match broker.leases_by_consumer(&q).await {
            Ok(by) => {
                for (consumer, n) in by {
                    *held.entry(consumer).or_insert(0) += n;
                }
            }
            Err(e) => {
                tracing::warn!(region = %region.name, queue = %q, error = %e,
                    "cannot read which workers hold jobs; stopping workers without that");
                return Held::new();
            }
        }
    }
    held
}

async fn decide_region(
    r: &mut RegionControl,
    now: Instant,
    elapsed: Duration,
) -> Result<RegionDecision, String> {
    let current = r.actuator.current().await.map_err(|e| e.to_string())?;
    let horizon = r.config.policy.scheduled_horizon();
    let mut queues = Vec::with_capacity(r.queues.len());
    let (mut desired, mut need) = (0, 0);
    for q in &mut r.queues {
        let (mut s, delivered) = signals::read(r.broker.as_ref(), &q.name, horizon)
            .await
            .map_err(|e| e.to_string())?;
        // Borrowed workers take this queue's jobs too: the rate is per worker of either kind.
        let workers = current + r.borrowed;
        s.rate_per_worker = q.meter.observe(now, delivered, s.waiting > 0, workers);
        let d = policy::decide(&r.config.policy, &s, current, elapsed, &mut q.history);
        desired = desired.max(d.desired);
        need = need.max(d.need);
        queues.push((q.name.clone(), s, d));
    }
    Ok(RegionDecision {
        region: r.config.name.clone(),
        current,
        desired,
        need,
        queues,
        borrowed: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use ferry_broker::{Broker, EngineConfig, MemoryBroker};
    use ferry_core::{Kind, NewJob};

    use super::*;
    use crate::actuator::MetricsOnly;
    use crate::config::RegionsFile;

    /// Region "busy" (at most 1 worker, a backlog of 100 per worker) on `busy`; region "helper" (at most
    /// `helper_max`, the given scale-down window) on a broker of its own, returned too. Both only export their
    /// decisions.
    fn two_regions(
        busy: Arc<dyn Broker>,
        helper_max: u32,
        window_seconds: u32,
    ) -> (Autoscaler, Arc<dyn Broker>) {
        let file = RegionsFile::parse(&format!(
            "[[regions]]\nname = \"busy\"\nredis = [\"redis://busy\"]\nqueues = [\"work\"]\nhelps-others = false\n\
             [regions.policy]\nmin-workers = 1\nmax-workers = 1\nbacklog-per-worker = 100\n\
             [regions.actuator]\nkind = \"metrics\"\n\
             [[regions]]\nname = \"helper\"\nredis = [\"redis://helper\"]\nqueues = [\"work\"]\n\
             [regions.policy]\nmin-workers = 0\nmax-workers = {helper_max}\nbacklog-per-worker = 100\n\
             scale-down-stabilization-seconds = {window_seconds}\n[regions.actuator]\nkind = \"metrics\"\n"
        ))
        .unwrap();
        let mut regions = file.regions.into_iter();
        let helper_broker: Arc<dyn Broker> = Arc::new(MemoryBroker::new(EngineConfig::default()));
        let busy = RegionControl::new(
            regions.next().unwrap(),
            busy,
            Arc::new(MetricsOnly::default()),
        );
        let helper = RegionControl::new(
            regions.next().unwrap(),
            helper_broker.clone(),
            Arc::new(MetricsOnly::default()),
        );
        (
            Autoscaler::new(vec![busy, helper], false, None),
            helper_broker,
        )
    }

    async fn enqueue(b: &dyn Broker, n: usize) {
        let q = QueueName::parse("work").unwrap();
        let job = NewJob::new(Kind::parse("ferry.noop").unwrap(), serde_json::json!({}));
        b.enqueue_batch(&q, vec![job; n]).await.unwrap();
    }

    /// Run every waiting job of `b` to completion: nothing waits or runs any more.
    async fn finish_all(b: &dyn Broker) {
        let q = QueueName::parse("work").unwrap();
        loop {
            let got = b.claim(&q, "w", 1_000, Duration::ZERO).await.unwrap();
            if got.is_empty() {
                return;
            }
            let done = got
                .into_iter()
                .map(|l| ferry_broker::Completion {
                    lease: l.lease,
                    result: serde_json::Value::Null,
                })
                .collect();
            b.complete(done).await.unwrap();
        }
    }

    fn lent(a: &Autoscaler) -> Option<u32> {
        a.regions[1].lending.get("busy").copied()
    }

    #[tokio::test]
    async fn the_last_round_is_kept_as_json_for_the_admin_listener() {
        let busy: Arc<dyn Broker> = Arc::new(MemoryBroker::new(EngineConfig::default()));
        let (mut a, _) = two_regions(busy.clone(), 4, 0);
        let last = a.last_decisions();
        assert!(
            last.lock().unwrap().is_none(),
            "nothing before the first round"
        );
        enqueue(busy.as_ref(), 1_000).await;
        a.round().await;
        let v = last.lock().unwrap().clone().expect("a round was kept");
        assert_eq!(v["dry_run"], false);
        assert!(v["at"].as_u64().unwrap() > 1_700_000_000_000, "{v}");
        let busy = &v["regions"][0];
        assert_eq!(busy["region"], "busy");
        assert_eq!(busy["current"], 0);
        assert_eq!(busy["desired"], 1);
        assert_eq!(busy["need"], 10);
        assert_eq!(busy["borrowed"], json!([{"from": "helper", "workers": 4}]));
        let q = &busy["queues"][0];
        assert_eq!(q["queue"], "work");
        assert_eq!(q["waiting"], 1_000);
        assert_eq!(q["active"], 0);
        assert_eq!(q["rate_per_worker"], Value::Null);
        assert_eq!(q["desired"], 1);
        assert_eq!(q["reason"], "bound");
        assert_eq!(v["regions"][1]["region"], "helper");
    }

    #[tokio::test]
    async fn a_loan_covers_the_shortfall_within_the_helpers_headroom() {
        let busy: Arc<dyn Broker> = Arc::new(MemoryBroker::new(EngineConfig::default()));
        let (mut a, _) = two_regions(busy.clone(), 4, 0);
        // 1,000 waiting: busy needs 10, has at most 1; the helper lends all 4 it has room for.
        enqueue(busy.as_ref(), 1_000).await;
        let d = a.round().await;
        assert_eq!(lent(&a), Some(4));
        assert_eq!(d[0].borrowed, [("helper".to_owned(), 4)]);
        // The backlog gone, the loan ends (and stays listed at zero, so its workers are stopped). No window here.
        finish_all(busy.as_ref()).await;
        let d = a.round().await;
        assert_eq!(lent(&a), Some(0));
        assert!(d[0].borrowed.is_empty(), "{:?}", d[0].borrowed);
        // 250 waiting: short by 2 (no rate is measured: nothing waited at the end of the last round).
        enqueue(busy.as_ref(), 250).await;
        let d = a.round().await;
        assert_eq!(lent(&a), Some(2), "the loan follows the need");
        assert_eq!(d[0].borrowed, [("helper".to_owned(), 2)]);
    }

    #[tokio::test]
    async fn a_loan_shrinks_only_after_the_helpers_window_and_never_beyond_its_headroom() {
        let busy: Arc<dyn Broker> = Arc::new(MemoryBroker::new(EngineConfig::default()));
        let (mut a, helper) = two_regions(busy.clone(), 4, 600);
        enqueue(busy.as_ref(), 1_000).await;
        a.round().await;
        assert_eq!(lent(&a), Some(4));
        // The backlog dips to nothing: within the window the loan stays, ready for the next burst.
        finish_all(busy.as_ref()).await;
        let d = a.round().await;
        assert_eq!(lent(&a), Some(4), "held by the window");
        assert_eq!(d[0].borrowed, [("helper".to_owned(), 4)]);
        // The helper's own queue needs 3 of its 4: its own work first, the loan shrinks to the rest.
        enqueue(helper.as_ref(), 300).await;
        a.round().await;
        assert_eq!(lent(&a), Some(1), "within the helper's headroom");
    }
}
