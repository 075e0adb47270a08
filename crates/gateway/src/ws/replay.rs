//! Recovery of missed frames: `subscribe` with `"since": {"offset", "epoch"}` (and `since_offset` /
//! `since_epoch` on the connect URL for the automatic `user:` channel).
//!
//! Every pushed channel frame carries `offset` (rising within the channel) and `epoch` (changes when the
//! channel's history was lost). A client that comes back gives the last position it saw; the gateway
//! subscribes it first with its live frames *held*, reads what the channel missed from the broker
//! ([`PubSub::channel_missed`] for `app:`, [`EventFeed::events_missed`] for `user:`, `job:` and `queue:`), then,
//! under the hub's lock, queues the missed frames in order, then the held live frames except those at or below
//! the last position replayed (they were in the history too). The live feed can lag behind the history read
//! (another connection), so live frames at or below that position are still dropped after the replay, until the
//! first later one. So nothing is lost between the history read and the live subscription, and nothing comes
//! twice.
//!
//! The answer says `recovered: true` when every missed frame was replayed, `false` when the history does not
//! reach back (another epoch, trimmed, older than `--history-ttl-ms`, more than the bound, a `user:` channel over
//! several Redis shards, or the broker did not answer): then nothing is replayed and the client refetches over
//! HTTP. A replay is bounded by half the connection's send queue, so it never makes a slow consumer by itself.
//!
//! [`PubSub::channel_missed`]: ferry_broker::PubSub::channel_missed
//! [`EventFeed::events_missed`]: ferry_broker::EventFeed::events_missed

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use ferry_broker::{EventScope, StreamPos, event_offset, parse_offset};
use ferry_core::{Event, JobId, QueueName, ValidationError};
use serde_json::{Value, json};

use super::{ConnHandle, Hub, Payload, View, render_event, render_message};
use crate::error::ApiError;

/// Most event log entries one recovery of a job-event channel reads (each is one engine call's batch of events:
/// a read of 1,000 entries of ~1 KiB costs Redis about a millisecond; a client that missed more is not recovered).
pub(crate) const EVENT_SCAN: usize = 1_000;

/// Longest wait for the broker's history read; past it the answer is `recovered: false`.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// An offset as given by a client: a stream id `<ms>-<seq>`.
fn offset_field(field: &str, v: Option<&str>) -> Result<String, ApiError> {
    match v {
        Some(o) if parse_offset(o).is_some() => Ok(o.to_owned()),
        Some(_) => Err(ValidationError::field(
            field,
            "must be an offset from a pushed frame: \"<ms>-<seq>\"",
        )
        .into()),
        None => Err(ValidationError::field(field, "is required and must be a string").into()),
    }
}

fn epoch_field(field: &str, v: Option<&str>) -> Result<String, ApiError> {
    match v {
        Some(e) if !e.is_empty() && e.len() <= 64 => Ok(e.to_owned()),
        Some(_) => Err(ValidationError::field(
            field,
            "must be the epoch of a pushed frame (1 to 64 characters)",
        )
        .into()),
        None => Err(ValidationError::field(field, "is required and must be a string").into()),
    }
}

/// The `since` of a `subscribe` frame, if any.
pub(crate) fn parse_since(frame: &Value) -> Result<Option<StreamPos>, ApiError> {
    let since = match frame.get("since") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(o)) => o,
        Some(_) => {
            return Err(ValidationError::field(
                "since",
                "must be an object {\"offset\", \"epoch\"} from a pushed frame",
            )
            .into());
        }
    };
    Ok(Some(StreamPos {
        offset: offset_field("since.offset", since.get("offset").and_then(Value::as_str))?,
        epoch: epoch_field("since.epoch", since.get("epoch").and_then(Value::as_str))?,
    }))
}

/// `since_offset` and `since_epoch` of the connect URL (both or neither).
pub(crate) fn since_from_query(query: Option<&str>) -> Result<Option<StreamPos>, ApiError> {
    let get = |name: &str| {
        query?.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            (k == name).then(|| super::conn::percent_decode(v))
        })
    };
    let (offset, epoch) = (get("since_offset"), get("since_epoch"));
    if offset.is_none() && epoch.is_none() {
        return Ok(None);
    }
    Ok(Some(StreamPos {
        offset: offset_field("since_offset", offset.as_deref())?,
        epoch: epoch_field("since_epoch", epoch.as_deref())?,
    }))
}

/// What a recovery found, for the answer.
#[derive(Debug)]
pub(crate) struct Recovery {
    pub recovered: bool,
    /// The channel's current epoch (none for a `user:` channel over several shards, or when the broker did not
    /// answer).
    pub epoch: Option<String>,
    /// Where the client stands once the replayed frames are in: the last one's offset, or `since` when nothing
    /// was missed. None when not recovered.
    pub offset: Option<String>,
}

impl Recovery {
    /// The answer's recovery fields, added to `out`.
    pub(crate) fn fill(&self, out: &mut Value) {
        out["recovered"] = Value::Bool(self.recovered);
        out["epoch"] = self.epoch.clone().map_or(Value::Null, Value::String);
        if let Some(o) = &self.offset {
            out["offset"] = Value::String(o.clone());
        }
    }
}

/// Missed frames, rendered, with their offsets.
type Frames = Vec<super::Positioned>;

impl Hub {
    /// Replay what the hub key `key` missed since `since` to a connection subscribed to it with its live frames
    /// held, then release them. With `lead`, a `{"type": "recovery", ...}` frame goes first (the connect URL's
    /// `since`, which has no answer of its own).
    pub(crate) async fn recover(
        &self,
        conn: &Arc<ConnHandle>,
        key: &str,
        view: &View,
        since: &StreamPos,
        lead: bool,
    ) -> Recovery {
        let max = (self.limits.send_queue / 2).max(1);
        let read = tokio::time::timeout(READ_TIMEOUT, self.missed_frames(key, view, since, max));
        let (recovered, epoch, frames) = match read.await {
            Ok(Ok((true, epoch, frames))) if frames.len() <= max => (true, epoch, frames),
            Ok(Ok((_, epoch, _))) => (false, epoch, Vec::new()),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "recovery: the history read failed");
                (false, None, Vec::new())
            }
            Err(_) => {
                tracing::warn!("recovery: the history read timed out");
                (false, None, Vec::new())
            }
        };
        self.counters
            .recoveries
            .with_label_values(&[if recovered {
                "recovered"
            } else {
                "not_recovered"
            }])
            .inc();
        let since_offset = parse_offset(&since.offset);
        let last = frames.last().and_then(|(o, _)| *o).or(since_offset);
        let recovery = Recovery {
            recovered,
            epoch,
            offset: recovered.then(|| match last {
                Some((ms, seq)) => format!("{ms}-{seq}"),
                None => since.offset.clone(),
            }),
        };
        let lead = lead.then(|| {
            let mut f = json!({"type": "recovery", "channel": view.channel});
            recovery.fill(&mut f);
            Utf8Bytes::from(f.to_string())
        });
        // Recovered: every frame at or below `last` was replayed (or seen before). Not recovered: positions
        // may be of another epoch, so nothing held is judged by them.
        self.end_hold(conn, key, lead, frames, last.filter(|_| recovered));
        recovery
    }

    /// Read and render the missed frames: (recovered, epoch, frames).
    async fn missed_frames(
        &self,
        key: &str,
        view: &View,
        since: &StreamPos,
        max: usize,
    ) -> Result<(bool, Option<String>, Frames), ApiError> {
        if let Some(name) = key.strip_prefix("app:") {
            let m = self.broker.channel_missed(name, since, max).await?;
            let mut frames = Vec::with_capacity(m.entries.len());
            for entry in &m.entries {
                // As the live path: what is not JSON, or over the limit, is not forwarded.
                let Ok(data) = serde_json::from_str::<&serde_json::value::RawValue>(&entry.payload)
                else {
                    continue;
                };
                if data.get().len() > self.limits.max_publish_bytes {
                    continue;
                }
                let pos = StreamPos {
                    offset: entry.offset.clone(),
                    epoch: m.epoch.clone().unwrap_or_default(),
                };
                frames.push((
                    parse_offset(&entry.offset),
                    Utf8Bytes::from(render_message(view, data.get(), Some(&pos))),
                ));
            }
            return Ok((m.recovered, m.epoch, frames));
        }
        let m = if let Some(user) = key.strip_prefix("user:") {
            let (tenant, sub) = user.split_once('/').unwrap_or(("", user));
            let tenant = (!tenant.is_empty()).then_some(tenant);
            let keep = |e: &Event| e.owner.as_deref() == Some(sub) && e.tenant.as_deref() == tenant;
            self.broker
                .events_missed(EventScope::All, since, EVENT_SCAN, &keep)
                .await?
        } else if let Some(id) = key.strip_prefix("job:") {
            let id = JobId::parse(id)?;
            let Some(job) = self.broker.job(id).await? else {
                return Ok((false, None, Vec::new()));
            };
            let keep = |e: &Event| e.job == id;
            self.broker
                .events_missed(EventScope::Queue(&job.queue), since, EVENT_SCAN, &keep)
                .await?
        } else if let Some(q) = key.strip_prefix("queue:") {
            let q = QueueName::parse(q)?;
            let keep = |e: &Event| e.queue == q;
            self.broker
                .events_missed(EventScope::Queue(&q), since, EVENT_SCAN, &keep)
                .await?
        } else {
            return Ok((false, None, Vec::new()));
        };
        if !m.recovered || m.entries.len() > max {
            return Ok((false, m.epoch, Vec::new()));
        }
        let epoch = m.epoch.clone().unwrap_or_default();
        let frames = m
            .entries
            .iter()
            .map(|e| {
                let offset = event_offset(e).unwrap_or_default();
                let parsed = parse_offset(&offset);
                let pos = StreamPos {
                    offset,
                    epoch: epoch.clone(),
                };
                let payload = Payload::of(e, self.limits.max_publish_bytes);
                (
                    parsed,
                    Utf8Bytes::from(render_event(view, e, payload, Some(&pos))),
                )
            })
            .collect();
        Ok((true, m.epoch, frames))
    }

    /// Under the hub's lock: queue `lead`, the replayed frames, then the frames held since the subscription
    /// (those at or below `upto` dropped: they were replayed), and stop holding.
    fn end_hold(
        &self,
        conn: &Arc<ConnHandle>,
        key: &str,
        lead: Option<Utf8Bytes>,
        frames: Frames,
        upto: Option<(u64, u64)>,
    ) {
        let mut channels = self.lock();
        let Some(sub) = channels.get_mut(key).and_then(|s| s.get_mut(&conn.id)) else {
            // Unsubscribed (or closed) meanwhile: nothing to deliver.
            return;
        };
        let r = sub.recovery.get_or_insert_with(Box::default);
        let held = r.hold.take().unwrap_or_default();
        r.floor = upto;
        if upto.is_none() {
            sub.recovery = None;
        }
        let replayed = frames.into_iter().map(|(_, f)| f);
        let live = held
            .into_iter()
            .filter_map(|(offset, f)| match (offset, upto) {
                (Some(o), Some(u)) if o <= u => None,
                _ => Some(f),
            });
        for frame in lead.into_iter().chain(replayed).chain(live) {
            if !self.send(conn, frame) {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_is_checked_field_by_field() {
        let ok = parse_since(&json!({"since": {"offset": "17-2", "epoch": "e"}})).unwrap();
        assert_eq!(ok.unwrap().offset, "17-2");
        assert!(parse_since(&json!({})).unwrap().is_none());
        let field = |v: Value| match parse_since(&v) {
            Err(ApiError::BadRequest { errors, .. }) => errors[0].field.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(field(json!({"since": "17-2"})), "since");
        assert_eq!(
            field(json!({"since": {"offset": "x", "epoch": "e"}})),
            "since.offset"
        );
        assert_eq!(field(json!({"since": {"offset": "1-1"}})), "since.epoch");
        assert_eq!(
            field(json!({"since": {"offset": 5, "epoch": "e"}})),
            "since.offset"
        );
    }

    #[test]
    fn the_connect_url_needs_both() {
        assert!(since_from_query(Some("token=x")).unwrap().is_none());
        let s = since_from_query(Some("token=x&since_offset=5-0&since_epoch=ab"))
            .unwrap()
            .unwrap();
        assert_eq!((s.offset.as_str(), s.epoch.as_str()), ("5-0", "ab"));
        assert!(since_from_query(Some("since_offset=5-0")).is_err());
        assert!(since_from_query(Some("since_offset=five&since_epoch=ab")).is_err());
    }
}
