//! Request counters for `GET /metrics`, in the Prometheus text format: `ferry_http_requests_total` by method,
//! route template and status. Hand-written rather than the `prometheus` crate, which is not a workspace
//! dependency yet; one registry per router (no global), so several gateways can run in one test process.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;

#[derive(Debug, Default)]
pub struct Metrics {
    // A std mutex: it is held for one map update, never across an await. The key is
    // (method, route template, status); templates keep the label set bounded whatever the URLs.
    requests: Mutex<BTreeMap<(String, String, u16), u64>>,
}

impl Metrics {
    fn record(&self, method: &str, route: &str, status: u16) {
        let mut map = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *map.entry((method.to_owned(), route.to_owned(), status))
            .or_default() += 1;
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let map = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::from(
            "# HELP ferry_http_requests_total HTTP requests by method, route and status.\n\
             # TYPE ferry_http_requests_total counter\n",
        );
        for ((method, route, status), n) in map.iter() {
            let _ = writeln!(
                out,
                "ferry_http_requests_total{{method=\"{method}\",route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        out
    }
}

/// Middleware: count every response by its route template (`/v1/jobs/{id}`, not the id), or `unmatched`.
pub async fn track(State(metrics): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let method = req.method().as_str().to_owned();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    let res = next.run(req).await;
    metrics.record(&method, &route, res.status().as_u16());
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_with_labels() {
        let m = Metrics::default();
        m.record("GET", "/v1/jobs/{id}", 200);
        m.record("GET", "/v1/jobs/{id}", 200);
        m.record("POST", "unmatched", 404);
        let text = m.render();
        assert!(text.contains(
            "ferry_http_requests_total{method=\"GET\",route=\"/v1/jobs/{id}\",status=\"200\"} 2"
        ));
        assert!(text.contains("# TYPE ferry_http_requests_total counter"));
    }
}
