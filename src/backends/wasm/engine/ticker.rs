//! The epoch ticker: the thread that advances the engine's epoch while guest code may be running, and sleeps
//! while none can.
//!
//! Guests yield and meet their deadlines at epoch ticks, so the epoch has to move while any instance is lent
//! (instantiating, handling a request, streaming its body) — and only then: an idle instance runs no code. Ticking
//! a thousand times a second regardless kept an idle server awake, and on a busy one each tick's wakeup
//! preempted a serving thread that was not running a guest at all: 2 to 4% more CPU per proxied request or
//! health check, measured against the ticker slowed to once a second.
//!
//! Every lent instance holds a [`Ticking`] guard. The guards are counted in a counter per serving core, and a
//! guard holds its counter itself (an `Arc` per core, whose reference counts sit beside the counter in an
//! allocation of its own), so lending and giving back touches no cache line shared with the other cores. A guard
//! is taken off the counter it was added to, even when it is dropped on another thread (a call that moved to a
//! guest lane): were it taken off its new thread's, a sum read while it moved could miss a guard that lived
//! throughout, and the ticker would sleep under a guest it should interrupt. The ticker sums the counters at every
//! tick; after [`IDLE_TICKS`] ticks with none lent, it sleeps until the next guard wakes it.

use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::Thread;
use std::time::Duration;

use crate::core_local::{Padded, PerCore};

/// Ticks with no instance lent before the ticker sleeps: at a few requests a second it sleeps between them, and
/// at more it stays awake rather than being woken for every one.
const IDLE_TICKS: u32 = 10;

/// A counter alone on its cache lines, so that two cores' counters, and their `Arc`s' reference counts, never share
/// one.
type Shard = Padded<AtomicIsize>;

/// What the ticker thread and the engine, which takes the guards, share.
pub(crate) struct Ticker {
    /// Guards taken minus guards dropped, per serving core (and one slot for every other thread).
    lent: PerCore<Arc<Shard>>,
    /// Set while the ticker sleeps or is about to: a new guard then wakes it.
    sleeping: AtomicBool,
    stop: AtomicBool,
    thread: OnceLock<Thread>,
    /// A second engine whose epoch moves with the first (the one for WASI 0.3 handlers), once there is one.
    second: OnceLock<wasmtime::Engine>,
}

/// Keeps the epoch moving while it lives: held by each lent instance, from the start of its instantiation or its
/// lending until it is given back.
pub(crate) struct Ticking {
    /// The counter it was added to.
    shard: Arc<Shard>,
}

impl Ticker {
    /// Starts the thread that advances `engine`'s epoch every `tick` while any [`Ticking`] guard lives.
    pub(crate) fn start(engine: wasmtime::Engine, tick: Duration) -> std::io::Result<Arc<Ticker>> {
        let ticker = Arc::new(Ticker {
            lent: PerCore::default(),
            sleeping: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            thread: OnceLock::new(),
            second: OnceLock::new(),
        });
        let shared = ticker.clone();
        let handle = std::thread::Builder::new()
            .name("marina-epoch".into())
            .spawn(move || shared.run(&engine, tick))?;
        let _ = ticker.thread.set(handle.thread().clone());
        Ok(ticker)
    }

    /// A guard that keeps the ticker awake until it is dropped.
    pub(crate) fn ticking(&self) -> Ticking {
        let shard = self.lent.local().clone();
        shard.fetch_add(1, Ordering::SeqCst);
        // Paired with the ticker's store of `sleeping` before its last look at the counters: either it sees this
        // guard and stays awake, or this sees it going to sleep and wakes it (an unpark before its park makes the
        // park return at once).
        if self.sleeping.load(Ordering::SeqCst) {
            self.wake();
        }
        Ticking { shard }
    }

    /// Advances `engine`'s epoch too, from now on. Only one second engine is kept; a later one is ignored.
    pub(crate) fn also_tick(&self, engine: wasmtime::Engine) {
        let _ = self.second.set(engine);
    }

    /// Ends the ticker thread.
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wake();
    }

    /// Whether the ticker is asleep (or about to be), for the tests.
    #[cfg(test)]
    fn is_sleeping(&self) -> bool {
        self.sleeping.load(Ordering::SeqCst)
    }

    /// Every counter is at least zero, and a guard that lives throughout the reading is in it.
    fn lent(&self) -> isize {
        self.lent.iter().map(|shard| shard.load(Ordering::SeqCst)).sum()
    }

    fn wake(&self) {
        if let Some(thread) = self.thread.get() {
            thread.unpark();
        }
    }

    fn run(&self, engine: &wasmtime::Engine, tick: Duration) {
        let mut idle_ticks = 0;
        while !self.stop.load(Ordering::SeqCst) {
            std::thread::sleep(tick);
            engine.increment_epoch();
            if let Some(second) = self.second.get() {
                second.increment_epoch();
            }
            idle_ticks = if self.lent() > 0 { 0 } else { idle_ticks + 1 };
            if idle_ticks < IDLE_TICKS {
                continue;
            }
            self.sleeping.store(true, Ordering::SeqCst);
            // `park` may also return for no reason: the loop then just ticks once more and looks again.
            if self.lent() <= 0 && !self.stop.load(Ordering::SeqCst) {
                std::thread::park();
            }
            self.sleeping.store(false, Ordering::SeqCst);
            idle_ticks = 0;
        }
    }
}

impl Drop for Ticking {
    fn drop(&mut self) {
        self.shard.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn eventually(what: &str, condition: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !condition() {
            assert!(Instant::now() < deadline, "never: {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn the_ticker_sleeps_with_nothing_lent_and_stays_awake_while_a_guard_lives_wherever_it_is_dropped() {
        let engine = wasmtime::Engine::new(wasmtime::Config::new().epoch_interruption(true)).unwrap();
        let ticker = Ticker::start(engine, Duration::from_millis(1)).unwrap();
        eventually("the ticker sleeps with nothing lent", || ticker.is_sleeping());

        // Dropped on another thread than the one that took it, as a call moved to a guest lane does: it comes off
        // the counter it went on, so no counter goes below zero.
        let guard = ticker.ticking();
        eventually("a guard wakes the ticker", || !ticker.is_sleeping());
        std::thread::sleep(Duration::from_millis(50));
        assert!(!ticker.is_sleeping(), "the ticker slept while a guard lived");
        std::thread::spawn(move || {
            crate::core_local::enter(0);
            drop(guard)
        })
        .join()
        .unwrap();
        assert!(ticker.lent.iter().all(|shard| shard.load(Ordering::SeqCst) == 0));
        eventually("the ticker sleeps again once the guard is gone", || {
            ticker.is_sleeping()
        });
        ticker.stop();
    }
}
