//! Optional export of spans to an OpenTelemetry collector over OTLP/HTTP (protobuf), and the glue that ties
//! ferry's W3C `traceparent` strings to those spans.
//!
//! Off by default: without an endpoint no exporter, no extra layer, and the helpers below cost one failed
//! downcast. With one, [`crate::install_tracing`] adds a `tracing-opentelemetry` layer whose spans a batch
//! processor (its own thread) hands to the exporter. The exporter sends through the workspace's `reqwest`
//! (rustls on ring: no second crypto provider), each request spawned on the process's tokio runtime, so the
//! export never runs on, nor blocks, the runtime's workers. A failing collector costs dropped spans and a
//! warning at most once a minute; it never blocks or stops the process.
//!
//! Parenting: [`set_remote_parent`] makes a span the child of a `traceparent` received from elsewhere (a
//! request header, a job), and [`traceparent_of`] / [`current_traceparent`] give the `traceparent` that names a
//! span as the parent, to hand on. Only spans of ferry's own crates (targets `ferry*`) are exported, so the
//! exporter's HTTP client cannot feed spans back into itself.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The path OTLP/HTTP receivers take traces on, appended to the configured endpoint.
pub const TRACES_PATH: &str = "/v1/traces";

/// Longest [`TracingGuard::shutdown`] waits for the last spans to be sent.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest one export request may take (connect, send, read the answer).
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// At most one warning about failing exports per this period; the others are counted in the next one.
const FAILURE_LOG_PERIOD: Duration = Duration::from_secs(60);

/// Where and as whom spans are exported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpConfig {
    /// The collector's base URL (`http://127.0.0.1:4318`); spans are posted to `<endpoint>/v1/traces`.
    pub endpoint: String,
    /// `service.name` of the exported resource, e.g. `ferry-worker`.
    pub service_name: String,
    /// `service.version` of the exported resource.
    pub service_version: String,
}

/// Check an OTLP endpoint as given (`--otlp-endpoint`) and return the URL spans are posted to: `http` or
/// `https`, a host, no query or fragment; `/v1/traces` is appended unless the path already ends with it.
pub fn traces_url(endpoint: &str) -> Result<String, String> {
    let endpoint = endpoint.trim();
    let url =
        reqwest::Url::parse(endpoint).map_err(|e| format!("{endpoint:?} is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "{endpoint:?}: the scheme must be http or https (OTLP over HTTP), not {}",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("{endpoint:?} has no host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("{endpoint:?} must not have a query or a fragment"));
    }
    let base = url.as_str().trim_end_matches('/');
    if base.ends_with(TRACES_PATH) {
        Ok(base.to_owned())
    } else {
        Ok(format!("{base}{TRACES_PATH}"))
    }
}

/// The provider of the installed exporter, for [`flush`] (set by [`TracingGuard::new`], taken by its stop).
static EXPORTING: Mutex<Option<SdkTracerProvider>> = Mutex::new(None);

/// Keeps the exporter of an installed subscriber; [`shutdown`](Self::shutdown) sends what is still queued.
/// Without export it holds nothing. Dropping it without `shutdown` also flushes, with the same bound.
#[derive(Debug, Default)]
pub struct TracingGuard {
    provider: Option<SdkTracerProvider>,
}

impl TracingGuard {
    pub(crate) fn new(provider: Option<SdkTracerProvider>) -> Self {
        *EXPORTING.lock().unwrap_or_else(|p| p.into_inner()) = provider.clone();
        Self { provider }
    }

    /// Whether spans are being exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Send the spans still queued and stop the exporter, waiting at most [`SHUTDOWN_TIMEOUT`]. Call it
    /// after the role has stopped, outside the async runtime but before the runtime is dropped (the export
    /// requests run on it).
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(provider) = self.provider.take() else {
            return;
        };
        EXPORTING.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Err(e) = provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT) {
            tracing::warn!(error = %e, "trace export did not finish cleanly; the last spans may be lost");
        }
    }
}

impl Drop for TracingGuard {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Send the spans queued so far, waiting at most `timeout`: for a process about to exit without returning
/// through its [`TracingGuard`] (the worker's hard shutdown deadline). Nothing to do when spans are not exported.
/// The flush blocks a thread of its own, so the runtime's threads stay free to run the export requests.
pub async fn flush(timeout: Duration) {
    let Some(provider) = EXPORTING.lock().unwrap_or_else(|p| p.into_inner()).clone() else {
        return;
    };
    let flushing = tokio::task::spawn_blocking(move || provider.force_flush());
    match tokio::time::timeout(timeout, flushing).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "cannot send the last spans"),
        Ok(Err(e)) => tracing::warn!(error = %e, "cannot send the last spans"),
        Err(_) => tracing::warn!(
            timeout_ms = timeout.as_millis() as u64,
            "the last spans were not sent in time"
        ),
    }
}

/// The tracer provider exporting to `config`; export requests are spawned on `runtime`.
pub(crate) fn provider(
    config: &OtlpConfig,
    runtime: tokio::runtime::Handle,
) -> Result<SdkTracerProvider, String> {
    let url = traces_url(&config.endpoint)?;
    let client = reqwest::Client::builder()
        .timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(|e| format!("cannot build the OTLP HTTP client: {e}"))?;
    let http = ExportClient {
        client,
        runtime,
        failures: FailureLog::default(),
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(url)
        .with_timeout(EXPORT_TIMEOUT)
        .with_http_client(http)
        .build()
        .map_err(|e| format!("cannot build the OTLP exporter: {e}"))?;
    let resource = Resource::builder()
        .with_service_name(config.service_name.clone())
        .with_attributes([
            KeyValue::new("service.version", config.service_version.clone()),
            KeyValue::new("service.instance.id", uuid::Uuid::now_v7().to_string()),
        ])
        .build();
    Ok(SdkTracerProvider::builder()
        .with_resource(resource)
        .with_batch_exporter(exporter)
        .build())
}

/// The `tracing` layer feeding `provider`, limited to ferry's own spans.
pub(crate) fn layer<S>(provider: &SdkTracerProvider) -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    use tracing_subscriber::Layer as _;
    tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("ferry"))
        .with_tracked_inactivity(false)
        .with_threads(false)
        .with_filter(tracing_subscriber::filter::filter_fn(|meta| {
            meta.target().starts_with("ferry")
        }))
}

/// Parse a W3C `traceparent` (version 00, [`ferry_core::trace::TraceParent`]) into a remote span context;
/// `None` for anything malformed.
fn parse(traceparent: &str) -> Option<SpanContext> {
    let t = ferry_core::trace::TraceParent::parse(traceparent.trim())?;
    let cx = SpanContext::new(
        TraceId::from_bytes(t.trace_id),
        SpanId::from_bytes(t.parent_id),
        TraceFlags::new(t.flags & 1),
        true,
        TraceState::default(),
    );
    cx.is_valid().then_some(cx)
}

/// Make `span` a child of the span named by `traceparent` (a request's header, a job's stored value): same
/// trace id, that span id as its parent. Call it right after creating the span, before it is entered. Does
/// nothing when spans are not exported, the span is disabled, or the value is malformed.
pub fn set_remote_parent(span: &tracing::Span, traceparent: &str) {
    if span.is_disabled() {
        return;
    }
    if let Some(cx) = parse(traceparent) {
        // Without the OpenTelemetry layer (export off) this is a cheap `LayerNotFound`: nothing to do.
        let _ = span.set_parent(Context::new().with_remote_span_context(cx));
    }
}

/// The `traceparent` naming `span` as the parent (`00-<trace id>-<span id>-<flags>`), to store or send on;
/// `None` when spans are not exported or the span is disabled.
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    if span.is_disabled() {
        return None;
    }
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )
    })
}

/// [`traceparent_of`] the current span.
pub fn current_traceparent() -> Option<String> {
    traceparent_of(&tracing::Span::current())
}

/// The exporter's HTTP client: the workspace's `reqwest`, each request spawned on the tokio runtime (the
/// batch processor calls from its own thread, outside any runtime). Failures are reported rarely.
#[derive(Debug)]
struct ExportClient {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
    failures: FailureLog,
}

#[async_trait::async_trait]
impl HttpClient for ExportClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let client = self.client.clone();
        let request = reqwest::Request::try_from(request)?;
        let url = request.url().clone();
        let sent = self
            .runtime
            .spawn(async move {
                let res = client.execute(request).await?;
                let status = res.status();
                let headers = res.headers().clone();
                let body = res.bytes().await?;
                Ok::<_, reqwest::Error>((status, headers, body))
            })
            .await;
        let (status, headers, body) = match sent {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => {
                self.failures.failed(&url, &e);
                return Err(e.into());
            }
            // The runtime is shutting down: nothing more can be sent.
            Err(e) => return Err(e.into()),
        };
        if !status.is_success() {
            self.failures.failed(&url, format!("HTTP {status}"));
        }
        let mut response = Response::builder().status(status).body(body)?;
        *response.headers_mut() = headers;
        Ok(response)
    }
}

/// Reports export failures at most once per [`FAILURE_LOG_PERIOD`], with the count of those not reported.
#[derive(Debug, Default)]
struct FailureLog {
    last: Mutex<Option<Instant>>,
    unreported: AtomicU64,
}

impl FailureLog {
    fn failed(&self, url: &reqwest::Url, error: impl std::fmt::Display) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|t| t.elapsed() < FAILURE_LOG_PERIOD) {
            self.unreported.fetch_add(1, Ordering::Relaxed);
            return;
        }
        *last = Some(Instant::now());
        drop(last);
        let earlier = self.unreported.swap(0, Ordering::Relaxed);
        tracing::warn!(
            endpoint = %url,
            error = %error,
            failures_not_reported = earlier,
            "cannot export spans to the OTLP collector; they are dropped (reported at most once a minute)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_checked_and_get_the_traces_path() {
        assert_eq!(
            traces_url("http://127.0.0.1:4318").unwrap(),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(
            traces_url("https://otel.example:4318/").unwrap(),
            "https://otel.example:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://c:4318/v1/traces").unwrap(),
            "http://c:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://c/otlp").unwrap(),
            "http://c/otlp/v1/traces"
        );
        for bad in [
            "",
            "127.0.0.1:4318",
            "ftp://c:21",
            "http://",
            "http://c:4318/?a=b",
            "not a url",
        ] {
            assert!(traces_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn traceparents_parse_into_remote_contexts() {
        let cx = parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(
            cx.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(cx.span_id().to_string(), "00f067aa0ba902b7");
        assert!(cx.is_sampled() && cx.is_remote());
        // The parser is ferry_core's (tested there); malformed values give no context.
        assert!(parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7").is_none());
        let unsampled = parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap();
        assert!(!unsampled.is_sampled());
    }

    #[test]
    fn without_export_the_helpers_do_nothing() {
        let span = tracing::info_span!("x");
        set_remote_parent(
            &span,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        );
        assert_eq!(traceparent_of(&span), None);
        assert_eq!(current_traceparent(), None);
    }

    #[test]
    fn with_export_spans_join_the_remote_trace() {
        use tracing_subscriber::layer::SubscriberExt as _;
        let rt = tokio::runtime::Runtime::new().unwrap();
        let provider = provider(
            &OtlpConfig {
                // Nothing listens there: exports fail, which must not matter.
                endpoint: "http://127.0.0.1:9".into(),
                service_name: "ferry-test".into(),
                service_version: "0".into(),
            },
            rt.handle().clone(),
        )
        .unwrap();
        let subscriber = tracing_subscriber::registry().with(layer(&provider));
        tracing::subscriber::with_default(subscriber, || {
            let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
            let span = tracing::info_span!("submit");
            set_remote_parent(&span, parent);
            let tp = traceparent_of(&span).unwrap();
            assert!(
                tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
                "{tp}"
            );
            assert!(tp.ends_with("-01"), "{tp}");
            assert_ne!(tp, parent, "names the new span as the parent");
            assert_eq!(span.in_scope(current_traceparent), Some(tp));
            // A span with no remote parent starts a trace of its own.
            let root = tracing::info_span!("root");
            let own = traceparent_of(&root).unwrap();
            assert!(!own.contains("4bf92f3577b34da6a3ce929d0e0e4736"), "{own}");
        });
        let started = Instant::now();
        TracingGuard {
            provider: Some(provider),
        }
        .shutdown();
        assert!(started.elapsed() < SHUTDOWN_TIMEOUT + Duration::from_secs(2));
    }
}
