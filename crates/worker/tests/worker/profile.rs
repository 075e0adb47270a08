//! `GET /debug/pprof/profile` on the admin listener over real HTTP: 404 saying how to turn it on when off; a
//! decodable pprof protobuf, parameter checks and one capture at a time when on.
//!
//! One test holds every capture: the sampler is process-wide, and this binary's tests may share a process.

use std::time::Duration;

use ferry_telemetry::profile::protos::{Message, Profile};
use ferry_worker::{HandlerRegistry, WorkerDeps, WorkerNode, WorkerNodeConfig};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::common::{config, memory, queue};

/// An admin listener on 127.0.0.1:0 with profiling on or off; its base URL and the token that stops it.
async fn listener(profiling: bool) -> anyhow::Result<(String, CancellationToken)> {
    let mut config = WorkerNodeConfig::new(config(&queue("profile")));
    config.profiling = profiling;
    let node = WorkerNode::build(
        config,
        HandlerRegistry::with_builtins(),
        WorkerDeps {
            broker: memory(),
            store: None,
            registry: ferry_telemetry::metrics::registry(),
        },
    )?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let stop = CancellationToken::new();
    tokio::spawn(ferry_telemetry::admin::serve(
        listener,
        node.admin(),
        stop.clone(),
    ));
    Ok((base, stop))
}

async fn fetch(
    http: &reqwest::Client,
    url: String,
) -> anyhow::Result<(u16, reqwest::header::HeaderMap, Vec<u8>)> {
    let res = http.get(url).send().await?;
    let (status, headers) = (res.status().as_u16(), res.headers().clone());
    Ok((status, headers, res.bytes().await?.to_vec()))
}

fn problem(headers: &reqwest::header::HeaderMap, body: &[u8]) -> Value {
    assert_eq!(headers["content-type"], "application/problem+json");
    serde_json::from_slice(body).expect("problem+json")
}

#[tokio::test]
async fn admin_profile_is_404_when_off() -> anyhow::Result<()> {
    let (base, stop) = listener(false).await?;
    let http = reqwest::Client::new();
    let (status, headers, body) =
        fetch(&http, format!("{base}/debug/pprof/profile?seconds=1")).await?;
    assert_eq!(status, 404);
    let p = problem(&headers, &body);
    assert_eq!(p["type"], "urn:ferry:problem:not-found");
    let detail = p["detail"].as_str().unwrap();
    assert!(
        detail.contains("off") && detail.contains("--profiling"),
        "{detail}"
    );
    // The other routes are unchanged.
    let (status, _, _) = fetch(&http, format!("{base}/healthz")).await?;
    assert_eq!(status, 200);
    stop.cancel();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_profile_captures_a_pprof_profile_when_on() -> anyhow::Result<()> {
    let (base, stop) = listener(true).await?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let url = |q: &str| format!("{base}/debug/pprof/profile{q}");

    for (q, field) in [
        ("?seconds=0", "seconds"),
        ("?seconds=61", "seconds"),
        ("?hz=abc", "hz"),
        ("?hz=1001", "hz"),
    ] {
        let (status, headers, body) = fetch(&http, url(q)).await?;
        assert_eq!(status, 400, "{q}");
        let p = problem(&headers, &body);
        assert_eq!(p["errors"][0]["field"], field, "{q}: {p}");
    }

    let (status, headers, body) = fetch(&http, url("?seconds=1&hz=250")).await?;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(headers["content-type"], "application/octet-stream");
    let disposition = headers["content-disposition"].to_str()?;
    assert!(
        disposition.starts_with("attachment; filename=\"ferry-worker-")
            && disposition.ends_with(".pb\""),
        "{disposition}"
    );
    let profile = Profile::decode(body.as_slice())?;
    assert!(!profile.sample_type.is_empty());
    assert!(
        profile.duration_nanos >= 900_000_000,
        "{}",
        profile.duration_nanos
    );

    // Overlapping captures: one is served, the other refused with 409.
    let first = fetch(&http, url("?seconds=3"));
    let second = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        fetch(&http, url("?seconds=3")).await
    };
    let (a, b) = tokio::join!(first, second);
    let (a, b) = (a?, b?);
    let mut statuses = [a.0, b.0];
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 409]);
    let refused = if a.0 == 409 { &a } else { &b };
    assert_eq!(
        problem(&refused.1, &refused.2)["type"],
        "urn:ferry:problem:conflict"
    );
    stop.cancel();
    Ok(())
}
