//! A [`Snapshot`]: everything the metrics report, read at one moment, and the sums every view needs. The JSON
//! ([`super::report`]), the Prometheus text ([`super::prometheus`]) and every SSE frame are rendered from one, so
//! they cannot disagree.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use super::counters::AppReading;
use super::window::Recent;
use crate::backends::wasm::pool::{PoolCounts, PoolStats};
use crate::backends::wasm::status::WorkerReading;

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
    /// How long the window actually is (a little over [`super::WINDOW`], or the uptime while shorter).
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
