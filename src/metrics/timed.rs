//! Body timing: a request's latency runs to the end of its response body, not to the head, so a streamed or slowly
//! read response is timed as the client saw it.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;

use super::counters::AppStats;
use crate::guarded_body::Guarded;

/// Records its request's latency when dropped, which happens when the response body it guards is done with: sent
/// to the end, or dropped because the client went away.
pub(super) struct Timer {
    start: Instant,
    stats: Arc<AppStats>,
}

impl Drop for Timer {
    fn drop(&mut self) {
        self.stats.record(self.start.elapsed());
    }
}

/// `body`, timed from `start` into `stats` until it is dropped.
pub(super) fn timed(body: Body, start: Instant, stats: Arc<AppStats>) -> Body {
    Body::new(Guarded::new(body, Timer { start, stats }))
}
