//! The integration tests, as one binary: one module per area, sharing the harness in `tests/common` (which the
//! benches include too). One binary links the crate and wasmtime once, where a binary per file linked them
//! sixteen times; it also builds runtime-sdk's example components once per run (`common::guest`).
//!
//! All the tests share this process and run in parallel threads (four: `.cargo/config.toml` says why). Nothing here
//! is per-process state a test may own: servers bind `127.0.0.1:0`, each test has its own temporary apps
//! directory and its own tokio runtime, environment variables are set on child processes only, and what a test
//! measures of memory is the child `marina` process's, never this one's. What they do share is the machine: see
//! [`heavy`] and [`timed`].

#[path = "../common/mod.rs"]
mod common;

mod apps;
mod cli;
mod compile_cache;
mod engine;
mod fair_execution;
mod hostile_clients;
mod hot_reload;
mod isolation;
mod languages;
mod metrics;
mod properties;
mod proxy;
mod responses;
mod sdk;
mod server;
mod static_files;
mod under_load;
mod workers;

use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// The machine, as the tests that load it or time against it share it. A tokio lock, not std's: it is held
/// across `.await` for a whole test, on whichever runtime that test made, and a test that fails (panics) still
/// releases it as it unwinds instead of poisoning it for every test after.
static MACHINE: RwLock<()> = RwLock::const_new(());

/// For a test that loads the machine hard (many clients, hundreds of MiB through a worker, guests spinning on
/// every core, a browser): it runs while no other such test and no [`timed`] test runs. When each file was a
/// binary of its own, a test only ever ran beside tests of its own file; this keeps the heaviest ones from
/// meeting one another, or a test with a time bound, now that any two tests of the suite can run side by side.
pub async fn heavy() -> RwLockWriteGuard<'static, ()> {
    MACHINE.write().await
}

/// For a test that asserts a bound on how long something took (an answer within 1 s while guests loop, a 504
/// at its timeout and not later): it runs beside other tests, but never beside a [`heavy`] one.
pub async fn timed() -> RwLockReadGuard<'static, ()> {
    MACHINE.read().await
}
