//! The numbers behind `/_/metrics`, `/_/stats`, `/_/sse` and the dashboard, kept in one place.
//!
//! Requests are counted per app version (status codes and a latency histogram, all atomics, found through a
//! lock-free map), the pool keeps its own counters, and each worker carries its status. A [`Snapshot`] reads all
//! of them at once; the JSON, the Prometheus text and every SSE frame are rendered from a snapshot, so they cannot
//! disagree. Once a second the sampler keeps the running totals, so rates and percentiles cover the last
//! [`WINDOW`] rather than the server's whole life, and (only while someone listens) builds the one snapshot that
//! every SSE subscriber is sent.

pub(crate) mod histogram;
pub(crate) mod prometheus;
pub(crate) mod report;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use axum::response::Response;
use http::StatusCode;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::backends::wasm::pool::{Pool, PoolCounts, PoolStats};
use crate::backends::wasm::status::WorkerReading;
use histogram::{Counts, Histogram};

/// Rates and latency percentiles cover this much of the recent past.
pub const WINDOW: Duration = Duration::from_secs(10);
/// How often the totals are sampled for the window, and SSE frames built.
pub(crate) const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// The `version` under which versions that are no longer deployed keep counting toward the totals.
pub(crate) const RETIRED: &str = "retired";

/// Status codes are counted for 100..=599; anything else (never sent by hyper) counts as 599.
const STATUS_CODES: usize = 500;

/// The app version a response came from (the unrouted counters when it named none), left in its extensions by the
/// dispatcher for the access log and [`Metrics::observe`].
#[derive(Clone)]
pub struct Served {
    pub stats: Arc<AppStats>,
}

/// One app version's request counters.
pub struct AppStats {
    pub(crate) app: String,
    pub(crate) version: String,
    statuses: Box<[AtomicU64]>,
    latency: Histogram,
}

impl AppStats {
    fn new(app: String, version: String) -> AppStats {
        AppStats {
            app,
            version,
            statuses: (0..STATUS_CODES).map(|_| AtomicU64::new(0)).collect(),
            latency: Histogram::default(),
        }
    }

    fn count(&self, status: StatusCode) {
        let index = usize::from(status.as_u16().clamp(100, 599) - 100);
        self.statuses[index].fetch_add(1, Ordering::Relaxed);
    }

    /// Adds another version's counts to these.
    fn absorb(&self, reading: &AppReading) {
        for (status, count) in &reading.statuses {
            self.statuses[usize::from(status - 100)].fetch_add(*count, Ordering::Relaxed);
        }
        self.latency.absorb(&reading.latency);
    }

    fn read(&self) -> AppReading {
        let statuses = self
            .statuses
            .iter()
            .enumerate()
            .filter_map(|(i, count)| {
                let count = count.load(Ordering::Relaxed);
                (count > 0).then(|| (i as u16 + 100, count))
            })
            .collect();
        AppReading {
            app: self.app.clone(),
            version: self.version.clone(),
            statuses,
            latency: self.latency.counts(),
            cpu: Duration::ZERO,
        }
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

/// What changed over the window, for one app version or for all.
#[derive(Debug, Clone, Default)]
pub(crate) struct Recent {
    pub(crate) requests: u64,
    pub(crate) errors: u64,
    pub(crate) latency: Counts,
    pub(crate) cpu: Duration,
}

impl Recent {
    fn between(now: &AppReading, then: Option<&Recent>) -> Recent {
        let zero = Recent::default();
        let then = then.unwrap_or(&zero);
        Recent {
            requests: now.requests().saturating_sub(then.requests),
            errors: now.errors().saturating_sub(then.errors),
            latency: now.latency.since(&then.latency),
            cpu: now.cpu.saturating_sub(then.cpu),
        }
    }

    fn add(&mut self, other: &Recent) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.latency.add(&other.latency);
        self.cpu += other.cpu;
    }
}

/// Everything the metrics report, read at one moment.
#[derive(Debug, Clone)]
pub(crate) struct Snapshot {
    pub(crate) uptime: Duration,
    pub(crate) pool: PoolStats,
    pub(crate) counters: PoolCounts,
    pub(crate) pooling: bool,
    /// Every app version that served a request, by key; the unrouted requests last, with an empty key.
    pub apps: Vec<AppReading>,
    /// Per app key, what happened within the window.
    pub(crate) recent: HashMap<String, Recent>,
    /// How long the window actually is (a little over [`WINDOW`], or the uptime while shorter).
    pub(crate) window: Duration,
    pub(crate) workers: Vec<WorkerReading>,
    pub(crate) sse_clients: usize,
    /// Snapshots taken so far, this one included.
    pub(crate) snapshots: u64,
}

impl Snapshot {
    /// All apps' counters together.
    pub(crate) fn total(&self) -> (u64, u64) {
        let requests = self.apps.iter().map(AppReading::requests).sum();
        let errors = self.apps.iter().map(AppReading::errors).sum();
        (requests, errors)
    }

    /// Live workers and their memory, per (app, version, busy), counted in one pass over the workers.
    pub(crate) fn worker_tallies(&self) -> BTreeMap<(&str, &str, bool), Tally> {
        let mut tallies: BTreeMap<(&str, &str, bool), Tally> = BTreeMap::new();
        for worker in &self.workers {
            let tally = tallies.entry((&worker.app, &worker.version, worker.busy)).or_default();
            tally.workers += 1;
            tally.memory_bytes += worker.memory_bytes;
        }
        tallies
    }

    /// All apps' window together.
    pub(crate) fn recent_total(&self) -> Recent {
        let mut total = Recent::default();
        for recent in self.recent.values() {
            total.add(recent);
        }
        total
    }
}

/// Workers counted together, with the linear memory they hold.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Tally {
    pub(crate) workers: u64,
    pub(crate) memory_bytes: u64,
}

/// The running totals at one tick, the start of some later window.
struct Sample {
    at: Instant,
    apps: HashMap<String, Recent>,
}

/// The latest SSE frame's contents: built once per tick, shared by every subscriber.
#[derive(Debug, Clone)]
pub(crate) struct Update {
    pub(crate) seq: u64,
    pub(crate) json: Arc<str>,
}

/// Hashed with foldhash: every request looks its version's counters up here, and the keys are the names of deployed
/// apps, not anything a client chooses.
type AppTable = HashMap<String, HashMap<semver::Version, Arc<AppStats>, FastHash>, FastHash>;
type FastHash = foldhash::fast::RandomState;

/// The one source of truth for request and pool metrics.
pub struct Metrics {
    started: Instant,
    pool: Arc<Pool>,
    /// Whether requests are counted and timed (the pool's own counters always are).
    requests_on: bool,
    apps: ArcSwap<AppTable>,
    adding: Mutex<()>,
    unrouted: Arc<AppStats>,
    /// Versions removed from APPS_DIR, folded together so that totals never go down and memory does not grow with
    /// every version ever deployed.
    retired: Arc<AppStats>,
    samples: Mutex<VecDeque<Sample>>,
    updates: watch::Sender<Update>,
    closing: CancellationToken,
    snapshots: AtomicU64,
}

impl Metrics {
    /// Metrics for `pool`; with `requests_on` false, requests go uncounted (for measuring what counting costs).
    pub fn new(pool: Arc<Pool>, requests_on: bool) -> Metrics {
        let started = Instant::now();
        let (updates, _) = watch::channel(Update {
            seq: 0,
            json: Arc::from("{}"),
        });
        Metrics {
            started,
            pool,
            requests_on,
            apps: ArcSwap::default(),
            adding: Mutex::new(()),
            unrouted: Arc::new(AppStats::new(String::new(), String::new())),
            retired: Arc::new(AppStats::new(String::new(), RETIRED.to_owned())),
            samples: Mutex::new(VecDeque::from([Sample {
                at: started,
                apps: HashMap::new(),
            }])),
            updates,
            closing: CancellationToken::new(),
            snapshots: AtomicU64::new(0),
        }
    }

    /// The counters of one app version, made on its first request. Lock-free once made.
    pub fn app(&self, app: &str, version: &semver::Version) -> Arc<AppStats> {
        if let Some(stats) = self.apps.load().get(app).and_then(|versions| versions.get(version)) {
            return stats.clone();
        }
        let _adding = self.adding.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.apps.load_full();
        if let Some(stats) = current.get(app).and_then(|versions| versions.get(version)) {
            return stats.clone();
        }
        let stats = Arc::new(AppStats::new(app.to_owned(), version.to_string()));
        let mut table = (*current).clone();
        table
            .entry(app.to_owned())
            .or_default()
            .insert(version.clone(), stats.clone());
        self.apps.store(Arc::new(table));
        stats
    }

    /// The counters of requests that named no deployed app.
    pub(crate) fn unrouted(&self) -> Arc<AppStats> {
        self.unrouted.clone()
    }

    /// Marks a request to an app as in flight: if it is dropped before it is answered (the client went away), it
    /// is counted with status 499 and timed to that moment (unless requests are not counted).
    pub(crate) fn in_flight<'a>(&self, stats: &'a AppStats, start: Instant) -> InFlight<'a> {
        InFlight {
            stats: self.requests_on.then_some(stats),
            start,
        }
    }

    /// Counts a response to an app (one the dispatcher marked [`Served`]) and times it to the end of its body.
    pub fn observe(&self, start: Instant, response: Response) -> Response {
        if !self.requests_on {
            return response;
        }
        let Some(served) = response.extensions().get::<Served>() else {
            return response;
        };
        let stats = served.stats.clone();
        stats.count(response.status());
        response.map(|inner| axum::body::Body::new(Timed { inner, start, stats }))
    }

    fn read_apps(&self) -> Vec<AppReading> {
        let table = self.apps.load();
        let (cpu, retired_cpu) = self.pool.guest_cpu();
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

    /// Folds the counters of versions no longer in `deployed` into the retired total. Their share of the current
    /// window moves with them, so neither the totals nor the rates jump. (A request still in flight on a removed
    /// version finishes uncounted.)
    pub(crate) fn retain(&self, deployed: &crate::deploy::registry::Snapshot) {
        let _adding = self.adding.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.apps.load_full();
        let is_deployed = |app: &str, version: &semver::Version| {
            deployed
                .apps
                .get(app)
                .is_some_and(|a| a.versions.iter().any(|v| &v.version == version))
        };
        let mut kept = AppTable::default();
        let mut gone = Vec::new();
        for (app, versions) in current.iter() {
            for (version, stats) in versions {
                if is_deployed(app, version) {
                    kept.entry(app.clone())
                        .or_default()
                        .insert(version.clone(), stats.clone());
                } else {
                    gone.push(stats.read());
                }
            }
        }
        if gone.is_empty() {
            return;
        }
        let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        self.apps.store(Arc::new(kept));
        let retired_key = self.retired.read().key();
        for reading in &gone {
            self.retired.absorb(reading);
            let key = reading.key();
            for sample in samples.iter_mut() {
                if let Some(then) = sample.apps.remove(&key) {
                    sample.apps.entry(retired_key.clone()).or_default().add(&then);
                }
            }
        }
    }

    /// Reads everything at once. Has no side effects.
    pub(crate) fn snapshot(&self) -> Snapshot {
        let taken = self.snapshots.fetch_add(1, Ordering::Relaxed) + 1;
        let now = Instant::now();
        let (apps, recent, window) = {
            // Read under the samples' lock, so that a version being retired is seen either before or after.
            let samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
            let apps = self.read_apps();
            let start = samples.front().expect("the first sample is never removed alone");
            let recent = apps
                .iter()
                .map(|reading| {
                    let key = reading.key();
                    let recent = Recent::between(reading, start.apps.get(&key));
                    (key, recent)
                })
                .collect();
            (apps, recent, now.saturating_duration_since(start.at))
        };
        Snapshot {
            uptime: now.saturating_duration_since(self.started),
            pool: self.pool.stats(),
            counters: self.pool.counters.read(),
            pooling: self.pool.engine().is_pooling(),
            apps,
            recent,
            window,
            workers: self.pool.workers().read(now),
            sse_clients: self.sse_clients(),
            snapshots: taken,
        }
    }

    /// One sampler tick: keep the running totals for the window, and build the SSE frame if anyone listens.
    fn tick(&self) {
        let now = Instant::now();
        {
            let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
            let apps = self
                .read_apps()
                .into_iter()
                .map(|reading| {
                    let recent = Recent::between(&reading, None);
                    (reading.key(), recent)
                })
                .collect();
            samples.push_back(Sample { at: now, apps });
            // Keep the newest sample that is at least a window old: it starts the current window.
            while samples.len() > 1 && samples[1].at + WINDOW <= now {
                samples.pop_front();
            }
        }
        if self.updates.receiver_count() > 0 {
            let json = report::stats(&self.snapshot()).to_string();
            let seq = self.updates.borrow().seq + 1;
            self.updates.send_replace(Update {
                seq,
                json: Arc::from(json),
            });
        }
    }

    /// Samples every [`SAMPLE_INTERVAL`] for as long as the metrics live.
    pub(crate) fn spawn_sampler(self: &Arc<Self>) {
        let metrics = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + SAMPLE_INTERVAL, SAMPLE_INTERVAL);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let Some(metrics) = metrics.upgrade() else { break };
                metrics.tick();
            }
        });
    }

    /// A new SSE subscriber's view of the frames.
    pub(crate) fn subscribe(&self) -> watch::Receiver<Update> {
        self.updates.subscribe()
    }

    /// Open SSE streams.
    pub(crate) fn sse_clients(&self) -> usize {
        self.updates.receiver_count()
    }

    /// Cancelled when the server starts draining: long-lived streams end then.
    pub(crate) fn closing(&self) -> CancellationToken {
        self.closing.clone()
    }

    /// Ends every SSE stream (at the start of a drain, so they do not hold it open).
    pub(crate) fn close(&self) {
        self.closing.cancel();
    }
}

/// Status counted for a request whose client went away before it was answered (nginx's convention).
pub(crate) const CLIENT_CLOSED: u16 = 499;

/// A request to an app that has not been answered yet; see [`Metrics::in_flight`].
pub(crate) struct InFlight<'a> {
    /// `None` once answered, or when requests are not counted.
    stats: Option<&'a AppStats>,
    start: Instant,
}

impl InFlight<'_> {
    /// The request has its response: from here on it is counted by [`Metrics::observe`].
    pub(crate) fn answered(mut self) {
        self.stats = None;
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(stats) = self.stats {
            stats.count(StatusCode::from_u16(CLIENT_CLOSED).expect("499 is a valid status"));
            stats.latency.record(self.start.elapsed());
        }
    }
}

/// A response body that records its request's latency when it is done with: sent to the end, or dropped because
/// the client went away.
struct Timed {
    inner: axum::body::Body,
    start: Instant,
    stats: Arc<AppStats>,
}

impl Drop for Timed {
    fn drop(&mut self) {
        self.stats.latency.record(self.start.elapsed());
    }
}

impl http_body::Body for Timed {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> Metrics {
        let settings = crate::backends::wasm::engine::EngineSettings {
            pool_size: 1,
            cache_dir: None,
        };
        let engine = Arc::new(crate::backends::wasm::engine::Engine::new(&settings).unwrap());
        Metrics::new(Arc::new(Pool::new(engine, 1, 0)), true)
    }

    fn count(stats: &AppStats, n: usize) {
        for _ in 0..n {
            stats.count(StatusCode::OK);
            stats.latency.record(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_retired_version_keeps_its_totals_and_only_its_recent_share_in_the_window() {
        let metrics = metrics();
        let stats = metrics.app("a", &semver::Version::new(1, 0, 0));
        count(&stats, 3);
        metrics.tick();
        // Make the tick just taken the window's start, as it is once the window has passed.
        metrics.samples.lock().unwrap().pop_front();
        count(&stats, 2);
        let before = metrics.snapshot();
        assert_eq!((before.total().0, before.recent_total().requests), (5, 2));

        let nothing_deployed = crate::deploy::registry::Snapshot {
            apps: HashMap::new(),
            ignored: Vec::new(),
        };
        metrics.retain(&nothing_deployed);
        let after = metrics.snapshot();
        assert!(after.apps.iter().all(|reading| reading.app.is_empty()));
        assert_eq!((after.total().0, after.recent_total().requests), (5, 2));
        let retired = after.apps.iter().find(|r| r.version == RETIRED).unwrap();
        assert_eq!((retired.requests(), retired.latency.count()), (5, 5));
    }
}
