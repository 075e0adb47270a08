//! The job model. A client submits a [`NewJob`]; the engine stores its immutable [`JobSpec`] with an id; workers
//! receive a [`Job`] (spec + attempt number); lookups return a [`JobInfo`] (spec + current state and outcome).

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::{Backoff, Kind, QueueName, ValidationError};

/// Milliseconds since the Unix epoch: the one clock representation on the wire and in Redis.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A job id: a UUIDv7, so ids sort by creation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(pub Uuid);

impl JobId {
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    pub fn parse(s: &str) -> Result<Self, ValidationError> {
        Uuid::parse_str(s)
            .map(Self)
            .map_err(|_| ValidationError::field("id", "must be a UUID"))
    }
}

impl Default for JobId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

/// Three priority levels, each its own stream: a worker drains `high` before `normal` before `low`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, PartialOrd, Ord,
)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    High,
    #[default]
    Normal,
    Low,
}

impl Priority {
    pub const ALL: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];

    /// 0 = high, 1 = normal, 2 = low: the stream suffix and the claim order.
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn from_index(i: usize) -> Option<Self> {
        Self::ALL.get(i).copied()
    }
}

/// Where a job is in its life. `completed`, `dead` and `cancelled` are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Scheduled,
    Queued,
    Active,
    Retrying,
    Completed,
    Dead,
    Cancelled,
}

impl JobState {
    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Dead | Self::Cancelled)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Scheduled => "scheduled",
            Self::Queued => "queued",
            Self::Active => "active",
            Self::Retrying => "retrying",
            Self::Completed => "completed",
            Self::Dead => "dead",
            Self::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Limits applied when a job is submitted. The gateway and the CLI share them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_payload_bytes: usize,
    pub max_attempts: u32,
    pub max_timeout_ms: u64,
    pub max_delay_ms: u64,
    pub max_idempotency_key_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_payload_bytes: 512 * 1024,
            max_attempts: 1000,
            max_timeout_ms: 24 * 3600 * 1000,
            max_delay_ms: 365 * 24 * 3600 * 1000,
            max_idempotency_key_len: 256,
        }
    }
}

/// Default attempts when the submitter gives none (the original application's `MAX_RETRIES` was 3).
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;

/// What a client submits. Optional fields take the defaults documented on each.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewJob {
    pub kind: Kind,
    #[serde(default)]
    pub payload: Value,
    #[serde(default)]
    pub priority: Priority,
    /// Run no earlier than this many milliseconds from now (the job is `scheduled` until then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
    /// Total attempts before the job is dead (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Per-attempt time limit; the worker's default applies when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// A second submit with the same key (same queue, tenant and owner) returns the first job's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Backoff>,
    /// Set by the gateway from the JWT, never by the client body.
    #[serde(skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// The W3C `traceparent` of the submitting request (set by the gateway).
    #[serde(skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

impl NewJob {
    pub fn new(kind: Kind, payload: Value) -> Self {
        Self {
            kind,
            payload,
            priority: Priority::Normal,
            delay_ms: None,
            max_attempts: None,
            timeout_ms: None,
            idempotency_key: None,
            backoff: None,
            owner: None,
            tenant: None,
            correlation_id: None,
            traceparent: None,
        }
    }

    /// Check every limit; all bad fields are reported at once.
    pub fn validate(&self, limits: &Limits) -> Result<(), ValidationError> {
        let mut errors = Vec::new();
        let mut bad = |field: &str, message: String| {
            errors.push(crate::FieldError {
                field: field.to_owned(),
                message,
            })
        };
        let size = serde_json::to_vec(&self.payload)
            .map(|v| v.len())
            .unwrap_or(usize::MAX);
        if size > limits.max_payload_bytes {
            bad(
                "payload",
                format!("is {size} bytes, the limit is {}", limits.max_payload_bytes),
            );
        }
        if let Some(n) = self.max_attempts
            && (n == 0 || n > limits.max_attempts)
        {
            bad(
                "max_attempts",
                format!("must be between 1 and {}, got {n}", limits.max_attempts),
            );
        }
        if let Some(t) = self.timeout_ms
            && (t == 0 || t > limits.max_timeout_ms)
        {
            bad(
                "timeout_ms",
                format!("must be between 1 and {}, got {t}", limits.max_timeout_ms),
            );
        }
        if let Some(d) = self.delay_ms
            && d > limits.max_delay_ms
        {
            bad(
                "delay_ms",
                format!("must be at most {}, got {d}", limits.max_delay_ms),
            );
        }
        if let Some(k) = &self.idempotency_key
            && (k.is_empty() || k.len() > limits.max_idempotency_key_len)
        {
            bad(
                "idempotency_key",
                format!(
                    "must be 1 to {} bytes, got {}",
                    limits.max_idempotency_key_len,
                    k.len()
                ),
            );
        }
        if let Some(b) = &self.backoff
            && let Err(e) = b.validate()
        {
            errors.extend(e.errors);
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ValidationError { errors })
        }
    }

    /// The immutable record stored with the job.
    pub fn into_spec(self, created_at: u64) -> JobSpec {
        JobSpec {
            kind: self.kind,
            payload: self.payload,
            priority: self.priority,
            max_attempts: self.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS),
            timeout_ms: self.timeout_ms,
            backoff: self.backoff.unwrap_or_default(),
            owner: self.owner,
            tenant: self.tenant,
            correlation_id: self.correlation_id,
            traceparent: self.traceparent,
            created_at,
        }
    }
}

/// The part of a job that never changes after submission.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    pub kind: Kind,
    pub payload: Value,
    #[serde(default)]
    pub priority: Priority,
    pub max_attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default)]
    pub backoff: Backoff,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    pub created_at: u64,
}

/// A job as a worker receives it: the spec plus which attempt this is (1-based).
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub id: JobId,
    pub queue: QueueName,
    pub spec: JobSpec,
    pub attempt: u32,
}

/// A job as a lookup returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobInfo {
    pub id: JobId,
    pub queue: QueueName,
    pub state: JobState,
    /// Attempts started so far.
    pub attempts: u32,
    #[serde(flatten)]
    pub spec: JobSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When a scheduled or retrying job becomes due.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_at: Option<u64>,
    pub updated_at: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> NewJob {
        NewJob::new(Kind::parse("k").unwrap(), serde_json::json!({"a": 1}))
    }

    #[test]
    fn job_ids_are_v7_and_sort_by_time() {
        let a = JobId::new();
        let b = JobId::new();
        assert_eq!(a.0.get_version_num(), 7);
        assert!(a < b);
        assert_eq!(JobId::parse(&a.to_string()).unwrap(), a);
        assert_eq!(JobId::parse("nope").unwrap_err().errors[0].field, "id");
    }

    #[test]
    fn validation_reports_every_bad_field() {
        let mut j = job();
        j.max_attempts = Some(0);
        j.timeout_ms = Some(0);
        j.idempotency_key = Some(String::new());
        j.payload = serde_json::json!("x".repeat(600 * 1024));
        let e = j.validate(&Limits::default()).unwrap_err();
        let fields: Vec<_> = e.errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            ["payload", "max_attempts", "timeout_ms", "idempotency_key"]
        );
        assert!(job().validate(&Limits::default()).is_ok());
    }

    #[test]
    fn client_cannot_set_owner() {
        let r: Result<NewJob, _> = serde_json::from_str(r#"{"kind":"k","owner":"root"}"#);
        assert!(r.is_err(), "owner is set by the gateway, not the body");
        let r: Result<NewJob, _> = serde_json::from_str(r#"{"kind":"k","colour":"red"}"#);
        assert!(r.unwrap_err().to_string().contains("colour"));
    }

    #[test]
    fn states_know_finality() {
        assert!(JobState::Completed.is_final());
        assert!(!JobState::Retrying.is_final());
        assert_eq!(serde_json::to_string(&JobState::Dead).unwrap(), "\"dead\"");
    }
}
