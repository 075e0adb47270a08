//! Recovery of missed channel messages: offsets, epochs and history reads.
//!
//! * Every shard has an epoch, the key `ferry:epoch` (`<prefix>epoch`, see [`Layout`]): a UUIDv7 set when absent (`SET NX`). A Redis that lost its
//!   data (FLUSHALL, a restart without persistence, a new server) has lost the key too and gets a new epoch, so
//!   a position from before the loss is never taken for one after it.
//! * Application channel `c` keeps its history in the stream `ferry:app:{c}:h` on the channel's shard: a publish
//!   is one script (`lua/publish.lua`) that appends (`XADD MAXLEN ~ size`), renews the stream's TTL and
//!   publishes `"<offset> <epoch> <payload>"` on `ferry:app2:{c}` (see [`super::pubsub`]).
//! * Job-event channels need no history of their own: the shard's event log `ferry:events` is one, and every
//!   published batch carries its entry id (`sid`), which is the offset.
//!
//! A read (an XRANGE, then `lua/missed.lua`) returns the epoch, Redis's clock, the stream's floor (the lowest position nothing
//! after which was trimmed or deleted: from `max-deleted-entry-id`, the first entry held and the last id
//! generated) and the entries after the position; the history reaches back iff the epoch is the same, the
//! position is at or above the floor, younger than the TTL, and the read was not cut by its bound. A position
//! just below the first entry held may have missed nothing and is still refused: the floor errs on the safe side.
//!
//! The epoch of each shard is also cached ([`Epochs`]) for the live frames of job events: refreshed when the job
//! event feed (re)connects to the shard and by every history read.

use std::sync::RwLock;
use std::time::Duration;

use redis::Value;

use super::codec::{array, bad, int, text};
use super::conn::Link;
use super::keys::Layout;
use crate::{BrokerError, StreamPos, parse_offset};

/// A fresh epoch, for `SET NX`.
pub(super) fn fresh_epoch() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// The last epoch read from each shard.
#[derive(Debug)]
pub(super) struct Epochs(Vec<RwLock<Option<String>>>);

impl Epochs {
    pub(super) fn new(shards: usize) -> Self {
        Self((0..shards).map(|_| RwLock::new(None)).collect())
    }

    pub(super) fn get(&self, shard: usize) -> Option<String> {
        self.0
            .get(shard)?
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(super) fn set(&self, shard: usize, epoch: String) {
        if let Some(slot) = self.0.get(shard) {
            *slot.write().unwrap_or_else(|p| p.into_inner()) = Some(epoch);
        }
    }
}

/// Read (or set) the epoch of a shard over `conn`; `key` is the shard's [`Layout::epoch`].
pub(super) async fn read_epoch<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    key: &str,
) -> redis::RedisResult<String> {
    let fresh = fresh_epoch();
    let old: Option<String> = redis::cmd("SET")
        .arg(key)
        .arg(&fresh)
        .arg("NX")
        .arg("GET")
        .query_async(conn)
        .await?;
    Ok(old.unwrap_or(fresh))
}

/// Read shard `shard`'s epoch over `conn` into `epochs`, bounded by `within`: what a job event feed does on
/// every (re)connect, so its live frames carry the epoch of the history they can be recovered from (a Redis
/// that lost its data has a new one). The error says what failed.
pub(super) async fn refresh_epoch(
    conn: &mut Link,
    layout: &Layout,
    shard: usize,
    epochs: &Epochs,
    within: std::time::Duration,
) -> Result<(), String> {
    let epoch = tokio::time::timeout(within, read_epoch(conn, layout.epoch())).await;
    match epoch {
        Ok(Ok(e)) => {
            epochs.set(shard, e);
            Ok(())
        }
        Ok(Err(e)) => Err(format!("reading the epoch: {e}")),
        Err(_) => Err("reading the epoch timed out".into()),
    }
}

/// A history read as `lua/missed.lua` answers it.
pub(super) struct Read<'a> {
    pub epoch: String,
    pub now_ms: u64,
    pub exists: bool,
    /// The lowest position the history reaches back to (see `lua/missed.lua`).
    pub floor: (u64, u64),
    pub entries: &'a Value,
}

/// A history read: the entries (XRANGE) and what `lua/missed.lua` said.
pub(super) fn parse_read<'a>(entries: &'a Value, meta: &Value) -> Result<Read<'a>, BrokerError> {
    let parts = array(meta)?;
    if parts.len() != 4 {
        return Err(bad("history read: unexpected reply"));
    }
    let floor = text(&parts[3])?;
    Ok(Read {
        epoch: text(&parts[0])?,
        now_ms: int(&parts[1])? as u64,
        exists: int(&parts[2])? == 1,
        floor: parse_offset(&floor)
            .ok_or_else(|| bad(format!("history read: bad floor {floor}")))?,
        entries,
    })
}

/// Whether a history read reaches back to `since` (the count bound is the caller's to check). `missing_ok`: a
/// stream that does not exist still reaches back (an application channel's history expires with its TTL; a
/// position younger than the TTL then missed nothing).
pub(super) fn reaches_back(
    read: &Read<'_>,
    since: &StreamPos,
    ttl: Duration,
    missing_ok: bool,
) -> bool {
    let Some(pos) = parse_offset(&since.offset) else {
        return false;
    };
    if read.epoch != since.epoch {
        return false;
    }
    if pos.0.saturating_add(ttl.as_millis() as u64) < read.now_ms {
        return false;
    }
    if !read.exists {
        return missing_ok;
    }
    pos >= read.floor
}

/// The entries of an application channel's history stream.
pub(super) fn app_entries(v: &Value) -> Result<Vec<crate::HistoryEntry>, BrokerError> {
    let mut out = Vec::new();
    for e in array(v)? {
        let e = array(e)?;
        let offset = text(e.first().ok_or_else(|| bad("history entry without id"))?)?;
        let fields = array(e.get(1).unwrap_or(&Value::Nil))?;
        let payload = fields
            .chunks(2)
            .find(|kv| kv.first().and_then(|k| text(k).ok()).as_deref() == Some("d"))
            .and_then(|kv| kv.get(1))
            .ok_or_else(|| bad(format!("history entry {offset} without data")))?;
        out.push(crate::HistoryEntry {
            offset,
            payload: text(payload)?,
        });
    }
    Ok(out)
}
