//! `ferry dev`: gateway, worker, scheduler and recorder in one process on the embedded (memory) engine and store. Nothing to
//! install: the first command a newcomer runs. When no secret is given it generates one and prints an admin
//! token and a curl line that submits a job.

use std::sync::Arc;
use std::time::Duration;

use ferry_broker::{EngineConfig, MemoryBroker};
use ferry_core::QueueName;
use ferry_gateway::GatewayConfig;
use ferry_gateway::auth::{AuthConfig, MintClaims, Scope, mint};
use ferry_store::MemoryStore;
use ferry_store::recorder::RecorderConfig;
use ferry_worker::{HandlerRegistry, WorkerConfig, WorkerDeps, WorkerNode, WorkerNodeConfig};

use crate::CliError;
use crate::args::DevArgs;

#[derive(Debug)]
pub struct ResolvedDev {
    pub gateway: GatewayConfig,
    pub worker: WorkerConfig,
    pub secret: Vec<u8>,
    pub generated_secret: bool,
    /// `--history-size`, `--history-ttl-ms`.
    pub history: ferry_broker::ChannelHistory,
}

pub fn resolve(a: DevArgs) -> Result<ResolvedDev, CliError> {
    let listen = crate::gateway::parse_listen(&a.listen)?;
    let (secret, generated_secret) = match a.jwt_secret {
        Some(s) => {
            crate::gateway::check_secret("--jwt-secret", s.as_bytes())?;
            (s.into_bytes(), false)
        }
        None => {
            let bytes: [u8; 32] = rand::random();
            (hex(&bytes).into_bytes(), true)
        }
    };
    let queues = a
        .queues
        .iter()
        .map(|q| QueueName::parse(q.trim()).map_err(|e| CliError::usage("--queues", e)))
        .collect::<Result<Vec<_>, _>>()?;
    if a.concurrency == 0 {
        return Err(CliError::usage("--concurrency", "must be at least 1"));
    }
    let auth = AuthConfig {
        hs_secret: Some(secret.clone()),
        leeway: Duration::from_secs(30),
        ..AuthConfig::default()
    };
    let mut gateway = GatewayConfig::new(listen, auth);
    gateway.shutdown = crate::gateway::shutdown_config(&a.shutdown)?;
    // The dev gateway serves the whole process (the embedded worker included).
    gateway.profiling = a.profiling;
    gateway.cors_origin = a.cors_origin;
    // `/readyz` names the embedded engine and store, not Redis and PostgreSQL.
    gateway.readiness.embedded = true;
    gateway.limits.unauth_upgrades_per_sec_per_ip = a.unauth_upgrade_rate;
    gateway
        .validate()
        .map_err(|e| crate::gateway_config_error("dev", e))?;
    let history = crate::channel_history(&a.history)?;
    Ok(ResolvedDev {
        history,
        gateway,
        worker: WorkerConfig {
            queues,
            concurrency: a.concurrency,
            ..WorkerConfig::default()
        },
        secret,
        generated_secret,
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub async fn run(cfg: ResolvedDev) -> Result<(), CliError> {
    // The gateway drains first, then the worker (see below); past both, the process exits 70.
    let w = &cfg.worker;
    let deadline = cfg.gateway.shutdown.hard_deadline
        + w.drain_timeout
        + w.cancel_grace
        + w.flush_timeout
        + Duration::from_secs(10);
    let runner = crate::runner(deadline)?;
    // Ctrl-C starts a drain that takes the gateway's drain delay before anything closes: say so, and how to skip it.
    let drain_delay = cfg.gateway.shutdown.drain_delay;
    let signalled = runner.shutdown();
    tokio::spawn(async move {
        signalled.cancelled().await;
        tracing::info!(
            "stopping: draining for {} s (--drain-delay-ms) before the listener closes, then running jobs \
             finish; a second Ctrl-C exits at once",
            drain_delay.as_secs_f64()
        );
    });
    let broker =
        Arc::new(MemoryBroker::new(EngineConfig::default()).with_channel_history(cfg.history));
    // The embedded record: the recorder copies every event into memory, so `GET /v1/jobs` and a job's events
    // work as they do against PostgreSQL (and are gone when the process exits).
    let store: Arc<dyn ferry_store::Store> = Arc::new(MemoryStore::new());
    let mut gateway = cfg.gateway;
    gateway.store = Some(store.clone());
    // One registry: the gateway's `/metrics` shows the embedded worker and recorder too.
    gateway.registry = Some(runner.registry());
    let mut node = WorkerNodeConfig::new(cfg.worker.clone());
    node.recorder = Some(RecorderConfig::new(String::new()));
    let deps = WorkerDeps {
        broker: broker.clone(),
        store: Some(store),
        registry: runner.registry(),
    };
    let worker = WorkerNode::build(node, HandlerRegistry::with_builtins(), deps)
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let monitor = worker.monitor();
    runner.on_deadline(move |deadline| ferry_worker::node::report_held(&monitor, deadline));
    // The worker drains only once the gateway has: jobs accepted during the gateway's drain delay are run, not
    // left in an engine that is about to vanish with the process.
    let worker_stop = tokio_util::sync::CancellationToken::new();
    let worker_task = tokio::spawn(worker.run(worker_stop.clone()));
    // Printed once bound, so the links name the real port also for `--listen 127.0.0.1:0`.
    let scheme = if gateway.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let queue = cfg
        .worker
        .queues
        .first()
        .map(|q| q.to_string())
        .unwrap_or_default();
    let (secret, generated) = (cfg.secret.clone(), cfg.generated_secret);
    let served = crate::gateway::serve_then(gateway, broker, runner.shutdown(), |listen| {
        if generated {
            print_start(&secret, listen, scheme, &queue)?;
        }
        Ok(())
    })
    .await;
    worker_stop.cancel();
    let drained = match worker_task.await {
        Ok(r) => r.map(drop).map_err(|e| CliError::Internal(e.to_string())),
        Err(e) => Err(CliError::Internal(e.to_string())),
    };
    runner.finish(None).await;
    served.and(drained)
}

/// The generated secret, an admin token, a curl line that submits a job and the dashboard's link (the token in
/// the fragment, which the page takes and removes from the address bar; a fragment never reaches the server).
fn print_start(
    secret: &[u8],
    listen: std::net::SocketAddr,
    scheme: &str,
    queue: &str,
) -> Result<(), CliError> {
    let all: Vec<&str> = Scope::ALL.iter().map(|s| s.as_str()).collect();
    let admin = MintClaims::new("dev-admin", &all.join(" "), Duration::from_secs(24 * 3600));
    let token = mint(secret, &admin).map_err(|e| CliError::Internal(e.to_string()))?;
    let secret = String::from_utf8_lossy(secret);
    println!("ferry dev: no FERRY_JWT_SECRET given, generated one for this run:");
    println!("  export FERRY_JWT_SECRET={secret}");
    println!("admin token (24 h):");
    println!("  export FERRY_TOKEN={token}");
    println!("dashboard (admin):");
    println!("  {scheme}://{listen}/ui/#token={token}");
    println!("submit a job:");
    // `-w '\n'`: the answer ends its line instead of running into the prompt.
    println!(
        "  curl -s -w '\\n' -X POST {scheme}://{listen}/v1/queues/{queue}/jobs -H \"Authorization: Bearer $FERRY_TOKEN\" -H 'Content-Type: application/json' -d '{{\"kind\":\"ferry.echo\",\"payload\":{{\"hello\":\"world\"}}}}'"
    );
    Ok(())
}
