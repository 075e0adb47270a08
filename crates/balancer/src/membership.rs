//! Reading the gateway membership: the balancer holds a [`RedisBroker`] only to call
//! [`Membership::members`], so the membership's format (`ferry:gw`, `ferry:gw:info`) and the shard that holds
//! it are known in one place, `ferry_broker::redis::members`, for gateways and balancers alike.

use std::sync::Arc;

use ferry_broker::placement::NodeInfo;
use ferry_broker::{BrokerError, EngineConfig, Membership, RedisBroker, RedisOptions, RedisTls};

/// A handle on the membership.
#[derive(Clone)]
pub struct MemberReader {
    broker: Arc<RedisBroker>,
}

impl std::fmt::Debug for MemberReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemberReader").finish_non_exhaustive()
    }
}

impl MemberReader {
    /// Connect to the shards of `urls` (every process of a cluster lists the same shards, so the membership is
    /// on the same one for all).
    pub async fn connect(
        urls: &[String],
        options: &RedisOptions,
        tls: &RedisTls,
    ) -> Result<Self, BrokerError> {
        let broker = RedisBroker::connect_with_tls(
            urls,
            EngineConfig::default(),
            options.clone(),
            tls.clone(),
        )
        .await?;
        Ok(Self {
            broker: Arc::new(broker),
        })
    }

    /// The live gateways.
    pub async fn members(&self) -> Result<Vec<NodeInfo>, BrokerError> {
        self.broker.members().await
    }
}
