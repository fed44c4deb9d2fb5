//! Request latency as a histogram of fixed buckets: recorded with two atomic adds, read without stopping writers.
//!
//! The bounds run from 1 µs to 100 s in steps of 1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8 per decade, so a percentile
//! read from them is within one step (at most 25%) of the truth, and every conventional Prometheus bucket bound
//! (5 ms, 25 ms, 2.5 s, ...) is one of them: the exported histogram is exact, not re-binned.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Mantissas of the bounds within a decade, times ten.
const STEPS: [u64; 11] = [10, 12, 15, 20, 25, 30, 40, 50, 60, 70, 80];
/// Decades covered, from 1 µs (1 µs .. 8 µs is the first).
const DECADES: usize = 8;
/// Upper bounds, in nanoseconds, of every bucket but the last (which has none).
pub(crate) const BOUNDS: usize = STEPS.len() * DECADES + 1;
pub(crate) const BUCKETS: usize = BOUNDS + 1;

/// The bucket bounds in nanoseconds: 1 µs, 1.2 µs, 1.5 µs ... 80 s, 100 s.
pub(crate) const BOUNDS_NS: [u64; BOUNDS] = bounds();

const fn bounds() -> [u64; BOUNDS] {
    let mut bounds = [0; BOUNDS];
    let mut scale = 100; // 10 (the first step) x 100 ns = 1 µs
    let mut decade = 0;
    while decade < DECADES {
        let mut step = 0;
        while step < STEPS.len() {
            bounds[decade * STEPS.len() + step] = STEPS[step] * scale;
            step += 1;
        }
        scale *= 10;
        decade += 1;
    }
    bounds[BOUNDS - 1] = 10 * scale;
    bounds
}

/// A histogram that many threads record into at once. The buckets are inline, so a histogram kept per serving
/// core is part of its core's allocation, not a second one that may sit beside another core's.
pub(crate) struct Histogram {
    buckets: [AtomicU64; BUCKETS],
    sum_ns: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_ns: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub(crate) fn record(&self, elapsed: Duration) {
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let bucket = BOUNDS_NS.partition_point(|&bound| bound < ns);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Adds counts taken from another histogram (a retired version's, folded into the retired total).
    pub(crate) fn absorb(&self, counts: &Counts) {
        for (bucket, count) in self.buckets.iter().zip(&counts.buckets) {
            bucket.fetch_add(*count, Ordering::Relaxed);
        }
        self.sum_ns.fetch_add(counts.sum_ns, Ordering::Relaxed);
    }

    /// The counts so far. Writers are not stopped, so a count and the sum may be one request apart.
    pub(crate) fn counts(&self) -> Counts {
        Counts {
            buckets: self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect(),
            sum_ns: self.sum_ns.load(Ordering::Relaxed),
        }
    }
}

/// A histogram's counts at one moment (or the difference between two moments).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Counts {
    /// Per bucket, not cumulative.
    pub(crate) buckets: Vec<u64>,
    pub(crate) sum_ns: u64,
}

impl Default for Counts {
    fn default() -> Self {
        Counts {
            buckets: vec![0; BUCKETS],
            sum_ns: 0,
        }
    }
}

impl Counts {
    pub(crate) fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// What was recorded after `earlier`.
    pub(crate) fn since(&self, earlier: &Counts) -> Counts {
        Counts {
            buckets: self
                .buckets
                .iter()
                .zip(&earlier.buckets)
                .map(|(now, then)| now.saturating_sub(*then))
                .collect(),
            sum_ns: self.sum_ns.saturating_sub(earlier.sum_ns),
        }
    }

    pub(crate) fn add(&mut self, other: &Counts) {
        for (mine, theirs) in self.buckets.iter_mut().zip(&other.buckets) {
            *mine += theirs;
        }
        self.sum_ns += other.sum_ns;
    }

    /// The `q` quantile (0..=1) in seconds, interpolated within its bucket; `None` when nothing was recorded.
    pub(crate) fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = (q.clamp(0.0, 1.0) * total as f64).max(1.0);
        let mut below = 0u64;
        for (i, &count) in self.buckets.iter().enumerate() {
            if count > 0 && (below + count) as f64 >= rank {
                let lower = if i == 0 { 0 } else { BOUNDS_NS[i - 1] };
                // The last bucket has no upper bound: report its lower one rather than invent a figure.
                let upper = BOUNDS_NS.get(i).copied().unwrap_or(lower);
                let within = (rank - below as f64) / count as f64;
                return Some((lower as f64 + within * (upper - lower) as f64) / 1e9);
            }
            below += count;
        }
        None
    }

    pub(crate) fn mean(&self) -> Option<f64> {
        let count = self.count();
        (count > 0).then(|| self.sum_ns as f64 / count as f64 / 1e9)
    }

    /// How many recordings were at most `bound_ns` (which must be one of [`BOUNDS_NS`]).
    pub(crate) fn at_most(&self, bound_ns: u64) -> u64 {
        let last = BOUNDS_NS.partition_point(|&bound| bound <= bound_ns);
        self.buckets[..last].iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_rise_from_one_microsecond_to_a_hundred_seconds() {
        assert_eq!(BOUNDS_NS[0], 1_000);
        assert_eq!(BOUNDS_NS[BOUNDS - 1], 100_000_000_000);
        assert!(BOUNDS_NS.windows(2).all(|pair| pair[0] < pair[1]));
    }

    #[test]
    fn a_recording_on_a_bound_counts_as_at_most_that_bound() {
        let histogram = Histogram::default();
        histogram.record(Duration::from_millis(5));
        histogram.record(Duration::from_nanos(5_000_001));
        let counts = histogram.counts();
        assert_eq!(counts.at_most(5_000_000), 1);
        assert_eq!(counts.at_most(6_000_000), 2);
        assert_eq!(counts.count(), 2);
    }

    #[test]
    fn quantiles_land_within_one_bucket_of_the_truth() {
        let histogram = Histogram::default();
        for ms in 1..=100 {
            histogram.record(Duration::from_millis(ms));
        }
        let counts = histogram.counts();
        let p50 = counts.quantile(0.5).unwrap();
        let p99 = counts.quantile(0.99).unwrap();
        assert!((0.040..=0.060).contains(&p50), "p50 {p50}");
        assert!((0.080..=0.100).contains(&p99), "p99 {p99}");
        assert!((counts.mean().unwrap() - 0.0505).abs() < 1e-9);
        assert_eq!(Counts::default().quantile(0.5), None);
    }

    #[test]
    fn a_difference_holds_only_what_came_after() {
        let histogram = Histogram::default();
        histogram.record(Duration::from_millis(1));
        let before = histogram.counts();
        histogram.record(Duration::from_secs(2));
        let since = histogram.counts().since(&before);
        assert_eq!(since.count(), 1);
        assert!(since.quantile(0.5).unwrap() > 1.5);
    }

    #[test]
    fn a_recording_past_the_last_bound_is_kept_and_reported_at_that_bound() {
        let histogram = Histogram::default();
        histogram.record(Duration::from_secs(1000));
        assert_eq!(histogram.counts().quantile(0.99), Some(100.0));
    }
}
