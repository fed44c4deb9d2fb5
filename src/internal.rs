//! The host's own routes under `/_/`: liveness, readiness and the deployment listing.
//!
//! App names cannot start with `_`, so these can never shadow an app.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::error::Error;
use crate::lifecycle::Phase;
use crate::registry::{App, AppVersion};
use crate::server::AppState;

/// Shown instead of `env` values in `/_/deployments`: they are often secrets, and the listing is unauthenticated.
pub const REDACTED: &str = "<redacted>";

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/_/health", get(health))
        .route("/_/ready", get(ready))
        .route("/_/deployments", get(deployments))
        .route("/_/metrics", get(metrics))
        .route("/_", any(no_route))
        .route("/_/", any(no_route))
        .route("/_/{*rest}", any(no_route))
}

/// The worker pool's numbers (Buntime's key names where they exist). Issue 4 grows this into the full set.
async fn metrics(State(state): State<AppState>) -> Json<Value> {
    let pool = state.pool.stats();
    let counters = &state.pool.counters;
    let load = |counter: &std::sync::atomic::AtomicU64| counter.load(std::sync::atomic::Ordering::Relaxed);
    Json(json!({
        "poolSize": pool.capacity,
        "activeWorkers": pool.live,
        "busyWorkers": pool.live - pool.idle,
        "idleWorkers": pool.idle,
        "peakWorkers": pool.peak,
        "queueDepth": pool.queued,
        "queueRejected": load(&counters.queue_rejected),
        "evictions": load(&counters.evictions),
        "hits": load(&counters.hits),
        "misses": load(&counters.misses),
        "totalWorkersCreated": load(&counters.created),
        "pooling": state.pool.engine().is_pooling(),
    }))
}

/// Liveness: the process answers.
async fn health() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// Readiness: 200 only between the end of loading and the start of a drain.
async fn ready(State(state): State<AppState>) -> Response {
    match state.lifecycle.phase() {
        Phase::Ready => (StatusCode::OK, Json(json!({ "status": "ready" }))).into_response(),
        Phase::Loading => (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "status": "loading" }))).into_response(),
        Phase::Draining => (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "status": "draining" }))).into_response(),
    }
}

/// Every app, its versions with their entrypoint, kind and effective config, and everything that is wrong.
async fn deployments(State(state): State<AppState>) -> Json<Value> {
    let snapshot = state.registry.snapshot();
    let apps: Vec<Value> = snapshot.sorted_apps().into_iter().map(|app| app_json(app)).collect();
    Json(json!({
        "appsDir": state.registry.apps_dir(),
        "apps": apps,
        "ignored": snapshot.ignored,
    }))
}

fn app_json(app: &App) -> Value {
    let versions: Vec<Value> = app.versions.iter().map(|v| version_json(v)).collect();
    json!({ "name": app.name, "versions": versions, "ignored": app.ignored })
}

fn version_json(version: &AppVersion) -> Value {
    let mut value = json!({ "version": version.version.to_string(), "dir": version.dir_name });
    match &version.deployment {
        Ok(deployment) => {
            let mut config = deployment.config.clone();
            config.env.values_mut().for_each(|v| *v = REDACTED.to_owned());
            value["kind"] = json!(deployment.kind);
            value["entrypoint"] = json!(deployment.entrypoint);
            value["config"] = json!(config);
            value["error"] = Value::Null;
        }
        Err(error) => value["error"] = json!(error),
    }
    value
}

async fn no_route() -> Error {
    Error::NoRoute("no such internal route; see /_/health, /_/ready, /_/deployments".into())
}
