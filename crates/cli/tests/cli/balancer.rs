//! `ferry balancer` as a process in front of two real `ferry gateway` processes, against a real `redis-server`:
//! WebSockets with real tokens reach the gateway that owns their subject's partition, plain HTTP is proxied,
//! SIGTERM drains and exits 0. The membership entries are written here in the documented format (ZSET
//! `ferry:gw`, HASH `ferry:gw:info`), as a gateway's heartbeat writes them.

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Result;
use ferry_broker::placement::{NodeInfo, Placement, partition_of};
use ferry_testkit::RedisServer;
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::support::{self, Proc, ferry, until_ready};

const SECRET: &str = "balancer-test-secret-balancer-test-secret";

/// `ferry ARGS` listening on port 0, once it logged `announce`: the process and that line.
async fn spawn(args: &[&str], announce: &str) -> Result<(Proc, String)> {
    Proc::spawn_listening(
        ferry()
            .args(args)
            .env("FERRY_LOG", "warn,ferry_balancer=debug,ferry_cli=info")
            .env_remove("FERRY_LOG_FORMAT")
            .env_remove("FERRY_CONFIG")
            .env_remove("FERRY_ADMIN_LISTEN")
            .stdin(Stdio::null())
            .stdout(Stdio::null()),
        announce,
    )
    .await
}

fn gauge(text: &str, name: &str) -> f64 {
    support::sample(text, name).unwrap_or(-1.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_reach_the_owning_gateway_through_ferry_balancer() -> Result<()> {
    let redis = RedisServer::start()?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let mut gateways = Vec::new();
    for _ in 0..2 {
        let (p, line) = spawn(
            &[
                "gateway",
                "--redis",
                &redis.url(),
                "--listen",
                "127.0.0.1:0",
                "--jwt-secret",
                SECRET,
                // A bound that never binds: every client goes to its partition's owner.
                "--balance-epsilon",
                "10",
            ],
            "gateway listening",
        )
        .await?;
        let listen = support::announced(&line, "listen")?;
        until_ready(&http, &format!("http://{listen}"), Duration::from_secs(20)).await?;
        gateways.push((p, listen));
    }
    // The gateways announce themselves; placement is computed from what they announced.
    let broker = crate::support::test_broker(&redis.url()).await?;
    let mut nodes: Vec<NodeInfo> = Vec::new();
    for _ in 0..100 {
        nodes = ferry_broker::Membership::members(&broker).await?;
        if nodes.len() == 2 && nodes.iter().all(|n| n.eligible()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(nodes.len(), 2, "{nodes:?}");
    let (mut balancer, line) = spawn(
        &[
            "balancer",
            "--redis",
            &redis.url(),
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--drain-ms",
            "1000",
            "--balance-epsilon",
            "10",
        ],
        "balancer listening",
    )
    .await?;
    let (listen, admin) = (
        support::announced(&line, "addr")?,
        support::announced(&line, "admin")?,
    );
    until_ready(&http, &format!("http://{admin}"), Duration::from_secs(20)).await?;
    support::until_balancer_sees(&http, &admin, 2, Duration::from_secs(10)).await?;

    let placement = Placement::new(nodes.clone(), 10.0);
    let mut expected: HashMap<String, f64> = HashMap::new();
    let mut open = Vec::new();
    for i in 0..12 {
        let sub = format!("user-{i}");
        let token = support::token(SECRET, &sub, &["subscribe"], Duration::from_secs(600));
        let owner = placement.owner(partition_of(None, &sub)).unwrap();
        *expected.entry(owner.url.clone()).or_default() += 1.0;
        let (mut ws, res) =
            tokio_tungstenite::connect_async(format!("ws://{listen}/v1/ws?token={token}")).await?;
        assert_eq!(res.status().as_u16(), 101);
        // The gateway verified the token; a request and its reply cross the tunnel.
        ws.send(Message::text(r#"{"id":1,"op":"ping"}"#)).await?;
        let reply = tokio::time::timeout(Duration::from_secs(10), ws.next()).await?;
        let text = match reply {
            Some(Ok(Message::Text(t))) => t.to_string(),
            other => panic!("{other:?}"),
        };
        assert!(text.contains("pong"), "{text}");
        open.push(ws);
    }
    for (_, gw) in &gateways {
        let url = format!("http://{gw}");
        let text = http
            .get(format!("{url}/metrics"))
            .send()
            .await?
            .text()
            .await?;
        assert_eq!(
            gauge(&text, "ferry_ws_connections"),
            expected.get(&url).copied().unwrap_or(0.0),
            "{url}: {expected:?}"
        );
    }
    // Plain HTTP through the balancer: a gateway answers (here its health check).
    let r = http.get(format!("http://{listen}/healthz")).send().await?;
    assert_eq!(r.status().as_u16(), 200);
    let m = http
        .get(format!("http://{admin}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    assert_eq!(
        gauge(&m, r#"ferry_balancer_picks_total{reason="owner"}"#),
        12.0,
        "{m}"
    );

    // SIGTERM: new connections refused, the process exits 0 once the drain time is over.
    let status = balancer.stop(Duration::from_secs(10)).await?;
    assert!(status.success(), "{status:?}\n{}", balancer.log());
    assert!(tokio::net::TcpStream::connect(&listen).await.is_err());
    Ok(())
}

#[test]
fn bad_balancer_flags_exit_64() {
    for (args, flag) in [
        (
            vec![
                "balancer",
                "--redis",
                "redis://127.0.0.1:1",
                "--balance-epsilon",
                "0",
            ],
            "--balance-epsilon",
        ),
        (
            vec![
                "balancer",
                "--redis",
                "redis://127.0.0.1:1",
                "--listen",
                "nope",
            ],
            "--listen",
        ),
        (
            vec![
                "balancer",
                "--redis",
                "redis://127.0.0.1:1",
                "--idle-timeout-ms",
                "0",
            ],
            "--idle-timeout-ms",
        ),
        (
            vec![
                "balancer",
                "--redis",
                "redis://127.0.0.1:1",
                "--upstream-ca",
                "/nonexistent.pem",
            ],
            "--upstream-ca",
        ),
    ] {
        let out = ferry()
            .args(&args)
            .env_remove("FERRY_CONFIG")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("invalid {flag}")), "{args:?}: {err}");
    }
}
