//! Sender-key chains. Each device has one sending chain per conversation
//! and epoch; every member device holds a receiving copy of it.
//!
//! `chain_key[i+1] = BLAKE3-keyed(chain_key[i], 0x02)`; the message key and
//! nonce for counter `i` are the first 56 bytes of
//! `BLAKE3-keyed-XOF(chain_key[i], 0x01)`. Old chain keys are overwritten
//! (forward secrecy). A receiver may skip ahead at most [`MAX_SKIP`] and
//! keeps at most [`MAX_SKIPPED_KEYS`] skipped keys, so a hostile counter
//! costs neither memory nor much time.

use std::collections::BTreeMap;

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

/// A member's copy of another device's sending chain.
#[derive(Clone, Serialize, Deserialize)]
pub struct ReceivingChain {
    chain_key: [u8; 32],
    next: u64,
    skipped: BTreeMap<u64, [u8; 32]>,
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
        self.chain_key.zeroize();
        for key in self.skipped.values_mut() {
            key.zeroize();
        }
    }
}

impl ReceivingChain {
    pub fn new(chain_key: [u8; 32], next: u64) -> Self {
        Self {
            chain_key,
            next,
            skipped: BTreeMap::new(),
        }
    }

    pub fn next_counter(&self) -> u64 {
        self.next
    }

    /// The message key for `counter`, without changing the chain: returns
    /// the chain as it must be once the message is authenticated. Callers
    /// keep the new state only after decryption succeeds, so a forged
    /// envelope cannot advance or burn keys.
    pub fn key_for(
        &self,
        counter: u64,
    ) -> Result<(MessageKey, Option<ReceivingChain>), CryptoError> {
        if counter < self.next {
            let seed = self
                .skipped
                .get(&counter)
                .ok_or(CryptoError::Replay(counter))?;
            let mut after = self.clone();
            if let Some(mut used) = after.skipped.remove(&counter) {
                used.zeroize();
            }
            return Ok((message_key(seed), Some(after)));
        }
        let ahead = counter - self.next;
        if ahead > MAX_SKIP {
            return Err(CryptoError::TooFarAhead {
                counter,
                ahead,
                max: MAX_SKIP,
            });
        }
        if ahead == 0 {
            // The common case: no skipped keys to record, no clone of them.
            let mk = message_key(&self.chain_key);
            let after = Self {
                chain_key: next_chain_key(&self.chain_key),
                next: self.next + 1,
                skipped: self.skipped.clone(),
            };
            return Ok((mk, Some(after)));
        }
        let mut after = self.clone();
        while after.next < counter {
            after.skipped.insert(after.next, after.chain_key);
            after.chain_key = next_chain_key(&after.chain_key);
            after.next += 1;
        }
        while after.skipped.len() > MAX_SKIPPED_KEYS {
            after.skipped.pop_first();
        }
        let mk = message_key(&after.chain_key);
        after.chain_key = next_chain_key(&after.chain_key);
        after.next += 1;
        Ok((mk, Some(after)))
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        postcard::to_stdvec(self).unwrap_or_default()
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CryptoError> {
        postcard::from_bytes(bytes).map_err(|_| CryptoError::Malformed("receiving chain state"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take(r: &mut ReceivingChain, counter: u64) -> Result<MessageKey, CryptoError> {
        let (mk, after) = r.key_for(counter)?;
        if let Some(after) = after {
            *r = after;
        }
        Ok(mk)
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
            r.key_for(u64::MAX),
            Err(CryptoError::TooFarAhead { .. })
        ));
        assert!(matches!(
            r.key_for(MAX_SKIP + 1),
            Err(CryptoError::TooFarAhead { .. })
        ));
        assert!(r.key_for(MAX_SKIP).is_ok());
    }

    #[test]
    fn skipped_keys_are_bounded() {
        let mut r = ReceivingChain::new([1; 32], 0);
        for round in 1..=5u64 {
            take(&mut r, round * MAX_SKIP).unwrap();
        }
        assert!(r.skipped.len() <= MAX_SKIPPED_KEYS);
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
        assert_eq!(r.key_for(0).unwrap_err(), CryptoError::Replay(0));
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
            ReceivingChain::from_bytes(&r.to_bytes())
                .unwrap()
                .next_counter(),
            7
        );
        assert!(ReceivingChain::from_bytes(&[1, 2]).is_err());
    }
}
