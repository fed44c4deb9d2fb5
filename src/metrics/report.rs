//! A [`Snapshot`] as the JSON of `/_/metrics` and `/_/stats` (and every SSE frame). The keys are documented in the
//! README's "Metrics" section; Buntime's names are kept where it has one.
//!
//! Each shape is a type. Their fields are declared in the order they are sent, which is alphabetical: these views
//! were once built as `serde_json` maps, which sort their keys, and the order is kept so that the bytes clients
//! see do not change (a unit test below holds every type to it). The maps keyed by app version and by worker id
//! are `BTreeMap`s of typed values, sorted the same way.

use std::collections::BTreeMap;

use serde::Serialize;

use super::histogram::Counts;
use super::{Recent, Snapshot, SAMPLE_INTERVAL};

const MIB: f64 = 1024.0 * 1024.0;

/// `/_/metrics`: the whole host's numbers (also `pool` in `/_/stats`).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct HostMetrics {
    /// Workers alive now: busy, idle or starting.
    active_workers: usize,
    /// Mean latency over the window: 0, not null, when nothing finished within it (Buntime's key is always a
    /// number), where the percentiles are null.
    avg_response_time_ms: f64,
    busy_workers: usize,
    /// Responses the server failed (5xx), ever.
    errors: u64,
    evictions: u64,
    /// Guest CPU over the window, in percent of one core.
    guest_cpu_percent: f64,
    guest_cpu_seconds: f64,
    /// Hits over hits and misses, ever; 0 before the first lookup.
    hit_rate: f64,
    hits: u64,
    idle_workers: usize,
    latency_ms: Percentiles,
    /// Linear memory held by live workers.
    #[serde(rename = "memoryUsageMB")]
    memory_usage_mb: f64,
    misses: u64,
    peak_workers: usize,
    pool_size: usize,
    pooling: bool,
    queue_depth: usize,
    queue_rejected: u64,
    queue_timeouts: u64,
    /// Over the window.
    requests_per_second: f64,
    sse_clients: usize,
    timeouts: u64,
    total_requests: u64,
    total_workers_created: u64,
    total_workers_failed: u64,
    traps: u64,
    uptime_ms: u64,
    /// How long the window is: a little over [`super::WINDOW`], or the uptime while shorter.
    window_seconds: f64,
}

/// Latency percentiles over the window, in milliseconds; null when no request finished within it.
#[derive(Debug, Serialize)]
struct Percentiles {
    p50: Option<f64>,
    p95: Option<f64>,
    p99: Option<f64>,
}

/// `/_/stats` and each SSE frame: the host's numbers, then each app version, then each worker.
#[derive(Debug, Serialize)]
pub(crate) struct Stats<'a> {
    /// By `app@version`; versions no longer deployed and requests that named no app are only in the totals.
    apps: BTreeMap<String, AppMetrics<'a>>,
    pool: HostMetrics,
    /// By worker id, as a string (so `"10"` sorts before `"9"`).
    workers: BTreeMap<String, WorkerMetrics<'a>>,
}

/// One app version in `/_/stats`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct AppMetrics<'a> {
    app: &'a str,
    avg_response_time_ms: f64,
    cpu_percent: f64,
    cpu_seconds: f64,
    errors: u64,
    latency_ms: Percentiles,
    requests: u64,
    requests_per_second: f64,
    /// Responses by status, for each status sent at least once (three digits, so they sort as numbers).
    statuses: BTreeMap<u16, u64>,
    version: &'a str,
    workers: AppWorkers,
}

/// An app version's live workers.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct AppWorkers {
    busy: u64,
    idle: u64,
    memory_bytes: u64,
}

/// One live worker in `/_/stats`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct WorkerMetrics<'a> {
    age_ms: u64,
    app: &'a str,
    idle_ms: u64,
    memory_bytes: u64,
    request_count: u64,
    /// `busy` or `idle`.
    state: &'static str,
    version: &'a str,
}

/// `/_/metrics`: the whole host's numbers.
pub(crate) fn metrics(snapshot: &Snapshot) -> HostMetrics {
    let (total_requests, errors) = snapshot.total();
    let recent = snapshot.recent_total();
    let pool = &snapshot.pool;
    let counters = &snapshot.counters;
    let memory: u64 = snapshot.workers.iter().map(|w| w.memory_bytes).sum();
    let lookups = counters.hits + counters.misses;
    HostMetrics {
        active_workers: pool.live,
        avg_response_time_ms: recent.latency.mean().map_or(0.0, ms),
        busy_workers: pool.live - pool.idle,
        errors,
        evictions: counters.evictions,
        guest_cpu_percent: cpu_percent(&recent, snapshot),
        guest_cpu_seconds: round(snapshot.apps.iter().map(|app| app.cpu.as_secs_f64()).sum(), 6),
        hit_rate: if lookups == 0 {
            0.0
        } else {
            round(counters.hits as f64 / lookups as f64, 4)
        },
        hits: counters.hits,
        idle_workers: pool.idle,
        latency_ms: percentiles(&recent.latency),
        memory_usage_mb: round(memory as f64 / MIB, 3),
        misses: counters.misses,
        peak_workers: pool.peak,
        pool_size: pool.capacity,
        pooling: snapshot.pooling,
        queue_depth: pool.queued,
        queue_rejected: counters.queue_rejected,
        queue_timeouts: counters.queue_timeouts,
        requests_per_second: rate(&recent, snapshot),
        sse_clients: snapshot.sse_clients,
        timeouts: counters.timeouts,
        total_requests,
        total_workers_created: counters.created,
        total_workers_failed: counters.failed,
        traps: counters.traps,
        uptime_ms: millis(snapshot.uptime),
        window_seconds: round(snapshot.window.as_secs_f64(), 3),
    }
}

/// `/_/stats`: the metrics, then each app version, then each worker.
pub(crate) fn stats(snapshot: &Snapshot) -> Stats<'_> {
    let tallies = snapshot.worker_tallies();
    let apps = snapshot
        .apps
        .iter()
        .filter(|reading| !reading.app.is_empty())
        .map(|reading| {
            let key = reading.key();
            let recent = snapshot.recent.get(&key).cloned().unwrap_or_default();
            let tally = |busy| {
                let key = (reading.app.as_str(), reading.version.as_str(), busy);
                tallies.get(&key).copied().unwrap_or_default()
            };
            let (busy, idle) = (tally(true), tally(false));
            let app = AppMetrics {
                app: &reading.app,
                avg_response_time_ms: recent.latency.mean().map_or(0.0, ms),
                cpu_percent: cpu_percent(&recent, snapshot),
                cpu_seconds: round(reading.cpu.as_secs_f64(), 6),
                errors: reading.errors(),
                latency_ms: percentiles(&recent.latency),
                requests: reading.requests(),
                requests_per_second: rate(&recent, snapshot),
                statuses: reading.statuses.iter().copied().collect(),
                version: &reading.version,
                workers: AppWorkers {
                    busy: busy.workers,
                    idle: idle.workers,
                    memory_bytes: busy.memory_bytes + idle.memory_bytes,
                },
            };
            (key, app)
        })
        .collect();
    let workers = snapshot
        .workers
        .iter()
        .map(|w| {
            let worker = WorkerMetrics {
                age_ms: w.age_ms,
                app: &w.app,
                idle_ms: w.idle_ms,
                memory_bytes: w.memory_bytes,
                request_count: w.requests,
                state: if w.busy { "busy" } else { "idle" },
                version: &w.version,
            };
            (w.id.to_string(), worker)
        })
        .collect();
    Stats {
        apps,
        pool: metrics(snapshot),
        workers,
    }
}

fn rate(recent: &Recent, snapshot: &Snapshot) -> f64 {
    // Right after start the window is only the uptime: one request in the first 50 ms is not 20 per second.
    let seconds = snapshot.window.max(SAMPLE_INTERVAL).as_secs_f64();
    round(recent.requests as f64 / seconds, 3)
}

/// Guest CPU over the window, in percent of one core.
fn cpu_percent(recent: &Recent, snapshot: &Snapshot) -> f64 {
    let seconds = snapshot.window.max(SAMPLE_INTERVAL).as_secs_f64();
    round(recent.cpu.as_secs_f64() / seconds * 100.0, 2)
}

fn percentiles(latency: &Counts) -> Percentiles {
    let at = |q| latency.quantile(q).map(ms);
    Percentiles {
        p50: at(0.5),
        p95: at(0.95),
        p99: at(0.99),
    }
}

fn ms(seconds: f64) -> f64 {
    round(seconds * 1000.0, 3)
}

fn millis(duration: std::time::Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn round(value: f64, places: i32) -> f64 {
    let scale = 10f64.powi(places);
    (value * scale).round() / scale
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::Duration;

    use super::*;
    use crate::backends::wasm::pool::{PoolCounts, PoolStats};
    use crate::backends::wasm::status::WorkerReading;
    use crate::metrics::histogram::Histogram;
    use crate::metrics::{AppReading, RETIRED};

    /// A snapshot with a little of everything: versions that sort differently as strings and as (app, version),
    /// the retired and unrouted counters, and workers whose ids sort differently as strings and as numbers.
    fn snapshot() -> Snapshot {
        let latency = Histogram::default();
        for ms in [1, 2, 3, 50, 700] {
            latency.record(Duration::from_millis(ms));
        }
        let reading = |app: &str, version: &str, statuses: Vec<(u16, u64)>| AppReading {
            app: app.to_owned(),
            version: version.to_owned(),
            statuses,
            latency: latency.counts(),
            cpu: Duration::from_millis(3),
        };
        let apps = vec![
            reading("a", "1.10.0", vec![(200, 4), (500, 1)]),
            reading("a", "1.9.0", vec![(200, 1)]),
            reading("a-b", "1.0.0", vec![(404, 2), (499, 1)]),
            reading("", RETIRED, vec![(200, 3)]),
            reading("", "", vec![(404, 9)]),
        ];
        let recent = apps
            .iter()
            .map(|app| {
                let recent = Recent {
                    requests: 2,
                    errors: 1,
                    latency: latency.counts(),
                    cpu: Duration::from_millis(7),
                };
                (app.key(), recent)
            })
            .collect::<HashMap<_, _>>();
        let worker = |id, app: &str, version: &str, busy| WorkerReading {
            id,
            app: app.to_owned(),
            version: version.to_owned(),
            busy,
            age_ms: 100,
            idle_ms: 5,
            requests: 3,
            memory_bytes: 65536,
        };
        Snapshot {
            uptime: Duration::from_millis(12345),
            pool: PoolStats {
                capacity: 8,
                live: 3,
                idle: 2,
                queued: 1,
                peak: 4,
            },
            counters: PoolCounts {
                hits: 7,
                misses: 3,
                ..PoolCounts::default()
            },
            pooling: true,
            apps,
            recent,
            window: Duration::from_millis(10_250),
            workers: vec![
                worker(9, "a", "1.10.0", true),
                worker(10, "a", "1.9.0", false),
                worker(2, "a-b", "1.0.0", false),
            ],
            sse_clients: 2,
            snapshots: 17,
        }
    }

    /// The order of the keys as sent is the order a `serde_json` map gives them, at every depth.
    fn keys_are_sorted(value: &impl Serialize) {
        let sent = serde_json::to_string(value).unwrap();
        let sorted = serde_json::to_value(value).unwrap().to_string();
        assert_eq!(sent, sorted);
    }

    #[test]
    fn every_shape_sends_its_keys_in_the_order_they_always_came() {
        let snapshot = snapshot();
        keys_are_sorted(&metrics(&snapshot));
        keys_are_sorted(&stats(&snapshot));
    }

    #[test]
    fn stats_list_deployed_versions_and_workers_by_key() {
        let snapshot = snapshot();
        let stats = serde_json::to_value(stats(&snapshot)).unwrap();
        let keys = |key: &str| stats[key].as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys("apps"), ["a-b@1.0.0", "a@1.10.0", "a@1.9.0"]);
        assert_eq!(keys("workers"), ["10", "2", "9"]);
        assert_eq!(
            stats["apps"]["a@1.10.0"]["statuses"],
            serde_json::json!({"200": 4, "500": 1})
        );
        assert_eq!(stats["pool"]["hitRate"], 0.7);
    }
}
