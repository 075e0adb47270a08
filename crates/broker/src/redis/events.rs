//! The feed of every job event ([`EventFeed::subscribe`]): one pub/sub connection per shard, merged, subscribed to
//! the partition channels (`PSUBSCRIBE ferry:ev:p:*`) and to `ferry:events` (the events of jobs enqueued by an
//! older ferry, whose `m` carries no partition). Each event is published on exactly one of them; the queue
//! channels (`ferry:ev:q:{…}`) carry the same events again and are left out. See [`super::topics`] for the
//! feed a gateway uses, limited to the topics it watches.
//!
//! Each shard is served by a task of its own. When a shard's connection drops (the message stream ends, or a
//! periodic PING goes unanswered: a half-open TCP connection would otherwise stay silent forever) only that
//! shard reconnects, with capped backoff, and subscribes again; the merged stream stays open, so the other
//! shards' events keep flowing and the lost shard's resume. Events published while a shard was disconnected are
//! lost: pub/sub is at most once, and consumers of the feed (the gateway hub) treat it as a notification.
//!
//! The first subscription of every shard is made before [`subscribe`] returns, so a caller that publishes after
//! it gets its events, and an unreachable shard is reported at once instead of being retried in the background.
//!
//! A shard task ends when the merged stream is dropped.
//!
//! Every (re)connect also reads the shard's epoch (see [`super::history`]) into the broker's cache, after the
//! subscription is confirmed: events published on a Redis that lost its data carry the new epoch from then on.
//!
//! [`EventFeed::subscribe`]: crate::EventFeed::subscribe

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use redis::Client;
use redis::aio::{PubSubSink, PubSubStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::conn::Link;
use super::history::{Epochs, refresh_epoch};
use super::keys::Layout;
use super::parse_published;
use super::topics::partition_pattern;
use crate::{BrokerError, EventStream};

/// Events buffered between the shard tasks and the stream's reader; a reader this far behind makes the shard
/// tasks wait (the redis crate buffers behind them).
const FEED_CAPACITY: usize = 4096;

/// Longest wait for a connection, a subscribe confirmation or a PING reply.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// How often a shard's connection is checked with a PING.
const PING_EVERY: Duration = Duration::from_secs(10);

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

type Session = (PubSubSink, PubSubStream);

/// Subscribe every shard (`(name without credentials, client)`) now, then keep each subscribed in its own task.
pub(super) async fn subscribe(
    shards: Vec<(String, Client, Layout)>,
    epochs: Arc<Epochs>,
) -> Result<EventStream, BrokerError> {
    let mut sessions = Vec::with_capacity(shards.len());
    for (i, (name, client, layout)) in shards.into_iter().enumerate() {
        let session = connect(&client, &layout, i, &epochs)
            .await
            .map_err(|e| BrokerError::Unavailable(format!("{name}: {e}")))?;
        sessions.push((i, name, client, layout, session));
    }
    let (out, rx) = mpsc::channel(FEED_CAPACITY);
    for (i, name, client, layout, session) in sessions {
        tokio::spawn(run_shard(
            i,
            epochs.clone(),
            name,
            client,
            layout,
            session,
            out.clone(),
        ));
    }
    Ok(ReceiverStream::new(rx).boxed())
}

async fn connect(
    client: &Client,
    layout: &Layout,
    shard: usize,
    epochs: &Epochs,
) -> Result<Session, String> {
    let ps = match tokio::time::timeout(COMMAND_TIMEOUT, client.get_async_pubsub()).await {
        Ok(Ok(ps)) => ps,
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err("connect timed out".into()),
    };
    let (mut sink, stream) = ps.split();
    let both = async {
        sink.subscribe(layout.events()).await?;
        sink.psubscribe(partition_pattern(layout)).await
    };
    match tokio::time::timeout(COMMAND_TIMEOUT, both).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err("subscribe timed out".into()),
    }
    let conn = match tokio::time::timeout(
        COMMAND_TIMEOUT,
        client.get_multiplexed_async_connection(),
    )
    .await
    {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err("connect timed out".into()),
    };
    refresh_epoch(
        &mut Link::Plain(conn),
        layout,
        shard,
        epochs,
        COMMAND_TIMEOUT,
    )
    .await?;
    Ok((sink, stream))
}

/// Why a session ended.
enum End {
    /// The merged stream was dropped: stop for good.
    Stop,
    /// The connection failed: reconnect.
    Lost(String),
}

async fn run_shard(
    shard: usize,
    epochs: Arc<Epochs>,
    name: String,
    client: Client,
    layout: Layout,
    first: Session,
    out: mpsc::Sender<ferry_core::Event>,
) {
    let mut session = Some(first);
    let mut backoff = MIN_BACKOFF;
    loop {
        if let Some((sink, stream)) = session.take() {
            match serve(sink, stream, &out).await {
                End::Stop => return,
                End::Lost(why) => {
                    tracing::warn!(shard = %name, error = %why, "job event feed disconnected, reconnecting");
                }
            }
            // A session that ran resets the backoff: the next failure is a new outage.
            backoff = MIN_BACKOFF;
        }
        tokio::select! {
            _ = out.closed() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        match connect(&client, &layout, shard, &epochs).await {
            Ok(s) => {
                tracing::info!(shard = %name, "job event feed reconnected and resubscribed");
                session = Some(s);
            }
            Err(why) => {
                tracing::debug!(shard = %name, error = %why, "job event feed still disconnected");
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Forward one connection's events until it fails or the merged stream is dropped.
async fn serve(
    mut sink: PubSubSink,
    mut stream: PubSubStream,
    out: &mpsc::Sender<ferry_core::Event>,
) -> End {
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
    loop {
        tokio::select! {
            _ = out.closed() => return End::Stop,
            msg = stream.next() => {
                let Some(msg) = msg else {
                    return End::Lost("connection closed".into());
                };
                let Ok(payload) = msg.get_payload::<String>() else {
                    continue;
                };
                for e in parse_published(&payload) {
                    if out.send(e).await.is_err() {
                        return End::Stop;
                    }
                }
            }
            _ = ping.tick() => {
                match tokio::time::timeout(COMMAND_TIMEOUT, sink.ping::<redis::Value>()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return End::Lost(e.to_string()),
                    Err(_) => return End::Lost("ping timed out".into()),
                }
            }
        }
    }
}
