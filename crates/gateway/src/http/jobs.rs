//! Job routes: submit (single and batch; shed under event-log backlog), look up (the broker, then the store),
//! cancel, retry from dead-letter. Listings and audit trails are in [`super::history`]. Owner, tenant and
//! correlation id come from the token and headers, never from the body; someone else's job is reported as not
//! found so ids cannot be probed. Every broker and store call goes through [`crate::resilience`].

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use ferry_broker::{CancelOutcome, RetryOutcome};
use ferry_core::{JobId, JobInfo, NewJob, ValidationError};
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::Instrument as _;

use super::Api;
use super::extract::{Authed, Json, Path, from_value, integral_numbers};
use super::tenancy::{broker_queue, client_queue};
use crate::auth::{Principal, Scope};
use crate::error::ApiError;

const REQUEST_ID: &str = "x-request-id";
const TRACEPARENT: &str = "traceparent";

/// The request's W3C `traceparent` when valid, else a new trace: stored with the job and returned. With span
/// export on, `span` is in the request's trace (a child of the request's server span, whose remote parent the
/// header names) and the value returned names `span` as the parent, so the worker's span of the job becomes its
/// child.
fn traceparent(headers: &HeaderMap, span: &tracing::Span) -> String {
    let given = headers
        .get(TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(ferry_core::trace::TraceParent::parse);
    ferry_telemetry::traceparent_of(span).unwrap_or_else(|| {
        given
            .unwrap_or_else(ferry_core::trace::TraceParent::start)
            .to_string()
    })
}

/// Longest accepted `X-Request-Id`, as openapi.json documents it.
pub const MAX_REQUEST_ID: usize = 128;

/// `X-Request-Id` when given, else a fresh UUIDv7. It ends up in logs, events and the record, so one that is not
/// 1 to [`MAX_REQUEST_ID`] printable ASCII characters is refused (400 naming the header) rather than silently
/// replaced: the client would otherwise look for its id and not find it.
fn correlation_id(headers: &HeaderMap) -> Result<String, ApiError> {
    let Some(v) = headers.get(REQUEST_ID) else {
        return Ok(JobId::new().to_string());
    };
    match v.to_str() {
        Ok(s)
            if !s.is_empty()
                && s.len() <= MAX_REQUEST_ID
                && s.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            Ok(s.to_owned())
        }
        _ => Err(ValidationError::field(
            "X-Request-Id",
            format!("must be 1 to {MAX_REQUEST_ID} printable ASCII characters without spaces"),
        )
        .into()),
    }
}

/// Parse and check one submitted job, then stamp who submitted it.
fn new_job(
    api: &Api,
    p: &Principal,
    body: Value,
    prefix: Option<&str>,
    correlation: &str,
    trace: &str,
) -> Result<NewJob, ApiError> {
    let mut body = body;
    integral_numbers(&mut body);
    let mut job: NewJob = from_value(body, prefix)?;
    job.validate(&api.app.config.job_limits)
        .map_err(|e| match prefix {
            Some(pre) => e.within(pre),
            None => e,
        })?;
    job.owner = Some(p.sub.clone());
    job.tenant = p.tenant.clone();
    job.correlation_id = Some(correlation.to_owned());
    job.traceparent = Some(trace.to_owned());
    Ok(job)
}

fn with_request_id(mut res: Response, id: &str, trace: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(id) {
        res.headers_mut().insert(REQUEST_ID, v);
    }
    if let Ok(v) = HeaderValue::from_str(trace) {
        res.headers_mut().insert(TRACEPARENT, v);
    }
    res
}

pub async fn submit(
    State(api): State<Api>,
    Authed(p): Authed,
    Path(queue): Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Result<Response, ApiError> {
    p.require(Scope::JobsSubmit)?;
    api.app.resilience.admit_submission()?;
    let q = broker_queue(&p, &queue)?;
    let correlation = correlation_id(&headers)?;
    let span = tracing::info_span!("submit_job", queue = %queue, correlation_id = %correlation);
    let trace = traceparent(&headers, &span);
    let job = new_job(&api, &p, body, None, &correlation, &trace)?;
    let e = api
        .app
        .resilience
        .broker(api.app.broker.enqueue(&q, job))
        .instrument(span)
        .await?;
    api.metrics.enqueued(q.as_str(), u64::from(!e.duplicate));
    let mut out = json!({"id": e.id, "queue": queue, "state": e.state});
    if e.duplicate {
        out["duplicate"] = Value::Bool(true);
    }
    let res = (StatusCode::ACCEPTED, axum::Json(out)).into_response();
    Ok(with_request_id(res, &correlation, &trace))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Batch {
    jobs: Vec<Value>,
}

pub async fn submit_batch(
    State(api): State<Api>,
    Authed(p): Authed,
    Path(queue): Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Result<Response, ApiError> {
    p.require(Scope::JobsSubmit)?;
    api.app.resilience.admit_submission()?;
    let q = broker_queue(&p, &queue)?;
    let batch: Batch = from_value(body, None)?;
    let max = api.app.config.limits.max_batch;
    if batch.jobs.is_empty() || batch.jobs.len() > max {
        return Err(ValidationError::field(
            "jobs",
            format!("must hold 1 to {max} jobs, got {}", batch.jobs.len()),
        )
        .into());
    }
    let correlation = correlation_id(&headers)?;
    let span = tracing::info_span!("submit_batch", queue = %queue, correlation_id = %correlation);
    let trace = traceparent(&headers, &span);
    // Every bad job is reported at once, so a client fixes a batch in one round.
    let mut jobs = Vec::with_capacity(batch.jobs.len());
    let mut errors = Vec::new();
    for (i, body) in batch.jobs.into_iter().enumerate() {
        match new_job(
            &api,
            &p,
            body,
            Some(&format!("jobs[{i}]")),
            &correlation,
            &trace,
        ) {
            Ok(j) => jobs.push(j),
            Err(ApiError::BadRequest { errors: e, .. }) => errors.extend(e),
            Err(e) => return Err(e),
        }
    }
    if !errors.is_empty() {
        return Err(ValidationError { errors }.into());
    }
    let done = api
        .app
        .resilience
        .broker(api.app.broker.enqueue_batch(&q, jobs))
        .instrument(span)
        .await?;
    let accepted = done.iter().filter(|e| !e.duplicate).count() as u64;
    api.metrics.enqueued(q.as_str(), accepted);
    let ids: Vec<JobId> = done.iter().map(|e| e.id).collect();
    let res = (StatusCode::ACCEPTED, axum::Json(json!({"ids": ids}))).into_response();
    Ok(with_request_id(res, &correlation, &trace))
}

/// A job as clients see it. Timestamps are milliseconds since the Unix epoch, the clock of the whole system.
pub fn view(p: &Principal, j: &JobInfo) -> Value {
    json!({
        "id": j.id,
        "queue": client_queue(p, &j.queue).unwrap_or(j.queue.as_str()),
        "kind": j.spec.kind,
        "state": j.state,
        "priority": j.spec.priority,
        "attempts": j.attempts,
        "max_attempts": j.spec.max_attempts,
        "payload": j.spec.payload,
        "result": j.result,
        "error": j.error,
        "created_at": j.spec.created_at,
        "updated_at": j.updated_at,
        "run_at": j.run_at,
    })
}

pub(crate) fn not_found() -> ApiError {
    ApiError::NotFound("no such job".into())
}

/// Whether `p` may see `j`: its owner (in its tenant), or an admin (of the tenant, or of everything).
pub(crate) fn visible(p: &Principal, j: &JobInfo) -> bool {
    p.owns(j.spec.owner.as_deref(), j.spec.tenant.as_deref())
}

/// The job as the broker (live Redis state) holds it.
async fn broker_job(api: &Api, id: JobId) -> Result<Option<JobInfo>, ApiError> {
    api.app.resilience.broker(api.app.broker.job(id)).await
}

pub async fn get(
    State(api): State<Api>,
    Authed(p): Authed,
    Path(id): Path<String>,
) -> Result<axum::Json<Value>, ApiError> {
    p.require(Scope::JobsRead)?;
    let id = JobId::parse(&id)?;
    match api.app.find_job(id).await? {
        Some(j) if visible(&p, &j) => Ok(axum::Json(view(&p, &j))),
        _ => Err(not_found()),
    }
}

pub async fn cancel(
    State(api): State<Api>,
    Authed(p): Authed,
    Path(id): Path<String>,
) -> Result<axum::Json<Value>, ApiError> {
    p.require(Scope::JobsCancel)?;
    let id = JobId::parse(&id)?;
    // A finished job may be only in the record (it leaves the broker once recorded): still a conflict.
    let job = match api.app.find_job(id).await? {
        Some(j) if visible(&p, &j) => j,
        _ => return Err(not_found()),
    };
    match api
        .app
        .resilience
        .broker(api.app.broker.cancel(job.id, Some(&p.sub)))
        .await?
    {
        CancelOutcome::Cancelled(was) => Ok(axum::Json(
            json!({"id": job.id, "state": "cancelled", "previous_state": was}),
        )),
        CancelOutcome::AlreadyFinal(state) => {
            Err(ApiError::Conflict(format!("the job is already {state}")))
        }
        CancelOutcome::NotFound if job.state.is_final() => Err(ApiError::Conflict(format!(
            "the job is already {}",
            job.state
        ))),
        CancelOutcome::NotFound => Err(not_found()),
    }
}

/// Retry a dead job: an operator action on a queue, so it needs `queues:admin` and the job's queue must be in
/// the caller's namespace (not that the caller submitted it).
pub async fn retry(
    State(api): State<Api>,
    Authed(p): Authed,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    p.require(Scope::QueuesAdmin)?;
    let id = JobId::parse(&id)?;
    let job = match broker_job(&api, id).await? {
        Some(j) if client_queue(&p, &j.queue).is_some() => j,
        _ => return Err(not_found()),
    };
    match api
        .app
        .resilience
        .broker(api.app.broker.retry_dead(job.id))
        .await?
    {
        RetryOutcome::Requeued => Ok((
            StatusCode::ACCEPTED,
            axum::Json(json!({"id": job.id, "state": "queued"})),
        )
            .into_response()),
        RetryOutcome::NotDead(state) => Err(ApiError::Conflict(format!(
            "only dead jobs can be retried, this one is {state}"
        ))),
        RetryOutcome::NotFound => Err(not_found()),
    }
}
