//! Queries answered by the durable record ([`ferry_store::Store`]): `GET /v1/jobs` (a filtered, paginated
//! listing) and `GET /v1/jobs/{id}/events` (a job's audit trail). Both are scoped exactly like
//! `GET /v1/jobs/{id}`: the caller's own jobs in the caller's tenant, every job of the tenant for an admin. A
//! gateway without a store answers 503 `no-store`.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use ferry_core::{JobId, JobState, Kind, ValidationError};
use ferry_store::{EventRecord, JobQuery};
use serde_json::{Value, json};

use super::Api;
use super::extract::{Authed, Path};
use super::jobs::{not_found, view, visible};
use super::tenancy::{self, broker_queue};
use crate::auth::{Principal, Scope};
use crate::error::ApiError;

/// Default and largest page of a job listing.
pub const LIST_DEFAULT: usize = 50;
pub const LIST_MAX: usize = 500;
/// Most events returned for one job.
pub const EVENTS_MAX: usize = 1000;

fn field(name: &str, message: impl Into<String>) -> ApiError {
    ValidationError::field(name, message).into()
}

/// A time filter: integer milliseconds since the Unix epoch, or an RFC 3339 timestamp
/// (`2026-11-30T12:00:00Z`, `2026-11-30T12:00:00.250+01:00`).
fn parse_time(name: &str, s: &str) -> Result<u64, ApiError> {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse().map_err(|_| field(name, "is too large"));
    }
    rfc3339_ms(s).ok_or_else(|| {
        field(
            name,
            "must be milliseconds since the Unix epoch or an RFC 3339 timestamp",
        )
    })
}

/// An RFC 3339 timestamp as milliseconds since the epoch (fractions below a millisecond truncated); `None` when
/// malformed or before 1970.
fn rfc3339_ms(s: &str) -> Option<u64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

/// The parameters of `GET /v1/jobs` for which an empty value means absent, as openapi.json documents.
const EMPTY_IS_ABSENT: [&str; 3] = ["created_after", "created_before", "cursor"];

/// The store query for `p` and the client's parameters; each bad parameter is a 400 naming it.
fn job_query(p: &Principal, params: Vec<(String, String)>) -> Result<JobQuery, ApiError> {
    let tenant = tenancy::tenant(p)?.map(str::to_owned);
    let mut q = JobQuery {
        // An admin sees every job of its tenant (every job at all without a tenant), others only their own.
        owner: (!p.is_admin()).then(|| p.sub.clone()),
        tenant,
        limit: LIST_DEFAULT,
        ..JobQuery::default()
    };
    let mut errors = Vec::new();
    for (k, v) in params {
        // An empty cursor or time bound (`?cursor=`, what a form or a generated client sends for "not set")
        // means absent.
        if v.is_empty() && EMPTY_IS_ABSENT.contains(&k.as_str()) {
            continue;
        }
        let r: Result<(), ApiError> = (|| {
            match k.as_str() {
                "queue" => q.queue = Some(broker_queue(p, &v)?),
                "state" => q.state = Some(
                    serde_json::from_value::<JobState>(Value::String(v.clone())).map_err(|_| {
                        field(
                            "state",
                            "must be one of scheduled, queued, active, retrying, completed, dead, \
                                     cancelled",
                        )
                    })?,
                ),
                "kind" => {
                    q.kind = Some(Kind::parse(v.clone()).map_err(|e| match e.errors.first() {
                        Some(f) => field("kind", f.message.clone()),
                        None => field("kind", "is not a valid kind"),
                    })?)
                }
                "created_after" => q.created_after = Some(parse_time("created_after", &v)?),
                "created_before" => q.created_before = Some(parse_time("created_before", &v)?),
                "limit" => {
                    q.limit = match v.parse::<usize>() {
                        Ok(n) if (1..=LIST_MAX).contains(&n) => n,
                        _ => {
                            return Err(field(
                                "limit",
                                format!("must be a whole number between 1 and {LIST_MAX}"),
                            ));
                        }
                    }
                }
                "cursor" => {
                    q.after = Some(
                        JobId::parse(&v)
                            .map_err(|_| field("cursor", "is not a cursor this API returned"))?,
                    )
                }
                other => return Err(field(other, "is not a parameter of this route")),
            }
            Ok(())
        })();
        match r {
            Ok(()) => {}
            Err(ApiError::BadRequest { errors: e, .. }) => errors.extend(e),
            Err(e) => return Err(e),
        }
    }
    if !errors.is_empty() {
        return Err(ValidationError { errors }.into());
    }
    Ok(q)
}

/// `GET /v1/jobs`: the caller's jobs from the store, newest first, one page.
pub async fn list(
    State(api): State<Api>,
    Authed(p): Authed,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<axum::Json<Value>, ApiError> {
    p.require(Scope::JobsRead)?;
    let store = api.app.store()?;
    let Query(params) = query.map_err(|_| ApiError::bad_request("malformed query string"))?;
    let q = job_query(&p, params)?;
    let page = api.app.resilience.store(store.jobs(&q)).await?;
    // The store filters by owner and tenant already; this keeps the listing's scope exactly the lookup's even
    // if it returned more.
    let jobs: Vec<Value> = page
        .jobs
        .iter()
        .filter(|j| visible(&p, j))
        .map(|j| view(&p, j))
        .collect();
    Ok(axum::Json(json!({
        "jobs": jobs,
        "next_cursor": page.next.map(|id| id.to_string()),
    })))
}

fn event_view(e: &EventRecord) -> Value {
    json!({
        "id": e.id,
        "type": e.ty,
        "state": e.state,
        "attempt": e.attempt,
        "at": e.at,
        "recorded_at": e.recorded_at,
        "correlation_id": e.correlation_id,
        "actor": e.actor,
        "data": e.data,
    })
}

/// `GET /v1/jobs/{id}/events`: a job's audit trail, oldest first.
pub async fn events(
    State(api): State<Api>,
    Authed(p): Authed,
    Path(id): Path<String>,
) -> Result<axum::Json<Value>, ApiError> {
    p.require(Scope::JobsRead)?;
    let store = api.app.store()?;
    let id = JobId::parse(&id)?;
    // The store first (it has the job's owner once the recorder saw `job.queued`), then the broker for a job so
    // new the recorder has not caught up yet.
    let job = match api.app.resilience.store(store.job(id)).await? {
        Some(j) => Some(j),
        None => api.app.find_job(id).await?,
    };
    match job {
        Some(j) if visible(&p, &j) => {}
        _ => return Err(not_found()),
    }
    let events = api
        .app
        .resilience
        .store(store.events(id, EVENTS_MAX))
        .await?;
    let events: Vec<Value> = events.iter().map(event_view).collect();
    Ok(axum::Json(json!({"id": id, "events": events})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_and_milliseconds() {
        assert_eq!(parse_time("t", "1700000000000").unwrap(), 1_700_000_000_000);
        assert_eq!(rfc3339_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(rfc3339_ms("2023-11-14T22:13:20Z"), Some(1_700_000_000_000));
        assert_eq!(
            rfc3339_ms("2023-11-14T22:13:20.5Z"),
            Some(1_700_000_000_500)
        );
        assert_eq!(
            rfc3339_ms("2023-11-14T23:13:20.123456+01:00"),
            Some(1_700_000_000_123)
        );
        assert_eq!(
            rfc3339_ms("2023-11-14T21:13:20-01:00"),
            Some(1_700_000_000_000)
        );
        assert_eq!(rfc3339_ms("2024-02-29T00:00:00Z"), Some(1_709_164_800_000));
        for bad in [
            "",
            "yesterday",
            "2023-02-29T00:00:00Z",
            "2023-11-14T22:13:20",
            "2023-11-14T25:13:20Z",
            "2023-11-14T22:13:20.Z",
            "1969-12-31T23:59:59Z",
            "2023-11-14T22:13:20+0100",
        ] {
            assert_eq!(rfc3339_ms(bad), None, "{bad}");
        }
        let e = parse_time("created_after", "soon").unwrap_err();
        assert_eq!(e.problem()["errors"][0]["field"], "created_after");
    }

    #[test]
    fn empty_parameters_are_absent() {
        let p = Principal {
            sub: "alice".into(),
            tenant: None,
            scopes: crate::auth::Scopes::default(),
            exp: u64::MAX,
        };
        let params = |kv: &[(&str, &str)]| {
            kv.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<Vec<_>>()
        };
        let q = job_query(
            &p,
            params(&[
                ("created_after", ""),
                ("created_before", ""),
                ("cursor", ""),
            ]),
        )
        .unwrap();
        assert_eq!(
            (q.created_after, q.created_before, q.after, q.limit),
            (None, None, None, LIST_DEFAULT)
        );
        let e = job_query(&p, params(&[("colour", "")])).unwrap_err();
        assert_eq!(e.problem()["errors"][0]["field"], "colour");
        // Elsewhere an empty value is as bad as openapi.json's pattern says.
        let e = job_query(&p, params(&[("queue", "")])).unwrap_err();
        assert_eq!(e.problem()["errors"][0]["field"], "queue");
    }
}
