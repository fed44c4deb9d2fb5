//! `/_/sse`: the stats as a live `text/event-stream`.
//!
//! Each subscriber gets a small task that forwards the sampler's frames (built once per tick for everyone) to its
//! response body. The task ends, and the subscriber is no longer counted, when the client goes away (the body is
//! dropped, which closes the channel) or when the server starts draining (so a stream never holds a graceful
//! shutdown open). A client too slow to take a frame misses it rather than queueing stale ones.

use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::error::Error;
use crate::metrics::{Metrics, SAMPLE_INTERVAL};

/// Seconds between frames unless `?interval=` says otherwise, and the bounds it may say.
pub(crate) const DEFAULT_INTERVAL_SECS: u64 = 1;
pub(crate) const MIN_INTERVAL_SECS: u64 = 1;
pub(crate) const MAX_INTERVAL_SECS: u64 = 60;
/// How long a browser's `EventSource` waits before reconnecting (sent as `retry:`).
pub(crate) const RETRY: Duration = Duration::from_secs(2);
/// A comment line is sent when nothing else was for this long, so proxies keep the connection open.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Streams open at once: each costs a task and a copy of every frame, so a flood of them is refused.
pub const MAX_CLIENTS: usize = 256;
/// Frames waiting for a slow client; beyond this, new ones are skipped.
const BACKLOG: usize = 2;

/// Reads `?interval=` (whole seconds).
pub(crate) fn interval(raw: Option<&str>) -> Result<u64, Error> {
    let Some(raw) = raw else {
        return Ok(DEFAULT_INTERVAL_SECS);
    };
    match raw.parse::<u64>() {
        Ok(secs) if (MIN_INTERVAL_SECS..=MAX_INTERVAL_SECS).contains(&secs) => Ok(secs),
        _ => Err(Error::BadQuery(format!(
            "interval must be whole seconds from {MIN_INTERVAL_SECS} to {MAX_INTERVAL_SECS}, not {raw:?}"
        ))),
    }
}

/// A stream of `metrics` events, one every `every` seconds (counted in sampler ticks); refused beyond
/// [`MAX_CLIENTS`].
pub(crate) fn stream(metrics: &Metrics, every: u64) -> Result<Response, Error> {
    const _: () = assert!(SAMPLE_INTERVAL.as_secs() == 1 && SAMPLE_INTERVAL.subsec_nanos() == 0);
    let mut updates = metrics.subscribe();
    // Counted once subscribed, so concurrent arrivals cannot both slip under the limit.
    if metrics.sse_clients() > MAX_CLIENTS {
        return Err(Error::TooManyStreams { limit: MAX_CLIENTS });
    }
    let closing = metrics.closing();
    let (frames, body) = mpsc::channel::<Result<Event, Infallible>>(BACKLOG);
    tokio::spawn(async move {
        let mut last: Option<u64> = None;
        loop {
            tokio::select! {
                () = closing.cancelled() => break,
                () = frames.closed() => break,
                changed = updates.changed() => if changed.is_err() { break },
            }
            let update = updates.borrow_and_update().clone();
            if last.is_some_and(|last| update.seq < last + every) {
                continue;
            }
            let mut event = Event::default()
                .event("metrics")
                .id(update.seq.to_string())
                .data(&*update.json);
            if last.is_none() {
                event = event.retry(RETRY);
            }
            match frames.try_send(Ok(event)) {
                Ok(()) => last = Some(update.seq),
                Err(mpsc::error::TrySendError::Full(_)) => {}
                Err(mpsc::error::TrySendError::Closed(_)) => break,
            }
        }
        // Dropping `updates` here is what stops this subscriber being counted.
    });
    let mut response = Sse::new(ReceiverStream::new(body))
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response();
    // Tell buffering reverse proxies (nginx) to pass frames on as they come.
    response
        .headers_mut()
        .insert("x-accel-buffering", http::HeaderValue::from_static("no"));
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interval_is_whole_seconds_within_bounds() {
        assert_eq!(interval(None).unwrap(), 1);
        assert_eq!(interval(Some("5")).unwrap(), 5);
        for bad in ["0", "61", "0.5", "-1", "", "soon"] {
            let error = interval(Some(bad)).unwrap_err();
            assert_eq!(error.code(), "bad_query", "{bad}");
        }
    }
}
