//! Body timing: a request's latency runs to the end of its response body, not to the head, so a streamed or slowly
//! read response is timed as the client saw it.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http_body::{Frame, SizeHint};

use super::counters::AppStats;

/// A response body that records its request's latency when it is done with: sent to the end, or dropped because
/// the client went away.
pub(super) struct Timed {
    inner: axum::body::Body,
    start: Instant,
    stats: Arc<AppStats>,
}

impl Timed {
    /// `inner`, timed from `start` into `stats`.
    pub(super) fn new(inner: axum::body::Body, start: Instant, stats: Arc<AppStats>) -> Timed {
        Timed { inner, start, stats }
    }
}

impl Drop for Timed {
    fn drop(&mut self) {
        self.stats.record(self.start.elapsed());
    }
}

impl http_body::Body for Timed {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
