//! One worker: a component instance in its own store, and what it may see of the world.
//!
//! A worker's whole world is built here: the config's `env` plus `MARINA_APP`/`MARINA_VERSION` (never the host's
//! environment), its version directory mounted read-only at `/` (nothing else of the filesystem), no sockets,
//! outbound HTTP only to `allowedOutboundHosts`, a memory cap, and stdout/stderr turned into log lines (by
//! [`guest_log`](super::guest_log)). A worker serves one request at a time (a WASI 0.3 handler's may serve
//! several at once, in one event loop: see [`invoke`](super::invoke)); the pool decides whether it serves another.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Instant;

use wasmtime::component::ResourceTable;
use wasmtime::{Store, StoreLimitsBuilder, UpdateDeadline};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::Proxy;
use wasmtime_wasi_http::p3::bindings::Service;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView};

use crate::backends::wasm::engine::Pre;
use crate::backends::wasm::guest_log::{GuestLog, LogBudget};
use crate::backends::wasm::status::{MeteredLimits, Registration, WorkerStatus, WorkerTable};
use crate::deploy::registry::Deployment;

static NEXT_WORKER_ID: AtomicU64 = AtomicU64::new(1);

/// Who a worker is, for logs and stats.
#[derive(Debug, Clone)]
pub(crate) struct Identity {
    pub(crate) app: String,
    pub(crate) version: String,
}

/// What the store holds: WASI state, HTTP state, limits.
pub struct WorkerState {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    hooks: OutboundPolicy,
    limits: MeteredLimits,
    /// The current call's deadline and yields, shared with the task that runs it.
    clock: Arc<CallClock>,
    /// The clocks of the other calls in the instance, when it serves several at once (a WASI 0.3 handler): any of
    /// their deadlines passing while the guest computes interrupts it too.
    joined_clocks: Vec<Arc<CallClock>>,
    log_budget: Arc<LogBudget>,
}

/// What the epoch callback and the task running a call share: the deadline (which the task lifts once the
/// response head is out, so a steady stream is not cut), whether the callback interrupted the guest for it, and
/// how often the guest yielded because it kept computing (which the guest lanes use to tell a loop from a wait).
#[derive(Debug, Default)]
pub(crate) struct CallClock {
    /// Nanoseconds after [`CLOCK_BASE`], plus one; 0 means no deadline.
    deadline: AtomicU64,
    timed_out: AtomicBool,
    yields: AtomicU64,
    /// Whether the call is waiting in the pool's queue for a worker (a deadline then is the queue's, not the app's).
    queued: AtomicBool,
}

static CLOCK_BASE: LazyLock<Instant> = LazyLock::new(Instant::now);

impl CallClock {
    pub(crate) fn new(deadline: Option<Instant>) -> CallClock {
        let clock = CallClock::default();
        clock.set_deadline(deadline);
        clock
    }

    pub(crate) fn set_deadline(&self, deadline: Option<Instant>) {
        let encoded = match deadline {
            Some(deadline) => {
                let after = deadline.saturating_duration_since(*CLOCK_BASE).as_nanos();
                u64::try_from(after).unwrap_or(u64::MAX - 1) + 1
            }
            None => 0,
        };
        self.deadline.store(encoded, Ordering::Relaxed);
    }

    fn past_deadline(&self, now: Instant) -> bool {
        match self.deadline.load(Ordering::Relaxed) {
            0 => false,
            encoded => now.saturating_duration_since(*CLOCK_BASE).as_nanos() >= u128::from(encoded - 1),
        }
    }

    /// Whether the guest was interrupted because its deadline passed.
    pub(crate) fn timed_out(&self) -> bool {
        self.timed_out.load(Ordering::Relaxed)
    }

    pub(crate) fn set_queued(&self, queued: bool) {
        self.queued.store(queued, Ordering::Relaxed);
    }

    pub(crate) fn is_queued(&self) -> bool {
        self.queued.load(Ordering::Relaxed)
    }

    /// Epoch yields so far.
    pub(crate) fn yields(&self) -> u64 {
        self.yields.load(Ordering::Relaxed)
    }
}

impl WasiView for WorkerState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for WorkerState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

/// What a guest's handler answers: the response head with its streaming body, or the error code it answered
/// with instead (as text: the two WASI releases have types of their own).
pub(crate) type GuestResponse = Result<hyper::Response<wasmtime_wasi_http::p2::body::HyperOutgoingBody>, String>;

/// A live instance's handler export, of either kind.
pub(crate) enum Guest {
    Wasi02(Proxy),
    Wasi03(Service),
}

/// A live instance: its store, its exports, and its history (in its status, which the stats read too).
pub(crate) struct Worker {
    pub(crate) store: Store<WorkerState>,
    pub(crate) guest: Guest,
    /// Its id, age, requests served and last use; listed in the pool's table while `_listed` lives.
    pub(crate) status: Arc<WorkerStatus>,
    _listed: Registration,
}

impl Worker {
    /// Instantiates `pre` in a fresh store of `engine` (the one it was compiled for) set up for `deployment`,
    /// trapping if that outlasts `clock`'s deadline.
    pub(crate) async fn new(
        engine: &wasmtime::Engine,
        pre: &Pre,
        deployment: &Deployment,
        identity: &Identity,
        clock: Arc<CallClock>,
        table: &Arc<WorkerTable>,
    ) -> anyhow::Result<Worker> {
        let config = &deployment.config;
        let id = NEXT_WORKER_ID.fetch_add(1, Ordering::Relaxed);
        let status = Arc::new(WorkerStatus::new(id, identity.clone(), Instant::now()));
        let log_budget = Arc::new(LogBudget::default());
        let mut wasi = WasiCtx::builder();
        for (name, value) in &config.env {
            wasi.env(name, value);
        }
        wasi.env("MARINA_APP", &identity.app)
            .env("MARINA_VERSION", &identity.version)
            .stdout(GuestLog::new(identity, "stdout", log_budget.clone()))
            .stderr(GuestLog::new(identity, "stderr", log_budget.clone()))
            .preopened_dir(&deployment.root, "/", FsPerms::ReadOnly)?;
        let memory_cap = usize::try_from(config.memory_cap_bytes()).unwrap_or(usize::MAX);
        let state = WorkerState {
            wasi: wasi.build(),
            http: WasiHttpCtx::new(),
            table: ResourceTable::new(),
            hooks: OutboundPolicy {
                allowed: config.allowed_outbound_hosts.clone(),
                identity: identity.clone(),
            },
            limits: MeteredLimits::new(
                StoreLimitsBuilder::new().memory_size(memory_cap).build(),
                status.clone(),
            ),
            // The request's deadline covers instantiation too: a component whose start never returns traps.
            clock,
            joined_clocks: Vec::new(),
            log_budget,
        };
        let mut store = Store::new(engine, state);
        store.limiter(|state| &mut state.limits);
        // Every tick, yield to the scheduler so a guest that never blocks still shares the thread; past the
        // deadline, trap. The first deadline is one tick away, so instantiation itself is covered too.
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(|context| {
            let state = context.data();
            let now = Instant::now();
            let mut past = false;
            for clock in std::iter::once(&state.clock).chain(&state.joined_clocks) {
                if clock.past_deadline(now) {
                    clock.timed_out.store(true, Ordering::Relaxed);
                    past = true;
                }
            }
            if past {
                Ok(UpdateDeadline::Interrupt)
            } else {
                state.clock.yields.fetch_add(1, Ordering::Relaxed);
                Ok(UpdateDeadline::Yield(1))
            }
        });
        let guest = match pre {
            Pre::Wasi02(pre) => Guest::Wasi02(pre.instantiate_async(&mut store).await?),
            Pre::Wasi03(pre) => Guest::Wasi03(pre.instantiate_async(&mut store).await?),
        };
        Ok(Worker {
            store,
            guest,
            _listed: table.register(status.clone()),
            status,
        })
    }

    pub(crate) fn id(&self) -> u64 {
        self.status.id
    }

    /// Starts a request: its clock (deadline and yields), a fresh log budget, and the epoch deadline re-armed one
    /// tick ahead. A warm worker's deadline is otherwise the tick after its last call's, long past, and the new
    /// call would yield at its first epoch check, a round trip through the scheduler that looks like computing.
    pub(crate) fn begin(&mut self, clock: Arc<CallClock>) {
        let state = self.store.data_mut();
        state.clock = clock;
        state.log_budget.reset();
        self.store.set_epoch_deadline(1);
    }
}

impl WorkerState {
    /// Another call joined the instance: its deadline counts too.
    pub(crate) fn watch(&mut self, clock: Arc<CallClock>) {
        self.joined_clocks.push(clock);
    }

    /// A joined call ended.
    pub(crate) fn unwatch(&mut self, clock: &Arc<CallClock>) {
        self.joined_clocks.retain(|watched| !Arc::ptr_eq(watched, clock));
    }

    /// Whether the epoch callback interrupted the guest for a deadline: the current call's, or a joined one's.
    pub(crate) fn timed_out(&self) -> bool {
        self.clock.timed_out() || self.joined_clocks.iter().any(|clock| clock.timed_out())
    }
}

/// Decides which outbound requests a guest may make: only to hosts its config lists.
struct OutboundPolicy {
    allowed: Vec<String>,
    identity: Identity,
}

impl OutboundPolicy {
    fn allows(&self, host: &str, port: Option<u16>) -> bool {
        self.allowed.iter().any(|allowed| {
            if allowed == "*" {
                return true;
            }
            match allowed
                .rsplit_once(':')
                .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
            {
                Some((allowed_host, allowed_port)) => {
                    allowed_host.eq_ignore_ascii_case(host) && Some(allowed_port) == port
                }
                None => allowed.eq_ignore_ascii_case(host),
            }
        })
    }
}

type HttpError = wasmtime_wasi_http::Error;
/// The future that drives an outbound connection's I/O, as `WasiHttpHooks::send_request` returns it.
type IoFuture = Box<dyn Future<Output = Result<(), HttpError>> + Send>;

impl WasiHttpHooks for OutboundPolicy {
    fn send_request(
        &mut self,
        request: http::Request<wasmtime_wasi_http::WasiBody>,
        options: Option<wasmtime_wasi_http::RequestOptions>,
        fut: Box<dyn Future<Output = Result<(), HttpError>> + Send>,
    ) -> Box<dyn Future<Output = Result<(http::Response<wasmtime_wasi_http::WasiBody>, IoFuture), HttpError>> + Send>
    {
        drop(fut);
        let uri = request.uri();
        let host = uri.host().unwrap_or("").to_owned();
        let port = uri.port_u16().or(match uri.scheme_str() {
            Some("https") => Some(443),
            Some("http") => Some(80),
            _ => None,
        });
        if !self.allows(&host, port) {
            tracing::warn!(
                app = %self.identity.app,
                version = %self.identity.version,
                host = %host,
                "outbound request denied: the host is not in allowedOutboundHosts"
            );
            return Box::new(async { Err(HttpError::HttpRequestDenied) });
        }
        Box::new(async move {
            use http_body_util::BodyExt;
            let (response, io) = wasmtime_wasi_http::default_send_request(request, options).await?;
            Ok((response.map(BodyExt::boxed_unsync), Box::new(io) as IoFuture))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allowed: &[&str]) -> OutboundPolicy {
        OutboundPolicy {
            allowed: allowed.iter().map(|s| s.to_string()).collect(),
            identity: Identity {
                app: "a".into(),
                version: "1.0.0".into(),
            },
        }
    }

    #[test]
    fn outbound_hosts_are_denied_unless_listed() {
        assert!(!policy(&[]).allows("example.com", Some(80)));
        assert!(policy(&["example.com"]).allows("example.com", Some(443)));
        assert!(policy(&["EXAMPLE.com"]).allows("example.COM", Some(80)));
        assert!(!policy(&["example.com"]).allows("evil.example.com", Some(80)));
        assert!(policy(&["127.0.0.1:8080"]).allows("127.0.0.1", Some(8080)));
        assert!(!policy(&["127.0.0.1:8080"]).allows("127.0.0.1", Some(8081)));
        assert!(policy(&["*"]).allows("anything", None));
    }
}
