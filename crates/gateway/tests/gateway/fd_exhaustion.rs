//! Out of file descriptors: the gateway's accept fails with EMFILE, backs off instead of spinning, and serves
//! again once its stalled connections have timed out. The test lowers its own process's open-file limit with
//! util-linux `prlimit` (no unsafe code), so it must be the only test in its process: nextest runs each test in
//! a process of its own; anywhere else (`cargo test` runs the binary's tests side by side as threads) it runs
//! itself again, alone, in a child process.

use std::time::Duration;

use ferry_testkit::eventually;
use tokio::net::TcpStream;

use crate::support::TestApp;

fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count() as u64)
        .unwrap_or(0)
}

/// Set in the child process of [`alone`].
const ALONE: &str = "FERRY_TEST_ALONE";

/// Whether this test may lower the process's limit: it is the only test in this process (nextest, or the child
/// below). Otherwise it runs the test in a child process of this binary, filtered to exactly this test, and
/// fails with the child's output if the child fails.
async fn alone(test: &str) -> bool {
    if std::env::var_os("NEXTEST_EXECUTION_MODE").is_some_and(|m| m == "process-per-test")
        || std::env::var_os(ALONE).is_some()
    {
        return true;
    }
    // module_path!() starts with the crate's name; test names do not.
    let name = match module_path!().split_once("::") {
        Some((_, module)) => format!("{module}::{test}"),
        None => test.to_owned(),
    };
    let out =
        tokio::process::Command::new(std::env::current_exe().expect("the test binary's path"))
            .args([name.as_str(), "--exact", "--test-threads=1"])
            .env(ALONE, "1")
            .output()
            .await
            .expect("the test binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "{name} in a process of its own: {}\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    false
}

#[tokio::test]
async fn accept_errors_back_off_and_the_gateway_recovers() {
    if !alone("accept_errors_back_off_and_the_gateway_recovers").await {
        return;
    }
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
    let metrics = eventually(Duration::from_secs(30), "the gateway serves again", || {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build();
        let url = format!("{}/metrics", app.base);
        async move {
            let res = client?.get(url).send().await?;
            anyhow::ensure!(res.status() == 200, "/metrics answered {}", res.status());
            Ok(Some(res.text().await?))
        }
    })
    .await
    .unwrap();
    let errors = metrics
        .lines()
        .find_map(|l| l.strip_prefix("ferry_http_accept_errors_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(errors >= 1.0, "no accept error counted:\n{metrics}");
}
