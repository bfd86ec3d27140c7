//! Restart strategies, as Flink has them: after an attempt fails, how long
//! the job waits before the next one, and when it gives up. The default
//! never loops hot: delays grow exponentially, and a job that keeps failing
//! without completing a checkpoint stops with a typed error.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// When and how often a failed job is restarted.
#[derive(Debug, Clone, PartialEq)]
pub enum RestartStrategy {
    /// The first failure fails the job.
    NoRestart,
    /// At most `attempts` restarts over the job's life, `delay` apart.
    FixedDelay {
        /// Restarts allowed in all.
        attempts: u32,
        /// Wait before each restart.
        delay: Duration,
    },
    /// Waits `initial`, then `multiplier` times longer after each failure
    /// up to `max`, each wait moved by up to ±`jitter` of itself. A
    /// completed checkpoint is progress: it resets the wait to `initial`
    /// and the count of failures in a row. The job fails after `attempts`
    /// failures in a row with no checkpoint completed between them.
    ExponentialDelay {
        /// The first wait.
        initial: Duration,
        /// The longest wait.
        max: Duration,
        /// How much longer each wait is than the one before (≥ 1).
        multiplier: f64,
        /// The fraction of a wait added or taken at random (0 to 1).
        jitter: f64,
        /// Failures in a row, without progress, before the job fails.
        attempts: u32,
    },
    /// The job fails when more than `max_failures` failures fall within
    /// any `interval`; `delay` before each restart.
    FailureRate {
        /// Failures tolerated within `interval`.
        max_failures: u32,
        /// The sliding window.
        interval: Duration,
        /// Wait before each restart.
        delay: Duration,
    },
}

impl Default for RestartStrategy {
    /// Exponential delay from 100 ms up to 10 s (×2, ±10% jitter), failing
    /// the job after 10 failures in a row without a completed checkpoint.
    fn default() -> Self {
        RestartStrategy::ExponentialDelay {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
            multiplier: 2.0,
            jitter: 0.1,
            attempts: 10,
        }
    }
}

impl RestartStrategy {
    /// Fixed delay: `attempts` restarts, `delay` apart.
    pub fn fixed(attempts: u32, delay: Duration) -> Self {
        RestartStrategy::FixedDelay { attempts, delay }
    }
}

/// A strategy's running account of one job's failures.
#[derive(Debug)]
pub struct Restarts {
    strategy: RestartStrategy,
    total: u32,
    in_a_row: u32,
    next_delay: Option<Duration>,
    recent: VecDeque<Instant>,
    seed: u64,
}

impl Restarts {
    /// No failures yet.
    pub fn new(strategy: RestartStrategy) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0x9e37_79b9, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id());
        Restarts {
            strategy,
            total: 0,
            in_a_row: 0,
            next_delay: None,
            recent: VecDeque::new(),
            seed,
        }
    }

    /// The strategy.
    pub fn strategy(&self) -> &RestartStrategy {
        &self.strategy
    }

    /// Failures so far.
    pub fn failures(&self) -> u32 {
        self.total
    }

    /// A checkpoint completed: the job is making progress.
    pub fn progress(&mut self) {
        self.in_a_row = 0;
        self.next_delay = None;
    }

    /// An attempt failed at `now`: the wait before the next attempt, or
    /// `None` when the strategy gives up.
    pub fn failed(&mut self, now: Instant) -> Option<Duration> {
        self.total += 1;
        self.in_a_row += 1;
        match self.strategy.clone() {
            RestartStrategy::NoRestart => None,
            RestartStrategy::FixedDelay { attempts, delay } => {
                (self.total <= attempts).then_some(delay)
            }
            RestartStrategy::ExponentialDelay {
                initial,
                max,
                multiplier,
                jitter,
                attempts,
            } => {
                if self.in_a_row > attempts {
                    return None;
                }
                let delay = self.next_delay.unwrap_or(initial).min(max);
                self.next_delay = Some(delay.mul_f64(multiplier.max(1.0)).min(max));
                let jitter = jitter.clamp(0.0, 1.0);
                let spread = (self.random() * 2.0 - 1.0) * jitter;
                Some(delay.mul_f64(1.0 + spread))
            }
            RestartStrategy::FailureRate {
                max_failures,
                interval,
                delay,
            } => {
                self.recent.push_back(now);
                while self
                    .recent
                    .front()
                    .is_some_and(|t| now.duration_since(*t) > interval)
                {
                    self.recent.pop_front();
                }
                (self.recent.len() as u64 <= u64::from(max_failures)).then_some(delay)
            }
        }
    }

    /// A number in [0, 1) (splitmix64; jitter needs no better).
    fn random(&mut self) -> f64 {
        self.seed = self.seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_delay_gives_up_after_its_attempts() {
        let mut r = Restarts::new(RestartStrategy::fixed(2, Duration::from_millis(5)));
        let now = Instant::now();
        assert_eq!(r.failed(now), Some(Duration::from_millis(5)));
        r.progress();
        assert_eq!(r.failed(now), Some(Duration::from_millis(5)));
        assert_eq!(r.failed(now), None, "a third failure is one too many");
    }

    #[test]
    fn exponential_delay_grows_to_its_cap_and_progress_resets_it() {
        let mut r = Restarts::new(RestartStrategy::ExponentialDelay {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(350),
            multiplier: 2.0,
            jitter: 0.0,
            attempts: 4,
        });
        let now = Instant::now();
        let delays: Vec<Option<Duration>> = (0..5).map(|_| r.failed(now)).collect();
        assert_eq!(
            delays,
            vec![
                Some(Duration::from_millis(100)),
                Some(Duration::from_millis(200)),
                Some(Duration::from_millis(350)),
                Some(Duration::from_millis(350)),
                None,
            ]
        );
        let mut r = Restarts::new(RestartStrategy::ExponentialDelay {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
            multiplier: 2.0,
            jitter: 0.0,
            attempts: 2,
        });
        for _ in 0..10 {
            assert_eq!(r.failed(now), Some(Duration::from_millis(100)));
            assert_eq!(r.failed(now), Some(Duration::from_millis(200)));
            r.progress();
        }
        assert_eq!(r.failures(), 20, "progress keeps a failing job alive");
    }

    #[test]
    fn jitter_stays_within_its_fraction() {
        let mut r = Restarts::new(RestartStrategy::ExponentialDelay {
            initial: Duration::from_millis(1000),
            max: Duration::from_millis(1000),
            multiplier: 1.0,
            jitter: 0.1,
            attempts: u32::MAX,
        });
        let now = Instant::now();
        let delays: Vec<Duration> = (0..200).filter_map(|_| r.failed(now)).collect();
        assert_eq!(delays.len(), 200);
        assert!(delays
            .iter()
            .all(|d| *d >= Duration::from_millis(900) && *d <= Duration::from_millis(1100)));
        assert!(
            delays.iter().any(|d| *d != delays[0]),
            "jitter spreads restarts"
        );
    }

    #[test]
    fn failure_rate_counts_failures_within_its_interval() {
        let mut r = Restarts::new(RestartStrategy::FailureRate {
            max_failures: 2,
            interval: Duration::from_secs(10),
            delay: Duration::from_millis(1),
        });
        let t0 = Instant::now();
        assert!(r.failed(t0).is_some());
        assert!(r.failed(t0 + Duration::from_secs(1)).is_some());
        assert!(
            r.failed(t0 + Duration::from_secs(12)).is_some(),
            "the first failure left the window"
        );
        assert!(r.failed(t0 + Duration::from_secs(13)).is_some());
        assert!(
            r.failed(t0 + Duration::from_secs(14)).is_none(),
            "three within ten seconds"
        );
    }

    #[test]
    fn no_restart_fails_at_once() {
        assert_eq!(
            Restarts::new(RestartStrategy::NoRestart).failed(Instant::now()),
            None
        );
    }
}
