//! The gateway membership on Redis ([`Membership`]): ZSET `ferry:gw` (node id → expiry in ms by the server's
//! `TIME`) and HASH `ferry:gw:info` (node id → [`NodeInfo`] JSON, with `heartbeat_ms` spliced in), on the shard
//! the ring picks for `"ferry:gw"`. A heartbeat is one call of `lua/members.lua`: it refreshes the node's
//! entry, drops expired members from both keys and returns the live ones. Expiry is judged by the server's
//! clock alone, so gateways whose clocks disagree still agree on who is live.

use std::time::Duration;

use async_trait::async_trait;
use redis::Value;

use super::scripts::{Loaded, Members};
use super::{RedisBroker, redis_err};
use crate::BrokerError;
use crate::membership::{MEMBERSHIP_KEY, Member, Membership, check_ttl};
use crate::placement::NodeInfo;

/// The stored form: [`NodeInfo`] plus the server's time of its last heartbeat.
#[derive(serde::Deserialize)]
struct Stored {
    #[serde(default)]
    heartbeat_ms: u64,
    #[serde(flatten)]
    info: NodeInfo,
}

impl RedisBroker {
    /// One call of the script; `node_id`, `node_info` and `ttl_ms` empty (0) where `op` does not use them.
    async fn members_call(
        &self,
        op: &str,
        node_id: &str,
        node_info: &str,
        ttl_ms: u64,
    ) -> Result<Value, BrokerError> {
        let shard = &self.shards[self.ring.shard_for(MEMBERSHIP_KEY)];
        let (members_key, info_key) = shard.layout.members();
        Members {
            members_key: &members_key,
            info_key: &info_key,
            op,
            node_id,
            node_info,
            ttl_ms,
        }
        .invoke(&self.scripts)
        .invoke_async(&mut shard.conn.clone())
        .await
        .map_err(redis_err)
    }
}

fn parse(v: Value) -> Result<Vec<Member>, BrokerError> {
    let bad = |m: &str| BrokerError::Internal(format!("membership script: {m}"));
    let Value::Array(items) = v else {
        return Err(bad("not an array"));
    };
    let mut items = items.into_iter();
    let now = match items.next() {
        Some(Value::Int(n)) => n.max(0) as u64,
        _ => return Err(bad("no time")),
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let text = match item {
            Value::BulkString(b) => b,
            _ => return Err(bad("a member is not a string")),
        };
        // Another version's entry that this one cannot read is skipped rather than failing everyone.
        match serde_json::from_slice::<Stored>(&text) {
            Ok(s) => out.push(Member {
                age_ms: now.saturating_sub(s.heartbeat_ms),
                info: s.info,
            }),
            Err(e) => tracing::warn!(error = %e, "unreadable membership entry skipped"),
        }
    }
    Ok(out)
}

#[async_trait]
impl Membership for RedisBroker {
    async fn heartbeat_members(
        &self,
        info: &NodeInfo,
        ttl: Duration,
    ) -> Result<Vec<Member>, BrokerError> {
        let ttl = check_ttl(ttl)?;
        let json = serde_json::to_string(info).map_err(|e| BrokerError::Internal(e.to_string()))?;
        parse(self.members_call("beat", &info.id, &json, ttl).await?)
    }

    async fn live_members(&self) -> Result<Vec<Member>, BrokerError> {
        parse(self.members_call("list", "", "", 0).await?)
    }

    async fn leave(&self, id: &str) -> Result<(), BrokerError> {
        self.members_call("leave", id, "", 0).await?;
        Ok(())
    }
}
