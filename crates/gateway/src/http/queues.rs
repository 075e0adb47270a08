//! Queue routes: figures (`queues:read`), pause, resume and the dead-letter list (`queues:admin`). Every queue
//! name is the client's, mapped into its tenant's namespace by [`super::tenancy`].

use axum::extract::{Query, State};
use ferry_broker::QueueStats;
use futures::{StreamExt, TryStreamExt};
use serde::Deserialize;
use serde_json::{Value, json};

use super::Api;
use super::extract::{Authed, Path};
use super::jobs::view;
use super::tenancy::{broker_queue, client_queue};
use crate::auth::{Principal, Scope};
use crate::error::ApiError;

/// Stats calls in flight at once for `GET /v1/queues`: enough to hide round trips, few enough not to flood a
/// shard with a burst the size of the queue list.
const STATS_CONCURRENCY: usize = 16;

fn stats_view(name: &str, s: &QueueStats) -> Value {
    json!({
        "queue": name,
        "depth": s.depth,
        "active": s.active,
        "scheduled": s.scheduled,
        "dead": s.dead,
        "lag_ms": s.lag_ms,
        "paused": s.paused,
    })
}

pub async fn list(
    State(api): State<Api>,
    Authed(p): Authed,
) -> Result<axum::Json<Value>, ApiError> {
    p.require(Scope::QueuesRead)?;
    super::tenancy::tenant(&p)?;
    let queues = api.app.resilience.broker(api.app.broker.queues()).await?;
    let visible: Vec<_> = queues
        .into_iter()
        .filter_map(|q| client_queue(&p, &q).map(|name| (name.to_owned(), q.clone())))
        .collect();
    let (broker, guard) = (&api.app.broker, &api.app.resilience);
    let mut out: Vec<Value> = futures::stream::iter(visible)
        .map(|(name, q)| async move {
            guard
                .broker(broker.stats(&q))
                .await
                .map(|s| stats_view(&name, &s))
        })
        .buffered(STATS_CONCURRENCY)
        .try_collect()
        .await?;
    out.sort_by(|a, b| a["queue"].as_str().cmp(&b["queue"].as_str()));
    Ok(axum::Json(json!({ "queues": out })))
}

pub async fn get(
    State(api): State<Api>,
    Authed(p): Authed,
    Path(queue): Path<String>,
) -> Result<axum::Json<Value>, ApiError> {
    p.require(Scope::QueuesRead)?;
    let q = broker_queue(&p, &queue)?;
    let s = api.app.resilience.broker(api.app.broker.stats(&q)).await?;
    Ok(axum::Json(stats_view(&queue, &s)))
}

async fn set_paused(
    api: &Api,
    p: &Principal,
    queue: &str,
    paused: bool,
) -> Result<Value, ApiError> {
    p.require(Scope::QueuesAdmin)?;
    let q = broker_queue(p, queue)?;
    if paused {
        api.app.resilience.broker(api.app.broker.pause(&q)).await?;
    } else {
        api.app.resilience.broker(api.app.broker.resume(&q)).await?;
    }
    Ok(json!({"queue": queue, "paused": paused}))
}

pub async fn pause(
    State(api): State<Api>,
    Authed(p): Authed,
    Path(queue): Path<String>,
) -> Result<axum::Json<Value>, ApiError> {
    set_paused(&api, &p, &queue, true).await.map(axum::Json)
}

pub async fn resume(
    State(api): State<Api>,
    Authed(p): Authed,
    Path(queue): Path<String>,
) -> Result<axum::Json<Value>, ApiError> {
    set_paused(&api, &p, &queue, false).await.map(axum::Json)
}

#[derive(Debug, Deserialize)]
pub struct DeadQuery {
    limit: Option<usize>,
}

/// Default and largest page of dead jobs.
const DEAD_DEFAULT: usize = 100;
const DEAD_MAX: usize = 1000;

pub async fn dead(
    State(api): State<Api>,
    Authed(p): Authed,
    Path(queue): Path<String>,
    query: Result<Query<DeadQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::Json<Value>, ApiError> {
    p.require(Scope::QueuesAdmin)?;
    let q = broker_queue(&p, &queue)?;
    let limit = query
        .map_err(|_| ferry_core::ValidationError::field("limit", "must be a whole number"))?
        .limit
        .unwrap_or(DEAD_DEFAULT);
    if limit == 0 || limit > DEAD_MAX {
        return Err(ferry_core::ValidationError::field(
            "limit",
            format!("must be between 1 and {DEAD_MAX}, got {limit}"),
        )
        .into());
    }
    let jobs = api
        .app
        .resilience
        .broker(api.app.broker.dead_letters(&q, limit))
        .await?;
    let jobs: Vec<Value> = jobs.iter().map(|j| view(&p, j)).collect();
    Ok(axum::Json(json!({"queue": queue, "jobs": jobs})))
}
