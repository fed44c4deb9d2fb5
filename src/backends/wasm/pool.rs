//! The worker pool: how many instances live, which are kept warm, and who waits when there is no room.
//!
//! `POOL_SIZE` is a hard cap on live instances (idle + busy + being created) across all apps. Every live
//! instance owns a [`Slot`]; a slot is only ever created under the cap and, when its instance goes away, it is
//! handed straight to the first waiter or given back, so the count can never drift. A request that finds no warm
//! worker of its version takes a free slot, else evicts the least recently used idle worker of any app, else waits
//! in a bounded queue until its deadline; a full queue is refused at once.
//!
//! Under contention each version gets a fair share of the pool, and an app alone can still use all of it. The
//! versions competing are those with a request in progress or waiting, or that gave a worker back in the last
//! [`CONTENDING_FOR`] (so a client sending one request after another keeps its share between them; that grace
//! holds only against versions whose calls keep failing, so a healthy app never waits on another's idle worker);
//! a version whose calls keep failing (trap, timeout, no response: a smoothed failure rate
//! over one half) gets one slot, and the others split the rest evenly. A slot that frees up goes to the waiting
//! version furthest below its share (the oldest waiter among equals); a version within its share keeps the
//! workers it gives back (for its own waiters, or idle, safe from eviction by others), one over its share hands
//! them to whoever is further below. No config is needed. A full queue makes room for a version with fewer
//! waiters by refusing the newest waiter of the version with the most, so one app's flood cannot lock the others
//! out of the queue either.
//!
//! Workers are dropped outside the pool's lock: dropping one frees its slot, which takes the lock.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use lru::LruCache;
use tokio::sync::{oneshot, OnceCell};

use crate::backends::wasm::engine::{Engine, Loaded};
use crate::backends::wasm::lanes::VersionMeter;
use crate::backends::wasm::status::WorkerTable;
use crate::backends::wasm::worker::{CallClock, Identity, LogLimiter, Worker};
use crate::deploy::registry::{Deployment, Snapshot};

/// Default `POOL_SIZE`: live instances across all apps.
pub const DEFAULT_POOL_SIZE: usize = 32;
/// Default `--queue-limit`: requests that may wait for a worker at once.
pub(crate) const DEFAULT_QUEUE_LIMIT: usize = 1024;
/// How often idle workers are checked against their `idleTimeout` and `ttl`.
pub(crate) const REAP_INTERVAL: Duration = Duration::from_millis(250);
/// A version that gave a worker back this recently still counts as competing for the pool.
pub(crate) const CONTENDING_FOR: Duration = Duration::from_millis(250);
/// How much each call's outcome moves its version's failure score (see the fair share in this module's header).
const FAILURE_WEIGHT: f32 = 0.2;
/// A `lowMemory` app's idle workers are dropped after at most this long, whatever its `idleTimeout`.
pub(crate) const LOW_MEMORY_IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why no worker could be had.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AcquireError {
    #[error("every worker is busy and {limit} requests are already waiting")]
    QueueFull { limit: usize },
    #[error("every worker stayed busy until the request's deadline")]
    QueueTimeout,
    #[error("the worker could not be started: {0}")]
    Instantiate(String),
}

/// A compiled version and its warm workers' identity; replaced when the version's files or config change.
pub(crate) struct VersionRuntime {
    key: u64,
    pub(crate) identity: Identity,
    pub(crate) deployment: Deployment,
    /// The version's guest CPU and share of it; kept across runtimes of the same version.
    pub(crate) meter: Arc<VersionMeter>,
    /// Keeps this version's failure lines to a few a second.
    pub(crate) failure_log: LogLimiter,
    loaded: OnceCell<Result<Arc<Loaded>, String>>,
    retired: AtomicBool,
}

impl VersionRuntime {
    /// The request deadline's length (`timeout`), if the version has one.
    pub(crate) fn timeout(&self) -> Option<Duration> {
        let secs = self.deployment.config.timeout;
        (secs > 0).then(|| Duration::from_secs(secs))
    }

    /// The compiled component, compiling it (off the async threads) the first time. Concurrent callers share one
    /// compilation.
    pub(crate) async fn loaded(&self, engine: &Arc<Engine>) -> Result<Arc<Loaded>, String> {
        self.loaded
            .get_or_init(|| async {
                let engine = engine.clone();
                let path = self.deployment.entrypoint_path.clone();
                let identity = self.identity.clone();
                let result = tokio::task::spawn_blocking(move || engine.load(&path))
                    .await
                    .map_err(|e| format!("compilation did not finish: {e}"))
                    .and_then(|loaded| loaded.map_err(|e| e.0));
                match &result {
                    Ok(loaded) => tracing::info!(
                        app = %identity.app,
                        version = %identity.version,
                        cached = loaded.from_cache,
                        ms = loaded.load_time.as_secs_f64() * 1000.0,
                        "component loaded"
                    ),
                    Err(error) => {
                        tracing::error!(app = %identity.app, version = %identity.version, "component failed to load: {error}")
                    }
                }
                result.map(Arc::new)
            })
            .await
            .clone()
    }

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
    fn may_reuse(&self, worker: &Worker, now: Instant) -> bool {
        let config = &self.deployment.config;
        config.ttl > 0
            && config.idle_timeout > 0
            && !self.retired.load(Ordering::Relaxed)
            && now.duration_since(worker.status.created) < Duration::from_secs(config.ttl)
            && (config.max_requests == 0 || worker.status.requests() < config.max_requests)
    }

    fn expired_while_idle(&self, worker: &Worker, now: Instant) -> bool {
        now.duration_since(worker.status.last_used()) >= self.idle_timeout()
            || now.duration_since(worker.status.created) >= Duration::from_secs(self.deployment.config.ttl)
    }
}

/// A worker lent to one request. Give it back with [`Pool::release`]; dropping it discards the worker.
pub(crate) struct Lease {
    pub(crate) worker: Worker,
    pub(crate) runtime: Arc<VersionRuntime>,
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

/// Counters kept by the pool (and, for how requests on its workers ended, by [`crate::backends::wasm::invoke`]).
#[derive(Debug, Default)]
pub(crate) struct PoolCounters {
    pub(crate) created: AtomicU64,
    pub(crate) hits: AtomicU64,
    pub(crate) misses: AtomicU64,
    pub(crate) evictions: AtomicU64,
    pub(crate) queue_rejected: AtomicU64,
    /// Requests whose deadline passed while they waited in the queue.
    pub(crate) queue_timeouts: AtomicU64,
    /// Workers that could not be instantiated, or were discarded after a trap or a timeout.
    pub(crate) failed: AtomicU64,
    pub(crate) timeouts: AtomicU64,
    pub(crate) traps: AtomicU64,
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

/// The pool, shared by every request.
pub struct Pool {
    engine: Arc<Engine>,
    shared: Arc<Shared>,
    runtimes: Mutex<HashMap<(String, String), Arc<VersionRuntime>>>,
    /// The WASM versions (and their fingerprints) of the last snapshot followed by [`Pool::sync`], so that a
    /// reload compiles only what it added or changed.
    synced: Mutex<HashMap<(String, String), u64>>,
    /// Every deployed WASM version's guest CPU meter, and the CPU of versions no longer deployed.
    meters: Mutex<HashMap<(String, String), Arc<VersionMeter>>>,
    retired_cpu: Mutex<Duration>,
    next_runtime_key: AtomicU64,
    pub(crate) counters: Arc<PoolCounters>,
    workers: Arc<WorkerTable>,
}

struct Shared {
    cap: usize,
    queue_limit: usize,
    state: Mutex<State>,
}

struct Idle {
    worker: Worker,
    runtime: Arc<VersionRuntime>,
    slot: Slot,
}

struct State {
    live: usize,
    /// The most live instances there ever were at once.
    peak: usize,
    /// Idle workers per runtime key; the most recently used last, so a hit takes the warmest.
    idle: HashMap<u64, Vec<Idle>>,
    /// Idle worker ids (with their runtime key) in order of last use, for eviction across apps.
    lru: LruCache<u64, u64>,
    /// Live slots per runtime key: what the fair share is counted in.
    held: HashMap<u64, usize>,
    /// Waiters per runtime key, oldest first.
    waiting: HashMap<u64, VecDeque<Waiter>>,
    /// Waiters across all runtimes.
    queued: usize,
    next_waiter: u64,
    /// When each runtime last gave a worker back.
    last_release: HashMap<u64, Instant>,
    /// How often each runtime's calls failed lately (trap, timeout, no response), smoothed: 0 never, 1 always.
    failure_score: HashMap<u64, f32>,
}

impl State {
    fn hold(&mut self, runtime: u64) {
        *self.held.entry(runtime).or_default() += 1;
    }

    fn unhold(&mut self, runtime: u64) {
        if let Some(held) = self.held.get_mut(&runtime) {
            *held -= 1;
            if *held == 0 {
                self.held.remove(&runtime);
                self.last_release.remove(&runtime);
            }
        }
    }

    fn held(&self, runtime: u64) -> usize {
        self.held.get(&runtime).copied().unwrap_or(0)
    }

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

    fn record(&mut self, runtime: u64, failed: bool) {
        let score = self.failure_score.entry(runtime).or_default();
        *score = *score * (1.0 - FAILURE_WEIGHT) + if failed { FAILURE_WEIGHT } else { 0.0 };
    }

    fn failing(&self, runtime: u64) -> bool {
        self.failure_score.get(&runtime).is_some_and(|score| *score > 0.5)
    }

    /// The slots `runtime` may count on while others compete (itself counted as competing): a version whose calls
    /// keep failing gets one, the others split the rest evenly (rounded up); alone, any version gets them all.
    fn share_of(&self, cap: usize, runtime: u64, now: Instant) -> usize {
        let competing: std::collections::HashSet<u64> = self
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
    fn evictable(&self, cap: usize, runtime: u64, now: Instant) -> Option<(u64, u64)> {
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
    fn next_in_line(&self, cap: usize, now: Instant) -> Option<u64> {
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

    /// Takes an idle worker out of the pool's lists.
    fn take_idle(&mut self, worker_id: u64, runtime: u64) -> Idle {
        self.lru.pop(&worker_id);
        let list = self
            .idle
            .get_mut(&runtime)
            .expect("an idle worker in the LRU is in its list");
        let at = list.iter().position(|i| i.worker.id() == worker_id).expect("listed");
        list.remove(at)
    }

    fn pop_waiter(&mut self, runtime: u64) -> Option<Waiter> {
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

struct Waiter {
    id: u64,
    runtime: u64,
    grant: oneshot::Sender<Grant>,
}

enum Grant {
    Worker(Idle),
    Slot(Slot),
    /// The queue was full and a version with fewer waiters needed the place.
    Refused,
}

/// The right to one live instance, held by one runtime. Dropping it frees the room for the next waiter, or
/// gives it back.
struct Slot {
    shared: Option<Arc<Shared>>,
    owner: u64,
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
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the counts half-updated in a way worse than stopping: keep
        // serving.
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

impl Pool {
    pub fn new(engine: Arc<Engine>, pool_size: usize, queue_limit: usize) -> Pool {
        Pool {
            engine,
            shared: Arc::new(Shared {
                cap: pool_size,
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
            }),
            runtimes: Mutex::new(HashMap::new()),
            synced: Mutex::new(HashMap::new()),
            meters: Mutex::new(HashMap::new()),
            retired_cpu: Mutex::new(Duration::ZERO),
            next_runtime_key: AtomicU64::new(1),
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

    /// The runtime for a version, made the first time and remade when the deployment changed.
    pub(crate) fn runtime(&self, app: &str, version: &str, deployment: &Deployment) -> Arc<VersionRuntime> {
        let mut runtimes = self.runtimes.lock().unwrap_or_else(|p| p.into_inner());
        let key = (app.to_owned(), version.to_owned());
        if let Some(runtime) = runtimes.get(&key) {
            if runtime.deployment.fingerprint == deployment.fingerprint {
                return runtime.clone();
            }
        }
        let meter = {
            let mut meters = self.meters.lock().unwrap_or_else(|p| p.into_inner());
            meters
                .entry(key.clone())
                .or_insert_with(|| self.engine.lanes().meter())
                .clone()
        };
        let runtime = Arc::new(VersionRuntime {
            key: self.next_runtime_key.fetch_add(1, Ordering::Relaxed),
            identity: Identity {
                app: app.to_owned(),
                version: version.to_owned(),
            },
            deployment: deployment.clone(),
            meter,
            failure_log: LogLimiter::default(),
            loaded: OnceCell::new(),
            retired: AtomicBool::new(false),
        });
        if let Some(old) = runtimes.insert(key, runtime.clone()) {
            drop(runtimes);
            self.retire(&old);
        }
        runtime
    }

    /// Follows a new snapshot: versions that are gone or changed stop keeping warm workers, and (when
    /// `compile` is set) versions new or changed since the last sync are compiled in the background, so their first
    /// request does not wait. Returns the compile tasks.
    pub(crate) fn sync(self: &Arc<Self>, snapshot: &Snapshot, compile: bool) -> Vec<tokio::task::JoinHandle<()>> {
        let mut current = HashMap::new();
        for app in snapshot.apps.values() {
            for version in &app.versions {
                if let Ok(deployment) = &version.deployment {
                    if deployment.kind == crate::deploy::registry::AppKind::Wasm {
                        current.insert((app.name.clone(), version.version.to_string()), deployment.clone());
                    }
                }
            }
        }
        let stale: Vec<Arc<VersionRuntime>> = {
            let mut runtimes = self.runtimes.lock().unwrap_or_else(|p| p.into_inner());
            let mut stale = Vec::new();
            runtimes.retain(|key, runtime| {
                let keep = current
                    .get(key)
                    .is_some_and(|d| d.fingerprint == runtime.deployment.fingerprint);
                if !keep {
                    stale.push(runtime.clone());
                }
                keep
            });
            stale
        };
        for runtime in stale {
            self.retire(&runtime);
        }
        {
            // A version that is gone keeps its CPU in the retired total, so totals never go down.
            let mut meters = self.meters.lock().unwrap_or_else(|p| p.into_inner());
            let mut retired = Duration::ZERO;
            meters.retain(|key, meter| {
                let keep = current.contains_key(key);
                if !keep {
                    retired += meter.cpu();
                }
                keep
            });
            *self.retired_cpu.lock().unwrap_or_else(|p| p.into_inner()) += retired;
        }
        let fresh: Vec<((String, String), Deployment)> = {
            let mut synced = self.synced.lock().unwrap_or_else(|p| p.into_inner());
            synced.retain(|key, _| current.contains_key(key));
            let fresh = current
                .into_iter()
                .filter(|(key, deployment)| synced.get(key) != Some(&deployment.fingerprint))
                .collect::<Vec<_>>();
            for (key, deployment) in &fresh {
                synced.insert(key.clone(), deployment.fingerprint);
            }
            fresh
        };
        let mut tasks = Vec::new();
        if compile {
            for ((app, version), deployment) in fresh {
                let runtime = self.runtime(&app, &version, &deployment);
                let pool = self.clone();
                tasks.push(tokio::spawn(async move {
                    let _ = runtime.loaded(&pool.engine).await;
                }));
            }
        }
        tasks
    }

    /// Drops a runtime's idle workers and marks it so that its busy ones are not kept either.
    fn retire(&self, runtime: &VersionRuntime) {
        runtime.retired.store(true, Ordering::Relaxed);
        let dropped = {
            let mut state = self.shared.lock();
            let dropped = state.idle.remove(&runtime.key).unwrap_or_default();
            for idle in &dropped {
                state.lru.pop(&idle.worker.id());
            }
            state.failure_score.remove(&runtime.key);
            dropped
        };
        drop(dropped);
    }

    /// Guest CPU per deployed WASM version, and the CPU of versions no longer deployed.
    pub(crate) fn guest_cpu(&self) -> (Vec<(String, String, Duration)>, Duration) {
        let meters = self.meters.lock().unwrap_or_else(|p| p.into_inner());
        let versions = meters
            .iter()
            .map(|((app, version), meter)| (app.clone(), version.clone(), meter.cpu()))
            .collect();
        (versions, *self.retired_cpu.lock().unwrap_or_else(|p| p.into_inner()))
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
        let step = {
            let mut state = self.shared.lock();
            let mut step = None;
            while let Some(idle) = state.idle.get_mut(&runtime.key).and_then(Vec::pop) {
                state.lru.pop(&idle.worker.id());
                if runtime.expired_while_idle(&idle.worker, now) {
                    expired.push(idle);
                } else {
                    step = Some(Step::Warm(idle));
                    break;
                }
            }
            match step {
                Some(step) => step,
                None if state.live < self.shared.cap => {
                    state.live += 1;
                    state.peak = state.peak.max(state.live);
                    state.hold(runtime.key);
                    Step::Create(Slot {
                        shared: Some(self.shared.clone()),
                        owner: runtime.key,
                    })
                }
                None => match state.evictable(self.shared.cap, runtime.key, now) {
                    Some((worker_id, key)) => {
                        let mut idle = state.take_idle(worker_id, key);
                        // The slot changes hands: it counts toward the new runtime's share from now on.
                        state.unhold(idle.slot.owner);
                        state.hold(runtime.key);
                        idle.slot.owner = runtime.key;
                        Step::Evict(idle)
                    }
                    None if state.queued < self.shared.queue_limit || state.make_room(runtime.key) => {
                        let (grant, receiver) = oneshot::channel();
                        let id = state.next_waiter;
                        state.next_waiter += 1;
                        state.queued += 1;
                        state.waiting.entry(runtime.key).or_default().push_back(Waiter {
                            id,
                            runtime: runtime.key,
                            grant,
                        });
                        Step::Wait(id, receiver)
                    }
                    None => Step::Full,
                },
            }
        };
        drop(expired);
        match step {
            Step::Warm(idle) => Ok(self.warm(idle)),
            Step::Create(slot) => self.create(runtime, slot, clock).await,
            Step::Evict(idle) => {
                self.counters.evictions.fetch_add(1, Ordering::Relaxed);
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
            Step::Full => {
                self.counters.queue_rejected.fetch_add(1, Ordering::Relaxed);
                Err(AcquireError::QueueFull {
                    limit: self.shared.queue_limit,
                })
            }
        }
    }

    async fn wait(
        &self,
        runtime: &Arc<VersionRuntime>,
        id: u64,
        receiver: oneshot::Receiver<Grant>,
        clock: &Arc<CallClock>,
        deadline: Option<Instant>,
    ) -> Result<Lease, AcquireError> {
        // Leaves the queue however the wait ends, the caller giving up (dropping this future) included; a grant
        // that raced with that is dropped, which passes it on.
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
                self.counters.queue_timeouts.fetch_add(1, Ordering::Relaxed);
                return Err(AcquireError::QueueTimeout);
            }
        };
        drop(leave);
        match grant {
            Grant::Worker(idle) => Ok(self.warm(idle)),
            Grant::Slot(slot) => self.create(runtime, slot, clock).await,
            Grant::Refused => {
                self.counters.queue_rejected.fetch_add(1, Ordering::Relaxed);
                Err(AcquireError::QueueFull {
                    limit: self.shared.queue_limit,
                })
            }
        }
    }

    /// Lends a warm worker: a hit.
    fn warm(&self, idle: Idle) -> Lease {
        self.counters.hits.fetch_add(1, Ordering::Relaxed);
        idle.worker.status.lent();
        Lease {
            worker: idle.worker,
            runtime: idle.runtime,
            slot: idle.slot,
        }
    }

    async fn create(
        &self,
        runtime: &Arc<VersionRuntime>,
        slot: Slot,
        clock: &Arc<CallClock>,
    ) -> Result<Lease, AcquireError> {
        self.counters.misses.fetch_add(1, Ordering::Relaxed);
        let failed = |reason: String| {
            self.counters.failed.fetch_add(1, Ordering::Relaxed);
            AcquireError::Instantiate(reason)
        };
        let loaded = runtime.loaded(&self.engine).await.map_err(failed)?;
        let worker = Worker::new(
            self.engine.wasmtime(),
            &loaded.pre,
            &runtime.deployment,
            &runtime.identity,
            clock.clone(),
            &self.workers,
        )
        .await
        .map_err(|e| failed(format!("{e:#}")))?;
        self.counters.created.fetch_add(1, Ordering::Relaxed);
        Ok(Lease {
            worker,
            runtime: runtime.clone(),
            slot,
        })
    }

    /// Takes a worker back after a request. A healthy one that may serve again goes to a waiter of its version,
    /// or waits idle; otherwise it is dropped and its slot passed on. `failed` says whether the app failed the
    /// request (a trap, a timeout, no response), as opposed to a client that went away: only that counts toward
    /// the version's failure score.
    pub(crate) fn release(&self, lease: Lease, healthy: bool, failed: bool) {
        self.put_back(lease, healthy, Some(failed));
    }

    /// Takes back a worker that served no request (a health check): kept warm if its version keeps workers.
    pub(crate) fn release_unused(&self, lease: Lease) {
        self.put_back(lease, true, None);
    }

    fn put_back(&self, lease: Lease, healthy: bool, failed: Option<bool>) {
        let served = failed.is_some();
        let Lease { worker, runtime, slot } = lease;
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
                    self.counters.evictions.fetch_add(1, Ordering::Relaxed);
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
        state.lru.put(idle.worker.id(), idle.runtime.key);
        state.idle.entry(idle.runtime.key).or_default().push(idle);
    }

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
                self.counters.evictions.fetch_add(1, Ordering::Relaxed);
            }
            state.idle.retain(|_, list| !list.is_empty());
            reaped
        };
        let count = reaped.len();
        drop(reaped);
        count
    }

    /// Reaps idle workers in the background for as long as the pool lives.
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

enum Step {
    Warm(Idle),
    Create(Slot),
    Evict(Idle),
    Wait(u64, oneshot::Receiver<Grant>),
    Full,
}
