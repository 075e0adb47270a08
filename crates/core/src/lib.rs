//! ferry's domain model: what a job is, the states it moves through, the lifecycle events it emits, and the
//! validated names (queues, kinds) that every other crate passes around.
//!
//! This crate owns validation and the pure rules (retry backoff, which transitions exist). It must not do I/O,
//! spawn tasks or know about Redis, PostgreSQL or HTTP: engines and roles build on it, never the other way round.
//!
//! * [`names`]: `QueueName`, `Kind` — parsed once, valid forever after.
//! * [`job`]: `JobId`, `NewJob` (what a client submits), `JobInfo` (what a lookup returns), `JobState`, `Priority`.
//! * [`backoff`]: exponential backoff with full jitter.
//! * [`event`]: lifecycle events and their wire form.
//! * [`error`]: `FieldError` / `ValidationError`, which name the bad field.
//! * [`trace`]: the W3C `traceparent` a job carries from its request to its worker.
//! * [`breaker`]: a pure, thread-safe circuit breaker (closed / open / half-open) around a dependency.
//! * [`redact`]: the one rule for hiding the credentials of connection URLs, in URLs shown and in messages.

pub mod backoff;
pub mod breaker;
pub mod error;
pub mod event;
pub mod job;
pub mod names;
pub mod redact;
pub mod trace;

pub use backoff::Backoff;
pub use error::{FieldError, ValidationError};
pub use event::{Event, EventType};
pub use job::{
    DEFAULT_MAX_ATTEMPTS, Job, JobId, JobInfo, JobSpec, JobState, Limits, NewJob, Priority, now_ms,
};
pub use names::{Kind, QueueName};
pub use redact::{REDACTED, Redactor, redact_url};
