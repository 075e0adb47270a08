//! A connection's bounded send queue, built to cost nothing while the connection is idle: a `VecDeque` that
//! allocates on the first queued frame and gives its buffer back once drained. (A tokio `mpsc` channel allocates
//! its first block of 32 slots up front, about a kilobyte per connection, which is most of an idle WebSocket's
//! budget.) The hub pushes without waiting; a full outbox is the slow-consumer signal.

use std::collections::VecDeque;
use std::sync::Mutex;

use axum::extract::ws::Utf8Bytes;
use tokio::sync::Notify;

#[derive(Debug)]
pub(crate) struct Outbox {
    /// A std mutex: held for a push or a pop only, never across an await.
    queue: Mutex<VecDeque<Utf8Bytes>>,
    capacity: usize,
    ready: Notify,
}

impl Outbox {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            queue: Mutex::new(VecDeque::new()),
            capacity: capacity.max(1),
            ready: Notify::new(),
        }
    }

    /// Queue a frame; `false` when the outbox is full (the connection is a slow consumer).
    pub(crate) fn push(&self, frame: Utf8Bytes) -> bool {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() >= self.capacity {
            return false;
        }
        q.push_back(frame);
        drop(q);
        // Stores a permit when the connection is not waiting yet, so a push between its empty check and its
        // wait is not lost.
        self.ready.notify_one();
        true
    }

    /// The next frame, waiting for one.
    pub(crate) async fn pop(&self) -> Utf8Bytes {
        loop {
            {
                let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(frame) = q.pop_front() {
                    if q.is_empty() && q.capacity() > 0 {
                        // Back to no allocation while idle.
                        *q = VecDeque::new();
                    }
                    return frame;
                }
            }
            self.ready.notified().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bounded_fifo_that_wakes_the_reader() {
        let o = std::sync::Arc::new(Outbox::new(2));
        assert!(o.push("a".into()));
        assert!(o.push("b".into()));
        assert!(!o.push("c".into()), "full");
        assert_eq!(o.pop().await.as_str(), "a");
        assert_eq!(o.pop().await.as_str(), "b");
        let reader = {
            let o = o.clone();
            tokio::spawn(async move { o.pop().await })
        };
        tokio::task::yield_now().await;
        assert!(o.push("d".into()));
        assert_eq!(reader.await.unwrap().as_str(), "d");
        assert_eq!(
            o.queue.lock().unwrap().capacity(),
            0,
            "idle again: no buffer held"
        );
    }
}
