//! The in-process cluster harness (`ferry_testkit::cluster`) with every node real: a job submitted over one
//! gateway's WebSocket is run by a worker node, its events reach a subscriber on another gateway, the record
//! in PostgreSQL has its trail, and a drained worker hands over to a new one.

use std::time::Duration;

use anyhow::Result;
use ferry_testkit::cluster::Cluster;
use ferry_testkit::eventually;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_crosses_gateways_workers_and_the_record_in_process() -> Result<()> {
    let mut cluster = Cluster::builder()
        .gateways(2)
        .worker(&["harness"])
        .postgres()
        .start()
        .await?;
    let submitter = cluster.client(0, "alice", "jobs:submit jobs:read");
    let watcher = cluster.client(1, "alice", "jobs:read queues:read");
    let mut ws = watcher.ws().await?;
    let sub = ws.subscribe("queue:harness").await?;
    assert_eq!(sub["ok"], true, "{sub}");

    let id = submitter
        .submit("harness", "ferry.echo", json!({"n": 1}))
        .await?;
    let job = submitter
        .until_finished(&id, Duration::from_secs(20))
        .await?;
    assert_eq!(job["state"], "completed", "{job}");
    assert_eq!(job["result"], json!({"n": 1}));
    // The other gateway pushed the job's life to its subscriber (and to alice's own `user:` channel, which every
    // connection of hers has).
    let mut seen = Vec::new();
    while seen.last().map(String::as_str) != Some("job.completed") {
        let frame = ws.next(Duration::from_secs(10)).await?;
        if frame["channel"] == "queue:harness" && frame["data"]["id"] == json!(id) {
            seen.push(frame["event"].as_str().unwrap_or_default().to_owned());
        }
    }
    assert_eq!(seen, ["job.queued", "job.active", "job.completed"]);
    // The worker node's recorder wrote the trail to PostgreSQL.
    let store = cluster.store().expect("a store");
    let id_parsed = ferry_core::JobId::parse(&id)?;
    eventually(Duration::from_secs(10), "three recorded events", || async {
        Ok((store.events(id_parsed, 10).await?.len() == 3).then_some(()))
    })
    .await?;

    // A drained worker hands over to a new one: the next job still completes.
    let report = cluster.stop_worker(0).await?;
    assert!(!report.timed_out);
    cluster.add_worker(&["harness"]).await?;
    let id = submitter.submit("harness", "ferry.noop", json!({})).await?;
    let job = submitter
        .until_finished(&id, Duration::from_secs(20))
        .await?;
    assert_eq!(job["state"], "completed", "{job}");
    cluster.shutdown().await;
    Ok(())
}
