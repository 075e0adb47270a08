//! Process-level plumbing shared by every ferry role: installing the tracing subscriber and turning SIGTERM /
//! SIGINT into the root [`CancellationToken`] that the whole shutdown tree hangs off.
//!
//! [`metrics`] holds the Prometheus side: one registry per process, the process and runtime collectors, and the
//! text rendering every role's `/metrics` serves.
//!
//! [`profile`] captures on-demand CPU profiles in the pprof format, one at a time, for the roles'
//! `/debug/pprof/profile` (served only when the role runs with `--profiling`).
//!
//! [`otlp`] optionally exports spans to an OpenTelemetry collector (OTLP/HTTP) and links them across the
//! gateway and the worker through the jobs' `traceparent`.
//!
//! [`runner`] is the process runner every role runs under (root token, second signal, hard deadline, one
//! registry, the admin listener), and [`admin`] the one admin router (`/metrics`, `/healthz`, `/readyz`,
//! `/debug/pprof/profile`) the roles serve.
//!
//! This crate must not hold global state of its own: the only global it touches is the tracing subscriber, and
//! only when the binary calls [`install_tracing`] (or [`init_tracing`]). Libraries and tests never call it, so
//! several nodes can run in one test process.

pub mod admin;
pub mod health;
pub mod metrics;
pub mod otlp;
pub mod profile;
pub mod runner;

pub use prometheus;

use std::future::Future;
use std::io::IsTerminal;

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

pub use otlp::{OtlpConfig, TracingGuard, current_traceparent, set_remote_parent, traceparent_of};
pub use tracing_subscriber::EnvFilter;

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
    /// The OTLP exporter could not be set up (a bad endpoint, a client that cannot be built).
    #[error("{0}")]
    Otlp(String),
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
            return parse_filter(&value, var);
        }
    }
    Ok(EnvFilter::new(DEFAULT_LOG_FILTER))
}

/// Parse a log filter (`info`, `info,ferry_worker=debug`); an error names `var`, where the value came from.
pub fn parse_filter(value: &str, var: &'static str) -> Result<EnvFilter, TelemetryError> {
    EnvFilter::try_new(value.trim()).map_err(|e| TelemetryError::InvalidFilter {
        var,
        message: format!("{value:?}: {e}"),
    })
}

/// Install the process-wide tracing subscriber: log lines to stderr through `filter` (JSON lines when `json`)
/// and, when `otlp` is given, span export to that collector, its requests run on `runtime`. The returned
/// guard must be kept, and [shut down](TracingGuard::shutdown) before the process exits so the last spans
/// are sent. With `otlp` = `None` nothing but the log output is installed.
pub fn install_tracing(
    json: bool,
    filter: EnvFilter,
    otlp: Option<(&OtlpConfig, tokio::runtime::Handle)>,
) -> Result<TracingGuard, TelemetryError> {
    let provider = otlp
        .map(|(config, runtime)| otlp::provider(config, runtime))
        .transpose()
        .map_err(TelemetryError::Otlp)?;
    let fmt = tracing_subscriber::fmt::layer()
        // Colours only for a person at a terminal; escape codes in a log file or a CI log are noise.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let fmt = if json {
        fmt.json()
            .flatten_event(true)
            .with_current_span(true)
            .boxed()
    } else {
        fmt.boxed()
    };
    let export = provider.as_ref().map(otlp::layer);
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(export)
        .try_init()
        .map_err(|_| TelemetryError::AlreadyInstalled)?;
    Ok(TracingGuard::new(provider))
}

/// Install the process-wide tracing subscriber, writing to stderr (stdout is kept for command output such as
/// the ids `ferry enqueue` prints). `json` selects one JSON object per line, for log collectors.
pub fn init_tracing(json: bool) -> Result<(), TelemetryError> {
    install_tracing(json, env_filter()?, None).map(drop)
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
