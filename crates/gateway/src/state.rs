//! What every handler shares. Cloned per request (all fields are `Arc`s).

use std::sync::Arc;

use ferry_broker::Broker;

use crate::GatewayConfig;
use crate::auth::Authenticator;
use crate::ws::Hub;

#[derive(Debug, Clone)]
pub struct AppState {
    pub broker: Arc<dyn Broker>,
    pub auth: Arc<Authenticator>,
    pub config: Arc<GatewayConfig>,
    pub hub: Arc<Hub>,
}
