//! Apps in Python and JavaScript, the examples of `runtime-sdk/python` and `runtime-sdk/js` built in the run, and the
//! WASI 0.3 handler of `runtime-sdk/examples/wasi03.rs` (warm with its default of 16 requests per instance at
//! once, and with one at a time), against `wasmtime serve` on the same components in the same run: Marina with `ttl > 0` (instances reused) against
//! `wasmtime serve` with instance reuse and a timeout, and Marina with `ttl: 0` against `wasmtime serve`'s instance
//! per request.
//!
//! `cargo bench --bench marina -- languages` (needs `wrk`, `python3` with venv and `node` with npm for the builds;
//! the anchors need `cargo install --locked wasmtime-cli@48`, found through `WASMTIME` or the PATH, and are skipped
//! without it). Each scenario is a `wrk -t1 -c64` run of `BENCH_SECS` (default 10) on `GET /`, the scenarios taking
//! turns for `BENCH_ROUNDS` rounds (default 3); the table shows each one's median round. Marina finds the
//! components' compiled code in the tests' cache (`target/languages/cache`) when they ran first; `wasmtime serve`
//! compiles each on start, which takes 15 to 20 s. Run without `--bench` (as `cargo test --all-targets` does) it
//! only checks that Marina's four apps answer, leaving out the anchors and their compiles.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Child;
use std::time::Duration;

use serde_json::{json, Value};

use crate::common;
use crate::harness::{self, start_marina_with, wrk, Load, POOL_SIZE};

/// Marina's pool here: the three warm apps' workers and the fresh ones, one per connection each.
const LANGUAGES_POOL_SIZE: usize = 4 * POOL_SIZE;
/// How long `wasmtime serve` may take to compile a Python or JavaScript component and listen.
const WASMTIME_STARTUP: Duration = Duration::from_secs(180);

/// Deploys `wasm` as `app@1.0.0` unchanged, so that every app of one component shares its compiled code.
fn deploy(apps: &Path, app: &str, wasm: &Path, config: Value) {
    let dir = apps.join(app).join("1.0.0");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(wasm, dir.join("app.wasm")).unwrap();
    std::fs::write(dir.join("worker.config.json"), config.to_string()).unwrap();
}

/// One row: its name, the URL the load goes to, and the row of the anchor its rate is compared with.
struct Scenario {
    name: String,
    url: String,
    anchor: Option<usize>,
}

pub fn main() {
    let (benchmarking, secs) = harness::settings();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let languages = [
            ("Python", "python", common::python_guest()),
            ("JavaScript", "javascript", common::js_guest()),
            ("WASI 0.3 (Rust)", "wasi03", common::guest("wasi03")),
        ];
        let apps = tempfile::tempdir().unwrap();
        // The WASI 0.3 component once more, its instances taking one request at a time (as every 0.2 one does):
        // what the default of 16 at once changes.
        let one_at_a_time = json!({"ttl": 3600, "idleTimeout": 3600, "maxRequests": 0, "maxConcurrentRequests": 1});
        deploy(apps.path(), "wasi03-one", &languages[2].2, one_at_a_time);
        for (_, name, wasm) in &languages {
            // The timeout covers a compile on the first request, when the cache is empty.
            let warm = json!({"ttl": 3600, "idleTimeout": 3600, "maxRequests": 0, "timeout": 300});
            deploy(apps.path(), &format!("{name}-warm"), wasm, warm);
            deploy(
                apps.path(),
                &format!("{name}-fresh"),
                wasm,
                json!({"ttl": 0, "timeout": 300}),
            );
        }
        // Room for every warm app's workers (one per connection each) and the fresh ones in flight, as each anchor
        // is a process of its own: with the usual pool, the warm apps would evict each other's workers as the
        // scenarios take turns, and each round would start by instantiating Python or JavaScript afresh.
        let marina = start_marina_with(apps.path(), |options| {
            options.cache_dir = Some(common::languages_cache());
            options.pool_size = LANGUAGES_POOL_SIZE;
        })
        .await;

        let mut anchors: Vec<Child> = Vec::new();
        let mut scenarios: Vec<Scenario> = Vec::new();
        let mut skipped = false;
        for (language, name, wasm) in &languages {
            let mut anchor = |reuse: bool, label: &str| -> Option<usize> {
                let (child, addr): (Child, SocketAddr) = harness::start_wasmtime_serve(wasm, reuse, WASMTIME_STARTUP)?;
                anchors.push(child);
                scenarios.push(Scenario {
                    name: format!("{language}: `wasmtime serve`, {label}"),
                    url: format!("http://{addr}/"),
                    anchor: None,
                });
                Some(scenarios.len() - 1)
            };
            let (reuse_row, fresh_row) = if benchmarking {
                (
                    anchor(true, "instance reuse, 30 s timeout"),
                    anchor(false, "an instance per request"),
                )
            } else {
                (None, None)
            };
            skipped |= benchmarking && (reuse_row.is_none() || fresh_row.is_none());
            scenarios.push(Scenario {
                name: format!("{language}: Marina, ttl > 0 (warm)"),
                url: marina.url(&format!("/{name}-warm/")),
                anchor: reuse_row,
            });
            scenarios.push(Scenario {
                name: format!("{language}: Marina, ttl: 0 (fresh)"),
                url: marina.url(&format!("/{name}-fresh/")),
                anchor: fresh_row,
            });
            if *name == "wasi03" {
                scenarios.push(Scenario {
                    name: format!("{language}: Marina, ttl > 0, maxConcurrentRequests: 1"),
                    url: marina.url("/wasi03-one/"),
                    anchor: reuse_row,
                });
            }
        }
        if skipped {
            eprintln!(
                "no `wasmtime` binary (set WASMTIME, or `cargo install --locked wasmtime-cli@48`), or it did not \
                 listen in time: the wasmtime serve anchors are skipped"
            );
        }
        if !benchmarking {
            for scenario in &scenarios {
                harness::smoke(&scenario.url).await;
            }
        } else {
            for scenario in &scenarios {
                let _ = wrk(&scenario.url, 1);
            }
            let mut rounds: Vec<Vec<Load>> = scenarios.iter().map(|_| Vec::new()).collect();
            for number in 0..harness::rounds() {
                for (scenario, rounds) in scenarios.iter().zip(&mut rounds) {
                    let load = wrk(&scenario.url, secs);
                    eprintln!(
                        "round {number}: {}: {:.0} requests/s, p99 {:.2} ms",
                        scenario.name, load.rps, load.p99_ms
                    );
                    rounds.push(load);
                }
            }
            let results: Vec<Load> = rounds.into_iter().map(harness::median_load).collect();
            println!("| scenario | requests/s | vs its `wasmtime serve` anchor | p50 | p99 | anchor's p99 |");
            println!("|---|---:|---:|---:|---:|---:|");
            for (scenario, load) in scenarios.iter().zip(&results) {
                let (ratio, anchor_p99) = match scenario.anchor.map(|row| &results[row]) {
                    Some(anchor) => (
                        format!("{:.2}x", load.rps / anchor.rps),
                        format!("{:.2} ms", anchor.p99_ms),
                    ),
                    None => (String::new(), String::new()),
                };
                println!(
                    "| {} | {:.0} | {ratio} | {:.2} ms | {:.2} ms | {anchor_p99} |",
                    scenario.name, load.rps, load.p50_ms, load.p99_ms
                );
            }
        }
        marina.stop().await;
        for mut child in anchors {
            let _ = child.kill();
            let _ = child.wait();
        }
    });
}
