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
//! ones publish. That second subscription can go once no older gateway is left.
//!
//! Each shard's channels are held by its task of [`super::subscriber`] (reconnects, resubscription, PING).
//! Messages published while it was disconnected are lost: pub/sub is at most once, and so is the contract of
//! [`PubSub::publish`].
//!
//! [`PubSub::publish`]: crate::PubSub::publish

use std::collections::HashSet;

use redis::Client;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;

use super::conn::Link;
use super::keys::Layout;
use super::subscriber::{Command, FEED_CAPACITY, Subscriptions, run_shard};
use crate::{
    BrokerError, ChannelControl, ChannelFeed, ChannelMessage, Confirmation, FeedControl, ShardRing,
    StreamPos,
};

/// The Redis channel carrying the application channel `channel` on a shard of `layout`.
pub(super) fn redis_channel(layout: &Layout, channel: &str) -> String {
    format!("{}app2:{{{channel}}}", layout.prefix())
}

/// The channel older ferry published `channel` on, without a position: only on a standalone Redis, where an
/// older ferry can have run.
fn legacy_channel(layout: &Layout, channel: &str) -> Option<String> {
    (!layout.is_tagged()).then(|| format!("ferry:app:{{{channel}}}"))
}

/// The application channel of a Redis channel of a shard of `layout`, and whether it is the legacy one.
fn app_channel<'c>(layout: &Layout, redis_channel: &'c str) -> Option<(&'c str, bool)> {
    let rest = redis_channel.strip_prefix(layout.prefix())?;
    if let Some(c) = rest.strip_prefix("app2:{") {
        return Some((c.strip_suffix('}')?, false));
    }
    if layout.is_tagged() {
        return None;
    }
    Some((rest.strip_prefix("app:{")?.strip_suffix('}')?, true))
}

/// The Redis channels of `channel`: the current one, and the legacy one where there is one.
fn both(layout: &Layout, channel: &str) -> Vec<String> {
    let mut all = vec![redis_channel(layout, channel)];
    all.extend(legacy_channel(layout, channel));
    all
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

/// Routes commands to the task of the channel's shard.
#[derive(Debug)]
struct RedisFeed {
    ring: ShardRing,
    shards: Vec<mpsc::UnboundedSender<Command<String>>>,
}

fn stopped() -> BrokerError {
    BrokerError::Unavailable("the channel feed has stopped".into())
}

impl FeedControl for RedisFeed {
    fn subscribe(&self, channel: &str) -> Confirmation {
        let (tx, rx) = oneshot::channel();
        let shard = &self.shards[self.ring.shard_for(channel)];
        if shard.send(Command::Add(channel.to_owned(), tx)).is_err() {
            return Box::pin(async { Err(stopped()) });
        }
        Box::pin(async move { rx.await.unwrap_or_else(|_| Err(stopped())) })
    }

    fn unsubscribe(&self, channel: &str) {
        // A stopped task holds no subscription: nothing to undo.
        let _ = self.shards[self.ring.shard_for(channel)].send(Command::Remove(channel.to_owned()));
    }
}

/// Start a feed: one task per shard (`(name without credentials, client, layout)`, in ring order).
pub(super) fn feed(shards: Vec<(String, Client, Layout)>, ring: ShardRing) -> ChannelFeed {
    let (out, rx) = mpsc::channel(FEED_CAPACITY);
    let mut commands = Vec::with_capacity(shards.len());
    for (name, client, layout) in shards {
        let (tx, cmds) = mpsc::unbounded_channel();
        commands.push(tx);
        tokio::spawn(run_shard(
            AppChannels { layout },
            name,
            client,
            cmds,
            out.clone(),
        ));
    }
    let control = ChannelControl::new(std::sync::Arc::new(RedisFeed {
        ring,
        shards: commands,
    }));
    ChannelFeed::new(control, Box::pin(ReceiverStream::new(rx)))
}

/// Start a feed on a Redis Cluster: one task for every virtual shard (`tags`, in ring order), see
/// [`super::cluster_feed`].
pub(super) fn cluster_feed(
    tags: &[String],
    seeds: super::cluster_feed::Seeds,
    ring: ShardRing,
) -> ChannelFeed {
    let subs = tags
        .iter()
        .map(|tag| AppChannels {
            layout: Layout::tagged(tag),
        })
        .collect();
    let (commands, rx) = super::cluster_feed::start(subs, tags, seeds);
    let control = ChannelControl::new(std::sync::Arc::new(RedisFeed {
        ring,
        shards: commands,
    }));
    ChannelFeed::new(control, Box::pin(ReceiverStream::new(rx)))
}

/// The application channels of one shard.
struct AppChannels {
    layout: Layout,
}

impl Subscriptions for AppChannels {
    type Key = String;
    type Out = ChannelMessage;
    const WHAT: &'static str = "channel feed";

    fn channels(&self, channel: &String) -> Vec<String> {
        both(&self.layout, channel)
    }

    async fn on_connect(&self, _conn: &mut Link) -> Result<(), String> {
        Ok(())
    }

    fn deliver(
        &self,
        redis_channel: &str,
        payload: String,
        wanted: &HashSet<String>,
    ) -> Vec<ChannelMessage> {
        let Some((channel, legacy)) =
            app_channel(&self.layout, redis_channel).filter(|(c, _)| wanted.contains(*c))
        else {
            return Vec::new();
        };
        let (position, payload) = if legacy {
            (None, payload)
        } else {
            match split_message(payload) {
                Some((pos, payload)) => (Some(pos), payload),
                None => {
                    tracing::debug!(redis_channel, "channel message without a position dropped");
                    return Vec::new();
                }
            }
        };
        vec![ChannelMessage {
            channel: channel.to_owned(),
            payload,
            position,
        }]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_round_trip() {
        let l = Layout::standalone();
        assert_eq!(redis_channel(&l, "t/app:chat"), "ferry:app2:{t/app:chat}");
        assert_eq!(
            app_channel(&l, &redis_channel(&l, "a{b}")),
            Some(("a{b}", false))
        );
        let legacy = legacy_channel(&l, "a{b}").unwrap();
        assert_eq!(app_channel(&l, &legacy), Some(("a{b}", true)));
        assert_eq!(app_channel(&l, "ferry:events"), None);
        // A cluster's shard: the tag comes first, and no older ferry ever published there.
        let t = Layout::tagged("f1");
        assert_eq!(redis_channel(&t, "a{b}"), "ferry:{f1}:app2:{a{b}}");
        assert_eq!(
            app_channel(&t, &redis_channel(&t, "a{b}")),
            Some(("a{b}", false))
        );
        assert_eq!(both(&t, "c"), vec!["ferry:{f1}:app2:{c}".to_owned()]);
        assert_eq!(app_channel(&t, "ferry:{f1}:app:{c}"), None);
        assert_eq!(app_channel(&t, &redis_channel(&l, "c")), None);
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
