//! The web dashboard (`/ui`) end to end: `ferry dev` on an ephemeral port, and the browser test
//! (`crates/gateway/ui-tests/dashboard.test.mjs`, puppeteer-core driving Debian's headless Chromium) run
//! against it with node. It signs in through the link `ferry dev` prints, enqueues from the UI, checks that a
//! payload full of markup stays inert, pauses and resumes, retries dead letters, searches jobs, reads the
//! cluster page and checks what a read-only token is offered. `scripts/test.sh` installs Chromium and the
//! test's `node_modules` (`npm ci`); without them this test fails saying so.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{Proc, announced, ferry, remaining, repo, token, until_healthy};

fn ui_tests() -> PathBuf {
    repo().join("crates/gateway/ui-tests")
}

#[tokio::test]
async fn dashboard_works_in_headless_chromium() {
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

    let tmp = tempfile::tempdir().unwrap();
    let stdout = tmp.path().join("stdout");
    let (mut dev, line) = Proc::spawn_listening(
        ferry()
            .args(["dev", "--listen", "127.0.0.1:0"])
            .env_remove("FERRY_JWT_SECRET")
            .env("FERRY_LOG", "warn,ferry_cli=info,ferry_gateway=info")
            .stdout(std::fs::File::create(&stdout).unwrap()),
        "gateway listening",
    )
    .await
    .expect("ferry dev starts");
    let listen = announced(&line, "listen").unwrap();
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
    let link = field(&format!("{base}/ui/#token="));
    assert_eq!(link, admin, "the dashboard link carries the admin token");
    let readonly = token(
        &secret,
        "viewer",
        &["queues:read", "jobs:read"],
        Duration::from_secs(600),
    );

    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg("dashboard.test.mjs")
            .current_dir(&dir)
            .env("FERRY_UI_BASE", &base)
            .env("FERRY_UI_LINK", format!("{base}/ui/#token={admin}"))
            .env("FERRY_UI_ADMIN_TOKEN", &admin)
            .env("FERRY_UI_READONLY_TOKEN", &readonly)
            .env("CHROMIUM", &chromium)
            .stdin(Stdio::null())
            .output()
    })
    .await
    .unwrap()
    .expect("node runs (Node 20 or later is needed)");
    let report = format!(
        "node exited with {}\n--- stdout\n{}\n--- stderr\n{}\n--- ferry dev stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        dev.log()
    );
    assert!(out.status.success(), "{report}");
    dev.stop(Duration::from_secs(10))
        .await
        .expect("ferry dev stops");
}
