//! The controllable job event feed ([`EventFeed::job_feed`]): job events of the topics a node watches.
//!
//! Every script call publishes its events (see `lua/prelude.lua`, `emit`) on
//!
//! * `ferry:ev:p:<N>` per partition N of its jobs' owners ([`crate::placement::partition_of`]), with only that
//!   partition's jobs;
//! * `ferry:ev:q:{<queue>}` once, with all of them;
//! * `ferry:events` ([`Layout::events`]), with the jobs whose `m` carries no partition (enqueued by an older
//!   ferry).
//!
//! (The names of a standalone Redis; a shard of another [`Layout`] puts its prefix in place of `ferry:`.)
//!
//! [`Topic::Partition`] and [`Topic::Legacy`] are subscribed on every shard (any queue can hold a subject's
//! jobs), [`Topic::Queue`] on the queue's shard only, each by the shard's task of [`super::subscriber`]
//! (reconnects, resubscription, PING; events published while a shard is disconnected are lost). Every
//! (re)connect also reads that shard's epoch.
//!
//! [`EventFeed::job_feed`]: crate::EventFeed::job_feed

use std::collections::HashSet;

use redis::Client;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;

use super::conn::Link;
use super::history::{Epochs, refresh_epoch};
use super::keys::Layout;
use super::parse_published;
use super::subscriber::{COMMAND_TIMEOUT, Command, FEED_CAPACITY, Subscriptions, run_shard};
use crate::{
    BrokerError, Confirmation, FedEvent, JobFeed, JobFeedControl, ShardRing, Topic, TopicControl,
    Via,
};
use ferry_core::QueueName;

/// The pattern of a shard's partition channels (`ferry:ev:p:*`).
pub(super) fn partition_pattern(layout: &Layout) -> String {
    format!("{}ev:p:*", layout.prefix())
}

/// The Redis channel carrying `topic` on a shard of `layout`.
pub(super) fn redis_channel(layout: &Layout, topic: &Topic) -> String {
    match topic {
        Topic::Partition(n) => format!("{}ev:p:{n}", layout.prefix()),
        Topic::Queue(q) => format!("{}ev:q:{{{q}}}", layout.prefix()),
        Topic::Legacy => layout.events().to_owned(),
    }
}

/// The topic a Redis channel of a shard of `layout` carries, and what its events are for.
fn topic_of(layout: &Layout, channel: &str) -> Option<(Topic, Via)> {
    if channel == layout.events() {
        return Some((Topic::Legacy, Via::Owner));
    }
    let rest = channel.strip_prefix(layout.prefix())?;
    if let Some(n) = rest.strip_prefix("ev:p:") {
        return Some((Topic::Partition(n.parse().ok()?), Via::Owner));
    }
    let q = rest.strip_prefix("ev:q:{")?.strip_suffix('}')?;
    Some((Topic::Queue(QueueName::parse(q).ok()?), Via::Queue))
}

/// Routes commands to the task of every shard (partitions, legacy) or of the queue's shard.
#[derive(Debug)]
struct RedisTopics {
    ring: ShardRing,
    shards: Vec<mpsc::UnboundedSender<Command<Topic>>>,
}

fn stopped() -> BrokerError {
    BrokerError::Unavailable("the job event feed has stopped".into())
}

impl RedisTopics {
    fn shards_of(&self, topic: &Topic) -> Vec<&mpsc::UnboundedSender<Command<Topic>>> {
        match topic {
            Topic::Queue(q) => vec![&self.shards[self.ring.shard_for(q.as_str())]],
            Topic::Partition(_) | Topic::Legacy => self.shards.iter().collect(),
        }
    }
}

impl TopicControl for RedisTopics {
    fn watch(&self, topic: &Topic) -> Confirmation {
        let mut acks = Vec::new();
        for shard in self.shards_of(topic) {
            let (tx, rx) = oneshot::channel();
            if shard.send(Command::Add(topic.clone(), tx)).is_err() {
                return Box::pin(async { Err(stopped()) });
            }
            acks.push(rx);
        }
        Box::pin(async move {
            for r in futures::future::join_all(acks).await {
                r.unwrap_or_else(|_| Err(stopped()))?;
            }
            Ok(())
        })
    }

    fn unwatch(&self, topic: &Topic) {
        for shard in self.shards_of(topic) {
            // A stopped task holds no subscription: nothing to undo.
            let _ = shard.send(Command::Remove(topic.clone()));
        }
    }
}

/// Start a feed: one task per shard (`(name without credentials, client, layout)`, in ring order).
///
/// Every (re)connect of a shard also reads that shard's epoch into `epochs`, so the live frames of its job
/// events carry the epoch of the history they can be recovered from (a Redis that lost its data has a new one).
pub(super) fn feed(
    shards: Vec<(String, Client, Layout)>,
    ring: ShardRing,
    epochs: std::sync::Arc<Epochs>,
) -> JobFeed {
    let (out, rx) = mpsc::channel(FEED_CAPACITY);
    let mut commands = Vec::with_capacity(shards.len());
    for (shard, (name, client, layout)) in shards.into_iter().enumerate() {
        let (tx, cmds) = mpsc::unbounded_channel();
        commands.push(tx);
        let subs = TopicSubscriptions {
            shard,
            layout,
            epochs: epochs.clone(),
        };
        tokio::spawn(run_shard(subs, name, client, cmds, out.clone()));
    }
    let control = JobFeedControl::new(std::sync::Arc::new(RedisTopics {
        ring,
        shards: commands,
    }));
    JobFeed::new(control, Box::pin(ReceiverStream::new(rx)))
}

/// Start a feed on a Redis Cluster: one task for every virtual shard (`tags`, in ring order), see
/// [`super::cluster_feed`].
pub(super) fn cluster_feed(
    tags: &[String],
    seeds: super::cluster_feed::Seeds,
    ring: ShardRing,
    epochs: std::sync::Arc<Epochs>,
) -> JobFeed {
    let subs = tags
        .iter()
        .enumerate()
        .map(|(shard, tag)| TopicSubscriptions {
            shard,
            layout: Layout::tagged(tag),
            epochs: epochs.clone(),
        })
        .collect();
    let (commands, rx) = super::cluster_feed::start(subs, tags, seeds);
    let control = JobFeedControl::new(std::sync::Arc::new(RedisTopics {
        ring,
        shards: commands,
    }));
    JobFeed::new(control, Box::pin(ReceiverStream::new(rx)))
}

/// The job event topics of one shard.
struct TopicSubscriptions {
    shard: usize,
    layout: Layout,
    epochs: std::sync::Arc<Epochs>,
}

impl Subscriptions for TopicSubscriptions {
    type Key = Topic;
    type Out = FedEvent;
    const WHAT: &'static str = "job event feed";

    fn channels(&self, topic: &Topic) -> Vec<String> {
        vec![redis_channel(&self.layout, topic)]
    }

    /// Reads the shard's epoch, so the live frames of its job events carry the epoch of the history they can
    /// be recovered from.
    async fn on_connect(&self, conn: &mut Link) -> Result<(), String> {
        refresh_epoch(
            conn,
            &self.layout,
            self.shard,
            &self.epochs,
            COMMAND_TIMEOUT,
        )
        .await
    }

    fn deliver(&self, channel: &str, payload: String, wanted: &HashSet<Topic>) -> Vec<FedEvent> {
        match topic_of(&self.layout, channel).filter(|(t, _)| wanted.contains(t)) {
            Some((_, via)) => parse_published(&payload)
                .into_iter()
                .map(|event| FedEvent { via, event })
                .collect(),
            None => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_round_trip() {
        let q = QueueName::parse("acme:mail").unwrap();
        for layout in [Layout::standalone(), Layout::tagged("f3")] {
            for (t, via) in [
                (Topic::Partition(0), Via::Owner),
                (Topic::Partition(1023), Via::Owner),
                (Topic::Queue(q.clone()), Via::Queue),
                (Topic::Legacy, Via::Owner),
            ] {
                assert_eq!(
                    topic_of(&layout, &redis_channel(&layout, &t)),
                    Some((t, via))
                );
            }
            assert_eq!(topic_of(&layout, "ferry:app:{x}"), None);
            assert_eq!(topic_of(&layout, "ferry:ev:p:x"), None);
        }
        let standalone = Layout::standalone();
        assert_eq!(
            redis_channel(&standalone, &Topic::Partition(7)),
            "ferry:ev:p:7"
        );
        assert_eq!(
            redis_channel(
                &standalone,
                &Topic::Queue(QueueName::parse("mail").unwrap())
            ),
            "ferry:ev:q:{mail}"
        );
        assert_eq!(partition_pattern(&standalone), "ferry:ev:p:*");
        // A tagged shard's channels lie in its tag's slot, as sharded pub/sub from its scripts needs.
        let tagged = Layout::tagged("f3");
        assert_eq!(
            redis_channel(&tagged, &Topic::Partition(7)),
            "ferry:{f3}:ev:p:7"
        );
        assert_eq!(topic_of(&tagged, "ferry:ev:p:7"), None);
        assert_eq!(topic_of(&standalone, "ferry:{f3}:ev:p:7"), None);
    }
}
