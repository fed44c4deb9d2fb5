//! Following the registry: one [`VersionRuntime`] per deployed WASM version, what its workers share.
//!
//! A runtime holds the version's deployment and its compiled component, compiled at most once however many
//! requests wait for it (and the same failure for all of them when it does not load). It is remade when the
//! version's files or config change, and the old one retired: its idle workers go at once, its busy ones when
//! they are given back. [`Pool::sync`] follows each new snapshot and, after a reload, compiles what it added or
//! changed in the background. The guest CPU meters outlive runtimes (they are per version, not per build), and a
//! version that goes leaves its CPU in a retired total, so totals never go down.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::OnceCell;

use super::seats::{SeatLimits, Seats};
use super::Pool;
use crate::backends::wasm::engine::{Engine, LoadError, Loaded, Pre};
use crate::backends::wasm::guest_log::LogLimiter;
use crate::backends::wasm::lanes::VersionMeter;
use crate::backends::wasm::worker::Identity;
use crate::deploy::registry::{AppKind, Deployment, Snapshot};
use crate::error::chain;
use crate::log_fields::millis;

/// An app and one of its versions.
type VersionKey = (String, String);

/// What the log and `/_/deployments` say of a version whose reused instances answer nothing.
const SINGLE_USE: &str = "a reused instance returned without a response (componentize-js's fetch event does so on \
                          every request after an instance's first), so each request now gets a fresh instance; \
                          export wasi:http's incoming-handler instead to have instances reused (see runtime-sdk/js)";

/// A compiled version and its warm workers' identity; replaced when the version's files or config change.
pub(crate) struct VersionRuntime {
    /// Names the runtime in the pool's state.
    pub(super) key: u64,
    pub(crate) identity: Identity,
    pub(crate) deployment: Deployment,
    /// The version's guest CPU and share of it; kept across runtimes of the same version.
    pub(crate) meter: Arc<VersionMeter>,
    /// Keeps this version's failure lines to a few a second.
    pub(crate) failure_log: LogLimiter,
    loaded: OnceCell<Result<Arc<Loaded>, Arc<LoadError>>>,
    /// When the compile began, once it has.
    compile_started: OnceLock<Instant>,
    /// Set once a newer runtime replaced this one, or its version went: its workers are not kept.
    pub(super) retired: AtomicBool,
    /// Set when one of its instances that had served a request returned the next one without a response, and no
    /// reused instance of it ever answered, as with a componentize-js fetch-event component: its workers are not
    /// kept, so each request gets a fresh instance. A new build of the version (a new runtime) starts trusted
    /// again.
    pub(super) single_use: AtomicBool,
    /// Set once a reused instance of it answered: a later call that answers nothing is then that call's bug (one
    /// route that forgets its response), not a component that cannot be reused.
    pub(super) reuse_answered: AtomicBool,
    /// Its instances open to more requests at once (a WASI 0.3 handler with `maxConcurrentRequests` over one).
    pub(crate) seats: Seats,
}

impl VersionRuntime {
    /// The request deadline's length (`timeout`), if the version has one.
    pub(crate) fn timeout(&self) -> Option<Duration> {
        let secs = self.deployment.config.timeout;
        (secs > 0).then(|| Duration::from_secs(secs))
    }

    /// What an instance open to several requests at once may take: `None` when its instances take one at a time
    /// (`maxConcurrentRequests: 1`, or instances that are not kept).
    pub(crate) fn seat_limits(&self) -> Option<SeatLimits> {
        let config = &self.deployment.config;
        let at_once = usize::try_from(config.max_concurrent_requests).unwrap_or(usize::MAX);
        (at_once > 1 && config.ttl > 0).then(|| SeatLimits {
            at_once,
            max_requests: config.max_requests,
            ttl: Duration::from_secs(config.ttl),
        })
    }

    /// Whether its component, compiled, is a WASI 0.3 handler (false while it is not compiled yet).
    pub(crate) fn is_wasi03(&self) -> bool {
        matches!(self.loaded.get(), Some(Ok(loaded)) if matches!(loaded.pre, Pre::Wasi03(_)))
    }

    /// How long the component has been compiling, while it is (started and not finished).
    pub(crate) fn compiling_for(&self) -> Option<Duration> {
        let started = self.compile_started.get()?;
        self.loaded.get().is_none().then(|| started.elapsed())
    }

    /// The compiled component, compiling it (off the async threads) the first time. Concurrent callers share one
    /// compilation, and its failure. The compilation runs in a task of its own: a caller that stops waiting (its
    /// deadline passed, its client left) does not abandon it, or the next request would start it over.
    pub(crate) async fn loaded(self: &Arc<Self>, engine: &Arc<Engine>) -> Result<Arc<Loaded>, Arc<LoadError>> {
        if let Some(loaded) = self.loaded.get() {
            return loaded.clone();
        }
        let (runtime, engine) = (self.clone(), engine.clone());
        tokio::spawn(async move { runtime.compile(&engine).await })
            .await
            .unwrap_or_else(|unfinished| Err(Arc::new(LoadError::Unfinished(unfinished))))
    }

    async fn compile(&self, engine: &Arc<Engine>) -> Result<Arc<Loaded>, Arc<LoadError>> {
        self.loaded
            .get_or_init(|| async {
                self.compile_started.get_or_init(Instant::now);
                let engine = engine.clone();
                let path = self.deployment.entrypoint_path.clone();
                let identity = &self.identity;
                let result = tokio::task::spawn_blocking(move || engine.load(&path))
                    .await
                    .unwrap_or_else(|unfinished| Err(LoadError::Unfinished(unfinished)));
                match &result {
                    Ok(loaded) => tracing::info!(
                        app = %identity.app,
                        version = %identity.version,
                        cached = loaded.from_cache,
                        ms = millis(loaded.load_time),
                        "component loaded"
                    ),
                    Err(error) => tracing::error!(
                        app = %identity.app,
                        version = %identity.version,
                        "component failed to load: {}",
                        chain(error)
                    ),
                }
                result.map(Arc::new).map_err(Arc::new)
            })
            .await
            .clone()
    }
}

/// What the pool keeps of the deployed versions.
pub(super) struct Versions {
    runtimes: Mutex<HashMap<VersionKey, Arc<VersionRuntime>>>,
    /// The WASM versions (and their fingerprints) of the last snapshot followed by [`Pool::sync`], so that a
    /// reload compiles only what it added or changed.
    synced: Mutex<HashMap<VersionKey, u64>>,
    /// Every deployed WASM version's guest CPU meter.
    meters: Mutex<HashMap<VersionKey, Arc<VersionMeter>>>,
    /// The guest CPU of versions no longer deployed.
    retired_cpu: Mutex<Duration>,
    next_runtime_key: AtomicU64,
}

impl Versions {
    pub(super) fn new() -> Versions {
        Versions {
            runtimes: Mutex::default(),
            synced: Mutex::default(),
            meters: Mutex::default(),
            retired_cpu: Mutex::default(),
            next_runtime_key: AtomicU64::new(1),
        }
    }
}

/// Locks one of [`Versions`]' maps. These are std mutexes: each hold is a few map operations, never across an
/// `.await`, and a panic while one was held leaves nothing worse than a stale entry, so serving goes on.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Pool {
    /// The runtime for a version, made the first time and remade when the deployment changed.
    pub(crate) fn runtime(&self, app: &str, version: &str, deployment: &Deployment) -> Arc<VersionRuntime> {
        let versions = &self.versions;
        let mut runtimes = lock(&versions.runtimes);
        let key = (app.to_owned(), version.to_owned());
        if let Some(runtime) = runtimes.get(&key) {
            if runtime.deployment.fingerprint == deployment.fingerprint {
                return runtime.clone();
            }
        }
        let meter = lock(&versions.meters)
            .entry(key.clone())
            .or_insert_with(|| self.engine.lanes().meter())
            .clone();
        let runtime = Arc::new(VersionRuntime {
            key: versions.next_runtime_key.fetch_add(1, Ordering::Relaxed),
            identity: Identity {
                app: app.to_owned(),
                version: version.to_owned(),
            },
            deployment: deployment.clone(),
            meter,
            failure_log: LogLimiter::default(),
            loaded: OnceCell::new(),
            compile_started: OnceLock::new(),
            retired: AtomicBool::new(false),
            single_use: AtomicBool::new(false),
            reuse_answered: AtomicBool::new(false),
            seats: Seats::default(),
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
        let versions = &self.versions;
        let mut current = HashMap::new();
        for app in snapshot.apps.values() {
            for version in &app.versions {
                if let Ok(deployment) = &version.deployment {
                    if deployment.kind == AppKind::Wasm {
                        current.insert((app.name.clone(), version.version.to_string()), deployment.clone());
                    }
                }
            }
        }
        let stale: Vec<Arc<VersionRuntime>> = {
            let mut runtimes = lock(&versions.runtimes);
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
            let mut meters = lock(&versions.meters);
            let mut retired = Duration::ZERO;
            meters.retain(|key, meter| {
                let keep = current.contains_key(key);
                if !keep {
                    retired += meter.cpu();
                }
                keep
            });
            *lock(&versions.retired_cpu) += retired;
        }
        let fresh: Vec<(VersionKey, Deployment)> = {
            let mut synced = lock(&versions.synced);
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
        self.drop_idle(runtime);
        self.shared.lock().failure_score.remove(&runtime.key);
    }

    /// Drops the idle workers of `runtime` (outside the lock: dropping one frees its slot, which takes it).
    fn drop_idle(&self, runtime: &VersionRuntime) {
        let dropped = {
            let mut state = self.shared.lock();
            let dropped = state.idle.remove(&runtime.key).unwrap_or_default();
            for idle in &dropped {
                state.lru.pop(&idle.worker.id());
            }
            dropped
        };
        drop(dropped);
    }

    /// Follows what reused instances of `runtime` do: if one returned without a response (`answered` false) and
    /// none ever answered, from now on the version gets a fresh instance per request, which such a component
    /// answers (said once in the log, and in `/_/deployments`).
    pub(super) fn reused_call_ended(&self, runtime: &VersionRuntime, answered: bool) {
        if answered {
            // Read first, so that the cache line is written once per version, not by every call.
            if !runtime.reuse_answered.load(Ordering::Relaxed) {
                runtime.reuse_answered.store(true, Ordering::Relaxed);
            }
            return;
        }
        if runtime.reuse_answered.load(Ordering::Relaxed) || runtime.single_use.swap(true, Ordering::Relaxed) {
            return;
        }
        tracing::warn!(
            app = %runtime.identity.app,
            version = %runtime.identity.version,
            "{SINGLE_USE}"
        );
        self.drop_idle(runtime);
    }

    /// Why a deployed version gets a fresh instance per request whatever its `ttl`, if it does.
    pub(crate) fn reuse_off(&self, app: &str, version: &str) -> Option<&'static str> {
        let runtimes = lock(&self.versions.runtimes);
        let runtime = runtimes.get(&(app.to_owned(), version.to_owned()))?;
        runtime.single_use.load(Ordering::Relaxed).then_some(SINGLE_USE)
    }

    /// Guest CPU per deployed WASM version, and the CPU of versions no longer deployed.
    pub(crate) fn guest_cpu(&self) -> (Vec<(String, String, Duration)>, Duration) {
        let meters = lock(&self.versions.meters);
        let versions = meters
            .iter()
            .map(|((app, version), meter)| (app.clone(), version.clone(), meter.cpu()))
            .collect();
        (versions, *lock(&self.versions.retired_cpu))
    }
}
