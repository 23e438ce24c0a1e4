//! Process-wide timing counters for `qpert bench`: a [`TimeCounter`] is a static that the code doing
//! some work (image preprocessing, eigendecompositions, model loading, ITC scoring, ITM) adds its wall time to,
//! and that the benchmark reads before and after a stage. A relaxed atomic add per timed call, so
//! they stay on in every build.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Accumulated wall time (nanoseconds) of some piece of work.
pub struct TimeCounter(AtomicU64);

impl TimeCounter {
    /// A counter at zero.
    pub const fn new() -> Self {
        TimeCounter(AtomicU64::new(0))
    }

    /// Runs `work`, adding its wall time to the counter.
    pub fn time<R>(&self, work: impl FnOnce() -> R) -> R {
        let start = Instant::now();
        let result = work();
        self.add(start.elapsed());
        result
    }

    /// Adds `elapsed` (for work that does not fit in a closure).
    pub fn add(&self, elapsed: std::time::Duration) {
        self.0.fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
    }

    /// The total so far, in seconds.
    pub fn seconds(&self) -> f64 {
        self.0.load(Ordering::Relaxed) as f64 * 1e-9
    }
}

impl Default for TimeCounter {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_adds_the_wall_time_and_returns_the_result() {
        let counter = TimeCounter::new();
        let value = counter.time(|| {
            std::thread::sleep(std::time::Duration::from_millis(5));
            7
        });
        assert_eq!(value, 7);
        assert!(counter.seconds() >= 0.005 && counter.seconds() < 1.0, "{}", counter.seconds());
    }
}
