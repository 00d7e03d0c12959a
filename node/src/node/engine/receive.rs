//! Receiving an envelope, whatever the path (gossip, direct, relay,
//! pending): checks, opening, and what each payload does; chains moving
//! on, gaps, and envelopes kept until they can be placed.

use crate::api::Event;
use crate::crypto::CryptoError;
use crate::crypto::chain::ReceivingChain;
use crate::crypto::envelope::{Envelope, Sealing};
use crate::group::GroupState;
use crate::ids::{ConversationId, DeviceId, EnvelopeId, UserId};
use crate::net::NetCommand;
use crate::node::now_ms;
use crate::payload::{MAX_TEXT_BYTES, Payload, SenderKey};
use crate::store::{Binding, EnvelopeRecord, MessageRecord, MessageStatus, PendingFrom};

use super::EngineError;
use super::{
    Effect, Handed, PARALLEL_VERIFY_MIN, PENDING_PAGE_BYTES, PENDING_PAGE_ROWS, State, Verdict,
    Via, account, chains, fresh_key, groups, permissions, run_effects, tag_slot,
};

impl State<'_, '_> {
    /// Validates, opens and stores one envelope from the network.
    pub(super) fn receive(&mut self, bytes: &[u8], via: Via, topic: Option<&str>) -> Verdict {
        match self.try_receive(bytes, via, topic) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!("storage error while receiving: {e}");
                Verdict::Ignore
            }
        }
    }

    pub(super) fn try_receive(
        &mut self,
        bytes: &[u8],
        via: Via,
        topic: Option<&str>,
    ) -> Result<Verdict, EngineError> {
        let env = match Envelope::decode(bytes) {
            Ok(env) => env,
            Err(CryptoError::Version(v)) => {
                tracing::debug!("refused an envelope of version {v} (this node speaks 2)");
                return Ok(Verdict::Reject("envelope of another protocol version"));
            }
            Err(_) => return Ok(Verdict::Reject("malformed envelope")),
        };
        // On gossip, the tag must belong to the topic's conversation (both
        // derive from the same routing secret).
        let tagged = self.conversation_of_tag(&env.header.tag)?;
        if let Some(topic) = topic {
            let Some(topic_conv) = self.e.topics.conversation_of_topic(topic) else {
                return Ok(Verdict::Ignore);
            };
            if tagged.is_some_and(|c| c != topic_conv) {
                return Ok(Verdict::Reject("envelope for another conversation"));
            }
        }
        if env.header.sender == self.e.my_device {
            return Ok(Verdict::Ignore);
        }
        let id = env.id();
        if self.db.has_envelope(&id)? {
            // Stored once, whatever the path. Not a strike even on gossip:
            // an honest envelope can come both directly (an offer to a peer
            // whose subscription was not known yet, a retry) and by gossip,
            // and penalising the forwarder for that banned honest peers
            // under load. A replaying peer gains nothing from it.
            if matches!(via, Via::Direct(_)) {
                // Offered again: its sender may have missed our receipt.
                self.acknowledge_again(&id)?;
            }
            return Ok(Verdict::Ignore);
        }
        if !self.verified.remove(&id) {
            let Some(key) = self.verifying_key(&env.header.sender) else {
                return Ok(Verdict::Reject("bad signature"));
            };
            if env.verify_with(&key).is_err() {
                return Ok(Verdict::Reject("bad signature"));
            }
        }
        if self.is_revoked(&env.header.sender)? {
            // Not a strike: an honest peer may forward it before it hears
            // of the revocation.
            return Ok(Verdict::Ignore);
        }
        match env.header.sealing.clone() {
            Sealing::Sealed { .. } => self.receive_sealed(&env, tagged, topic, via),
            Sealing::Chain { epoch, counter } => match tagged {
                Some(conv_id) => self.receive_chain(&env, conv_id, epoch, counter, via),
                None => {
                    // A tag we do not know (yet): a group whose state is
                    // on its way. It waits under its tag.
                    self.keep_pending(&env, &tag_slot(&env.header.tag), via)?;
                    Ok(Verdict::Ignore)
                }
            },
        }
    }

    /// A device's key, decoded (kept for its next envelope).
    pub(super) fn verifying_key(
        &mut self,
        device: &DeviceId,
    ) -> Option<ed25519_dalek::VerifyingKey> {
        self.e.chains.verifying_key(device)
    }

    /// Checks the signatures of many envelopes ahead of receiving them one
    /// by one: half on this thread, half on another (signature checks are
    /// most of the cost of taking in a backlog). Those that pass are not
    /// checked again; the rest are, and are refused as usual.
    pub(super) fn preverify<'b>(&mut self, envelopes: impl IntoIterator<Item = &'b [u8]>) {
        let mut work = Vec::new();
        for bytes in envelopes {
            if let Ok(env) = Envelope::decode(bytes)
                && let Some(key) = self.verifying_key(&env.header.sender)
            {
                work.push((env, key));
            }
        }
        if work.len() < PARALLEL_VERIFY_MIN {
            return;
        }
        let check = |part: &[(Envelope, ed25519_dalek::VerifyingKey)]| -> Vec<EnvelopeId> {
            part.iter()
                .filter(|(env, key)| env.verify_with(key).is_ok())
                .map(|(env, _)| env.id())
                .collect()
        };
        let (theirs, mine) = work.split_at(work.len() / 2);
        let (a, b) = std::thread::scope(|s| {
            let other = s.spawn(|| check(theirs));
            let b = check(mine);
            // A panicked helper verified nothing: its envelopes are
            // checked again one by one.
            (other.join().unwrap_or_default(), b)
        });
        self.verified.extend(a);
        self.verified.extend(b);
    }

    pub(super) fn sender_user(&mut self, device: &DeviceId) -> Result<Option<UserId>, EngineError> {
        if let Some(user) = self.e.directory.device_user(device) {
            return Ok(user);
        }
        let user = self
            .db
            .device(device)?
            .filter(|d| !d.revoked)
            .map(|d| d.user_id);
        self.e.directory.keep_device_user(*device, user);
        Ok(user)
    }

    /// Keeps an envelope that cannot be taken yet, under its conversation
    /// (or, for a tag not known yet, under [`tag_slot`]), in the share of
    /// whoever handed it over and of its sender. A peer that sent it
    /// directly and so went over its share, or its sender's, is penalised:
    /// an honest peer sends what it could check, and does not send
    /// thousands we cannot place. A gossip forwarder or a relay is not: it
    /// passes on what it could not check.
    pub(super) fn keep_pending(
        &mut self,
        env: &Envelope,
        slot: &ConversationId,
        via: Via,
    ) -> Result<(), EngineError> {
        let handed = via.handed();
        let evicted = self.db.add_pending(
            slot,
            env.bytes(),
            &env.header.sender,
            &handed.stored(),
            now_ms(),
            &self.e.settings.pending_caps,
        )?;
        if evicted != Default::default() {
            tracing::debug!(?handed, ?evicted, "pending queue over a cap");
        }
        // Only as it comes: one kept again when taken again was counted
        // then.
        if let (Via::Direct(Handed::SentBy(peer)), true) =
            (via, evicted.by_peer > 0 || evicted.by_sender > 0)
        {
            self.fx.push(Effect::Net(NetCommand::Penalize {
                peer,
                reason: "more envelopes that cannot be placed than its share",
            }));
        }
        Ok(())
    }

    pub(super) fn receive_sealed(
        &mut self,
        env: &Envelope,
        tagged: Option<ConversationId>,
        topic: Option<&str>,
        via: Via,
    ) -> Result<Verdict, EngineError> {
        if let Some(opened) = self.open_with_one_time_key(env)? {
            let verdict =
                self.receive_opened(env, opened.conv, &opened.plain, tagged, topic, via)?;
            // Spent once the envelope is stored: it is never opened again.
            // One kept pending (a group not known yet) or set aside (a
            // blocked sender) may have to open again later.
            if self.db.has_envelope(&env.id())? {
                self.one_time_key_used(&opened.key, env.header.sender)?;
            }
            return Ok(verdict);
        }
        let keys = self.opening_keys()?;
        let keys: Vec<&x25519_dalek::StaticSecret> = keys.iter().collect();
        let (conv_id, plain) = match env.open_sealed_any(&self.e.my_device, &keys) {
            Ok((conv_id, plain)) => (conv_id, zeroize::Zeroizing::new(plain)),
            Err(CryptoError::NotARecipient) => {
                // For other members (e.g. keys for a later epoch): forward
                // it if a member sent it under a tag we know.
                let Some(conv_id) = tagged else {
                    return Ok(Verdict::Ignore);
                };
                let member = self.sender_user(&env.header.sender)?.is_some_and(|u| {
                    self.e
                        .convs
                        .get(&conv_id)
                        .is_some_and(|c| c.members.contains(&u))
                });
                if !member {
                    return Ok(Verdict::Ignore);
                }
                // Kept so that catch-up can hand it to the members it is for.
                self.store_envelope(env, &conv_id, 0, 0)?;
                return Ok(Verdict::Accept);
            }
            Err(CryptoError::Decrypt) if self.sender_user(&env.header.sender)?.is_some() => {
                // Signed by a device we know: sealed to a key erased since
                // (an old envelope offered again), not junk.
                return Ok(Verdict::Ignore);
            }
            Err(_) => return Ok(Verdict::Reject("sealed envelope does not open")),
        };
        self.receive_opened(env, conv_id, &plain, tagged, topic, via)
    }

    /// A sealed envelope opened: its conversation checked against how it
    /// came, its payload taken.
    pub(super) fn receive_opened(
        &mut self,
        env: &Envelope,
        conv_id: ConversationId,
        plain: &[u8],
        tagged: Option<ConversationId>,
        topic: Option<&str>,
        via: Via,
    ) -> Result<Verdict, EngineError> {
        // The tag, where we know it, must name the conversation inside; on
        // gossip, so must the topic.
        if tagged.is_some_and(|c| c != conv_id)
            || topic.is_some_and(|t| self.e.topics.conversation_of_topic(t) != Some(conv_id))
        {
            return Ok(Verdict::Reject("envelope for another conversation"));
        }
        let Some(payload) = Payload::decode(plain) else {
            return Ok(Verdict::Reject("malformed payload"));
        };
        match payload {
            Payload::SenderKey(sk) => self.receive_sender_key(env, conv_id, sk, via),
            Payload::Devices(certs) => self.receive_devices(env, conv_id, certs),
            Payload::Revoked(revocation) => self.receive_revocation(env, conv_id, revocation),
            Payload::Group(state) => self.receive_group(env, conv_id, state),
            Payload::HandoutKey(key) => self.receive_handout_key(env, conv_id, key),
            Payload::OneTimeKeys(batches) => self.receive_one_time_keys(env, conv_id, batches),
            Payload::Text(_) | Payload::Receipt(_) | Payload::Annotate(_) | Payload::Account(_) => {
                Ok(Verdict::Reject("messages must be chain-sealed"))
            }
        }
    }

    /// Retries what waits for a gap, in conversations where this batch
    /// stored chain envelopes (the gap may be filled now).
    pub(super) fn fill_gaps(&mut self) {
        let convs: Vec<ConversationId> = self
            .chain_stored
            .iter()
            .filter(|c| self.e.gaps.contains(c))
            .copied()
            .collect();
        for conv in convs {
            self.e.gaps.remove(&conv);
            // Anything still too far ahead puts the conversation back.
            self.reprocess_pending(&conv);
        }
    }

    pub(super) fn store_envelope(
        &mut self,
        env: &Envelope,
        conv_id: &ConversationId,
        epoch: u64,
        counter: u64,
    ) -> Result<(), EngineError> {
        if matches!(env.header.sealing, Sealing::Chain { .. }) {
            self.chain_stored.insert(*conv_id);
        }
        self.db.insert_envelope(&EnvelopeRecord {
            id: env.id(),
            conversation: *conv_id,
            sender_device: env.header.sender,
            epoch,
            counter,
            bytes: env.bytes().to_vec(),
            received_at_ms: now_ms(),
            sealed: matches!(env.header.sealing, Sealing::Sealed { .. }),
        })?;
        Ok(())
    }

    pub(super) fn receive_sender_key(
        &mut self,
        env: &Envelope,
        conv_id: ConversationId,
        sk: SenderKey,
        via: Via,
    ) -> Result<Verdict, EngineError> {
        let cert = &sk.sender_cert;
        if cert.device != env.header.sender || cert.verify().is_err() {
            return Ok(Verdict::Reject("sender key with a foreign certificate"));
        }
        // Weft checks names wherever they are set: one that fails was
        // crafted (to drive a terminal or pass for someone else).
        if crate::identity::validate_name(&sk.sender_name).is_err() {
            return Ok(Verdict::Reject("sender key with an invalid name"));
        }
        let user = cert.user;
        if self.e.directory.blocked.contains(&user) {
            return Ok(Verdict::Ignore);
        }
        if !self.e.convs.contains_key(&conv_id) {
            if conv_id == ConversationId::direct(&self.e.my_user, &user) {
                // A first message from someone who has our invite.
                if let Binding::OtherUser(_) = self.bind_device(cert)? {
                    return Ok(Verdict::Reject("a device of another account"));
                }
                self.db.upsert_user(&user, &sk.sender_name, now_ms())?;
                let name = sk.sender_name.clone();
                self.ensure_direct(&user, &name)?;
            } else {
                // A group we have not heard of yet: its state may follow.
                self.keep_pending(env, &conv_id, via)?;
                return Ok(if via.is_gossip() {
                    Verdict::Ignore
                } else {
                    Verdict::Accept
                });
            }
        }
        let is_member = self
            .e
            .convs
            .get(&conv_id)
            .is_some_and(|c| c.members.contains(&user));
        if !is_member {
            self.keep_pending(env, &conv_id, via)?;
            return Ok(Verdict::Ignore);
        }
        // A direct contact's device we learn about here must be certified by
        // that contact's user key, which `cert.verify` established.
        if let Binding::OtherUser(_) = self.bind_device(cert)? {
            return Ok(Verdict::Reject("a device of another account"));
        }
        if self
            .db
            .get_chain(&conv_id, &cert.device, sk.epoch)?
            .is_none()
        {
            let chain = ReceivingChain::new(sk.chain_key, sk.next_counter);
            self.db
                .put_chain(&conv_id, &cert.device, sk.epoch, &chain.to_bytes())?;
            self.cache_chain((conv_id, cert.device, sk.epoch), chain);
        }
        self.store_envelope(env, &conv_id, sk.epoch, 0)?;
        self.reprocess_pending(&conv_id);
        Ok(Verdict::Accept)
    }

    pub(super) fn cache_chain(
        &mut self,
        key: (ConversationId, DeviceId, u64),
        chain: ReceivingChain,
    ) {
        let unwritten = self.e.chains.insert_receiving(key, chain, false);
        self.write_chains(unwritten);
    }

    /// Writes the receiving chains this batch moved on (once each, however
    /// many envelopes moved them), before the batch commits.
    pub(super) fn save_chains(&mut self) {
        let moved_on = self.e.chains.take_moved_on();
        self.write_chains(moved_on);
    }

    fn write_chains(&mut self, chains: Vec<(chains::ChainKey, ReceivingChain)>) {
        for (key, chain) in chains {
            if let Err(e) = self.db.put_chain(&key.0, &key.1, key.2, &chain.to_bytes()) {
                tracing::error!("cannot save a receiving chain: {e}");
            }
        }
    }

    pub(super) fn receive_group(
        &mut self,
        env: &Envelope,
        conv_id: ConversationId,
        state: GroupState,
    ) -> Result<Verdict, EngineError> {
        if state.id != conv_id {
            return Ok(Verdict::Reject("group state for another conversation"));
        }
        // Only a group's id takes a group state: a one-to-one or account
        // conversation's would hand its key to whoever the state names.
        let held = self.e.convs.get(&state.id).map(|c| c.kind);
        if let Err(why) = permissions::group_state_target(held, &state.id) {
            return Ok(Verdict::Reject(why));
        }
        // The author is whoever owns the signing device, as certified in the
        // current or the new state.
        let current = self.e.convs.get(&state.id).and_then(|c| c.group.clone());
        let author =
            permissions::group_state_author(current.as_deref(), &state, &env.header.sender);
        let Some(author) = author else {
            return Ok(Verdict::Reject("group change from an unknown device"));
        };
        // A device belongs to the account it was first bound to.
        for m in &state.members {
            for d in &m.devices {
                if self
                    .db
                    .device(&d.device)?
                    .is_some_and(|known| known.user_id != m.user)
                {
                    return Ok(Verdict::Reject(
                        "group state moves a device to another account",
                    ));
                }
            }
        }
        if self.e.directory.blocked.contains(&author) && current.is_none() {
            return Ok(Verdict::Ignore);
        }
        match state.check_transition(current.as_deref(), &author) {
            Ok(()) => {}
            Err(crate::group::GroupError::Stale) => {
                // Envelopes sent under the state that lost still carry its
                // tag: keep recognising it.
                let tag = state.routing().tag();
                self.db.add_routing_tag(&tag, &state.id)?;
                self.tag_found(tag, state.id);
                self.store_envelope(env, &conv_id, state.epoch, 0)?;
                return Ok(Verdict::Accept);
            }
            Err(e) => {
                tracing::debug!("group change refused: {e}");
                return Ok(Verdict::Reject("group change not allowed"));
            }
        }
        if current.is_none() {
            if state.member(&self.e.my_user).is_none() {
                return Ok(Verdict::Ignore);
            }
            self.db
                .insert_conversation(&groups::new_group_record(&state))?;
        }
        self.apply_group(&state, &[])?;
        self.store_envelope(env, &conv_id, state.epoch, 0)?;
        self.reprocess_pending(&state.id);
        // A member who left chose the new epoch's routing secret: an
        // admin moves the group on to one the leaver does not know.
        if permissions::moves_on_after_leave(&state, &author, &self.e.my_user) {
            let mut next = state.clone();
            // Saturating: a state at the last epoch is refused as invalid.
            next.epoch = next.epoch.saturating_add(1);
            next.routing = fresh_key()?;
            let conv = self.apply_group(&next, &[])?;
            self.announce_group(&conv, &next, &[])?;
        }
        Ok(Verdict::Accept)
    }

    pub(super) fn receive_chain(
        &mut self,
        env: &Envelope,
        conv_id: ConversationId,
        epoch: u64,
        counter: u64,
        via: Via,
    ) -> Result<Verdict, EngineError> {
        let Some(conv) = self.e.convs.get(&conv_id).cloned() else {
            self.keep_pending(env, &conv_id, via)?;
            return Ok(Verdict::Ignore);
        };
        let Some(user) = self.sender_user(&env.header.sender)? else {
            // A device we have not met: its key (with its certificate) may
            // still be on the way.
            self.keep_pending(env, &conv_id, via)?;
            return Ok(Verdict::Ignore);
        };
        if !conv.members.contains(&user) {
            return Ok(Verdict::Reject("sender is not a member"));
        }
        if !conv.active {
            return Ok(Verdict::Ignore);
        }
        let key = (conv_id, env.header.sender, epoch);
        let now = now_ms();
        let chain = match self.e.chains.receiving(&key) {
            Some(c) => Some(c.clone()),
            None => match self.db.get_chain(&conv_id, &env.header.sender, epoch)? {
                Some(bytes) => Some(ReceivingChain::from_bytes(&bytes, now)?),
                None => None,
            },
        };
        let Some(chain) = chain else {
            self.keep_pending(env, &conv_id, via)?;
            // A member's envelope we cannot read yet: still forward it.
            return Ok(if via.is_gossip() {
                Verdict::Accept
            } else {
                Verdict::Ignore
            });
        };
        let (mk, after) = match chain.key_for(counter, now, self.e.settings.skipped_key_max_age) {
            Ok(x) => x,
            // Its key was kept for it as long as promised: it stays unread.
            Err(CryptoError::SkippedKeyExpired(_)) => return Ok(Verdict::Ignore),
            // A key already used: a replay on gossip; on a direct stream,
            // most likely an honest retry of something we have.
            Err(CryptoError::Replay(_)) if !via.is_gossip() => return Ok(Verdict::Ignore),
            Err(CryptoError::Replay(_)) => return Ok(Verdict::Reject("message key already used")),
            // Far ahead of what we hold: we missed many of this sender's
            // messages (we were away). Keep it until catch-up fills the gap.
            Err(CryptoError::TooFarAhead { .. }) => {
                self.keep_pending(env, &conv_id, via)?;
                self.e.gaps.insert(conv_id);
                self.catch_up(conv_id);
                return Ok(if via.is_gossip() {
                    Verdict::Accept
                } else {
                    Verdict::Ignore
                });
            }
            Err(_) => return Ok(Verdict::Reject("counter out of range")),
        };
        let Ok(plain) = env.open_chain(&mk).map(zeroize::Zeroizing::new) else {
            return Ok(Verdict::Reject("does not decrypt"));
        };
        let Some(payload) = Payload::decode(&plain) else {
            return Ok(Verdict::Reject("malformed payload"));
        };
        let blocked = self.e.directory.blocked.contains(&user);
        let t = match payload {
            Payload::Text(t) if t.text.len() > MAX_TEXT_BYTES => {
                return Ok(Verdict::Reject("text over the length limit"));
            }
            Payload::Text(t) => t,
            Payload::Receipt(receipt) => {
                self.advance_chain(key, after)?;
                self.store_envelope(env, &conv_id, epoch, counter)?;
                if !blocked {
                    self.receive_receipt(&conv, user, env.header.sender, receipt)?;
                }
                return Ok(Verdict::Accept);
            }
            Payload::Annotate(a) => {
                self.advance_chain(key, after)?;
                self.store_envelope(env, &conv_id, epoch, counter)?;
                if blocked {
                    return Ok(Verdict::Accept);
                }
                return Ok(
                    match self.receive_annotation(&conv, user, env.header.sender, a) {
                        Ok(()) => Verdict::Accept,
                        Err(why) => Verdict::Reject(why),
                    },
                );
            }
            Payload::Account(a) => {
                let account = account::account_conversation(&self.e.my_user);
                if !permissions::may_change_account(&conv_id, &account, &user, &self.e.my_user) {
                    return Ok(Verdict::Reject("account state outside the account"));
                }
                self.advance_chain(key, after)?;
                self.store_envelope(env, &conv_id, epoch, counter)?;
                return Ok(match self.receive_account_change(env.header.sender, a) {
                    Ok(()) => Verdict::Accept,
                    Err(why) => Verdict::Reject(why),
                });
            }
            _ => return Ok(Verdict::Reject("unexpected chain-sealed payload")),
        };
        let now = now_ms();
        // A clock far in the future is clamped, and ours moves past it.
        let hlc = self.e.clock.observe(t.hlc, now.max(0) as u64);
        // Another device of this account may have read this far already.
        let read = user != self.e.my_user && hlc.0 <= self.read_position(&conv_id);
        let record = MessageRecord {
            id: env.id(),
            conversation: conv_id,
            sender_user: user,
            sender_device: env.header.sender,
            sent_at_ms: hlc.ms() as i64,
            received_at_ms: now,
            text: t.text,
            reply_to: t.reply_to,
            status: if read {
                MessageStatus::Read
            } else {
                MessageStatus::Delivered
            },
            edited: false,
            deleted: false,
            hlc: hlc.0,
            epoch: t.epoch,
        };
        if !blocked {
            self.typing_done(conv_id, user);
            // Shown at once, before the writes and the commit: the envelope
            // is authentic, new (not stored, its key unused) and opened.
            // Nothing is promised to the sender on the strength of this
            // event (acknowledgements wait for the commit), so showing it
            // early risks nothing and takes the writes off the latency.
            let view = self.message_view(&record, false)?;
            run_effects(self.outlets, vec![Effect::Event(Event::Message(view))]);
        }
        self.advance_chain(key, after)?;
        self.store_envelope(env, &conv_id, epoch, counter)?;
        // Blocked: verified and forwarded (the group keeps working), but
        // neither stored as a message nor shown.
        if !blocked && self.db.insert_message(&record)? {
            let unread = u32::from(user != self.e.my_user && !read);
            self.db
                .bump_conversation(&conv_id, record.sent_at_ms, unread)?;
            if user != self.e.my_user {
                self.delivered.push((conv_id, record.id));
            }
            self.annotations_waiting(&conv, &record.id);
        }
        Ok(Verdict::Accept)
    }

    /// Stores a receiving chain's state after a key was taken from it.
    pub(super) fn advance_chain(
        &mut self,
        key: (ConversationId, DeviceId, u64),
        after: Option<ReceivingChain>,
    ) -> Result<(), EngineError> {
        if let Some(after) = after {
            // Written once at the end of the batch.
            let unwritten = self.e.chains.insert_receiving(key, after, true);
            self.write_chains(unwritten);
        }
        Ok(())
    }

    /// Retries envelopes of a conversation that were waiting for a key or a
    /// membership change. Asked while a pass runs (an envelope it took in
    /// opened others), the conversation is taken in after that pass: each
    /// further pass follows an envelope stored or a tag learnt, so they
    /// end.
    pub(super) fn reprocess_pending(&mut self, conv: &ConversationId) {
        if let Some(due) = &mut self.pending_passes {
            if !due.contains(conv) {
                due.push(*conv);
            }
            return;
        }
        self.pending_passes = Some(Vec::new());
        let mut next = Some(*conv);
        while let Some(conv) = next {
            self.pending_pass(&conv);
            next = match &mut self.pending_passes {
                Some(due) if !due.is_empty() => Some(due.remove(0)),
                _ => None,
            };
        }
        self.pending_passes = None;
    }

    /// One pass over a conversation's pending envelopes, a page at a time.
    /// Those that still cannot be placed are kept again, after the rows
    /// there were when the pass started, which is where it stops. Junk
    /// found now (a signature, a decryption or a membership that fails)
    /// costs the peer that sent it directly.
    fn pending_pass(&mut self, conv: &ConversationId) {
        let through = match self.db.pending_high_water() {
            Ok(rowid) => rowid,
            Err(e) => {
                tracing::warn!("pending read: {e}");
                return;
            }
        };
        let mut after = 0;
        loop {
            let page = match self.db.pending_page(
                conv,
                after,
                through,
                PENDING_PAGE_ROWS,
                PENDING_PAGE_BYTES,
            ) {
                Ok(page) => page,
                Err(e) => {
                    tracing::warn!("pending read: {e}");
                    return;
                }
            };
            let Some(last) = page.last() else {
                return;
            };
            after = last.rowid;
            self.preverify(page.iter().map(|row| row.bytes.as_slice()));
            for row in page {
                // Taken once: a row an envelope of this page took in the
                // meantime (its key came, and with it a pass of its own) is
                // gone.
                match self.db.remove_pending(row.rowid) {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(e) => {
                        tracing::warn!("pending removal: {e}");
                        continue;
                    }
                }
                let handed = Handed::from_stored(&row.from);
                let verdict = self.receive(&row.bytes, Via::Pending(handed), None);
                if let (Verdict::Reject(why), Handed::SentBy(peer)) = (verdict, handed) {
                    tracing::debug!(%peer, "a pending envelope it sent is junk: {why}");
                    self.fx
                        .push(Effect::Net(NetCommand::Penalize { peer, reason: why }));
                }
            }
        }
    }
}

impl Handed {
    /// As a pending row records it.
    fn stored(self) -> PendingFrom {
        match self {
            Handed::Locally => PendingFrom {
                peer: Vec::new(),
                liable: false,
            },
            Handed::ForwardedBy(peer) => PendingFrom {
                peer: peer.to_bytes(),
                liable: false,
            },
            Handed::SentBy(peer) => PendingFrom {
                peer: peer.to_bytes(),
                liable: true,
            },
        }
    }

    /// As a pending row recorded it (rows kept before peers were recorded,
    /// and any whose peer does not parse, count as handed over locally).
    fn from_stored(from: &PendingFrom) -> Self {
        match libp2p::PeerId::from_bytes(&from.peer) {
            Ok(peer) if from.liable => Handed::SentBy(peer),
            Ok(peer) => Handed::ForwardedBy(peer),
            Err(_) => Handed::Locally,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn who_handed_an_envelope_over_survives_the_pending_queue() {
        let peer = libp2p::PeerId::random();
        for handed in [
            Handed::Locally,
            Handed::ForwardedBy(peer),
            Handed::SentBy(peer),
        ] {
            assert_eq!(Handed::from_stored(&handed.stored()), handed);
        }
        // Only what a peer sent on its own account is its to answer for;
        // gossip forwarding is not.
        assert_eq!(Via::Gossip(peer).handed(), Handed::ForwardedBy(peer));
        assert!(!Via::Gossip(peer).handed().stored().liable);
        let unknown = PendingFrom {
            peer: vec![1, 2, 3],
            liable: true,
        };
        assert_eq!(Handed::from_stored(&unknown), Handed::Locally);
    }
}
