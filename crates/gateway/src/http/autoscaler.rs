//! `GET /v1/autoscaler`: the last scaling decisions of the autoscalers this gateway is pointed at
//! (`--autoscaler-url`), read from their admin listeners (`GET /decisions`) when asked. The dashboard's
//! autoscaler page shows them. The gateway keeps nothing: an autoscaler that cannot be read is listed as such.

use std::sync::OnceLock;
use std::time::Duration;

use axum::extract::State;
use serde_json::{Value, json};

use super::Api;
use super::extract::Authed;
use crate::auth::Scope;
use crate::error::ApiError;

/// How long one autoscaler may take to answer.
const TIMEOUT: Duration = Duration::from_secs(2);

/// `GET /v1/autoscaler` (scope `queues:read`): `{"autoscalers": [{"url", "ok", "at", "dry_run", "regions"} or
/// {"url", "ok": false, "error"}]}`, one per configured URL, in order.
pub async fn handler(
    State(api): State<Api>,
    Authed(p): Authed,
) -> Result<axum::Json<Value>, ApiError> {
    p.require(Scope::QueuesRead)?;
    let reads = api.app.config.autoscaler_url.iter().map(|url| async move {
        let shown = ferry_core::redact_url(url);
        match read(url).await {
            Ok(v) => json!({
                "url": shown,
                "ok": true,
                "at": v.get("at").cloned().unwrap_or(Value::Null),
                "dry_run": v.get("dry_run").cloned().unwrap_or(Value::Bool(false)),
                "regions": v.get("regions").cloned().unwrap_or_else(|| json!([])),
            }),
            Err(error) => json!({"url": shown, "ok": false, "error": error}),
        }
    });
    let autoscalers = futures::future::join_all(reads).await;
    Ok(axum::Json(json!({ "autoscalers": autoscalers })))
}

/// One autoscaler's `GET /decisions`; the error as shown to the client (no URL in it: the entry names it).
async fn read(base: &str) -> Result<Value, String> {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    let client = CLIENT.get_or_init(reqwest::Client::new);
    let url = format!("{}/decisions", base.trim_end_matches('/'));
    let res = client
        .get(&url)
        .timeout(TIMEOUT)
        .send()
        .await
        .map_err(|e| format!("cannot read it: {}", e.without_url()))?;
    if !res.status().is_success() {
        return Err(format!("it answered {}", res.status()));
    }
    let v: Value = res
        .json()
        .await
        .map_err(|e| format!("not JSON decisions: {}", e.without_url()))?;
    if v.get("regions").is_some_and(Value::is_array) {
        Ok(v)
    } else {
        Err("not an autoscaler's /decisions (no regions)".into())
    }
}
