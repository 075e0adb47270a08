//! What every handler shares. Cloned per request (all fields are `Arc`s).

use std::sync::Arc;

use ferry_broker::Broker;
use ferry_store::Store;

use crate::GatewayConfig;
use crate::auth::Authenticator;
use crate::error::ApiError;
use crate::resilience::Resilience;
use crate::ws::Hub;

#[derive(Debug, Clone)]
pub struct AppState {
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

impl AppState {
    /// The configured store, or 503 `no-store`.
    pub fn store(&self) -> Result<&Arc<dyn Store>, ApiError> {
        self.config.store.as_ref().ok_or(ApiError::NoStore)
    }
}
