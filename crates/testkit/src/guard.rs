//! Shared plumbing for the server wrappers: the orphan watchdog, log tails, and running helper binaries with
//! readable errors. Nothing here knows about Redis or PostgreSQL.

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// A `sh` process that runs a cleanup command if this test process dies without running its destructors
/// (SIGKILL, an abort, a harness timeout). Drop handles the normal path; the watchdog only covers the case where
/// Drop never runs, which would otherwise leave a redis-server or a postmaster running on a shared machine.
///
/// It lives in its own process group because test harnesses (nextest) kill a timed-out test's whole group, and
/// the watchdog must outlive that kill to do its job. It polls once a second, so it costs nothing measurable.
#[derive(Debug)]
pub(crate) struct Watchdog {
    child: Option<Child>,
}

impl Watchdog {
    /// Watch this process; when it is gone, run `cleanup` in `sh` with `$1..` bound to `args`.
    /// Passing paths as positional arguments keeps them out of the script text, so no quoting is needed.
    pub(crate) fn spawn(cleanup: &str, args: &[&str]) -> Self {
        let script = format!(
            "parent=$1; shift; while kill -0 \"$parent\" 2>/dev/null; do sleep 1; done; {cleanup}"
        );
        let child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("ferry-testkit-watchdog")
            .arg(std::process::id().to_string())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .ok();
        // A missing watchdog only weakens cleanup after a crash; it must not fail the test that asked for a server.
        Self { child }
    }

    /// Stop watching (the owner cleaned up itself).
    pub(crate) fn disarm(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.disarm();
    }
}

/// The last `lines` lines of a log file, for error messages (empty when the file is missing).
pub(crate) fn log_tail(path: &Path, lines: usize) -> String {
    let Ok(mut file) = fs::File::open(path) else {
        return format!("(no log at {})", path.display());
    };
    // Logs of a long test can be large; the tail is all an error message needs.
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(16 * 1024)));
    let mut buf = Vec::new();
    let _ = file.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    let tail = all[all.len().saturating_sub(lines)..].join("\n");
    format!("--- last lines of {} ---\n{tail}", path.display())
}

/// Run a command to completion, turning a non-zero exit into an error that carries its output.
pub(crate) fn run(cmd: &mut Command) -> anyhow::Result<Output> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed with {}\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// Wait up to `timeout` for a child to exit; `true` when it did.
pub(crate) fn wait_exit(child: &mut Child, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return true,
            Ok(None) if Instant::now() >= deadline => return false,
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// The effective uid of this process, read from procfs so no `unsafe` libc call is needed.
pub(crate) fn euid() -> Option<u32> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    // "Uid: real effective saved fs"
    line.split_whitespace().nth(2)?.parse().ok()
}
