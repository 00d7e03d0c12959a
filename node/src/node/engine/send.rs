//! Sending: sealing a message with this device's chain (handing the
//! chain out first when it is new), sealing to devices, and sending an
//! envelope by gossip, directly and through relays.

use std::collections::HashSet;

use libp2p::PeerId;

use crate::api::{Event, SendView};
use crate::crypto::chain::SendingChain;
use crate::crypto::envelope;
use crate::crypto::envelope::{Envelope, Sealing};
use crate::ids::{ConversationId, DeviceId, EnvelopeId, MessageId};
use crate::net::NetCommand;
use crate::node::now_ms;
use crate::payload::{MAX_TEXT_BYTES, Payload, SenderKey, TextMessage};
use crate::store::{EnvelopeRecord, MessageRecord, MessageStatus, OutboxEntry};

use super::EngineError;
use super::{
    Ack, COUNTER_RESERVATION, Conv, Effect, EngineResult, SealedText, SendingSlot, State,
    fresh_key, routing_tag_of, run_effects,
};

impl State<'_, '_> {
    pub(super) fn send(
        &mut self,
        target: &str,
        text: String,
        reply_to: Option<&str>,
    ) -> EngineResult<SendView> {
        let sealed = self.seal_text(target, text, reply_to)?;
        self.store_sent(sealed)
    }

    /// The first half of `send`: checks, seals and publishes (at once when
    /// the counter is durable). The caller lets the network run before
    /// [`Self::store_sent`] does the writes, which the message need not
    /// wait for.
    pub(super) fn seal_text(
        &mut self,
        target: &str,
        text: String,
        reply_to: Option<&str>,
    ) -> Result<SealedText, EngineError> {
        if text.len() > MAX_TEXT_BYTES {
            return Err(EngineError::usage(format!(
                "message is {} bytes; the limit is {MAX_TEXT_BYTES}",
                text.len()
            )));
        }
        if text.trim().is_empty() {
            return Err(EngineError::usage("message is empty"));
        }
        let reply_to = match reply_to {
            Some(r) => Some(
                r.parse::<MessageId>()
                    .map_err(|_| EngineError::usage(format!("not a message id: {r}")))?,
            ),
            None => None,
        };
        let conv = self.active_conversation(target)?;
        let hlc = self.e.clock.now(now_ms().max(0) as u64);
        let payload = Payload::Text(TextMessage {
            text: text.clone(),
            reply_to,
            hlc,
            epoch: conv.epoch,
        });
        let (env, counter, early) = self.seal_chain_message(&conv, &payload.encode())?;
        self.publish(&conv, &env, early);
        Ok(SealedText {
            conv,
            env,
            counter,
            early,
            text,
            reply_to,
            hlc,
        })
    }

    /// The second half of `send`: the writes, the event and the reply.
    pub(super) fn store_sent(&mut self, sealed: SealedText) -> EngineResult<SendView> {
        let SealedText {
            conv,
            env,
            counter,
            early,
            text,
            reply_to,
            hlc,
        } = sealed;
        let conv_id = conv.id;
        let sent_at = hlc.ms() as i64;
        let reached =
            self.track_envelope(&conv, &env, conv.key_epoch, counter, early, Ack::Receipt)?;
        let status = if reached {
            MessageStatus::Sent
        } else {
            MessageStatus::Queued
        };
        let record = MessageRecord {
            id: env.id(),
            conversation: conv_id,
            sender_user: self.e.my_user,
            sender_device: self.e.my_device,
            sent_at_ms: sent_at,
            received_at_ms: sent_at,
            text,
            reply_to,
            status,
            edited: false,
            deleted: false,
            hlc: hlc.0,
            epoch: conv.epoch,
        };
        self.db.insert_message(&record)?;
        self.db.bump_conversation(&conv_id, sent_at, 0)?;
        let view = self.message_view(&record, false)?;
        self.fx.push(Effect::Event(Event::Message(view)));
        Ok(SendView {
            id: record.id.to_string(),
            conversation: conv_id.to_string(),
            status: status.as_str().to_string(),
        })
    }

    /// Seals a payload with this device's chain for the conversation's
    /// current epoch, creating and distributing the chain first if new.
    /// Returns the envelope and whether it may leave before the batch
    /// commits (its counter is below the durable reservation).
    pub(super) fn seal_chain_message(
        &mut self,
        conv: &Conv,
        plaintext: &[u8],
    ) -> Result<(Envelope, u64, bool), EngineError> {
        self.check_not_revoked()?;
        let tag = routing_tag_of(conv)?;
        if self.e.chains.sending(&conv.id, conv.key_epoch).is_none() {
            let slot = match self
                .db
                .get_chain(&conv.id, &self.e.my_device, conv.key_epoch)?
            {
                // What the disk holds is a reservation: resume there.
                Some(bytes) => {
                    let chain = SendingChain::from_bytes(&bytes)?;
                    let at = chain.counter();
                    SendingSlot {
                        chain,
                        durable_until: at,
                        reserved_until: at,
                    }
                }
                None => {
                    let chain = SendingChain::new(fresh_key()?);
                    self.distribute_chain(conv, &chain)?;
                    // Nothing of a new chain is durable until this commit.
                    SendingSlot {
                        chain,
                        durable_until: 0,
                        reserved_until: 0,
                    }
                }
            };
            self.e.chains.insert_sending(conv.id, conv.key_epoch, slot);
        }
        let slot = self
            .e
            .chains
            .sending_mut(&conv.id, conv.key_epoch)
            .ok_or_else(|| EngineError::failed("chain vanished"))?;
        let (counter, mk) = slot.chain.step()?;
        if slot.chain.counter() > slot.reserved_until {
            // Reserve the next block of counters in this transaction: after
            // a crash the chain resumes past every counter used before it.
            let reserved = slot.chain.advanced(COUNTER_RESERVATION)?;
            slot.reserved_until = reserved.counter();
            self.db.put_chain(
                &conv.id,
                &self.e.my_device,
                conv.key_epoch,
                &reserved.to_bytes(),
            )?;
        }
        let early = counter < slot.durable_until;
        let env = envelope::seal_chain(
            self.e.identity.device_signing_key(),
            tag,
            conv.key_epoch,
            counter,
            &mk,
            plaintext,
        )?;
        Ok((env, counter, early))
    }

    pub(super) fn distribute_chain(
        &mut self,
        conv: &Conv,
        chain: &SendingChain,
    ) -> Result<(), EngineError> {
        let recipients = self.recipients(conv)?;
        if recipients.devices.is_empty() {
            return Ok(());
        }
        self.send_chain_to(conv, &recipients.devices, chain.distribution())
    }

    /// Hands this device's sending chain for the conversation's epoch (its
    /// key and next counter) to `devices`, sealed to them.
    pub(super) fn send_chain_to(
        &mut self,
        conv: &Conv,
        devices: &[(DeviceId, [u8; 32])],
        (chain_key, next_counter): ([u8; 32], u64),
    ) -> Result<(), EngineError> {
        // Sealed to one-time keys where this device holds them.
        let devices = self.take_one_time_keys(devices)?;
        let payload = Payload::SenderKey(SenderKey {
            epoch: conv.key_epoch,
            chain_key,
            next_counter,
            sender_cert: self.e.identity.certificate().clone(),
            sender_name: self.e.name.clone(),
        });
        let env = self.seal_to(conv.id, &devices, &payload)?;
        self.send_envelope(conv, &env, conv.key_epoch, 0, false, Ack::Publish)?;
        Ok(())
    }

    pub(super) fn seal_to(
        &self,
        conv: ConversationId,
        recipients: &[(DeviceId, [u8; 32])],
        payload: &Payload,
    ) -> Result<Envelope, EngineError> {
        self.check_not_revoked()?;
        let tag = match self.e.convs.get(&conv) {
            Some(c) => routing_tag_of(c)?,
            None => return Err(EngineError::failed("no such conversation")),
        };
        Ok(envelope::seal_to_devices(
            self.e.identity.device_signing_key(),
            tag,
            conv,
            recipients,
            fresh_key()?,
            fresh_key()?,
            // Wiped once sealed: a sender key's chain key is in it.
            &zeroize::Zeroizing::new(payload.encode()),
        )?)
    }

    /// Sends a freshly made envelope: gossip to the topic (flood-published
    /// to every peer known to be subscribed), directly to member peers that
    /// are connected but not (yet) known to be subscribed, and remembers
    /// who is still missing it (for messages: every member device until it
    /// acknowledges). Returns whether any member peer was reached.
    pub(super) fn send_envelope(
        &mut self,
        conv: &Conv,
        env: &Envelope,
        epoch: u64,
        counter: u64,
        early: bool,
        ack: Ack,
    ) -> Result<bool, EngineError> {
        self.publish(conv, env, early);
        self.track_envelope(conv, env, epoch, counter, early, ack)
    }

    /// Floods an envelope on the conversation's topic (now if `early`).
    pub(super) fn publish(&mut self, conv: &Conv, env: &Envelope, early: bool) {
        if self.e.net_online {
            let publish = Effect::Net(NetCommand::Publish {
                topic: conv.topic.clone(),
                data: env.bytes().to_vec(),
            });
            self.later_or_now(publish, early);
        }
    }

    /// [`Self::send_envelope`] after the publish: offers, deposits, the
    /// envelope's row and its outbox entry.
    pub(super) fn track_envelope(
        &mut self,
        conv: &Conv,
        env: &Envelope,
        epoch: u64,
        counter: u64,
        early: bool,
        ack: Ack,
    ) -> Result<bool, EngineError> {
        let targets = self.recipients(conv)?;
        let targets = &targets.peers;
        let mut missing = HashSet::new();
        let mut reached = false;
        if self.e.net_online {
            let subscribed = self.e.topics.subscribers(&conv.topic);
            let mut direct = Vec::new();
            for peer in targets.iter() {
                if subscribed.is_some_and(|s| s.contains(peer)) {
                    reached = true;
                    if ack == Ack::Receipt {
                        missing.insert(*peer);
                    }
                } else {
                    missing.insert(*peer);
                    if self.e.connected.contains(peer) {
                        direct.push(*peer);
                    }
                }
            }
            for peer in direct {
                self.offer(peer, env.id(), env.bytes().to_vec(), early);
            }
            // Devices that are away: their relays hold it for them.
            let away: Vec<(PeerId, EnvelopeId, Vec<u8>)> = missing
                .iter()
                .filter(|p| !self.e.connected.contains(p))
                .map(|p| (*p, env.id(), env.bytes().to_vec()))
                .collect();
            if !away.is_empty() {
                self.deposit(away);
            }
        } else {
            // Offline: everyone is missing it; the daemon will send it.
            missing = targets.iter().copied().collect();
        }
        let now = now_ms();
        self.db.insert_envelope(&EnvelopeRecord {
            id: env.id(),
            conversation: conv.id,
            sender_device: self.e.my_device,
            epoch,
            counter,
            bytes: env.bytes().to_vec(),
            received_at_ms: now,
            sealed: matches!(env.header.sealing, Sealing::Sealed { .. }),
        })?;
        if !missing.is_empty() {
            let expiry =
                i64::try_from(self.e.settings.outbox_expiry.as_millis()).unwrap_or(i64::MAX);
            self.db.enqueue_outbox(&OutboxEntry {
                envelope_id: env.id(),
                conversation: conv.id,
                bytes: env.bytes().to_vec(),
                created_at_ms: now,
                attempts: 0,
                next_attempt_at_ms: now + self.retry_delay_ms(0),
                expires_at_ms: now.saturating_add(expiry),
            })?;
            self.e.outbox.track(env.id(), conv.id, missing);
        }
        Ok(reached)
    }

    /// Runs an effect now (`early`: safe before the commit) or after it.
    pub(super) fn later_or_now(&mut self, effect: Effect, early: bool) {
        if early {
            self.outlets.sent_early.set(true);
            run_effects(self.outlets, vec![effect]);
        } else {
            self.fx.push(effect);
        }
    }
}
