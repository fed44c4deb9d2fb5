//! `/_/sse`: the stats as a live `text/event-stream`.
//!
//! Each response body is the metrics' watch channel itself, as a stream ([`WatchStream`]): the sampler builds one
//! frame per tick for everyone, and a body only takes the newest when hyper asks for more, so a client too slow
//! to take a frame skips to the latest rather than queueing stale ones, and no task runs per subscriber. A stream
//! ends, and the subscriber is no longer counted, when the client goes away (hyper drops the body, and with it the
//! receiver) or when the server starts draining (the metrics' closing token ends it, so a stream never holds a
//! graceful shutdown open).

use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use tokio_stream::wrappers::WatchStream;
use tokio_stream::StreamExt as _;

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
/// Streams open at once: each costs a connection and a copy of every frame it is sent, so a flood of them is
/// refused.
pub const MAX_CLIENTS: usize = 256;

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
    let updates = metrics.subscribe();
    // Counted once subscribed, so concurrent arrivals cannot both slip under the limit.
    if metrics.sse_clients() > MAX_CLIENTS {
        return Err(Error::TooManyStreams { limit: MAX_CLIENTS });
    }
    // The first frame is the next tick's, with the reconnect delay; then one every `every` ticks, or the newest
    // after that for a client that fell behind.
    let mut last: Option<u64> = None;
    let frames = WatchStream::from_changes(updates).filter_map(move |update| {
        if last.is_some_and(|last| update.seq < last + every) {
            return None;
        }
        let mut event = Event::default()
            .event("metrics")
            .id(update.seq.to_string())
            .data(&*update.json);
        if last.is_none() {
            event = event.retry(RETRY);
        }
        last = Some(update.seq);
        Some(Ok::<_, Infallible>(event))
    });
    let frames = futures_util::StreamExt::take_until(frames, metrics.closing().cancelled_owned());
    let mut response = Sse::new(frames)
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
