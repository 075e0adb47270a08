//! W3C trace context: a submission's `traceparent` is kept with the job and returned; without one the gateway
//! starts a trace.

use std::sync::Arc;

use ferry_broker::{EngineConfig, MemoryBroker, prelude::*};
use ferry_core::JobId;
use serde_json::json;

use crate::support::{TestApp, USER, token};

#[tokio::test]
async fn traceparent_is_taken_or_started_stored_and_returned() {
    let broker = Arc::new(MemoryBroker::new(EngineConfig::default()));
    let app = TestApp::start(broker.clone(), |_| {}).await;
    let alice = token("alice", USER, None);
    let given = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let res = reqwest::Client::new()
        .post(format!("{}/v1/queues/q/jobs", app.base))
        .bearer_auth(&alice)
        .header("traceparent", given)
        .json(&json!({"kind": "k"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    assert_eq!(res.headers()["traceparent"], given);
    let id: JobId = res.json::<serde_json::Value>().await.unwrap()["id"]
        .as_str()
        .map(|s| JobId::parse(s).unwrap())
        .unwrap();
    let job = broker.job(id).await.unwrap().unwrap();
    assert_eq!(job.spec.traceparent.as_deref(), Some(given));

    // None given (or a malformed one): a new, valid trace.
    for header in [None, Some("not-a-trace")] {
        let mut req = reqwest::Client::new()
            .post(format!("{}/v1/queues/q/jobs", app.base))
            .bearer_auth(&alice)
            .json(&json!({"kind": "k"}));
        if let Some(h) = header {
            req = req.header("traceparent", h);
        }
        let res = req.send().await.unwrap();
        let started = res.headers()["traceparent"].to_str().unwrap().to_owned();
        assert!(
            ferry_core::trace::TraceParent::parse(&started).is_some(),
            "{started}"
        );
        assert_ne!(started, given);
    }
}
