//! The reuse policy: which version a freed slot, a given-back worker or an idle worker's slot goes to.
//!
//! Under contention each version gets a fair share of the cap ([`State::share_of`]): a version whose calls keep
//! failing (its smoothed failure score over one half) gets one slot, the others split the rest evenly; alone, a
//! version gets them all. A version competes while it has a request in progress or waiting, and for
//! [`CONTENDING_FOR`] after it gave a worker back, a grace that holds only against versions whose calls keep
//! failing. A freed slot goes to the waiter furthest below its share ([`State::next_in_line`]); an idle worker is
//! evicted only for a version it does not compete with, or by one below its share from one above its own
//! ([`State::evictable`]); a given-back worker stays with a version within its share ([`Pool::put_back`]).

use std::collections::HashSet;
use std::time::Instant;

use super::slots::{Grant, Idle, State};
use super::{bump, Lease, Pool};

/// A version that gave a worker back this recently still counts as competing for the pool.
pub(super) const CONTENDING_FOR: std::time::Duration = std::time::Duration::from_millis(250);
/// How much each call's outcome moves its version's failure score (see the fair share in this module's header).
const FAILURE_WEIGHT: f32 = 0.2;

impl State {
    /// Whether a runtime competes for the pool: it has a request in progress or waiting.
    fn in_progress(&self, runtime: u64) -> bool {
        let idle = self.idle.get(&runtime).map_or(0, Vec::len);
        self.held(runtime) > idle || self.waiting.contains_key(&runtime)
    }

    /// Whether a runtime competes for the pool: a request in progress or waiting, or one just finished.
    fn contending(&self, runtime: u64, now: Instant) -> bool {
        self.in_progress(runtime)
            || self
                .last_release
                .get(&runtime)
                .is_some_and(|at| now.duration_since(*at) < CONTENDING_FOR)
    }

    /// Moves a runtime's failure score by one call's outcome.
    pub(super) fn record(&mut self, runtime: u64, failed: bool) {
        let score = self.failure_score.entry(runtime).or_default();
        *score = *score * (1.0 - FAILURE_WEIGHT) + if failed { FAILURE_WEIGHT } else { 0.0 };
    }

    fn failing(&self, runtime: u64) -> bool {
        self.failure_score.get(&runtime).is_some_and(|score| *score > 0.5)
    }

    /// The slots `runtime` may count on while others compete (itself counted as competing): a version whose calls
    /// keep failing gets one, the others split the rest evenly (rounded up); alone, any version gets them all.
    fn share_of(&self, cap: usize, runtime: u64, now: Instant) -> usize {
        let competing: HashSet<u64> = self
            .held
            .keys()
            .chain(self.waiting.keys())
            .copied()
            .filter(|other| self.contending(*other, now))
            .chain(std::iter::once(runtime))
            .collect();
        let failing = competing.iter().filter(|other| self.failing(**other)).count();
        let healthy = competing.len() - failing;
        match (self.failing(runtime), healthy) {
            (true, 0) => cap.div_ceil(failing),
            (true, _) => 1,
            (false, _) => cap.saturating_sub(failing).max(1).div_ceil(healthy),
        }
    }

    /// The least recently used idle worker that `runtime` may take the slot of: one of a runtime that is not
    /// competing, or that holds more than its share while `runtime` holds less than its own.
    pub(super) fn evictable(&self, cap: usize, runtime: u64, now: Instant) -> Option<(u64, u64)> {
        let below_share = self.held(runtime) < self.share_of(cap, runtime, now);
        let failing = self.failing(runtime);
        self.lru
            .iter()
            .rev()
            .find(|(_, owner)| {
                let protected = if failing {
                    self.contending(**owner, now)
                } else {
                    self.in_progress(**owner)
                };
                !protected || (below_share && self.held(**owner) > self.share_of(cap, **owner, now))
            })
            .map(|(worker, owner)| (*worker, *owner))
    }

    /// The runtime whose waiter is served next: the one furthest below its share, the oldest waiter first.
    pub(super) fn next_in_line(&self, cap: usize, now: Instant) -> Option<u64> {
        if self.waiting.len() == 1 {
            return self.waiting.keys().next().copied();
        }
        self.waiting
            .iter()
            .filter_map(|(runtime, queue)| Some((*runtime, queue.front()?.id)))
            .min_by_key(|(runtime, first)| {
                let over = self.held(*runtime) as i64 - self.share_of(cap, *runtime, now) as i64;
                (over, *first)
            })
            .map(|(runtime, _)| runtime)
    }
}

impl Pool {
    /// Takes a worker back. One that may serve again (`healthy`, and within its version's `ttl`, `maxRequests`,
    /// ...) goes to a waiter of its version, or waits idle; otherwise it is dropped and its slot passed on.
    /// `failed` is how the request it served went for the version's failure score (`None`: it served none).
    pub(super) fn put_back(&self, lease: Lease, healthy: bool, failed: Option<bool>) {
        let served = failed.is_some();
        let Lease {
            worker, runtime, slot, ..
        } = lease;
        let now = Instant::now();
        worker
            .status
            .finished(worker.status.requests() + u64::from(served), now);
        let key = runtime.key;
        let reuse = healthy && runtime.may_reuse(&worker, now);
        let mut state = self.shared.lock();
        if let Some(failed) = failed {
            state.record(key, failed);
        }
        if !reuse {
            drop(state);
            drop(worker);
            drop(slot);
            return;
        }
        let mut idle = Idle { worker, runtime, slot };
        state.last_release.insert(key, now);
        let cap = self.shared.cap;
        loop {
            let own = match state.next_in_line(cap, now) {
                Some(next) if next == key => next,
                // Another version is further below its share: it gets this worker's slot if this version holds
                // more than its own, or, unless it is a version whose calls keep failing, if this one has nothing
                // else in progress (after the lock is released, so the drop below does the handing over).
                Some(next)
                    if state.held(key) > state.share_of(cap, key, now)
                        || (!state.failing(next)
                            && state.held(key) <= 1 + state.idle.get(&key).map_or(0, Vec::len)) =>
                {
                    // A warm worker goes so that a request for another version gets its slot: an eviction.
                    drop(state);
                    bump(&self.counters.evictions);
                    drop(idle);
                    return;
                }
                // Within its share, a version keeps its warm worker: for its own next waiter, or idle.
                _ if state.waiting.contains_key(&key) => key,
                _ => break,
            };
            let waiter = state.pop_waiter(own).expect("a runtime in line has a waiter");
            match waiter.grant.send(Grant::Worker(idle)) {
                Ok(()) => return,
                Err(Grant::Worker(back)) => idle = back,
                Err(_) => unreachable!("a worker was sent"),
            }
        }
        state.park(idle);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::sync::oneshot;

    use super::*;
    use crate::backends::wasm::pool::slots::{Shared, Waiter};

    const CAP: usize = 8;

    /// Gives `runtime` `count` slots held by requests in progress.
    fn busy(state: &mut State, runtime: u64, count: usize) {
        for _ in 0..count {
            state.hold(runtime);
        }
    }

    /// Queues a request of `runtime`, as the `id`-th to arrive.
    fn queue(state: &mut State, runtime: u64, id: u64) -> oneshot::Receiver<Grant> {
        let (grant, receiver) = oneshot::channel();
        state
            .waiting
            .entry(runtime)
            .or_default()
            .push_back(Waiter { id, runtime, grant });
        state.queued += 1;
        receiver
    }

    fn fail(state: &mut State, runtime: u64, calls: usize) {
        for _ in 0..calls {
            state.record(runtime, true);
        }
    }

    #[test]
    fn a_version_alone_may_use_the_whole_pool() {
        let shared = Shared::new(CAP, 16);
        let mut state = shared.lock();
        assert_eq!(state.share_of(CAP, 1, Instant::now()), CAP);
        busy(&mut state, 1, CAP);
        assert_eq!(state.share_of(CAP, 1, Instant::now()), CAP);
    }

    #[test]
    fn competing_versions_split_the_pool_evenly_rounded_up() {
        let shared = Shared::new(CAP, 16);
        let mut state = shared.lock();
        busy(&mut state, 1, 6);
        let _waiting = queue(&mut state, 2, 0);
        let now = Instant::now();
        assert_eq!(state.share_of(CAP, 1, now), 4);
        assert_eq!(state.share_of(CAP, 2, now), 4);
        busy(&mut state, 3, 1);
        assert_eq!(state.share_of(CAP, 3, now), 3);
    }

    #[test]
    fn a_version_whose_calls_keep_failing_gets_one_slot_and_the_others_the_rest() {
        let shared = Shared::new(CAP, 16);
        let mut state = shared.lock();
        busy(&mut state, 1, 2);
        busy(&mut state, 2, 6);
        fail(&mut state, 2, 3);
        assert!(!state.failing(2), "three failures in a row stay under one half");
        fail(&mut state, 2, 1);
        assert!(state.failing(2));
        let now = Instant::now();
        assert_eq!(state.share_of(CAP, 2, now), 1);
        assert_eq!(state.share_of(CAP, 1, now), CAP - 1);
        // Alone, even a failing version may use the whole pool.
        state.held.remove(&1);
        assert_eq!(state.share_of(CAP, 2, now), CAP);
    }

    #[test]
    fn a_failure_score_comes_down_as_calls_succeed() {
        let shared = Shared::new(CAP, 16);
        let mut state = shared.lock();
        fail(&mut state, 1, 10);
        assert!(state.failing(1));
        let successes = (1..).find(|_| {
            state.record(1, false);
            !state.failing(1)
        });
        assert_eq!(successes, Some(3));
    }

    #[test]
    fn the_next_waiter_served_is_of_the_version_furthest_below_its_share_then_the_oldest() {
        let shared = Shared::new(CAP, 16);
        let mut state = shared.lock();
        busy(&mut state, 1, 6);
        busy(&mut state, 2, 2);
        let _first = queue(&mut state, 1, 0);
        let _second = queue(&mut state, 2, 1);
        let now = Instant::now();
        assert_eq!(state.next_in_line(CAP, now), Some(2));
        state.unhold(1);
        state.unhold(1);
        state.hold(2);
        state.hold(2);
        assert_eq!(state.held(1), state.held(2));
        assert_eq!(state.next_in_line(CAP, now), Some(1), "among equals, the oldest waiter");
    }

    #[test]
    fn a_version_that_just_gave_a_worker_back_competes_only_for_the_grace() {
        let shared = Shared::new(CAP, 16);
        let mut state = shared.lock();
        let now = Instant::now();
        state.last_release.insert(1, now);
        assert!(!state.in_progress(1));
        assert!(state.contending(1, now + CONTENDING_FOR - Duration::from_millis(1)));
        assert!(!state.contending(1, now + CONTENDING_FOR));
    }
}
