//! Built-in job kinds, for smoke tests, benchmarks and fault drills: `ferry.noop`, `ferry.sleep`, `ferry.echo`
//! and `ferry.fail`. They touch nothing outside the process.

use std::time::Duration;

use async_trait::async_trait;
use ferry_core::Kind;
use serde_json::Value;

use crate::{Handler, HandlerRegistry, JobContext, JobError};

pub const NOOP: &str = "ferry.noop";
pub const SLEEP: &str = "ferry.sleep";
pub const ECHO: &str = "ferry.echo";
pub const FAIL: &str = "ferry.fail";

pub(crate) fn register(r: &mut HandlerRegistry) {
    // The names are constants that satisfy `Kind`'s alphabet; a failure here is a typo caught by the tests.
    let kind = |s: &str| Kind::parse(s).expect("built-in kind names are valid");
    r.register(kind(NOOP), Noop);
    r.register(kind(SLEEP), Sleep);
    r.register(kind(ECHO), Echo);
    r.register(kind(FAIL), Fail);
}

/// Succeeds at once with `null`.
#[derive(Debug, Clone, Copy)]
pub struct Noop;

#[async_trait]
impl Handler for Noop {
    async fn run(&self, _ctx: JobContext) -> Result<Value, JobError> {
        Ok(Value::Null)
    }
}

/// `{"ms": N}`: sleeps N milliseconds, then succeeds with `null`; returns early when cancelled.
#[derive(Debug, Clone, Copy)]
pub struct Sleep;

#[async_trait]
impl Handler for Sleep {
    async fn run(&self, ctx: JobContext) -> Result<Value, JobError> {
        let ms = ctx
            .payload()
            .get("ms")
            .and_then(Value::as_u64)
            .ok_or_else(|| {
                JobError::permanent(r#"invalid payload: expected {"ms": <non-negative integer>}"#)
            })?;
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(ms)) => Ok(Value::Null),
            _ = ctx.cancelled().cancelled() => Err(JobError::retry("cancelled")),
        }
    }
}

/// Succeeds with its payload as the result.
#[derive(Debug, Clone, Copy)]
pub struct Echo;

#[async_trait]
impl Handler for Echo {
    async fn run(&self, ctx: JobContext) -> Result<Value, JobError> {
        Ok(ctx.payload().clone())
    }
}

/// `{"times": N}`: fails (retryably) the first N attempts, then succeeds with `null`. Without `times` it always
/// fails.
#[derive(Debug, Clone, Copy)]
pub struct Fail;

#[async_trait]
impl Handler for Fail {
    async fn run(&self, ctx: JobContext) -> Result<Value, JobError> {
        let attempt = ctx.attempt();
        match ctx.payload().get("times") {
            None | Some(Value::Null) => Err(JobError::retry(format!(
                "failing on purpose (attempt {attempt})"
            ))),
            Some(v) => {
                let times = v.as_u64().ok_or_else(|| {
                    JobError::permanent(
                        r#"invalid payload: expected {"times": <non-negative integer>}"#,
                    )
                })?;
                if u64::from(attempt) <= times {
                    Err(JobError::retry(format!(
                        "failing on purpose (attempt {attempt} of the first {times})"
                    )))
                } else {
                    Ok(Value::Null)
                }
            }
        }
    }
}
