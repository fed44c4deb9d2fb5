//! Where the server is in its life: loading, ready, draining.
//!
//! Readiness is a separate question from liveness: a load balancer should stop sending traffic while the apps are
//! still being scanned and once a drain has begun, but the process is alive throughout.

use std::sync::atomic::{AtomicU8, Ordering};

/// The phases, in the only order they happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Phase {
    /// The first scan of APPS_DIR has not finished.
    Loading = 0,
    /// Serving.
    Ready = 1,
    /// A shutdown signal arrived: no new connections, in-flight requests finish.
    Draining = 2,
}

/// The current phase, shared by the server, the loader and the readiness route.
#[derive(Debug)]
pub struct Lifecycle {
    phase: AtomicU8,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle {
            phase: AtomicU8::new(Phase::Loading as u8),
        }
    }
}

impl Lifecycle {
    pub(crate) fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            0 => Phase::Loading,
            1 => Phase::Ready,
            _ => Phase::Draining,
        }
    }

    /// Loading is over. Does nothing once draining: a late loader must not make a draining server ready again.
    pub fn set_ready(&self) {
        let _ = self.phase.compare_exchange(
            Phase::Loading as u8,
            Phase::Ready as u8,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    pub fn set_draining(&self) {
        self.phase.store(Phase::Draining as u8, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_only_move_forward() {
        let lifecycle = Lifecycle::default();
        assert_eq!(lifecycle.phase(), Phase::Loading);
        lifecycle.set_ready();
        assert_eq!(lifecycle.phase(), Phase::Ready);
        lifecycle.set_draining();
        lifecycle.set_ready();
        assert_eq!(lifecycle.phase(), Phase::Draining);
    }
}
