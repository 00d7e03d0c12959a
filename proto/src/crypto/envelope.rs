//! The envelope: the one signed, encrypted container that every message,
//! key, receipt and membership change travels in, on gossip, on direct
//! streams, in relay mailboxes and on disk.
//!
//! Wire format (version 2, see docs/protocol.md):
//! `postcard(Header) | postcard(ciphertext: bytes) | ed25519 signature (64)`.
//! The signature is by the sender device key over
//! `"weft v2 envelope" | everything before it`; the AEAD's associated data
//! is the encoded header, so routing tag, sender, epoch and counter are
//! bound to the ciphertext. The header names no conversation: its routing
//! tag means something only to the members (`crate::routing`); an envelope
//! sealed to devices carries its conversation id inside the ciphertext, so
//! a device added to a group can open it before it knows the group's tag.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroize;

use super::CryptoError;
use super::chain::MessageKey;
use super::seal;
use crate::ids::{ConversationId, DeviceId, EnvelopeId, RoutingTag};

pub const ENVELOPE_VERSION: u8 = 2;
/// Largest envelope accepted from anyone (a sealed key for every device of
/// a full group fits well within it).
pub const MAX_ENVELOPE_BYTES: usize = 1024 * 1024;
/// Most recipient devices one sealed envelope may name.
pub const MAX_RECIPIENTS: usize = 4096;
const SIGNATURE_CONTEXT: &[u8] = b"weft v2 envelope";

/// How the ciphertext is keyed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Sealing {
    /// With the sender's chain for this conversation and epoch.
    Chain { epoch: u64, counter: u64 },
    /// With a fresh content key, sealed to each recipient device. Used for
    /// key distributions and membership changes, which must reach devices
    /// that hold no chain yet.
    Sealed {
        ephemeral: [u8; 32],
        recipients: Vec<Recipient>,
    },
}

/// One recipient's copy of a sealed content key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipient {
    pub device: DeviceId,
    pub wrapped_key: Vec<u8>,
}

/// The cleartext header: what relays and gossip validators may see.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub version: u8,
    /// The conversation's routing tag (for the epoch the sender is in).
    pub tag: RoutingTag,
    pub sender: DeviceId,
    pub sealing: Sealing,
}

/// A decoded envelope. Holds its exact wire bytes: signatures are checked
/// over them, and they are what gets stored and forwarded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    pub header: Header,
    bytes: Vec<u8>,
    header_len: usize,
    ciphertext: std::ops::Range<usize>,
}

impl Envelope {
    pub fn id(&self) -> EnvelopeId {
        EnvelopeId::of(&self.bytes)
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    fn associated_data(&self) -> &[u8] {
        &self.bytes[..self.header_len]
    }

    fn ciphertext(&self) -> &[u8] {
        &self.bytes[self.ciphertext.clone()]
    }

    /// Parses wire bytes. Checks structure and limits only: call
    /// [`Envelope::verify`] before trusting anything in it.
    pub fn decode(bytes: &[u8]) -> Result<Self, CryptoError> {
        if bytes.len() > MAX_ENVELOPE_BYTES {
            return Err(CryptoError::TooLarge(bytes.len(), MAX_ENVELOPE_BYTES));
        }
        let version = *bytes.first().ok_or(CryptoError::Malformed("empty"))?;
        if version != ENVELOPE_VERSION {
            // Version 1 headers named the conversation in clear; they are
            // refused, never read as version 2.
            return Err(CryptoError::Version(version));
        }
        if bytes.len() < 64 {
            return Err(CryptoError::Malformed("too short"));
        }
        let signed = &bytes[..bytes.len() - 64];
        let (header, rest): (Header, &[u8]) =
            postcard::take_from_bytes(signed).map_err(|_| CryptoError::Malformed("header"))?;
        if let Sealing::Sealed { recipients, .. } = &header.sealing
            && recipients.len() > MAX_RECIPIENTS
        {
            return Err(CryptoError::Malformed("too many recipients"));
        }
        let header_len = signed.len() - rest.len();
        let (ciphertext, tail): (&[u8], &[u8]) =
            postcard::take_from_bytes(rest).map_err(|_| CryptoError::Malformed("ciphertext"))?;
        if !tail.is_empty() {
            return Err(CryptoError::Malformed("trailing bytes"));
        }
        let start = header_len + (rest.len() - ciphertext.len() - tail.len());
        Ok(Self {
            header,
            bytes: bytes.to_vec(),
            header_len,
            ciphertext: start..start + ciphertext.len(),
        })
    }

    /// Checks the sender device's signature.
    pub fn verify(&self) -> Result<(), CryptoError> {
        let sender = VerifyingKey::from_bytes(&self.header.sender.0)
            .map_err(|_| CryptoError::BadSignature)?;
        self.verify_with(&sender)
    }

    /// The same, with the sender's key already decoded (receivers keep
    /// decoded keys: decoding one costs a fifth of a verification).
    pub fn verify_with(&self, sender: &VerifyingKey) -> Result<(), CryptoError> {
        if sender.as_bytes() != &self.header.sender.0 {
            return Err(CryptoError::BadSignature);
        }
        let split = self.bytes.len() - 64;
        let mut sig = [0u8; 64];
        sig.copy_from_slice(&self.bytes[split..]);
        let mut msg = Vec::with_capacity(SIGNATURE_CONTEXT.len() + split);
        msg.extend_from_slice(SIGNATURE_CONTEXT);
        msg.extend_from_slice(&self.bytes[..split]);
        sender
            .verify_strict(&msg, &Signature::from_bytes(&sig))
            .map_err(|_| CryptoError::BadSignature)
    }

    /// Opens a chain-sealed envelope with the message key for its counter.
    pub fn open_chain(&self, key: &MessageKey) -> Result<Vec<u8>, CryptoError> {
        if !matches!(self.header.sealing, Sealing::Chain { .. }) {
            return Err(CryptoError::Malformed("not chain-sealed"));
        }
        aead_open(
            &key.key,
            &key.nonce,
            self.ciphertext(),
            self.associated_data(),
        )
    }

    /// Opens an envelope sealed to this device with whichever of its
    /// keys it was sealed to (handout keys, then the certified one).
    pub fn open_sealed_any(
        &self,
        me: &DeviceId,
        keys: &[&StaticSecret],
    ) -> Result<(ConversationId, Vec<u8>), CryptoError> {
        let mut last = CryptoError::Decrypt;
        for key in keys {
            match self.open_sealed(me, key) {
                Err(CryptoError::Decrypt) => last = CryptoError::Decrypt,
                other => return other,
            }
        }
        Err(last)
    }

    /// Opens an envelope sealed to this device: its conversation and
    /// plaintext.
    pub fn open_sealed(
        &self,
        me: &DeviceId,
        my_dh: &StaticSecret,
    ) -> Result<(ConversationId, Vec<u8>), CryptoError> {
        let Sealing::Sealed {
            ephemeral,
            recipients,
        } = &self.header.sealing
        else {
            return Err(CryptoError::Malformed("not sealed to devices"));
        };
        let mine = recipients
            .iter()
            .find(|r| &r.device == me)
            .ok_or(CryptoError::NotARecipient)?;
        let aad = wrap_aad(&self.header.tag, &self.header.sender, me);
        let mut content_key = seal::unwrap(my_dh, ephemeral, &mine.wrapped_key, &aad)?;
        let (mut key, nonce) = content_key_material(&content_key);
        content_key.zeroize();
        let out = aead_open(&key, &nonce, self.ciphertext(), self.associated_data());
        key.zeroize();
        let mut out = out?;
        if out.len() < 32 {
            out.zeroize();
            return Err(CryptoError::Malformed(
                "sealed content without a conversation",
            ));
        }
        let conversation = ConversationId::from_slice(&out[..32]).ok_or(CryptoError::Malformed(
            "sealed content without a conversation",
        ))?;
        // Shifted in place: no second copy of the plaintext is left behind.
        out.copy_within(32.., 0);
        let len = out.len() - 32;
        out[len..].zeroize();
        out.truncate(len);
        Ok((conversation, out))
    }
}

fn wrap_aad(tag: &RoutingTag, sender: &DeviceId, recipient: &DeviceId) -> Vec<u8> {
    let mut aad = Vec::with_capacity(80);
    aad.extend_from_slice(&tag.0);
    aad.extend_from_slice(&sender.0);
    aad.extend_from_slice(&recipient.0);
    aad
}

fn content_key_material(content_key: &[u8; 32]) -> ([u8; 32], [u8; 24]) {
    let mut out = [0u8; 56];
    blake3::Hasher::new_derive_key("weft v1 sealed content key")
        .update(content_key)
        .finalize_xof()
        .fill(&mut out);
    let mut key = [0u8; 32];
    let mut nonce = [0u8; 24];
    key.copy_from_slice(&out[..32]);
    nonce.copy_from_slice(&out[32..]);
    out.zeroize();
    (key, nonce)
}

fn aead_open(
    key: &[u8; 32],
    nonce: &[u8; 24],
    ct: &[u8],
    aad: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    XChaCha20Poly1305::new(&Key::from(*key))
        .decrypt(&XNonce::from(*nonce), Payload { msg: ct, aad })
        .map_err(|_| CryptoError::Decrypt)
}

fn aead_seal(
    key: &[u8; 32],
    nonce: &[u8; 24],
    pt: &[u8],
    aad: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    XChaCha20Poly1305::new(&Key::from(*key))
        .encrypt(&XNonce::from(*nonce), Payload { msg: pt, aad })
        .map_err(|_| CryptoError::Malformed("plaintext too long"))
}

/// Encodes, encrypts and signs.
fn build(
    signer: &SigningKey,
    header: Header,
    encrypt: impl FnOnce(&[u8]) -> Result<Vec<u8>, CryptoError>,
) -> Result<Envelope, CryptoError> {
    let mut bytes = postcard::to_stdvec(&header).map_err(|_| CryptoError::Malformed("header"))?;
    let header_len = bytes.len();
    let ciphertext = encrypt(&bytes)?;
    let before = bytes.len();
    bytes = postcard::to_extend(ciphertext.as_slice(), bytes)
        .map_err(|_| CryptoError::Malformed("ciphertext"))?;
    let start = before + (bytes.len() - before - ciphertext.len());
    let mut msg = Vec::with_capacity(SIGNATURE_CONTEXT.len() + bytes.len());
    msg.extend_from_slice(SIGNATURE_CONTEXT);
    msg.extend_from_slice(&bytes);
    bytes.extend_from_slice(&signer.sign(&msg).to_bytes());
    if bytes.len() > MAX_ENVELOPE_BYTES {
        return Err(CryptoError::TooLarge(bytes.len(), MAX_ENVELOPE_BYTES));
    }
    Ok(Envelope {
        header,
        bytes,
        header_len,
        ciphertext: start..start + ciphertext.len(),
    })
}

fn sender_of(signer: &SigningKey) -> DeviceId {
    DeviceId(signer.verifying_key().to_bytes())
}

/// Seals `plaintext` with a chain message key.
pub fn seal_chain(
    signer: &SigningKey,
    tag: RoutingTag,
    epoch: u64,
    counter: u64,
    key: &MessageKey,
    plaintext: &[u8],
) -> Result<Envelope, CryptoError> {
    let header = Header {
        version: ENVELOPE_VERSION,
        tag,
        sender: sender_of(signer),
        sealing: Sealing::Chain { epoch, counter },
    };
    build(signer, header, |aad| {
        aead_seal(&key.key, &key.nonce, plaintext, aad)
    })
}

/// Seals `plaintext` of `conversation` to each `(device, dh public key)`,
/// under the conversation's routing `tag`. The caller supplies the
/// randomness (ephemeral secret and content key) so this stays pure and
/// test vectors stay fixed.
#[allow(clippy::too_many_arguments)]
pub fn seal_to_devices(
    signer: &SigningKey,
    tag: RoutingTag,
    conversation: ConversationId,
    recipients: &[(DeviceId, [u8; 32])],
    ephemeral_secret: [u8; 32],
    mut content_key: [u8; 32],
    plaintext: &[u8],
) -> Result<Envelope, CryptoError> {
    if recipients.is_empty() || recipients.len() > MAX_RECIPIENTS {
        return Err(CryptoError::Malformed("wrong number of recipients"));
    }
    let sender = sender_of(signer);
    let ephemeral = StaticSecret::from(ephemeral_secret);
    let mut sealed = Vec::with_capacity(recipients.len());
    for (device, dh) in recipients {
        let aad = wrap_aad(&tag, &sender, device);
        sealed.push(Recipient {
            device: *device,
            wrapped_key: seal::wrap(&ephemeral, dh, &content_key, &aad)?,
        });
    }
    let header = Header {
        version: ENVELOPE_VERSION,
        tag,
        sender,
        sealing: Sealing::Sealed {
            ephemeral: PublicKey::from(&ephemeral).to_bytes(),
            recipients: sealed,
        },
    };
    let (mut key, nonce) = content_key_material(&content_key);
    content_key.zeroize();
    let mut inner = zeroize::Zeroizing::new(Vec::with_capacity(32 + plaintext.len()));
    inner.extend_from_slice(&conversation.0);
    inner.extend_from_slice(plaintext);
    let result = build(signer, header, |aad| aead_seal(&key, &nonce, &inner, aad));
    key.zeroize();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::chain::{ReceivingChain, SendingChain};
    use proptest::prelude::*;

    const MAX_AGE: std::time::Duration = std::time::Duration::from_secs(3600);

    fn device(seed: u8) -> (SigningKey, StaticSecret) {
        (
            SigningKey::from_bytes(&[seed; 32]),
            StaticSecret::from([seed.wrapping_add(100); 32]),
        )
    }

    fn conv() -> ConversationId {
        ConversationId([42; 32])
    }

    fn tag() -> RoutingTag {
        RoutingTag([43; 16])
    }

    #[test]
    fn chain_envelope_round_trip() {
        let (alice, _) = device(1);
        let mut chain = SendingChain::new([5; 32]);
        let (ck, at) = chain.distribution();
        let (counter, mk) = chain.step().unwrap();
        let env = seal_chain(&alice, tag(), 1, counter, &mk, b"hello").unwrap();
        let got = Envelope::decode(env.bytes()).unwrap();
        got.verify().unwrap();
        let (rk, _) = ReceivingChain::new(ck, at)
            .key_for(counter, 0, MAX_AGE)
            .unwrap();
        assert_eq!(got.open_chain(&rk).unwrap(), b"hello");
        assert_eq!(got.id(), env.id());
    }

    #[test]
    fn tampering_is_detected() {
        let (alice, _) = device(1);
        let mut chain = SendingChain::new([5; 32]);
        let (counter, mk) = chain.step().unwrap();
        let env = seal_chain(&alice, tag(), 1, counter, &mk, b"hello").unwrap();
        let good = env.bytes().to_vec();
        // Flip every byte in turn: each must fail to decode, verify or open.
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x20;
            let ok = Envelope::decode(&bad)
                .and_then(|e| e.verify().map(|_| e))
                .and_then(|e| e.open_chain(&mk));
            assert!(ok.is_err(), "flip at byte {i} went unnoticed");
        }
    }

    #[test]
    fn forged_signature_and_wrong_key_fail() {
        let (alice, _) = device(1);
        let (mallory, _) = device(2);
        let mut chain = SendingChain::new([5; 32]);
        let (counter, mk) = chain.step().unwrap();
        let env = seal_chain(&mallory, tag(), 1, counter, &mk, b"hi").unwrap();
        // Mallory claims to be alice: header sender swapped, signature hers.
        let mut forged = Envelope::decode(env.bytes()).unwrap();
        forged.header.sender = sender_of(&alice);
        let mut bytes = postcard::to_stdvec(&forged.header).unwrap();
        bytes.extend_from_slice(&env.bytes()[env.header_len..]);
        let forged = Envelope::decode(&bytes).unwrap();
        assert_eq!(forged.verify(), Err(CryptoError::BadSignature));
        // A different chain cannot open it.
        let (_, other) = SendingChain::new([6; 32]).step().unwrap();
        assert_eq!(env.open_chain(&other), Err(CryptoError::Decrypt));
    }

    #[test]
    fn sealed_envelope_reaches_only_recipients() {
        let (alice, _) = device(1);
        let (_, bob_dh) = device(2);
        let (_, carol_dh) = device(3);
        let bob = DeviceId([2; 32]);
        let carol = DeviceId([3; 32]);
        let env = seal_to_devices(
            &alice,
            tag(),
            conv(),
            &[(bob, PublicKey::from(&bob_dh).to_bytes())],
            [11; 32],
            [12; 32],
            b"key",
        )
        .unwrap();
        let got = Envelope::decode(env.bytes()).unwrap();
        got.verify().unwrap();
        assert_eq!(
            got.open_sealed(&bob, &bob_dh).unwrap(),
            (conv(), b"key".to_vec())
        );
        assert_eq!(
            got.open_sealed(&carol, &carol_dh),
            Err(CryptoError::NotARecipient)
        );
        // Carol pretending to be bob has the wrong DH key.
        assert_eq!(got.open_sealed(&bob, &carol_dh), Err(CryptoError::Decrypt));
    }

    #[test]
    fn removed_member_cannot_read_the_next_epoch() {
        let (alice, _) = device(1);
        let (_, bob_dh) = device(2);
        let (_, carol_dh) = device(3);
        let (bob, carol) = (DeviceId([2; 32]), DeviceId([3; 32]));
        // Epoch 1: carol holds alice's chain.
        let epoch1 = SendingChain::new([1; 32]);
        let (ck1, at1) = epoch1.distribution();
        let carol_chain = ReceivingChain::new(ck1, at1);
        // Carol is removed: alice's epoch-2 chain is sealed to bob alone.
        let mut epoch2 = SendingChain::new([2; 32]);
        let (ck2, _) = epoch2.distribution();
        let dist = seal_to_devices(
            &alice,
            tag(),
            conv(),
            &[(bob, PublicKey::from(&bob_dh).to_bytes())],
            [13; 32],
            [14; 32],
            &ck2,
        )
        .unwrap();
        assert_eq!(
            dist.open_sealed(&carol, &carol_dh),
            Err(CryptoError::NotARecipient)
        );
        assert_eq!(dist.open_sealed(&bob, &carol_dh), Err(CryptoError::Decrypt));
        assert_eq!(
            dist.open_sealed(&bob, &bob_dh).unwrap(),
            (conv(), ck2.to_vec())
        );
        // A message of epoch 2 does not open with carol's epoch-1 chain.
        let (counter, mk) = epoch2.step().unwrap();
        let msg = seal_chain(&alice, tag(), 2, counter, &mk, b"after carol").unwrap();
        let (carol_key, _) = carol_chain.key_for(counter, 0, MAX_AGE).unwrap();
        assert_eq!(msg.open_chain(&carol_key), Err(CryptoError::Decrypt));
    }

    #[test]
    fn oversized_and_wrong_version_are_refused() {
        assert!(matches!(
            Envelope::decode(&vec![1u8; MAX_ENVELOPE_BYTES + 1]),
            Err(CryptoError::TooLarge(..))
        ));
        assert_eq!(Envelope::decode(&[3u8; 100]), Err(CryptoError::Version(3)));
        // A version 1 header (conversation id in clear) is refused as such.
        assert_eq!(Envelope::decode(&[1u8; 100]), Err(CryptoError::Version(1)));
        assert!(Envelope::decode(&[]).is_err());
    }

    proptest! {
        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            if let Ok(env) = Envelope::decode(&bytes) {
                let _ = env.verify();
            }
        }

        #[test]
        fn truncations_never_panic(cut in 0usize..400) {
            let (alice, _) = device(1);
            let (counter, mk) = SendingChain::new([5; 32]).step().unwrap();
            let env = seal_chain(&alice, tag(), 1, counter, &mk, &[7u8; 200]).unwrap();
            let bytes = env.bytes();
            let cut = cut.min(bytes.len());
            if let Ok(e) = Envelope::decode(&bytes[..cut]) {
                prop_assert!(e.verify().is_err() || cut == bytes.len());
            }
        }
    }
}
