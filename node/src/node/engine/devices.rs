//! This account's devices, from the engine's side: issuing link codes and
//! certifying the device that brings one (`crate::link`), telling every
//! conversation about the account's devices, handing this device's
//! sending chains to devices learned later, revocations and `weft
//! devices list`. History sync for a new device is in `history.rs`.

use std::time::Duration;

use libp2p::{Multiaddr, PeerId};

use crate::api::{DeviceView, Event, LinkCodeView, RevokedView};
use crate::backoff::Backoff;
use crate::crypto::chain::SendingChain;
use crate::crypto::envelope::Envelope;
use crate::identity::{DeviceCertificate, Revocation, peer_id_of, random_bytes};
use crate::ids::{ConversationId, DeviceId};
use crate::node::now_ms;
use crate::payload::Payload;
use crate::store::{Binding, meta};

use super::EngineError;
use super::{Ack, Conv, DirectResponse, Effect, EngineResult, MAX_REVOKED, State, Verdict};

/// How long a revoked device keeps its gossip topics, to hear that it is
/// revoked (it can open nothing new meanwhile: chains moved on).
const REVOKED_GATE_GRACE: Duration = Duration::from_secs(5);

/// 16 random bytes (zeros if the OS fails: only used for placeholders).
pub(super) fn rand_id() -> [u8; 16] {
    random_bytes().unwrap_or_default()
}
use crate::link::{CODE_LIFETIME_MS, LinkCode, LinkGrant, LinkRequest};

/// Link codes waiting to be used, at most.
const MAX_LINK_CODES: usize = 4;
/// Revocations kept for devices not known yet, at most.
const MAX_PENDING_REVOCATIONS: usize = 4096;
/// Shortest device id prefix `weft devices revoke` accepts.
const MIN_DEVICE_PREFIX: usize = 4;

/// A link code waiting for its device.
pub(super) struct LinkSecret {
    secret: [u8; 16],
    expires_at_ms: i64,
}

/// Equal, in time that does not depend on where they differ.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Link codes issued and not used yet, and where this device's history
/// transfer is (from which device, and when to ask again after one
/// failed).
#[derive(Default)]
pub(super) struct Linking {
    /// Link codes issued and not used yet (at most [`MAX_LINK_CODES`]).
    codes: Vec<LinkSecret>,
    /// The device a history transfer is coming from.
    history_peer: Option<PeerId>,
    /// Transfers that failed in a row, and no new one before this.
    history_failures: u32,
    history_not_before: Option<tokio::time::Instant>,
    /// No history is needed (none was asked for at linking, or it came).
    history_done: bool,
}

/// How long a device waits to ask for history again after a transfer
/// failed (another device refused, not knowing it yet; a stream broke).
const HISTORY_RETRY: Backoff = Backoff {
    base: Duration::from_secs(1),
    max: Duration::from_secs(60),
};

impl Linking {
    /// Keeps `secret` as a code that works until `now_ms` +
    /// [`CODE_LIFETIME_MS`] (returned); the oldest code goes when
    /// [`MAX_LINK_CODES`] are out.
    fn issue(&mut self, secret: [u8; 16], now_ms: i64) -> i64 {
        self.codes.retain(|c| c.expires_at_ms > now_ms);
        if self.codes.len() >= MAX_LINK_CODES {
            self.codes.remove(0);
        }
        let expires_at_ms = now_ms + CODE_LIFETIME_MS;
        self.codes.push(LinkSecret {
            secret,
            expires_at_ms,
        });
        expires_at_ms
    }

    /// Whether a history transfer may start at `now`: one is needed, none
    /// is under way, and the wait after the last failure is over.
    pub(super) fn may_ask_history(&self, now: tokio::time::Instant) -> bool {
        !self.history_done
            && self.history_peer.is_none()
            && self.history_not_before.is_none_or(|t| now >= t)
    }

    pub(super) fn history_started(&mut self, peer: PeerId) {
        self.history_peer = Some(peer);
    }

    /// A transfer failed at `now`: another may start after a backoff
    /// (`jitter` as for [`Backoff::delay`]), from any device.
    pub(super) fn history_failed(&mut self, now: tokio::time::Instant, jitter: f64) {
        self.history_peer = None;
        self.history_not_before = Some(now + HISTORY_RETRY.delay(self.history_failures, jitter));
        self.history_failures = self.history_failures.saturating_add(1);
    }

    /// No (more) history is needed.
    pub(super) fn history_done(&mut self) {
        self.history_peer = None;
        self.history_done = true;
    }

    /// Uses up the unexpired code `proves` accepts, if any: each works once.
    fn redeem(&mut self, now_ms: i64, proves: impl Fn(&[u8; 16]) -> bool) -> bool {
        self.codes.retain(|c| c.expires_at_ms > now_ms);
        match self.codes.iter().position(|c| proves(&c.secret)) {
            Some(at) => {
                self.codes.remove(at);
                true
            }
            None => false,
        }
    }
}

impl State<'_, '_> {
    /// Whether `peer` is another, unrevoked device of this account.
    pub(super) fn own_device(&mut self, peer: &PeerId) -> bool {
        *peer != self.e.identity.peer_id()
            && self
                .who(peer)
                .is_some_and(|(_, user)| user == self.e.my_user)
    }

    /// `weft devices link`: a one-time code for a new device.
    pub(super) fn devices_link(&mut self, listen: Vec<Multiaddr>) -> EngineResult<LinkCodeView> {
        if !self.e.identity.holds_user_key() {
            return Err(EngineError::usage(
                "this device does not hold the account's user key: link from the first device",
            ));
        }
        if !self.e.net_online {
            return Err(EngineError::usage(
                "start the daemon first: it answers the new device",
            ));
        }
        let secret: [u8; 16] = random_bytes()?;
        let expires_at_ms = self.e.linking.issue(secret, now_ms());
        let mut addrs = self.reachable_at(listen);
        addrs.truncate(8);
        let code = LinkCode {
            user: self.e.my_user,
            device: self.e.my_device,
            addrs,
            secret,
        };
        Ok(LinkCodeView {
            code: code.encode(),
            expires_at: expires_at_ms,
        })
    }

    /// A new device asks to join with a code.
    pub(super) fn answer_link(&mut self, peer: PeerId, req: LinkRequest) -> DirectResponse {
        if peer_id_of(&req.device) != peer {
            return DirectResponse::Refused("the device is not the one connected".into());
        }
        let now = now_ms();
        let proven = self.e.linking.redeem(now, |secret| {
            same(
                &crate::link::proof(secret, &req.device, &req.dh),
                &req.proof,
            )
        });
        if !proven {
            return DirectResponse::Refused("no such link code (expired or used)".into());
        }
        let grant = (|| -> Result<LinkGrant, EngineError> {
            let cert = self
                .e
                .identity
                .certify(&req.device, req.dh, req.consent, now)?;
            if let Binding::OtherUser(owner) = self.bind_device(&cert)? {
                return Err(EngineError::failed(format!(
                    "the device is known here as a device of {owner}"
                )));
            }
            self.announce_devices()?;
            self.share_chains_with(&cert)?;
            self.hand_out_to_device(&cert)?;
            let invite = self.account_invite(Vec::new())?;
            Ok(LinkGrant {
                certificate: cert,
                account_dh: self.e.identity.account_dh_secret().to_bytes(),
                name: self.e.name.clone(),
                invite,
            })
        })();
        match grant {
            Ok(grant) => {
                tracing::info!(%peer, "linked a new device to the account");
                self.fx.push(Effect::Event(Event::Device {
                    event: "linked".into(),
                    device_id: grant.certificate.device.to_string(),
                }));
                DirectResponse::Linked(Box::new(grant))
            }
            Err(e) => DirectResponse::Refused(format!("linking failed: {e}")),
        }
    }

    /// This account's devices' certificates (this one first).
    fn my_certificates(&mut self) -> Result<Vec<DeviceCertificate>, EngineError> {
        let mut certs = vec![self.e.identity.certificate().clone()];
        for d in self.db.devices_of_user(&self.e.my_user)? {
            if d.device_id != self.e.my_device
                && let Ok(cert) = DeviceCertificate::from_stored_bytes(&d.cert)
            {
                certs.push(cert);
            }
        }
        certs.truncate(crate::identity::MAX_DEVICES);
        Ok(certs)
    }

    /// An invite naming every device of the account. A device without
    /// the user key shows the one it was given when linked.
    pub(super) fn account_invite(&mut self, addrs: Vec<String>) -> Result<String, EngineError> {
        if !self.e.identity.holds_user_key() {
            return self
                .db
                .get_meta(meta::ACCOUNT_INVITE)?
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| EngineError::failed("this linked device has no account invite"));
        }
        let certs = self.my_certificates()?;
        self.e
            .identity
            .invite(self.e.name.as_str(), certs, addrs, now_ms())
            .map_err(EngineError::from)
    }

    /// Tells every conversation which devices this account has.
    fn announce_devices(&mut self) -> Result<(), EngineError> {
        let certs = self.my_certificates()?;
        let convs = self.active_convs();
        for conv in convs {
            let recipients = self.recipients(&conv)?;
            if recipients.devices.is_empty() {
                continue;
            }
            let env = self.seal_to(
                conv.id,
                &recipients.devices,
                &Payload::Devices(certs.clone()),
            )?;
            self.send_envelope(&conv, &env, conv.epoch, 0, false, Ack::Publish)?;
        }
        Ok(())
    }

    /// A member told which devices its account has.
    pub(super) fn receive_devices(
        &mut self,
        env: &Envelope,
        conv_id: ConversationId,
        certs: Vec<DeviceCertificate>,
    ) -> Result<Verdict, EngineError> {
        let Some(sender) = self.db.device(&env.header.sender)? else {
            // From a device we do not know yet: its own messages will say.
            return Ok(Verdict::Ignore);
        };
        if sender.revoked || certs.len() > crate::identity::MAX_DEVICES {
            return Ok(Verdict::Reject(
                "device list from a revoked device, or too long",
            ));
        }
        for cert in &certs {
            if cert.user != sender.user_id || cert.verify().is_err() {
                return Ok(Verdict::Reject("device list with a foreign certificate"));
            }
            // A device belongs to the account it was first bound to.
            if self
                .db
                .device(&cert.device)?
                .is_some_and(|d| d.user_id != cert.user)
            {
                return Ok(Verdict::Reject(
                    "device list claims another account's device",
                ));
            }
        }
        for cert in certs {
            if cert.device == self.e.my_device {
                continue;
            }
            if self.bind_device(&cert)? == Binding::New && !self.is_revoked(&cert.device)? {
                self.share_chains_with(&cert)?;
                self.hand_out_to_device(&cert)?;
            }
        }
        self.store_envelope(env, &conv_id, 0, 0)?;
        Ok(Verdict::Accept)
    }

    /// Hands this device's current sending chains to a device learned
    /// later, in every conversation its user is in: it reads what this
    /// device sends from now on.
    pub(super) fn share_chains_with(
        &mut self,
        cert: &DeviceCertificate,
    ) -> Result<(), EngineError> {
        let convs: Vec<Conv> = self
            .e
            .convs
            .values()
            .filter(|c| c.active && c.members.contains(&cert.user))
            .cloned()
            .collect();
        for conv in convs {
            let key = (conv.id, conv.key_epoch);
            let distribution = match self.e.chains.sending(&key.0, key.1) {
                Some(slot) => Some(slot.chain.distribution()),
                None => match self
                    .db
                    .get_chain(&conv.id, &self.e.my_device, conv.key_epoch)?
                {
                    Some(bytes) => Some(SendingChain::from_bytes(&bytes)?.distribution()),
                    None => None,
                },
            };
            // No chain yet: the first message will hand it to everyone.
            if let Some(distribution) = distribution {
                let to = (cert.device, self.sealing_key(&cert.device, cert.dh)?);
                self.send_chain_to(&conv, &[to], distribution)?;
            }
        }
        Ok(())
    }

    /// Binds a verified certificate's device to its account, for good,
    /// and applies a revocation that was waiting for that device from that
    /// account. `Binding::OtherUser`: it belongs to another account here,
    /// and nothing changed.
    pub(super) fn bind_device(&mut self, cert: &DeviceCertificate) -> Result<Binding, EngineError> {
        let binding = self
            .db
            .bind_device(&cert.device, &cert.user, &cert.to_bytes())?;
        if let Binding::OtherUser(_) = binding {
            return Ok(binding);
        }
        self.devices_changed();
        self.upgrade_direct_routing(&cert.user)?;
        if binding == Binding::New
            && let Some(bytes) = self.db.take_pending_revocation(&cert.user, &cert.device)?
            && let Ok(rev) = postcard::from_bytes::<Revocation>(&bytes)
            && rev.verify().is_ok()
        {
            self.apply_revocation(&rev)?;
        }
        Ok(binding)
    }

    // ---- revocation ---------------------------------------------------

    /// Whether a device was revoked by its account.
    pub(super) fn is_revoked(&self, device: &DeviceId) -> Result<bool, EngineError> {
        if self.e.directory.revoked.contains(device) {
            return Ok(true);
        }
        if self.e.directory.revoked.len() < MAX_REVOKED {
            return Ok(false);
        }
        // More revocations than memory holds: the store knows them all.
        Ok(self.db.device(device)?.is_some_and(|d| d.revoked))
    }

    /// Refuses to send from a device its account revoked.
    pub(super) fn check_not_revoked(&self) -> Result<(), EngineError> {
        if self.e.directory.revoked.contains(&self.e.my_device) {
            return Err(EngineError::usage(
                "this device was revoked by its account: it can no longer send",
            ));
        }
        Ok(())
    }

    /// `weft devices revoke DEVICE_ID`: signs the revocation with the user
    /// key, starts new sending chains wherever the device could read, and
    /// tells every conversation (and the device itself).
    pub(super) fn devices_revoke(&mut self, which: &str) -> EngineResult<RevokedView> {
        if !self.e.identity.holds_user_key() {
            return Err(EngineError::usage(
                "only the account's first device holds the user key: revoke from there",
            ));
        }
        let device = self.own_device_named(which)?;
        if device == self.e.my_device {
            return Err(EngineError::usage(
                "this device holds the account's user key and cannot revoke itself",
            ));
        }
        let revocation = self.e.identity.revoke(&device, now_ms())?;
        let rekeyed = self.apply_revocation(&revocation)?;
        self.announce_revocation(&revocation)?;
        Ok(RevokedView {
            device_id: device.to_string(),
            revoked: true,
            conversations_rekeyed: rekeyed as u64,
        })
    }

    /// One of this account's devices, by its id or a unique prefix of it.
    fn own_device_named(&mut self, which: &str) -> Result<DeviceId, EngineError> {
        let which = which.trim();
        if let Ok(id) = which.parse::<DeviceId>() {
            return match self.db.device(&id)? {
                Some(d) if d.user_id == self.e.my_user && d.revoked => {
                    Err(EngineError::usage("that device is already revoked"))
                }
                Some(d) if d.user_id == self.e.my_user => Ok(id),
                _ => Err(EngineError::usage(
                    "not a device of this account (see weft devices list)",
                )),
            };
        }
        if which.len() < MIN_DEVICE_PREFIX {
            return Err(EngineError::usage(format!(
                "give the device id, or at least its first {MIN_DEVICE_PREFIX} characters"
            )));
        }
        let matching: Vec<DeviceId> = self
            .my_certificates()?
            .into_iter()
            .map(|c| c.device)
            .filter(|d| d.to_string().starts_with(which))
            .collect();
        match matching.as_slice() {
            [one] => Ok(*one),
            [] => Err(EngineError::usage(format!(
                "no device of this account starts with {which} (see weft devices list)"
            ))),
            _ => Err(EngineError::usage(format!(
                "{which} names more than one device: give more of the id"
            ))),
        }
    }

    /// Applies a verified revocation: the device is refused from now on,
    /// nothing more is sent to it, and every conversation it could read
    /// gets new sending chains. Returns how many conversations.
    pub(super) fn apply_revocation(&mut self, rev: &Revocation) -> Result<usize, EngineError> {
        if rev.device == self.e.my_device && rev.user == self.e.my_user {
            // This device's own row, so that its revocation is recorded.
            let me = self.e.identity.certificate().clone();
            self.db.bind_device(&me.device, &me.user, &me.to_bytes())?;
        }
        if !self.db.revoke_device(&rev.device, &rev.user)? {
            return Ok(0);
        }
        // The gate shuts the revoked device out of the account's topics (it
        // is disconnected if subscribed), but only after it had time to
        // hear of its revocation.
        self.gates_changed(REVOKED_GATE_GRACE);
        // This device's own revocation is always held: it stops sending.
        if self.e.directory.revoked.len() < MAX_REVOKED || rev.device == self.e.my_device {
            self.e.directory.revoked.insert(rev.device);
        }
        self.devices_changed();
        let peer = peer_id_of(&rev.device);
        for id in self.e.outbox.drop_peer(&peer) {
            self.db.remove_outbox(&id)?;
        }
        self.fx.push(Effect::Event(Event::Device {
            event: "revoked".into(),
            device_id: rev.device.to_string(),
        }));
        if rev.device == self.e.my_device {
            tracing::warn!("this device was revoked by its account");
            return Ok(0);
        }
        let convs: Vec<ConversationId> = self
            .e
            .convs
            .values()
            .filter(|c| c.active && c.members.contains(&rev.user))
            .map(|c| c.id)
            .collect();
        for id in &convs {
            self.rekey(id)?;
        }
        tracing::info!(device = %rev.device, conversations = convs.len(), "device revoked");
        // The account's own (hidden) conversation is rekeyed, not counted.
        let own = super::account::account_conversation(&self.e.my_user);
        Ok(convs.iter().filter(|c| **c != own).count())
    }

    /// Moves this device to a new sending chain in a conversation. The new
    /// chain is made, and handed to the member devices there are then, by
    /// the next message sent there.
    fn rekey(&mut self, id: &ConversationId) -> Result<(), EngineError> {
        let Some(conv) = self.e.convs.get_mut(id) else {
            return Ok(());
        };
        let old = conv.key_epoch;
        conv.key_epoch = old.saturating_add(1);
        let new = conv.key_epoch;
        self.e.chains.remove_sending(id, old);
        self.db.set_key_epoch(id, new)?;
        Ok(())
    }

    /// Tells every conversation, and the revoked device, of a revocation.
    fn announce_revocation(&mut self, rev: &Revocation) -> Result<(), EngineError> {
        let revoked_dh = self
            .db
            .device(&rev.device)?
            .and_then(|d| DeviceCertificate::from_stored_bytes(&d.cert).ok())
            .map(|c| (c.device, c.dh));
        let convs = self.active_convs();
        for conv in convs {
            let recipients = self.recipients(&conv)?;
            let mut devices = recipients.devices.clone();
            devices.extend(revoked_dh);
            let env = self.seal_to(conv.id, &devices, &Payload::Revoked(rev.clone()))?;
            self.send_envelope(&conv, &env, 0, 0, false, Ack::Publish)?;
        }
        Ok(())
    }

    /// A member's account revoked one of its devices.
    pub(super) fn receive_revocation(
        &mut self,
        env: &Envelope,
        conv_id: ConversationId,
        rev: Revocation,
    ) -> Result<Verdict, EngineError> {
        let Some(sender) = self.db.device(&env.header.sender)? else {
            return Ok(Verdict::Ignore);
        };
        if sender.user_id != rev.user || rev.verify().is_err() {
            return Ok(Verdict::Reject(
                "revocation not signed by the sender's account",
            ));
        }
        let mine = rev.device == self.e.my_device && rev.user == self.e.my_user;
        match self.db.device(&rev.device)? {
            Some(d) if d.user_id != rev.user => {
                return Ok(Verdict::Reject("revocation of another account's device"));
            }
            Some(_) => {
                self.apply_revocation(&rev)?;
            }
            None if mine => {
                self.apply_revocation(&rev)?;
            }
            // A device we have no certificate for: the revocation waits
            // until its account (the one that signed it) certifies it, so
            // nobody can lock out a device by naming it first.
            None => {
                let bytes =
                    postcard::to_stdvec(&rev).map_err(|e| EngineError::failed(e.to_string()))?;
                self.db.add_pending_revocation(
                    &rev.user,
                    &rev.device,
                    &bytes,
                    MAX_PENDING_REVOCATIONS,
                )?;
            }
        }
        self.store_envelope(env, &conv_id, 0, 0)?;
        Ok(Verdict::Accept)
    }

    /// `weft devices list`.
    pub(super) fn devices_list(&mut self) -> EngineResult<Vec<DeviceView>> {
        let mut out = Vec::new();
        for cert in self.my_certificates()? {
            out.push(DeviceView {
                device_id: cert.device.to_string(),
                peer_id: peer_id_of(&cert.device).to_string(),
                created_at: cert.created_at_ms,
                current: cert.device == self.e.my_device,
                connected: self.e.connected.contains(&peer_id_of(&cert.device)),
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_code_works_once_and_only_until_it_expires() {
        let mut linking = Linking::default();
        let expires = linking.issue([1; 16], 1_000);
        assert_eq!(expires, 1_000 + CODE_LIFETIME_MS);
        assert!(!linking.redeem(2_000, |s| *s == [2; 16]), "a wrong code");
        assert!(linking.redeem(2_000, |s| *s == [1; 16]));
        assert!(!linking.redeem(2_000, |s| *s == [1; 16]), "used twice");
        linking.issue([3; 16], 1_000);
        assert!(
            !linking.redeem(expires, |s| *s == [3; 16]),
            "used when it expired"
        );
    }

    #[test]
    fn history_is_asked_again_after_a_failure_with_backoff_until_it_came() {
        let mut linking = Linking::default();
        let start = tokio::time::Instant::now();
        let peer = PeerId::random();
        assert!(linking.may_ask_history(start));
        linking.history_started(peer);
        assert!(!linking.may_ask_history(start), "one transfer at a time");
        // Refused (the other device did not know this one yet): again after
        // 1 s, then 2 s (jitter 0.5 scales by 1).
        linking.history_failed(start, 0.5);
        assert!(!linking.may_ask_history(start + Duration::from_millis(999)));
        assert!(linking.may_ask_history(start + Duration::from_secs(1)));
        linking.history_started(peer);
        let later = start + Duration::from_secs(1);
        linking.history_failed(later, 0.5);
        assert!(!linking.may_ask_history(later + Duration::from_millis(1_999)));
        assert!(linking.may_ask_history(later + Duration::from_secs(2)));
        linking.history_done();
        assert!(!linking.may_ask_history(later + Duration::from_secs(3_600)));
    }

    #[test]
    fn the_oldest_code_goes_when_too_many_are_out() {
        let mut linking = Linking::default();
        for i in 0..=MAX_LINK_CODES as u8 {
            linking.issue([i; 16], 1_000 + i64::from(i));
        }
        assert!(!linking.redeem(2_000, |s| *s == [0; 16]));
        assert!(linking.redeem(2_000, |s| *s == [MAX_LINK_CODES as u8; 16]));
        assert!(linking.redeem(2_000, |s| *s == [1; 16]));
    }
}
