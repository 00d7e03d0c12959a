//! Handout keys: what key handouts (and everything else sealed to this
//! device) are sealed to. This device replaces its handout key every
//! `handout_key_rotation` and erases a replaced one `skipped_key_max_age`
//! later, so a later copy of its disk opens no handout sealed to an old
//! one (the certified DH key in `identity.key` opens only what was sealed
//! to it by senders who knew no handout key). It hands its key to a
//! conversation's member devices when the conversation starts, to a device
//! learned later, and to everyone at each replacement; senders use the
//! newest they know while it is young enough to still be held.

use std::collections::HashSet;
use std::time::Duration;

use x25519_dalek::{PublicKey, StaticSecret};

use crate::crypto::envelope::Envelope;
use crate::identity::{DeviceCertificate, HandoutKey};
use crate::ids::{ConversationId, DeviceId};
use crate::node::now_ms;
use crate::payload::Payload;

use super::EngineError;
use super::{Ack, Conv, State, Verdict, fresh_key};

/// A handout key dated further ahead than this is refused.
const HANDOUT_KEY_SKEW_MS: i64 = 5 * 60 * 1000;

pub(super) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl State<'_, '_> {
    /// This device's current handout key; a new one (handed to every
    /// member device of every conversation) if there is none or the
    /// current one is due for replacement.
    pub(super) fn current_handout_key(&mut self, now: i64) -> Result<HandoutKey, EngineError> {
        let signer = self.e.identity.device_signing_key();
        let rotation = millis(self.e.settings.handout_key_rotation);
        if let Some(newest) = self.db.own_handout_keys()?.first()
            && now < newest.created_at_ms.saturating_add(rotation)
        {
            return Ok(HandoutKey::issue(
                signer,
                newest.public,
                newest.created_at_ms,
            ));
        }
        let secret = zeroize::Zeroizing::new(fresh_key()?);
        let public = PublicKey::from(&StaticSecret::from(*secret)).to_bytes();
        self.db.add_own_handout_key(&public, &secret, now)?;
        let key = HandoutKey::issue(signer, public, now);
        self.hand_out_everywhere(&key)?;
        Ok(key)
    }

    /// Hands `key` to every member device of every conversation, once each.
    fn hand_out_everywhere(&mut self, key: &HandoutKey) -> Result<(), EngineError> {
        let mut told: HashSet<DeviceId> = HashSet::new();
        for conv in self.active_convs() {
            let devices: Vec<(DeviceId, [u8; 32])> = self
                .recipients(&conv)?
                .devices
                .iter()
                .filter(|(d, _)| !told.contains(d))
                .copied()
                .collect();
            told.extend(devices.iter().map(|(d, _)| *d));
            self.hand_out_to(&conv, key, &devices)?;
        }
        Ok(())
    }

    fn hand_out_to(
        &mut self,
        conv: &Conv,
        key: &HandoutKey,
        devices: &[(DeviceId, [u8; 32])],
    ) -> Result<(), EngineError> {
        if devices.is_empty() || conv.tag.is_none() || !conv.active {
            return Ok(());
        }
        let env = self.seal_to(conv.id, devices, &Payload::HandoutKey(key.clone()))?;
        self.send_envelope(conv, &env, conv.key_epoch, 0, false, Ack::Publish)?;
        self.hand_out_one_time_keys(conv, devices)
    }

    /// Hands this device's handout key to the member devices of a
    /// conversation that just started (or that this device just joined).
    pub(super) fn hand_out_in(&mut self, conv: &Conv) -> Result<(), EngineError> {
        let key = self.current_handout_key(now_ms())?;
        let devices = self.recipients(conv)?.devices.clone();
        self.hand_out_to(conv, &key, &devices)
    }

    /// Hands this device's handout key to devices that just joined a
    /// conversation this device is in (members added to a group).
    pub(super) fn hand_out_to_new_members(
        &mut self,
        conv: &Conv,
        devices: &[(DeviceId, [u8; 32])],
    ) -> Result<(), EngineError> {
        if devices.is_empty() {
            return Ok(());
        }
        let key = self.current_handout_key(now_ms())?;
        let mut to = Vec::with_capacity(devices.len());
        for (device, certified) in devices {
            to.push((*device, self.sealing_key(device, *certified)?));
        }
        self.hand_out_to(conv, &key, &to)
    }

    /// Hands this device's handout key to a device learned later, in one
    /// conversation its user shares with this one.
    pub(super) fn hand_out_to_device(
        &mut self,
        cert: &DeviceCertificate,
    ) -> Result<(), EngineError> {
        let Some(conv) = self
            .active_convs()
            .into_iter()
            .find(|c| c.tag.is_some() && c.members.contains(&cert.user))
        else {
            return Ok(());
        };
        let key = self.current_handout_key(now_ms())?;
        let to = (cert.device, self.sealing_key(&cert.device, cert.dh)?);
        self.hand_out_to(&conv, &key, &[to])
    }

    /// The periodic part: replaces the key when due, erases replaced ones
    /// older than the max age, and forgets cached recipient keys (which
    /// handout key is still young enough changes with time).
    pub(super) fn handout_keys_pass(&mut self, now: i64) -> Result<(), EngineError> {
        self.current_handout_key(now)?;
        let max_age = millis(self.e.settings.skipped_key_max_age);
        let erased = self
            .db
            .erase_own_handout_keys_retired_before(now.saturating_sub(max_age))?;
        if erased > 0 {
            tracing::debug!(erased, "erased replaced handout keys");
            self.db.note_erased();
        }
        self.expire_one_time_keys(now)?;
        self.devices_changed();
        Ok(())
    }

    /// How long after it was made another device's handout (or one-time)
    /// key is sealed to: while the device surely still holds it (half the
    /// max age of slack for envelopes in flight or in mailboxes).
    pub(super) fn handout_key_usable_for(&self) -> i64 {
        millis(self.e.settings.handout_key_rotation)
            .saturating_add(millis(self.e.settings.skipped_key_max_age) / 2)
    }

    /// The key to seal to `device`: its newest handout key while young
    /// enough that the device surely still holds it (half the max age of
    /// slack for envelopes in flight or in mailboxes), else its certified
    /// DH key.
    pub(super) fn sealing_key(
        &self,
        device: &DeviceId,
        certified: [u8; 32],
    ) -> Result<[u8; 32], EngineError> {
        let usable_for = self.handout_key_usable_for();
        Ok(match self.db.handout_key(device)? {
            Some((dh, created)) if now_ms() < created.saturating_add(usable_for) => dh,
            _ => certified,
        })
    }

    /// Every key a sealed envelope to this device may be sealed to: its
    /// handout keys still held (newest first), then its certified key.
    pub(super) fn opening_keys(&self) -> Result<Vec<StaticSecret>, EngineError> {
        let mut keys: Vec<StaticSecret> = self
            .db
            .own_handout_keys()?
            .iter()
            .map(|k| StaticSecret::from(*k.secret))
            .collect();
        keys.push(self.e.identity.device_dh_secret().clone());
        Ok(keys)
    }

    /// A member device's new handout key.
    pub(super) fn receive_handout_key(
        &mut self,
        env: &Envelope,
        conv_id: ConversationId,
        key: HandoutKey,
    ) -> Result<Verdict, EngineError> {
        if key.device != env.header.sender || key.verify().is_err() {
            return Ok(Verdict::Reject("handout key not signed by its sender"));
        }
        if key.created_at_ms > now_ms().saturating_add(HANDOUT_KEY_SKEW_MS) {
            return Ok(Verdict::Reject("handout key dated ahead"));
        }
        // Only devices known here (bounded by what accounts certify).
        if self.sender_user(&env.header.sender)?.is_none() {
            return Ok(Verdict::Ignore);
        }
        if self
            .db
            .set_handout_key(&key.device, &key.dh, key.created_at_ms)?
        {
            self.devices_changed();
        }
        self.store_envelope(env, &conv_id, 0, 0)?;
        Ok(Verdict::Accept)
    }
}
