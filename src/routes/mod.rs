//! What the server answers: every request for an app ([`apps`]), and the host's own routes under `/_/`
//! ([`internal`], with the live stream in [`sse`]). Both read the same [`AppState`].

pub mod apps;
pub(crate) mod internal;
pub mod lifecycle;
mod route_cache;
pub mod sse;

use std::path::PathBuf;
use std::sync::Arc;

use crate::backends::proxy::Upstreams;
use crate::backends::wasm::engine::{Engine, EngineSettings};
use crate::backends::wasm::pool::Pool;
use crate::deploy::registry::Registry;
use crate::metrics::Metrics;
use lifecycle::Lifecycle;
use route_cache::RouteCache;

/// What every handler shares: cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub(crate) registry: Arc<Registry>,
    pub lifecycle: Arc<Lifecycle>,
    pub(crate) pool: Arc<Pool>,
    pub(crate) upstreams: Arc<Upstreams>,
    pub(crate) metrics: Arc<Metrics>,
    /// Per serving core, the versions that first path segments resolved to.
    pub(crate) route_cache: Arc<RouteCache>,
}

impl AppState {
    /// The state for serving `apps_dir`, still loading and with nothing scanned yet: the engine, a pool of
    /// `engine.pool_size` workers with `queue_limit` waiting places, and the metrics over it (with
    /// `request_metrics` false, requests go uncounted). No background task is started: the server starts the
    /// reaper, the sampler and the loader.
    pub fn new(
        apps_dir: impl Into<PathBuf>,
        engine: &EngineSettings,
        queue_limit: usize,
        request_metrics: bool,
    ) -> anyhow::Result<AppState> {
        let pool_size = engine.pool_size;
        let engine = Arc::new(Engine::new(engine)?);
        let pool = Arc::new(Pool::new(engine, pool_size, queue_limit));
        Ok(AppState {
            registry: Arc::new(Registry::new(apps_dir.into())),
            lifecycle: Arc::new(Lifecycle::default()),
            metrics: Arc::new(Metrics::new(pool.clone(), request_metrics)),
            pool,
            upstreams: Arc::new(Upstreams::new()),
            route_cache: Arc::default(),
        })
    }

    /// Scans `apps_dir` once, compiles every component, and marks the state ready: the server's first load,
    /// without following changes afterwards, for serving a [`crate::server::Front`] in process (an embedder, a
    /// benchmark). An unreadable `apps_dir` is the error, and leaves the state loading.
    pub async fn load(&self) -> std::io::Result<()> {
        self.scan().await?;
        self.ready(true).await;
        Ok(())
    }

    /// Reads APPS_DIR into the registry, off the async threads (it is file system work).
    pub(crate) async fn scan(&self) -> std::io::Result<()> {
        let registry = self.registry.clone();
        tokio::task::spawn_blocking(move || registry.reload_all())
            .await
            .expect("the scan does not panic")
    }

    /// Brings the pool in line with what was scanned (with `precompile`, waiting for every compile), then marks
    /// the state ready. A draining state stays draining.
    pub(crate) async fn ready(&self, precompile: bool) {
        for task in self.pool.sync(&self.registry.snapshot(), precompile) {
            let _ = task.await;
        }
        self.lifecycle.set_ready();
    }
}
