//! The numbers behind `/_/metrics`, `/_/stats`, `/_/sse` and the dashboard, kept in one place.
//!
//! How the parts fit, one file each:
//!
//! - `counters.rs`: requests are counted per app version and serving core (status codes and a latency histogram,
//!   all atomics, found through a lock-free table); a request is in flight until answered, and counted 499 if its
//!   client goes first. The pool keeps its own counters, and each worker carries its status: the metrics only
//!   read those.
//! - `timed.rs`: a response's latency runs to the end of its body.
//! - `window.rs`: once a second the sampler keeps the running totals, so rates and percentiles cover the last
//!   [`WINDOW`] rather than the server's whole life.
//! - `snapshot.rs`: a [`Snapshot`] reads all of the above at once; the JSON ([`report`]), the Prometheus text
//!   ([`prometheus`]) and every SSE frame are rendered from a snapshot, so they cannot disagree.
//! - `broadcast.rs`: only while someone listens, each tick also builds the one SSE frame that every subscriber is
//!   sent; a drain ends every stream.
//!
//! [`Metrics`] below is the façade the rest of the server holds: it owns one of each part and makes them work
//! together (what a snapshot reads, what a tick does, what happens when a version is retired).

mod broadcast;
mod counters;
pub(crate) mod histogram;
pub(crate) mod prometheus;
pub(crate) mod report;
mod snapshot;
mod timed;
mod window;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use http::StatusCode;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::backends::wasm::pool::Pool;
pub(crate) use broadcast::Update;
use counters::Apps;
pub(crate) use counters::{AppReading, InFlight, RETIRED};
pub(crate) use counters::{CoreStats, Served};
pub(crate) use snapshot::Snapshot;
pub(crate) use timed::Timer;
pub use window::WINDOW;
pub(crate) use window::{Recent, SAMPLE_INTERVAL};

/// The one source of truth for request and pool metrics.
pub(crate) struct Metrics {
    started: Instant,
    pool: Arc<Pool>,
    /// Whether requests are counted and timed (the pool's own counters always are).
    requests_on: bool,
    apps: Apps,
    window: window::Window,
    broadcast: broadcast::Broadcast,
    snapshots: AtomicU64,
}

impl Metrics {
    /// Metrics for `pool`; with `requests_on` false, requests go uncounted (for measuring what counting costs).
    pub(crate) fn new(pool: Arc<Pool>, requests_on: bool) -> Metrics {
        let started = Instant::now();
        Metrics {
            started,
            pool,
            requests_on,
            apps: Apps::new(),
            window: window::Window::new(started),
            broadcast: broadcast::Broadcast::new(),
            snapshots: AtomicU64::new(0),
        }
    }

    /// Counting metrics over a one-instance pool with no cache, for unit tests of what reads them.
    #[cfg(test)]
    pub(crate) fn for_tests() -> Metrics {
        let settings = crate::backends::wasm::engine::EngineSettings {
            pool_size: 1,
            cache_dir: None,
        };
        let engine = Arc::new(crate::backends::wasm::engine::Engine::new(&settings).unwrap());
        Metrics::new(Arc::new(Pool::new(engine, 1, 0)), true)
    }

    /// The running core's counters of one app version, made on its first request. Lock-free once made.
    pub(crate) fn app(&self, app: &str, version: &semver::Version) -> Arc<CoreStats> {
        self.apps.get(app, version)
    }

    /// The running core's counters of requests that named no deployed app.
    pub(crate) fn unrouted(&self) -> Arc<CoreStats> {
        self.apps.unrouted()
    }

    /// Marks a request to an app as in flight: if it is dropped before it is answered (the client went away), it
    /// is counted with status 499 and timed to that moment (unless requests are not counted).
    pub(crate) fn in_flight<'a>(&self, stats: &'a CoreStats, start: Instant) -> InFlight<'a> {
        InFlight::new(self.requests_on.then_some(stats), start)
    }

    /// Counts a response to an app (`served` says which version; internal routes have none) and gives the timer
    /// that times it to the end of its body, to be dropped with the body.
    pub(crate) fn observe(&self, start: Instant, served: Option<Served>, status: StatusCode) -> Option<Timer> {
        if !self.requests_on {
            return None;
        }
        let Served { stats } = served?;
        stats.count(status);
        Some(Timer::new(start, stats))
    }

    fn read_apps(&self) -> Vec<AppReading> {
        self.apps.read(self.pool.guest_cpu())
    }

    /// Folds the counters of versions no longer in `deployed` into the retired total. Their share of the current
    /// window moves with them, so neither the totals nor the rates jump. (A request still in flight on a removed
    /// version finishes uncounted.)
    pub(crate) fn retain(&self, deployed: &crate::deploy::registry::Snapshot) {
        let is_deployed = |app: &str, version: &semver::Version| {
            deployed
                .apps
                .get(app)
                .is_some_and(|a| a.versions.iter().any(|v| &v.version == version))
        };
        let Some(retiring) = self.apps.retiring(is_deployed) else {
            return;
        };
        // The counters and the window change under the window's lock, which a snapshot holds while it reads both:
        // it sees a version either under its own key or already retired, never both or neither.
        let mut samples = self.window.lock();
        let (gone, retired) = retiring.apply();
        samples.fold(&gone, &retired);
    }

    /// Reads everything at once. Has no side effects.
    pub(crate) fn snapshot(&self) -> Snapshot {
        let taken = self.snapshots.fetch_add(1, Ordering::Relaxed) + 1;
        let now = Instant::now();
        let (apps, (recent, window)) = {
            // Read under the samples' lock, so that a version being retired is seen either before or after.
            let samples = self.window.lock();
            let apps = self.read_apps();
            let recent = samples.recent(&apps, now);
            (apps, recent)
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
            let mut samples = self.window.lock();
            samples.tick(now, self.read_apps());
        }
        self.broadcast
            .publish(|| serde_json::to_string(&report::stats(&self.snapshot())).expect("the stats serialize"));
    }

    /// Samples every [`SAMPLE_INTERVAL`] for as long as the metrics live.
    pub(crate) fn spawn_sampler(self: &Arc<Self>) {
        window::spawn_sampler(self, Metrics::tick);
    }

    /// A new SSE subscriber's view of the frames.
    pub(crate) fn subscribe(&self) -> watch::Receiver<Update> {
        self.broadcast.subscribe()
    }

    /// Open SSE streams.
    pub(crate) fn sse_clients(&self) -> usize {
        self.broadcast.subscribers()
    }

    /// Cancelled when the server starts draining: long-lived streams end then.
    pub(crate) fn closing(&self) -> CancellationToken {
        self.broadcast.closing()
    }

    /// Ends every SSE stream (at the start of a drain, so they do not hold it open).
    pub(crate) fn close(&self) {
        self.broadcast.close();
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::Duration;

    use http::StatusCode;

    use super::*;

    fn count(stats: &CoreStats, n: usize) {
        for _ in 0..n {
            stats.count(StatusCode::OK);
            stats.record(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_retired_version_keeps_its_totals_and_only_its_recent_share_in_the_window() {
        let metrics = Metrics::for_tests();
        let stats = metrics.app("a", &semver::Version::new(1, 0, 0));
        count(&stats, 3);
        metrics.tick();
        // Make the tick just taken the window's start, as it is once the window has passed.
        metrics.window.lock().pass_oldest();
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
