//! The edge of the host: [`serve`] builds everything from [`ServeOptions`] and runs it on a bound listener.
//!
//! `serve` takes a bound listener and a shutdown future (mini-redis's shape), so tests bind `127.0.0.1:0` and drive
//! the same code the binary runs. The parts: the [`accept`] loop and its connection timeouts, the serving [`cores`]
//! it hands connections to, the [`front`] door
//! every request goes through, the [`access_log`], the [`reload`] loop that follows APPS_DIR, and the [`signals`]
//! that start the drain.

pub(crate) mod accept;
pub(crate) mod access_log;
pub(crate) mod cores;
pub(crate) mod front;
pub(crate) mod reload;
pub(crate) mod signals;

use std::future::Future;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::backends::wasm::engine::EngineSettings;
use crate::backends::wasm::pool::{DEFAULT_POOL_SIZE, DEFAULT_QUEUE_LIMIT};
use crate::routes::AppState;
pub(crate) use accept::{run, Timeouts, HEADER_READ_TIMEOUT, IDLE_TIMEOUT};
pub use front::Front;

/// How `serve` runs: everything the CLI's flags decide.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub(crate) apps_dir: std::path::PathBuf,
    /// Live instances across all apps (`POOL_SIZE`).
    pub pool_size: usize,
    /// Requests that may wait for a worker at once (`--queue-limit`).
    pub queue_limit: usize,
    /// Where compiled components are cached; `None` compiles in memory.
    pub cache_dir: Option<std::path::PathBuf>,
    /// Compile every component before reporting ready.
    pub precompile: bool,
    /// How long in-flight requests may take to finish at shutdown.
    pub drain_timeout: Duration,
    /// How long a new connection has to get its first request's head in ([`HEADER_READ_TIMEOUT`]).
    pub header_timeout: Duration,
    /// How long a connection may go with no request in progress ([`IDLE_TIMEOUT`]).
    pub idle_timeout: Duration,
    /// Count and time every request (off only to measure what that costs; pool metrics are always kept).
    pub request_metrics: bool,
    /// Threads that serve connections, each with a runtime of its own ([`cores`]); 0 serves them on the runtime
    /// `serve` is called on. One per CPU by default.
    pub serving_cores: usize,
}

impl ServeOptions {
    /// Defaults for `apps_dir`: the default pool and queue, no disk cache, lazy compilation, a 30 s drain, the
    /// connection timeouts of the constants above, and a serving core per CPU.
    pub fn new(apps_dir: impl Into<std::path::PathBuf>) -> ServeOptions {
        ServeOptions {
            apps_dir: apps_dir.into(),
            pool_size: DEFAULT_POOL_SIZE,
            queue_limit: DEFAULT_QUEUE_LIMIT,
            cache_dir: None,
            precompile: false,
            drain_timeout: Duration::from_secs(30),
            header_timeout: HEADER_READ_TIMEOUT,
            idle_timeout: IDLE_TIMEOUT,
            request_metrics: true,
            serving_cores: crate::core_local::default_count(),
        }
    }
}

/// Serves the apps in `options.apps_dir` on `listener` until `shutdown` resolves.
///
/// The listener is already bound, so the port answers at once: `/_/health` is 200 and `/_/ready` is 503 until the
/// first scan of APPS_DIR is done (and, with `precompile`, every component compiled). The watcher starts before
/// that scan, so nothing changed meanwhile is missed.
pub async fn serve(
    listener: TcpListener,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let engine = EngineSettings {
        pool_size: options.pool_size,
        cache_dir: options.cache_dir.clone(),
    };
    let state = AppState::new(&options.apps_dir, &engine, options.queue_limit, options.request_metrics)
        .map_err(|e| std::io::Error::other(format!("cannot start the WebAssembly engine: {e:#}")))?;
    state.pool.spawn_reaper();
    state.metrics.spawn_sampler();
    let loader = tokio::spawn(reload::follow(state.clone(), options.precompile));
    let timeouts = Timeouts {
        header: options.header_timeout,
        idle: options.idle_timeout,
        drain: options.drain_timeout,
    };
    let pool = state.pool.clone();
    let result = run(listener, state, shutdown, timeouts, options.serving_cores).await;
    // Stop following changes (dropping the watcher), and drop warm workers before the engine goes.
    loader.abort();
    let _ = loader.await;
    pool.clear();
    result
}
