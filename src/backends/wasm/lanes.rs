//! Where guest code runs when it computes: on executor threads of its own, off the threads that serve HTTP, in two
//! lanes so that a call that keeps computing cannot hold back the short ones.
//!
//! A guest that computes without calling the host gives way only at an epoch tick. On the threads that accept
//! connections and parse requests, that made one looping app stall the whole host (the front, `/_/health`, other
//! apps) for a tick at a time, on every thread. Handing every call to another thread, though, costs two thread
//! crossings per request, more than a short handler itself. So a call starts on the request's own task
//! ([`Lanes::start`], an [`Inline`] call), and moves to a lane the moment it shows that it computes: at an epoch
//! yield once it has run [`INLINE_BUDGET`] on the front. If it goes on computing there (its next yield), its
//! version starts its calls on a lane for the next [`INLINE_BACKOFF`], so a client that keeps calling a looping
//! app costs the front about a tick per backoff, not one per request; a short call that only looked long (its
//! thread preempted across a tick) just ends on the lane. The lanes:
//!
//! - the **fresh lane**: threads at normal priority, where a call that left the front continues;
//! - the **demoted lane**: threads at a lower OS priority ([`DEMOTED_NICE`]). A call that has computed for
//!   [`DEMOTE_AFTER`] without once waiting on I/O (its epoch yields say so) moves here at its next yield, and
//!   every call of a version that uses more than [`HEAVY_RATIO`] times an even share of the guest CPU of the
//!   last few [`SHARE_INTERVAL`]s starts here, never on the front (a [`VersionMeter`] per version keeps the
//!   score). The kernel then gives those threads CPU mostly when the fresh ones leave it: a runaway request, or
//!   an app whose every request crashes and restarts its instance, costs the others about what a healthy one
//!   would, and still progresses on an idle machine.
//!
//! The lanes are separate tokio runtimes, so the OS scheduler, not a queue of ours, arbitrates between them and
//! the front. A wasmtime call is a `Send` future, so moving one between the front and a lane, or between lanes,
//! is moving a future: it resumes on the other thread at its next poll.
//!
//! Each poll of a guest's task is timed with the monotonic clock (tens of nanoseconds). On a lane, the thread's
//! own CPU clock, which costs a system call (about 1 us here), is read only every [`SETTLE_EVERY`] of polled time
//! and when the thread parks, and each version is charged its share of the CPU the thread used, in proportion to
//! its polled time (never more than that time), so `marina_worker_cpu_seconds_total` is CPU, not time spent
//! waiting for a core. On the front a call is charged its polled time: it runs there for about a tick at most,
//! too short to be preempted but rarely, and a system call per request would cost more than the error.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::runtime::{Handle, Runtime};

use crate::backends::wasm::worker::CallClock;

/// How long a call may run on the front before an epoch yield moves it to a lane. An earlier yield (a tick that
/// fell just after the call started) is not taken for computing: the call goes on where it is.
pub(crate) const INLINE_BUDGET: Duration = Duration::from_micros(250);
/// How long a version starts its calls on a lane after one of them left the front for computing past
/// [`INLINE_BUDGET`] and went on computing on the lane.
pub(crate) const INLINE_BACKOFF: Duration = Duration::from_millis(100);
/// A call that computes this long without waiting on I/O is moved to the demoted lane.
pub(crate) const DEMOTE_AFTER: Duration = Duration::from_millis(5);
/// The nice value of the demoted lane's threads: the kernel gives a nice-10 thread about a tenth of the CPU a
/// nice-0 thread gets when both want it, so a demoted call is slowed, not starved.
pub(crate) const DEMOTED_NICE: i32 = 10;
/// How much polled time a thread accumulates before it reads its CPU clock and charges the versions it ran.
pub(crate) const SETTLE_EVERY: Duration = Duration::from_millis(2);

/// How often each version's guest CPU is compared with the others'.
pub(crate) const SHARE_INTERVAL: Duration = Duration::from_millis(100);
/// A version using more than this many times an even share of the guest CPU (among versions that use any) is
/// heavy: its new calls start in the demoted lane. Two apps under the same load never trip it.
pub(crate) const HEAVY_RATIO: f64 = 1.5;
/// Below this much CPU per [`SHARE_INTERVAL`], a version is not competing for the CPU and is left out.
const ACTIVE_CPU: Duration = Duration::from_millis(2);

/// The two guest executors, and the score of every version that runs on them.
pub(crate) struct Lanes {
    fresh: Option<Runtime>,
    demoted: Option<Runtime>,
    demoted_handle: Handle,
    fresh_handle: Handle,
    meters: Arc<std::sync::Mutex<Vec<std::sync::Weak<VersionMeter>>>>,
}

/// One app version's guest CPU: the total (for the metrics) and whether it is taking more than its share.
#[derive(Debug, Default)]
pub(crate) struct VersionMeter {
    cpu_ns: AtomicU64,
    /// Read by the share sampler: the total at its last look, and the smoothed use per interval.
    sampled_ns: AtomicU64,
    recent_ns: AtomicU64,
    heavy: std::sync::atomic::AtomicBool,
    /// Until when (nanoseconds after [`BACKOFF_BASE`]) new calls start on a lane: see [`INLINE_BACKOFF`].
    lane_until_ns: AtomicU64,
}

static BACKOFF_BASE: LazyLock<Instant> = LazyLock::new(Instant::now);

fn nanos_since_base(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(*BACKOFF_BASE).as_nanos()).unwrap_or(u64::MAX)
}

impl VersionMeter {
    /// Guest CPU used so far.
    pub(crate) fn cpu(&self) -> Duration {
        Duration::from_nanos(self.cpu_ns.load(Ordering::Relaxed))
    }

    /// Whether this version's new calls start in the demoted lane.
    pub(crate) fn is_heavy(&self) -> bool {
        self.heavy.load(Ordering::Relaxed)
    }

    /// Whether a new call may start on the front: the version is not heavy, and was not backed off within the
    /// last [`INLINE_BACKOFF`].
    fn may_start_inline(&self, now: Instant) -> bool {
        !self.is_heavy() && nanos_since_base(now) >= self.lane_until_ns.load(Ordering::Relaxed)
    }

    fn back_off(&self, now: Instant) {
        self.lane_until_ns
            .store(nanos_since_base(now + INLINE_BACKOFF), Ordering::Relaxed);
    }

    fn charge_polled(&self, elapsed: Duration) {
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.cpu_ns.fetch_add(nanos, Ordering::Relaxed);
    }
}

impl Lanes {
    /// Starts `threads` threads per lane.
    pub(crate) fn new(threads: usize) -> std::io::Result<Lanes> {
        let fresh = runtime("marina-guest", threads, None)?;
        let demoted = runtime("marina-guest-slow", threads, Some(DEMOTED_NICE))?;
        let meters = Arc::default();
        fresh.spawn(score(Arc::clone(&meters)));
        Ok(Lanes {
            fresh_handle: fresh.handle().clone(),
            demoted_handle: demoted.handle().clone(),
            fresh: Some(fresh),
            demoted: Some(demoted),
            meters,
        })
    }

    /// A new version's meter, scored against the others from now on.
    pub(crate) fn meter(&self) -> Arc<VersionMeter> {
        let meter = Arc::new(VersionMeter::default());
        let mut meters = self.meters.lock().unwrap_or_else(|p| p.into_inner());
        meters.retain(|meter| meter.strong_count() > 0);
        meters.push(Arc::downgrade(&meter));
        meter
    }

    /// Starts `call` on the calling task, to be polled there through the returned [`Inline`], which moves it to a
    /// lane once it computes (or is dropped unfinished). A heavy or backed-off version's call goes to a lane at
    /// once. `clock` is the call's: its epoch yields tell computing from waiting.
    pub(crate) fn start(
        &self,
        meter: Arc<VersionMeter>,
        clock: Arc<CallClock>,
        call: impl Future<Output = ()> + Send + 'static,
    ) -> Inline<'_> {
        let mut inline = Inline {
            lanes: self,
            call: Some(Box::pin(call)),
            burst: Burst::new(&clock),
            meter,
            clock,
        };
        if !inline.meter.may_start_inline(Instant::now()) {
            inline.hand_off();
        }
        inline
    }

    /// Runs `call` in the fresh lane (or, for a version over its share, the demoted one), timed and charged to
    /// `meter`. `clock` is the call's: its epoch yields tell computing from waiting.
    pub(crate) fn spawn(
        &self,
        meter: Arc<VersionMeter>,
        clock: Arc<CallClock>,
        call: impl Future<Output = ()> + Send + 'static,
    ) {
        let left = Left {
            burst: Burst::new(&clock),
            computing: false,
        };
        self.continue_on_lane(Box::pin(call), meter, clock, left);
    }

    fn continue_on_lane(&self, call: BoxedCall, meter: Arc<VersionMeter>, clock: Arc<CallClock>, left: Left) {
        let demoted = meter.is_heavy() || left.burst.computed >= DEMOTE_AFTER;
        let task = Metered {
            call,
            meter,
            clock,
            burst: left.burst,
            left_front_computing: left.computing,
            demoted,
            demoted_lane: self.demoted_handle.clone(),
        };
        if demoted {
            self.demoted_handle.spawn(task);
        } else {
            self.fresh_handle.spawn(task);
        }
    }
}

type BoxedCall = Pin<Box<dyn Future<Output = ()> + Send>>;

/// How long a call has computed since it last waited on something other than the CPU, told by its epoch yields:
/// a poll that leaves it pending after a yield was computing; one without was waiting (I/O, a timer, a worker).
#[derive(Clone, Copy)]
struct Burst {
    /// The clock's yield count after the last poll.
    yields_seen: u64,
    computed: Duration,
}

impl Burst {
    fn new(clock: &CallClock) -> Burst {
        Burst {
            yields_seen: clock.yields(),
            computed: Duration::ZERO,
        }
    }

    /// After a poll of `elapsed` that left the call pending: whether it yielded (it computes), the burst grown by
    /// the poll if so, started over if not.
    fn after_pending(&mut self, clock: &CallClock, elapsed: Duration) -> bool {
        let yields = clock.yields();
        if yields == self.yields_seen {
            self.computed = Duration::ZERO;
            return false;
        }
        self.yields_seen = yields;
        self.computed += elapsed;
        true
    }
}

/// Where a call stood when it came to a lane.
struct Left {
    burst: Burst,
    /// Whether it left the front because it computed past [`INLINE_BUDGET`].
    computing: bool,
}

/// A call polled by the task that started it (the request's, on the front) until it ends, computes past
/// [`INLINE_BUDGET`], its version turns heavy, or it is handed off ([`Inline::hand_off`], or dropped unfinished):
/// then it continues on a lane. Ready once the call is no longer polled here.
pub(crate) struct Inline<'a> {
    lanes: &'a Lanes,
    call: Option<BoxedCall>,
    meter: Arc<VersionMeter>,
    clock: Arc<CallClock>,
    burst: Burst,
}

impl Inline<'_> {
    /// Whether the call is still polled here.
    pub(crate) fn is_running(&self) -> bool {
        self.call.is_some()
    }

    /// Moves the call, if it has not ended, to a lane, where it runs to its end without this task.
    pub(crate) fn hand_off(&mut self) {
        self.leave(false);
    }

    fn leave(&mut self, computing: bool) {
        if let Some(call) = self.call.take() {
            let (meter, clock) = (self.meter.clone(), self.clock.clone());
            let left = Left {
                burst: self.burst,
                computing,
            };
            self.lanes.continue_on_lane(call, meter, clock, left);
        }
    }
}

impl Future for Inline<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        let Some(call) = this.call.as_mut() else {
            return Poll::Ready(());
        };
        let computing = loop {
            let started = Instant::now();
            let polled = {
                // What the call registers while polled here (its timers, the tasks and sockets of an outbound
                // request, a compile's blocking task) belongs to the fresh lane's runtime, where the call may end,
                // so that nothing of it outlives the runtime it was registered with.
                let _lane = this.lanes.fresh_handle.enter();
                call.as_mut().poll(cx)
            };
            let elapsed = started.elapsed();
            this.meter.charge_polled(elapsed);
            if polled.is_ready() {
                this.call = None;
                return Poll::Ready(());
            }
            if !this.burst.after_pending(&this.clock, elapsed) {
                return Poll::Pending;
            }
            let computing = this.burst.computed >= INLINE_BUDGET;
            if computing || this.meter.is_heavy() {
                break computing;
            }
            // A tick that fell just after the call started: it goes on at once. Returning would put it behind
            // every other task of this core (the yield has woken it), a wait of up to the core's whole queue for
            // about one call in a hundred; a call that goes on computing is still moved at its next tick.
        };
        this.leave(computing);
        Poll::Ready(())
    }
}

impl Drop for Inline<'_> {
    fn drop(&mut self) {
        // The front gave up (an error answer, the client gone): the call still ends on its own, on a lane, and
        // gives its worker back.
        self.hand_off();
    }
}

impl Drop for Lanes {
    fn drop(&mut self) {
        // Dropping a runtime blocks until its threads stop, which an async context may not do; tasks still running
        // (calls whose clients are gone) are dropped with their workers.
        for runtime in [self.fresh.take(), self.demoted.take()].into_iter().flatten() {
            runtime.shutdown_background();
        }
    }
}

fn runtime(name: &'static str, threads: usize, nice: Option<i32>) -> std::io::Result<Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .thread_name(name)
        .enable_all()
        .on_thread_start(move || {
            if let Some(nice) = nice {
                lower_priority(nice);
            }
            LEDGER.with(|ledger| ledger.borrow_mut().start());
        })
        .on_thread_park(|| LEDGER.with(|ledger| ledger.borrow_mut().settle()))
        .build()
}

/// Every [`SHARE_INTERVAL`], marks the versions that use more than [`HEAVY_RATIO`] times an even share of the
/// guest CPU as heavy, and the others as not.
async fn score(meters: Arc<std::sync::Mutex<Vec<std::sync::Weak<VersionMeter>>>>) {
    let mut ticks = tokio::time::interval(SHARE_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let active_ns = ACTIVE_CPU.as_nanos() as u64;
    loop {
        ticks.tick().await;
        let live: Vec<Arc<VersionMeter>> = {
            let meters = meters.lock().unwrap_or_else(|p| p.into_inner());
            meters.iter().filter_map(std::sync::Weak::upgrade).collect()
        };
        let mut total = 0u64;
        let mut active = 0u64;
        for meter in &live {
            let now = meter.cpu_ns.load(Ordering::Relaxed);
            let used = now.saturating_sub(meter.sampled_ns.swap(now, Ordering::Relaxed));
            // Smoothed over a few intervals, so one burst does not flip it, and a version that stops is let go.
            let recent = (meter.recent_ns.load(Ordering::Relaxed) + used) / 2;
            meter.recent_ns.store(recent, Ordering::Relaxed);
            if recent >= active_ns {
                total += recent;
                active += 1;
            }
        }
        for meter in &live {
            let recent = meter.recent_ns.load(Ordering::Relaxed);
            let heavy =
                active >= 2 && recent >= active_ns && recent as f64 > HEAVY_RATIO * total as f64 / active as f64;
            meter.heavy.store(heavy, Ordering::Relaxed);
        }
    }
}

/// Lowers the calling thread's priority to `nice` (lowering needs no privilege). If the OS refuses, the lane
/// still works, only without the priority difference: say so once per thread.
fn lower_priority(nice: i32) {
    use thread_priority::{ThreadPriority, ThreadPriorityValue};
    // thread-priority maps 0..=99 onto nice 19..=-20; find the value that lands on `nice`.
    let value = (0u8..=99).find(|&value| {
        let ratio = 1f32 - f32::from(value) / 99f32;
        (39f32 * ratio) as i32 - 20 == nice
    });
    let result = match value.map(ThreadPriorityValue::try_from) {
        Some(Ok(value)) => thread_priority::set_current_thread_priority(ThreadPriority::Crossplatform(value))
            .map_err(|e| format!("{e:?}")),
        _ => Err(format!("no priority value maps to nice {nice}")),
    };
    if let Err(error) = result {
        tracing::warn!(nice, "cannot lower a demoted guest thread's priority: {error}");
    }
}

/// A guest task, timed at every poll, that moves itself to the demoted lane when it computes too long.
struct Metered {
    call: BoxedCall,
    meter: Arc<VersionMeter>,
    clock: Arc<CallClock>,
    burst: Burst,
    /// Set when the call left the front for computing, until its next epoch yield here confirms it (and backs
    /// its version off the front) or it waits on something else. A short call that only looked long (its
    /// thread preempted across a tick) ends here without either, and its version stays on the front.
    left_front_computing: bool,
    demoted: bool,
    demoted_lane: Handle,
}

impl Future for Metered {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        let started = Instant::now();
        let polled = this.call.as_mut().poll(cx);
        let elapsed = started.elapsed();
        LEDGER.with(|ledger| ledger.borrow_mut().charge(&this.meter, elapsed));
        if polled.is_ready() {
            return Poll::Ready(());
        }
        if !this.burst.after_pending(&this.clock, elapsed) {
            this.left_front_computing = false;
        } else if std::mem::take(&mut this.left_front_computing) {
            this.meter.back_off(Instant::now());
        }
        if !this.demoted && (this.burst.computed >= DEMOTE_AFTER || this.meter.is_heavy()) {
            // Continue on the demoted lane: this task ends, a new one there polls the same call.
            let moved = Metered {
                call: std::mem::replace(&mut this.call, Box::pin(std::future::ready(()))),
                meter: this.meter.clone(),
                clock: this.clock.clone(),
                burst: this.burst,
                left_front_computing: this.left_front_computing,
                demoted: true,
                demoted_lane: this.demoted_lane.clone(),
            };
            this.demoted_lane.spawn(moved);
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

thread_local! {
    static LEDGER: RefCell<Ledger> = RefCell::new(Ledger::default());
}

/// One lane thread's polled time not yet turned into CPU time.
#[derive(Default)]
struct Ledger {
    /// The thread's CPU clock at the last settlement.
    cpu_at: Duration,
    /// Polled time per counter since then (consecutive polls of one version merged).
    pending: Vec<(Arc<VersionMeter>, u64)>,
    polled: u64,
}

impl Ledger {
    fn start(&mut self) {
        self.cpu_at = thread_cpu();
    }

    fn charge(&mut self, counter: &Arc<VersionMeter>, elapsed: Duration) {
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        match self.pending.last_mut() {
            Some((last, total)) if Arc::ptr_eq(last, counter) => *total += nanos,
            _ => self.pending.push((counter.clone(), nanos)),
        }
        self.polled += nanos;
        if self.polled >= SETTLE_EVERY.as_nanos() as u64 {
            self.settle();
        }
    }

    /// Charges each pending counter its share of the CPU the thread used, at most its polled time.
    fn settle(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let now = thread_cpu();
        let used = now.saturating_sub(self.cpu_at).as_nanos() as f64;
        self.cpu_at = now;
        let ratio = if self.polled == 0 {
            0.0
        } else {
            (used / self.polled as f64).min(1.0)
        };
        for (counter, nanos) in self.pending.drain(..) {
            counter
                .cpu_ns
                .fetch_add((nanos as f64 * ratio) as u64, Ordering::Relaxed);
        }
        self.polled = 0;
    }
}

fn thread_cpu() -> Duration {
    cpu_time::ThreadTime::try_now()
        .map(|time| time.as_duration())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lanes() -> Lanes {
        Lanes::new(1).expect("the lanes start")
    }

    #[tokio::test]
    async fn a_call_that_never_waits_runs_to_its_end_on_the_task_that_started_it() {
        let lanes = lanes();
        let here = std::thread::current().id();
        let (sender, ran_on) = std::sync::mpsc::channel();
        let call = async move {
            let _ = sender.send(std::thread::current().id());
        };
        let mut inline = lanes.start(lanes.meter(), Arc::new(CallClock::new(None)), call);
        assert!(inline.is_running());
        (&mut inline).await;
        assert!(!inline.is_running());
        assert_eq!(ran_on.try_recv().expect("the call ran when polled"), here);
    }

    #[tokio::test]
    async fn a_call_dropped_unfinished_ends_on_a_guest_lane() {
        let lanes = lanes();
        let (go, gone) = tokio::sync::oneshot::channel::<()>();
        let (done, finished) = tokio::sync::oneshot::channel();
        let call = async move {
            let _ = gone.await;
            let _ = done.send(std::thread::current().name().map(str::to_owned));
        };
        let mut inline = lanes.start(lanes.meter(), Arc::new(CallClock::new(None)), call);
        // Polled once: it waits on `gone`, so it stays here.
        assert!(futures_util::poll!(&mut inline).is_pending());
        assert!(inline.is_running());
        drop(inline);
        go.send(()).unwrap();
        let thread = tokio::time::timeout(Duration::from_secs(5), finished)
            .await
            .expect("the call ends without its starter")
            .unwrap();
        assert_eq!(thread.as_deref(), Some("marina-guest"));
    }

    #[tokio::test]
    async fn a_backed_off_version_starts_its_calls_on_a_lane_until_the_backoff_passes() {
        let lanes = lanes();
        let meter = lanes.meter();
        let now = Instant::now();
        assert!(meter.may_start_inline(now));
        meter.back_off(now);
        assert!(!meter.may_start_inline(now));
        assert!(!meter.may_start_inline(now + INLINE_BACKOFF / 2));
        assert!(meter.may_start_inline(now + INLINE_BACKOFF));

        let (done, finished) = tokio::sync::oneshot::channel();
        let call = async move {
            let _ = done.send(std::thread::current().name().map(str::to_owned));
        };
        let inline = lanes.start(meter, Arc::new(CallClock::new(None)), call);
        assert!(!inline.is_running(), "handed to a lane at once");
        let thread = tokio::time::timeout(Duration::from_secs(5), finished)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(thread.as_deref(), Some("marina-guest"));
    }

    #[tokio::test]
    async fn a_call_polled_on_the_front_sees_the_fresh_lane_as_its_runtime() {
        let lanes = lanes();
        let fresh = lanes.fresh_handle.id();
        let (sender, seen) = std::sync::mpsc::channel();
        let call = async move {
            let _ = sender.send(Handle::current().id());
        };
        let mut inline = lanes.start(lanes.meter(), Arc::new(CallClock::new(None)), call);
        (&mut inline).await;
        assert_eq!(seen.try_recv().unwrap(), fresh);
        assert_ne!(Handle::current().id(), fresh);
    }
}
