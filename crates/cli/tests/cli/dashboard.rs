//! The web dashboard (`/ui`) end to end: the browser test (`crates/gateway/ui-tests/dashboard.test.mjs`,
//! puppeteer-core driving Debian's headless Chromium) run with node against `ferry dev` on an ephemeral port,
//! and against a `ferry gateway` + `ferry worker` on Redis and PostgreSQL (ferry-testkit servers). It signs in
//! through the link (the one `ferry dev` prints), enqueues from the UI, checks that a payload full of markup
//! stays inert, pauses and resumes, retries dead letters, searches jobs, reads the cluster page, reads the
//! autoscaler page (a `ferry autoscaler --dry-run` beside the Redis gateway; `ferry dev` has none and says how to
//! point a gateway at one) and checks what a read-only token is offered. `scripts/test.sh` installs Chromium and the test's `node_modules` (`npm ci`);
//! without them these tests fail saying so.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry_testkit::{PostgresServer, RedisServer};

use crate::support::{
    Proc, announced, ferry, migrated_database, remaining, repo, token, until_healthy, until_ready,
};

const SECRET: &str = "0123456789abcdef0123456789abcdef-ui-test";

fn ui_tests() -> PathBuf {
    repo().join("crates/gateway/ui-tests")
}

fn chromium() -> String {
    let dir = ui_tests();
    assert!(
        dir.join("node_modules/puppeteer-core").is_dir(),
        "{}/node_modules is missing: run scripts/test.sh (it runs `npm ci` there and installs chromium)",
        dir.display()
    );
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned());
    assert!(
        std::path::Path::new(&chromium).exists(),
        "{chromium} is missing: run scripts/test.sh (it installs Debian's chromium)"
    );
    chromium
}

/// Runs the browser test against `base` (whose gateway reads an autoscaler when `autoscaler`); panics with node's
/// output and the servers' logs when it fails.
async fn run_browser_test(
    base: &str,
    link: &str,
    admin: &str,
    readonly: &str,
    autoscaler: bool,
    servers: &[&Proc],
) {
    let chromium = chromium();
    let (base, link, admin, readonly) = (
        base.to_owned(),
        link.to_owned(),
        admin.to_owned(),
        readonly.to_owned(),
    );
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg("dashboard.test.mjs")
            .current_dir(ui_tests())
            .env("FERRY_UI_BASE", &base)
            .env("FERRY_UI_LINK", &link)
            .env("FERRY_UI_ADMIN_TOKEN", &admin)
            .env("FERRY_UI_READONLY_TOKEN", &readonly)
            .env("CHROMIUM", &chromium)
            .env("FERRY_UI_AUTOSCALER", if autoscaler { "1" } else { "" })
            .stdin(Stdio::null())
            .output()
    })
    .await
    .unwrap()
    .expect("node runs (Node 20 or later is needed)");
    let logs: Vec<String> = servers.iter().map(|p| p.log()).collect();
    assert!(
        out.status.success(),
        "node exited with {}\n--- stdout\n{}\n--- stderr\n{}\n--- server logs\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        logs.join("\n---\n")
    );
}

#[tokio::test]
async fn dashboard_works_in_headless_chromium_on_ferry_dev() {
    chromium();
    let tmp = tempfile::tempdir().unwrap();
    let stdout = tmp.path().join("stdout");
    let (mut dev, listen) = Proc::spawn_gateway(
        ferry()
            .args(["dev"])
            .env_remove("FERRY_JWT_SECRET")
            .env("FERRY_LOG", "warn,ferry_cli=info")
            .stdout(std::fs::File::create(&stdout).unwrap()),
    )
    .await
    .expect("ferry dev starts");
    let base = format!("http://{listen}");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    until_healthy(&http, &base, remaining(deadline))
        .await
        .expect("ferry dev never listened");

    // What `ferry dev` printed: its secret (to mint a read-only token) and the dashboard link with the admin token.
    let printed = std::fs::read_to_string(&stdout).unwrap();
    let field = |prefix: &str| {
        printed
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} in:\n{printed}"))
            .to_owned()
    };
    let secret = field("export FERRY_JWT_SECRET=");
    let admin = field("export FERRY_TOKEN=");
    let link = format!("{base}/ui/#token={}", field(&format!("{base}/ui/#token=")));
    assert_eq!(
        link,
        format!("{base}/ui/#token={admin}"),
        "the link carries the admin token"
    );
    let readonly = token(
        &secret,
        "viewer",
        &["queues:read", "jobs:read"],
        Duration::from_secs(600),
    );
    run_browser_test(&base, &link, &admin, &readonly, false, &[&dev]).await;
    dev.stop(Duration::from_secs(10))
        .await
        .expect("ferry dev stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_works_in_headless_chromium_on_redis_and_postgres() {
    chromium();
    let redis = RedisServer::start().expect("redis-server starts");
    let pg = PostgresServer::start().expect("PostgreSQL starts");
    let db = migrated_database(&pg, "dashboard").expect("ferry migrate");
    // An autoscaler that decides (dry run) for the worker's queue; the gateway shows its decisions.
    let regions = redis.dir().join("regions.toml");
    std::fs::write(
        &regions,
        format!(
            "[[regions]]\nname = \"local\"\nredis = [\"{}\"]\nqueues = [\"default\"]\n\
             [regions.actuator]\nkind = \"local\"\n",
            redis.url()
        ),
    )
    .expect("regions file written");
    let (scaler, scaler_line) = Proc::spawn_listening(
        ferry()
            .args(["autoscaler", "--regions"])
            .arg(&regions)
            .args([
                "--dry-run",
                "--interval-ms",
                "500",
                "--admin-listen",
                "127.0.0.1:0",
            ])
            .env("FERRY_LOG", "warn,ferry_cli=info"),
        "admin listening",
    )
    .await
    .expect("ferry autoscaler starts");
    let scaler_url = format!("http://{}", announced(&scaler_line, "admin").unwrap());
    let (mut gateway, line) = Proc::spawn_listening(
        ferry()
            .args(["gateway", "--redis", &redis.url(), "--database-url", &db])
            .args(["--listen", "127.0.0.1:0", "--jwt-secret", SECRET])
            .args(["--autoscaler-url", &scaler_url])
            .env("FERRY_LOG", "warn,ferry_cli=info"),
        "gateway listening",
    )
    .await
    .expect("ferry gateway starts");
    let mut worker = Proc::spawn_logged(
        ferry()
            .args(["worker", "--redis", &redis.url(), "--database-url", &db])
            .args(["--queues", "default"])
            .env("FERRY_LOG", "warn"),
    )
    .expect("ferry worker starts");
    let base = format!("http://{}", announced(&line, "listen").unwrap());
    let http = reqwest::Client::new();
    until_ready(&http, &base, Duration::from_secs(20))
        .await
        .expect("the gateway gets ready");
    let all = [
        "jobs:submit",
        "jobs:read",
        "jobs:cancel",
        "queues:read",
        "queues:admin",
        "publish",
        "subscribe",
        "admin",
    ];
    let admin = token(SECRET, "ops", &all, Duration::from_secs(600));
    let readonly = token(
        SECRET,
        "viewer",
        &["queues:read", "jobs:read"],
        Duration::from_secs(600),
    );
    let link = format!("{base}/ui/#token={admin}");
    run_browser_test(
        &base,
        &link,
        &admin,
        &readonly,
        true,
        &[&gateway, &worker, &scaler],
    )
    .await;
    worker
        .stop(Duration::from_secs(30))
        .await
        .expect("worker stops");
    gateway
        .stop(Duration::from_secs(30))
        .await
        .expect("gateway stops");
}
