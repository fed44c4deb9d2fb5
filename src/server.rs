//! The front server: the front door every request goes through ([`Front`]: limits, access line, metrics, then an
//! app or an internal route), and the accept loop that serves it over HTTP/1.1 and HTTP/2 on one port.
//!
//! `run` takes a bound listener and a shutdown future (mini-redis's shape), so tests bind `127.0.0.1:0` and drive
//! the same code the binary runs. The accept loop is hyper-util's auto connection (HTTP/1.1, or HTTP/2 when the
//! client opens with the HTTP/2 preface) rather than `axum::serve`, because a host needs the knobs that one
//! hides: connection limit, header size and read-timeout limits, and a bounded graceful drain.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;

use crate::engine::{Engine, EngineSettings};
use crate::error::Error;
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;
use crate::pool::{Pool, DEFAULT_POOL_SIZE, DEFAULT_QUEUE_LIMIT};
use crate::proxy::Upstreams;
use crate::registry::{Registry, Watcher};
use crate::{access_log, dispatch, internal};

/// Open connections beyond this wait in the kernel's accept queue until one closes.
pub const MAX_CONNECTIONS: usize = 10_000;
/// Request line and headers together may not exceed this (HTTP/1.1 answers 431, HTTP/2 resets the stream).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// A client has this long to send a request's headers; slower ones are disconnected.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(15);
/// Concurrent streams one HTTP/2 connection may open.
pub const MAX_CONCURRENT_STREAMS: u32 = 256;
/// Request targets longer than this answer 414: no app needs more, and every log line carries the path.
pub const MAX_URI_BYTES: usize = 8 * 1024;
/// After a failed `accept` (e.g. out of file descriptors), wait this long before the next, instead of spinning.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// What every handler shares: cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub registry: Arc<Registry>,
    pub lifecycle: Arc<Lifecycle>,
    pub pool: Arc<Pool>,
    pub upstreams: Arc<Upstreams>,
    pub metrics: Arc<Metrics>,
}

/// The client's address, in every request's extensions, with its IP as an `X-Forwarded-For` entry: made once per
/// connection rather than formatted for every proxied request.
#[derive(Debug, Clone)]
pub struct ClientAddr {
    pub addr: std::net::SocketAddr,
    pub forwarded_for: http::HeaderValue,
}

impl ClientAddr {
    pub fn new(addr: std::net::SocketAddr) -> ClientAddr {
        let ip = addr.ip().to_string();
        let forwarded_for = http::HeaderValue::try_from(ip).expect("an IP address is a valid header value");
        ClientAddr { addr, forwarded_for }
    }
}

/// How `serve` runs: everything the CLI's flags decide.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub apps_dir: std::path::PathBuf,
    /// Live instances across all apps (`POOL_SIZE`).
    pub pool_size: usize,
    /// Requests that may wait for a worker at once (`--queue-limit`).
    pub queue_limit: usize,
    /// Where compiled components are cached; `None` compiles in memory.
    pub cache_dir: Option<std::path::PathBuf>,
    /// Compile every component before reporting ready.
    pub precompile: bool,
    /// How long in-flight requests may take to finish at shutdown.
    pub drain_timeout: Duration,
    /// Count and time every request (off only to measure what that costs; pool metrics are always kept).
    pub request_metrics: bool,
}

impl ServeOptions {
    /// Defaults for `apps_dir`: the default pool and queue, no disk cache, lazy compilation, a 30 s drain.
    pub fn new(apps_dir: impl Into<std::path::PathBuf>) -> ServeOptions {
        ServeOptions {
            apps_dir: apps_dir.into(),
            pool_size: DEFAULT_POOL_SIZE,
            queue_limit: DEFAULT_QUEUE_LIMIT,
            cache_dir: None,
            precompile: false,
            drain_timeout: Duration::from_secs(30),
            request_metrics: true,
        }
    }
}

/// The whole HTTP surface: internal routes under `/_/`, and every other path dispatched to an app.
#[derive(Clone)]
pub struct Front {
    state: AppState,
    /// The internal routes: every path that is `/_` or starts with `/_/` (no app name starts with `_`).
    internal: Router,
}

impl Front {
    pub fn new(state: AppState) -> Front {
        let internal = internal::routes().with_state(state.clone());
        Front { state, internal }
    }

    /// What every request goes through: targets over the length limit are refused, every response gets its
    /// access line, and responses from apps are counted and timed. App paths go straight to the dispatcher rather
    /// than through the router to its fallback: the router's boxed futures, layer by layer, cost a proxied request
    /// measurably.
    pub async fn handle(&self, request: Request) -> Response {
        let start = Instant::now();
        let method = request.method().clone();
        // For the access line, after the request has moved on (a shared buffer: the clone copies nothing).
        let uri = request.uri().clone();
        let path = uri.path();
        let http_version = request.version();
        let len = uri.path_and_query().map_or(0, |pq| pq.as_str().len());
        let response = if len > MAX_URI_BYTES {
            Error::UriTooLong {
                len,
                limit: MAX_URI_BYTES,
            }
            .into_response()
        } else if path == "/_" || path.starts_with("/_/") {
            let routed = self.internal.clone().oneshot(request).await;
            routed.unwrap_or_else(|never| match never {})
        } else {
            dispatch::handle(&self.state, request).await
        };
        access_log::record(&method, path, http_version, start, &response);
        self.state.metrics.observe(start, response)
    }
}

/// Serves `state` on `listener` until `shutdown` resolves, then drains: readiness turns 503, the listener closes,
/// in-flight requests finish, and connections still open after `drain_timeout` are dropped.
pub async fn run(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()>,
    drain_timeout: Duration,
) -> std::io::Result<()> {
    let front = Arc::new(Front::new(state.clone()));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS);
    let graceful = GracefulShutdown::new();
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
        let front = front.clone();
        let client = ClientAddr::new(peer);
        let service = service_fn(move |request: http::Request<Incoming>| {
            let (front, client) = (front.clone(), client.clone());
            async move {
                let mut request = request.map(Body::new);
                request.extensions_mut().insert(client);
                Ok::<_, Infallible>(front.handle(request).await)
            }
        });
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
            drop(permit);
        });
    }

    state.lifecycle.set_draining();
    drop(listener);
    // WebSocket tunnels and SSE streams are long-lived by design: end them rather than let them hold the drain open.
    state.upstreams.close_tunnels();
    state.metrics.close();
    let open = graceful.count();
    tracing::info!(
        open_connections = open,
        "draining: no new connections, waiting for in-flight requests"
    );
    match tokio::time::timeout(drain_timeout, graceful.shutdown()).await {
        Ok(()) => tracing::info!("drained; every connection closed"),
        Err(_) => tracing::warn!(
            ?drain_timeout,
            "shutdown timeout reached; dropping the connections still open"
        ),
    }
    Ok(())
}

/// Serves the apps in `options.apps_dir` on `listener` until `shutdown` resolves.
///
/// The listener is already bound, so the port answers at once: `/_/health` is 200 and `/_/ready` is 503 until the
/// first scan of APPS_DIR is done (and, with `precompile`, every component compiled). The watcher starts before
/// that scan, so nothing changed meanwhile is missed.
pub async fn serve(
    listener: TcpListener,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let engine = Engine::new(&EngineSettings {
        pool_size: options.pool_size,
        cache_dir: options.cache_dir.clone(),
    })
    .map_err(|e| std::io::Error::other(format!("cannot start the WebAssembly engine: {e:#}")))?;
    let pool = Arc::new(Pool::new(Arc::new(engine), options.pool_size, options.queue_limit));
    pool.spawn_reaper();
    let metrics = Arc::new(Metrics::new(pool.clone(), options.request_metrics));
    metrics.spawn_sampler();
    let state = AppState {
        registry: Arc::new(Registry::new(options.apps_dir.clone())),
        lifecycle: Arc::new(Lifecycle::default()),
        pool: pool.clone(),
        upstreams: Arc::new(Upstreams::new()),
        metrics,
    };
    let loader = {
        let state = state.clone();
        let precompile = options.precompile;
        tokio::spawn(async move {
            let registry = state.registry.clone();
            let (watcher, loaded) = tokio::task::spawn_blocking(move || {
                let watcher = Watcher::start(registry.clone())
                    .map_err(|error| tracing::warn!(%error, "cannot watch the apps directory; hot reload is off"))
                    .ok();
                (watcher, registry.reload_all())
            })
            .await
            .expect("the initial scan does not panic");
            let mut changes = state.registry.subscribe();
            changes.mark_unchanged();
            for task in state.pool.sync(&state.registry.snapshot(), precompile) {
                let _ = task.await;
            }
            // Ready first, then say so: whoever waits for the log line must find the server ready.
            state.lifecycle.set_ready();
            match loaded {
                Ok(()) => tracing::info!(apps = state.registry.snapshot().apps.len(), "apps loaded; ready"),
                Err(error) => tracing::error!(%error, "cannot read the apps directory; ready, serving no apps"),
            }
            // Versions added or changed from now on compile in the background, before their first request.
            while changes.changed().await.is_ok() {
                let snapshot = state.registry.snapshot();
                state.pool.sync(&snapshot, true);
                state.metrics.retain(&snapshot);
            }
            drop(watcher);
        })
    };
    let result = run(listener, state, shutdown, options.drain_timeout).await;
    // Stop following changes (dropping the watcher), and drop warm workers before the engine goes.
    loader.abort();
    let _ = loader.await;
    pool.clear();
    result
}
