//! How long a worker lives, and the task that ends idle workers' lives on time.
//!
//! A worker serves again only if its version keeps workers (`ttl` and `idleTimeout` above zero), is still the
//! deployed one, and the worker is younger than `ttl` and has served fewer than `maxRequests`. An idle worker
//! goes once it has been idle for `idleTimeout` (at most [`LOW_MEMORY_IDLE_TIMEOUT`] for a `lowMemory` app) or is
//! older than `ttl`: the reaper checks every [`REAP_INTERVAL`], and a request that finds one past its time drops
//! it rather than use it. While it is there, the reaper also hands waiters the slots of idle workers the policy
//! lets them take (each counted as an eviction), for versions that stopped competing since.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::slots::Idle;
use super::{bump, Pool, VersionRuntime};
use crate::backends::wasm::worker::Worker;

/// How often idle workers are checked against their `idleTimeout` and `ttl`.
const REAP_INTERVAL: Duration = Duration::from_millis(250);
/// A `lowMemory` app's idle workers are dropped after at most this long, whatever its `idleTimeout`.
const LOW_MEMORY_IDLE_TIMEOUT: Duration = Duration::from_secs(5);

impl VersionRuntime {
    /// How long an idle worker of this version is kept.
    fn idle_timeout(&self) -> Duration {
        let configured = Duration::from_secs(self.deployment.config.idle_timeout);
        if self.deployment.config.low_memory {
            configured.min(LOW_MEMORY_IDLE_TIMEOUT)
        } else {
            configured
        }
    }

    /// Whether a worker that just finished a request may serve another.
    pub(super) fn may_reuse(&self, worker: &Worker, now: Instant) -> bool {
        let config = &self.deployment.config;
        config.ttl > 0
            && config.idle_timeout > 0
            && !self.retired.load(std::sync::atomic::Ordering::Relaxed)
            && !self.single_use.load(std::sync::atomic::Ordering::Relaxed)
            && now.duration_since(worker.status.created) < Duration::from_secs(config.ttl)
            && (config.max_requests == 0 || worker.status.requests() < config.max_requests)
    }

    /// Whether an idle worker has outlived its `idleTimeout` or its `ttl`.
    pub(super) fn expired_while_idle(&self, worker: &Worker, now: Instant) -> bool {
        now.duration_since(worker.status.last_used()) >= self.idle_timeout()
            || now.duration_since(worker.status.created) >= Duration::from_secs(self.deployment.config.ttl)
    }
}

impl Pool {
    /// Drops idle workers past their `idleTimeout` or `ttl`. Run every [`REAP_INTERVAL`] by [`Pool::spawn_reaper`].
    pub(crate) fn reap(&self) -> usize {
        let now = Instant::now();
        let reaped: Vec<Idle> = {
            let mut state = self.shared.lock();
            let mut reaped = Vec::new();
            for list in state.idle.values_mut() {
                let mut i = 0;
                while i < list.len() {
                    if list[i].runtime.expired_while_idle(&list[i].worker, now) {
                        reaped.push(list.swap_remove(i));
                    } else {
                        i += 1;
                    }
                }
            }
            for idle in &reaped {
                state.lru.pop(&idle.worker.id());
            }
            // Waiters may now take the slots of idle workers whose versions stopped competing: at most one per
            // waiter, each slot passed on when its worker is dropped below (unlocked).
            for _ in 0..state.queued {
                let Some(next) = state.next_in_line(self.shared.cap, now) else {
                    break;
                };
                let Some((worker_id, key)) = state.evictable(self.shared.cap, next, now) else {
                    break;
                };
                reaped.push(state.take_idle(worker_id, key));
                bump(&self.counters.evictions);
            }
            state.idle.retain(|_, list| !list.is_empty());
            reaped
        };
        let count = reaped.len();
        drop(reaped);
        count
    }

    /// Reaps idle workers in the background for as long as the pool lives: the task holds only a weak handle,
    /// and ends at the first tick after the last strong one is gone.
    pub(crate) fn spawn_reaper(self: &Arc<Self>) {
        let pool = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(REAP_INTERVAL);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let Some(pool) = pool.upgrade() else { break };
                pool.reap();
            }
        });
    }
}
