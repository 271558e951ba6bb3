//! [`RateMeter`]: the recent rate of a resync or verify for `status`,
//! `events` and the `--wait` progress bars.
//!
//! Owns the samples of one job's progress (bytes done at an instant). The
//! rate is over the last [`RATE_WINDOW`], as DRBD's sync speed is over its
//! last few sync marks: an average since the start would keep showing the
//! speed of minutes ago after `resync_rate` changed or application I/O took
//! the link, and would decay only slowly while a resync is paused.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// How far back the rate looks.
pub const RATE_WINDOW: Duration = Duration::from_secs(5);
/// How long a job must have been measured before it has a rate: over a
/// shorter span one resync request (128 KiB) reads as a burst of many
/// megabytes per second.
pub const MIN_RATE_SPAN: Duration = Duration::from_secs(1);
/// At most one sample per this interval (the node reports its status at
/// every resync step while one runs).
pub const MIN_SAMPLE_GAP: Duration = Duration::from_millis(100);

/// Progress samples of one job, oldest first.
#[derive(Debug, Default)]
pub struct RateMeter {
    samples: VecDeque<(Instant, u64)>,
}

impl RateMeter {
    /// Forgets the job (it ended); the next sample starts a new one.
    pub fn reset(&mut self) {
        self.samples.clear();
    }

    /// Records `done` bytes at `now` and returns the bytes per second over
    /// the last [`RATE_WINDOW`] (over the time since the first sample while
    /// the job is younger; 0, unknown, before [`MIN_RATE_SPAN`]).
    pub fn sample(&mut self, now: Instant, done: u64) -> u64 {
        if self.samples.back().is_some_and(|&(_, d)| done < d) {
            // Progress went back: a new job under the same name.
            self.samples.clear();
        }
        if self
            .samples
            .back()
            .is_none_or(|&(t, _)| now.duration_since(t) >= MIN_SAMPLE_GAP)
        {
            self.samples.push_back((now, done));
        }
        // Keep the newest sample at least RATE_WINDOW old as the start.
        while self
            .samples
            .get(1)
            .is_some_and(|&(t, _)| now.duration_since(t) >= RATE_WINDOW)
        {
            self.samples.pop_front();
        }
        let (t0, d0) = self.samples[0];
        let span = now.duration_since(t0);
        if span < MIN_RATE_SPAN {
            return 0;
        }
        let ms = span.as_millis();
        let per_s = u128::from(done - d0) * 1000 / ms;
        u64::try_from(per_s).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn rate_is_over_the_last_window_not_since_the_start() {
        // Proves the window: 10 s at 10 MiB/s then 10 s at 50 MiB/s reads
        // 50 MiB/s at the end (since the start it would be 30).
        let t0 = Instant::now();
        let mut m = RateMeter::default();
        let mut done = 0;
        assert_eq!(m.sample(t0, done), 0, "no rate at the first sample");
        for step in 1..=100 {
            done += MIB; // 10 MiB/s in 100 ms steps
            m.sample(t0 + Duration::from_millis(100 * step), done);
        }
        let mut rate = 0;
        for step in 101..=200 {
            done += 5 * MIB; // 50 MiB/s
            rate = m.sample(t0 + Duration::from_millis(100 * step), done);
        }
        assert_eq!(rate, 50 * MIB);
        assert!(
            m.samples.len() <= 52,
            "samples stay bounded: {}",
            m.samples.len()
        );
    }

    #[test]
    fn a_stalled_job_falls_to_zero_within_the_window() {
        // Proves a pause shows: no progress for a window reads 0.
        let t0 = Instant::now();
        let mut m = RateMeter::default();
        m.sample(t0, 0);
        assert_eq!(m.sample(t0 + Duration::from_secs(2), 40 * MIB), 20 * MIB);
        let stalled = t0 + Duration::from_secs(2) + RATE_WINDOW;
        assert_eq!(m.sample(stalled, 40 * MIB), 0);
    }

    #[test]
    fn frequent_samples_stay_few_and_the_window_still_moves() {
        // Proves a status at every resync step (one per millisecond here)
        // keeps few samples, and the rate still follows a change: 10 s at
        // 10 MB/s then 10 s at 50 MB/s reads 50 MB/s at the end.
        let t0 = Instant::now();
        let mut m = RateMeter::default();
        let (mut done, mut rate) = (0, 0);
        for ms in 0..20_000u64 {
            done += if ms < 10_000 { 10_000 } else { 50_000 };
            rate = m.sample(t0 + Duration::from_millis(ms + 1), done);
            assert!(
                m.samples.len() <= 52,
                "{} samples at {ms} ms",
                m.samples.len()
            );
        }
        assert_eq!(rate, 50_000_000);
    }

    #[test]
    fn no_rate_before_a_second_of_progress_was_measured() {
        // Proves the first request of a resync does not read as a burst:
        // 128 KiB in 20 ms is not a rate of 6.4 MB/s.
        let t0 = Instant::now();
        let mut m = RateMeter::default();
        m.sample(t0, 0);
        assert_eq!(m.sample(t0 + Duration::from_millis(20), 128 * 1024), 0);
        assert_eq!(m.sample(t0 + Duration::from_millis(999), 512 * 1024), 0);
        assert_eq!(m.sample(t0 + MIN_RATE_SPAN, MIB), MIB);
    }

    #[test]
    fn progress_going_back_or_a_reset_starts_a_new_job() {
        let t0 = Instant::now();
        let mut m = RateMeter::default();
        m.sample(t0, 0);
        m.sample(t0 + Duration::from_secs(1), 100 * MIB);
        assert_eq!(m.sample(t0 + Duration::from_secs(2), MIB), 0, "new job");
        assert_eq!(m.sample(t0 + Duration::from_secs(3), 11 * MIB), 10 * MIB);
        m.reset();
        assert_eq!(m.sample(t0 + Duration::from_secs(4), 50 * MIB), 0);
    }
}
