//! The gateway membership with real `ferry gateway` processes on one real `redis-server`: gateways appear, a
//! gateway killed with SIGKILL drops out once its ttl passes, one stopped with SIGTERM is announced draining at
//! once and leaves at the end of its drain; bad flags are refused naming the flag.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ferry_broker::{NodeInfo, RedisBroker, prelude::*};
use ferry_testkit::{RedisServer, eventually};
use serde_json::Value;

use crate::support::{self, Proc, ferry, until_ready};

const SECRET: &str = "cluster-test-secret-cluster-test-secret!";

/// A `ferry gateway` on port 0 with `extra` flags, once it listens: the process and its `http://` base URL.
async fn spawn_gateway(redis: &str, extra: &[&str]) -> Result<(Proc, String)> {
    let mut args = vec![
        "gateway",
        "--redis",
        redis,
        "--jwt-secret",
        SECRET,
        "--heartbeat-ms",
        "200",
        "--membership-ttl-ms",
        "2000",
    ];
    args.extend_from_slice(extra);
    let (proc, addr) = Proc::spawn_gateway(
        ferry()
            .args(&args)
            .env("FERRY_LOG", "warn,ferry_gateway=info,ferry_cli=info")
            .env_remove("FERRY_LOG_FORMAT")
            .env_remove("FERRY_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null()),
    )
    .await?;
    Ok((proc, format!("http://{addr}")))
}

async fn members(broker: &RedisBroker) -> Vec<NodeInfo> {
    broker
        .membership()
        .expect("redis keeps a membership")
        .members()
        .await
        .expect("members read")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_gateways_expire_and_stopped_ones_drain_then_leave() -> Result<()> {
    let redis = RedisServer::start()?;
    let broker = crate::support::test_broker(&redis.url()).await?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let (mut a, base_a) = spawn_gateway(
        &redis.url(),
        &[
            "--region",
            "r1",
            "--advertise-url",
            "http://gw-a.internal:8080",
            "--drain-delay-ms",
            "2000",
        ],
    )
    .await?;
    let (mut b, base_b) = spawn_gateway(&redis.url(), &[]).await?;
    until_ready(&http, &base_a, Duration::from_secs(30)).await?;
    until_ready(&http, &base_b, Duration::from_secs(30)).await?;
    eventually(
        Duration::from_secs(15),
        "both gateways listed and ready",
        || async {
            let m = members(&broker).await;
            Ok((m.len() == 2 && m.iter().all(|n| n.ready && !n.draining)).then_some(()))
        },
    )
    .await?;
    let m = members(&broker).await;
    let a_info = m
        .iter()
        .find(|n| n.url == "http://gw-a.internal:8080")
        .context("--advertise-url announced")?
        .clone();
    assert_eq!(a_info.region.as_deref(), Some("r1"));
    // A UUIDv7: 8-4-4-4-12 hex digits, version 7.
    assert_eq!(a_info.id.len(), 36, "{}", a_info.id);
    assert_eq!(&a_info.id[14..15], "7", "{}", a_info.id);
    let b_info = m.iter().find(|n| n.id != a_info.id).unwrap().clone();
    assert_eq!(b_info.url, base_b, "the default URL: the bound address");

    // SIGKILL: no leave, so b is listed until its ttl (2 s) passes, then gone.
    let killed = Instant::now();
    b.kill9();
    assert!(members(&broker).await.iter().any(|n| n.id == b_info.id));
    eventually(
        Duration::from_secs(15),
        "the killed gateway expired",
        || async { Ok((!members(&broker).await.iter().any(|n| n.id == b_info.id)).then_some(())) },
    )
    .await?;
    assert!(
        killed.elapsed() >= Duration::from_millis(1_500),
        "listed until about its ttl: gone after {:?}",
        killed.elapsed()
    );

    // SIGTERM: draining at once (within the 2 s drain delay), listed through the drain, gone after exit.
    let stopped = Instant::now();
    a.sigterm()?;
    eventually(
        Duration::from_secs(10),
        "the stopping gateway announced draining",
        || async {
            Ok((members(&broker)
                .await
                .iter()
                .any(|n| n.id == a_info.id && n.draining && !n.ready))
            .then_some(()))
        },
    )
    .await?;
    assert!(
        stopped.elapsed() < Duration::from_millis(2_000),
        "draining shows before the drain delay is over: {:?}",
        stopped.elapsed()
    );
    let status = a.wait_exit(Duration::from_secs(30)).await?;
    assert!(status.success(), "{status:?}\n{}", a.log());
    assert!(
        members(&broker).await.is_empty(),
        "left at the end of its drain"
    );
    Ok(())
}

#[test]
fn bad_cluster_flags_are_refused_naming_the_flag() -> Result<()> {
    let cases: [(&[&str], &str); 6] = [
        (&["--balance-epsilon", "0"], "--balance-epsilon"),
        (&["--balance-epsilon", "NaN"], "--balance-epsilon"),
        (&["--heartbeat-ms", "0"], "--heartbeat-ms"),
        (
            &["--heartbeat-ms", "1000", "--membership-ttl-ms", "1000"],
            "--membership-ttl-ms",
        ),
        (&["--advertise-url", "gw:8080"], "--advertise-url"),
        (&["--region", " "], "--region"),
    ];
    for (extra, flag) in cases {
        let out = ferry()
            .args([
                "gateway",
                "--redis",
                "redis://127.0.0.1:1",
                "--jwt-secret",
                SECRET,
            ])
            .args(extra)
            .env_remove("FERRY_CONFIG")
            .stdin(Stdio::null())
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{extra:?}: {stderr}");
        assert!(stderr.contains(flag), "{extra:?} names {flag}: {stderr}");
    }
    Ok(())
}

/// `GET /v1/cluster` of a real process (the shape is tested in the gateway crate): itself, ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_process_shows_itself_in_v1_cluster() -> Result<()> {
    let redis = RedisServer::start()?;
    let (_gw, base) = spawn_gateway(&redis.url(), &["--balance-epsilon", "0.25"]).await?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    until_ready(&http, &base, Duration::from_secs(30)).await?;
    let admin = support::token(SECRET, "ops", &["admin"], Duration::from_secs(600));
    let last = std::sync::Arc::new(std::sync::Mutex::new(Value::Null));
    let seen = eventually(Duration::from_secs(10), "itself listed, ready", || {
        let (http, base, admin, last) = (http.clone(), base.clone(), admin.clone(), last.clone());
        async move {
            let v: Value = http
                .get(format!("{base}/v1/cluster"))
                .bearer_auth(admin)
                .send()
                .await?
                .json()
                .await?;
            let ok = v["nodes"][0]["self"] == true && v["nodes"][0]["ready"] == true;
            *last.lock().unwrap() = v;
            Ok(ok.then_some(()))
        }
    })
    .await;
    let last = last.lock().unwrap().clone();
    seen.with_context(|| format!("{last}"))?;
    assert_eq!(last["epsilon"], 0.25);
    assert_eq!(last["nodes"][0]["owned_partitions"], 1024, "{last}");
    Ok(())
}
