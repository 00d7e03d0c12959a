//! Delivered and read receipts: acknowledging what this device stored and
//! what its user read, and folding the acknowledgements of others into
//! each message's status ("delivered to 3 of 5, read by 2 of 5").
//!
//! A receipt is a chain-sealed envelope in the conversation like any
//! message: signed, encrypted, gossiped, retried and caught up alike.

use std::collections::HashMap;

use crate::api::Event;
use crate::api::{Progress, ReadView, ReceiptView};
use crate::identity::peer_id_of;
use crate::ids::{ConversationId, DeviceId, MessageId, UserId};
use crate::node::now_ms;
use crate::payload::Payload;
use crate::payload::{MAX_RECEIPT_IDS, Receipt, ReceiptKind};
use crate::store::{MessageRecord, MessageStatus};

use super::EngineError;
use super::receipt_tally::{self, ReceiptEffect};
use super::{Ack, Conv, Effect, EngineResult, State};

/// Most messages marked read (and acknowledged) by one `read`.
const MAX_READ: usize = 10_000;

impl State<'_, '_> {
    /// Sends delivered receipts for the messages stored and not yet
    /// acknowledged; they leave once the batch's commit is on the disk.
    pub(super) fn flush_delivered(&mut self) {
        let mut by_conv: HashMap<ConversationId, Vec<MessageId>> = HashMap::new();
        for (conv, id) in std::mem::take(self.delivered) {
            by_conv.entry(conv).or_default().push(id);
        }
        if by_conv.is_empty() {
            return;
        }
        // Their effects wait for the commit to be durable, apart from the
        // batch's others.
        let others = std::mem::take(self.fx);
        for (conv, ids) in by_conv {
            if let Err(e) = self.send_receipt(conv, ReceiptKind::Delivered, &ids) {
                tracing::warn!("delivered receipt not sent: {e}");
            }
        }
        let receipts = std::mem::replace(self.fx, others);
        self.durable_fx.extend(receipts);
    }

    /// Acknowledges a message from someone else once more: it was offered
    /// again, so its sender may never have had our receipt.
    pub(super) fn acknowledge_again(&mut self, id: &MessageId) -> Result<(), EngineError> {
        let Some(m) = self.db.message(id)? else {
            return Ok(());
        };
        if m.sender_user != self.e.my_user && !self.delivered.iter().any(|(_, d)| d == id) {
            self.delivered.push((m.conversation, *id));
        }
        Ok(())
    }

    fn send_receipt(
        &mut self,
        conv: ConversationId,
        kind: ReceiptKind,
        ids: &[MessageId],
    ) -> Result<(), EngineError> {
        let Some(conv) = self.e.convs.get(&conv).cloned() else {
            return Ok(());
        };
        if !conv.active {
            return Ok(());
        }
        for chunk in ids.chunks(MAX_RECEIPT_IDS) {
            let payload = Payload::Receipt(Receipt {
                kind,
                messages: chunk.to_vec(),
            });
            let (env, counter, _) = self.seal_chain_message(&conv, &payload.encode())?;
            // After the commit: a receipt promises the messages are stored.
            self.send_envelope(&conv, &env, conv.key_epoch, counter, false, Ack::Publish)?;
        }
        Ok(())
    }

    /// A member device acknowledged messages.
    pub(super) fn receive_receipt(
        &mut self,
        conv: &Conv,
        user: UserId,
        device: DeviceId,
        receipt: Receipt,
    ) -> Result<(), EngineError> {
        let status = receipt_tally::status_of_receipt(receipt.kind);
        let peer = peer_id_of(&device);
        let now = now_ms();
        let mut read_elsewhere = false;
        for id in receipt.messages.iter().take(MAX_RECEIPT_IDS) {
            // A receipt may come before its message (kept for when it
            // comes), but one about a message of another conversation is
            // not the sender's to give here.
            let message = self.db.message(id)?;
            if message.as_ref().is_some_and(|m| m.conversation != conv.id) {
                continue;
            }
            if !self.db.add_receipt(id, &device, &user, status, now)? {
                continue;
            }
            // That device has the envelope: no need to offer it again.
            self.reached(id, &peer);
            let Some(m) = message else {
                continue;
            };
            match receipt_tally::effect_of(&user, status, &self.e.my_user, &m.sender_user, m.status)
            {
                ReceiptEffect::ReadHere => {
                    self.db.set_message_status(id, MessageStatus::Read)?;
                    read_elsewhere = true;
                }
                ReceiptEffect::Recount => self.update_progress(conv, &m)?,
                ReceiptEffect::Nothing => {}
            }
        }
        if read_elsewhere {
            // Whichever comes first, this receipt or the account's read
            // position, leaves the count right.
            self.db.recount_unread(&conv.id, &self.e.my_user)?;
        }
        Ok(())
    }

    /// Moves one of this user's messages to `delivered` or `read` once
    /// every recipient has got that far, and tells `watch`.
    fn update_progress(&mut self, conv: &Conv, m: &MessageRecord) -> Result<(), EngineError> {
        let receipts = self.db.receipts(&m.id)?;
        let progress =
            receipt_tally::progress(&conv.members, &m.sender_user, &self.e.my_user, &receipts);
        let target = receipt_tally::status_at(progress);
        self.db.set_message_status(&m.id, target)?;
        let status = self.db.message(&m.id)?.map_or(target, |m| m.status);
        self.fx.push(Effect::Event(Event::Status {
            id: m.id.to_string(),
            conversation: conv.id.to_string(),
            status: status.as_str().to_string(),
            progress: Some(progress),
        }));
        Ok(())
    }

    /// Per member (other than the sender), how far the message has got;
    /// and the sender's view of the whole.
    pub(super) fn receipt_views(
        &self,
        conv: &Conv,
        r: &MessageRecord,
    ) -> Result<(Vec<ReceiptView>, Progress), EngineError> {
        let receipts = self.db.receipts(&r.id)?;
        let mut views = Vec::new();
        for user in conv.members.iter().filter(|u| **u != r.sender_user) {
            let found = receipt_tally::receipt_of(&receipts, user);
            let status =
                receipt_tally::member_status(found, r.sender_user == self.e.my_user, r.status);
            let name = conv
                .group
                .as_ref()
                .and_then(|g| g.member(user))
                .map_or_else(|| self.user_name(user), |m| m.name.clone());
            views.push(ReceiptView {
                user_id: user.to_string(),
                name,
                status: status.to_string(),
                at: found.map(|x| x.at_ms),
            });
        }
        let progress =
            receipt_tally::progress(&conv.members, &r.sender_user, &self.e.my_user, &receipts);
        Ok((views, progress))
    }

    /// `weft read`: marks the conversation's incoming messages read and
    /// tells their senders (not in groups above the read-receipt limit).
    pub(super) fn mark_read(&mut self, conv_id: ConversationId) -> EngineResult<ReadView> {
        let ids = self
            .db
            .unread_incoming(&conv_id, &self.e.my_user, MAX_READ)?;
        for id in &ids {
            self.db.set_message_status(id, MessageStatus::Read)?;
        }
        self.db.mark_conversation_read(&conv_id)?;
        // The account's other devices count it read too.
        if let Some(hlc) = self.db.latest_hlc(&conv_id)? {
            self.change_account(|a| a.mark_read(&conv_id.0, hlc))?;
        }
        let receipts = self.e.convs.get(&conv_id).is_some_and(|c| {
            receipt_tally::sends_read_receipts(
                c.kind,
                c.members.len(),
                self.e.settings.read_receipts_max_group,
            )
        });
        if receipts && !ids.is_empty() {
            self.send_receipt(conv_id, ReceiptKind::Read, &ids)?;
        }
        Ok(ReadView {
            conversation: conv_id.to_string(),
            unread: 0,
            read: ids.len() as u64,
            receipts_sent: receipts && !ids.is_empty(),
        })
    }
}
