//! What every handler shares. Cloned per request (one `Arc`).

use std::sync::Arc;

use ferry_broker::Broker;
use ferry_core::{JobId, JobInfo};
use ferry_store::Store;

use crate::GatewayConfig;
use crate::auth::Authenticator;
use crate::error::ApiError;
use crate::resilience::Resilience;
use crate::ws::Hub;

/// One pointer: every request clones it, and every WebSocket connection's task holds one (an idle connection's
/// bytes count, see [`crate::ws`]).
#[derive(Debug, Clone)]
pub struct AppState(Arc<Shared>);

/// What [`AppState`] points to (reached through `Deref`: `state.broker`).
#[derive(Debug)]
pub struct Shared {
    pub broker: Arc<dyn Broker>,
    pub auth: Arc<Authenticator>,
    pub config: Arc<GatewayConfig>,
    pub hub: Arc<Hub>,
    /// Timeouts, breakers and shedding: every broker and store call made for a client goes through it.
    pub resilience: Arc<Resilience>,
    /// The budgets of client connections (read by `/metrics`).
    pub connections: Arc<crate::connection::Budget>,
    /// This node in the gateway membership.
    pub cluster: Arc<crate::cluster::Cluster>,
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl AppState {
    pub fn new(shared: Shared) -> Self {
        Self(Arc::new(shared))
    }

    /// The configured store, or 503 `no-store`.
    pub fn store(&self) -> Result<&Arc<dyn Store>, ApiError> {
        self.config.store.as_ref().ok_or(ApiError::NoStore)
    }

    /// The job from the broker or, when the broker no longer has it and there is a store, from the store. A
    /// finished job leaves the broker after its retention or, with a store, as soon as it is recorded.
    pub(crate) async fn find_job(&self, id: JobId) -> Result<Option<JobInfo>, ApiError> {
        let live = self.resilience.broker(self.broker.job(id)).await;
        let Some(store) = &self.config.store else {
            return live;
        };
        match live {
            Ok(Some(j)) => Ok(Some(j)),
            Ok(None) => self.resilience.store(store.job(id)).await,
            // Redis is down: the record may still know the job (possibly a moment behind the live state).
            Err(e @ ApiError::Unavailable { .. }) => {
                match self.resilience.store(store.job(id)).await {
                    Ok(Some(j)) => Ok(Some(j)),
                    _ => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }
}
