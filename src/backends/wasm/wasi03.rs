//! One request on a WASI 0.3 handler (`wasi:http/handler@0.3`), as [`invoke`](super::invoke) runs it.
//!
//! A 0.3 handler is an async export: it returns its response with a body stream that the guest may go on writing
//! after it returned (from a task it spawned, say). That stream is fed only while the store's event loop runs, so
//! the call is the whole of a `run_concurrent`: the handler, then the loop kept going until the response body has
//! been read to its end or dropped. To [`invoke`](super::invoke), this looks like a 0.2 call whose handler sets
//! its response, then returns once the body is written: the deadline, the timeout of a stalled body, a trap, the
//! client going away and the worker's release follow the same paths for both.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::sync::oneshot;
use wasmtime::component::Accessor;
use wasmtime::Store;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::p3::bindings::Service;
use wasmtime_wasi_http::p3::Request;
use wasmtime_wasi_http::{FieldMap, WasiHttpView};

use crate::backends::wasm::worker::{GuestResponse, WorkerState};

/// Runs `service`'s handler on `request`, sending what it answers on `outparam`; returns once the response body
/// has been read or dropped (or at once, for an error code), or with the trap that ended the call.
pub(crate) async fn call(
    store: &mut Store<WorkerState>,
    service: &Service,
    request: http::Request<impl Body<Data = Bytes, Error = wasmtime_wasi_http::Error> + Send + 'static>,
    outparam: oneshot::Sender<GuestResponse>,
) -> wasmtime::Result<()> {
    let stopped = Stopped::default();
    let ran = store
        .run_concurrent(async |accessor| serve(accessor, service, request, outparam, &stopped).await)
        .await;
    if !matches!(ran, Ok(Ok(()))) {
        stopped.stop();
    }
    ran?
}

/// Set when an instance's event loop was stopped by a trap or a deadline, before the instance is dropped: its
/// response bodies then end with an error. (Dropping the store closes a body's stream and its trailers' future,
/// which `wasmtime-wasi-http` reads as a clean end.)
#[derive(Clone, Default)]
pub(crate) struct Stopped(Arc<AtomicBool>);

impl Stopped {
    pub(crate) fn stop(&self) {
        self.0.store(true, Ordering::Release);
    }

    fn is_stopped(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// The error a body of a stopped instance ends with.
#[derive(Debug, thiserror::Error)]
#[error("the app's instance stopped before the response body ended")]
struct BodyCut;

/// [`call`]'s work, inside an event loop that is already running: one of several requests on one instance.
pub(crate) async fn serve(
    accessor: &Accessor<WorkerState>,
    service: &Service,
    request: http::Request<impl Body<Data = Bytes, Error = wasmtime_wasi_http::Error> + Send + 'static>,
    outparam: oneshot::Sender<GuestResponse>,
    stopped: &Stopped,
) -> wasmtime::Result<()> {
    let (parts, body) = with_scheme(request).into_parts();
    // What `Request::from_http` does, with the store reached through the accessor: the forbidden headers go.
    let headers = accessor.with(|mut store| FieldMap::new_immutable(store.get().http().hooks, parts.headers));
    let uri = parts.uri.into_parts();
    let (request, request_io) = Request::new(
        parts.method,
        uri.scheme,
        uri.authority,
        uri.path_and_query,
        headers,
        None,
        body,
    );
    let response = match service.handle(accessor, request).await? {
        Ok(response) => response,
        Err(code) => {
            let _ = outparam.send(Err(format!("{code:?}")));
            return Ok(());
        }
    };
    let response = accessor.with(|mut store| response.into_http(&mut store, request_io))?;
    let (ended, body_ended) = oneshot::channel();
    let response = response.map(|body| {
        Watched {
            body,
            ended: Some(ended),
            stopped: stopped.clone(),
        }
        .boxed_unsync()
    });
    if outparam.send(Ok(response)).is_err() {
        return Ok(());
    }
    // Read to its end, or dropped: the loop has nothing more to feed it.
    let _ = body_ended.await;
    Ok(())
}

/// The request as a 0.3 handler reads it: with the scheme and authority a 0.2 handler is given (`http`, and the
/// `Host` header), where the front's request has only a path.
fn with_scheme<B>(request: http::Request<B>) -> http::Request<B> {
    if request.uri().scheme().is_some() {
        return request;
    }
    let (mut parts, body) = request.into_parts();
    let authority = parts
        .headers
        .get(http::header::HOST)
        .and_then(|host| host.to_str().ok())
        .and_then(|host| host.parse::<http::uri::Authority>().ok());
    if let Some(authority) = authority {
        let mut uri = std::mem::take(&mut parts.uri).into_parts();
        uri.scheme = Some(http::uri::Scheme::HTTP);
        uri.authority = Some(authority);
        if uri.path_and_query.is_none() {
            uri.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        parts.uri = http::Uri::from_parts(uri).unwrap_or_default();
    }
    http::Request::from_parts(parts, body)
}

/// The guest's response body, telling the call when it has been read to its end or dropped, and ending with an
/// error if its instance stopped.
struct Watched {
    body: HyperOutgoingBody,
    ended: Option<oneshot::Sender<()>>,
    stopped: Stopped,
}

impl Body for Watched {
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            self.ended.take();
        }
        if matches!(polled, Poll::Ready(None)) && self.stopped.is_stopped() {
            return Poll::Ready(Some(Err(wasmtime_wasi_http::Error::InternalError(Some(
                BodyCut.to_string(),
            )))));
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
