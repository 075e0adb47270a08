//! The OpenAPI document and the server agree (issue 11, finding 18): schemathesis, an OpenAPI-driven fuzzer,
//! generates requests from `/v1/openapi.json` and runs every check against `ferry dev` with an admin token, a
//! bounded number of examples per operation. The few rules a JSON Schema cannot state are listed, with their
//! reasons, in `tests/cli/openapi/schemathesis.toml`.
//!
//! Tool: schemathesis, installed by `scripts/test.sh` into `$FERRY_TOOLS_DIR/schemathesis` (by default
//! `target/tools/schemathesis`). Without it the test fails, naming the script.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::support::{Proc, ferry, remaining, repo, token, until_healthy};

const SECRET: &str = "0123456789abcdef0123456789abcdef-openapi-fuzz";
/// Examples per operation and phase: enough to find a disagreement in a field, bounded so the run stays short.
const MAX_EXAMPLES: &str = "20";

/// `$FERRY_TOOLS_DIR/schemathesis/bin/schemathesis`, else under target/tools.
fn schemathesis() -> PathBuf {
    let mut tried = Vec::new();
    if let Some(dir) = std::env::var_os("FERRY_TOOLS_DIR") {
        tried.push(PathBuf::from(dir).join("schemathesis/bin/schemathesis"));
    }
    tried.push(repo().join("target/tools/schemathesis/bin/schemathesis"));
    tried
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!("schemathesis not found (looked at {tried:?}): run scripts/test.sh, which installs it")
        })
}

#[tokio::test]
async fn schemathesis_finds_no_disagreement_between_the_document_and_the_server() {
    let tool = schemathesis();
    let (_dev, listen) = Proc::spawn_gateway(
        ferry()
            .args(["dev"])
            .env("FERRY_JWT_SECRET", SECRET)
            .env("FERRY_LOG", "warn,ferry_cli=info")
            // The fuzzer sends tokenless requests back to back (the 401 checks): the default 10 failed
            // authentications per second per IP would answer some of them 429 instead.
            .env("FERRY_UNAUTH_UPGRADE_RATE", "100000")
            .stdout(Stdio::null()),
    )
    .await
    .expect("ferry dev starts");
    let base = format!("http://{listen}");
    let http = reqwest::Client::new();
    until_healthy(
        &http,
        &base,
        remaining(Instant::now() + Duration::from_secs(20)),
    )
    .await
    .expect("ferry dev never listened");
    let admin = token(SECRET, "fuzzer", &["admin"], Duration::from_secs(3600));
    // schemathesis keeps a cache in its working directory; keep it out of the repository.
    let work = tempfile::tempdir().unwrap();
    let run = tokio::process::Command::new(&tool)
        .current_dir(work.path())
        .arg("--no-color")
        .arg("--config-file")
        .arg(repo().join("crates/cli/tests/cli/openapi/schemathesis.toml"))
        .arg("run")
        .arg(format!("{base}/v1/openapi.json"))
        .args(["--header", &format!("Authorization: Bearer {admin}")])
        .args(["--max-examples", MAX_EXAMPLES, "--workers", "1"])
        .args(["--request-timeout", "10"])
        .env("SCHEMATHESIS_TELEMETRY", "false")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(600), run)
        .await
        .expect("schemathesis finished within 10 minutes")
        .expect("schemathesis runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found disagreements:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // It really tested something: a run that selected nothing would also succeed.
    assert!(
        stdout.contains("passed") && !stdout.contains(" 0 generated"),
        "{stdout}"
    );
}
