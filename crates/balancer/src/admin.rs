//! The admin listener (`--admin-listen`, default `127.0.0.1:9466`), served by [`ferry_telemetry::admin`] like
//! every role's: `GET /metrics` (the process registry with the `ferry_balancer_*` series), `GET /healthz`
//! (alive) and `GET /readyz` (taking connections: not draining, a membership read within the last 5 s, at
//! least one eligible gateway).

use std::sync::Arc;

use async_trait::async_trait;
use ferry_telemetry::admin::{Admin, Check, Readiness};
use ferry_telemetry::prometheus::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::Shared;

pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    registry: Arc<Registry>,
    stop: CancellationToken,
) {
    let admin = Admin {
        registry: (*registry).clone(),
        readiness: Arc::new(Ready(shared)),
        profiling: false,
        role: "balancer",
        extra: None,
    };
    if let Err(e) = ferry_telemetry::admin::serve(listener, admin, stop).await {
        tracing::error!(error = %e, "admin listener failed");
    }
}

struct Ready(Arc<Shared>);

#[async_trait]
impl Readiness for Ready {
    async fn checks(&self) -> Vec<Check> {
        let (membership, gateways) = self.0.ready();
        vec![
            Check::state("membership", membership["ok"] == true, membership),
            Check::state("gateways", gateways["ok"] == true, gateways),
        ]
    }

    fn draining(&self) -> bool {
        self.0.draining.load(std::sync::atomic::Ordering::Acquire)
    }
}
