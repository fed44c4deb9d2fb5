//! Instances that serve several requests at once: WASI 0.3 handlers of a version with `maxConcurrentRequests` over
//! one.
//!
//! Such an instance is lent as any other, to the request that found none open, and that request's call stays
//! open while others join it: each joined request is handed to the call, which runs it in the same event loop.
//! The instance goes back to the pool when its last request ends, so a version that gets one request at a time
//! uses its instances exactly as a 0.2 version does, and the cap, the fair share, eviction and the reaper see only
//! leases. Joining and leaving happen under one lock per version, so a request never joins a call that is ending:
//! once the count of requests in an open instance drops to zero, it is closed to joiners in the same step.
//!
//! What is handed over is opaque here (`Box<dyn Any>`): a call is [`invoke`](crate::backends::wasm::invoke)'s
//! business.

use std::any::Any;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::backends::wasm::status::WorkerStatus;

/// A request handed to an open instance's call.
pub(crate) type Joiner = Box<dyn Any + Send>;

/// The open instances of one version.
#[derive(Default)]
pub(crate) struct Seats {
    open: Mutex<Vec<Open>>,
    next_id: AtomicU64,
}

struct Open {
    id: u64,
    calls: mpsc::UnboundedSender<Joiner>,
    /// Requests in the instance: its opener's and those that joined, until each ends.
    in_flight: usize,
    /// Requests it may still take before `maxRequests` (`None`: no limit).
    remaining: Option<u64>,
    status: Arc<WorkerStatus>,
}

/// What a version allows an instance: how many requests at once, how many in all, how long.
#[derive(Clone, Copy)]
pub(crate) struct SeatLimits {
    pub(crate) at_once: usize,
    pub(crate) max_requests: u64,
    pub(crate) ttl: Duration,
}

impl Seats {
    /// Hands `joiner` to an open instance with room (fewer than `at_once` requests, within `maxRequests` and its
    /// `ttl`), or gives it back if there is none.
    pub(crate) fn join(&self, joiner: Joiner, limits: SeatLimits) -> Result<(), Joiner> {
        let mut open = lock(&self.open);
        let now = Instant::now();
        let room = open.iter_mut().find(|open| {
            open.in_flight < limits.at_once
                && open.remaining != Some(0)
                && now.duration_since(open.status.created) < limits.ttl
        });
        let Some(room) = room else {
            return Err(joiner);
        };
        match room.calls.send(joiner) {
            Ok(()) => {
                room.in_flight += 1;
                if let Some(remaining) = &mut room.remaining {
                    *remaining -= 1;
                }
                Ok(())
            }
            // The call ended without closing (it panicked): it takes no one, and goes.
            Err(mpsc::error::SendError(joiner)) => {
                let id = room.id;
                open.retain(|open| open.id != id);
                Err(joiner)
            }
        }
    }

    /// Opens the instance of `status`, which its opener's request is in: returns its id and where joiners arrive.
    pub(crate) fn open(&self, status: Arc<WorkerStatus>, limits: SeatLimits) -> (u64, mpsc::UnboundedReceiver<Joiner>) {
        let (calls, joiners) = mpsc::unbounded_channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let remaining =
            (limits.max_requests > 0).then(|| limits.max_requests.saturating_sub(status.requests()).saturating_sub(1));
        lock(&self.open).push(Open {
            id,
            calls,
            in_flight: 1,
            remaining,
            status,
        });
        (id, joiners)
    }

    /// One request in instance `id` ended. Returns whether others are still in it; when none is, the instance is
    /// closed to joiners in the same step.
    pub(crate) fn leave(&self, id: u64) -> bool {
        let mut open = lock(&self.open);
        let Some(at) = open.iter().position(|open| open.id == id) else {
            return false;
        };
        open[at].in_flight -= 1;
        if open[at].in_flight > 0 {
            return true;
        }
        open.swap_remove(at);
        false
    }

    /// Forgets instance `id`, whatever is still counted in it: its call ended (its store trapped).
    pub(crate) fn remove(&self, id: u64) {
        lock(&self.open).retain(|open| open.id != id);
    }

    /// Takes no more joiners into instance `id` (its state can no longer be trusted); those in it run on.
    pub(crate) fn close(&self, id: u64) {
        if let Some(open) = lock(&self.open).iter_mut().find(|open| open.id == id) {
            open.remaining = Some(0);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
