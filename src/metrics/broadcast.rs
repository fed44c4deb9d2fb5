//! The SSE broadcast: the latest frame, built once per sampler tick for every subscriber, and the signal that ends
//! every stream at the start of a drain.
//!
//! A [`watch`] channel holds only the newest frame, so a subscriber that falls behind skips to it instead of
//! queueing stale ones, and its receiver count is the number of open streams. The frame is built only while
//! someone listens.

use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The latest SSE frame's contents: built once per tick, shared by every subscriber.
#[derive(Debug, Clone)]
pub(crate) struct Update {
    /// Counts the frames built, from 1; 0 is the placeholder sent to nobody before the first.
    pub(crate) seq: u64,
    pub(crate) json: Arc<str>,
}

pub(super) struct Broadcast {
    updates: watch::Sender<Update>,
    closing: CancellationToken,
}

impl Broadcast {
    pub(super) fn new() -> Broadcast {
        let (updates, _) = watch::channel(Update {
            seq: 0,
            json: Arc::from("{}"),
        });
        Broadcast {
            updates,
            closing: CancellationToken::new(),
        }
    }

    /// Sends the next frame, built by `json`, if anyone listens.
    pub(super) fn publish(&self, json: impl FnOnce() -> String) {
        if self.updates.receiver_count() == 0 {
            return;
        }
        let json = json();
        let seq = self.updates.borrow().seq + 1;
        self.updates.send_replace(Update {
            seq,
            json: Arc::from(json),
        });
    }

    pub(super) fn subscribe(&self) -> watch::Receiver<Update> {
        self.updates.subscribe()
    }

    pub(super) fn subscribers(&self) -> usize {
        self.updates.receiver_count()
    }

    pub(super) fn closing(&self) -> CancellationToken {
        self.closing.clone()
    }

    pub(super) fn close(&self) {
        self.closing.cancel();
    }
}
