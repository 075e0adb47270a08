//! The process runner every `ferry` role runs under: one way to start, report and stop a node.
//!
//! * **The root token.** The first SIGTERM or SIGINT cancels [`Runner::shutdown`]; every task of the process
//!   hangs off it. The handlers are registered in [`Runner::new`], before anything connects, so a signal during
//!   a slow start is still a graceful stop.
//! * **A second signal means now.** Once the shutdown has started, another SIGTERM/SIGINT exits the process with
//!   [`EXIT_SOFTWARE`] at once, without finishing the drain.
//! * **A hard deadline, armed first.** [`Runner::new`] takes the longest a shutdown may take. When it passes
//!   after the signal, whatever still hangs (a handler ignoring cancellation, a store that never answers), the
//!   process logs what it still held ([`Runner::on_deadline`]), flushes its last spans and exits with
//!   [`EXIT_SOFTWARE`].
//! * **One registry.** [`Runner::registry`] is the process's Prometheus registry, with the process and runtime
//!   collectors; it is handed to every node the process runs, so `/metrics` shows all of them.
//! * **One admin listener.** [`Runner::serve_admin`] serves [`crate::admin`]'s routes on a listener bound
//!   before the node connects (a taken address fails the start at once) and stops it last, after the node, so
//!   `/readyz` answers 503 while the node drains.
//! * **Exit with the parent** ([`Runner::exit_with_parent`]): a worker started by the autoscaler's local
//!   actuator drains when that parent is gone.
//!
//! Tests do not use the runner: they build nodes and hand them a token of their own. Only binaries touch signals
//! and `std::process::exit`, and only through this module.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::TelemetryError;
use crate::admin::Admin;

/// The exit status of a process that stopped without finishing its drain (sysexits' EX_SOFTWARE).
pub const EXIT_SOFTWARE: u8 = 70;

/// How long the exit at the shutdown deadline waits for the last spans to be sent.
const DEADLINE_FLUSH: Duration = Duration::from_secs(2);

/// What the deadline logs: the work the node still holds.
type DeadlineReport = Box<dyn FnOnce(Duration) + Send>;

/// The running process: root token, tracked tasks, registry, deadline. See the module documentation.
pub struct Runner {
    shutdown: CancellationToken,
    tasks: TaskTracker,
    registry: Registry,
    report: Arc<Mutex<Option<DeadlineReport>>>,
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner")
            .field("shutdown", &self.shutdown.is_cancelled())
            .field("tasks", &self.tasks.len())
            .finish_non_exhaustive()
    }
}

impl Runner {
    /// Register the signal handlers and arm the deadline: from the first signal, the process has `deadline` to
    /// finish. Must be called inside a tokio runtime.
    pub fn new(deadline: Duration) -> Result<Self, TelemetryError> {
        let shutdown = crate::shutdown_token()?;
        let runner = Self {
            shutdown: shutdown.clone(),
            tasks: TaskTracker::new(),
            registry: crate::metrics::registry(),
            report: Arc::new(Mutex::new(None)),
        };
        let report = runner.report.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            tokio::time::sleep(deadline).await;
            let report = report.lock().unwrap_or_else(|p| p.into_inner()).take();
            match report {
                Some(report) => report(deadline),
                None => tracing::error!(
                    deadline_ms = deadline.as_millis() as u64,
                    "shutdown deadline passed: exiting with work still open"
                ),
            }
            // The spans of the work that did finish, which the exit would otherwise lose.
            crate::otlp::flush(DEADLINE_FLUSH).await;
            std::process::exit(i32::from(EXIT_SOFTWARE));
        });
        // A second signal while draining means "now". Registered once the first has arrived, so the first
        // signal is the root token's.
        let shutdown = runner.shutdown.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            if let Ok(again) = crate::shutdown_signal() {
                let sig = again.await;
                tracing::warn!(
                    signal = sig.name(),
                    "second signal: exiting without finishing the drain"
                );
                std::process::exit(i32::from(EXIT_SOFTWARE));
            }
        });
        Ok(runner)
    }

    /// The root token: cancelled by the first signal (or by [`Runner::exit_with_parent`]).
    pub fn shutdown(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// The process's registry, for every node it runs.
    pub fn registry(&self) -> Registry {
        self.registry.clone()
    }

    /// What the deadline logs before the exit (the jobs a worker still holds). The last one set wins.
    pub fn on_deadline(&self, report: impl FnOnce(Duration) + Send + 'static) {
        *self.report.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(report));
    }

    /// Start the shutdown when the parent process goes away (killed, crashed): the process is re-parented, and
    /// its parent id changes. Checked twice a second.
    pub fn exit_with_parent(&self) {
        let shutdown = self.shutdown.clone();
        let parent = std::os::unix::process::parent_id();
        self.tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
                if std::os::unix::process::parent_id() != parent {
                    tracing::warn!(parent, "the parent process is gone: draining");
                    shutdown.cancel();
                    return;
                }
            }
        });
    }

    /// Bind the admin listener (`None`: no listener). Call before connecting anything, so a taken address
    /// fails the start at once.
    pub async fn bind_admin(addr: Option<SocketAddr>) -> std::io::Result<Option<TcpListener>> {
        match addr {
            Some(addr) => TcpListener::bind(addr).await.map(Some),
            None => Ok(None),
        }
    }

    /// Serve the admin routes on `listener` until [`Runner::finish`] (after the node has stopped). A listener
    /// that fails later is logged; the node goes on.
    pub fn serve_admin(&self, listener: TcpListener, admin: Admin) -> AdminStop {
        let stop = CancellationToken::new();
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "admin listener (/metrics, /healthz, /readyz)");
            if admin.profiling && !addr.ip().is_loopback() {
                tracing::warn!(%addr, "/debug/pprof/profile is served without authentication on a \
                    non-loopback address: keep the admin listener off public interfaces");
            }
        }
        let token = stop.clone();
        self.tasks.spawn(async move {
            if let Err(e) = crate::admin::serve(listener, admin, token).await {
                tracing::error!(error = %e, "admin listener failed");
            }
        });
        AdminStop(stop)
    }

    /// Stop the admin listener and wait for every task the runner tracks.
    pub async fn finish(self, admin: Option<AdminStop>) {
        if let Some(AdminStop(stop)) = admin {
            stop.cancel();
        }
        // Whatever is still tracked (the parent watcher) ends with the root token.
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// Stops the admin listener; handed to [`Runner::finish`], so the listener outlives the node's drain.
#[derive(Debug)]
pub struct AdminStop(CancellationToken);
