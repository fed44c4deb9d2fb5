//! Marina hosts versioned apps from a directory: drop `APPS_DIR/<app>/<version>/` on disk and it answers at
//! `/<app>@<semver>/...`.
//!
//! How the parts fit, in the order a request meets them:
//!
//! - [`cli`]: the `marina` command (`serve`, `check`, `schema`); settings are validated before anything binds.
//! - [`server`]: the accept loop (HTTP/1.1 and h2c on one port, limits, graceful drain) and the front door.
//! - [`access_log`]: one structured log line per request.
//! - [`internal`]: the host's own routes under `/_/` (health, readiness, deployments, metrics, the dashboard).
//! - [`metrics`]: request and pool counters, latency histograms, the JSON/Prometheus/SSE views of them.
//! - [`dispatch`]: splits `/<app>@<spec>/rest`, resolves the version, and hands the rest to what serves it.
//! - [`registry`]: what is deployed: the scan of APPS_DIR, semver resolution, hot reload.
//! - [`config`]: `worker.config.json`, its validation and its generated JSON schema.
//! - [`proxy`]: a version's `proxy` rules: matched requests forwarded to upstreams, WebSocket tunnels.
//! - [`static_files`]: static apps, with conditional and range requests, confined to their directory.
//! - [`invoke`]: one request on a WASM worker: deadline, body limit, traps and timeouts as HTTP answers.
//! - [`lanes`]: the threads guest code runs on, apart from the front, with long calls and heavy apps demoted.
//! - [`pool`]: the bounded pool of workers: the `POOL_SIZE` cap, warm reuse, LRU eviction, the wait queue.
//! - [`worker`]: one isolated instance: its env, read-only filesystem, outbound policy, memory cap, logs.
//! - [`engine`]: the one wasmtime engine: pooling allocator, epoch ticker, compile cache.
//! - [`error`]: every failure and the one place it becomes a JSON response.
//! - [`lifecycle`]: loading, ready, draining, and the signals that end the process.
//! - [`logging`]: pretty or JSON log output.

pub mod access_log;
pub mod cli;
pub mod config;
pub mod dispatch;
pub mod engine;
pub mod error;
pub mod internal;
pub mod invoke;
pub mod lanes;
pub mod lifecycle;
pub mod logging;
pub mod metrics;
pub mod pool;
pub mod proxy;
pub mod registry;
pub mod server;
pub mod static_files;
pub mod worker;
