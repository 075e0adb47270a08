//! A connection's socket and its bounded send queue, shared by the connection's task and the hub.
//!
//! The hub writes a frame straight to the socket when nothing is ahead of it: the queue is empty, the
//! connection's task is not writing (or answering a request, see [`Outbox::hold`]), and the socket takes the
//! frame at once. That is nearly every frame of a fan-out, which then costs a write and no task wake, the way a
//! Node server writes a broadcast in one loop. (Waking 2,000 connection tasks per message kept both runtime
//! threads parking and unparking each other: about 28,000 context switches a second at 50,000 deliveries/s.)
//! Otherwise the frame is queued and the connection's task writes it, in order, when it can: a queue that fills
//! up is the slow-consumer signal.
//!
//! The queue is built to cost nothing while the connection is idle: a `VecDeque` that allocates on the first
//! queued frame and gives its buffer back once drained. (A tokio `mpsc` channel allocates its first block of 32
//! slots up front, about a kilobyte per connection, which is most of an idle WebSocket's budget.)
//!
//! One std mutex guards the socket, the queue and the flags. It is held for one poll of the socket or one queue
//! operation, never across an await, so the connection's task reads and writes through [`Socket`], which locks
//! it per poll.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use axum::extract::ws::{Message, Utf8Bytes, WebSocket};
use futures::{Sink, Stream};
use tokio::sync::Notify;
use tokio::sync::futures::Notified;

#[derive(Debug)]
pub(crate) struct Outbox {
    state: Mutex<State>,
    capacity: usize,
    ready: Notify,
}

#[derive(Debug, Default)]
struct State {
    /// Set once the upgrade completes; taken when the connection ends.
    socket: Option<WebSocket>,
    /// Boxed, and only while frames wait: inline, its 32 bytes took every connection's handle over a size class
    /// of the allocator (the handle is 496 bytes with it boxed).
    #[allow(clippy::box_collection)] // On purpose, see above.
    queue: Option<Box<VecDeque<Utf8Bytes>>>,
    /// The connection's task is writing (or will write first): the hub queues instead of writing.
    busy: bool,
    /// The hub wrote a frame the socket did not take whole: the connection's task must flush it.
    flush_owed: bool,
}

/// What [`Outbox::push`] did with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pushed {
    /// Handed to the socket (written, or buffered for the connection's task to flush).
    Written,
    /// Queued for the connection's task.
    Queued,
    /// The queue is full: the connection is a slow consumer. The frame was dropped.
    Full,
}

/// The connection task's next write (see [`Outbox::take_next`]).
#[derive(Debug)]
pub(crate) enum Next {
    Frame(Utf8Bytes),
    /// Only a flush, of a frame the hub wrote.
    Flush,
}

impl Outbox {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            state: Mutex::new(State::default()),
            capacity: capacity.max(1),
            ready: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Give the outbox its socket, once the upgrade is done. Until then (and after [`Outbox::detach`]) frames
    /// are queued.
    pub(crate) fn attach(&self, socket: WebSocket) {
        self.lock().socket = Some(socket);
    }

    /// Take the socket back when the connection ends: the hub writes nothing more, and dropping it closes it.
    pub(crate) fn detach(&self) -> Option<WebSocket> {
        let mut s = self.lock();
        s.busy = true;
        s.socket.take()
    }

    /// Write `frame` now if nothing is ahead of it, else queue it.
    pub(crate) fn push(&self, frame: Utf8Bytes) -> Pushed {
        let mut s = self.lock();
        let s = &mut *s;
        if !s.busy
            && s.queue.is_none()
            && let Some(socket) = s.socket.as_mut()
        {
            match write_now(socket, &frame) {
                Now::Done => return Pushed::Written,
                Now::Unflushed => {
                    s.busy = true;
                    s.flush_owed = true;
                    self.wake();
                    return Pushed::Written;
                }
                Now::Refused => {
                    // Not ready, or an error: the connection's task writes it, and meets the error itself.
                    s.busy = true;
                }
            }
        }
        let queue = s.queue.get_or_insert_with(Default::default);
        if queue.len() >= self.capacity {
            return Pushed::Full;
        }
        queue.push_back(frame);
        self.wake();
        Pushed::Queued
    }

    /// [`Outbox::take_next`], waiting for one.
    #[cfg(test)]
    pub(crate) async fn next(&self) -> Next {
        loop {
            if let Some(next) = self.take_next() {
                return next;
            }
            self.woken().await;
        }
    }

    /// The next write for the connection's task, if there is one; the hub stops writing until [`Outbox::done`].
    /// (The task waits for one in [`super::ConnHandle::signal`].)
    pub(crate) fn take_next(&self) -> Option<Next> {
        let mut s = self.lock();
        if s.flush_owed {
            s.flush_owed = false;
            s.busy = true;
            return Some(Next::Flush);
        }
        let frame = s.queue.as_mut().and_then(|q| q.pop_front())?;
        if s.queue.as_ref().is_some_and(|q| q.is_empty()) {
            // Back to no allocation while idle.
            s.queue = None;
        }
        s.busy = true;
        Some(Next::Frame(frame))
    }

    /// Wake the connection's task (a frame to write, or anything else it must look at, see
    /// [`super::ConnHandle::signal`]). Stores a permit when the task is not waiting, so a wake between its
    /// checks and its wait is not lost.
    pub(crate) fn wake(&self) {
        self.ready.notify_one();
    }

    /// Wait for a [`Outbox::wake`] (or take the permit one left). The `Notify`'s own future: an `async fn`
    /// around it would be 16 bytes more of every idle connection's task.
    pub(crate) fn woken(&self) -> Notified<'_> {
        self.ready.notified()
    }

    /// The connection's task is about to write (or to answer a request): the hub queues meanwhile, so nothing
    /// overtakes what the task writes first.
    pub(crate) fn hold(&self) {
        self.lock().busy = true;
    }

    /// The connection's task finished its write: the hub may write again once the queue is empty.
    pub(crate) fn done(&self) {
        self.lock().busy = false;
    }

    /// The socket, for the connection's task.
    pub(crate) fn socket(&self) -> Socket<'_> {
        Socket(self)
    }
}

enum Now {
    Done,
    Unflushed,
    Refused,
}

/// One attempt at writing a frame without waiting. The waker is a no-op: when the socket does not take the frame
/// whole, the connection's task is told to flush it and registers its own.
fn write_now(socket: &mut WebSocket, frame: &Utf8Bytes) -> Now {
    let mut cx = Context::from_waker(Waker::noop());
    let mut sink = Pin::new(socket);
    match sink.as_mut().poll_ready(&mut cx) {
        Poll::Ready(Ok(())) => {}
        _ => return Now::Refused,
    }
    if sink
        .as_mut()
        .start_send(Message::Text(frame.clone()))
        .is_err()
    {
        return Now::Refused;
    }
    match sink.poll_flush(&mut cx) {
        Poll::Ready(Ok(())) => Now::Done,
        // Pending, or an error the connection's task meets again on its flush.
        _ => Now::Unflushed,
    }
}

/// The connection's socket as its task sees it: a `Stream` and `Sink` that lock the outbox for each poll.
/// Polled after [`Outbox::detach`] (never, by the connection's own order), it is a closed stream and sink.
pub(crate) struct Socket<'a>(&'a Outbox);

impl Socket<'_> {
    fn with<T>(
        &self,
        f: impl FnOnce(Pin<&mut WebSocket>) -> Poll<Result<T, axum::Error>>,
    ) -> Poll<Result<T, axum::Error>> {
        match self.0.lock().socket.as_mut() {
            Some(socket) => f(Pin::new(socket)),
            None => Poll::Ready(Err(axum::Error::new("connection closed"))),
        }
    }
}

impl Stream for Socket<'_> {
    type Item = Result<Message, axum::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.0.lock().socket.as_mut() {
            Some(socket) => Pin::new(socket).poll_next(cx),
            None => Poll::Ready(None),
        }
    }
}

impl Sink<Message> for Socket<'_> {
    type Error = axum::Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.with(|s| s.poll_ready(cx))
    }

    fn start_send(self: Pin<&mut Self>, item: Message) -> Result<(), Self::Error> {
        match self.0.lock().socket.as_mut() {
            Some(socket) => Pin::new(socket).start_send(item),
            None => Err(axum::Error::new("connection closed")),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.with(|s| s.poll_flush(cx))
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.with(|s| s.poll_close(cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn without_a_socket_frames_queue_in_order_up_to_the_bound() {
        let o = std::sync::Arc::new(Outbox::new(2));
        assert_eq!(o.push("a".into()), Pushed::Queued);
        assert_eq!(o.push("b".into()), Pushed::Queued);
        assert_eq!(o.push("c".into()), Pushed::Full);
        for want in ["a", "b"] {
            match o.next().await {
                Next::Frame(f) => assert_eq!(f.as_str(), want),
                Next::Flush => panic!("nothing to flush"),
            }
            o.done();
        }
        let reader = {
            let o = o.clone();
            tokio::spawn(async move { o.next().await })
        };
        tokio::task::yield_now().await;
        assert_eq!(o.push("d".into()), Pushed::Queued);
        match reader.await.unwrap() {
            Next::Frame(f) => assert_eq!(f.as_str(), "d"),
            Next::Flush => panic!("nothing to flush"),
        }
        assert!(o.lock().queue.is_none(), "idle again: no buffer held");
    }
}
