//! Conversions between script replies, stream entries, records and the domain types.

use ferry_core::{JobId, JobInfo, JobSpec, JobState, QueueName};
use redis::Value;
use serde_json::Value as Json;

use crate::BrokerError;

pub fn bad(what: impl std::fmt::Display) -> BrokerError {
    BrokerError::Internal(format!("unexpected reply from redis: {what}"))
}

pub fn text(v: &Value) -> Result<String, BrokerError> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).map_err(bad),
        Value::SimpleString(s) => Ok(s.clone()),
        Value::Int(i) => Ok(i.to_string()),
        Value::Okay => Ok("OK".into()),
        other => Err(bad(format!("{other:?}"))),
    }
}

pub fn int(v: &Value) -> Result<i64, BrokerError> {
    match v {
        Value::Int(i) => Ok(*i),
        other => text(other)?.parse().map_err(bad),
    }
}

pub fn array(v: &Value) -> Result<&[Value], BrokerError> {
    match v {
        Value::Array(a) | Value::Set(a) => Ok(a),
        Value::Nil => Ok(&[]),
        other => Err(bad(format!("{other:?}"))),
    }
}

/// The milliseconds part of a stream id.
pub fn id_ms(eid: &str) -> u64 {
    eid.split('-')
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// The fields of a job stream entry (or of a record's PACK).
#[derive(Debug, Default, Clone, serde::Deserialize)]
pub struct Fields {
    pub id: String,
    pub m: String,
    pub a: String,
    pub x: String,
    pub j: String,
    #[serde(default)]
    pub p: String,
    #[serde(default)]
    pub err: Option<String>,
    #[serde(default)]
    pub at: Option<String>,
}

impl Fields {
    /// From an XRANGE entry `[eid, [k, v, k, v, …]]`.
    pub fn from_entry(v: &Value) -> Result<(String, Self), BrokerError> {
        let e = array(v)?;
        let eid = text(e.first().ok_or_else(|| bad("empty entry"))?)?;
        let kv = array(e.get(1).ok_or_else(|| bad("entry without fields"))?)?;
        let mut f = Fields::default();
        for pair in kv.chunks(2) {
            let [k, val] = pair else { continue };
            let val = text(val)?;
            match text(k)?.as_str() {
                "id" => f.id = val,
                "m" => f.m = val,
                "a" => f.a = val,
                "x" => f.x = val,
                "j" => f.j = val,
                "p" => f.p = val,
                "err" => f.err = Some(val),
                "at" => f.at = Some(val),
                _ => {}
            }
        }
        Ok((eid, f))
    }

    pub fn spec(&self) -> Result<JobSpec, BrokerError> {
        serde_json::from_str(&self.j).map_err(|e| bad(format!("job spec: {e}")))
    }

    pub fn attempts(&self) -> u32 {
        self.a.parse().unwrap_or(0)
    }

    pub fn info(
        &self,
        queue: &QueueName,
        state: JobState,
        attempts: u32,
        updated_at: u64,
    ) -> Result<JobInfo, BrokerError> {
        Ok(JobInfo {
            id: JobId::parse(&self.id).map_err(bad)?,
            queue: queue.clone(),
            state,
            attempts,
            spec: self.spec()?,
            result: None,
            error: None,
            run_at: None,
            updated_at,
        })
    }
}

/// The `m` field: a JSON object with the job's routing facts, taken as is into every event by the scripts.
/// Queue and kind are validated to a JSON-safe alphabet; owner and tenant are escaped here.
pub fn meta(id: JobId, queue: &QueueName, spec: &JobSpec) -> String {
    format!(r#"{{"job":"{id}""#) + &meta_rest(queue, spec)
}

/// `m` after its leading `{"job":"<id>"`: what the enqueue script appends to the id it makes.
///
/// `pt` (the partition of the job's owner, [`crate::placement::partition_of`]) comes first, right after the
/// id, so the scripts find it with one anchored match per job (`emit` in `lua/prelude.lua` publishes a job's
/// events on its partition's channel). A job whose `m` has no `pt` was enqueued by an older ferry.
pub fn meta_rest(queue: &QueueName, spec: &JobSpec) -> String {
    let pt =
        crate::placement::partition_of(spec.tenant.as_deref(), spec.owner.as_deref().unwrap_or(""));
    let mut m = format!(r#","pt":{pt},"queue":"{queue}","kind":"{}""#, spec.kind);
    if let Some(o) = &spec.owner {
        m.push_str(",\"owner\":");
        m.push_str(&Json::String(o.clone()).to_string());
    }
    if let Some(t) = &spec.tenant {
        m.push_str(",\"tenant\":");
        m.push_str(&Json::String(t.clone()).to_string());
    }
    if let Some(c) = &spec.correlation_id {
        m.push_str(",\"corr\":");
        m.push_str(&Json::String(c.clone()).to_string());
    }
    m.push('}');
    m
}

/// The part of `n` UUIDv7 ids after their millisecond ("7xxx-yxxx-xxxxxxxxxxxx"): version, variant and 74
/// random bits, rising by one per id so that the ids a script makes from one millisecond keep input order.
pub fn id_tails(n: usize) -> Vec<String> {
    let rand_a: u16 = rand::random::<u16>() & 0x0fff;
    // 62 random bits with headroom below the top, so adding the index never carries out of rand_b.
    let base: u64 = rand::random::<u64>() & ((1u64 << 61) - 1);
    (0..n as u64)
        .map(|k| {
            let b = base + k;
            format!(
                "7{rand_a:03x}-{:04x}-{:012x}",
                0x8000 | ((b >> 48) & 0x3fff),
                b & 0xffff_ffff_ffff
            )
        })
        .collect()
}

/// The millisecond a UUIDv7 carries (its first 48 bits).
pub fn id_ms_of(id: JobId) -> u64 {
    let b = id.0.as_bytes();
    b[..6]
        .iter()
        .fold(0u64, |acc, x| (acc << 8) | u64::from(*x))
}

/// The routing facts of a job inside an event group.
#[derive(Debug, serde::Deserialize)]
struct Meta {
    job: JobId,
    queue: QueueName,
    kind: ferry_core::Kind,
    #[serde(default)]
    owner: Option<String>,
    #[serde(default)]
    tenant: Option<String>,
    #[serde(default)]
    corr: Option<String>,
}

/// One group of a packed event entry: events of one type from one script call.
#[derive(Debug, serde::Deserialize)]
struct Group {
    #[serde(rename = "type")]
    ty: ferry_core::EventType,
    state: JobState,
    at: u64,
    jobs: Vec<Meta>,
    attempts: Vec<u32>,
    #[serde(default)]
    data: Option<Vec<Json>>,
    /// The actor of the script call that wrote the group.
    #[serde(default)]
    by: Option<String>,
    /// Each event's actor is its job's owner (enqueue: one call may carry many submitters' jobs).
    #[serde(default)]
    byo: bool,
    /// Job specs, on the durable stream's `job.queued` / `job.scheduled` groups.
    #[serde(default)]
    specs: Option<Vec<JobSpec>>,
    /// The positions of the group's jobs among the call's events, when it holds only some of them (a
    /// partition's share of a call, published on the partition's channel).
    #[serde(default)]
    n: Option<Vec<usize>>,
}

/// Expand a packed entry (the JSON array of groups stored under `e`) into events with ids `<sid>/<n>`, n
/// counting across groups in order (or, for a group that says, its jobs' positions in the whole entry).
pub fn unpack_events(sid: &str, body: &str) -> Result<Vec<ferry_core::Event>, serde_json::Error> {
    let groups: Vec<Group> = serde_json::from_str(body)?;
    let mut out = Vec::new();
    for g in groups {
        let mut data = g.data.map(Vec::into_iter);
        let mut specs = g.specs.map(Vec::into_iter);
        let mut ns = g.n.map(Vec::into_iter);
        for (meta, attempt) in g.jobs.into_iter().zip(g.attempts) {
            let n = ns.as_mut().and_then(Iterator::next).unwrap_or(out.len());
            let actor = if g.byo {
                meta.owner.clone()
            } else {
                g.by.clone()
            };
            out.push(ferry_core::Event {
                id: format!("{sid}/{n}"),
                ty: g.ty,
                job: meta.job,
                queue: meta.queue,
                kind: meta.kind,
                state: g.state,
                attempt,
                at: g.at,
                owner: meta.owner,
                tenant: meta.tenant,
                data: data
                    .as_mut()
                    .and_then(Iterator::next)
                    .filter(|d| !d.is_null()),
                correlation_id: meta.corr,
                actor,
                spec: specs.as_mut().and_then(Iterator::next).map(Box::new),
            });
        }
    }
    Ok(out)
}

/// A record as stored in the jobs hash, decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Queued {
        p: usize,
        eid: String,
    },
    Waiting {
        retrying: bool,
        run_at: u64,
        attempts: u32,
        pack: String,
        error: Option<String>,
    },
    Completed {
        at: u64,
        attempts: u32,
        p: usize,
        eid: String,
        result: Json,
    },
    Cancelled {
        at: u64,
        attempts: u32,
        pack: String,
    },
    Dead {
        at: u64,
        attempts: u32,
        eid: String,
        error: String,
    },
}

impl Record {
    pub fn parse(s: &str) -> Result<Self, BrokerError> {
        let v: Vec<Json> =
            serde_json::from_str(s).map_err(|e| bad(format!("record {s:?}: {e}")))?;
        let u = |i: usize| v.get(i).and_then(Json::as_u64).unwrap_or(0);
        let st = |i: usize| v.get(i).and_then(Json::as_str).unwrap_or("").to_owned();
        Ok(match v.first().and_then(Json::as_str) {
            Some("q") => Record::Queued {
                p: u(1) as usize,
                eid: st(2),
            },
            Some(l @ ("s" | "r")) => Record::Waiting {
                retrying: l == "r",
                run_at: u(1),
                attempts: u(2) as u32,
                pack: st(3),
                error: v.get(4).and_then(Json::as_str).map(str::to_owned),
            },
            Some("c") => Record::Completed {
                at: u(1),
                attempts: u(2) as u32,
                p: u(3) as usize,
                eid: st(4),
                result: v.get(5).cloned().unwrap_or(Json::Null),
            },
            Some("x") => Record::Cancelled {
                at: u(1),
                attempts: u(2) as u32,
                pack: st(3),
            },
            Some("d") => Record::Dead {
                at: u(1),
                attempts: u(2) as u32,
                eid: st(3),
                error: st(4),
            },
            _ => return Err(bad(format!("record {s:?}"))),
        })
    }

    pub fn state_from_letter(letter: &str) -> JobState {
        match letter {
            "c" => JobState::Completed,
            "d" => JobState::Dead,
            "x" => JobState::Cancelled,
            "s" => JobState::Scheduled,
            "r" => JobState::Retrying,
            _ => JobState::Queued,
        }
    }
}

/// The record of a delayed job, written by the enqueue script as is.
pub fn scheduled_record(run_at: u64, fields: &Fields, p: usize) -> String {
    let pack = serde_json::json!({
        "id": fields.id, "m": fields.m, "a": fields.a, "x": fields.x, "j": fields.j, "p": p.to_string(),
    })
    .to_string();
    format!(r#"["s",{run_at},0,{},null]"#, Json::String(pack))
}

pub fn unpack(pack: &str) -> Result<Fields, BrokerError> {
    serde_json::from_str(pack).map_err(|e| bad(format!("pack: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let f = Fields {
            id: "i".into(),
            m: r#"{"job":"i"}"#.into(),
            a: "0".into(),
            x: "3".into(),
            j: r#"{"kind":"k"}"#.into(),
            ..Default::default()
        };
        let r = Record::parse(&scheduled_record(42, &f, 2)).unwrap();
        let Record::Waiting {
            run_at,
            pack,
            retrying,
            ..
        } = r
        else {
            panic!()
        };
        assert_eq!((run_at, retrying), (42, false));
        let back = unpack(&pack).unwrap();
        assert_eq!((back.j.as_str(), back.p.as_str()), (f.j.as_str(), "2"));
        assert_eq!(
            Record::parse(r#"["c",5,1,0,"1-0",{"ok":true}]"#).unwrap(),
            Record::Completed {
                at: 5,
                attempts: 1,
                p: 0,
                eid: "1-0".into(),
                result: serde_json::json!({"ok":true})
            }
        );
    }

    #[test]
    fn id_tails_make_rising_v7_ids() {
        let tails = id_tails(3);
        let ids: Vec<JobId> = tails
            .iter()
            .map(|t| JobId::parse(&format!("0191f2a3-4b5c-{t}")).unwrap())
            .collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(ids[0].0.get_version_num(), 7);
        assert_eq!(ids[0].0.get_variant(), uuid::Variant::RFC4122);
        assert_eq!(id_ms_of(ids[0]), 0x0191_f2a3_4b5c);
    }

    #[test]
    fn meta_escapes_owner() {
        let spec = ferry_core::NewJob::new(ferry_core::Kind::parse("k").unwrap(), Json::Null);
        let mut spec = spec.into_spec(1);
        spec.owner = Some("a\"b".into());
        let id = JobId::new();
        let m = meta(id, &QueueName::parse("q").unwrap(), &spec);
        let v: Json = serde_json::from_str(&m).unwrap();
        assert_eq!(v["owner"], "a\"b");
        assert_eq!(v["job"], id.to_string());
        // The partition right after the id, where the scripts' anchored match looks for it.
        let pt = crate::placement::partition_of(None, "a\"b");
        assert!(
            m.starts_with(&format!(r#"{{"job":"{id}","pt":{pt},"queue":"q""#)),
            "{m}"
        );
        spec.owner = None;
        spec.tenant = Some("t".into());
        let v: Json =
            serde_json::from_str(&meta(id, &QueueName::parse("q").unwrap(), &spec)).unwrap();
        assert_eq!(v["pt"], crate::placement::partition_of(Some("t"), ""));
    }
}

#[cfg(test)]
mod event_tests {
    use super::*;

    #[test]
    fn packed_groups_expand_in_order() {
        let id = JobId::new();
        let body = format!(
            r#"[{{"type":"job.completed","state":"completed","at":7,"jobs":[{{"job":"{id}","queue":"q","kind":"k"}}],"attempts":[1],"data":[{{"r":1}}]}},
               {{"type":"job.active","state":"active","at":8,"jobs":[{{"job":"{id}","queue":"q","kind":"k","owner":"o"}}],"attempts":[2]}}]"#
        );
        let evs = unpack_events("5-0", &body).unwrap();
        assert_eq!(evs.len(), 2);
        assert_eq!((evs[0].id.as_str(), evs[1].id.as_str()), ("5-0/0", "5-0/1"));
        assert_eq!(evs[0].data, Some(serde_json::json!({"r": 1})));
        assert_eq!(evs[1].data, None);
        assert_eq!(evs[1].owner.as_deref(), Some("o"));
        assert_eq!(evs[1].attempt, 2);
    }
}
