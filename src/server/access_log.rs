//! One log line per request: method, path, app, version, status and duration.
//!
//! The dispatcher hands back the app and version that served a request beside its response, so the server's
//! outermost layer writes the line once, for every route, including errors.

use std::time::Instant;

use axum::http::{Method, Version};
use axum::response::Response;

use crate::log_fields::millis;
use crate::metrics::Served;

/// Writes the access line for a response to a request that arrived at `start`.
pub(crate) fn record(
    method: &Method,
    path: &str,
    http_version: Version,
    start: Instant,
    served: Option<&Served>,
    response: &Response,
) {
    tracing::info!(
        target: "marina::access",
        method = %method,
        path = %path,
        app = served.map(|s| s.stats.app.as_str()).filter(|app| !app.is_empty()),
        version = served.map(|s| s.stats.version.as_str()).filter(|version| !version.is_empty()),
        status = response.status().as_u16(),
        duration_ms = millis(start.elapsed()),
        http = ?http_version,
        "request"
    );
}
