//! The worker pool: how many instances live, which are kept warm, and who waits when there is no room.
//!
//! `POOL_SIZE` is a hard cap on live instances (idle + busy + being created) across all apps. Every live
//! instance owns a slot; a slot is only ever created under the cap and, when its instance goes away, it is handed
//! straight to the first waiter or given back, so the count can never drift. A request that finds no warm worker
//! of its version takes a free slot, else evicts the least recently used idle worker of any app, else waits in a
//! bounded queue until its deadline; a full queue is refused at once.
//!
//! Under contention each version gets a fair share of the pool, and an app alone can still use all of it. The
//! versions competing are those with a request in progress or waiting, or that gave a worker back in the last
//! [`fair::CONTENDING_FOR`] (so a client sending one request after another keeps its share between them; that grace
//! holds only against versions whose calls keep failing, so a healthy app never waits on another's idle worker);
//! a version whose calls keep failing (trap, timeout, no response: a smoothed failure rate over one half) gets one
//! slot, and the others split the rest evenly. A slot that frees up goes to the waiting version furthest below
//! its share (the oldest waiter among equals); a version within its share keeps the workers it gives back (for its
//! own waiters, or idle, safe from eviction by others), one over its share hands them to whoever is further
//! below. No config is needed. A full queue makes room for a version with fewer waiters by refusing the newest
//! waiter of the version with the most, so one app's flood cannot lock the others out of the queue either.
//!
//! # How the parts fit
//!
//! The [`Pool`] below is the façade: [`Pool::acquire`] lends a worker as a [`Lease`], [`Pool::release`] takes it
//! back with the call's [`Outcome`] and is where outcomes are counted. Behind it, one lock guards one state, and
//! each part is a story of its own:
//!
//! - [`slots`]: the mechanism. The cap and the count of live instances, the slots each version holds, the idle
//!   workers, and the queue: waiters per version, each granted a warm worker or a free slot, or refused.
//! - [`fair`]: the policy that mechanism asks. Each version's share, whose waiter is next in line, which idle
//!   worker may be evicted for whom, the failure scores and the grace of a version that just gave a worker back,
//!   and where a given-back worker goes.
//! - [`runtimes`]: following the registry. One runtime per deployed version (its compiled component, shared by
//!   every worker of it, compiled at most once), remade when the version changes, retired when it goes; the
//!   background compiles of what a reload added; the guest CPU meters, kept when a version goes.
//! - [`reaper`]: how long a worker lives (`ttl`, `idleTimeout`, `maxRequests`, `lowMemory`), and the task that
//!   drops idle workers past their time and hands their slots to waiters.
//!
//! Workers are dropped outside the pool's lock: dropping one frees its slot, which takes the lock.

mod fair;
mod reaper;
mod runtimes;
mod seats;
mod slots;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::backends::wasm::engine::{Engine, LoadError, Ticking};
use crate::backends::wasm::status::WorkerTable;
use crate::backends::wasm::worker::{CallClock, Worker};

pub(crate) use runtimes::VersionRuntime;
pub(crate) use seats::{Joiner, SeatLimits};

use runtimes::Versions;
use slots::{Idle, Shared, Slot, Step};

/// Default `POOL_SIZE`: live instances across all apps.
pub const DEFAULT_POOL_SIZE: usize = 32;
/// Default `--queue-limit`: requests that may wait for a worker at once.
pub(crate) const DEFAULT_QUEUE_LIMIT: usize = 1024;

/// What a call that never set its response is told (in its `500`) and logged as.
pub(crate) const NO_RESPONSE: &str =
    "the app returned without setting a response (response-outparam::set was never called)";

/// Why no worker could be had.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AcquireError {
    #[error("every worker is busy and {limit} requests are already waiting")]
    QueueFull { limit: usize },
    #[error("every worker stayed busy until the request's deadline")]
    QueueTimeout,
    #[error("the worker could not be started")]
    Instantiate(#[source] StartError),
    /// The request's deadline passed while its new worker was being started (a component compiled on this first
    /// request, a start function that runs long): a timeout of the request, counted as one, and a failed worker.
    #[error("the request's deadline passed while its worker was being started")]
    StartTimedOut,
}

/// Why a new worker could not be started.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StartError {
    /// The version's component did not load. One compile serves every request waiting on it, so they all get
    /// the same cause.
    #[error(transparent)]
    Load(Arc<LoadError>),
    /// The component loaded but could not be instantiated.
    #[error(transparent)]
    Instantiate(anyhow::Error),
}

/// How a call on a lent worker ended: what [`Pool::release`] counts, and whether the worker serves again.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The handler returned after setting a response: the worker may be reused.
    Returned,
    /// The handler trapped (a panic, running out of memory, ...).
    Trapped(Arc<wasmtime::Error>),
    /// The deadline passed before the response head, or the body stopped and the call never returned.
    TimedOut,
    /// The handler returned, or dropped its `response-outparam`, without setting a response.
    NoResponse,
    /// The client went away (or the body was cut) mid-call: the call was stopped, but the app did not fail.
    Abandoned,
}

/// A worker lent to one request. Give it back with [`Pool::release`]; dropping it discards the worker.
pub(crate) struct Lease {
    pub(crate) worker: Worker,
    pub(crate) runtime: Arc<VersionRuntime>,
    /// The epoch moves while a worker is lent, whatever thread runs it: its guest may compute.
    _ticking: Ticking,
    // Declared last so it drops last: the instance is gone before its slot is reused.
    slot: Slot,
}

/// How full the pool is, at one instant.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PoolStats {
    pub(crate) capacity: usize,
    /// Idle, busy and being created.
    pub(crate) live: usize,
    pub(crate) idle: usize,
    pub(crate) queued: usize,
    pub(crate) peak: usize,
}

/// Counters kept by the pool: by [`Pool::acquire`] for how workers were had, and by [`Pool::release`] for how the
/// calls on them ended. Read them with [`PoolCounters::read`].
#[derive(Debug, Default)]
pub(crate) struct PoolCounters {
    created: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
    queue_rejected: AtomicU64,
    /// Requests whose deadline passed while they waited in the queue.
    queue_timeouts: AtomicU64,
    /// Workers that could not be instantiated, or were discarded after a trap, a timeout or no response.
    failed: AtomicU64,
    timeouts: AtomicU64,
    traps: AtomicU64,
}

/// [`PoolCounters`] read at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct PoolCounts {
    pub(crate) created: u64,
    pub(crate) hits: u64,
    pub(crate) misses: u64,
    pub(crate) evictions: u64,
    pub(crate) queue_rejected: u64,
    pub(crate) queue_timeouts: u64,
    pub(crate) failed: u64,
    pub(crate) timeouts: u64,
    pub(crate) traps: u64,
}

impl PoolCounters {
    pub(crate) fn read(&self) -> PoolCounts {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        PoolCounts {
            created: load(&self.created),
            hits: load(&self.hits),
            misses: load(&self.misses),
            evictions: load(&self.evictions),
            queue_rejected: load(&self.queue_rejected),
            queue_timeouts: load(&self.queue_timeouts),
            failed: load(&self.failed),
            timeouts: load(&self.timeouts),
            traps: load(&self.traps),
        }
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// The pool, shared by every request.
pub(crate) struct Pool {
    engine: Arc<Engine>,
    shared: Arc<Shared>,
    versions: Versions,
    pub(crate) counters: Arc<PoolCounters>,
    workers: Arc<WorkerTable>,
}

impl Pool {
    pub(crate) fn new(engine: Arc<Engine>, pool_size: usize, queue_limit: usize) -> Pool {
        Pool {
            engine,
            shared: Arc::new(Shared::new(pool_size, queue_limit)),
            versions: Versions::new(),
            counters: Arc::default(),
            workers: Arc::default(),
        }
    }

    pub(crate) fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Every live worker's status.
    pub(crate) fn workers(&self) -> &Arc<WorkerTable> {
        &self.workers
    }

    /// The pool's occupancy, read at one instant.
    pub(crate) fn stats(&self) -> PoolStats {
        let state = self.shared.lock();
        PoolStats {
            capacity: self.shared.cap,
            live: state.live,
            idle: state.lru.len(),
            queued: state.queued,
            peak: state.peak,
        }
    }

    /// A worker for `runtime`: a warm one, a new one in a free or evicted slot, or one that frees up before
    /// `deadline`. A new instance is started under `clock`, whose deadline covers its instantiation.
    pub(crate) async fn acquire(
        &self,
        runtime: &Arc<VersionRuntime>,
        clock: &Arc<CallClock>,
        deadline: Option<Instant>,
    ) -> Result<Lease, AcquireError> {
        let now = Instant::now();
        let mut expired = Vec::new();
        let step = self.shared.lock().step(&self.shared, runtime, now, &mut expired);
        drop(expired);
        match step {
            Step::Warm(idle) => Ok(self.warm(idle)),
            Step::Create(slot) => self.create(runtime, slot, clock).await,
            Step::Evict(idle) => {
                bump(&self.counters.evictions);
                tracing::debug!(
                    app = %idle.runtime.identity.app,
                    version = %idle.runtime.identity.version,
                    worker = idle.worker.id(),
                    "evicting an idle worker to make room"
                );
                let Idle { worker, slot, .. } = idle;
                drop(worker);
                self.create(runtime, slot, clock).await
            }
            Step::Wait(id, receiver) => self.wait(runtime, id, receiver, clock, deadline).await,
            Step::Full => Err(self.refused()),
        }
    }

    /// Counts a request refused a place in the queue.
    fn refused(&self) -> AcquireError {
        bump(&self.counters.queue_rejected);
        AcquireError::QueueFull {
            limit: self.shared.queue_limit,
        }
    }

    /// Counts a request whose deadline passed while it waited in the queue: seen by its wait, or by the front
    /// when the call was still queued at the deadline.
    pub(crate) fn queue_timed_out(&self) -> AcquireError {
        bump(&self.counters.queue_timeouts);
        AcquireError::QueueTimeout
    }

    /// Lends a warm worker: a hit.
    fn warm(&self, idle: Idle) -> Lease {
        bump(&self.counters.hits);
        idle.worker.status.lent();
        Lease {
            worker: idle.worker,
            runtime: idle.runtime,
            _ticking: self.engine.ticking(),
            slot: idle.slot,
        }
    }

    /// Starts a new worker of `runtime` in `slot`: a miss.
    async fn create(
        &self,
        runtime: &Arc<VersionRuntime>,
        slot: Slot,
        clock: &Arc<CallClock>,
    ) -> Result<Lease, AcquireError> {
        bump(&self.counters.misses);
        let failed = |cause: StartError| {
            bump(&self.counters.failed);
            AcquireError::Instantiate(cause)
        };
        let loaded = runtime
            .loaded(&self.engine)
            .await
            .map_err(|error| failed(StartError::Load(error)))?;
        // Before instantiating: a component's start function is guest code too, and has the same deadline.
        let ticking = self.engine.ticking();
        let worker = Worker::new(
            &loaded.engine,
            &loaded.pre,
            &runtime.deployment,
            &runtime.identity,
            clock.clone(),
            &self.workers,
        )
        .await
        .map_err(|error| {
            if clock.timed_out() {
                bump(&self.counters.timeouts);
                bump(&self.counters.failed);
                AcquireError::StartTimedOut
            } else {
                failed(StartError::Instantiate(error))
            }
        })?;
        bump(&self.counters.created);
        Ok(Lease {
            worker,
            runtime: runtime.clone(),
            _ticking: ticking,
            slot,
        })
    }

    /// Takes a worker back after a request, counting how the call ended. Only a worker whose handler returned
    /// may serve again (a call cut short leaves the instance wherever the guest was): it goes to a waiter, or
    /// waits idle (see [`fair`]); any other is dropped and its slot passed on. A trap, a timeout or no response
    /// counts toward the version's failure score; a client that went away does not, since the app did not fail.
    pub(crate) fn release(&self, lease: Lease, outcome: Outcome) {
        // A call on a worker that had served before: one that answers nothing, of a version whose reused workers
        // never answered, will do so again, and the version is served on fresh instances from then on.
        if lease.worker.status.requests() > 0 {
            match outcome {
                Outcome::Returned => self.reused_call_ended(&lease.runtime, true),
                Outcome::NoResponse => self.reused_call_ended(&lease.runtime, false),
                _ => {}
            }
        }
        let failed = self.count(&lease.runtime, &outcome);
        self.put_back(lease, matches!(outcome, Outcome::Returned), Some(failed));
    }

    /// Counts how one call on a worker of `runtime` ended, logging a failure; returns whether it failed.
    pub(crate) fn count(&self, runtime: &VersionRuntime, outcome: &Outcome) -> bool {
        let counters = &self.counters;
        let failure = match outcome {
            Outcome::Returned | Outcome::Abandoned => None,
            Outcome::TimedOut => {
                bump(&counters.timeouts);
                Some("the request ran past its timeout".to_owned())
            }
            Outcome::Trapped(error) => {
                bump(&counters.traps);
                Some(format!("the worker trapped: {error:?}"))
            }
            Outcome::NoResponse => Some(NO_RESPONSE.to_owned()),
        };
        let Some(failure) = failure else {
            return false;
        };
        bump(&counters.failed);
        if let Some(suppressed) = runtime.failure_log.admit() {
            let identity = &runtime.identity;
            tracing::error!(
                app = %identity.app,
                version = %identity.version,
                suppressed,
                "{failure}; the worker is discarded"
            );
        }
        true
    }

    /// A request joined an instance already serving others (see [`seats`]): a hit.
    pub(crate) fn joined(&self) {
        bump(&self.counters.hits);
    }

    /// Takes back an instance that served several requests at once: its opener's and `joined` more, each already
    /// [counted](Pool::count). It serves again only if every one of them returned; `failed` if any failed.
    pub(crate) fn release_shared(&self, lease: Lease, joined: u64, reusable: bool, failed: bool) {
        let status = &lease.worker.status;
        status.finished(status.requests() + joined, Instant::now());
        self.put_back(lease, reusable, Some(failed));
    }

    /// Takes back a worker that served no request (a health check): kept warm if its version keeps workers.
    pub(crate) fn release_unused(&self, lease: Lease) {
        self.put_back(lease, true, None);
    }

    /// Drops every idle worker (at shutdown, so instances go before the engine).
    pub(crate) fn clear(&self) {
        let dropped: Vec<Idle> = {
            let mut state = self.shared.lock();
            state.lru.clear();
            state.idle.drain().flat_map(|(_, list)| list).collect()
        };
        drop(dropped);
    }
}
