//! Process-level plumbing shared by every ferry role: installing the tracing subscriber and turning SIGTERM /
//! SIGINT into the root [`CancellationToken`] that the whole shutdown tree hangs off.
//!
//! [`metrics`] holds the Prometheus side: one registry per process, the process and runtime collectors, and the
//! text rendering every role's `/metrics` serves.
//!
//! This crate must not hold global state of its own: the only global it touches is the tracing subscriber, and
//! only when the binary calls [`init_tracing`]. Libraries and tests never call it, so several nodes can run in
//! one test process.

pub mod metrics;

pub use prometheus;

use std::future::Future;
use std::io::IsTerminal;

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// Environment variables read for the log filter, first match wins.
pub const LOG_ENV_VARS: [&str; 2] = ["FERRY_LOG", "RUST_LOG"];

/// Filter used when neither variable is set.
pub const DEFAULT_LOG_FILTER: &str = "info";

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// A log filter that `tracing-subscriber` cannot parse; names the variable it came from.
    #[error("invalid {var}: {message}")]
    InvalidFilter { var: &'static str, message: String },
    #[error("a tracing subscriber is already installed")]
    AlreadyInstalled,
    #[error("cannot install a handler for {signal}: {source}")]
    Signal {
        signal: &'static str,
        source: std::io::Error,
    },
}

/// Which signal asked the process to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Terminate,
    Interrupt,
}

impl Signal {
    pub fn name(self) -> &'static str {
        match self {
            Self::Terminate => "SIGTERM",
            Self::Interrupt => "SIGINT",
        }
    }
}

/// The filter from `FERRY_LOG`, else `RUST_LOG`, else `info`.
pub fn env_filter() -> Result<EnvFilter, TelemetryError> {
    for var in LOG_ENV_VARS {
        if let Ok(value) = std::env::var(var)
            && !value.trim().is_empty()
        {
            return EnvFilter::try_new(&value).map_err(|e| TelemetryError::InvalidFilter {
                var,
                message: e.to_string(),
            });
        }
    }
    Ok(EnvFilter::new(DEFAULT_LOG_FILTER))
}

/// Install the process-wide tracing subscriber, writing to stderr (stdout is kept for command output such as
/// the ids `ferry enqueue` prints). `json` selects one JSON object per line, for log collectors.
pub fn init_tracing(json: bool) -> Result<(), TelemetryError> {
    let filter = env_filter()?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colours only for a person at a terminal; escape codes in a log file or a CI log are noise.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let installed = if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init()
    } else {
        builder.try_init()
    };
    installed.map_err(|_| TelemetryError::AlreadyInstalled)
}

/// A future that resolves with the first SIGTERM or SIGINT.
///
/// The handlers are registered when this function is called, not when the future is first polled, so a signal
/// that arrives in between is not lost (and, once registered, no longer kills the process outright). Must be
/// called inside a tokio runtime.
pub fn shutdown_signal() -> Result<impl Future<Output = Signal> + Send + 'static, TelemetryError> {
    let mut term = signal(SignalKind::terminate()).map_err(|source| TelemetryError::Signal {
        signal: "SIGTERM",
        source,
    })?;
    let mut int = signal(SignalKind::interrupt()).map_err(|source| TelemetryError::Signal {
        signal: "SIGINT",
        source,
    })?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => Signal::Terminate,
            _ = int.recv() => Signal::Interrupt,
        }
    })
}

/// A root token cancelled on the first SIGTERM or SIGINT; every task of the process should hang off it (or a
/// child of it). The signal is logged when it arrives. Must be called inside a tokio runtime.
pub fn shutdown_token() -> Result<CancellationToken, TelemetryError> {
    let token = CancellationToken::new();
    cancel_on_signal(token.clone())?;
    Ok(token)
}

/// Cancel `token` on the first SIGTERM or SIGINT (handlers registered now). Returns at once.
pub fn cancel_on_signal(token: CancellationToken) -> Result<(), TelemetryError> {
    let signal = shutdown_signal()?;
    tokio::spawn(async move {
        tokio::select! {
            sig = signal => {
                tracing::info!(signal = sig.name(), "shutdown requested");
                token.cancel();
            }
            // Someone else started the shutdown: nothing left to wait for.
            _ = token.cancelled() => {}
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_filter_parses() {
        assert!(EnvFilter::try_new(DEFAULT_LOG_FILTER).is_ok());
        assert!(EnvFilter::try_new("ferry_worker=debug,info").is_ok());
    }

    #[tokio::test]
    async fn token_is_cancelled_on_sigterm() {
        let token = shutdown_token().unwrap();
        // Deliver SIGTERM to ourselves through the shell `kill`, since the crate forbids unsafe (no libc::raise).
        let pid = std::process::id().to_string();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(status.success());
        tokio::time::timeout(std::time::Duration::from_secs(5), token.cancelled())
            .await
            .expect("token cancelled after SIGTERM");
    }
}
