//! Following APPS_DIR: the first scan (after which the server is ready), then every change, compiled in the
//! background before its first request and reflected in the pool and the metrics.

use crate::deploy::registry::Watcher;
use crate::routes::AppState;

/// Scans APPS_DIR, marks the server ready, then follows changes until the task is aborted. The watcher starts
/// before the first scan, so nothing changed meanwhile is missed; with `precompile`, ready waits for every
/// component to compile.
pub(crate) async fn follow(state: AppState, precompile: bool) {
    let registry = state.registry.clone();
    let watcher = tokio::task::spawn_blocking(move || {
        Watcher::start(registry)
            .map_err(|error| tracing::warn!(%error, "cannot watch the apps directory; hot reload is off"))
            .ok()
    })
    .await
    .expect("starting the watcher does not panic");
    let loaded = state.scan().await;
    // Changes from here on are followed below, including those made while the first compiles run.
    let mut changes = state.registry.subscribe();
    changes.mark_unchanged();
    // Ready first, then say so: whoever waits for the log line must find the server ready.
    state.ready(precompile).await;
    match loaded {
        Ok(()) => tracing::info!(apps = state.registry.snapshot().apps.len(), "apps loaded; ready"),
        Err(error) => tracing::error!(%error, "cannot read the apps directory; ready, serving no apps"),
    }
    // Versions added or changed from now on compile in the background, before their first request.
    while changes.changed().await.is_ok() {
        let snapshot = state.registry.snapshot();
        state.pool.sync(&snapshot, true);
        state.metrics.retain(&snapshot);
    }
    drop(watcher);
}
