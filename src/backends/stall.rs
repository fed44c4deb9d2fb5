//! A response body cut off when the upstream stalls: no frame for the rule's timeout ends it with an error, which
//! the front server turns into a reset connection rather than a client waiting forever.
//!
//! tower-http's `TimeoutBody` does this by creating, registering and dropping a timer for every frame, even one
//! that is already there. Most frames are (a small response arrives with its head), so here the timer is armed
//! only when the body has to wait, and the one timer a body ever needs is made at its first wait and re-set after.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// `inner`, ended with an error when it has kept the reader waiting for `limit`.
pub(crate) struct StallTimeout<B> {
    inner: B,
    /// `None`: never cut.
    limit: Option<Duration>,
    /// Made at the first wait; boxed because `Sleep` is not `Unpin`.
    timer: Option<Pin<Box<Sleep>>>,
    /// Whether `timer` is counting down the current wait (it is left as it was when a frame arrives).
    armed: bool,
}

impl<B> StallTimeout<B> {
    pub(crate) fn new(inner: B, limit: Duration) -> StallTimeout<B> {
        StallTimeout::optional(inner, Some(limit))
    }

    /// `inner`, cut after `limit` if there is one.
    pub(crate) fn optional(inner: B, limit: Option<Duration>) -> StallTimeout<B> {
        StallTimeout {
            inner,
            limit,
            timer: None,
            armed: false,
        }
    }
}

/// The error a stalled body ends with.
#[derive(Debug, thiserror::Error)]
#[error("the response body sent nothing for {0:?}; it was cut off")]
pub(crate) struct Stalled(Duration);

impl<B> Body for StallTimeout<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.armed = false;
            return Poll::Ready(frame.map(|frame| frame.map_err(Into::into)));
        }
        let Some(limit) = this.limit else {
            return Poll::Pending;
        };
        if !this.armed {
            let deadline = Instant::now() + limit;
            match &mut this.timer {
                Some(timer) => timer.as_mut().reset(deadline),
                None => this.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
            this.armed = true;
        }
        let timer = this.timer.as_mut().expect("armed above");
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Stalled(limit).into()))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use http_body_util::BodyExt;

    /// A body that yields `frames` chunks, waiting `gap` before each.
    fn trickle(frames: usize, gap: Duration) -> impl Body<Data = Bytes, Error = std::convert::Infallible> + Unpin {
        let chunks = futures_util::stream::iter(0..frames).then(move |i| async move {
            tokio::time::sleep(gap).await;
            Ok(Frame::data(Bytes::from(vec![i as u8; 4])))
        });
        http_body_util::StreamBody::new(Box::pin(chunks))
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_keeps_arriving_is_not_cut_however_long_it_takes_in_all() {
        let body = StallTimeout::new(trickle(5, Duration::from_millis(800)), Duration::from_secs(1));
        let collected = body.collect().await.expect("no gap reached the limit");
        assert_eq!(collected.to_bytes().len(), 20);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stalls_for_the_limit_ends_with_an_error_that_says_so() {
        let mut body = StallTimeout::new(trickle(2, Duration::from_secs(3)), Duration::from_secs(1));
        let started = Instant::now();
        let error = body.frame().await.expect("a frame or an error").unwrap_err();
        assert!(error.to_string().contains("sent nothing for 1s"), "{error}");
        assert_eq!(started.elapsed(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_frame_that_is_already_there_needs_no_timer() {
        let mut body = StallTimeout::new(
            http_body_util::Full::new(Bytes::from_static(b"hi")),
            Duration::from_secs(1),
        );
        assert!(body.frame().await.unwrap().is_ok());
        assert!(body.timer.is_none());
    }
}
