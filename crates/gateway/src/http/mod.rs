//! The `/v1` JSON API. (In progress.)

use axum::Router;

use crate::state::AppState;

/// Every route of the gateway, WebSocket included.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .with_state(state)
}
