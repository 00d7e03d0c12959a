//! What envelopes carry once opened. Encoded with postcard; the enum tag
//! is part of the versioned wire format (docs/protocol.md).

use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::group::GroupState;
use crate::hlc::Hlc;
use crate::identity::{DeviceCertificate, HandoutKey, OneTimeKeys, Revocation};
use crate::ids::MessageId;

/// Longest message text, in bytes of UTF-8.
pub const MAX_TEXT_BYTES: usize = 64 * 1024;
/// Most messages one receipt acknowledges.
pub const MAX_RECEIPT_IDS: usize = 512;

/// The plaintext of an envelope.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Payload {
    /// A chat message (chain-sealed).
    Text(TextMessage),
    /// The sender device's chain for one epoch of a conversation (sealed to
    /// each member device). Carries the sender's certificate and name so a
    /// recipient who never saw this device can check who it belongs to.
    SenderKey(SenderKey),
    /// A group's full state after a membership change (sealed to the
    /// devices of old and new members).
    Group(GroupState),
    /// Messages this device has stored (delivered) or its user has read
    /// (chain-sealed, to the whole conversation).
    Receipt(Receipt),
    /// A change of one of the conversation's annotation shards (an edit,
    /// a deletion, a reaction; chain-sealed, to the whole conversation).
    Annotate(Annotate),
    /// The sending account's devices, each certified by its user key
    /// (sealed to the conversation's member devices).
    Devices(Vec<DeviceCertificate>),
    /// One of the sending account's devices is revoked, signed by its user
    /// key (sealed to the conversation's member devices and the revoked
    /// one, so that it learns it too).
    Revoked(Revocation),
    /// A change of the account's private state (`weft_crdt::AccountState`:
    /// contacts, blocks, read positions, privacy), chain-sealed in the
    /// account's own conversation, so only its devices read it.
    Account(AccountChange),
    /// The sending device's current handout key (sealed to member
    /// devices): what to seal to it from now on.
    HandoutKey(HandoutKey),
    /// One-time handout keys the sending device gives member devices, a
    /// batch for each (sealed to those devices): a holder seals one key
    /// handout to each key of its batch.
    OneTimeKeys(Vec<OneTimeKeys>),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountChange {
    /// One automerge change, written by the sending device.
    pub change: Vec<u8>,
}

/// The length of an annotation shard's period: 30 days of HLC time (the
/// node checks that its annotation documents use the same).
pub const SHARD_PERIOD_MS: u64 = 30 * 24 * 3600 * 1000;

/// The annotation shard of a message: its group epoch in the high 32 bits,
/// the 30-day period of its HLC in the low 32. A member added to a group
/// reads only messages of later epochs, so the shards it needs hold no
/// change from before it joined (it could not apply changes that build on
/// ones it never saw).
pub fn shard_of(epoch: u64, hlc: Hlc) -> u64 {
    let period = hlc.ms() / SHARD_PERIOD_MS;
    (epoch.min(u64::from(u32::MAX)) << 32) | period.min(u64::from(u32::MAX))
}

/// Longest automerge change an [`Annotate`] carries.
pub const MAX_CHANGE_BYTES: usize = 64 * 1024;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Annotate {
    /// The message the change is about.
    pub message: MessageId,
    /// The shard: [`shard_of`] the message.
    pub period: u64,
    /// One automerge change of that shard, written by the sending device
    /// (its actor is the device id).
    pub change: Vec<u8>,
    /// For an edit: the new text and the id the change refers to it by.
    pub edit: Option<EditText>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EditText {
    pub id: [u8; 16],
    pub text: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TextMessage {
    pub text: String,
    pub reply_to: Option<MessageId>,
    /// The sender's hybrid logical clock when sending: the conversation's
    /// order (clamped by receivers if far in the future).
    pub hlc: Hlc,
    /// The group epoch the sender sent under (1 in one-to-one
    /// conversations): it picks the message's annotation shard.
    pub epoch: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    pub kind: ReceiptKind,
    /// At most [`MAX_RECEIPT_IDS`].
    pub messages: Vec<MessageId>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReceiptKind {
    Delivered,
    Read,
}

/// Wiped when dropped: the chain key reads every message of the epoch.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
pub struct SenderKey {
    pub epoch: u64,
    pub chain_key: [u8; 32],
    pub next_counter: u64,
    /// Public.
    #[zeroize(skip)]
    pub sender_cert: DeviceCertificate,
    /// Checked with `identity::validate_name` on receipt.
    pub sender_name: String,
}

impl std::fmt::Debug for SenderKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SenderKey")
            .field("epoch", &self.epoch)
            .field("next_counter", &self.next_counter)
            .finish_non_exhaustive()
    }
}

impl Payload {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        postcard::from_bytes(bytes).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_messages_shard_is_its_epoch_and_period() {
        let at = |ms: u64| Hlc::new(ms, 0);
        let p = SHARD_PERIOD_MS;
        // One period of one epoch shares a shard, whatever the counter.
        assert_eq!(shard_of(1, at(0)), shard_of(1, Hlc::new(p - 1, 9)));
        assert_eq!(shard_of(1, at(0)), 1 << 32);
        assert_eq!(shard_of(1, at(p)), (1 << 32) | 1);
        // Another epoch is another shard, even in the same period.
        assert_ne!(shard_of(1, at(5)), shard_of(2, at(5)));
        // A huge epoch saturates instead of spilling out; the latest
        // timestamp's period still fits in its half.
        assert_eq!(shard_of(u64::MAX, at(0)), u64::from(u32::MAX) << 32);
        assert_eq!(shard_of(0, Hlc(u64::MAX)), Hlc(u64::MAX).ms() / p);
    }

    #[test]
    fn text_round_trips() {
        let p = Payload::Text(TextMessage {
            text: "hi".into(),
            reply_to: None,
            hlc: Hlc::new(5, 1),
            epoch: 1,
        });
        assert_eq!(Payload::decode(&p.encode()), Some(p));
    }

    #[test]
    fn sender_keys_are_wiped_on_drop() {
        fn wiped_on_drop<T: ZeroizeOnDrop>() {}
        wiped_on_drop::<SenderKey>();
    }

    proptest! {
        // Hostile plaintexts (from a member) never panic.
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = Payload::decode(&bytes);
            let _ = GroupState::decode(&bytes);
        }
    }
}
