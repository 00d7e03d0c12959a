//! One-time handout keys: what key handouts (the chain keys of new
//! chains) are sealed to when the sender holds one. This device issues a
//! few to each device it shares a conversation with, that device alone
//! (so no two senders use the same), and erases a key's secret in the
//! batch that opens the handout sealed to it: a copy of this device taken
//! after that opens the handout, as recorded on the wire, with nothing it
//! holds. A holder that has none left seals to the handout key
//! (`handouts.rs`), and gets new ones once it has used half.

use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use crate::crypto::CryptoError;
use crate::crypto::envelope::Envelope;
use crate::identity::DeviceCertificate;
use crate::identity::{MAX_ONE_TIME_KEYS, OneTimeKeys};
use crate::ids::{ConversationId, DeviceId};
use crate::node::now_ms;
use crate::payload::Payload;

use super::EngineError;
use super::handouts::millis;
use super::{Ack, Conv, State, Verdict, fresh_key};

/// Most issued keys this device keeps in all: past it, it issues no more
/// (handouts to it fall back to its handout key) until some are used or
/// expire.
const MAX_OWN_ONE_TIME_KEYS: u64 = 65_536;
/// Most of one issuer's keys this device keeps (the newest).
const MAX_HELD_PER_ISSUER: usize = 2 * MAX_ONE_TIME_KEYS;
/// Conversations with more member devices than this hand out no batches
/// when they start or grow: one envelope would carry a batch per device
/// to every member (about 300 bytes each). Their devices get keys in a
/// smaller conversation they share, or use the handout key.
const MAX_BATCHES_PER_ENVELOPE: usize = 64;
/// A batch dated further ahead than this is refused.
const ONE_TIME_KEYS_SKEW_MS: i64 = 5 * 60 * 1000;

/// A sealed envelope opened with a one-time key.
pub(super) struct OpenedWithOneTimeKey {
    pub(super) conv: ConversationId,
    pub(super) plain: Zeroizing<Vec<u8>>,
    /// The key's public half (to erase the secret once the envelope is
    /// taken).
    pub(super) key: [u8; 32],
}

impl State<'_, '_> {
    fn one_time_target(&self) -> u64 {
        u64::try_from(self.e.settings.one_time_keys.min(MAX_ONE_TIME_KEYS)).unwrap_or(0)
    }

    /// Keys made since then count towards a holder's supply: half a
    /// rotation, so those of the last rotation are replaced at the next.
    fn one_time_fresh_since(&self, now: i64) -> i64 {
        now.saturating_sub(millis(self.e.settings.handout_key_rotation) / 2)
    }

    /// Issues each of `holders` the keys that bring its fresh supply up to
    /// the target: one signed batch per holder that needs any.
    fn issue_one_time_keys(
        &mut self,
        holders: &[DeviceId],
        now: i64,
    ) -> Result<Vec<OneTimeKeys>, EngineError> {
        let target = self.one_time_target();
        let fresh_since = self.one_time_fresh_since(now);
        let mut room = MAX_OWN_ONE_TIME_KEYS.saturating_sub(self.db.own_one_time_key_count()?);
        let mut batches = Vec::new();
        for holder in holders {
            if *holder == self.e.my_device {
                continue;
            }
            let fresh = self.db.own_one_time_keys_since(holder, fresh_since)?;
            let wanted = target.saturating_sub(fresh).min(room);
            if wanted == 0 {
                continue;
            }
            room -= wanted;
            // Strictly newer than the holder's last batch from us.
            let at = match self.db.last_one_time_batch_issued(holder)? {
                Some(last) if last >= now => last.saturating_add(1),
                _ => now,
            };
            let mut secrets = Vec::new();
            let mut publics = Vec::new();
            for _ in 0..wanted {
                let secret = Zeroizing::new(fresh_key()?);
                let public = PublicKey::from(&StaticSecret::from(*secret)).to_bytes();
                publics.push(public);
                secrets.push((public, secret));
            }
            self.db.add_own_one_time_keys(holder, &secrets, at)?;
            let signer = self.e.identity.device_signing_key();
            batches.push(OneTimeKeys::issue(signer, *holder, publics, at)?);
        }
        Ok(batches)
    }

    /// Tops up the supply of one-time keys of `devices` (member devices of
    /// `conv`, with the keys to seal to) and sends them their batches, in
    /// one envelope sealed to those that get one.
    pub(super) fn hand_out_one_time_keys(
        &mut self,
        conv: &Conv,
        devices: &[(DeviceId, [u8; 32])],
    ) -> Result<(), EngineError> {
        if devices.is_empty()
            || devices.len() > MAX_BATCHES_PER_ENVELOPE
            || conv.tag.is_none()
            || !conv.active
            || self.one_time_target() == 0
        {
            return Ok(());
        }
        let holders: Vec<DeviceId> = devices.iter().map(|(d, _)| *d).collect();
        let batches = self.issue_one_time_keys(&holders, now_ms())?;
        if batches.is_empty() {
            return Ok(());
        }
        let to: Vec<(DeviceId, [u8; 32])> = devices
            .iter()
            .filter(|(d, _)| batches.iter().any(|b| b.holder == *d))
            .copied()
            .collect();
        let env = self.seal_to(conv.id, &to, &Payload::OneTimeKeys(batches))?;
        self.send_envelope(conv, &env, conv.key_epoch, 0, false, Ack::Publish)?;
        Ok(())
    }

    /// After a handout from `holder` used one of our one-time keys: once
    /// it holds half the target or fewer, it gets new ones, in the
    /// smallest conversation both are in.
    pub(super) fn top_up_one_time_keys(&mut self, holder: DeviceId) -> Result<(), EngineError> {
        let target = self.one_time_target();
        let fresh_since = self.one_time_fresh_since(now_ms());
        if target == 0 || self.db.own_one_time_keys_since(&holder, fresh_since)? > target / 2 {
            return Ok(());
        }
        let Some(user) = self.sender_user(&holder)? else {
            return Ok(());
        };
        let Some(conv) = self
            .e
            .convs
            .values()
            .filter(|c| c.active && c.tag.is_some() && c.members.contains(&user))
            .min_by_key(|c| c.members.len())
            .cloned()
        else {
            return Ok(());
        };
        let Some(cert) = self
            .db
            .device(&holder)?
            .and_then(|d| DeviceCertificate::from_stored_bytes(&d.cert).ok())
        else {
            return Ok(());
        };
        let to = (holder, self.sealing_key(&holder, cert.dh)?);
        self.hand_out_one_time_keys(&conv, &[to])
    }

    /// What to seal a key handout to for each of `devices`: a one-time key
    /// of the device where this one holds one young enough (taken: it is
    /// never used again), else the key `devices` names.
    pub(super) fn take_one_time_keys(
        &mut self,
        devices: &[(DeviceId, [u8; 32])],
    ) -> Result<Vec<(DeviceId, [u8; 32])>, EngineError> {
        let since = now_ms().saturating_sub(self.handout_key_usable_for());
        devices
            .iter()
            .map(|(device, key)| {
                let one_time = self.db.take_one_time_key(device, since)?;
                Ok((*device, one_time.unwrap_or(*key)))
            })
            .collect()
    }

    /// Opens a sealed envelope with a one-time key this device issued to
    /// its sender, if one opens it.
    pub(super) fn open_with_one_time_key(
        &self,
        env: &Envelope,
    ) -> Result<Option<OpenedWithOneTimeKey>, EngineError> {
        for key in self.db.own_one_time_keys_for(&env.header.sender)? {
            match env.open_sealed(&self.e.my_device, &StaticSecret::from(*key.secret)) {
                Ok((conv, plain)) => {
                    return Ok(Some(OpenedWithOneTimeKey {
                        conv,
                        plain: Zeroizing::new(plain),
                        key: key.public,
                    }));
                }
                Err(CryptoError::Decrypt) => {}
                // Not for this device, or malformed: the usual path says.
                Err(_) => return Ok(None),
            }
        }
        Ok(None)
    }

    /// The envelope sealed to one-time key `public` was taken: its secret
    /// is erased (in this batch's transaction), and its holder may need
    /// new ones.
    pub(super) fn one_time_key_used(
        &mut self,
        public: &[u8; 32],
        holder: DeviceId,
    ) -> Result<(), EngineError> {
        if self.db.erase_own_one_time_key(public)? {
            self.db.note_erased();
        }
        self.top_up_one_time_keys(holder)
    }

    /// Erases issued keys too old for any holder to still use.
    pub(super) fn expire_one_time_keys(&mut self, now: i64) -> Result<(), EngineError> {
        let max_age = millis(self.e.settings.skipped_key_max_age);
        let oldest = now
            .saturating_sub(millis(self.e.settings.handout_key_rotation))
            .saturating_sub(max_age);
        let erased = self.db.erase_own_one_time_keys_before(oldest)?;
        if erased > 0 {
            tracing::debug!(erased, "erased one-time keys never used");
            self.db.note_erased();
        }
        Ok(())
    }

    /// One-time keys a member device issued to this one.
    pub(super) fn receive_one_time_keys(
        &mut self,
        env: &Envelope,
        conv_id: ConversationId,
        batches: Vec<OneTimeKeys>,
    ) -> Result<Verdict, EngineError> {
        let Some(batch) = batches.into_iter().find(|b| b.holder == self.e.my_device) else {
            return Ok(Verdict::Reject("one-time keys for other devices only"));
        };
        if batch.issuer != env.header.sender || batch.verify().is_err() {
            return Ok(Verdict::Reject("one-time keys not signed by their sender"));
        }
        if batch.created_at_ms > now_ms().saturating_add(ONE_TIME_KEYS_SKEW_MS) {
            return Ok(Verdict::Reject("one-time keys dated ahead"));
        }
        // Only from devices known here (bounded by what accounts certify).
        if self.sender_user(&env.header.sender)?.is_none() {
            return Ok(Verdict::Ignore);
        }
        self.db.add_one_time_keys(
            &batch.issuer,
            &batch.keys,
            batch.created_at_ms,
            MAX_HELD_PER_ISSUER,
        )?;
        self.store_envelope(env, &conv_id, 0, 0)?;
        Ok(Verdict::Accept)
    }
}
