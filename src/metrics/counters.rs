//! Request counters per app version: what the dispatcher and the front door bump on every request.
//!
//! Each deployed version that served a request has an [`AppStats`], found through [`Apps`], a copy-on-write table
//! that requests read without a lock. Its counters (status codes and a latency histogram, all atomics) are kept
//! per serving core, in a [`CoreStats`] that a core makes on its first request for the version: a request counts
//! on its own core's, so two cores serving one app never write the same cache line, and a reading sums them.
//! Requests that named no deployed app share one set of counters, and versions no longer deployed are folded
//! into another, so the totals never go down and the table does not grow with every version ever deployed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::StatusCode;

use super::histogram::{Counts, Histogram};
use crate::core_local::PerCore;

/// The `version` under which versions that are no longer deployed keep counting toward the totals.
pub(crate) const RETIRED: &str = "retired";

/// Status counted for a request whose client went away before it was answered (nginx's convention).
pub(crate) const CLIENT_CLOSED: u16 = 499;

/// Status codes are counted for 100..=599; anything else (never sent by hyper) counts as 599.
const STATUS_CODES: usize = 500;

/// The app version a response came from (the unrouted counters when it named none), handed back by the dispatcher
/// beside the response for the access log and [`super::Metrics::observe`]. It holds the counters of the core the
/// request arrived on: its reference count, like its counts, is written by that core alone.
#[derive(Clone)]
pub(crate) struct Served {
    pub(crate) stats: Arc<CoreStats>,
}

/// One app version's request counters: a [`CoreStats`] for each serving core that has served it.
pub(crate) struct AppStats {
    app: String,
    version: String,
    /// Made by each core on its first request for the version, so that a thousand versions each served once cost
    /// one set of counters each, not one per core.
    cores: PerCore<OnceLock<Arc<CoreStats>>>,
}

impl AppStats {
    fn new(app: String, version: String) -> AppStats {
        AppStats {
            app,
            version,
            cores: PerCore::new(OnceLock::new),
        }
    }

    /// The running core's counters for this version.
    pub(super) fn on_this_core(&self) -> &Arc<CoreStats> {
        self.cores
            .local()
            .get_or_init(|| Arc::new(CoreStats::new(self.app.clone(), self.version.clone())))
    }

    /// Adds another version's counts to these.
    fn absorb(&self, reading: &AppReading) {
        let counters = self.on_this_core();
        for (status, count) in &reading.statuses {
            counters.statuses[usize::from(status - 100)].fetch_add(*count, Ordering::Relaxed);
        }
        counters.latency.absorb(&reading.latency);
    }

    /// Every core's counts, summed.
    fn read(&self) -> AppReading {
        let mut statuses = [0u64; STATUS_CODES];
        let mut latency = Counts::default();
        for counters in self.cores.iter().filter_map(OnceLock::get) {
            for (sum, count) in statuses.iter_mut().zip(&counters.statuses) {
                *sum += count.load(Ordering::Relaxed);
            }
            latency.add(&counters.latency.counts());
        }
        let statuses = statuses
            .iter()
            .enumerate()
            .filter(|(_, count)| **count > 0)
            .map(|(i, count)| (i as u16 + 100, *count))
            .collect();
        AppReading {
            app: self.app.clone(),
            version: self.version.clone(),
            statuses,
            latency,
            cpu: Duration::ZERO,
        }
    }
}

/// What one serving core counts for one app version. Aligned, so that the allocation holding it (and its `Arc`'s
/// reference counts) shares no cache line with another core's.
#[repr(align(128))]
pub(crate) struct CoreStats {
    pub(crate) app: String,
    pub(crate) version: String,
    statuses: [AtomicU64; STATUS_CODES],
    latency: Histogram,
}

impl CoreStats {
    fn new(app: String, version: String) -> CoreStats {
        CoreStats {
            app,
            version,
            statuses: std::array::from_fn(|_| AtomicU64::new(0)),
            latency: Histogram::default(),
        }
    }

    /// Counts one response with `status`.
    pub(super) fn count(&self, status: StatusCode) {
        let index = usize::from(status.as_u16().clamp(100, 599) - 100);
        self.statuses[index].fetch_add(1, Ordering::Relaxed);
    }

    /// Records one request's latency.
    pub(super) fn record(&self, elapsed: Duration) {
        self.latency.record(elapsed);
    }
}

/// One app version's counters, read at one moment. `app` is empty for requests that named no deployed app
/// (`version` empty too) and for versions no longer deployed (`version` is [`RETIRED`]).
#[derive(Debug, Clone)]
pub(crate) struct AppReading {
    pub(crate) app: String,
    pub(crate) version: String,
    /// (status, responses), for each status sent at least once, in order.
    pub(crate) statuses: Vec<(u16, u64)>,
    pub(crate) latency: Counts,
    /// CPU its guests used (WebAssembly versions only), as the pool's meters have it.
    pub(crate) cpu: Duration,
}

impl AppReading {
    pub(crate) fn key(&self) -> String {
        format!("{}@{}", self.app, self.version)
    }

    pub(crate) fn requests(&self) -> u64 {
        self.statuses.iter().map(|(_, count)| count).sum()
    }

    /// Responses the server failed (5xx); client errors (4xx) are the client's.
    pub(crate) fn errors(&self) -> u64 {
        self.statuses
            .iter()
            .filter(|(status, _)| *status >= 500)
            .map(|(_, count)| count)
            .sum()
    }
}

/// Hashed with foldhash: every request looks its version's counters up here, and the keys are the names of deployed
/// apps, not anything a client chooses.
type AppTable = HashMap<String, HashMap<semver::Version, Arc<AppStats>, FastHash>, FastHash>;
type FastHash = foldhash::fast::RandomState;

/// Every app version's counters, with the unrouted and the retired ones.
pub(super) struct Apps {
    table: ArcSwap<AppTable>,
    /// Serialises changes to `table` (a version's first request, a retirement), so that none is lost between a
    /// load and a store. A std mutex: it is held for a clone of the table, never across an `.await`.
    adding: Mutex<()>,
    unrouted: Arc<AppStats>,
    /// Versions removed from APPS_DIR, folded together so that totals never go down and memory does not grow with
    /// every version ever deployed.
    retired: Arc<AppStats>,
}

impl Apps {
    pub(super) fn new() -> Apps {
        Apps {
            table: ArcSwap::default(),
            adding: Mutex::new(()),
            unrouted: Arc::new(AppStats::new(String::new(), String::new())),
            retired: Arc::new(AppStats::new(String::new(), RETIRED.to_owned())),
        }
    }

    /// The running core's counters of one app version, made on its first request. Lock-free once made.
    pub(super) fn get(&self, app: &str, version: &semver::Version) -> Arc<CoreStats> {
        // Borrowed from the table, not cloned: the version's own reference count is shared by every core.
        if let Some(stats) = self.table.load().get(app).and_then(|versions| versions.get(version)) {
            return stats.on_this_core().clone();
        }
        self.add(app, version).on_this_core().clone()
    }

    /// The version's counters, added to the table unless another request added them first.
    fn add(&self, app: &str, version: &semver::Version) -> Arc<AppStats> {
        let _adding = self.adding.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.table.load_full();
        if let Some(stats) = current.get(app).and_then(|versions| versions.get(version)) {
            return stats.clone();
        }
        let stats = Arc::new(AppStats::new(app.to_owned(), version.to_string()));
        let mut table = (*current).clone();
        table
            .entry(app.to_owned())
            .or_default()
            .insert(version.clone(), stats.clone());
        self.table.store(Arc::new(table));
        stats
    }

    /// The running core's counters of requests that named no deployed app.
    pub(super) fn unrouted(&self) -> Arc<CoreStats> {
        self.unrouted.on_this_core().clone()
    }

    /// Every version's counters, sorted by (app, version), then the retired and the unrouted ones; each with the
    /// guest CPU that `cpu` (the pool's meters, as [`crate::backends::wasm::pool::Pool::guest_cpu`] has them)
    /// gives it.
    pub(super) fn read(&self, cpu: (Vec<(String, String, Duration)>, Duration)) -> Vec<AppReading> {
        let table = self.table.load();
        let (cpu, retired_cpu) = cpu;
        let cpu: HashMap<(String, String), Duration> = cpu
            .into_iter()
            .map(|(app, version, cpu)| ((app, version), cpu))
            .collect();
        let mut apps: Vec<AppReading> = table
            .values()
            .flat_map(|versions| versions.values().map(|stats| stats.read()))
            .map(|mut reading| {
                let key = (reading.app.clone(), reading.version.clone());
                reading.cpu = cpu.get(&key).copied().unwrap_or_default();
                reading
            })
            .collect();
        apps.sort_by(|a, b| (&a.app, &a.version).cmp(&(&b.app, &b.version)));
        let mut retired = self.retired.read();
        retired.cpu = retired_cpu;
        apps.push(retired);
        apps.push(self.unrouted.read());
        apps
    }

    /// Starts retiring the versions for which `deployed` is false, or `None` if there are none. Nothing changes
    /// until [`Retiring::apply`], and no version is added meanwhile.
    pub(super) fn retiring(&self, deployed: impl Fn(&str, &semver::Version) -> bool) -> Option<Retiring<'_>> {
        let adding = self.adding.lock().unwrap_or_else(|p| p.into_inner());
        let mut kept = AppTable::default();
        let mut gone = Vec::new();
        for (app, versions) in self.table.load().iter() {
            for (version, stats) in versions {
                if deployed(app, version) {
                    kept.entry(app.clone())
                        .or_default()
                        .insert(version.clone(), stats.clone());
                } else {
                    gone.push(stats.read());
                }
            }
        }
        (!gone.is_empty()).then_some(Retiring {
            apps: self,
            _adding: adding,
            kept,
            gone,
        })
    }
}

/// Versions about to be folded into the retired counters; see [`Apps::retiring`].
pub(super) struct Retiring<'a> {
    apps: &'a Apps,
    _adding: MutexGuard<'a, ()>,
    kept: AppTable,
    gone: Vec<AppReading>,
}

impl Retiring<'_> {
    /// Drops the versions from the table and adds their counts to the retired ones. Returns their keys and the
    /// retired key, for the window to move their share to.
    pub(super) fn apply(self) -> (Vec<String>, String) {
        self.apps.table.store(Arc::new(self.kept));
        for reading in &self.gone {
            self.apps.retired.absorb(reading);
        }
        let keys = self.gone.iter().map(AppReading::key).collect();
        (keys, self.apps.retired.read().key())
    }
}

/// A request to an app that has not been answered yet; see [`super::Metrics::in_flight`].
pub(crate) struct InFlight<'a> {
    /// `None` once answered, or when requests are not counted.
    stats: Option<&'a CoreStats>,
    start: Instant,
}

impl<'a> InFlight<'a> {
    /// Marks a request as in flight: counted with [`CLIENT_CLOSED`] if dropped before it is answered. `stats` is
    /// `None` when requests are not counted.
    pub(super) fn new(stats: Option<&'a CoreStats>, start: Instant) -> InFlight<'a> {
        InFlight { stats, start }
    }

    /// The request has its response: from here on it is counted by [`super::Metrics::observe`].
    pub(crate) fn answered(mut self) {
        self.stats = None;
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(stats) = self.stats {
            stats.count(StatusCode::from_u16(CLIENT_CLOSED).expect("499 is a valid status"));
            stats.record(self.start.elapsed());
        }
    }
}
