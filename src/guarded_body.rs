//! A response body that holds a guard for as long as hyper holds the body: sent to the end, or dropped because the
//! client went away. The accept loop uses it to count a request as in progress until its last byte, the metrics to
//! time a request to the end of its body; the guard's `Drop` is the whole point, the body passes through untouched.

use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Body;
use http_body::{Frame, SizeHint};

/// `body`, with `guard` dropped when the body is. It wraps rather than boxes, so it costs no allocation of its own.
pub(crate) struct Guarded<G> {
    body: Body,
    _guard: G,
}

impl<G> Guarded<G> {
    pub(crate) fn new(body: Body, guard: G) -> Guarded<G> {
        Guarded { body, _guard: guard }
    }
}

impl<G: Unpin> http_body::Body for Guarded<G> {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
