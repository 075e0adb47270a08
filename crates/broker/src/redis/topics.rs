//! The controllable job event feed ([`Broker::job_feed`]): job events of the topics a node watches.
//!
//! Every script call publishes its events (see `lua/prelude.lua`, `emit`) on
//!
//! * `ferry:ev:p:<N>` per partition N of its jobs' owners ([`crate::placement::partition_of`]), with only that
//!   partition's jobs;
//! * `ferry:ev:q:{<queue>}` once, with all of them;
//! * `ferry:events` ([`EVENTS`]), with the jobs whose `m` carries no partition (enqueued by an older ferry).
//!
//! [`Topic::Partition`] and [`Topic::Legacy`] are subscribed on every shard (any queue can hold a subject's
//! jobs), [`Topic::Queue`] on the queue's shard only. As in [`super::pubsub`], each shard has one task with one
//! dedicated pub/sub connection that owns the set of watched topics: when the connection drops (the message
//! stream ends, a command fails, or a periodic PING goes unanswered) it reconnects with capped backoff and
//! subscribes the whole set again. Events published meanwhile are lost (pub/sub is at most once).
//!
//! The task ends when the feed (its event receiver, or every control handle) is dropped.
//!
//! [`Broker::job_feed`]: crate::Broker::job_feed

use std::collections::HashSet;
use std::time::Duration;

use futures::StreamExt;
use redis::Client;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;

use super::history::{Epochs, refresh_epoch};
use super::keys::EVENTS;
use super::parse_published;
use crate::{
    BrokerError, Confirmation, FedEvent, JobFeed, JobFeedControl, ShardRing, Topic, TopicControl,
    Via,
};
use ferry_core::QueueName;

/// Events buffered between the shard tasks and the feed's reader; a reader this far behind makes the shard
/// tasks wait (the redis crate buffers behind them).
const FEED_CAPACITY: usize = 4096;

/// Longest wait for a connection, a (un)subscribe confirmation or a PING reply.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// How often an idle pub/sub connection is checked with a PING.
const PING_EVERY: Duration = Duration::from_secs(10);

const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The prefix of the partition channels (`ferry:ev:p:<N>`).
pub(super) const PARTITION_PREFIX: &str = "ferry:ev:p:";

/// The Redis channel carrying `topic`.
pub(super) fn redis_channel(topic: &Topic) -> String {
    match topic {
        Topic::Partition(n) => format!("{PARTITION_PREFIX}{n}"),
        Topic::Queue(q) => format!("ferry:ev:q:{{{q}}}"),
        Topic::Legacy => EVENTS.to_owned(),
    }
}

/// The topic a Redis channel carries, and what its events are for.
fn topic_of(channel: &str) -> Option<(Topic, Via)> {
    if channel == EVENTS {
        return Some((Topic::Legacy, Via::Owner));
    }
    if let Some(n) = channel.strip_prefix(PARTITION_PREFIX) {
        return Some((Topic::Partition(n.parse().ok()?), Via::Owner));
    }
    let q = channel.strip_prefix("ferry:ev:q:{")?.strip_suffix('}')?;
    Some((Topic::Queue(QueueName::parse(q).ok()?), Via::Queue))
}

enum Command {
    Watch(Topic, oneshot::Sender<Result<(), BrokerError>>),
    Unwatch(Topic),
}

/// Routes commands to the task of every shard (partitions, legacy) or of the queue's shard.
#[derive(Debug)]
struct RedisTopics {
    ring: ShardRing,
    shards: Vec<mpsc::UnboundedSender<Command>>,
}

fn stopped() -> BrokerError {
    BrokerError::Unavailable("the job event feed has stopped".into())
}

impl RedisTopics {
    fn shards_of(&self, topic: &Topic) -> Vec<&mpsc::UnboundedSender<Command>> {
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
            if shard.send(Command::Watch(topic.clone(), tx)).is_err() {
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
            let _ = shard.send(Command::Unwatch(topic.clone()));
        }
    }
}

/// Start a feed: one task per shard (`(name without credentials, client)`, in ring order).
///
/// Every (re)connect of a shard also reads that shard's epoch into `epochs`, so the live frames of its job
/// events carry the epoch of the history they can be recovered from (a Redis that lost its data has a new one).
pub(super) fn feed(
    shards: Vec<(String, Client)>,
    ring: ShardRing,
    epochs: std::sync::Arc<Epochs>,
) -> JobFeed {
    let (out, rx) = mpsc::channel(FEED_CAPACITY);
    let mut commands = Vec::with_capacity(shards.len());
    for (shard, (name, client)) in shards.into_iter().enumerate() {
        let (tx, cmds) = mpsc::unbounded_channel();
        commands.push(tx);
        tokio::spawn(run_shard(
            name,
            client,
            cmds,
            out.clone(),
            shard,
            epochs.clone(),
        ));
    }
    let control = JobFeedControl::new(std::sync::Arc::new(RedisTopics {
        ring,
        shards: commands,
    }));
    JobFeed::new(control, Box::pin(ReceiverStream::new(rx)))
}

/// Why a connected session ended.
enum End {
    /// The feed was dropped: stop for good.
    Stop,
    /// The connection failed: reconnect and resubscribe.
    Lost(String),
}

async fn run_shard(
    name: String,
    client: Client,
    mut cmds: mpsc::UnboundedReceiver<Command>,
    out: mpsc::Sender<FedEvent>,
    shard: usize,
    epochs: std::sync::Arc<Epochs>,
) {
    let mut wanted: HashSet<Topic> = HashSet::new();
    let mut backoff = Duration::from_millis(100);
    let mut reconnecting = false;
    loop {
        let at = (shard, &*epochs);
        match session(
            &client,
            &mut wanted,
            &mut cmds,
            &out,
            reconnecting,
            &name,
            at,
        )
        .await
        {
            End::Stop => return,
            End::Lost(why) => {
                tracing::warn!(shard = %name, error = %why, "job event feed disconnected, reconnecting");
                reconnecting = true;
            }
        }
        // Keep taking commands while waiting, so callers are answered (watch: unavailable, but remembered and
        // subscribed on reconnect) instead of hanging.
        let wake = tokio::time::sleep(backoff);
        tokio::pin!(wake);
        loop {
            tokio::select! {
                _ = &mut wake => break,
                _ = out.closed() => return,
                cmd = cmds.recv() => match cmd {
                    None => return,
                    Some(Command::Watch(t, ack)) => {
                        wanted.insert(t);
                        let _ = ack.send(Err(BrokerError::Unavailable(format!("{name}: reconnecting"))));
                    }
                    Some(Command::Unwatch(t)) => {
                        wanted.remove(&t);
                    }
                },
            }
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One connection's life: connect, subscribe everything watched, then serve commands and events until the
/// connection fails or the feed is dropped.
async fn session(
    client: &Client,
    wanted: &mut HashSet<Topic>,
    cmds: &mut mpsc::UnboundedReceiver<Command>,
    out: &mpsc::Sender<FedEvent>,
    reconnecting: bool,
    name: &str,
    (shard, epochs): (usize, &Epochs),
) -> End {
    let lost = |e: &dyn std::fmt::Display| End::Lost(e.to_string());
    let ps = match tokio::time::timeout(COMMAND_TIMEOUT, client.get_async_pubsub()).await {
        Ok(Ok(ps)) => ps,
        Ok(Err(e)) => return lost(&e),
        Err(_) => return End::Lost("connect timed out".into()),
    };
    if let Err(why) = refresh_epoch(client, shard, epochs, COMMAND_TIMEOUT).await {
        return End::Lost(why);
    }
    let (mut sink, mut stream) = ps.split();
    if !wanted.is_empty() {
        let all: Vec<String> = wanted.iter().map(redis_channel).collect();
        match tokio::time::timeout(COMMAND_TIMEOUT, sink.subscribe(&all)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return lost(&e),
            Err(_) => return End::Lost("resubscribe timed out".into()),
        }
    }
    if reconnecting {
        tracing::info!(shard = %name, topics = wanted.len(), "job event feed reconnected and resubscribed");
    }
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
    loop {
        tokio::select! {
            // Commands before messages: an unwatch queued before an event was published takes effect first.
            biased;
            _ = out.closed() => return End::Stop,
            cmd = cmds.recv() => match cmd {
                None => return End::Stop,
                Some(Command::Watch(t, ack)) => {
                    let rc = redis_channel(&t);
                    // Already watched means already subscribed on this connection: confirm without a round trip
                    // (commands run in order, so an earlier watch of it has been confirmed by now).
                    if !wanted.insert(t) {
                        let _ = ack.send(Ok(()));
                        continue;
                    }
                    match tokio::time::timeout(COMMAND_TIMEOUT, sink.subscribe(&rc)).await {
                        Ok(Ok(())) => {
                            let _ = ack.send(Ok(()));
                        }
                        Ok(Err(e)) => {
                            let _ = ack.send(Err(BrokerError::Unavailable(format!("{name}: {e}"))));
                            return lost(&e);
                        }
                        Err(_) => {
                            let _ = ack.send(Err(BrokerError::Unavailable(format!("{name}: subscribe timed out"))));
                            return End::Lost("subscribe timed out".into());
                        }
                    }
                }
                Some(Command::Unwatch(t)) => {
                    if wanted.remove(&t) {
                        match tokio::time::timeout(COMMAND_TIMEOUT, sink.unsubscribe(redis_channel(&t))).await {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => return lost(&e),
                            Err(_) => return End::Lost("unsubscribe timed out".into()),
                        }
                    }
                }
            },
            msg = stream.next() => {
                let Some(msg) = msg else {
                    return End::Lost("connection closed".into());
                };
                // A message racing an unwatch can still arrive: only watched topics go out.
                let Some((_, via)) = topic_of(msg.get_channel_name()).filter(|(t, _)| wanted.contains(t)) else {
                    continue;
                };
                let Ok(payload) = msg.get_payload::<String>() else {
                    continue;
                };
                for event in parse_published(&payload) {
                    if out.send(FedEvent { via, event }).await.is_err() {
                        return End::Stop;
                    }
                }
            }
            _ = ping.tick() => {
                match tokio::time::timeout(COMMAND_TIMEOUT, sink.ping::<redis::Value>()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return lost(&e),
                    Err(_) => return End::Lost("ping timed out".into()),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_round_trip() {
        let q = QueueName::parse("acme:mail").unwrap();
        for (t, via) in [
            (Topic::Partition(0), Via::Owner),
            (Topic::Partition(1023), Via::Owner),
            (Topic::Queue(q), Via::Queue),
            (Topic::Legacy, Via::Owner),
        ] {
            assert_eq!(topic_of(&redis_channel(&t)), Some((t, via)));
        }
        assert_eq!(redis_channel(&Topic::Partition(7)), "ferry:ev:p:7");
        assert_eq!(
            redis_channel(&Topic::Queue(QueueName::parse("mail").unwrap())),
            "ferry:ev:q:{mail}"
        );
        assert_eq!(topic_of("ferry:app:{x}"), None);
        assert_eq!(topic_of("ferry:ev:p:x"), None);
    }
}
