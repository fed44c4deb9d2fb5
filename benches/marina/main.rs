//! Marina's benchmarks, in one binary: each benchmark binary links wasmtime, and `cargo test --all-targets` builds
//! and runs every one, so one binary instead of eight saves CI seven links.
//!
//! `cargo bench --bench marina -- <name>` runs one benchmark, `-- <name> <name>` several in turn, and
//! `cargo bench --bench marina` all of them (which takes the better part of an hour). The names are those of
//! [`BENCHMARKS`], each a module here whose header says what it measures and what it needs (`wrk`, valgrind,
//! nginx, the Python and JavaScript toolchains). One benchmark per run is the way to take figures: each starts its own servers, but threads that one
//! leaves idle stay in the process.
//!
//! Run without `--bench` (as `cargo test --all-targets` does), each benchmark only checks that its scenarios
//! answer, in a few seconds; names then filter as test names do (a name that is no benchmark's selects none).
//!
//! They use only what the tests use of the crate: the server on `127.0.0.1:0` (`marina::server::serve`), the
//! front door in process (`marina::server::Front` over `marina::routes::AppState`), and the registry's snapshot
//! types for resolution.

use std::time::Instant;

mod call;
mod harness;
mod isolation;
mod languages;
mod memory;
mod proxy;
mod proxy_cost;
mod resolve;
mod workers;

// The test harness's guest builder and apps directory: the benchmarks run the same components the tests do.
#[path = "../../tests/common/mod.rs"]
mod common;

/// The server's allocator, so allocation costs what it costs there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Every benchmark, by the name that selects it, in the order a run of all of them takes.
const BENCHMARKS: [(&str, fn()); 8] = [
    ("resolve", resolve::main),
    ("call", call::main),
    ("workers", workers::main),
    ("languages", languages::main),
    ("memory", memory::main),
    ("proxy", proxy::main),
    ("proxy_cost", proxy_cost::main),
    ("isolation", isolation::main),
];

fn main() {
    // `proxy_cost` runs this binary again under valgrind, as a child that runs one of its scenarios.
    if proxy_cost::child() {
        return;
    }
    let (benchmarking, _) = harness::settings();
    let names: Vec<String> = std::env::args().skip(1).filter(|arg| !arg.starts_with('-')).collect();
    let known = |name: &str| BENCHMARKS.iter().any(|(benchmark, _)| *benchmark == name);
    if benchmarking {
        if let Some(unknown) = names.iter().find(|name| !known(name)) {
            let all: Vec<&str> = BENCHMARKS.iter().map(|(name, _)| *name).collect();
            eprintln!("no benchmark is called {unknown:?}; the benchmarks: {}", all.join(", "));
            std::process::exit(2);
        }
    }
    for (name, run) in BENCHMARKS {
        if names.is_empty() || names.iter().any(|chosen| chosen == name) {
            let started = Instant::now();
            run();
            if !benchmarking {
                eprintln!(
                    "{name}: every scenario answered ({:.1} s)",
                    started.elapsed().as_secs_f64()
                );
            }
        }
    }
}
