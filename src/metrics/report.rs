//! A [`Snapshot`] as the JSON of `/_/metrics` and `/_/stats` (and every SSE frame). The keys are documented in the
//! README's "Metrics" section; Buntime's names are kept where it has one.

use serde_json::{json, Map, Value};

use super::histogram::Counts;
use super::{Recent, Snapshot, SAMPLE_INTERVAL};

const MIB: f64 = 1024.0 * 1024.0;

/// `/_/metrics`: the whole host's numbers.
pub(crate) fn metrics(snapshot: &Snapshot) -> Value {
    let (total_requests, errors) = snapshot.total();
    let recent = snapshot.recent_total();
    let pool = &snapshot.pool;
    let counters = &snapshot.counters;
    let memory: u64 = snapshot.workers.iter().map(|w| w.memory_bytes).sum();
    let lookups = counters.hits + counters.misses;
    json!({
        "uptimeMs": millis(snapshot.uptime),
        "totalRequests": total_requests,
        "errors": errors,
        "requestsPerSecond": rate(&recent, snapshot),
        "windowSeconds": round(snapshot.window.as_secs_f64(), 3),
        // Buntime's key is always a number; our percentiles are null when there is nothing to rank.
        "avgResponseTimeMs": recent.latency.mean().map_or(0.0, ms),
        "latencyMs": percentiles(&recent.latency),
        "poolSize": pool.capacity,
        "activeWorkers": pool.live,
        "busyWorkers": pool.live - pool.idle,
        "idleWorkers": pool.idle,
        "peakWorkers": pool.peak,
        "queueDepth": pool.queued,
        "queueRejected": counters.queue_rejected,
        "queueTimeouts": counters.queue_timeouts,
        "hits": counters.hits,
        "misses": counters.misses,
        "hitRate": if lookups == 0 { 0.0 } else { round(counters.hits as f64 / lookups as f64, 4) },
        "evictions": counters.evictions,
        "totalWorkersCreated": counters.created,
        "totalWorkersFailed": counters.failed,
        "timeouts": counters.timeouts,
        "traps": counters.traps,
        "memoryUsageMB": round(memory as f64 / MIB, 3),
        "guestCpuSeconds": round(snapshot.apps.iter().map(|app| app.cpu.as_secs_f64()).sum(), 6),
        "guestCpuPercent": cpu_percent(&recent, snapshot),
        "pooling": snapshot.pooling,
        "sseClients": snapshot.sse_clients,
    })
}

/// `/_/stats`: the metrics, then each app version, then each worker.
pub(crate) fn stats(snapshot: &Snapshot) -> Value {
    let mut apps = Map::new();
    let tallies = snapshot.worker_tallies();
    for reading in snapshot.apps.iter().filter(|reading| !reading.app.is_empty()) {
        let key = reading.key();
        let recent = snapshot.recent.get(&key).cloned().unwrap_or_default();
        let tally = |busy| {
            let key = (reading.app.as_str(), reading.version.as_str(), busy);
            tallies.get(&key).copied().unwrap_or_default()
        };
        let (busy, idle) = (tally(true), tally(false));
        let statuses: Map<String, Value> = reading
            .statuses
            .iter()
            .map(|(status, count)| (status.to_string(), json!(count)))
            .collect();
        apps.insert(
            key,
            json!({
                "app": reading.app,
                "version": reading.version,
                "requests": reading.requests(),
                "errors": reading.errors(),
                "statuses": statuses,
                "requestsPerSecond": rate(&recent, snapshot),
                "avgResponseTimeMs": recent.latency.mean().map_or(0.0, ms),
                "latencyMs": percentiles(&recent.latency),
                "cpuSeconds": round(reading.cpu.as_secs_f64(), 6),
                "cpuPercent": cpu_percent(&recent, snapshot),
                "workers": {
                    "busy": busy.workers,
                    "idle": idle.workers,
                    "memoryBytes": busy.memory_bytes + idle.memory_bytes,
                },
            }),
        );
    }
    let workers: Map<String, Value> = snapshot
        .workers
        .iter()
        .map(|w| {
            let worker = json!({
                "app": w.app,
                "version": w.version,
                "state": if w.busy { "busy" } else { "idle" },
                "ageMs": w.age_ms,
                "idleMs": w.idle_ms,
                "requestCount": w.requests,
                "memoryBytes": w.memory_bytes,
            });
            (w.id.to_string(), worker)
        })
        .collect();
    json!({ "pool": metrics(snapshot), "apps": apps, "workers": workers })
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

fn percentiles(latency: &Counts) -> Value {
    let at = |q| latency.quantile(q).map(ms);
    json!({ "p50": at(0.5), "p95": at(0.95), "p99": at(0.99) })
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
