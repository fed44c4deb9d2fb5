//! One log line per request: method, path, app, version, status and duration.
//!
//! The dispatcher leaves the app and version that served a request in the response's extensions, so the line
//! is written here, once, for every route, including errors.

use std::time::Instant;

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;

use crate::dispatch::Served;

pub async fn log(request: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let http_version = request.version();
    let response = next.run(request).await;
    let served = response.extensions().get::<Served>();
    tracing::info!(
        target: "marina::access",
        method = %method,
        path = %path,
        app = served.map(|s| s.app.as_str()),
        version = served.map(|s| s.version.as_str()),
        status = response.status().as_u16(),
        duration_ms = start.elapsed().as_secs_f64() * 1000.0,
        http = ?http_version,
        "request"
    );
    response
}
