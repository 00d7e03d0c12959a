//! Sender-key chains. Each device has one sending chain per conversation
//! and epoch; every member device holds a receiving copy of it.
//!
//! `chain_key[i+1] = BLAKE3-keyed(chain_key[i], 0x02)`; the message key and
//! nonce for counter `i` are the first 56 bytes of
//! `BLAKE3-keyed-XOF(chain_key[i], 0x01)`. Old chain keys are overwritten
//! (forward secrecy). A receiver may skip ahead at most [`MAX_SKIP`] and
//! keeps at most [`MAX_SKIPPED_KEYS`] skipped keys, so a hostile counter
//! costs neither memory nor much time. For a skipped counter it keeps the
//! message key alone (a chain key would derive every later key too),
//! stamped with when it was skipped, and forgets it after a max age the
//! caller passes in with the time: this module reads no clock.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop};

use super::CryptoError;

/// How far ahead of the next expected counter an envelope may be.
pub const MAX_SKIP: u64 = 2_000;
/// Most skipped message keys a receiving chain remembers (oldest dropped).
pub const MAX_SKIPPED_KEYS: usize = 4_000;

/// The key and nonce for one message.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct MessageKey {
    pub key: [u8; 32],
    pub nonce: [u8; 24],
}

impl std::fmt::Debug for MessageKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MessageKey(..)")
    }
}

fn message_key(chain_key: &[u8; 32]) -> MessageKey {
    let mut out = [0u8; 56];
    blake3::Hasher::new_keyed(chain_key)
        .update(&[0x01])
        .finalize_xof()
        .fill(&mut out);
    let mut mk = MessageKey {
        key: [0; 32],
        nonce: [0; 24],
    };
    mk.key.copy_from_slice(&out[..32]);
    mk.nonce.copy_from_slice(&out[32..]);
    out.zeroize();
    mk
}

fn next_chain_key(chain_key: &[u8; 32]) -> [u8; 32] {
    *blake3::keyed_hash(chain_key, &[0x02]).as_bytes()
}

/// The chain a device encrypts its own messages with.
#[derive(Clone, Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
pub struct SendingChain {
    chain_key: [u8; 32],
    counter: u64,
}

impl std::fmt::Debug for SendingChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SendingChain(counter={})", self.counter)
    }
}

impl SendingChain {
    pub fn new(chain_key: [u8; 32]) -> Self {
        Self {
            chain_key,
            counter: 0,
        }
    }

    /// What a member needs to read from here on: the current key and counter.
    pub fn distribution(&self) -> ([u8; 32], u64) {
        (self.chain_key, self.counter)
    }

    pub fn counter(&self) -> u64 {
        self.counter
    }

    /// The next message key and its counter; the chain moves on and the
    /// used chain key is forgotten.
    pub fn step(&mut self) -> Result<(u64, MessageKey), CryptoError> {
        let counter = self.counter;
        let next = counter.checked_add(1).ok_or(CryptoError::ChainExhausted)?;
        let mk = message_key(&self.chain_key);
        self.chain_key = next_chain_key(&self.chain_key);
        self.counter = next;
        Ok((counter, mk))
    }

    /// The chain as it will be `n` messages from now, without the message
    /// keys in between. Stored as a reservation: after a crash the device
    /// resumes there, so no counter below it is ever used twice.
    pub fn advanced(&self, n: u64) -> Result<Self, CryptoError> {
        let counter = self
            .counter
            .checked_add(n)
            .ok_or(CryptoError::ChainExhausted)?;
        let mut chain_key = self.chain_key;
        for _ in 0..n {
            chain_key = next_chain_key(&chain_key);
        }
        Ok(Self { chain_key, counter })
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        postcard::to_stdvec(self).unwrap_or_default()
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CryptoError> {
        postcard::from_bytes(bytes).map_err(|_| CryptoError::Malformed("sending chain state"))
    }
}

/// One skipped message's key and nonce, kept until its message arrives,
/// it expires, or the count bound drops it. Only the message key is kept:
/// a chain key would derive every later key too.
#[derive(Clone, Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
struct SkippedKey {
    key: [u8; 32],
    nonce: [u8; 24],
    /// When the chain moved past its counter (unix ms, the caller's clock).
    skipped_at_ms: i64,
}

impl SkippedKey {
    fn of(chain_key: &[u8; 32], now_ms: i64) -> Self {
        let mk = message_key(chain_key);
        Self {
            key: mk.key,
            nonce: mk.nonce,
            skipped_at_ms: now_ms,
        }
    }

    /// Older than `max_age` at `now_ms`. A key stamped in the future (the
    /// clock went back) counts as new.
    fn expired(&self, now_ms: i64, max_age: Duration) -> bool {
        let max_age_ms = i64::try_from(max_age.as_millis()).unwrap_or(i64::MAX);
        now_ms.saturating_sub(self.skipped_at_ms) > max_age_ms
    }

    fn message_key(&self) -> MessageKey {
        MessageKey {
            key: self.key,
            nonce: self.nonce,
        }
    }
}

/// What starts a stored receiving chain in the current format. A state of
/// the first format starts with its chain key instead (a 2^-64 chance of
/// matching, after which it must also parse in full as this format).
const STATE_MAGIC: &[u8; 8] = b"weft rc2";

/// A member's copy of another device's sending chain: the chain key of
/// the next expected counter, and the message keys of counters skipped.
#[derive(Clone, Serialize, Deserialize)]
pub struct ReceivingChain {
    chain_key: [u8; 32],
    next: u64,
    skipped: BTreeMap<u64, SkippedKey>,
    /// When a newer epoch of the same sender was first seen (unix ms):
    /// from then on only envelopes already on the way use this chain.
    replaced_at_ms: Option<i64>,
}

/// The stored format before message keys: skipped entries held chain
/// keys. Read only, to convert.
#[derive(Deserialize)]
struct LegacyReceivingChain {
    chain_key: [u8; 32],
    next: u64,
    skipped: BTreeMap<u64, [u8; 32]>,
}

impl Drop for LegacyReceivingChain {
    fn drop(&mut self) {
        self.chain_key.zeroize();
        for key in self.skipped.values_mut() {
            key.zeroize();
        }
    }
}

impl std::fmt::Debug for ReceivingChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ReceivingChain(next={}, skipped={})",
            self.next,
            self.skipped.len()
        )
    }
}

impl Drop for ReceivingChain {
    fn drop(&mut self) {
        // The skipped keys zeroize themselves.
        self.chain_key.zeroize();
    }
}

impl ReceivingChain {
    pub fn new(chain_key: [u8; 32], next: u64) -> Self {
        Self {
            chain_key,
            next,
            skipped: BTreeMap::new(),
            replaced_at_ms: None,
        }
    }

    pub fn next_counter(&self) -> u64 {
        self.next
    }

    /// How many skipped message keys it holds.
    pub fn skipped_len(&self) -> usize {
        self.skipped.len()
    }

    /// The message key for `counter`, without changing the chain: returns
    /// the chain as it must be once the message is authenticated. Callers
    /// keep the new state only after decryption succeeds, so a forged
    /// envelope cannot advance or burn keys.
    ///
    /// `now_ms` stamps the keys skipped now; a skipped key older than
    /// `max_age` no longer opens its message, and the returned state holds
    /// none such.
    pub fn key_for(
        &self,
        counter: u64,
        now_ms: i64,
        max_age: Duration,
    ) -> Result<(MessageKey, Option<ReceivingChain>), CryptoError> {
        if counter < self.next {
            let skipped = self
                .skipped
                .get(&counter)
                .ok_or(CryptoError::Replay(counter))?;
            if skipped.expired(now_ms, max_age) {
                return Err(CryptoError::SkippedKeyExpired(counter));
            }
            let mk = skipped.message_key();
            let mut after = self.clone();
            // Dropped entries zeroize themselves.
            after.skipped.remove(&counter);
            after.expire(now_ms, max_age);
            return Ok((mk, Some(after)));
        }
        let ahead = counter - self.next;
        if ahead > MAX_SKIP {
            return Err(CryptoError::TooFarAhead {
                counter,
                ahead,
                max: MAX_SKIP,
            });
        }
        let mut after = if ahead == 0 {
            // The common case: no keys to skip, no clone of the chain key.
            Self {
                chain_key: self.chain_key,
                next: self.next,
                skipped: self.skipped.clone(),
                replaced_at_ms: self.replaced_at_ms,
            }
        } else {
            let mut after = self.clone();
            while after.next < counter {
                after
                    .skipped
                    .insert(after.next, SkippedKey::of(&after.chain_key, now_ms));
                after.step();
            }
            while after.skipped.len() > MAX_SKIPPED_KEYS {
                after.skipped.pop_first();
            }
            after
        };
        let mk = message_key(&after.chain_key);
        after.step();
        after.expire(now_ms, max_age);
        Ok((mk, Some(after)))
    }

    /// Moves the chain key one counter on, overwriting the old one.
    fn step(&mut self) {
        let mut next = next_chain_key(&self.chain_key);
        self.chain_key.copy_from_slice(&next);
        next.zeroize();
        self.next += 1;
    }

    /// Forgets the skipped keys older than `max_age` at `now_ms`; whether
    /// any went.
    pub fn expire(&mut self, now_ms: i64, max_age: Duration) -> bool {
        if self.skipped.is_empty() {
            return false;
        }
        let before = self.skipped.len();
        self.skipped.retain(|_, k| !k.expired(now_ms, max_age));
        self.skipped.len() != before
    }

    /// Notes that a newer epoch of the same sender is here, at `now_ms`
    /// unless it was noted before; whether that is new.
    pub fn mark_replaced(&mut self, now_ms: i64) -> bool {
        if self.replaced_at_ms.is_some() {
            return false;
        }
        self.replaced_at_ms = Some(now_ms);
        true
    }

    /// Replaced by a newer epoch more than `max_age` before `now_ms`:
    /// its sender sends in it no more, and what was on the way has had
    /// as long as a skipped key lives. The chain is dead.
    pub fn replaced_longer_than(&self, now_ms: i64, max_age: Duration) -> bool {
        let max_age_ms = i64::try_from(max_age.as_millis()).unwrap_or(i64::MAX);
        self.replaced_at_ms
            .is_some_and(|at| now_ms.saturating_sub(at) > max_age_ms)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        // Sized up front: a growing buffer would leave copies of keys in
        // freed memory. (Bound: magic, key, varints, and per skipped key a
        // counter, key, nonce and time.)
        let mut out = Vec::with_capacity(8 + 32 + 40 + self.skipped.len() * 76);
        out.extend_from_slice(STATE_MAGIC);
        postcard::to_extend(self, out).unwrap_or_default()
    }

    /// Reads a stored state, of this format or the first one. A state of
    /// the first format held the chain keys of skipped counters; they are
    /// turned into message keys here (stamped `now_ms`: their real age is
    /// unknown, so they get the full max age from now) and the chain keys
    /// are forgotten, so every message readable before still is.
    pub fn from_bytes(bytes: &[u8], now_ms: i64) -> Result<Self, CryptoError> {
        if let Some(rest) = bytes.strip_prefix(STATE_MAGIC.as_slice())
            && let Ok(chain) = postcard::from_bytes::<Self>(rest)
        {
            return Ok(chain);
        }
        let legacy: LegacyReceivingChain = postcard::from_bytes(bytes)
            .map_err(|_| CryptoError::Malformed("receiving chain state"))?;
        Ok(Self {
            chain_key: legacy.chain_key,
            next: legacy.next,
            skipped: legacy
                .skipped
                .iter()
                .map(|(counter, chain_key)| (*counter, SkippedKey::of(chain_key, now_ms)))
                .collect(),
            replaced_at_ms: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX_AGE: Duration = Duration::from_secs(30 * 24 * 3600);
    const NOW: i64 = 1_800_000_000_000;

    fn take_at(
        r: &mut ReceivingChain,
        counter: u64,
        now_ms: i64,
    ) -> Result<MessageKey, CryptoError> {
        let (mk, after) = r.key_for(counter, now_ms, MAX_AGE)?;
        if let Some(after) = after {
            *r = after;
        }
        Ok(mk)
    }

    fn take(r: &mut ReceivingChain, counter: u64) -> Result<MessageKey, CryptoError> {
        take_at(r, counter, NOW)
    }

    #[test]
    fn receiver_follows_sender_in_and_out_of_order() {
        let mut s = SendingChain::new([3; 32]);
        let (ck, at) = s.distribution();
        let mut r = ReceivingChain::new(ck, at);
        let keys: Vec<_> = (0..10).map(|_| s.step().unwrap()).collect();
        for i in [0usize, 3, 1, 2, 9, 4, 8, 5, 7, 6] {
            let got = take(&mut r, keys[i].0).unwrap();
            assert_eq!(got.key, keys[i].1.key);
            assert_eq!(got.nonce, keys[i].1.nonce);
        }
        // Every key is usable once.
        assert_eq!(take(&mut r, 4).unwrap_err(), CryptoError::Replay(4));
    }

    #[test]
    fn hostile_counter_is_refused_cheaply() {
        let r = ReceivingChain::new([1; 32], 0);
        assert!(matches!(
            r.key_for(u64::MAX, NOW, MAX_AGE),
            Err(CryptoError::TooFarAhead { .. })
        ));
        assert!(matches!(
            r.key_for(MAX_SKIP + 1, NOW, MAX_AGE),
            Err(CryptoError::TooFarAhead { .. })
        ));
        assert!(r.key_for(MAX_SKIP, NOW, MAX_AGE).is_ok());
    }

    #[test]
    fn skipped_keys_are_bounded() {
        let mut r = ReceivingChain::new([1; 32], 0);
        for round in 1..=5u64 {
            take(&mut r, round * MAX_SKIP).unwrap();
        }
        assert_eq!(r.skipped.len(), MAX_SKIPPED_KEYS);
        // The oldest went first: nothing skipped in the first two rounds
        // is left.
        assert!(r.skipped.keys().all(|&counter| counter > 2 * MAX_SKIP));
    }

    #[test]
    fn keys_differ_per_message_and_chain_moves_forward() {
        let mut s = SendingChain::new([5; 32]);
        let (_, a) = s.step().unwrap();
        let (_, b) = s.step().unwrap();
        assert_ne!(a.key, b.key);
        // The distribution after sending does not reveal earlier keys.
        let (ck, at) = s.distribution();
        let r = ReceivingChain::new(ck, at);
        assert_eq!(
            r.key_for(0, NOW, MAX_AGE).unwrap_err(),
            CryptoError::Replay(0)
        );
    }

    #[test]
    fn advanced_chain_continues_where_stepping_would() {
        let mut a = SendingChain::new([4; 32]);
        let b = a.advanced(5).unwrap();
        for _ in 0..5 {
            a.step().unwrap();
        }
        assert_eq!(a.to_bytes(), b.to_bytes());
    }

    #[test]
    fn state_round_trips() {
        let mut s = SendingChain::new([9; 32]);
        s.step().unwrap();
        let s2 = SendingChain::from_bytes(&s.to_bytes()).unwrap();
        assert_eq!(s2.counter(), 1);
        let r = ReceivingChain::new([9; 32], 7);
        assert_eq!(
            ReceivingChain::from_bytes(&r.to_bytes(), NOW)
                .unwrap()
                .next_counter(),
            7
        );
        assert!(ReceivingChain::from_bytes(&[1, 2], NOW).is_err());
        assert!(ReceivingChain::from_bytes(STATE_MAGIC, NOW).is_err());
    }

    /// The sender's chain keys and message keys for counters `0..n`.
    fn sender_keys(seed: [u8; 32], n: u64) -> Vec<([u8; 32], MessageKey)> {
        let mut s = SendingChain::new(seed);
        (0..n)
            .map(|_| {
                let (ck, _) = s.distribution();
                (ck, s.step().unwrap().1)
            })
            .collect()
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn a_skipped_key_older_than_the_max_age_is_gone() {
        let keys = sender_keys([7; 32], 6);
        let mut r = ReceivingChain::new(keys[0].0, 0);
        // 1, 2 and 3 are skipped at NOW.
        take(&mut r, 0).unwrap();
        take(&mut r, 4).unwrap();
        assert_eq!(r.skipped_len(), 3);
        let max_age_ms = MAX_AGE.as_millis() as i64;
        // At exactly the max age a key still opens its message.
        let got = take_at(&mut r, 1, NOW + max_age_ms).unwrap();
        assert_eq!(got.key, keys[1].1.key);
        // A moment later the others are gone: refused, and dropped from the
        // state a later message leaves behind.
        let late = NOW + max_age_ms + 1;
        assert_eq!(
            r.key_for(2, late, MAX_AGE).unwrap_err(),
            CryptoError::SkippedKeyExpired(2)
        );
        take_at(&mut r, 5, late).unwrap();
        assert_eq!(r.skipped_len(), 0);
        assert_eq!(
            r.key_for(3, late, MAX_AGE).unwrap_err(),
            CryptoError::Replay(3)
        );
        let stored = r.to_bytes();
        for (_, mk) in &keys[2..4] {
            assert!(!contains(&stored, &mk.key));
        }
    }

    #[test]
    fn expire_drops_only_keys_past_the_max_age() {
        let mut r = ReceivingChain::new([8; 32], 0);
        take_at(&mut r, 2, NOW).unwrap();
        take_at(&mut r, 5, NOW + 1_000).unwrap();
        assert_eq!(r.skipped_len(), 4);
        let max_age_ms = MAX_AGE.as_millis() as i64;
        assert!(!r.expire(NOW + max_age_ms, MAX_AGE));
        assert!(r.expire(NOW + max_age_ms + 1, MAX_AGE));
        // 0 and 1 (skipped at NOW) went; 3 and 4 stay.
        assert_eq!(r.skipped_len(), 2);
        assert!(r.key_for(4, NOW + max_age_ms + 1, MAX_AGE).is_ok());
        // A clock that went back expires nothing.
        assert!(!r.expire(0, MAX_AGE));
    }

    #[test]
    fn the_stored_state_holds_no_key_of_a_counter_behind_it() {
        let keys = sender_keys([9; 32], 12);
        let mut r = ReceivingChain::new(keys[0].0, 0);
        for counter in [0u64, 4, 1, 9, 2] {
            let got = take(&mut r, counter).unwrap();
            assert_eq!(got.key, keys[counter as usize].1.key);
        }
        // Still skipped: 3, 5, 6, 7, 8. Received: 0, 1, 2, 4, 9.
        let stored = r.to_bytes();
        for (counter, (ck, mk)) in keys.iter().enumerate().take(10) {
            assert!(
                !contains(&stored, ck),
                "the chain key of counter {counter} is stored"
            );
            let skipped = [3, 5, 6, 7, 8].contains(&counter);
            assert_eq!(
                contains(&stored, &mk.key),
                skipped,
                "message key of counter {counter}"
            );
        }
        // The current chain key is the one of counter 10, from which only
        // later keys follow.
        assert!(contains(&stored, &keys[10].0));
        // What is still skipped opens after a round trip.
        let mut back = ReceivingChain::from_bytes(&stored, NOW).unwrap();
        for counter in [8u64, 3, 5, 7, 6, 10] {
            let got = take(&mut back, counter).unwrap();
            assert_eq!(got.key, keys[counter as usize].1.key);
        }
    }

    #[test]
    fn a_replaced_chain_dies_a_max_age_after_it_was_first_replaced() {
        let mut r = ReceivingChain::new([11; 32], 0);
        assert!(!r.replaced_longer_than(i64::MAX, MAX_AGE));
        assert!(r.mark_replaced(NOW));
        assert!(!r.mark_replaced(NOW + 5_000), "the first time counts");
        let mut r = ReceivingChain::from_bytes(&r.to_bytes(), NOW).unwrap();
        let max_age_ms = MAX_AGE.as_millis() as i64;
        assert!(!r.replaced_longer_than(NOW + max_age_ms, MAX_AGE));
        assert!(r.replaced_longer_than(NOW + max_age_ms + 1, MAX_AGE));
        // Until then it still opens what was on the way.
        assert!(take_at(&mut r, 3, NOW + max_age_ms).is_ok());
    }

    /// The stored format before this one, as it was written.
    #[derive(Serialize)]
    struct FirstFormat {
        chain_key: [u8; 32],
        next: u64,
        skipped: BTreeMap<u64, [u8; 32]>,
    }

    #[test]
    fn a_state_of_the_first_format_loads_and_keeps_no_chain_key() {
        let keys = sender_keys([10; 32], 6);
        // Counters 0 and 3 were received; 1 and 2 were skipped and kept as
        // chain keys.
        let old = FirstFormat {
            chain_key: keys[4].0,
            next: 4,
            skipped: [(1, keys[1].0), (2, keys[2].0)].into_iter().collect(),
        };
        let bytes = postcard::to_stdvec(&old).unwrap();
        let mut r = ReceivingChain::from_bytes(&bytes, NOW).unwrap();
        assert_eq!(r.next_counter(), 4);
        assert_eq!(r.skipped_len(), 2);
        let stored = r.to_bytes();
        assert!(stored.starts_with(STATE_MAGIC));
        for (ck, _) in &keys[..4] {
            assert!(!contains(&stored, ck));
        }
        // Every message readable before still is, and the chain goes on.
        for counter in [2u64, 1, 4, 5] {
            let got = take(&mut r, counter).unwrap();
            assert_eq!(got.key, keys[counter as usize].1.key);
            assert_eq!(got.nonce, keys[counter as usize].1.nonce);
        }
        // Converted keys get the full max age from their conversion.
        let mut again = ReceivingChain::from_bytes(&bytes, NOW).unwrap();
        let max_age_ms = MAX_AGE.as_millis() as i64;
        assert!(!again.expire(NOW + max_age_ms, MAX_AGE));
        assert!(again.expire(NOW + max_age_ms + 1, MAX_AGE));
    }
}
