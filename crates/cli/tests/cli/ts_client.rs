//! The TypeScript client (clients/typescript) through its own `node --test` suites, against this build of `ferry`
//! (`FERRY_BIN`): the session rules against a fake WebSocket; every `/v1` route, token expiry (refresh before
//! `exp`, reconnect after 4001) and the generated OpenAPI types against `ferry dev`; a cluster (redis-server from
//! ferry-testkit as `REDIS_URL`, two gateways, a worker) with a gateway restarted mid-stream; and the built client
//! in headless Chromium. scripts/test.sh installs the client's devDependencies (`npm ci`), compiles it
//! (`npm run build`) and installs chromium; a test fails, naming that step, when they are missing or the build is
//! older than the sources.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use ferry_testkit::RedisServer;

fn client_dir() -> PathBuf {
    crate::support::repo().join("clients/typescript")
}

/// Newest modification time of the files under `dir`.
fn newest(dir: &Path) -> SystemTime {
    let mut t = SystemTime::UNIX_EPOCH;
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let m = e.metadata().unwrap();
        let mt = if m.is_dir() {
            newest(&e.path())
        } else {
            m.modified().unwrap()
        };
        t = t.max(mt);
    }
    t
}

/// Refuse to run without `npm ci` and `npm run build`, saying how to get them.
fn check_installed(dir: &Path) {
    assert!(
        dir.join("node_modules").is_dir(),
        "{}/node_modules is missing: run scripts/test.sh (it runs `npm ci --no-audit --no-fund` there)",
        dir.display()
    );
    let built = dir.join("dist/index.js");
    assert!(
        built.is_file(),
        "{} is missing: run scripts/test.sh (it runs `npm run build` in clients/typescript)",
        built.display()
    );
    assert!(
        std::fs::metadata(&built).unwrap().modified().unwrap() >= newest(&dir.join("src")),
        "clients/typescript/dist is older than src/: run `npm run build` there (scripts/test.sh does)"
    );
}

/// `node --test FILES` in the client's directory with this build's `ferry`; fails with node's output.
fn node_test(files: &[&str], env: &[(&str, String)]) {
    let dir = client_dir();
    check_installed(&dir);
    let out_path = tempfile::NamedTempFile::new().unwrap();
    let out = out_path.reopen().unwrap();
    let mut cmd = Command::new("node");
    cmd.current_dir(&dir)
        .args(["--test", "--test-timeout=120000"])
        .args(files)
        .env("FERRY_BIN", env!("CARGO_BIN_EXE_ferry"))
        .env_remove("FERRY_JWT_SECRET")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .spawn()
        .expect("node runs (Node 20+ must be on PATH; see scripts/test.sh)");
    let deadline = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let output = std::fs::read_to_string(out_path.path()).unwrap_or_default();
    match status {
        Some(s) if s.success() => {
            // The counts, for the test's own output.
            for line in output.lines().filter(|l| l.starts_with("# ")) {
                eprintln!("{line}");
            }
        }
        Some(s) => panic!("node --test {files:?} failed ({s}):\n{output}"),
        None => panic!("node --test {files:?} still running after 300 s:\n{output}"),
    }
}

#[test]
fn ts_client_session_http_openapi_and_ws_against_ferry_dev() {
    node_test(
        &[
            "test/session.test.mjs",
            "test/http.test.mjs",
            "test/openapi.test.mjs",
            "test/ws.test.mjs",
            "test/expiry.test.mjs",
        ],
        &[],
    );
}

#[test]
fn ts_client_recovers_across_a_gateway_restart_in_a_cluster() {
    let redis = RedisServer::start().expect("redis-server starts");
    node_test(&["test/cluster.test.mjs"], &[("REDIS_URL", redis.url())]);
}

#[test]
fn ts_client_in_headless_chromium_with_cors() {
    node_test(&["test/browser.test.mjs"], &[]);
}
