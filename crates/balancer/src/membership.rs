//! Reading the gateway membership from Redis, in the format `docs/architecture.md` documents: on the shard
//! [`ShardRing::shard_for`]`("ferry:gw")` picks, ZSET `ferry:gw` (node id → expiry, ms by Redis `TIME`) and HASH
//! `ferry:gw:info` (node id → [`NodeInfo`] JSON).
//!
//! [`fetch_members`] is the one place that knows the format; it stands in for `ferry_broker::Membership::members`
//! until that exists, and is then replaced by it.

use ferry_broker::placement::NodeInfo;
use ferry_broker::{RedisOptions, RedisTls, ShardRing};
use redis::aio::ConnectionManager;
use redis::{Client, TlsCertificates};

/// The membership ZSET: node id → expiry (ms since the epoch, Redis clock).
pub const MEMBERS_KEY: &str = "ferry:gw";
/// The membership HASH: node id → `NodeInfo` JSON.
pub const INFO_KEY: &str = "ferry:gw:info";

/// The live members' entries, read in one call so that "now" is the server's clock and the two keys agree.
const LIVE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')
if #ids == 0 then return {} end
return redis.call('HMGET', KEYS[2], unpack(ids))
";

/// The id the engine gives a shard (its URL without credentials, `rediss://` read as `redis://`), so that the
/// balancer finds the membership on the shard the gateways write it to.
fn ring_id(url: &str) -> String {
    let redacted = match url.split_once('@') {
        Some((scheme_creds, host)) => {
            let scheme = scheme_creds.split("://").next().unwrap_or("redis");
            format!("{scheme}://***@{host}")
        }
        None => url.to_owned(),
    };
    match redacted.strip_prefix("rediss://") {
        Some(rest) => format!("redis://{rest}"),
        None => redacted,
    }
}

/// Which of `urls` holds the membership.
pub fn membership_shard(urls: &[String]) -> usize {
    let ids: Vec<String> = urls.iter().map(|u| ring_id(u)).collect();
    ShardRing::with_ids(&ids).shard_for(MEMBERS_KEY)
}

/// The live members: entries whose expiry is not past, with their `NodeInfo`. An id without an info entry, or
/// with one that does not parse, is left out (logged at debug).
pub async fn fetch_members(
    conn: &mut impl redis::aio::ConnectionLike,
) -> redis::RedisResult<Vec<NodeInfo>> {
    let raw: Vec<Option<String>> = redis::Script::new(LIVE)
        .key(MEMBERS_KEY)
        .key(INFO_KEY)
        .invoke_async(conn)
        .await?;
    Ok(raw
        .into_iter()
        .flatten()
        .filter_map(|json| match serde_json::from_str::<NodeInfo>(&json) {
            Ok(n) => Some(n),
            Err(e) => {
                tracing::debug!(error = %e, "unreadable gateway entry in {INFO_KEY}");
                None
            }
        })
        .collect())
}

/// A connection to the membership's shard.
#[derive(Clone)]
pub struct MemberReader {
    conn: ConnectionManager,
    shard: String,
}

impl std::fmt::Debug for MemberReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemberReader")
            .field("shard", &self.shard)
            .finish()
    }
}

impl MemberReader {
    /// Connect to the shard of `urls` that holds the membership (every process of a cluster lists the same
    /// shards).
    pub async fn connect(
        urls: &[String],
        options: &RedisOptions,
        tls: &RedisTls,
    ) -> redis::RedisResult<Self> {
        let url = urls.get(membership_shard(urls)).ok_or_else(|| {
            redis::RedisError::from((redis::ErrorKind::InvalidClientConfig, "no Redis URL"))
        })?;
        let client = match &tls.ca_pem {
            Some(ca) if url.starts_with("rediss://") => Client::build_with_tls(
                url.as_str(),
                TlsCertificates {
                    client_tls: None,
                    root_cert: Some(ca.clone()),
                },
            )?,
            _ => Client::open(url.as_str())?,
        };
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_response_timeout(Some(options.response_timeout))
            .set_connection_timeout(Some(options.connection_timeout))
            .set_number_of_retries(1);
        let conn = ConnectionManager::new_with_config(client, config).await?;
        Ok(Self {
            conn,
            shard: ring_id(url),
        })
    }

    /// The shard read, without credentials.
    pub fn shard(&self) -> &str {
        &self.shard
    }

    pub async fn members(&self) -> redis::RedisResult<Vec<NodeInfo>> {
        fetch_members(&mut self.conn.clone()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shard_is_the_engines() {
        assert_eq!(ring_id("rediss://u:p@h:1/0"), "redis://***@h:1/0");
        assert_eq!(ring_id("redis://h:1"), "redis://h:1");
        let urls: Vec<String> = (0..5).map(|i| format!("redis://10.0.0.{i}:6379")).collect();
        let ids: Vec<String> = urls.clone();
        assert_eq!(
            membership_shard(&urls),
            ShardRing::with_ids(&ids).shard_for("ferry:gw")
        );
        assert_eq!(membership_shard(&urls[..1]), 0);
    }
}
