//! Worker throughput and latency against the hosts a user would pick instead, measured in the same run with the
//! same load.
//!
//! `cargo bench --bench marina -- workers` (needs `wrk`: `apt-get install wrk`; the `wasmtime serve` anchors need
//! `cargo install --locked wasmtime-cli@48`, found through `WASMTIME` or the PATH, and are skipped without it).
//! Scenarios, each a `wrk -t1 -c64` run, taking turns for `BENCH_ROUNDS` rounds (median reported):
//!
//! - native: an axum "hello" handler on its own port, the limit;
//! - marina's own `/_/health` route, to separate the host's HTTP stack from the worker;
//! - warm: `hello` with `ttl > 0` (instances reused), against `wasmtime serve` with instance reuse and a timeout;
//! - fresh: `hello` with `ttl: 0` (a new instance per request), against `wasmtime serve`'s instance per request;
//! - warm and fresh again on a server without serving cores (`serving_cores: 0`, one shared multi-thread runtime,
//!   as before they were built), to show what they change;
//! - the two `wasmtime serve` anchors on the same component;
//!
//! then what request metrics cost: the warm scenario on two servers, one with `--no-request-metrics`, in
//! alternating runs (the machine's drift hits both alike), plus the metrics' own cost per request in process
//! (through `Front::handle`, with metrics on and off);
//! then the first request to a never-loaded version, timed from the client, with an empty compile cache and again
//! after a restart with the cache filled. `BENCH_SECS` sets each wrk run's length (default 10). Run without
//! `--bench` (as `cargo test --all-targets` does) it only checks that every scenario answers, without timing.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use axum::body::Body;
use http_body_util::BodyExt;
use marina::backends::wasm::engine::EngineSettings;
use marina::routes::AppState;
use marina::server::Front;
use serde_json::json;

use crate::common;
use crate::harness::{self, deploy, median, start_marina, start_marina_with, start_native, wrk, Load};

/// First-request samples per cache state; the median is reported.
const FIRST_REQUEST_SAMPLES: usize = 5;
/// Alternating runs per side when comparing metrics on and off; the median of each side is reported.
const METRICS_ROUNDS: usize = 5;
/// How long `wasmtime serve` may take to compile the hello component and listen.
const WASMTIME_STARTUP: Duration = Duration::from_secs(30);
/// Requests answered in process to time the metrics' share of a request.
const RECORDINGS: u32 = 200_000;

/// Times the first request to each of `count` never-loaded apps, on a server that was just started.
async fn first_requests(apps: &Path, cache_dir: &Path, prefix: &str, count: usize) -> Vec<f64> {
    let server = start_marina(apps, Some(cache_dir.to_path_buf())).await;
    let client = reqwest::Client::new();
    // One request to something else, so the client's connection and the server's first-use costs are paid.
    client.get(server.url("/_/health")).send().await.unwrap();
    let mut samples = Vec::new();
    for i in 0..count {
        let started = Instant::now();
        let response = client.get(server.url(&format!("/{prefix}{i}/"))).send().await.unwrap();
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
        samples.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    server.stop().await;
    samples
}

/// What a scenario's rate is compared with, besides the native handler.
enum Anchor {
    None,
    /// Compared with `wasmtime serve` with instance reuse.
    Reuse,
    /// Compared with `wasmtime serve` with an instance per request.
    Fresh,
}

pub fn main() {
    let (benchmarking, secs) = harness::settings();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let hello = common::guest("hello");
        let apps = tempfile::tempdir().unwrap();
        deploy(
            apps.path(),
            "warm",
            &hello,
            json!({"ttl": 3600, "idleTimeout": 3600, "maxRequests": 0}),
        );
        deploy(apps.path(), "fresh", &hello, json!({"ttl": 0}));
        let count = if benchmarking { FIRST_REQUEST_SAMPLES } else { 1 };
        for i in 0..count {
            deploy(apps.path(), &format!("cold{i}"), &hello, json!({}));
        }

        let native = start_native().await;
        let marina = start_marina(apps.path(), None).await;
        let shared = start_marina_with(apps.path(), |options| options.serving_cores = 0).await;
        let reusing = harness::start_wasmtime_serve(&hello, true, WASMTIME_STARTUP);
        let fresh = harness::start_wasmtime_serve(&hello, false, WASMTIME_STARTUP);
        if reusing.is_none() || fresh.is_none() {
            eprintln!(
                "no `wasmtime` binary (set WASMTIME, or `cargo install --locked wasmtime-cli@48`): the wasmtime serve \
                 anchors are skipped"
            );
        }
        let mut scenarios = vec![
            ("native axum hello", native.url("/"), Anchor::None),
            (
                "marina `/_/health` (host only, no worker)",
                marina.url("/_/health"),
                Anchor::None,
            ),
            ("marina hello, ttl > 0 (warm)", marina.url("/warm/"), Anchor::Reuse),
            ("marina hello, ttl: 0 (fresh)", marina.url("/fresh/"), Anchor::Fresh),
            (
                "marina warm, one shared runtime (`serving_cores: 0`)",
                shared.url("/warm/"),
                Anchor::Reuse,
            ),
            (
                "marina fresh, one shared runtime (`serving_cores: 0`)",
                shared.url("/fresh/"),
                Anchor::Fresh,
            ),
        ];
        // Where each anchor's row is, when it runs.
        let mut anchor_row = |child: &Option<(std::process::Child, SocketAddr)>, name| {
            child.as_ref().map(|(_, addr)| {
                scenarios.push((name, format!("http://{addr}/"), Anchor::None));
                scenarios.len() - 1
            })
        };
        let reuse_row = anchor_row(&reusing, "`wasmtime serve`, instance reuse, 30 s timeout");
        let fresh_row = anchor_row(&fresh, "`wasmtime serve`, an instance per request");
        if !benchmarking {
            for (_, url, _) in &scenarios {
                harness::smoke(url).await;
            }
        } else {
            // Compile and warm up before measuring, then the scenarios take turns, round after round, so the
            // machine's drift hits each alike; the median round of each is reported.
            for (_, url, _) in &scenarios {
                let _ = wrk(url, 1);
            }
            let mut rounds: Vec<Vec<Load>> = scenarios.iter().map(|_| Vec::new()).collect();
            for number in 0..harness::rounds() {
                for ((name, url, _), rounds) in scenarios.iter().zip(&mut rounds) {
                    let load = wrk(url, secs);
                    eprintln!(
                        "round {number}: {name}: {:.0} requests/s, p99 {:.2} ms",
                        load.rps, load.p99_ms
                    );
                    rounds.push(load);
                }
            }
            let results: Vec<Load> = rounds.into_iter().map(harness::median_load).collect();
            let reuse_anchor = reuse_row.map(|row| &results[row]);
            let fresh_anchor = fresh_row.map(|row| &results[row]);
            let native_rps = results[0].rps;
            println!(
                "| scenario | requests/s | vs native | vs its `wasmtime serve` anchor | p50 | p99 | anchor's p99 |"
            );
            println!("|---|---:|---:|---:|---:|---:|---:|");
            for ((name, _, anchor), load) in scenarios.iter().zip(&results) {
                let anchor = match anchor {
                    Anchor::None => None,
                    Anchor::Reuse => reuse_anchor,
                    Anchor::Fresh => fresh_anchor,
                };
                let (ratio, anchor_p99) = match anchor {
                    Some(anchor) => (
                        format!("{:.2}x", load.rps / anchor.rps),
                        format!("{:.2} ms", anchor.p99_ms),
                    ),
                    None => ("".into(), "".into()),
                };
                println!(
                    "| {name} | {:.0} | {:.2} | {ratio} | {:.2} ms | {:.2} ms | {anchor_p99} |",
                    load.rps,
                    load.rps / native_rps,
                    load.p50_ms,
                    load.p99_ms
                );
            }
        }
        marina.stop().await;
        shared.stop().await;
        native.stop().await;
        metrics_cost(apps.path(), benchmarking, secs).await;
        for (mut child, _) in reusing.into_iter().chain(fresh) {
            let _ = child.kill();
            let _ = child.wait();
        }

        let cache = tempfile::tempdir().unwrap();
        let uncached = first_requests(apps.path(), cache.path(), "cold", count).await;
        let cached = first_requests(apps.path(), cache.path(), "cold", count).await;
        if benchmarking {
            println!();
            println!("| first request to a never-loaded version | median of {count} | min | max |");
            println!("|---|---:|---:|---:|");
            for (name, samples) in [("compile (empty cache)", uncached), ("cached compile", cached)] {
                let min = samples.iter().cloned().fold(f64::INFINITY, f64::min);
                let max = samples.iter().cloned().fold(0.0, f64::max);
                println!("| {name} | {:.2} ms | {min:.2} ms | {max:.2} ms |", median(samples));
            }
        }
    });
}

/// Warm `hello` with request metrics on and off, in alternating wrk runs, and the recording's cost in-process.
async fn metrics_cost(apps: &Path, benchmarking: bool, secs: u64) {
    let on = start_marina(apps, None).await;
    let off = start_marina_with(apps, |options| options.request_metrics = false).await;
    let (on_url, off_url) = (on.url("/warm/"), off.url("/warm/"));
    if !benchmarking {
        harness::smoke(&on_url).await;
        harness::smoke(&off_url).await;
    } else {
        let _ = (wrk(&on_url, 1), wrk(&off_url, 1));
        let (mut with, mut without) = (Vec::new(), Vec::new());
        for _ in 0..METRICS_ROUNDS {
            with.push(wrk(&on_url, secs));
            without.push(wrk(&off_url, secs));
        }
        let rate = |loads: &[Load]| median(loads.iter().map(|l| l.rps).collect());
        let p99 = |loads: &[Load]| median(loads.iter().map(|l| l.p99_ms).collect());
        let runs = |loads: &[Load]| {
            loads
                .iter()
                .map(|l| format!("{:.0}", l.rps))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!();
        println!("| warm hello, median of {METRICS_ROUNDS} alternating runs | requests/s | p99 | runs (requests/s) |");
        println!("|---|---:|---:|---|");
        println!(
            "| request metrics on | {:.0} | {:.2} ms | {} |",
            rate(&with),
            p99(&with),
            runs(&with)
        );
        println!(
            "| request metrics off | {:.0} | {:.2} ms | {} |",
            rate(&without),
            p99(&without),
            runs(&without)
        );
        println!("| on / off | {:.1}% | | |", 100.0 * rate(&with) / rate(&without));
    }
    let metrics = recording_cost(&on, benchmarking).await;
    on.stop().await;
    off.stop().await;
    if benchmarking {
        let (per_request, snapshot) = metrics;
        println!();
        println!("request metrics per request, in process (in flight, count, time to body end): {per_request:.0} ns");
        println!("one GET /_/stats on that server (snapshot + JSON + the HTTP round trip): {snapshot:.1} us");
    }
}

/// Nanoseconds the request metrics add to one request (in process, through the front door of a server with them
/// and of one without, the response's body read to the end), and microseconds per `GET /_/stats` on `server`.
///
/// The request is one that costs little besides: a static app's bare mount, `/site`, answered with a redirect to
/// `/site/` without reading the disk, but resolved, served and counted like any request for an app. What the
/// metrics add is what `request_metrics` switches: the in-flight mark, the count, and the timing to the body's end.
async fn recording_cost(server: &harness::Running, benchmarking: bool) -> (f64, f64) {
    let apps = tempfile::tempdir().unwrap();
    let site = apps.path().join("site").join("1.0.0");
    std::fs::create_dir_all(&site).unwrap();
    std::fs::write(site.join("index.html"), "site").unwrap();
    let (with, without) = (front(apps.path(), true).await, front(apps.path(), false).await);
    let count = if benchmarking { RECORDINGS } else { 100 };
    let time = async |front: &Front| {
        let started = Instant::now();
        for _ in 0..count {
            let response = front
                .handle(http::Request::get("/site").body(Body::empty()).unwrap())
                .await;
            assert!(response.status().is_redirection());
            response.into_body().collect().await.unwrap();
        }
        started.elapsed()
    };
    // Each side twice, alternating, the first pass a warm-up.
    time(&with).await;
    time(&without).await;
    let (observed, bare) = (time(&with).await, time(&without).await);
    let per_request = observed.saturating_sub(bare).as_nanos() as f64 / f64::from(count);
    // The running server's own snapshot, with its apps and warm workers.
    let client = reqwest::Client::new();
    let started = Instant::now();
    let rounds = 200;
    for _ in 0..rounds {
        let response = client.get(server.url("/_/stats")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let _ = response.bytes().await.unwrap();
    }
    let stats_us = started.elapsed().as_secs_f64() * 1e6 / f64::from(rounds);
    (per_request, stats_us)
}

/// The front door of a server for `apps`, loaded and ready, with or without request metrics.
async fn front(apps: &Path, request_metrics: bool) -> Front {
    let engine = EngineSettings {
        pool_size: 1,
        cache_dir: None,
    };
    let state = AppState::new(apps, &engine, 0, request_metrics).unwrap();
    state.load().await.expect("the apps directory is readable");
    Front::new(state)
}
