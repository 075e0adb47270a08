//! Lifecycle events. Every state transition emits one; engines write them, packed several to an entry, to a
//! durable per-shard stream and publish them for live fan-out. An event's `id` is `<entry-id>/<index>`: the
//! stream entry that carried it and its position there, so it is unique and stable across redeliveries.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{JobId, JobSpec, JobState, Kind, QueueName};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventType {
    #[serde(rename = "job.queued")]
    Queued,
    #[serde(rename = "job.active")]
    Active,
    #[serde(rename = "job.progress")]
    Progress,
    #[serde(rename = "job.completed")]
    Completed,
    #[serde(rename = "job.retrying")]
    Retrying,
    #[serde(rename = "job.dead")]
    Dead,
    #[serde(rename = "job.cancelled")]
    Cancelled,
    #[serde(rename = "job.scheduled")]
    Scheduled,
    /// Never emitted by an engine: the durable store's name for a `job.completed` of a job that already has
    /// one recorded (the job ran again after Redis lost its completion), so the trail keeps one completion.
    #[serde(rename = "job.duplicate_completion")]
    DuplicateCompletion,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "job.queued",
            Self::Active => "job.active",
            Self::Progress => "job.progress",
            Self::Completed => "job.completed",
            Self::Retrying => "job.retrying",
            Self::Dead => "job.dead",
            Self::Cancelled => "job.cancelled",
            Self::Scheduled => "job.scheduled",
            Self::DuplicateCompletion => "job.duplicate_completion",
        }
    }
}

/// One lifecycle event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// `<stream entry id>/<index>`; filled in by the engine that stored the event.
    #[serde(default)]
    pub id: String,
    #[serde(rename = "type")]
    pub ty: EventType,
    pub job: JobId,
    pub queue: QueueName,
    pub kind: Kind,
    pub state: JobState,
    pub attempt: u32,
    /// Milliseconds since the Unix epoch.
    pub at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Result (completed), error (retrying, dead), progress value, or nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    /// The correlation id the job was submitted with (`X-Request-Id` at the gateway).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// Who made the transition: the JWT subject for submissions and cancellations, the worker's consumer name
    /// for a worker's transitions; none for the engine's own (promotion, lease reclaim).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// The job's spec, on `job.queued` and `job.scheduled` events read from the durable event log (so the
    /// recorder can write the whole record). Never sent to live subscribers.
    #[serde(skip)]
    pub spec: Option<Box<JobSpec>>,
}

impl Event {
    /// The event's position in its shard's log, from its id (`<ms>-<seq>/<n>` or `<seq>/<n>`): events of one job
    /// happen on one shard, so this orders them even when they are delivered out of order.
    pub fn order_key(&self) -> Option<(u64, u64, u32)> {
        order_key(&self.id)
    }
}

/// [`Event::order_key`] of an event id.
pub fn order_key(id: &str) -> Option<(u64, u64, u32)> {
    let (entry, n) = id.split_once('/')?;
    let n = n.parse().ok()?;
    match entry.split_once('-') {
        Some((ms, seq)) => Some((ms.parse().ok()?, seq.parse().ok()?, n)),
        None => Some((entry.parse().ok()?, 0, n)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_names() {
        assert_eq!(
            serde_json::to_string(&EventType::Completed).unwrap(),
            "\"job.completed\""
        );
        let e: Event = serde_json::from_str(
            r#"{"type":"job.active","job":"0190a0c0-0000-7000-8000-000000000000","queue":"q","kind":"k","state":"active","attempt":1,"at":5}"#,
        )
        .unwrap();
        assert_eq!(e.ty, EventType::Active);
        assert_eq!(e.id, "");
    }

    #[test]
    fn order_keys() {
        assert_eq!(order_key("1700000000000-3/2"), Some((1700000000000, 3, 2)));
        assert_eq!(order_key("17/0"), Some((17, 0, 0)));
        assert!(order_key("1-2/0") < order_key("1-10/0"));
        assert_eq!(order_key("x/1"), None);
        assert_eq!(order_key("17"), None);
    }
}
