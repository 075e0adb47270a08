//! The pub/sub task of a feed on a Redis Cluster: sharded pub/sub (`SSUBSCRIBE`), one task and one RESP3
//! cluster connection for all the feed's virtual shards.
//!
//! A shard's channels lie in its tag's slot (see `keys.rs`), so each `SSUBSCRIBE` goes, through the cluster
//! connection, to the master serving that slot. Messages arrive as pushes and are handed to the shard their
//! channel's tag names. It keeps the contract of the standalone task ([`super::subscriber`]): it owns the set of
//! wanted keys per shard, answers every command while it reconnects, and subscribes everything wanted again
//! after a reconnect; messages published meanwhile are lost (at most once).
//!
//! Two cluster events need more than the redis crate does by itself:
//! * **A slot moves** (resharding, or a failover): the old master drops the subscriptions of the slot's shard
//!   channels with an `sunsubscribe` push. A channel still wanted is subscribed again, which the cluster
//!   connection routes to the slot's new master. Messages published in between are lost, as in any reconnect.
//! * **A node's connection drops**: the crate resubscribes on its own, but a master that came back without
//!   its data has a new epoch, which only a reconnect reads ([`Subscriptions::on_connect`]). So a
//!   disconnection ends the session, and the next one reads every shard's epoch again.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::SelectAll;
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::conn::Link;
use super::subscriber::{
    COMMAND_TIMEOUT, Command, FEED_CAPACITY, MAX_BACKOFF, Subscriptions, wait_to_reconnect,
};
use crate::BrokerError;

/// How often the connection is checked with a PING.
const PING_EVERY: Duration = Duration::from_secs(10);

/// Why a session ended.
enum End {
    Stop,
    Lost(String),
}

/// The shard a channel belongs to: the tag in `ferry:{<tag>}:…`.
fn tag_of(channel: &str) -> Option<&str> {
    channel.strip_prefix("ferry:{")?.split('}').next()
}

/// Where a feed's cluster connections go.
#[derive(Debug, Clone)]
pub(super) struct Seeds {
    /// The cluster's name in logs (its seeds without credentials).
    pub name: String,
    pub urls: Vec<String>,
    pub connection_timeout: Duration,
    /// The CA to verify `rediss://` nodes against instead of the system roots.
    pub ca: Option<Vec<u8>>,
}

/// A started feed: the command sender of each shard, in ring order, and the receiver of what the feed delivers.
pub(super) type Started<S> = (
    Vec<mpsc::UnboundedSender<Command<<S as Subscriptions>::Key>>>,
    mpsc::Receiver<<S as Subscriptions>::Out>,
);

/// Start a feed's task over shards `subs` (tags `tags`, in ring order).
pub(super) fn start<S: Subscriptions>(subs: Vec<S>, tags: &[String], seeds: Seeds) -> Started<S>
where
    S::Key: Sync,
{
    let (out, rx) = mpsc::channel(FEED_CAPACITY);
    let (commands, receivers): (Vec<_>, Vec<_>) =
        subs.iter().map(|_| mpsc::unbounded_channel()).unzip();
    tokio::spawn(run(subs, tags.to_vec(), seeds, receivers, out));
    (commands, rx)
}

/// Run the feed's task: `subs[i]` and `cmds[i]` are shard `i`'s, `tags[i]` its tag; every session makes a
/// cluster connection of its own from `seeds` (RESP3, with a push channel).
async fn run<S: Subscriptions>(
    subs: Vec<S>,
    tags: Vec<String>,
    seeds: Seeds,
    cmds: Vec<mpsc::UnboundedReceiver<Command<S::Key>>>,
    out: mpsc::Sender<S::Out>,
) {
    let Seeds {
        name,
        urls,
        connection_timeout,
        ca,
    } = seeds;
    let by_tag: HashMap<String, usize> = tags
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i))
        .collect();
    let mut cmds: SelectAll<_> = cmds
        .into_iter()
        .enumerate()
        .map(|(i, rx)| UnboundedReceiverStream::new(rx).map(move |c| (i, c)))
        .collect();
    let mut wanted: Vec<HashSet<S::Key>> = subs.iter().map(|_| HashSet::new()).collect();
    let mut backoff = Duration::from_millis(100);
    let mut reconnecting = false;
    loop {
        let session = Session {
            subs: &subs,
            by_tag: &by_tag,
            name: &name,
            out: &out,
        };
        match session
            .run(
                &urls,
                ca.as_deref(),
                connection_timeout,
                &mut wanted,
                &mut cmds,
                reconnecting,
            )
            .await
        {
            End::Stop => return,
            End::Lost(why) => {
                tracing::warn!(cluster = %name, error = %why, "{} disconnected, reconnecting", S::WHAT);
                reconnecting = true;
            }
        }
        if !wait_to_reconnect(backoff, &name, &out, &mut cmds, &mut wanted).await {
            return;
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

struct Session<'a, S: Subscriptions> {
    subs: &'a [S],
    by_tag: &'a HashMap<String, usize>,
    name: &'a str,
    out: &'a mpsc::Sender<S::Out>,
}

impl<S: Subscriptions> Session<'_, S> {
    async fn run<C>(
        &self,
        seeds: &[String],
        ca: Option<&[u8]>,
        connection_timeout: Duration,
        wanted: &mut [HashSet<S::Key>],
        cmds: &mut C,
        reconnecting: bool,
    ) -> End
    where
        C: futures::Stream<Item = (usize, Command<S::Key>)> + Unpin,
    {
        let (subs, name) = (self.subs, self.name);
        let (push_tx, mut pushes) = mpsc::unbounded_channel::<PushInfo>();
        let mut builder = ClusterClientBuilder::new(seeds.to_vec())
            .use_protocol(redis::ProtocolVersion::RESP3)
            .push_sender(push_tx)
            .connection_timeout(connection_timeout)
            .response_timeout(COMMAND_TIMEOUT);
        if let Some(ca) = ca {
            builder = builder.certs(redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(ca.to_vec()),
            });
        }
        let client = match builder.build() {
            Ok(c) => c,
            Err(e) => return End::Lost(e.to_string()),
        };
        let mut conn =
            match tokio::time::timeout(COMMAND_TIMEOUT, client.get_async_connection()).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => return End::Lost(e.to_string()),
                Err(_) => return End::Lost("connect timed out".into()),
            };
        let mut link = Link::Cluster(conn.clone());
        for s in subs {
            if let Err(why) = s.on_connect(&mut link).await {
                return End::Lost(why);
            }
        }
        for (i, keys) in wanted.iter().enumerate() {
            let all: Vec<String> = keys.iter().flat_map(|k| subs[i].channels(k)).collect();
            if let Err(e) = ssubscribe(&mut conn, &all).await {
                return End::Lost(e);
            }
        }
        if reconnecting {
            let n: usize = wanted.iter().map(HashSet::len).sum();
            tracing::info!(cluster = %name, wanted = n, "{} reconnected and resubscribed", S::WHAT);
        }
        let mut ping =
            tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
        loop {
            tokio::select! {
                biased;
                _ = self.out.closed() => return End::Stop,
                cmd = cmds.next() => match cmd {
                    None => return End::Stop,
                    Some((i, Command::Add(k, ack))) => {
                        let channels = subs[i].channels(&k);
                        if !wanted[i].insert(k) {
                            let _ = ack.send(Ok(()));
                            continue;
                        }
                        match ssubscribe(&mut conn, &channels).await {
                            Ok(()) => {
                                let _ = ack.send(Ok(()));
                            }
                            Err(e) => {
                                let _ = ack.send(Err(BrokerError::Unavailable(format!("{name}: {e}"))));
                                return End::Lost(e);
                            }
                        }
                    }
                    Some((i, Command::Remove(k))) => {
                        if wanted[i].remove(&k) {
                            let channels = subs[i].channels(&k);
                            match tokio::time::timeout(COMMAND_TIMEOUT, conn.sunsubscribe(&channels)).await {
                                Ok(Ok(())) => {}
                                Ok(Err(e)) => return End::Lost(e.to_string()),
                                Err(_) => return End::Lost("unsubscribe timed out".into()),
                            }
                        }
                    }
                },
                push = pushes.recv() => {
                    let Some(push) = push else {
                        return End::Lost("the push channel closed".into());
                    };
                    match push.kind {
                        PushKind::SMessage => {
                            let Some((channel, payload)) = message(&push.data) else {
                                continue;
                            };
                            let Some(&i) = tag_of(&channel).and_then(|t| self.by_tag.get(t)) else {
                                continue;
                            };
                            for item in subs[i].deliver(&channel, payload, &wanted[i]) {
                                if self.out.send(item).await.is_err() {
                                    return End::Stop;
                                }
                            }
                        }
                        PushKind::SUnsubscribe => {
                            // Our own unsubscribe, or the server dropping a channel whose slot moved: a channel
                            // still wanted is subscribed again, at the slot's new master.
                            let Some(Value::BulkString(ch)) = push.data.first() else {
                                continue;
                            };
                            let channel = String::from_utf8_lossy(ch).into_owned();
                            let Some(&i) = tag_of(&channel).and_then(|t| self.by_tag.get(t)) else {
                                continue;
                            };
                            let still = wanted[i].iter().any(|k| subs[i].channels(k).contains(&channel));
                            if still {
                                tracing::info!(cluster = %name, channel, "slot moved: subscribing again");
                                if let Err(e) = ssubscribe(&mut conn, std::slice::from_ref(&channel)).await {
                                    return End::Lost(e);
                                }
                            }
                        }
                        PushKind::Disconnection => {
                            return End::Lost("a node's connection dropped".into());
                        }
                        _ => {}
                    }
                }
                _ = ping.tick() => {
                    let ping = redis::cmd("PING");
                    match tokio::time::timeout(COMMAND_TIMEOUT, ping.query_async::<Value>(&mut conn)).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return End::Lost(e.to_string()),
                        Err(_) => return End::Lost("ping timed out".into()),
                    }
                }
            }
        }
    }
}

/// Subscribe `channels` (all in one slot, or none), bounded by [`COMMAND_TIMEOUT`].
async fn ssubscribe(conn: &mut ClusterConnection, channels: &[String]) -> Result<(), String> {
    if channels.is_empty() {
        return Ok(());
    }
    match tokio::time::timeout(COMMAND_TIMEOUT, conn.ssubscribe(channels)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("subscribe timed out".into()),
    }
}

/// The channel and text payload of an `smessage` push.
fn message(data: &[Value]) -> Option<(String, String)> {
    let [Value::BulkString(channel), Value::BulkString(payload)] = data else {
        return None;
    };
    Some((
        String::from_utf8(channel.clone()).ok()?,
        String::from_utf8(payload.clone()).ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_name_their_shard_by_tag() {
        assert_eq!(tag_of("ferry:{v3.7}:ev:p:12"), Some("v3.7"));
        assert_eq!(tag_of("ferry:{v3.7}:app2:{a{b}}"), Some("v3.7"));
        assert_eq!(tag_of("ferry:ev:p:12"), None);
    }
}
