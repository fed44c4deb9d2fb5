//! Running one request on a worker: the deadline, the body limit, and what a trap, a timeout or a response that
//! never comes becomes.
//!
//! The call starts on the request's own task ([`crate::backends::wasm::lanes`] moves it to a guest lane as soon as
//! it computes, or when the front stops waiting for it) and the front waits for the response head, at most until
//! the request's deadline: the `timeout` covers everything before the head leaves (waiting for a worker,
//! instantiating it, the handler, the wait for `response-outparam::set`). The call takes a worker, runs the
//! handler, passes the head on as soon as the guest sets it, and keeps driving the guest while the body streams
//! to the client with back-pressure. A handler that returns with its body written (the common case) has given its
//! worker back before the head leaves, with no wait and no other thread involved; one still running then
//! continues on a lane. Once the head is out, the deadline is lifted: a body that keeps coming (server-sent
//! events) is never cut, and one that sends nothing for the `timeout` is ended with an error (the connection
//! reset, or the HTTP/2 stream), never left hanging.
//!
//! A handler that returns without setting its response, whether it dropped the `response-outparam` or kept the
//! handle (as componentize-js does on a reused instance), gets `500` at once and its worker is discarded, as
//! `wasmtime serve` does. So is a worker whose client went away mid-call: its state is whatever the guest had
//! reached. How the call ended is counted by [`Pool::release`], and an error answer leaves only after that.
//!
//! A WASI 0.3 handler's call ([`wasi03`]) takes the same path: its `handle` returning a response is the head set,
//! an error code returned is one set, and the call ends once the body has been read. When the version lets an
//! instance serve several requests at once (`maxConcurrentRequests`), a request first looks for an instance of it
//! open to more ([`seats`](crate::backends::wasm::pool)) and is handed to the call serving it; one that finds none
//! takes a worker and opens it. That call runs every request handed to it in its instance's event loop, each
//! with the same deadline, body and outcome handling as a call of its own, and gives the worker back when the
//! last one ends. A trap or a timeout stops the instance, and with it every request in it: the one whose deadline
//! passed answers 504, the others 500.
//!
//! A request body over `maxBodySize` is `413` if no response has started, and aborts the response if one has, so
//! a client can never mistake a truncated echo for a complete one. A `Content-Length` over the limit is answered
//! at once, unread. Otherwise the body is cut by [`http_body_util::Limited`], whose [`LengthLimitError`] is told
//! apart from a failed read and turned into what `wasi:http` gives the guest for it (`HTTP-request-body-size`);
//! going over also tells the front (through [`Link`]), since the guest may swallow that error or answer anyway.

use std::future::Future;
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
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tokio::sync::{oneshot, Notify};
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::WasiHttpView;

use crate::backends::stall::StallTimeout;
use crate::backends::wasm::lanes::Inline;
use crate::backends::wasm::pool::{
    AcquireError, Joiner, Lease, Outcome, Pool, SeatLimits, VersionRuntime, NO_RESPONSE,
};
use crate::backends::wasm::wasi03;
use crate::backends::wasm::worker::{CallClock, Guest, GuestResponse, Worker};
use crate::error::Error;

/// How long the response head waits for the call to end (its body gathered meanwhile) before it leaves with
/// whatever body is there: a small response then goes out in one write with its head, and only once its worker is
/// back in the pool, so the client's next request, on any connection, finds it warm.
const GATHER_WAIT: Duration = Duration::from_millis(2);
/// The most body a response head waits to gather; past it, the body streams.
const GATHER_BYTES: usize = 64 * 1024;
/// How long the front, its own timer past the deadline, waits for the call's answer: the call's timer fires at
/// the same instant and answers once the timeout is counted and the worker discarded, so what the client reads
/// next (the stats, a fresh worker) follows from it. A guest lane starved of CPU does not hold the 504 longer.
const TIMEOUT_SETTLE: Duration = Duration::from_secs(1);

/// What the call sends the front: the response head with its streaming body, or why there is none.
type Head = Result<hyper::Response<HyperOutgoingBody>, Error>;

/// How the app failed a request it got: the cause of its `500`.
#[derive(Debug, thiserror::Error)]
enum AppFailure {
    /// The handler returned, or dropped its `response-outparam`, without setting a response.
    #[error("{}", NO_RESPONSE)]
    NoResponse,
    /// The handler trapped before it set a response. The client reads only the trap's headline; the whole of it,
    /// wasm backtrace included, goes to the log with the worker's release.
    #[error("{}", first_line(&.0.to_string()))]
    Trapped(Arc<wasmtime::Error>),
    /// The handler set an error code instead of a response.
    #[error("the app answered with an error: {0}")]
    Answered(String),
    /// The instance stopped while it served the request alongside others (see [`Joined`]).
    #[error(
        "the app's instance stopped while serving this request: this request or another one sharing the instance \
         trapped or ran past its timeout"
    )]
    Stopped,
}

/// Why a version's health check found no worker to be had.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CheckError {
    #[error(transparent)]
    Acquire(#[from] AcquireError),
    #[error("the guest executor is shutting down")]
    ShuttingDown,
}

/// What the front and the call share besides the head: the request body's limit, and the response body's end.
#[derive(Default)]
struct Link {
    /// Set when the request body went over `maxBodySize`.
    over_limit: AtomicBool,
    /// Wakes the front when the request body goes over its limit before the head arrived.
    front: Notify,
    /// How the front was done with the response body ([`BodyEnd`]), 0 while it is not.
    body_end: std::sync::atomic::AtomicU8,
    /// Wakes the call when the response body ended.
    call: Notify,
}

/// How the front was done with a guest's response body.
#[derive(Clone, Copy, PartialEq)]
#[repr(u8)]
enum BodyEnd {
    /// Read to its end.
    Complete = 1,
    /// Dropped before its end: the client went away, or the response needs no body (HEAD, 204, 304).
    Dropped = 2,
    /// Cut by the host because the request body went over its limit, or because the body failed.
    Cut = 3,
    /// Cut by the host because it sent nothing for the timeout.
    Stalled = 4,
}

impl Link {
    fn end_body(&self, end: BodyEnd) {
        if self
            .body_end
            .compare_exchange(0, end as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.call.notify_one();
        }
    }

    fn body_end(&self) -> Option<BodyEnd> {
        match self.body_end.load(Ordering::Acquire) {
            1 => Some(BodyEnd::Complete),
            2 => Some(BodyEnd::Dropped),
            3 => Some(BodyEnd::Cut),
            4 => Some(BodyEnd::Stalled),
            _ => None,
        }
    }
}

/// Serves `request` (already rewritten to the app's view) with a worker of `runtime`.
pub(crate) async fn invoke(
    pool: &Arc<Pool>,
    runtime: Arc<VersionRuntime>,
    mut request: http::Request<Body>,
    arrived: Instant,
) -> Result<Response, Error> {
    let config = &runtime.deployment.config;
    let limit = config.max_body_size;
    if let Some(length) = content_length(&request) {
        if length > limit {
            return Err(Error::BodyTooLarge { limit });
        }
    }
    let timeout = (config.timeout > 0).then(|| Duration::from_secs(config.timeout));
    let deadline = timeout.map(|timeout| arrived + timeout);

    // HTTP/1.0 requests may carry no Host, and wasi:http requires an authority.
    if request.uri().authority().is_none() && !request.headers().contains_key(http::header::HOST) {
        request
            .headers_mut()
            .insert(http::header::HOST, HeaderValue::from_static("localhost"));
    }
    let link = Arc::new(Link::default());
    let request = request.map(|body| limited(body, limit, link.clone()));

    let clock = Arc::new(CallClock::new(deadline));
    let (head_sender, mut head) = oneshot::channel();
    let (released_sender, released) = oneshot::channel();
    let call = run(
        pool.clone(),
        runtime.clone(),
        request,
        (clock.clone(), deadline),
        link.clone(),
        (head_sender, released_sender),
    );
    // Polled here until it computes; dropped with the call unfinished (an error answer, the client gone), it
    // moves the call to a lane, where `head`, dropped unsent, tells it to stop.
    let mut call = pool.engine().lanes().start(runtime.meter.clone(), clock.clone(), call);

    let waited = {
        let over_limit = link.front.notified();
        tokio::pin!(over_limit);
        let expired = sleep_until(deadline);
        tokio::pin!(expired);
        loop {
            break tokio::select! {
                // The call's own answer first, when both are there: it knows best what happened.
                biased;
                head = &mut head => head,
                () = &mut call, if call.is_running() => continue,
                () = &mut expired => {
                    // Still in the pool's queue: the pool was busy the whole time (503), the app never got the
                    // request.
                    if clock.is_queued() {
                        return Err(Error::PoolBusy(pool.queue_timed_out().into()));
                    }
                    // Still compiling: nothing of the app ran, and nothing failed. The compile goes on in its
                    // own task; the call, dropped, leaves its slot.
                    if let Some(so_far) = runtime.compiling_for() {
                        return Err(Error::Compiling {
                            app: runtime.identity.app.clone(),
                            version: runtime.identity.version.clone(),
                            secs: runtime.deployment.config.timeout,
                            so_far,
                        });
                    }
                    // The answer stays the 504 (whatever the call makes of its own deadline, say a start cut
                    // short), unless the guest set its response at the last moment. The call settles on a lane
                    // meanwhile.
                    call.hand_off();
                    match tokio::time::timeout(TIMEOUT_SETTLE, &mut head).await {
                        Ok(Ok(Ok(response))) => Ok(Ok(response)),
                        _ => return Err(timed_out(&runtime)),
                    }
                }
                () = &mut over_limit => return Err(Error::BodyTooLarge { limit }),
            };
        }
    };
    let response = match waited {
        Ok(Ok(response)) => response,
        Ok(Err(error)) => return Err(error),
        Err(_) => {
            return Err(Error::Internal(
                "the guest's call ended without an answer: the instance it shared with other requests stopped \
                 (one of them trapped or ran past its timeout), or the guest executor is shutting down"
                    .into(),
            ))
        }
    };
    let (parts, body) = response.into_parts();
    let mut body = GuestBody {
        gathered: std::collections::VecDeque::new(),
        rest: StallTimeout::optional(body, timeout),
        link,
        ended: false,
        released: Some(released),
    };
    body.gather(&mut call).await;
    // A call still running with its head out and its first frames gathered (a streaming body, or a handler that
    // has more to do) ends on a lane.
    call.hand_off();
    if body.link.over_limit.load(Ordering::Acquire) {
        body.link.end_body(BodyEnd::Cut);
        return Err(Error::BodyTooLarge { limit });
    }
    Ok(Response::from_parts(parts, Body::new(body)))
}

/// Whether a worker of `runtime` can be had before `deadline` (compiled, instantiated, within the cap): the
/// version's health check. Instantiating runs guest code, so it too happens on a guest lane; a new worker is
/// kept warm if the version keeps workers.
pub(crate) async fn check(pool: &Arc<Pool>, runtime: Arc<VersionRuntime>, deadline: Instant) -> Result<(), CheckError> {
    let clock = Arc::new(CallClock::new(Some(deadline)));
    let (sender, answer) = oneshot::channel();
    let task = {
        let (pool, runtime, clock) = (pool.clone(), runtime.clone(), clock.clone());
        async move {
            let result = pool.acquire(&runtime, &clock, Some(deadline)).await;
            let _ = sender.send(result.map(|lease| pool.release_unused(lease)));
        }
    };
    pool.engine().lanes().spawn(runtime.meter.clone(), clock, task);
    match answer.await {
        Ok(acquired) => Ok(acquired?),
        Err(_) => Err(CheckError::ShuttingDown),
    }
}

/// The call, on the front or a guest lane: a worker, the handler, the head passed on, the worker given back or
/// discarded.
async fn run(
    pool: Arc<Pool>,
    runtime: Arc<VersionRuntime>,
    request: http::Request<impl http_body::Body<Data = Bytes, Error = wasmtime_wasi_http::Error> + Send + 'static>,
    (clock, deadline): (Arc<CallClock>, Option<Instant>),
    link: Arc<Link>,
    (mut head, released): (oneshot::Sender<Head>, oneshot::Sender<()>),
) {
    // Asked first, so that a 0.2 version's request reads one flag here, not its config.
    if let Some(limits) = runtime.is_wasi03().then(|| runtime.seat_limits()).flatten() {
        let joined = Joined {
            request: request.map(BodyExt::boxed_unsync),
            clock,
            deadline,
            link,
            head,
            released,
        };
        return run_seated(pool, runtime, joined, limits).await;
    }
    let acquired = tokio::select! {
        acquired = pool.acquire(&runtime, &clock, deadline) => acquired,
        () = head.closed() => return,
    };
    let mut lease = match acquired {
        Ok(lease) => lease,
        Err(error) => {
            let _ = head.send(Err(acquire_error(&runtime, error)));
            return;
        }
    };
    lease.worker.begin(clock.clone());
    let (outparam, mut response) = oneshot::channel::<GuestResponse>();
    let (outcome, answer) = {
        let Lease { worker, .. } = &mut lease;
        let call = async {
            match &worker.guest {
                Guest::Wasi02(proxy) => {
                    let data = worker.store.data_mut();
                    let request = data.http().new_incoming_request(Scheme::Http, request)?;
                    let out = data.http().new_response_outparam_from_callback(move |set| {
                        let _ = outparam.send(set.map_err(|code| format!("{code:?}")));
                    })?;
                    proxy
                        .wasi_http_incoming_handler()
                        .call_handle(&mut worker.store, request, out)
                        .await
                }
                Guest::Wasi03(service) => wasi03::call(&mut worker.store, service, request, outparam).await,
            }
        };
        let timing = Timing {
            clock: &clock,
            deadline,
        };
        drive(call, &mut response, head, timing, &link, &runtime).await
    };
    // Counted, logged, and the worker kept or discarded, by the pool.
    pool.release(lease, outcome);
    // The client hears of a failure only now, once it is counted and the worker gone, so what it sees next (the
    // metrics, a new instance) already follows from it.
    if let Some((head, error)) = answer {
        let _ = head.send(Err(error));
    }
    let _ = released.send(());
}

/// A request for an instance that serves several at once: what a call of its own would have.
struct Joined {
    request: http::Request<UnsyncBoxBody<Bytes, wasmtime_wasi_http::Error>>,
    clock: Arc<CallClock>,
    deadline: Option<Instant>,
    link: Arc<Link>,
    head: oneshot::Sender<Head>,
    released: oneshot::Sender<()>,
}

/// [`run`] for a version whose instances serve several requests at once: the request joins an instance open to
/// more, or takes a worker and opens it.
async fn run_seated(pool: Arc<Pool>, runtime: Arc<VersionRuntime>, joined: Joined, limits: SeatLimits) {
    let mut joined = match runtime.seats.join(Box::new(joined), limits) {
        Ok(()) => {
            pool.joined();
            return;
        }
        Err(joiner) => unbox(joiner),
    };
    let acquired = tokio::select! {
        acquired = pool.acquire(&runtime, &joined.clock, joined.deadline) => acquired,
        () = joined.head.closed() => return,
    };
    match acquired {
        Ok(lease) => serve_seated(pool, runtime, lease, joined, limits).await,
        Err(error) => {
            let _ = joined.head.send(Err(acquire_error(&runtime, error)));
        }
    }
}

/// [`run_seated`] as a boxed future, for [`serve_seated`] to start again what it could not serve: a future that
/// contains itself needs the box, and its type names `Send` so that the compiler need not prove it of itself.
fn run_seated_again(
    pool: Arc<Pool>,
    runtime: Arc<VersionRuntime>,
    joined: Joined,
    limits: SeatLimits,
) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    Box::pin(run_seated(pool, runtime, joined, limits))
}

fn unbox(joiner: Joiner) -> Joined {
    *joiner.downcast::<Joined>().expect("what joins an instance is a Joined")
}

/// Serves `first` and every request that joins the instance of `lease` meanwhile, in one event loop, until the
/// last one ends; then gives the worker back.
async fn serve_seated(
    pool: Arc<Pool>,
    runtime: Arc<VersionRuntime>,
    mut lease: Lease,
    first: Joined,
    limits: SeatLimits,
) {
    lease.worker.begin(first.clock.clone());
    let (id, mut joiners) = runtime.seats.open(lease.worker.status.clone(), limits);
    let (mut joined, mut reusable, mut failed) = (0, true, false);
    let stopped = wasi03::Stopped::default();
    let unanswered = Unanswered::default();
    let ran = {
        let Worker { store, guest, .. } = &mut lease.worker;
        let Guest::Wasi03(service) = &*guest else {
            unreachable!("only a WASI 0.3 handler's instance is opened to several requests")
        };
        let (pool, runtime, stopped, unanswered) = (&pool, &runtime, &stopped, &unanswered);
        store
            .run_concurrent(async |accessor| {
                let mut calls = futures_util::stream::FuturesUnordered::new();
                calls.push(seated_call(accessor, service, first, (runtime, stopped, unanswered)));
                let mut listening = true;
                loop {
                    tokio::select! {
                        joiner = joiners.recv(), if listening => match joiner {
                            Some(joiner) => {
                                let request = unbox(joiner);
                                accessor.with(|mut store| store.get().watch(request.clock.clone()));
                                joined += 1;
                                calls.push(seated_call(accessor, service, request, (runtime, stopped, unanswered)));
                            }
                            None => listening = false,
                        },
                        Some(ended) = futures_util::StreamExt::next(&mut calls) => {
                            let Ended { outcome, mut head, answer, released } = ended;
                            accessor.with(|mut store| store.get().unwatch(&head.clock));
                            failed |= pool.count(runtime, &outcome);
                            // As for a call of its own: the client hears of a failure once it is counted.
                            if let Some(error) = answer {
                                head.send(Err(error));
                            }
                            head.answered();
                            let _ = released.send(());
                            if !matches!(outcome, Outcome::Returned) {
                                // Whatever the guest was doing for it may still be going on: no one new joins.
                                reusable = false;
                                runtime.seats.close(id);
                            }
                            if !runtime.seats.leave(id) {
                                break;
                            }
                        }
                    }
                }
            })
            .await
    };
    if let Err(stop) = ran {
        // A trap or a deadline stopped the instance, and every request in it: those still in it were dropped
        // with the loop, their error answers left in `unanswered`, their bodies about to be cut.
        stopped.stop();
        runtime.seats.remove(id);
        let outcome = if lease.worker.store.data().timed_out() {
            Outcome::TimedOut
        } else {
            Outcome::Trapped(Arc::new(stop))
        };
        pool.count(&runtime, &outcome);
        (reusable, failed) = (false, true);
    }
    pool.release_shared(lease, joined, reusable, failed);
    // As for a call of its own, the requests the stop failed hear of it once it is counted and the worker gone.
    for (head, error) in unanswered.take() {
        let _ = head.send(Err(error));
    }
    // Requests handed over as the loop stopped never ran: each starts again, as if it had just arrived.
    joiners.close();
    while let Ok(joiner) = joiners.try_recv() {
        let request = unbox(joiner);
        let clock = request.clock.clone();
        let again = run_seated_again(pool.clone(), runtime.clone(), request, limits);
        pool.engine().lanes().spawn(runtime.meter.clone(), clock, again);
    }
}

/// How one request in a shared instance ended, for the loop to count and answer.
struct Ended {
    outcome: Outcome,
    head: SeatedHead,
    /// The error to answer with, once counted, when the call ended without a head.
    answer: Option<Error>,
    released: oneshot::Sender<()>,
}

/// The way from a request in a shared instance to its front. The call passes the head on through it; if the loop
/// is dropped with the head unsent (the instance stopped: a trap, or a deadline, interrupted it), its drop leaves
/// the error that says so in [`Unanswered`], for the loop's owner to send once the stop is counted.
struct SeatedHead {
    head: Option<oneshot::Sender<Head>>,
    clock: Arc<CallClock>,
    runtime: Arc<VersionRuntime>,
    unanswered: Unanswered,
}

/// The error answers of a shared instance's requests that its stop left unanswered.
#[derive(Clone, Default)]
struct Unanswered(Arc<std::sync::Mutex<Vec<ErrorAnswer>>>);

impl Unanswered {
    fn push(&self, head: oneshot::Sender<Head>, error: Error) {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push((head, error));
    }

    fn take(&self) -> Vec<ErrorAnswer> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }
}

impl SeatedHead {
    fn send(&mut self, head: Head) {
        if let Some(sender) = self.head.take() {
            let _ = sender.send(head);
        }
    }

    /// The call is over and whatever it had to say was said: nothing more is sent, and its drop sends nothing.
    fn answered(&mut self) {
        self.head = None;
    }

    /// Resolves when the front stopped waiting (never, once the head is sent).
    async fn closed(&mut self) {
        match &mut self.head {
            Some(sender) => sender.closed().await,
            None => std::future::pending().await,
        }
    }
}

impl Drop for SeatedHead {
    fn drop(&mut self) {
        if let Some(sender) = self.head.take() {
            let error = if self.clock.timed_out() {
                timed_out(&self.runtime)
            } else {
                app_failed(&self.runtime, AppFailure::Stopped)
            };
            self.unanswered.push(sender, error);
        }
    }
}

/// One request in a shared instance: [`drive`] on a [`wasi03::serve`] in the loop that is running, its head
/// passed on through a [`SeatedHead`].
async fn seated_call(
    accessor: &wasmtime::component::Accessor<crate::backends::wasm::worker::WorkerState>,
    service: &wasmtime_wasi_http::p3::bindings::Service,
    joined: Joined,
    (runtime, stopped, unanswered): (&Arc<VersionRuntime>, &wasi03::Stopped, &Unanswered),
) -> Ended {
    let Joined {
        request,
        clock,
        deadline,
        link,
        head,
        released,
    } = joined;
    let mut head = SeatedHead {
        head: Some(head),
        clock: clock.clone(),
        runtime: runtime.clone(),
        unanswered: unanswered.clone(),
    };
    let (outparam, mut response) = oneshot::channel::<GuestResponse>();
    let call = wasi03::serve(accessor, service, request, outparam, stopped);
    let timing = Timing {
        clock: &clock,
        deadline,
    };
    // `drive` talks to a head of its own, which this passes on; the front going away drops its receiver.
    let (to_front, mut from_drive) = oneshot::channel();
    let driving = drive(call, &mut response, to_front, timing, &link, runtime);
    tokio::pin!(driving);
    let mut forwarding = true;
    let (outcome, answer) = loop {
        tokio::select! {
            biased;
            head_value = &mut from_drive, if forwarding => {
                forwarding = false;
                if let Ok(value) = head_value {
                    head.send(value);
                }
            }
            () = head.closed(), if forwarding => {
                forwarding = false;
                from_drive.close();
            }
            ended = &mut driving => break ended,
        }
    };
    if forwarding {
        // Sent just as the call ended.
        if let Ok(value) = from_drive.try_recv() {
            head.send(value);
        }
    }
    Ended {
        outcome,
        head,
        answer: answer.map(|(_, error)| error),
        released,
    }
}

/// An error answer that waits until the call's outcome is counted and its worker given back.
type Answer = Option<ErrorAnswer>;
/// A front's head and the error it is to be answered with.
type ErrorAnswer = (oneshot::Sender<Head>, Error);

/// A call's deadline: the instant, for the call's own timer, and the clock the epoch callback reads.
struct Timing<'a> {
    clock: &'a CallClock,
    deadline: Option<Instant>,
}

/// Drives the handler until it returns, passing the head on as soon as it is set. Returns how the call ended and,
/// when the call ended without a head, the error to answer with.
async fn drive(
    call: impl Future<Output = wasmtime::Result<()>>,
    response: &mut oneshot::Receiver<GuestResponse>,
    mut head: oneshot::Sender<Head>,
    Timing { clock, deadline }: Timing<'_>,
    link: &Link,
    runtime: &VersionRuntime,
) -> (Outcome, Answer) {
    tokio::pin!(call);
    let deadline_at = deadline;
    let deadline = sleep_until(deadline);
    tokio::pin!(deadline);
    // Until the head is out: the deadline holds, and a front that gave up stops the call.
    enum Before {
        Returned(wasmtime::Result<()>),
        Set(Result<GuestResponse, oneshot::error::RecvError>),
        Gone,
        Deadline,
    }
    let before = tokio::select! {
        biased;
        set = &mut *response => Before::Set(set),
        returned = &mut call => Before::Returned(returned),
        () = head.closed() => Before::Gone,
        () = &mut deadline => Before::Deadline,
    };
    let set = match before {
        Before::Set(set) => set,
        Before::Returned(returned) => {
            // Returned first: the response may still have been set just before.
            let outcome = ended(returned, clock);
            return match response.try_recv() {
                Ok(set) => {
                    let sent = pass_on(head, set, clock, runtime);
                    (if sent { outcome } else { Outcome::Abandoned }, None)
                }
                Err(_) => {
                    let error = match &outcome {
                        Outcome::TimedOut => timed_out(runtime),
                        Outcome::Trapped(trap) => app_failed(runtime, AppFailure::Trapped(trap.clone())),
                        Outcome::Returned | Outcome::NoResponse | Outcome::Abandoned => {
                            app_failed(runtime, AppFailure::NoResponse)
                        }
                    };
                    let outcome = if matches!(outcome, Outcome::Returned) {
                        Outcome::NoResponse
                    } else {
                        outcome
                    };
                    (outcome, Some((head, error)))
                }
            };
        }
        // The front gave up: at the deadline (its own timer may fire first), or because the client went away.
        Before::Gone if deadline_at.is_some_and(|at| Instant::now() >= at) => return (Outcome::TimedOut, None),
        Before::Gone => return (Outcome::Abandoned, None),
        Before::Deadline => return (Outcome::TimedOut, Some((head, timed_out(runtime)))),
    };
    let Ok(set) = set else {
        // The outparam was dropped unset: nothing will ever answer.
        return (
            Outcome::NoResponse,
            Some((head, app_failed(runtime, AppFailure::NoResponse))),
        );
    };
    let answered = set.is_ok();
    if !pass_on(head, set, clock, runtime) {
        return (Outcome::Abandoned, None);
    }
    if !answered {
        // The app answered with an error code; it should return at once, within its deadline.
        return tokio::select! {
            returned = &mut call => (ended(returned, clock), None),
            () = &mut deadline => (Outcome::TimedOut, None),
        };
    }
    // The head is out and the body streams: the call runs until the handler returns. If the guest finished the
    // body first, the handler has the timeout to return (the response ends only when it has); if the body was
    // cut or the client left, the call stops here.
    let body_end = link.call.notified();
    tokio::pin!(body_end);
    tokio::select! {
        returned = &mut call => return (ended(returned, clock), None),
        () = &mut body_end => {}
    }
    match link.body_end() {
        Some(BodyEnd::Stalled) => return (Outcome::TimedOut, None),
        Some(BodyEnd::Cut) => return (Outcome::Abandoned, None),
        _ => {}
    }
    let grace = runtime.timeout().map(|timeout| Instant::now() + timeout);
    clock.set_deadline(grace);
    tokio::select! {
        returned = &mut call => (ended(returned, clock), None),
        () = sleep_until(grace) => (Outcome::TimedOut, None),
    }
}

/// Sends what the guest set to the front, lifting the deadline for a streaming body. False if the front is gone.
fn pass_on(head: oneshot::Sender<Head>, set: GuestResponse, clock: &CallClock, runtime: &VersionRuntime) -> bool {
    let head_value = match set {
        Ok(response) => {
            clock.set_deadline(None);
            Ok(response)
        }
        Err(code) => Err(app_failed(runtime, AppFailure::Answered(code))),
    };
    head.send(head_value).is_ok()
}

fn ended(returned: wasmtime::Result<()>, clock: &CallClock) -> Outcome {
    match returned {
        Ok(()) => Outcome::Returned,
        Err(_) if clock.timed_out() => Outcome::TimedOut,
        Err(trap) => Outcome::Trapped(Arc::new(trap)),
    }
}

fn acquire_error(runtime: &VersionRuntime, error: AcquireError) -> Error {
    match error {
        AcquireError::QueueFull { .. } | AcquireError::QueueTimeout => Error::PoolBusy(error.into()),
        AcquireError::StartTimedOut => timed_out(runtime),
        AcquireError::Instantiate(cause) => Error::WorkerFailed {
            app: runtime.identity.app.clone(),
            version: runtime.identity.version.clone(),
            cause: cause.into(),
        },
    }
}

fn timed_out(runtime: &VersionRuntime) -> Error {
    Error::Timeout {
        app: runtime.identity.app.clone(),
        version: runtime.identity.version.clone(),
        secs: runtime.deployment.config.timeout,
    }
}

fn app_failed(runtime: &VersionRuntime, failure: AppFailure) -> Error {
    Error::AppFailed {
        app: runtime.identity.app.clone(),
        version: runtime.identity.version.clone(),
        cause: failure.into(),
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
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

/// The request body, cut by [`Limited`] past `limit` bytes. Going over is what the guest is told
/// (`HTTP-request-body-size`) and, through `link`, what the front is woken for: it answers 413 (or aborts a
/// response already started) rather than pass on whatever the guest made of a broken body.
fn limited(
    body: Body,
    limit: u64,
    link: Arc<Link>,
) -> impl http_body::Body<Data = Bytes, Error = wasmtime_wasi_http::Error> + Send + 'static {
    Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX)).map_err(move |error| {
        if error.is::<LengthLimitError>() {
            link.over_limit.store(true, Ordering::Release);
            link.front.notify_one();
            wasmtime_wasi_http::Error::HttpRequestBodySize(None)
        } else {
            wasmtime_wasi_http::Error::InternalError(Some(format!("reading the request body failed: {error}")))
        }
    })
}

/// The guest's response body on its way to the client: cut if it stalls for the timeout, aborted if the request
/// body went over its limit, and, when it is dropped, telling the call whether it ended cleanly.
struct GuestBody {
    /// Frames read before the head left.
    gathered: std::collections::VecDeque<Result<Frame<Bytes>, BoxError>>,
    rest: StallTimeout<HyperOutgoingBody>,
    link: Arc<Link>,
    /// Whether the end of the body was seen.
    ended: bool,
    /// Fires when the call has given its worker back: a small response's head waits for it (see `gather`).
    released: Option<oneshot::Receiver<()>>,
}

/// The error a response body is aborted with when the request body went over its limit mid-response.
#[derive(Debug, thiserror::Error)]
#[error("the request body went over the app's maxBodySize; the response is aborted")]
struct RequestOverLimit;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl http_body::Body for GuestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.link.over_limit.load(Ordering::Acquire) {
            this.link.end_body(BodyEnd::Cut);
            return Poll::Ready(Some(Err(RequestOverLimit.into())));
        }
        if let Some(frame) = this.gathered.pop_front() {
            return Poll::Ready(Some(frame));
        }
        if !this.ended {
            match Pin::new(&mut this.rest).poll_frame(cx) {
                Poll::Ready(None) => {
                    // The guest may have gone over the limit while the last frames were read: never end cleanly
                    // then.
                    if this.link.over_limit.load(Ordering::Acquire) {
                        this.link.end_body(BodyEnd::Cut);
                        return Poll::Ready(Some(Err(RequestOverLimit.into())));
                    }
                    this.ended = true;
                    this.link.end_body(BodyEnd::Complete);
                }
                Poll::Ready(Some(Err(error))) => {
                    let stalled = error.is::<crate::backends::stall::Stalled>();
                    this.link
                        .end_body(if stalled { BodyEnd::Stalled } else { BodyEnd::Cut });
                    return Poll::Ready(Some(Err(error)));
                }
                other => return other,
            }
        }
        // The end is not held back until the worker is back: while an HTTP/1.1 response is unfinished its
        // connection reads no next request, so a client that already has the whole body (a known length) and
        // sends one could lose it to a graceful shutdown. Small responses wait for the worker in `gather`.
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.gathered.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        if !self.gathered.is_empty() {
            return SizeHint::default();
        }
        self.rest.size_hint()
    }
}

impl GuestBody {
    /// Reads the body until the call ends, [`GATHER_BYTES`] are there, or [`GATHER_WAIT`] has passed, polling
    /// the call meanwhile if it still runs here: a guest writing its body waits for these reads.
    async fn gather(&mut self, call: &mut Inline<'_>) {
        let gathering = async {
            let mut bytes = 0;
            while bytes < GATHER_BYTES && !(self.ended && self.released.is_none()) {
                tokio::select! {
                    biased;
                    frame = http_body_util::BodyExt::frame(&mut self.rest), if !self.ended => match frame {
                        Some(frame) => {
                            bytes += frame.as_ref().ok().and_then(Frame::data_ref).map_or(0, Bytes::len);
                            let failed = frame.is_err();
                            self.gathered.push_back(frame);
                            if failed {
                                return;
                            }
                        }
                        None => {
                            self.ended = true;
                            self.link.end_body(BodyEnd::Complete);
                        }
                    },
                    () = &mut *call, if call.is_running() => {}
                    _ = async { self.released.as_mut().expect("guarded").await }, if self.released.is_some() => {
                        self.released = None;
                        if self.ended {
                            return;
                        }
                    }
                }
            }
        };
        let _ = tokio::time::timeout(GATHER_WAIT, gathering).await;
    }
}

impl Drop for GuestBody {
    fn drop(&mut self) {
        // After its end, or after a cut, this repeats what the call already knows.
        self.link.end_body(BodyEnd::Dropped);
    }
}
