//! Body timing: a request's latency runs to the end of its response body, not to the head, so a streamed or slowly
//! read response is timed as the client saw it.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;

use super::counters::CoreStats;
use crate::guarded_body::Guarded;

/// Records its request's latency when dropped, which happens when the response body it guards is done with: sent
/// to the end, or dropped because the client went away. The accept loop holds it beside its own guard, in the one
/// wrapper it puts around every response body, so timing a request costs no allocation of its own.
pub(crate) struct Timer {
    start: Instant,
    stats: Arc<CoreStats>,
}

impl Drop for Timer {
    fn drop(&mut self) {
        self.stats.record(self.start.elapsed());
    }
}

impl Timer {
    pub(super) fn new(start: Instant, stats: Arc<CoreStats>) -> Timer {
        Timer { start, stats }
    }

    /// `body`, timed until it is dropped: for a caller with no wrapper of its own around the body.
    pub(crate) fn time(self, body: Body) -> Body {
        Body::new(Guarded::new(body, self))
    }
}
