//! Which serving core the running thread is, so that state kept per core (the upstream connection pool, the
//! request counters, the route cache, the epoch ticker's counters) is looked up without a lock or a cache line
//! shared with the other cores.
//!
//! A serving core is a thread running a `current_thread` runtime of its own (see `server::cores`): a connection,
//! its tasks and the sockets it opens are polled by that thread's I/O driver and no other. A socket opened on one
//! core and used on another still works, but every readiness event then crosses threads, and only arrives when the
//! owning core turns its driver. Threads that are no serving core (an embedder's runtime, the tests' in-process
//! front) have no index and share one slot.

use std::cell::Cell;
use std::ops::Deref;

thread_local! {
    static CORE: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The number of serving cores by default: one per CPU the process may use. State kept per core is sized from it.
pub(crate) fn default_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Marks the running thread as serving core `index`, for its lifetime.
pub(crate) fn enter(index: usize) {
    CORE.with(|core| core.set(Some(index)));
}

/// The running thread's serving core, if it is one.
pub(crate) fn current() -> Option<usize> {
    CORE.with(Cell::get)
}

/// A slot among `slots` for the running thread: its core's (cores beyond `slots - 1` share by remainder), or the
/// last one for a thread that is no serving core.
pub(crate) fn slot(slots: usize) -> usize {
    debug_assert!(slots > 0);
    match current() {
        Some(core) if slots > 1 => core % (slots - 1),
        _ => slots - 1,
    }
}

/// A value alone on its cache lines (two of them: x86 prefetches lines in adjacent pairs), so that what one core
/// writes there never invalidates a line another core is using.
#[repr(align(128))]
#[derive(Debug, Default)]
pub(crate) struct Padded<T>(pub(crate) T);

impl<T> Deref for Padded<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

/// One `T` per serving core of the default count, and one for every other thread ([`slot`]'s layout).
///
/// A request on a serving core writes only its core's value, so that the writes of a request on one core never
/// take a cache line from the other: measured on the 2-core machine, an atomic add to a line both cores write
/// costs about four times one to a line of its own. Readers that want the whole picture sum [`PerCore::iter`].
pub(crate) struct PerCore<T> {
    slots: Box<[Padded<T>]>,
}

impl<T> PerCore<T> {
    /// Each slot made by `make`.
    pub(crate) fn new(mut make: impl FnMut() -> T) -> PerCore<T> {
        PerCore {
            slots: (0..=default_count()).map(|_| Padded(make())).collect(),
        }
    }

    /// The running thread's value.
    pub(crate) fn local(&self) -> &T {
        &self.slots[slot(self.slots.len())]
    }

    /// Every slot's value.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &T> {
        self.slots.iter().map(|padded| &padded.0)
    }
}

impl<T: Default> Default for PerCore<T> {
    fn default() -> Self {
        PerCore::new(T::default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_that_is_no_core_takes_the_last_slot_and_a_core_its_own() {
        assert_eq!(std::thread::spawn(|| slot(3)).join().unwrap(), 2);
        let core = |index| {
            std::thread::spawn(move || {
                enter(index);
                slot(3)
            })
            .join()
            .unwrap()
        };
        assert_eq!(
            (core(0), core(1), core(2)),
            (0, 1, 0),
            "cores share the slots by remainder"
        );
        assert_eq!(
            std::thread::spawn(|| slot(1)).join().unwrap(),
            0,
            "one slot serves every thread"
        );
    }
}
