//! The host's own routes under `/_/`: liveness, readiness, the deployment listing, metrics and the dashboard.
//!
//! App names cannot start with `_`, so these can never shadow an app. Each JSON answer is a `Serialize` type
//! below (the metrics' own are in [`crate::metrics::report`]), so the shape is written down where it is built.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::header::GetAll;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::{Json, Router};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::backends::wasm::pool::Pool;
use crate::deploy::config::WorkerConfig;
use crate::deploy::registry::{App, AppKind, AppVersion};
use crate::error::Error;
use crate::metrics;
use crate::negotiate::weighted;
use crate::routes::lifecycle::Phase;
use crate::routes::sse;
use crate::routes::AppState;

/// Shown instead of `env` values in `/_/deployments`: they are often secrets, and the listing is unauthenticated.
pub(crate) const REDACTED: &str = "<redacted>";

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/_/health", get(health))
        .route("/_/ready", get(ready))
        .route("/_/deployments", get(deployments))
        .route("/_/metrics", get(metrics))
        .route("/_/stats", get(stats))
        .route("/_/sse", get(sse))
        .route("/_/dashboard", get(dashboard))
        .route("/_", any(no_route))
        .route("/_/", any(no_route))
        .route("/_/{*rest}", any(no_route))
}

/// `/_/metrics`: JSON, or Prometheus text when the query or the `Accept` header asks for it.
async fn metrics(
    State(state): State<AppState>,
    query: Result<Query<MetricsQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, Error> {
    let format = query.map_err(|e| Error::BadQuery(e.body_text()))?.0.format;
    let prometheus = match format.as_deref() {
        Some("prometheus") => true,
        Some("json") => false,
        Some(other) => {
            return Err(Error::BadQuery(format!(
                "format must be \"json\" or \"prometheus\", not {other:?}"
            )))
        }
        None => prefers_prometheus(headers.get_all(header::ACCEPT)),
    };
    let snapshot = state.metrics.snapshot();
    Ok(if prometheus {
        let text = metrics::prometheus::encode(&snapshot);
        ([(header::CONTENT_TYPE, metrics::prometheus::CONTENT_TYPE)], text).into_response()
    } else {
        Json(metrics::report::metrics(&snapshot)).into_response()
    })
}

#[derive(Debug, Deserialize)]
struct MetricsQuery {
    format: Option<String>,
}

/// Whether `Accept` ranks Prometheus's formats (`text/plain`, `application/openmetrics-text`) above JSON. A
/// missing header, `*/*` and browsers' defaults get JSON.
fn prefers_prometheus(accept: GetAll<'_, HeaderValue>) -> bool {
    let (mut text, mut json) = (0.0f32, 0.0f32);
    for (media, q) in weighted(accept) {
        match media.as_str() {
            "text/plain" | "application/openmetrics-text" => text = text.max(q),
            "application/json" | "application/*" | "*/*" => json = json.max(q),
            _ => {}
        }
    }
    text > json
}

/// `/_/stats`: the metrics, each app version and each worker. Reading it changes nothing.
async fn stats(State(state): State<AppState>) -> Response {
    let snapshot = state.metrics.snapshot();
    Json(metrics::report::stats(&snapshot)).into_response()
}

/// `/_/sse`: the stats every `interval` seconds as server-sent events.
async fn sse(State(state): State<AppState>, query: Result<Query<SseQuery>, QueryRejection>) -> Result<Response, Error> {
    let query = query.map_err(|e| Error::BadQuery(e.body_text()))?.0;
    let every = sse::interval(query.interval.as_deref())?;
    sse::stream(&state.metrics, every)
}

#[derive(Debug, Deserialize)]
struct SseQuery {
    interval: Option<String>,
}

/// `/_/dashboard`: one self-contained page (its script and styles inline; nothing loaded from elsewhere).
async fn dashboard() -> Response {
    static POLICY: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| content_security_policy(DASHBOARD));
    let policy = HeaderValue::from_str(&POLICY).expect("the policy is ASCII");
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (header::CONTENT_SECURITY_POLICY, policy),
            (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
        ],
        DASHBOARD,
    )
        .into_response()
}

const DASHBOARD: &str = include_str!("dashboard.html");

/// A policy that lets the page run exactly its own inline script and style (by hash) and talk only to this
/// origin: nothing injected into it could run, and no other site may frame it.
fn content_security_policy(page: &str) -> String {
    use base64::Engine as _;
    use sha2::Digest as _;
    let hash = |tag: &str| {
        let open = format!("<{tag}>");
        let start = page
            .find(&open)
            .map(|i| i + open.len())
            .expect("the page has the element");
        let end = page[start..].find(&format!("</{tag}>")).expect("the element is closed") + start;
        let digest = sha2::Sha256::digest(&page.as_bytes()[start..end]);
        format!("'sha256-{}'", base64::engine::general_purpose::STANDARD.encode(digest))
    };
    format!(
        "default-src 'none'; script-src {}; style-src {}; connect-src 'self'; base-uri 'none'; form-action 'none'; \
         frame-ancestors 'none'",
        hash("script"),
        hash("style")
    )
}

/// `/_/health` and `/_/ready`: `{"status": ...}`.
#[derive(Debug, Serialize)]
struct Status {
    status: &'static str,
}

/// Liveness: the process answers.
async fn health() -> Response {
    health_now()
}

fn health_now() -> Response {
    Json(Status { status: "ok" }).into_response()
}

/// Readiness: 200 only between the end of loading and the start of a drain.
async fn ready(State(state): State<AppState>) -> Response {
    ready_now(&state)
}

fn ready_now(state: &AppState) -> Response {
    let (code, status) = match state.lifecycle.phase() {
        Phase::Ready => (StatusCode::OK, "ready"),
        Phase::Loading => (StatusCode::SERVICE_UNAVAILABLE, "loading"),
        Phase::Draining => (StatusCode::SERVICE_UNAVAILABLE, "draining"),
    };
    (code, Json(Status { status })).into_response()
}

/// The answer to a `GET` of `/_/health` or `/_/ready`, without the router: load balancers and orchestrators poll
/// these all the time, and the router's per-request work (cloning the route's service and the state, matching,
/// the matched-path extension) was about a tenth of the CPU such a request cost the server (7.5 us a request
/// against 6.5 without it and with the sleeping epoch ticker, which alone saved about 2%). Other methods, and
/// every other internal path, go through the router.
pub(crate) fn probe(state: &AppState, method: &Method, path: &str) -> Option<Response> {
    if method != Method::GET {
        return None;
    }
    match path {
        "/_/health" => Some(health_now()),
        "/_/ready" => Some(ready_now(state)),
        _ => None,
    }
}

/// `/_/deployments`: every app, its versions with their entrypoint, kind and effective config, and everything
/// that is wrong.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Deployments<'a> {
    apps_dir: &'a Path,
    /// By name.
    apps: Vec<AppListing<'a>>,
    /// Entries of APPS_DIR that are not apps, with the reason.
    ignored: &'a [String],
}

#[derive(Debug, Serialize)]
struct AppListing<'a> {
    name: &'a str,
    /// Highest first.
    versions: Vec<VersionListing<'a>>,
    /// Entries of the app's directory that are not versions, with the reason.
    ignored: &'a [String],
}

/// One version: what it serves, or (with only `version`, `dir` and `error`) why it cannot.
#[derive(Debug, Serialize)]
struct VersionListing<'a> {
    version: String,
    dir: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    kind: Option<AppKind>,
    #[serde(skip_serializing_if = "Option::is_none")]
    entrypoint: Option<&'a Path>,
    /// The effective config, defaults filled in and `env` values [`REDACTED`].
    #[serde(skip_serializing_if = "Option::is_none")]
    config: Option<WorkerConfig>,
    /// Null when the version can be served.
    error: Option<&'a str>,
    /// Why the version gets a fresh instance per request whatever its `ttl`, when it does.
    #[serde(rename = "reuseOff", skip_serializing_if = "Option::is_none")]
    reuse_off: Option<&'static str>,
}

/// Every app, its versions with their entrypoint, kind and effective config, and everything that is wrong.
async fn deployments(State(state): State<AppState>) -> Response {
    let snapshot = state.registry.snapshot();
    let apps = snapshot
        .sorted_apps()
        .into_iter()
        .map(|app| app_listing(app, &state.pool))
        .collect();
    let listing = Deployments {
        apps_dir: state.registry.apps_dir(),
        apps,
        ignored: &snapshot.ignored,
    };
    Json(listing).into_response()
}

fn app_listing<'a>(app: &'a App, pool: &Pool) -> AppListing<'a> {
    AppListing {
        name: &app.name,
        versions: app
            .versions
            .iter()
            .map(|v| version_listing(&app.name, v, pool))
            .collect(),
        ignored: &app.ignored,
    }
}

fn version_listing<'a>(app: &str, version: &'a AppVersion, pool: &Pool) -> VersionListing<'a> {
    let mut listing = VersionListing {
        version: version.version.to_string(),
        dir: &version.dir_name,
        kind: None,
        entrypoint: None,
        config: None,
        error: None,
        reuse_off: pool.reuse_off(app, &version.version.to_string()),
    };
    match &version.deployment {
        Ok(deployment) => {
            let mut config = deployment.config.clone();
            config.env.values_mut().for_each(|v| *v = REDACTED.to_owned());
            listing.kind = Some(deployment.kind);
            listing.entrypoint = Some(&deployment.entrypoint);
            listing.config = Some(config);
        }
        Err(error) => listing.error = Some(error),
    }
    listing
}

async fn no_route() -> Error {
    Error::NoRoute(
        "no such internal route; see /_/health, /_/ready, /_/deployments, /_/metrics, /_/stats, /_/sse, /_/dashboard"
            .into(),
    )
}
