//! `POST /v1/channels/{channel}/publish`: application messages to the subscribers of `app:<channel>`. Channel
//! names use the queue-name alphabet and are namespaced by tenant the same way.

use axum::extract::State;
use axum::http::StatusCode;
use ferry_core::ValidationError;
use serde_json::Value;

use super::Api;
use super::extract::{Authed, Json, Path};
use super::tenancy;
use crate::auth::Scope;
use crate::error::ApiError;

/// Check a channel name (the part after `app:`) and return the hub channel it maps to: `app:<channel>`, or
/// `app:<tenant>:<channel>` for a principal with a tenant.
pub fn app_channel(p: &crate::auth::Principal, channel: &str) -> Result<String, ApiError> {
    // Same alphabet and length as a queue name; re-labelled so the error names `channel`.
    let relabel = |e: ValidationError| {
        let mut e = e;
        for f in &mut e.errors {
            f.field = "channel".into();
        }
        ApiError::from(e)
    };
    let q = tenancy::broker_queue(p, channel).map_err(|e| match e {
        ApiError::BadRequest { errors, .. } => relabel(ValidationError { errors }),
        other => other,
    })?;
    Ok(format!("app:{q}"))
}

pub async fn publish(
    State(api): State<Api>,
    Authed(p): Authed,
    Path(channel): Path<String>,
    Json(data): Json<Value>,
) -> Result<StatusCode, ApiError> {
    p.require(Scope::Publish)?;
    let target = app_channel(&p, &channel)?;
    // Delivery is at most once and asynchronous (other nodes get it through the broker), so the answer is
    // "accepted", not "delivered".
    // Over `max_publish_bytes`: 413 here, before the broker, so nothing is delivered.
    let message = api.app.hub.prepare_publish(&target, &data)?;
    api.app
        .resilience
        .broker(api.app.hub.publish(message))
        .await?;
    Ok(StatusCode::ACCEPTED)
}
