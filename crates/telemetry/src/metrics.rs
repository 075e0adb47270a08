//! Prometheus plumbing shared by every role: one [`Registry`] per process (never the crate's global default
//! registry, so several nodes can run in one test process), the process collector, `ferry_build_info`, tokio
//! runtime gauges refreshed at scrape time, [`FnCollector`] for figures read at scrape time, and [`render`].
//! The metric names are the contract in `docs/metrics.md`.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, MetricFamily, MetricType};
use prometheus::{Encoder, IntGaugeVec, Opts, Registry, TextEncoder};

pub use prometheus;

/// Content type of [`render`]'s output.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Buckets for durations in seconds, 1 ms to 60 s.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Buckets for job durations and queue waits: 1 ms to 1 h.
pub const JOB_SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
    3600.0,
];

/// A registry for one process (or one node in a test), with the process collector (Linux),
/// `ferry_build_info{version}` and the tokio runtime gauges already registered.
pub fn registry() -> Registry {
    let r = Registry::new();
    register_process_metrics(&r);
    r
}

/// Register the process-level metrics in `r`. Errors (a second registration) are logged, not fatal: metrics
/// must never stop a role from serving.
pub fn register_process_metrics(r: &Registry) {
    #[cfg(target_os = "linux")]
    register_or_log(
        r,
        Box::new(prometheus::process_collector::ProcessCollector::for_self()),
    );
    match IntGaugeVec::new(
        Opts::new(
            "ferry_build_info",
            "Always 1; the label carries the ferry version.",
        ),
        &["version"],
    ) {
        Ok(info) => {
            info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
            register_or_log(r, Box::new(info));
        }
        Err(e) => tracing::warn!(error = %e, "cannot build ferry_build_info"),
    }
    register_or_log(r, Box::new(TokioCollector::new()));
}

/// Register a collector, logging instead of failing.
pub fn register_or_log(r: &Registry, c: Box<dyn Collector>) {
    if let Err(e) = r.register(c) {
        tracing::warn!(error = %e, "cannot register a metric");
    }
}

/// The registry's metrics in the Prometheus text format.
pub fn render(r: &Registry) -> String {
    render_families(&r.gather())
}

/// Metric families (from [`Registry::gather`] or [`Collector::collect`]) in the text format. Families without
/// samples (a labelled metric nothing has touched yet) are left out, as [`Registry::gather`] does.
///
/// Families of the same name (one process running several roles, as `ferry dev` does: its gateway and its
/// embedded recorder both export `ferry_breaker_state`) are written as one, the first one's series winning a
/// label set both have: a name's HELP and TYPE twice make the whole scrape unreadable to Prometheus.
pub fn render_families(families: &[MetricFamily]) -> String {
    let mut buf = Vec::new();
    let families = merge_families(families);
    let encoder = TextEncoder::new();
    for f in &families {
        if let Err(e) = encoder.encode(std::slice::from_ref(f), &mut buf) {
            tracing::warn!(error = %e, metric = f.name(), "cannot encode a metric");
        }
    }
    String::from_utf8(buf).unwrap_or_default()
}

/// `families` without empty ones, those of one name merged (see [`render_families`]), in first-seen order.
fn merge_families(families: &[MetricFamily]) -> Vec<MetricFamily> {
    let labels = |m: &proto::Metric| -> Vec<(String, String)> {
        m.get_label()
            .iter()
            .map(|l| (l.name().to_owned(), l.value().to_owned()))
            .collect()
    };
    let mut out: Vec<MetricFamily> = Vec::with_capacity(families.len());
    for f in families.iter().filter(|f| !f.get_metric().is_empty()) {
        let Some(first) = out.iter_mut().find(|o| o.name() == f.name()) else {
            out.push(f.clone());
            continue;
        };
        if first.get_field_type() != f.get_field_type() {
            tracing::warn!(
                metric = f.name(),
                "two metric families of one name and different types: the second is left out"
            );
            continue;
        }
        for m in f.get_metric() {
            let l = labels(m);
            if !first.get_metric().iter().any(|o| labels(o) == l) {
                first.mut_metric().push(m.clone());
            }
        }
    }
    out
}

/// Whether a metric is a gauge or a counter, for [`FnCollector`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FnKind {
    Gauge,
    Counter,
}

type SampleFn = Box<dyn Fn(&mut Vec<(Vec<String>, f64)>) + Send + Sync>;

/// One metric whose samples are computed when scraped, by a closure that pushes `(label values, value)`. For
/// figures that already live elsewhere (atomics, breakers, pool status): nothing is copied between scrapes.
pub struct FnCollector {
    desc: Desc,
    name: String,
    help: String,
    kind: FnKind,
    labels: Vec<String>,
    f: SampleFn,
}

impl std::fmt::Debug for FnCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FnCollector")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl FnCollector {
    pub fn new(
        name: &str,
        help: &str,
        kind: FnKind,
        labels: &[&str],
        f: impl Fn(&mut Vec<(Vec<String>, f64)>) + Send + Sync + 'static,
    ) -> prometheus::Result<Self> {
        let labels: Vec<String> = labels.iter().map(|s| (*s).to_owned()).collect();
        Ok(Self {
            desc: Desc::new(
                name.to_owned(),
                help.to_owned(),
                labels.clone(),
                Default::default(),
            )?,
            name: name.to_owned(),
            help: help.to_owned(),
            kind,
            labels,
            f: Box::new(f),
        })
    }

    /// An unlabelled metric.
    pub fn single(
        name: &str,
        help: &str,
        kind: FnKind,
        f: impl Fn() -> f64 + Send + Sync + 'static,
    ) -> prometheus::Result<Self> {
        Self::new(name, help, kind, &[], move |out| {
            out.push((Vec::new(), f()))
        })
    }
}

impl Collector for FnCollector {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut samples = Vec::new();
        (self.f)(&mut samples);
        let mut mf = MetricFamily::default();
        mf.set_name(self.name.clone());
        mf.set_help(self.help.clone());
        mf.set_field_type(match self.kind {
            FnKind::Gauge => MetricType::GAUGE,
            FnKind::Counter => MetricType::COUNTER,
        });
        for (values, v) in samples {
            let mut m = proto::Metric::default();
            let pairs = self
                .labels
                .iter()
                .zip(values)
                .map(|(n, v)| {
                    let mut p = proto::LabelPair::default();
                    p.set_name(n.clone());
                    p.set_value(v);
                    p
                })
                .collect();
            m.set_label(pairs);
            match self.kind {
                FnKind::Gauge => {
                    let mut g = proto::Gauge::default();
                    g.set_value(v);
                    m.set_gauge(g);
                }
                FnKind::Counter => {
                    let mut c = proto::Counter::default();
                    c.set_value(v);
                    m.set_counter(c);
                }
            }
            mf.mut_metric().push(m);
        }
        vec![mf]
    }
}

/// `ferry_tokio_*`, read from the runtime of the scraping task at scrape time (nothing when scraped outside a
/// runtime). Only metrics stable in tokio (no `tokio_unstable`).
#[derive(Debug)]
pub struct TokioCollector {
    descs: Vec<Desc>,
    /// Total busy time of all workers and when it was read, for the busy ratio between two scrapes.
    last_busy: Mutex<Option<(Duration, Instant)>>,
}

const TOKIO: [(&str, &str); 4] = [
    (
        "ferry_tokio_workers",
        "Worker threads of the tokio runtime.",
    ),
    (
        "ferry_tokio_alive_tasks",
        "Tasks alive in the tokio runtime.",
    ),
    (
        "ferry_tokio_global_queue_depth",
        "Tasks waiting in the runtime's global (injection) queue.",
    ),
    (
        "ferry_tokio_busy_ratio",
        "Busy time of the runtime's workers over the last scrape interval, 0-1.",
    ),
];

impl TokioCollector {
    pub fn new() -> Self {
        Self {
            descs: TOKIO
                .iter()
                .filter_map(|(n, h)| {
                    Desc::new((*n).into(), (*h).into(), vec![], Default::default()).ok()
                })
                .collect(),
            last_busy: Mutex::new(None),
        }
    }
}

impl Default for TokioCollector {
    fn default() -> Self {
        Self::new()
    }
}

fn gauge_family(name: &str, help: &str, v: f64) -> MetricFamily {
    let mut mf = MetricFamily::default();
    mf.set_name(name.to_owned());
    mf.set_help(help.to_owned());
    mf.set_field_type(MetricType::GAUGE);
    let mut g = proto::Gauge::default();
    g.set_value(v);
    let mut m = proto::Metric::default();
    m.set_gauge(g);
    mf.mut_metric().push(m);
    mf
}

impl Collector for TokioCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return Vec::new();
        };
        let m = handle.metrics();
        let workers = m.num_workers();
        let busy: Duration = (0..workers).map(|w| m.worker_total_busy_duration(w)).sum();
        let now = Instant::now();
        let ratio = {
            let mut last = self.last_busy.lock().unwrap_or_else(|p| p.into_inner());
            let ratio = match *last {
                Some((prev, at)) if now > at && workers > 0 => {
                    let wall = now.duration_since(at).as_secs_f64() * workers as f64;
                    (busy.saturating_sub(prev).as_secs_f64() / wall).clamp(0.0, 1.0)
                }
                _ => 0.0,
            };
            *last = Some((busy, now));
            ratio
        };
        let values = [
            workers as f64,
            m.num_alive_tasks() as f64,
            m.global_queue_depth() as f64,
            ratio,
        ];
        TOKIO
            .iter()
            .zip(values)
            .map(|((n, h), v)| gauge_family(n, h, v))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_of_one_name_are_rendered_once_first_series_winning() {
        let family = |kind: FnKind, samples: Vec<(&str, f64)>| {
            let samples: Vec<(Vec<String>, f64)> = samples
                .into_iter()
                .map(|(d, v)| (vec![d.to_owned()], v))
                .collect();
            FnCollector::new(
                "ferry_breaker_state",
                "State.",
                kind,
                &["dependency"],
                move |out| out.extend(samples.iter().cloned()),
            )
            .unwrap()
            .collect()
        };
        let mut all = family(FnKind::Gauge, vec![("redis", 0.0), ("postgres", 2.0)]);
        all.extend(family(FnKind::Gauge, vec![("postgres", 1.0), ("dns", 0.0)]));
        all.extend(family(FnKind::Counter, vec![("other", 5.0)]));
        let text = render_families(&all);
        assert_eq!(
            text.matches("# HELP ferry_breaker_state").count(),
            1,
            "{text}"
        );
        assert_eq!(
            text.matches("# TYPE ferry_breaker_state").count(),
            1,
            "{text}"
        );
        for line in [
            "ferry_breaker_state{dependency=\"redis\"} 0",
            "ferry_breaker_state{dependency=\"postgres\"} 2",
            "ferry_breaker_state{dependency=\"dns\"} 0",
        ] {
            assert!(text.contains(line), "{line} missing:\n{text}");
        }
        assert!(
            !text.contains("} 1\n"),
            "the second postgres series is left out:\n{text}"
        );
        assert!(
            !text.contains("other"),
            "a family of another type is left out:\n{text}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn registry_has_process_build_and_tokio_metrics() {
        let r = registry();
        let c = FnCollector::new(
            "ferry_test_things",
            "Things.",
            FnKind::Counter,
            &["kind"],
            |out| out.push((vec!["a".into()], 3.0)),
        )
        .unwrap();
        r.register(Box::new(c)).unwrap();
        let text = render(&r);
        for name in [
            "process_resident_memory_bytes",
            "process_cpu_seconds_total",
            "process_open_fds",
            "process_max_fds",
            "ferry_tokio_workers 2",
            "ferry_tokio_alive_tasks",
            "ferry_tokio_global_queue_depth",
            "ferry_tokio_busy_ratio",
            "ferry_build_info{version=\"",
            "# TYPE ferry_test_things counter",
            "ferry_test_things{kind=\"a\"} 3",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
        // A second registry in the same process does not collide.
        let again = render(&registry());
        assert!(again.contains("ferry_build_info"));
    }
}
