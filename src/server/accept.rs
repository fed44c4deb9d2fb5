//! The accept loop: HTTP/1.1 and HTTP/2 on one port, with a connection limit, header and idle timeouts, and a
//! bounded graceful drain. Connections are accepted here and served on the serving [`cores`](super::cores).
//!
//! This is hyper-util's auto connection (HTTP/1.1, or HTTP/2 when the client opens with the HTTP/2 preface)
//! rather than `axum::serve`, because a host needs the knobs that one hides: connection limit, header size and
//! read-timeout limits, and a bounded graceful drain.
//!
//! hyper's own header timer is not enough against clients that connect and stall: the auto connection reads the
//! first bytes (to tell HTTP/2's preface from HTTP/1.1) with no timer at all, and HTTP/2 has no handshake timer,
//! so a silent socket or a half-sent preface would hold one of the [`MAX_CONNECTIONS`] slots forever. Each
//! connection therefore gets a `Watchdog`: one timer, from accept, that closes the connection if no request has
//! reached the service within the header timeout, and later shuts it down once no request has been in progress
//! for the idle timeout. Requests only bump two counters it reads when its timer fires.
//!
//! What hyper 1.12 covers by itself, and so is not repeated here: an HTTP/1.1 request line or header block that
//! starts but does not finish within `header_read_timeout` (its timer starts when it begins reading a head), and
//! an idle HTTP/1.1 keep-alive connection, since waiting for the next request is reading its head.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;

use crate::backends::proxy::ClientAddr;
use crate::core_local::{Padded, PerCore};
use crate::guarded_body::Guarded;
use crate::routes::AppState;
use crate::server::cores::Cores;
use crate::server::front::Front;

/// Open connections beyond this wait in the kernel's accept queue until one closes.
pub(crate) const MAX_CONNECTIONS: usize = 10_000;
/// Request line and headers together may not exceed this (HTTP/1.1 answers 431, HTTP/2 resets the stream).
pub(crate) const MAX_HEADER_BYTES: usize = 64 * 1024;
/// From the moment a connection is accepted, the client has this long to get its first request's head to the
/// server (HTTP/1.1: the request line and headers; HTTP/2: the preface, SETTINGS and a HEADERS frame); a
/// connection that has not is closed, whatever it sent. Each later request head on an HTTP/1.1 connection has as
/// long again (hyper's timer).
pub(crate) const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(15);
/// A connection with no request in progress for this long is shut down: HTTP/2 gets a GOAWAY and closes once the
/// client has seen it (dropped if it is still open after another quiet period this long). Idle HTTP/1.1
/// keep-alive connections close sooner, after [`HEADER_READ_TIMEOUT`], because hyper times the wait for the next
/// request as a header read. A response still being sent (a download, an SSE stream) is a request in progress; a
/// WebSocket leaves the connection, and this timer, behind once it is upgraded.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// The watchdog looks at a connection this many times per idle timeout, so an idle connection goes between
/// [`IDLE_TIMEOUT`] and a quarter more after its last request ended; more looks would only cost wakeups.
const IDLE_CHECKS: u32 = 4;
/// The shortest interval between two looks, so that a zero idle timeout cannot spin the connection's task.
const MIN_CHECK_INTERVAL: Duration = Duration::from_millis(1);
/// Concurrent streams one HTTP/2 connection may open.
pub(crate) const MAX_CONCURRENT_STREAMS: u32 = 256;
/// After a failed `accept` (e.g. out of file descriptors), wait this long before the next, instead of spinning.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// The clocks `run` keeps on every connection; `serve` takes them from [`ServeOptions`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeouts {
    /// From accept to the first request reaching the service ([`HEADER_READ_TIMEOUT`]).
    pub(crate) header: Duration,
    /// With no request in progress ([`IDLE_TIMEOUT`]).
    pub(crate) idle: Duration,
    /// For in-flight requests to finish at shutdown.
    pub(crate) drain: Duration,
}

/// Serves `state` on `listener` until `shutdown` resolves, then drains: readiness turns 503, the listener closes,
/// in-flight requests finish, and connections still open after `timeouts.drain` are dropped.
pub(crate) async fn run(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()>,
    timeouts: Timeouts,
    serving_cores: usize,
) -> std::io::Result<()> {
    // A front per serving core: each request clones its core's (a reference count no other core writes).
    let front = Front::new(state.clone());
    let fronts = Arc::new(PerCore::new(|| Arc::new(Padded(front.clone()))));
    let cores = Cores::start(serving_cores)?;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(timeouts.header)
        .max_buf_size(MAX_HEADER_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS);
    let builder = Arc::new(builder);
    // hyper-util's `GracefulShutdown` only watches hyper's own connection types, and a connection here is also
    // driven by its watchdog; this is the same signal-then-wait-for-every-receiver scheme, by hand.
    let (drain, _) = watch::channel(());
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);

    loop {
        let permit = tokio::select! {
            permit = connections.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        // Subscribed here, before the connection is handed on, so that a drain signalled meanwhile is not missed.
        let draining = drain.subscribe();
        let connection = Connection {
            fronts: fronts.clone(),
            builder: builder.clone(),
            timeouts,
            peer,
            draining,
            permit,
        };
        cores.spawn(stream, move |stream| connection.serve(stream));
    }

    state.lifecycle.set_draining();
    drop(listener);
    // WebSocket tunnels and SSE streams are long-lived by design: end them rather than let them hold the drain open.
    state.upstreams.close_tunnels();
    state.metrics.close();
    let open = drain.receiver_count();
    tracing::info!(
        open_connections = open,
        "draining: no new connections, waiting for in-flight requests"
    );
    drain.send_replace(());
    match tokio::time::timeout(timeouts.drain, drain.closed()).await {
        Ok(()) => tracing::info!("drained; every connection closed"),
        Err(_) => tracing::warn!(
            drain_timeout = ?timeouts.drain,
            "shutdown timeout reached; dropping the connections still open"
        ),
    }
    cores.stop().await;
    Ok(())
}

/// An accepted connection and what serving it takes.
struct Connection {
    /// One per serving core; the connection takes its own core's.
    fronts: Arc<PerCore<Arc<Padded<Front>>>>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    timeouts: Timeouts,
    peer: SocketAddr,
    draining: watch::Receiver<()>,
    /// Its place under [`MAX_CONNECTIONS`], given back when it closes.
    permit: OwnedSemaphorePermit,
}

impl Connection {
    /// Serves HTTP on `stream` until the connection ends, its watchdog closes it, or the drain has finished it.
    async fn serve(self, stream: TcpStream) {
        let Connection {
            fronts,
            builder,
            timeouts,
            peer,
            mut draining,
            permit,
        } = self;
        // This runs on the connection's core.
        let front = fronts.local().clone();
        drop(fronts);
        let activity = Arc::new(Activity::default());
        let mut watchdog = Watchdog::new(activity.clone(), timeouts);
        let client = ClientAddr::new(peer);
        let service = service_fn(move |request: http::Request<Incoming>| {
            let in_flight = InFlight::start(&activity);
            let (front, client) = (front.clone(), client.clone());
            async move {
                let (response, timer) = front.answer(request.map(Body::new), Some(&client)).await;
                // The request stays in progress, and its timer runs, until hyper drops its body: sent to the end, or
                // abandoned. The latency is recorded before the connection counts the request finished.
                Ok::<_, Infallible>(response.map(|body| Guarded::new(body, (timer, in_flight))))
            }
        });
        let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
        let mut connection = std::pin::pin!(connection);
        // At the drain, a request may already sit in the socket while this core has not yet turned its I/O driver
        // (a busy core does so only every few dozen tasks): hyper would find no readiness, take the connection for
        // idle and close it, and the request would be lost. Yielding first lets the driver run, so the connection,
        // polled again before the shutdown, reads that request and serves it.
        let mut drained = std::pin::pin!(async move {
            let _ = draining.changed().await;
            tokio::task::yield_now().await;
            draining
        });
        let mut asked_to_drain = None;
        let result = loop {
            tokio::select! {
                biased;
                result = connection.as_mut() => break result,
                verdict = watchdog.expired() => match verdict {
                    Verdict::Shutdown => connection.as_mut().graceful_shutdown(),
                    Verdict::Close(why) => {
                        tracing::debug!(%peer, why, "connection closed");
                        break Ok(());
                    }
                },
                receiver = &mut drained, if asked_to_drain.is_none() => {
                    asked_to_drain = Some(receiver);
                    connection.as_mut().graceful_shutdown();
                }
            }
        };
        if let Err(error) = result {
            tracing::debug!(%peer, %error, "connection ended with an error");
        }
        // The drain waits for every receiver: this one goes only with the connection.
        drop(asked_to_drain);
        drop(permit);
    }
}

/// What a connection's [`Watchdog`] knows of its requests: how many have started and how many have finished.
/// The request path only adds to them; they are read when the watchdog's timer fires, so no request reads the
/// clock or touches a timer for it.
#[derive(Debug, Default)]
struct Activity {
    started: AtomicU64,
    finished: AtomicU64,
}

impl Activity {
    /// `(started, finished)`. `finished` is read first: a request's finish happens after its start, so the pair
    /// never shows more finished than started.
    fn load(&self) -> (u64, u64) {
        let finished = self.finished.load(Ordering::Acquire);
        let started = self.started.load(Ordering::Acquire);
        (started, finished)
    }
}

/// One request in progress on a connection: from the moment hyper hands it to the service until its response
/// body is dropped (sent in full, or abandoned), so that a long download or an SSE stream keeps its connection
/// from counting as idle.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(activity: &Arc<Activity>) -> InFlight {
        activity.started.fetch_add(1, Ordering::Release);
        InFlight(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.finished.fetch_add(1, Ordering::Release);
    }
}

/// What the watchdog decided about its connection.
#[derive(Debug)]
enum Verdict {
    /// Ask the connection to finish gracefully: HTTP/2 sends GOAWAY, HTTP/1.1 closes once idle.
    Shutdown,
    /// Drop the connection now (closing the socket), for the reason given.
    Close(&'static str),
}

/// One timer per connection, started at accept. A connection no request has reached by the header deadline is
/// closed: nothing of HTTP has been agreed, so there is nothing to shut down gracefully. After that, a connection
/// whose [`Activity`] has not moved, with nothing in progress, for the idle timeout is shut down gracefully, and
/// dropped if it is still there, still quiet, an idle timeout later (a client that never answers GOAWAY's ping).
struct Watchdog {
    activity: Arc<Activity>,
    header_deadline: tokio::time::Instant,
    idle: Duration,
    check_every: Duration,
    /// The counters at the last look, and since when they have not moved with no request in progress.
    seen: (u64, u64),
    quiet_since: tokio::time::Instant,
    shutting_down: bool,
    timer: Pin<Box<Sleep>>,
}

impl Watchdog {
    fn new(activity: Arc<Activity>, timeouts: Timeouts) -> Watchdog {
        let now = tokio::time::Instant::now();
        let header_deadline = now + timeouts.header;
        let check_every = (timeouts.idle / IDLE_CHECKS).max(MIN_CHECK_INTERVAL);
        Watchdog {
            activity,
            header_deadline,
            idle: timeouts.idle,
            check_every,
            seen: (0, 0),
            quiet_since: now,
            shutting_down: false,
            timer: Box::pin(tokio::time::sleep_until(header_deadline.min(now + check_every))),
        }
    }

    /// Resolves when the connection should go. Cancel-safe: everything it knows lives in `self`, and it only waits
    /// on the timer.
    async fn expired(&mut self) -> Verdict {
        loop {
            self.timer.as_mut().await;
            let now = tokio::time::Instant::now();
            let (started, finished) = self.activity.load();
            if started == 0 && now >= self.header_deadline {
                return Verdict::Close("no request head within the header timeout");
            }
            let verdict = if (started, finished) != self.seen || started != finished {
                self.seen = (started, finished);
                self.quiet_since = now;
                None
            } else if now.duration_since(self.quiet_since) >= self.idle {
                if self.shutting_down {
                    return Verdict::Close("still open, and idle, after its graceful shutdown");
                }
                self.shutting_down = true;
                self.quiet_since = now;
                Some(Verdict::Shutdown)
            } else {
                None
            };
            let mut next = now + self.check_every;
            if started == 0 {
                next = next.min(self.header_deadline);
            }
            self.timer.as_mut().reset(next);
            if let Some(verdict) = verdict {
                return verdict;
            }
        }
    }
}
