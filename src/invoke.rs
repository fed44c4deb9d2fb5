//! Running one request on a worker: the deadline, the body limit, and what a trap or timeout becomes.
//!
//! The guest runs in its own task, which owns the worker for the request. The response head comes back through
//! the `response-outparam` as soon as the guest sets it; the body streams from the guest to the client with
//! back-pressure while that task is still running. When the guest returns, the task gives the worker back to the
//! pool (or drops it, if it trapped or ran out of time). A deadline drops the guest's future wherever it is,
//! which the epoch yields make possible even in a loop that never calls the host.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::HeaderValue;
use http_body::{Frame, SizeHint};
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::WasiHttpView;

use crate::error::Error;
use crate::pool::{AcquireError, Pool, VersionRuntime};

/// How long the response head waits for the first body frame before it is sent alone.
const FIRST_FRAME_WAIT: Duration = Duration::from_millis(2);

/// How a guest's handler call ended.
enum Outcome {
    Returned,
    Trapped(String),
    TimedOut,
}

/// Serves `request` (already rewritten to the app's view) with a worker of `runtime`.
pub async fn invoke(
    pool: &Arc<Pool>,
    runtime: Arc<VersionRuntime>,
    mut request: http::Request<Body>,
    arrived: Instant,
) -> Result<Response, Error> {
    // Only error answers need the names, so they are cloned there, not on every request.
    let identity = &runtime.identity;
    let config = &runtime.deployment.config;
    let limit = config.max_body_size;
    if let Some(length) = content_length(&request) {
        if length > limit {
            return Err(Error::BodyTooLarge { limit });
        }
    }
    let deadline = (config.timeout > 0).then(|| arrived + Duration::from_secs(config.timeout));
    let lease = pool.acquire(&runtime, deadline).await.map_err(|error| match error {
        AcquireError::QueueFull { .. } | AcquireError::QueueTimeout => Error::PoolBusy(error.to_string()),
        AcquireError::Instantiate(reason) => Error::WorkerFailed {
            app: identity.app.clone(),
            version: identity.version.clone(),
            reason,
        },
    })?;

    // HTTP/1.0 requests may carry no Host, and wasi:http requires an authority.
    if request.uri().authority().is_none() && !request.headers().contains_key(http::header::HOST) {
        request
            .headers_mut()
            .insert(http::header::HOST, HeaderValue::from_static("localhost"));
    }
    let exceeded = Arc::new(AtomicBool::new(false));
    let request = request.map(|body| LimitedBody {
        inner: body,
        remaining: limit,
        exceeded: exceeded.clone(),
    });

    let (sender, receiver) = tokio::sync::oneshot::channel();
    let task_pool = pool.clone();
    let task = tokio::spawn(async move {
        let mut lease = lease;
        lease.worker.begin(deadline);
        let call = async {
            let worker = &mut lease.worker;
            let data = worker.store.data_mut();
            let request = data.http().new_incoming_request(Scheme::Http, request)?;
            let out = data.http().new_response_outparam(sender)?;
            worker
                .proxy
                .wasi_http_incoming_handler()
                .call_handle(&mut worker.store, request, out)
                .await
        };
        let result = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline.into(), call).await.ok(),
            None => Some(call.await),
        };
        let outcome = match result {
            Some(Ok(())) => Outcome::Returned,
            None => Outcome::TimedOut,
            Some(Err(_)) if lease.worker.store.data().timed_out => Outcome::TimedOut,
            Some(Err(error)) => Outcome::Trapped(format!("{error:?}")),
        };
        let identity = &lease.runtime.identity;
        match &outcome {
            Outcome::Returned => {}
            Outcome::TimedOut => tracing::warn!(
                app = %identity.app,
                version = %identity.version,
                "the request ran past its timeout; the worker is discarded"
            ),
            Outcome::Trapped(message) => tracing::error!(
                app = %identity.app,
                version = %identity.version,
                "the worker trapped; it is discarded: {message}"
            ),
        }
        let counters = &task_pool.counters;
        match &outcome {
            Outcome::Returned => {}
            Outcome::TimedOut => {
                counters.timeouts.fetch_add(1, Ordering::Relaxed);
                counters.failed.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Trapped(_) => {
                counters.traps.fetch_add(1, Ordering::Relaxed);
                counters.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        task_pool.release(lease, matches!(outcome, Outcome::Returned));
        outcome
    });

    match receiver.await {
        Ok(Ok(response)) => {
            if exceeded.load(Ordering::Relaxed) {
                return Err(Error::BodyTooLarge { limit });
            }
            let (parts, mut body) = response.into_parts();
            // Wait briefly for the first piece of the body, so that a small response leaves in one write with its
            // head instead of two; a body that takes longer streams as it comes.
            let first = tokio::time::timeout(FIRST_FRAME_WAIT, http_body_util::BodyExt::frame(&mut body))
                .await
                .ok();
            let body = Prefetched { first, rest: body };
            Ok(Response::from_parts(parts, Body::new(body)))
        }
        Ok(Err(code)) => {
            if exceeded.load(Ordering::Relaxed) {
                return Err(Error::BodyTooLarge { limit });
            }
            Err(Error::AppFailed {
                app: identity.app.clone(),
                version: identity.version.clone(),
                reason: format!("the app answered with an error: {code:?}"),
            })
        }
        // The guest ended without a response: find out how.
        Err(_) => {
            let outcome = task
                .await
                .unwrap_or_else(|e| Outcome::Trapped(format!("the worker task failed: {e}")));
            if exceeded.load(Ordering::Relaxed) {
                return Err(Error::BodyTooLarge { limit });
            }
            Err(match outcome {
                Outcome::TimedOut => Error::Timeout {
                    app: identity.app.clone(),
                    version: identity.version.clone(),
                    secs: runtime.deployment.config.timeout,
                },
                Outcome::Trapped(message) => Error::AppFailed {
                    app: identity.app.clone(),
                    version: identity.version.clone(),
                    reason: first_line(&message),
                },
                Outcome::Returned => Error::AppFailed {
                    app: identity.app.clone(),
                    version: identity.version.clone(),
                    reason: "the app returned without setting a response".into(),
                },
            })
        }
    }
}

/// The trap's headline, without the wasm backtrace that follows (that goes to the log).
fn first_line(message: &str) -> String {
    message.lines().next().unwrap_or("").trim().to_owned()
}

fn content_length<B>(request: &http::Request<B>) -> Option<u64> {
    request
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse().ok())
}

/// A request body that ends with an error once more than `remaining` bytes went through, and remembers that it
/// did so the host can answer 413 rather than whatever the guest made of a broken body.
struct LimitedBody {
    inner: Body,
    remaining: u64,
    exceeded: Arc<AtomicBool>,
}

impl http_body::Body for LimitedBody {
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    if len > this.remaining {
                        this.exceeded.store(true, Ordering::Relaxed);
                        return Poll::Ready(Some(Err(wasmtime_wasi_http::Error::HttpRequestBodySize(None))));
                    }
                    this.remaining -= len;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(wasmtime_wasi_http::Error::InternalError(Some(
                format!("reading the request body failed: {error}"),
            ))))),
            Poll::Ready(None) => Poll::Ready(None),
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

/// A response body whose first frame was already read: `None` when the wait ran out, `Some(None)` when the body
/// had already ended.
struct Prefetched {
    first: Option<Option<Result<Frame<Bytes>, wasmtime_wasi_http::Error>>>,
    rest: wasmtime_wasi_http::p2::body::HyperOutgoingBody,
}

impl http_body::Body for Prefetched {
    type Data = Bytes;
    type Error = String;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        if let Some(first) = self.first.take() {
            return Poll::Ready(first.map(|frame| frame.map_err(|e| e.to_string())));
        }
        Pin::new(&mut self.rest).poll_frame(cx).map_err(|e| e.to_string())
    }

    fn is_end_stream(&self) -> bool {
        match &self.first {
            Some(None) => true,
            Some(Some(_)) => false,
            None => self.rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.first {
            Some(_) => SizeHint::default(),
            None => self.rest.size_hint(),
        }
    }
}
