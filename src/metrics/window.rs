//! The window: what changed over the last [`WINDOW`], so rates and percentiles describe now rather than the
//! server's whole life.
//!
//! Counters only grow. Once every [`SAMPLE_INTERVAL`] the sampler keeps a [`Sample`] of the running totals; the
//! window starts at the newest sample that is at least a window old, and what happened within it is the totals
//! now less the totals then ([`Recent`]).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::counters::AppReading;
use super::histogram::Counts;

/// Rates and latency percentiles cover this much of the recent past.
pub const WINDOW: Duration = Duration::from_secs(10);
/// How often the totals are sampled for the window, and SSE frames built.
pub(crate) const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// What changed over the window, for one app version or for all.
#[derive(Debug, Clone, Default)]
pub(crate) struct Recent {
    pub(crate) requests: u64,
    pub(crate) errors: u64,
    pub(crate) latency: Counts,
    pub(crate) cpu: Duration,
}

impl Recent {
    fn between(now: &AppReading, then: Option<&Recent>) -> Recent {
        let zero = Recent::default();
        let then = then.unwrap_or(&zero);
        Recent {
            requests: now.requests().saturating_sub(then.requests),
            errors: now.errors().saturating_sub(then.errors),
            latency: now.latency.since(&then.latency),
            cpu: now.cpu.saturating_sub(then.cpu),
        }
    }

    pub(super) fn add(&mut self, other: &Recent) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.latency.add(&other.latency);
        self.cpu += other.cpu;
    }
}

/// The running totals at one tick, the start of some later window.
struct Sample {
    at: Instant,
    apps: HashMap<String, Recent>,
}

/// The samples that the current window can start from, oldest first; never empty.
///
/// A std mutex: it is held only to read or change the samples (and the counters read with them), never across an
/// `.await`. Holding it is also how a snapshot and a retirement see each other whole: see
/// [`super::Metrics::retain`].
pub(super) struct Window(Mutex<VecDeque<Sample>>);

impl Window {
    /// A window that starts at `started`, with nothing counted yet.
    pub(super) fn new(started: Instant) -> Window {
        Window(Mutex::new(VecDeque::from([Sample {
            at: started,
            apps: HashMap::new(),
        }])))
    }

    pub(super) fn lock(&self) -> Samples<'_> {
        Samples(self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// The samples, locked.
pub(super) struct Samples<'a>(MutexGuard<'a, VecDeque<Sample>>);

impl Samples<'_> {
    /// Keeps the totals `apps` read `now`, and forgets the samples the window no longer needs.
    pub(super) fn tick(&mut self, now: Instant, apps: Vec<AppReading>) {
        let apps = apps
            .into_iter()
            .map(|reading| {
                let recent = Recent::between(&reading, None);
                (reading.key(), recent)
            })
            .collect();
        self.0.push_back(Sample { at: now, apps });
        // Keep the newest sample that is at least a window old: it starts the current window.
        while self.0.len() > 1 && self.0[1].at + WINDOW <= now {
            self.0.pop_front();
        }
    }

    /// What changed within the window for each of `apps` (the totals read `now`), by key, and how long the window
    /// is (a little over [`WINDOW`], or the uptime while shorter).
    pub(super) fn recent(&self, apps: &[AppReading], now: Instant) -> (HashMap<String, Recent>, Duration) {
        let start = self.0.front().expect("the first sample is never removed alone");
        let recent = apps
            .iter()
            .map(|reading| {
                let key = reading.key();
                let recent = Recent::between(reading, start.apps.get(&key));
                (key, recent)
            })
            .collect();
        (recent, now.saturating_duration_since(start.at))
    }

    /// Moves the share of the versions `gone` (keys) to `into`, as their counters are folded into it, so that
    /// neither the totals nor the rates jump.
    pub(super) fn fold(&mut self, gone: &[String], into: &str) {
        for key in gone {
            for sample in self.0.iter_mut() {
                if let Some(then) = sample.apps.remove(key) {
                    sample.apps.entry(into.to_owned()).or_default().add(&then);
                }
            }
        }
    }

    /// Drops the oldest sample, as if the window had moved past it.
    #[cfg(test)]
    pub(super) fn pass_oldest(&mut self) {
        self.0.pop_front();
    }
}

/// Calls `tick` on `owner` every [`SAMPLE_INTERVAL`], from a task that ends once the last other handle to `owner`
/// is gone.
pub(super) fn spawn_sampler<T: Send + Sync + 'static>(owner: &Arc<T>, tick: fn(&T)) {
    let owner = Arc::downgrade(owner);
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + SAMPLE_INTERVAL, SAMPLE_INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let Some(owner) = owner.upgrade() else { break };
            tick(&owner);
        }
    });
}
