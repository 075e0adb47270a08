//! A worker of your own: the built-in kinds plus an `email.send` handler written in Rust, on the same engine,
//! queues and semantics as `ferry worker` (docs/handlers.md walks through it).
//!
//! ```sh
//! cargo run -p ferry-worker --example own_handler -- redis://127.0.0.1:6379 default
//! ```
//!
//! Then submit `{"kind": "email.send", "payload": {"to": "a@example.com"}}` to the queue (through a gateway on
//! the same Redis, or `ferry enqueue`). Ctrl-C drains: running jobs finish, then the process exits.

use std::sync::Arc;

use ferry_broker::{EngineConfig, RedisBroker};
use ferry_core::{Kind, QueueName};
use ferry_worker::{
    HandlerRegistry, JobContext, JobError, WorkerConfig, WorkerDeps, WorkerNode, WorkerNodeConfig,
    handler_fn,
};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// The handler: its result becomes the job's `result`; a `JobError` decides between a retry (with backoff, up
/// to the job's `max_attempts`) and a permanent failure (dead at once).
async fn send_email(ctx: JobContext) -> Result<Value, JobError> {
    let Some(to) = ctx.payload().get("to").and_then(Value::as_str) else {
        return Err(JobError::permanent(
            r#"invalid payload: expected {"to": "<address>"}"#,
        ));
    };
    if ctx.is_cancelled() {
        return Err(JobError::retry("cancelled before sending"));
    }
    // Send the message here; a transient failure is `JobError::retry(…)`.
    Ok(json!({"sent_to": to, "attempt": ctx.attempt()}))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let redis = args
        .next()
        .unwrap_or_else(|| "redis://127.0.0.1:6379".into());
    let queue = QueueName::parse(args.next().unwrap_or_else(|| "default".into()))?;

    let mut handlers = HandlerRegistry::with_builtins();
    handlers.register(Kind::parse("email.send")?, handler_fn(send_email));

    let broker = Arc::new(RedisBroker::connect(&[redis], EngineConfig::default()).await?);
    let config = WorkerConfig {
        queues: vec![queue],
        ..WorkerConfig::default()
    };
    let deps = WorkerDeps {
        broker,
        store: None,
        registry: ferry_telemetry::metrics::registry(),
    };
    let node = WorkerNode::build(WorkerNodeConfig::new(config), handlers, deps)?;

    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stop.cancel();
    });
    let report = node.run(shutdown).await?;
    println!("drained: {report:?}");
    Ok(())
}
