//! Marina hosts versioned apps from a directory: drop `APPS_DIR/<app>/<version>/` on disk and it answers at
//! `/<app>@<semver>/...`.
//!
//! # Layers
//!
//! The folders are the layers, listed from the top; a module imports only from the layers below its own, and
//! modules on one layer do not import one another (`src/layers.rs` checks this on every test run):
//!
//! 1. [`cli`]: the `marina` command (`serve`, `check`, `schema`) and log output; settings are validated before
//!    anything binds.
//! 2. [`server`]: the edge: the accept loop (HTTP/1.1 and h2c on one port, connection limits and timeouts,
//!    graceful drain) and the serving cores it hands connections to, the front door every request goes through, the access log, the reload loop, signals.
//! 3. [`routes`]: what a request is answered with: app dispatch (split `/<app>@<spec>/rest`, resolve, hand on),
//!    the host's own routes under `/_/` and the SSE stream, over the shared [`routes::AppState`].
//! 4. [`metrics`]: request and pool counters, latency histograms, the window, the JSON and Prometheus views.
//! 5. [`backends`]: what serves a resolved request: [`backends::static_files`], [`backends::proxy`] (proxy rules'
//!    upstreams, WebSocket tunnels) and [`backends::wasm`] (invoke, pool, engine, lanes, workers). The three are
//!    peers and do not import one another; what they share sits in `backends` itself.
//! 6. [`error`]: every failure a request can meet, and the one place it becomes a JSON response.
//! 7. [`deploy`]: what is on disk: `worker.config.json` and its schema, compiled proxy rules, the registry of
//!    apps and versions (scan, semver resolution, hot reload). It knows nothing of HTTP responses.
//! 8. `negotiate`, `log_fields`, `guarded_body` and `core_local`: reading weighted header lists (`Accept`,
//!    `Accept-Encoding`), how values are written in log lines, a response body that holds a guard, and which
//!    serving core the running thread is (with the state kept per core); any layer may use them.

pub mod backends;
pub mod cli;
mod core_local;
pub mod deploy;
pub mod error;
mod guarded_body;
#[cfg(test)]
mod layers;
mod log_fields;
pub mod metrics;
mod negotiate;
pub mod routes;
pub mod server;
