//! Exponential backoff with jitter: how long to wait before trying again,
//! for redialing peers (`net`) and retrying outbox entries (the engine).
//! Pure: the random sample is passed in, so that tests choose it.

use std::time::Duration;

/// Waits that double from `base` with each attempt up to `max`, then are
/// scaled by a random factor in [0.5, 1.5], so that nodes that failed
/// together do not all try again together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Backoff {
    pub(crate) base: Duration,
    pub(crate) max: Duration,
}

impl Backoff {
    pub(crate) fn new(base: Duration, max: Duration) -> Self {
        Self { base, max }
    }

    /// The wait after `attempt` earlier failures: `min(base * 2^attempt,
    /// max)` times `0.5 + jitter`, where `jitter` is a sample in [0, 1]
    /// ([`jitter`]; clamped into it).
    pub(crate) fn delay(&self, attempt: u32, jitter: f64) -> Duration {
        let factor = 1u32.checked_shl(attempt).unwrap_or(u32::MAX);
        let capped = self.base.saturating_mul(factor).min(self.max);
        let scale = 0.5 + jitter.clamp(0.0, 1.0);
        Duration::try_from_secs_f64(capped.as_secs_f64() * scale).unwrap_or(self.max)
    }
}

/// A uniform random sample in [0, 1) for [`Backoff::delay`].
pub(crate) fn jitter() -> f64 {
    let sample = getrandom::u32().unwrap_or(u32::MAX / 2);
    f64::from(sample) / (f64::from(u32::MAX) + 1.0)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{Backoff, jitter};

    /// The network's redial settings (`NetConfig`).
    const REDIAL: Backoff = Backoff {
        base: Duration::from_secs(1),
        max: Duration::from_secs(30),
    };
    /// The jitter sample that scales by 1: the delay before jitter.
    const NONE: f64 = 0.5;

    #[test]
    fn delay_doubles_up_to_the_cap() {
        let delays: Vec<Duration> = (0..40).map(|n| REDIAL.delay(n, NONE)).collect();
        assert_eq!(delays[0], REDIAL.base);
        assert_eq!(delays[1], 2 * REDIAL.base);
        assert_eq!(delays[4], 16 * REDIAL.base);
        assert!(delays.windows(2).all(|w| w[0] <= w[1]));
        assert!(delays.iter().all(|d| *d <= REDIAL.max));
        assert_eq!(delays[5], REDIAL.max);
        assert_eq!(REDIAL.delay(u32::MAX, NONE), REDIAL.max);
        // A cap too large for the doubling still saturates, never panics.
        let huge = Backoff::new(REDIAL.base, Duration::MAX).delay(u32::MAX, 1.0);
        assert!(huge >= REDIAL.base * u32::MAX);
    }

    #[test]
    fn jitter_stays_within_half_and_one_and_a_half() {
        for attempts in 0..10 {
            let plain = REDIAL.delay(attempts, NONE);
            for _ in 0..100 {
                let d = REDIAL.delay(attempts, jitter());
                assert!(d >= plain / 2 && d < plain * 3 / 2, "{d:?} vs {plain:?}");
            }
            assert_eq!(REDIAL.delay(attempts, 0.0), plain / 2);
            // Out-of-range samples are clamped.
            assert_eq!(REDIAL.delay(attempts, -0.5), plain / 2);
            assert_eq!(REDIAL.delay(attempts, 8.5), plain * 3 / 2);
        }
    }

    #[test]
    fn jitter_samples_are_in_range() {
        for _ in 0..1000 {
            let j = jitter();
            assert!((0.0..1.0).contains(&j), "{j}");
        }
    }

    /// The outbox's retry settings (`Settings`), in milliseconds.
    #[test]
    fn retries_back_off_to_the_cap_with_jitter() {
        let retry = Backoff::new(Duration::from_secs(2), Duration::from_secs(600));
        let ms = |attempt, jitter| retry.delay(attempt, jitter).as_millis();
        assert_eq!(ms(0, 0.5), 2_000);
        assert_eq!(ms(3, 0.5), 16_000);
        assert_eq!(ms(20, 0.5), 600_000);
        assert_eq!(ms(u32::MAX, 0.5), 600_000);
        assert_eq!(ms(1, 0.0), 2_000);
        assert_eq!(ms(1, 1.0), 6_000);
    }
}
