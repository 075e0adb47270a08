//! WebSockets and the per-node hub. (In progress.)

use std::sync::Arc;

use ferry_broker::Broker;
use tokio_util::sync::CancellationToken;

use crate::config::LimitsConfig;

/// Fans events and channel messages out to this node's connections.
#[derive(Debug)]
pub struct Hub {
    _broker: Arc<dyn Broker>,
    _limits: LimitsConfig,
}

impl Hub {
    pub fn new(broker: Arc<dyn Broker>, limits: LimitsConfig) -> Arc<Self> {
        Arc::new(Self {
            _broker: broker,
            _limits: limits,
        })
    }

    /// Forward from the broker until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        shutdown.cancelled().await;
    }
}
