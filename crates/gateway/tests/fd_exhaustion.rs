//! Out of file descriptors: the gateway's accept fails with EMFILE, backs off instead of spinning, and serves
//! again once its stalled connections have timed out. The test lowers its own process's open-file limit with
//! util-linux `prlimit` (no unsafe code), so it lives alone in this binary: nextest and `cargo test` alike run
//! no other test in this process.

mod support;

use std::time::Duration;

use support::TestApp;
use tokio::net::TcpStream;

fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count() as u64)
        .unwrap_or(0)
}

#[tokio::test]
async fn accept_errors_back_off_and_the_gateway_recovers() {
    let broker = std::sync::Arc::new(ferry_broker::MemoryBroker::new(
        ferry_broker::EngineConfig::default(),
    ));
    let app = TestApp::start(broker, |c| {
        c.connections.header_timeout = Duration::from_millis(1500);
    })
    .await;
    // Room for a few connections, not for the clients below and their accepted ends.
    let limit = open_fds() + 16;
    let lowered = std::process::Command::new("prlimit")
        .args([
            "--pid",
            &std::process::id().to_string(),
            &format!("--nofile={limit}:{limit}"),
        ])
        .status();
    match lowered {
        Ok(s) if s.success() => {}
        // A test that cannot run fails, saying why, rather than passing without having run.
        other => panic!(
            "this test lowers its own open-file limit with prlimit (util-linux) and could not: {other:?}"
        ),
    }
    // Each client costs this process two descriptors (its end and the accepted one) until accept runs out:
    // the rest wait in the listen backlog.
    let mut clients = Vec::new();
    for _ in 0..24 {
        match TcpStream::connect(app.addr).await {
            Ok(s) => clients.push(s),
            Err(_) => break,
        }
    }
    assert!(
        clients.len() >= 8,
        "only {} clients connected",
        clients.len()
    );
    // Give the accept loop time to run into the limit.
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(clients);
    // The accepted ends time out (header timeout), the backlog drains, and the node answers again.
    let metrics = support::eventually(Duration::from_secs(30), "the gateway serves again", || {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .ok();
        let url = format!("{}/metrics", app.base);
        async move {
            let res = client?.get(url).send().await.ok()?;
            (res.status() == 200).then_some(())?;
            res.text().await.ok()
        }
    })
    .await;
    let errors = metrics
        .lines()
        .find_map(|l| l.strip_prefix("ferry_http_accept_errors_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(errors >= 1.0, "no accept error counted:\n{metrics}");
}
