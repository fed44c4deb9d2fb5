//! The front door every request goes through: the target's length limit, then an internal route or an app, then
//! the access line and the request metrics.

use std::time::Instant;

use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use axum::Router;
use tower::ServiceExt;

use crate::error::Error;
use crate::routes::{apps, internal, AppState};
use crate::server::access_log;

/// Request targets longer than this answer 414: no app needs more, and every log line carries the path.
pub(crate) const MAX_URI_BYTES: usize = 8 * 1024;
/// The whole HTTP surface: internal routes under `/_/`, and every other path dispatched to an app.
#[derive(Clone)]
pub struct Front {
    state: AppState,
    /// The internal routes: every path that is `/_` or starts with `/_/` (no app name starts with `_`).
    internal: Router,
}

impl Front {
    pub fn new(state: AppState) -> Front {
        let internal = internal::routes().with_state(state.clone());
        Front { state, internal }
    }

    /// What every request goes through: targets over the length limit are refused, every response gets its
    /// access line, and responses from apps are counted and timed. App paths go straight to the dispatcher rather
    /// than through the router to its fallback: the router's boxed futures, layer by layer, cost a proxied request
    /// measurably.
    pub async fn handle(&self, request: Request) -> Response {
        let start = Instant::now();
        let method = request.method().clone();
        // For the access line, after the request has moved on (a shared buffer: the clone copies nothing).
        let uri = request.uri().clone();
        let path = uri.path();
        let http_version = request.version();
        let len = uri.path_and_query().map_or(0, |pq| pq.as_str().len());
        let response = if len > MAX_URI_BYTES {
            Error::UriTooLong {
                len,
                limit: MAX_URI_BYTES,
            }
            .into_response()
        } else if path == "/_" || path.starts_with("/_/") {
            let routed = self.internal.clone().oneshot(request).await;
            routed.unwrap_or_else(|never| match never {})
        } else {
            apps::handle(&self.state, request).await
        };
        access_log::record(&method, path, http_version, start, &response);
        self.state.metrics.observe(start, response)
    }
}
