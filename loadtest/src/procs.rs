//! Child processes of a run (the worker under test, the BullMQ bench): stopped by pid — SIGTERM, then
//! SIGKILL after a grace period — and killed on drop, so nothing outlives the benchmark.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

/// Ask `child` to stop (SIGTERM through `kill`, by its pid), wait up to `grace`, then SIGKILL it.
pub async fn stop(child: &mut Child, grace: Duration) -> anyhow::Result<()> {
    if child.try_wait()?.is_some() {
        return Ok(());
    }
    if let Some(pid) = child.id() {
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
    }
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        eprintln!("[loadtest] child did not stop within {grace:?}: killing it");
        child.kill().await.context("killing child")?;
    }
    Ok(())
}

/// The last `max` bytes of a log file, for error messages.
pub fn tail(path: &Path, max: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let from = bytes.len().saturating_sub(max);
            String::from_utf8_lossy(&bytes[from..]).into_owned()
        }
        Err(e) => format!("(no log: {e})"),
    }
}

/// Run `program args…` in `dir` to completion within `limit`, stdout/stderr passed through to ours.
pub async fn run_to_end(
    program: &str,
    args: &[&str],
    dir: &Path,
    limit: Duration,
) -> anyhow::Result<()> {
    let mut child = Command::new(program)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("running {program}"))?;
    match tokio::time::timeout(limit, child.wait()).await {
        Ok(status) => {
            let status = status?;
            if !status.success() {
                bail!("`{program} {}` failed: {status}", args.join(" "));
            }
            Ok(())
        }
        Err(_) => {
            child.kill().await.ok();
            bail!("`{program} {}` took longer than {limit:?}", args.join(" "))
        }
    }
}

/// Whether `program` can be run at all (found on PATH and executable).
pub async fn exists(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .status()
        .await
        .is_ok_and(|s| s.success())
}

/// The workspace root (this crate lives in `<root>/loadtest`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Where cargo puts release binaries: `$CARGO_TARGET_DIR/release`, else `<root>/target/release`.
pub fn release_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
        .join("release")
}
