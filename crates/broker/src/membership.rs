//! The gateway membership: every gateway announces itself ([`NodeInfo`]) with a heartbeat that expires, so
//! gateways and balancers see the same live set and place clients with [`crate::placement::Placement`].
//!
//! Redis: `redis::members` (ZSET `ferry:gw`, HASH `ferry:gw:info`, one Lua call per heartbeat, on the shard
//! [`crate::ShardRing::shard_for`] picks for `"ferry:gw"`). Memory: an in-process map, so `ferry dev` shows
//! itself.

use std::time::Duration;

use async_trait::async_trait;

use crate::BrokerError;
use crate::placement::NodeInfo;

/// The key (and ring name) of the membership.
pub const MEMBERSHIP_KEY: &str = "ferry:gw";

/// A live member and how long ago its last heartbeat was, by the store's clock.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub info: NodeInfo,
    pub age_ms: u64,
}

/// Who is in the gateway tier now.
#[async_trait]
pub trait Membership: Send + Sync {
    /// Announce `info` (keyed by `info.id`) for `ttl`, drop members whose own ttl passed, and return every
    /// live member, this one included.
    async fn heartbeat_members(
        &self,
        info: &NodeInfo,
        ttl: Duration,
    ) -> Result<Vec<Member>, BrokerError>;

    /// Every live member, changing nothing.
    async fn live_members(&self) -> Result<Vec<Member>, BrokerError>;

    /// Remove `id` at once (the end of a gateway's shutdown).
    async fn leave(&self, id: &str) -> Result<(), BrokerError>;

    /// [`Membership::heartbeat_members`] without the ages.
    async fn heartbeat(
        &self,
        info: &NodeInfo,
        ttl: Duration,
    ) -> Result<Vec<NodeInfo>, BrokerError> {
        Ok(infos(self.heartbeat_members(info, ttl).await?))
    }

    /// [`Membership::live_members`] without the ages (what a balancer reads).
    async fn members(&self) -> Result<Vec<NodeInfo>, BrokerError> {
        Ok(infos(self.live_members().await?))
    }
}

fn infos(members: Vec<Member>) -> Vec<NodeInfo> {
    members.into_iter().map(|m| m.info).collect()
}

/// The longest ttl a heartbeat may ask for (a day): a typo must not leave a dead node listed for ever.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);

pub(crate) fn check_ttl(ttl: Duration) -> Result<u64, BrokerError> {
    let ms = ttl.as_millis();
    if ms == 0 || ttl > MAX_TTL {
        return Err(BrokerError::Internal(format!(
            "membership ttl must be between 1 ms and {} s, got {ms} ms",
            MAX_TTL.as_secs()
        )));
    }
    Ok(ms as u64)
}
