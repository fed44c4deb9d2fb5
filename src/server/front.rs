//! The front door every request goes through: the target's length limit, then an internal route or an app, then
//! the access line and the request metrics.

use std::time::Instant;

use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use axum::Router;
use tower::ServiceExt;

use crate::backends::proxy::ClientAddr;
use crate::error::Error;
use crate::metrics::Timer;
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
    /// access line, and responses from apps are counted and timed to the end of their body. For a request made in
    /// process (tests, benchmarks): no client address, and the body timed by a wrapper of its own.
    pub async fn handle(&self, request: Request) -> Response {
        let (response, timer) = self.answer(request, None).await;
        match timer {
            Some(timer) => response.map(|body| timer.time(body)),
            None => response,
        }
    }

    /// The response to `request` from `client`, and the timer to drop when its body is done with (for a counted
    /// app request), which the accept loop keeps in the one wrapper it puts around the body. App paths go straight
    /// to the dispatcher rather than through the router to its fallback: the router's boxed futures, layer by
    /// layer, cost a proxied request measurably.
    pub(crate) async fn answer(&self, request: Request, client: Option<&ClientAddr>) -> (Response, Option<Timer>) {
        let start = Instant::now();
        let method = request.method().clone();
        // For the access line, after the request has moved on (a shared buffer: the clone copies nothing).
        let uri = request.uri().clone();
        let path = uri.path();
        let http_version = request.version();
        let len = uri.path_and_query().map_or(0, |pq| pq.as_str().len());
        let (served, response) = if len > MAX_URI_BYTES {
            let error = Error::UriTooLong {
                len,
                limit: MAX_URI_BYTES,
            };
            (None, error.into_response())
        } else if path == "/_" || path.starts_with("/_/") {
            let response = match internal::probe(&self.state, &method, path) {
                Some(response) => response,
                None => {
                    let routed = self.internal.clone().oneshot(request).await;
                    routed.unwrap_or_else(|never| match never {})
                }
            };
            (None, response)
        } else {
            let (served, response) = apps::handle(&self.state, request, client, start).await;
            (Some(served), response)
        };
        access_log::record(&method, path, http_version, start, served.as_ref(), &response);
        let timer = self.state.metrics.observe(start, served, response.status());
        (response, timer)
    }
}
