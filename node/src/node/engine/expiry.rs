//! Forgetting keys on time, for forward secrecy against a later copy of
//! this device's disk: skipped message keys older than
//! `Settings::skipped_key_max_age`, and the chains of epochs nobody can
//! still send in.
//!
//! An epoch is dead for this device's own sending chain as soon as the
//! conversation's key epoch moved past it (it never sends in it again).
//! For another device's chain it is dead once a newer epoch of the same
//! device has been here for the max age: until then envelopes already on
//! the way in the old epoch still open. A pass runs on the tick, at most
//! once per [`EXPIRY_EVERY`] (or per max age if shorter), and its
//! deletions leave the `-wal` at the end of its batch.

use std::collections::HashMap;
use std::time::Duration;

use crate::crypto::chain::ReceivingChain;
use crate::ids::{ConversationId, DeviceId};
use crate::node::now_ms;
use crate::store::meta;

use super::EngineError;
use super::State;

/// Longest time between passes.
const EXPIRY_EVERY: Duration = Duration::from_secs(3600);

impl State<'_, '_> {
    /// Runs a pass if one is due.
    pub(super) fn expire_keys(&mut self) {
        let now = now_ms();
        let max_age = self.e.settings.skipped_key_max_age;
        let every = max_age
            .min(self.e.settings.handout_key_rotation)
            .min(EXPIRY_EVERY);
        let every = i64::try_from(every.as_millis()).unwrap_or(i64::MAX);
        let last = match self.db.get_meta(meta::KEYS_EXPIRED_AT) {
            Ok(last) => last,
            Err(e) => {
                tracing::warn!("key expiry: {e}");
                return;
            }
        };
        let last = last
            .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
            .map(i64::from_be_bytes);
        if let Some(last) = last
            && (last..last.saturating_add(every)).contains(&now)
        {
            return;
        }
        // The first pass of a database also erases what deletions of an
        // earlier version left.
        if last.is_none()
            && let Err(e) = self.db.erase_envelopes_of_deleted_messages()
        {
            tracing::warn!("erasing envelopes of deleted messages: {e}");
        }
        if let Err(e) = self.expire_keys_now(now, max_age) {
            tracing::warn!("key expiry: {e:?}");
        }
    }

    fn expire_keys_now(&mut self, now: i64, max_age: Duration) -> Result<(), EngineError> {
        // The pass works on the store: what moved on in this batch is
        // written first, and the cache is read again afterwards.
        self.save_chains();
        let me = self.e.my_device;
        self.db.delete_replaced_sending_chains(&me)?;
        let convs = &self.e.convs;
        self.e
            .chains
            .retain_sending(|conv, epoch| convs.get(conv).is_none_or(|c| epoch >= c.key_epoch));

        let states = self.db.receiving_chain_states(&me)?;
        let mut newest: HashMap<(ConversationId, DeviceId), u64> = HashMap::new();
        for (place, _) in &states {
            let epoch = newest
                .entry((place.conversation, place.sender))
                .or_default();
            *epoch = (*epoch).max(place.epoch);
        }
        let mut changed = 0usize;
        for (place, bytes) in states {
            let mut chain = match ReceivingChain::from_bytes(&bytes, now) {
                Ok(chain) => chain,
                Err(e) => {
                    tracing::warn!(?place, "an unreadable receiving chain is left alone: {e}");
                    continue;
                }
            };
            if newest
                .get(&(place.conversation, place.sender))
                .is_some_and(|&epoch| epoch > place.epoch)
            {
                chain.mark_replaced(now);
            }
            if chain.replaced_longer_than(now, max_age) {
                self.db.delete_chain(&place)?;
                changed += 1;
                continue;
            }
            chain.expire(now, max_age);
            // Also rewrites a state of an earlier format in this one.
            let fresh = chain.to_bytes();
            if fresh != bytes {
                self.db
                    .put_chain(&place.conversation, &place.sender, place.epoch, &fresh)?;
                changed += 1;
            }
        }
        if changed > 0 {
            self.e.chains.forget_receiving();
        }
        self.handout_keys_pass(now)?;
        self.db
            .set_meta(meta::KEYS_EXPIRED_AT, &now.to_be_bytes())?;
        // The chain states replaced since the last checkpoint (every
        // message moves one on) leave the -wal at least this often.
        self.db.note_erased();
        Ok(())
    }
}
