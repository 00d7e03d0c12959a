//! Hybrid logical clocks: the timestamps that order a conversation.
//!
//! An [`Hlc`] is a wall-clock millisecond in its high 48 bits and a
//! logical counter in its low 16, so timestamps compare as plain `u64`s.
//! A device's [`Clock`] never repeats or goes back, even when the wall
//! clock does, and moves past every timestamp it has seen, so a message
//! written after reading another sorts after it. A remote timestamp far
//! in the future is clamped before the clock takes it in: one peer's bad
//! clock cannot drag everyone's clocks (and message order) into the future.

use serde::{Deserialize, Serialize};

const LOGICAL_BITS: u32 = 16;
const LOGICAL_MAX: u64 = (1 << LOGICAL_BITS) - 1;

/// How far ahead of our wall clock a remote timestamp may be.
pub const MAX_SKEW_MS: u64 = 5 * 60 * 1000;

/// A hybrid logical timestamp.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Hlc(pub u64);

impl Hlc {
    pub fn new(ms: u64, logical: u16) -> Self {
        Hlc((ms << LOGICAL_BITS) | u64::from(logical))
    }

    /// The wall-clock part, in unix milliseconds.
    pub fn ms(self) -> u64 {
        self.0 >> LOGICAL_BITS
    }

    pub fn logical(self) -> u16 {
        (self.0 & LOGICAL_MAX) as u16
    }

    /// The latest timestamp within `wall_ms` + [`MAX_SKEW_MS`].
    pub fn clamped(self, wall_ms: u64) -> Self {
        let limit = Hlc::new(wall_ms.saturating_add(MAX_SKEW_MS), u16::MAX);
        self.min(limit)
    }
}

/// This device's clock.
#[derive(Clone, Debug, Default)]
pub struct Clock {
    last: Hlc,
}

impl Clock {
    /// A clock that resumes after `last` (the newest timestamp this device
    /// has written or seen, e.g. from the store after a restart).
    pub fn resume(last: Hlc) -> Self {
        Self { last }
    }

    /// A new timestamp for something this device writes now: later than
    /// everything before it.
    pub fn now(&mut self, wall_ms: u64) -> Hlc {
        let wall = Hlc::new(wall_ms, 0);
        self.last = if wall > self.last {
            wall
        } else {
            // The wall clock stood still or went back: count on. When the
            // logical part runs out, borrow the next millisecond.
            Hlc(self.last.0 + 1)
        };
        self.last
    }

    /// Takes in a remote timestamp (clamped to our wall clock plus the
    /// allowed skew) and returns the clamped value.
    pub fn observe(&mut self, remote: Hlc, wall_ms: u64) -> Hlc {
        let remote = remote.clamped(wall_ms);
        if remote > self.last {
            self.last = remote;
        }
        remote
    }

    pub fn last(&self) -> Hlc {
        self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parts_round_trip() {
        let t = Hlc::new(1_700_000_000_123, 7);
        assert_eq!(t.ms(), 1_700_000_000_123);
        assert_eq!(t.logical(), 7);
        assert!(Hlc::new(5, 0) > Hlc::new(4, u16::MAX));
    }

    #[test]
    fn a_stuck_wall_clock_still_moves_forward() {
        let mut c = Clock::default();
        let a = c.now(1000);
        let b = c.now(1000);
        let d = c.now(999);
        assert!(a < b && b < d);
        assert_eq!(b, Hlc::new(1000, 1));
    }

    #[test]
    fn a_far_future_peer_is_clamped() {
        let mut c = Clock::default();
        let seen = c.observe(Hlc::new(10_000_000_000, 3), 1000);
        assert_eq!(seen.ms(), 1000 + MAX_SKEW_MS);
        // Our next timestamp follows the clamped value, not the claim.
        let next = c.now(1001);
        assert!(next > seen);
        assert!(next.ms() <= 1000 + MAX_SKEW_MS + 1);
    }

    #[test]
    fn after_observing_we_sort_after() {
        let mut c = Clock::default();
        let remote = Hlc::new(2000, 4);
        c.observe(remote, 1000);
        assert!(c.now(1000) > remote);
    }

    #[test]
    fn a_full_logical_counter_borrows_the_next_millisecond() {
        let mut c = Clock::resume(Hlc::new(1000, u16::MAX));
        assert_eq!(c.now(1000), Hlc::new(1001, 0));
        assert_eq!(c.now(900), Hlc::new(1001, 1));
    }

    #[test]
    fn an_older_remote_timestamp_does_not_move_the_clock_back() {
        let mut c = Clock::default();
        let mine = c.now(5000);
        let old = Hlc::new(1000, 9);
        // Taken in as it is (it is not in the future)...
        assert_eq!(c.observe(old, 5000), old);
        // ...and the clock stays where it was.
        assert_eq!(c.last(), mine);
        assert!(c.now(5000) > mine);
    }

    #[test]
    fn clamping_only_touches_the_far_future() {
        let wall = 1000;
        let near = Hlc::new(wall + MAX_SKEW_MS, 5);
        assert_eq!(near.clamped(wall), near);
        let limit = Hlc::new(wall + MAX_SKEW_MS, u16::MAX);
        assert_eq!(limit.clamped(wall), limit);
        assert_eq!(Hlc::new(wall + MAX_SKEW_MS + 1, 0).clamped(wall), limit);
        assert_eq!(Hlc(u64::MAX).clamped(u64::MAX), Hlc(u64::MAX));
    }

    #[test]
    fn a_reply_from_a_slow_clock_sorts_after_what_it_answers() {
        // Alice's wall clock is ahead of Bob's by more than a minute; Bob
        // read her message before answering.
        let mut alice = Clock::default();
        let mut bob = Clock::default();
        let question = alice.now(100_000);
        bob.observe(question, 30_000);
        let answer = bob.now(30_000);
        assert!(answer > question);
        assert_eq!(answer, Hlc::new(100_000, 1));
    }

    #[test]
    fn two_devices_may_write_the_same_timestamp() {
        // Equal timestamps are possible across devices: the conversation
        // order breaks the tie by message id (`store::messages`), the
        // annotation documents by edit id (`weft-crdt`).
        let (mut a, mut b) = (Clock::default(), Clock::default());
        assert_eq!(a.now(1000), b.now(1000));
    }

    proptest! {
        // Whatever the wall clock and the peers do, a device's timestamps
        // strictly increase.
        #[test]
        fn timestamps_strictly_increase(
            steps in proptest::collection::vec((any::<bool>(), 0u64..5000, any::<u64>()), 1..200)
        ) {
            let mut c = Clock::default();
            let mut prev = Hlc(0);
            for (local, wall, remote) in steps {
                if local {
                    let t = c.now(wall);
                    prop_assert!(t > prev);
                    prev = t;
                } else {
                    let seen = c.observe(Hlc(remote), wall);
                    prop_assert!(seen.ms() <= wall + MAX_SKEW_MS);
                    prev = prev.max(seen);
                }
            }
        }
    }
}
