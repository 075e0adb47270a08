//! Application channels over Redis pub/sub.
//!
//! A channel `c` is the Redis channel `ferry:app2:{c}` (the braces follow the key layout's hash-tag notation) on
//! the shard the [`ShardRing`] picks for `c`, so publishers and subscribers on every node meet on the same
//! shard. Its messages are `"<offset> <epoch> <payload>"` (see [`super::history`]).
//!
//! Rolling upgrades: ferry before channel history published the bare payload on `ferry:app:{c}`. A new prefix
//! (rather than a new format on the old channel) keeps an older gateway from pushing `"<offset> <epoch> ..."` to
//! its clients as if it were the message: it does not get the new messages at all (clients of older gateways
//! miss what newer ones publish until the upgrade is done). A feed also subscribes the old channel, in the same
//! command, and delivers its messages without a position, so clients of newer gateways keep getting what older
//! ones publish. That second subscription can go once no older gateway is left. A feed runs one task per shard, each with one dedicated pub/sub connection holding ONE subscription
//! per channel that this node's listeners want; the caller counts its listeners and subscribes the feed once.
//!
//! The shard task owns the set of wanted channels. When its connection drops (the message stream ends, a
//! command fails, or a periodic PING goes unanswered: a half-open TCP connection would otherwise stay silent
//! forever) it reconnects with capped backoff and subscribes the whole set again. Messages published while it
//! was disconnected are lost: pub/sub is at most once, and so is the contract of [`Broker::publish`].
//!
//! The task ends when the feed (its message receiver, or every control handle) is dropped.
//!
//! [`Broker::publish`]: crate::Broker::publish

use std::collections::HashSet;
use std::time::Duration;

use futures::StreamExt;
use redis::Client;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;

use crate::{
    BrokerError, ChannelControl, ChannelFeed, ChannelMessage, Confirmation, FeedControl, ShardRing,
    StreamPos,
};

/// Messages buffered between the shard tasks and the feed's reader. When the reader falls this far behind,
/// the shard task waits (the redis crate buffers behind it); the reader is expected to hand messages off
/// without blocking.
const FEED_CAPACITY: usize = 4096;

/// Longest wait for a connection, a (un)subscribe confirmation or a PING reply.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// How often an idle pub/sub connection is checked with a PING.
const PING_EVERY: Duration = Duration::from_secs(10);

const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The Redis channel carrying the application channel `channel`.
pub(super) fn redis_channel(channel: &str) -> String {
    format!("ferry:app2:{{{channel}}}")
}

/// The channel older ferry published `channel` on, without a position.
fn legacy_channel(channel: &str) -> String {
    format!("ferry:app:{{{channel}}}")
}

/// The application channel of a Redis channel, and whether it is the legacy one.
fn app_channel(redis_channel: &str) -> Option<(&str, bool)> {
    if let Some(c) = redis_channel.strip_prefix("ferry:app2:{") {
        return Some((c.strip_suffix('}')?, false));
    }
    Some((
        redis_channel
            .strip_prefix("ferry:app:{")?
            .strip_suffix('}')?,
        true,
    ))
}

/// Both Redis channels of `channel`.
fn both(channel: &str) -> Vec<String> {
    vec![redis_channel(channel), legacy_channel(channel)]
}

/// A message of the current form, `"<offset> <epoch> <payload>"`, as its position and payload.
fn split_message(mut message: String) -> Option<(StreamPos, String)> {
    let (pos, cut) = {
        let (offset, rest) = message.split_once(' ')?;
        let (epoch, _) = rest.split_once(' ')?;
        let pos = StreamPos {
            offset: offset.to_owned(),
            epoch: epoch.to_owned(),
        };
        (pos, offset.len() + epoch.len() + 2)
    };
    let payload = message.split_off(cut);
    Some((pos, payload))
}

enum Command {
    Subscribe(String, oneshot::Sender<Result<(), BrokerError>>),
    Unsubscribe(String),
}

/// Routes commands to the task of the channel's shard.
#[derive(Debug)]
struct RedisFeed {
    ring: ShardRing,
    shards: Vec<mpsc::UnboundedSender<Command>>,
}

fn stopped() -> BrokerError {
    BrokerError::Unavailable("the channel feed has stopped".into())
}

impl FeedControl for RedisFeed {
    fn subscribe(&self, channel: &str) -> Confirmation {
        let (tx, rx) = oneshot::channel();
        let shard = &self.shards[self.ring.shard_for(channel)];
        if shard
            .send(Command::Subscribe(channel.to_owned(), tx))
            .is_err()
        {
            return Box::pin(async { Err(stopped()) });
        }
        Box::pin(async move { rx.await.unwrap_or_else(|_| Err(stopped())) })
    }

    fn unsubscribe(&self, channel: &str) {
        // A stopped task holds no subscription: nothing to undo.
        let _ = self.shards[self.ring.shard_for(channel)]
            .send(Command::Unsubscribe(channel.to_owned()));
    }
}

/// Start a feed: one task per shard (`(name without credentials, client)`, in ring order).
pub(super) fn feed(shards: Vec<(String, Client)>, ring: ShardRing) -> ChannelFeed {
    let (out, rx) = mpsc::channel(FEED_CAPACITY);
    let mut commands = Vec::with_capacity(shards.len());
    for (name, client) in shards {
        let (tx, cmds) = mpsc::unbounded_channel();
        commands.push(tx);
        tokio::spawn(run_shard(name, client, cmds, out.clone()));
    }
    let control = ChannelControl::new(std::sync::Arc::new(RedisFeed {
        ring,
        shards: commands,
    }));
    ChannelFeed::new(control, Box::pin(ReceiverStream::new(rx)))
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
    out: mpsc::Sender<ChannelMessage>,
) {
    let mut wanted: HashSet<String> = HashSet::new();
    let mut backoff = Duration::from_millis(100);
    let mut reconnecting = false;
    loop {
        match session(&client, &mut wanted, &mut cmds, &out, reconnecting, &name).await {
            End::Stop => return,
            End::Lost(why) => {
                tracing::warn!(shard = %name, error = %why, "channel feed disconnected, reconnecting");
                reconnecting = true;
            }
        }
        // Keep taking commands while waiting, so callers are answered (subscribe: unavailable, but remembered
        // and subscribed on reconnect) instead of hanging.
        let wake = tokio::time::sleep(backoff);
        tokio::pin!(wake);
        loop {
            tokio::select! {
                _ = &mut wake => break,
                _ = out.closed() => return,
                cmd = cmds.recv() => match cmd {
                    None => return,
                    Some(Command::Subscribe(ch, ack)) => {
                        wanted.insert(ch);
                        let _ = ack.send(Err(BrokerError::Unavailable(format!("{name}: reconnecting"))));
                    }
                    Some(Command::Unsubscribe(ch)) => {
                        wanted.remove(&ch);
                    }
                },
            }
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One connection's life: connect, subscribe everything wanted, then serve commands and messages until the
/// connection fails or the feed is dropped.
async fn session(
    client: &Client,
    wanted: &mut HashSet<String>,
    cmds: &mut mpsc::UnboundedReceiver<Command>,
    out: &mpsc::Sender<ChannelMessage>,
    reconnecting: bool,
    name: &str,
) -> End {
    let lost = |e: &dyn std::fmt::Display| End::Lost(e.to_string());
    let ps = match tokio::time::timeout(COMMAND_TIMEOUT, client.get_async_pubsub()).await {
        Ok(Ok(ps)) => ps,
        Ok(Err(e)) => return lost(&e),
        Err(_) => return End::Lost("connect timed out".into()),
    };
    let (mut sink, mut stream) = ps.split();
    if !wanted.is_empty() {
        let all: Vec<String> = wanted.iter().flat_map(|c| both(c)).collect();
        match tokio::time::timeout(COMMAND_TIMEOUT, sink.subscribe(&all)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return lost(&e),
            Err(_) => return End::Lost("resubscribe timed out".into()),
        }
    }
    if reconnecting {
        tracing::info!(shard = %name, channels = wanted.len(), "channel feed reconnected and resubscribed");
    }
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
    loop {
        tokio::select! {
            // Commands before messages: an unsubscribe queued before a message was published must take effect
            // before that message is looked at (a random pick could deliver it).
            biased;
            _ = out.closed() => return End::Stop,
            cmd = cmds.recv() => match cmd {
                None => return End::Stop,
                Some(Command::Subscribe(ch, ack)) => {
                    let rc = both(&ch);
                    // Already wanted means already subscribed on this connection: confirm without a round trip.
                    if !wanted.insert(ch) {
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
                Some(Command::Unsubscribe(ch)) => {
                    if wanted.remove(&ch) {
                        match tokio::time::timeout(COMMAND_TIMEOUT, sink.unsubscribe(both(&ch))).await {
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
                // A message racing an unsubscribe can still arrive: only wanted channels go out.
                let Some((channel, legacy)) = app_channel(msg.get_channel_name()).filter(|(c, _)| wanted.contains(*c)) else {
                    continue;
                };
                let Ok(payload) = msg.get_payload::<String>() else {
                    tracing::debug!(shard = %name, "non-text channel message dropped");
                    continue;
                };
                let (position, payload) = if legacy {
                    (None, payload)
                } else {
                    match split_message(payload) {
                        Some((pos, payload)) => (Some(pos), payload),
                        None => {
                            tracing::debug!(shard = %name, "channel message without a position dropped");
                            continue;
                        }
                    }
                };
                let m = ChannelMessage { channel: channel.to_owned(), payload, position };
                if out.send(m).await.is_err() {
                    return End::Stop;
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
        assert_eq!(redis_channel("t/app:chat"), "ferry:app2:{t/app:chat}");
        assert_eq!(app_channel(&redis_channel("a{b}")), Some(("a{b}", false)));
        assert_eq!(app_channel(&legacy_channel("a{b}")), Some(("a{b}", true)));
        assert_eq!(app_channel("ferry:events"), None);
    }

    #[test]
    fn messages_split_into_position_and_payload() {
        let (pos, payload) = split_message("1-2 e-1 {\"a\": \"b c\"}".into()).unwrap();
        assert_eq!(pos.offset, "1-2");
        assert_eq!(pos.epoch, "e-1");
        assert_eq!(payload, "{\"a\": \"b c\"}");
        assert!(split_message("no-position".into()).is_none());
    }
}
