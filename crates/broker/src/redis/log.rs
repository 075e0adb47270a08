//! The durable event log as a consumer group reads it ([`EventLog::read_log`](crate::EventLog::read_log)): each
//! shard's `<prefix>events` stream, read with XREADGROUP, acknowledged with XACK, dead readers' entries taken
//! over with XAUTOCLAIM. The recorder is the group's user; the log's trimming (see `maintain`) keeps every
//! entry the group has not acknowledged, up to the hard cap `EngineConfig::event_stream_max`.

use std::time::Duration;

use redis::Value;

use super::codec::{self, array, bad, int, text};
use super::{Shard, redis_err};
use crate::{BrokerError, LogEntry, LogPosition};

/// Create `group` on the shard's log unless it is known to exist. A new group starts at the oldest entry held,
/// so nothing written before the first reader started is skipped.
async fn ensure_group(sh: &Shard, group: &str) -> Result<(), BrokerError> {
    if sh.log_groups.lock().is_ok_and(|g| g.contains(group)) {
        return Ok(());
    }
    let r: redis::RedisResult<Value> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(sh.layout.events())
        .arg(group)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut sh.conn.clone())
        .await;
    match r {
        Ok(_) => {}
        Err(e) if e.code() == Some("BUSYGROUP") => {}
        Err(e) => return Err(redis_err(e)),
    }
    if let Ok(mut g) = sh.log_groups.lock() {
        g.insert(group.to_owned());
    }
    Ok(())
}

/// Forget that `group` exists (the shard lost it: a restart without persistence), so the next read makes it.
fn forget_group(sh: &Shard, group: &str) {
    if let Ok(mut g) = sh.log_groups.lock() {
        g.remove(group);
    }
}

fn is_nogroup(e: &BrokerError) -> bool {
    matches!(e, BrokerError::Internal(m) | BrokerError::Unavailable(m) if m.contains("NOGROUP"))
}

pub(super) async fn read(
    sh: &Shard,
    shard: usize,
    group: &str,
    consumer: &str,
    max: usize,
    wait: Duration,
    reclaim_idle: Option<Duration>,
) -> Result<Vec<LogEntry>, BrokerError> {
    ensure_group(sh, group).await?;
    let r = read_once(sh, shard, group, consumer, max, wait, reclaim_idle).await;
    match r {
        Err(e) if is_nogroup(&e) => {
            forget_group(sh, group);
            ensure_group(sh, group).await?;
            read_once(sh, shard, group, consumer, max, wait, reclaim_idle).await
        }
        other => other,
    }
}

async fn read_once(
    sh: &Shard,
    shard: usize,
    group: &str,
    consumer: &str,
    max: usize,
    wait: Duration,
    reclaim_idle: Option<Duration>,
) -> Result<Vec<LogEntry>, BrokerError> {
    let max = max.max(1);
    if let Some(idle) = reclaim_idle {
        // XAUTOCLAIM replies [next cursor, [entries], [ids of entries deleted meanwhile]].
        let v: Value = redis::cmd("XAUTOCLAIM")
            .arg(sh.layout.events())
            .arg(group)
            .arg(consumer)
            .arg(idle.as_millis() as u64)
            .arg("0-0")
            .arg("COUNT")
            .arg(max)
            .query_async(&mut sh.conn.clone())
            .await
            .map_err(redis_err)?;
        let parts = array(&v)?;
        if let Some(gone) = parts.get(2)
            && !array(gone)?.is_empty()
        {
            let gone = array(gone)?.len();
            tracing::error!(shard = %sh.name, group, entries = gone,
                "event log entries were trimmed before the group acknowledged them (the log passed its hard cap)");
            // Acknowledge the gone ids so they stop being reported.
            let ids: Vec<String> = array(&parts[2])?
                .iter()
                .map(text)
                .collect::<Result<_, _>>()?;
            let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
            ack(sh, group, &refs).await?;
        }
        let entries = parse_entries(shard, parts.get(1).unwrap_or(&Value::Nil))?;
        if !entries.is_empty() {
            tracing::info!(shard = %sh.name, group, consumer, entries = entries.len(),
                "took over event log entries a dead reader left unacknowledged");
            return Ok(entries);
        }
    }
    let mut cmd = redis::cmd("XREADGROUP");
    cmd.arg("GROUP")
        .arg(group)
        .arg(consumer)
        .arg("COUNT")
        .arg(max);
    let v: Value = if wait.is_zero() {
        cmd.arg("STREAMS").arg(sh.layout.events()).arg(">");
        cmd.query_async(&mut sh.conn.clone())
            .await
            .map_err(redis_err)?
    } else {
        cmd.arg("BLOCK")
            .arg(wait.as_millis().max(1) as u64)
            .arg("STREAMS")
            .arg(sh.layout.events())
            .arg(">");
        let mut conn = sh.blocking_conn().await?;
        // If the guard fires, entries this read was handed stay pending in the group: another read with
        // `reclaim_idle` takes them over, so nothing is lost.
        match tokio::time::timeout(wait + Duration::from_secs(2), cmd.query_async(&mut conn)).await
        {
            Ok(Ok(v)) => {
                sh.return_blocking(conn);
                v
            }
            Ok(Err(e)) => return Err(redis_err(e)),
            Err(_) => {
                return Err(BrokerError::Unavailable(format!(
                    "{}: blocking read timed out",
                    sh.name
                )));
            }
        }
    };
    // [[stream, [entries]]] or nil when the wait ran out.
    match array(&v)?.first() {
        Some(s) => parse_entries(shard, array(s)?.get(1).unwrap_or(&Value::Nil)),
        None => Ok(Vec::new()),
    }
}

/// `[[sid, [field, value, ...]], ...]` → log entries. A deleted entry reads as `[sid, nil]` and is skipped.
pub(super) fn parse_entries(shard: usize, v: &Value) -> Result<Vec<LogEntry>, BrokerError> {
    let mut out = Vec::new();
    for e in array(v)? {
        let e = array(e)?;
        let sid = text(e.first().ok_or_else(|| bad("log entry without id"))?)?;
        let fields = array(e.get(1).unwrap_or(&Value::Nil))?;
        let body = fields
            .chunks(2)
            .find(|kv| kv.first().and_then(|k| text(k).ok()).as_deref() == Some("e"))
            .and_then(|kv| kv.get(1));
        let (events, bytes) = match body {
            Some(b) => {
                let body = text(b)?;
                let events = codec::unpack_events(&sid, &body)
                    .map_err(|e| bad(format!("event log entry {sid}: {e}")))?;
                (events, body.len())
            }
            None => (Vec::new(), 0),
        };
        out.push(LogEntry {
            position: LogPosition { shard, sid },
            events,
            bytes,
        });
    }
    Ok(out)
}

pub(super) async fn ack(sh: &Shard, group: &str, ids: &[&str]) -> Result<(), BrokerError> {
    for chunk in ids.chunks(1000) {
        let _: i64 = redis::cmd("XACK")
            .arg(sh.layout.events())
            .arg(group)
            .arg(chunk)
            .query_async(&mut sh.conn.clone())
            .await
            .map_err(redis_err)?;
    }
    Ok(())
}

/// Entries of the shard's log the group has not acknowledged: never delivered (`lag`) plus pending. Redis
/// cannot always know the lag (after some deletions it reports nil); then the whole length is the bound.
pub(super) async fn backlog(sh: &Shard, group: &str) -> Result<u64, BrokerError> {
    let mut pipe = redis::pipe();
    pipe.cmd("XINFO")
        .arg("GROUPS")
        .arg(sh.layout.events())
        .cmd("XLEN")
        .arg(sh.layout.events());
    let r: redis::RedisResult<(Value, i64)> = pipe.query_async(&mut sh.conn.clone()).await;
    let (groups, len) = match r {
        Ok(v) => v,
        // No stream yet: nothing written, nothing behind.
        Err(e) if e.to_string().contains("no such key") => return Ok(0),
        Err(e) => return Err(redis_err(e)),
    };
    for g in array(&groups)? {
        let kv = array(g)?;
        let field = |name: &str| {
            kv.chunks(2)
                .find(|c| c.first().and_then(|k| text(k).ok()).as_deref() == Some(name))
                .and_then(|c| c.get(1))
        };
        if field("name").map(text).transpose()?.as_deref() != Some(group) {
            continue;
        }
        let pending = field("pending").map(int).transpose()?.unwrap_or(0).max(0) as u64;
        let lag = match field("lag") {
            Some(Value::Nil) | None => len.max(0) as u64,
            Some(v) => int(v)?.max(0) as u64,
        };
        return Ok(lag + pending);
    }
    Ok(0)
}

/// The oldest entry id the group still needs (its first pending entry, else the one after the last it was
/// handed), or `None` when the group does not exist: trimming below it loses nothing the group has not
/// acknowledged.
pub(super) async fn group_floor(sh: &Shard, group: &str) -> Result<Option<String>, BrokerError> {
    let r: redis::RedisResult<Value> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(sh.layout.events())
        .query_async(&mut sh.conn.clone())
        .await;
    let groups = match r {
        Ok(v) => v,
        Err(e) if e.to_string().contains("no such key") => return Ok(None),
        Err(e) => return Err(redis_err(e)),
    };
    let mut last = None;
    for g in array(&groups)? {
        let kv = array(g)?;
        let get = |name: &str| {
            kv.chunks(2)
                .find(|c| c.first().and_then(|k| text(k).ok()).as_deref() == Some(name))
                .and_then(|c| c.get(1))
                .and_then(|v| text(v).ok())
        };
        if get("name").as_deref() == Some(group) {
            last = get("last-delivered-id");
        }
    }
    let Some(last) = last else { return Ok(None) };
    // XPENDING summary: [count, min id, max id, consumers].
    let pending: Value = redis::cmd("XPENDING")
        .arg(sh.layout.events())
        .arg(group)
        .query_async(&mut sh.conn.clone())
        .await
        .map_err(redis_err)?;
    let p = array(&pending)?;
    if p.first().map(int).transpose()?.unwrap_or(0) > 0
        && let Some(min) = p.get(1)
    {
        return Ok(Some(text(min)?));
    }
    let (ms, seq) = last.split_once('-').unwrap_or((&last, "0"));
    let seq: u64 = seq.parse().unwrap_or(0);
    Ok(Some(format!("{ms}-{}", seq + 1)))
}
