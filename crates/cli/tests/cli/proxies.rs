//! The proxy configurations shipped for people who already run a balancer in front of the gateways.
//!
//! deploy/envoy/envoy.yaml is checked offline only (Envoy is not installed where these tests run): its structure
//! must hash WebSocket upgrades on tenant and subject with a balance factor, upgrade WebSockets, and health-check
//! `/readyz`.
//!
//! deploy/haproxy/haproxy.cfg is run by a real HAProxy (Debian package `haproxy`) in front of three real
//! gateways on one Redis. Only the `server-template` lines (DNS discovery) are replaced by static servers on
//! loopback; every other directive runs as shipped.
//!
//! * WebSocket upgrades are hashed on tenant/subject: the same subject always lands on the same gateway, and the
//!   balance factor keeps every gateway at most ⌈1.1 × mean⌉ connections.
//! * A draining gateway (SIGTERM, `/readyz` 503) gets no new connection once the health check has seen it, and
//!   keeps the ones it has until it moves them itself.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ferry_testkit::{RedisServer, eventually, free_port};
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::support::{self, Proc, ferry, read, repo, token, until_ready};

const SECRET: &str = "haproxy-test-secret-haproxy-test-secret-0123";

fn haproxy_bin() -> Result<PathBuf> {
    [
        "/usr/sbin/haproxy",
        "/usr/bin/haproxy",
        "/usr/local/sbin/haproxy",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .context("haproxy is not installed (Debian package haproxy; scripts/test.sh installs it)")
}

fn shipped() -> PathBuf {
    repo().join("deploy/haproxy/haproxy.cfg")
}

/// The shipped configuration with its `server-template` lines replaced by `servers`.
fn with_servers(servers: &[String]) -> Result<String> {
    let text = std::fs::read_to_string(shipped())?;
    let mut out = String::new();
    let mut replaced = 0;
    for line in text.lines() {
        if line.trim_start().starts_with("server-template ") {
            for (i, s) in servers.iter().enumerate() {
                out.push_str(&format!("    server gw{i} {s} check\n"));
            }
            replaced += 1;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    if replaced != 2 {
        bail!("expected a server-template line in each of the two backends, found {replaced}");
    }
    Ok(out)
}

#[test]
fn the_shipped_configuration_is_valid() -> Result<()> {
    let out = Command::new(haproxy_bin()?)
        .args(["-c", "-f"])
        .arg(shipped())
        // A name that resolves here, so the check does not depend on DNS.
        .env("FERRY_GATEWAYS", "localhost")
        .output()?;
    assert!(
        out.status.success(),
        "haproxy -c: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[test]
fn the_envoy_configuration_hashes_upgrades_on_the_subject_with_bounded_loads() -> Result<()> {
    use serde_norway::Value;
    let doc: Value = serde_norway::from_str(&read("deploy/envoy/envoy.yaml"))?;
    let res = &doc["static_resources"];
    let hcm = &res["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
    assert_eq!(hcm["upgrade_configs"][0]["upgrade_type"], "websocket");
    let routes = &hcm["route_config"]["virtual_hosts"][0]["routes"];
    let ws = &routes[0]["route"];
    assert_eq!(ws["cluster"], "ferry_gateways_ws");
    let hashed: Vec<&str> = ws["hash_policy"]
        .as_sequence()
        .context("hash_policy")?
        .iter()
        .filter_map(|h| h["header"]["header_name"].as_str())
        .collect();
    assert_eq!(hashed, ["x-ferry-tenant", "x-ferry-sub"]);
    // The headers hashed on are the ones jwt_authn fills from the claims, and a failed token still passes.
    let jwt = &hcm["http_filters"][0]["typed_config"];
    let provider = &jwt["providers"]["ferry"];
    let claims: Vec<(&str, &str)> = provider["claim_to_headers"]
        .as_sequence()
        .context("claim_to_headers")?
        .iter()
        .map(|c| {
            (
                c["header_name"].as_str().unwrap_or(""),
                c["claim_name"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert!(
        claims.contains(&("x-ferry-sub", "sub")) && claims.contains(&("x-ferry-tenant", "tenant"))
    );
    assert_eq!(provider["forward"], true);
    assert_eq!(provider["from_params"][0], "token");
    let any = &jwt["rules"][0]["requires"]["requires_any"]["requirements"];
    assert!(any[1].get("allow_missing_or_failed").is_some());
    assert_eq!(
        hcm["http_filters"][1]["name"], "envoy.filters.http.router",
        "the router filter must come last"
    );
    let clusters = res["clusters"].as_sequence().context("clusters")?;
    let ws_cluster = clusters
        .iter()
        .find(|c| c["name"] == "ferry_gateways_ws")
        .context("ws cluster")?;
    assert_eq!(ws_cluster["lb_policy"], "RING_HASH");
    assert_eq!(
        ws_cluster["common_lb_config"]["consistent_hashing_lb_config"]["hash_balance_factor"],
        110
    );
    for c in clusters {
        assert_eq!(
            c["health_checks"][0]["http_health_check"]["path"], "/readyz",
            "{:?}",
            c["name"]
        );
    }
    Ok(())
}

struct Gateway {
    proc: Proc,
    base: String,
}

/// A `ferry gateway` on port 0, once it listens.
async fn gateway(redis: &str) -> Result<Gateway> {
    let mut cmd = ferry();
    cmd.args([
        "gateway",
        "--listen",
        "127.0.0.1:0",
        // Long enough for the test to watch HAProxy take a draining gateway out while it still serves.
        "--drain-delay-ms",
        "30000",
        "--shutdown-deadline-ms",
        "60000",
    ])
    .env("FERRY_LOG", "warn,ferry_cli=info")
    .env("FERRY_REDIS_URLS", redis)
    .env("FERRY_JWT_SECRET", SECRET)
    .env_remove("FERRY_CONFIG")
    .env_remove("FERRY_LOG_FORMAT")
    .stdin(Stdio::null())
    .stdout(Stdio::null());
    let (proc, line) = Proc::spawn_listening(&mut cmd, "gateway listening").await?;
    Ok(Gateway {
        proc,
        base: format!("http://{}", support::announced(&line, "listen")?),
    })
}

/// `ferry_ws_connections` of one gateway.
async fn connections(http: &reqwest::Client, base: &str) -> Result<u64> {
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    support::sample(&text, "ferry_ws_connections")
        .map(|v| v as u64)
        .context("no ferry_ws_connections in /metrics")
}

async fn all_connections(http: &reqwest::Client, gws: &[Gateway]) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    for g in gws {
        out.push(connections(http, &g.base).await?);
    }
    Ok(out)
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A WebSocket through HAProxy for `sub`, the token in the header (`bearer`) or in the query.
async fn connect(front: &str, sub: &str, bearer: bool) -> Result<Ws> {
    let t = token(SECRET, sub, &["jobs:read"], Duration::from_secs(600));
    let (url, header) = if bearer {
        (format!("ws://{front}/v1/ws"), Some(format!("Bearer {t}")))
    } else {
        (format!("ws://{front}/v1/ws?token={t}"), None)
    };
    let mut req = url.into_client_request()?;
    if let Some(h) = header {
        req.headers_mut().insert("authorization", h.parse()?);
    }
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await?;
    // A ping answered: the gateway has registered the connection (and counts it).
    ws.send(Message::text(r#"{"id":"1","op":"ping"}"#)).await?;
    tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .context("no answer to ping")?
        .context("closed before answering ping")??;
    Ok(ws)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_hashes_subjects_with_bounded_loads_and_skips_draining_gateways() -> Result<()> {
    let bin = haproxy_bin()?;
    let redis = RedisServer::start()?;
    let http = reqwest::Client::new();
    let mut gws = Vec::new();
    for _ in 0..3 {
        gws.push(gateway(&redis.url()).await?);
    }
    for g in &gws {
        until_ready(&http, &g.base, Duration::from_secs(30)).await?;
    }
    let front = format!("127.0.0.1:{}", free_port());
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("haproxy.cfg");
    let servers: Vec<String> = gws
        .iter()
        .map(|g| g.base.trim_start_matches("http://").to_string())
        .collect();
    std::fs::write(&cfg, with_servers(&servers)?)?;
    let mut cmd = Command::new(bin);
    cmd.arg("-db")
        .arg("-f")
        .arg(&cfg)
        .env("FERRY_BIND", &front)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let _haproxy = Proc::spawn_logged(&mut cmd)?;
    eventually(Duration::from_secs(20), "HAProxy answers", || async {
        let r = http
            .get(format!("http://{front}/haproxy/healthz"))
            .send()
            .await;
        Ok((matches!(r, Ok(ref r) if r.status().is_success())).then_some(()))
    })
    .await?;
    // `rise 2` × `inter 2 s`: every server is up after its first two checks.
    tokio::time::sleep(Duration::from_secs(5)).await;

    // 300 distinct subjects, half with the token in the header and half in the query.
    let mut sockets = Vec::new();
    for i in 0..300 {
        sockets.push(connect(&front, &format!("subject-{i}"), i % 2 == 0).await?);
    }
    let loads = all_connections(&http, &gws).await?;
    assert_eq!(loads.iter().sum::<u64>(), 300, "{loads:?}");
    let bound = (1.1f64 * 100.0).ceil() as u64;
    assert!(
        loads.iter().all(|&l| l <= bound),
        "a gateway is above ⌈1.1 × mean⌉ = {bound}: {loads:?}"
    );

    // The same subject lands where its first connection did, whichever way it sends its token.
    for i in [3, 77, 150] {
        let before = all_connections(&http, &gws).await?;
        let a = connect(&front, &format!("sticky-{i}"), true).await?;
        let mid = all_connections(&http, &gws).await?;
        let b = connect(&front, &format!("sticky-{i}"), false).await?;
        let after = all_connections(&http, &gws).await?;
        let first: Vec<usize> = (0..3).filter(|&k| mid[k] > before[k]).collect();
        let second: Vec<usize> = (0..3).filter(|&k| after[k] > mid[k]).collect();
        assert_eq!(first.len(), 1, "{before:?} -> {mid:?}");
        assert_eq!(
            first, second,
            "sticky-{i}: {before:?} -> {mid:?} -> {after:?}"
        );
        sockets.push(a);
        sockets.push(b);
    }

    // Drain gateway 0: /readyz turns 503 and HAProxy stops sending it clients, while its sockets stay.
    let held = connections(&http, &gws[0].base).await?;
    gws[0].proc.sigterm()?;
    eventually(
        Duration::from_secs(10),
        "gateway 0 reports draining",
        || async {
            Ok((matches!(support::readyz(&http, &gws[0].base).await, Ok((503, _)))).then_some(()))
        },
    )
    .await?;
    // fall 2 × inter 2 s, plus a margin.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let before = all_connections(&http, &gws).await?;
    for i in 0..60 {
        sockets.push(connect(&front, &format!("late-{i}"), i % 2 == 0).await?);
    }
    let after = all_connections(&http, &gws).await?;
    assert_eq!(
        after[0], before[0],
        "a draining gateway got new clients: {before:?} -> {after:?}"
    );
    assert_eq!(
        after[1] + after[2],
        before[1] + before[2] + 60,
        "{before:?} -> {after:?}"
    );
    assert!(
        before[0] >= held.min(1),
        "the draining gateway kept its clients"
    );
    drop(sockets);
    Ok(())
}
