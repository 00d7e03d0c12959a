//! The chain cache: this device's sending chains (with how far their
//! counters are reserved on disk), the receiving chains in use, which of
//! those moved on in the batch in progress (written once at its end), and
//! decoded device keys. Bounded; the store holds every chain.

use std::collections::{HashMap, HashSet};

use crate::crypto::chain::{ReceivingChain, SendingChain};
use crate::ids::{ConversationId, DeviceId};

/// Receiving chains kept in memory.
const CHAIN_CACHE: usize = 20_000;
/// Decoded device keys kept.
const VERIFYING_KEYS: usize = 16_384;

/// A receiving chain's key: conversation, sender device, key epoch.
pub(super) type ChainKey = (ConversationId, DeviceId, u64);

/// This device's sending chain for one conversation epoch, with how far
/// its counters are reserved on disk.
pub(super) struct SendingSlot {
    pub(super) chain: SendingChain,
    /// The disk holds the chain at this counter (committed): counters
    /// below it can never be reused, even after a crash, so envelopes
    /// sealed with them may leave before the batch commits.
    pub(super) durable_until: u64,
    /// The same, as written in the open transaction.
    pub(super) reserved_until: u64,
}

#[derive(Default)]
pub(super) struct ChainCache {
    sending: HashMap<(ConversationId, u64), SendingSlot>,
    receiving: HashMap<ChainKey, ReceivingChain>,
    /// Receiving chains moved on in this batch and not written yet.
    dirty: HashSet<ChainKey>,
    verifying_keys: HashMap<DeviceId, ed25519_dalek::VerifyingKey>,
}

impl ChainCache {
    /// This device's sending chain for a conversation epoch, if loaded.
    pub(super) fn sending(&self, conv: &ConversationId, epoch: u64) -> Option<&SendingSlot> {
        self.sending.get(&(*conv, epoch))
    }

    pub(super) fn sending_mut(
        &mut self,
        conv: &ConversationId,
        epoch: u64,
    ) -> Option<&mut SendingSlot> {
        self.sending.get_mut(&(*conv, epoch))
    }

    pub(super) fn insert_sending(&mut self, conv: ConversationId, epoch: u64, slot: SendingSlot) {
        self.sending.insert((conv, epoch), slot);
    }

    /// Forgets a sending chain (its epoch is over).
    pub(super) fn remove_sending(&mut self, conv: &ConversationId, epoch: u64) {
        self.sending.remove(&(*conv, epoch));
    }

    /// Keeps the sending chains of the (conversation, epoch) pairs `keep`
    /// says yes to.
    pub(super) fn retain_sending(&mut self, keep: impl Fn(&ConversationId, u64) -> bool) {
        self.sending.retain(|(conv, epoch), _| keep(conv, *epoch));
    }

    /// After a durable commit: every reservation written is on the disk.
    pub(super) fn reservations_durable(&mut self) {
        for slot in self.sending.values_mut() {
            slot.durable_until = slot.reserved_until;
        }
    }

    pub(super) fn receiving(&self, key: &ChainKey) -> Option<&ReceivingChain> {
        self.receiving.get(key)
    }

    /// Keeps a receiving chain, as the disk holds it or, if it `moved_on`,
    /// to be written at the end of the batch. When the cache is full, the
    /// chains that moved on are returned to be written first (nothing
    /// moved on is dropped unwritten), and the cache starts over.
    pub(super) fn insert_receiving(
        &mut self,
        key: ChainKey,
        chain: ReceivingChain,
        moved_on: bool,
    ) -> Vec<(ChainKey, ReceivingChain)> {
        let mut unwritten = Vec::new();
        if self.receiving.len() >= CHAIN_CACHE && !self.receiving.contains_key(&key) {
            unwritten = self.take_moved_on();
            self.receiving.clear();
        }
        self.receiving.insert(key, chain);
        if moved_on {
            self.dirty.insert(key);
        }
        unwritten
    }

    /// The receiving chains that moved on since the last call, to write.
    pub(super) fn take_moved_on(&mut self) -> Vec<(ChainKey, ReceivingChain)> {
        std::mem::take(&mut self.dirty)
            .into_iter()
            .filter_map(|key| self.receiving.get(&key).map(|c| (key, c.clone())))
            .collect()
    }

    /// Forgets the receiving chains (the disk changed under them).
    pub(super) fn forget_receiving(&mut self) {
        self.receiving.clear();
        self.dirty.clear();
    }

    /// Forgets everything (a batch failed to commit: the disk is the truth).
    pub(super) fn forget_all(&mut self) {
        self.sending.clear();
        self.forget_receiving();
    }

    /// A device's key, decoded once (`None`: not a valid key).
    pub(super) fn verifying_key(
        &mut self,
        device: &DeviceId,
    ) -> Option<ed25519_dalek::VerifyingKey> {
        if let Some(key) = self.verifying_keys.get(device) {
            return Some(*key);
        }
        let key = ed25519_dalek::VerifyingKey::from_bytes(&device.0).ok()?;
        if self.verifying_keys.len() >= VERIFYING_KEYS {
            self.verifying_keys.clear();
        }
        self.verifying_keys.insert(*device, key);
        Some(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> ChainKey {
        (ConversationId([n; 32]), DeviceId([n; 32]), 1)
    }

    #[test]
    fn chains_that_moved_on_are_written_once_and_never_dropped_unwritten() {
        let mut cache = ChainCache::default();
        let chain = ReceivingChain::new([7; 32], 0);
        let filler = |n: usize| (ConversationId([9; 32]), DeviceId([9; 32]), n as u64);
        assert!(
            cache
                .insert_receiving(key(1), chain.clone(), true)
                .is_empty()
        );
        assert!(
            cache
                .insert_receiving(key(1), chain.clone(), true)
                .is_empty()
        );
        assert_eq!(cache.take_moved_on().len(), 1);
        assert!(cache.take_moved_on().is_empty());
        // Full, with nothing moved on: the cache starts over with key(2).
        for n in 1..CHAIN_CACHE {
            assert!(
                cache
                    .insert_receiving(filler(n), chain.clone(), false)
                    .is_empty()
            );
        }
        assert!(
            cache
                .insert_receiving(key(2), chain.clone(), true)
                .is_empty()
        );
        assert!(cache.receiving(&key(1)).is_none());
        // Full again, key(2) moved on: the next newcomer hands it back.
        for n in 1..CHAIN_CACHE {
            assert!(
                cache
                    .insert_receiving(filler(n), chain.clone(), false)
                    .is_empty()
            );
        }
        let unwritten = cache.insert_receiving(key(3), chain, false);
        assert_eq!(unwritten.len(), 1);
        assert_eq!(unwritten[0].0, key(2));
        assert!(cache.receiving(&key(3)).is_some());
        assert!(cache.take_moved_on().is_empty());
    }

    #[test]
    fn reservations_become_durable_after_a_full_commit() {
        let mut cache = ChainCache::default();
        let conv = ConversationId([1; 32]);
        cache.insert_sending(
            conv,
            1,
            SendingSlot {
                chain: SendingChain::new([1; 32]),
                durable_until: 0,
                reserved_until: 256,
            },
        );
        cache.reservations_durable();
        assert_eq!(cache.sending(&conv, 1).map(|s| s.durable_until), Some(256));
        cache.remove_sending(&conv, 1);
        assert!(cache.sending(&conv, 1).is_none());
    }

    #[test]
    fn device_keys_are_decoded_once() {
        let mut cache = ChainCache::default();
        let good = ed25519_dalek::SigningKey::from_bytes(&[1; 32]).verifying_key();
        let device = DeviceId(good.to_bytes());
        assert_eq!(cache.verifying_key(&device), Some(good));
        assert_eq!(cache.verifying_key(&device), Some(good));
    }
}
