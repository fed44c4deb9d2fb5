//! A [`Snapshot`] in Prometheus's text exposition format (version 0.0.4), which Prometheus and OpenMetrics
//! scrapers both accept.
//!
//! Labels are only ever app names, versions, status codes and states: all bounded by what is deployed, never the
//! raw path or anything else a client chooses. Requests that named no deployed app carry `app=""`.
//!
//! # Why not `prometheus-client`
//!
//! The official Rust client (0.24, tried against this module's output) was weighed for this encoder and not taken,
//! because it changes what scrapers read:
//!
//! - It writes OpenMetrics text only. That ends with `# EOF`, and a counter's `# TYPE` names the family without
//!   `_total` while each sample gets `_total` appended: `marina_requests_total` comes out as
//!   `marina_requests_total_total`, or, registered as `marina_requests`, as samples that a 0.0.4 parser (ours in
//!   the tests included) finds without a `TYPE`. It would also be served as `application/openmetrics-text`, where
//!   `/_/metrics` promises (and its tests hold it to) [`CONTENT_TYPE`].
//! - It writes label values and help text as given: a `"`, `\` or newline in them is not escaped.
//! - It formats bucket bounds with `dtoa` (`le="1.0"`, not `le="1"`), a different label value and so a different
//!   series.
//!
//! What it could express, it would not simplify: our values are read at scrape time from our own counters and
//! lock-free histogram, so its metric types and registry would go unused (a `Collector` handing precomputed
//! buckets to `encode_histogram`), and what would remain is the small text writer below.

use std::fmt::Write;

use super::Snapshot;

/// The response's `Content-Type`.
pub(crate) const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The exported latency buckets (seconds); each is one of the histogram's own bounds, so the counts are exact.
pub(crate) const LATENCY_BUCKETS: [f64; 18] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

pub(crate) fn encode(snapshot: &Snapshot) -> String {
    let mut out = Text::default();
    let counters = &snapshot.counters;
    let pool = &snapshot.pool;

    out.family("marina_uptime_seconds", "gauge", "Seconds since the server started.");
    out.sample("marina_uptime_seconds", &[], snapshot.uptime.as_secs_f64());

    out.family(
        "marina_requests_total",
        "counter",
        "Responses to app requests, by app, version and status (app=\"\": no such app).",
    );
    for app in &snapshot.apps {
        for (status, count) in &app.statuses {
            let labels = [
                ("app", app.app.as_str()),
                ("version", &app.version),
                ("status", &status.to_string()),
            ];
            out.sample("marina_requests_total", &labels, *count as f64);
        }
    }

    out.family(
        "marina_request_duration_seconds",
        "histogram",
        "Time from a request's arrival to the end of its response.",
    );
    for app in &snapshot.apps {
        let count = app.latency.count();
        if count == 0 {
            continue;
        }
        for le in LATENCY_BUCKETS {
            let bound_ns = (le * 1e9).round() as u64;
            let labels = [
                ("app", app.app.as_str()),
                ("version", &app.version),
                ("le", &le.to_string()),
            ];
            out.sample(
                "marina_request_duration_seconds_bucket",
                &labels,
                app.latency.at_most(bound_ns) as f64,
            );
        }
        let base = [("app", app.app.as_str()), ("version", app.version.as_str())];
        let inf = [base[0], base[1], ("le", "+Inf")];
        out.sample("marina_request_duration_seconds_bucket", &inf, count as f64);
        out.sample(
            "marina_request_duration_seconds_sum",
            &base,
            app.latency.sum_ns as f64 / 1e9,
        );
        out.sample("marina_request_duration_seconds_count", &base, count as f64);
    }

    // Every app version that was asked for is listed in both states, so a series does not vanish at zero.
    let mut workers = snapshot.worker_tallies();
    for app in snapshot.apps.iter().filter(|app| !app.app.is_empty()) {
        for busy in [true, false] {
            workers.entry((&app.app, &app.version, busy)).or_default();
        }
    }
    let state = |busy: bool| if busy { "busy" } else { "idle" };
    out.family("marina_workers", "gauge", "Live workers, by app, version and state.");
    for ((app, version, busy), tally) in &workers {
        let labels = [("app", *app), ("version", *version), ("state", state(*busy))];
        out.sample("marina_workers", &labels, tally.workers as f64);
    }
    out.family(
        "marina_worker_memory_bytes",
        "gauge",
        "Linear memory held by live workers, by app, version and state.",
    );
    for ((app, version, busy), tally) in &workers {
        let labels = [("app", *app), ("version", *version), ("state", state(*busy))];
        out.sample("marina_worker_memory_bytes", &labels, tally.memory_bytes as f64);
    }

    out.family(
        "marina_worker_cpu_seconds_total",
        "counter",
        "CPU time the guests of each WebAssembly app version used (version=\"retired\": versions no longer deployed).",
    );
    for app in snapshot
        .apps
        .iter()
        .filter(|app| !app.app.is_empty() || app.version == super::RETIRED)
    {
        let labels = [("app", app.app.as_str()), ("version", app.version.as_str())];
        out.sample("marina_worker_cpu_seconds_total", &labels, app.cpu.as_secs_f64());
    }

    let gauges = [
        (
            "marina_pool_size",
            "Most live workers at once (POOL_SIZE).",
            pool.capacity as f64,
        ),
        (
            "marina_pool_live_workers",
            "Workers alive now: busy, idle or starting.",
            pool.live as f64,
        ),
        (
            "marina_pool_idle_workers",
            "Warm workers waiting for a request.",
            pool.idle as f64,
        ),
        (
            "marina_pool_peak_workers",
            "Most workers alive at once so far.",
            pool.peak as f64,
        ),
        (
            "marina_queue_depth",
            "Requests waiting for a worker.",
            pool.queued as f64,
        ),
        (
            "marina_sse_clients",
            "Open /_/sse streams.",
            snapshot.sse_clients as f64,
        ),
    ];
    for (name, help, value) in gauges {
        out.family(name, "gauge", help);
        out.sample(name, &[], value);
    }
    let totals = [
        (
            "marina_queue_rejected_total",
            "Requests refused because the wait queue was full.",
            counters.queue_rejected,
        ),
        (
            "marina_queue_timeouts_total",
            "Requests whose deadline passed while they waited for a worker.",
            counters.queue_timeouts,
        ),
        (
            "marina_pool_hits_total",
            "Requests that found a warm worker.",
            counters.hits,
        ),
        (
            "marina_pool_misses_total",
            "Requests that needed a new worker.",
            counters.misses,
        ),
        (
            "marina_pool_evictions_total",
            "Idle workers dropped to make room for another version.",
            counters.evictions,
        ),
        (
            "marina_workers_created_total",
            "Workers instantiated.",
            counters.created,
        ),
        (
            "marina_workers_failed_total",
            "Workers that failed to start, trapped or timed out.",
            counters.failed,
        ),
        (
            "marina_worker_timeouts_total",
            "Requests that ran past their app's timeout.",
            counters.timeouts,
        ),
        (
            "marina_worker_traps_total",
            "Requests whose worker trapped.",
            counters.traps,
        ),
        (
            "marina_snapshots_total",
            "Metric snapshots taken (by /_/metrics, /_/stats and the SSE sampler).",
            snapshot.snapshots,
        ),
    ];
    for (name, help, value) in totals {
        out.family(name, "counter", help);
        out.sample(name, &[], value as f64);
    }
    out.0
}

#[derive(Default)]
struct Text(String);

impl Text {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(
            self.0,
            "# HELP {name} {}",
            help.replace('\\', "\\\\").replace('\n', "\\n")
        );
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (label, value)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{label}=\"{}\"", escape(value));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }
}

/// Label values escape backslash, double quote and newline.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::histogram::BOUNDS_NS;

    #[test]
    fn every_exported_bucket_is_one_of_the_histograms_bounds() {
        for le in LATENCY_BUCKETS {
            let bound_ns = (le * 1e9).round() as u64;
            assert!(BOUNDS_NS.contains(&bound_ns), "{le}");
        }
    }

    #[test]
    fn label_values_are_escaped() {
        let mut text = Text::default();
        text.sample("m", &[("app", "a\"b\\c\nd")], 1.0);
        assert_eq!(text.0, "m{app=\"a\\\"b\\\\c\\nd\"} 1\n");
    }
}
