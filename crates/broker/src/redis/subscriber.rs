//! The per-shard pub/sub task behind both feeds: application channels ([`super::pubsub`]) and job event topics
//! ([`super::topics`]). Each feed runs one task per shard, each with one dedicated pub/sub connection holding
//! ONE subscription per key this node wants (the callers count their listeners and add a key once).
//!
//! The task owns the set of wanted keys. When its connection drops (the message stream ends, a command fails,
//! or a periodic PING goes unanswered: a half-open TCP connection would otherwise stay silent forever) it
//! reconnects with capped backoff and subscribes the whole set again. Messages published while it was
//! disconnected are lost: pub/sub is at most once. While it waits it keeps answering commands (an add is
//! refused as unavailable but remembered, and subscribed on reconnect) so callers never hang. Commands go
//! before messages: a removal queued before a message was published takes effect before that message is looked
//! at, and a message racing a removal is dropped by [`Subscriptions::deliver`], which sees the wanted set.
//!
//! The task ends when its output receiver, or its command sender, is dropped.

use std::collections::HashSet;
use std::future::Future;
use std::hash::Hash;
use std::time::Duration;

use futures::StreamExt;
use redis::Client;
use tokio::sync::{mpsc, oneshot};

use super::conn::Link;
use crate::BrokerError;

/// Items buffered between the shard tasks and the feed's reader. When the reader falls this far behind, the
/// shard tasks wait (the redis crate buffers behind them); the reader is expected to hand items off without
/// blocking.
pub(super) const FEED_CAPACITY: usize = 4096;

/// Longest wait for a connection, a (un)subscribe confirmation or a PING reply.
pub(super) const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// How often an idle pub/sub connection is checked with a PING.
const PING_EVERY: Duration = Duration::from_secs(10);

pub(super) const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A request to a shard task.
pub(super) enum Command<K> {
    /// Subscribe `K`'s channels (once), answering when Redis confirmed.
    Add(K, oneshot::Sender<Result<(), BrokerError>>),
    /// Unsubscribe them.
    Remove(K),
}

/// What one feed subscribes and what its messages deliver.
pub(super) trait Subscriptions: Send + Sync + 'static {
    type Key: Eq + Hash + Clone + Send + 'static;
    type Out: Send + 'static;
    /// The feed's name in logs.
    const WHAT: &'static str;
    /// The Redis channels carrying `key`.
    fn channels(&self, key: &Self::Key) -> Vec<String>;
    /// Runs on every (re)connect, before the resubscription, with a command connection to the shard; an error
    /// counts as a lost connection.
    fn on_connect(&self, conn: &mut Link) -> impl Future<Output = Result<(), String>> + Send;
    /// What a text message on the Redis channel `channel` delivers: nothing unless its key is in `wanted`.
    fn deliver(
        &self,
        channel: &str,
        payload: String,
        wanted: &HashSet<Self::Key>,
    ) -> Vec<Self::Out>;
}

/// Why a connected session ended.
enum End {
    /// The feed was dropped: stop for good.
    Stop,
    /// The connection failed: reconnect and resubscribe.
    Lost(String),
}

/// One shard's task: sessions until the feed is dropped, with capped backoff between them.
pub(super) async fn run_shard<S: Subscriptions>(
    subs: S,
    name: String,
    client: Client,
    mut cmds: mpsc::UnboundedReceiver<Command<S::Key>>,
    out: mpsc::Sender<S::Out>,
) {
    let mut wanted: HashSet<S::Key> = HashSet::new();
    let mut backoff = Duration::from_millis(100);
    let mut reconnecting = false;
    loop {
        let session = Session {
            subs: &subs,
            client: &client,
            name: &name,
            out: &out,
        };
        match session.run(&mut wanted, &mut cmds, reconnecting).await {
            End::Stop => return,
            End::Lost(why) => {
                tracing::warn!(shard = %name, error = %why, "{} disconnected, reconnecting", S::WHAT);
                reconnecting = true;
            }
        }
        let mut pending =
            futures::stream::poll_fn(|cx| cmds.poll_recv(cx).map(|c| c.map(|c| (0, c))));
        let wanted_sets = std::slice::from_mut(&mut wanted);
        if !wait_to_reconnect(backoff, &name, &out, &mut pending, wanted_sets).await {
            return;
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Wait `backoff` before the next connection attempt of a feed's task, answering its commands meanwhile (`cmds`
/// yields each with the index of the wanted set it is for): an add is remembered, to be subscribed on
/// reconnect, and refused as unavailable; a removal is forgotten. False when the feed was dropped.
pub(super) async fn wait_to_reconnect<K, O, C>(
    backoff: Duration,
    name: &str,
    out: &mpsc::Sender<O>,
    cmds: &mut C,
    wanted: &mut [HashSet<K>],
) -> bool
where
    K: Eq + Hash,
    C: futures::Stream<Item = (usize, Command<K>)> + Unpin,
{
    let wake = tokio::time::sleep(backoff);
    tokio::pin!(wake);
    loop {
        tokio::select! {
            _ = &mut wake => return true,
            _ = out.closed() => return false,
            cmd = cmds.next() => match cmd {
                None => return false,
                Some((i, Command::Add(k, ack))) => {
                    wanted[i].insert(k);
                    let _ = ack.send(Err(BrokerError::Unavailable(format!("{name}: reconnecting"))));
                }
                Some((i, Command::Remove(k))) => {
                    wanted[i].remove(&k);
                }
            },
        }
    }
}

struct Session<'a, S: Subscriptions> {
    subs: &'a S,
    client: &'a Client,
    name: &'a str,
    out: &'a mpsc::Sender<S::Out>,
}

impl<S: Subscriptions> Session<'_, S> {
    /// One connection's life: connect, subscribe everything wanted, then serve commands and messages until the
    /// connection fails or the feed is dropped.
    async fn run(
        &self,
        wanted: &mut HashSet<S::Key>,
        cmds: &mut mpsc::UnboundedReceiver<Command<S::Key>>,
        reconnecting: bool,
    ) -> End {
        let (subs, name) = (self.subs, self.name);
        let lost = |e: &dyn std::fmt::Display| End::Lost(e.to_string());
        let ps = match tokio::time::timeout(COMMAND_TIMEOUT, self.client.get_async_pubsub()).await {
            Ok(Ok(ps)) => ps,
            Ok(Err(e)) => return lost(&e),
            Err(_) => return End::Lost("connect timed out".into()),
        };
        let conn = match tokio::time::timeout(
            COMMAND_TIMEOUT,
            self.client.get_multiplexed_async_connection(),
        )
        .await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return lost(&e),
            Err(_) => return End::Lost("connect timed out".into()),
        };
        if let Err(why) = subs.on_connect(&mut Link::Plain(conn)).await {
            return End::Lost(why);
        }
        let (mut sink, mut stream) = ps.split();
        if !wanted.is_empty() {
            let all: Vec<String> = wanted.iter().flat_map(|k| subs.channels(k)).collect();
            match tokio::time::timeout(COMMAND_TIMEOUT, sink.subscribe(&all)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return lost(&e),
                Err(_) => return End::Lost("resubscribe timed out".into()),
            }
        }
        if reconnecting {
            tracing::info!(shard = %name, wanted = wanted.len(), "{} reconnected and resubscribed", S::WHAT);
        }
        let mut ping =
            tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
        loop {
            tokio::select! {
                // Commands before messages (see the module's note).
                biased;
                _ = self.out.closed() => return End::Stop,
                cmd = cmds.recv() => match cmd {
                    None => return End::Stop,
                    Some(Command::Add(k, ack)) => {
                        let channels = subs.channels(&k);
                        // Already wanted means already subscribed on this connection: confirm without a round
                        // trip (commands run in order, so an earlier add of it has been confirmed by now).
                        if !wanted.insert(k) {
                            let _ = ack.send(Ok(()));
                            continue;
                        }
                        match tokio::time::timeout(COMMAND_TIMEOUT, sink.subscribe(&channels)).await {
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
                    Some(Command::Remove(k)) => {
                        if wanted.remove(&k) {
                            match tokio::time::timeout(COMMAND_TIMEOUT, sink.unsubscribe(subs.channels(&k))).await {
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
                    let Ok(payload) = msg.get_payload::<String>() else {
                        tracing::debug!(shard = %name, "non-text pub/sub message dropped");
                        continue;
                    };
                    for item in subs.deliver(msg.get_channel_name(), payload, wanted) {
                        if self.out.send(item).await.is_err() {
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
}
