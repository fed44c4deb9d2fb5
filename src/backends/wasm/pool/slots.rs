//! Slots and the queue: the mechanism that keeps `POOL_SIZE` a hard cap.
//!
//! Every live instance owns a [`Slot`], counted in [`State::live`] and, per version, in [`State::held`]. A slot
//! is made only under the cap; dropping it (with its instance) hands it straight to the next waiter in line, or
//! gives the room back, so neither count can drift. A request that cannot be served at once becomes a [`Waiter`]
//! of its version and is sent a [`Grant`]: a warm worker, a slot to start one in, or a refusal when a full queue
//! needs its place. Its wait ends at its deadline; leaving, however it happens, takes it out of the queue
//! ([`Leave`]). Who is next in line and who may be evicted is the policy's call ([`super::fair`]).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use lru::LruCache;
use tokio::sync::oneshot;

use super::{AcquireError, Lease, Pool, VersionRuntime};
use crate::backends::wasm::worker::{CallClock, Worker};

/// What every request shares: the cap, the queue's room, and the state behind one lock.
pub(super) struct Shared {
    pub(super) cap: usize,
    pub(super) queue_limit: usize,
    state: Mutex<State>,
}

/// A worker waiting idle for its version's next request, with the slot it holds.
pub(super) struct Idle {
    pub(super) worker: Worker,
    pub(super) runtime: Arc<VersionRuntime>,
    pub(super) slot: Slot,
}

/// The pool's state, all behind [`Shared`]'s one lock. Runtimes are named by their key.
pub(super) struct State {
    pub(super) live: usize,
    /// The most live instances there ever were at once.
    pub(super) peak: usize,
    /// Idle workers per runtime key; the most recently used last, so a hit takes the warmest.
    pub(super) idle: HashMap<u64, Vec<Idle>>,
    /// Idle worker ids (with their runtime key) in order of last use, for eviction across apps.
    pub(super) lru: LruCache<u64, u64>,
    /// Live slots per runtime key: what the fair share is counted in.
    pub(super) held: HashMap<u64, usize>,
    /// Waiters per runtime key, oldest first.
    pub(super) waiting: HashMap<u64, VecDeque<Waiter>>,
    /// Waiters across all runtimes.
    pub(super) queued: usize,
    next_waiter: u64,
    /// When each runtime last gave a worker back (for the policy's grace).
    pub(super) last_release: HashMap<u64, Instant>,
    /// How often each runtime's calls failed lately (trap, timeout, no response), smoothed: 0 never, 1 always.
    pub(super) failure_score: HashMap<u64, f32>,
}

/// A request waiting for a worker of its runtime.
pub(super) struct Waiter {
    pub(super) id: u64,
    pub(super) runtime: u64,
    pub(super) grant: oneshot::Sender<Grant>,
}

/// What a waiter is sent.
pub(super) enum Grant {
    Worker(Idle),
    Slot(Slot),
    /// The queue was full and a version with fewer waiters needed the place.
    Refused,
}

/// The right to one live instance, held by one runtime. Dropping it frees the room for the next waiter, or
/// gives it back.
pub(super) struct Slot {
    shared: Option<Arc<Shared>>,
    pub(super) owner: u64,
}

/// What [`Pool::acquire`] does, decided under the lock and done after it.
pub(super) enum Step {
    Warm(Idle),
    Create(Slot),
    Evict(Idle),
    Wait(u64, oneshot::Receiver<Grant>),
    Full,
}

impl Slot {
    /// Takes the slot's room away from it without freeing it, to hand it to someone else.
    fn disarm(mut self) {
        self.shared = None;
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.take() {
            shared.free_slot(&shared, self.owner);
        }
    }
}

impl Shared {
    pub(super) fn new(cap: usize, queue_limit: usize) -> Shared {
        Shared {
            cap,
            queue_limit,
            state: Mutex::new(State {
                live: 0,
                peak: 0,
                idle: HashMap::new(),
                lru: LruCache::unbounded(),
                held: HashMap::new(),
                waiting: HashMap::new(),
                queued: 0,
                next_waiter: 0,
                last_release: HashMap::new(),
                failure_score: HashMap::new(),
            }),
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        // A std mutex, since no `.await` happens while it is held, and each hold is a few map operations. A panic
        // while holding it cannot leave the counts half-updated in a way worse than stopping: keep serving.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A slot's instance is gone: pass the room to the next waiter in line, or give it back.
    fn free_slot(&self, this: &Arc<Shared>, owner: u64) {
        let mut state = self.lock();
        state.unhold(owner);
        let now = Instant::now();
        while let Some(runtime) = state.next_in_line(self.cap, now) {
            let waiter = state.pop_waiter(runtime).expect("a runtime in line has a waiter");
            let grant = Grant::Slot(Slot {
                shared: Some(this.clone()),
                owner: waiter.runtime,
            });
            match waiter.grant.send(grant) {
                Ok(()) => {
                    state.hold(waiter.runtime);
                    return;
                }
                // The waiter gave up; the room stays ours for the next one.
                Err(Grant::Slot(slot)) => slot.disarm(),
                Err(_) => unreachable!("a slot was sent"),
            }
        }
        state.live -= 1;
    }
}

impl State {
    /// Decides how `runtime` gets a worker: its warmest idle one (those past their time go to `expired`, to be
    /// dropped after the lock), a new slot under the cap, the slot of an idle worker the policy lets it evict, a
    /// place in the queue, or none.
    pub(super) fn step(
        &mut self,
        shared: &Arc<Shared>,
        runtime: &VersionRuntime,
        now: Instant,
        expired: &mut Vec<Idle>,
    ) -> Step {
        while let Some(idle) = self.idle.get_mut(&runtime.key).and_then(Vec::pop) {
            self.lru.pop(&idle.worker.id());
            if runtime.expired_while_idle(&idle.worker, now) {
                expired.push(idle);
            } else {
                return Step::Warm(idle);
            }
        }
        if self.live < shared.cap {
            self.live += 1;
            self.peak = self.peak.max(self.live);
            self.hold(runtime.key);
            return Step::Create(Slot {
                shared: Some(shared.clone()),
                owner: runtime.key,
            });
        }
        if let Some((worker_id, key)) = self.evictable(shared.cap, runtime.key, now) {
            let mut idle = self.take_idle(worker_id, key);
            // The slot changes hands: it counts toward the new runtime's share from now on.
            self.unhold(idle.slot.owner);
            self.hold(runtime.key);
            idle.slot.owner = runtime.key;
            return Step::Evict(idle);
        }
        if self.queued < shared.queue_limit || self.make_room(runtime.key) {
            let (grant, receiver) = oneshot::channel();
            let id = self.next_waiter;
            self.next_waiter += 1;
            self.queued += 1;
            self.waiting.entry(runtime.key).or_default().push_back(Waiter {
                id,
                runtime: runtime.key,
                grant,
            });
            return Step::Wait(id, receiver);
        }
        Step::Full
    }

    pub(super) fn hold(&mut self, runtime: u64) {
        *self.held.entry(runtime).or_default() += 1;
    }

    pub(super) fn unhold(&mut self, runtime: u64) {
        if let Some(held) = self.held.get_mut(&runtime) {
            *held -= 1;
            if *held == 0 {
                self.held.remove(&runtime);
                self.last_release.remove(&runtime);
            }
        }
    }

    pub(super) fn held(&self, runtime: u64) -> usize {
        self.held.get(&runtime).copied().unwrap_or(0)
    }

    /// Takes an idle worker out of the pool's lists.
    pub(super) fn take_idle(&mut self, worker_id: u64, runtime: u64) -> Idle {
        self.lru.pop(&worker_id);
        let list = self
            .idle
            .get_mut(&runtime)
            .expect("an idle worker in the LRU is in its list");
        let at = list.iter().position(|i| i.worker.id() == worker_id).expect("listed");
        list.remove(at)
    }

    /// Puts a worker in the idle lists, the most recently used.
    pub(super) fn park(&mut self, idle: Idle) {
        self.lru.put(idle.worker.id(), idle.runtime.key);
        self.idle.entry(idle.runtime.key).or_default().push(idle);
    }

    pub(super) fn pop_waiter(&mut self, runtime: u64) -> Option<Waiter> {
        let queue = self.waiting.get_mut(&runtime)?;
        let waiter = queue.pop_front();
        if queue.is_empty() {
            self.waiting.remove(&runtime);
        }
        if waiter.is_some() {
            self.queued -= 1;
        }
        waiter
    }

    /// In a full queue, refuses the newest waiter of the runtime with the most waiters, if it has more than one
    /// more than `runtime`: true if that made room.
    fn make_room(&mut self, runtime: u64) -> bool {
        let mine = self.waiting.get(&runtime).map_or(0, VecDeque::len);
        let Some((&largest, _)) = self
            .waiting
            .iter()
            .filter(|(_, queue)| queue.len() > mine + 1)
            .max_by_key(|(_, queue)| queue.len())
        else {
            return false;
        };
        let queue = self.waiting.get_mut(&largest).expect("just found");
        let refused = queue.pop_back().expect("a queue longer than another is not empty");
        self.queued -= 1;
        // A waiter that already gave up needs no word; either way its place is free.
        let _ = refused.grant.send(Grant::Refused);
        true
    }

    fn remove_waiter(&mut self, runtime: u64, id: u64) {
        if let Some(queue) = self.waiting.get_mut(&runtime) {
            let before = queue.len();
            queue.retain(|waiter| waiter.id != id);
            self.queued -= before - queue.len();
            if queue.is_empty() {
                self.waiting.remove(&runtime);
            }
        }
    }
}

impl Pool {
    /// Waits in the queue for a grant, until `deadline`.
    pub(super) async fn wait(
        &self,
        runtime: &Arc<VersionRuntime>,
        id: u64,
        receiver: oneshot::Receiver<Grant>,
        clock: &Arc<CallClock>,
        deadline: Option<Instant>,
    ) -> Result<Lease, AcquireError> {
        let mut leave = Leave {
            shared: &self.shared,
            runtime: runtime.key,
            id,
            receiver,
        };
        clock.set_queued(true);
        let granted = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline.into(), &mut leave.receiver).await.ok(),
            None => Some((&mut leave.receiver).await),
        };
        let grant = match granted {
            // Still queued as far as the front can tell: a deadline that came here came while waiting.
            Some(Ok(grant)) => {
                clock.set_queued(false);
                grant
            }
            _ => {
                drop(leave);
                return Err(self.queue_timed_out());
            }
        };
        drop(leave);
        match grant {
            Grant::Worker(idle) => Ok(self.warm(idle)),
            Grant::Slot(slot) => self.create(runtime, slot, clock).await,
            Grant::Refused => Err(self.refused()),
        }
    }
}

/// Leaves the queue however the wait ends, the caller giving up (dropping the wait) included; a grant that raced
/// with that is dropped, which passes it on.
struct Leave<'a> {
    shared: &'a Shared,
    runtime: u64,
    id: u64,
    receiver: oneshot::Receiver<Grant>,
}

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.receiver.close();
        if let Ok(grant) = self.receiver.try_recv() {
            drop(grant);
            return;
        }
        self.shared.lock().remove_waiter(self.runtime, self.id);
    }
}
