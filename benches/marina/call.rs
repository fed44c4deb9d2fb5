//! What one request for a component costs in process, without the network: the floor under the `workers`
//! benchmark's figures.
//!
//! `cargo bench --bench marina -- call`. For the SDK's `hello` and for a component on plain `wasip2` bindings,
//! requests go through `Front::handle` as a connection's requests do once hyper has read them, and their bodies
//! are read to the end. That includes everything the server does for a request but the network: the front
//! (the target's length check, the access line, the request metrics), dispatch (splitting the path, resolving the
//! version), taking a worker from the pool and giving it back, and the wasi:http call itself, run on the request's
//! own task as a short call is. Not included: sockets, hyper's parsing and writing, and the access line's output
//! (no log subscriber is installed, so the line is skipped).
//!
//! Three loops per component, each reporting wall time per request and the process's CPU time (every thread:
//! this one, the guest lanes, wasmtime's epoch ticker) per request:
//! - warm, one request at a time (`ttl > 0`: one instance reused);
//! - warm, [`IN_FLIGHT`] requests at a time, as a loaded pool serves them (instances taken in turn; wall time is
//!   then the inverse of the rate);
//! - fresh, one request at a time (`ttl: 0`: an instance per request).
//!
//! `CALLS` sets the warm loops' length (default 50,000; the fresh loop takes a tenth of it). Run without `--bench`
//! (as `cargo test --all-targets` does) it only checks that each loop runs.
//!
//! A tight loop keeps wasmtime's code and the instance's memory in the CPU caches, so these are lower bounds: in
//! the server the same call shares the caches with hyper, tokio and the kernel's TCP stack.

use std::path::Path;
use std::time::{Duration, Instant};

use axum::body::Body;
use futures_util::StreamExt;
use http_body_util::BodyExt;
use marina::backends::wasm::engine::EngineSettings;
use marina::routes::AppState;
use marina::server::Front;
use serde_json::json;

use crate::common;

/// Requests in flight in the loaded loop, and the pool's size: every one of them holds a worker.
const IN_FLIGHT: usize = 64;
/// Requests that may wait for a worker: none do, with a worker for every request in flight.
const QUEUE_LIMIT: usize = 1024;

/// One request to `path`, its body read to the end.
async fn request(front: &Front, path: &str) {
    let request = http::Request::get(path).body(Body::empty()).expect("a valid request");
    let response = front.handle(request).await;
    assert_eq!(response.status(), 200, "{path}");
    response.into_body().collect().await.expect("the body arrives");
}

/// Wall time and the process's CPU time per request, in microseconds, for `count` requests to `path` with
/// `in_flight` of them at a time.
async fn per_request(front: &Front, path: &str, count: usize, in_flight: usize) -> (f64, f64) {
    let (started, cpu) = (Instant::now(), cpu_time::ProcessTime::now());
    futures_util::stream::iter(0..count)
        .map(|_| request(front, path))
        .buffer_unordered(in_flight)
        .for_each(|()| async {})
        .await;
    let per = |spent: Duration| spent.as_secs_f64() * 1e6 / count as f64;
    (per(started.elapsed()), per(cpu.elapsed()))
}

/// An apps directory with `component` as app `warm` (`ttl > 0`) and as app `fresh` (`ttl: 0`).
fn apps(component: &Path) -> tempfile::TempDir {
    let apps = tempfile::tempdir().unwrap();
    let configs = [
        ("warm", json!({"ttl": 3600, "idleTimeout": 3600, "maxRequests": 0})),
        ("fresh", json!({"ttl": 0})),
    ];
    for (app, config) in configs {
        let dir = apps.path().join(app).join("1.0.0");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(component, dir.join("app.wasm")).unwrap();
        std::fs::write(dir.join("worker.config.json"), config.to_string()).unwrap();
    }
    apps
}

pub fn main() {
    let (timed, _) = crate::harness::settings();
    let calls: usize = match timed {
        true => std::env::var("CALLS").map_or(50_000, |v| v.parse().expect("CALLS is a number")),
        false => 10,
    };
    let fresh_calls = (calls / 10).max(1);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    if timed {
        println!(
            "| component (per request: time / CPU) | warm, 1 in flight | warm, {IN_FLIGHT} in flight \
             | fresh (`ttl: 0`), 1 in flight |"
        );
        println!("|---|---:|---:|---:|");
    }
    for example in ["hello", "raw_wasip2"] {
        let apps = apps(&common::guest(example));
        runtime.block_on(async {
            let engine = EngineSettings {
                pool_size: IN_FLIGHT,
                cache_dir: None,
            };
            let state = AppState::new(apps.path(), &engine, QUEUE_LIMIT, true).unwrap();
            state.load().await.expect("the apps directory is readable");
            let front = Front::new(state);
            // The fresh loop first, while the pool holds no warm worker that a fresh one would have to evict.
            request(&front, "/fresh/").await;
            let fresh = per_request(&front, "/fresh/", fresh_calls, 1).await;
            per_request(&front, "/warm/", calls / 10, IN_FLIGHT).await;
            let warm = per_request(&front, "/warm/", calls, 1).await;
            let loaded = per_request(&front, "/warm/", calls, IN_FLIGHT).await;
            if timed {
                let cell = |(time, cpu): (f64, f64)| format!("{time:.1} / {cpu:.1} µs");
                println!("| {example} | {} | {} | {} |", cell(warm), cell(loaded), cell(fresh));
            }
        });
    }
}
